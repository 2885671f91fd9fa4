"""The small model the fresh-process probes compile (tests/_cache_probe.py, tests/_warm_probe.py):
two attention blocks in a ModuleList, so regional compile has a block list to find."""

import torch
import torch.nn.functional as F


class Block(torch.nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, residual: bool = True):
        super().__init__()
        self.heads, self.residual = heads, residual
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, x):
        b, s, c = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, c // self.heads).transpose(1, 3).unbind(2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, c)
        return x + out if self.residual else out


class TwoBlockNet(torch.nn.Module):
    """`residual=False` leaves Inductor extern kernels and views only: no C++ to compile, so a
    cold compile on the CPU takes seconds."""

    def __init__(self, residual: bool = True):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block(residual=residual) for _ in range(2))

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x
