"""Named presets of the reference DiTs and the inputs to run them with."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fv_compile.errors import FvCompileError, FvCompileTypeError

from ._layers import init_weights
from .cogvideox import CogVideoXConfig, CogVideoXModel
from .config import Grid, VideoDiTConfig
from .hunyuan import HunyuanConfig, HunyuanVideoModel
from .wan import WanConfig, WanModel

_TINY_GRID: Grid = (2, 16, 16)  # 128 video tokens after a (1, 2, 2) patch


def latent_grid(
    frames: int, height: int, width: int, *, temporal: int = 4, spatial: int = 8
) -> Grid:
    """Latent ``(T, H, W)`` a causal video VAE produces for a pixel-space video.

    The first frame is encoded on its own and every ``temporal`` further frames
    share one latent frame, hence ``(frames - 1) // temporal + 1``.
    """
    if frames < 1 or height < spatial or width < spatial:
        raise FvCompileError(
            f"video {frames}x{height}x{width} is too small for a {temporal}x{spatial}x{spatial} VAE"
        )
    return ((frames - 1) // temporal + 1, height // spatial, width // spatial)


PRESETS: dict[str, VideoDiTConfig] = {
    "wan-tiny": WanConfig(
        num_layers=2,
        num_heads=2,
        head_dim=32,
        ffn_dim=128,
        text_dim=32,
        text_len=16,
        in_channels=4,
        rope_axes=(12, 10, 10),
        default_grid=_TINY_GRID,
    ),
    "wan2.1-1.3b": WanConfig(
        num_layers=30,
        num_heads=12,
        head_dim=128,
        ffn_dim=8960,
        text_len=512,
        rope_axes=(44, 42, 42),
        default_grid=latent_grid(81, 480, 832),
    ),
    "wan2.1-14b": WanConfig(
        num_layers=40,
        num_heads=40,
        head_dim=128,
        ffn_dim=13824,
        text_len=512,
        rope_axes=(44, 42, 42),
        default_grid=latent_grid(81, 720, 1280),
    ),
    "hunyuan-tiny": HunyuanConfig(
        num_double_layers=2,
        num_single_layers=2,
        num_refiner_layers=1,
        num_heads=2,
        head_dim=32,
        num_kv_heads=1,
        text_dim=32,
        text_len=16,
        in_channels=4,
        rope_axes=(8, 12, 12),
        rope_theta=256.0,
        default_grid=_TINY_GRID,
    ),
    "hunyuanvideo": HunyuanConfig(
        num_double_layers=20,
        num_single_layers=40,
        num_heads=24,
        head_dim=128,
        text_len=256,
        rope_axes=(16, 56, 56),
        rope_theta=256.0,
        default_grid=latent_grid(129, 720, 1280),
    ),
    "cogvideox-tiny": CogVideoXConfig(
        num_layers=2,
        num_heads=2,
        head_dim=16,
        ffn_dim=128,
        time_embed_dim=32,
        freq_dim=32,
        text_dim=32,
        text_len=16,
        in_channels=4,
        rope_axes=(4, 6, 6),
        eps=1e-5,
        default_grid=_TINY_GRID,
    ),
    "cogvideox-5b": CogVideoXConfig(
        num_layers=42,
        num_heads=48,
        head_dim=64,
        ffn_dim=4 * 3072,
        freq_dim=3072,
        text_len=226,
        rope_axes=(16, 24, 24),
        eps=1e-5,
        default_grid=latent_grid(49, 480, 720),
    ),
}

_MODELS: dict[type[VideoDiTConfig], type[nn.Module]] = {
    WanConfig: WanModel,
    HunyuanConfig: HunyuanVideoModel,
    CogVideoXConfig: CogVideoXModel,
}


def _config(preset: str | VideoDiTConfig) -> VideoDiTConfig:
    if isinstance(preset, VideoDiTConfig):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise FvCompileError(
            f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}"
        ) from None


def build_model(
    preset: str | VideoDiTConfig,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> nn.Module:
    """A preset (or a config, e.g. a ``dataclasses.replace`` of one) with random weights.

    The model is built on the meta device first, so ``device="meta"`` costs no
    memory and a real device only ever holds one copy, in ``dtype``. Weights
    depend only on ``seed`` (and the device's RNG). The model comes back in
    ``eval()`` mode with frozen parameters: these are inference workloads, and
    frozen weights keep compiled graphs free of autograd.
    """
    cfg = _config(preset)
    with torch.device("meta"):
        model = _MODELS[type(cfg)](cfg)
    model = model.to(dtype)
    if torch.device(device).type != "meta":
        model = model.to_empty(device=device)
        init_weights(model, seed)
    return model.eval().requires_grad_(False)


def _resolve_grid(
    cfg: VideoDiTConfig,
    frames: int | None,
    height: int | None,
    width: int | None,
    grid: Grid | None,
) -> tuple[int, ...]:
    """The latent grid asked for; a caller's `grid` as given, for `token_grid` to check."""
    video = (frames, height, width)
    if grid is not None:
        if any(n is not None for n in video):
            raise FvCompileError("pass either grid or frames/height/width, not both")
        return tuple(grid)
    if all(n is None for n in video):
        return cfg.default_grid
    t, h, w = cfg.default_grid
    defaults = ((t - 1) * 4 + 1, h * 8, w * 8)  # pixel size that maps back to default_grid
    return latent_grid(*(d if n is None else n for n, d in zip(video, defaults)))


def token_count(preset: str | VideoDiTConfig, grid: Grid | None = None) -> int:
    """Video tokens (text excluded) the preset sees for a latent ``grid`` (default: its usual one)."""
    cfg = _config(preset)
    t, h, w = cfg.token_grid(cfg.default_grid if grid is None else grid)
    return t * h * w


def example_inputs(
    model_or_preset: nn.Module | str | VideoDiTConfig,
    *,
    batch: int = 1,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    grid: Grid | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    valid_text_len: int | None = None,
) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
    """``(args, kwargs)`` for one ``model(*args, **kwargs)`` call.

    args are ``(latent [B, C, T, H, W], timestep [B] float32 in [0, 1000),
    text_states [B, L, text_dim])``; the timestep stays float32 whatever
    ``dtype`` is, as diffusion schedulers hand it over. For models whose
    ``text_mask`` masks attention keys (Hunyuan), kwargs holds a ``[B, L]``
    bool mask whose first ``valid_text_len`` tokens are real (default: three
    quarters), so the padding path is exercised unless asked otherwise.

    The video size is ``grid`` (latent ``(T, H, W)``) or pixel
    ``frames/height/width`` mapped by ``latent_grid``. ``dtype``/``device``
    default to the model's when a model is given, else float32 on CPU. Values
    are drawn on the CPU, so a seed gives the same inputs on every device.
    """
    cfg: VideoDiTConfig
    if isinstance(model_or_preset, nn.Module):
        config = model_or_preset.config
        if not isinstance(config, VideoDiTConfig):
            raise FvCompileTypeError(
                f"{type(model_or_preset).__name__} is not a model from build_model"
            )
        cfg = config
        param = next(model_or_preset.parameters())
        dtype = param.dtype if dtype is None else dtype
        device = param.device if device is None else device
    else:
        cfg = _config(model_or_preset)
    dtype = torch.float32 if dtype is None else dtype
    device = "cpu" if device is None else device

    latent_shape = _resolve_grid(cfg, frames, height, width, grid)
    cfg.token_grid(latent_shape)
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(batch, cfg.in_channels, *latent_shape, generator=gen)
    timestep = torch.rand(batch, generator=gen) * 1000
    text_states = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=gen)
    args = (latent.to(device, dtype), timestep.to(device), text_states.to(device, dtype))

    kwargs: dict[str, Any] = {}
    if cfg.masks_text_keys:
        valid = cfg.text_len - cfg.text_len // 4 if valid_text_len is None else valid_text_len
        if not 1 <= valid <= cfg.text_len:
            raise FvCompileError(f"valid_text_len must be in [1, {cfg.text_len}], got {valid}")
        mask = (torch.arange(cfg.text_len) < valid).repeat(batch, 1)
        kwargs["text_mask"] = mask.to(device)
    return args, kwargs
