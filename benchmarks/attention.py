"""Dense attention forward on the GPU: our Triton kernel against SDPA's backends and FA4.

Run on a CUDA machine (not a test):

    python benchmarks/attention.py --out attention.json            # all shapes
    python benchmarks/attention.py --quick --out attention.json    # a shorter subset
    python benchmarks/attention.py --sweep --sweep-out best.json   # tile-config sweep of our kernel

For every shape it times (CUDA events, median, warm-up excluded, random normal inputs):
our ``attention_fwd`` (tensor-descriptor path and pointer path), torch SDPA with each backend
forced through ``torch.nn.attention.sdpa_kernel`` (cuDNN, flash, efficient; SDPA gets BHSD
``transpose(1, 2)`` views of the same BSHD tensors, and the extra memory it allocates shows
whether it copies them), and flash-attn-4 (``flash_attn.cute``, BSHD) when it imports. The bf16
8192^3 GEMM is measured in the same run as the ceiling. Every output is checked against cuDNN's
(relative Frobenius error), and ours also against an fp32 reference on the first query rows.
TFLOP/s counts 4*B*H*Sq*Sk*D (halved for causal). The table is printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fv_compile.backends.kernels.flash_fwd import FlashConfig, attention_fwd

from _timing import gemm_ceiling, time_cuda

SHAPES = [
    dict(name="wan1.3b-480p", B=1, H=12, Sq=32760, Sk=32760, D=128),
    dict(name="wan14b-720p", B=1, H=40, Sq=75600, Sk=75600, D=128),
    dict(name="hunyuan-720p", B=1, H=24, Sq=119056, Sk=119056, D=128),
    dict(name="b2-h24-s4096", B=2, H=24, Sq=4096, Sk=4096, D=128),
    dict(name="h16-s16384-d64", B=1, H=16, Sq=16384, Sk=16384, D=64),
    dict(name="cross-32760x512", B=1, H=12, Sq=32760, Sk=512, D=128),
    dict(name="causal-h12-s32760", B=1, H=12, Sq=32760, Sk=32760, D=128, causal=True),
]
QUICK = {"wan1.3b-480p", "b2-h24-s4096", "h16-s16384-d64", "cross-32760x512"}

SDPA_BACKENDS = {
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
}

# ---------------------------------------------------------------------------------------------
# sweep: tile configs of our kernel per class (head_dim, causal, Sk bucket)
# (block_m, block_n, num_warps, num_stages, warp_specialize, use_tma[, tma_qo])
# The first sweep (53 configs, docs/kernel-notes.md) narrowed these down; the lists below are the
# finalists, each timed --sweep-repeat times in interleaved order.
# ---------------------------------------------------------------------------------------------
_F = False
SWEEP_CLASSES = [
    (
        "d128-long",
        dict(B=1, H=12, Sq=32760, Sk=32760, D=128),
        [
            (128, 64, 4, 2, _F, True),
            (128, 128, 8, 3, _F, True),
            (128, 64, 4, 2, _F, True, False),
            (128, 128, 8, 3, _F, True, False),
            (64, 64, 4, 3, _F, True),
            (128, 64, 4, 2, _F, False),
        ],
    ),
    (
        "d128-long-causal",
        dict(B=1, H=12, Sq=32760, Sk=32760, D=128, causal=True),
        [
            (128, 128, 8, 3, _F, True),
            (128, 64, 4, 2, _F, True),
            (64, 64, 4, 3, _F, True),
            (128, 128, 8, 3, _F, True, False),
        ],
    ),
    (
        "d128-mid",
        dict(B=2, H=24, Sq=4096, Sk=4096, D=128),
        [
            (64, 64, 4, 3, _F, True),
            (128, 64, 4, 2, _F, True),
            (128, 128, 8, 3, _F, True),
            (64, 64, 4, 2, _F, True),
        ],
    ),
    (
        "d64-long",
        dict(B=1, H=16, Sq=16384, Sk=16384, D=64),
        [
            (128, 128, 4, 3, _F, True),
            (128, 128, 4, 2, _F, True),
            (128, 64, 4, 2, _F, True),
            (128, 128, 4, 4, _F, True),
            (128, 128, 4, 3, _F, True, False),
        ],
    ),
    (
        "d128-cross",
        dict(B=1, H=12, Sq=32760, Sk=512, D=128),
        [
            (256, 64, 8, 2, _F, True),
            (64, 64, 4, 3, _F, True),
            (128, 64, 4, 2, _F, True),
            (64, 64, 4, 2, _F, True),
            (256, 64, 8, 2, _F, True, False),
            (64, 64, 4, 2, _F, True, False),
            (128, 64, 4, 2, _F, True, False),
            (128, 64, 4, 2, _F, False),
            (64, 64, 4, 2, _F, False),
        ],
    ),
]


def _fc(cfg) -> tuple[FlashConfig, bool]:
    bm, bn, w, st, ws, tma = cfg[:6]
    qo = cfg[6] if len(cfg) > 6 else True
    return FlashConfig(bm, bn, w, st, ws, qo), bool(tma)


def flops(s: dict) -> float:
    f = 4.0 * s["B"] * s["H"] * s["Sq"] * s["Sk"] * s["D"]
    return f / 2 if s.get("causal") else f


def make_inputs(s: dict, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(s["B"], s["Sq"], s["H"], s["D"], device="cuda", dtype=dtype, generator=g)
    k = torch.randn(
        s["B"], s["Sk"], s.get("Hk", s["H"]), s["D"], device="cuda", dtype=dtype, generator=g
    )
    v = torch.randn(
        s["B"], s["Sk"], s.get("Hk", s["H"]), s["D"], device="cuda", dtype=dtype, generator=g
    )
    return q, k, v


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def fp32_reference_rows(q, k, v, scale, causal, rows=256):
    """fp32 attention for the first ``rows`` queries (all batches and heads), BSHD."""
    qs = q[:, :rows].float().transpose(1, 2)
    kt, vt = k.float().transpose(1, 2), v.float().transpose(1, 2)
    s = qs @ kt.transpose(-1, -2) * scale
    if causal:
        i = torch.arange(qs.shape[2], device=q.device)[:, None]
        j = torch.arange(kt.shape[2], device=q.device)[None, :]
        s = s.masked_fill(j > i, -math.inf)
    return (torch.softmax(s, -1) @ vt).transpose(1, 2)


def load_fa4():
    for mod in ("flash_attn.cute", "flash_attn.cute.interface"):
        try:
            m = __import__(mod, fromlist=["flash_attn_func"])
            return m.flash_attn_func, mod
        except Exception as e:
            err = f"{type(e).__name__}: {e}"
    return None, err


def sdpa_call(backend_name: str, q, k, v, scale, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # BHSD views, no copy

    def fn():
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale)

    return fn, lambda: sdpa_kernel([backend])


def peak_extra_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


def bench_shape(s: dict, args, fa4, tuned: dict | None) -> dict:
    causal = bool(s.get("causal", False))
    q, k, v = make_inputs(s)
    scale = s["D"] ** -0.5
    fl = flops(s)
    res = {"shape": s, "variants": {}}
    variants = {
        "ours": lambda: attention_fwd(q, k, v, softmax_scale=scale, causal=causal),
        "ours-ptr": lambda: attention_fwd(
            q, k, v, softmax_scale=scale, causal=causal, use_tma=False
        ),
    }
    if tuned:
        cfg = tuned.get(class_of(s))
        if cfg is not None:
            fc, tma = _fc(cfg)
            variants["ours-tuned"] = lambda: attention_fwd(
                q, k, v, softmax_scale=scale, causal=causal, config=fc, use_tma=tma
            )
    contexts = {}
    for name, bk in SDPA_BACKENDS.items():
        variants[name], contexts[name] = sdpa_call(bk, q, k, v, scale, causal)
    if fa4 is not None:

        def fa4_fn():
            o = fa4(q, k, v, softmax_scale=scale, causal=causal)
            return o[0] if isinstance(o, tuple) else o

        variants["fa4"] = fa4_fn

    outs = {}
    for name, fn in variants.items():
        r = {}
        ctx = contexts.get(name, contextlib.nullcontext)()
        try:
            ctx.__enter__()
            o = fn()
            torch.cuda.synchronize()
            if o.dim() == 4 and name.startswith("sdpa"):
                o = o.transpose(1, 2)  # back to BSHD
            outs[name] = o
            if name.startswith("sdpa"):
                extra = peak_extra_bytes(fn)
                r["peak_extra_MB"] = extra / 2**20
                r["peak_extra_over_q"] = extra / (q.numel() * q.element_size())
            t = time_cuda(fn, target_s=args.target_s)
            r.update(t)
            r["tflops"] = fl / (t["ms"] * 1e-3) / 1e12
        except Exception as e:
            r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        finally:
            ctx.__exit__(None, None, None)
        res["variants"][name] = r
        print(
            f"  {s['name']:<20} {name:<16} "
            + (f"{r['ms']:9.3f} ms {r['tflops']:7.1f} TFLOP/s" if "ms" in r else r["error"]),
            flush=True,
        )
    ref_name = (
        "sdpa-cudnn" if "sdpa-cudnn" in outs else ("sdpa-flash" if "sdpa-flash" in outs else None)
    )
    if ref_name:
        for name, o in outs.items():
            res["variants"][name]["rel_err_vs_" + ref_name] = rel(o, outs[ref_name])
    if "ours" in outs:
        ref32 = fp32_reference_rows(q, k, v, scale, causal, rows=256)
        for name, o in outs.items():
            res["variants"][name]["rel_err_vs_fp32_rows"] = rel(o[:, :256], ref32)
        del ref32
    del outs
    q = k = v = None  # not del: the variants' closures share these names
    torch.cuda.empty_cache()
    return res


def class_of(s: dict) -> str:
    causal = bool(s.get("causal", False))
    if s["D"] == 64:
        return "d64-long"
    if causal:
        return "d128-long-causal"
    if s["Sk"] <= 1024:
        return "d128-cross"
    if s["Sk"] <= 8192:
        return "d128-mid"
    return "d128-long"


def _compile_worker(job):
    """Subprocess: compile (and run once) one config so the sweep finds it in Triton's disk cache."""
    s, cfg = job
    fc, tma = _fc(cfg)
    t0 = time.perf_counter()
    try:
        q, k, v = make_inputs(s)
        attention_fwd(
            q,
            k,
            v,
            softmax_scale=s["D"] ** -0.5,
            causal=bool(s.get("causal", False)),
            config=fc,
            use_tma=tma,
        )
        torch.cuda.synchronize()
        return cfg, time.perf_counter() - t0, None
    except Exception as e:
        return cfg, time.perf_counter() - t0, f"{type(e).__name__}: {str(e)[:200]}"


def precompile(jobs, workers: int) -> dict:
    """Compile configs in parallel processes (Triton holds the GIL while compiling)."""
    import concurrent.futures as cf
    import multiprocessing as mp

    t0 = time.perf_counter()
    res = {}
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        for cfg, dt, err in ex.map(_compile_worker, jobs):
            res[tuple(cfg)] = (dt, err)
    print(
        f"  precompiled {len(jobs)} configs with {workers} processes in {time.perf_counter() - t0:.1f}s",
        flush=True,
    )
    return res


def run_sweep(args) -> dict:
    out = {"classes": {}, "best": {}}
    jobs = [(s, cfg) for _, s, cfgs in SWEEP_CLASSES for cfg in cfgs]
    try:
        out["precompile"] = {str(k): v for k, v in precompile(jobs, args.workers).items()}
    except Exception as e:
        print("  precompile failed:", e, flush=True)
    for cname, s, cfgs in SWEEP_CLASSES:
        causal = bool(s.get("causal", False))
        q, k, v = make_inputs(s)
        scale = s["D"] ** -0.5
        ref = None
        rows = []
        for cfg in list(cfgs) * args.sweep_repeat:
            fc, tma = _fc(cfg)
            launched = []  # the compiled kernel it launches (its registers, spills)
            fn = functools.partial(
                attention_fwd,
                q,
                k,
                v,
                softmax_scale=scale,
                causal=causal,
                config=fc,
                use_tma=tma,
                on_launch=launched.append,
            )
            r = {"config": list(cfg)}
            try:
                t0 = time.perf_counter()
                o = fn()
                torch.cuda.synchronize()
                r["compile_s"] = time.perf_counter() - t0
                if ref is None:
                    ref = fp32_reference_rows(q, k, v, scale, causal, rows=256)
                r["rel_err"] = rel(o[:, :256], ref)
                t = time_cuda(fn, target_s=0.25, max_reps=50)
                r["ms"] = t["ms"]
                r["tflops"] = flops(s) / (t["ms"] * 1e-3) / 1e12
                kern = launched[-1] if launched else None
                r["n_regs"] = getattr(kern, "n_regs", None)
                r["n_spills"] = getattr(kern, "n_spills", None)
            except Exception as e:
                r["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(r)
            print(
                f"  sweep {cname:<18} {cfg!s:<36} "
                + (
                    f"{r['tflops']:7.1f} TFLOP/s err {r['rel_err']:.1e} compile {r['compile_s']:.1f}s "
                    f"regs {r.get('n_regs')} spills {r.get('n_spills')}"
                    if "tflops" in r
                    else r["error"]
                ),
                flush=True,
            )
        # a config's score: the median over its repeats
        by_cfg = {}
        for r in rows:
            if "tflops" in r and r["rel_err"] < 2e-2:
                by_cfg.setdefault(tuple(r["config"]), []).append(r["tflops"])
        out["classes"][cname] = rows
        if by_cfg:
            med = {c: sorted(v)[len(v) // 2] for c, v in by_cfg.items()}
            best = max(med, key=med.get)
            out["best"][cname] = list(best)
            out["classes"][cname + "_best_tflops"] = med[best]
            out.setdefault("medians", {})[cname] = {str(c): v for c, v in by_cfg.items()}
        fn = None  # the last config's call holds q, k, v
        del q, k, v, ref
        torch.cuda.empty_cache()
    return out


def first_call_child(mode: str) -> None:
    """Run in a subprocess with a fresh TRITON_CACHE_DIR: time the first call (compile included)."""
    s = dict(B=1, H=12, Sq=32760, Sk=32760, D=128)
    q, k, v = make_inputs(s)
    t0 = time.perf_counter()
    attention_fwd(q, k, v, softmax_scale=s["D"] ** -0.5)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    attention_fwd(q, k, v, softmax_scale=s["D"] ** -0.5)
    torch.cuda.synchronize()
    print(
        json.dumps({"mode": mode, "first_call_s": first, "second_call_s": time.perf_counter() - t0})
    )


def measure_first_calls() -> dict:
    res = {}
    for mode in ("heuristic", "autotune"):
        env = dict(os.environ)
        # an empty kernel cache, so that the first call compiles
        env["TRITON_CACHE_DIR"] = os.path.join(
            tempfile.gettempdir(), f"triton-fresh-{mode}-{os.getpid()}"
        )
        env["FV_FLASH_AUTOTUNE"] = "1" if mode == "autotune" else "0"
        p = subprocess.run(
            [sys.executable, __file__, "--first-call", mode],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        res[mode] = json.loads(line[-1]) if line else {"error": p.stderr[-500:]}
        print("  first call", mode, res[mode], flush=True)
    return res


def env_info() -> dict:
    import triton

    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(),
        "sms": torch.cuda.get_device_properties(0).multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }


def print_table(results: list[dict], gemm: dict, info: dict, gemm_end: dict | None = None) -> None:
    cols = ["ours", "ours-tuned", "ours-ptr", "sdpa-cudnn", "fa4", "sdpa-flash", "sdpa-efficient"]
    cols = [c for c in cols if any(c in r["variants"] for r in results)]
    print()
    print(
        f"# {info['date']}  {info['gpu']}  torch {info['torch']}  triton {info['triton']}  "
        f"cuDNN {info['cudnn']}  bf16 GEMM 8192^3: {gemm['tflops']:.0f} TFLOP/s"
        + (f" (start) / {gemm_end['tflops']:.0f} (end)" if gemm_end else "")
    )
    print(
        "TFLOP/s (median); [fraction of the GEMM ceiling for ours and cuDNN]; rel err of ours vs cuDNN"
    )
    hdr = (
        f"| {'shape':<20} | "
        + " | ".join(f"{c:>14}" for c in cols)
        + " | ours/cuDNN | ours/GEMM | cuDNN/GEMM | ours err |"
    )
    print(hdr)
    print("|" + "|".join("-" * len(c) for c in hdr.strip("|").split("|")) + "|")
    g = gemm["tflops"]
    for r in results:
        s = r["shape"]
        cells = []
        for c in cols:
            v = r["variants"].get(c, {})
            cells.append(f"{v['tflops']:14.1f}" if "tflops" in v else f"{'n/a':>14}")
        o, cu = (
            r["variants"].get("ours", {}).get("tflops"),
            r["variants"].get("sdpa-cudnn", {}).get("tflops"),
        )
        ratio = f"{o / cu:.3f}" if o and cu else "n/a"
        og = f"{o / g:.3f}" if o else "n/a"
        cg = f"{cu / g:.3f}" if cu else "n/a"
        err = r["variants"].get("ours", {}).get("rel_err_vs_sdpa-cudnn", float("nan"))
        print(
            f"| {s['name']:<20} | "
            + " | ".join(cells)
            + f" | {ratio:>10} | {og:>9} | {cg:>10} | {err:8.1e} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", help="write all numbers as JSON here")
    ap.add_argument("--quick", action="store_true", help="a shorter subset of shapes")
    ap.add_argument("--sweep", action="store_true", help="sweep tile configs of our kernel instead")
    ap.add_argument("--sweep-out", help="with --sweep: write the best config per class here")
    ap.add_argument("--tuned", help="JSON from --sweep-out: add an ours-tuned variant")
    ap.add_argument(
        "--first-calls",
        action="store_true",
        help="also time the first call (compile) with the heuristic and with autotune",
    )
    ap.add_argument("--no-fa4", action="store_true")
    ap.add_argument("--only", help="comma-separated shape names")
    ap.add_argument(
        "--target-s", type=float, default=0.4, help="seconds of timed calls per variant"
    )
    ap.add_argument("--workers", type=int, default=12, help="processes compiling sweep configs")
    ap.add_argument("--sweep-repeat", type=int, default=2, help="times each sweep config is timed")
    ap.add_argument("--first-call", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.first_call:
        first_call_child(args.first_call)
        return
    if not torch.cuda.is_available():
        print("benchmarks/attention.py needs CUDA", file=sys.stderr)
        sys.exit(2)
    torch.backends.cuda.matmul.allow_tf32 = False
    info = env_info()
    print(json.dumps(info), flush=True)
    gemm = gemm_ceiling()
    print(f"  bf16 GEMM 8192^3: {gemm['ms']:.3f} ms {gemm['tflops']:.1f} TFLOP/s", flush=True)
    report = {"env": info, "gemm": gemm}

    if args.sweep:
        sw = run_sweep(args)
        report["sweep"] = sw
        if args.sweep_out:
            with open(args.sweep_out, "w") as f:
                json.dump(sw["best"], f, indent=1)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
        print()
        print(
            f"# sweep on {info['gpu']} torch {info['torch']} triton {info['triton']}; "
            f"GEMM {gemm['tflops']:.0f} TFLOP/s"
        )
        for cname in sw["classes"]:
            if cname.endswith("_best_tflops"):
                continue
            by_cfg = sw.get("medians", {}).get(cname, {})
            ranked = sorted(by_cfg.items(), key=lambda kv: -sorted(kv[1])[len(kv[1]) // 2])
            print(
                f"{cname}: "
                + ", ".join(f"{c}=" + "/".join(f"{x:.0f}" for x in v) for c, v in ranked)
            )
        return

    fa4, fa4_mod = (None, "disabled") if args.no_fa4 else load_fa4()
    report["fa4"] = fa4_mod if fa4 is not None else f"not importable: {fa4_mod}"
    print("  fa4:", report["fa4"], flush=True)
    tuned = None
    if args.tuned and os.path.exists(args.tuned):
        with open(args.tuned) as f:
            tuned = json.load(f)
        report["tuned"] = tuned
    shapes = SHAPES
    if args.quick:
        shapes = [s for s in SHAPES if s["name"] in QUICK]
    if args.only:
        names = set(args.only.split(","))
        shapes = [s for s in SHAPES if s["name"] in names]
    results = []
    for s in shapes:
        results.append(bench_shape(s, args, fa4, tuned))
        report["results"] = results
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
    # the ceiling again, now that the card has been busy for a while (clocks, temperature)
    report["gemm_end"] = gemm_ceiling()
    print(f"  bf16 GEMM 8192^3 at the end: {report['gemm_end']['tflops']:.1f} TFLOP/s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    if args.first_calls:
        report["first_calls"] = measure_first_calls()
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
    print_table(results, gemm, info, report.get("gemm_end"))


if __name__ == "__main__":
    main()
