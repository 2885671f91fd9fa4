"""Block-sparse flash-attention backward in Triton (FlashAttention-2's recipe), the sibling of
``block_sparse_fwd.py``: the gradients of attention over per-(batch, head) key-block lists, for
video sparse attention's fine stage.

Layout as the forward's: ``[B, L, H, D]`` tile-major, ``L = n_blocks * block_size``, block n's
first ``block_valid[n]`` rows real. The forward hands over its output and its per-row
log2-sum-exp2 ``lse`` (``block_sparse_attention_fwd(..., lse=)``), from which the weights are
recomputed block by block; nothing of size ``L x L`` is ever stored.

Three steps, no host sync:

1. ``delta = rowsum(dO * O)`` (torch) and the transposed lists (torch): for each key block, the
   query blocks whose lists hold it; the lists change at every call (top-k), so they are built
   per call, on the device, in a few vector ops (a stable partition by prefix sums, no sort).
2. ``_bwd_dkdv_kernel``, one program per ``BLOCK_N`` key sub-tile and (batch, head): over every
   query block that listed its key block, ``dV += P^T dO`` and ``dK += dS^T Q`` (``dS = P (dP -
   delta)``, ``dP = dO V^T``).
3. ``_bwd_dq_kernel``, one program per ``BLOCK_M`` query sub-tile and (batch, head): over its
   listed key blocks, ``dQ += dS K``.

Padding rows and padding keys get and pass no gradient (their weights are 0; their values are
masked on load, so garbage there, NaN included, never leaks). Each block is assumed listed at
most once per row (video sparse attention's lists are permutations).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fv_compile.backends.kernels import interpreting
from fv_compile.backends.kernels.flash_fwd import _LOG2E, SUPPORTED_HEAD_DIMS
from fv_compile.backends.kernels.key_padding import kept_first_order

__all__ = ["block_sparse_attention_bwd", "transposed_lists"]


@triton.jit
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    LSE,
    DELTA,  # float32 [B*H, L]
    VALID,
    QIDX,
    QCNT,  # int32 [B*H, NB, NB], [B*H, NB]: the query blocks that list each key block
    qk_scale,
    scale,
    stride_b,
    stride_s,
    stride_h,
    H,
    L,
    n_blocks,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    n0 = pid_n * BLOCK_N
    kb = n0 // BLOCK_SIZE
    k_valid = tl.minimum(tl.maximum(tl.load(VALID + kb), 0), BLOCK_SIZE)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = (offs_n - kb * BLOCK_SIZE) < k_valid
    base = b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    kv_offs = base + offs_n[:, None].to(tl.int64) * stride_s + offs_d[None, :]
    k = tl.load(K + kv_offs, mask=key_ok[:, None], other=0.0)
    v = tl.load(V + kv_offs, mask=key_ok[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    row = bh.to(tl.int64) * n_blocks + kb
    count = tl.minimum(tl.maximum(tl.load(QCNT + row), 0), n_blocks)
    count = tl.where(n0 - kb * BLOCK_SIZE < k_valid, count, 0)  # a sub-tile of pure padding
    stat_base = bh.to(tl.int64) * L
    for i in range(0, count):
        qb = tl.load(QIDX + row * n_blocks + i)
        q_valid = tl.minimum(tl.maximum(tl.load(VALID + qb), 0), BLOCK_SIZE)
        for s in tl.static_range(BLOCK_SIZE // BLOCK_M):
            offs_m = qb * BLOCK_SIZE + s * BLOCK_M + tl.arange(0, BLOCK_M)
            q_ok = (s * BLOCK_M + tl.arange(0, BLOCK_M)) < q_valid
            q_offs = base + offs_m[:, None].to(tl.int64) * stride_s + offs_d[None, :]
            q = tl.load(Q + q_offs, mask=q_ok[:, None], other=0.0)
            do = tl.load(DO + q_offs, mask=q_ok[:, None], other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(LSE + stat_base + offs_m, mask=q_ok, other=float("inf"))
            delta = tl.load(DELTA + stat_base + offs_m, mask=q_ok, other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            p = tl.math.exp2(qk * qk_scale - lse[:, None])
            p = tl.where(q_ok[:, None] & key_ok[None, :], p, 0.0)
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=DOT_PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=DOT_PRECISION)
    tl.store(DK + kv_offs, (dk * scale).to(DK.dtype.element_ty))
    tl.store(DV + kv_offs, dv.to(DV.dtype.element_ty))


@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    DQ,
    LSE,
    DELTA,
    VALID,
    KIDX,
    KCNT,  # int32 [B*H, NB, max_kv], [B*H, NB]: the forward's lists
    qk_scale,
    scale,
    stride_b,
    stride_s,
    stride_h,
    H,
    L,
    n_blocks,
    max_kv,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    m0 = pid_m * BLOCK_M
    qb = m0 // BLOCK_SIZE
    q_valid = tl.minimum(tl.maximum(tl.load(VALID + qb), 0), BLOCK_SIZE)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ok = (offs_m - qb * BLOCK_SIZE) < q_valid
    base = b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    q_offs = base + offs_m[:, None].to(tl.int64) * stride_s + offs_d[None, :]
    q = tl.load(Q + q_offs, mask=q_ok[:, None], other=0.0)
    do = tl.load(DO + q_offs, mask=q_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    stat_base = bh.to(tl.int64) * L
    lse = tl.load(LSE + stat_base + offs_m, mask=q_ok, other=float("inf"))
    delta = tl.load(DELTA + stat_base + offs_m, mask=q_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    row = bh.to(tl.int64) * n_blocks + qb
    count = tl.minimum(tl.maximum(tl.load(KCNT + row), 0), max_kv)
    count = tl.where(m0 - qb * BLOCK_SIZE < q_valid, count, 0)  # a sub-tile of pure padding
    for i in range(0, count):
        kb = tl.load(KIDX + row * max_kv + i)
        ok = (kb >= 0) & (kb < n_blocks)
        kb = tl.where(ok, kb, 0)
        k_valid = tl.where(ok, tl.minimum(tl.maximum(tl.load(VALID + kb), 0), BLOCK_SIZE), 0)
        for s in tl.static_range(BLOCK_SIZE // BLOCK_N):
            offs_n = kb * BLOCK_SIZE + s * BLOCK_N + tl.arange(0, BLOCK_N)
            key_ok = (s * BLOCK_N + tl.arange(0, BLOCK_N)) < k_valid
            kv_offs = base + offs_n[:, None].to(tl.int64) * stride_s + offs_d[None, :]
            k = tl.load(K + kv_offs, mask=key_ok[:, None], other=0.0)
            v = tl.load(V + kv_offs, mask=key_ok[:, None], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            p = tl.math.exp2(qk * qk_scale - lse[:, None])
            p = tl.where(q_ok[:, None] & key_ok[None, :], p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    tl.store(DQ + q_offs, (dq * scale).to(DQ.dtype.element_ty))


def transposed_lists(
    kv_indices: torch.Tensor, kv_counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(q_indices int32 [R, NB, NB], q_counts int32 [R, NB])` of lists `[R, NB, max_kv]`: for
    each key block, the query blocks whose first `kv_counts` entries hold it (ascending), and
    how many. Out-of-range entries are ignored, as the forward ignores them."""
    rows, nb, max_kv = kv_indices.shape
    live = torch.arange(max_kv, device=kv_indices.device) < kv_counts[..., None]
    live &= (kv_indices >= 0) & (kv_indices < nb)
    listed = torch.zeros(rows, nb, nb + 1, dtype=torch.bool, device=kv_indices.device)
    listed.scatter_(-1, torch.where(live, kv_indices.long(), nb), True)
    by_key = listed[..., :nb].transpose(1, 2).reshape(rows * nb, nb)  # [R * key block, query block]
    order = kept_first_order(by_key).view(rows, nb, nb)  # listing query blocks first
    counts = by_key.sum(-1, dtype=torch.int32).view(rows, nb)
    return order.to(torch.int32), counts


def _tile(block_size: int, cap: int) -> int:
    for t in (128, 64, 32, 16):
        if t <= cap and block_size % t == 0:
            return t
    return 16


def block_sparse_attention_bwd(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    block_valid: torch.Tensor,
    block_size: int,
    softmax_scale: float,
    *,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> list[torch.Tensor]:
    """`[dq, dk, dv]` (``[B, L, H, D]`` contiguous, q's dtype) of
    ``block_sparse_attention_fwd(q, k, v, kv_indices, kv_counts, block_valid, lists_per_batch=True)``
    for the output gradient ``grad``, given that call's ``out`` and ``lse``.

    q, k, v, grad, out: ``[B, L, H, D]`` (k and v with q's heads), D in (64, 128); lists int32
    ``[B*H, n_blocks, max_kv]`` / ``[B*H, n_blocks]``; ``lse`` float32 ``[B, H, L]``.
    ``num_warps``/``num_stages`` override the launch config (benchmark sweeps)."""
    b, length, h, d = q.shape
    for name, t in (("grad", grad), ("k", k), ("v", v), ("out", out)):
        if t.shape != q.shape:
            raise ValueError(
                f"{name} must be [B, L, H, D] like q {tuple(q.shape)}, got {tuple(t.shape)}"
            )
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {d} is not supported; supported: {SUPPORTED_HEAD_DIMS}")
    if block_size % 16 or length % block_size:
        raise ValueError(f"block_size {block_size} must be a multiple of 16 dividing L={length}")
    n_blocks = length // block_size
    if kv_indices.shape[:2] != (b * h, n_blocks) or kv_counts.shape != (b * h, n_blocks):
        raise ValueError(
            f"lists must be per (batch, head): [B*H={b * h}, n_blocks={n_blocks}, max_kv], got "
            f"{tuple(kv_indices.shape)} and {tuple(kv_counts.shape)}"
        )
    if lse.shape != (b, h, length) or lse.dtype != torch.float32:
        raise ValueError(
            f"lse must be float32 [B, H, L] = {(b, h, length)}, got {tuple(lse.shape)}"
        )
    q, k, v, grad = (x.contiguous() for x in (q, k, v, grad))
    delta = (grad.float() * out.float()).sum(-1).transpose(1, 2).contiguous()  # [B, H, L]
    lse = lse.contiguous()
    kv_indices, kv_counts = kv_indices.contiguous(), kv_counts.contiguous()
    q_indices, q_counts = transposed_lists(kv_indices, kv_counts)
    dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
    interpret = interpreting()
    upcast = interpret and q.dtype == torch.bfloat16
    precision = "ieee" if (q.dtype == torch.float32 or upcast) else None
    # float32 tiles are twice the bytes: 32 rows keep them within shared memory (as the
    # forward's float32 config does)
    tile = _tile(block_size, 32 if interpret or q.dtype == torch.float32 else 64)
    common = dict(
        BLOCK_SIZE=block_size,
        HEAD_DIM=d,
        BLOCK_M=tile,
        BLOCK_N=tile,
        DOT_PRECISION=precision,
        UPCAST=upcast,
        # H200, bf16, D128, VSA's lists at sparsity 0.875 on Wan-1.3B 480p (benchmarks/
        # video_sparse.py --sweep, 2026-12-03): 4 warps 2 stages 9.3 ms; 3 stages 10.5, 1 stage
        # 11.5; 8 warps 19.4-23.6 (the earlier default, 20.6). D64 takes the same, unmeasured.
        num_warps=num_warps or 4,
        num_stages=1 if interpret else (num_stages or 2),
    )
    stats = (softmax_scale * _LOG2E, softmax_scale, q.stride(0), q.stride(1), q.stride(2), h)
    _bwd_dkdv_kernel[(length // tile, b * h)](
        q, k, v, grad, dk, dv, lse, delta, block_valid, q_indices, q_counts,
        *stats, length, n_blocks, **common,
    )  # fmt: skip
    _bwd_dq_kernel[(length // tile, b * h)](
        q, k, v, grad, dq, lse, delta, block_valid, kv_indices, kv_counts,
        *stats, length, n_blocks, kv_indices.shape[-1], **common,
    )  # fmt: skip
    return [dq, dk, dv]
