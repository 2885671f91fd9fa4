"""`fv-compile explain`: the attention sites of a zoo preset or a diffusers transformer, built
with random weights at the size asked for, as `fv_compile.explain` reports them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import fv_compile
from fv_compile.report.variants import BackendSpec
from fv_compile.report.workload import Workload, WorkloadSpec


@dataclass
class ExplainConfig(WorkloadSpec):
    """A workload, explained with one backend (or role policy)."""

    backend: BackendSpec = "auto"
    verify: bool = False
    accuracy_budget: float | None = None  # tune the sites left to auto (fv_compile/tuning.py)


def explain_model(config: ExplainConfig) -> tuple[Workload, fv_compile.ExplainReport]:
    """Build the model and its inputs, and explain one call of it inside a forward context at
    step 0 (so backends with per-step metadata, checked with `verify`, have one). Raises
    FvCompileError (a WorkloadError) for a model or size that cannot be built."""
    workload = config.build()
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
                accuracy_budget=config.accuracy_budget,
                **workload.kwargs,
            )
    finally:
        torch._dynamo.reset()
    return workload, report
