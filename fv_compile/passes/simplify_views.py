"""Cancel the view chains around rewritten sites.

A model that transposes q to `[B, H, S, D]` for attention and the output back to `[B, S, H, D]`
leaves, after the rewrite, `transpose(permute(op_out))`: composed, the two are the identity and
the op's contiguous BSHD output flows on untouched. Only chains that start at a node the rewrite
emitted are touched; the rest of the model's graph is left as it was.
"""

from __future__ import annotations

from torch.fx import GraphModule, Node

from fv_compile.passes import spellings as sp
from fv_compile.passes.rewrite import EMITTED


def simplify_views(gm: GraphModule) -> list[Node]:
    """Cancel view chains that start at emitted nodes; returns the nodes whose uses moved to a
    simpler chain (now dead, for `erase_dead`). The graph module is not recompiled."""
    graph = gm.graph
    bypassed: list[Node] = []
    for node in list(graph.nodes):
        if node.op not in ("call_method", "call_function"):
            continue
        p = sp.permutation_of(node)
        if p is not None and isinstance(p[0], Node) and p[0].meta.get(EMITTED):
            inner = sp.permutation_of(p[0])
            if inner is not None:
                permuted, p1 = inner
                composed = [p1[i] for i in p[1]]
                _replace(graph, node, permuted, "permute", composed)
                bypassed.append(node)
            continue
        src = sp.is_reshape(node)
        if src is not None and src.meta.get(EMITTED):
            base = (sp.is_reshape(src) or src) if _is_emitted_reshape(src) else src
            if sp.shape_of(node) == sp.shape_of(base):
                node.replace_all_uses_with(base)
                bypassed.append(node)
            elif node.target == "view" and _has_inplace_user(node):
                with graph.inserting_before(node):
                    cont = graph.call_method("contiguous", (src,))
                cont.meta.update(src.meta)
                node.replace_input_with(src, cont)
            elif node.target == "view" or base is not src:
                shape = sp.shape_of(node)
                assert shape is not None, "a view of an emitted node has the static shape of a site"
                with graph.inserting_before(node):
                    new = graph.call_method("reshape", (base, *shape))
                new.meta.update(node.meta)
                new.meta[EMITTED] = True
                node.replace_all_uses_with(new)
                bypassed.append(node)
    return bypassed


def _is_emitted_reshape(node: Node) -> bool:
    return node.meta.get(EMITTED, False) and sp.is_reshape(node) is not None


def _replace(graph, node: Node, src: Node, _kind: str, perm: list[int]) -> None:
    if perm == list(range(len(perm))):
        node.replace_all_uses_with(src)
        return
    with graph.inserting_before(node):
        new = graph.call_method("permute", (src, *perm))
    new.meta.update(node.meta)
    new.meta[EMITTED] = True
    node.replace_all_uses_with(new)


def _has_inplace_user(node: Node) -> bool:
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            if sp.mutates(u):
                return True
            if sp.is_reshape(u) is not None or sp.permutation_of(u) is not None:
                stack.append(u)
    return False
