"""The variants a report compares, and running one of them through the whole measurement.

A variant is eager, plain `torch.compile` of the whole model, diffusers' own regional compile
(`model.compile_repeated_blocks()`, where the model has one), or `fv_compile.compile` with one
attention backend or role policy, as a user gets it by default (`regional="auto"`). Each runs the
same denoising-style loop (`steps` calls, each inside its own `forward_context`, so metadata
backends see a real schedule), in the same order of phases: first pass (compiles, cold: an empty
Inductor cache; its outputs are compared with eager's), warm-up, timed repeats, one profiled
step, then a warm compile (the same compile again, from the caches the cold one wrote). A
variant that raises is kept, marked failed with the phase and the error, and the report goes on
with the next.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

import fv_compile
from fv_compile import ops
from fv_compile.backends.kernels.fa4_import import CACHE_ENABLED
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
    timing_outliers,
    wall_time,
)
from fv_compile.report.progress import Progress
from fv_compile.report.workload import Workload
from fv_compile.site import AttentionSite

EAGER = "eager"
TORCH_COMPILE = "torch.compile"
REPEATED_BLOCKS = "compile_repeated_blocks"  # diffusers' ModelMixin.compile_repeated_blocks()
FV_COMPILE = "fv_compile"

OK, RAN_DENSE, SERVED_NO_SITE, FAILED = "ok", "ran dense", "served no site", "failed"

BackendSpec = str | dict[str, str]


@dataclass(frozen=True)
class VariantSpec:
    kind: str  # EAGER | TORCH_COMPILE | REPEATED_BLOCKS | FV_COMPILE
    backend: BackendSpec | None = None
    accuracy_budget: float | None = None  # fv_compile.compile's, for an fv_compile variant

    @property
    def name(self) -> str:
        if self.kind != FV_COMPILE:
            return self.kind
        budget = "" if self.accuracy_budget is None else f", budget {self.accuracy_budget:g}"
        return f"fv_compile[{backend_label(self.backend)}{budget}]"


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
    # "ok"; "ran dense": measured, but a sparse backend's metadata made every step full attention
    # (`dense_reason` says why); "served no site": measured, but the backend the variant names
    # ran none of the sites, which all went to another (`unserved_reason` says why); "failed"
    # (`failed_during`, `error`)
    status: str = OK
    failed_during: str | None = None
    error: str | None = None
    traceback: str | None = None
    latency: LatencyStats | None = None
    speedup_vs_eager: float | None = None
    speedup_vs_torch_compile: float | None = None
    first_pass_s: float | None = None
    compile_s: float | None = None  # cold: the first compile, with an empty Inductor cache
    cold_cache: str | None = None  # what the cold compile started from
    # warm: the same compile again in this process, from the caches the cold one wrote
    warm_compile_s: float | None = None
    warm_cache_hits: dict[str, int] | None = None  # FX graph / AOTAutograd cache hits and misses
    warm_note: str | None = None  # why there is no warm figure, or what it hit
    timing_flag: str | None = None  # why the timing is noisy (measure.TIMING_RULE), or None
    dense_steps: list[int] | None = None  # steps a sparse backend ran as full attention
    dense_reason: str | None = None
    unserved_reason: str | None = None
    # what was compiled: "the repeated blocks in blocks", "the whole model"
    regional: str | None = None
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
        """Measured (not failed); a variant that ran dense is measured too."""
        return self.status != FAILED


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
        ran = compiled.explain().sites[0].backend
        assert ran is not None, "a strict compile gives its site a backend or raises"
        return ran
    finally:
        torch._dynamo.reset()


def build_variants(
    backends: list[BackendSpec],
    *,
    torch_compile: bool,
    repeated_blocks: bool = False,
    accuracy_budget: float | None = None,
) -> list[VariantSpec]:
    """eager, plain torch.compile (`torch_compile`), diffusers' `compile_repeated_blocks`
    (`repeated_blocks`: the model has it), then fv_compile per backend, and with an
    `accuracy_budget` fv_compile's `auto` tuned under it (beside exact `auto`, to compare)."""
    variants = [VariantSpec(EAGER)]
    if torch_compile:
        variants.append(VariantSpec(TORCH_COMPILE))
    if repeated_blocks:
        variants.append(VariantSpec(REPEATED_BLOCKS))
    variants += [VariantSpec(FV_COMPILE, b) for b in backends]
    if accuracy_budget is not None:
        variants.append(VariantSpec(FV_COMPILE, "auto", accuracy_budget))
    return variants


def has_repeated_blocks(model: torch.nn.Module) -> bool:
    """Whether `model` is a diffusers model with `compile_repeated_blocks` and blocks to compile."""
    names = getattr(model, "_repeated_blocks", None)
    if not names or not callable(getattr(model, "compile_repeated_blocks", None)):
        return False
    return any(type(m).__name__ in names for m in model.modules())


def run_variant(
    spec: VariantSpec,
    workload: Workload,
    plan: TimingPlan,
    *,
    compiler: str,
    reference: torch.Tensor | None,
    progress: Progress,
    regional: bool | str = "auto",
    warm_compile: bool = True,
) -> tuple[VariantResult, torch.Tensor | None]:
    """Measure one variant. Returns its result and its first step's output (eager's becomes the
    reference the other variants are compared with); never raises for a failing variant.

    Compiled variants run inside a fresh Inductor cache (an empty directory, in-memory caches
    cleared), so the first compile is cold whatever ran before; with `warm_compile` the variant
    is compiled once more from the caches that compile wrote (`measure_warm_compile`)."""
    result = VariantResult(spec.name, spec.kind, spec.backend)
    device = workload.device
    compiles = spec.kind != EAGER
    phase = "build"
    model: Any = None
    first_output = None
    _reset_compile_state()
    with fresh_inductor_cache(compiles and compiler == "inductor") as cold:
        try:
            result.cold_cache = cold if compiles else None
            ids = site_ids()
            model = _build(spec, workload.model, compiler, regional)
            result.regional = _what_compiled(spec, model, workload.model)

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
            if spec.kind == FV_COMPILE:
                sites = model.explain().rewritten
                used = sorted({s.backend for s in sites if s.backend})
                result.dense_steps, result.dense_reason = dense_steps(used, workload, plan.steps)
                if result.dense_steps is not None and len(result.dense_steps) == plan.steps:
                    result.status = RAN_DENSE
                result.unserved_reason = unserved_reason(spec.backend, sites)
                if result.unserved_reason is not None:
                    result.status = SERVED_NO_SITE

            phase = "warm-up"
            progress.phase(f"warm-up ({plan.warmup} x {plan.steps} steps)")
            for _ in range(plan.warmup):
                run_steps(model, workload, plan.steps)

            phase = "timing"
            progress.phase(f"timing ({plan.repeat} x {plan.steps} steps)")
            reset_peak_memory(device)
            samples = [
                device_time(lambda: run_steps(model, workload, plan.steps), device)
                / plan.steps
                * 1e3
                for _ in range(plan.repeat)
            ]
            result.latency = LatencyStats.of(samples)
            result.timing_flag = timing_outliers(result.latency)
            result.peak_memory_bytes = peak_memory(device)
            if compiles:
                warm_loop_s = plan.steps * result.latency.median_ms / 1e3
                result.compile_s = max(0.0, result.first_pass_s - warm_loop_s)

            if compiles:
                phase = "profile"
                progress.phase("profiling one step")
                result.attention = profile_attention(lambda: call_step(model, workload, 0), device)
                _record_compile_stats(result, spec, model)  # before the warm compile's and verify's
                _undo_in_place_compile(workload.model)
                model = None  # the compiled variant, forgotten
                _release(device)

                if warm_compile:
                    phase = "warm compile"
                    if compiler == "inductor" and inductor_caches_on():
                        progress.phase("compiling again, from the caches (warm)")
                    try:
                        measure_warm_compile(result, spec, workload, plan, compiler, regional, ids)
                    except Exception as err:  # the variant's numbers stand; say why there is none
                        result.warm_note = f"not measured: {type(err).__name__}: {err}".strip()
                else:
                    result.warm_note = "not measured (--skip-warm-compile)"

            if spec.kind == FV_COMPILE:
                phase = "verify"
                progress.phase("verifying every rewritten site")
                try:
                    result.verify = verify_step(workload, spec.backend)
                except Exception as err:  # the variant's numbers stand; say why it was not verified
                    result.verify = {"error": f"{type(err).__name__}: {err}".strip()}
        except Exception as err:
            result.status = FAILED
            result.failed_during = phase
            result.error = f"{type(err).__name__}: {err}".strip()
            result.traceback = traceback.format_exc()
            if model is not None:
                _record_compile_stats(result, spec, model)
        finally:
            _undo_in_place_compile(workload.model)
            model = None  # the compiled variant, forgotten before the next one compiles
            _release(device)
    return result, first_output


def measure_warm_compile(
    result: VariantResult,
    spec: VariantSpec,
    workload: Workload,
    plan: TimingPlan,
    compiler: str,
    regional: bool | str,
    ids: tuple[int, int] | None,
) -> None:
    """Compile the variant again in this process and time its first loop as the cold compile
    was timed: Dynamo's caches reset, Inductor's in-memory caches cleared, its on-disk caches (FX
    graph, AOTAutograd) as the cold compile left them. fv_compile's graphs name each site by a
    per-process id, so the site counter restarts where the cold compile's started: the graph is
    the one the cold compile cached, as in a new process. What a new process adds (importing
    torch, first-use initialisation) is not in this figure; hits and misses are recorded, so a
    compile the caches did not serve shows as such."""
    if compiler != "inductor":
        result.warm_note = f"n/a: compiler={compiler!r} keeps no compile cache (Inductor's only)"
        return
    if not inductor_caches_on():
        result.warm_note = (
            "n/a: Inductor's caches are disabled (TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 or "
            "fx_graph_cache=False)"
        )
        return
    if result.latency is None or result.first_pass_s is None:
        return
    _reset_compile_state()
    _clear_inductor_memory()
    model: Any = None
    try:
        with same_site_ids(ids):
            model = _build(spec, workload.model, compiler, regional)
            first = wall_time(lambda: run_steps(model, workload, plan.steps), workload.device)
        counters = torch._dynamo.utils.counters
        result.warm_cache_hits = {
            "fx_graph_hit": counters["inductor"]["fxgraph_cache_hit"],
            "fx_graph_miss": counters["inductor"]["fxgraph_cache_miss"],
            "aot_autograd_hit": counters["aot_autograd"]["autograd_cache_hit"],
            "aot_autograd_miss": counters["aot_autograd"]["autograd_cache_miss"],
        }
    finally:
        _undo_in_place_compile(workload.model)
        model = None
        _release(workload.device)
    result.warm_compile_s = max(0.0, first - plan.steps * result.latency.median_ms / 1e3)
    hits = result.warm_cache_hits
    served = hits["fx_graph_hit"] + hits["aot_autograd_hit"]
    missed = hits["fx_graph_miss"] + hits["aot_autograd_miss"]
    if served == 0:
        result.warm_note = (
            f"no cache hits ({missed} misses): this figure is a second cold compile, not a warm one"
        )
    else:
        result.warm_note = (
            f"FX graph cache {hits['fx_graph_hit']} hit(s) / {hits['fx_graph_miss']} miss(es), "
            f"AOTAutograd cache {hits['aot_autograd_hit']} / {hits['aot_autograd_miss']}"
        )


def inductor_caches_on() -> bool:
    config = torch._inductor.config
    return bool(getattr(config, "fx_graph_cache", True)) and not getattr(
        config, "force_disable_caches", False
    )


@contextlib.contextmanager
def fresh_inductor_cache(enabled: bool) -> Iterator[str | None]:
    """An empty Inductor cache directory (and in-memory caches cleared) for one variant: its first
    compile is cold whatever compiled before. Yields a description of it, or None."""
    if not enabled:
        yield None
        return
    from torch._inductor import utils

    fresh = getattr(utils, "fresh_cache", None) or utils.fresh_inductor_cache
    with fresh(), _flash_attn_kernels_in_memory():
        yield "an empty Inductor cache directory, in-memory caches cleared"


@contextlib.contextmanager
def _flash_attn_kernels_in_memory() -> Iterator[None]:
    """flash-attn-4 fixes its kernel cache directory when it is first imported, beside Inductor's
    (`fa4_import`). Imported inside a variant's throwaway cache directory, it would go on using
    that directory after it is deleted, and the next variant's first new kernel fails to open its
    lock file there. A first import while this is active keeps its kernels in memory instead: the
    variants of one report share them in-process, and none is read from an earlier run's disk."""
    if "flash_attn.cute" in sys.modules or CACHE_ENABLED in os.environ:
        yield
        return
    os.environ[CACHE_ENABLED] = "0"
    try:
        yield
    finally:
        os.environ.pop(CACHE_ENABLED, None)


def _clear_inductor_memory() -> None:
    from torch._inductor import utils

    clear = getattr(utils, "clear_caches", None) or getattr(utils, "clear_inductor_caches", None)
    if clear is not None:
        clear()


def site_ids() -> tuple[int, int] | None:
    """The next site and metadata-variant ids fv_compile's op registry will hand out (None if the
    registry keeps no such counters)."""
    try:
        out = []
        for name in ("_site_ids", "_variant_ids"):
            n = next(getattr(ops, name))
            setattr(ops, name, itertools.count(n))
            out.append(n)
    except (AttributeError, TypeError):
        return None
    return out[0], out[1]


@contextlib.contextmanager
def same_site_ids(start: tuple[int, int] | None) -> Iterator[None]:
    """Hand out ids from `start` again (the cold compile's, whose model is gone), then go on past
    every id handed out so far."""
    now = site_ids()
    if start is None or now is None:
        yield
        return
    ops._site_ids, ops._variant_ids = itertools.count(start[0]), itertools.count(start[1])
    try:
        yield
    finally:
        after = site_ids() or now
        ops._site_ids = itertools.count(max(now[0], after[0]))
        ops._variant_ids = itertools.count(max(now[1], after[1]))


def dense_steps(
    backends: list[str], workload: Workload, steps: int
) -> tuple[list[int] | None, str | None]:
    """Which steps of a `steps`-call loop ran full attention although sites run a sparse backend
    of `backends` (the ones the variant's sites use; a sparse one has per-step metadata, and
    metadata that says `dense` is a full-attention step), and why; (None, None) when every
    backend is dense. The builders are asked as the loop asks them (`call_step`)."""
    from fv_compile.backends.registry import get_backend

    sparse = [n for n in backends if needs_metadata(get_backend(n))]
    if not sparse:
        return None, None
    dense, mds = [], []
    for step in range(steps):
        built = [
            _builder(n)().build(
                current_timestep=step,
                forward_batch=workload.forward_batch(),
                fastvideo_args=workload.fastvideo_args(),
            )
            for n in sparse
        ]
        if all(getattr(md, "dense", False) for md in built):
            dense.append(step)
            mds.append(built[0])
    if not dense:
        return [], None
    return dense, _dense_reason(dense, mds, workload, steps, sparse)


def unserved_reason(spec: BackendSpec | None, sites: list[AttentionSite]) -> str | None:
    """Why no rewritten site runs a backend the variant names (`auto` names none), or None when
    one does. A variant named after a backend that served nothing measured another backend: its
    row must not read "ok" beside that name."""
    if spec is None:
        return None
    named = set(spec.values()) if isinstance(spec, dict) else {spec}
    named.discard(AUTO)
    if not named or any(s.backend in named for s in sites):
        return None
    backends = "/".join(sorted(named))
    if not sites:
        return f"{backends} ran no site: fv_compile rewrote none"
    reasons = list(dict.fromkeys(s.reason for s in sites if s.reason))
    ran = "/".join(sorted({s.backend or "?" for s in sites}))
    why = "; ".join(reasons) if reasons else "the policy chose another backend for every site"
    return f"{backends} ran none of the {len(sites)} site(s), {ran} ran them: {why}"


def _builder(name: str) -> Any:
    """The metadata builder class of backend `name`, one that has one (`needs_metadata`)."""
    from fv_compile.backends.registry import get_backend

    builder_cls = get_backend(name).get_builder_cls()
    assert builder_cls is not None, f"{name} has no metadata builder"
    return builder_cls


def _dense_reason(
    dense: list[int], mds: list[Any], workload: Workload, steps: int, names: list[str]
) -> str:
    from fv_compile.backends.tiles import tiles_per_axis

    args = workload.fastvideo_args()
    first_steps = int(getattr(args, "sta_dense_steps", 0) or 0)
    by_schedule = [s for s in dense if s < first_steps]
    by_window = [s for s in dense if s >= first_steps]
    parts = []
    if by_schedule:
        parts.append(
            f"step(s) {_steps(by_schedule)} are full attention by schedule (sta_dense_steps={first_steps})"
        )
    if by_window:
        md = mds[dense.index(by_window[0])]
        grid, tile = getattr(md, "grid", None), getattr(md, "tile", None)
        window = getattr(args, "sta_window", None)
        if grid and tile:
            tiles = tiles_per_axis(tuple(grid), tuple(tile))
            said = f"sta_window {tuple(window)}" if window is not None else "every window"
            parts.append(
                f"step(s) {_steps(by_window)}: {said} covers the whole grid of {tiles} tiles (token "
                f"grid {tuple(grid)} in tiles of {tuple(tile)}), so no tile is skipped; a window "
                f"smaller than {tiles} on some axis (--fastvideo-arg sta_window=...) or a larger "
                "video makes it sparse"
            )
        else:
            parts.append(f"step(s) {_steps(by_window)}: {'/'.join(names)}'s metadata says dense")
    return "; ".join(parts)


def _steps(steps: list[int]) -> str:
    return ",".join(str(s) for s in steps)


def probe_eager_attention(workload: Workload) -> tuple[AttentionShare, fv_compile.ExplainReport]:
    """Attention's share of an eager step.

    Dynamo captures the model and the graph runs op by op as in eager (compiler="eager"), except
    that each attention site found is one TORCH_SDPA op, which the profiler can then time as a
    whole, however the model spelled attention.
    """
    _reset_compile_state()
    try:
        # the whole model (regional=False): attention between blocks is attention too
        model = fv_compile.compile(workload.model, "TORCH_SDPA", compiler="eager", regional=False)
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
        # sites held to their sparse definition, and how far their outputs are from dense
        "against_definition": sum(c.against == "definition" for c in checks),
        "worst_vs_dense": max((c.traced.rel_l2 for c in checks if c.traced), default=None),
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
    spec: VariantSpec, model: torch.nn.Module, compiler: str, regional: bool | str
) -> Callable[..., Any]:
    if spec.kind == EAGER:
        return model
    if spec.kind == TORCH_COMPILE:  # what a user types: the whole model
        return torch.compile(model, backend=compiler, dynamic=False)
    if spec.kind == REPEATED_BLOCKS:  # diffusers' regional compile: in place, undone later
        compile_repeated_blocks: Any = model.compile_repeated_blocks  # diffusers' ModelMixin's
        compile_repeated_blocks(backend=compiler, dynamic=False)
        return model
    # what a user gets from fv_compile.compile(model, backend): regional="auto" unless asked
    assert spec.backend is not None, "an fv_compile variant names its backend"
    return fv_compile.compile(
        model,
        spec.backend,
        compiler=compiler,
        regional=regional,
        accuracy_budget=spec.accuracy_budget,
    )


def _undo_in_place_compile(model: torch.nn.Module) -> None:
    """Undo diffusers' in-place `compile_repeated_blocks`, if a variant ran it."""
    for m in model.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None


def _what_compiled(spec: VariantSpec, compiled: Any, model: torch.nn.Module) -> str | None:
    if spec.kind == TORCH_COMPILE:
        return "the whole model"
    if spec.kind == REPEATED_BLOCKS:
        names = sorted(
            {type(m).__name__ for m in model.modules() if m._compiled_call_impl is not None}
        )
        return f"each {'/'.join(names)} block (diffusers' compile_repeated_blocks)"
    if isinstance(compiled, fv_compile.CompiledModel):
        regions = list(compiled.regions)
        return f"the repeated blocks in {', '.join(regions)}" if regions else "the whole model"
    return None


def _reset_compile_state() -> None:
    """Each variant compiles from scratch and counts only its own graphs and recompiles."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch._dynamo.utils.clear_compilation_metrics()


def _record_compile_stats(result: VariantResult, spec: VariantSpec, model: Any) -> None:
    if spec.kind == EAGER or result.graphs is not None:
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
