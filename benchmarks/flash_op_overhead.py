"""FLASH_ATTN through fv_compile's op vs flash-attn-4 called directly, same tensors, same run.

The op adds a custom-op dispatch and a registry lookup per call; the issue's bar is >= 0.98x of
the direct call. `--compiler inductor` runs the rewritten graph as users do; `--rounds R`
alternates the two sides R times. Prints a table; `--out FILE` writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import json

import torch
import torch.nn.functional as F

import fv_compile
from fv_compile.backends.flash_attn import flash_kernel


class SelfAttention(torch.nn.Module):
    def forward(self, q, k, v):  # BSHD in, BHSD for SDPA, BSHD out: the usual model spelling
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return o.transpose(1, 2)


def bench(fn, reps: int = 20) -> tuple[float, float]:
    """`(latency, pipelined)` ms per call: the median of calls each followed by a sync (the CPU
    path before the kernel launch is exposed), and the mean of `reps` calls issued back to back
    between two events (as in a model, where the CPU runs ahead of the GPU)."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return sorted(times)[len(times) // 2], start.elapsed_time(end) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument(
        "--compiler",
        default="eager",
        choices=["eager", "aot_eager", "inductor"],
        help="what runs the rewritten graph on the fv_compile side",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="alternate direct / through-the-op timings this many times; medians are over rounds",
    )
    args = ap.parse_args()
    label, fa = flash_kernel()
    rows = []
    for b, h, s, d in [(1, 12, 32760, 128), (2, 24, 4096, 128), (1, 16, 16384, 64)]:
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        scale = d**-0.5
        cm = fv_compile.compile(SelfAttention(), "FLASH_ATTN", compiler=args.compiler, strict=True)
        direct_ms, op_ms = [], []
        with torch.no_grad():
            out = cm(q, k, v)
            ref = fa(q, k, v, softmax_scale=scale, causal=False)[0]
            for _ in range(args.rounds):  # interleaved: clock drift hits both sides alike
                direct_ms.append(
                    bench(functools.partial(fa, q, k, v, softmax_scale=scale, causal=False))
                )
                op_ms.append(bench(functools.partial(cm, q, k, v)))

        def med(xs, i):
            return sorted(x[i] for x in xs)[len(xs) // 2]

        direct, through = med(direct_ms, 0), med(op_ms, 0)
        direct_p, through_p = med(direct_ms, 1), med(op_ms, 1)
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        flops = 4 * b * h * s * s * d
        rows.append(
            dict(
                shape=f"B{b} H{h} S{s} D{d}",
                direct_ms=direct,
                op_ms=through,
                direct_tflops=flops / direct / 1e9,
                op_tflops=flops / through / 1e9,
                ratio=direct / through,
                direct_pipelined_ms=direct_p,
                op_pipelined_ms=through_p,
                ratio_pipelined=direct_p / through_p,
                rel_err=err,
                kernel=label,
                compiler=args.compiler,
                direct_rounds=direct_ms,
                op_rounds=op_ms,
            )
        )
    print(
        f"{'shape':24} {'FA4 direct':>12} {'via fv_compile':>15} {'ratio':>7} "
        f"{'pipelined ratio':>16} {'rel err':>9}"
    )
    for r in rows:
        print(
            f"{r['shape']:24} {r['direct_tflops']:9.1f} TF {r['op_tflops']:12.1f} TF {r['ratio']:7.3f} "
            f"{r['ratio_pipelined']:16.3f} {r['rel_err']:9.2e}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "rows": rows},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
