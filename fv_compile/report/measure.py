"""Timing, memory, output error and attention share: the numbers one variant is judged by.

Every function here takes a device and does the right thing on it: CUDA events and the caching
allocator's peak on a GPU, `perf_counter` on a CPU (where ops are synchronous, and where the process
allocator gives no per-run peak, so memory is reported as unknown rather than as a misleading RSS).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.autograd import DeviceType

ATTENTION_OP = "fv_compile::attention"
STEP_RANGE = "fv_compile.report::step"


@dataclass
class LatencyStats:
    """Per-step latency over the timed repeats, in milliseconds."""

    median_ms: float
    min_ms: float
    max_ms: float
    samples_ms: list[float]

    @classmethod
    def of(cls, samples_ms: list[float]) -> LatencyStats:
        return cls(
            statistics.median(samples_ms), min(samples_ms), max(samples_ms), list(samples_ms)
        )


@dataclass
class OutputError:
    """How far a variant's output moved from eager's, worst over the steps of the loop.

    rel_fro is ||out - ref||_F / ||ref||_F; cosine is the cosine similarity of the flattened
    tensors. All three are computed in float64, so they measure the variant, not the metric.
    """

    max_abs: float
    rel_fro: float
    cosine: float

    def worst(self, other: OutputError) -> OutputError:
        return OutputError(
            _nan_max(self.max_abs, other.max_abs),
            _nan_max(self.rel_fro, other.rel_fro),
            _nan_min(self.cosine, other.cosine),
        )


@dataclass
class AttentionShare:
    """Time spent in attention during one profiled step, and how it was attributed."""

    attention_ms: float
    step_ms: float
    calls: int
    method: str
    share: float = field(init=False)

    def __post_init__(self) -> None:
        self.share = self.attention_ms / self.step_ms if self.step_ms > 0 else math.nan


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_time(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of host wall time until `fn`'s device work is done; for calls that compile."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def device_time(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds `fn` takes on the device: CUDA events on a GPU (host launch overhead that the GPU
    hides does not count), perf_counter on a CPU."""
    if device.type != "cuda":
        return wall_time(fn, device)
    synchronize(device)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    """Peak bytes allocated since the last reset on a GPU; None on a CPU, where no per-run peak
    exists."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def first_tensor(output: Any) -> torch.Tensor:
    """The model's main output: the tensor itself, or the first tensor of a tuple/list/dict
    (diffusers models return `(sample,)` with `return_dict=False`)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        items = list(output.values())
    elif isinstance(output, (tuple, list)):
        items = list(output)
    else:
        items = []
    for item in items:
        if isinstance(item, torch.Tensor):
            return item
    raise TypeError(f"the model returned {type(output).__name__}, which holds no tensor to compare")


def output_error(output: torch.Tensor, reference: torch.Tensor) -> OutputError:
    """Error of `output` against `reference`; raises if their shapes differ."""
    if output.shape != reference.shape:
        raise ValueError(
            f"output shape {tuple(output.shape)} differs from eager's {tuple(reference.shape)}"
        )
    out = output.detach().to(torch.float64).flatten()
    ref = reference.detach().to(device=out.device, dtype=torch.float64).flatten()
    diff = out - ref
    ref_norm = ref.norm()
    rel = (diff.norm() / ref_norm).item() if ref_norm > 0 else diff.norm().item()
    denom = out.norm() * ref_norm
    cosine = (out @ ref / denom).item() if denom > 0 else math.nan
    return OutputError(diff.abs().max().item(), rel, cosine)


def profile_attention(step: Callable[[], Any], device: torch.device) -> AttentionShare:
    """Profile one call of `step` and attribute its time to attention.

    Attention is every outermost `fv_compile::attention` op (the one op each rewritten site
    became, so nothing else is counted and nothing inside it is counted twice). On a GPU both
    sides are kernel time the profiler attributes to the op's and the step's CPU ranges (each
    kernel counted once, under the op that launched it); on a CPU both are CPU time.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    synchronize(device)
    with torch.profiler.profile(activities=activities, acc_events=True) as prof:
        with torch.profiler.record_function(STEP_RANGE):
            step()
        synchronize(device)
    # host-side ranges only: on a GPU the step's range also appears as a device annotation
    events = [e for e in prof.events() if e.device_type == DeviceType.CPU]
    attention = [e for e in events if e.name == ATTENTION_OP and not _inside(e, ATTENTION_OP)]
    steps = [e for e in events if e.name == STEP_RANGE]
    if device.type == "cuda":
        step_us = sum(e.device_time_total for e in steps)
        attention_us = sum(e.device_time_total for e in attention)
        method = "GPU kernel time under fv_compile::attention / GPU kernel time of the step"
    else:
        step_us = sum(e.cpu_time_total for e in steps)
        attention_us = sum(e.cpu_time_total for e in attention)
        method = "CPU time of fv_compile::attention ops / CPU time of the step"
    return AttentionShare(attention_us / 1e3, step_us / 1e3, len(attention), method)


def _inside(event: Any, name: str) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == name:
            return True
        parent = parent.cpu_parent
    return False


def _nan_max(a: float, b: float) -> float:
    return a if math.isnan(a) else b if math.isnan(b) else max(a, b)


def _nan_min(a: float, b: float) -> float:
    return a if math.isnan(a) else b if math.isnan(b) else min(a, b)
