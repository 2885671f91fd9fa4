"""Latency gained by CUDA graphs (`mode="reduce-overhead"`) on a Wan-size diffusers transformer,
compiled the default way (regional: the block once), called as a pipeline calls it (no
`cudagraph_mark_step_begin`, no forward context).

Run on a CUDA machine (not a test):

    python benchmarks/cuda_graphs.py --out cuda_graphs.json
    python benchmarks/cuda_graphs.py --grid 21,30,52 --sta 3,3,3   # a smaller video, and STA
    python benchmarks/cuda_graphs.py --smoke --sta 1,1,1 --tile 1,4,4  # CPU: the script's logic only

Variants, each compiled fresh in this process, on one set of bf16 inputs:

* ``eager``: the diffusers model as it is;
* ``fv_compile``: `fv_compile.compile(model)` (auto backends, regional);
* ``fv_compile+cudagraphs``: the same with `mode="reduce-overhead"`;
* with ``--sta W``: ``sta`` and ``sta+cudagraphs``, SLIDING_TILE_ATTN on self-attention with
  window W (tiles of ``--tile``), its settings passed as `compile(fastvideo_args=...)`.

Per variant: median ms per call with CUDA events (warm-up excluded; calls issued back to back,
as in a denoising loop), min/max, the first call in seconds (the compile; CUDA graphs record on
the following calls), and the relative L2 error of the output against eager. CUDA graphs remove
the host's launch cost per kernel, so the gain grows as the step shrinks: compare grids.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fv_compile
from fv_compile.models import from_diffusers

from _timing import time_cuda


def triple(text: str) -> tuple[int, int, int]:
    values = tuple(int(v) for v in text.split(","))
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated ints, got {text!r}")
    return values  # type: ignore[return-value]


def time_cpu(fn, reps: int = 3) -> dict:
    """`time_cuda`'s fields from wall-clock time (the --smoke run on the CPU)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {
        "ms": times[len(times) // 2],
        "min_ms": times[0],
        "max_ms": times[-1],
        "reps": reps,
        "first_call_s": first,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--preset", default="wan2.1-1.3b", help="WanTransformer3DModel preset of fv_compile.models"
    )
    ap.add_argument(
        "--grid", type=triple, help="latent grid T,H,W (default: the preset's, 480p x 81 frames)"
    )
    ap.add_argument("--attention", default="auto", help="attention backend of the dense variants")
    ap.add_argument(
        "--sta", type=triple, help="also run SLIDING_TILE_ATTN with this window (in tiles)"
    )
    ap.add_argument("--tile", type=triple, default=(6, 8, 8), help="STA tile in tokens")
    ap.add_argument("--out", help="write the results as JSON")
    ap.add_argument(
        "--smoke", action="store_true", help="CPU, tiny model, eager compiler: check the script"
    )
    args = ap.parse_args()
    if args.smoke:
        args.preset, device, dtype, compiler = "tiny", "cpu", torch.float32, "eager"
    elif not torch.cuda.is_available():
        raise SystemExit("needs CUDA (or --smoke)")
    else:
        device, dtype, compiler = "cuda", torch.bfloat16, "inductor"

    model, inputs, kwargs = from_diffusers(
        "WanTransformer3DModel", args.preset, dtype=dtype, device=device
    )
    if args.grid is not None:
        latent = inputs[0]
        inputs = (
            torch.randn(
                latent.shape[0], latent.shape[1], *args.grid, device=device, dtype=latent.dtype
            ),
            *inputs[1:],
        )
    grid = tuple(inputs[0].shape[2:])
    tokens = grid[0] * (grid[1] // 2) * (grid[2] // 2)
    print(f"{args.preset}: latent grid {grid}, {tokens} video tokens, torch {torch.__version__}")

    def call(fn):
        with torch.no_grad():
            return fn(*inputs, **kwargs)[0]

    variants = [("eager", None)]
    dense = dict(attention_backend=args.attention, compiler=compiler)
    variants += [
        ("fv_compile", dense),
        ("fv_compile+cudagraphs", {**dense, "mode": "reduce-overhead"}),
    ]
    if args.sta:
        sta = dict(
            attention_backend={"self": "SLIDING_TILE_ATTN", "default": args.attention},
            fastvideo_args=fv_compile.FastVideoArgs(sta_window=args.sta, sta_tile_size=args.tile),
        )
        variants += [("sta", sta), ("sta+cudagraphs", {**sta, "mode": "reduce-overhead"})]

    reference = call(model).float()
    rows = []
    for name, options in variants:
        fn = model if options is None else fv_compile.compile(model, **options)
        run = functools.partial(call, fn)
        timing = time_cpu(run) if args.smoke else time_cuda(run, warmup=3, min_reps=10)
        out = call(fn).float()
        err = ((out - reference).norm() / reference.norm()).item()
        row = {"variant": name, **timing, "rel_err": err}
        if options is not None:
            row["regions"] = fn.regions
            row["cuda_graphs"] = fn.cuda_graphs
        rows.append(row)
        print(
            f"{name:24s} {timing['ms']:9.2f} ms  (min {timing['min_ms']:.2f}, max {timing['max_ms']:.2f})  "
            f"first call {timing['first_call_s']:6.1f} s  rel err {err:.2e}"
        )
        del fn, run, out
        gc.collect()
        torch._dynamo.reset()
        if device == "cuda":
            torch.cuda.empty_cache()

    by_name = {r["variant"]: r for r in rows}
    for base in ("fv_compile", "sta"):
        if base in by_name:
            gain = by_name[base]["ms"] / by_name[f"{base}+cudagraphs"]["ms"]
            print(f"CUDA graphs on {base}: {gain:.3f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "preset": args.preset,
                    "grid": grid,
                    "torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "rows": rows,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
