"""The model and inputs a report measures: a zoo preset or a diffusers transformer, with random
weights."""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from fv_compile.context import FastVideoArgs, ForwardBatch
from fv_compile.errors import FvCompileError
from fv_compile.models import PRESETS, build_model, example_inputs, latent_grid

DIFFUSERS_PREFIX = "diffusers:"
DEFAULT_MODEL = "wan-tiny"
# The tiny presets' own grid (128 tokens) is too small for attention to matter; this pixel video
# maps to latent (3, 32, 32), 768 tokens: big enough to show attention, small enough for a CPU.
TINY_DEFAULT_VIDEO = (9, 256, 256)

Grid = tuple[int, int, int]


class WorkloadError(FvCompileError):
    """A model or size the report cannot build; the message says which values are valid."""


@dataclass
class Workload:
    """One transformer call: the model, its inputs, and the facts the report prints about it."""

    name: str
    model: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    dtype: torch.dtype
    device: torch.device
    batch: int
    grid: Grid
    patch_size: Grid
    raw_latent_shape: tuple[int, ...]
    # FastVideoArgs fields a metadata backend needs (sta_window, VSA_sparsity, ...)
    fastvideo_overrides: dict[str, Any] = field(default_factory=dict)
    parameters: int = field(init=False)

    def __post_init__(self) -> None:
        self.parameters = sum(p.numel() for p in self.model.parameters())

    @property
    def tokens(self) -> int:
        """Video tokens per sample (text excluded), after patching."""
        return math.prod(n // p for n, p in zip(self.grid, self.patch_size, strict=True))

    def forward_batch(self) -> ForwardBatch:
        return ForwardBatch(raw_latent_shape=self.raw_latent_shape)

    def fastvideo_args(self) -> FastVideoArgs:
        return FastVideoArgs(**{"patch_size": self.patch_size, **self.fastvideo_overrides})

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "class": type(self.model).__name__,
            "parameters": self.parameters,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "batch": self.batch,
            "latent_grid": list(self.grid),
            "patch_size": list(self.patch_size),
            "video_tokens": self.tokens,
            "input_shapes": {
                f"arg{i}": list(a.shape)
                for i, a in enumerate(self.args)
                if isinstance(a, torch.Tensor)
            }
            | {k: list(v.shape) for k, v in self.kwargs.items() if isinstance(v, torch.Tensor)},
        }


def load_workload(
    model: str,
    *,
    preset: str | None = None,
    video: tuple[int | None, int | None, int | None] = (None, None, None),
    grid: Grid | None = None,
    config: dict[str, Any] | None = None,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> Workload:
    """Build `model` (a zoo preset or `diffusers:<Class>`) with seeded random weights, and inputs.

    video: pixel `(frames, height, width)`, any of them None for the preset's default; mapped to
        the latent grid as the model's VAE would (`fv_compile.models.latent_grid`; for diffusers
        models the class's own VAE: 8x32 for LTX-Video).
    grid: the latent `(T, H, W)` directly; excludes `video`.
    config: overrides of the model's size: fields of the zoo preset's config (`num_layers=4`),
        or constructor arguments of the diffusers class.
    preset: only for diffusers models, the size preset of `from_diffusers` (default "tiny").
    """
    device = torch.device(device)
    config = dict(config or {})
    sized = grid is not None or any(n is not None for n in video)
    if grid is not None and any(n is not None for n in video):
        raise WorkloadError("give either --grid or --frames/--height/--width, not both")
    if model.startswith(DIFFUSERS_PREFIX):
        return _diffusers_workload(
            model.removeprefix(DIFFUSERS_PREFIX),
            preset or "tiny",
            video if sized and grid is None else None,
            grid,
            config,
            batch,
            dtype,
            device,
            seed,
        )
    if preset is not None:
        raise WorkloadError(
            "--preset selects a diffusers model's size; zoo models are named by --model alone "
            "(and resized with --config)"
        )
    if model not in PRESETS:
        raise WorkloadError(
            f"unknown model {model!r}; valid presets: {', '.join(PRESETS)}, "
            f"or {DIFFUSERS_PREFIX}<Class> for a diffusers transformer"
        )
    preset_config = _zoo_config(model, config)
    if not sized and model.endswith("-tiny"):
        grid = latent_grid(*TINY_DEFAULT_VIDEO)
    frames, height, width = video
    try:
        net = build_model(preset_config, dtype=dtype, device=device, seed=seed)
        args, kwargs = example_inputs(
            net, batch=batch, frames=frames, height=height, width=width, grid=grid, seed=seed
        )
    except ValueError as err:
        raise WorkloadError(str(err)) from None
    latent = args[0]
    t, h, w = latent.shape[2:]  # [B, C, T, H, W]
    return Workload(
        name=model if not config else f"{model}({_overrides(config)})",
        model=net,
        args=args,
        kwargs=kwargs,
        dtype=dtype,
        device=device,
        batch=batch,
        grid=(t, h, w),
        patch_size=tuple(preset_config.patch_size),
        raw_latent_shape=tuple(latent.shape),
    )


def _zoo_config(model: str, overrides: dict[str, Any]) -> Any:
    base = PRESETS[model]
    names = [f.name for f in dataclasses.fields(base)]
    for key in overrides:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise WorkloadError(
                f"--config {key}: {model} has no such field{hint}; its fields: {', '.join(names)}"
            )
    try:
        return dataclasses.replace(base, **overrides)
    except (TypeError, ValueError) as err:
        raise WorkloadError(f"--config {_overrides(overrides)}: {err}") from None


def _overrides(config: dict[str, Any]) -> str:
    return ",".join(f"{k}={_value(v)}" for k, v in config.items())


def _value(v: Any) -> str:
    return "x".join(str(x) for x in v) if isinstance(v, (tuple, list)) else str(v)


def _diffusers_workload(
    class_name: str,
    preset: str,
    video: tuple[int | None, int | None, int | None] | None,
    grid: Grid | None,
    config: dict[str, Any],
    batch: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
) -> Workload:
    from fv_compile.models import from_diffusers
    from fv_compile.models.diffusers_zoo import latent_layout

    try:
        net, args, kwargs = from_diffusers(
            class_name,
            preset,
            config=config,
            grid=grid,
            video=video,
            batch=batch,
            dtype=dtype,
            device=device,
            seed=seed,
        )
    except (ValueError, ImportError) as err:
        raise WorkloadError(str(err)) from None
    cfg: Any = net.config  # diffusers' FrozenDict
    latent = args[0]
    layout = latent_layout(class_name)
    if layout == "BTCHW":  # frames first (CogVideoX); backends expect [B, C, T, H, W]
        b, t, c, h, w = latent.shape
        raw = (b, c, t, h, w)
    elif layout == "tokens":  # patchified [B, T*H*W, C] with the latent grid beside it (LTX-Video)
        raw = (
            latent.shape[0],
            latent.shape[2],
            kwargs["num_frames"],
            kwargs["height"],
            kwargs["width"],
        )
    else:
        raw = tuple(latent.shape)
    patch = cfg.patch_size
    if isinstance(patch, int):
        patch = (getattr(cfg, "patch_size_t", None) or 1, patch, patch)
    name = f"{DIFFUSERS_PREFIX}{class_name}({preset}{',' if config else ''}{_overrides(config)})"
    return Workload(
        name=name,
        model=net,
        args=args,
        kwargs=kwargs,
        dtype=dtype,
        device=device,
        batch=batch,
        grid=(raw[2], raw[3], raw[4]),
        patch_size=cast(Grid, tuple(patch)),  # the config's (t, h, w)
        raw_latent_shape=raw,
    )


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise FvCompileError(
            f"--device {device}: CUDA is not available here (torch {torch.__version__}); "
            "use --device cpu"
        )
    return resolved


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


@dataclass
class WorkloadSpec:
    """Which model, at which size, on which inputs: what `fv-compile report` and `explain`
    share. None for device and dtype means this machine's defaults (CUDA if available; bf16 on
    CUDA, fp32 on CPU)."""

    model: str = DEFAULT_MODEL
    preset: str | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    grid: tuple[int, int, int] | None = None
    # the model's size: zoo config fields or diffusers constructor arguments (`num_layers=4`)
    config: dict[str, Any] = field(default_factory=dict)
    batch: int = 1
    dtype: str | None = None
    device: str | None = None
    seed: int = 0
    fastvideo_args: dict[str, Any] = field(default_factory=dict)

    def build(self) -> Workload:
        """The model with seeded random weights and its inputs (`load_workload`), with the
        spec's FastVideoArgs overrides. Raises FvCompileError (a WorkloadError) for a model or
        size that cannot be built."""
        device = resolve_device(self.device)
        workload = load_workload(
            self.model,
            preset=self.preset,
            video=(self.frames, self.height, self.width),
            grid=self.grid,
            config=self.config,
            batch=self.batch,
            dtype=resolve_dtype(self.dtype, device),
            device=device,
            seed=self.seed,
        )
        workload.fastvideo_overrides = dict(self.fastvideo_args)
        return workload
