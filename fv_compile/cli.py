"""The `fv-compile` command (also `python -m fv_compile`): argument parsing only; the work is in
fv_compile.report."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

from fv_compile.api import COMPILERS
from fv_compile.context import FastVideoArgs
from fv_compile.models import PRESETS
from fv_compile.report import ReportConfig, parse_backends, run_report, write_report
from fv_compile.report.render import busy_cpu_note, can_plot, terminal_table
from fv_compile.report.run import Report
from fv_compile.report.workload import DIFFUSERS_PREFIX, TINY_DEFAULT_VIDEO

DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    command_line = list(sys.argv) if argv is None else ["fv-compile", *argv]
    return args.run(args, command_line)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fv-compile", description="torch.compile for video diffusion transformers."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    report = commands.add_parser(
        "report",
        help="measure eager, torch.compile and fv_compile backends on one model and device",
        description=(
            "Measure, in one run: eager, plain torch.compile, and fv_compile with each attention "
            "backend. Per variant: per-step latency, speedups, output error against eager, compile "
            "time, Dynamo graphs and recompiles, memory, attention's share of the step. Writes "
            "report.md, report.json and speedup.png."
        ),
    )
    model = report.add_argument_group("model and input")
    model.add_argument(
        "--model",
        type=_model,
        default=ReportConfig.model,
        help=f"a zoo preset ({', '.join(PRESETS)}) or {DIFFUSERS_PREFIX}<Class> (e.g. "
        f"{DIFFUSERS_PREFIX}WanTransformer3DModel; needs diffusers). Default: %(default)s",
    )
    model.add_argument(
        "--preset",
        help="size preset of a diffusers model: tiny (default), or the matching zoo preset's name",
    )
    model.add_argument(
        "--frames", type=_positive, help="video frames (mapped to latent frames as the VAE does)"
    )
    model.add_argument("--height", type=_positive, help="video height in pixels")
    model.add_argument("--width", type=_positive, help="video width in pixels")
    frames, height, width = TINY_DEFAULT_VIDEO
    model.add_argument(
        "--grid",
        type=_grid,
        help="latent grid T,H,W instead of --frames/--height/--width. Default: the preset's own "
        f"size; for the -tiny presets a {frames}x{height}x{width} video",
    )
    model.add_argument(
        "--batch", type=_positive, default=ReportConfig.batch, help="default: %(default)s"
    )
    model.add_argument(
        "--dtype",
        type=_dtype,
        help="float32, bfloat16 or float16 (default: bfloat16 on CUDA, float32 on CPU)",
    )
    model.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if available)")
    model.add_argument(
        "--seed",
        type=int,
        default=ReportConfig.seed,
        help="seed of the random weights and inputs (default: %(default)s)",
    )

    variants = report.add_argument_group("variants")
    variants.add_argument(
        "--backends",
        type=_backends,
        help="attention backends to compare, comma-separated (auto,TORCH_SDPA); role policies "
        "as role=NAME items (self=SLIDING_TILE_ATTN,cross=TORCH_SDPA), several policies "
        "separated by ';'. Default: auto plus every registered dense backend that runs on the "
        "device",
    )
    variants.add_argument(
        "--compiler",
        choices=COMPILERS,
        default=ReportConfig.compiler,
        help="what runs the graphs, for fv_compile and plain torch.compile alike "
        "(default: %(default)s)",
    )
    variants.add_argument(
        "--fastvideo-arg",
        dest="fastvideo_args",
        metavar="NAME=VALUE",
        type=_fastvideo_arg,
        action="append",
        default=[],
        help="a FastVideoArgs field for metadata backends, repeatable: e.g. "
        "--fastvideo-arg sta_window=1,2,2 --fastvideo-arg sta_dense_steps=1",
    )
    variants.add_argument(
        "--regional",
        action="store_true",
        help="compile the repeated transformer block once instead of the whole model, for plain "
        "torch.compile and fv_compile alike (seconds instead of minutes of cold compile)",
    )
    variants.add_argument(
        "--skip-torch-compile",
        action="store_true",
        help="leave out the plain torch.compile variant",
    )

    timing = report.add_argument_group("timing")
    timing.add_argument(
        "--steps",
        type=_positive,
        default=ReportConfig.steps,
        help="transformer calls per denoising loop, call i inside "
        "forward_context(current_timestep=i); latency is per call (default: %(default)s)",
    )
    timing.add_argument(
        "--warmup",
        type=_non_negative,
        default=ReportConfig.warmup,
        help="untimed loops after the first (compiling) one (default: %(default)s)",
    )
    timing.add_argument(
        "--repeat",
        type=_positive,
        default=ReportConfig.repeat,
        help="timed loops; median, min and max are over these (default: %(default)s)",
    )

    output = report.add_argument_group("output")
    output.add_argument(
        "--out",
        default="fv-report",
        help="directory for report.md, report.json, speedup.png (default: %(default)s)",
    )
    output.add_argument("--no-plot", action="store_true", help="do not write speedup.png")
    report.set_defaults(run=_run_report, parser=report)
    return parser


def _run_report(args: argparse.Namespace, command_line: list[str]) -> int:
    parser: argparse.ArgumentParser = args.parser
    if args.grid is not None and any(v is not None for v in (args.frames, args.height, args.width)):
        parser.error("give either --grid or --frames/--height/--width, not both")
    if not args.no_plot and not can_plot():
        print(
            "fv-compile report: matplotlib is not installed, so speedup.png will not be written "
            "(pip install 'fv-compile[report]', or pass --no-plot)",
            file=sys.stderr,
        )
    config = ReportConfig(
        model=args.model,
        preset=args.preset,
        frames=args.frames,
        height=args.height,
        width=args.width,
        grid=args.grid,
        batch=args.batch,
        dtype=args.dtype,
        device=args.device,
        backends=args.backends,
        compiler=args.compiler,
        steps=args.steps,
        warmup=args.warmup,
        repeat=args.repeat,
        torch_compile=not args.skip_torch_compile,
        regional=args.regional,
        seed=args.seed,
        fastvideo_args=dict(args.fastvideo_args),
    )
    try:
        report = run_report(config, argv=command_line)
    except ValueError as err:
        parser.error(str(err))
    paths = write_report(report, args.out, plot=not args.no_plot)
    _print_summary(report, [str(p) for p in paths.values()])
    return 0


def _print_summary(report: Report, paths: list[str]) -> None:
    w, env = report.workload, report.environment
    print(
        f"\nfv-compile report: {w['model']}, {w['video_tokens']} video tokens, {w['dtype']} on "
        f"{env['gpu'] or env['cpu']} ({report.wall_s:.0f} s)\n"
    )
    print(terminal_table(report))
    if note := busy_cpu_note(report):
        print(f"\nnote: {note}")
    for r in report.variants:
        if not r.ok:
            print(f"\n{r.name} failed during {r.failed_during}: {r.error}")
    print("\nwrote " + ", ".join(paths))


def _model(text: str) -> str:
    if text in PRESETS or (text.startswith(DIFFUSERS_PREFIX) and len(text) > len(DIFFUSERS_PREFIX)):
        return text
    raise argparse.ArgumentTypeError(
        f"unknown model {text!r}; valid presets: {', '.join(PRESETS)}, or {DIFFUSERS_PREFIX}<Class>"
    )


def _grid(text: str) -> tuple[int, int, int]:
    parts = text.replace("x", ",").split(",")
    try:
        grid = tuple(int(p) for p in parts)
    except ValueError:
        grid = ()
    if len(grid) != 3 or min(grid) < 1:
        raise argparse.ArgumentTypeError(
            "expected the latent grid as T,H,W (three positive integers, e.g. 3,32,32), "
            f"got {text!r}"
        )
    return grid  # type: ignore[return-value]


def _dtype(text: str) -> str:
    try:
        return DTYPE_NAMES[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"unknown dtype {text!r}; choose float32, bfloat16 or float16"
        ) from None


def _backends(text: str) -> list:
    try:
        return parse_backends(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _fastvideo_arg(text: str) -> tuple[str, Any]:
    """`NAME=VALUE` for a FastVideoArgs field; VALUE is an int, float, bool, comma-separated int
    tuple, or else a string (a file path)."""
    fields = [f.name for f in dataclasses.fields(FastVideoArgs) if f.name != "pipeline_config"]
    name, sep, value = (part.strip() for part in text.partition("="))
    if not sep or name not in fields:
        raise argparse.ArgumentTypeError(
            f"expected NAME=VALUE with NAME a FastVideoArgs field ({', '.join(fields)}), "
            f"got {text!r}"
        )
    return name, _literal(value)


def _literal(value: str) -> Any:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for convert in (int, float):
        try:
            return convert(value)
        except ValueError:
            pass
    if "," in value:
        try:
            return tuple(int(v) for v in value.split(","))
        except ValueError:
            pass
    return value


def _positive(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
