"""Regional compilation: compile the repeated transformer block once, not the whole model.

A video DiT is 30-60 copies of one block. Compiling the block (Dynamo reuses the compiled code for
every instance, since parameters are graph inputs) cuts cold compile from minutes to seconds;
the glue between blocks (embeddings, heads) stays eager. The user's model is not touched: the
compiled model is a shallow copy sharing its parameters, in which the blocks are wrapped.

Every block instance runs the same compiled code, so an attention impl cannot tell the layers
apart from its module path (it was traced once, in the first block). `current_block()` says which
block is running: each compiled block sets it around its call, outside the compiled region, so
backends with per-layer settings (STA windows) read it at run time.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from fv_compile.errors import FvCompileError


_running: list[int | None] = [None]


def current_block() -> int | None:
    """The index, in its `nn.ModuleList`, of the regionally compiled block running now; None
    outside regional blocks."""
    return _running[0]


def _numbered(compiled: torch.nn.Module, index: int) -> torch.nn.Module:
    """Make `compiled` announce its index while it runs (reset even when it raises)."""

    def enter(module, args):
        _running[0] = index

    def leave(module, args, output):
        _running[0] = None

    compiled.register_forward_pre_hook(enter)
    compiled.register_forward_hook(leave, always_call=True)
    return compiled


def _repeated(modules: torch.nn.ModuleList) -> bool:
    kinds = {type(m) for m in modules}
    return len(modules) >= 2 and len(kinds) == 1


def _holds_blocks(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.ModuleList) and _repeated(m) for m in module.modules())


def compile_blocks(
    model: torch.nn.Module, compile_block: Callable[[torch.nn.Module], torch.nn.Module]
) -> tuple[torch.nn.Module, list[str]]:
    """A copy of `model` whose repeated blocks are `compile_block(block)`; and their list paths."""
    if not _holds_blocks(model):
        raise FvCompileError(
            "regional=True found no repeated blocks (an nn.ModuleList of at least two modules of "
            "one class); compile the whole model with regional=False"
        )
    paths: list[str] = []

    def rebuild(module: torch.nn.Module, path: str) -> torch.nn.Module:
        new = copy.copy(module)
        new._modules = dict(module._modules)
        for name, child in module._modules.items():
            if child is None:
                continue
            where = f"{path}.{name}" if path else name
            if isinstance(child, torch.nn.ModuleList) and _repeated(child):
                blocks = copy.copy(child)
                blocks._modules = {
                    k: _numbered(compile_block(m), i) for i, (k, m) in enumerate(child._modules.items())
                }
                new._modules[name] = blocks
                paths.append(where)
            elif _holds_blocks(child):
                new._modules[name] = rebuild(child, where)
        return new

    return rebuild(model, ""), paths
