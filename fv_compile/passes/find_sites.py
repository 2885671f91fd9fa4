"""Find attention in a traced graph, by its semantics rather than its spelling.

Anchors are SDPA calls and softmaxes. From a softmax the matcher walks back through scale, mask,
cast and shift ops to the score contraction (matmul, bmm, baddbmm or einsum) and forward through
casts and no-op dropout to the value contraction. Every dimension of every tensor involved gets a
label (batch dims `b*`, query seq `i`, key seq `j`, qk feature `d`, value feature `e`), so the
proof that the pattern computes `softmax(scale * q k^T + mask) v` is a check of labels and sizes,
independent of layout, broadcasting or how the contraction was written.

What cannot be proven is not matched: the site is reported as skipped, with the reason.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import torch
from torch.fx import GraphModule, Node

from fv_compile.passes import spellings as sp
from fv_compile.passes.constants import constant_value
from fv_compile.passes.mask_values import combined_additive_values
from fv_compile.site import VERY_NEGATIVE, AttentionSite, NonAttentionSoftmax, blocking_limit

_VERY_NEGATIVE = VERY_NEGATIVE  # see fv_compile.site: the blocking rule is shared vocabulary


class NotAttention(Exception):
    """The anchor is a softmax that does not compute attention."""


class Unsupported(Exception):
    """The anchor computes attention, but not in a form the pass can prove and rewrite."""


@dataclass
class Operand:
    node: Node
    labels: list[str]


@dataclass
class MaskTerm:
    node: Node
    kind: str  # "attend" (bool, True = attend) | "masked" (bool, True = masked) | "additive"
    coef: float = 1.0  # additive: the factor the term reaches the softmax with
    fill: float | None = None  # attend/masked from a fill: the value blocked logits end at
    # how to bring the term from the view of the scores it was applied in to the scores' own
    # shape, innermost first
    embed: list[ScoresView] = field(default_factory=list)


class RegroupedView(NamedTuple):
    """The scores seen through a reshape that splits or merges their leading dims."""

    view: tuple[int, ...]  # the shape the term was applied in
    base: tuple[int, ...]  # the shape of the scores it is a reshape of


class SliceView(NamedTuple):
    """A slice of the scores, `scores[index]`, that a term was added into."""

    index: Any  # a tuple of basic slices
    full: tuple[int, ...] | None  # the shape of the scores (static, at a rewritten site)


ScoresView = RegroupedView | SliceView


# --- the ops between the score contraction and the softmax, as the score walk finds them ------


class Regroup(NamedTuple):
    """A reshape of the scores that only splits (or only merges) dims."""

    node: Node
    src: tuple[int, ...]
    dst: tuple[int, ...]

    @property
    def kind(self) -> str:
        return "regroup"


class Scale(NamedTuple):
    """The scores times a compile-time number."""

    node: Node
    factor: float

    @property
    def kind(self) -> str:
        return "scale"


class NoOp(NamedTuple):
    """What softmax cannot see: a cast, an identity, a detach that stops no gradient, a constant
    (or row-max) shift of every logit of a row."""

    node: Node

    @property
    def kind(self) -> str:
        return "noop"


class TensorScale(NamedTuple):
    """The scores times a tensor or symbolic value (never proven: a reason to leave the site)."""

    node: Node

    @property
    def kind(self) -> str:
        return "tensor_scale"


class Add(NamedTuple):
    """The scores plus `sign * term` (a mask or bias term)."""

    node: Node
    term: Any
    sign: float  # +1, -1, or add's alpha; NaN when alpha is not a number

    @property
    def kind(self) -> str:
        return "add"


class Fill(NamedTuple):
    """Logits replaced by `value` where a condition says so: `masked_fill(cond, value)`
    ("fill"), or `where(cond, scores, value)` ("where_keep") / `where(cond, value, scores)`
    ("where_fill")."""

    node: Node
    cond: Any
    value: Any
    how: str

    @property
    def kind(self) -> str:
        return self.how


class EnterSlice(NamedTuple):
    """The read of `scores[index]` an in-place slice update starts from."""

    node: Node
    index: Any
    full: tuple[int, ...] | None

    @property
    def kind(self) -> str:
        return "enter_slice"


class ExitSlice(NamedTuple):
    """The write of an updated slice back into the scores."""

    node: Node

    @property
    def kind(self) -> str:
        return "exit_slice"


ScoreOp = Regroup | Scale | NoOp | TensorScale | Add | Fill | EnterSlice | ExitSlice


class WalkStep(NamedTuple):
    """Where the score walk may go from a node: the scores input it continues from, and the op
    the node applies to them."""

    source: Any
    op: ScoreOp


class ScoreContraction(NamedTuple):
    """The product that made the scores, with every dim labelled (see the module doc)."""

    q: Operand
    k: Operand
    score_labels: list[str]
    sizes: dict[str, int]
    form: str  # matmul | bmm | baddbmm | einsum
    scale: float  # baddbmm's alpha, else 1
    masks: list[MaskTerm]  # baddbmm's beta * input, when beta != 0


class ValuePath(NamedTuple):
    """The softmax's way forward to the value product."""

    probs: Node  # the weights the value product reads
    output: Node  # the value product
    value: Node  # the value operand
    chain: list[Node]  # the casts, no-op dropouts and transposes between softmax and product
    perm: list[int]  # dim d of `probs` is dim perm[d] of the softmax


@dataclass
class AttentionMatch:
    """A proven attention site: everything the rewrite needs, and the row `explain` shows."""

    site: AttentionSite
    anchor: Node
    output: Node
    q: Operand
    k: Operand
    v: Operand
    out_labels: list[str]
    score_labels: list[str]
    batch_labels: list[str]  # outer batch labels, merged into the canonical batch dim
    head_label: str | None
    sizes: dict[str, int]
    kv_head_size: int
    masks: list[MaskTerm] = field(default_factory=list)
    merged: tuple[str, list[str]] | None = None  # a [B*H] label and the labels it splits into
    # What eager computes for a query row whose every key is blocked: "zero" (SDPA), "nan"
    # (softmax of -inf logits), "uniform" (softmax of one finite fill: the mean of v), or None
    # when no row can be fully blocked.
    empty_rows: str | None = None
    fill: float | None = None  # "uniform": the finite value blocked logits end at
    nodes: list[Node] = field(default_factory=list)  # the site's own nodes, operands excluded
    compute_dtype: torch.dtype | None = None  # q, k and v go to the op in this dtype
    owned_writes: list[Node] = field(default_factory=list)  # in-place ops on the site's scores


# --- entry point -------------------------------------------------------------------------------


def match_attention_sites(
    gm: GraphModule, graph_index: int = 0
) -> tuple[list[AttentionMatch], list[AttentionSite], list[NonAttentionSoftmax]]:
    """Every SDPA call and softmax of `gm`, judged: `(proven sites, attention sites left alone,
    softmaxes that are not attention)`.

    `gm`'s nodes must carry example values (Dynamo graphs do; `fv_compile.rewrite_attention`
    propagates them through a graph the user traced). Neither the graph nor its nodes' metadata
    are modified.
    """
    matches: list[AttentionMatch] = []
    skipped: list[AttentionSite] = []
    others: list[NonAttentionSoftmax] = []
    for node in list(gm.graph.nodes):
        matcher: Callable[[GraphModule, Node], AttentionMatch]
        if sp.is_sdpa(node):
            matcher = _match_sdpa
        elif sp.softmax_dim(node) is not None:
            matcher = _match_softmax
        else:
            continue
        path = module_path(node)
        try:
            m = matcher(gm, node)
        except NotAttention as e:
            others.append(NonAttentionSoftmax(path, node.name, str(e), graph_index))
            continue
        except Unsupported as e:
            form = "sdpa" if sp.is_sdpa(node) else "matmul"
            skipped.append(
                AttentionSite(path, form, "?", reason=str(e), node=node.name, graph=graph_index)
            )
            continue
        m.site.graph = graph_index
        matches.append(m)
    skipped += _sites_inside_subgraphs(gm, graph_index)
    skipped += _fused_module_attention(gm, graph_index)
    return matches, skipped, others


def _fused_module_attention(gm: GraphModule, graph_index: int) -> list[AttentionSite]:
    """`nn.MultiheadAttention` (and the layers built on it) reach the graph as one call of
    `F.multi_head_attention_forward`, projections and attention in one: listed as left alone,
    so that explain shows the attention it runs."""
    fused = {torch.nn.functional.multi_head_attention_forward}
    native = getattr(torch, "_native_multi_head_attention", None)
    if native is not None:
        fused.add(native)
    return [
        AttentionSite(
            module_path(node),
            "sdpa",
            "?",
            reason=(
                f"{getattr(node.target, '__name__', node.target)} (nn.MultiheadAttention's "
                "fused call: projections and attention in one op) is not rewritten"
            ),
            node=node.name,
            graph=graph_index,
        )
        for node in gm.graph.nodes
        if node.op == "call_function" and node.target in fused
    ]


# why a site inside a higher-order op's subgraph stays as written (`AttentionSite.reason`)
INSIDE_SUBGRAPH = "inside the subgraph of a higher-order op"


def _sites_inside_subgraphs(gm: GraphModule, graph_index: int) -> list[AttentionSite]:
    """The attention in the subgraphs of higher-order ops (`torch.utils.checkpoint`'s region,
    torch.cond's branches): the op runs its subgraph itself (a checkpoint again in the
    backward), so the pass leaves it as written, and says so rather than seeing nothing."""
    found: list[AttentionSite] = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(
            node.target, torch._ops.HigherOrderOperator
        ):
            continue
        for arg in node.args:
            if not (isinstance(arg, Node) and arg.op == "get_attr"):
                continue
            sub = getattr(gm, str(arg.target), None)
            if not isinstance(sub, GraphModule):
                continue
            matches, skipped, _ = match_attention_sites(sub, graph_index)
            op = node.target.name()
            reason = f"{INSIDE_SUBGRAPH} ({op}), which runs it as written"
            if "checkpoint" in op:
                reason += (
                    ": torch.utils.checkpoint's region; compiled regionally (regional='auto', "
                    "the default) each checkpointed block is compiled inside"
                )
            for site in [m.site for m in matches] + skipped:
                found.append(
                    AttentionSite(
                        site.module_path,
                        site.form,
                        site.layout,
                        reason=reason,
                        node=node.name,  # in graph order: where the op runs it
                        graph=graph_index,
                    )
                )
    return found


_STACK_PREFIX = re.compile(r"^L\['[^']*'\]\.?")


def module_path(node: Node) -> str:
    """Dotted path of the innermost module that ran `node` (e.g. `blocks.3.attn1`)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = _STACK_PREFIX.sub("", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']*)'\]", r".\1", path)
    parts = [p for p in path.split(".") if p and p not in ("__dict__", "_modules")]
    return ".".join(parts)


# --- SDPA --------------------------------------------------------------------------------------


def _match_sdpa(gm: GraphModule, node: Node) -> AttentionMatch:
    a = sp.sdpa_args(node)
    q, k, v = a["query"], a["key"], a["value"]
    if not all(isinstance(x, Node) for x in (q, k, v)):
        raise Unsupported("q, k or v is not a tensor in the graph")
    if a["dropout_p"] not in (0, 0.0):
        raise Unsupported(f"dropout_p={a['dropout_p']} is active (SDPA applies it even in eval)")
    if not isinstance(a["is_causal"], bool):
        raise Unsupported("is_causal is not a compile-time constant")
    if not isinstance(a["enable_gqa"], bool):
        raise Unsupported("enable_gqa is not a compile-time constant")
    sq, sk, sv = (_static_shape(x) for x in (q, k, v))
    if sq is None or sk is None or sv is None:
        raise Unsupported("q, k or v has a dynamic shape")
    n = len(sq)
    if n < 2 or len(sk) != n or len(sv) != n:
        raise Unsupported("q, k and v must have the same number of dims (>= 2)")
    batch = [f"b{p}" for p in range(n - 2)]
    sizes = {lab: s for lab, s in zip(batch, sq[:-2])}
    sizes.update(i=sq[-2], j=sk[-2], d=sq[-1], e=sv[-1])
    kv_heads = None
    if a["enable_gqa"] and n >= 3 and sk[-3] != sq[-3]:
        if n != 4 or sq[-3] % sk[-3] or sk[-3] != sv[-3]:
            raise Unsupported("enable_gqa needs [B, H, S, D] inputs with H divisible by kv heads")
        kv_heads = sk[-3]
    for name, shape in (("key", sk), ("value", sv)):
        for p, lab in enumerate(batch):
            if shape[p] not in (1, sizes[lab]) and not (kv_heads and p == n - 3):
                raise Unsupported(f"{name} batch dims {shape[:-2]} do not match query {sq[:-2]}")
    if sk[-1] != sq[-1] or sv[-2] != sk[-2]:
        raise Unsupported("k/v sizes do not match q")

    scale = a["scale"]
    if scale is None:
        scale = 1.0 / math.sqrt(sq[-1])
    elif sp.as_number(scale) is None:
        raise Unsupported("scale is not a compile-time number")
    masks: list[MaskTerm] = []
    mask = a["attn_mask"]
    if isinstance(mask, Node):
        masks.append(MaskTerm(mask, "attend" if sp.dtype_of(mask) == torch.bool else "additive"))
    elif mask is not None:
        raise Unsupported("attn_mask is not a tensor")
    score_labels = batch + ["i", "j"]
    return _finish(
        gm,
        node,
        node,
        Operand(q, batch + ["i", "d"]),
        Operand(k, batch + ["j", "d"]),
        Operand(v, batch + ["j", "e"]),
        out_labels=batch + ["i", "e"],
        score_labels=score_labels,
        sizes=sizes,
        scale=float(scale),
        masks=masks,
        causal=a["is_causal"],
        form="sdpa",
        kv_head_label=batch[-1] if kv_heads is not None else None,
    )


# --- hand-written attention --------------------------------------------------------------------


def _match_softmax(gm: GraphModule, sm: Node) -> AttentionMatch:
    softmax = sp.softmax_dim(sm)
    assert softmax is not None, "find_attention_sites calls this for softmaxes only"
    x, dim, sm_dtype = softmax
    if sm_dtype is not None:
        _check_not_narrowed(sp.dtype_of(x), sm_dtype, f"`{sm.name}`'s dtype argument")
    walk = _ScoreWalk(dim)
    found = walk.walk(x, [], 0, sm)
    if found is None:
        raise NotAttention("its input is not a product of two tensors (matmul/bmm/einsum)")
    s_raw, ops = found
    probs_end, out, value_operand, post, perm = _walk_probs(sm)
    ss = _static_shape(s_raw)
    if ss is None or len(ss) < 2:
        raise Unsupported("the scores have dynamic or too few dims")
    nd = len(ss)
    sdim = dim % nd

    contraction = _score_contraction(s_raw, sdim)
    score_labels, sizes, masks = contraction.score_labels, contraction.sizes, contraction.masks
    if score_labels[sdim] != "j":
        raise NotAttention(f"softmax over dim {dim}, not the key axis of q @ k^T")
    probs_labels = [score_labels[d] for d in perm]

    for path_node in [s_raw] + [op.node for op in ops if op.node not in walk.inplace]:
        _require_single_user(path_node, "scores", walk.own_readers)
    _require_single_user(x, "scores", walk.own_readers)
    for n in [sm] + post:
        _require_single_user(n, "attention weights")

    folding = _ScoreOps(masks, contraction.scale)
    for op in ops:
        folding.apply(op)
    scale = folding.finish()

    out_labels, v_labels = _value_contraction(out, probs_end, value_operand, probs_labels, sizes)
    return _finish(
        gm,
        sm,
        out,
        contraction.q,
        contraction.k,
        Operand(value_operand, v_labels),
        out_labels=out_labels,
        score_labels=score_labels,
        sizes=sizes,
        scale=scale,
        masks=masks,
        causal=False,
        form=contraction.form,
        inplace=walk.inplace,
    )


class _ScoreWalk:
    """Walks back from the softmax input to the score contraction, collecting the ops between
    (in forward order), the extra readers of the scores that are the site's own (a row-max
    shift's reduction), and the in-place ops on the scores that the site absorbs."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.own_readers: set[Node] = set()  # users of a score node that do not count as reuse
        self.inplace: list[Node] = []  # in-place ops on the scores, now part of the site

    def walk(
        self, node: Any, ops: list[ScoreOp], depth: int = 0, consumer: Node | None = None, stop=None
    ) -> tuple[Node, list[ScoreOp]] | None:
        """`(the score contraction, the ops from it to the softmax in forward order)`, walking
        back from `node` (or `(stop, ops)` when the walk reaches `stop`); None if it cannot."""
        if not isinstance(node, Node) or depth > 24:
            return None
        if node is stop:
            return node, ops
        ops = self._inplace_ops(node, consumer) + ops
        if (
            sp.matmul_operands(node) is not None
            or sp.einsum_operands(node) is not None
            or sp.baddbmm_operands(node) is not None
        ):
            return node, ops
        step = self._step(node)
        if step is None:
            return None
        for source, op in step:
            got = self.walk(source, [op] + ops, depth + 1, node, stop)
            if got is not None:
                return got
        return None

    def _step(self, node: Node) -> list[WalkStep] | None:
        """Where the walk may go from `node`, most likely first; None where it cannot go on."""
        src = sp.is_reshape(node)
        if src is not None:
            before, after = _static_shape(src), _static_shape(node)
            if (
                before is not None
                and after is not None
                and (
                    regroup_dims(before, after) is not None
                    or regroup_dims(after, before) is not None
                )
            ):
                return [WalkStep(src, Regroup(node, before, after))]
            return None
        r = sp.scalar_factor(node)
        if r is not None:
            return [WalkStep(r[0], Scale(node, r[1]))]
        c = sp.cast_input(node) or sp.identity_input(node) or _harmless_detach(node, "scores")
        if c is not None:
            return [WalkStep(c, NoOp(node))]
        ts = sp.tensor_factor(node)
        if ts is not None:
            return [WalkStep(ts, TensorScale(node))]
        t = sp.additive_terms(node)
        if t is not None:
            a, b, sign = t
            if isinstance(b, Node) and sign == -1.0 and self._is_row_shift(b, a):
                return [WalkStep(a, NoOp(node))]  # s - s.amax(-1, keepdim=True): softmax-invariant
            if not (isinstance(b, Node) and sp.is_tensor_node(b)):
                return [WalkStep(a, Add(node, b, sign))]  # + a number: see _ScoreOps
            steps = [WalkStep(a, Add(node, b, sign))]
            if sign == 1.0:
                steps.append(WalkStep(b, Add(node, a, 1.0)))
            return steps
        mf = sp.masked_fill_args(node)
        if mf is not None:
            return [WalkStep(mf[0], Fill(node, mf[1], mf[2], "fill"))]
        w = sp.where_args(node)
        if w is not None:
            cond, a, b = w
            steps = []
            if isinstance(a, Node) and sp.is_tensor_node(a):
                steps.append(WalkStep(a, Fill(node, cond, b, "where_keep")))
            if isinstance(b, Node) and sp.is_tensor_node(b):
                steps.append(WalkStep(b, Fill(node, cond, a, "where_fill")))
            return steps
        return None

    def _is_row_shift(self, b: Node, a: Any) -> bool:
        nd = len(_static_shape(a) or ())
        if not nd or sp.row_reduction_input(b, self.dim % nd) is not a:
            return False
        chain: list[Node] = []
        n = b
        while (
            n is not a
        ):  # getitem / values -> max -> detach -> a: nodes, as row_reduction_input saw
            chain.append(n)
            n = cast(Node, n.args[0])
        self.own_readers.update(chain)
        return True

    def _inplace_ops(self, node: Node, consumer: Node | None) -> list[ScoreOp]:
        """In-place ops on the scores `node` before `consumer` reads it, as the ops they apply
        (an unthreaded `s.masked_fill_(m, -inf)` leaves `s` as the softmax's input)."""
        # (a traced `s *= c` is the consumer itself: the walk goes through it as an op)
        writers = [
            u
            for u in node.users
            if sp.mutates(u) and u.args and u.args[0] is node and u is not consumer
        ]
        if not writers:
            return []
        order = {n: i for i, n in enumerate(node.graph.nodes)}
        ops = []
        for u in sorted(writers, key=order.__getitem__):
            if consumer is not None and order[u] > order[consumer]:
                raise Unsupported(f"`{u.name}` writes into the scores after they are read")
            if _is_slice_update(u, node):
                ops += self._slice_update(u, node)
                continue
            if sp.inplace_target(u) is not node or u.users:
                raise Unsupported(f"the scores are written in place by `{u.name}`")
            if consumer is not None and order[u] > order[consumer]:
                raise Unsupported(f"`{u.name}` writes into the scores after they are read")
            step = [st for st in self._step(u) or [] if st.source is node]
            if len(step) != 1:
                raise Unsupported(f"the scores are written in place by `{u.name}`")
            ops.append(step[0].op)
            self.inplace.append(u)
            self.own_readers.add(u)
        return ops

    def _slice_update(self, u: Node, node: Node) -> list[ScoreOp]:
        """`s[idx] = f(s[idx])` where f adds terms (through reshapes of the slice): the same as
        adding those terms, placed in the slice and zero elsewhere (decomposed relative
        position biases, as MViT writes them)."""
        _, index, value = u.args
        reads = [r for r in node.users if _is_slice_read(r, node, index)]
        sub_walk = _ScoreWalk(self.dim)
        found = sub_walk.walk(value, [], 0, u, reads[0]) if len(reads) == 1 else None
        if found is None:
            raise Unsupported(
                f"`{u.name}` writes into a slice of the scores something not read from it"
            )
        read, sub = found
        if not (_is_slice_read(read, node, index)) or len(read.users) != 1:
            raise Unsupported(
                f"`{u.name}` writes into a slice of the scores something not read from it"
            )
        if any(not isinstance(op, Regroup | Add | NoOp) for op in sub):
            kinds = sorted({op.kind for op in sub} - {"regroup", "add", "noop"})
            raise Unsupported(f"`{u.name}` does more than add to a slice of the scores ({kinds})")
        self.inplace.append(u)
        self.own_readers.update([u, read])
        self.own_readers.update(sub_walk.own_readers)
        self.inplace += sub_walk.inplace
        full = _static_shape(node)
        return [EnterSlice(read, index, full), *sub, ExitSlice(u)]


def _walk_probs(sm: Node) -> ValuePath:
    """Follow the softmax forward to the value contraction through casts, no-op dropout and
    transposes."""
    node = sm
    chain: list[Node] = []
    labels = list(range(len(sp.shape_of(sm) or ())))
    for _ in range(8):
        users = list(node.users)
        contractions = [u for u in users if _value_operand(u, node) is not None]
        if len(users) != 1:
            if contractions:
                others = [u.name for u in users if u is not contractions[0]]
                raise Unsupported(f"attention weights `{node.name}` are also used by {others}")
            break
        u = users[0]
        value = _value_operand(u, node)
        if value is not None:  # u is the contraction
            return ValuePath(node, u, value, chain, labels)
        p = sp.permutation_of(u)
        if p is not None and p[0] is node:
            labels = [labels[d] for d in p[1]]
            chain.append(u)
            node = u
            continue
        if (
            sp.cast_input(u) is node
            or sp.identity_input(u) is node
            or sp.dropout_input(u) is node
            or _harmless_detach(u, "attention weights") is node
        ):
            chain.append(u)
            node = u
            continue
        if sp.dropout_input(u) is None and _is_dropout(u):
            raise Unsupported("dropout on the attention weights is active (training mode)")
        raise NotAttention(f"its output feeds `{u.name}`, not a product with a value tensor")
    raise NotAttention("its output does not feed a product with a value tensor")


def _basic_index(index: Any) -> tuple | None:
    index = index if isinstance(index, tuple) else (index,)
    if all(
        isinstance(i, slice)
        and all(type(x) in (int, type(None)) for x in (i.start, i.stop, i.step))
        for i in index
    ):
        return index
    return None


def _is_slice_update(u: Node, node: Node) -> bool:
    return (
        u.op == "call_function"
        and u.target is operator.setitem
        and u.args[0] is node
        and _basic_index(u.args[1]) is not None
        and isinstance(u.args[2], Node)
    )


def _is_slice_read(read: Node, node: Node, index: Any) -> bool:
    return (
        read.op == "call_function"
        and read.target is operator.getitem
        and read.args[0] is node
        and read.args[1] == index
    )


def regroup_dims(src: tuple[int, ...], dst: tuple[int, ...]) -> list[list[int]] | None:
    """For a reshape `src -> dst` that only splits dims of `src` into consecutive dims of `dst`:
    the `dst` dims each `src` dim becomes (a size-1 dim of `dst` goes to the group before it);
    None for any other reshape. (A merge is the same map read the other way.)"""
    if math.prod(src) != math.prod(dst):
        return None
    groups: list[list[int]] = []
    j = 0
    for n in src:
        group, size = [], 1
        while j < len(dst) and size < n:
            size *= dst[j]
            group.append(j)
            j += 1
        if size != n:
            return None
        groups.append(group)
    rest = list(range(j, len(dst)))
    if any(dst[k] != 1 for k in rest):
        return None
    if rest:
        if not groups:
            return None
        groups[-1] += rest
    return groups


def _harmless_detach(node: Node, what: str) -> Node | None:
    """x for a detach of the scores or weights that stops no gradient (nothing there requires
    one); a detach that does stop gradients cannot be expressed by one attention op."""
    x = sp.detach_input(node)
    if x is not None and sp.requires_grad(x):
        raise Unsupported(
            f"the {what} are detached (`{node.name}`): gradients would reach q and k that eager stops"
        )
    return x


def _is_dropout(node: Node) -> bool:
    return "dropout" in str(node.target)


def _value_operand(node: Node, probs: Node) -> Node | None:
    mm = sp.matmul_operands(node)
    if mm is not None and mm[0] is probs and mm[1] is not probs:
        return mm[1]
    es = sp.einsum_operands(node)
    if es is not None and len(es[1]) == 2 and probs in es[1]:
        other = es[1][1] if es[1][0] is probs else es[1][0]
        return other if isinstance(other, Node) and other is not probs else None
    return None


def _score_contraction(s_raw: Node, sdim: int) -> ScoreContraction:
    """The score contraction `s_raw`, labelled; `sdim` is the softmax's dim of the scores."""
    ss = _static_shape(s_raw)
    masks: list[MaskTerm] = []
    scale = 1.0
    mm = sp.matmul_operands(s_raw)
    bad = sp.baddbmm_operands(s_raw)
    if mm is not None or bad is not None:
        if mm is not None:
            a, b, form = mm
        else:
            assert bad is not None
            inp, a, b, beta, alpha = bad
            form = "baddbmm"
            if sp.as_number(alpha) is None or sp.as_number(beta) is None:
                raise Unsupported("baddbmm alpha/beta are not compile-time numbers")
            scale = float(alpha)
            if float(beta) != 0.0:
                if not isinstance(inp, Node):
                    raise Unsupported("baddbmm input is not a tensor")
                masks.append(MaskTerm(inp, "additive", float(beta)))
        sa, sb = _static_shape(a), _static_shape(b)
        if sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
            raise Unsupported("q or k^T has dynamic shape or fewer than 2 dims")
        nb = len(ss) - 2
        batch = [f"b{p}" for p in range(nb)]
        # softmax over the last dim: a @ b is q @ k^T; over the one before: k @ q^T
        row, col = ("i", "j") if sdim != nb else ("j", "i")
        a_labels = [f"b{nb - (len(sa) - 2) + p}" for p in range(len(sa) - 2)] + [row, "d"]
        b_labels = [f"b{nb - (len(sb) - 2) + p}" for p in range(len(sb) - 2)] + ["d", col]
        score_labels = batch + [row, col]
        sizes = {lab: s for lab, s in zip(batch, ss[:-2])}
        sizes.update({row: ss[-2], col: ss[-1], "d": sa[-1]})
        if sa[-1] != sb[-2]:
            raise Unsupported("q and k^T feature sizes differ")
        if row == "j":
            return ScoreContraction(
                Operand(b, b_labels), Operand(a, a_labels), score_labels, sizes, form, scale, masks
            )
        return ScoreContraction(
            Operand(a, a_labels), Operand(b, b_labels), score_labels, sizes, form, scale, masks
        )

    einsum = sp.einsum_operands(s_raw)
    assert einsum is not None, "the score walk stops only at a matmul, a baddbmm or an einsum"
    eq, ops = einsum
    if len(ops) != 2 or not all(isinstance(o, Node) for o in ops):
        raise Unsupported(f"einsum {eq} has {len(ops)} operands, not two tensors (q and k)")
    if "..." in eq or "->" not in eq:
        raise Unsupported(
            f"einsum {eq}: its `...` or output could not be spelled out (dynamic shapes)"
        )
    lhs, out = eq.split("->")
    sa_s, sb_s = lhs.split(",")
    if len(set(sa_s)) != len(sa_s) or len(set(sb_s)) != len(sb_s) or len(set(out)) != len(out):
        raise Unsupported("einsum with repeated labels in one operand")
    j = out[sdim]
    # the operand holding the key axis is k; the other is q
    if j in sb_s and j not in sa_s:
        (qa, qs), (kb, ks) = (ops[0], sa_s), (ops[1], sb_s)
    elif j in sa_s and j not in sb_s:
        (qa, qs), (kb, ks) = (ops[1], sb_s), (ops[0], sa_s)
    else:
        raise NotAttention("softmax axis is not a key axis of the einsum")
    contracted = (set(qs) & set(ks)) - set(out)
    if len(contracted) != 1:
        raise Unsupported(f"einsum {eq} contracts {len(contracted)} labels, not one")
    (dl,) = contracted
    if (set(qs) | set(ks)) - set(out) - {dl}:
        raise Unsupported(f"einsum {eq} sums over a label that is not the feature")
    q_free = [c for c in out if c in qs and c not in ks]
    if not q_free:
        raise Unsupported(f"einsum {eq} has no query axis")
    before_d = qs[qs.index(dl) - 1] if qs.index(dl) > 0 else None
    il = before_d if before_d in q_free else q_free[-1]
    name = {c: f"b_{c}" for c in out}
    name.update({il: "i", j: "j", dl: "d"})
    sa, sb = _static_shape(qa), _static_shape(kb)
    if sa is None or sb is None:
        raise Unsupported("dynamic shapes")
    sizes = {name[c]: s for c, s in zip(out, ss)}
    sizes["d"] = sa[qs.index(dl)]
    score_labels = [name[c] for c in out]
    return ScoreContraction(
        Operand(qa, [name[c] for c in qs]),
        Operand(kb, [name[c] for c in ks]),
        score_labels,
        sizes,
        "einsum",
        scale,
        masks,
    )


class _ScoreOps:
    """Folds the ops between the score contraction and the softmax, in forward order, into one
    scale and a list of mask terms. Each term records what it is worth at the softmax input (a
    later scale scales the additive terms and fill values added before it) and, when it was
    applied to a reshaped view or a slice of the scores, how to bring it back to their shape."""

    def __init__(self, masks: list[MaskTerm], scale: float) -> None:
        self.masks = masks
        self.scale = scale
        self.views: list[ScoresView] = []  # open views of the scores, outermost first

    def apply(self, op: ScoreOp) -> None:
        if isinstance(op, NoOp):
            cast = sp.cast_input(op.node)
            if cast is not None:
                _check_not_narrowed(sp.dtype_of(cast), sp.dtype_of(op.node), f"`{op.node.name}`")
            return
        if isinstance(op, Regroup):
            top = self.views[-1] if self.views else None
            if isinstance(top, RegroupedView) and top.view == op.src and top.base == op.dst:
                self.views.pop()  # the view back to the shape before
            else:
                self.views.append(RegroupedView(view=op.dst, base=op.src))
            return
        if isinstance(op, EnterSlice):
            self.views.append(SliceView(op.index, op.full))
            return
        if isinstance(op, ExitSlice):
            if not self.views or not isinstance(self.views[-1], SliceView):
                raise Unsupported(f"`{op.node.name}` writes back into the scores in another shape")
            self.views.pop()
            return
        if isinstance(op, Scale):
            c = op.factor
            if c <= 0:
                raise Unsupported("scores are scaled by a non-positive factor")
            if any(isinstance(v, SliceView) for v in self.views):
                raise Unsupported("a slice of the scores is scaled (the site has no single scale)")
            for mt in self.masks:
                if mt.kind == "additive":
                    mt.coef *= c
                elif mt.fill is not None:
                    mt.fill = _in_dtype(mt.fill * c, sp.dtype_of(op.node))
            self.scale *= c
            return
        if isinstance(op, Add):
            term, sign = op.term, op.sign
            if math.isnan(sign):
                raise Unsupported("add with a non-constant alpha")
            if not isinstance(term, Node):
                shift = sp.as_number(term)
                if shift is None or not math.isfinite(shift * sign):
                    raise Unsupported(
                        f"`{op.node.name}` adds {term!r} to every logit: softmax is invariant "
                        "only to a finite shift"
                    )
                return  # a finite shift of every logit: softmax-invariant
            shape = _static_shape(term)
            if shape is not None and math.prod(shape) == 1 and not self.views:
                value = constant_value(term)
                if value is not None and bool(torch.isfinite(value).all()):
                    return  # a finite shift of every logit: softmax-invariant
                # a value known only at run time (NaN or inf in it are eager's to propagate)
                # is added as any mask is
            filled = [mt for mt in self.masks if mt.fill is not None and math.isfinite(mt.fill)]
            if filled:
                raise Unsupported(
                    f"`{op.node.name}` adds a tensor to logits already filled with {filled[0].fill:g}: "
                    "the filled logits are no longer one value, so rows the fill blocks entirely "
                    "would differ"
                )
            self._record(MaskTerm(term, "additive", sign), op.node)
            return
        if isinstance(op, Fill):
            if not isinstance(op.cond, Node):
                raise Unsupported("the mask of a fill is not a tensor")
            fill = _in_dtype(_fill_value(op.value), sp.dtype_of(op.node))
            self._record(
                MaskTerm(op.cond, "attend" if op.how == "where_keep" else "masked", fill=fill),
                op.node,
            )
            return
        if isinstance(op, TensorScale):
            raise Unsupported(
                f"scores are scaled by `{op.node.name}`, a tensor or symbolic value, not a number"
            )
        raise Unsupported(f"unexpected op {op.kind} on the scores")

    def _record(self, term: MaskTerm, at: Node) -> None:
        if self.views:
            shape, here = _static_shape(term.node), _static_shape(at)
            if shape is None or here is None or not _broadcasts(shape, here):
                raise Unsupported(f"mask `{term.node.name}` does not broadcast to the scores' view")
            term.embed = list(reversed(self.views))
        self.masks.append(term)

    def finish(self) -> float:
        if self.views:
            raise Unsupported(
                "the scores reach the softmax in another shape than they were made in"
            )
        return self.scale


def _broadcasts(shape: tuple[int, ...], to: tuple[int, ...]) -> bool:
    return len(shape) <= len(to) and all(a in (1, b) for a, b in zip(reversed(shape), reversed(to)))


def _fill_value(value: Any) -> float:
    """The number a masked_fill / where writes into the logits (a literal or a constant tensor)."""
    if isinstance(value, Node):
        value = constant_value(value)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
    v = sp.as_number(value)
    if v is None:
        raise Unsupported(f"scores are filled with {value!r}, not a compile-time number")
    return v


def _in_dtype(value: float, dtype: torch.dtype | None) -> float:
    """`value` as the logits hold it: float32's `finfo.min` times 2 is -inf there, not -6.8e38."""
    if dtype is None or not dtype.is_floating_point:
        return value
    return torch.tensor(value, dtype=torch.float64).to(dtype).item()


def _check_not_narrowed(src: torch.dtype | None, dst: torch.dtype | None, what: str) -> None:
    """A cast of the logits before the softmax must lose nothing: a backend computes them in
    float32 from q and k, so it cannot round (or overflow) them as a cast to a narrower dtype
    (float32 to bfloat16, float16 to bfloat16) does in eager."""
    if src is None or dst is None or src == dst:
        return
    if torch.finfo(dst).bits > torch.finfo(src).bits:
        return
    raise Unsupported(
        f"{what} casts the logits from {str(src).replace('torch.', '')} to "
        f"{str(dst).replace('torch.', '')} before the softmax: eager rounds them there, which "
        "no backend reproduces"
    )


def _check_fills(masks: list[MaskTerm], scale: float) -> None:
    """Every fill must block at the softmax input: -inf, or at most `blocking_limit(scale)`."""
    limit = blocking_limit(scale)
    for mt in masks:
        if mt.fill is not None and not (mt.fill == -math.inf or mt.fill <= limit):
            raise Unsupported(
                f"masked logits end at {mt.fill:g} at the softmax (after later scales), which does "
                f"not block them against logits scaled by {scale:g}: not -inf and not below {limit:g}"
            )


def _empty_row_semantics(masks: list[MaskTerm], sdpa: bool) -> tuple[str, float | None]:
    """What eager gives a query row whose every key is blocked (see `AttentionMatch.empty_rows`)."""
    if sdpa:
        return "zero", None
    finite = {mt.fill for mt in masks if mt.fill is not None and math.isfinite(mt.fill)}
    if not finite:
        return "nan", None
    if len(finite) > 1 or any(mt.fill is None or not math.isfinite(mt.fill) for mt in masks):
        raise Unsupported(
            "a finite fill combined with another mask: eager's rows that the masks block "
            "entirely are not one uniform row, and cannot be reproduced"
        )
    return "uniform", finite.pop()


def _value_contraction(out: Node, probs: Node, value: Node, score_labels, sizes):
    """Labels of `out` and of the value tensor in `out = probs @ value` (any spelling)."""
    sv, so = _static_shape(value), _static_shape(out)
    if sv is None or so is None:
        raise Unsupported("the value product has dynamic shapes")
    if sp.matmul_operands(out) is not None:
        if score_labels[-2:] != ["i", "j"]:
            raise NotAttention(
                "the value product sums the weights over the axis the softmax did not normalise: "
                "softmax over the query axis, not the key axis"
            )
        nb = len(so) - 2
        if nb != len(score_labels) - 2:
            raise Unsupported("the value product broadcasts to more batch dims than the scores")
        batch = score_labels[:-2]
        v_labels = [batch[nb - (len(sv) - 2) + p] for p in range(len(sv) - 2)] + ["j", "e"]
        out_labels = batch + ["i", "e"]
        if sv[-2] != sizes["j"]:
            raise Unsupported("value length differs from key length")
        sizes["e"] = sv[-1]
        _check_sizes(v_labels, sv, sizes, "value")
        return out_labels, v_labels
    einsum = sp.einsum_operands(out)
    assert einsum is not None, "_value_operand finds only a matmul or an einsum"
    eq, ops = einsum
    if "..." in eq or "->" not in eq:
        raise Unsupported(f"value einsum {eq}: its `...` or output could not be spelled out")
    lhs, o = eq.split("->")
    s0, s1 = lhs.split(",")
    ps, vs = (s0, s1) if ops[0] is probs else (s1, s0)
    if len(ps) != len(score_labels):
        raise Unsupported("value einsum indexes the weights with a different rank")
    pmap = dict(zip(ps, score_labels))
    contracted = (set(ps) & set(vs)) - set(o)
    if contracted != {next(c for c in ps if pmap[c] == "j")}:
        raise Unsupported(f"value einsum {eq} does not contract exactly the key axis")
    new = [c for c in vs if c not in ps]
    if len(new) != 1 or new[0] not in o:
        raise Unsupported(f"value einsum {eq} must add exactly one value-feature label")
    if set(ps) - contracted - set(o):
        raise Unsupported(f"value einsum {eq} sums over a weights label")
    for c in vs:
        if c in pmap and pmap[c] not in ("j",) and not pmap[c].startswith("b"):
            raise NotAttention(f"value einsum {eq}: the values are indexed by the query axis too")
    vmap = dict(pmap)
    vmap[new[0]] = "e"
    sizes["e"] = sv[vs.index(new[0])]
    v_labels = [vmap[c] for c in vs]
    out_labels = [vmap[c] for c in o]
    _check_sizes(v_labels, sv, sizes, "value")
    return out_labels, v_labels


# --- shared finish: normalise operands, fill the site row --------------------------------------


def _finish(
    gm,
    anchor,
    out,
    q,
    k,
    v,
    *,
    out_labels,
    score_labels,
    sizes,
    scale,
    masks,
    causal,
    form,
    kv_head_label=None,
    inplace=(),
) -> AttentionMatch:
    scale_in = scale
    _check_sizes(q.labels, _static_shape(q.node), sizes, "query")
    _check_sizes(k.labels, _static_shape(k.node), sizes, "key", divisible=kv_head_label)
    _check_sizes(v.labels, _static_shape(v.node), sizes, "value", divisible=kv_head_label)
    if "i" not in q.labels or "d" not in q.labels:
        raise Unsupported("query lacks its sequence or feature axis")
    batch = [lab for lab in score_labels if lab not in ("i", "j")]

    raw = (q, k, v)
    q, k, v, scale = _strip_operands(raw, scale, upcasts=True)
    low = _widest({sp.dtype_of(x.node) for x in (q, k, v)})
    upcasts = not (_wider(sp.dtype_of(out), low) and not _cast_down_after(out, low))
    if not upcasts:
        # the model keeps the attention's result in the wider dtype: so does the rewrite
        q, k, v, scale = _strip_operands(raw, scale_in, upcasts=False)
    if not (math.isfinite(scale) and scale > 0):
        # kernels assume it: torch's own fused SDPA with is_causal returns NaN for scale <= 0,
        # and the blocking of masked logits holds only for logits that a fill makes smaller
        raise Unsupported(f"the logits are scaled by {scale:g}, not a finite positive factor")

    merged = None
    if len(batch) == 1:
        merged = _unmerge_all(q, k, v, batch[0], sizes, upcasts)
        if merged is not None:
            (q, k, v), parts = merged
            merged = (batch[0], parts)
            batch = parts
    head = batch[-1] if len(batch) >= 2 else None
    outer = batch[:-1] if head else batch

    kv_head_size = 1
    if head is not None:
        k, v, kv_head_size = _unexpand_gqa(k, v, head, sizes, upcasts)

    dtypes = {sp.dtype_of(x.node) for x in (q, k, v)}
    if not all(d is not None and d.is_floating_point for d in dtypes):
        raise Unsupported(f"q, k and v are not all floating point: {sorted(map(str, dtypes))}")
    compute_dtype = _widest(dtypes)  # q, k, v of mixed precision all run at the widest

    _check_fills(masks, scale)
    masks, causal, nonempty = _fold_constant_masks(gm, masks, score_labels, sizes, causal, scale)
    empty_rows: str | None
    empty_rows, fill = _empty_row_semantics(masks, form == "sdpa")
    if causal and fill is not None:
        raise Unsupported(
            f"a causal mask next to a finite fill ({fill:g}): in a row both block entirely, "
            "eager's weights fall on the filled keys only"
        )
    if nonempty or not masks:
        empty_rows = None
    nodes = _site_nodes(out, [q.node, k.node, v.node] + [m.node for m in masks], inplace)
    _check_no_mutation_inside(gm, nodes, out)
    _check_gradients_not_stopped_inside(nodes, out)
    mask_kinds = {"additive" if m.kind == "additive" else "bool" for m in masks}
    keys_only = bool(masks) and _masks_keys_only(masks, score_labels, outer)
    mask_values = None
    if keys_only and "additive" in mask_kinds:  # what a key padding backend must know of it
        mask_values = combined_additive_values([(m.node, m.kind, m.coef) for m in masks])
    site = AttentionSite(
        module_path=module_path(anchor),
        form=form,
        layout=_layout_name(q.labels, outer, head, merged),
        batch=math.prod(sizes[b] for b in outer),
        heads=sizes[head] if head else 1,
        kv_heads=kv_head_size if head else 1,
        head_dim=sizes["d"],
        value_head_dim=sizes["e"],
        q_len=sizes["i"],
        kv_len=sizes["j"],
        scale=scale,
        causal=causal,
        mask=("additive" if "additive" in mask_kinds else "bool") if masks else None,
        mask_keys_only=keys_only,
        mask_values=mask_values,
        dtype=str(compute_dtype).replace("torch.", ""),
        device=str(sp.device_of(q.node)),
        trains=sp.requires_grad(out),
        node=anchor.name,
    )
    return AttentionMatch(
        site=site,
        anchor=anchor,
        output=out,
        q=q,
        k=k,
        v=v,
        out_labels=out_labels,
        score_labels=score_labels,
        batch_labels=outer,
        head_label=head,
        sizes=sizes,
        kv_head_size=kv_head_size,
        masks=masks,
        merged=merged,
        empty_rows=empty_rows,
        fill=fill,
        nodes=nodes,
        compute_dtype=compute_dtype,
        owned_writes=list(inplace),
    )


def _takes_grad_from_inputs(node: Node) -> bool:
    return any(sp.requires_grad(x) for x in node.all_input_nodes if sp.is_tensor_node(x))


def _check_gradients_not_stopped_inside(nodes: list[Node], out: Node) -> None:
    """A node of the site computed without gradient from inputs that have one (a `no_grad`
    block, `set_grad_enabled(False)`) stops gradients that one op would let through. That is
    harmless only when the op itself runs without gradient: when `out` was computed so."""
    stopped = [
        n
        for n in nodes
        if sp.is_tensor_node(n)
        and (dtype := sp.dtype_of(n)) is not None
        and dtype.is_floating_point
        and not sp.requires_grad(n)
        and _takes_grad_from_inputs(n)
    ]
    if not stopped:
        return
    if not sp.requires_grad(out) and _takes_grad_from_inputs(out):
        return  # grad mode is off where the op runs: it computes no gradient either
    raise Unsupported(
        f"gradients stop inside the site at `{stopped[0].name}` (a no_grad block or detach); "
        "one attention op would let them through"
    )


def _strip_operands(raw, scale: float, *, upcasts: bool):
    q, k, v = raw
    q, scale = _strip(q, scale, allow_scale=True, upcasts=upcasts)
    k, scale = _strip(k, scale, allow_scale=True, upcasts=upcasts)
    v, _ = _strip(v, 1.0, allow_scale=False, upcasts=upcasts)
    return q, k, v, scale


_PRECISION: dict[torch.dtype | None, int] = {
    torch.float16: 1,
    torch.bfloat16: 1,
    torch.float32: 2,
    torch.float64: 3,
}


def _wider(a: torch.dtype | None, b: torch.dtype | None) -> bool:
    return _PRECISION.get(a, 0) > _PRECISION.get(b, 0)


def _widest(dtypes) -> torch.dtype:
    return max(dtypes, key=lambda d: (_PRECISION.get(d, 0), str(d)))


def _cast_down_after(out: Node, low: torch.dtype) -> bool:
    """Whether the attention's result goes straight (through views only) into a cast to a dtype
    no wider than `low`: then computing it at `low` precision loses nothing eager keeps."""
    node = out
    for _ in range(16):
        users = list(node.users)
        if len(users) != 1:
            return False
        (u,) = users
        if sp.cast_input(u) is node:
            return not _wider(sp.dtype_of(u), low)
        if (
            sp.permutation_of(u) is not None
            or sp.is_reshape(u) is node
            or sp.identity_input(u) is node
        ):
            node = u
            continue
        return False
    return False


def _site_nodes(out: Node, operands: list[Node], writes=()) -> list[Node]:
    """The nodes the rewrite replaces: everything between the operands and `out`, in graph order
    (nodes on a path from an operand to `out`; the operands themselves excluded), and the
    in-place `writes` into the site's scores."""
    stops = set(operands)
    back: set[Node] = set()
    stack = [out]
    while stack:
        n = stack.pop()
        if n in back or n in stops:
            continue
        back.add(n)
        stack.extend(n.all_input_nodes)
    forward: set[Node] = set()
    stack = [u for o in stops for u in o.users]
    while stack:
        n = stack.pop()
        if n in forward or n not in back:
            continue
        forward.add(n)
        stack.extend(n.users)
    order = {n: i for i, n in enumerate(out.graph.nodes)}
    return sorted(forward | {out} | set(writes), key=order.__getitem__)


def _check_no_mutation_inside(gm, nodes: list[Node], out: Node) -> None:
    """The op reads q, k, v and the masks where `out` was; eager read them earlier, at the site's
    first node that reads data (views before it read nothing). A write into any tensor in between
    (an in-place op, a setitem) could change what the op reads, so such a site is left alone.
    In-place ops on the site's own intermediates (a traced `s *= c` on the scores) are the
    site's business."""
    inside = set(nodes)
    first_read = next(n for n in nodes if n is out or not sp.is_view(n))
    started = False
    for n in out.graph.nodes:
        if n is out:
            return
        if n is first_read:
            started = True
        if not started or not sp.mutates(n):
            continue
        target = n.args[0] if n.args else None
        if n in inside and isinstance(target, Node) and target in inside:
            continue
        raise Unsupported(
            f"`{n.name}` writes into a tensor in place between the site's first read and its "
            "output; the rewritten op would read after the write"
        )


def _strip(
    op: Operand, scale: float, *, allow_scale: bool, upcasts: bool = True
) -> tuple[Operand, float]:
    """Look through value-preserving views, exact upcasts (when `upcasts`), detaches that stop no
    gradient and (for q, k) out-of-place scalar scaling."""
    node, labels = op.node, list(op.labels)
    while True:
        p = sp.permutation_of(node)
        if p is not None and isinstance(p[0], Node):
            x, perm = p
            new = [""] * len(labels)
            for out_dim, in_dim in enumerate(perm):
                new[in_dim] = labels[out_dim]
            node, labels = x, new
            continue
        ident = sp.identity_input(node)
        if ident is not None:
            node = ident
            continue
        d = sp.detach_input(node)
        if d is not None and not sp.requires_grad(d):
            node = d
            continue
        c = sp.cast_input(node)
        if upcasts and c is not None and _is_exact_upcast(sp.dtype_of(c), sp.dtype_of(node)):
            node = c
            continue
        if allow_scale and not sp.mutates(node):
            f = sp.scalar_factor(node)
            if f is not None and f[1] > 0:
                node, scale = f[0], scale * f[1]
                continue
        return Operand(node, labels), scale


def _is_exact_upcast(src: torch.dtype | None, dst: torch.dtype | None) -> bool:
    return src in (torch.bfloat16, torch.float16) and dst in (torch.float32, torch.float64)


def _unmerge_all(q, k, v, label, sizes, upcasts: bool):
    """Recover `[B, H]` from a `[B*H, S, D]` layout when q, k and v all came from the same split."""
    splits = [_unmerge(x, label, sizes[label]) for x in (q, k, v)]
    if any(s is None for s in splits) or len({s[1] for s in splits}) != 1:
        return None
    n1, n2 = splits[0][1]
    outer, inner = f"{label}_0", f"{label}_1"
    sizes[outer], sizes[inner] = n1, n2
    ops = []
    for node, _split, labels in splits:
        ops.append(_strip(Operand(node, labels), 1.0, allow_scale=False, upcasts=upcasts)[0])
    return tuple(ops), [outer, inner]


def _unmerge(op: Operand, label: str, n: int):
    if op.labels.count(label) != 1 or op.labels.index(label) != 0:
        return None
    src = sp.is_reshape(op.node)
    if src is None:
        return None
    s_in, s_out = _static_shape(src), _static_shape(op.node)
    if s_in is None or len(s_in) != len(s_out) + 1 or s_in[2:] != s_out[1:]:
        return None
    n1, n2 = s_in[0], s_in[1]
    if n1 * n2 != n:
        return None
    return src, (n1, n2), [f"{label}_0", f"{label}_1"] + op.labels[1:]


def _unexpand_gqa(k: Operand, v: Operand, head: str, sizes: dict[str, int], upcasts: bool):
    """Use k/v before a repeat_interleave/expand over heads, so the backend sees real GQA."""
    if head not in k.labels or head not in v.labels:
        return k, v, 1 if head not in k.labels else _label_size(k, head, sizes)
    hk = _label_size(k, head, sizes)
    if hk != _label_size(v, head, sizes):
        raise Unsupported("k and v have different numbers of heads")
    if hk != sizes[head]:
        return k, v, hk
    ks, vs = _gqa_source(k, head), _gqa_source(v, head)
    if ks is None or vs is None or ks[1] != vs[1]:
        return k, v, hk
    k2, _ = _strip(ks[0], 1.0, allow_scale=False, upcasts=upcasts)
    v2, _ = _strip(vs[0], 1.0, allow_scale=False, upcasts=upcasts)
    return k2, v2, sizes[head] // ks[1]


def _label_size(op: Operand, label: str, sizes: dict[str, int]) -> int:
    shape = _static_shape(op.node)
    return shape[op.labels.index(label)] if label in op.labels else 1


def _gqa_source(op: Operand, head: str) -> tuple[Operand, int] | None:
    hd = op.labels.index(head)
    r = sp.repeat_interleave_args(op.node)
    if r is not None and r[2] == hd:
        return Operand(r[0], op.labels), r[1]
    single = sp.is_expand(op.node) or _tiled(op.node)
    if single is not None:  # one kv head broadcast to all heads (MQA): k.expand(B, H, S, D)
        s_x, s_o = _static_shape(single), _static_shape(op.node)
        if (
            s_x is not None
            and s_o is not None
            and len(s_x) == len(s_o)
            and s_x[hd] == 1
            and all(a in (1, b) for a, b in zip(s_x, s_o))
        ):
            return Operand(single, op.labels), s_o[hd]
    expand = sp.is_reshape(op.node)
    unsq = sp.is_expand(expand) if expand is not None else None
    x = sp.is_unsqueeze_like(unsq) if unsq is not None else None
    if not isinstance(x, Node):
        return None
    s_x, s_u, s_e, s_o = (_static_shape(n) for n in (x, unsq, expand, op.node))
    if None in (s_x, s_u, s_e, s_o) or len(s_u) != len(s_x) + 1:
        return None
    want_u = s_x[: hd + 1] + (1,) + s_x[hd + 1 :]
    g = s_e[hd + 1]
    want_e = s_x[: hd + 1] + (g,) + s_x[hd + 1 :]
    if s_u != want_u or s_e != want_e or s_o != s_x[:hd] + (s_x[hd] * g,) + s_x[hd + 1 :]:
        return None
    return Operand(x, op.labels), g


def _tiled(node: Node) -> Node | None:
    """x for `x.repeat(*reps)` (a copy of x tiled; the same as expand where x has size 1)."""
    if node.op == "call_method" and node.target == "repeat" and isinstance(node.args[0], Node):
        return node.args[0]
    return None


def _fold_constant_masks(gm, masks, score_labels, sizes, causal, scale=1.0):
    """Evaluate masks built from constants: a causal mask becomes `causal`, an all-pass one goes.

    Returns `(kept masks, causal, nonempty)`; `nonempty` is True when every kept mask is a
    constant and together (with `causal`) they leave every query row at least one key.

    A causal mask written with a finite value (-1e9, finfo.min) folds into `causal` only when
    it is the site's only mask: next to another mask, a row both block entirely would hold
    those finite logits, which decide eager's result there."""
    kept: list[MaskTerm] = []
    patterns: list[torch.Tensor | None] = []
    finite_causal: list[tuple[MaskTerm, torch.Tensor]] = []
    for mt in masks:
        if mt.embed:  # applied to a view or slice of the scores: checked when recorded
            kept.append(mt)
            patterns.append(None)
            continue
        _check_mask_shape(mt.node, score_labels, sizes)
        val = constant_value(mt.node, max_numel=1 << 24)
        attend = (
            None if val is None else _attend_pattern(val, mt.kind, mt.coef, blocking_limit(scale))
        )
        if attend is None:
            kept.append(mt)
            patterns.append(None)
            continue
        sq, sk = sizes["i"], sizes["j"]
        full = attend.expand(*attend.shape[:-2], sq, sk) if attend.dim() >= 2 else attend
        if bool(full.all()):
            continue
        if (
            attend.dim() >= 2
            and bool((full == torch.ones(sq, sk, dtype=torch.bool).tril()).all())
            and score_labels[-2:] == ["i", "j"]
            and _static_shape(mt.node)[-2:] == (sq, sk)
        ):
            if _blocks_with_a_finite_value(val, mt):
                finite_causal.append((mt, attend))
            else:
                causal = True
            continue
        kept.append(mt)
        patterns.append(attend)
    if finite_causal:
        if kept or causal:
            for mt, attend in finite_causal:
                kept.append(mt)
                patterns.append(attend)
        else:
            causal = True
    known = [p for p in patterns if p is not None]
    nonempty = bool(kept) and len(known) == len(patterns)
    if nonempty:
        shape = [sizes[lab] for lab in score_labels]
        combined = torch.ones(shape, dtype=torch.bool)
        for p in known:
            combined = combined & p
        if causal:
            combined = combined & torch.ones(sizes["i"], sizes["j"], dtype=torch.bool).tril()
        nonempty = bool(combined.any(score_labels.index("j")).all())
    return kept, causal, nonempty


def _blocks_with_a_finite_value(val: torch.Tensor, mt: MaskTerm) -> bool:
    if mt.kind == "additive":
        v = val.float() * mt.coef
        return bool(v[v <= _VERY_NEGATIVE].isfinite().any())
    return mt.fill is not None and math.isfinite(mt.fill)


def _attend_pattern(
    val: torch.Tensor, kind: str, coef: float, limit: float = _VERY_NEGATIVE
) -> torch.Tensor | None:
    """The boolean attend pattern of a constant mask, or None if it also biases the scores."""
    val = val.cpu()
    if kind == "attend":
        return val.bool()
    if kind == "masked":
        return ~val.bool()
    v = val.float() * coef
    blocked = v <= limit
    if bool((v[~blocked] == 0).all()):
        return ~blocked
    return None


def _masks_keys_only(masks, score_labels, outer) -> bool:
    """Whether every mask varies over batch and keys only (a key padding mask): not over heads,
    queries, or a merged batch*heads axis (whose label is not among `outer` once it is split)."""
    for mt in masks:
        if mt.embed:
            return False
        shape = _static_shape(mt.node)
        for size, lab in zip(shape, score_labels[len(score_labels) - len(shape) :]):
            if size != 1 and lab != "j" and lab not in outer:
                return False
    return True


def _check_mask_shape(mask: Node, score_labels, sizes) -> None:
    shape = _static_shape(mask)
    if shape is None or len(shape) > len(score_labels):
        raise Unsupported("mask has dynamic shape or more dims than the scores")
    for s, lab in zip(reversed(shape), reversed(score_labels)):
        if s not in (1, sizes[lab]):
            raise Unsupported(f"mask shape {tuple(shape)} does not broadcast to the scores")


def _layout_name(labels, outer, head, merged) -> str:
    letters = []
    for lab in labels:
        if lab == "i":
            letters.append("S")
        elif lab in ("d", "e"):
            letters.append("D")
        elif lab == head:
            letters.append("H")
        elif lab in outer:
            letters.append("B")
        else:
            letters.append("?")
    name = "".join(letters)
    if head is None and len(outer) == 1:
        name = name.replace("B", "(B*H)", 1)
    return name


def _check_sizes(labels, shape, sizes: dict[str, int], what: str, divisible=None) -> None:
    if shape is None:
        raise Unsupported(f"{what} has a dynamic shape")
    if len(labels) != len(shape):
        raise Unsupported(f"{what} rank does not match its labels")
    for lab, s in zip(labels, shape):
        if lab == divisible and sizes[lab] % s == 0:
            continue
        if lab in sizes and s not in (1, sizes[lab]):
            raise Unsupported(f"{what} dim `{lab}` has size {s}, expected {sizes[lab]}")
        if lab in ("i", "j", "d", "e") and s != sizes.get(lab, s):
            raise Unsupported(f"{what} dim `{lab}` is broadcast")


def _require_single_user(node: Node, what: str, own: Collection[Node] = frozenset()) -> None:
    """`node` feeds the site only: one user, not counting the site's own readers of it (a
    value written back into a slice of the scores has its writer as its only user)."""
    users = [u for u in node.users if u not in own]
    if len(users) > 1 or not node.users:
        raise Unsupported(f"{what} `{node.name}` are also used by {[u.name for u in users[1:]]}")


def _static_shape(node: Any):
    return sp.shape_of(node)
