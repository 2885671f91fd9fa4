"""The one-line wrapper and the torch.compile backend named "fv_compile"."""

from __future__ import annotations

import builtins
import collections
import dataclasses
import functools
import gc
import inspect
import os
import sys
import threading
import types
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch._dynamo.eval_frame import OptimizedModule
from torch.utils import _pytree as pytree

from fv_compile.cache import with_source_key
from fv_compile.context import current_forward_context, reset_derived_context, set_derived_context
from fv_compile.distributed.ulysses import SequenceParallel, shard_attention_sites
from fv_compile.distributed.ulysses import resolve as resolve_sequence_parallel
from fv_compile.errors import FvCompileError
from fv_compile.explain import (
    AttentionCallCounter,
    ExplainReport,
    GraphBreak,
    SkippedFrame,
    dynamo_reason,
    graph_anchors,
    uncaptured_attention,
    where,
)
from fv_compile.fx_graphs import compile_time
from fv_compile.lowering import LoweredGraph, lower_graph, trace_training_sites
from fv_compile.ops import SiteOwner
from fv_compile.passes.find_sites import INSIDE_SUBGRAPH
from fv_compile.passes.token_order import TokenOrderResult
from fv_compile.pipelines import DerivedContexts, check_fastvideo_args
from fv_compile.pipelines import cache_context as pipeline_cache_context
from fv_compile.policy import AUTO, PolicySpec, SitePolicy
from fv_compile.regional import (
    GlueWatch,
    RegionalCopy,
    block_lists,
    blocks_hold_most_weights,
    current_region,
)
from fv_compile.runtime import MetadataDispatch, compile_at_run_time
from fv_compile.site import AttentionSite, NonAttentionSoftmax, SequenceShard, TokenOrder
from fv_compile.tuning import MeasuringInterpreter, SiteTuner, TunedPolicy, check_accuracy_budget
from fv_compile.user_errors import translate as translate_error
from fv_compile.verify import SiteVerifier

COMPILERS = ("inductor", "aot_eager", "eager")


class FvCompileBackend:
    """A Dynamo backend: rewrites each graph's attention sites, then hands the graph to `compiler`.

    Keeps what it found (`sites`, `non_attention`, `graphs`) for `explain` and reports, and, per
    graph, the attention calls it holds and how often it ran (`graph_runs`): a compiled call that
    runs none of its graphs ran eagerly.
    """

    def __init__(
        self,
        attention_backend: PolicySpec = AUTO,
        *,
        compiler: str = "inductor",
        strict: bool = False,
        mode: str | None = None,
        options: dict[str, Any] | None = None,
        analyze_only: bool = False,
        check: str | None = None,
        sequence_parallel: SequenceParallel | None = None,
        accuracy_budget: float | None = None,
    ) -> None:
        """check: "forward" or "backward" makes each graph run as traced while every rewritten
        site is checked against its replacement on the same inputs (`fv_compile.verify`).
        accuracy_budget: the sites left to `auto` are decided by measurement (fv_compile/tuning.py)."""
        if compiler not in COMPILERS:
            raise FvCompileError(
                f"compiler must be one of {', '.join(COMPILERS)}; got {compiler!r}"
            )
        self.policy = SitePolicy(attention_backend, strict=strict)
        self.compiler = compiler
        self.mode = mode
        self.options = dict(options or {})
        self.analyze_only = analyze_only
        self.check = check
        self.sequence_parallel = sequence_parallel
        budget = check_accuracy_budget(accuracy_budget)
        self.tuner = None if budget is None else SiteTuner(budget)
        self.sites: list[AttentionSite] = []
        self.non_attention: list[NonAttentionSoftmax] = []
        self.token_order: list[TokenOrder] = []  # per graph with a token-order backend
        # with sequence_parallel: what became of the stretch between the sites, by outcome
        self.sequence_shards: list[SequenceShard] = []
        self.graphs = 0
        self.dispatches: list[MetadataDispatch] = []
        self.graph_runs: list[int] = []  # per graph: how many times it ran
        self.graph_regions: list[
            set[tuple[str, int]]
        ] = []  # per graph: the regional blocks that ran it
        self.anchors: list[list] = []  # per graph: (kind, (file, line)) of its SDPA/softmax calls
        self.breaks: list[
            tuple[str, str]
        ] = []  # (Dynamo's message, user line) of graphs a break ended
        self.restarts: list[str] = []  # graph-break messages of frames Dynamo split (one per frame)
        self.skipped_frames: list[SkippedFrame] = []
        self._warned_symbolic = False
        self._warned_inside = False
        # the model's repeated block lists `[(path, length)]`, when known: they number its layers
        self.block_lists: list[tuple[str, int]] = []

    def __call__(
        self,
        gm: torch.fx.GraphModule,
        example_inputs: list[Any],
        *,
        mode: str | None = None,
        options: dict[str, Any] | None = None,
    ):
        """Dynamo's entry point; `mode`/`options` arrive when torch.compile got them."""
        if mode is not None:
            self.mode = mode
        if options:
            self.options.update(options)
        index = self.graphs
        self.graphs += 1
        self.graph_runs.append(0)
        self.graph_regions.append(set())
        self.anchors.append(graph_anchors(gm))
        self._note_break(gm)
        tuned = None
        if self.tuner is not None and (self.check is not None or not self.analyze_only):
            # (a checked graph runs as traced: only the decisions the cache holds apply)
            tuned = TunedPolicy(self.policy, self.tuner, grad=torch.is_grad_enabled())
        result = lower_graph(
            gm,
            tuned or self.policy,
            index,
            record=self.check is not None,
            block_lists=self.block_lists,
        )
        self.sites.extend(result.sites)
        self.non_attention.extend(result.non_attention)
        if result.token_order is not None:
            self.token_order.append(result.token_order)
        if not self.analyze_only and self.check is None:
            self._warn_symbolic(result.sites)
            self._warn_inside_subgraphs(result.sites)
        if self.check is not None:
            verifier = SiteVerifier(gm, result.rewrites, backward=self.check == "backward")
            return self._counted(verifier, index, result.owner)
        if self.analyze_only:
            return self._counted(gm.forward, index, result.owner)
        if tuned is not None and tuned.pending and self.check is None:
            first = TuneOnFirstCall(self, gm, index, tuned, result)
            return self._counted(first, index, result.owner)
        return self._counted(self._runnable(result, example_inputs), index, result.owner)

    def _runnable(
        self, result: LoweredGraph, example_inputs: list[Any], *, at_run_time: bool = False
    ) -> Callable[..., Any]:
        """What runs a lowered graph: its compiled code, or the dispatch over its metadata
        variants. `at_run_time`: compiled after Dynamo returned (a tuned graph's re-lowering),
        inside a tracing context of its own as the variants are."""
        if not result.metadata_backends:
            if at_run_time:
                return compile_at_run_time(self.compile_graph, result.gm, example_inputs)
            return self.compile_graph(result.gm, example_inputs)
        dispatch = MetadataDispatch(
            result.gm,
            result.metadata_backends,
            self.compile_graph,
            result.permuted,
            cuda_graphs=_uses_cuda_graphs(self.compiler, self.mode, self.options),
        )
        self.dispatches.append(dispatch)
        return dispatch

    def replace_graph(self, index: int, result: LoweredGraph) -> None:
        """Graph `index` was lowered again (with its tuned backends): its rows become the new
        lowering's, in place."""
        at = next((i for i, s in enumerate(self.sites) if s.graph == index), len(self.sites))
        self.sites = [s for s in self.sites if s.graph != index]
        self.sites[at:at] = result.sites
        self.token_order = [t for t in self.token_order if t.graph != index]
        if result.token_order is not None:
            self.token_order.append(result.token_order)

    def policy_roles_unused(self) -> str | None:
        """What to tell a user whose `attention_backend` dict names a backend for a role no
        site of the model has (`{"self": "SLIDING_TILE_ATTN"}` on a model whose video attends
        jointly with its text): that key chooses nothing. None when every key chose a site."""
        spec = self.policy.spec
        if not isinstance(spec, dict) or not self.sites:
            return None
        roles = collections.Counter(s.role for s in self.sites if s.status != "skipped")
        unused = [r for r, name in spec.items() if r != "default" and r not in roles]
        unused = [r for r in unused if str(spec[r]).lower() != AUTO]
        if not unused or not roles:
            return None
        have = ", ".join(f"{role} ({n})" for role, n in roles.most_common())
        asked = ", ".join(f"{spec[r]} for {r!r}" for r in unused)
        return (
            f"fv_compile: attention_backend names {asked} attention, but no attention site of "
            f"the model has that role; its sites are {have}, each on the backend its own role "
            "chose (fv_compile.explain lists them): key the policy by those roles"
        )

    def _warn_inside_subgraphs(self, sites: list[AttentionSite]) -> None:
        """Say once when attention ran inside a higher-order op's subgraph (gradient
        checkpointing of a model compiled whole): the backend asked for never runs there."""
        inside = [s for s in sites if s.reason.startswith(INSIDE_SUBGRAPH)]
        if not inside or self._warned_inside:
            return
        self._warned_inside = True
        warnings.warn(
            f"fv_compile: {len(inside)} attention site(s) {inside[0].reason}; they run as the "
            "model wrote them, not on the chosen backend",
            UserWarning,
            stacklevel=_user_stacklevel(),
        )

    def _warn_symbolic(self, sites: list[AttentionSite]) -> None:
        """Say once when a graph's sites were left alone for their symbolic shapes: asked for
        with dynamic=True, or made by torch's automatic dynamic shapes after a recompile."""
        symbolic = [
            s
            for s in sites
            if s.status != "rewritten"
            and ("dynamic" in (s.reason or "") or "symbolic" in (s.reason or ""))
        ]
        if not symbolic or self._warned_symbolic:
            return
        self._warned_symbolic = True
        warnings.warn(
            f"fv_compile: {len(symbolic)} attention site(s) were traced with symbolic shapes "
            "(dynamic=True, or torch's automatic dynamic shapes after a recompile for a new input "
            "shape) and run as the model wrote them, not on the chosen backend: fv_compile rewrites "
            "attention at static shapes only. Compile with dynamic=False (fv_compile.compile's "
            "default) for one graph per resolution (docs/resolution.md)",
            UserWarning,
            stacklevel=_user_stacklevel(),
        )

    def _counted(self, fn: Callable[..., Any], index: int, owner: SiteOwner) -> Callable[..., Any]:
        """`fn`, counting its runs. The callable keeps `owner` (the graph's sites) alive: Dynamo
        holds it as long as the compiled code can run, no longer."""
        runs, regions = self.graph_runs, self.graph_regions[index]

        def run(*args: Any) -> Any:
            runs[index] += 1
            region = current_region()
            if region is not None:
                regions.add(region)
            return fn(*args)

        run.fv_site_owner = owner  # type: ignore[attr-defined]  # a function attribute, on purpose
        return run

    def _note_break(self, gm: torch.fx.GraphModule) -> None:
        reason = getattr(gm, "compile_subgraph_reason", None)
        if reason is None or not getattr(reason, "graph_break", False):
            return
        stack = list(getattr(reason, "user_stack", None) or ())
        at = where(stack[-1].filename, stack[-1].lineno, stack[-1].name) if stack else ""
        self.breaks.append((str(reason.reason), at))

    @compile_time
    def compile_graph(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
        """Hand a rewritten graph to the chosen compiler (its sites sequence parallel first,
        when asked for; the sites that train and may, as their impl's own code)."""
        if self.sequence_parallel is not None:
            gm, stretch = shard_attention_sites(gm, self.sequence_parallel, example_inputs)
            self._note_shard(stretch)
        gm = trace_training_sites(gm)
        if self.compiler == "eager":
            return gm.forward
        if self.compiler == "aot_eager":
            return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
        options = with_source_key(self.options)  # fv_compile's version in Inductor's cache keys
        inductor = torch._TorchCompileInductorWrapper(self.mode, options, False)
        return inductor(gm, example_inputs)

    def _note_shard(self, stretch: TokenOrderResult) -> None:
        assert self.sequence_parallel is not None, "called for sequence-parallel graphs"
        row = SequenceShard(
            self.sequence_parallel.degree,
            stretch.applied,
            stretch.reason,
            sites=stretch.sites,
            video_len=stretch.video_len,
            cut=list(stretch.gathered),
            gathered=list(stretch.scattered),
            stopped_at=stretch.stopped_at,
        )
        for seen in self.sequence_shards:
            if dataclasses.replace(seen, graphs=1) == row:
                seen.graphs += 1
                return
        self.sequence_shards.append(row)

    def graph_break_report(self) -> list[GraphBreak]:
        """Graph breaks by reason: where each split a graph, and in how many frames."""
        located: dict[str, list[str]] = {}
        for message, at in self.breaks:
            located.setdefault(message, [])
            if at and at not in located[message]:
                located[message].append(at)
        frames: dict[str, int] = {}
        for message in self.restarts:
            frames[message] = frames.get(message, 0) + 1
        out = []
        for message in list(located) + [m for m in frames if m not in located]:
            count = max(sum(1 for m, _ in self.breaks if m == message), frames.get(message, 0))
            reason, hint = dynamo_reason(message)
            if "CompiledModel.forward" in reason:  # our own break (CompiledModel.forward)
                reason = "a CompiledModel is called here: it runs its own compiled code"
                hint = "nothing to fix; its sites are listed by its own explain()"
            out.append(GraphBreak(reason, located.get(message, []), count, hint))
        return out

    def report(self) -> ExplainReport:
        return ExplainReport(
            list(self.sites),
            list(self.non_attention),
            self.graphs,
            self.graph_break_report(),
            list(self.skipped_frames),
            token_order=[dataclasses.replace(t) for t in self.token_order],
            sequence_parallel=[dataclasses.replace(t) for t in self.sequence_shards],
        )


class TuneOnFirstCall:
    """The callable Dynamo runs for a graph with sites to tune (fv_compile/tuning.py).

    Its first call runs the graph as lowered with `auto`'s defaults, op by op, measuring every
    candidate of each undecided site on the inputs that site's op receives (the output is the
    default backends', as without a budget), then lowers the graph again with the decisions and
    compiles that once. Every later call runs the compiled graph: the choice never changes
    while the graph lives, and nothing recompiles per call."""

    def __init__(
        self,
        backend: FvCompileBackend,
        gm: torch.fx.GraphModule,
        index: int,
        policy: TunedPolicy,
        first: LoweredGraph,
    ) -> None:
        self.backend, self.gm, self.index, self.policy = backend, gm, index, policy
        self.first: LoweredGraph | None = first  # dropped once tuned
        self.tuned: LoweredGraph | None = None  # keeps the tuned graph's sites registered
        self.fn: Callable[..., Any] | None = None

    def __call__(self, *args: Any) -> Any:
        if self.fn is not None:
            return self.fn(*args)
        first = self.first
        assert first is not None
        measure: dict[int, Callable[[tuple[Any, ...]], None]] = {}
        for sid, site in first.site_ids.items():
            plan = self.policy.pending.get(site.node)
            if plan is not None:
                measure[sid] = functools.partial(self._decide, plan, sid)

        def interpret(gm: torch.fx.GraphModule, example: list[Any]) -> Callable[..., Any]:
            return MeasuringInterpreter(gm, measure).run

        if first.metadata_backends:  # (per-site token order: the measured ids are those of gm)
            out = MetadataDispatch(first.gm, first.metadata_backends, interpret)(*args)
        else:
            out = interpret(first.gm, list(args))(*args)
        tuned = lower_graph(self.gm, self.policy, self.index, block_lists=self.backend.block_lists)
        self.backend.replace_graph(self.index, tuned)
        self.fn = self.backend._runnable(tuned, list(args), at_run_time=True)
        self.tuned, self.first = tuned, None
        return out

    def _decide(self, plan: Any, sid: int, args: tuple[Any, ...]) -> None:
        assert self.backend.tuner is not None
        self.policy.decided[plan.site.node] = self.backend.tuner.measure(plan, sid, args)


# -- the frame Dynamo compiles ------------------------------------------------------------------
#
# Dynamo keeps compiled code on the code object of the frame it compiled, guarded by the backend
# that compiled it, and gives up on a code object (runs it eagerly, silently) after
# `recompile_limit` (8) entries. A CompiledModel compiling `model.forward` itself would share that
# code object with every other compile of the model's class: the ninth `compile`/`explain` on one
# class fails its backend guard and falls back to eager. So each CompiledModel (and each
# `explain`) compiles a private entry function instead, a fresh copy of `_call_module` that
# inlines the model's `__call__`: its cache lives and dies with the CompiledModel. Frames Dynamo
# compiles on their own (after a graph break, a skipped frame's callees) land on the model's code
# objects; there, `isolate_recompiles` gives each CompiledModel its own entries and recompile
# count (torch >= 2.12; before, live CompiledModels of one class share those frames' limit), and
# they are dropped when the CompiledModel goes away.


def _call_module(module, /, *args, **kwargs):
    return module(*args, **kwargs)


_ENTRY_NAME = "fv_compile_forward"
_ISOLATE = "isolate_recompiles" in inspect.signature(torch.compile).parameters


def _dynamo_records():
    """Dynamo's per-frame compile records (a bounded deque; the newest last), or None."""
    return getattr(torch._dynamo.utils, "_compilation_metrics", None)


def _records_since(records, last) -> list[Any]:
    if records is None:
        return []
    out = []
    for rec in reversed(records):
        if rec is last:
            break
        out.append(rec)
    return out[::-1]


class DynamoEntry:
    """The function one CompiledModel (or one `explain`) has Dynamo compile: `entry(module,
    *args, **kwargs)` runs `module(*args, **kwargs)` compiled with `backend`.

    It watches each call: frames Dynamo gave up on (ran eagerly) and calls that ran no compiled
    graph raise a `UserWarning` naming the cause, once per cause."""

    def __init__(self, backend: FvCompileBackend, **torch_compile_kwargs: Any) -> None:
        if _on_model_code:  # a dropped one may wait in a reference cycle (see below)
            gc.collect()
        release_pending()
        code = _call_module.__code__.replace(co_name=_ENTRY_NAME, co_qualname=_ENTRY_NAME)
        fn = types.FunctionType(code, {"__builtins__": builtins, "__name__": __name__}, _ENTRY_NAME)
        if _ISOLATE:
            torch_compile_kwargs.setdefault("isolate_recompiles", True)
        cached = dict(torch._dynamo.eval_frame.cached_backends)
        self.backend = backend
        self._compiled = torch.compile(fn, backend=backend, **torch_compile_kwargs)
        # torch.compile keeps every backend it saw until torch._dynamo.reset(): drop ours with us
        added = [
            (key, value)
            for key, value in torch._dynamo.eval_frame.cached_backends.items()
            if cached.get(key) is not value
        ]
        self._warned: set[str] = set()
        self.calls = 0  # calls so far (a regional model checks its blocks were called)
        self._release = weakref.finalize(self, _release_entry, code, added)
        self._release.atexit = False  # at exit there is nothing left to free

    def __call__(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if _pending_release:
            release_pending()
        records = _dynamo_records()
        last = records[-1] if records else None
        runs = sum(self.backend.graph_runs)
        out = self._compiled(module, *args, **kwargs)
        skipped = []
        if records and records[-1] is not last:
            skipped = self._read_records(_records_since(records, last))
        ran_graph = sum(self.backend.graph_runs) != runs
        if skipped or not ran_graph:
            self._warn(_fallback_message(type(module).__name__, skipped, ran_graph, self.backend))
        return out

    def release(self) -> None:
        """Drop the compiled code now (it is dropped anyway when this entry is freed)."""
        self._release()

    def _read_records(self, new: list[Any]) -> list[SkippedFrame]:
        """Note the graph breaks and the frames Dynamo gave up on in its records of this call."""
        skipped = []
        if any(rec.co_name != _ENTRY_NAME for rec in new):
            _on_model_code.add(self)
        for rec in new:
            self.backend.restarts.extend(sorted(getattr(rec, "restart_reasons", None) or ()))
            if not getattr(rec, "fail_type", None) or getattr(rec, "has_guarded_code", False):
                continue
            message = str(getattr(rec, "fail_reason", "") or rec.fail_type)
            reason, hint = dynamo_reason(message)
            if rec.co_name == _ENTRY_NAME:
                name, location = (
                    "the model's __call__ (inlined into fv_compile's entry)",
                    "fv_compile",
                )
            else:
                name, location = (
                    rec.co_name or "a frame of this call",
                    where(rec.co_filename, rec.co_firstlineno),
                )
            at = where(
                getattr(rec, "fail_user_frame_filename", None),
                getattr(rec, "fail_user_frame_lineno", None),
            )
            frame = SkippedFrame(name, location, reason, at, _fix_for(message, hint))
            self.backend.skipped_frames.append(frame)
            skipped.append(frame)
        return skipped

    def _warn(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, UserWarning, stacklevel=_user_stacklevel())


def _fallback_message(
    model: str, skipped: list[SkippedFrame], ran_graph: bool, backend: FvCompileBackend
) -> str:
    """The warning for a call Dynamo ran (partly) eagerly."""

    def describe(f: SkippedFrame) -> list[str]:
        at = f" ({f.location})" if f.location else ""
        lines = [f"  {f.function}{at}: {f.reason}" + (f" at {f.where}" if f.where else "")]
        return lines + ([f"    fix: {f.hint}"] if f.hint else [])

    if not ran_graph:
        head = (
            f"fv_compile: this call of {model} ran no compiled graph: Dynamo ran it eagerly, so "
            "none of its attention was rewritten. Cause:"
        )
        if skipped:
            return "\n".join([head] + [line for f in skipped for line in describe(f)])
        if any(f.hint.startswith(_LIMIT_FIX) for f in backend.skipped_frames):
            return (
                f"{head} this compiled model hit Dynamo's recompile limit on an earlier call; calls "
                f"that match none of its compiled graphs run eagerly. Fix: {_LIMIT_FIX}"
            )
        return f"{head} {_why_nothing_compiled()}"
    lines = [
        f"fv_compile: Dynamo could not compile {len(skipped)} frame(s) of this call of {model} and "
        "ran them eagerly; attention inside them runs as the model wrote it, not on the chosen backend:"
    ]
    lines += [line for f in skipped for line in describe(f)]
    lines.append(
        "fv_compile.explain(model, *inputs) lists the graph breaks and the attention outside graphs."
    )
    return "\n".join(lines)


_LIMIT_FIX = (
    "this compiled model met more distinct inputs (shapes, dtypes, Python values) than "
    "torch._dynamo.config.recompile_limit allows (each resolution is a graph of its own): raise "
    "that limit, pass fewer distinct shapes, or compile one model per resolution; dynamic=True "
    "compiles one graph for every shape but runs its attention as the model wrote it "
    "(docs/resolution.md)"
)


def _fix_for(message: str, hint: str) -> str:
    if "recompile limit" in message or "recompile_limit" in message:
        return _LIMIT_FIX
    return hint


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _user_stacklevel() -> int:
    """The `stacklevel` that points a warning at the first frame outside fv_compile and torch."""
    level = 2
    frame: types.FrameType | None = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith((_PACKAGE_DIR, _TORCH_DIR)):
        frame, level = frame.f_back, level + 1
    return level


def _why_nothing_compiled() -> str:
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    if torch._dynamo.config.disable:
        return "Dynamo is disabled (TORCHDYNAMO_DISABLE=1 or torch._dynamo.config.disable)"
    stance = getattr(getattr(torch._dynamo.eval_frame, "_stance", None), "stance", "default")
    if stance != "default":
        return f"torch.compiler.set_stance({stance!r}) is in effect"
    if _get_current_dispatch_mode() is not None:
        return "a TorchDispatchMode is active (Dynamo skips frames under one)"
    return (
        "Dynamo skipped the frame (run with TORCH_LOGS=graph_breaks,recompiles to see why) or the "
        "model's call holds no torch operation"
    )


# -- releasing a CompiledModel's compiled code ---------------------------------------------------
#
# Dynamo frees nothing by itself: every compiled code object maps back to its source code object
# (a cycle through C that the garbage collector cannot see), and `torch.compile` holds every backend
# it was given until `torch._dynamo.reset()`. When an entry is freed, its own code object is cleared
# at once (no one else can be running it). The entries it left on the model's code objects (frames
# compiled after graph breaks) are invalidated the way Dynamo invalidates entries whose guarded
# objects died, and a model code object left with dead entries only is cleared, so freed compiles
# stop counting towards its recompile limits. That touches code objects Dynamo may be executing,
# so it runs only where no compiled call is in progress: at once when the entry is freed outside
# compiled code, else at the next `compile`, `explain` or compiled call. A dropped CompiledModel
# whose call hit a graph break often waits in a reference cycle (Dynamo's exceptions and their
# tracebacks) until the garbage collector runs, while its entries still count: `compile` and
# `explain` collect first whenever an entry with frames of model code may be waiting.

_pending_release: list[list[Any]] = []  # backend wrappers of freed entries, not yet dropped
_on_model_code: weakref.WeakSet[DynamoEntry] = (
    weakref.WeakSet()
)  # entries with frames of model code


def _release_entry(code: types.CodeType, backends: list[tuple[int, Any]]) -> None:
    from torch._C._dynamo.eval_frame import reset_code

    _detach_guard_finalizers(code)
    reset_code(code)
    cached = torch._dynamo.eval_frame.cached_backends
    for key, value in backends:
        if cached.get(key) is value:
            del cached[key]
    if backends:
        _pending_release.append([value for _, value in backends])
        release_pending()


def _detach_guard_finalizers(code: types.CodeType) -> None:
    """Let the guards of `code`'s cache entries die with them. Dynamo registers a finalizer on
    each object a guard matches by id (modules, functions: objects that live for the process),
    to invalidate the entry if the object dies; each finalizer holds the guards' manager, so
    every compile's guards would outlive its code. The code's entries go now: detach them."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        managers = {id(e.guard_manager) for e in _debug_get_cache_entry_list(code)}
        if not managers:
            return
        # weakref.finalize's registry is private: typeshed does not declare it
        for finalizer, info in list(weakref.finalize._registry.items()):  # type: ignore[attr-defined]
            owner = getattr(getattr(info.func, "func", None), "__self__", None)
            if owner is not None and id(getattr(owner, "guard_manager", None)) in managers:
                finalizer.detach()
    except Exception:  # a torch without these internals: the guards stay, as they always did
        return


def _in_compiled_call() -> bool:
    if torch.compiler.is_compiling():
        return True
    callback = getattr(torch._C._dynamo.eval_frame, "get_eval_frame_callback", lambda: None)()
    return callback not in (None, False)


def release_pending() -> None:
    """Drop the cache entries freed CompiledModels left on model code objects (see above)."""
    if not _pending_release or _in_compiled_call():
        return
    from torch._C._dynamo.eval_frame import reset_code
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._dynamo.guards import DeletedGuardManagerWrapper

    freed = [b for batch in _pending_release for b in batch]
    _pending_release.clear()
    for ref in list(torch._dynamo.convert_frame.input_codes.seen):
        code = ref()
        if code is None:
            continue
        try:
            entries = _debug_get_cache_entry_list(code)
            mine = [e for e in entries if any(getattr(e, "backend", None) is b for b in freed)]
            if mine and all([_invalidate(e, DeletedGuardManagerWrapper) for e in mine]):
                entries = _debug_get_cache_entry_list(code)
                if all(isinstance(e.guard_manager, DeletedGuardManagerWrapper) for e in entries):
                    reset_code(code)
        except Exception:  # a torch without these internals: the entries stay until reset()
            continue


def _invalidate(entry: Any, deleted: type) -> bool:
    """Invalidate one cache entry the way Dynamo does when a guarded object dies."""
    manager = entry.guard_manager
    if isinstance(manager, deleted):
        return True
    extra_state, live = getattr(manager, "extra_state", None), getattr(manager, "cache_entry", None)
    if extra_state is None or live is None:
        return False
    extra_state.invalidate(live, deleted("its fv_compile.CompiledModel was freed"))
    return True


class CompiledBlock(torch.nn.Module):
    """A regionally compiled block: calls `block` through its CompiledModel's entry. Attributes
    it does not have are the block's."""

    def __init__(self, block: torch.nn.Module, entry: DynamoEntry) -> None:
        super().__init__()
        self._orig_mod = block
        self._entry = entry

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._entry(self._orig_mod, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["_orig_mod"], name)


class _Bound:
    """`entry(model, ...)` as a plain callable (not a submodule: the model is registered once)."""

    def __init__(self, entry: DynamoEntry, model: torch.nn.Module) -> None:
        self.entry, self.model = entry, model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.entry(self.model, *args, **kwargs)


class _CallDepth(threading.local):
    """CompiledModel calls running now in this thread: only the outermost starts a step (a call
    running in another thread is not an outer call of this one)."""

    depth = 0


_calls = _CallDepth()

_PREFIX = "_orig_mod."


def _drop_wrapper_prefix(module, state_dict, prefix, local_metadata) -> None:
    """state_dict hook: the wrapped model's keys without the wrapper's `_orig_mod.`."""
    inner = prefix + _PREFIX
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        for key in [k for k in meta if k == inner[:-1] or k.startswith(inner)]:
            meta[prefix + key[len(inner) :] if key != inner[:-1] else prefix[:-1]] = meta.pop(key)


def _add_wrapper_prefix(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: the model's own keys (as `state_dict()` gives them) back under
    `_orig_mod.`, where the wrapped model sits; keys that already carry it are left alone."""
    inner = prefix + _PREFIX
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix) :]] = state_dict.pop(key)


def _cuda_graph_owned_outputs(out: Any) -> Any:
    """`out` with its CUDA tensors cloned. Under CUDA graphs a graph's outputs live in its
    memory pool, and the next step's replay overwrites them: a pipeline that keeps the
    conditional prediction across the unconditional call (CFG) would read the wrong values.
    Which tensors a graph owns is torch-internal, so every CUDA tensor of the model's output is
    copied: one latent-sized copy per call, microseconds against a transformer step."""
    return pytree.tree_map_only(torch.Tensor, lambda t: t.clone() if t.is_cuda else t, out)


def _uses_cuda_graphs(compiler: str, mode: str | None, options: dict[str, Any] | None) -> bool:
    if compiler != "inductor":
        return False
    if options and "triton.cudagraphs" in options:
        return bool(options["triton.cudagraphs"])
    return mode in ("reduce-overhead", "max-autotune") or bool(
        torch._inductor.config.triton.cudagraphs
    )


class CompiledModel(OptimizedModule):
    """The compiled model: call it like the original, use it wherever the original was used.

    It stands in for the model as torch's own `OptimizedModule` (which it subclasses, so
    diffusers, accelerate and peft unwrap it through `_orig_mod` as they unwrap
    `torch.compile`'s): attributes it does not have are the model's (`config`, `dtype`,
    `device`, methods), attributes set on it are set on the model, `.to()`/`.eval()` reach the
    model, and `state_dict()`/`load_state_dict()` use the model's own keys (no `_orig_mod.`
    prefix). Hooks registered on it run around its calls. It is not picklable: pickle the model.

    Under CUDA graphs (`mode="reduce-overhead"`) each outermost call is one CUDA-graph step
    (`torch.compiler.cudagraph_mark_step_begin()`), so regional blocks, graph breaks and CFG
    passes need no ceremony, and the CUDA tensors it returns are copies the next call cannot
    overwrite. As torch requires once anything marks steps, other `reduce-overhead` models in
    the process must then mark their own steps.

    With no `forward_context` active, the model derives the context its backends need from its
    own call (fv_compile/pipelines.py), with the `fastvideo_args` given to `compile`.
    """

    # The wrapper's own attributes. They are class attributes so that setting them stays here:
    # any other attribute set on the wrapper is set on the model (OptimizedModule's rule).
    # __init__ replaces each None default: the annotation is what a constructed wrapper holds.
    _fv_backend: FvCompileBackend = None  # type: ignore[assignment]
    _entry: DynamoEntry = None  # type: ignore[assignment]
    _compiled: Any = None
    _regional: RegionalCopy | None = None  # None unless compiled regionally
    _derive: DerivedContexts = None  # type: ignore[assignment]
    _cuda_graphs: bool = False
    _glue_checked: bool = False
    _roles_checked: bool = False
    _super_module_initialized: bool = False
    regions: list[str] = []  # noqa: RUF012 (replaced per instance)

    __call__ = torch.nn.Module.__call__  # OptimizedModule's differs between torch versions

    def __init__(
        self,
        model: torch.nn.Module,
        backend: FvCompileBackend,
        regional: bool = False,
        fastvideo_args: Any = None,
        **compile_kwargs: Any,
    ):
        object.__setattr__(self, "_orig_mod", model)  # attribute reads in Module.__init__ need it
        object.__setattr__(self, "_super_module_initialized", False)
        torch.nn.Module.__init__(self)
        self._super_module_initialized = True
        self._orig_mod = model  # registers the model as the one child
        self._fv_backend = backend
        backend.block_lists = [(path, len(blocks)) for path, blocks in block_lists(model)]
        self._entry = DynamoEntry(backend, **compile_kwargs)
        self._derive = DerivedContexts(model, fastvideo_args)
        self._cuda_graphs = _uses_cuda_graphs(backend.compiler, backend.mode, backend.options)
        self.regions = []
        if regional:  # every block calls the one entry: one compiled graph serves them all
            copy = RegionalCopy(model, lambda block: CompiledBlock(block, self._entry))
            object.__setattr__(self, "_regional", copy)  # not a child: the model's weights once
            object.__setattr__(self, "_compiled", copy.module)
            self.regions = list(copy.paths)
        else:
            self._compiled = _Bound(self._entry, model)
        self._register_state_dict_hook(_drop_wrapper_prefix)
        self.register_load_state_dict_pre_hook(_add_wrapper_prefix)

    # -- standing in for the model --------------------------------------------------------------

    @property
    def training(self) -> bool:
        return self._orig_mod.training

    @training.setter
    def training(self, value: bool) -> None:
        if self._super_module_initialized:  # (Module.__init__ sets the default: not the model's)
            self._orig_mod.training = value

    def __getattr__(self, name: str) -> Any:
        modules = self.__dict__.get("_modules")
        if modules is None or "_orig_mod" not in modules:
            raise AttributeError(name)
        if name == "_orig_mod":
            return modules["_orig_mod"]
        value = getattr(modules["_orig_mod"], name)
        if name == "cache_context":  # diffusers pipelines pass the step index through it
            return functools.partial(pipeline_cache_context, value)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "_orig_mod" or hasattr(type(self), name):
            return torch.nn.Module.__setattr__(self, name, value)
        return setattr(self._orig_mod, name, value)

    def __delattr__(self, name: str) -> None:
        if name == "_orig_mod" or hasattr(type(self), name):
            return torch.nn.Module.__delattr__(self, name)
        return delattr(self._orig_mod, name)

    def __bool__(self) -> bool:  # OptimizedModule's __len__ raises for models without a length
        return True

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False):
        """The model's `load_state_dict`: takes its own keys (and, for checkpoints saved from a
        `torch.compile`d model, keys with `_orig_mod.`)."""
        meta = getattr(state_dict, "_metadata", None)
        own = collections.OrderedDict(
            (k[len(_PREFIX) :] if k.startswith(_PREFIX) else k, v) for k, v in state_dict.items()
        )
        if meta is not None:
            own._metadata = meta  # type: ignore[attr-defined]  # torch's state-dict convention
        return self._orig_mod.load_state_dict(own, strict=strict, assign=assign)

    def __reduce__(self):
        raise FvCompileError(
            "a CompiledModel cannot be pickled or copied (its compiled code lives in this "
            "process): pickle or copy the model (compiled._orig_mod) and compile the copy"
        )

    def __getstate__(self):
        self.__reduce__()

    # -- calls -------------------------------------------------------------------------------

    # Opaque to an outer compiled frame (a pipeline under torch.compile, or another
    # CompiledModel): the outer frame breaks around the call and this model runs its own
    # compiled code with its own settings. Traced through, the call bookkeeping below would be
    # Dynamo's to replay (torch 2.11 reads `_calls.depth` as its class default there, so inner
    # calls marked CUDA-graph steps) and the contexts it sets would break the outer graph.
    @torch.compiler.disable(reason="a CompiledModel runs its own compiled code")
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        outermost = _calls.depth == 0
        if outermost and self._cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        token = None
        if current_forward_context() is None:
            token = set_derived_context(self._derive.for_call(args, kwargs))
        _calls.depth += 1
        try:
            regional = self._regional
            if regional is None:
                out = self._compiled(*args, **kwargs)
            else:
                out = self._regional_call(regional, args, kwargs)
        except Exception as error:  # Dynamo's and torch's words for a few user errors: ours
            said = translate_error(error, self._orig_mod, args, kwargs)
            if said is None:
                raise
            raise said from said.__cause__  # the cause fv_compile gave it, not Dynamo's wrapper
        finally:
            _calls.depth -= 1
            if token is not None:
                reset_derived_context(token)
        if outermost and not self._roles_checked:
            self._roles_checked = True
            unused = self._fv_backend.policy_roles_unused()
            if unused:
                self._entry._warn(unused)
        if outermost and self._cuda_graphs:
            out = _cuda_graph_owned_outputs(out)
        return out

    def _regional_call(
        self, regional: RegionalCopy, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        regional.sync()
        calls = self._entry.calls
        if self._glue_checked:
            out = self._compiled(*args, **kwargs)
        else:  # the first call: is there attention in the eager glue between the blocks?
            with GlueWatch() as watch:
                out = self._compiled(*args, **kwargs)
            self._glue_checked = True
            self._warn_glue_attention(watch.counter.calls)
        if self._entry.calls == calls and _calls.depth == 1:
            self._entry._warn(
                f"fv_compile: this call of {type(self._orig_mod).__name__} ran none of its compiled "
                f"blocks ({', '.join(self.regions)}): nothing was rewritten. Its forward does not "
                "call them (was forward replaced after compile, e.g. by a hook that patches "
                "`forward`?); compile with regional=False to compile what runs"
            )
        return out

    def _warn_glue_attention(self, calls) -> None:
        if not calls:
            return
        lines = [
            f"  {where(filename, line, function)}: {kind} x{n}"
            for (kind, filename, line, function), n in sorted(calls.items(), key=lambda kv: -kv[1])
        ]
        self._entry._warn(
            f"fv_compile: {sum(calls.values())} attention-like call(s) (SDPA, softmax) of "
            f"{type(self._orig_mod).__name__} ran outside its compiled blocks "
            f"({', '.join(self.regions)}), as the model wrote them, not rewritten:\n"
            + "\n".join(lines)
            + "\ncompile with regional=False to rewrite them too (a longer compile)"
        )

    def explain(self) -> ExplainReport:
        """What the compilations so far found and did (empty before the first call).

        Regionally compiled, one graph serves every block of a list: each of its sites is listed
        once per block that ran it, under that block's path (`blocks.7.attn1`), so the table
        shows every attention of the model as a whole-model compile does; `graphs` counts the
        compiled graphs (one per block class). Sites outside the blocks run eagerly and are not
        listed (the first call warns when there are any)."""
        report = self._fv_backend.report()
        if self._regional is not None:
            report.sites = _per_block(report.sites, self._fv_backend.graph_regions, self.regions)
            for row in report.token_order:
                row.note = _REGIONAL_TOKEN_ORDER
        return report

    @property
    def cuda_graphs(self) -> bool:
        """Whether each outermost call is a CUDA-graph step (Inductor with `mode="reduce-overhead"`
        or `"max-autotune"`, or `options={"triton.cudagraphs": True}`)."""
        return self._cuda_graphs

    @property
    def variants_compiled(self) -> int:
        """How many metadata graph variants have been compiled (one per distinct static key)."""
        return sum(len(d.variants) for d in self._fv_backend.dispatches)

    @property
    def variants_token_ordered(self) -> int:
        """Of the variants compiled, how many run the stretch between their sites in the sites'
        token order (`explain().token_order` says where, and why not elsewhere)."""
        return sum(d.permuted_variants for d in self._fv_backend.dispatches)


# Regional compilation compiles each block alone and runs the code between blocks eagerly: what
# that code does with the tokens is never traced, so the order cannot be carried from one block
# to the next. Each block's graph gathers at its inputs and scatters at its outputs instead.
_REGIONAL_TOKEN_ORDER = (
    "regional compile: the order is gathered at each block's inputs and scattered at its "
    "outputs (the eager code between blocks is never traced, so it cannot be proven to keep the "
    "order); compile with regional=False to carry it across all the blocks"
)


def _per_block(
    sites: list[AttentionSite], graph_regions: list[set[tuple[str, int]]], paths: list[str]
) -> list[AttentionSite]:
    """One row per (block that ran the site's graph, site), in model order."""
    blocks = sorted(
        {b for regions in graph_regions for b in regions},
        key=lambda b: (paths.index(b[0]) if b[0] in paths else len(paths), b[1]),
    )
    rows = []
    for path, index in blocks:
        prefix = f"{path}.{index}"
        for s in sites:
            if s.graph < len(graph_regions) and (path, index) in graph_regions[s.graph]:
                rows.append(
                    dataclasses.replace(
                        s, module_path=f"{prefix}.{s.module_path}" if s.module_path else prefix
                    )
                )
    rows += [s for s in sites if s.graph >= len(graph_regions) or not graph_regions[s.graph]]
    return rows


def compile(
    model: torch.nn.Module,
    attention_backend: PolicySpec = AUTO,
    *,
    compiler: str = "inductor",
    strict: bool = False,
    mode: str | None = None,
    options: dict[str, Any] | None = None,
    regional: bool | str = "auto",
    fastvideo_args: Any = None,
    sequence_parallel: Any = None,
    accuracy_budget: float | None = None,
    **torch_compile_kwargs: Any,
) -> CompiledModel:
    """Compile `model` with every attention site running on `attention_backend`.

    attention_backend: a backend name (`"TORCH_SDPA"`, `"TRITON_ATTN"`, ...; `"auto"` picks the
        best dense backend for the device), a policy dict `{"self": ..., "cross": ...,
        "joint": ..., "default": ...}`, or a callable `site -> name`.
    compiler: what runs the rewritten graph: `"inductor"`, `"aot_eager"` or `"eager"`.
    strict: raise instead of falling back to a dense backend when a site is unsupported.
    mode, options: Inductor's, as for `torch.compile`. `mode="reduce-overhead"` (CUDA graphs)
        needs nothing else: each call of the compiled model is one CUDA-graph step.
    regional: `"auto"` (the default) compiles the model's repeated block (its `nn.ModuleList`
        of identical blocks) once instead of the whole model, when such lists hold most of its
        weights: seconds instead of minutes of cold compile, the code between blocks eager (the
        first call warns if attention runs there); other models compile whole. `True` requires
        blocks, `False` compiles the whole model. Sites of all blocks share the first block's
        impls, so a policy sees each block site once, with a path inside the block (`attn1`);
        backends with per-layer settings (STA windows) learn the running block's layer from
        `fv_compile.regional.current_layer()` (blocks numbered list after list, in model order).
    fastvideo_args: run-wide backend settings (`fv_compile.FastVideoArgs(sta_window=...,
        sta_dense_steps=...)`) for calls made outside a `forward_context`, e.g. by a diffusers
        pipeline: the model then derives the step and the latent grid from each call (see
        `CompiledModel`). A `forward_context` around a call takes precedence.
    sequence_parallel: a degree (the default process group's size) or a
        `torch.distributed.ProcessGroup`: each video self- and joint-attention site runs Ulysses
        sequence parallel over it (fv_compile/distributed/ulysses.py), inference only; every rank
        gets the single-process output.
    accuracy_budget: None (the default) keeps `auto` exact: dense attention at every site, chosen
        by the measured rules of fv_compile/policy.py. A float (0.02 for 2%) is the relative L2
        error a site's output may show against float32 attention on the same inputs: on the
        first call at a shape, every site left to `auto` is run on each backend that can run it
        (exact ones, SAGE_ATTN, registered backends declaring `approximate`), its error measured
        on the site's real inputs and its time on the device, and the fastest within the budget
        runs it from then on (exact backends are not held to the budget, only to `verify`'s
        tolerance for the dtype; `auto`'s default always qualifies). Decisions are cached on disk (under
        Inductor's cache directory), so a second process starts without measuring.
        `compiled.explain()` lists every candidate's error and time.
    torch_compile_kwargs: passed to `torch.compile` (`fullgraph`, `dynamic`, ...); shapes are
        static unless `dynamic` is given, so each resolution gets its own graph.

    The model is not modified; the returned module calls it.
    """
    if not isinstance(model, torch.nn.Module):
        raise FvCompileError(
            f"fv_compile.compile expects a torch.nn.Module, got {type(model).__name__}"
        )
    if isinstance(model, CompiledModel):
        raise FvCompileError(
            "this model is already an fv_compile.CompiledModel: compile the original "
            "(compiled._orig_mod) instead"
        )
    if not (
        regional is True or regional is False or (isinstance(regional, str) and regional == "auto")
    ):
        raise FvCompileError(
            f"regional must be 'auto' (blocks when the model has them), True (blocks) or False "
            f"(the whole model); got {regional!r}"
        )
    for key in ("backend",):
        if key in torch_compile_kwargs:
            raise FvCompileError(
                f"fv_compile.compile sets torch.compile's {key}; choose the compiler with "
                "compiler='inductor' | 'aot_eager' | 'eager'"
            )
    check_fastvideo_args(fastvideo_args)
    check_options(options, own_keys=False)
    check_accuracy_budget(accuracy_budget)
    if regional == "auto":
        regional = blocks_hold_most_weights(model)
    torch_compile_kwargs.setdefault("dynamic", False)
    backend = FvCompileBackend(
        attention_backend,
        compiler=compiler,
        strict=strict,
        mode=mode,
        options=options,
        sequence_parallel=resolve_sequence_parallel(sequence_parallel),
        accuracy_budget=accuracy_budget,
    )
    _name_tuner(backend, model)
    return CompiledModel(model, backend, bool(regional), fastvideo_args, **torch_compile_kwargs)


def _name_tuner(backend: FvCompileBackend, model: torch.nn.Module) -> None:
    """Decisions are made on one model's activations: its class is in their cache keys."""
    if backend.tuner is not None:
        backend.tuner.model = f"{type(model).__module__}.{type(model).__qualname__}"


def fv_compile_backend(
    gm: torch.fx.GraphModule,
    example_inputs: list[Any],
    *,
    mode: str | None = None,
    options: dict[str, Any] | None = None,
):
    """`torch.compile(model, backend="fv_compile", options={...})`.

    options: `attention_backend`, `compiler`, `strict`, `accuracy_budget`; any other key is an
    Inductor option.
    Dynamo calls this at the first call of the compiled function: a misspelt key is reported
    then, with fv_compile's own keys listed.
    """
    check_options(options, own_keys=True)
    opts = dict(options or {})
    budget = opts.pop("accuracy_budget", None)
    backend = FvCompileBackend(
        opts.pop("attention_backend", AUTO),
        compiler=opts.pop("compiler", "inductor"),
        strict=opts.pop("strict", False),
        mode=mode,
        options=opts,
        accuracy_budget=budget,
    )
    return backend(gm, example_inputs)


# The keys of `torch.compile(backend="fv_compile", options={...})` that are fv_compile's own.
OPTIONS = ("attention_backend", "compiler", "strict", "accuracy_budget")


def check_options(options: dict[str, Any] | None, *, own_keys: bool) -> None:
    """Each key of `options` is an Inductor option (or, with `own_keys`, one of fv_compile's
    `OPTIONS`); a misspelt key raises naming the closest valid one and fv_compile's own keys."""
    import difflib

    if not options:
        return
    inductor = set(torch._inductor.list_options())
    for key in options:
        if (own_keys and key in OPTIONS) or str(key).replace("-", "_") in inductor:
            continue
        if key in OPTIONS:
            raise FvCompileError(
                f"options={{{key!r}: ...}} holds one of fv_compile's own settings, but "
                f"fv_compile.compile's options are Inductor's: pass it as an argument, "
                f"fv_compile.compile(model, {key}=...)"
            )
        close = difflib.get_close_matches(str(key), [*OPTIONS, *sorted(inductor)], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        where = (
            "torch.compile(backend='fv_compile', options=...)"
            if own_keys
            else "fv_compile.compile(options=...)"
        )
        own = (
            f"fv_compile's own options are {', '.join(OPTIONS)}"
            if own_keys
            else f"fv_compile's own settings are arguments ({', '.join(f'{k}=' for k in OPTIONS)})"
        )
        raise FvCompileError(
            f"unknown option {key!r} in {where}{hint}; {own}, any other key must be an Inductor "
            "option (torch._inductor.list_options() lists them)"
        )


def explain(
    model: torch.nn.Module,
    *args: Any,
    attention_backend: PolicySpec = AUTO,
    verify: bool = False,
    accuracy_budget: float | None = None,
    **kwargs: Any,
) -> ExplainReport:
    """Trace `model(*args, **kwargs)` once and report every attention site: what was found, how,
    which backend would run it, and what was left alone and why; and what Dynamo did not capture:
    graph breaks and frames it ran eagerly (with Dynamo's reasons), and the attention calls that
    ran outside every graph. The model runs twice (no grad): compiled, then eagerly to count its
    attention calls. `verify=True` also checks each rewritten site (see `fv_compile.verify`).

    `accuracy_budget`: the sites left to `auto` are tuned as `fv_compile.compile(model,
    accuracy_budget=...)` tunes them (its tuning cache is this one: a compile of the same model
    afterwards measures nothing), and each row lists its candidates' errors and times. The
    traced call then runs on the rewritten sites, not as traced; with `verify=True`, one more
    call checks the tuned choices."""
    if not isinstance(model, torch.nn.Module):
        raise FvCompileError(
            f"fv_compile.explain expects a torch.nn.Module, got {type(model).__name__}"
        )
    check_accuracy_budget(accuracy_budget)
    if accuracy_budget is not None:  # tune: the first call of each graph measures its sites
        backend = FvCompileBackend(
            attention_backend, compiler="eager", accuracy_budget=accuracy_budget
        )
        _name_tuner(backend, model)
        _trace_once(backend, model, args, kwargs, grad=False)
    if accuracy_budget is None or verify:  # (the checks read the decisions the tuning stored)
        backend = FvCompileBackend(
            attention_backend,
            compiler="eager",
            analyze_only=True,
            check="forward" if verify else None,
            accuracy_budget=accuracy_budget,
        )
        _name_tuner(backend, model)
        _trace_once(backend, model, args, kwargs, grad=False)
    report = backend.report()
    counter = AttentionCallCounter()
    with torch.no_grad(), counter:
        model(*args, **kwargs)
    report.uncaptured = uncaptured_attention(counter.calls, backend.anchors, backend.graph_runs)
    return report


def verify(
    model: torch.nn.Module,
    *args: Any,
    attention_backend: PolicySpec = AUTO,
    backward: bool = False,
    **kwargs: Any,
) -> ExplainReport:
    """Prove the rewrite on your own model before trusting a compile: trace `model(*args,
    **kwargs)` once, run the traced code as it is (the model computes what eager computes), and
    run every rewritten site's original nodes and its fv_compile op on the inputs the model gave
    that site. Each site's row gets a `check` (`SiteCheck`): max abs and relative L2 error and
    whether NaN/inf patterns agree, for its output and, with `backward=True`, for the gradient of
    every input of the site that requires one. `report.verified` is True when every check passed.

    Backends with per-step metadata (SLIDING_TILE_ATTN) need the caller's `forward_context`."""
    if not isinstance(model, torch.nn.Module):
        raise FvCompileError(
            f"fv_compile.verify expects a torch.nn.Module, got {type(model).__name__}"
        )
    backend = FvCompileBackend(
        attention_backend,
        compiler="eager",
        analyze_only=True,
        check="backward" if backward else "forward",
    )
    _trace_once(backend, model, args, kwargs, grad=backward)
    return backend.report()


def _trace_once(backend: FvCompileBackend, model, args, kwargs, *, grad: bool) -> None:
    backend.block_lists = [(path, len(blocks)) for path, blocks in block_lists(model)]
    entry = DynamoEntry(backend, dynamic=False)
    try:
        with torch.enable_grad() if grad else torch.no_grad():
            entry(model, *args, **kwargs)
    except Exception as error:
        said = translate_error(error, model, args, kwargs)
        if said is None:
            raise
        raise said from said.__cause__
    finally:
        entry.release()


def register_dynamo_backend() -> None:
    """Register "fv_compile" with Dynamo unless the installed package's entry point will."""
    from importlib.metadata import entry_points

    from torch._dynamo.backends import registry as dynamo_registry

    if "fv_compile" in dynamo_registry._COMPILER_FNS:
        return
    if any(ep.name == "fv_compile" for ep in entry_points(group="torch_dynamo_backends")):
        return
    torch._dynamo.register_backend(fv_compile_backend, name="fv_compile")
