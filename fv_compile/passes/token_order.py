"""Run a stretch of the graph in a permutation of the video tokens, not each site in it.

A sparse video attention backend (sliding tile attention) works on its tokens in tile order: it
gathers q, k and v into that order before every site and scatters the output back after it. Between
two such sites a video DiT does almost nothing that depends on where a token sits: norms over
features, linears, gated residuals, MLPs, cross-attention whose queries are the video tokens. Every
such op commutes with a permutation P of the tokens: `f(P x) = P f(x)`. This pass proves that op by
op and, where the proof holds, computes the whole stretch on permuted tokens: one gather where the
tokens enter it, one scatter where they leave, and the sites in between receive tokens already in
their order (the caller gives them the ids of sites that know it).

The proof, from the graph alone:

* A node is either *permuted* (its value is `P` applied along one dim, its token dim, of what the
  traced graph computes), *neutral* (it reads permuted values but its own value is what the traced
  graph computes: the text part of a joint sequence, a size), or computed as traced.
* Every node that reads a permuted value must be on an allow-list of ops that commute with P along
  that dim, checked against the shapes the trace recorded (`example_value`): elementwise ops and
  their broadcasting, casts, linear / matmul on the feature dim, layer and RMS norms, softmax and
  reductions over other dims, views and reshapes that keep the token dim whole (the dim is followed
  through a reshape by the sizes after it, which a reshape of a row-major tensor preserves exactly),
  slices, splits and concatenations along other dims or at the borders of the joint text, writes
  into a buffer the stretch itself allocated, and attention sites. Anything else reading a
  permuted value is a border, or, between the first and the last site, stops the pass.
* The token dim of a joint sequence is a list of segments: the video tokens (permuted) and the
  text tokens (never permuted). Cutting or joining the sequence is allowed only at segment borders.
* A value that enters the stretch with the token dim (a RoPE table, the residual stream) is
  gathered once, along the dim the op that reads it aligns with the tokens; a permuted value read
  by a node computed as traced is scattered back once.

Where the proof fails between the first and the last site (an op it cannot classify, an op that
indexes the token dim, an intermediate that escapes the stretch, a mutation) nothing changes and
the result says which op stopped it. The rewritten copy is then run once on fake tensors: every
node must still trace, with the shape it had, or the copy is dropped. Pure FX: which sites work
in the permutation, and what it is, the caller says; the permutation itself enters the graph as
two index placeholders.
"""

from __future__ import annotations

import functools
import inspect
import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node
from torch.fx.node import map_aggregate

from fv_compile.fx_graphs import copy_graph_module
from fv_compile.passes import spellings as sp

GATHER_INPUT = "fv_token_gather"  # placeholder: long [N], slot i holds token gather[i]
SCATTER_INPUT = "fv_token_scatter"  # placeholder: long [N], the inverse permutation

_ATTENTION = "fv_compile::attention"


@dataclass(frozen=True)
class TokenSite:
    """How one rewritten `fv_compile::attention` site treats a permutation of the video tokens.

    permuted: the site works in the permutation: given q, k and v whose video tokens are
        permuted (its text tokens, `text_len` of them before or after the video, not), it
        returns its output permuted the same way. Such sites are the stretch's anchors.
    Otherwise the site is dense, non-causal attention without positions: its output rows follow
    its query rows, and its keys and values may be permuted alike (or not at all).
    """

    permuted: bool
    video_len: int = 0
    text_len: int = 0
    text_first: bool = False


@dataclass(frozen=True)
class Layout:
    """Where a permuted value holds its tokens: dim `dim`, as segments `(length, permuted)`."""

    dim: int
    segments: tuple[tuple[int, bool], ...]

    @property
    def length(self) -> int:
        return sum(n for n, _ in self.segments)

    @property
    def permuted(self) -> bool:
        return any(p for _, p in self.segments)

    def at(self, dim: int) -> Layout:
        return Layout(dim, self.segments)


class _Neutral:
    def __repr__(self) -> str:
        return "NEUTRAL"


NEUTRAL = _Neutral()  # reads permuted values, computes what the traced graph computes


@dataclass
class TokenOrderResult:
    """What the pass did: `gm` is the rewritten copy, or None when it left the graph alone."""

    gm: GraphModule | None
    reason: str = ""  # why the graph was left alone (empty when rewritten)
    stopped_at: str = ""  # the node that stopped the proof, when one did
    video_len: int = 0
    sites: int = 0  # sites that now receive permuted tokens
    gathered: list[str] = field(default_factory=list)  # the values gathered where tokens enter
    scattered: list[str] = field(default_factory=list)  # the values scattered where they leave
    bytes_per_site: int = 0  # what the sites' own reorders move (q, k, v and output)
    bytes_hoisted: int = 0  # what the gathers and scatters move

    @property
    def applied(self) -> bool:
        return self.gm is not None


class _Stop(Exception):
    """The proof failed at `node`: `why` says how."""

    def __init__(self, node: Node, why: str) -> None:
        super().__init__(why)
        self.node = node
        self.why = why


# --------------------------------------------------------------------------------------------
# the ops the proof knows


def _targets(*fns: Any) -> set[Any]:
    return {f for f in fns if f is not None}


_ELEMENTWISE_FUNCS = _targets(
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod,
    operator.pow, operator.neg, operator.pos, operator.abs, operator.invert, operator.and_,
    operator.or_, operator.xor, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
    operator.ge,
    torch.add, torch.sub, torch.subtract, torch.rsub, torch.mul, torch.multiply, torch.div,
    torch.divide, torch.true_divide, torch.floor_divide, torch.remainder, torch.fmod, torch.pow,
    torch.neg, torch.negative, torch.abs, torch.exp, torch.exp2, torch.expm1, torch.log,
    torch.log2, torch.log10, torch.log1p, torch.sqrt, torch.rsqrt, torch.square, torch.sin,
    torch.cos, torch.tan, torch.tanh, torch.sinh, torch.cosh, torch.asin, torch.acos, torch.atan,
    torch.atan2, torch.sigmoid, torch.erf, torch.erfc, torch.reciprocal, torch.sign, torch.sgn,
    torch.floor, torch.ceil, torch.round, torch.trunc, torch.frac, torch.clamp, torch.clip,
    torch.clamp_min, torch.clamp_max, torch.minimum, torch.maximum, torch.fmin, torch.fmax,
    torch.where, torch.lerp, torch.addcmul, torch.addcdiv, torch.logical_not, torch.logical_and,
    torch.logical_or, torch.logical_xor, torch.bitwise_not, torch.eq, torch.ne, torch.lt,
    torch.le, torch.gt, torch.ge, torch.isnan, torch.isinf, torch.isfinite, torch.nan_to_num,
    torch.masked_fill, torch.relu, torch.hypot,
    F.gelu, F.silu, F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.mish, F.softplus,
    F.softsign, F.hardswish, F.hardsigmoid, F.hardtanh, F.sigmoid, F.tanh, F.logsigmoid,
    F.tanhshrink, getattr(torch._C._nn, "gelu", None), getattr(torch._C._nn, "silu", None),
)  # fmt: skip

_ELEMENTWISE_METHODS = {
    "add", "sub", "rsub", "mul", "div", "true_divide", "floor_divide", "remainder", "fmod", "pow",
    "neg", "negative", "abs", "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sqrt",
    "rsqrt", "square", "sin", "cos", "tan", "tanh", "sinh", "cosh", "atan2", "sigmoid", "erf",
    "erfc", "reciprocal", "sign", "sgn", "floor", "ceil", "round", "trunc", "frac", "clamp",
    "clip", "clamp_min", "clamp_max", "minimum", "maximum", "fmin", "fmax", "lerp", "addcmul",
    "addcdiv", "logical_not", "logical_and", "logical_or", "logical_xor", "bitwise_not", "eq",
    "ne", "lt", "le", "gt", "ge", "isnan", "isinf", "isfinite", "nan_to_num", "masked_fill",
    "where", "relu", "hypot",
}  # fmt: skip

# value-keeping ops: the value (up to dtype or device) of the first argument
_IDENTITY_METHODS = {
    "contiguous", "clone", "detach", "float", "half", "bfloat16", "double", "bool", "int", "long",
}  # fmt: skip
_IDENTITY_FUNCS = _targets(torch.clone, torch.detach)

_REDUCTION_METHODS = {
    "sum",
    "mean",
    "amax",
    "amin",
    "logsumexp",
    "prod",
    "all",
    "any",
    "nansum",
    "nanmean",
}
_REDUCTION_FUNCS = {
    torch.sum: "sum", torch.mean: "mean", torch.amax: "amax", torch.amin: "amin",
    torch.logsumexp: "logsumexp", torch.prod: "prod", torch.all: "all", torch.any: "any",
    torch.nansum: "nansum", torch.nanmean: "nanmean",
}  # fmt: skip
_VAR_METHODS = {"var", "std"}
_VAR_FUNCS = {torch.var: "var", torch.std: "std"}

_SOFTMAX_FUNCS = _targets(
    torch.softmax, torch.log_softmax, F.softmax, F.log_softmax, torch.special.softmax
)
_SOFTMAX_METHODS = {"softmax", "log_softmax"}

_LAYER_NORMS = _targets(F.layer_norm, torch.layer_norm)
_RMS_NORMS = _targets(getattr(F, "rms_norm", None), getattr(torch, "rms_norm", None))
_LINEAR = _targets(F.linear, torch._C._nn.linear)
_MATMUL_FUNCS = _targets(operator.matmul, torch.matmul, torch.mm, torch.bmm)
_MATMUL_METHODS = {"matmul", "mm", "bmm"}

_RESHAPE_METHODS = {
    "view",
    "reshape",
    "flatten",
    "unflatten",
    "squeeze",
    "unsqueeze",
    "view_as",
    "reshape_as",
}
_RESHAPE_FUNCS = _targets(
    torch.reshape, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze
)
_EXPAND_METHODS = {"expand", "expand_as"}
_EXPAND_FUNCS = _targets(torch.broadcast_to)
_SPLIT_METHODS = {"split", "split_with_sizes", "chunk", "unbind"}
_SPLIT_FUNCS = {torch.split: "split", torch.chunk: "chunk", torch.unbind: "unbind"}
_CAT_FUNCS = _targets(torch.cat, torch.concat, torch.concatenate)
_LIKE_FUNCS = _targets(torch.empty_like, torch.zeros_like, torch.ones_like, torch.full_like)
_SIZE_METHODS = {"size", "dim", "numel", "ndimension", "nelement", "get_device"}
_SIZE_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}


def _is_attention(node: Node) -> bool:
    t = node.target
    return (
        node.op == "call_function"
        and isinstance(t, torch._ops.OpOverload)
        and t.name() == _ATTENTION
    )


def _name(node: Node) -> str:
    """The op a node calls, as a user reads it (`torch.cumsum`, `.view`, `operator.getitem`)."""
    if node.op == "call_method":
        return f".{node.target}"
    if node.op == "call_function":
        target = node.target
        module = getattr(target, "__module__", None) or ""
        name = getattr(target, "__name__", str(target))
        if module.startswith("torch._ops") or hasattr(target, "_schema"):
            return str(target)
        short = {"_operator": "operator", "torch._C._nn": "torch.nn.functional",
                 "torch._C._VariableFunctions": "torch", "torch.functional": "torch"}  # fmt: skip
        return f"{short.get(module, module)}.{name}" if module else name
    return f"{node.op} {node.target}"


def _nd(node: Any) -> int:
    shape = sp.shape_of(node)
    return -1 if shape is None else len(shape)


def _shape(node: Any) -> tuple[int, ...]:
    """The static shape of a node the prover reads as a tensor: `_Reader.layout` gives a layout
    only to nodes of static shape, and the callers read the shapes of those or of their users."""
    shape = sp.shape_of(node)
    assert shape is not None, f"{node} has a static shape"
    return shape


def _tensor_nodes(args: Any) -> list[Node]:
    found: list[Node] = []

    def visit(a: Any) -> Any:
        if isinstance(a, Node) and sp.is_tensor_node(a):
            found.append(a)
        return a

    map_aggregate(args, visit)
    return found


def _nbytes(node: Node) -> int:
    val = sp.value_of(node)
    if not isinstance(val, torch.Tensor):
        return 0
    return val.numel() * val.element_size()


def _norm_dim(dim: Any, nd: int) -> int | None:
    if isinstance(dim, bool) or not isinstance(dim, int) or nd <= 0:
        return None
    return dim % nd if -nd <= dim < nd else None


def _cut(
    segments: tuple[tuple[int, bool], ...], start: int, stop: int
) -> tuple[tuple[int, bool], ...] | None:
    """The segments of positions `[start, stop)`; None when the cut splits a permuted segment."""
    out: list[tuple[int, bool]] = []
    pos = 0
    for n, permuted in segments:
        lo, hi = max(start, pos), min(stop, pos + n)
        if lo < hi:
            if permuted and (lo, hi) != (pos, pos + n):
                return None
            out.append((hi - lo, permuted))
        pos += n
    return _merged(out)


def _merged(segments: Iterable[tuple[int, bool]]) -> tuple[tuple[int, bool], ...]:
    """Adjacent text segments as one (video segments stay apart: each is a whole permutation)."""
    out: list[tuple[int, bool]] = []
    for n, permuted in segments:
        if n == 0:
            continue
        if out and not permuted and not out[-1][1]:
            out[-1] = (out[-1][0] + n, False)
        else:
            out.append((n, permuted))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# the proof: one rule per op, over the layouts of its inputs


@dataclass
class _Ok:
    """A rule's answer: the node's value (`Layout`, `NEUTRAL`, a tuple of them, or None for a
    value computed as traced), and the values it reads that must be gathered first."""

    value: Any
    gathers: dict[Node, Layout] = field(default_factory=dict)


class _Reader:
    """What a rule sees of its inputs: the layout of permuted ones; for the others, a gather
    request when the rule needs one (a value entering the stretch)."""

    def __init__(self, prover: _Prover, node: Node, seeded: bool) -> None:
        self.prover = prover
        self.node = node
        self.seeded = seeded
        self.gathers: dict[Node, Layout] = {}

    def stop(self, why: str) -> _Stop:
        return _Stop(self.node, why)

    def of(self, x: Any) -> Any:
        """The layout of `x` (a tuple for tuples), NEUTRAL, or None (as traced, not gathered)."""
        if not isinstance(x, Node):
            return None
        st = self.prover.state.get(x)
        if st is not None:
            return st
        if x in self.gathers:
            return self.gathers[x]
        if self.seeded:
            want = self.prover.want.get(x)
            if want is not None and self.prover.gatherable(x, want):
                self.gathers[x] = want
                return want
        return None

    def layout(self, x: Any) -> Layout | None:
        lay = self.of(x)
        if isinstance(lay, tuple):
            raise self.stop(f"{_name(self.node)} reads a tuple of permuted values as a tensor")
        return lay if isinstance(lay, Layout) else None

    def need(self, x: Node, layout: Layout) -> None:
        """`x` (as traced) enters permuted with `layout`: gather it."""
        if not self.prover.gatherable(x, layout):
            raise self.stop(
                f"{x.name} cannot be brought into the token order along dim {layout.dim}"
            )
        have = self.gathers.get(x)
        if have is not None and have != layout:
            raise self.stop(f"{_name(self.node)} reads {x.name} in two token orders")
        self.gathers[x] = layout


class _Prover:
    def __init__(self, gm: GraphModule, sites: dict[int, TokenSite], sharded: bool = False) -> None:
        self.gm = gm
        # the stretch is to run on one rank's share of the video tokens, not a permutation of
        # them all: an op must then also keep each token's value apart from every other token's
        # (no size read of the token dim, no attention over sharded keys but at the anchors)
        self.sharded = sharded
        self.graph = gm.graph
        self.sites = sites
        self.order = {n: i for i, n in enumerate(self.graph.nodes)}
        self.state: dict[Node, Any] = {}  # node -> Layout | NEUTRAL | tuple (permuted or neutral)
        self.want: dict[Node, Layout] = {}  # node -> the layout its readers want it in
        self.conflicted: set[Node] = set()
        self.views_to_reshape: set[Node] = set()
        self.fresh_writes: dict[Node, list[Node]] = {}  # buffer -> the setitem nodes filling it
        self.given_back: set[Node] = (
            set()
        )  # upstream nodes cheaper to gather than to compute permuted
        self.tail_wants: dict[Node, Layout] = {}  # values the tail past the last site would gather

    # -- which values can be gathered ----------------------------------------------------------

    def gatherable(self, x: Node, layout: Layout) -> bool:
        shape = sp.shape_of(x)
        if (
            shape is None
            or not (0 <= layout.dim < len(shape))
            or shape[layout.dim] != layout.length
        ):
            return False
        return sp.is_tensor_node(x) and not isinstance(sp.value_of(x), tuple)

    # -- the rules -----------------------------------------------------------------------------

    def rule(self, node: Node, seeded: bool) -> _Ok:
        r = _Reader(self, node, seeded)
        value = self._rule(node, r)
        if value is not None and not isinstance(value, (Layout, tuple)) and value is not NEUTRAL:
            raise AssertionError(value)
        if isinstance(value, Layout) and not value.permuted:
            value = NEUTRAL
        if isinstance(value, tuple):
            value = tuple(NEUTRAL if isinstance(v, Layout) and not v.permuted else v for v in value)
            if not any(isinstance(v, Layout) for v in value):
                value = NEUTRAL
        return _Ok(value, r.gathers)

    def _rule(self, node: Node, r: _Reader) -> Any:
        if node.op == "call_function" and node.target is operator.getitem:
            src = cast(Node, node.args[0])
            if isinstance(sp.value_of(src), (tuple, list)):
                return self._tuple_item(node, r)
            return self._index(node, r, src, node.args[1])
        if node.op == "call_function" and node.target is operator.setitem:
            return self._setitem(node, r)
        if node.op == "call_function" and node.target is getattr:
            if node.args[1] in _SIZE_ATTRS:
                if self.sharded and node.args[1] == "shape":
                    raise r.stop("reads the shape of a value whose tokens are sharded")
                return NEUTRAL
            if node.args[1] in ("T", "mT"):
                return self._permute(node, r)
            raise r.stop(f"attribute `{node.args[1]}` of a permuted value")
        if _mutates(node):
            raise r.stop(f"{_name(node)} writes into a tensor")
        if sp.is_random(node):
            raise r.stop(
                f"{_name(node)} draws random numbers: permuted tokens would draw other ones"
            )
        if _is_attention(node):
            return self._attention(node, r)
        if node.op == "call_method":
            name = node.target
            if name in _SIZE_METHODS:
                if self.sharded and name in ("size", "numel", "nelement"):
                    raise r.stop(f"{_name(node)} of a value whose tokens are sharded")
                return NEUTRAL
            if name in _ELEMENTWISE_METHODS:
                return self._elementwise(node, r, list(node.args) + list(node.kwargs.values()))
            if name in _IDENTITY_METHODS:
                return self._elementwise(node, r, [node.args[0]])
            if name in ("to", "type", "type_as"):
                return self._cast(node, r)
            if name in _REDUCTION_METHODS:
                return self._reduce(node, r, 1)
            if name in _VAR_METHODS:
                return self._reduce(node, r, 1, keyword_only=True)
            if name == "norm":
                return self._reduce(node, r, 2)
            if name in _SOFTMAX_METHODS:
                return self._softmax(node, r)
            if name in _MATMUL_METHODS:
                return self._matmul(node, r)
            if name in _RESHAPE_METHODS:
                return self._reshape(node, r)
            if name in _EXPAND_METHODS:
                return self._expand(node, r)
            if name in ("permute", "transpose", "swapaxes", "swapdims", "t"):
                return self._permute(node, r)
            if name in _SPLIT_METHODS:
                return self._split(node, r, name)
            if name == "narrow":
                return self._narrow(node, r)
            if name == "repeat_interleave":
                return self._repeat_interleave(node, r)
            raise r.stop(f"{_name(node)} is not known to commute with a token permutation")
        if node.op == "call_function":
            t = node.target
            if t in _ELEMENTWISE_FUNCS:
                return self._elementwise(node, r, list(node.args) + list(node.kwargs.values()))
            if t in _IDENTITY_FUNCS or sp.dropout_input(node) is not None:
                return self._elementwise(node, r, [node.args[0]])
            if t in _REDUCTION_FUNCS:
                return self._reduce(node, r, 1)
            if t in _VAR_FUNCS:
                return self._reduce(node, r, 1, keyword_only=True)
            if t in _SOFTMAX_FUNCS:
                return self._softmax(node, r)
            if t in _LAYER_NORMS or t in _RMS_NORMS:
                return self._norm(node, r)
            if t in _LINEAR:
                return self._linear(node, r)
            if t in _MATMUL_FUNCS:
                return self._matmul(node, r)
            if t in _RESHAPE_FUNCS:
                return self._reshape(node, r)
            if t in _EXPAND_FUNCS:
                return self._expand(node, r)
            if t in (torch.permute, torch.transpose, torch.swapaxes, torch.swapdims):
                return self._permute(node, r)
            if t in _SPLIT_FUNCS:
                return self._split(node, r, _SPLIT_FUNCS[t])
            if t in _CAT_FUNCS:
                return self._cat(node, r)
            if t is torch.stack:
                return self._stack(node, r)
            if t is torch.narrow:
                return self._narrow(node, r)
            if t is torch.repeat_interleave:
                return self._repeat_interleave(node, r)
            if t in _LIKE_FUNCS:
                return self._like(node, r)
        raise r.stop(f"{_name(node)} is not known to commute with a token permutation")

    # elementwise ops with broadcasting: out[..t..] = f(in_i[..t or 0..])
    def _elementwise(
        self, node: Node, r: _Reader, data: list[Any], templates: Iterable[Node] = ()
    ) -> Any:
        """`templates`: inputs read for their dtype or device only (type_as, to(other))."""
        out = sp.shape_of(node)
        if out is None:
            raise r.stop(f"{_name(node)} has no static shape")
        tensors = _tensor_nodes(data)
        found: Layout | None = None
        for a in tensors:
            lay = r.layout(a)
            if lay is None:
                continue
            d = lay.dim + len(out) - _nd(a)
            here = lay.at(d)
            if found is None:
                found = here
            elif found != here:
                raise r.stop(f"{_name(node)} combines values permuted along different dims")
        if found is None:
            self._account(node, r, [*tensors, *templates])
            return None
        if out[found.dim] != found.length:
            raise r.stop(f"{_name(node)} changes the token dim")
        for a in tensors:
            if isinstance(r.of(a), Layout):
                continue
            shape = sp.shape_of(a)
            if shape is None:
                raise r.stop(f"{a.name} has no static shape")
            j = found.dim - (len(out) - len(shape))
            if j < 0 or shape[j] == 1:
                continue  # broadcast along the tokens: the same for every token
            r.need(a, found.at(j))
        self._account(node, r, [*tensors, *templates])
        return found

    def _cast(self, node: Node, r: _Reader) -> Any:
        """to(dtype | device | tensor), type(dtype), type_as(tensor): the value, recast. A
        tensor argument gives only its dtype (and device)."""
        if node.target == "type" and any(isinstance(a, str) for a in node.args[1:]):
            raise r.stop("Tensor.type with a type name")
        if sp.shape_of(node) != sp.shape_of(node.args[0]):
            raise r.stop(f"{_name(node)} changes the shape")
        for a in list(node.args[1:]) + list(node.kwargs.values()):
            if (
                isinstance(a, Node)
                and not sp.is_tensor_node(a)
                and not isinstance(sp.value_of(a), (torch.dtype, torch.device))
            ):
                raise r.stop(f"{_name(node)} with a computed argument")
        templates = [a for a in _tensor_nodes(list(node.args[1:]) + list(node.kwargs.values()))]
        found = self._elementwise(node, r, [node.args[0]], templates)
        if found is None:
            self._account(node, r, _tensor_nodes(list(node.args) + list(node.kwargs.values())))
        return found

    def _account(self, node: Node, r: _Reader, read: Iterable[Node]) -> None:
        """Every permuted input of `node` was read by its rule in a role the rule understood."""
        read = set(read)
        for x in node.all_input_nodes:
            if x not in read and isinstance(self.state.get(x), (Layout, tuple)):
                raise r.stop(
                    f"{_name(node)} reads the permuted {x.name} in a way the proof does not know"
                )

    def _reduce(self, node: Node, r: _Reader, dim_at: int, keyword_only: bool = False) -> Any:
        x = cast(Node, node.args[0])
        lay = r.layout(x)
        if lay is None:
            self._account(node, r, [x])
            return None
        nd = _nd(x)
        dim = node.kwargs.get("dim", None)
        if dim is None and not keyword_only and len(node.args) > dim_at:
            dim = node.args[dim_at]
        keepdim = node.kwargs.get("keepdim", None)
        if keepdim is None and not keyword_only and len(node.args) > dim_at + 1:
            keepdim = node.args[dim_at + 1]
        if keyword_only and (
            len(node.args) > 2 or (len(node.args) == 2 and isinstance(node.args[1], bool))
        ):
            raise r.stop(f"{_name(node)} with positional arguments the proof does not read")
        if keyword_only and len(node.args) == 2:
            dim = node.args[1]
        keepdim = bool(keepdim)
        dims = dim if isinstance(dim, (tuple, list)) else (dim,)
        normed = [_norm_dim(d, nd) for d in dims]
        # an empty dim list (`dim=()`, `dim=[]`) reduces over every dim, like no dim at all
        if dim is None or not normed or any(d is None for d in normed):
            raise r.stop(f"{_name(node)} reduces over every dim, the tokens too")
        if lay.dim in normed:
            raise r.stop(f"{_name(node)} reduces over the token dim")
        want_nd = nd if keepdim else nd - len(set(normed))
        if _nd(node) != want_nd:
            raise r.stop(f"{_name(node)}: the reduced shape is not what its arguments say")
        d = (
            lay.dim
            if keepdim
            else lay.dim - len({k for k in normed if k is not None and k < lay.dim})
        )
        self._account(node, r, [x])
        return lay.at(d)

    def _softmax(self, node: Node, r: _Reader) -> Any:
        x = cast(Node, node.args[0])
        lay = r.layout(x)
        if lay is None:
            self._account(node, r, [x])
            return None
        dim = sp.arg(node, 1, "dim")
        d = _norm_dim(dim, _nd(x))
        if d is None:
            raise r.stop(f"{_name(node)} without an explicit dim")
        if d == lay.dim:
            raise r.stop(f"{_name(node)} normalises over the token dim")
        self._account(node, r, [x])
        return lay

    def _norm(self, node: Node, r: _Reader) -> Any:
        x = cast(Node, node.args[0])
        lay = r.layout(x)
        shape = sp.arg(node, 1, "normalized_shape")
        k = (
            1
            if isinstance(shape, int)
            else len(shape)
            if isinstance(shape, (tuple, list))
            else None
        )
        if k is None:
            raise r.stop(f"{_name(node)} with a computed normalized_shape")
        if lay is None:
            self._account(node, r, [x])
            return None
        if lay.dim >= _nd(x) - k:
            raise r.stop(f"{_name(node)} normalises over the token dim")
        self._account(node, r, [x])  # weight, bias: over the normalised dims, never permuted
        return lay

    def _linear(self, node: Node, r: _Reader) -> Any:
        x = cast(Node, node.args[0])
        lay = r.layout(x)
        if lay is None:
            self._account(node, r, [x])
            return None
        if lay.dim == _nd(x) - 1:
            raise r.stop("a linear layer over the token dim")
        self._account(node, r, [x])  # weight and bias permuted would have been refused here
        return lay

    def _matmul(self, node: Node, r: _Reader) -> Any:
        a, b = cast(Node, node.args[0]), cast(Node, node.args[1])
        la, lb = r.layout(a), r.layout(b)
        sa, sb, so = sp.shape_of(a), sp.shape_of(b), sp.shape_of(node)
        if sa is None or sb is None or so is None or len(sa) < 2 or len(sb) < 2:
            raise r.stop(f"{_name(node)} of vectors or of unknown shapes")
        if la is not None and lb is not None:
            raise r.stop(f"{_name(node)} of two permuted values")
        if la is None and lb is None:
            self._account(node, r, [a, b])
            return None
        if la is not None:  # rows of a are the tokens (or a batch dim is)
            lay, own, other = la, sa, sb
            if lay.dim == len(own) - 1:
                raise r.stop(f"{_name(node)} contracts over the token dim")
        else:
            assert lb is not None, "one of the two is permuted: both unpermuted returned above"
            lay, own, other = lb, sb, sa
            if lay.dim == len(own) - 2:
                raise r.stop(f"{_name(node)} contracts over the token dim")
        d = lay.dim + len(so) - len(own)
        if d < len(so) - 2:  # a batch dim: the other operand must not vary along it
            j = d - (len(so) - len(other))
            if j >= 0 and other[j] != 1:
                raise r.stop(f"{_name(node)} batches over the token dim with a second operand")
        self._account(node, r, [a, b])
        return lay.at(d)

    def _reshape(self, node: Node, r: _Reader) -> Any:
        x = cast(Node, node.args[0])
        if (
            node.op == "call_method"
            and node.target == "view"
            and any(isinstance(a, torch.dtype) for a in node.args[1:])
        ):
            raise r.stop("a view as another dtype")
        lay = r.layout(x)
        if lay is None:
            self._account(node, r, [x])
            return None
        src, out = sp.shape_of(x), sp.shape_of(node)
        if src is None or out is None:
            raise r.stop(f"{_name(node)} of unknown shapes")
        inner = math.prod(src[lay.dim + 1 :])
        for d in range(len(out)):
            if out[d] == lay.length and math.prod(out[d + 1 :]) == inner:
                break
        else:
            raise r.stop(
                f"{_name(node)} merges or splits the token dim ({list(src)} -> {list(out)})"
            )
        if node.op == "call_method" and node.target in ("view", "view_as"):
            self.views_to_reshape.add(node)  # the permuted value's strides may differ
        self._account(node, r, [x])
        return lay.at(d)

    def _expand(self, node: Node, r: _Reader) -> Any:
        x = cast(Node, node.args[0])
        lay = r.layout(x)
        if lay is None:
            self._account(node, r, [x])
            return None
        out = _shape(node)
        d = lay.dim + len(out) - _nd(x)
        if out[d] != lay.length:
            raise r.stop(f"{_name(node)} changes the token dim")
        self._account(node, r, [x])
        return lay.at(d)

    def _permute(self, node: Node, r: _Reader) -> Any:
        found = sp.permutation_of(node)
        if found is None:
            raise r.stop(f"{_name(node)} with computed dims")
        x, perm = found
        lay = r.layout(x)
        if lay is None:
            self._account(node, r, [x])
            return None
        self._account(node, r, [x])
        return lay.at(perm.index(lay.dim))

    def _index(self, node: Node, r: _Reader, x: Node, index: Any) -> Any:
        lay = r.layout(x)
        if lay is None:
            self._account(node, r, [x])
            return None
        out = sp.shape_of(node)
        placed = _place_index(_nd(x), index)
        if placed is None:
            raise r.stop("indexing with tensors or lists")
        o = 0
        result: Any = None
        for i, entry in placed:
            if entry is None:
                o += 1
                continue
            if i != lay.dim:
                o += 0 if isinstance(entry, int) else 1
                continue
            if isinstance(entry, int):
                k = entry % lay.length
                seg = _cut(lay.segments, k, k + 1)
                if seg is None or any(p for _, p in seg):
                    raise r.stop(f"indexing one token of the permuted {x.name}")
                result = NEUTRAL
                continue
            start, stop, step = entry.indices(lay.length)
            if step != 1 or start >= stop:
                raise r.stop(f"a strided or empty slice of the token dim of {x.name}")
            segs = _cut(lay.segments, start, stop)
            if segs is None:
                raise r.stop(f"a slice [{start}:{stop}] cutting the video tokens of {x.name}")
            result = Layout(o, segs)
            o += 1
        if isinstance(result, Layout) and (out is None or out[result.dim] != result.length):
            raise r.stop("indexing that the proof cannot follow")
        self._account(node, r, [x])
        return result

    def _narrow(self, node: Node, r: _Reader) -> Any:
        x = cast(Node, node.args[0])
        dim, start, length = (
            sp.arg(node, 1, "dim"),
            sp.arg(node, 2, "start"),
            sp.arg(node, 3, "length"),
        )
        nd = _nd(x)
        d = _norm_dim(dim, nd)
        if d is None or not isinstance(start, int) or not isinstance(length, int):
            raise r.stop("narrow with computed arguments")
        index = [slice(None)] * nd
        index[d] = slice(start, start + length)
        return self._index(node, r, x, tuple(index))

    def _tuple_item(self, node: Node, r: _Reader) -> Any:
        src, i = node.args
        lay = r.of(src)
        if lay is None or lay is NEUTRAL:
            return lay
        if not isinstance(lay, tuple) or not isinstance(i, int):
            raise r.stop("an item of a permuted tuple the proof cannot follow")
        return lay[i]

    def _split(self, node: Node, r: _Reader, kind: str) -> Any:
        x = cast(Node, node.args[0])
        lay = r.layout(x)
        if lay is None:
            self._account(node, r, [x])
            return None
        dim = sp.arg(node, 1, "dim", 0) if kind == "unbind" else sp.arg(node, 2, "dim", 0)
        d = _norm_dim(dim, _nd(x))
        pieces = sp.value_of(node)
        if d is None or not isinstance(pieces, (tuple, list)):
            raise r.stop(f"{_name(node)} with a computed dim")
        out: list[Any] = []
        if d != lay.dim:
            for _ in pieces:
                dd = lay.dim - (1 if kind == "unbind" and d < lay.dim else 0)
                out.append(lay.at(dd))
        else:
            if kind == "unbind":
                raise r.stop(f"unbind over the token dim of {x.name}")
            pos = 0
            for p in pieces:
                n = p.shape[d]
                segs = _cut(lay.segments, pos, pos + n)
                if segs is None:
                    raise r.stop(f"{_name(node)} cuts the video tokens of {x.name}")
                piece = Layout(d, segs)
                out.append(piece if piece.permuted else NEUTRAL)
                pos += n
        self._account(node, r, [x])
        return tuple(out)

    def _cat(self, node: Node, r: _Reader) -> Any:
        parts = sp.arg(node, 0, "tensors")
        if not isinstance(parts, (list, tuple)) or not all(isinstance(p, Node) for p in parts):
            raise r.stop("a concatenation the proof cannot follow")
        nd = _nd(node)
        d = _norm_dim(sp.arg(node, 1, "dim", 0), nd)
        if d is None:
            raise r.stop("a concatenation along a computed dim")
        lays = [r.layout(p) for p in parts]
        if all(lay is None for lay in lays):
            self._account(node, r, parts)
            return None
        if any(lay is not None and lay.dim == d for lay in lays):  # joining along the tokens
            segs: list[tuple[int, bool]] = []
            for p, lay in zip(parts, lays):
                if lay is None:
                    segs.append((_shape(p)[d], False))
                elif lay.dim != d:
                    raise r.stop("a concatenation of values permuted along different dims")
                else:
                    segs.extend(lay.segments)
            self._account(node, r, parts)
            return Layout(d, _merged(segs))
        return self._elementwise_same(node, r, parts, lays, 0)

    def _stack(self, node: Node, r: _Reader) -> Any:
        parts = sp.arg(node, 0, "tensors")
        if not isinstance(parts, (list, tuple)) or not all(isinstance(p, Node) for p in parts):
            raise r.stop("a stack the proof cannot follow")
        d = _norm_dim(sp.arg(node, 1, "dim", 0), _nd(node))
        if d is None:
            raise r.stop("a stack along a computed dim")
        lays = [r.layout(p) for p in parts]
        if all(lay is None for lay in lays):
            self._account(node, r, parts)
            return None
        return self._elementwise_same(node, r, parts, lays, d)

    def _elementwise_same(self, node: Node, r: _Reader, parts, lays, new_dim: int | None) -> Any:
        """cat along another dim (new_dim 0 means none inserted) or stack (a dim inserted at
        `new_dim`): every part must hold the tokens at the same dim, permuted alike."""
        found = None
        for lay in lays:
            if lay is not None:
                if found is None:
                    found = lay
                elif lay != found:
                    raise r.stop(f"{_name(node)} of values permuted differently")
        assert found is not None
        for p, lay in zip(parts, lays):
            if lay is None:
                r.need(p, found)
        self._account(node, r, parts)
        is_stack = node.target is torch.stack
        d = found.dim + (1 if is_stack and new_dim <= found.dim else 0)
        return found.at(d)

    def _repeat_interleave(self, node: Node, r: _Reader) -> Any:
        found = sp.repeat_interleave_args(node)
        if found is None:
            raise r.stop(f"{_name(node)} with tensor repeats or no dim")
        x, _, dim = found
        lay = r.layout(x)
        if lay is None:
            self._account(node, r, [x])
            return None
        if dim == lay.dim:
            raise r.stop(f"{_name(node)} repeats tokens")
        self._account(node, r, [x])
        return lay

    def _like(self, node: Node, r: _Reader) -> Any:
        """`empty_like(x)` and kin: a tensor shaped as x; zeros, ones and fills are the same in
        any order, and an empty buffer is proven where it is written (`_setitem`)."""
        x = cast(Node, node.args[0])
        lay = r.layout(x)
        self._account(node, r, [x])
        if lay is None:
            return None
        self.fresh_writes.setdefault(node, [])
        return lay

    def _setitem(self, node: Node, r: _Reader) -> Any:
        """`buf[index] = value` into a buffer the stretch allocated (`empty_like(x)` of a permuted
        x, the way diffusers writes RoPE's even and odd channels). Proven when the index keeps
        the token dim whole and every read of the buffer comes after its last write."""
        buf, index, value = cast(Node, node.args[0]), node.args[1], node.args[2]
        lay = r.layout(buf)
        if lay is None:
            if isinstance(r.of(value), Layout):
                raise r.stop("a permuted value written into a tensor outside the stretch")
            self._account(node, r, [buf, value] if isinstance(value, Node) else [buf])
            return None
        if buf not in self.fresh_writes:
            raise r.stop(f"a write into {buf.name}, which the stretch did not allocate")
        placed = _place_index(_nd(buf), index)
        if placed is None:
            raise r.stop(f"a write into {buf.name} at tensor indices")
        o, d = 0, None
        view_shape: list[int] = []
        shape = _shape(buf)
        for i, entry in placed:
            if entry is None:
                view_shape.append(1)
                o += 1
                continue
            if isinstance(entry, int):
                if i == lay.dim:
                    raise r.stop(f"a write into one token of {buf.name}")
                continue
            start, stop, step = entry.indices(shape[i])
            if i == lay.dim:
                if (start, stop, step) != (0, lay.length, 1):
                    raise r.stop(f"a write into part of the token dim of {buf.name}")
                d = o
            view_shape.append(len(range(start, stop, step)))
            o += 1
        if d is None:
            raise r.stop(f"a write into {buf.name} the proof cannot follow")
        if isinstance(value, Node):
            vlay = r.layout(value)
            vshape = sp.shape_of(value)
            if vshape is None:
                raise r.stop("a write of a value of unknown shape")
            j = d - (len(view_shape) - len(vshape))
            if vlay is not None:
                if vlay.dim != j or vlay.segments != lay.segments:
                    raise r.stop(f"a write into {buf.name} of a value permuted otherwise")
            elif j >= 0 and vshape[j] != 1:
                r.need(value, lay.at(j))
            self._account(node, r, [buf, value])
        self.fresh_writes[buf].append(node)
        return NEUTRAL

    def _attention(self, node: Node, r: _Reader) -> Any:
        q, k, v = (cast(Node, a) for a in node.args[:3])
        mask, sid = node.args[3:5]
        site = self.sites.get(sid) if isinstance(sid, int) else None
        if site is None:
            raise r.stop(
                f"attention site {sid} runs on a backend that may depend on token positions"
            )
        lq, lk, lv = r.layout(q), r.layout(k), r.layout(v)
        if site.permuted:
            want = Layout(1, _site_segments(site))
            for x, lay in ((q, lq), (k, lk), (v, lv)):
                if lay is None:
                    r.need(x, want)
                elif lay != want:
                    raise r.stop(
                        f"{x.name} reaches the site with its tokens as {_describe(lay)}; the site "
                        f"works on {_describe(want)}"
                    )
            lq = lk = lv = want
        else:
            if lq is None:
                if lk is not None or lv is not None:
                    raise r.stop("text queries attending permuted keys")
                self._account(node, r, [q, k, v])
                return None
            if lq.dim != 1:
                raise r.stop("queries permuted along a dim that is not their sequence")
            if (lk is None) != (lv is None) or (lk is not None and (lk != lv or lk.dim != 1)):
                raise r.stop("keys and values permuted differently")
            if self.sharded and lk is not None:
                raise r.stop(
                    "attention over keys sharded across ranks, at a site that does not gather them"
                )
        read_mask = None  # the layout the mask is read in, when it is permuted
        if isinstance(mask, Node):
            shape = sp.shape_of(mask)
            lm = r.layout(mask)
            if shape is None or len(shape) != 4:
                raise r.stop("an attention mask of unknown shape")
            if shape[2] != 1:
                raise r.stop("an attention mask that varies over the (permuted) queries")
            if self.sharded:
                if lm is not None:
                    raise r.stop("an attention mask computed from sharded tokens")
                # the anchors gather every key before attending: they take the whole mask
            elif lk is None:
                if lm is not None:
                    raise r.stop("a permuted mask over keys that are not")
            elif lm is not None:
                if lm != lk.at(3):
                    raise r.stop("a mask over the keys permuted otherwise than the keys")
                read_mask = lm
            elif shape[3] != 1:
                r.need(mask, lk.at(3))
                read_mask = lk.at(3)
        # one node in two roles is read alike: a gather replaces it in every role at once
        roles: dict[Node, Any] = {}
        for operand, lay in ((q, lq), (k, lk), (v, lv), (mask, read_mask)):
            if isinstance(operand, Node):
                if operand in roles and (roles[operand] is None) != (lay is None):
                    raise r.stop(
                        f"{operand.name} is both a permuted and an unpermuted operand of the site"
                    )
                roles[operand] = lay
        self._account(node, r, list(roles))
        return lq


def _site_segments(site: TokenSite) -> tuple[tuple[int, bool], ...]:
    video = (site.video_len, True)
    if not site.text_len:
        return (video,)
    text = (site.text_len, False)
    return (text, video) if site.text_first else (video, text)


def _describe(lay: Layout) -> str:
    parts = [f"{n} {'video' if p else 'text'}" for n, p in lay.segments]
    return f"[{' + '.join(parts)}] at dim {lay.dim}"


def _place_index(nd: int, index: Any) -> list[tuple[int, Any]] | None:
    """`[(input dim, entry)]` for a basic index (ints, slices, None, one Ellipsis); None entries
    carry the input dim they sit before. None for advanced indexing."""
    entries = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(e, (Node, list, torch.Tensor, bool)) for e in entries):
        return None
    if not all(e is None or e is Ellipsis or isinstance(e, (int, slice)) for e in entries):
        return None
    if any(
        isinstance(e, slice) and any(isinstance(b, Node) for b in (e.start, e.stop, e.step))
        for e in entries
    ):
        return None
    used = sum(1 for e in entries if e is not None and e is not Ellipsis)
    if entries.count(Ellipsis) > 1 or used > nd:
        return None
    out: list[tuple[int, Any]] = []
    i = 0
    for e in entries:
        if e is Ellipsis:
            for _ in range(nd - used):
                out.append((i, slice(None)))
                i += 1
        elif e is None:
            out.append((i, None))
        else:
            out.append((i, e))
            i += 1
    while i < nd:
        out.append((i, slice(None)))
        i += 1
    return out


def _mutates(node: Node) -> bool:
    """`spellings.mutates`, and functions told `inplace=True` (by keyword or position)."""
    if sp.mutates(node):
        return True
    if node.op != "call_function":
        return False
    if node.kwargs.get("inplace"):
        return True
    at = _inplace_position(node.target)
    return at is not None and len(node.args) > at and node.args[at] is True


@functools.cache
def _inplace_position(fn: Any) -> int | None:
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("inplace") if "inplace" in params else None


# --------------------------------------------------------------------------------------------
# backward: which layout the stretch wants an upstream value in (to pull its computation in)


def _want_inputs(node: Node, lay: Layout) -> dict[Node, Layout] | None:
    """For a node whose value is wanted permuted with `lay`: the layouts its inputs would need
    (the inverse of the forward rules, for the ops an entry usually goes through); None when
    the node is where the tokens come from (or an op this direction does not know)."""
    if node.op not in ("call_function", "call_method") or _mutates(node) or sp.is_random(node):
        return None
    if _split_kind(node) is not None:  # a tuple: by convention wanted in its input's layout
        return {node.args[0]: lay} if isinstance(node.args[0], Node) else None
    out = sp.shape_of(node)
    if out is None or not (0 <= lay.dim < len(out)) or out[lay.dim] != lay.length:
        return None

    def aligned(x: Node) -> Layout | None:
        shape = sp.shape_of(x)
        if shape is None:
            return None
        j = lay.dim - (len(out) - len(shape))
        return lay.at(j) if j >= 0 and shape[j] == lay.length else None

    t, name = node.target, node.target if node.op == "call_method" else None
    if node.op == "call_function" and t is operator.getitem:
        src, index = cast(Node, node.args[0]), node.args[1]
        if isinstance(sp.value_of(src), (tuple, list)):
            return _want_through_tuple(src, node.args[1], lay)
        placed = _place_index(_nd(src), index)
        if placed is None:
            return None
        o = 0
        for i, entry in placed:
            if entry is None:
                if o == lay.dim:
                    return None
                o += 1
            elif isinstance(entry, int):
                continue
            else:
                if o == lay.dim:
                    shape = _shape(src)
                    start, stop, step = entry.indices(shape[i])
                    if step != 1 or stop - start != lay.length:
                        return None
                    # the rest of the token dim: taken as not permuted (the forward rules check it)
                    return {
                        src: Layout(
                            i, _merged([(start, False), *lay.segments, (shape[i] - stop, False)])
                        )
                    }
                o += 1
        return None
    elementwise = (
        node.op == "call_method" and name in _ELEMENTWISE_METHODS | _IDENTITY_METHODS
    ) or (node.op == "call_function" and (t in _ELEMENTWISE_FUNCS or t in _IDENTITY_FUNCS))
    if node.op == "call_method" and name in ("to", "type_as") and sp.shape_of(node.args[0]) == out:
        x = cast(Node, node.args[0])
        return {x: lay} if isinstance(x, Node) else None
    if elementwise:
        if node.kwargs.get("inplace"):
            return None
        wants = {}
        for x in _tensor_nodes(list(node.args) + list(node.kwargs.values())):
            a = aligned(x)
            if a is not None:
                wants[x] = a
        return wants
    if node.op == "call_function" and t in _CAT_FUNCS:
        parts = sp.arg(node, 0, "tensors")
        d = _norm_dim(sp.arg(node, 1, "dim", 0), len(out))
        if not isinstance(parts, (list, tuple)) or d is None:
            return None
        if d != lay.dim:
            return {p: lay for p in parts if isinstance(p, Node)}
        wants, pos = {}, 0
        for p in parts:
            n = _shape(p)[d]
            segs = _cut(lay.segments, pos, pos + n)
            if segs is None:
                return None
            if any(s for _, s in segs):
                wants[p] = Layout(d, segs)
            pos += n
        return wants
    if node.op == "call_function" and t is torch.stack:
        parts = sp.arg(node, 0, "tensors")
        d = _norm_dim(sp.arg(node, 1, "dim", 0), len(out))
        if not isinstance(parts, (list, tuple)) or d is None or d == lay.dim:
            return None
        return {
            p: lay.at(lay.dim - (1 if d < lay.dim else 0)) for p in parts if isinstance(p, Node)
        }
    first = node.args[0] if node.args else None
    if not isinstance(first, Node):
        return None
    x = first
    if node.op == "call_function" and t in _LIKE_FUNCS:
        wants = {x: lay} if sp.shape_of(x) == out else {}
        for w in _writes_into(node):  # what fills the buffer is wanted in its layout too
            value = w.args[2]
            placed = _place_index(len(out), w.args[1])
            if isinstance(value, Node) and placed is not None:
                at = _view_token_dim(placed, out, lay)
                vshape = sp.shape_of(value)
                if at is not None and vshape is not None:
                    d, view_nd = at
                    j = d - (view_nd - len(vshape))
                    if j >= 0 and vshape[j] == lay.length:
                        wants[value] = lay.at(j)
        return wants
    if node.op == "call_function" and (t in _LAYER_NORMS or t in _RMS_NORMS or t in _LINEAR):
        return {x: lay} if lay.dim < len(out) - 1 else None
    if (node.op == "call_method" and name in _SOFTMAX_METHODS) or (
        node.op == "call_function" and t in _SOFTMAX_FUNCS
    ):
        return (
            {x: lay} if _norm_dim(sp.arg(node, 1, "dim"), len(out)) not in (None, lay.dim) else None
        )
    reduced = _reduced_dims(node)
    if reduced is not None:
        dims, keepdim = reduced
        nd = _nd(x)
        if keepdim:
            return {x: lay} if lay.dim not in dims else None
        kept = [e for e in range(nd) if e not in dims]
        return {x: lay.at(kept[lay.dim])} if lay.dim < len(kept) else None
    if (node.op == "call_method" and name in _RESHAPE_METHODS) or (
        node.op == "call_function" and t in _RESHAPE_FUNCS
    ):
        src_shape = sp.shape_of(x)
        if src_shape is None:
            return None
        inner = math.prod(out[lay.dim + 1 :])
        for e in range(len(src_shape)):
            if src_shape[e] == lay.length and math.prod(src_shape[e + 1 :]) == inner:
                return {x: lay.at(e)}
        return None
    perm = sp.permutation_of(node)
    if perm is not None:
        return {perm[0]: lay.at(perm[1][lay.dim])}
    if (node.op == "call_method" and name in _EXPAND_METHODS) or (
        node.op == "call_function" and t in _EXPAND_FUNCS
    ):
        a = aligned(x)
        return {x: a} if a is not None else None
    ri = sp.repeat_interleave_args(node)
    if ri is not None:
        return {x: lay} if ri[2] != lay.dim else None
    return None


def _writes(node: Node, value: Node) -> bool:
    """Whether `node` is `buf[index] = value`, writing `value` into another tensor."""
    return (
        node.op == "call_function" and node.target is operator.setitem and node.args[0] is not value
        and isinstance(node.args[0], Node)
    )  # fmt: skip


def _writes_into(buf: Node) -> list[Node]:
    """The `buf[index] = value` nodes that write into `buf` itself."""
    return [
        u
        for u in buf.users
        if u.op == "call_function" and u.target is operator.setitem and u.args[0] is buf
    ]


def _view_token_dim(placed, shape, lay: Layout) -> tuple[int, int] | None:
    """`(dim, ndim)` of the token dim in `buf[index]` when the index keeps it whole, else None."""
    o, d = 0, None
    for i, entry in placed:
        if entry is None:
            o += 1
        elif isinstance(entry, int):
            if i == lay.dim:
                return None
        else:
            if i == lay.dim:
                if entry.indices(shape[i]) != (0, lay.length, 1):
                    return None
                d = o
            o += 1
    return None if d is None else (d, o)


def _reduced_dims(node: Node) -> tuple[set[int], bool] | None:
    """`(dims, keepdim)` of a reduction with explicit dims (sum, mean, amax, ...), else None."""
    if (node.op == "call_method" and node.target in _REDUCTION_METHODS) or (
        node.op == "call_function" and node.target in _REDUCTION_FUNCS
    ):
        at = 1
    else:
        return None
    x = cast(Node, node.args[0])
    nd = _nd(x)
    dim = node.kwargs.get("dim", node.args[at] if len(node.args) > at else None)
    keepdim = node.kwargs.get("keepdim", node.args[at + 1] if len(node.args) > at + 1 else False)
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    normed = {_norm_dim(d, nd) for d in dims}
    # an empty dim list reduces over every dim: no dims to keep the tokens out of
    if dim is None or not normed or None in normed or not isinstance(keepdim, bool):
        return None
    if _nd(node) != (nd if keepdim else nd - len(normed)):
        return None
    return {d for d in normed if d is not None}, keepdim


def _split_kind(node: Node) -> str | None:
    if node.op == "call_method" and node.target in _SPLIT_METHODS:
        return "split" if node.target == "split_with_sizes" else node.target
    if node.op == "call_function" and node.target in _SPLIT_FUNCS:
        return _SPLIT_FUNCS[node.target]
    return None


def _want_through_tuple(src: Node, i: Any, lay: Layout) -> dict[Node, Layout] | None:
    """An item of `split` / `chunk` / `unbind` along another dim: the tuple, wanted in the
    layout of the value it splits."""
    kind = _split_kind(src)
    if kind is None:
        return None
    x = src.args[0]
    dim = sp.arg(src, 1, "dim", 0) if kind == "unbind" else sp.arg(src, 2, "dim", 0)
    d = _norm_dim(dim, _nd(x))
    if d is None:
        return None
    if kind == "unbind":
        e = lay.dim + (1 if d <= lay.dim else 0)
    else:
        if d == lay.dim:
            return None
        e = lay.dim
    return {src: lay.at(e)}


# --------------------------------------------------------------------------------------------
# the pass


def hoist_token_order(
    gm: GraphModule,
    sites: dict[int, TokenSite],
    relabel: Callable[[int], int],
) -> TokenOrderResult:
    """Run the stretch of `gm` from its first to its last permuted site (and as far beyond as
    the proof reaches) on permuted tokens, in a copy; `gm` itself is left untouched.

    `sites` says, per site id of a `fv_compile::attention` node, how the site treats the
    permutation (sites missing from it stop the proof where the stretch reaches them);
    `relabel(site)` gives a permuted site the id it carries in the copy (a site told its tokens
    arrive permuted). The copy gains two long `[N]` placeholders, `fv_token_gather` (slot i of
    the permuted order holds token gather[i]) and `fv_token_scatter` (its inverse), N the
    sites' video tokens."""
    new = copy_graph_module(gm)
    prover = _Prover(new, sites)
    try:
        plan = _plan(prover)
    except _Stop as stop:
        where = _where(stop.node)
        return TokenOrderResult(
            None,
            reason=f"{stop.why} (node {stop.node.name}{', ' + where if where else ''})",
            stopped_at=stop.node.name,
        )
    if isinstance(plan, TokenOrderResult):
        return plan
    per_site, hoisted = _bytes_moved(plan, prover.state)
    if hoisted >= per_site:
        return TokenOrderResult(
            None,
            reason=f"gathering and scattering at the stretch's borders would move {hoisted} bytes, "
            f"no fewer than the sites' own reorders ({per_site})",
        )
    shapes = {n.name: sp.shape_of(n) for n in new.graph.nodes}
    result = _apply(prover, plan, relabel)
    assert result.gm is not None, "_apply returns the rewritten copy"
    why = _retrace(result.gm, shapes)
    if why is not None:
        return TokenOrderResult(None, reason=f"internal check failed: the rewritten graph {why}")
    return result


def _retrace(
    gm: GraphModule, shapes: dict[str, Any], example: list[Any] | None = None
) -> str | None:
    """Run the rewritten graph on fake tensors: every node must trace (a stride-sensitive op
    outside the stretch, a view of a value whose strides changed, would fail here rather than
    when compiling) and keep the shape it had. None when it does, else what went wrong.
    `example`: the graph's inputs, for placeholders the trace gave no value (metadata inputs)."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    inputs = [sp.value_of(n) for n in gm.graph.find_nodes(op="placeholder")]
    mode = next(
        (
            getattr(v, "fake_mode", None)
            for v in inputs
            if getattr(v, "fake_mode", None) is not None
        ),
        None,
    )
    if mode is not None and example is not None and len(example) == len(inputs):
        inputs = [_fake_like(mode, x) if v is None else v for v, x in zip(inputs, example)]
    if mode is None or any(v is None for v in inputs):
        return "has no fake inputs to check it with"
    before = {n: n.meta.get("val") for n in gm.graph.nodes}
    try:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)
    except Exception as e:  # whatever fails to trace must not reach the compiler
        return f"does not trace: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        if (
            n.name in shapes
            and shapes[n.name] is not None
            and (getattr(val, "shape", None) is None or tuple(val.shape) != shapes[n.name])
        ):
            return f"changes the shape of {n.name}"
        if isinstance(val, torch.Tensor) and "example_value" in n.meta:
            n.meta["example_value"] = val  # the strides it has now
        elif before[n] is not None and val is None:
            n.meta["val"] = before[n]
    return None


def _fake_like(mode: Any, x: Any) -> Any:
    """A tensor of `mode` shaped and strided as `x` (real or of another fake mode)."""
    if not isinstance(x, torch.Tensor):
        return x
    with mode:
        return torch.empty_strided(tuple(x.shape), x.stride(), dtype=x.dtype, device=x.device)


def _bytes_moved(plan: _Plan, state) -> tuple[int, int]:
    """`(per site, hoisted)`: the bytes the sites' own reorders copy (q, k, v and the output of
    each), against what the gathers and scatters at the borders copy."""
    per_site = sum(
        sum(_nbytes(x) for x in a.args[:3] if isinstance(x, Node)) + _nbytes(a)
        for a in plan.anchors
    )
    entering = {(x, lay) for reads in plan.gathers.values() for x, lay in reads.items()}
    hoisted = sum(_nbytes(x) for x, _ in entering) + sum(_nbytes(x) for x in plan.exits)
    return per_site, hoisted


def _where(node: Node) -> str:
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File ")]
    if not lines:
        return ""
    last = lines[-1]  # File "path", line N, in fn
    try:
        path = last.split('"')[1].replace("\\", "/").split("/")
        rest = last.split('"')[2].strip(", ")
        return f"{'/'.join(path[-2:])} {rest}"
    except IndexError:
        return ""


@dataclass
class _Plan:
    region: set[Node]
    gathers: dict[Node, dict[Node, Layout]]  # reader -> {input: layout}
    exits: dict[Node, list[Node]]  # permuted node -> readers that need it as traced
    anchors: list[Node]
    video_len: int


def _plan(p: _Prover) -> _Plan | TokenOrderResult:
    graph = p.graph
    anchors = [
        n
        for n in graph.nodes
        if _is_attention(n) and (s := p.sites.get(n.args[4])) is not None and s.permuted
    ]
    if not anchors:
        return TokenOrderResult(None, reason="no site works in a token permutation")
    lengths = {p.sites[n.args[4]].video_len for n in anchors}
    if len(lengths) != 1:
        return TokenOrderResult(
            None, reason=f"the sites see different numbers of video tokens {sorted(lengths)}"
        )
    (video_len,) = lengths
    if video_len < 2:
        return TokenOrderResult(None, reason="fewer than two video tokens")
    # a write `buf[i] = v` defines buf: buf depends on it, and on v (data flow alone misses both)
    anc = _closure(anchors, lambda n: [*n.all_input_nodes, *_writes_into(n)])
    desc = _closure(
        anchors, lambda n: [*n.users, *(cast(Node, u.args[0]) for u in n.users if _writes(u, n))]
    )
    span = (anc | set(anchors)) & (desc | set(anchors))
    inside = desc | set(anchors)  # downstream of a site: proven forward

    # seeds: each site wants its q, k and v in its own order
    seeds: dict[Node, Layout] = {}
    for n in anchors:
        want = Layout(1, _site_segments(p.sites[n.args[4]]))
        for x in n.args[:3]:
            if isinstance(x, Node):
                seeds[x] = want
    for _ in range(16):
        _spread_wants(p, seeds, inside)
        upstream = _accept_upstream(p, inside)
        state, gathers = _sweep(p, anchors, span, inside, upstream)
        # the sweep may find more values entering the stretch: pull their computation in too
        seeds = {
            x: lay
            for reads in gathers.values()
            for x, lay in reads.items()
            if x not in p.want and x not in inside
        }
        seeds.update(
            {x: lay for x, lay in p.tail_wants.items() if x not in p.want and x not in inside}
        )
        if seeds:
            continue
        # and an upstream node that reads more bytes from outside than it computes is gathered
        back = _cheaper_gathered(p, state, gathers, upstream)
        if not back:
            break
        p.given_back |= back
    last = anchors[-1]
    _exits(p, state, span, last)
    region = {n for n, v in state.items() if isinstance(v, (Layout, tuple))}
    _trim(p, state, region, gathers, span | upstream)
    gathers = {n: g for n, g in gathers.items() if n in state}
    _check_writes(p, gathers, state)
    return _Plan(region, gathers, _exits(p, state, span, last), anchors, video_len)


def _closure(start: Iterable[Node], step: Callable[[Node], Iterable[Node]]) -> set[Node]:
    seen: set[Node] = set()
    stack = [x for n in start for x in step(n)]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(step(n))
    return seen


def _spread_wants(p: _Prover, seeds: dict[Node, Layout], inside: set[Node]) -> None:
    stack = list(seeds.items())
    while stack:
        node, lay = stack.pop()
        have = p.want.get(node)
        if have is not None:
            if have != lay:
                p.conflicted.add(node)
            continue
        p.want[node] = lay
        if node in inside or node.op in ("placeholder", "get_attr"):
            continue
        wants = _want_inputs(node, lay)
        if wants:
            stack.extend(wants.items())


def _accept_upstream(p: _Prover, inside: set[Node]) -> set[Node]:
    """Upstream nodes computed permuted: each is wanted permuted and every reader of it is in
    the stretch (unless a sweep found it cheaper to gather it than what it reads)."""
    candidates = {
        n for n in p.want
        if n not in inside and n not in p.conflicted and n.op in ("call_function", "call_method")
        and _want_inputs(n, p.want[n]) is not None
    }  # fmt: skip
    accepted: set[Node] = set()
    changed = True
    while changed:
        changed = False
        for n in sorted(candidates - accepted, key=p.order.__getitem__, reverse=True):
            if n in p.given_back:
                continue
            writes = _writes_into(n) if n.op == "call_function" and n.target in _LIKE_FUNCS else []
            lay = p.want[n]
            if not all(
                u in accepted
                or u in inside
                or u in writes
                or (not p.sharded and _only_reads_shape(u, n))
                or _reads_text_only(u, n, lay)
                for u in n.users
            ):
                continue
            accepted.add(n)
            accepted.update(writes)  # a buffer the stretch fills comes with its writes
            changed = True
    return accepted


def _cheaper_gathered(p: _Prover, state, gathers, upstream) -> set[Node]:
    """Upstream nodes whose own gathers (the values only they bring into the stretch) move more
    bytes than gathering the node itself would."""
    readers: dict[tuple[Node, Layout], int] = {}
    for reads in gathers.values():
        for x, lay in reads.items():
            readers[(x, lay)] = readers.get((x, lay), 0) + 1
    back = set()
    for n in upstream:
        if n not in state or n not in gathers:
            continue
        own = sum(_nbytes(x) for x, lay in gathers[n].items() if readers[(x, lay)] == 1)
        if own > _nbytes(n):
            back.add(n)
    return back


def _reads_text_only(user: Node, x: Node, lay: Layout) -> bool:
    """Whether `user` slices out of `x` (held in `lay`) only tokens that are not permuted."""
    if not (user.op == "call_function" and user.target is operator.getitem and user.args[0] is x):
        return False
    placed = _place_index(_nd(x), user.args[1])
    if placed is None:
        return False
    for i, entry in placed:
        if i != lay.dim or entry is None:
            continue
        if isinstance(entry, int):
            k = entry % lay.length
            segs = _cut(lay.segments, k, k + 1)
        else:
            start, stop, step = entry.indices(lay.length)
            segs = _cut(lay.segments, start, stop) if step == 1 else None
        return segs is not None and not any(perm for _, perm in segs)
    return False


def _only_reads_shape(user: Node, x: Node) -> bool:
    if user.op == "call_method" and user.target in _SIZE_METHODS:
        return True
    return user.op == "call_function" and user.target is getattr and user.args[1] in _SIZE_ATTRS


def _sweep(p: _Prover, anchors, span, inside, upstream):
    """Forward over the graph: every node reading a permuted value is proven (in the span, a
    failure stops everything; beyond it, the node is a border and computes as traced)."""
    p.state.clear()
    p.tail_wants.clear()
    p.views_to_reshape.clear()
    p.fresh_writes.clear()
    gathers: dict[Node, dict[Node, Layout]] = {}
    anchor_set = set(anchors)
    for node in p.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        reads_permuted = any(
            isinstance(p.state.get(x), (Layout, tuple)) for x in node.all_input_nodes
        )
        candidate = node in upstream or node in inside
        if not (
            reads_permuted
            or node in anchor_set
            or (node in upstream and _has_seeded_input(p, node))
        ):
            continue
        try:
            ok = p.rule(node, seeded=candidate)
        except _Stop:
            if node in span or node in anchor_set or _mutates(node):
                raise
            continue  # a border: it computes as traced, its permuted inputs are scattered for it
        if ok.value is None:
            continue
        if ok.gathers and node not in span and node not in upstream:
            # past the last site, take in no new values (a gather there would not pay), unless
            # their computation can be pulled in too (the next round tries)
            new = {
                x: lay
                for x, lay in ok.gathers.items()
                if not any(lay == g.get(x) for g in gathers.values())
            }
            if new:
                p.tail_wants.update(new)
                continue
        p.state[node] = ok.value
        if ok.gathers:
            gathers[node] = ok.gathers
    for n in anchors:
        if not isinstance(p.state.get(n), Layout):
            raise _Stop(n, "the site's output is not in the token order")
    return p.state, gathers


def _has_seeded_input(p: _Prover, node: Node) -> bool:
    return any(x in p.want for x in node.all_input_nodes)


def _exits(p: _Prover, state, span, last: Node) -> dict[Node, list[Node]]:
    """Permuted values read by nodes computed as traced (they get the value scattered back).
    Between the first and the last site, none may be: the stretch's intermediates stay in it."""
    exits: dict[Node, list[Node]] = {}
    for n, v in state.items():
        if not isinstance(v, (Layout, tuple)):
            continue
        for u in n.users:
            if u in state:
                continue
            if isinstance(v, tuple):
                raise _Stop(u, f"{u.name} reads the permuted tuple {n.name}")
            if n in span and n is not last:
                raise _Stop(
                    u,
                    f"{n.name}, computed between the first and the last site, is also read by "
                    f"{u.name} ({_name(u) if u.op != 'output' else 'the graph output'}), outside the stretch",
                )
            exits.setdefault(n, []).append(u)
    return exits


def _trim(p: _Prover, state, region, gathers, keep) -> None:
    """Give back the tail of the stretch where scattering a node's inputs moves fewer bytes
    than scattering the node (a cast up to float32 at the very end, say)."""
    changed = True
    while changed:
        changed = False
        for n in sorted(region, key=p.order.__getitem__, reverse=True):
            if (
                n in keep
                or not isinstance(state.get(n), Layout)
                or any(u in region for u in n.users)
            ):
                continue
            inputs = [x for x in n.all_input_nodes if isinstance(state.get(x), Layout)]
            if any(x in keep for x in inputs):
                continue
            kept = _nbytes(n) if any(u not in state for u in n.users) else 0
            # inputs that nothing outside reads yet would each need a scatter of their own
            new_exits = sum(_nbytes(x) for x in inputs if all(u in state for u in x.users))
            if new_exits < kept:
                del state[n]
                region.discard(n)
                gathers.pop(n, None)
                changed = True


def _check_writes(p: _Prover, gathers, state) -> None:
    """No value the stretch reads as traced may be written to while it is read, and a buffer the
    stretch fills is read only after its last write."""
    for buf, writes in p.fresh_writes.items():
        if buf not in state:
            continue
        last = max((p.order[w] for w in writes), default=-1)
        for u in buf.users:
            if u in writes:
                continue
            if u.op == "call_function" and u.target is operator.setitem and u.args[0] is buf:
                raise _Stop(u, f"a write into {buf.name} the proof did not follow")
            if p.order[u] < last:
                raise _Stop(u, f"{buf.name} is read before its last write")
            if u.op == "call_function" and u.target is operator.setitem:
                continue
            if (sp.is_view(u) or sp.may_alias_input(u)) and sp.is_mutated(u):
                raise _Stop(u, f"a view of {buf.name} is written to")
    roots = set()
    for reads in gathers.values():
        for x in reads:
            roots.add(_alias_root(x))
    for n in p.graph.nodes:
        if not _mutates(n) or not n.args or not isinstance(n.args[0], Node):
            continue
        if (
            n.op == "call_function"
            and n.target is operator.setitem
            and n.args[0] in p.fresh_writes
            and n in p.fresh_writes[n.args[0]]
        ):
            continue
        target = n.args[0]
        if target in state:
            raise _Stop(n, f"{_name(n)} writes into the permuted {target.name}")
        if _alias_root(target) in roots:
            raise _Stop(n, f"{_name(n)} writes into {target.name}, which enters the stretch")


def _alias_root(x: Node) -> Node:
    while (
        (x.op in ("call_method", "call_function"))
        and x.args
        and isinstance(x.args[0], Node)
        and (sp.is_view(x) or sp.may_alias_input(x))
    ):
        x = x.args[0]
    return x


# --------------------------------------------------------------------------------------------
# rewriting the copy


def _apply(p: _Prover, plan: _Plan, relabel: Callable[[int], int]) -> TokenOrderResult:
    graph = p.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    device = _graph_device(plan.anchors[0])
    fake = _FakeValues(plan.anchors[0])
    n = plan.video_len
    with graph.inserting_after(placeholders[-1]):
        gather_in = graph.placeholder(GATHER_INPUT)
    with graph.inserting_after(gather_in):
        scatter_in = graph.placeholder(SCATTER_INPUT)
    for ph in (gather_in, scatter_in):
        ph.meta["example_value"] = ph.meta["val"] = fake.index(n, device)
    first_use = next(x for x in graph.nodes if x.op != "placeholder")
    indices: dict[tuple[Any, bool], Node] = {}

    def index_for(segments, inverse: bool) -> Node:
        key = (segments, inverse)
        if key in indices:
            return indices[key]
        base = scatter_in if inverse else gather_in
        parts: list[Node] = []
        pos = 0
        with graph.inserting_before(first_use):
            for length, permuted in segments:
                if permuted:
                    part = base if pos == 0 else graph.call_function(torch.add, (base, pos))
                else:
                    part = graph.call_function(
                        torch.arange, (pos, pos + length), {"dtype": torch.long, "device": device}
                    )
                part.meta["example_value"] = part.meta["val"] = fake.index(length, device)
                parts.append(part)
                pos += length
            node = parts[0] if len(parts) == 1 else graph.call_function(torch.cat, (parts,))
            node.meta["example_value"] = node.meta["val"] = fake.index(pos, device)
        indices[key] = node
        return node

    gathered = _insert_gathers(p, plan, fake, lambda segs: index_for(segs, False), None)
    moved = sum(_nbytes(x) for x in gathered)
    scattered: list[str] = []
    for x, readers in sorted(plan.exits.items(), key=lambda kv: p.order[kv[0]]):
        lay = p.state[x]
        idx = index_for(lay.segments, True)
        # scattered in the traced value's memory order: its readers (the next block of a
        # regional compile, whose guards check strides) get the strides they were traced with
        order = _memory_order(sp.value_of(x))
        with graph.inserting_before(x.next):  # (each node goes after the one before)
            if order is None:
                s = graph.call_function(torch.index_select, (x, lay.dim, idx))
            else:
                dense = graph.call_method("permute", (x, *order))
                dense.meta["example_value"] = dense.meta["val"] = fake.like(x, order)
                picked = graph.call_function(torch.index_select, (dense, order.index(lay.dim), idx))
                picked.meta["example_value"] = picked.meta["val"] = fake.like(x, order)
                s = graph.call_method(
                    "permute", (picked, *[order.index(d) for d in range(len(order))])
                )
        s.meta["example_value"] = s.meta["val"] = fake.like(x, keep_strides=True)
        for u in readers:
            u.replace_input_with(x, s)
        scattered.append(x.name)
        moved += _nbytes(x)
    for node in p.views_to_reshape:
        if node in plan.region:
            node.target = "reshape" if node.target == "view" else "reshape_as"
    per_site = 0
    for a in plan.anchors:
        a.args = (*a.args[:4], relabel(cast(int, a.args[4])), *a.args[5:])
        per_site += sum(_nbytes(x) for x in a.args[:3] if isinstance(x, Node)) + _nbytes(a)
    graph.lint()
    p.gm.recompile()
    return TokenOrderResult(
        p.gm,
        video_len=n,
        sites=len(plan.anchors),
        gathered=sorted({x.name for x in gathered}),
        scattered=scattered,
        bytes_per_site=per_site,
        bytes_hoisted=moved,
    )


def _insert_gathers(
    p: _Prover,
    plan: _Plan,
    fake: _FakeValues,
    index_for: Callable[[tuple[tuple[int, bool], ...]], Node],
    length_of: Callable[[Layout], int] | None,
) -> list[Node]:
    """Gather each value entering the stretch once, before its first reader, with the index
    `index_for(segments)` (a permutation, or one rank's share), and point every reader at the
    gathered value; `length_of(layout)`: the gathered token dim's length (None: unchanged).
    Returns the values gathered, once per token layout they were gathered in."""
    graph = p.graph
    gathered: dict[tuple[Node, Layout], Node] = {}
    for reader in sorted(plan.gathers, key=p.order.__getitem__):
        for x, lay in plan.gathers[reader].items():
            g = gathered.get((x, lay))
            if g is None:
                at = min(
                    (u for u in x.users if u in plan.gathers and x in plan.gathers[u]),
                    key=p.order.__getitem__,
                )
                with graph.inserting_before(at):
                    g = graph.call_function(
                        torch.index_select, (x, lay.dim, index_for(lay.segments))
                    )
                shape = list(_shape(x))
                if length_of is not None:
                    shape[lay.dim] = length_of(lay)
                g.meta["example_value"] = g.meta["val"] = fake.shaped(x, tuple(shape))
                gathered[(x, lay)] = g
            reader.replace_input_with(x, g)
    return [x for x, _ in gathered]


def _memory_order(val: Any) -> list[int] | None:
    """The dims of a dense, non-overlapping, non-contiguous tensor from the outermost in memory
    to the innermost; None for a contiguous tensor (or one with gaps or overlaps)."""
    if not isinstance(val, torch.Tensor) or val.is_contiguous():
        return None
    shape, stride = list(val.shape), list(val.stride())
    order = sorted(range(len(shape)), key=lambda d: (-stride[d], -shape[d]))
    expected = 1
    for d in reversed(order):
        if shape[d] != 1 and stride[d] != expected:
            return None
        expected *= shape[d]
    return order


def _graph_device(node: Node) -> torch.device:
    dev = sp.device_of(node)
    return dev if dev is not None else torch.device("cpu")


class _FakeValues:
    """Example values for inserted nodes, from the graph's own fake mode when it has one."""

    def __init__(self, node: Node) -> None:
        self.mode = getattr(sp.value_of(node), "fake_mode", None)

    def index(self, n: int, device: torch.device) -> Any:
        return self._make(lambda: torch.empty(n, dtype=torch.long, device=device))

    def like(self, x: Node, order: list[int] | None = None, keep_strides: bool = False) -> Any:
        """An empty tensor shaped as x (permuted by `order`; with x's strides if asked)."""
        val = sp.value_of(x)
        if keep_strides:
            return self._make(
                lambda: torch.empty_strided(
                    tuple(val.shape), val.stride(), dtype=val.dtype, device=val.device
                )
            )
        shape = tuple(val.shape) if order is None else tuple(val.shape[d] for d in order)
        return self._make(lambda: torch.empty(shape, dtype=val.dtype, device=val.device))

    def shaped(self, x: Node, shape: tuple[int, ...]) -> Any:
        val = sp.value_of(x)
        return self._make(lambda: torch.empty(shape, dtype=val.dtype, device=val.device))

    def _make(self, fn: Callable[[], Any]) -> Any:
        if self.mode is None:
            with torch.device("meta"):
                return fn()
        with self.mode:
            return fn()


# --------------------------------------------------------------------------------------------
# the stretch on one rank's share of the tokens (sequence parallelism between the sites)


@dataclass(frozen=True)
class TokenShard:
    """One rank's share of `n` video tokens: chunks of `ceil(n / degree)` consecutive tokens in
    rank order, the last one shorter when `n` does not divide."""

    degree: int
    rank: int

    def chunk(self, n: int) -> int:
        return -(-n // self.degree)

    def start(self, n: int) -> int:
        return self.rank * self.chunk(n)

    def local(self, n: int) -> int:
        return min(self.chunk(n), n - self.start(n))


def shard_token_stretch(
    gm: GraphModule,
    sites: dict[int, TokenSite],
    shard: TokenShard,
    anchor: Callable[[Node], tuple[Callable[..., Any], dict[str, Any]]],
    gather: tuple[Callable[..., Any], dict[str, Any]],
    example: list[Any] | None = None,
) -> TokenOrderResult:
    """Run the stretch of `gm` around its anchor sites on this rank's share of the video tokens,
    in a copy; `gm` itself is left untouched.

    The proof is the permutation's (`hoist_token_order`) with what a share needs beyond it: an op
    in the stretch keeps every token's value apart from the others' (no size read of the token
    dim; attention over sharded keys only at the anchors, which gather every key first). A value
    entering the stretch is cut to the rank's tokens (text tokens kept whole); one leaving it is
    made whole by `fn(x, dim=, segments=, video_len=, chunk=, order=, **kwargs)`, `gather` being
    `(fn, kwargs)` (a collective the caller supplies); each anchor `node` calls the function of
    `anchor(node) = (function, kwargs)` instead of the op, on its share of q, k and v, returning
    its share of the output. Sizes the graph
    holds as constants (views, expands, slices and splits of the token dim) are rewritten to the
    share's; the copy is then run on fake tensors, and every node must have the shape the proof
    says its share has, or the copy is dropped (`example`: the graph's inputs, for placeholders
    the trace gave no value)."""
    new = copy_graph_module(gm)
    prover = _Prover(new, sites, sharded=True)
    try:
        plan = _plan(prover)
        if isinstance(plan, TokenOrderResult):
            return plan
        n = plan.video_len
        if (shard.degree - 1) * shard.chunk(n) >= n:
            return TokenOrderResult(
                None, reason=f"{n} video tokens leave a rank of {shard.degree} with none"
            )
        loc = _Localizer(n, shard.start(n), shard.local(n))
        expected = _sharded_shapes(prover, loc)
        result = _apply_shard(prover, plan, shard, loc, anchor, gather)
    except _Stop as stop:
        where = _where(stop.node)
        return TokenOrderResult(
            None,
            reason=f"{stop.why} (node {stop.node.name}{', ' + where if where else ''})",
            stopped_at=stop.node.name,
        )
    why = _retrace(new, expected, example)
    if why is not None:
        return TokenOrderResult(None, reason=f"internal check failed: the sharded graph {why}")
    return result


def _sharded_shapes(p: _Prover, loc: _Localizer) -> dict[str, Any]:
    """Each node's shape on one rank: the traced shape, with the token dim of a value in the
    stretch holding the share's tokens (whole text segments, the share of each video segment)."""
    shapes: dict[str, Any] = {}
    for node in p.graph.nodes:
        shape = sp.shape_of(node)
        value = p.state.get(node)
        if isinstance(value, tuple):
            shape = None  # its items are checked where they are taken
        elif isinstance(value, Layout) and shape is not None:
            if any(permuted and m != loc.n for m, permuted in value.segments):
                raise _Stop(node, "a video segment of another length than the sites'")
            dims = list(shape)
            dims[value.dim] = loc.length(value)
            shape = tuple(dims)
        shapes[node.name] = shape
    return shapes


class _Localizer:
    """Positions and sizes along the token dim, from the traced sequence to the share's."""

    def __init__(self, n: int, start: int, local: int) -> None:
        self.n, self.start, self.local = n, start, local

    def length(self, lay: Layout) -> int:
        """A share's length of `lay` (every video segment is `n` long: `_sharded_shapes`
        checks)."""
        return sum(self.local if permuted else m for m, permuted in lay.segments)

    def position(self, lay: Layout, pos: int, node: Node) -> int:
        """The share's position of traced position `pos`: a segment border, or inside text."""
        at = loc = 0
        for m, permuted in lay.segments:
            if pos == at:
                return loc
            if at < pos < at + m:
                if permuted:
                    raise _Stop(node, "a cut inside the sharded video tokens")
                return loc + pos - at
            at += m
            loc += self.local if permuted else m
        if pos == at:
            return loc
        raise _Stop(node, f"position {pos} past the token dim")

    def index(self, lay: Layout, x: Node, index: Any, node: Node) -> tuple[Any, ...]:
        """A basic index of `x` (its tokens held in `lay`) with its token-dim entry moved to
        the share's positions."""
        placed = _place_index(_nd(x), index)
        if placed is None:
            raise _Stop(node, "an index the pass cannot follow")
        out: list[Any] = []
        for i, entry in placed:
            if entry is None or i != lay.dim:
                out.append(entry)
            elif isinstance(entry, int):
                out.append(self.position(lay, entry % lay.length, node))
            elif entry == slice(None):
                out.append(entry)
            else:
                start, stop, step = entry.indices(lay.length)
                if step != 1:
                    raise _Stop(node, "a strided slice of the token dim")
                out.append(slice(self.position(lay, start, node), self.position(lay, stop, node)))
        return tuple(out)


def _sizes_arg(node: Node) -> tuple[list[Any], Callable[[list[Any]], None]] | None:
    """The sizes a view, reshape, expand or broadcast_to takes, and how to put them back."""
    if node.op == "call_method" and node.target in ("view", "reshape", "expand"):
        rest = list(node.args[1:])
        if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)):

            def put_packed(sizes: list[Any]) -> None:
                node.args = (node.args[0], tuple(sizes))

            return list(rest[0]), put_packed

        def put(sizes: list[Any]) -> None:
            node.args = (node.args[0], *sizes)

        return rest, put
    if node.op == "call_function" and node.target in (torch.reshape, torch.broadcast_to):
        sizes = node.args[1] if len(node.args) > 1 else node.kwargs.get("shape")
        if not isinstance(sizes, (tuple, list, torch.Size)):
            return None

        def put_fn(new: list[Any]) -> None:
            node.args = (node.args[0], tuple(new))
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "shape"}

        return list(sizes), put_fn
    return None


def _localize(p: _Prover, plan: _Plan, node: Node, loc: _Localizer) -> None:
    """Rewrite the constants of `node` that name positions or sizes along the token dim."""
    value = p.state.get(node)
    sizes = _sizes_arg(node)
    if sizes is not None and isinstance(value, Layout):
        entries, put = sizes
        at = value.dim
        if at < len(entries) and entries[at] != -1:
            if entries[at] != value.length:
                raise _Stop(node, f"{_name(node)} with a token size the pass cannot follow")
            entries[at] = loc.length(value)
            put(entries)
        return
    src = node.args[0] if node.args and isinstance(node.args[0], Node) else None
    lay = None
    if src is not None:  # a value of the stretch, or one cut to the share as it enters
        lay = p.state.get(src, plan.gathers.get(node, {}).get(src))
    if not isinstance(lay, Layout):
        return
    assert src is not None
    if node.op == "call_function" and node.target is operator.getitem:
        if not isinstance(sp.value_of(src), (tuple, list)):
            node.args = (src, loc.index(lay, src, node.args[1], node))
        return
    if node.op == "call_function" and node.target is operator.setitem:
        node.args = (src, loc.index(lay, src, node.args[1], node), node.args[2])
        return
    if (node.op == "call_method" and node.target == "narrow") or node.target is torch.narrow:
        dim, start, length = (
            sp.arg(node, i, k) for i, k in ((1, "dim"), (2, "start"), (3, "length"))
        )
        if _norm_dim(dim, _nd(src)) == lay.dim:
            begin = loc.position(lay, start % lay.length, node)
            end = loc.position(lay, start % lay.length + length, node)
            node.args, node.kwargs = (src, lay.dim, begin, end - begin), {}
        return
    kind = _split_kind(node)
    if kind in ("split", "chunk"):
        dim = sp.arg(node, 2, "dim", 0)
        if _norm_dim(dim, _nd(src)) != lay.dim:
            return
        pieces = sp.value_of(node)
        assert isinstance(pieces, (tuple, list)), "the prover read the split's pieces"
        lengths: list[int] = []
        pos = 0
        for piece in pieces:
            m = piece.shape[lay.dim]
            lengths.append(loc.position(lay, pos + m, node) - loc.position(lay, pos, node))
            pos += m
        # the share splits into the same pieces only at explicit sizes
        if node.op == "call_method":
            node.target, node.args, node.kwargs = "split", (src, lengths, lay.dim), {}
        else:
            node.target, node.args, node.kwargs = torch.split, (src, lengths, lay.dim), {}


def _apply_shard(
    p: _Prover,
    plan: _Plan,
    shard: TokenShard,
    loc: _Localizer,
    anchor: Callable[[Node], tuple[Callable[..., Any], dict[str, Any]]],
    gather: tuple[Callable[..., Any], dict[str, Any]],
) -> TokenOrderResult:
    graph = p.graph
    gather_fn, gather_kwargs = gather
    n = plan.video_len
    device = _graph_device(plan.anchors[0])
    fake = _FakeValues(plan.anchors[0])
    first_use = next(x for x in graph.nodes if x.op != "placeholder")
    indices: dict[Any, Node] = {}

    def index_for(segments) -> Node:
        """The traced positions of the share's tokens: whole text segments, each video
        segment's own chunk."""
        if segments in indices:
            return indices[segments]
        parts: list[Node] = []
        pos = 0
        with graph.inserting_before(first_use):
            for length, permuted in segments:
                lo = pos + loc.start if permuted else pos
                m = loc.local if permuted else length
                part = graph.call_function(
                    torch.arange, (lo, lo + m), {"dtype": torch.long, "device": device}
                )
                part.meta["example_value"] = part.meta["val"] = fake.index(m, device)
                parts.append(part)
                pos += length
            node = parts[0] if len(parts) == 1 else graph.call_function(torch.cat, (parts,))
            total = sum(loc.local if permuted else m for m, permuted in segments)
            node.meta["example_value"] = node.meta["val"] = fake.index(total, device)
        indices[segments] = node
        return node

    for node in list(p.state):
        _localize(p, plan, node, loc)
    gathered = _insert_gathers(p, plan, fake, index_for, loc.length)
    scattered: list[str] = []
    for x, readers in sorted(plan.exits.items(), key=lambda kv: p.order[kv[0]]):
        lay = p.state[x]
        with graph.inserting_before(x.next):
            whole = graph.call_function(
                gather_fn,
                (x,),
                dict(
                    **gather_kwargs,
                    dim=lay.dim,
                    segments=tuple(
                        (loc.local if permuted else m, permuted) for m, permuted in lay.segments
                    ),
                    video_len=n,
                    chunk=shard.chunk(n),
                    order=_memory_order(sp.value_of(x)),
                ),
            )
        whole.meta["example_value"] = whole.meta["val"] = fake.like(x, keep_strides=True)
        for u in readers:
            u.replace_input_with(x, whole)
        scattered.append(x.name)
    for node in p.views_to_reshape:
        if node in plan.region:
            node.target = "reshape" if node.target == "view" else "reshape_as"
    for a in plan.anchors:
        a.target, a.kwargs = anchor(a)
    graph.lint()
    p.gm.recompile()
    return TokenOrderResult(
        p.gm,
        video_len=n,
        sites=len(plan.anchors),
        gathered=sorted({x.name for x in gathered}),
        scattered=scattered,
    )
