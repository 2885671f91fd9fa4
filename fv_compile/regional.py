"""Regional compilation: compile the repeated transformer block once, not the whole model.

A video DiT is 30-60 copies of one block. Compiling the block (Dynamo reuses the compiled code for
every instance, since parameters are graph inputs) cuts cold compile from minutes to seconds;
the glue between blocks (embeddings, heads) stays eager. The user's model is not touched: the
compiled model runs a shallow copy of the modules on the path to each block list, in which the
blocks are wrapped; `RegionalCopy.sync` refreshes those copies from the originals before every
call, so what the user sets on the model after compiling (`eval()`, gradient checkpointing flags,
hooks) holds for the glue too.

Every block instance runs the same compiled code, so an attention impl cannot tell the layers
apart from its module path (it was traced once, in the first block). `current_block()` says which
block is running: each compiled block sets it (a context variable of `fv_compile.context`) around
its call, outside the compiled region, so backends with per-layer settings (STA windows) read it
at run time.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from typing import Any

import torch

from fv_compile.context import (
    current_block,
    current_layer,
    current_region,
    enter_region,
    leave_region,
)
from fv_compile.errors import FvCompileError
from fv_compile.explain import AttentionCallCounter

__all__ = [
    "GlueWatch",
    "RegionalCopy",
    "block_lists",
    "blocks_hold_most_weights",
    "compile_blocks",
    "current_block",
    "current_layer",
    "current_region",
]

_glue_watch: list[Any] = []  # an active GlueWatch: paused while a compiled block runs


def _numbered(compiled: torch.nn.Module, path: str, index: int, layer: int) -> torch.nn.Module:
    """Make `compiled` announce its place while it runs (reset even when it raises)."""
    calls = threading.local()  # per thread, a token per call in progress (a block may nest)

    def enter(module, args):
        if not hasattr(calls, "tokens"):
            calls.tokens = []
        calls.tokens.append(enter_region(path, index, layer))
        if _glue_watch:
            _glue_watch[-1].pause()

    def leave(module, args, output):
        tokens = getattr(calls, "tokens", None)
        if tokens:
            leave_region(tokens.pop())
        if _glue_watch:
            _glue_watch[-1].resume()

    compiled.register_forward_pre_hook(enter)
    compiled.register_forward_hook(leave, always_call=True)
    return compiled


def _repeated(modules: torch.nn.ModuleList) -> bool:
    kinds = {type(m) for m in modules}
    return len(modules) >= 2 and len(kinds) == 1


def _holds_blocks(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.ModuleList) and _repeated(m) for m in module.modules())


def block_lists(model: torch.nn.Module) -> list[tuple[str, torch.nn.ModuleList]]:
    """The repeated block lists regional compilation would wrap: the outermost `nn.ModuleList`
    of at least two modules of one class on each path from the root."""
    found: list[tuple[str, torch.nn.ModuleList]] = []

    def visit(module: torch.nn.Module, path: str) -> None:
        for name, child in module._modules.items():
            if child is None:
                continue
            where = f"{path}.{name}" if path else name
            if isinstance(child, torch.nn.ModuleList) and _repeated(child):
                found.append((where, child))
            else:
                visit(child, where)

    visit(model, "")
    return found


def blocks_hold_most_weights(model: torch.nn.Module) -> bool:
    """Whether the repeated block lists hold at least half of the model's parameters: what
    `regional="auto"` asks before compiling blocks only. A model whose only repeated list is a
    pair of small heads (its attention elsewhere) compiles whole instead."""
    total = sum(p.numel() for p in model.parameters())
    if total == 0:
        return False
    seen: set[int] = set()
    inside = 0
    for _, blocks in block_lists(model):
        for p in blocks.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                inside += p.numel()
    return 2 * inside >= total


class RegionalCopy:
    """The module the compiled model calls: a copy of the path from the root to each block
    list, with every block wrapped. `module` is that copy; `paths` the block lists' paths."""

    def __init__(
        self, model: torch.nn.Module, compile_block: Callable[[torch.nn.Module], torch.nn.Module]
    ) -> None:
        if not _holds_blocks(model):
            raise FvCompileError(
                "regional=True found no repeated blocks (an nn.ModuleList of at least two modules "
                "of one class); compile the whole model with regional=False"
            )
        self.paths: list[str] = []
        # (copy, original, {child name: (original child, its replacement)}) per copied module
        self._copies: list[tuple[torch.nn.Module, torch.nn.Module, dict[str, tuple[Any, Any]]]] = []
        # (path, original list, the blocks it held at compile time) per wrapped block list
        self._lists: list[tuple[str, torch.nn.ModuleList, tuple[Any, ...]]] = []
        self.module = self._rebuild(model, "", compile_block)

    def _rebuild(self, module: torch.nn.Module, path: str, compile_block) -> torch.nn.Module:
        new = copy.copy(module)
        replaced: dict[str, tuple[Any, Any]] = {}
        for name, child in module._modules.items():
            if child is None:
                continue
            where = f"{path}.{name}" if path else name
            if isinstance(child, torch.nn.ModuleList) and _repeated(child):
                blocks = copy.copy(child)
                first = sum(len(held) for _, _, held in self._lists)  # layers of the lists before
                blocks._modules = {
                    k: _numbered(compile_block(m), where, i, first + i)
                    for i, (k, m) in enumerate(child._modules.items())
                }
                replaced[name] = (child, blocks)
                self.paths.append(where)
                self._lists.append((where, child, tuple(child._modules.values())))
            elif _holds_blocks(child):
                replaced[name] = (child, self._rebuild(child, where, compile_block))
        new._modules = {**module._modules, **{k: v for k, (_, v) in replaced.items()}}
        self._copies.append((new, module, replaced))
        return new

    def sync(self) -> None:
        """Give every copy the original's current attributes (its own replaced children kept).

        Raises when a block list or a block was replaced after compiling: its compiled
        wrappers would run the old blocks."""
        for path, blocks, held in self._lists:
            current = tuple(blocks._modules.values())
            if len(current) != len(held) or any(a is not b for a, b in zip(current, held)):
                raise FvCompileError(
                    f"the blocks of {path} changed after fv_compile.compile (a block was replaced, "
                    "added or removed): compile the model again"
                )
        for new, old, replaced in self._copies:
            for name, (child, _) in replaced.items():
                if old._modules.get(name) is not child:
                    raise FvCompileError(
                        f"{name} of {type(old).__name__} was replaced after fv_compile.compile: "
                        "compile the model again"
                    )
            state = new.__dict__
            state.update(old.__dict__)
            state["_modules"] = {**old._modules, **{k: v for k, (_, v) in replaced.items()}}


def compile_blocks(
    model: torch.nn.Module, compile_block: Callable[[torch.nn.Module], torch.nn.Module]
) -> tuple[torch.nn.Module, list[str]]:
    """A copy of `model` whose repeated blocks are `compile_block(block)`; and their list paths."""
    regional = RegionalCopy(model, compile_block)
    return regional.module, regional.paths


class GlueWatch:
    """Counts the attention calls (SDPA, softmax) the eager glue between compiled blocks makes,
    by source line: attention there is not rewritten, and the compiled model says so. Paused
    while a compiled block runs, so Dynamo never traces a block under it."""

    def __init__(self) -> None:
        self.counter = AttentionCallCounter()
        self._active = False

    def __enter__(self) -> GlueWatch:
        _glue_watch.append(self)
        self.resume()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.pause()
        _glue_watch.pop()

    def pause(self) -> None:
        if self._active:
            self._active = False
            self.counter.__exit__(None, None, None)

    def resume(self) -> None:
        if not self._active:
            self._active = True
            self.counter.__enter__()
