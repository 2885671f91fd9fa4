"""Tile order once per model: sliding tile attention (STA) reordering q, k, v and the output at
every site, against the stretch between the first and the last site run in tile order.

A diffusers ``WanTransformer3DModel`` of Wan2.1-1.3B size with random weights, one transformer
step (batch 1, 512 text tokens), STA with window 2,2,3 on every self-attention site (cross-
attention on the dense default), bf16 on the GPU. One compiled model, two graph variants:

* ``per-site``: ``FastVideoArgs(sta_token_order="per_site")``: every STA site gathers q, k and v
  into tile order and scatters its output back (4 full-size copies per layer);
* ``hoisted``: ``sta_token_order="auto"``: fv_compile proves the model token-wise between the
  first and the last STA site and runs that stretch in tile order: the patch embedding's tokens
  and the RoPE tables are gathered once, the output head's tokens scattered once.

Tile order is a permutation of the tokens only when the tile divides the token grid. At 480p x 81
frames the grid is 21 x 30 x 52, which no tile the STA kernels run divides (their tile volume is
a multiple of 16; 21 * 30 * 52 holds only 2^3): tile order pads the grid (the default (6, 8, 8)
tile by 31%), and there is nothing to hoist.
The script says so for ``--check-video`` (default 81x480x832, from the metadata the backend builds
for it) and times ``--video`` (default 69x512x896: 18 x 32 x 56 = 32,256 tokens, the 480p-class
size the (6, 8, 8) tile divides; 480p x 81f has 32,760).

Measured per variant, in one process: ms per step (CUDA events, median, warm-up excluded), peak
memory of the timed calls, the first call (compiling the variant), and the max abs difference of
the output against per-site's. The table is printed last; ``--json PATH`` writes the numbers.

    python benchmarks/tile_order.py --json tile_order.json
    python benchmarks/tile_order.py --regional            # blocks compiled alone: border per block
    python benchmarks/tile_order.py --compiler eager      # no Inductor compile (the op-by-op graph)
    python benchmarks/tile_order.py --smoke               # CPU, tiny model: the script itself

The default traces the whole model once and compiles it twice with Inductor, one variant per
order (a cold whole-model compile of this model took about two minutes on the H200, per
docs/benchmarks.md; a warm Inductor cache makes a second run much shorter); ``--regional``
compiles one block per order, in seconds, with the border at each block.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fv_compile
from fv_compile import FastVideoArgs, ForwardBatch
from fv_compile.backends.sliding_tile import SlidingTileMetadataBuilder
from fv_compile.backends.tiles import tiles_per_axis
from fv_compile.models.diffusers_zoo import from_diffusers

ORDERS = (("per-site", "per_site"), ("hoisted", "auto"))
PATCH = (1, 2, 2)


def triple(text: str, sep: str = ",") -> tuple[int, int, int]:
    parts = tuple(int(x) for x in text.lower().split(sep))
    if len(parts) != 3:
        raise SystemExit(f"expected three numbers separated by {sep!r}, got {text!r}")
    return parts  # type: ignore[return-value]


def latent_grid(video: tuple[int, int, int]) -> tuple[int, int, int]:
    frames, height, width = video
    return ((frames - 1) // 4 + 1, height // 8, width // 8)  # Wan's VAE: 4x in time, 8x in space


def order_check(video, tile, window) -> dict:
    """Whether STA's tile order is a permutation at `video`, from the metadata it builds."""
    latent = latent_grid(video)
    grid = tuple(g // p for g, p in zip(latent, PATCH))
    args = FastVideoArgs(patch_size=PATCH, sta_tile_size=tile, sta_window=window)
    md = SlidingTileMetadataBuilder().build(
        0, ForwardBatch(raw_latent_shape=(1, 16, *latent)), args
    )
    n = math.prod(grid)
    slots = math.prod(tiles_per_axis(grid, tile)) * math.prod(tile)
    row = {"video": "x".join(map(str, video)), "token_grid": grid, "tokens": n, "tile_slots": slots,
           "permutation": md.token_gather is not None}  # fmt: skip
    if md.token_gather is None:
        row["why"] = (
            f"tile {tile} does not divide the token grid {grid}: tile order has {slots - n} padding "
            f"slots (+{100 * (slots - n) / n:.0f}%), no permutation, so each site keeps its own reorder"
        )
    return row


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(cm, args, kwargs, fb, fva, device: str) -> dict:
    from _timing import time_cuda

    def step():
        with torch.no_grad(), fv_compile.forward_context(0, fb, fva):
            return cm(*args, **kwargs)

    sync(device)
    t0 = time.perf_counter()
    out = step()  # compiles this order's variant
    sync(device)
    first_s = time.perf_counter() - t0
    row: dict = {"first_call_s": first_s}
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        timing = time_cuda(step)
        row.update(ms=timing["ms"], min_ms=timing["min_ms"], reps=timing["reps"])
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:  # the smoke run: a median of a few calls, on whatever the CPU shares
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        row["ms"] = sorted(times)[2]
        row["peak_gib"] = None
    row["out"] = (out[0] if isinstance(out, (tuple, list)) else out).float()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--video", default="69x512x896", help="frames x height x width of the timed step"
    )
    p.add_argument(
        "--check-video", default="81x480x832", help="a size only checked for a permutation"
    )
    p.add_argument("--tile", default="6,8,8", help="STA tile in tokens")
    p.add_argument("--sta-window", default="2,2,3", help="STA window in tiles")
    p.add_argument("--sta-kernel", default="auto", choices=["auto", "triton", "flash_attn"])
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--compiler", default="inductor", choices=["inductor", "aot_eager", "eager"])
    p.add_argument("--regional", action="store_true", help="compile the repeated block alone")
    p.add_argument(
        "--smoke", action="store_true", help="CPU, tiny model, eager: check the script runs"
    )
    p.add_argument("--json", default=None, help="write the numbers here")
    a = p.parse_args()
    start = time.perf_counter()
    device = "cpu" if a.smoke or not torch.cuda.is_available() else "cuda"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if a.smoke:
        a.video, a.check_video, a.tile, a.sta_window, a.compiler = (
            "5x128x128",
            "5x96x128",
            "1,4,4",
            "1,1,1",
            "eager",
        )
    video, check, tile, window = (
        triple(a.video, "x"),
        triple(a.check_video, "x"),
        triple(a.tile),
        triple(a.sta_window),
    )

    checks = [order_check(v, tile, window) for v in (check, video)]
    for c in checks:
        print(json.dumps(c), flush=True)
    if not checks[1]["permutation"]:
        raise SystemExit(f"--video {a.video}: {checks[1]['why']}; pick a size the tile divides")

    preset = "tiny" if a.smoke else "wan2.1-1.3b"
    model, args, kwargs = from_diffusers(
        "WanTransformer3DModel",
        preset,
        video=video,
        text_len=16 if a.smoke else a.text_len,
        dtype=dtype,
        device=device,
    )
    model.eval().requires_grad_(False)
    latent = args[0]
    fb = ForwardBatch(raw_latent_shape=tuple(latent.shape))
    cm = fv_compile.compile(
        model, {"self": "SLIDING_TILE_ATTN"}, compiler=a.compiler, regional=a.regional
    )
    rows = []
    for name, order in ORDERS:
        fva = FastVideoArgs(
            patch_size=PATCH,
            sta_tile_size=tile,
            sta_window=window,
            sta_kernel=a.sta_kernel,
            sta_token_order=order,
        )
        ordered_before = cm.variants_token_ordered
        row = {"variant": name, **measure(cm, args, kwargs, fb, fva, device)}
        row["ran_in_tile_order"] = cm.variants_token_ordered > ordered_before
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "out"}), flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    base = rows[0]["out"]
    for row in rows:
        out = row.pop("out")
        row["max_abs_diff"] = float((out - base).abs().max())
        row["rel_l2_diff"] = float((out - base).norm() / base.norm())
    report = cm.explain()
    orders = [t.describe() for t in report.token_order]
    sites = {s.backend for s in report.sites}

    print()
    grid = checks[1]["token_grid"]
    print(
        f"Wan2.1-1.3B-size diffusers transformer, one step at {a.video} (token grid {grid}, "
        f"{math.prod(grid)} tokens), STA tile {tile} window {window}, {a.compiler}"
        f"{' regional' if a.regional else ' whole model'}, {device} {str(dtype).replace('torch.', '')}"
    )
    for c in checks[:1]:
        print(f"  {c['video']}: " + (c.get("why") or "tile order is a permutation"))
    for line in orders:
        print(f"  {line}")
    print(f"  backends: {', '.join(sorted(b for b in sites if b))}")
    heads = ("ms/step", "vs per-site", "peak GiB", "first call s", "max |diff|", "tile order")
    widths = (9, 11, 9, 12, 11, 10)
    print(f"{'variant':10s} " + " ".join(f"{h:>{w}s}" for h, w in zip(heads, widths)))
    ref = rows[0]["ms"]
    for r in rows:
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        print(
            f"{r['variant']:10s} {r['ms']:9.2f} {ref / r['ms']:10.3f}x {peak:>9s} {r['first_call_s']:12.1f} "
            f"{r['max_abs_diff']:11.3e} {'yes' if r['ran_in_tile_order'] else 'no':>10s}"
        )
    print(f"(wall {time.perf_counter() - start:.0f} s)")
    if a.json:
        with open(a.json, "w") as f:
            out = {"args": vars(a), "device": device, "torch": torch.__version__, "checks": checks}
            json.dump({**out, "token_order": orders, "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
