"""Run by tests/test_report.py in a fresh process with Inductor's caches on: one report variant
of a two-block model whose graphs are extern kernels and views only (no C++ to compile, so a cold
Inductor compile takes seconds), measured as `fv-compile report` measures it; prints the
variant's compile facts as JSON."""

import json
import sys

import torch
import torch.nn.functional as F

from fv_compile.report.progress import PlainProgress
from fv_compile.report.variants import FV_COMPILE, TORCH_COMPILE, TimingPlan, VariantSpec, run_variant
from fv_compile.report.workload import Workload


class Block(torch.nn.Module):
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, x):
        b, s, c = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, c)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block() for _ in range(2))

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x


def main() -> None:
    torch.manual_seed(0)
    model = Net().eval().requires_grad_(False)
    x = torch.randn(1, 16, 32)
    workload = Workload("toy", model, (x,), {}, torch.float32, torch.device("cpu"), 1, (1, 4, 4), (1, 1, 1), (1, 32, 1, 4, 4))
    spec = VariantSpec(FV_COMPILE, "auto") if sys.argv[1] == "fv_compile" else VariantSpec(TORCH_COMPILE)
    result, _ = run_variant(
        spec, workload, TimingPlan(1, 0, 1), compiler="inductor", reference=None, progress=PlainProgress(sys.stderr)
    )
    print(json.dumps({k: getattr(result, k) for k in (
        "status", "error", "compile_s", "cold_cache", "warm_compile_s", "warm_cache_hits", "warm_note", "regional"
    )}))  # fmt: skip


if __name__ == "__main__":
    main()
