"""Per-step state of a denoising loop, and the context that carries it into compiled graphs.

Backends read `ForwardBatch` and `FastVideoArgs` by attribute, so FastVideo's own objects (which
have many more fields) work wherever these do.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from fv_compile.errors import FvCompileError


@dataclass
class DiTConfig:
    """The transformer facts a metadata builder needs.

    patch_size: `(pt, ph, pw)`, how many latent cells one token covers in time, height and width
        (Wan, HunyuanVideo and CogVideoX use `(1, 2, 2)`); the token grid is the latent grid divided
        by it.
    """

    patch_size: tuple[int, int, int] = (1, 2, 2)


@dataclass
class PipelineConfig:
    """Mirrors FastVideo's `fastvideo_args.pipeline_config`; only the DiT part is read here."""

    dit_config: DiTConfig = field(default_factory=DiTConfig)


@dataclass
class FastVideoArgs:
    """Run-wide settings (FastVideo's `FastVideoArgs`, reduced to what attention backends read).

    pipeline_config: `pipeline_config.dit_config.patch_size` is the patch size, where FastVideo keeps it.
    patch_size: a flat alternative to the path above; used when set.
    sta_tile_size: sliding tile attention's tile, in tokens `(t, h, w)`; FastVideo uses `(6, 8, 8)`.
    sta_window: STA window in tiles `(wt, wh, ww)`, used for every layer and head when neither
        `ForwardBatch.STA_param` nor `mask_strategy_file_path` gives per-layer windows.
    sta_dense_steps: how many first denoising steps run full attention before STA starts.
    sta_text_attends_all: whether text tokens of joint attention attend (and are attended by) all
        tokens; FastVideo's behaviour, the default.
    sta_kernel: the kernel of STA's sparse steps: "auto" (flash-attn-4's block-sparse forward when
        it is installed and can run the site, measured faster on the H200; else our Triton
        kernel), "triton", or "flash_attn".
    sta_token_order: "auto" (the default): where fv_compile proves the model token-wise between
        its STA sites and the tile divides the token grid, that whole stretch runs in tile order,
        gathered once where the tokens enter it and scattered once where they leave; "per_site":
        every STA site gathers its own q, k, v into tile order and scatters its output back.
    mask_strategy_file_path: a JSON file of per-step, per-layer, per-head windows in FastVideo's
        format (`{"<step>_<layer>_<head>": [wt, wh, ww], ...}`).
    VSA_sparsity: fraction of key cubes video sparse attention skips (0 = dense); a number, or one
        per step (the last holds for the steps after it). `ForwardBatch.VSA_sparsity` overrides it.
    vsa_dense_steps: how many first denoising steps run video sparse attention at sparsity 0
        (dense), on the same compiled graph as the sparse steps.
    """

    pipeline_config: PipelineConfig = field(default_factory=PipelineConfig)
    patch_size: tuple[int, int, int] | None = None
    sta_tile_size: tuple[int, int, int] = (6, 8, 8)
    sta_window: tuple[int, int, int] | None = None
    sta_dense_steps: int = 0
    sta_text_attends_all: bool = True
    sta_kernel: str = "auto"
    sta_token_order: str = "auto"
    mask_strategy_file_path: str | None = None
    VSA_sparsity: float | tuple[float, ...] = 0.0
    vsa_dense_steps: int = 0


@dataclass
class ForwardBatch:
    """Per-request state of a denoising loop (FastVideo's `ForwardBatch`, reduced).

    raw_latent_shape: shape of the latent fed to the transformer, `(B, C, T, H, W)`.
    STA_param: per-step windows for sliding tile attention, indexed `[step][layer][head]` ->
        `(wt, wh, ww)` in tiles, as FastVideo's `DenoisingStage` prepares them.
    VSA_sparsity: overrides `FastVideoArgs.VSA_sparsity` for this request when set.
    is_cfg_negative: whether the current transformer call is the unconditional CFG pass.
    timesteps: the scheduler's timesteps for the request (informational).
    """

    raw_latent_shape: tuple[int, ...] | None = None
    STA_param: Any = None
    VSA_sparsity: float | None = None
    is_cfg_negative: bool = False
    timesteps: torch.Tensor | None = None


@dataclass
class ForwardContext:
    """One denoising step's inputs, plus the metadata already built for it (one per backend),
    and what backends derive from that metadata for the step (`step_cache`)."""

    current_timestep: int
    forward_batch: Any
    fastvideo_args: Any
    built: dict[Any, Any] = field(default_factory=dict)
    cache: dict[Any, Any] = field(default_factory=dict)


_CURRENT: contextvars.ContextVar[ForwardContext | None] = contextvars.ContextVar(
    "fv_compile_forward_context", default=None
)


@contextlib.contextmanager
def forward_context(
    current_timestep: int = 0,
    forward_batch: Any = None,
    fastvideo_args: Any = None,
) -> Iterator[ForwardContext]:
    """Make one denoising step's state visible to compiled models called inside the block.

    Each backend's metadata builder runs at most once per context, on first use, and every
    attention site (and every CFG pass) inside the block shares the result. Contexts nest; the
    innermost wins.
    """
    if fastvideo_args is None:
        fastvideo_args = FastVideoArgs()
    if forward_batch is None:
        forward_batch = ForwardBatch()
    ctx = ForwardContext(int(current_timestep), forward_batch, fastvideo_args)
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)


def current_forward_context() -> ForwardContext | None:
    return _CURRENT.get()


# The context a compiled model derives from its own call when the caller set none (see
# fv_compile/pipelines.py): a function that builds it on first use, so a call that needs no
# metadata reads nothing from its inputs (a timestep on the GPU would cost a host sync).
_DERIVED: contextvars.ContextVar[Callable[[], ForwardContext] | None] = contextvars.ContextVar(
    "fv_compile_derived_context", default=None
)


def set_derived_context(resolve: Callable[[], ForwardContext] | None) -> contextvars.Token:
    """Make `resolve()` the context of calls inside the compiled model call now starting."""
    return _DERIVED.set(resolve)


def reset_derived_context(token: contextvars.Token) -> None:
    _DERIVED.reset(token)


def derived_forward_context() -> ForwardContext | None:
    """The context the running compiled model derived from its call, if it made one."""
    resolve = _DERIVED.get()
    return None if resolve is None else resolve()


# Off while a compiled model runs under CUDA graphs: the Python inside its graphs runs only to
# warm up and record, with allocations in the graphs' private memory pool, and a tensor kept in
# the step cache past the call would be a live pool allocation no graph output tracks (CUDA
# graph trees refuse to go on). A replay reruns every recorded kernel anyway.
_STEP_CACHE_OFF: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "fv_compile_step_cache_off", default=False
)


@contextlib.contextmanager
def step_cache_off() -> Iterator[None]:
    """Calls inside the block see no step cache (`step_cache()` is None)."""
    token = _STEP_CACHE_OFF.set(True)
    try:
        yield
    finally:
        _STEP_CACHE_OFF.reset(token)


# The regionally compiled block running now (fv_compile/regional.py sets it around each block's
# call, outside the compiled code): every block runs the impls traced in the first one, so a
# backend with per-layer settings reads the layer here, at run time.
_REGION: contextvars.ContextVar[tuple[str, int, int] | None] = contextvars.ContextVar(
    "fv_compile_running_block", default=None
)


def enter_region(path: str, index: int, layer: int) -> contextvars.Token:
    """Mark block `index` of the block list at `path`, the model's `layer`-th block, as running
    (undo with `leave_region`)."""
    return _REGION.set((path, index, layer))


def leave_region(token: contextvars.Token) -> None:
    _REGION.reset(token)


def current_region() -> tuple[str, int] | None:
    """`(path of the block list, index)` of the regionally compiled block running now."""
    region = _REGION.get()
    return None if region is None else region[:2]


def current_block() -> int | None:
    """The index, in its `nn.ModuleList`, of the regionally compiled block running now; None
    outside regional blocks."""
    region = _REGION.get()
    return None if region is None else region[1]


def current_layer() -> int | None:
    """The layer number of the regionally compiled block running now: its place among all the
    model's blocks, list after list in model order (HunyuanVideo's `double_blocks.N` is layer N,
    its `single_blocks.N` layer `len(double_blocks) + N`); None outside regional blocks."""
    region = _REGION.get()
    return None if region is None else region[2]


def layer_number(module_path: str, block_lists: list[tuple[str, int]]) -> int | None:
    """The layer number (as `current_layer`) of the block `module_path` lies in, given the
    model's block lists `[(path, length)]` in model order; None outside them."""
    offset = 0
    for path, length in block_lists:
        head = f"{path}."
        if module_path.startswith(head):
            index = module_path[len(head) :].split(".", 1)[0]
            if index.isdigit() and int(index) < length:
                return offset + int(index)
        offset += length
    return None


def step_cache() -> dict[Any, Any] | None:
    """The per-step cache of the forward context the running call belongs to (the caller's, or
    the one the compiled model derived from its call), or None outside any. What a backend
    stores here lives as long as the step: every site and CFG pass of the step shares it, and
    the next step starts empty. None under CUDA graphs (see `_STEP_CACHE_OFF`)."""
    if _STEP_CACHE_OFF.get():
        return None
    ctx = _CURRENT.get()
    if ctx is None:
        resolve = _DERIVED.get()
        ctx = None if resolve is None else resolve()
    return None if ctx is None else ctx.cache


def patch_size_of(fastvideo_args: Any) -> tuple[int, int, int]:
    """The DiT patch size from `fastvideo_args.patch_size` or FastVideo's
    `fastvideo_args.pipeline_config.dit_config.patch_size`."""
    flat = getattr(fastvideo_args, "patch_size", None)
    if flat is not None:
        return cast(tuple[int, int, int], tuple(int(p) for p in flat))  # the user's (t, h, w)
    try:
        nested = fastvideo_args.pipeline_config.dit_config.patch_size
    except AttributeError:
        nested = None
    if nested is None:
        raise FvCompileError(
            "the DiT patch size is unknown: set FastVideoArgs(patch_size=(1, 2, 2)) or "
            "fastvideo_args.pipeline_config.dit_config.patch_size"
        )
    return cast(tuple[int, int, int], tuple(int(p) for p in nested))
