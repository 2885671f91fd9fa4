"""Running a rewritten graph whose sites need per-step metadata.

Dynamo sees none of this: it compiled the model's frame once and calls `MetadataDispatch` with the
graph's inputs. The dispatch fetches the metadata of the active forward context (built at most
once per context and backend), appends its tensors to the inputs, and calls the graph variant
compiled for the metadata's static fields, compiling it on first use.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule

from fv_compile import ops
from fv_compile.backends import registry
from fv_compile.context import (
    ForwardContext,
    current_forward_context,
    derived_forward_context,
    step_cache_off,
)
from fv_compile.errors import FvCompileError
from fv_compile.fx_graphs import copy_graph_module
from fv_compile.metadata import MetadataLayout, flatten_metadata
from fv_compile.passes.token_order import GATHER_INPUT, SCATTER_INPUT

GraphCompiler = Callable[[GraphModule, list[Any]], Callable[..., Any]]

_MISSING_CONTEXT = """\
attention backend {name} needs per-step metadata, but the compiled model was called outside a
forward context. Compile with fv_compile.compile(model, ..., fastvideo_args=args), whose model
derives the step and the latent grid from its own call, or call it inside a context:

    with fv_compile.forward_context(current_timestep=i, forward_batch=batch, fastvideo_args=args):
        out = compiled_model(...)
"""

_RECOMPUTED = """\
attention backend {name} needs per-step metadata, but its graph ran inside a backward pass: a
gradient-checkpointed block (diffusers' enable_gradient_checkpointing, torch.utils.checkpoint)
recomputes its forward there, after the call that had the step's metadata returned. Train such a
model without gradient checkpointing, or on a dense backend (TORCH_SDPA, FLASH_ATTN, TRITON_ATTN),
which needs no metadata.
"""


def context_metadata(
    ctx: ForwardContext, name: str, device: torch.device
) -> tuple[MetadataLayout, list[torch.Tensor]]:
    """The backend's metadata for this context: built once, shared by every site and CFG pass."""
    key = (name, str(device))
    if key not in ctx.built:
        backend = registry.get_backend(name)
        builder_cls = backend.get_builder_cls()
        assert builder_cls is not None, f"{name} has no metadata builder: no site of it needs one"
        try:
            md = builder_cls().build(
                current_timestep=ctx.current_timestep,
                forward_batch=ctx.forward_batch,
                fastvideo_args=ctx.fastvideo_args,
            )
        except FvCompileError:
            raise
        except Exception as e:
            raise FvCompileError(
                f"the metadata builder of attention backend {name} ({builder_cls.__qualname__}) "
                f"raised {type(e).__name__}: {e}. It builds from the forward context "
                f"(current_timestep={ctx.current_timestep}, forward_batch, fastvideo_args): give the "
                "context what the builder reads, or fix the builder"
            ) from e
        layout, tensors = flatten_metadata(md, device)
        tensors = [t.to(device, non_blocking=True) for t in tensors]
        ctx.built[key] = (layout, tensors)
    return ctx.built[key]


@dataclass
class PermutedGraph:
    """A copy of a graph that runs the stretch between `backend`'s sites in the backend's token
    order (`passes/token_order.py`): it reads the order from two placeholders, which the
    metadata fields `fields` (`(gather, scatter)`, `AttentionBackend.token_permutation`) feed
    at the steps where they hold one, `video_len` tokens long."""

    gm: GraphModule
    backend: str
    fields: tuple[str, str]
    video_len: int


class MetadataDispatch:
    """The callable Dynamo runs for a graph whose sites read backend metadata."""

    def __init__(
        self,
        gm: GraphModule,
        backends: list[str],
        compile_graph: GraphCompiler,
        permuted: PermutedGraph | None = None,
        *,
        cuda_graphs: bool = False,
    ) -> None:
        self.gm = gm
        self.cuda_graphs = cuda_graphs  # the variants run under CUDA graphs: no step cache
        self.backends = backends
        self.compile_graph = compile_graph
        self.variants: dict[
            tuple[Any, ...], Callable[..., Any]
        ] = {}  # (layouts, tensor shapes) -> graph
        self.owner = ops.SiteOwner()  # the variants' layouts, registered while the dispatch lives
        self.device = _graph_device(gm)
        # the graph run in the token order, for the steps whose metadata holds one
        self.permuted = permuted if permuted is not None and permuted.backend in backends else None
        self.permuted_variants = 0  # of the variants compiled, how many run in the token order

    def __call__(self, *args: Any) -> Any:
        ctx = current_forward_context()
        if ctx is None:  # no explicit context: the one fv_compile.compile's wrapper derived, if any
            ctx = derived_forward_context()
        if ctx is None and torch._C._current_graph_task_id() != -1:
            raise FvCompileError(_RECOMPUTED.format(name=self.backends[0]))
        if ctx is None:
            raise FvCompileError(_MISSING_CONTEXT.format(name=self.backends[0]))
        layouts, tensors = [], []
        for name in self.backends:
            layout, ts = context_metadata(ctx, name, self.device)
            layouts.append(layout)
            tensors.append(ts)
        # The graph is compiled for the metadata tensors' shapes too (static shapes, and CUDA
        # graphs' static input buffers): STA's key lists are as wide as the step's widest window,
        # so a schedule whose windows change size between steps gets a variant per width.
        shapes = tuple((tuple(t.shape), t.dtype) for ts in tensors for t in ts)
        key = (tuple(layouts), shapes)
        fn = self.variants.get(key)
        if fn is None:
            fn = self._compile_variant(tuple(layouts), tensors, args)
            self.variants[key] = fn
        with step_cache_off() if self.cuda_graphs else contextlib.nullcontext():
            return fn(*args, *(t for ts in tensors for t in ts))

    def _compile_variant(self, key, tensors, args) -> Callable[..., Any]:
        vid = self.owner.register_variant(dict(zip(self.backends, key)))
        slots = self._permutation_slots(key, tensors)
        permuted = None if slots is None else self.permuted
        gm = copy_graph_module(self.gm if permuted is None else permuted.gm)
        graph = gm.graph
        inputs = {
            name: [graph.placeholder(f"fv_md_{_ident(name)}_{i}") for i in range(len(ts))]
            for name, ts in zip(self.backends, tensors)
        }
        for node in graph.nodes:
            if node.target is torch.ops.fv_compile.attention.default:
                name = ops.site_runtime(node.args[4]).backend
                if name in inputs:
                    node.args = (*node.args[:5], vid, inputs[name])
        if slots is not None and permuted is not None:  # the order's placeholders read the
            self.permuted_variants += 1  # step's metadata tensors
            own = inputs[permuted.backend]
            for target, slot in zip((GATHER_INPUT, SCATTER_INPUT), slots):
                (ph,) = graph.find_nodes(op="placeholder", target=target)
                own[slot].meta.update(ph.meta)
                ph.replace_all_uses_with(own[slot])
                graph.erase_node(ph)
        _order_placeholders(graph, [p for name in self.backends for p in inputs[name]])
        gm.recompile()
        example = list(args) + [t for ts in tensors for t in ts]
        return compile_at_run_time(self.compile_graph, gm, example)

    def _permutation_slots(self, key, tensors) -> tuple[int, int] | None:
        """Where among its backend's metadata tensors this variant's token order is, when the
        step has one of the length the permuted graph was proven for; else None."""
        if self.permuted is None:
            return None
        i = self.backends.index(self.permuted.backend)
        fields = key[i].tensor_fields()
        gather, scatter = self.permuted.fields
        if gather not in fields or scatter not in fields:
            return None
        slots = (fields[gather], fields[scatter])
        for slot in slots:
            t = tensors[i][slot]
            if tuple(t.shape) != (self.permuted.video_len,) or t.dtype != torch.long:
                return None
        return slots


def compile_at_run_time(compile_graph: GraphCompiler, gm: GraphModule, example: list[Any]):
    """Compile `gm` inside a tracing context of its own, as Dynamo compiles a graph inside its.

    Variants (and graphs lowered again once their sites are tuned) compile at run time, after
    Dynamo returned: without a context (and its fake mode's
    ShapeEnv) Inductor's FX graph and AOTAutograd caches bypass the graph ("No shape env"), so a
    warm process would compile every STA variant cold."""
    from torch._guards import TracingContext, tracing
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    if TracingContext.try_get() is not None:
        return compile_graph(gm, example)
    # Dynamo traced the graph with static shapes unless a placeholder is symbolic. Handed real
    # tensors, AOTAutograd would fakify every size as a fresh duck-sized symbol (whatever the fake
    # mode's own setting) and Inductor would compile a graph Dynamo never traced, with no guards
    # (on the CPU it computed NaN from one). So the example goes in already fake, as Dynamo's does.
    static = not _has_symbolic_inputs(gm)
    mode = FakeTensorMode(shape_env=ShapeEnv(), static_shapes=static)
    if static:
        example = [
            mode.from_tensor(x, static_shapes=True) if isinstance(x, torch.Tensor) else x
            for x in example
        ]
    with tracing(TracingContext(mode)):
        return compile_graph(gm, example)


def _has_symbolic_inputs(gm: GraphModule) -> bool:
    """Whether Dynamo traced `gm` with a symbolic input: a SymInt, or a tensor of symbolic size."""
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(value, torch.SymInt):
            return True
        if isinstance(value, torch.Tensor) and any(
            isinstance(d, torch.SymInt) for d in (*value.shape, *value.stride())
        ):
            return True
    return False


def _order_placeholders(graph: torch.fx.Graph, extra: list[torch.fx.Node]) -> None:
    """Metadata placeholders go after the model's inputs, in backend order."""
    last = [n for n in graph.nodes if n.op == "placeholder" and n not in extra][-1]
    for p in reversed(extra):
        last.append(p)


def _ident(name: str) -> str:
    return re.sub(r"\W", "_", name.lower())


def _graph_device(gm: GraphModule) -> torch.device:
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("example_value", node.meta.get("val"))
            if isinstance(val, torch.Tensor):
                return val.device
    return torch.device("cpu")
