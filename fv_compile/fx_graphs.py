"""FX graph helpers every layer that edits a graph after the pass may use."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch.fx import GraphModule

_F = TypeVar("_F", bound=Callable[..., Any])


def copy_graph_module(gm: GraphModule) -> GraphModule:
    """A GraphModule over a copy of `gm.graph`, sharing `gm`'s submodules and attributes (Dynamo
    still owns and reads the original graph)."""
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return GraphModule(gm, graph)


@contextlib.contextmanager
def _saved_tensor_hooks_deferred() -> Iterator[None]:
    set_tracing = getattr(torch._C._autograd, "_saved_tensors_hooks_set_tracing", None)
    if set_tracing is None:
        yield
        return
    prior = set_tracing(True)
    try:
        yield
    finally:
        set_tracing(prior)


def compile_time(fn: _F) -> _F:
    """Run `fn` (work done while compiling: fake propagation through rewritten nodes, the
    compiler's own tracing) out of reach of the saved-tensor hooks active around the call that
    compiles, as Dynamo and AOTAutograd trace. `torch.utils.checkpoint` counts the tensors its
    region saves and raises when the recomputation saves another number: a model with gradient
    checkpointing compiled at its first training call would fail in its backward."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with _saved_tensor_hooks_deferred():
            return fn(*args, **kwargs)

    return wrapped  # type: ignore[return-value]
