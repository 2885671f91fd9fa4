"""The `fv-compile` command (also `python -m fv_compile`): argument parsing only; the work is in
fv_compile.report.

    fv-compile explain --model diffusers:LTXVideoTransformer3DModel      # the attention sites
    fv-compile report --model wan-tiny                                    # the speedup report

Exit status: 0 when everything ran; 1 when a report variant failed (the report is still written)
or an `explain --verify` check failed; 2 for arguments that name no model, size or backend."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

from fv_compile.api import COMPILERS
from fv_compile.context import FastVideoArgs
from fv_compile.errors import FvCompileError
from fv_compile.models import PRESETS
from fv_compile.report import ReportConfig, parse_backends, run_report, write_report
from fv_compile.report.render import busy_cpu_note, can_plot, report_notes, terminal_table
from fv_compile.report.run import Report
from fv_compile.report.sites import ExplainConfig, explain_model
from fv_compile.report.workload import DIFFUSERS_PREFIX, TINY_DEFAULT_VIDEO

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

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
    return args.run(args, recorded_command(argv))


def recorded_command(argv: Sequence[str] | None) -> list[str]:
    """The command as a report records it: `fv-compile` and its arguments, whatever started the
    program (`python -m fv_compile` puts the absolute path of __main__.py in sys.argv[0])."""
    return ["fv-compile", *(sys.argv[1:] if argv is None else argv)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fv-compile",
        description="torch.compile for video diffusion transformers: see what fv_compile finds\n"
        "in a model (explain) and what it gains (report).",
        epilog="examples:\n"
        "  fv-compile explain --model wan-tiny\n"
        "  fv-compile explain --model diffusers:LTXVideoTransformer3DModel --verify\n"
        "  fv-compile report --model diffusers:WanTransformer3DModel --config num_layers=4 \\\n"
        "      --frames 17 --height 128 --width 128\n"
        "exit status: 0 ok; 1 a report variant or a verify check failed; 2 bad arguments",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_explain(commands)
    _add_report(commands)
    return parser


def _add_model_arguments(command: argparse.ArgumentParser) -> None:
    model = command.add_argument_group("model and input")
    model.add_argument(
        "--model",
        type=_model,
        default=ReportConfig.model,
        help=f"a zoo preset ({', '.join(PRESETS)}) or {DIFFUSERS_PREFIX}<Class>, any diffusers "
        f"video transformer (e.g. {DIFFUSERS_PREFIX}WanTransformer3DModel, "
        f"{DIFFUSERS_PREFIX}LTXVideoTransformer3DModel; needs diffusers), built with random "
        "weights. Default: %(default)s",
    )
    model.add_argument(
        "--preset",
        help="size preset of a diffusers model: tiny (default, CPU-sized) or a full size "
        "(wan2.1-1.3b, wan2.1-14b, hunyuanvideo, cogvideox-5b, ltx-video-2b, mochi-1)",
    )
    model.add_argument(
        "--config",
        dest="config",
        metavar="KEY=VALUE",
        type=_key_value,
        action="append",
        default=[],
        help="change the model's size, repeatable: a field of the zoo preset's config or a "
        "constructor argument of the diffusers class (--config num_layers=4 --config "
        "attention_head_dim=64); VALUE is an int, float, bool, comma-separated ints or a string",
    )
    frames, height, width = TINY_DEFAULT_VIDEO
    model.add_argument(
        "--frames",
        type=_positive,
        help="video frames, mapped to latent frames as the model's VAE does (zoo and diffusers "
        "models alike; LTX-Video's VAE compresses 8x in time, 32x in space)",
    )
    model.add_argument("--height", type=_positive, help="video height in pixels")
    model.add_argument("--width", type=_positive, help="video width in pixels")
    model.add_argument(
        "--grid",
        type=_grid,
        help="latent grid T,H,W instead of --frames/--height/--width. Default: the preset's own "
        f"size; for the -tiny zoo presets a {frames}x{height}x{width} video",
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


def _add_fastvideo_argument(group: Any) -> None:
    group.add_argument(
        "--fastvideo-arg",
        dest="fastvideo_args",
        metavar="NAME=VALUE",
        type=_fastvideo_arg,
        action="append",
        default=[],
        help="a FastVideoArgs field for metadata backends, repeatable: e.g. "
        "--fastvideo-arg sta_window=1,2,2 --fastvideo-arg sta_dense_steps=1",
    )


def _add_explain(commands: Any) -> None:
    explain = commands.add_parser(
        "explain",
        help="the attention sites of a model: what was found, how, and which backend runs it",
        description=(
            "Trace one call of the model (a zoo preset or any diffusers video transformer) and "
            "print fv_compile.explain's table: every attention site with its form, layout, "
            "shapes, role and backend, what was left alone and why, and what Dynamo did not "
            "capture (graph breaks, frames run eagerly, attention outside every graph). "
            "Nothing is compiled for speed; the whole model is traced."
        ),
    )
    _add_model_arguments(explain)
    options = explain.add_argument_group("what to show")
    options.add_argument(
        "--backend",
        dest="backends",
        type=_backends,
        help="the attention backend or role policy to show (auto, TORCH_SDPA, "
        "self=SLIDING_TILE_ATTN,cross=TORCH_SDPA). Default: auto",
    )
    _add_fastvideo_argument(options)
    options.add_argument(
        "--verify",
        action="store_true",
        help="also check every rewritten site against the traced code on the model's own inputs "
        "(fv_compile.verify); exit status 1 when a check fails",
    )
    options.add_argument(
        "--accuracy-budget",
        type=float,
        default=None,
        metavar="ERROR",
        help="tune the sites left to auto as fv_compile.compile(model, accuracy_budget=ERROR) "
        "does, and list each site's candidates with their measured error and time",
    )
    options.add_argument("--json", metavar="PATH", help="also write the table as JSON to PATH")
    explain.set_defaults(run=_run_explain, parser=explain)


def _add_report(commands: Any) -> None:
    report = commands.add_parser(
        "report",
        help="measure eager, torch.compile and fv_compile backends on one model and device",
        description=(
            "Measure, in one run: eager, plain torch.compile, diffusers' compile_repeated_blocks "
            "(diffusers models), and fv_compile with each attention backend as a user gets it "
            "(regional='auto'). Per variant: per-step latency (noisy timings flagged), speedups, "
            "output error against eager, cold and cache-warm compile time, Dynamo graphs and "
            "recompiles, memory, attention's share of the step, each site verified; on a CPU, why "
            "fv_compile trails plain torch.compile or does not. Writes report.md, report.json and "
            "speedup.png. Exit status 1 when a variant failed (the report is still written)."
        ),
    )
    _add_model_arguments(report)

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
    _add_fastvideo_argument(variants)
    variants.add_argument(
        "--regional",
        type=_regional,
        nargs="?",
        const=True,
        default="auto",
        metavar="{auto,on,off}",
        help="fv_compile.compile's regional: auto (the default, what a user gets: the repeated "
        "blocks compiled once when they hold most of the weights, else the whole model), on "
        "(blocks; also plain --regional), off (the whole model). Plain torch.compile always "
        "compiles the whole model; diffusers' compile_repeated_blocks is its own variant",
    )
    variants.add_argument(
        "--accuracy-budget",
        type=float,
        default=None,
        metavar="ERROR",
        help="add the variant fv_compile.compile(model, accuracy_budget=ERROR): auto choosing "
        "each site's backend (8-bit SAGE_ATTN included) by its measured relative L2 error "
        "against float32 attention and its time; e.g. 0.02",
    )
    variants.add_argument(
        "--skip-torch-compile",
        action="store_true",
        help="leave out plain torch.compile and diffusers' compile_repeated_blocks",
    )
    variants.add_argument(
        "--skip-whole-model-compile",
        action="store_true",
        help="leave out plain torch.compile of the whole model but keep diffusers' "
        "compile_repeated_blocks (what a diffusers user picks): a whole large model compiles "
        "for minutes",
    )
    variants.add_argument(
        "--skip-warm-compile",
        action="store_true",
        help="do not compile each variant a second time from the caches (the warm figure of "
        "the compile column)",
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


def _check_size(args: argparse.Namespace) -> None:
    if args.grid is not None and any(v is not None for v in (args.frames, args.height, args.width)):
        args.parser.error("give either --grid or --frames/--height/--width, not both")


def _workload_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The model-and-input options `explain` and `report` share, as their configs name them."""
    return {
        "model": args.model, "preset": args.preset, "frames": args.frames, "height": args.height,
        "width": args.width, "grid": args.grid, "config": dict(args.config), "batch": args.batch,
        "dtype": args.dtype, "device": args.device, "seed": args.seed,
    }  # fmt: skip


def _run_explain(args: argparse.Namespace, command_line: list[str]) -> int:
    _check_size(args)
    parser: argparse.ArgumentParser = args.parser
    if args.backends is not None and len(args.backends) != 1:
        parser.error("--backend takes one backend or one role policy; report compares several")
    config = ExplainConfig(
        **_workload_fields(args),
        backend=args.backends[0] if args.backends else "auto",
        fastvideo_args=dict(args.fastvideo_args),
        verify=args.verify,
        accuracy_budget=args.accuracy_budget,
    )
    try:
        workload, report = explain_model(config)
    except FvCompileError as err:
        parser.error(str(err))
    w = workload.describe()
    print(
        f"{w['model']}: {w['class']}, {w['parameters'] / 1e6:.2f} M parameters, latent grid "
        f"{tuple(w['latent_grid'])}, {w['video_tokens']} video tokens, {w['dtype']} on "
        f"{w['device']}\n"
    )
    print(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"workload": w, **report.to_dict()}, f, indent=2)
            f.write("\n")
    if args.verify and not report.verified:
        print("\nfv-compile explain: a rewritten site failed its check (see the verify column)")
        return EXIT_FAILED
    return EXIT_OK


def _report_config(args: argparse.Namespace) -> ReportConfig:
    """What `fv-compile report`'s parsed arguments ask `run_report` to measure."""
    return ReportConfig(
        **_workload_fields(args),
        backends=args.backends,
        compiler=args.compiler,
        steps=args.steps,
        warmup=args.warmup,
        repeat=args.repeat,
        torch_compile=not args.skip_torch_compile,
        whole_model_compile=not (args.skip_torch_compile or args.skip_whole_model_compile),
        regional=args.regional,
        warm_compile=not args.skip_warm_compile,
        accuracy_budget=args.accuracy_budget,
        fastvideo_args=dict(args.fastvideo_args),
    )


def _run_report(args: argparse.Namespace, command_line: list[str]) -> int:
    _check_size(args)
    parser: argparse.ArgumentParser = args.parser
    if not args.no_plot and not can_plot():
        print(
            "fv-compile report: matplotlib is not installed, so speedup.png will not be written "
            "(pip install 'fv-compile[report]', or pass --no-plot)",
            file=sys.stderr,
        )
    try:
        report = run_report(_report_config(args), argv=command_line)
    except ValueError as err:
        parser.error(str(err))
    paths = write_report(report, args.out, plot=not args.no_plot)
    _print_summary(report, [str(p) for p in paths.values()])
    if report.failed:
        print(
            f"\nfv-compile report: {len(report.failed)} variant(s) failed "
            f"({', '.join(r.name for r in report.failed)}); exit status {EXIT_FAILED}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK


def _print_summary(report: Report, paths: list[str]) -> None:
    w, env = report.workload, report.environment
    print(
        f"\nfv-compile report: {w['model']}, {w['video_tokens']} video tokens, {w['dtype']} on "
        f"{env['gpu'] or env['cpu']} ({report.wall_s:.0f} s)\n"
    )
    print(terminal_table(report))
    if note := busy_cpu_note(report):
        print(f"\nnote: {note}")
    for note in report_notes(report):
        print(f"\nnote: {note.replace('**', '')}")
    for paragraph in report.analysis:
        print("\n" + paragraph.replace("**", ""))
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


def _regional(text: str) -> bool | str:
    choices: dict[str, bool | str] = {
        "auto": "auto",
        "on": True,
        "true": True,
        "off": False,
        "false": False,
    }
    value = choices.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected auto, on or off, got {text!r}")
    return value


def _key_value(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` of --config; the key is checked against the model when it is built."""
    key, sep, value = (part.strip() for part in text.partition("="))
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. num_layers=4), got {text!r}")
    return key, _literal(value)


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
    return grid


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
    if value.lower() == "none":
        return None
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
