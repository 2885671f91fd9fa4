"""Replace each proven attention site by one `fv_compile::attention` node.

The operands are brought to the canonical `[B, S, H, D]` from the tensors the matcher stripped down
to (so a BSHD tensor that the model transposed to BHSD for the attention goes in as it was), the
site's masks are folded into one `[B|1, H|1, Sq|1, Sk]` mask, and the op's output is brought back
to the layout the model's code after the site expects. `simplify_views` then cancels the view
chains this leaves around the op.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from fv_compile.passes import spellings as sp
from fv_compile.passes.find_sites import (
    AttentionMatch,
    Operand,
    RegroupedView,
    ScoresView,
    regroup_dims,
)

EMITTED = "fv_compile_emitted"


class _Emitter:
    """Inserts nodes before an anchor and gives each the example value its op computes."""

    def __init__(self, graph: torch.fx.Graph, before: Node) -> None:
        self.graph = graph
        self.before = before
        self.emitted: list[Node] = []
        # factory calls (torch.full) must make fake tensors like the rest of the graph's values
        self.fake_mode = getattr(sp.value_of(before), "fake_mode", None)

    def method(self, name: str, *args: Any) -> Node:
        return self._emit("call_method", name, args, {})

    def function(self, fn: Any, *args: Any, **kwargs: Any) -> Node:
        return self._emit("call_function", fn, args, kwargs)

    def _emit(self, op: str, target: Any, args: tuple, kwargs: dict) -> Node:
        with self.graph.inserting_before(self.before):
            node = self.graph.create_node(op, target, args, kwargs)
        node.meta[EMITTED] = True
        self.emitted.append(node)
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in self.before.meta:
                node.meta[key] = self.before.meta[key]
        vals = map_arg(args, sp.value_of)
        with self.fake_mode if self.fake_mode is not None else contextlib.nullcontext():
            value = (
                getattr(vals[0], target)(*vals[1:])
                if op == "call_method"
                else target(*vals, **kwargs)
            )
        node.meta["example_value"] = value
        node.meta["val"] = value
        return node


def rewrite_site(
    gm: GraphModule,
    match: AttentionMatch,
    site_id: int,
    replaced: dict[Node, Node],
    emitted: list[Node],
) -> Node | None:
    """Rewrite one site to `fv_compile::attention(q, k, v, mask, site_id, 0, [])`; returns the op
    node, or None (the graph's uses unchanged) if the result would not match the original.

    `replaced` maps nodes replaced by earlier rewrites to their replacements (a site's operand
    can be another site's output) and is updated with this site's output. Every node inserted is
    appended to `emitted` (those left unused are removed with the site's dead nodes).
    """
    em = _Emitter(gm.graph, match.output)
    em.emitted = emitted
    outer, head, sizes = match.batch_labels, match.head_label, match.sizes

    def resolve(op: Operand) -> Operand:
        return Operand(replaced.get(op.node, op.node), op.labels)

    q = _to_bshd(em, resolve(match.q), "i", "d", outer, head, sizes, full_head=True)
    k = _to_bshd(em, resolve(match.k), "j", "d", outer, head, sizes, full_head=False)
    v = _to_bshd(em, resolve(match.v), "j", "e", outer, head, sizes, full_head=False)
    q, k, v = (_cast(em, x, match.compute_dtype) for x in (q, k, v))
    mask = _combined_mask(em, match, replaced)
    unused = _keys_no_query_attends(em, match, replaced)
    if unused is not None:
        k = em.method("masked_fill", k, unused, 0.0)
    op = em.function(torch.ops.fv_compile.attention.default, q, k, v, mask, site_id, 0, [])
    out = _from_bshd(em, op, match)
    want = (sp.shape_of(match.output), sp.dtype_of(match.output))
    if (sp.shape_of(out), sp.dtype_of(out)) != want:
        return None  # never replace with something of another shape; the emitted nodes are dead
    replaced[match.output] = out
    match.output.replace_all_uses_with(out)
    return op


def _shape(node: Node) -> tuple[int, ...]:
    """The shape of a node of a matched site or of one emitted for it: static, as the matcher
    proved for the site and shape propagation keeps for what the pass emits."""
    shape = sp.shape_of(node)
    assert shape is not None, f"{node.name} has no static shape"
    return shape


def _cast(em, node: Node, dtype: torch.dtype | None) -> Node:
    if dtype is None or sp.dtype_of(node) == dtype:
        return node
    return em.method("to", node, dtype)


def _to_bshd(em, op: Operand, seq, feat, outer, head, sizes, *, full_head: bool) -> Node:
    node, labels = op.node, list(op.labels)
    shape = list(_shape(node))
    target = outer + [seq] + ([head] if head else []) + [feat]
    present = [lab for lab in target if lab in labels]
    perm = [labels.index(lab) for lab in present]
    if perm != list(range(len(labels))):
        node = em.method("permute", node, *perm)
        shape = [shape[p] for p in perm]
    for idx, lab in enumerate(target):
        if lab not in present:
            node = em.method("unsqueeze", node, idx)
            shape.insert(idx, 1)
    want = list(shape)
    for idx, lab in enumerate(target):
        if lab in outer or lab in (seq, feat) or (lab == head and full_head):
            want[idx] = sizes[lab]
    if want != shape:
        node = em.method("expand", node, *want)
    if not outer:
        node = em.method("unsqueeze", node, 0)
    elif len(outer) > 1:
        node = em.method("reshape", node, math.prod(want[: len(outer)]), *want[len(outer) :])
    if head is None:
        node = em.method("unsqueeze", node, 2)
    return node


def _from_bshd(em, op: Node, match: AttentionMatch) -> Node:
    """The op's `[B, Sq, H, Dv]` output in the layout and dtype of the replaced node."""
    outer, head, sizes = match.batch_labels, match.head_label, match.sizes
    node = op
    if head is None:
        node = em.method("squeeze", node, 2)
    if not outer:
        node = em.method("squeeze", node, 0)
    elif len(outer) > 1:
        node = em.method("reshape", node, *[sizes[b] for b in outer], *_shape(node)[1:])
    current = outer + ["i"] + ([head] if head else []) + ["e"]
    want = list(match.out_labels)
    if match.merged is not None:
        merged, parts = match.merged
        idx = want.index(merged)
        want[idx : idx + 1] = parts
    perm = [current.index(lab) for lab in want]
    if perm != list(range(len(perm))):
        node = em.method("permute", node, *perm)
    if match.merged is not None:
        node = em.method("reshape", node, *_shape(match.output))
    dtype = sp.dtype_of(match.output)
    if dtype is not None and dtype != sp.dtype_of(node):
        node = em.method("to", node, dtype)
    return node


def _combined_mask(em, match: AttentionMatch, replaced: dict[Node, Node]) -> Node | None:
    """All of a site's mask terms as one mask broadcastable to `[B, H, Sq, Sk]`."""
    if not match.masks:
        return None
    # terms applied to the same view of the scores are combined there, then placed once
    groups: dict[tuple, tuple[list[ScoresView], list[Node]]] = {}
    for term in match.masks:
        node = replaced.get(term.node, term.node)
        if term.kind == "masked":
            node = em.function(torch.logical_not, node)
        elif term.kind == "attend" and sp.dtype_of(node) != torch.bool:
            node = em.method("bool", node)
        elif term.kind == "additive" and term.coef != 1.0:
            node = em.function(torch.mul, node, term.coef)
        is_bool = term.kind != "additive"
        groups.setdefault((repr(term.embed), is_bool), (term.embed, []))[1].append(node)
    parts = []
    for (_, is_bool), (embed, nodes) in groups.items():
        combine = torch.logical_and if is_bool else torch.add
        node = functools.reduce(lambda a, b: em.function(combine, a, b), nodes)
        for step in embed:
            node = _embed(em, node, step, attend=is_bool)
        parts.append((_mask_to_bhss(em, node, match), is_bool))
    if all(is_bool for _, is_bool in parts):
        return functools.reduce(
            lambda a, b: em.function(torch.logical_and, a, b), [p for p, _ in parts]
        )
    total = None
    for node, is_bool in parts:
        if is_bool:  # True = attend -> 0, False -> -inf
            zeros = em.function(torch.zeros_like, node, dtype=torch.float32)
            node = em.method(
                "masked_fill", zeros, em.function(torch.logical_not, node), float("-inf")
            )
        total = node if total is None else em.function(torch.add, total, node)
    return total


def _embed(em, node: Node, step: ScoresView, *, attend: bool) -> Node:
    """A mask term applied to a view of the scores, brought to the scores' own shape."""
    shape = list(_shape(node))
    if isinstance(
        step, RegroupedView
    ):  # the term broadcasts to `view`, a reshape of the scores' `base`
        view, base = step.view, step.base
        shape = [1] * (len(view) - len(shape)) + shape
        if len(shape) != len(_shape(node)):
            node = em.method("reshape", node, *shape)
        if len(view) >= len(base):  # the view split dims of the scores: merge them back
            groups = regroup_dims(tuple(base), tuple(view))
            assert groups is not None, "the score walk records a view only of a regrouping reshape"
            full = list(shape)
            for group in groups:
                if any(shape[d] != 1 for d in group):
                    for d in group:
                        full[d] = view[d]
            if full != shape:
                node = em.method("expand", node, *full)
            merged = [math.prod(full[d] for d in g) for g in groups]
        else:  # the view merged dims of the scores: split them again
            groups = regroup_dims(tuple(view), tuple(base))
            assert groups is not None, "the score walk records a view only of a regrouping reshape"
            merged = []
            for d, group in enumerate(groups):
                merged += [base[g] if shape[d] != 1 else 1 for g in group]
        return em.method("reshape", node, *merged)
    index, scores_shape = (
        step.index,
        step.full,
    )  # a term written into `scores[index]`: neutral elsewhere
    assert scores_shape is not None, "a rewritten site's scores have a static shape"
    sliced = list(torch.empty(scores_shape, device="meta")[index].shape)
    shape = [1] * (len(sliced) - len(shape)) + shape
    if shape != sliced:
        node = em.method("expand", node, *sliced)
    neutral = True if attend else 0.0
    return _placed(em, node, list(index), list(scores_shape), neutral)


def _placed(em, src: Node, index: list, full: list[int], neutral: Any) -> Node:
    """A `full`-shaped tensor holding `src` at `index` (basic slices) and `neutral` elsewhere,
    built out of place: one `slice_scatter` per sliced dim."""
    dims = [d for d, i in enumerate(index) if i != slice(None)]
    if not dims:
        return src
    d = dims[0]
    start, stop, step = index[d].indices(full[d])
    inner_shape = list(full)
    inner_shape[d] = len(range(start, stop, step))
    rest = list(index)
    rest[d] = slice(None)
    inner = _placed(em, src, rest, inner_shape, neutral)
    base = em.function(
        torch.full, tuple(full), neutral, dtype=sp.dtype_of(src), device=sp.device_of(src)
    )
    return em.function(torch.slice_scatter, base, inner, d, start, stop, step)


def _keys_no_query_attends(em, match: AttentionMatch, replaced: dict[Node, Node]) -> Node | None:
    """`[B|1, Sk, Hk|1, 1]`, True where a fill (masked_fill / where) blocks a key for every query.

    A fill *replaces* those logits, so eager never reads such a key (an uninitialised cache
    slot may hold NaN or inf); a backend adds -inf instead, and NaN + -inf is NaN. Zeroing
    those keys makes the two agree, forward and backward (eager's gradient there is 0 too)."""
    fills = [t for t in match.masks if t.fill is not None]
    if not fills:
        return None
    attend = None
    for term in fills:
        node = replaced.get(term.node, term.node)
        if term.kind == "masked":
            node = em.function(torch.logical_not, node)
        elif sp.dtype_of(node) != torch.bool:
            node = em.method("bool", node)
        for step in term.embed:
            node = _embed(em, node, step, attend=True)
        node = _mask_to_bhss(em, node, match)
        attend = node if attend is None else em.function(torch.logical_and, attend, node)
    used = em.method("any", attend, 2, True)  # [B|1, H|1, 1, Sk]
    heads, kv_heads = match.site.heads or 1, match.site.kv_heads or 1
    h = _shape(used)[1]
    if h != 1 and kv_heads != heads:  # a kv head is used if any of its query heads uses it
        b, sk = _shape(used)[0], _shape(used)[-1]
        used = em.method(
            "any", em.method("reshape", used, b, kv_heads, heads // kv_heads, 1, sk), 2
        )
    return em.function(torch.logical_not, em.method("permute", used, 0, 3, 1, 2))


def _mask_to_bhss(em, node: Node, match: AttentionMatch) -> Node:
    shape = list(_shape(node))
    labels = list(match.score_labels[len(match.score_labels) - len(shape) :])
    if match.merged is not None and match.merged[0] in labels:
        merged, parts = match.merged
        idx = labels.index(merged)
        split = [1, 1] if shape[idx] == 1 else [match.sizes[p] for p in parts]
        shape[idx : idx + 1] = split
        labels[idx : idx + 1] = parts
        node = em.method("reshape", node, *shape)
    outer, head = match.batch_labels, match.head_label
    target = outer + ([head] if head else []) + ["i", "j"]
    present = [lab for lab in target if lab in labels]
    perm = [labels.index(lab) for lab in present]
    if perm != list(range(len(labels))):
        node = em.method("permute", node, *perm)
        shape = [shape[p] for p in perm]
    for idx, lab in enumerate(target):
        if lab not in present:
            node = em.method("unsqueeze", node, idx)
            shape.insert(idx, 1)
    if not outer:
        node = em.method("unsqueeze", node, 0)
    elif len(outer) > 1:
        outer_sizes = shape[: len(outer)]
        if any(s != 1 for s in outer_sizes):
            full = [match.sizes[b] for b in outer] + shape[len(outer) :]
            if full != shape:
                node = em.method("expand", node, *full)
            node = em.method("reshape", node, math.prod(full[: len(outer)]), *full[len(outer) :])
        else:
            node = em.method("reshape", node, 1, *shape[len(outer) :])
    if head is None:
        node = em.method("unsqueeze", node, 1)
    return node
