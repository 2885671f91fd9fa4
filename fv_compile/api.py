"""The one-line wrapper and the torch.compile backend named "fv_compile"."""

from __future__ import annotations

import builtins
import gc
import inspect
import types
import weakref
from collections.abc import Callable
from typing import Any

import torch

from fv_compile.errors import FvCompileError
from fv_compile.explain import ExplainReport
from fv_compile.passes.attention_pass import attention_pass
from fv_compile.passes.site import AttentionSite, NonAttentionSoftmax
from fv_compile.policy import AUTO, PolicySpec, SitePolicy
from fv_compile.regional import compile_blocks
from fv_compile.runtime import MetadataDispatch

COMPILERS = ("inductor", "aot_eager", "eager")


class FvCompileBackend:
    """A Dynamo backend: rewrites each graph's attention sites, then hands the graph to `compiler`.

    Keeps what it found (`sites`, `non_attention`, `graphs`) for `explain` and reports, and how
    often each graph ran (`graph_runs`).
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
    ) -> None:
        if compiler not in COMPILERS:
            raise FvCompileError(f"compiler must be one of {', '.join(COMPILERS)}; got {compiler!r}")
        self.policy = SitePolicy(attention_backend, strict=strict)
        self.compiler = compiler
        self.mode = mode
        self.options = dict(options or {})
        self.analyze_only = analyze_only
        self.sites: list[AttentionSite] = []
        self.non_attention: list[NonAttentionSoftmax] = []
        self.graphs = 0
        self.dispatches: list[MetadataDispatch] = []
        self.graph_runs: list[int] = []  # per graph: how many times it ran

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
        result = attention_pass(gm, self.policy, index)
        self.sites.extend(result.sites)
        self.non_attention.extend(result.non_attention)
        if self.analyze_only:
            return self._counted(gm.forward, index)
        if not result.metadata_backends:
            return self._counted(self.compile_graph(result.gm, example_inputs), index)
        dispatch = MetadataDispatch(result.gm, result.metadata_backends, self.compile_graph)
        self.dispatches.append(dispatch)
        return self._counted(dispatch, index)

    def _counted(self, fn: Callable[..., Any], index: int) -> Callable[..., Any]:
        runs = self.graph_runs

        def run(*args: Any) -> Any:
            runs[index] += 1
            return fn(*args)

        return run

    def compile_graph(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
        """Hand a rewritten graph to the chosen compiler."""
        if self.compiler == "eager":
            return gm.forward
        if self.compiler == "aot_eager":
            return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
        inductor = torch._TorchCompileInductorWrapper(self.mode, self.options or None, False)
        return inductor(gm, example_inputs)

    def report(self) -> ExplainReport:
        return ExplainReport(list(self.sites), list(self.non_attention), self.graphs)


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
    *args, **kwargs)` runs `module(*args, **kwargs)` compiled with `backend`."""

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
        self._release = weakref.finalize(self, _release_entry, code, added)
        self._release.atexit = False  # at exit there is nothing left to free

    def __call__(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if _pending_release:
            release_pending()
        records = _dynamo_records()
        last = records[-1] if records else None
        out = self._compiled(module, *args, **kwargs)
        if records and records[-1] is not last:
            if any(rec.co_name != _ENTRY_NAME for rec in _records_since(records, last)):
                _on_model_code.add(self)
        return out

    def release(self) -> None:
        """Drop the compiled code now (it is dropped anyway when this entry is freed)."""
        self._release()


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
_on_model_code: weakref.WeakSet[DynamoEntry] = weakref.WeakSet()  # entries with frames of model code


def _release_entry(code: types.CodeType, backends: list[tuple[int, Any]]) -> None:
    from torch._C._dynamo.eval_frame import reset_code

    reset_code(code)
    cached = torch._dynamo.eval_frame.cached_backends
    for key, value in backends:
        if cached.get(key) is value:
            del cached[key]
    if backends:
        _pending_release.append([value for _, value in backends])
        release_pending()


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


class CompiledModel(torch.nn.Module):
    """The compiled model: call it like the original. `explain()` shows what was rewritten."""

    def __init__(
        self,
        model: torch.nn.Module,
        backend: FvCompileBackend,
        regional: bool = False,
        **compile_kwargs: Any,
    ):
        super().__init__()
        self._orig_mod = model
        self._fv_backend = backend
        self._entry = DynamoEntry(backend, **compile_kwargs)
        self.regions: list[str] = []
        if regional:  # every block calls the one entry: one compiled graph serves them all
            self._compiled, self.regions = compile_blocks(
                model, lambda block: CompiledBlock(block, self._entry)
            )
        else:
            self._compiled = _Bound(self._entry, model)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._compiled(*args, **kwargs)

    def explain(self) -> ExplainReport:
        """What the compilations so far found and did (empty before the first call)."""
        return self._fv_backend.report()

    @property
    def variants_compiled(self) -> int:
        """How many metadata graph variants have been compiled (one per distinct static key)."""
        return sum(len(d.variants) for d in self._fv_backend.dispatches)


def compile(
    model: torch.nn.Module,
    attention_backend: PolicySpec = AUTO,
    *,
    compiler: str = "inductor",
    strict: bool = False,
    mode: str | None = None,
    options: dict[str, Any] | None = None,
    regional: bool = False,
    **torch_compile_kwargs: Any,
) -> CompiledModel:
    """Compile `model` with every attention site running on `attention_backend`.

    attention_backend: a backend name (`"TORCH_SDPA"`, `"TRITON_ATTN"`, ...; `"auto"` picks the
        best dense backend for the device), a policy dict `{"self": ..., "cross": ...,
        "joint": ..., "default": ...}`, or a callable `site -> name`.
    compiler: what runs the rewritten graph: `"inductor"`, `"aot_eager"` or `"eager"`.
    strict: raise instead of falling back to a dense backend when a site is unsupported.
    mode, options: Inductor's, as for `torch.compile`.
    regional: compile the model's repeated block (its `nn.ModuleList` of identical blocks) once
        instead of the whole model: seconds instead of minutes of cold compile; the code between
        blocks runs eagerly. Sites of all blocks share the first block's impls; backends with
        per-layer settings (STA windows) learn the running block from `current_block()`.
    torch_compile_kwargs: passed to `torch.compile` (`fullgraph`, `dynamic`, ...); shapes are
        static unless `dynamic` is given, so each resolution gets its own graph.

    The model is not modified; the returned module calls it.
    """
    if not isinstance(model, torch.nn.Module):
        raise FvCompileError(f"fv_compile.compile expects a torch.nn.Module, got {type(model).__name__}")
    for key in ("backend",):
        if key in torch_compile_kwargs:
            raise FvCompileError(
                f"fv_compile.compile sets torch.compile's {key}; choose the compiler with "
                "compiler='inductor' | 'aot_eager' | 'eager'"
            )
    torch_compile_kwargs.setdefault("dynamic", False)
    backend = FvCompileBackend(
        attention_backend, compiler=compiler, strict=strict, mode=mode, options=options
    )
    return CompiledModel(model, backend, regional, **torch_compile_kwargs)


def fv_compile_backend(
    gm: torch.fx.GraphModule,
    example_inputs: list[Any],
    *,
    mode: str | None = None,
    options: dict[str, Any] | None = None,
):
    """`torch.compile(model, backend="fv_compile", options={...})`.

    options: `attention_backend`, `compiler`, `strict`; any other key is an Inductor option.
    """
    opts = dict(options or {})
    backend = FvCompileBackend(
        opts.pop("attention_backend", AUTO),
        compiler=opts.pop("compiler", "inductor"),
        strict=opts.pop("strict", False),
        mode=mode,
        options=opts,
    )
    return backend(gm, example_inputs)


def explain(
    model: torch.nn.Module, *args: Any, attention_backend: PolicySpec = AUTO, **kwargs: Any
) -> ExplainReport:
    """Trace `model(*args, **kwargs)` once and report every attention site: what was found, how,
    which backend would run it, and what was left alone and why. The model runs once (no grad)."""
    if not isinstance(model, torch.nn.Module):
        raise FvCompileError(f"fv_compile.explain expects a torch.nn.Module, got {type(model).__name__}")
    backend = FvCompileBackend(attention_backend, compiler="eager", analyze_only=True)
    entry = DynamoEntry(backend, dynamic=False)
    try:
        with torch.no_grad():
            entry(model, *args, **kwargs)
    finally:
        entry.release()
    return backend.report()


def register_dynamo_backend() -> None:
    """Register "fv_compile" with Dynamo unless the installed package's entry point will."""
    from importlib.metadata import entry_points

    from torch._dynamo.backends import registry as dynamo_registry

    if "fv_compile" in dynamo_registry._COMPILER_FNS:
        return
    if any(ep.name == "fv_compile" for ep in entry_points(group="torch_dynamo_backends")):
        return
    torch._dynamo.register_backend(fv_compile_backend, name="fv_compile")
