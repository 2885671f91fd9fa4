"""The one-line wrapper and the torch.compile backend named "fv_compile"."""

from __future__ import annotations

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

    Keeps what it found (`sites`, `non_attention`, `graphs`) for `explain` and reports.
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
        result = attention_pass(gm, self.policy, index)
        self.sites.extend(result.sites)
        self.non_attention.extend(result.non_attention)
        if self.analyze_only:
            return gm.forward
        if not result.metadata_backends:
            return self.compile_graph(result.gm, example_inputs)
        dispatch = MetadataDispatch(result.gm, result.metadata_backends, self.compile_graph)
        self.dispatches.append(dispatch)
        return dispatch

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
        self.regions: list[str] = []
        if regional:
            self._compiled, self.regions = compile_blocks(
                model, lambda block: torch.compile(block, backend=backend, **compile_kwargs)
            )
        else:
            self._compiled = torch.compile(model, backend=backend, **compile_kwargs)

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
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        compiled(*args, **kwargs)
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
