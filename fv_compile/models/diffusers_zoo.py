"""diffusers video transformers with random weights, to run the toolkit on real-world code.

Any diffusers video transformer (a class named ``*Transformer3DModel``) can be built: the classes
listed in ``_SPECS`` have hand-made CPU-sized ("tiny") configs and full-size presets; any other
class gets a tiny config by shrinking the common constructor arguments (layers, heads, widths)
and inputs made from its ``forward`` parameters by name. Every size can be changed: constructor
overrides (``config``), the latent grid or the pixel video it comes from (``grid``, ``video``).

diffusers is imported only when a model is requested, so the rest of
``fv_compile.models`` works without it.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fv_compile.errors import FvCompileError, MissingDependency

from .config import Grid
from .zoo import _TINY_GRID, PRESETS, latent_grid

_TINY_TEXT_LEN = 16


@dataclass(frozen=True)
class _Spec:
    config: dict[str, Any]
    grid: Grid
    text_len: int


_Inputs = tuple[tuple[torch.Tensor, ...], dict[str, Any]]


def _wan_inputs(model: nn.Module, spec: _Spec, batch: int, gen: torch.Generator) -> _Inputs:
    cfg: Any = model.config  # diffusers' FrozenDict: its keys read as attributes
    latent = torch.randn(batch, cfg.in_channels, *spec.grid, generator=gen)
    timestep = torch.randint(0, 1000, (batch,), generator=gen)
    text = torch.randn(batch, spec.text_len, cfg.text_dim, generator=gen)
    return (latent, timestep, text), {"return_dict": False}


def _cogvideox_inputs(model: nn.Module, spec: _Spec, batch: int, gen: torch.Generator) -> _Inputs:
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    cfg: Any = model.config  # diffusers' FrozenDict: its keys read as attributes
    frames, height, width = spec.grid
    latent = torch.randn(
        batch, frames, cfg.in_channels, height, width, generator=gen
    )  # frames first
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
    cfg: Any = model.config  # diffusers' FrozenDict: its keys read as attributes
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
                "num_layers": 2,
                "num_attention_heads": 2,
                "attention_head_dim": 16,
                "in_channels": 4,
                "out_channels": 4,
                "text_dim": 32,
                "freq_dim": 32,
                "ffn_dim": 64,
            },
            _TINY_GRID,
            _TINY_TEXT_LEN,
        ),
        "wan2.1-1.3b": _same_as_preset(
            "wan2.1-1.3b",
            {
                "num_layers": 30,
                "num_attention_heads": 12,
                "attention_head_dim": 128,
                "ffn_dim": 8960,
            },
        ),
        "wan2.1-14b": _same_as_preset(
            "wan2.1-14b",
            {
                "num_layers": 40,
                "num_attention_heads": 40,
                "attention_head_dim": 128,
                "ffn_dim": 13824,
            },
        ),
    },
    "CogVideoXTransformer3DModel": {
        "tiny": _Spec(
            {
                "num_layers": 2,
                "num_attention_heads": 2,
                "attention_head_dim": 16,
                "in_channels": 4,
                "out_channels": 4,
                "time_embed_dim": 32,
                "text_embed_dim": 32,
                # sample_* only size CogVideoX's learned/sincos position tables; pixel frames here.
                "sample_frames": (_TINY_GRID[0] - 1) * 4 + 1,
                "sample_height": _TINY_GRID[1],
                "sample_width": _TINY_GRID[2],
                "max_text_seq_length": _TINY_TEXT_LEN,
                "use_rotary_positional_embeddings": True,
            },
            _TINY_GRID,
            _TINY_TEXT_LEN,
        ),
        "cogvideox-5b": _same_as_preset(
            "cogvideox-5b",
            {
                "num_layers": 42,
                "num_attention_heads": 48,
                "attention_head_dim": 64,
                "use_rotary_positional_embeddings": True,
            },
        ),
    },
    "HunyuanVideoTransformer3DModel": {
        "tiny": _Spec(
            {
                "num_layers": 2,
                "num_single_layers": 2,
                "num_refiner_layers": 1,
                "num_attention_heads": 2,
                "attention_head_dim": 16,
                "rope_axes_dim": (4, 6, 6),
                "in_channels": 4,
                "out_channels": 4,
                "text_embed_dim": 32,
                "pooled_projection_dim": 16,
            },
            _TINY_GRID,
            _TINY_TEXT_LEN,
        ),
        "hunyuanvideo": _same_as_preset("hunyuanvideo", {}),
    },
    "LTXVideoTransformer3DModel": {
        # cross_attention_dim is the inner width (heads x head_dim), as in LTX-Video's own config
        "tiny": _Spec(
            {
                "num_layers": 2,
                "num_attention_heads": 2,
                "attention_head_dim": 16,
                "in_channels": 8,
                "out_channels": 8,
                "cross_attention_dim": 32,
                "caption_channels": 32,
            },
            (2, 8, 8),
            _TINY_TEXT_LEN,
        ),
        # LTX-Video 2B (the class's defaults) at 768x512, 121 frames: 6144 tokens
        "ltx-video-2b": _Spec({}, latent_grid(121, 512, 768, temporal=8, spatial=32), 128),
    },
    "MochiTransformer3DModel": {
        "tiny": _Spec(
            {
                "num_layers": 2,
                "num_attention_heads": 2,
                "attention_head_dim": 16,
                "in_channels": 4,
                "pooled_projection_dim": 16,
                "text_embed_dim": 32,
                "time_embed_dim": 32,
                "max_sequence_length": _TINY_TEXT_LEN,
            },
            _TINY_GRID,
            _TINY_TEXT_LEN,
        ),
        # Mochi-1 (the class's defaults) at 848x480, 163 frames
        "mochi-1": _Spec({}, latent_grid(163, 480, 848, temporal=6, spatial=8), 256),
    },
}


@dataclass(frozen=True)
class _Family:
    """How a class is fed: its latent layout, its VAE's compression (pixels -> latent grid), and
    an input builder of its own (None: the generic one, from forward's parameter names)."""

    latent: str = "BCTHW"  # "BCTHW"; "BTCHW" (frames first); "tokens": patchified [B, T*H*W, C]
    vae: tuple[int, int] = (4, 8)  # (temporal, spatial) compression
    inputs: Callable[[nn.Module, _Spec, int, torch.Generator], _Inputs] | None = None


_FAMILIES: dict[str, _Family] = {
    "WanTransformer3DModel": _Family(inputs=_wan_inputs),
    "CogVideoXTransformer3DModel": _Family(latent="BTCHW", inputs=_cogvideox_inputs),
    "ConsisIDTransformer3DModel": _Family(latent="BTCHW"),
    "HunyuanVideoTransformer3DModel": _Family(inputs=_hunyuan_inputs),
    "LTXVideoTransformer3DModel": _Family(latent="tokens", vae=(8, 32)),
    "LTX2VideoTransformer3DModel": _Family(latent="tokens", vae=(8, 32)),
    "MochiTransformer3DModel": _Family(vae=(6, 8)),
    "CosmosTransformer3DModel": _Family(vae=(8, 8)),
}

# Constructor arguments a class without a tiny config of its own is shrunk by (those it takes).
_SHRINK: dict[str, Any] = {
    "num_layers": 2, "num_single_layers": 2, "num_refiner_layers": 1, "mmdit_layers": 2,
    "num_attention_heads": 2, "attention_head_dim": 16, "num_cross_attention_heads": 2,
    "cross_attention_head_dim": 16, "in_channels": 4, "out_channels": 4, "text_dim": 32,
    "text_embed_dim": 32, "caption_channels": 32, "cross_attention_dim": 32, "freq_dim": 32,
    "ffn_dim": 64, "time_embed_dim": 32, "pooled_projection_dim": 16, "rope_axes_dim": (4, 6, 6),
    "max_sequence_length": _TINY_TEXT_LEN, "max_text_seq_length": _TINY_TEXT_LEN,
}  # fmt: skip
# Where a class's config keeps the width of the text embeddings forward takes.
_TEXT_DIM_KEYS = (
    "text_dim",
    "text_embed_dim",
    "caption_channels",
    "cross_attention_dim",
    "joint_attention_dim",
)
# LTX-Video's pipelines run at 25 frames per second; its RoPE scales positions by the VAE's strides.
_LTX_FRAME_RATE = 25.0


def _generic_inputs(model: nn.Module, spec: _Spec, batch: int, gen: torch.Generator) -> _Inputs:
    """Inputs from the names of forward's parameters: the latent, text embeddings, a timestep, a
    text mask (a quarter padded), pooled text, guidance; optional parameters left at defaults."""
    cls = type(model)
    cfg: Any = model.config  # diffusers' FrozenDict
    family = _family(cls.__name__)
    frames, height, width = spec.grid
    channels = cfg.get("in_channels")
    if not isinstance(channels, int):
        raise FvCompileError(
            f"from_diffusers cannot make up {cls.__name__}'s latent: its config has no "
            "in_channels; build the model and its inputs yourself"
        )
    kwargs: dict[str, Any] = {}
    if family.latent == "tokens":
        latent = torch.randn(batch, frames * height * width, channels, generator=gen)
        kwargs.update(num_frames=frames, height=height, width=width)
    elif family.latent == "BTCHW":
        latent = torch.randn(batch, frames, channels, height, width, generator=gen)
    else:
        latent = torch.randn(batch, channels, *spec.grid, generator=gen)
    text_dim = next((cfg[k] for k in _TEXT_DIM_KEYS if cfg.get(k)), None)
    valid = spec.text_len - spec.text_len // 4
    for name, param in list(inspect.signature(cls.forward).parameters.items())[1:]:
        if (
            name == "hidden_states"
            or name in kwargs
            or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD)
        ):
            continue
        if name == "encoder_hidden_states" and text_dim is not None:
            kwargs[name] = torch.randn(batch, spec.text_len, text_dim, generator=gen)
        elif name == "timestep":  # float, as schedulers hand it over
            kwargs[name] = torch.rand(batch, generator=gen) * 1000
        elif name == "encoder_attention_mask":
            kwargs[name] = (torch.arange(spec.text_len) < valid).long().repeat(batch, 1)
        elif name == "pooled_projections" and cfg.get("pooled_projection_dim"):
            kwargs[name] = torch.randn(batch, cfg.pooled_projection_dim, generator=gen)
        elif name == "guidance" and cfg.get("guidance_embeds"):
            kwargs[name] = torch.full((batch,), 6.0 * 1000.0)
        elif name == "rope_interpolation_scale" and family.latent == "tokens":
            t, s = family.vae
            kwargs[name] = (t / _LTX_FRAME_RATE, s, s)
        elif name == "return_dict":
            kwargs[name] = False
        elif param.default is inspect.Parameter.empty:
            raise FvCompileError(
                f"from_diffusers cannot make up {cls.__name__}.forward's required argument {name!r}; "
                f"build the model and its inputs yourself, or use a class with a preset: {', '.join(_SPECS)}"
            )
    return (latent,), kwargs


def _family(class_name: str) -> _Family:
    return _FAMILIES.get(class_name, _Family())


def latent_layout(class_name: str) -> str:
    """How `class_name` takes its latent: "BCTHW", "BTCHW" (frames first) or "tokens"
    (patchified `[B, T*H*W, C]` with `num_frames`, `height`, `width`)."""
    return _family(class_name).latent


def vae_compression(class_name: str) -> tuple[int, int]:
    """(temporal, spatial) compression of the VAE the class's pipelines use."""
    return _family(class_name).vae


def _init_parameters(model_cls: type[Any]) -> dict[str, Any]:
    return {
        name: p.default
        for name, p in inspect.signature(model_cls.__init__).parameters.items()
        if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def _shrunk(model_cls: type) -> _Spec:
    """A CPU-sized config for a class without one of its own: the common arguments it takes,
    shrunk."""
    params = _init_parameters(model_cls)
    config = {k: v for k, v in _SHRINK.items() if k in params}
    if "patch_size" in params and params["patch_size"] is None:  # no default: pick the usual one
        config["patch_size"] = 2
    return _Spec(config, _TINY_GRID, _TINY_TEXT_LEN)


def _check_overrides(model_cls: type, overrides: dict[str, Any]) -> None:
    params = _init_parameters(model_cls)
    unknown = [k for k in overrides if k not in params]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(params), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise FvCompileError(
            f"{model_cls.__name__} takes no config key {unknown[0]!r}{hint}; its keys: {', '.join(params)}"
        )


def _patch(config: dict[str, Any]) -> tuple[int, ...]:
    """(t, h, w) patch of a config; a patch_size tuple is taken as given (its last three)."""
    patch = config.get("patch_size") or 1
    if isinstance(patch, (tuple, list)):
        return tuple(int(p) for p in patch)[-3:]
    return (int(config.get("patch_size_t") or 1), int(patch), int(patch))


def _grid(
    spec: _Spec,
    family: _Family,
    grid: Grid | None,
    video: tuple[int | None, ...] | None,
    patch: tuple[int, ...],
) -> Grid:
    """The latent grid: `grid`, else the pixel `video` (None entries: the preset's own size)
    through the class's VAE; checked against the patch."""
    if grid is not None and video is not None and any(n is not None for n in video):
        raise FvCompileError("pass either grid or frames/height/width, not both")
    if grid is None and video is not None and any(n is not None for n in video):
        t, s = family.vae
        frames, height, width = spec.grid
        defaults = (
            (frames - 1) * t + 1,
            height * s,
            width * s,
        )  # the pixel size of the preset's grid
        grid = latent_grid(
            *(d if n is None else n for n, d in zip(video, defaults)), temporal=t, spatial=s
        )
    latent = tuple(spec.grid if grid is None else grid)
    if len(latent) != 3 or any(n % p or n <= 0 for n, p in zip(latent, patch)):
        raise FvCompileError(f"latent grid {latent} is not a positive multiple of patch {patch}")
    return latent[0], latent[1], latent[2]


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
    pinned: Any = model._keep_in_fp32_modules  # ModelMixin's: None or a list of module names
    keep: list[str] = pinned or []
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if tensor.is_floating_point() and not any(m in name.split(".") for m in keep):
            tensor.data = tensor.data.to(dtype)
    return model


def from_diffusers(
    class_name: str,
    preset_or_config: str | dict[str, Any] = "tiny",
    *,
    config: dict[str, Any] | None = None,
    grid: Grid | None = None,
    video: tuple[int | None, int | None, int | None] | None = None,
    text_len: int | None = None,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> tuple[nn.Module, tuple[Any, ...], dict[str, Any]]:
    """A diffusers transformer with seeded random weights, plus inputs for one forward.

    ``class_name`` is any diffusers video transformer (``*Transformer3DModel``).
    ``preset_or_config`` is ``"tiny"`` (CPU-sized), the name of a full-size
    preset of the class (e.g. ``"wan2.1-1.3b"``, ``"ltx-video-2b"``), or a dict
    of constructor overrides applied on top of ``"tiny"``; ``config`` holds
    overrides applied on top of the preset. A class without presets of its own
    has a "tiny" one made by shrinking its common constructor arguments.

    The latent grid is the preset's unless ``grid`` (latent ``(T, H, W)``) or
    ``video`` (pixel ``(frames, height, width)``, None entries the preset's,
    mapped through the class's VAE: 4x8 for Wan, 8x32 for LTX-Video, ...) says
    otherwise; ``text_len`` sets the number of text tokens.

    Inputs follow each class's own forward signature and layout (CogVideoX
    takes ``[B, T, C, H, W]``, LTX-Video patchified ``[B, T*H*W, C]`` with
    ``num_frames``/``height``/``width``) and ask for a plain tuple output
    (``return_dict=False``). ``device="meta"`` builds without allocating, for
    shape and FLOP tools.
    """
    specs = _SPECS.get(class_name)
    if specs is None:
        model_cls = None
        if class_name.endswith("Transformer3DModel"):
            diffusers = _import_diffusers()
            candidate = getattr(diffusers, class_name, None)
            if isinstance(candidate, type) and issubclass(candidate, diffusers.ModelMixin):
                model_cls = candidate
        if model_cls is None:
            raise FvCompileError(
                f"unsupported diffusers class {class_name!r}; supported: {', '.join(_SPECS)}, or any "
                "other diffusers video transformer (a class named *Transformer3DModel)"
            )
        specs = {"tiny": _shrunk(model_cls)}
    if isinstance(preset_or_config, dict):
        tiny = specs["tiny"]
        spec = _Spec({**tiny.config, **preset_or_config}, tiny.grid, tiny.text_len)
    elif preset_or_config in specs:
        spec = specs[preset_or_config]
    else:
        raise FvCompileError(
            f"unknown {class_name} preset {preset_or_config!r}; valid: {', '.join(specs)}"
        )

    model_cls = getattr(_import_diffusers(), class_name)
    overrides = {
        **(preset_or_config if isinstance(preset_or_config, dict) else {}),
        **(config or {}),
    }
    _check_overrides(model_cls, overrides)
    family = _family(class_name)
    merged = {**_init_parameters(model_cls), **spec.config, **(config or {})}
    spec = dataclasses.replace(
        spec,
        config={**spec.config, **(config or {})},
        grid=_grid(spec, family, grid, video, _patch(merged)),
        text_len=spec.text_len if text_len is None else int(text_len),
    )

    build_device = (
        torch.device("meta") if torch.device(device).type == "meta" else torch.device("cpu")
    )
    with torch.random.fork_rng(devices=[]), build_device:
        torch.manual_seed(seed)
        try:
            model = model_cls(**spec.config)
        except Exception as err:
            raise FvCompileError(
                f"{class_name}({', '.join(f'{k}={v!r}' for k, v in spec.config.items())}) failed: "
                f"{type(err).__name__}: {err}; change the config overrides (the class's keys: "
                f"{', '.join(_init_parameters(model_cls))})"
            ) from err
    model = _cast_like_from_pretrained(model.to(device), dtype).eval().requires_grad_(False)

    make_inputs = family.inputs or _generic_inputs
    args, kwargs = make_inputs(model, spec, batch, torch.Generator().manual_seed(seed))

    def place(value: Any) -> Any:
        # Activations follow ``dtype``; integer tensors and the float32 RoPE
        # tables (nested in a tuple) keep theirs, as in the pipelines.
        if isinstance(value, tuple):
            return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in value)
        if isinstance(value, torch.Tensor):
            return value.to(device, dtype) if value.is_floating_point() else value.to(device)
        return value

    return model, tuple(place(a) for a in args), {k: place(v) for k, v in kwargs.items()}
