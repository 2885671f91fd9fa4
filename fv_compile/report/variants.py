"""The variants a report compares, and running one of them through the whole measurement.

A variant is eager, plain `torch.compile`, or `fv_compile.compile` with one attention backend or
role policy. Each runs the same denoising-style loop (`steps` calls, each inside its own
`forward_context`, so metadata backends see a real schedule), in the same order of phases:
first pass (compiles; its outputs are compared with eager's), warm-up, timed repeats, one
profiled step. A variant that raises is kept, marked failed with the phase and the error, and the
report goes on with the next.
"""

from __future__ import annotations

import functools
import gc
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

import fv_compile
from fv_compile.regional import compile_blocks
from fv_compile.backends.registry import needs_metadata
from fv_compile.errors import FvCompileError
from fv_compile.policy import AUTO, ROLES
from fv_compile.report.measure import (
    AttentionShare,
    LatencyStats,
    OutputError,
    device_time,
    first_tensor,
    output_error,
    peak_memory,
    profile_attention,
    reset_peak_memory,
    wall_time,
)
from fv_compile.report.progress import Progress
from fv_compile.report.workload import Workload

EAGER = "eager"
TORCH_COMPILE = "torch.compile"
FV_COMPILE = "fv_compile"

BackendSpec = str | dict[str, str]


@dataclass(frozen=True)
class VariantSpec:
    kind: str  # EAGER | TORCH_COMPILE | FV_COMPILE
    backend: BackendSpec | None = None

    @property
    def name(self) -> str:
        if self.kind != FV_COMPILE:
            return self.kind
        return f"fv_compile[{backend_label(self.backend)}]"


@dataclass(frozen=True)
class TimingPlan:
    """steps: calls per denoising loop; warmup: untimed loops; repeat: timed loops."""

    steps: int
    warmup: int
    repeat: int


@dataclass
class VariantResult:
    """Everything measured for one variant; None where a number does not apply or was not
    reached."""

    name: str
    kind: str
    backend: BackendSpec | None
    status: str = "ok"
    failed_during: str | None = None
    error: str | None = None
    traceback: str | None = None
    latency: LatencyStats | None = None
    speedup_vs_eager: float | None = None
    speedup_vs_torch_compile: float | None = None
    first_pass_s: float | None = None
    compile_s: float | None = None
    graphs: int | None = None
    graph_breaks: int | None = None
    recompiles: int | None = None
    recompile_reasons: list[str] = field(default_factory=list)
    metadata_variants: int | None = None
    fx_graph_cache_hits: int | None = None
    peak_memory_bytes: int | None = None
    error_vs_eager: OutputError | None = None
    attention: AttentionShare | None = None
    explain: dict[str, Any] | None = None
    explain_text: str | None = None
    # fv_compile.verify on one step: per rewritten site, its output (and NaN pattern) checked
    # against the traced code on the same inputs
    verify: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def backend_label(spec: BackendSpec | None) -> str:
    if isinstance(spec, dict):
        return ",".join(f"{role}={name}" for role, name in spec.items())
    return str(spec)


def parse_backends(text: str) -> list[BackendSpec]:
    """Parse `--backends`.

    Comma-separated names are one variant each (`auto,TORCH_SDPA`); `role=NAME` items of one
    `;`-separated group form one policy variant (`self=SLIDING_TILE_ATTN,cross=TORCH_SDPA`), so
    `auto,self=A,cross=B;self=C` is three variants. Names are checked against the registry here,
    so a typo fails before anything compiles.
    """
    specs: list[BackendSpec] = []
    for group in text.split(";"):
        policy: dict[str, str] = {}
        for item in (part.strip() for part in group.split(",")):
            if not item:
                continue
            if "=" not in item:
                specs.append(_backend_name(item))
                continue
            role, _, name = (s.strip() for s in item.partition("="))
            role = role.lower()
            if role not in ROLES:
                raise ValueError(f"unknown role {role!r} in {item!r}; roles are {', '.join(ROLES)}")
            if role in policy:
                raise ValueError(
                    f"role {role!r} is given twice in {group.strip()!r}; separate policies with ';'"
                )
            policy[role] = _backend_name(name)
        if policy:
            specs.append(policy)
    if not specs:
        raise ValueError("--backends names no backend; e.g. --backends auto,TORCH_SDPA")
    unique: list[BackendSpec] = []
    for spec in specs:
        if spec not in unique:
            unique.append(spec)
    return unique


def _backend_name(name: str) -> str:
    if name.lower() == AUTO:
        return AUTO
    try:
        fv_compile.get_backend(name)
    except FvCompileError as err:
        raise ValueError(str(err)) from None
    return name.upper()


def default_backends(device: torch.device, dtype: torch.dtype) -> list[BackendSpec]:
    """`auto`, plus every registered dense backend (one without a metadata builder) that runs an
    attention call on this device and dtype, except the one `auto` already picks there."""
    specs: list[BackendSpec] = [AUTO]
    try:
        picked_by_auto = _probe_backend(AUTO, device, dtype)
    except Exception:
        picked_by_auto = None
    for name in fv_compile.available_backends():
        if name == picked_by_auto or needs_metadata(fv_compile.get_backend(name)):
            continue
        try:
            _probe_backend(name, device, dtype)
        except Exception:
            continue
        specs.append(name)
    return specs


class _ProbeAttention(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)


def _probe_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """Run one small attention call through `name` (strict: no fallback); return the backend that
    ran it. Raises if the backend cannot run on this device."""
    torch._dynamo.reset()
    try:
        q, k, v = (torch.randn(1, 2, 64, 64, device=device, dtype=dtype) for _ in range(3))
        compiled = fv_compile.compile(_ProbeAttention(), name, compiler="eager", strict=True)
        with torch.no_grad(), fv_compile.forward_context():
            compiled(q, k, v)
        return compiled.explain().sites[0].backend
    finally:
        torch._dynamo.reset()


def build_variants(backends: list[BackendSpec], *, torch_compile: bool) -> list[VariantSpec]:
    variants = [VariantSpec(EAGER)]
    if torch_compile:
        variants.append(VariantSpec(TORCH_COMPILE))
    variants += [VariantSpec(FV_COMPILE, b) for b in backends]
    return variants


def run_variant(
    spec: VariantSpec,
    workload: Workload,
    plan: TimingPlan,
    *,
    compiler: str,
    reference: torch.Tensor | None,
    progress: Progress,
    regional: bool = False,
) -> tuple[VariantResult, torch.Tensor | None]:
    """Measure one variant. Returns its result and its first step's output (eager's becomes the
    reference the other variants are compared with); never raises for a failing variant."""
    result = VariantResult(spec.name, spec.kind, spec.backend)
    device = workload.device
    phase = "build"
    model: Any = None
    first_output = None
    recorded = False
    _reset_compile_state()
    try:
        model = _build(spec, workload.model, compiler, regional)
        compiles = spec.kind != EAGER

        phase = "first pass"
        progress.phase("first call, compiling" if compiles else "first call")
        outputs: list[torch.Tensor] = []
        result.first_pass_s = wall_time(
            lambda: outputs.extend(run_steps(model, workload, plan.steps, keep=True)), device
        )
        first_output = outputs[0]

        phase = "accuracy"
        if reference is not None:
            errors = [output_error(out, reference) for out in outputs]
            result.error_vs_eager = functools.reduce(OutputError.worst, errors)

        phase = "warm-up"
        progress.phase(f"warm-up ({plan.warmup} x {plan.steps} steps)")
        for _ in range(plan.warmup):
            run_steps(model, workload, plan.steps)

        phase = "timing"
        progress.phase(f"timing ({plan.repeat} x {plan.steps} steps)")
        reset_peak_memory(device)
        samples = [
            device_time(lambda: run_steps(model, workload, plan.steps), device) / plan.steps * 1e3
            for _ in range(plan.repeat)
        ]
        result.latency = LatencyStats.of(samples)
        result.peak_memory_bytes = peak_memory(device)
        if compiles:
            warm_loop_s = plan.steps * result.latency.median_ms / 1e3
            result.compile_s = max(0.0, result.first_pass_s - warm_loop_s)

        if spec.kind == FV_COMPILE:
            phase = "profile"
            progress.phase("profiling one step")
            result.attention = profile_attention(lambda: call_step(model, workload, 0), device)
            _record_compile_stats(result, spec, model)  # before verify's own trace counts
            recorded = True
            model = None  # free the compiled graphs before the verify trace
            _release(device)
            phase = "verify"
            progress.phase("verifying every rewritten site")
            try:
                result.verify = verify_step(workload, spec.backend)
            except Exception as err:  # the variant's numbers stand; say why it was not verified
                result.verify = {"error": f"{type(err).__name__}: {err}".strip()}
    except Exception as err:
        result.status = "failed"
        result.failed_during = phase
        result.error = f"{type(err).__name__}: {err}".strip()
        result.traceback = traceback.format_exc()
    finally:
        if not recorded:
            _record_compile_stats(result, spec, model)
        model = None  # drop the compiled model before the next variant compiles
        _release(device)
    return result, first_output


def probe_eager_attention(workload: Workload) -> tuple[AttentionShare, fv_compile.ExplainReport]:
    """Attention's share of an eager step.

    Dynamo captures the model and the graph runs op by op as in eager (compiler="eager"), except
    that each attention site found is one TORCH_SDPA op, which the profiler can then time as a
    whole, however the model spelled attention.
    """
    _reset_compile_state()
    try:
        model = fv_compile.compile(workload.model, "TORCH_SDPA", compiler="eager")
        call_step(model, workload, 0)
        share = profile_attention(lambda: call_step(model, workload, 0), workload.device)
        return share, model.explain()
    finally:
        _release(workload.device)


def verify_step(workload: Workload, backend: BackendSpec | None) -> dict[str, Any]:
    """`fv_compile.verify` of one step (timestep 0) with `backend`: the summary the report shows."""
    with (
        fv_compile.forward_context(
            current_timestep=0,
            forward_batch=workload.forward_batch(),
            fastvideo_args=workload.fastvideo_args(),
        ),
    ):
        report = fv_compile.verify(
            workload.model, *workload.args, attention_backend=backend or AUTO, **workload.kwargs
        )
    checks = [s.check for s in report.rewritten if s.check is not None]
    return {
        "verified": report.verified,
        "sites": len(checks),
        "failed": sum(not c.ok for c in checks),
        "worst_rel_l2": max((c.output.rel_l2 for c in checks), default=None),
        "nan_mismatch": sum(not c.output.nan_match for c in checks),
        "rows": [
            {"site": s.module_path or s.node, "backend": s.backend, **s.check.to_dict()}
            for s in report.rewritten
            if s.check is not None
        ],
    }


def call_step(model: Callable[..., Any], workload: Workload, step: int) -> Any:
    """One transformer call as step `step` of a denoising loop."""
    with (
        torch.no_grad(),
        fv_compile.forward_context(
            current_timestep=step,
            forward_batch=workload.forward_batch(),
            fastvideo_args=workload.fastvideo_args(),
        ),
    ):
        return model(*workload.args, **workload.kwargs)


def run_steps(
    model: Callable[..., Any], workload: Workload, steps: int, *, keep: bool = False
) -> list[torch.Tensor]:
    """`steps` calls with timesteps 0..steps-1; `keep` returns copies of the outputs (a compiled
    model may reuse its output buffers on the next call)."""
    kept = []
    for step in range(steps):
        out = call_step(model, workload, step)
        if keep:
            kept.append(first_tensor(out).detach().clone())
    return kept


def _build(
    spec: VariantSpec, model: torch.nn.Module, compiler: str, regional: bool
) -> Callable[..., Any]:
    if spec.kind == EAGER:
        return model
    if spec.kind == TORCH_COMPILE:
        if regional:  # like for like with fv_compile's regional mode: the same blocks compiled
            return compile_blocks(model, lambda b: torch.compile(b, backend=compiler, dynamic=False))[0]
        return torch.compile(model, backend=compiler, dynamic=False)
    return fv_compile.compile(model, spec.backend, compiler=compiler, regional=regional)


def _reset_compile_state() -> None:
    """Each variant compiles from scratch and counts only its own graphs and recompiles."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch._dynamo.utils.clear_compilation_metrics()


def _record_compile_stats(result: VariantResult, spec: VariantSpec, model: Any) -> None:
    if spec.kind == EAGER:
        return
    counters = torch._dynamo.utils.counters
    result.graphs = counters["stats"]["unique_graphs"]
    result.graph_breaks = sum(counters["graph_break"].values())
    result.fx_graph_cache_hits = counters["inductor"]["fxgraph_cache_hit"]
    reasons = [
        m.recompile_reason
        for m in torch._dynamo.utils.get_compilation_metrics()
        if m.recompile_reason
    ]
    result.recompiles = len(reasons)
    result.recompile_reasons = reasons
    if isinstance(model, fv_compile.CompiledModel):
        report = model.explain()
        result.explain = report.to_dict()
        result.explain_text = str(report)
        result.metadata_variants = model.variants_compiled


def _release(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
