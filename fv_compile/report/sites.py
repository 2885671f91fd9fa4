"""`fv-compile explain`: the attention sites of a zoo preset or a diffusers transformer, built
with random weights at the size asked for, as `fv_compile.explain` reports them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

import fv_compile
from fv_compile.report.run import resolve_device, resolve_dtype
from fv_compile.report.variants import BackendSpec
from fv_compile.report.workload import DEFAULT_MODEL, Workload, load_workload


@dataclass
class ExplainConfig:
    """Which model, at which size, explained with which backend (see `ReportConfig` for the model
    and size fields)."""

    model: str = DEFAULT_MODEL
    preset: str | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    grid: tuple[int, int, int] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    batch: int = 1
    dtype: str | None = None
    device: str | None = None
    seed: int = 0
    backend: BackendSpec = "auto"
    fastvideo_args: dict[str, Any] = field(default_factory=dict)
    verify: bool = False


def explain_model(config: ExplainConfig) -> tuple[Workload, fv_compile.ExplainReport]:
    """Build the model and its inputs, and explain one call of it inside a forward context at
    step 0 (so backends with per-step metadata, checked with `verify`, have one). Raises
    FvCompileError (a WorkloadError) for a model or size that cannot be built."""
    device = resolve_device(config.device)
    workload = load_workload(
        config.model,
        preset=config.preset,
        video=(config.frames, config.height, config.width),
        grid=config.grid,
        config=config.config,
        batch=config.batch,
        dtype=resolve_dtype(config.dtype, device),
        device=device,
        seed=config.seed,
    )
    workload.fastvideo_overrides = dict(config.fastvideo_args)
    torch._dynamo.reset()
    try:
        with fv_compile.forward_context(
            current_timestep=0,
            forward_batch=workload.forward_batch(),
            fastvideo_args=workload.fastvideo_args(),
        ):
            report = fv_compile.explain(
                workload.model,
                *workload.args,
                attention_backend=config.backend,
                verify=config.verify,
                **workload.kwargs,
            )
    finally:
        torch._dynamo.reset()
    return workload, report
