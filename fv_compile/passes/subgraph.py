"""Lift one site out of a graph, before and after its rewrite, as a standalone GraphModule.

`fv_compile.verify` runs both on the values the model computed, to show that the rewrite is
exact where it ran. Inputs are placeholders named after the nodes of the traced graph that feed
the site, so one run of that graph supplies every site's inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.fx import Graph, GraphModule, Node


def lift(
    root: torch.nn.Module,
    nodes: Iterable[Node],
    output: Node,
    leaf_name: Callable[[Node], str] = lambda n: n.name,
) -> tuple[GraphModule, list[str]]:
    """A GraphModule computing `output` from `nodes` (all of its own nodes, in any order); every
    other node they read becomes a placeholder named `leaf_name(node)`. Returns it and the
    placeholder names, in order."""
    own = set(nodes) | {output}
    order = {n: i for i, n in enumerate(output.graph.nodes)}
    graph = Graph()
    env: dict[Node, Node] = {}
    names: list[str] = []
    for n in sorted(own, key=order.__getitem__):
        for x in n.all_input_nodes:
            if x not in own and x not in env:
                name = leaf_name(x)
                env[x] = graph.placeholder(name)
                env[x].meta.update(x.meta)
                names.append(name)
        env[n] = graph.node_copy(n, lambda x: env[x])
    graph.output(env[output])
    return GraphModule(root, graph), names


def emitted_closure(output: Node, is_own: Callable[[Node], bool]) -> list[Node]:
    """`output` and the nodes before it for which `is_own` holds, reached through such nodes."""
    seen: list[Node] = []
    stack = [output]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.append(n)
        stack.extend(x for x in n.all_input_nodes if is_own(x))
    return seen
