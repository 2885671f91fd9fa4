"""The mean of each (4, 4, 4) cube's tokens, for video sparse attention's coarse stage.

On the H200 at Wan-1.3B 480p (624 cubes, 12 heads, D128) torch spent ~0.47 ms of the coarse
stage's 1.03 ms masking q, k and v to zero their cubes' padding rows (a full-size copy each)
before summing them. Here one program reads one cube of one head, its padding rows never loaded
(they may hold anything), and sums the tokens in float32: each tensor is read once, nothing
else is written but the `[B, H, n_cubes, D]` means.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _cube_mean_kernel(
    X,
    VALID,
    OUT,
    stride_xb,
    stride_xl,
    stride_xh,
    stride_xd,
    stride_ob,
    stride_oh,
    stride_on,
    H,
    D,
    BLOCK: tl.constexpr,
    D_PAD: tl.constexpr,
):
    cube = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = tl.arange(0, BLOCK)
    cols = tl.arange(0, D_PAD)
    valid = tl.load(VALID + cube)
    ptr = (
        X
        + b.to(tl.int64) * stride_xb
        + (cube * BLOCK + rows).to(tl.int64)[:, None] * stride_xl
        + h * stride_xh
        + cols[None, :] * stride_xd
    )
    x = tl.load(ptr, mask=(rows[:, None] < valid) & (cols[None, :] < D), other=0.0)
    mean = tl.sum(x.to(tl.float32), axis=0) / tl.maximum(valid, 1).to(tl.float32)
    out = OUT + b.to(tl.int64) * stride_ob + h * stride_oh + cube * stride_on + cols
    tl.store(out, mean, mask=cols < D)


def cube_means(
    x: torch.Tensor, block_valid: torch.Tensor, n_cubes: int, block: int
) -> torch.Tensor:
    """float32 `[B, H, n_cubes, D]`: the mean of the first `block_valid[n]` rows of each
    `block`-row cube of `x` (`[B, L, H, D]`, the cubes first along L); 0 for an empty cube."""
    b, _, h, d = x.shape
    out = torch.empty((b, h, n_cubes, d), dtype=torch.float32, device=x.device)
    valid = block_valid[:n_cubes].to(torch.int32).contiguous()
    _cube_mean_kernel[(n_cubes, b * h)](
        x,
        valid,
        out,
        *x.stride(),
        *out.stride()[:3],
        h,
        d,
        BLOCK=block,
        D_PAD=triton.next_power_of_2(d),
        num_warps=4,
    )
    return out
