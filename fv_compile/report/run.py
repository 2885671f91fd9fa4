"""One report run: build the workload, measure every variant in one process, relate them."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from fv_compile.report.environment import collect_environment
from fv_compile.report.measure import AttentionShare
from fv_compile.report.progress import Progress, make_progress
from fv_compile.report.variants import (
    EAGER,
    TORCH_COMPILE,
    BackendSpec,
    TimingPlan,
    VariantResult,
    build_variants,
    default_backends,
    probe_eager_attention,
    run_variant,
)
from fv_compile.report.workload import DEFAULT_MODEL, load_workload

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ReportConfig:
    """What to measure. None for device, dtype and backends means: the defaults for this machine
    (CUDA if available; bf16 on CUDA, fp32 on CPU; `auto` plus the dense backends that run here)."""

    model: str = DEFAULT_MODEL
    preset: str | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    grid: tuple[int, int, int] | None = None
    batch: int = 1
    dtype: str | None = None
    device: str | None = None
    backends: list[BackendSpec] | None = None
    compiler: str = "inductor"
    steps: int = 2
    warmup: int = 2
    repeat: int = 10
    torch_compile: bool = True
    regional: bool = False
    seed: int = 0
    fastvideo_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class EagerAttention:
    """Attention's share of the eager step, from `probe_eager_attention`."""

    share: AttentionShare | None = None
    error: str | None = None
    explain: dict[str, Any] | None = None
    explain_text: str | None = None


@dataclass
class Report:
    config: dict[str, Any]
    environment: dict[str, Any]
    workload: dict[str, Any]
    variants: list[VariantResult]
    eager_attention: EagerAttention
    wall_s: float = 0.0
    methods: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {device}: CUDA is not available here (torch {torch.__version__})"
        )
    return resolved


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def run_report(
    config: ReportConfig, *, argv: list[str] | None = None, progress: Progress | None = None
) -> Report:
    """Measure every variant of `config` and return the report (nothing is written here).

    Raises ValueError (a WorkloadError) for a model or size that cannot be built; failures of a
    variant are recorded in its result instead.
    """
    started = time.perf_counter()
    device = resolve_device(config.device)
    # before anything runs, so the load average shows competition from other processes only
    environment = collect_environment(device, sys.argv if argv is None else argv)
    dtype = resolve_dtype(config.dtype, device)
    workload = load_workload(
        config.model,
        preset=config.preset,
        video=(config.frames, config.height, config.width),
        grid=config.grid,
        batch=config.batch,
        dtype=dtype,
        device=device,
        seed=config.seed,
    )
    workload.fastvideo_overrides = dict(config.fastvideo_args)
    backends = config.backends if config.backends is not None else default_backends(device, dtype)
    plan = TimingPlan(config.steps, config.warmup, config.repeat)
    specs = build_variants(backends, torch_compile=config.torch_compile)
    progress = make_progress() if progress is None else progress
    resolved = dataclasses.replace(
        config, device=str(device), dtype=str(dtype).removeprefix("torch."), backends=list(backends)
    )

    results: list[VariantResult] = []
    reference = None
    eager_attention = EagerAttention()
    try:
        for index, spec in enumerate(specs, 1):
            progress.start(index, len(specs), spec.name)
            result, output = run_variant(
                spec,
                workload,
                plan,
                compiler=config.compiler,
                reference=reference,
                progress=progress,
                regional=config.regional,
            )
            if spec.kind == EAGER:
                reference = output
                if result.ok:
                    progress.phase("profiling attention (Dynamo capture, eager ops)")
                    eager_attention = _eager_attention(workload)
            results.append(result)
            progress.finish(_summary(result))
    finally:
        progress.close()
    relate(results)
    return Report(
        config=dataclasses.asdict(resolved),
        environment=environment,
        workload=workload.describe(),
        variants=results,
        eager_attention=eager_attention,
        wall_s=time.perf_counter() - started,
        methods=_methods(device, plan, config.compiler),
    )


def relate(results: list[VariantResult]) -> None:
    """Fill each variant's speedups: the ratio of medians against eager and plain torch.compile."""
    eager = _baseline(results, EAGER)
    compiled = _baseline(results, TORCH_COMPILE)
    for r in results:
        if r.latency is None:
            continue
        if eager is not None:
            r.speedup_vs_eager = eager / r.latency.median_ms
        if compiled is not None:
            r.speedup_vs_torch_compile = compiled / r.latency.median_ms


def _baseline(results: list[VariantResult], kind: str) -> float | None:
    for r in results:
        if r.kind == kind and r.latency is not None:
            return r.latency.median_ms
    return None


def _eager_attention(workload: Any) -> EagerAttention:
    try:
        share, report = probe_eager_attention(workload)
    except Exception as err:
        return EagerAttention(error=f"{type(err).__name__}: {err}")
    return EagerAttention(share=share, explain=report.to_dict(), explain_text=str(report))


def _summary(r: VariantResult) -> str:
    if not r.ok:
        return f"FAILED during {r.failed_during}: {r.error}"
    text = f"{r.latency.median_ms:.2f} ms/step"
    if r.compile_s is not None:
        text += f", compile {r.compile_s:.1f} s"
    if r.error_vs_eager is not None:
        text += f", rel err {r.error_vs_eager.rel_fro:.2e}"
    return text


def _methods(device: torch.device, plan: TimingPlan, compiler: str) -> dict[str, str]:
    clock = (
        "CUDA events around each loop"
        if device.type == "cuda"
        else "time.perf_counter around each loop"
    )
    return {
        "loop": (
            f"each variant runs a loop of {plan.steps} transformer call(s), call i inside "
            "fv_compile.forward_context(current_timestep=i), on the same inputs"
        ),
        "latency": (
            f"per step = loop time / {plan.steps}; {clock}; median, min and max over {plan.repeat} "
            f"timed loop(s) after {plan.warmup} untimed warm-up loop(s)"
        ),
        "speedup": "ratio of median per-step latencies (baseline / variant)",
        "compile": (
            "first loop's wall time minus the warm loop time (steps x median): Dynamo tracing, "
            f"the fv_compile pass and the {compiler} compile. Later variants may reuse kernels "
            "an earlier variant compiled (Inductor's caches), so their figure can be below a "
            "fresh process's"
        ),
        "graphs": (
            "Dynamo graphs captured (counters['stats']['unique_graphs']); recompiles are "
            "compiles Dynamo logged with a recompile reason; metadata variants are fv_compile "
            "graph variants compiled for distinct static metadata"
        ),
        "memory": (
            "torch.cuda.max_memory_allocated over the timed loops"
            if device.type == "cuda"
            else "n/a on CPU: the process allocator keeps no per-run peak"
        ),
        "error": (
            "each step's output of the first loop against eager's, in float64: "
            "max |out - ref|, ||out - ref||_F / ||ref||_F, cosine similarity; worst over the steps"
        ),
        "attention share": (
            "torch.profiler on one step; attention = the fv_compile::attention ops (each found "
            "site is exactly one). For fv_compile variants the variant's own compiled step is "
            "profiled. For eager, Dynamo captures the model and runs the graph op by op "
            "(compiler='eager') with every site as one TORCH_SDPA op. Plain torch.compile has "
            "no such boundary, so no share is given for it. "
            + (
                "On CUDA: GPU kernel time launched under the op / GPU kernel time launched "
                "during the step (host overhead and idle GPU time are not counted)."
                if device.type == "cuda"
                else "On CPU: the op's CPU time / the step's CPU time."
            )
        ),
    }


def _plain(value: Any) -> Any:
    """JSON-safe: tuples to lists, non-finite floats to None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
