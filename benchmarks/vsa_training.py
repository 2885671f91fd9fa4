"""One training step (forward + backward) of a video DiT with video sparse attention on its
self-attention sites, against the same step with dense attention.

A diffusers ``WanTransformer3DModel`` of Wan2.1-1.3B size with random weights, batch 1 at
480p x 81 frames (21 x 30 x 52 = 32,760 tokens, 512 text tokens), bf16 on the GPU, weights
trainable. The step is the model's forward, a backward of a fixed random gradient on its output,
and the weights' gradients dropped (no optimiser: its cost does not depend on attention).

Variants, each in the same process:

* ``eager``: the model as diffusers runs it (SDPA: cuDNN on the H200);
* ``torch.compile``: ``torch.compile(model)`` with the same compiler, attention as the model
  wrote it: the control for the gradient column (how far compiled bf16 arithmetic alone moves
  the gradients from eager's);
* ``auto``: ``fv_compile.compile(model)``: exact dense attention on the fastest backend;
* ``vsa``: ``fv_compile.compile(model, {"self": "VIDEO_SPARSE_ATTN"})`` at ``--sparsity``
  (cross-attention on the dense default). Each VSA site of the training graph runs as its impl's
  own code, so the block-sparse backward kernel gets the lists, fine output and row statistics
  the forward saved (nothing is recomputed).

Per variant: ms per step (CUDA events, median, the compiling call and warm-up excluded), the
first call, peak memory; for each compiled variant the relative L2 difference of its loss
gradients against eager's (``vsa`` is a different attention: its difference is the sparsity's,
not an error), with ``--against-fp32`` also against a float32 copy of the model (the yardstick
eager's bf16 gradients are held to as well), and how many self-attention sites VSA served. The
table is printed last.

    python benchmarks/vsa_training.py --json vsa_training.json
    python benchmarks/vsa_training.py --layers 2 --against-fp32   # the gradient column's yardstick
    python benchmarks/vsa_training.py --smoke      # CPU, tiny model, aot_eager: the script itself
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fv_compile
from fv_compile import FastVideoArgs, ForwardBatch
from fv_compile.models.diffusers_zoo import from_diffusers

PATCH = (1, 2, 2)


def first_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def make_step(model, call, args, kwargs, grad, fb, fva):
    def step():
        model.zero_grad(set_to_none=True)
        with fv_compile.forward_context(0, fb, fva):
            out = first_tensor(call(*args, **kwargs))
        out.backward(grad)

    return step


def measure(step, device: str, reps: int) -> dict:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()  # compiles
    if device == "cuda":
        torch.cuda.synchronize()
    row: dict = {"first_call_s": time.perf_counter() - t0}
    if device == "cuda":
        from _timing import time_cuda

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        timing = time_cuda(step, warmup=1, min_reps=reps, max_reps=reps)
        row.update(ms=timing["ms"], min_ms=timing["min_ms"], reps=timing["reps"])
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        row.update(ms=sorted(times)[len(times) // 2], peak_gib=None)
    return row


def weight_grads(model) -> torch.Tensor:
    return torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--video", default="81x480x832", help="frames x height x width")
    p.add_argument("--sparsity", type=float, default=0.875)
    p.add_argument("--layers", type=int, default=None, help="fewer blocks (memory)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--compiler", default="inductor", choices=["inductor", "aot_eager", "eager"])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, aot_eager")
    p.add_argument("--json", default=None)
    p.add_argument(
        "--against-fp32",
        action="store_true",
        help="also each variant's gradients against a float32 copy of the model (memory: x3)",
    )
    a = p.parse_args()
    start = time.perf_counter()
    device = "cpu" if a.smoke or not torch.cuda.is_available() else "cuda"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if a.smoke:
        a.video, a.compiler, a.reps = "9x64x64", "aot_eager", 3
    video = tuple(int(x) for x in a.video.lower().split("x"))
    config = {} if a.layers is None else {"num_layers": a.layers}
    preset = "tiny" if a.smoke else "wan2.1-1.3b"
    model, args, kwargs = from_diffusers(
        "WanTransformer3DModel",
        preset,
        config=config,
        video=video,
        text_len=16 if a.smoke else 512,
        dtype=dtype,
        device=device,
    )
    model.train().requires_grad_(True)
    latent = args[0]
    fb = ForwardBatch(raw_latent_shape=tuple(latent.shape))
    fva = FastVideoArgs(patch_size=PATCH, VSA_sparsity=a.sparsity)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        shape = first_tensor(model(*args, **kwargs)).shape
    grad = torch.randn(shape, generator=gen, device=device, dtype=dtype)

    variants = {
        "eager": model,
        "torch.compile": torch.compile(model, backend=a.compiler),
        "auto": fv_compile.compile(model, compiler=a.compiler),
        "vsa": fv_compile.compile(model, {"self": "VIDEO_SPARSE_ATTN"}, compiler=a.compiler),
    }
    fp32 = None
    if a.against_fp32:  # the yardstick both eager and the compiled variants are held to
        twin = copy.deepcopy(model).float()
        fargs = [x.float() if torch.is_tensor(x) and x.is_floating_point() else x for x in args]
        fkw = {
            k: x.float() if torch.is_tensor(x) and x.is_floating_point() else x
            for k, x in kwargs.items()
        }
        make_step(twin, twin, fargs, fkw, grad.float(), fb, fva)()
        fp32 = weight_grads(twin)
        del twin
    rows, base = [], None
    for name, call in variants.items():
        row: dict = {"variant": name}
        try:
            row.update(measure(make_step(model, call, args, kwargs, grad, fb, fva), device, a.reps))
            grads = weight_grads(model)
            if base is None:
                base = grads
            row["grad_rel_l2"] = float((grads - base).norm() / base.norm())
            if fp32 is not None:
                row["grad_rel_l2_fp32"] = float((grads - fp32).norm() / fp32.norm())
        except torch.cuda.OutOfMemoryError as err:
            row["error"] = f"out of memory: {str(err).splitlines()[0]} (try --layers)"
        if name in ("auto", "vsa"):
            sites = call.explain().sites
            row["vsa_sites"] = sum(s.backend == "VIDEO_SPARSE_ATTN" for s in sites)
            row["sites"] = len(sites)
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)

    print()
    tokens = latent.shape[2] * (latent.shape[3] // 2) * (latent.shape[4] // 2)
    print(
        f"Wan2.1-1.3B-size diffusers transformer, one training step (fwd+bwd) at {a.video} "
        f"({tokens} tokens), VSA sparsity {a.sparsity}, {a.compiler}, {device} "
        f"{str(dtype).removeprefix('torch.')}, {len(list(model.parameters()))} weight tensors"
    )
    heads = ("ms/step", "vs eager", "peak GiB", "first s", "grad rel-L2", "vs fp32", "VSA sites")
    print(f"{'variant':13s} " + " ".join(f"{h:>11s}" for h in heads))
    ref = rows[0].get("ms")
    failed = False
    for r in rows:
        if "error" in r:
            failed = True
            print(f"{r['variant']:13s} {r['error']}")
            continue
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        speed = f"{ref / r['ms']:.2f}x" if ref else "-"
        vsa = f"{r['vsa_sites']}/{r['sites']}" if "sites" in r else "-"
        vs32 = f"{r['grad_rel_l2_fp32']:.2e}" if "grad_rel_l2_fp32" in r else "-"
        print(
            f"{r['variant']:13s} {r['ms']:11.1f} {speed:>11s} {peak:>11s} {r['first_call_s']:11.1f} "
            f"{r['grad_rel_l2']:11.2e} {vs32:>11s} {vsa:>11s}"
        )
    print(f"(wall {time.perf_counter() - start:.0f} s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
