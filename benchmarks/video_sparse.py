"""Video sparse attention (VIDEO_SPARSE_ATTN) on the GPU: the whole backend, coarse stage
included, forward and forward+backward, against cuDNN dense SDPA and (when importable)
flash-attn-4 dense, at Wan-1.3B 480p x 81 frames (21 x 30 x 52 = 32760 tokens, 12 heads, D128).

Run on a CUDA machine (not a test):

    python benchmarks/video_sparse.py --out vsa.json
    TRITON_INTERPRET=1 python benchmarks/video_sparse.py --smoke   # no GPU: the checks only

Before timing, the kernels are checked on this GPU against the float64 torch reference
(`vsa_reference.py`) on a small odd grid with joint text, forward and every gradient (q, k, v and
the gate), and at sparsity 0 against dense SDPA at the real shape; a check that fails ends the run
with exit status 1 (a speedup of a wrong kernel is worth nothing).

Variants, bf16 random normal inputs in the site's raster token order, CUDA events (median):

* ``vsa``: the impl as fv_compile's op runs it (gather into cubes, coarse stage, top-k lists, fine
  block-sparse kernel, scatter back); ``vsa-tiled``: the same on inputs already in cube order;
  ``coarse``: the coarse stage and the lists alone (its share of ``vsa``);
* ``cudnn-dense``: SDPA with ``sdpa_kernel(CUDNN_ATTENTION)``; ``fa4-dense``: flash-attn-4.

``fwd+bwd`` rows time forward and backward of the same call (the op's backward reuses the
forward's lists, fine output and row statistics). ``speedup`` is cuDNN's time over the variant's, per mode.
flash-attn-4's block-sparse path is not used for VSA: its query tiles are 128 rows, two 64-token
cubes whose top-k lists differ.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fv_compile import FastVideoArgs, ForwardBatch, forward_context
from fv_compile.backends.video_sparse import (
    VideoSparseAttentionImpl,
    VideoSparseMetadataBuilder,
)
from fv_compile.backends.vsa_ops import coarse_stage, top_cube_lists
from fv_compile.backends.vsa_reference import video_sparse_attention_reference

GRID, HEADS, HEAD_DIM = (21, 30, 52), 12, 128
SPARSITIES = (0.8, 0.875, 0.9)


def metadata(grid, sparsity, device):
    md = VideoSparseMetadataBuilder().build(
        0,
        ForwardBatch(raw_latent_shape=(1, 16, *grid)),
        FastVideoArgs(patch_size=(1, 1, 1), VSA_sparsity=sparsity),
    )
    for name in ("tile_index", "untile_index", "block_valid", "topk"):
        setattr(md, name, getattr(md, name).to(device))
    return md


def run_impl(impl, md, q, k, v, gate=None):
    """What fv_compile's op does around the impl: preprocess, forward, postprocess."""
    tq, tk, tv = (impl.preprocess_qkv(x, md) for x in (q, k, v))
    if gate is None:
        out = impl.forward(tq, tk, tv, md)
    else:
        out = impl.forward(tq, tk, tv, impl.preprocess_qkv(gate, md), md)
    return impl.postprocess_output(out, md)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_small(device, dtype, grid=(9, 10, 11), text=70) -> dict:
    """Forward and every gradient on a small odd grid with text against the float64 reference."""
    heads, d, sparsity = 2, HEAD_DIM, 0.7
    s = math.prod(grid) + text
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(2, s, heads, d, generator=gen).to(device, dtype) for _ in range(3))
    gate = torch.rand(2, s, heads, d, generator=gen).to(device, dtype)
    grad = torch.randn(2, s, heads, d, generator=gen).to(device, dtype)
    scale = d**-0.5
    impl = VideoSparseAttentionImpl(heads, d, scale, joint_text_len=text)
    md = metadata(grid, sparsity, device)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, gate)]
    out = run_impl(impl, md, *leaves)
    ours = torch.autograd.grad(out, leaves, grad)
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v, gate)]
    want = video_sparse_attention_reference(
        *ref_leaves[:3], grid, sparsity, scale=scale, gate=ref_leaves[3], text_len=text
    )
    wanted = torch.autograd.grad(want, ref_leaves, grad.double())
    errors = {"out": rel(out, want)}
    errors.update({f"d{n}": rel(g, w) for n, g, w in zip("qkvg", ours, wanted)})
    return errors


def check_dense(device, dtype, grid) -> float:
    """Sparsity 0 at the real shape: VSA keeps every cube, so it is dense attention."""
    s = math.prod(grid)
    q, k, v = (torch.randn(1, s, HEADS, HEAD_DIM, device=device, dtype=dtype) for _ in range(3))
    impl = VideoSparseAttentionImpl(HEADS, HEAD_DIM, HEAD_DIM**-0.5)
    with torch.no_grad():
        out = run_impl(impl, metadata(grid, 0.0, device), q, k, v)
        want = F.scaled_dot_product_attention(
            *(x.transpose(1, 2).float() for x in (q, k, v))
        ).transpose(1, 2)
    return rel(out, want)


def fwd_bwd(fn, inputs, grad):
    def run():
        out = fn(*inputs)
        torch.autograd.grad(out, inputs, grad)

    return run


def time_vsa(impl, md, sparsity, qkv, leaves, grad) -> list[dict]:
    """The VSA rows at one sparsity, in a forward context: its step cache keeps the token order
    built once, as every site of a real step shares it."""
    from _timing import time_cuda

    with forward_context(0):
        return _time_vsa(impl, md, sparsity, qkv, leaves, grad, time_cuda)


def cube_lists(impl, md, tiled):
    """What the coarse stage hands the fine one for cube-ordered q, k, v: the top-k key cubes of
    each query cube (indices, counts), and each cube's valid rows."""
    _, _, valid = impl._order(md)
    scores = coarse_stage(*tiled, valid, md.block_valid.shape[0], impl.scale)[1]
    return (*top_cube_lists(scores, md.topk, valid.shape[0]), valid)


def _time_vsa(impl, md, sparsity, qkv, leaves, grad, time_cuda) -> list[dict]:
    tiled = [impl.preprocess_qkv(x, md) for x in qkv]

    def coarse():
        return cube_lists(impl, md, tiled)

    with torch.no_grad():
        timed = {
            "vsa": time_cuda(lambda: run_impl(impl, md, *qkv)),
            "vsa-tiled": time_cuda(lambda: impl.forward(*tiled, md)),
            "coarse": time_cuda(coarse),
        }
    rows = [dict(variant=n, mode="fwd", sparsity=sparsity, **t) for n, t in timed.items()]
    both = time_cuda(fwd_bwd(lambda *x: run_impl(impl, md, *x), leaves, grad))
    return [*rows, dict(variant="vsa", mode="fwd+bwd", sparsity=sparsity, **both)]


def bench(args) -> dict:
    from _timing import time_cuda

    device, dtype = ("cuda" if torch.cuda.is_available() else "cpu"), torch.bfloat16
    s = math.prod(GRID)
    q, k, v = (torch.randn(1, s, HEADS, HEAD_DIM, device=device, dtype=dtype) for _ in range(3))
    grad = torch.randn_like(q)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    scale = HEAD_DIM**-0.5
    rows = []

    def cudnn(q, k, v):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)))
        return out.transpose(1, 2)

    dense = {"cudnn-dense": cudnn}
    try:
        from flash_attn.cute import flash_attn_func  # type: ignore[import-not-found]

        def fa4(q, k, v):
            out = flash_attn_func(q, k, v, softmax_scale=scale)
            return out[0] if isinstance(out, tuple) else out

        dense["fa4-dense"] = fa4
    except Exception as err:
        print(f"flash-attn-4 not importable ({type(err).__name__}): fa4-dense skipped")
    base = {}
    for name, fn in dense.items():
        with torch.no_grad():
            fwd = time_cuda(lambda fn=fn: fn(q, k, v))
        both = time_cuda(fwd_bwd(fn, leaves, grad))
        rows += [dict(variant=name, mode="fwd", **fwd), dict(variant=name, mode="fwd+bwd", **both)]
        if name == "cudnn-dense":
            base = {"fwd": fwd["ms"], "fwd+bwd": both["ms"]}
    impl = VideoSparseAttentionImpl(HEADS, HEAD_DIM, scale)
    for sparsity in args.sparsity:
        rows += time_vsa(impl, metadata(GRID, sparsity, device), sparsity, (q, k, v), leaves, grad)
    for r in rows:
        r["speedup"] = base[r["mode"]] / r["ms"] if r["mode"] in base else None
    return {"rows": rows, "cudnn_ms": base}


def profile_coarse(sparsity: float) -> None:
    """The coarse stage's kernels at the benchmark shape, by CUDA time (where its ms go)."""
    from torch.profiler import ProfilerActivity, profile

    s = math.prod(GRID)
    qkv = [torch.randn(1, s, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in "qkv"]
    impl = VideoSparseAttentionImpl(HEADS, HEAD_DIM, HEAD_DIM**-0.5)
    md = metadata(GRID, sparsity, "cuda")
    with forward_context(0), torch.no_grad():
        tiled = [impl.preprocess_qkv(x, md) for x in qkv]
        for _ in range(3):
            cube_lists(impl, md, tiled)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                cube_lists(impl, md, tiled)
            torch.cuda.synchronize()
    print(f"coarse stage + lists at sparsity {sparsity}, 10 calls:")
    table = prof.key_averages()
    for key in ("device_time_total", "cuda_time_total"):  # the name differs across releases
        try:
            print(table.table(sort_by=key, row_limit=14, max_name_column_width=60))
            break
        except (AttributeError, KeyError, ValueError):
            continue


def sweep(args) -> dict:
    """Launch configs of the fine stage's kernels at the Wan shape, on the lists VSA picks at the
    first --sparsity: forward (tile config, TMA) and backward (warps, stages), each checked
    against the default config's result before it is timed."""
    from fv_compile.backends.kernels.block_sparse_bwd import block_sparse_attention_bwd
    from fv_compile.backends.kernels.block_sparse_fwd import (
        BlockSparseConfig,
        block_sparse_attention_fwd,
    )
    from fv_compile.backends.vsa_ops import BLOCK

    from _timing import time_cuda

    s, scale, sparsity = math.prod(GRID), HEAD_DIM**-0.5, args.sparsity[0]
    dev, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    q, k, v = (torch.randn(1, s, HEADS, HEAD_DIM, device=dev, dtype=dtype) for _ in range(3))
    impl, md = VideoSparseAttentionImpl(HEADS, HEAD_DIM, scale), metadata(GRID, sparsity, dev)
    with forward_context(0), torch.no_grad():
        tq, tk, tv = (impl.preprocess_qkv(x, md) for x in (q, k, v))
        idx, cnt, valid = cube_lists(impl, md, (tq, tk, tv))
    keys = float(cnt.float().mean()) * BLOCK
    flop = 4 * HEADS * s * keys * HEAD_DIM  # the forward's work on the kept keys
    lse = torch.empty(1, HEADS, tq.shape[1], device=dev)
    base = block_sparse_attention_fwd(
        tq, tk, tv, idx, cnt, valid, block_size=BLOCK, softmax_scale=scale, lists_per_batch=True,
        lse=lse,
    )  # fmt: skip
    rows = []

    def record(kind, name, fn, want):
        try:
            got = fn()
            err = max(rel(g, w) for g, w in zip(got, want))
            t = time_cuda(fn) if err < 5e-3 else {"ms": float("nan")}
        except Exception as e:  # a config that does not fit (shared memory, registers)
            err, t = float("nan"), {"ms": float("nan"), "error": f"{type(e).__name__}: {e}"[:120]}
        mult = 1 if kind == "fwd" else 2.5  # a backward is ~2.5 forwards of matmul work
        rows.append(dict(kind=kind, config=name, rel=err, tflops=mult * flop / t["ms"] / 1e9, **t))
        print(
            f"{kind} {name:<34} {t['ms']:8.3f} ms {rows[-1]['tflops']:7.1f} TFLOP/s rel {err:.1e}"
        )

    for bn in (32, 64):
        for warps in (4, 8):
            for stages in (2, 3, 4):
                for tma in (False, True):
                    for pre in (False, True) if tma else (False,):
                        cfg = BlockSparseConfig(64, bn, warps, stages, False, pre)
                        record(
                            "fwd", f"n{bn} w{warps} s{stages} tma{int(tma)} pre{int(pre)}",
                            lambda cfg=cfg, tma=tma: [block_sparse_attention_fwd(
                                tq, tk, tv, idx, cnt, valid, block_size=BLOCK, softmax_scale=scale,
                                lists_per_batch=True, config=cfg, use_tma=tma,
                            )],
                            [base],
                        )  # fmt: skip
    grad = torch.randn_like(tq)

    def bwd(**kw):
        return block_sparse_attention_bwd(
            grad, tq, tk, tv, base, lse, idx, cnt, valid, BLOCK, scale, **kw
        )

    want = bwd()
    for warps in (4, 8):
        for stages in (1, 2, 3):
            record(
                "bwd",
                f"w{warps} s{stages}",
                lambda w=warps, st=stages: bwd(num_warps=w, num_stages=st),
                want,
            )
    return {"sweep": rows, "sparsity": sparsity, "kept_keys_per_query": keys}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--smoke", action="store_true", help="the checks only, on a tiny grid")
    parser.add_argument("--sparsity", type=float, nargs="+", default=list(SPARSITIES))
    parser.add_argument(
        "--sweep", action="store_true", help="time the fine stage's launch configs instead"
    )
    parser.add_argument(
        "--profile-coarse",
        action="store_true",
        help="also print the CUDA kernels of the coarse stage and lists, by time",
    )
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    result: dict = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
    }
    # float32 where the top-k choice is compared (bf16 rounding could flip a near tie between
    # cubes, a different but valid choice); bf16, the timed dtype, at sparsity 0 (no choice)
    small = check_small(device, torch.float32, *(((5, 6, 7), 5) if args.smoke else ()))
    dense_err = check_dense(device, dtype, (5, 6, 7) if args.smoke else GRID)
    result["checks"] = {"small_fp32_vs_reference": small, "sparsity0_vs_dense": dense_err}
    print("checks (relative L2 error):", json.dumps(result["checks"], indent=1))
    bf16_tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    failed = [n for n, e in small.items() if not e < 1e-4]
    failed += ["sparsity0"] if not dense_err < bf16_tol else []
    if failed:
        print(f"FAILED checks: {failed}; not timing a wrong kernel")
        return 1
    if args.sweep:
        result.update(sweep(args))
    elif not args.smoke:
        if not cuda:
            print("no CUDA: timing needs a GPU (use --smoke for the checks)")
            return 1
        result.update(bench(args))
        print(f"{'variant':<12} {'mode':<8} {'sparsity':>8} {'ms':>9} {'speedup':>8}")
        for r in result["rows"]:
            sp = f"{r['speedup']:.2f}x" if r["speedup"] else ""
            print(
                f"{r['variant']:<12} {r['mode']:<8} {r.get('sparsity', ''):>8} "
                f"{r['ms']:>9.3f} {sp:>8}"
            )
        if args.profile_coarse:
            profile_coarse(args.sparsity[len(args.sparsity) // 2])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
