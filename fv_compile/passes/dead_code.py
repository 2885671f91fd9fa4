"""Remove what a rewrite made dead, and nothing else.

FX's `eliminate_dead_code` treats every method call as pure: it deletes `buf.add_(1)`,
`cache.index_copy_(...)` and a neighbour's `scores.masked_fill_(...)` whose results are unused,
though their writes are the point. Here a node goes only when it lost its last user to the pass
(it is reached from a replaced or emitted node), computes a value without writing into anything,
and draws no random numbers (removing a draw would shift every later one).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch.fx import Graph, Node

from fv_compile.passes import spellings as sp


def erase_dead(graph: Graph, roots: Iterable[Node], owned_writes: Iterable[Node] = ()) -> int:
    """Erase `roots` that have no users, and transitively the inputs only they used; returns
    how many nodes were erased. `owned_writes` are in-place ops on a rewritten site's own
    intermediates (its scores): they go with the site."""
    owned = set(owned_writes)
    stack = [*owned, *roots]
    erased: set[Node] = set()
    while stack:
        n = stack.pop()
        if n in erased or n.users or not (n in owned or _removable(n)):
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        erased.add(n)
        stack.extend(inputs)
    return len(erased)


def _removable(n: Node) -> bool:
    if n.op not in ("call_function", "call_method", "get_attr"):
        return False
    if sp.mutates(n) or sp.is_random(n):
        return False
    return not (n.op == "call_function" and n.is_impure())
