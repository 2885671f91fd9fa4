"""Timing helpers for GPU benchmarks: CUDA events, warm-up excluded, median of repeats."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import torch


def time_cuda(
    fn: Callable[[], object],
    *,
    warmup: int = 2,
    min_reps: int = 5,
    max_reps: int = 100,
    target_s: float = 0.4,
) -> dict:
    """Median milliseconds of ``fn`` timed with CUDA events, one event pair per call.

    The first call (compilation, handle creation) and ``warmup`` more are not timed. The
    number of timed calls is chosen from the warm-up time so the timed part lasts about
    ``target_s`` seconds, clamped to ``[min_reps, max_reps]``.
    """
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(warmup):
        fn()
    end.record()
    torch.cuda.synchronize()
    est_ms = max(start.elapsed_time(end) / max(warmup, 1), 1e-3)
    reps = int(min(max_reps, max(min_reps, target_s * 1e3 / est_ms)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return {
        "ms": statistics.median(times),
        "min_ms": times[0],
        "max_ms": times[-1],
        "reps": reps,
        "first_call_s": first_s,
    }


def gemm_ceiling(n: int = 8192, dtype=torch.bfloat16) -> dict:
    """bf16 ``n^3`` matmul on random normal inputs: the practical tensor-core ceiling."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    c = torch.empty(n, n, device="cuda", dtype=dtype)
    best = None
    # both operand layouts (cuBLAS may pick different kernels); the faster is the ceiling
    for layout, bb in (("nn", b), ("nt", b.t())):
        t = time_cuda(
            functools.partial(torch.mm, a, bb, out=c), warmup=10, min_reps=20, target_s=0.5
        )
        t["tflops"] = 2 * n**3 / (t["ms"] * 1e-3) / 1e12
        t["layout"] = layout
        if best is None or t["tflops"] > best["tflops"]:
            best = t
    del a, b, c
    return best
