"""Evaluate subgraphs that depend on no input: masks and fills a model builds from constants.

A causal mask written as `torch.ones(S, S).tril()` or `torch.full(..., -inf).triu(1)` is a
constant of the graph. Evaluating it (once, at compile time) lets the matcher recognise it by its
value instead of by how it was spelled. A subgraph that draws random numbers (`torch.rand`,
`bernoulli`, dropout) or writes into a tensor is never a constant: its value differs per call.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node

from fv_compile.passes import spellings as sp

_MAX_NODES = 64


def constant_value(node: Node, max_numel: int = 1 << 22) -> Any:
    """The value of `node` if it depends on no graph input and is small enough, else None."""
    order = _constant_ancestors(node, max_numel)
    value = None
    if order is not None:
        graph = Graph()
        env: dict[Node, Node] = {}
        for n in order:
            env[n] = graph.node_copy(n, lambda x: env[x])
        graph.output(env[node])
        owner = node.graph.owning_module or torch.nn.Module()
        try:
            value = GraphModule(owner, graph)()
        except Exception:
            value = None
    return value


def _constant_ancestors(node: Node, max_numel: int) -> list[Node] | None:
    """Ancestors of `node` in topological order, or None if any is an input or too large."""
    seen: dict[Node, None] = {}
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        if n.op in ("placeholder", "get_attr", "output") or len(seen) > _MAX_NODES:
            return None
        shape = sp.shape_of(n)
        if isinstance(sp.value_of(n), torch.Tensor) and (
            shape is None or math.prod(shape) > max_numel
        ):
            return None
        if sp.mutates(n) or sp.is_random(n) or sp.is_mutated(n):
            return None
        seen[n] = None
        stack.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(seen, key=order.__getitem__)
