"""`auto` under an accuracy budget: each site's backend chosen by measurement on the site itself.

`fv_compile.compile(model, accuracy_budget=0.02)` lets `auto` run a site on an approximate
backend (SAGE_ATTN's 8-bit attention, or a registered backend declaring `approximate`) where
that is faster and the site's output stays within the budget: relative L2 error against a
float32 reference of the same site on the same inputs. An error bound that holds on a kernel
benchmark need not hold on a model's activations (outlier channels in K break naive 8-bit
attention on video models), so the error is measured on the inputs the model gives each site,
never assumed.

How it runs, per compiled graph (`api.FvCompileBackend`): the graph is lowered with the cached
decisions (`TuningCache`), and where a site has none, with `auto`'s exact default for it. Its
first call runs that lowered graph op by op (`MeasuringInterpreter`): each undecided site's op
computes its output on the default backend, as `auto` always did, and on the same inputs every
candidate is run, compared with the float32 reference and timed. Then the graph is lowered
once more with every site's choice and compiled, and every later call runs the compiled graph:
one re-lowering per graph, never per call, and the same backend at every step of a loop. A
process whose cache answers every site lowers and compiles once, measuring nothing.

What qualifies: `auto`'s exact default always does; another backend whose output is dense
attention (it declares `differentiable` and not `approximate`) is not held to the budget, only
to what `verify` checks of any rewrite (the NaN/inf pattern, the dtype's rounding tolerance); an
approximate one when its error is within the budget and its NaN/inf pattern is the reference's.
The fastest qualifying candidate wins. Under grad mode only differentiable backends are
candidates (the approximate ones are forward only). Sites the user routed to a named backend are
not tuned.

Regionally compiled, a block's sites are measured on the first block's inputs, and the choice
serves every block of the list (they share one graph).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata as importlib_metadata
from typing import Any

import torch
from torch.fx import GraphModule, Interpreter

from fv_compile import ops
from fv_compile.backends import registry
from fv_compile.backends.abstract import AttentionBackend, capabilities, unsupported_reason
from fv_compile.cache import source_key
from fv_compile.errors import FvCompileError
from fv_compile.lowering import construct_impl
from fv_compile.policy import SitePolicy, dense_default
from fv_compile.site import AttentionSite
from fv_compile.verify import compare, tolerance

# bump when the entry format or the decision rule changes: older entries are then misses
CACHE_FORMAT = 1
_REFERENCE = "TORCH_SDPA"  # runs every site; in float32 it is the reference
# distributions whose versions change what a candidate computes or how fast
_PACKAGES = ("torch", "triton", "flash-attn", "flash-attn-4")


def check_accuracy_budget(budget: Any) -> float | None:
    """The budget as a float (None: no tuning), or the error for a value that is not one."""
    if budget is None:
        return None
    ok = isinstance(budget, (int, float)) and not isinstance(budget, bool)
    if not ok or not math.isfinite(budget) or not 0 <= budget <= 1:
        raise FvCompileError(
            "accuracy_budget must be None or a relative L2 error in [0, 1] (0.02: a site's "
            f"output may differ from float32 attention by 2%), got {budget!r}"
        )
    return float(budget)


@dataclass
class CandidateResult:
    """One backend run at one site: its error against the float32 reference and its time."""

    backend: str
    exact: bool  # dense attention by declaration: not held to the budget, only to `verify`'s check
    rel_l2: float
    nan_match: bool
    time_s: float
    qualifies: bool
    error: str = ""  # what it raised, when it could not run the site

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SiteTuning:
    """The backends measured at a site under the budget, and the one that runs it."""

    budget: float
    choice: str
    candidates: list[CandidateResult] = field(default_factory=list)
    # "measured" (this process), "cache" (an earlier one), "only" (one candidate), "unmeasured"
    source: str = "measured"
    note: str = ""  # why a site could not be measured

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "choice": self.choice,
            "source": self.source,
            "note": self.note,
            "candidates": [c.to_dict() for c in self.candidates],
        }

    def cell(self) -> str:
        """The explain table's cell: the choice, its error and time."""
        won = next((c for c in self.candidates if c.backend == self.choice), None)
        if self.source == "unmeasured":
            return f"{self.choice} (unmeasured)"
        if won is None or self.source == "only":
            return f"{self.choice} (only candidate)"
        return f"{self.choice} {_ms(won.time_s)} err {won.rel_l2:.1e} ({self.source})"

    def describe(self) -> list[str]:
        """One line per candidate, for explain's section under the table."""
        lines = [self.note] if self.note else []
        for i, c in enumerate(self.candidates):
            kind = "default" if i == 0 else "exact" if c.exact else "approximate"
            if c.error:
                verdict = f"failed: {c.error}"
            elif c.qualifies:
                verdict = "within budget" if not c.exact else "qualifies (exact)"
            elif not c.nan_match:
                verdict = "NaN/inf pattern differs from the reference"
            elif c.exact:
                verdict = "error above the dtype's rounding: not exact at this site"
            else:
                verdict = f"over budget {self.budget:g}"
            mark = "  <- chosen" if c.backend == self.choice else ""
            lines.append(
                f"{c.backend:<14} {kind:<11} err {c.rel_l2:.2e}  time {_ms(c.time_s):>10}  "
                f"{verdict}{mark}"
            )
        return lines


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if math.isfinite(seconds) else "-"


def pick(results: list[CandidateResult]) -> CandidateResult | None:
    """The fastest qualifying candidate (the earlier one on a tie: the default comes first)."""
    qualified = [r for r in results if r.qualifies]
    if not qualified:
        return None
    return min(qualified, key=lambda r: (r.time_s, results.index(r)))


def _qualifies(
    *,
    default: bool,
    exact: bool,
    rel_l2: float,
    nan_match: bool,
    limits: tuple[float, float],
    error: str,
) -> bool:
    """`limits`: (the budget, what `verify` lets a rewrite of the site's dtype show).

    `auto`'s default always qualifies: it is what runs the site without a budget. Another exact
    backend is not held to the budget (a budget below the dtype's rounding would leave nothing
    but the default), but to what `verify` checks of every rewrite, the NaN/inf pattern and
    the dtype's tolerance: a kernel that computes something else must not win by being fast.
    An approximate backend must keep the NaN/inf pattern and stay within the budget."""
    if default:
        return True
    if error or not nan_match or not math.isfinite(rel_l2):
        return False
    budget, rounding = limits
    return rel_l2 <= (max(budget, rounding) if exact else budget)


def candidates(site: AttentionSite, *, grad: bool) -> list[str]:
    """The backends that may run `site` under a budget, `auto`'s exact default first: those
    without per-step metadata or a token order of their own (they replace dense attention one
    call for one call), whose output is dense attention or declared an approximation of it,
    differentiable when the graph runs under grad, and whose declarations accept the site."""
    default = dense_default(site)
    names = [default]
    for name in registry.available_backends():
        if name == default:
            continue
        cls = registry.get_backend(name)
        caps = capabilities(cls)
        if registry.needs_metadata(cls) or caps.token_permutation is not None:
            continue
        if not (caps.differentiable or caps.approximate) or (grad and not caps.differentiable):
            continue
        if unsupported_reason(cls, site) is None:
            names.append(name)
    return names


def _exact(cls: type[AttentionBackend]) -> bool:
    caps = capabilities(cls)
    return caps.differentiable and not caps.approximate


@functools.cache
def _file_digest(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]
    except OSError:
        return "?"


def backend_version(cls: type) -> str:
    """What identifies the code of a backend: its class, its declared `version` if any, and a
    hash of its module's source (a user backend edited between two runs is a miss)."""
    parts = [f"{cls.__module__}.{cls.__qualname__}"]
    declared = getattr(cls, "version", None)
    if declared is not None:
        parts.append(str(declared))
    path = getattr(sys.modules.get(cls.__module__), "__file__", None)
    if path:
        parts.append(_file_digest(path))
    return ":".join(parts)


@functools.cache
def _package_version(name: str) -> str | None:
    try:
        return importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        return None


def device_name(device: str) -> str:
    """The device's model, as timings depend on it (`NVIDIA H200`, the CPU's model)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        major, minor = torch.cuda.get_device_capability(index)
        return f"{torch.cuda.get_device_name(index)} sm{major}{minor}"
    return f"{device.split(':')[0]} {platform.machine()} {platform.processor()}".strip()


def tuning_key(
    site: AttentionSite, names: list[str], budget: float, *, grad: bool, model: str
) -> dict[str, Any]:
    """Everything a decision depends on: the device, the versions of torch, Triton, the
    attention packages, fv_compile and every candidate, the site (shape, dtype, mask, causal,
    scale; and the model and the site's path, so that a decision made on one model's
    activations is not handed to another's), the budget and the grad mode."""
    key = {
        "format": CACHE_FORMAT,
        "device": device_name(site.device),
        "packages": {p: _package_version(p) for p in _PACKAGES},
        "fv_compile": source_key(),
        "interpreter": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "backends": {n: backend_version(registry.get_backend(n)) for n in names},
        "model": model,
        "site": site.module_path or site.node,
        "shape": [
            site.batch,
            site.q_len,
            site.heads,
            site.head_dim,
            site.kv_len,
            site.kv_heads,
            site.value_head_dim,
        ],
        "dtype": site.dtype,
        "mask": site.mask_kind,
        "fill": None if site.padding_fill is None else repr(site.padding_fill),
        "causal": site.causal,
        "role": site.role,
        "scale": site.scale,
        "budget": budget,
        "grad": grad,
    }
    return json.loads(json.dumps(key, sort_keys=True))  # as it reads back from disk


class TuningCache:
    """Decisions on disk, one JSON file per key, under Inductor's cache root (where fv_compile's
    other compile artefacts live): `<cache_dir>/fv_compile_tuning/`. An entry is used only when
    it reads back whole, names the same key, lists exactly the current candidates, and its
    stored numbers give the stored choice under today's rule; anything else is a miss and is
    overwritten by the next measurement."""

    def __init__(self, root: str | None = None) -> None:
        self._root = root
        self.rejected = 0  # entries found but not trusted (corrupt or stale)

    @property
    def root(self) -> str:
        if self._root is not None:
            return self._root
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        return os.path.join(cache_dir(), "fv_compile_tuning")

    def path(self, key: dict[str, Any]) -> str:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return os.path.join(self.root, f"{digest}.json")

    def load(self, key: dict[str, Any], names: list[str], budget: float) -> SiteTuning | None:
        path = self.path(key)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            self.rejected += 1
            return None
        try:
            tuning = _parse_entry(data, key, names, budget)
        except (KeyError, TypeError, ValueError, AttributeError):
            tuning = None
        if tuning is None:
            self.rejected += 1
        return tuning

    def store(self, key: dict[str, Any], tuning: SiteTuning) -> None:
        entry: dict[str, Any] = {"key": key, "choice": tuning.choice}
        entry["candidates"] = [c.to_dict() for c in tuning.candidates]
        path = self.path(key)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(entry, f, indent=1, sort_keys=True)
            os.replace(tmp, path)  # readers see the old entry or the new one, never half
        except OSError as e:
            warnings.warn(
                f"fv_compile: could not write the tuning cache ({e}); the next process measures "
                "again",
                UserWarning,
                stacklevel=2,
            )


def _parse_entry(
    data: Any, key: dict[str, Any], names: list[str], budget: float
) -> SiteTuning | None:
    if not isinstance(data, dict) or data.get("key") != key:
        return None
    rows = data["candidates"]
    if not isinstance(rows, list) or [r["backend"] for r in rows] != names:
        return None
    limits = (budget, tolerance(getattr(torch, key["dtype"])))
    results = []
    for i, r in enumerate(rows):
        rel, t = float(r["rel_l2"]), float(r["time_s"])
        nan_match, error = r["nan_match"], r.get("error", "")
        if not isinstance(nan_match, bool) or not isinstance(error, str) or not t >= 0:
            return None
        exact = _exact(registry.get_backend(r["backend"]))  # today's declaration, not the file's
        ok = _qualifies(
            default=i == 0, exact=exact, rel_l2=rel, nan_match=nan_match, limits=limits, error=error
        )
        results.append(CandidateResult(r["backend"], exact, rel, nan_match, t, ok, error))
    won = pick(results)
    if won is None or won.backend != data["choice"]:
        return None
    return SiteTuning(budget, won.backend, results, source="cache")


Timer = Callable[..., float]


def time_on_device(run: Callable[[], Any], device: torch.device, **about: Any) -> float:
    """Seconds per call of `run`, the median of a few after a warm-up (kernels JIT on their
    first call): CUDA events on a GPU, the wall clock elsewhere. The tuner looks this name up at
    each use, so a test can replace it (`about`: the `backend` and `site` being timed)."""
    repeats = 5
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        times = []
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass
class SitePlan:
    """A site to decide: its candidates and its cache key."""

    site: AttentionSite
    names: list[str]
    key: dict[str, Any]


class SiteTuner:
    """Decides the sites of one compiled model under one budget."""

    def __init__(self, budget: float, *, model: str = "", cache: TuningCache | None = None):
        self.budget = budget
        self.model = model
        self.cache = cache if cache is not None else TuningCache()
        self.measured = 0  # sites measured in this process; a warm cache measures none
        self._times: dict[tuple[str, str], float] = {}  # (shape key, backend) -> seconds

    def plan(self, site: AttentionSite, *, grad: bool) -> SitePlan:
        names = candidates(site, grad=grad)
        return SitePlan(
            site, names, tuning_key(site, names, self.budget, grad=grad, model=self.model)
        )

    def cached(self, plan: SitePlan) -> SiteTuning | None:
        """The decision for `plan` without a measurement: a valid cache entry, or the one
        candidate there is."""
        if len(plan.names) == 1:
            return SiteTuning(self.budget, plan.names[0], [], source="only")
        return self.cache.load(plan.key, plan.names, self.budget)

    def measure(self, plan: SitePlan, sid: int, args: tuple[Any, ...]) -> SiteTuning:
        """Run every candidate on the inputs `args` the op of site `sid` just received, against
        the float32 reference; store and return the decision."""
        q, k, v, mask = (a.detach() if isinstance(a, torch.Tensor) else a for a in args[:4])
        rt = ops.site_runtime(sid)
        site = plan.site
        timer = sys.modules[__name__].time_on_device  # looked up now: tests replace it
        shape = json.dumps(
            {k_: plan.key[k_] for k_ in ("device", "shape", "dtype", "mask", "causal")}
        )
        results = []
        owner = ops.SiteOwner()  # the candidates' runtimes, registered while measuring
        with torch.no_grad():
            ref_dtype = torch.promote_types(q.dtype, torch.float32)
            try:
                ref_sid = _register(owner, rt, site, _REFERENCE)
                want = _call(ref_sid, q.to(ref_dtype), k.to(ref_dtype), v.to(ref_dtype), mask)
            except Exception as e:  # (out of memory at a long site): nothing can be judged, so
                # the site stays on auto's default, and nothing is cached: the next process tries
                self.measured += 1
                why = f"the float32 reference failed ({type(e).__name__}: {e})"[:300]
                return SiteTuning(self.budget, plan.names[0], [], source="unmeasured", note=why)
            limits = (self.budget, tolerance(q.dtype))
            for i, name in enumerate(plan.names):
                exact = _exact(registry.get_backend(name))
                try:
                    cand = _register(owner, rt, site, name)
                    run = functools.partial(_call, cand, q, k, v, mask)
                    check = compare("output", run(), want)
                    memo = (shape, name)
                    if memo not in self._times:
                        self._times[memo] = float(timer(run, q.device, backend=name, site=site))
                    elapsed, error = self._times[memo], ""
                    rel, nan_match = check.rel_l2, check.nan_match
                except Exception as e:  # a candidate that cannot run the site loses; not a crash
                    rel, nan_match, elapsed = math.inf, False, math.inf
                    error = f"{type(e).__name__}: {e}"[:200]
                ok = _qualifies(
                    default=i == 0,
                    exact=exact,
                    rel_l2=rel,
                    nan_match=nan_match,
                    limits=limits,
                    error=error,
                )
                results.append(CandidateResult(name, exact, rel, nan_match, elapsed, ok, error))
        won = pick(results)
        tuning = SiteTuning(self.budget, won.backend if won else plan.names[0], results)
        self.measured += 1
        if won is not None:
            self.cache.store(plan.key, tuning)
        return tuning


def _register(owner: ops.SiteOwner, rt: ops.SiteRuntime, site: AttentionSite, name: str) -> int:
    """A site id that runs `rt`'s site on backend `name`, everything else as `rt` (scale,
    causal, what eager gives fully blocked rows)."""
    cls = registry.get_backend(name)
    impl = construct_impl(cls.get_impl_cls(), site)
    return owner.register_runtime(rt.on_backend(impl, name, capabilities(cls).differentiable))


def _call(sid: int, q, k, v, mask) -> torch.Tensor:
    return torch.ops.fv_compile.attention(q, k, v, mask, sid, 0, [])


class TunedPolicy(SitePolicy):
    """The user's policy, with the sites it leaves to `auto` decided under the budget: by
    `decided` (this graph's measurements), else by the cache; a site neither answers runs on
    `auto`'s default and is listed in `pending`, to be measured on the graph's first call."""

    def __init__(self, base: SitePolicy, tuner: SiteTuner, *, grad: bool) -> None:
        # (not SitePolicy.__init__: `base` checked the spec already)
        self.spec, self.strict = base.spec, base.strict
        self.base, self.tuner, self.grad = base, tuner, grad
        self.decided: dict[str, SiteTuning] = {}  # anchor node -> decision
        self.pending: dict[str, SitePlan] = {}

    def choose(self, site: AttentionSite) -> tuple[str, type[AttentionBackend]]:
        if not self.base.asks_auto(site):
            return self.base.choose(site)
        tuning = self.decided.get(site.node)
        if tuning is None:
            plan = self.tuner.plan(site, grad=self.grad)
            tuning = self.tuner.cached(plan)
            if tuning is None:
                self.pending[site.node] = plan
                return self.base.choose(site)
            self.decided[site.node] = tuning
        self.pending.pop(site.node, None)
        cls = registry.get_backend(tuning.choice)
        assert unsupported_reason(cls, site) is None, "a candidate the site's checks accepted"
        site.tuning = dataclasses.replace(tuning)
        return tuning.choice, cls


class MeasuringInterpreter(Interpreter):
    """Runs a lowered graph op by op, as `compiler="eager"` would; after each op of a site in
    `measure` computed its output, that site's candidates are measured on the op's inputs."""

    def __init__(self, gm: GraphModule, measure: dict[int, Callable[[tuple[Any, ...]], None]]):
        super().__init__(gm)
        self.measure = measure

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        out = super().call_function(target, args, kwargs)
        if target is torch.ops.fv_compile.attention.default:
            hook = self.measure.pop(args[4], None)
            if hook is not None:
                hook(args)
        return out
