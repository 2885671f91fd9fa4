"""Errors torch raises about the user's model or inputs, said as FvCompileErrors.

A compiled call can fail in Dynamo or in torch for reasons fv_compile did not cause but can name
better than the raw exception does. `translate` maps exactly three cases and leaves every other
exception alone (it returns None and the caller re-raises the original):

* an FvCompileError that fv_compile's backend raised while Dynamo compiled a graph: Dynamo wraps
  it in a `BackendCompilerFailed`; the user gets fv_compile's own error back;
* a dtype mismatch between the call's inputs and the model's parameters (bf16 inputs into an
  fp32 model): Dynamo reports it as a long `TorchRuntimeError` ("RuntimeError when making fake
  tensor call"), eager code as torch's one-line RuntimeError. Translated only when torch's
  message is about dtypes and some floating-point input has a dtype no parameter or buffer has;
* code Dynamo cannot put in one graph when one graph was demanded (`fullgraph=True`): Dynamo's
  `Unsupported` / `UserError`, said with the model line that broke it.

The original exception stays reachable as the new one's `__context__`.
"""

from __future__ import annotations

import os
import re
import traceback
from typing import Any

import torch
from torch.utils import _pytree as pytree

from fv_compile.errors import FvCompileError
from fv_compile.explain import dynamo_reason, where

_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_MODELS_DIR = (
    os.path.join(_PACKAGE_DIR, "models") + os.sep
)  # the reference models are user code here
# torch's dtype-mismatch messages: "mat1 and mat2 must have the same dtype", "expected m1 and m2
# to have the same dtype", "Input type (c10::BFloat16) and bias type (float) should be the same",
# "expected scalar type Float but found BFloat16", "expected both vectors to have same dtype",
# layer_norm's "mixed dtype (CPU): expect parameter to have scalar type of Float", SDPA's
# "Expected query, key, and value to have the same dtype"
_DTYPE_MESSAGE = re.compile(r"dtype|scalar type|type \(.*\) should be the same", re.IGNORECASE)
_FAKE_CALL = re.compile(r"got (\w+)\((['\"])(.*?)\2\)", re.DOTALL)


def translate(
    error: BaseException, model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> BaseException | None:
    """The error to raise instead of `error`, or None to re-raise `error` as it is."""
    if isinstance(error, FvCompileError):
        return None
    inner = _backend_error(error)
    if inner is not None:
        return inner
    mismatch = _dtype_mismatch(error, model, args, kwargs)
    if mismatch is not None:
        return mismatch
    return _untraceable(error, model)


def _backend_error(error: BaseException) -> BaseException | None:
    from torch._dynamo.exc import BackendCompilerFailed

    if isinstance(error, BackendCompilerFailed):
        inner = getattr(error, "inner_exception", None)
        if isinstance(inner, FvCompileError):
            return inner
    return None


def _dtype_mismatch(
    error: BaseException, model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> FvCompileError | None:
    from torch._dynamo.exc import TorchRuntimeError

    if not isinstance(error, RuntimeError) or type(error).__module__.startswith("fv_compile"):
        return None
    text = str(error)
    if isinstance(error, TorchRuntimeError):
        found = _FAKE_CALL.search(text)
        if found is None:
            return None
        text = found.group(3)
    elif type(error) is not RuntimeError:  # other Dynamo errors (Unsupported, ...) are not this
        return None
    first = text.strip().splitlines()[0] if text.strip() else ""
    if not _DTYPE_MESSAGE.search(first):
        return None
    own = {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}
    if not own:
        return None
    foreign = [
        (name, t.dtype)
        for name, t in _input_tensors(model, args, kwargs)
        if t.is_floating_point() and t.dtype not in own
    ]
    if not foreign:
        return None
    names = ", ".join(f"{name} ({_dtype(dt)})" for name, dt in foreign)
    mine = "/".join(sorted(_dtype(dt) for dt in own))
    target = f"torch.{_dtype(next(iter(own)))}" if len(own) == 1 else "the model's dtype"
    at = _user_line(error)
    return FvCompileError(
        f"dtype mismatch: {type(model).__name__}'s parameters are {mine} but its inputs "
        f"{names} are not (torch: {first}{' at ' + at if at else ''}). Cast the inputs to the "
        f"model's dtype (x.to({target})), or the model to theirs before compiling "
        f"(model.to(torch.{_dtype(foreign[0][1])})), or run the call under torch.autocast"
    )


def _untraceable(error: BaseException, model: torch.nn.Module) -> FvCompileError | None:
    from torch._dynamo.exc import Unsupported, UserError

    if not isinstance(error, (Unsupported, UserError)):
        return None
    frame = getattr(error, "innermost_user_frame_summary", None)
    stack = list(getattr(error, "real_stack", None) or ())
    if frame is None and stack:
        frame = stack[-1]
    message = str(getattr(error, "msg", None) or error)
    if isinstance(
        error, UserError
    ):  # "Consider annotating ... Could not guard on ...": the second sentence says it
        found = re.search(r"Could not guard on data-dependent expression [^(]*", message)
        reason = found.group(0).strip() if found else message.strip().splitlines()[0]
    else:
        reason, _ = dynamo_reason(message)
    at = where(frame.filename, frame.lineno, frame.name) if frame is not None else ""
    code = f" `{frame.line.strip()}`" if frame is not None and getattr(frame, "line", None) else ""
    return FvCompileError(
        f"Dynamo cannot trace {type(model).__name__} as one graph (fullgraph=True): {reason}"
        f"{' at ' + at if at else ''}{code}. Drop fullgraph=True: Dynamo then splits the graph "
        "there, runs that line eagerly and fv_compile still rewrites the attention of every graph "
        "(fv_compile.explain(model, *inputs) lists the breaks); or change that line (no .item(), "
        "no Python branch on a tensor's value, no NumPy)"
    )


def _input_tensors(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):
    """`(name, tensor)` for every tensor in the call, named after the forward's parameters."""
    import inspect

    try:
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
    except (TypeError, ValueError):
        bound = {**{f"argument {i}": a for i, a in enumerate(args)}, **kwargs}
    out = []
    for name, value in bound.items():
        leaves = pytree.tree_leaves(value)
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor):
                out.append((f"`{name}`" if len(leaves) == 1 else f"`{name}`[{i}]", leaf))
    return out


def _user_line(error: BaseException) -> str:
    """The innermost line of user code (not torch's, not fv_compile's wrapper) the error passed."""
    stack = list(getattr(error, "real_stack", None) or ()) or traceback.extract_tb(
        error.__traceback__
    )
    for frame in reversed(stack):
        path = os.path.abspath(frame.filename)
        own = path.startswith(_PACKAGE_DIR) and not path.startswith(_MODELS_DIR)
        generated = frame.filename.startswith("<")  # an FX graph's code: no line of the model
        if not path.startswith(_TORCH_DIR) and not own and not generated:
            return where(frame.filename, frame.lineno, frame.name)
    return ""


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
