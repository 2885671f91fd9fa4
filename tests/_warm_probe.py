"""Run by tests/test_report.py in a fresh process with Inductor's caches on: one report variant
of a two-block model whose graphs are extern kernels and views only (tests/_two_block_net.py),
measured as `fv-compile report` measures it; prints the variant's compile facts as JSON."""

import json
import sys

import torch

from fv_compile.report.progress import PlainProgress
from fv_compile.report.variants import (
    FV_COMPILE,
    TORCH_COMPILE,
    TimingPlan,
    VariantSpec,
    run_variant,
)
from fv_compile.report.workload import Workload

from _two_block_net import TwoBlockNet  # this folder: the probe runs as a script


def main() -> None:
    torch.manual_seed(0)
    model = TwoBlockNet(residual=False).eval().requires_grad_(False)
    x = torch.randn(1, 16, 32)
    workload = Workload(
        "toy",
        model,
        (x,),
        {},
        torch.float32,
        torch.device("cpu"),
        1,
        (1, 4, 4),
        (1, 1, 1),
        (1, 32, 1, 4, 4),
    )
    spec = (
        VariantSpec(FV_COMPILE, "auto")
        if sys.argv[1] == "fv_compile"
        else VariantSpec(TORCH_COMPILE)
    )
    result, _ = run_variant(
        spec,
        workload,
        TimingPlan(1, 0, 1),
        compiler="inductor",
        reference=None,
        progress=PlainProgress(sys.stderr),
    )
    print(json.dumps({k: getattr(result, k) for k in (
        "status", "error", "compile_s", "cold_cache", "warm_compile_s", "warm_cache_hits",
        "warm_note", "regional",
    )}))  # fmt: skip


if __name__ == "__main__":
    main()
