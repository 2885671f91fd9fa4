"""The values a mask can take, proven from the graph that builds it.

A padding mask handed to attention as a float tensor is usually built in the model from a boolean
one: `(1 - keep.to(dtype)) * -10000.0` (LTX-Video), `(1.0 - keep.float()) * finfo.min`
(HF-style), `torch.where(keep, 0.0, -inf)`, `zeros.masked_fill(~keep, -inf)`. A boolean tensor
holds False or True whatever its data, so the few values such a mask can take follow from the ops
between the boolean and the mask. This module follows them: a boolean node, a constant, and then
elementwise arithmetic with numbers, casts, `where` / `masked_fill`, and ops that only move values
around (views, reshapes, repeats, concatenation). Each op is evaluated by torch itself, on a small
tensor of the candidate values in the node's own dtype, so rounding is torch's (bf16's -10000.0 is
-9984.0). Anything else (a float graph input, an op not listed, a tensor written in place) makes
the values unknown: `None`.

The result is a superset of what the mask can hold at run time, which is what a proof needs.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import Node
from torch.fx.node import Target

from fv_compile.passes import spellings as sp
from fv_compile.passes.constants import constant_value

MAX_VALUES = 16  # more distinct candidates than this: not a padding mask, stop

Values = torch.Tensor  # 1-D, distinct candidate values, in the node's dtype

# ops that return some of their first argument's values, rearranged or repeated
_MOVES_VALUES = {
    "view", "reshape", "unsqueeze", "squeeze", "expand", "expand_as", "permute", "transpose", "t",
    "contiguous", "clone", "flatten", "unflatten", "repeat", "repeat_interleave", "detach",
    "narrow", "select", "flip", "roll", "tile", "broadcast_to", "movedim", "swapaxes", "swapdims",
    "getitem", "index_select", "view_as", "reshape_as", "alias",
}  # fmt: skip
_CASTS = {"to", "type", "float", "half", "bfloat16", "double", "type_as", "long", "int", "short"}
# elementwise arithmetic: evaluated on the candidates (every tensor argument's, combined)
_ARITHMETIC = {
    "add", "sub", "mul", "div", "true_divide", "neg", "rsub", "clamp", "clamp_min", "clamp_max",
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
    "__rtruediv__", "__neg__", "negative", "multiply", "subtract",
}  # fmt: skip
_OPERATORS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.neg}
_FILLED = {
    "zeros",
    "ones",
    "full",
    "zeros_like",
    "ones_like",
    "full_like",
    "new_zeros",
    "new_ones",
    "new_full",
}


def mask_values(node: Any) -> Values | None:
    """Every value `node` (a tensor node or a number) can hold, or None when not provable."""
    try:
        return _values(node, {})
    except Exception:  # an op this module misreads is an op whose values are unknown
        return None


def combined_additive_values(terms: list[tuple[Any, str, float]]) -> tuple[float, ...] | None:
    """The values of the one additive mask the rewrite builds from a site's mask terms
    (`rewrite._combined_mask`): `(node, kind, coef)` with kind "additive" (times `coef`), or
    "attend" / "masked" (boolean, 0 where attended and -inf elsewhere, in float32), summed in that
    order. Sorted Python floats, or None when some term's values are unknown."""
    additive: Values | None = None
    has_bool = False
    order: list[str] = []
    for node, kind, coef in terms:
        if kind != "additive":
            has_bool = True
            if "bool" not in order:
                order.append("bool")
            continue
        vals = mask_values(node)
        if vals is None:
            return None
        if coef != 1.0:  # as the rewrite scales it: in the term's dtype
            vals = torch.mul(vals, coef)
        additive = vals if additive is None else _pairwise(torch.add, additive, vals)
        if additive is None:
            return None
        if "additive" not in order:
            order.append("additive")
    parts: dict[str, Values] = {"bool": torch.tensor([0.0, float("-inf")])} if has_bool else {}
    if additive is not None:  # (order names "additive" only then)
        parts["additive"] = additive
    total = None
    for name in order:
        part = parts[name]
        total = part if total is None else _pairwise(torch.add, total, part)
        if total is None:
            return None
    if total is None:
        return None
    return tuple(sorted(float(v) for v in total.double().tolist()))


def _values(x: Any, memo: dict[Node, Values | None]) -> Values | None:
    if not isinstance(x, Node):
        number = sp.as_number(x)
        if number is None and isinstance(x, bool):
            number = float(x)
        return None if number is None else torch.tensor([number], dtype=torch.float64)
    if x in memo:
        return memo[x]
    memo[x] = None  # a cycle (there are none in a graph) or a failure below: unknown
    memo[x] = _node_values(x, memo)
    return memo[x]


def _node_values(node: Node, memo: dict[Node, Values | None]) -> Values | None:
    dtype = sp.dtype_of(node)
    if dtype == torch.bool:  # whatever its data
        return torch.tensor([False, True])
    if not isinstance(dtype, torch.dtype) or sp.mutates(node) or sp.is_mutated(node):
        return None
    const = constant_value(node)
    if isinstance(const, torch.Tensor):
        vals = torch.unique(const.detach().cpu().flatten())
        return _checked(vals, dtype)
    if node.op not in ("call_function", "call_method"):
        return None
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    args, kwargs = node.args, node.kwargs
    if name in _MOVES_VALUES or sp.is_view(node):
        return _checked(_values(args[0], memo), dtype)
    if node.op == "call_function" and node.target in (torch.cat, torch.concat, torch.stack):
        tensors = args[0]
        if not isinstance(tensors, list | tuple):
            return None
        parts = [_values(t, memo) for t in tensors]
        known = [p for p in parts if p is not None]
        if len(known) != len(parts):
            return None
        return _checked(torch.cat([p.to(dtype) for p in known]), dtype)
    if name in _CASTS:
        return _checked(_values(args[0], memo), dtype)
    if name in _FILLED:
        fill = {
            "zeros": 0.0,
            "zeros_like": 0.0,
            "new_zeros": 0.0,
            "ones": 1.0,
            "ones_like": 1.0,
            "new_ones": 1.0,
        }
        if name in fill:
            return _checked(torch.tensor([fill[name]]), dtype)
        value = kwargs.get("fill_value", args[-1] if args else None)
        return _checked(_values(value, memo), dtype)
    where = sp.where_args(node)
    if where is not None:
        a, b = _values(where[1], memo), _values(where[2], memo)
        return (
            None
            if a is None or b is None
            else _checked(torch.cat([a.to(dtype), b.to(dtype)]), dtype)
        )
    filled = sp.masked_fill_args(node)
    if filled is not None:
        a, b = _values(filled[0], memo), _values(filled[2], memo)
        return (
            None
            if a is None or b is None
            else _checked(torch.cat([a.to(dtype), b.to(dtype)]), dtype)
        )
    fn: Target | None = (
        node.target if node.op == "call_function" and node.target in _OPERATORS else None
    )
    if fn is None and name in _ARITHMETIC:
        fn = getattr(torch.Tensor, name) if node.op == "call_method" else node.target
    if fn is None:
        return None
    return _checked(_evaluate(fn, node, memo), dtype)


def _evaluate(fn: Any, node: Node, memo: dict[Node, Values | None]) -> Values | None:
    """`fn` applied to every combination of its arguments' candidate values, with torch's own
    dtype rules: each tensor argument in its node's dtype, 0-d tensors kept 0-d (they do not
    promote), numbers left numbers."""
    tensor_args = [i for i, a in enumerate(node.args) if sp.is_tensor_node(a)]
    if len(tensor_args) > 2 or any(sp.is_tensor_node(v) for v in node.kwargs.values()):
        return None
    choices: list[list[Any]] = []
    for i, a in enumerate(node.args):
        if i in tensor_args:
            vals = _values(a, memo)
            if vals is None:
                return None
            vals = vals.to(sp.dtype_of(a))
            zero_dim = sp.shape_of(a) == ()
            choices.append([v.reshape(()) for v in vals] if zero_dim else [vals])
        elif isinstance(a, Node):  # a traced Python number
            number = sp.as_number(a)
            if number is None:
                return None
            choices.append([number])
        else:
            choices.append([a])
    # the tensor arguments that are not 0-d: at most two, combined as an outer product
    results = []
    for combo in _product(choices):
        call_args = list(combo)
        full = [j for j in tensor_args if call_args[j].dim() == 1]
        if len(full) == 2:
            call_args[full[0]] = call_args[full[0]][:, None]
            call_args[full[1]] = call_args[full[1]][None, :]
        try:
            results.append(torch.as_tensor(fn(*call_args, **node.kwargs)).flatten())
        except Exception:
            return None
    return torch.cat(results) if results else None


def _product(choices: list[list[Any]]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = [()]
    for options in choices:
        out = [prefix + (o,) for prefix in out for o in options]
        if len(out) > MAX_VALUES * MAX_VALUES:
            return []
    return out


def _pairwise(fn: Any, a: Values, b: Values) -> Values | None:
    return _checked(fn(a[:, None], b[None, :]).flatten(), torch.promote_types(a.dtype, b.dtype))


def _checked(vals: Values | None, dtype: torch.dtype) -> Values | None:
    if vals is None or vals.numel() == 0:
        return None
    vals = torch.unique(vals.to(dtype))
    return vals if vals.numel() <= MAX_VALUES else None
