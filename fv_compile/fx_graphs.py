"""FX graph helpers every layer that edits a graph after the pass may use."""

from __future__ import annotations

import torch
from torch.fx import GraphModule


def copy_graph_module(gm: GraphModule) -> GraphModule:
    """A GraphModule over a copy of `gm.graph`, sharing `gm`'s submodules and attributes (Dynamo
    still owns and reads the original graph)."""
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return GraphModule(gm, graph)
