"""One question per function: "is this node X, however the model spelled it?"

Dynamo graphs and `torch.fx.symbolic_trace` graphs hold torch-level calls: a method call
(`x.softmax(-1)`), a function (`torch.softmax`, `F.softmax`), an operator (`x @ y`, `x / c`).
Everything above this module sees one normalised answer per concept instead of the spellings.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import Node

_SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}


def value_of(node: Any) -> Any:
    """The example value (FakeTensor, SymInt or constant) a traced node carries, or None."""
    if not isinstance(node, Node):
        return node
    meta = node.meta
    for key in ("example_value", "val"):
        if key in meta:
            return meta[key]
    return None


def shape_of(node: Any) -> tuple[int, ...] | None:
    """Static shape of a tensor node; None for non-tensors and symbolic (dynamic) shapes."""
    shape = getattr(value_of(node), "shape", None)
    if shape is None or not all(type(s) is int for s in shape):
        return None
    return tuple(shape)


def dtype_of(node: Any) -> torch.dtype | None:
    return getattr(value_of(node), "dtype", None)


def device_of(node: Any) -> torch.device | None:
    return getattr(value_of(node), "device", None)


def is_tensor_node(node: Any) -> bool:
    return isinstance(node, Node) and isinstance(value_of(node), torch.Tensor)


def _method(node: Node, *names: str) -> bool:
    return node.op == "call_method" and node.target in names


def _func(node: Node, *targets: Any) -> bool:
    return node.op == "call_function" and any(node.target is t for t in targets)


def _tensor_input(node: Node) -> Node | None:
    """The op's first argument (self, for a method) when it is a traced value, as a tensor is."""
    x = node.args[0]
    return x if isinstance(x, Node) else None


def arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    """Argument `index` (counting self for methods) or keyword `name` of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def as_number(x: Any) -> float | None:
    """The value of a compile-time number (a literal, or a traced node holding a plain int/float);
    None for anything else, symbolic sizes included."""
    if isinstance(x, Node):  # a traced Python number (symbolic_trace computes d ** -0.5 in-graph)
        x = value_of(x)
    if type(x) in (int, float):
        return float(x)
    return None


# --- the anchors -------------------------------------------------------------------------------


def softmax_dim(node: Node) -> tuple[Node, int, torch.dtype | None] | None:
    """`(input, dim, dtype)` for x.softmax(d), torch.softmax, F.softmax, torch.nn.functional.softmax."""
    if _method(node, "softmax"):
        x, dim, dtype = node.args[0], arg(node, 1, "dim"), arg(node, 2, "dtype")
    elif _func(node, torch.softmax, F.softmax, torch.nn.functional.softmax, torch.special.softmax):
        x, dim = node.args[0], arg(node, 1, "dim")
        dtype = arg(node, 3 if node.target is F.softmax else 2, "dtype")
    else:
        return None
    if not isinstance(x, Node) or not isinstance(dim, int):
        return None
    return x, dim, dtype


def is_sdpa(node: Node) -> bool:
    return node.op == "call_function" and node.target in _SDPA


def sdpa_args(node: Node) -> dict[str, Any]:
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    defaults: dict[str, Any] = {
        "attn_mask": None,
        "dropout_p": 0.0,
        "is_causal": False,
        "scale": None,
        "enable_gqa": False,
    }
    out = dict(defaults)
    for n, a in zip(names, node.args):
        out[n] = a
    out.update(node.kwargs)
    return out


# --- contractions ------------------------------------------------------------------------------


def matmul_operands(node: Node) -> tuple[Node, Node, str] | None:
    """`(a, b, form)` for a @ b, torch.matmul, torch.bmm and their method spellings."""
    if _func(node, operator.matmul, torch.matmul):
        form = "matmul"
    elif _func(node, torch.bmm):
        form = "bmm"
    elif _method(node, "matmul", "__matmul__"):
        form = "matmul"
    elif _method(node, "bmm"):
        form = "bmm"
    else:
        return None
    a, b = node.args[0], node.args[1]
    if not (isinstance(a, Node) and isinstance(b, Node)):
        return None
    return a, b, form


def einsum_operands(node: Node) -> tuple[str, list[Any]] | None:
    """`(equation, operands)` of an einsum, the equation explicit (no `...`, an output given)
    wherever the operands' ranks are known."""
    if not _func(node, torch.einsum, torch.functional.einsum):
        return None
    eq = node.args[0]
    ops = list(node.args[1:])
    if len(ops) == 1 and isinstance(ops[0], list | tuple):
        ops = list(ops[0])
    if not isinstance(eq, str):
        return None
    eq = eq.replace(" ", "")
    ranks = [len(shape) if (shape := shape_of(o)) is not None else -1 for o in ops]
    if ("..." in eq or "->" not in eq) and -1 not in ranks:
        eq = explicit_einsum(eq, ranks) or eq
    return eq, ops


def explicit_einsum(eq: str, ranks: list[int]) -> str | None:
    """`eq` with its `...` spelled out as letters and its output made explicit (einsum's
    implicit output: the labels used once, sorted, after the broadcast dims); None if it cannot
    be (operand ranks that do not fit, no letters left)."""
    eq = eq.replace(" ", "")
    lhs, arrow, out = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        return None
    used = set(eq) - set(",->.")
    free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in used]
    n_ell = 0
    for t, r in zip(terms, ranks):
        if "..." in t:
            n_ell = max(n_ell, r - (len(t) - 3))
        elif len(t) != r:
            return None
    if n_ell < 0 or n_ell > len(free):
        return None
    ell = "".join(free[:n_ell])
    spelled = []
    for t, r in zip(terms, ranks):
        if "..." in t:
            k = r - (len(t) - 3)
            if k < 0:
                return None
            t = t.replace("...", ell[n_ell - k :])  # broadcast dims align on the right
        spelled.append(t)
    if arrow:
        out = out.replace("...", ell)
    else:
        letters = "".join(spelled)
        out = ell + "".join(
            sorted(c for c in set(letters) if letters.count(c) == 1 and c not in ell)
        )
    return ",".join(spelled) + "->" + out


def baddbmm_operands(node: Node) -> tuple[Any, Node, Node, Any, Any] | None:
    """`(input, batch1, batch2, beta, alpha)`."""
    if _func(node, torch.baddbmm) or _method(node, "baddbmm"):
        base = 0
    else:
        return None
    inp, b1, b2 = node.args[base], arg(node, base + 1, "batch1"), arg(node, base + 2, "batch2")
    beta = node.kwargs.get("beta", 1)
    alpha = node.kwargs.get("alpha", 1)
    return inp, b1, b2, beta, alpha


# --- value-preserving and scalar ops ----------------------------------------------------------


def permutation_of(node: Node) -> tuple[Node, list[int]] | None:
    """`(x, perm)` when node == x.permute(perm) in effect: transpose, swapaxes, permute, mT, .T."""
    val = value_of(node)
    nd = getattr(val, "ndim", None)
    if nd is None:
        return None
    if _method(node, "transpose", "swapaxes", "swapdims") or _func(
        node, torch.transpose, torch.swapaxes, torch.swapdims
    ):
        x, d0, d1 = node.args[0], arg(node, 1, "dim0"), arg(node, 2, "dim1")
        if not isinstance(x, Node) or not isinstance(d0, int) or not isinstance(d1, int):
            return None
        perm = list(range(nd))
        d0, d1 = d0 % nd, d1 % nd
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return x, perm
    if _method(node, "permute") or _func(node, torch.permute):
        x = node.args[0]
        dims: Sequence[Any] = node.args[1:] if node.op == "call_method" else (arg(node, 1, "dims"),)
        if len(dims) == 1 and isinstance(dims[0], list | tuple):
            dims = dims[0]
        if not isinstance(x, Node) or not all(isinstance(d, int) for d in dims):
            return None
        return x, [d % nd for d in dims]
    if (_func(node, getattr) and node.args[1] in ("mT", "T")) or _method(node, "t"):
        x = node.args[0]
        if not isinstance(x, Node):
            return None
        perm = list(range(nd))
        if nd >= 2:
            perm[-1], perm[-2] = perm[-2], perm[-1]
        if node.op == "call_function" and node.args[1] == "T":
            perm = list(reversed(range(nd)))
        return x, perm
    return None


def identity_input(node: Node) -> Node | None:
    """x for ops that keep value, shape, dtype and autograd: contiguous, clone."""
    if _method(node, "contiguous", "clone") or _func(node, torch.clone):
        x = node.args[0]
        return x if isinstance(x, Node) else None
    return None


def detach_input(node: Node) -> Node | None:
    """x for x.detach() / torch.detach(x): the value of x, with gradients stopped."""
    if _method(node, "detach") or _func(node, torch.detach):
        x = node.args[0]
        return x if isinstance(x, Node) else None
    return None


def requires_grad(node: Any) -> bool:
    """Whether the traced value of `node` takes part in autograd (Dynamo records it per node)."""
    return bool(getattr(value_of(node), "requires_grad", False))


def dropout_input(node: Node) -> Node | None:
    """x when node is a dropout that does nothing: eval mode or p == 0."""
    if _func(node, F.dropout, torch.nn.functional.dropout):
        p, training = arg(node, 1, "p", 0.5), arg(node, 2, "training", True)
    elif _func(node, torch.dropout):
        p, training = arg(node, 1, "p"), arg(node, 2, "train")
    else:
        return None
    if training is False or p == 0 or p == 0.0:
        return _tensor_input(node)
    return None


def cast_input(node: Node) -> Node | None:
    """x when node only changes the floating dtype of x: float(), half(), to(dtype), type_as."""
    if _method(node, "float", "half", "bfloat16", "double", "type_as"):
        x = node.args[0]
    elif _method(node, "to", "type"):
        x = node.args[0]
        rest = list(node.args[1:]) + list(node.kwargs.values())
        if not all(isinstance(r, torch.dtype | bool) or r is None for r in rest):
            return None
    else:
        return None
    if not isinstance(x, Node):
        return None
    vin, vout = dtype_of(x), dtype_of(node)
    if vin is None or vout is None or not (vin.is_floating_point and vout.is_floating_point):
        return None
    if shape_of(x) != shape_of(node):
        return None
    return x


def scalar_factor(node: Node) -> tuple[Node, float] | None:
    """`(x, c)` when node == c * x for a compile-time number c (x * c, c * x, x / c, mul, div)."""
    # in-place `s *= c` is traced as s_1 = operator.imul(s, c); the matcher's single-user check
    # on the score path ensures nothing else sees s mutated
    if _func(node, operator.mul, operator.imul, torch.mul) or _method(
        node, "mul", "mul_", "__mul__", "__rmul__"
    ):
        a, b = node.args[0], node.args[1]
        ca, cb = as_number(a), as_number(b)
        if isinstance(a, Node) and cb is not None:
            return a, cb
        if isinstance(b, Node) and ca is not None:
            return b, ca
        return None
    if _func(node, operator.truediv, operator.itruediv, torch.div, torch.true_divide) or _method(
        node, "div", "div_", "__truediv__", "true_divide"
    ):
        a, b = node.args[0], node.args[1]
        if node.kwargs.get("rounding_mode") is not None:
            return None
        c = as_number(b)
        if isinstance(a, Node) and c is not None and c != 0:
            return a, 1.0 / c
    return None


def tensor_factor(node: Node) -> Node | None:
    """x when node == x * t or x / t for a one-element tensor t (a learned temperature, say) or a
    symbolic number: a scale that is real but not a compile-time constant."""
    is_mul = _func(node, operator.mul, torch.mul) or _method(node, "mul")
    is_div = _func(node, operator.truediv, torch.div) or _method(node, "div")
    if not (is_mul or is_div):
        return None
    a, b = node.args[0], node.args[1]
    candidates = [(a, b), (b, a)] if is_mul else [(a, b)]
    for x, t in candidates:
        if not (isinstance(x, Node) and isinstance(t, Node)):
            continue
        value = value_of(t)
        if isinstance(
            value, torch.SymInt | torch.SymFloat
        ):  # dynamic shapes: d ** -0.5 is symbolic
            return x
        shape = shape_of(t)
        if shape is not None and math.prod(shape) == 1:
            return x
    return None


def additive_terms(node: Node) -> tuple[Any, Any, float] | None:
    """`(a, b, sign)` for a + b and a - b (sign applies to b)."""
    if _func(node, operator.add, operator.iadd, torch.add) or _method(
        node, "add", "add_", "__add__", "__radd__"
    ):
        alpha = as_number(
            node.kwargs.get("alpha", 1)
        )  # a traced number is a Node: as_number reads it
        return node.args[0], node.args[1], alpha if alpha is not None else math.nan
    if _func(node, operator.sub, operator.isub, torch.sub) or _method(
        node, "sub", "sub_", "__sub__"
    ):
        alpha = as_number(node.kwargs.get("alpha", 1))
        return node.args[0], node.args[1], -alpha if alpha is not None else math.nan
    return None


def row_reduction_input(node: Node, dim: int) -> Node | None:
    """x when node is a per-row statistic of x over `dim`, kept as a size-1 dim: x.amax(dim,
    keepdim=True), x.max(dim, keepdim=True).values / [0], x.logsumexp(dim, keepdim=True)
    (through a detach). Subtracting one from the scores leaves their softmax unchanged."""
    if (_func(node, operator.getitem) and node.args[1] == 0) or (
        _func(node, getattr) and node.args[1] == "values"
    ):
        src = node.args[0]
        if not isinstance(src, Node) or not (_method(src, "max") or _func(src, torch.max)):
            return None
        node = src
    elif not (_method(node, "amax", "logsumexp") or _func(node, torch.amax, torch.logsumexp)):
        return None
    x, d, keep = node.args[0], arg(node, 1, "dim"), arg(node, 2, "keepdim", False)
    if isinstance(d, list | tuple) and len(d) == 1:
        d = d[0]
    nd = len(shape_of(x) or ()) if isinstance(x, Node) else 0
    if not isinstance(x, Node) or not isinstance(d, int) or keep is not True or not nd:
        return None
    if d % nd != dim % nd:
        return None
    return detach_input(x) or x


_INPLACE_SCORE_OPS = {"masked_fill_", "add_", "sub_", "mul_", "div_"}


def inplace_target(node: Node) -> Node | None:
    """x when node is `x.masked_fill_(..)`, `x.add_(..)`, `x.sub_(..)`, `x.mul_(..)` or
    `x.div_(..)`: an in-place op the matcher reads as its out-of-place twin."""
    if (
        node.op == "call_method"
        and node.target in _INPLACE_SCORE_OPS
        and isinstance(node.args[0], Node)
    ):
        return node.args[0]
    return None


def masked_fill_args(node: Node) -> tuple[Node, Any, Any] | None:
    """`(x, mask, value)` for x.masked_fill(mask, value), torch.masked_fill and x.masked_fill_."""
    if _method(node, "masked_fill", "masked_fill_") or _func(node, torch.masked_fill):
        x = node.args[0]
        return (x, arg(node, 1, "mask"), arg(node, 2, "value")) if isinstance(x, Node) else None
    return None


def where_args(node: Node) -> tuple[Any, Any, Any] | None:
    """`(cond, a, b)` for torch.where(cond, a, b)."""
    if _func(node, torch.where) and len(node.args) == 3:
        return node.args[0], node.args[1], node.args[2]
    return None


def repeat_interleave_args(node: Node) -> tuple[Node, int, int] | None:
    """`(x, repeats, dim)` for x.repeat_interleave(r, dim) with an int r."""
    if _method(node, "repeat_interleave") or _func(node, torch.repeat_interleave):
        x, r, d = node.args[0], arg(node, 1, "repeats"), arg(node, 2, "dim")
        if isinstance(x, Node) and isinstance(r, int) and isinstance(d, int):
            nd = len(shape_of(x) or ())
            return x, r, d % nd if nd else d
    return None


def is_reshape(node: Node) -> Node | None:
    """x for x.view(...), x.reshape(...), torch.reshape(x, ...)."""
    if _method(node, "view", "reshape") or _func(node, torch.reshape):
        x = node.args[0]
        if (
            node.op == "call_method"
            and node.target == "view"
            and len(node.args) == 2
            and isinstance(node.args[1], torch.dtype)
        ):
            return None  # x.view(dtype): a reinterpretation, not a reshape
        return x if isinstance(x, Node) else None
    return None


def is_expand(node: Node) -> Node | None:
    if _method(node, "expand", "expand_as"):
        x = node.args[0]
        return x if isinstance(x, Node) else None
    return None


def is_unsqueeze_like(node: Node) -> Node | None:
    """x when node only inserts size-1 dims into x (unsqueeze, x[:, None], ...)."""
    if _method(node, "unsqueeze") or _func(node, torch.unsqueeze):
        return _tensor_input(node)
    if (
        _func(node, operator.getitem)
        and isinstance(node.args[1], tuple)
        and all(i is None or i == slice(None) or i is Ellipsis for i in node.args[1])
    ):
        return _tensor_input(node)
    return None


_INPLACE_OPERATORS = {
    operator.setitem,
    operator.delitem,
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.ifloordiv,
    operator.imod,
    operator.ipow,
    operator.imatmul,
    operator.iand,
    operator.ior,
    operator.ixor,
    operator.ilshift,
    operator.irshift,
}
# the same operators called by name, `k.__imul__(3)` (a `call_method` node)
_INPLACE_DUNDERS = {f"__{op.__name__}__" for op in _INPLACE_OPERATORS}


def mutates(node: Node) -> bool:
    """Whether `node` writes into a tensor (or container) it was given: `x.add_(..)`, `x[i] = y`,
    `x *= c`, `torch.relu_(x)`, an `out=` argument, an op whose schema mutates an input."""
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function":
        if node.target in _INPLACE_OPERATORS or "out" in node.kwargs:
            return True
        schema = getattr(node.target, "_schema", None)
        if schema is not None and schema.is_mutable:
            return True
        if getattr(node.target, "__module__", None) in ("_operator", "operator"):
            return False  # `or_`, `and_`, `not_`, `is_`: the in-place ones are listed above
        name = getattr(node.target, "__name__", "")
    else:
        return False
    if not isinstance(name, str):
        return False
    return name in _INPLACE_DUNDERS or (name.endswith("_") and not name.endswith("__"))


# ops whose result may share storage with their first argument (views, and ops that return their
# input unchanged when there is nothing to do: contiguous, reshape, to, float, ...)
_MAY_ALIAS = {
    "view", "view_as", "reshape", "reshape_as", "transpose", "swapaxes", "swapdims", "permute",
    "movedim", "moveaxis", "t", "T", "mT", "H", "mH", "expand", "expand_as", "unsqueeze", "squeeze",
    "flatten", "unflatten", "narrow", "select", "diagonal", "as_strided", "getitem", "detach",
    "alias", "split", "chunk", "unbind", "tensor_split", "hsplit", "vsplit", "dsplit", "contiguous",
    "to", "type", "type_as", "float", "half", "bfloat16", "double", "bool", "int", "long", "real",
    "imag", "view_as_real", "view_as_complex", "unfold", "split_with_sizes", "broadcast_to",
    "atleast_1d", "atleast_2d", "atleast_3d",
}  # fmt: skip


# ops that only make a view: they never read the data, so a write before the consumer that
# reads through them is seen by that consumer
_VIEWS = {
    "view", "view_as", "transpose", "swapaxes", "swapdims", "permute", "movedim", "moveaxis", "t",
    "unsqueeze", "squeeze", "expand", "expand_as", "unflatten", "narrow", "select", "diagonal",
    "as_strided", "detach", "alias", "unfold", "broadcast_to",
}  # fmt: skip


def is_view(node: Node) -> bool:
    """Whether `node` is a view of its first argument that copies nothing (transpose, view,
    expand, basic slicing, ...)."""
    if node.op == "call_method":
        return node.target in _VIEWS
    if node.op != "call_function":
        return False
    if node.target is getattr:
        return node.args[1] in ("T", "mT", "H", "mH")
    if node.target is operator.getitem:
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        return is_tensor_node(node.args[0]) and all(
            i is None or i is Ellipsis or isinstance(i, int | slice) for i in index
        )
    return getattr(node.target, "__name__", "") in _VIEWS


def may_alias_input(node: Node) -> bool:
    """Whether `node`'s result may share storage with its first argument."""
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", "")
    else:
        return False
    return isinstance(name, str) and name.strip("_") in _MAY_ALIAS


def is_mutated(node: Node) -> bool:
    """Whether some node writes into `node`'s tensor, directly or through a view of it."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        for u in n.users:
            if mutates(u) and u.args and u.args[0] is n:
                return True
            if may_alias_input(u) and u.args and u.args[0] is n:
                stack.append(u)
    return False


_RANDOM_NAMES = {
    "bernoulli",
    "normal",
    "multinomial",
    "poisson",
    "uniform",
    "exponential",
    "cauchy",
    "geometric",
    "log_normal",
    "random",
    "rrelu",
    "fractional_max_pool2d",
    "fractional_max_pool3d",
}


def is_random(node: Node) -> bool:
    """Whether `node` draws random numbers (its value differs per call; removing it would shift
    the random stream the rest of the program sees)."""
    if node.op not in ("call_function", "call_method") or dropout_input(node) is not None:
        return False  # a dropout that does nothing (eval mode, p == 0) draws nothing
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if not isinstance(name, str):
        return False
    tags = getattr(node.target, "tags", ())
    if torch.Tag.nondeterministic_seeded in tags:
        return True
    base = name.lower().strip("_")
    return base.startswith("rand") or "dropout" in base or base in _RANDOM_NAMES
