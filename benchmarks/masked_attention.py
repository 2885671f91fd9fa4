"""Key padded attention on the GPU: masked SDPA against FLASH_ATTN and TRITON_ATTN through
fv_compile's op, with unmasked cuDNN and flash-attn-4 on the kept keys as the bars.

Run on a CUDA machine (not a test; flash-attn-4 importable for the FA4 rows):

    python benchmarks/masked_attention.py --json masked.json
    python benchmarks/masked_attention.py --model --json masked.json   # + a diffusers HunyuanVideo step
    python benchmarks/masked_attention.py --seq 8192                     # a short smoke run

Shapes: HunyuanVideo 720p x 129 frames at one joint site, B1 H24 S119056 D128 bf16 with the last
64 keys padded (text padded to 256, 192 real), and a CFG batch B2 of the same with 64 and 200 keys
padded. Every variant reads the same BSHD tensors and the same boolean key mask `[B, 1, 1, S]`:

* `sdpa-masked`: `F.scaled_dot_product_attention(..., attn_mask=mask)` on BHSD views, SDPA's own
  dispatch (what the model runs eagerly, and fv_compile's fallback);
* `sdpa-cudnn-unmasked`: cuDNN SDPA on all keys, no mask (the dense bar, not the same result);
* `fa4-direct-kept`: flash-attn-4 on the kept keys only: B1 on the sliced keys, B2 through
  `flash_attn_varlen_func(seqused_k=)` on keys gathered beforehand (the kernel alone);
* `key-gather`: the device-side reorder the backends run first (`keys_first`), alone;
* `FLASH_ATTN`, `TRITON_ATTN`: a module holding the one masked SDPA call, compiled by fv_compile
  (`--compiler`, default inductor, strict), the mask passed as data every call.

CUDA events, median, warm-up excluded (benchmarks/_timing.py), random normal inputs. TFLOP/s counts
4·B·H·Sq·Sk·D over the site's full key length (as the masked kernel is billed), so rows compare by
time. Error: max |out - sdpa-masked| over all rows. The table is printed last; `--json PATH` writes
every row. `--model` adds one denoising step of diffusers' HunyuanVideoTransformer3DModel at its
full width and a reduced depth and size (`--model-video`, `--model-layers`): eager, and
fv_compile with TORCH_SDPA (masked SDPA everywhere), FLASH_ATTN and TRITON_ATTN. About 2-3 minutes
on an H200 without `--model`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import sys
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fv_compile
from fv_compile.backends.flash_attn import flash_kernel, flash_varlen_kernel
from fv_compile.backends.kernels.key_padding import keys_first

from _timing import time_cuda

HUNYUAN_720P = 119056  # 30 x 45 x 80 latent patches + 256 text tokens: 720p x 129 frames
SHAPES = [
    dict(name="hunyuan-720p-b1", B=1, H=24, S=HUNYUAN_720P, D=128, padded=[64]),
    dict(name="hunyuan-720p-cfg-b2", B=2, H=24, S=HUNYUAN_720P, D=128, padded=[64, 200]),
]


class MaskedSdpa(torch.nn.Module):
    """BSHD in, BHSD for SDPA, BSHD out: how a model calls attention with a key mask."""

    def forward(self, q, k, v, mask):
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
        )
        return o.transpose(1, 2)


def _time(fn, big: bool) -> dict:
    # a call of the big shapes takes 0.2-1 s: few repeats keep the run short
    return time_cuda(fn, warmup=1, min_reps=3, max_reps=10, target_s=1.5) if big else time_cuda(fn)


def bench_shape(shape: dict, compiler: str) -> list[dict]:
    b, h, s, d = shape["B"], shape["H"], shape["S"], shape["D"]
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)
    )
    kept = [s - p for p in shape["padded"]]
    keep = torch.arange(s, device="cuda")[None, :] < torch.tensor(kept, device="cuda")[:, None]
    mask = keep[:, None, None, :]
    scale = d**-0.5
    flops = 4 * b * h * s * s * d
    big = s * h >= 1 << 20
    rows: list[dict] = []
    model = MaskedSdpa()

    with torch.no_grad():
        ref = model(q, k, v, mask)

    def row(variant: str, fn, out=None, note: str = "") -> None:
        t = _time(fn, big)
        err = None if out is None else float((out.float() - ref.float()).abs().max())
        rows.append(
            dict(
                shape=shape["name"],
                variant=variant,
                B=b,
                H=h,
                S=s,
                D=d,
                kept=kept,
                ms=t["ms"],
                tflops=flops / (t["ms"] * 1e-3) / 1e12,
                max_abs_err=err,
                first_call_s=t["first_call_s"],
                reps=t["reps"],
                note=note,
            )
        )
        print(
            f"  {shape['name']:22} {variant:22} {t['ms']:9.2f} ms  {rows[-1]['tflops']:6.1f} TF/s  "
            f"err {'-' if err is None else f'{err:.2e}'}  {note}",
            flush=True,
        )

    with torch.no_grad():
        row("sdpa-masked", lambda: model(q, k, v, mask), ref)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
            row(
                "sdpa-cudnn-unmasked",
                lambda: model(q, k, v, None),
                note="all keys, no mask: not the same result",
            )
        row("key-gather", lambda: keys_first(k, v, keep), note="the reorder alone")

        found = flash_kernel()
        varlen = flash_varlen_kernel()
        if found is not None and found[0] == "FA4" and varlen is not None:
            fa = found[1]
            if b == 1:
                n = kept[0]
                ks, vs = k[:, :n], v[:, :n]

                def fa4_direct():
                    o = fa(q, ks, vs, softmax_scale=scale, causal=False)
                    return o[0] if isinstance(o, tuple) else o

                row("fa4-direct-kept", fa4_direct, fa4_direct(), note=f"keys [:{n}] sliced")
            else:
                kg, vg, counts = keys_first(k, v, keep)

                def fa4_direct():
                    o = varlen(q, kg, vg, seqused_k=counts, softmax_scale=scale, causal=False)
                    return o[0] if isinstance(o, tuple) else o

                row(
                    "fa4-direct-kept",
                    fa4_direct,
                    fa4_direct(),
                    note="seqused_k on keys gathered beforehand",
                )
        else:
            print(
                f"  {shape['name']:22} flash-attn-4 with seqused_k not importable: FA4 rows skipped",
                flush=True,
            )

        for backend in ("FLASH_ATTN", "TRITON_ATTN"):
            if backend == "FLASH_ATTN" and varlen is None:
                continue
            torch._dynamo.reset()
            cm = fv_compile.compile(MaskedSdpa(), backend, compiler=compiler, strict=True)
            out = cm(q, k, v, mask)
            (site,) = cm.explain().sites
            assert site.backend == backend and site.mask_kind == "key_padding", site
            row(
                backend,
                lambda cm=cm: cm(q, k, v, mask),
                out,
                note=f"through fv_compile::attention ({compiler})",
            )
    return rows


def bench_model(args) -> list[dict]:
    """One step of diffusers' HunyuanVideo transformer (random weights, full width; depth and
    video from `--model-layers` / `--model-video`) with its text padding mask at every joint
    site, for each of `--model-variants`: eager, diffusers' own regional compile
    (`compile_repeated_blocks`), fv_compile `auto` or a named backend. At the full 13B size and
    720p x 129f a step is tens of seconds: `--model-reps 1` times one step after the first."""
    from fv_compile.models import from_diffusers

    frames, height, width = args.model_video
    config = {"num_layers": args.model_layers[0], "num_single_layers": args.model_layers[1]}
    model, inputs, kwargs = from_diffusers(
        "HunyuanVideoTransformer3DModel",
        "hunyuanvideo",
        config=config,
        video=(frames, height, width),
        dtype=torch.bfloat16,
        device="cuda",
    )
    model.eval()
    rows = []
    ref = None
    for name in args.model_variants.split(","):
        if name == "FLASH_ATTN" and flash_varlen_kernel() is None:
            continue
        torch._dynamo.reset()
        if name == "eager":
            fn = model
        elif name == "compile_repeated_blocks":
            fn = copy.deepcopy(model)  # it compiles the blocks in place
            fn.compile_repeated_blocks(fullgraph=True)
        else:
            fn = fv_compile.compile(model, name, compiler="inductor")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = time_cuda(
                lambda fn=fn: fn(*inputs, **kwargs),
                warmup=0,
                min_reps=args.model_reps,
                max_reps=max(args.model_reps, 3),
                target_s=2.0,
            )
            out = fn(*inputs, **kwargs)[0].float()
        if ref is None:
            ref = out  # the first variant (eager, by default) is the reference
        err = float((out - ref).norm() / ref.norm())
        sites = fn.explain().sites if isinstance(fn, fv_compile.CompiledModel) else []
        on = sorted({s.backend for s in sites if s.role == "joint"})
        rows.append(
            dict(
                shape=f"hunyuanvideo-step {frames}x{height}x{width} L{config}",
                variant=name,
                ms=t["ms"],
                rel_err=err,
                joint_sites_on=on,
                first_call_s=t["first_call_s"],
            )
        )
        print(
            f"  model step {name:24} {t['ms']:9.1f} ms  first call {t['first_call_s']:6.1f} s  "
            f"rel err {err:.2e}  joint sites on {on}",
            flush=True,
        )
        if args.model_profile and isinstance(fn, fv_compile.CompiledModel):
            rows[-1]["profile"] = profile_step(lambda fn=fn: fn(*inputs, **kwargs))
        del fn, out
        torch.cuda.empty_cache()
    return rows


def profile_step(step) -> dict:
    """Where one compiled step's GPU time goes (the report's profile: attention ops, the step's
    kernels by kind, the costliest kernels), so the step can be held against its floor
    (attention at flash-attn-4's unmasked rate plus the GEMMs at the GEMM ceiling)."""
    from fv_compile.report.measure import profile_attention

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        share = profile_attention(step, torch.device("cuda"))
    print(
        f"  profile: step {share.step_ms:.1f} ms, attention ops {share.attention_ms:.1f} ms "
        f"({share.calls} calls); kernels by kind (ms): "
        + ", ".join(f"{k} {v:.1f}" for k, v in sorted(share.step_kernels_ms.items()))
        + "; inside the ops: "
        + ", ".join(f"{k} {v:.1f}" for k, v in sorted(share.op_kernels_ms.items())),
        flush=True,
    )
    for name, count, ms in share.top_kernels:
        print(f"    {ms:10.1f} ms  {count:5d}x  {name[:90]}", flush=True)
    return dataclasses.asdict(share)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", metavar="PATH", help="write every row as JSON")
    ap.add_argument("--compiler", default="inductor", choices=["eager", "aot_eager", "inductor"])
    ap.add_argument(
        "--seq", type=int, default=None, help="sequence length instead of 119056 (a smoke run)"
    )
    ap.add_argument("--model", action="store_true", help="also time a diffusers HunyuanVideo step")
    ap.add_argument(
        "--model-video", type=int, nargs=3, default=(33, 480, 832), metavar=("F", "H", "W")
    )
    ap.add_argument(
        "--model-layers", type=int, nargs=2, default=(2, 4), metavar=("DOUBLE", "SINGLE")
    )
    ap.add_argument(
        "--model-variants",
        default="eager,TORCH_SDPA,FLASH_ATTN,TRITON_ATTN",
        help="comma-separated: eager, compile_repeated_blocks, auto or a backend name",
    )
    ap.add_argument("--model-reps", type=int, default=3, help="timed steps per variant")
    ap.add_argument("--model-only", action="store_true", help="skip the site-shape rows")
    ap.add_argument(
        "--model-profile",
        action="store_true",
        help="profile one step of each fv_compile variant: attention, GEMMs, the rest",
    )
    args = ap.parse_args()

    shapes = [dict(sh, S=args.seq) if args.seq else sh for sh in SHAPES]
    rows: list[dict] = []
    for shape in [] if args.model_only else shapes:
        rows += bench_shape(shape, args.compiler)
        torch.cuda.empty_cache()  # the shape's tensors went with its frame
    model_rows = bench_model(args) if args.model else []

    print()
    print(
        f"{'shape':22} {'variant':22} {'ms':>9} {'TFLOP/s':>8} {'vs masked':>9} {'max abs err':>11}"
    )
    base = {r["shape"]: r["ms"] for r in rows if r["variant"] == "sdpa-masked"}
    for r in rows:
        err = "-" if r["max_abs_err"] is None else f"{r['max_abs_err']:.2e}"
        print(
            f"{r['shape']:22} {r['variant']:22} {r['ms']:9.2f} {r['tflops']:8.1f} "
            f"{base[r['shape']] / r['ms']:8.2f}x {err:>11}"
        )
    for r in model_rows:
        print(
            f"{'hunyuanvideo step':22} {r['variant']:22} {r['ms']:9.1f} {'':8} {'':9} rel {r['rel_err']:.1e}"
        )
    if args.json:
        meta = dict(
            when=datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
            gpu=torch.cuda.get_device_name(),
            torch=torch.__version__,
            flash_attn=(flash_kernel() or ("none",))[0],
            compiler=args.compiler,
        )
        with open(args.json, "w") as f:
            json.dump({**meta, "rows": rows, "model_rows": model_rows}, f, indent=1)


if __name__ == "__main__":
    main()
