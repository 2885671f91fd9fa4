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
from fv_compile.report.measure import TIMING_RULE, AttentionShare
from fv_compile.report.progress import Progress, make_progress
from fv_compile.report.variants import (
    EAGER,
    FV_COMPILE,
    TORCH_COMPILE,
    BackendSpec,
    TimingPlan,
    VariantResult,
    VariantSpec,
    build_variants,
    default_backends,
    has_repeated_blocks,
    probe_eager_attention,
    run_variant,
)
from fv_compile.report.workload import WorkloadSpec, resolve_device, resolve_dtype
from fv_compile.tuning import check_accuracy_budget


@dataclass
class ReportConfig(WorkloadSpec):
    """What to measure: a workload, and how. None for backends means `auto` plus the dense
    backends that run on this machine."""

    backends: list[BackendSpec] | None = None
    compiler: str = "inductor"
    steps: int = 2
    warmup: int = 2
    repeat: int = 10
    torch_compile: bool = True  # plain torch.compile, and diffusers' compile_repeated_blocks
    whole_model_compile: bool = True  # plain torch.compile of the whole model, of those two
    # fv_compile.compile's regional: "auto" (its default: the repeated blocks when they hold most
    # weights), True (blocks), False (the whole model)
    regional: bool | str = "auto"
    warm_compile: bool = True  # compile each variant a second time, from the caches
    # fv_compile's auto tuned under this budget, as one more variant (fv_compile.compile's
    # accuracy_budget: each site's backend chosen by measured error and time)
    accuracy_budget: float | None = None


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
    # on a CPU, why each fv_compile variant trails plain torch.compile (or does not), from the
    # measured numbers (`cpu_gap_analysis`)
    analysis: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[VariantResult]:
        return [r for r in self.variants if not r.ok]

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def run_report(
    config: ReportConfig, *, argv: list[str] | None = None, progress: Progress | None = None
) -> Report:
    """Measure every variant of `config` and return the report (nothing is written here).

    Raises ValueError (a WorkloadError) for a model or size that cannot be built; failures of a
    variant are recorded in its result instead.
    """
    started = time.perf_counter()
    check_accuracy_budget(
        config.accuracy_budget
    )  # a bad value is the caller's error, not a variant's
    device = resolve_device(config.device)
    # before anything runs, so the load average shows competition from other processes only
    environment = collect_environment(device, sys.argv if argv is None else argv)
    dtype = resolve_dtype(config.dtype, device)
    workload = config.build()
    backends = config.backends if config.backends is not None else default_backends(device, dtype)
    plan = TimingPlan(config.steps, config.warmup, config.repeat)
    specs = variant_specs(config, workload.model, backends)
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
                warm_compile=config.warm_compile,
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
        methods=_methods(device, plan, config),
        analysis=cpu_gap_analysis(results, config.compiler) if device.type == "cpu" else [],
    )


def variant_specs(
    config: ReportConfig, model: torch.nn.Module, backends: list[BackendSpec]
) -> list[VariantSpec]:
    """The variants `config` asks for on `model`, in the order they run."""
    return build_variants(
        backends,
        torch_compile=config.torch_compile and config.whole_model_compile,
        repeated_blocks=config.torch_compile and has_repeated_blocks(model),
        accuracy_budget=config.accuracy_budget,
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


def cpu_gap_analysis(results: list[VariantResult], compiler: str = "inductor") -> list[str]:
    """Per fv_compile variant, why it trails plain torch.compile on this CPU, or that it does not,
    from what was measured: the medians, and one profiled step of each (the code outside
    compiled graphs, the attention ops' time outside their kernels, which kernels ran)."""
    base = next((r for r in results if r.kind == TORCH_COMPILE and r.latency), None)
    if base is None or base.attention is None:
        return []
    out = []
    for r in results:
        if r.kind != FV_COMPILE or r.latency is None or r.attention is None:
            continue
        out.append(_gap_paragraph(r, base, compiler))
    return out


def _gap_paragraph(r: VariantResult, base: VariantResult, compiler: str) -> str:
    mine, theirs = r.attention, base.attention
    assert r.latency is not None and base.latency is not None, "cpu_gap_analysis passes timed ones"
    assert mine is not None and theirs is not None, "and profiled ones"
    ratio = base.latency.median_ms / r.latency.median_ms
    gap = r.latency.median_ms - base.latency.median_ms
    trails = round(ratio, 2) < 1
    verdict = "trails" if trails else "is on par with" if round(ratio, 2) == 1 else "does not trail"
    head = (
        f"**{r.name} {verdict} plain torch.compile: {ratio:.2f}x** ({gap:+.2f} ms per step; "
        f"medians {r.latency.median_ms:.2f} vs {base.latency.median_ms:.2f} ms)."
    )
    if r.timing_flag or base.timing_flag:
        head += " The timing of one of them is flagged as noisy: rerun before trusting the sign."
    parts = [
        head,
        f"In one profiled step of each (step {mine.step_ms:.2f} vs {theirs.step_ms:.2f} ms):",
    ]
    eager_gap = None
    if mine.eager_ms is not None and theirs.eager_ms is not None:
        eager_gap = mine.eager_ms - theirs.eager_ms
        where = (
            "the code between its compiled blocks runs eagerly"
            if r.regional and "blocks" in r.regional
            else "graph breaks, Dynamo's guards"
        )
        parts.append(
            f"code outside compiled graphs ran {mine.eager_ms:.2f} ms in {r.name} ({where}) "
            f"against {theirs.eager_ms:.2f} ms in torch.compile ({eager_gap:+.2f} ms);"
        )
    overhead = mine.overhead_ms
    if mine.calls and overhead is not None:
        kernels = ", ".join(f"{name} x{n}" for name, n in sorted(mine.kernels.items())) or "none"
        parts.append(
            f"its {mine.calls} fv_compile::attention op(s) took {mine.attention_ms:.2f} ms, "
            f"{mine.kernel_ms:.2f} ms of it in their kernels ({kernels}) and {overhead:.2f} ms "
            f"around them ({1e3 * overhead / mine.calls:.0f} us per op: the custom op's dispatch, "
            "metadata and layout copies)."
        )
        math_calls = sum(n for name, n in mine.kernels.items() if "math" in name)
        if math_calls:
            parts.append(
                f"{math_calls} of the ops ran SDPA's math path (no fused CPU kernel for that "
                "mask, dtype or layout): unfused matmul-softmax-matmul."
            )
    elif mine.calls:
        parts.append(
            f"its {mine.calls} fv_compile::attention op(s) took {mine.attention_ms:.2f} ms (their "
            "backend's kernel is not an ATen op, so its overhead is not separated)."
        )
    if trails:
        causes = []
        if eager_gap is not None:
            causes.append((eager_gap, "the eager code outside compiled graphs"))
        if overhead is not None and mine.calls:
            causes.append((overhead, "the attention ops' overhead around their kernels"))
        if causes:
            size, what = max(causes)
            profiled_gap = mine.step_ms - theirs.step_ms
            if size > 0 and profiled_gap > 0 and size >= 0.5 * profiled_gap:
                parts.append(
                    f"The largest measured cause is {what} ({size:.2f} of the {profiled_gap:.2f} "
                    "ms the profiled steps differ by)"
                    + (
                        "; --regional off (fv_compile.compile(..., regional=False)) compiles it "
                        "too, at a longer compile."
                        if what.startswith("the eager") and r.regional and "blocks" in r.regional
                        else "."
                    )
                )
            else:
                parts.append(
                    "Neither accounts for most of the difference: the rest is inside the compiled "
                    "graphs"
                    + (
                        " (Inductor fuses across an attention it inlines, not across the "
                        "fv_compile::attention op)."
                        if compiler == "inductor"
                        else "."
                    )
                )
    return " ".join(parts)


def _summary(r: VariantResult) -> str:
    if not r.ok:
        return f"FAILED during {r.failed_during}: {r.error}"
    assert r.latency is not None, "a variant that did not fail was timed"
    text = f"{r.latency.median_ms:.2f} ms/step"
    if r.status != "ok":
        text += f" ({r.status})"
    if r.compile_s is not None:
        text += f", compile {r.compile_s:.1f} s cold"
    if r.warm_compile_s is not None:
        text += f" / {r.warm_compile_s:.1f} s warm"
    if r.error_vs_eager is not None:
        text += f", rel err {r.error_vs_eager.rel_fro:.2e}"
    return text


def _methods(device: torch.device, plan: TimingPlan, config: ReportConfig) -> dict[str, str]:
    compiler = config.compiler
    clock = (
        "CUDA events around each loop"
        if device.type == "cuda"
        else "time.perf_counter around each loop"
    )
    regional = {
        "auto": "regional='auto' (its default)",
        True: "regional=True",
        False: "regional=False",
    }
    methods = {
        "loop": (
            f"each variant runs a loop of {plan.steps} transformer call(s), call i inside "
            "fv_compile.forward_context(current_timestep=i), on the same inputs"
        ),
        "variants": (
            "torch.compile is torch.compile(model) of the whole model; compile_repeated_blocks "
            "(diffusers models that have it) is model.compile_repeated_blocks(), diffusers' "
            "regional compile; fv_compile[...] is fv_compile.compile(model, backend) as a user "
            f"gets it, {regional.get(config.regional, repr(config.regional))}: the repeated "
            "blocks compiled once when they hold most of the weights, else the whole model (the "
            "variant's 'compiled' cell says which). All with "
            f"backend/compiler={compiler!r}, dynamic=False"
        ),
        "latency": (
            f"per step = loop time / {plan.steps}; {clock}; median, min and max over {plan.repeat} "
            f"timed loop(s) after {plan.warmup} untimed warm-up loop(s)"
        ),
        "timing outliers": TIMING_RULE,
        "speedup": "ratio of median per-step latencies (baseline / variant)",
        "compile": (
            "cold: the first loop's wall time minus the warm loop time (steps x median): Dynamo "
            f"tracing, the fv_compile pass and the {compiler} compile, each variant starting from "
            "an empty Inductor cache directory with Inductor's in-memory caches cleared (so no "
            "variant reuses another's kernels; one-time process start-up such as importing torch "
            "is not in it). warm: the same variant compiled again in this process and timed the "
            "same way, after torch._dynamo.reset() and clearing Inductor's in-memory caches, from "
            "the on-disk FX graph and AOTAutograd caches the cold compile wrote (the hits are "
            "recorded per variant): a warm start, less what a new process adds (imports, "
            "first-use initialisation). n/a for compilers other than inductor and when Inductor's "
            "caches are disabled"
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
        "ran dense": (
            "a variant whose sites run a sparse backend is checked step by step: its metadata "
            "builder is asked for each step of the loop, and a step whose metadata says dense "
            "(STA: sta_dense_steps, or a window that covers the whole tile grid) ran full "
            "attention; when every step did, the status is 'ran dense', not 'ok'"
        ),
        "verified": (
            "fv_compile.verify of one step (timestep 0): every rewritten site's replacement run "
            "on the inputs the model gave the site, against the site's traced code; a sparse "
            "site (STA, VSA) is held to its backend's definition on those inputs instead (float32, "
            "from token coordinates), its distance from dense attention shown beside it; ok = "
            "relative L2 within the dtype's tolerance and NaN where the reference has NaN"
        ),
        "served no site": (
            "a variant named after a backend is checked site by site: when that backend runs "
            "none of the rewritten sites (each fell back, with the reason explain gives), the "
            "status is 'served no site', not 'ok'"
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
    if config.accuracy_budget is not None:
        methods["accuracy budget"] = (
            f"fv_compile[auto, budget {config.accuracy_budget:g}] is fv_compile.compile(model, "
            f"accuracy_budget={config.accuracy_budget:g}): on its first call every site left to "
            "auto runs on auto's exact default while each candidate backend is run on the "
            "site's inputs, its relative L2 error against float32 attention measured and its "
            "time taken; the graph is then compiled with the fastest candidate within the budget "
            "per site (its sites' table lists every candidate). The measurement is in its cold "
            "compile figure. The first call of each graph computes with the exact default (a "
            "regional compile's: the first block of step 0), every later one with the chosen "
            "backends; the error column is the worst step. Its warm compile reads the decisions "
            "the cold one cached, next to Inductor's caches"
        )
    return methods


def _plain(value: Any) -> Any:
    """JSON-safe: tuples to lists, non-finite floats to None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
