"""8-bit attention (SAGE_ATTN) on the GPU: our INT8-QK / FP8-PV Triton kernel against cuDNN SDPA,
flash-attn-4 (when it imports) and our bf16 Triton kernel.

Run on a CUDA machine (not a test):

    python benchmarks/sage_attention.py                      # all shapes (< 3 minutes on an H200)
    python benchmarks/sage_attention.py --smoke              # tiny shapes: does it run at all
    python benchmarks/sage_attention.py --out sage.json      # also write the results as JSON

For every shape it times (CUDA events, median, warm-up excluded): ``sage`` (the whole call:
quantisation pass + attention, tiles autotuned over the kernel's few ``TUNE_CONFIGS`` on the
first call of each head dim), ``sage-kernel`` (the attention launch alone, on prequantised
tensors; SageAttention's published figures count this), ``sage-quant`` (the quantisation pass
alone, ms only), our bf16 Triton kernel, cuDNN SDPA, and flash-attn-4. TFLOP/s are counted as
bf16-equivalent, ``4*B*H*Sq*Sk*D / t`` (halved for causal), for every variant alike.

Inputs are realistic in range: q, k with std 1.5 and three K channels offset by 10-30x their
spread (what K smoothing is for), v standard normal. Accuracy: relative L2 and cosine of each
output's first 256 query rows against fp32 attention. The table is printed last; the target is
>= 880 TFLOP/s for ``sage`` at Wan-1.3B 480p.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fv_compile.backends.kernels import sage_fwd
from fv_compile.backends.kernels.flash_fwd import attention_fwd
from fv_compile.backends.kernels.sage_fwd import attention_quantized, quantize, sage_attention_fwd

from _timing import time_cuda

SHAPES = [
    dict(name="wan1.3b-480p", B=1, H=12, Sq=32760, Sk=32760, D=128),
    dict(name="wan14b-720p", B=1, H=40, Sq=75600, Sk=75600, D=128),
    dict(name="hunyuan-720p", B=1, H=24, Sq=119056, Sk=119056, D=128),
    dict(name="h16-s16384-d64", B=1, H=16, Sq=16384, Sk=16384, D=64),
    dict(name="causal-h12-s32760", B=1, H=12, Sq=32760, Sk=32760, D=128, causal=True),
]
SMOKE = [
    dict(name="smoke-d128", B=1, H=2, Sq=1000, Sk=1000, D=128),
    dict(name="smoke-d64-causal", B=2, H=2, Sq=777, Sk=777, D=64, causal=True),
    dict(name="smoke-gqa-cross", B=1, H=4, Hk=2, Sq=900, Sk=300, D=128),
]
COLS = ["sage", "sage-kernel", "triton-bf16", "sdpa-cudnn", "fa4"]


def flops(s: dict) -> float:
    f = 4.0 * s["B"] * s["H"] * s["Sq"] * s["Sk"] * s["D"]
    return f / 2 if s.get("causal") else f


def make_inputs(s: dict, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hk = s.get("Hk", s["H"])

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.float32, generator=g)

    q = randn(s["B"], s["Sq"], s["H"], s["D"]) * 1.5
    k = randn(s["B"], s["Sk"], hk, s["D"]) * 1.5
    k[..., :3] += torch.tensor([30.0, -15.0, 10.0], device="cuda") * 1.5
    v = randn(s["B"], s["Sk"], hk, s["D"])
    return tuple(t.to(torch.bfloat16) for t in (q, k, v))


def fp32_reference_rows(q, k, v, scale, causal, rows=256):
    """fp32 attention for the first ``rows`` queries, one head at a time, BSHD."""
    group = q.shape[2] // k.shape[2]
    out = torch.empty(q.shape[0], min(rows, q.shape[1]), q.shape[2], q.shape[3], device=q.device)
    for h in range(q.shape[2]):
        qh = q[:, :rows, h].float()
        kh, vh = k[:, :, h // group].float(), v[:, :, h // group].float()
        sc = qh @ kh.transpose(-1, -2) * scale
        if causal:
            i = torch.arange(qh.shape[1], device=q.device)[:, None]
            j = torch.arange(kh.shape[1], device=q.device)[None, :]
            sc = sc.masked_fill(j > i, -math.inf)
        out[:, :, h] = torch.softmax(sc, -1) @ vh
    return out


def accuracy(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    o = out[:, : ref.shape[1]].float().flatten()
    r = ref.flatten()
    return ((o - r).norm() / r.norm()).item(), F.cosine_similarity(o, r, dim=0).item()


def load_fa4():
    try:
        from fv_compile.backends.kernels.fa4_import import import_flash_attn_cute

        return import_flash_attn_cute().flash_attn_func, "flash_attn.cute"
    except Exception as e:  # not installed, or it does not run here
        return None, f"{type(e).__name__}: {e}"


def bench_shape(s: dict, fa4, timing: dict) -> dict:
    causal = bool(s.get("causal", False))
    q, k, v = make_inputs(s)
    scale = s["D"] ** -0.5
    fl = flops(s)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = k.shape[2] != q.shape[2]

    def sage():
        return sage_attention_fwd(q, k, v, softmax_scale=scale, causal=causal, autotune=True)

    sage()  # autotune (once per head dim) before anything is timed
    qz = quantize(q, k, v, softmax_scale=scale)
    out_k = torch.empty_like(q)

    def cudnn():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            o = F.scaled_dot_product_attention(
                qt, kt, vt, is_causal=causal, scale=scale, enable_gqa=gqa
            )
        return o.transpose(1, 2)

    variants = {
        "sage": sage,
        "sage-kernel": lambda: attention_quantized(qz, out_k, causal=causal, autotune=True),
        "sage-quant": lambda: quantize(q, k, v, softmax_scale=scale),
        "triton-bf16": lambda: attention_fwd(q, k, v, softmax_scale=scale, causal=causal),
        "sdpa-cudnn": cudnn,
    }
    if fa4 is not None:

        def fa4_fn():
            o = fa4(q, k, v, softmax_scale=scale, causal=causal)
            return o[0] if isinstance(o, tuple) else o

        variants["fa4"] = fa4_fn
    ref = fp32_reference_rows(q, k, v, scale, causal)
    res: dict = {"shape": s, "variants": {}}
    for name, fn in variants.items():
        row: dict = {}
        try:
            t = time_cuda(fn, **timing)
            row.update(ms=t["ms"], tflops=fl / (t["ms"] * 1e-3) / 1e12)
            if name != "sage-quant":
                o = fn() if name != "sage-kernel" else (fn(), out_k)[1]
                row["rel_l2"], row["cos"] = accuracy(o, ref)
        except Exception as e:  # a backend that cannot run this shape: say so, keep going
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        res["variants"][name] = row
        desc = row.get("error") or (
            f"{row['ms']:8.3f} ms {row['tflops']:7.1f} TFLOP/s"
            + (f"  rel {row['rel_l2']:.4f} cos {row['cos']:.5f}" if "cos" in row else "")
        )
        print(f"  {s['name']:>20} {name:>12}: {desc}", flush=True)
    best = sage_fwd.autotuned_config()
    res["sage_config"] = best._asdict() if best is not None else None
    ref = None
    torch.cuda.empty_cache()
    return res


def print_table(results: list[dict]) -> None:
    print("\nbf16-equivalent TFLOP/s (4*B*H*Sq*Sk*D / t; causal halved), accuracy vs fp32:")
    head = f"{'shape':>20} " + " ".join(f"{c:>12}" for c in COLS) + f" {'sage rel/cos':>16} "
    print(head + f"{'sage/cuDNN':>10} {'quant ms':>9}")
    for r in results:
        v = r["variants"]
        cells = [
            f"{v[c]['tflops']:12.1f}" if "tflops" in v.get(c, {}) else f"{'-':>12}" for c in COLS
        ]
        sg = v.get("sage", {})
        acc = f"{sg['rel_l2']:.4f}/{sg['cos']:.5f}" if "cos" in sg else "-"
        ratio = (
            f"{sg['tflops'] / v['sdpa-cudnn']['tflops']:10.2f}"
            if "tflops" in sg and "tflops" in v.get("sdpa-cudnn", {})
            else f"{'-':>10}"
        )
        qms = v.get("sage-quant", {}).get("ms")
        qcell = f"{qms:9.3f}" if qms is not None else f"{'-':>9}"
        print(f"{r['shape']['name']:>20} " + " ".join(cells) + f" {acc:>16} {ratio} {qcell}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes only")
    ap.add_argument("--no-fa4", action="store_true")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    t0 = time.time()
    print(
        f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"fp8 P V: {sage_fwd.fp8_available(torch.device('cuda'))}",
        flush=True,
    )
    fa4, fa4_note = (None, "disabled") if args.no_fa4 else load_fa4()
    print("  fa4:", fa4_note if fa4 is None else "flash_attn.cute", flush=True)
    timing = dict(warmup=2, min_reps=3, max_reps=20, target_s=0.2)
    results = [bench_shape(s, fa4, timing) for s in (SMOKE if args.smoke else SHAPES)]
    print_table(results)
    print(f"\n{time.time() - t0:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"fa4": fa4_note, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
