"""Each query cube's key cubes by falling coarse score, for video sparse attention's lists.

The lists need every row of the `[B, H, n, n]` coarse scores ordered (the top-k count is a tensor
read by the fine kernel, so the whole order is kept), exactly as a stable descending argsort
orders it: ties by rising index. torch's segmented radix sort took 0.198 ms of the coarse stage's
0.532 ms on the H200 at Wan-1.3B 480p (624 cubes, 12 heads). Here one program sorts one row in
registers: each float32 score becomes an int32 whose signed order is the float order, packed
above its index into one int64 key, and one bitonic `tl.sort` gives both the order and the tie
break.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fv_compile.backends.kernels import CUBE_RANK_MAX


@triton.jit
def _falling_order_kernel(SCORES, ORDER, N, N_PAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, N_PAD)
    x = tl.load(SCORES + row * N + offs, mask=offs < N, other=float("-inf"))
    bits = x.to(tl.int32, bitcast=True)
    bits = tl.where(x == 0.0, 0, bits)  # -0.0 ties with 0.0, as in a comparison sort
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # signed int order = float order
    # padding slots (index >= N) sort after every real score, -inf included: same score, higher index
    key = ((~ordered).to(tl.int64) << 32) | offs.to(tl.int64)  # falling score, then rising index
    key = tl.sort(key)
    tl.store(ORDER + row * N + offs, (key & 0xFFFFFFFF).to(tl.int32), mask=offs < N)


def falling_order(scores: torch.Tensor) -> torch.Tensor:
    """int32, `scores`' shape: `scores.argsort(dim=-1, descending=True, stable=True)` of a float32
    tensor whose last dim is at most `CUBE_RANK_MAX`."""
    n = scores.shape[-1]
    if scores.dtype != torch.float32 or n > CUBE_RANK_MAX:
        raise ValueError(
            f"falling_order sorts float32 rows of at most {CUBE_RANK_MAX}, got {scores.dtype} x {n}"
        )
    rows = scores.reshape(-1, n).contiguous()
    order = torch.empty(rows.shape, dtype=torch.int32, device=scores.device)
    if rows.numel():
        n_pad = triton.next_power_of_2(n)
        _falling_order_kernel[(rows.shape[0],)](
            rows, order, n, N_PAD=n_pad, num_warps=4 if n_pad <= 1024 else 8
        )
    return order.view(scores.shape)
