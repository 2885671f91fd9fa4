"""Cold and warm compile of `fv_compile.compile` on a Wan-size diffusers transformer, each run in a
fresh process, and the recompiles of a denoising loop.

Run on a CUDA machine (not a test):

    python benchmarks/compile_time.py --out compile_time.json
    python benchmarks/compile_time.py --regional auto --steps 50 --cfg --sta 3,3,3 --sta-dense-steps 10
    python benchmarks/compile_time.py --smoke          # CPU, tiny model: the script's logic only
    python benchmarks/compile_time.py --preset tiny --device cpu --steps 10   # CPU, Inductor

For each `regional` setting (`auto`, `False`): a new, empty cache directory (Inductor's FX graph
and AOTAutograd caches, and Triton's kernel cache), then two processes one after the other on it:

* ``cold``: nothing cached: Dynamo, the pass, AOTAutograd, Inductor and Triton all run;
* ``warm``: a second process on the same caches: Dynamo and the pass run again (they always do),
  AOTAutograd and Inductor should be cache hits (the counters are printed).

Each process builds the model, times its first call (the compile), then runs `--steps` calls as a
pipeline makes them (a decreasing timestep per step, two calls per step with `--cfg`, no forward
context) and reports how many graphs Dynamo compiled after the first call (the target: none) and
how many metadata variants the loop compiled (STA with dense first steps: two).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time


def _compile_phases() -> dict[str, float]:
    """Seconds spent in each phase torch times (Dynamo, AOTAutograd, Inductor, ...), summed
    over every graph: what is left of the first call beside them is running it, kernel JIT
    (flash-attn-4's CuTe kernels, Triton's) included."""
    from torch._dynamo.utils import compile_times

    names, values = compile_times(repr="csv", aggregate=True)
    return {name: round(float(value), 3) for name, value in zip(names, values, strict=True)}


def _fa4_cached_kernels() -> int:
    """How many flash-attn-4 kernels sit in its persistent cache (fv_compile turns it on)."""
    folder = os.environ.get("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR")
    if not folder or not os.path.isdir(folder):
        return 0
    return sum(
        name.endswith(".o") or name.endswith(".so")
        for _, _, files in os.walk(folder)
        for name in files
    )


def _fa4_import_seconds() -> float | None:
    """Seconds `import flash_attn.cute` takes in a fresh process after torch's import: the part
    of a first call that is flash-attn-4's own import (the CuTe DSL, quack), whatever any cache
    holds. None when flash-attn-4 is not installed."""
    code = (
        "import time, torch; t = time.perf_counter(); import flash_attn.cute; "
        "print(time.perf_counter() - t)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return float(done.stdout.split()[-1]) if done.returncode == 0 and done.stdout else None


def child(args: argparse.Namespace) -> dict:
    import torch
    from torch._dynamo.utils import counters

    import fv_compile
    from fv_compile.models import from_diffusers

    device = args.device
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    t0 = time.perf_counter()
    model, inputs, kwargs = from_diffusers(
        "WanTransformer3DModel", args.preset, dtype=dtype, device=device
    )
    build_s = time.perf_counter() - t0
    regional = (args.regional or ["auto"])[-1]
    options: dict = {"regional": {"auto": "auto", "false": False, "true": True}[regional.lower()]}
    options["compiler"] = args.compiler
    if args.sta:
        options["attention_backend"] = {"self": "SLIDING_TILE_ATTN", "default": "auto"}
        options["fastvideo_args"] = fv_compile.FastVideoArgs(
            sta_window=tuple(int(v) for v in args.sta.split(",")),
            sta_tile_size=tuple(int(v) for v in args.tile.split(",")),
            sta_dense_steps=args.sta_dense_steps,
        )
    cm = fv_compile.compile(model, **options)
    latent, _, text = inputs

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    profiler = cProfile.Profile() if args.profile else None
    with torch.no_grad():
        t0 = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        first_out = cm(latent, torch.tensor([999.0], device=device), text, **kwargs)
        sync()
        first_s = time.perf_counter() - t0
        if profiler is not None:
            profiler.disable()
            with open(f"{args.profile}.{args.run}.txt", "w") as f:
                stats = pstats.Stats(profiler, stream=f).sort_stats("cumulative")
                stats.print_stats(40)
                stats.print_stats(r"fv_compile|flash_attn|cutlass|_inductor|_functorch", 80)
                stats.sort_stats("tottime").print_stats(40)
        first_out = (
            first_out[0]
            if isinstance(first_out, tuple)
            else getattr(first_out, "sample", first_out)
        )
        checksum = float(first_out.double().sum())
        graphs_after_first = cm._fv_backend.graphs
        t0 = time.perf_counter()
        for i in range(args.steps):
            t = torch.tensor([999.0 * (1 - i / args.steps)], device=device)
            cm(latent, t, text, **kwargs)
            if args.cfg:
                cm(latent, t, torch.zeros_like(text), **kwargs)
        sync()
        loop_s = time.perf_counter() - t0
    return {
        "regional": regional,
        "regions": cm.regions,
        "build_s": build_s,
        "first_call_s": first_s,
        "loop_s": loop_s,
        "steps": args.steps,
        "cfg": args.cfg,
        "graphs_after_first_call": graphs_after_first,
        "recompiles_in_loop": cm._fv_backend.graphs - graphs_after_first,
        "metadata_variants": cm.variants_compiled,
        "compile_phases_s": _compile_phases(),
        "fa4_cached_kernels": _fa4_cached_kernels(),
        "output_checksum": checksum,
        "aot_cache": {k: v for k, v in counters["aot_autograd"].items() if "cache" in k},
        "fx_cache": {k: v for k, v in counters["inductor"].items() if "cache" in k},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="wan2.1-1.3b")
    ap.add_argument(
        "--regional",
        action="append",
        help="auto | false | true (repeatable; default auto and false)",
    )
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg", action="store_true", help="two calls per step, as a pipeline with CFG")
    ap.add_argument("--sta", help="SLIDING_TILE_ATTN window wt,wh,ww on self-attention")
    ap.add_argument("--tile", default="6,8,8")
    ap.add_argument("--sta-dense-steps", type=int, default=0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compiler", default="inductor", choices=["inductor", "aot_eager", "eager"])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, eager compiler")
    ap.add_argument("--out")
    ap.add_argument(
        "--profile", help="write each process's first-call profile to PROFILE.<cold|warm>.txt"
    )
    ap.add_argument("--run", default="cold", help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        args.preset, args.device, args.compiler = "tiny", "cpu", "eager"
    if args.child:
        print(json.dumps(child(args)))
        return

    fa4_import_s = _fa4_import_seconds() if args.device == "cuda" else None
    if fa4_import_s is not None:
        print(
            f"import flash_attn.cute in a fresh process (torch imported first): {fa4_import_s:.2f} s"
        )
    rows = []
    for regional in args.regional or ["auto", "false"]:
        with tempfile.TemporaryDirectory(prefix="fv-compile-cache-") as cache:
            env = {
                **os.environ,
                "TORCHINDUCTOR_CACHE_DIR": cache,
                "TRITON_CACHE_DIR": os.path.join(cache, "triton"),
                "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "0",
            }
            for run in ("cold", "warm"):
                cmd = [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--child",
                    "--regional",
                    regional,
                    "--preset",
                    args.preset,
                    "--steps",
                    str(args.steps),
                    "--tile",
                    args.tile,
                    "--device",
                    args.device,
                    "--compiler",
                    args.compiler,
                    "--sta-dense-steps",
                    str(args.sta_dense_steps),
                ]
                cmd += (
                    ["--cfg"] * args.cfg
                    + ["--smoke"] * args.smoke
                    + (["--sta", args.sta] if args.sta else [])
                )
                cmd += ["--run", run] + (
                    ["--profile", os.path.abspath(args.profile)] if args.profile else []
                )
                t0 = time.perf_counter()
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                wall = time.perf_counter() - t0
                if done.returncode != 0:
                    sys.stderr.write(done.stderr[-4000:])
                    raise SystemExit(f"{regional}/{run} failed")
                row = {
                    "run": run,
                    "process_s": wall,
                    **json.loads(done.stdout.strip().splitlines()[-1]),
                }
                rows.append(row)
                print(
                    f"regional={regional:5s} {run}: first call {row['first_call_s']:6.1f} s "
                    f"(process {wall:5.1f} s), "
                    f"{row['recompiles_in_loop']} recompiles and {row['metadata_variants']} variants over "
                    f"{args.steps} steps, AOT {row['aot_cache']}, FX {row['fx_cache']}, "
                    f"FA4 kernels cached {row['fa4_cached_kernels']}, output sum {row['output_checksum']:.6e}"
                )
                top = sorted(row["compile_phases_s"].items(), key=lambda kv: -kv[1])[:6]
                print("    phases: " + ", ".join(f"{name} {sec:.1f}s" for name, sec in top))
            cold, warm = rows[-2]["output_checksum"], rows[-1]["output_checksum"]
            if abs(cold - warm) > 1e-3 * max(1.0, abs(cold)):
                raise SystemExit(
                    f"regional={regional}: the warm process computed {warm}, the cold one {cold}"
                )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"preset": args.preset, "fa4_import_s": fa4_import_s, "rows": rows}, f, indent=2
            )


if __name__ == "__main__":
    main()
