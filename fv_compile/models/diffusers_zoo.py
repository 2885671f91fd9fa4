"""diffusers video transformers with random weights, to run the toolkit on real-world code.

diffusers is imported only when a model is requested, so the rest of
``fv_compile.models`` works without it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fv_compile.errors import FvCompileError, MissingDependency

from .config import Grid
from .zoo import _TINY_GRID, PRESETS

_TINY_TEXT_LEN = 16


@dataclass(frozen=True)
class _Spec:
    config: dict[str, Any]
    grid: Grid
    text_len: int


_Inputs = tuple[tuple[torch.Tensor, ...], dict[str, Any]]


def _wan_inputs(model: nn.Module, spec: _Spec, batch: int, gen: torch.Generator) -> _Inputs:
    cfg = model.config
    latent = torch.randn(batch, cfg.in_channels, *spec.grid, generator=gen)
    timestep = torch.randint(0, 1000, (batch,), generator=gen)
    text = torch.randn(batch, spec.text_len, cfg.text_dim, generator=gen)
    return (latent, timestep, text), {"return_dict": False}


def _cogvideox_inputs(model: nn.Module, spec: _Spec, batch: int, gen: torch.Generator) -> _Inputs:
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    cfg = model.config
    frames, height, width = spec.grid
    latent = torch.randn(batch, frames, cfg.in_channels, height, width, generator=gen)  # frames first
    text = torch.randn(batch, spec.text_len, cfg.text_embed_dim, generator=gen)
    timestep = torch.randint(0, 1000, (batch,), generator=gen)
    kwargs: dict[str, Any] = {"return_dict": False}
    if cfg.use_rotary_positional_embeddings:
        # The pipeline, not the transformer, computes CogVideoX's RoPE tables.
        rows, cols = height // cfg.patch_size, width // cfg.patch_size
        kwargs["image_rotary_emb"] = get_3d_rotary_pos_embed(
            embed_dim=cfg.attention_head_dim,
            crops_coords=((0, 0), (rows, cols)),
            grid_size=(rows, cols),
            temporal_size=frames,
        )
    return (latent, text, timestep), kwargs


def _hunyuan_inputs(model: nn.Module, spec: _Spec, batch: int, gen: torch.Generator) -> _Inputs:
    cfg = model.config
    latent = torch.randn(batch, cfg.in_channels, *spec.grid, generator=gen)
    timestep = torch.randint(0, 1000, (batch,), generator=gen)
    text = torch.randn(batch, spec.text_len, cfg.text_embed_dim, generator=gen)
    valid = spec.text_len - spec.text_len // 4
    text_mask = (torch.arange(spec.text_len) < valid).long().repeat(batch, 1)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=gen)
    kwargs: dict[str, Any] = {"pooled_projections": pooled, "return_dict": False}
    if cfg.guidance_embeds:
        kwargs["guidance"] = torch.full((batch,), 6.0 * 1000.0)
    return (latent, timestep, text, text_mask), kwargs


def _same_as_preset(name: str, config: dict[str, Any]) -> _Spec:
    return _Spec(config, PRESETS[name].default_grid, PRESETS[name].text_len)


_SPECS: dict[str, dict[str, _Spec]] = {
    "WanTransformer3DModel": {
        "tiny": _Spec(
            {
                "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 4,
                "out_channels": 4, "text_dim": 32, "freq_dim": 32, "ffn_dim": 64,
            },
            _TINY_GRID, _TINY_TEXT_LEN,
        ),
        "wan2.1-1.3b": _same_as_preset(
            "wan2.1-1.3b", {"num_layers": 30, "num_attention_heads": 12, "attention_head_dim": 128, "ffn_dim": 8960}
        ),
        "wan2.1-14b": _same_as_preset(
            "wan2.1-14b", {"num_layers": 40, "num_attention_heads": 40, "attention_head_dim": 128, "ffn_dim": 13824}
        ),
    },
    "CogVideoXTransformer3DModel": {
        "tiny": _Spec(
            {
                "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 4,
                "out_channels": 4, "time_embed_dim": 32, "text_embed_dim": 32,
                # sample_* only size CogVideoX's learned/sincos position tables; pixel frames here.
                "sample_frames": (_TINY_GRID[0] - 1) * 4 + 1, "sample_height": _TINY_GRID[1],
                "sample_width": _TINY_GRID[2], "max_text_seq_length": _TINY_TEXT_LEN,
                "use_rotary_positional_embeddings": True,
            },
            _TINY_GRID, _TINY_TEXT_LEN,
        ),
        "cogvideox-5b": _same_as_preset(
            "cogvideox-5b",
            {
                "num_layers": 42, "num_attention_heads": 48, "attention_head_dim": 64,
                "use_rotary_positional_embeddings": True,
            },
        ),
    },
    "HunyuanVideoTransformer3DModel": {
        "tiny": _Spec(
            {
                "num_layers": 2, "num_single_layers": 2, "num_refiner_layers": 1, "num_attention_heads": 2,
                "attention_head_dim": 16, "rope_axes_dim": (4, 6, 6), "in_channels": 4, "out_channels": 4,
                "text_embed_dim": 32, "pooled_projection_dim": 16,
            },
            _TINY_GRID, _TINY_TEXT_LEN,
        ),
        "hunyuanvideo": _same_as_preset("hunyuanvideo", {}),
    },
}

_INPUTS: dict[str, Callable[[nn.Module, _Spec, int, torch.Generator], _Inputs]] = {
    "WanTransformer3DModel": _wan_inputs,
    "CogVideoXTransformer3DModel": _cogvideox_inputs,
    "HunyuanVideoTransformer3DModel": _hunyuan_inputs,
}


def _import_diffusers() -> Any:
    try:
        import diffusers
    except ImportError as err:
        raise MissingDependency(
            "from_diffusers needs diffusers: pip install 'fv-compile[test]' (or pip install diffusers)"
        ) from err
    return diffusers


def _cast_like_from_pretrained(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast as ``from_pretrained(torch_dtype=dtype)`` would: modules the class pins stay float32.

    A plain ``model.to(dtype)`` would also cast e.g. Wan's time embedder and
    norms, which no real checkpoint runs in low precision.
    """
    keep = model._keep_in_fp32_modules or []
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if tensor.is_floating_point() and not any(m in name.split(".") for m in keep):
            tensor.data = tensor.data.to(dtype)
    return model


def from_diffusers(
    class_name: str,
    preset_or_config: str | dict[str, Any] = "tiny",
    *,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> tuple[nn.Module, tuple[Any, ...], dict[str, Any]]:
    """A diffusers transformer with seeded random weights, plus inputs for one forward.

    ``preset_or_config`` is ``"tiny"`` (CPU-sized), the name of the matching
    full-size preset (e.g. ``"wan2.1-1.3b"``), or a dict of constructor
    overrides applied on top of ``"tiny"``. Inputs follow each class's own
    forward signature and layout (CogVideoX takes ``[B, T, C, H, W]``) and ask
    for a plain tuple output (``return_dict=False``). ``device="meta"`` builds
    without allocating, for shape and FLOP tools.
    """
    specs = _SPECS.get(class_name)
    if specs is None:
        raise FvCompileError(f"unsupported diffusers class {class_name!r}; supported: {', '.join(_SPECS)}")
    if isinstance(preset_or_config, dict):
        tiny = specs["tiny"]
        spec = _Spec({**tiny.config, **preset_or_config}, tiny.grid, tiny.text_len)
    elif preset_or_config in specs:
        spec = specs[preset_or_config]
    else:
        raise FvCompileError(f"unknown {class_name} preset {preset_or_config!r}; valid: {', '.join(specs)}")

    model_cls = getattr(_import_diffusers(), class_name)
    build_device = torch.device("meta") if torch.device(device).type == "meta" else torch.device("cpu")
    with torch.random.fork_rng(devices=[]), build_device:
        torch.manual_seed(seed)
        model = model_cls(**spec.config)
    model = _cast_like_from_pretrained(model.to(device), dtype).eval().requires_grad_(False)

    args, kwargs = _INPUTS[class_name](model, spec, batch, torch.Generator().manual_seed(seed))

    def place(value: Any) -> Any:
        # Activations follow ``dtype``; integer tensors and the float32 RoPE
        # tables (nested in a tuple) keep theirs, as in the pipelines.
        if isinstance(value, tuple):
            return tuple(x.to(device) for x in value)
        if isinstance(value, torch.Tensor):
            return value.to(device, dtype) if value.is_floating_point() else value.to(device)
        return value

    return model, tuple(place(a) for a in args), {k: place(v) for k, v in kwargs.items()}
