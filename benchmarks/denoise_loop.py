"""The whole denoising loop of a diffusers WanPipeline, as a user runs it.

Random weights, a Wan-size transformer (`--size wan2.1-1.3b`) or a tiny one (`--size tiny`, for a
CPU smoke run), a tiny random VAE (the loop ends at the latents: `output_type="latent"`), prompt
embeddings passed in (no text encoder), classifier-free guidance (two transformer calls per step).
Variants, measured in one process, one after the other:

  eager               the pipeline as it comes
  diffusers-regional  `transformer.compile_repeated_blocks(fullgraph=True)`, what a user picks today
  fv-auto             `pipe.transformer = fv_compile.compile(pipe.transformer)` (regional by default)
  fv-sta              the same with sliding tile attention on the self-attention sites, the first
                      `--sta-dense-steps` steps dense

Each variant first runs a short warm-up loop (compiled ones compile there; its wall time is
reported as "first loop"), then the timed loop of `--steps` steps. The final latents are compared
with eager's. Prints a table last; `--json` writes the numbers.

    python benchmarks/denoise_loop.py --size wan2.1-1.3b --steps 50
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

import fv_compile
from fv_compile.models.diffusers_zoo import from_diffusers


def build_pipeline(size: str, device: str, dtype: torch.dtype):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    transformer, _, _ = from_diffusers("WanTransformer3DModel", size, dtype=dtype, device=device)
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=transformer.config.in_channels, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True],
    ).to(device).eval()  # fmt: skip
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    return WanPipeline(
        tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler
    )


def run_loop(pipe, steps: int, args, embeds) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(0)
    out = pipe(
        prompt_embeds=embeds[0],
        negative_prompt_embeds=embeds[1],
        height=args.height,
        width=args.width,
        num_frames=args.frames,
        num_inference_steps=steps,
        guidance_scale=5.0,
        generator=g,
        output_type="latent",
        return_dict=False,
    )[0]
    return out.float()


def timed(fn, device: str) -> tuple[float, object]:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def measure(name, pipe, base, args, embeds, window, device, reference) -> dict:
    torch._dynamo.reset()
    transformer = base
    warm_steps = 2
    if name == "diffusers-regional":
        transformer = copy.deepcopy(base)  # compile_repeated_blocks compiles the blocks in place
        transformer.compile_repeated_blocks(fullgraph=True)
    elif name == "fv-auto":
        transformer = fv_compile.compile(base)
    elif name == "fv-sta":
        fv_args = fv_compile.FastVideoArgs(sta_window=window, sta_dense_steps=args.sta_dense_steps)
        transformer = fv_compile.compile(
            base, {"self": "SLIDING_TILE_ATTN"}, fastvideo_args=fv_args
        )
        warm_steps = args.sta_dense_steps + 1  # compiles the dense and the sparse variant
    elif name != "eager":
        raise SystemExit(f"unknown variant {name!r}")
    pipe.transformer = transformer
    first_s, _ = timed(lambda: run_loop(pipe, warm_steps, args, embeds), device)  # compiles
    compiled = isinstance(transformer, fv_compile.CompiledModel)
    graphs_before = transformer._fv_backend.graphs if compiled else None
    loop_s, latents = timed(lambda: run_loop(pipe, args.steps, args, embeds), device)
    ref = latents if reference is None else reference
    row = {"variant": name, "loop_s": loop_s, "first_loop_s": first_s, "warm_steps": warm_steps,
           "rel_err_vs_first": float((latents - ref).norm() / ref.norm())}  # fmt: skip
    if compiled:
        row["recompiles_in_timed_loop"] = transformer._fv_backend.graphs - graphs_before
        row["sites_rewritten"] = len(transformer.explain().rewritten)
        row["metadata_variants"] = transformer.variants_compiled
    print(json.dumps(row), flush=True)
    row["latents"] = latents
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny", help="tiny | wan2.1-1.3b | wan2.1-14b")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--variants", default="eager,diffusers-regional,fv-auto,fv-sta")
    p.add_argument("--sta-window", default="2,2,3")
    p.add_argument("--sta-dense-steps", type=int, default=12)
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    pipe = build_pipeline(args.size, device, dtype)
    base = pipe.transformer
    text_dim = base.config.text_dim
    g = torch.Generator().manual_seed(1)
    embeds = [
        torch.randn(1, args.text_len, text_dim, generator=g).to(device, dtype) for _ in range(2)
    ]
    window = tuple(int(x) for x in args.sta_window.split(","))

    run_loop(pipe, 2, args, embeds)  # the process's first loop pays one-time costs: not a variant's
    rows, reference = [], None
    for name in args.variants.split(","):
        try:
            rows.append(measure(name, pipe, base, args, embeds, window, device, reference))
        except Exception as err:  # one failing variant must not hide the others' numbers
            rows.append({"variant": name, "error": f"{type(err).__name__}: {err}"[:500]})
            print(json.dumps(rows[-1]), flush=True)
        if reference is None and "latents" in rows[-1]:
            reference = rows[-1]["latents"]
        rows[-1].pop("latents", None)
        pipe.transformer = base
        if device == "cuda":
            torch.cuda.empty_cache()
    failed = [r for r in rows if "error" in r]
    rows = [r for r in rows if "error" not in r]

    eager = next((r["loop_s"] for r in rows if r["variant"] == "eager"), None)
    regional = next((r["loop_s"] for r in rows if r["variant"] == "diffusers-regional"), None)
    print(
        f"\n{args.size} {args.frames}x{args.height}x{args.width}, {args.steps} steps, CFG, {device} {dtype}"
    )
    print(
        f"{'variant':20s} {'loop s':>8s} {'s/step':>7s} {'vs eager':>9s} {'vs diffusers':>12s} "
        f"{'first loop s':>13s} {'rel err':>9s} {'recompiles':>10s}"
    )
    for r in rows:
        vs_e = f"{eager / r['loop_s']:.2f}x" if eager else "-"
        vs_d = f"{regional / r['loop_s']:.2f}x" if regional else "-"
        first = f"{r['first_loop_s']:.1f}" if r["first_loop_s"] is not None else "-"
        print(
            f"{r['variant']:20s} {r['loop_s']:8.1f} {r['loop_s'] / args.steps:7.3f} {vs_e:>9s} "
            f"{vs_d:>12s} {first:>13s} {r['rel_err_vs_first']:9.2e} "
            f"{r.get('recompiles_in_timed_loop', '-'):>10}"
        )
    for r in failed:
        print(f"{r['variant']:20s} FAILED: {r['error'][:200]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "device": device,
                    "torch": torch.__version__,
                    "rows": rows + failed,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
