"""Sequence parallel (Ulysses) on a diffusers WanTransformer3DModel with random weights.

Launch with torchrun; every rank compiles the model twice, without and with
`sequence_parallel=<world size>`, checks that its output equals the one without, and times both
(CUDA: NCCL; else gloo on the CPU), and says whether the ops between the sites ran on each rank's
share of the tokens. At world size 1 the difference is the cost of the collectives and of the cuts
and gathers at the borders:

    torchrun --nproc_per_node 1 benchmarks/sequence_parallel.py            # one H200
    torchrun --nproc_per_node 2 benchmarks/sequence_parallel.py --smoke    # CPU, tiny shapes

Shapes: Wan-1.3B-like blocks (12 heads x 128) at a 480p-like latent; `--smoke` a tiny model.
`--out FILE` writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist

import fv_compile


def build(smoke: bool, device: torch.device, dtype: torch.dtype):
    import diffusers

    torch.manual_seed(0)  # the same weights on every rank
    if smoke:
        heads, head_dim, layers, ffn, latent = 2, 16, 2, 64, (1, 4, 3, 6, 10)
    else:
        heads, head_dim, layers, ffn, latent = 12, 128, 4, 8960, (1, 16, 21, 60, 104)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=latent[1],
        out_channels=latent[1],
        text_dim=64 if smoke else 4096,
        freq_dim=32 if smoke else 256,
        ffn_dim=ffn,
        num_layers=layers,
        rope_max_seq_len=1024,
    )
    model = model.to(device, dtype).eval()
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(*latent, generator=gen).to(device, dtype)
    text = torch.randn(1, 7 if smoke else 512, 64 if smoke else 4096, generator=gen)
    inputs = (hidden, torch.tensor([500], device=device), text.to(device, dtype))
    return model, inputs


def timed(fn, reps: int, device: torch.device) -> float:
    """Median milliseconds of `reps` calls, each synchronised."""
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU, seconds)")
    parser.add_argument("--compiler", default=None, help="inductor (CUDA default) | aot_eager")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    compiler = args.compiler or ("inductor" if cuda else "aot_eager")
    reps = args.reps or (3 if args.smoke else 10)
    model, inputs = build(args.smoke, device, dtype)

    results, outputs, stretch = {}, {}, []
    for name, sp in (("no_sp", None), (f"sp{world}", world)):
        cm = fv_compile.compile(model, "TORCH_SDPA", compiler=compiler, sequence_parallel=sp)
        with torch.no_grad():

            def call(cm=cm):
                return cm(*inputs, return_dict=False)[0]

            outputs[name] = call()  # compiles
            results[name] = timed(call, reps, device)
        if sp is not None:  # whether the ops between the sites ran on the share, or why not
            stretch = [row.describe() for row in cm.explain().sequence_parallel]
    out, ref = outputs[f"sp{world}"], outputs["no_sp"]
    err = (out.float() - ref.float()).abs().max().item()
    if rank == 0:
        print(f"world size {world}, {compiler}, {dtype}, latent {tuple(inputs[0].shape)}")
        for name, ms in results.items():
            print(f"  {name:>6}: {ms:9.2f} ms")
        print(f"  overhead {results[f'sp{world}'] / results['no_sp']:.3f}x, max |diff| {err:.3g}")
        for line in stretch:
            print(f"  {line}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(
                    {"world": world, "ms": results, "max_abs_diff": err, "stretch": stretch},
                    f,
                    indent=2,
                )
    torch.testing.assert_close(out, ref, atol=1e-5 if not cuda else 2e-2, rtol=1e-5)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
