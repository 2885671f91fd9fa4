"""Block-sparse flash-attention forward in Triton, for sliding tile attention (STA) and friends.

The sibling of ``flash_fwd.py`` (same online softmax in the log2 domain, same TMA/pointer dual
path, same interpreter handling); what differs is which keys a query tile visits.

Layout (tile-major): q, k, v are ``[B, L, H, D]`` with ``L = n_blocks * block_size``. Block ``n``
holds rows ``[n*block_size, (n+1)*block_size)``; only its first ``block_valid[n]`` rows are real
tokens, the rest is padding. Query block ``qb`` of head ``h`` attends to exactly the key blocks
``kv_indices[h', qb, :kv_counts[h', qb]]`` (``h' = h`` for per-head lists, 0 for shared lists).
Padded keys are masked out, padded query rows are written as 0, a row with no valid key is 0.

Two launches per call (three with query tails), all CUDA-graph safe (no host sync, no data-dependent shapes):

1. ``_plan_kernel`` (one program per (list head, query block)) expands the block lists to
   ``BLOCK_N``-granular key sub-blocks and sorts them in two groups: *full* sub-blocks (every key
   valid) and at most one *partial* sub-block per listed block (the ragged end of a padded block,
   with its end row). Sub-blocks of pure padding are dropped: padding costs nothing on the key side.
   Out-of-range indices and counts are ignored/clamped rather than read out of bounds.
2. ``_block_sparse_fwd_kernel`` (one program per ``BLOCK_M`` query sub-tile and (batch, head))
   runs the full sub-blocks without any mask, then the partial ones with a key mask (and padded
   values zeroed, so garbage in padding, even NaN, never leaks). A query sub-tile that lies wholly
   in padding visits nothing and writes zeros.

``BLOCK_M`` and ``BLOCK_N`` divide ``block_size`` (a multiple of 16): 384 -> 128/128, 48 -> 16/16.
With ``BlockSparseConfig.tail_m`` a query sub-tile holding at most ``tail_m`` live rows (the ragged
end of a padded block: a 384-row tile of 144 tokens ends in a 128-row sub-tile of 16) is left by
the main launch (written as padding) to a third launch of ``tail_m``-row tiles computing only those.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from fv_compile.backends.kernels import interpreting
from fv_compile.backends.kernels.flash_fwd import (
    _LOG2E,
    _SUPPORTED_DTYPES,
    SUPPORTED_HEAD_DIMS,
    _choose_tma,
)

__all__ = ["SUPPORTED_HEAD_DIMS", "BlockSparseConfig", "block_sparse_attention_fwd"]


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _plan_kernel(
    IDX,
    CNT,
    VALID,  # kv_indices [Hm, NB, MAX_KV], kv_counts [Hm, NB], block_valid [NB]
    FULL,
    NFULL,
    PART,
    PEND,
    NPART,  # plan outputs, see _make_plan
    n_blocks,
    max_kv,
    max_full,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KV_P2: tl.constexpr,
    SUB: tl.constexpr,
):
    row = tl.program_id(0)  # hm * n_blocks + qb
    i = tl.arange(0, KV_P2)
    cnt = tl.load(CNT + row)
    cnt = tl.minimum(tl.maximum(cnt, 0), max_kv)
    in_list = i < cnt
    kb = tl.load(IDX + row.to(tl.int64) * max_kv + i, mask=in_list, other=-1)
    ok = in_list & (kb >= 0) & (kb < n_blocks)
    kb = tl.where(ok, kb, 0)
    nv = tl.load(VALID + kb, mask=ok, other=0)
    nv = tl.minimum(tl.maximum(nv, 0), BLOCK_SIZE)
    nf = nv // BLOCK_N  # full sub-blocks of this key block
    has_part = (nv - nf * BLOCK_N) > 0
    # exclusive prefix sums give each listed block its place in the two output lists
    f_off = tl.cumsum(nf, 0) - nf
    p_flag = has_part.to(tl.int32)
    p_off = tl.cumsum(p_flag, 0) - p_flag
    row_start = kb * BLOCK_SIZE
    full_base = FULL + row.to(tl.int64) * max_full
    for s in tl.static_range(SUB):
        tl.store(full_base + f_off + s, row_start + s * BLOCK_N, mask=s < nf)
    part_base = row.to(tl.int64) * max_kv + p_off
    tl.store(PART + part_base, row_start + nf * BLOCK_N, mask=has_part)
    tl.store(PEND + part_base, row_start + nv, mask=has_part)
    tl.store(NFULL + row, tl.sum(nf, 0))
    tl.store(NPART + row, tl.sum(p_flag, 0))


@triton.jit
def _bs_fwd_block(
    acc,
    l_i,
    m_i,
    q,
    k_desc,
    v_desc,
    k_base,
    v_base,
    stride_ks,
    stride_vs,
    LIST,
    END,
    KM,
    n,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    USE_TMA: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    PREFETCH_IDX: tl.constexpr = False,
    KEY_MASK: tl.constexpr = False,
):
    """Fold the ``n`` key sub-blocks whose start rows are ``LIST[0:n]`` into (acc, l_i, m_i).
    ``MASKED``: keys at rows ``>= END[j]`` of sub-block ``j`` are padding (masked, values zeroed).
    ``KEY_MASK``: keys whose ``KM[row]`` is 0 are masked too (a caller's key padding mask)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_offs = offs_n[:, None] * stride_ks + offs_d[None, :]
    kv_offs_v = offs_n[:, None] * stride_vs + offs_d[None, :]
    if PREFETCH_IDX:  # the next start row is loaded one iteration ahead (loop-carried)
        nxt = tl.load(LIST, mask=n > 0, other=0)
    for j in tl.range(0, n, warp_specialize=WARP_SPECIALIZE):
        if PREFETCH_IDX:
            start_n = nxt
            nxt = tl.load(LIST + j + 1, mask=j + 1 < n, other=0)
        else:
            start_n = tl.load(LIST + j)
        start_n = tl.multiple_of(start_n, BLOCK_N)
        if MASKED:
            kv_end = tl.load(END + j)
            key_ok = (start_n + offs_n) < kv_end
            if KEY_MASK:
                key_ok = key_ok & (tl.load(KM + start_n + offs_n) != 0)
        elif KEY_MASK:
            key_ok = tl.load(KM + start_n + offs_n) != 0
        # ---- S = Q K^T ----
        if USE_TMA:
            k = k_desc.load([start_n, 0])
        else:
            k_ptrs = k_base + start_n.to(tl.int64) * stride_ks + kv_offs
            if MASKED or KEY_MASK:
                k = tl.load(k_ptrs, mask=key_ok[:, None], other=0.0)
            else:
                k = tl.load(k_ptrs)
        if UPCAST:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        # ---- online softmax in the log2 domain ----
        if MASKED or KEY_MASK:
            qk = tl.where(key_ok[None, :], qk, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_sub = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        else:
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_sub = m_ij
        p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        # ---- O += P V ----
        if USE_TMA:
            v = v_desc.load([start_n, 0])
            if MASKED or KEY_MASK:  # padding may hold anything (NaN * 0 = NaN): zero it
                v = tl.where(key_ok[:, None], v, tl.zeros_like(v))
        else:
            v_ptrs = v_base + start_n.to(tl.int64) * stride_vs + kv_offs_v
            if MASKED or KEY_MASK:
                v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
            else:
                v = tl.load(v_ptrs)
        if UPCAST:
            acc = tl.dot(
                p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc, input_precision=DOT_PRECISION
            )
        else:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _block_sparse_fwd_kernel(
    Q,
    K,
    V,
    O,
    VALID,
    FULL,
    NFULL,
    PART,
    PEND,
    NPART,
    KM,
    stride_kmb,  # key mask [B|1, L] int8 (1 = attend), read only when HAS_KEY_MASK
    LSE,  # float32 [B, H, L]: each row's log2-sum-exp2 of its scaled logits, when STORE_LSE
    qk_scale,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_ob,
    stride_os,
    stride_oh,
    H,
    L,
    n_blocks,
    max_kv,
    max_full,
    PER_HEAD: tl.constexpr,  # lists per head (Hm == H) or shared (Hm == 1)
    GROUP: tl.constexpr,  # H // Hk
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr = False,
    PREFETCH_IDX: tl.constexpr = False,
    UPCAST: tl.constexpr = False,  # interpreter only: its bf16 dot is wrong, dot in fp32 instead
    HAS_KEY_MASK: tl.constexpr = False,
    LISTS_PER_BATCH: tl.constexpr = False,  # lists per (batch, head): Hm == B * H
    STORE_LSE: tl.constexpr = False,
    # query tails: 1 = the main launch leaves sub-tiles with at most TAIL_M live rows to a second
    # launch (it writes them as padding); 2 = that launch, BLOCK_M == TAIL_M rows at the start of
    # each MAIN_M-row sub-tile, only where it is such a tail (other programs store nothing)
    TAIL_MODE: tl.constexpr = 0,
    TAIL_M: tl.constexpr = 0,
    MAIN_M: tl.constexpr = 0,
):
    # last query blocks first: lists that grow towards the end (a text block attending to every
    # block, causal-like layouts) start early instead of forming the tail
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kh = h // GROUP
    m0 = pid_m * (MAIN_M if TAIL_MODE == 2 else BLOCK_M)
    qb = m0 // BLOCK_SIZE
    local0 = m0 - qb * BLOCK_SIZE

    q_valid = tl.minimum(tl.maximum(tl.load(VALID + qb), 0), BLOCK_SIZE)
    if LISTS_PER_BATCH:
        prow = pid_bh * n_blocks + qb
    elif PER_HEAD:
        prow = h * n_blocks + qb
    else:
        prow = qb
    n_full = tl.load(NFULL + prow)
    n_part = tl.load(NPART + prow)
    # a query sub-tile wholly in padding visits nothing (and writes zeros)
    live = local0 < q_valid
    if TAIL_MODE == 1:  # a tail: no keys here, so its rows are written as padding, then redone
        live = live & (q_valid - local0 > TAIL_M)
    if TAIL_MODE == 2:
        live = live & (q_valid - local0 <= TAIL_M)
    n_full = tl.where(live, n_full, 0)
    n_part = tl.where(live, n_part, 0)
    full_list = FULL + prow.to(tl.int64) * max_full
    part_list = PART + prow.to(tl.int64) * max_kv
    part_end = PEND + prow.to(tl.int64) * max_kv

    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + kh.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kh.to(tl.int64) * stride_vh
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    km_base = KM + b.to(tl.int64) * stride_kmb

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    if USE_TMA:
        q_desc = tl.make_tensor_descriptor(
            q_base, shape=[L, HEAD_DIM], strides=[stride_qs, 1], block_shape=[BLOCK_M, HEAD_DIM]
        )
        k_desc = tl.make_tensor_descriptor(
            k_base, shape=[L, HEAD_DIM], strides=[stride_ks, 1], block_shape=[BLOCK_N, HEAD_DIM]
        )
        v_desc = tl.make_tensor_descriptor(
            v_base, shape=[L, HEAD_DIM], strides=[stride_vs, 1], block_shape=[BLOCK_N, HEAD_DIM]
        )
        q = q_desc.load([m0, 0])
    else:
        k_desc = None
        v_desc = None
        q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_qs + offs_d[None, :])
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    acc, l_i, m_i = _bs_fwd_block(
        acc,
        l_i,
        m_i,
        q,
        k_desc,
        v_desc,
        k_base,
        v_base,
        stride_ks,
        stride_vs,
        full_list,
        full_list,
        km_base,
        n_full,
        qk_scale,
        HEAD_DIM,
        BLOCK_N,
        False,
        USE_TMA,
        WARP_SPECIALIZE,
        DOT_PRECISION,
        UPCAST,
        PREFETCH_IDX,
        HAS_KEY_MASK,
    )
    acc, l_i, m_i = _bs_fwd_block(
        acc,
        l_i,
        m_i,
        q,
        k_desc,
        v_desc,
        k_base,
        v_base,
        stride_ks,
        stride_vs,
        part_list,
        part_end,
        km_base,
        n_part,
        qk_scale,
        HEAD_DIM,
        BLOCK_N,
        True,
        USE_TMA,
        False,
        DOT_PRECISION,
        UPCAST,
        False,
        HAS_KEY_MASK,
    )

    # padded query rows and rows that saw no key (l == 0) are written as 0
    row_ok = ((offs_m - qb * BLOCK_SIZE) < q_valid) & (l_i > 0.0)
    l_safe = tl.where(row_ok, l_i, 1.0)
    out = tl.where(row_ok[:, None], acc / l_safe[:, None], 0.0).to(O.dtype.element_ty)
    if TAIL_MODE == 2:
        if live:
            _bs_store_rows(
                out,
                row_ok,
                m_i,
                l_safe,
                o_base,
                stride_os,
                LSE,
                pid_bh,
                L,
                m0,
                offs_m,
                offs_d,
                HEAD_DIM,
                BLOCK_M,
                USE_TMA,
                STORE_LSE,
            )
    else:
        _bs_store_rows(
            out,
            row_ok,
            m_i,
            l_safe,
            o_base,
            stride_os,
            LSE,
            pid_bh,
            L,
            m0,
            offs_m,
            offs_d,
            HEAD_DIM,
            BLOCK_M,
            USE_TMA,
            STORE_LSE,
        )


@triton.jit
def _bs_store_rows(
    out,
    row_ok,
    m_i,
    l_safe,
    o_base,
    stride_os,
    LSE,
    pid_bh,
    L,
    m0,
    offs_m,
    offs_d,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    USE_TMA: tl.constexpr,
    STORE_LSE: tl.constexpr,
):
    if STORE_LSE:  # +inf where the row is padding or saw no key: a backward gives it p = 0
        lse = tl.where(row_ok, m_i + tl.math.log2(l_safe), float("inf"))
        tl.store(LSE + pid_bh.to(tl.int64) * L + offs_m, lse)
    if USE_TMA:
        o_desc = tl.make_tensor_descriptor(
            o_base, shape=[L, HEAD_DIM], strides=[stride_os, 1], block_shape=[BLOCK_M, HEAD_DIM]
        )
        o_desc.store([m0, 0], out)
    else:
        tl.store(o_base + offs_m[:, None].to(tl.int64) * stride_os + offs_d[None, :], out)


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------


class BlockSparseConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    warp_specialize: bool = False
    prefetch_idx: bool = False  # load the next key sub-block's start row one iteration ahead
    # query sub-tiles with at most tail_m live rows (the ragged end of a padded block) run in a
    # second launch of tail_m-row tiles (tail_warps warps) instead of as whole block_m-row tiles
    tail_m: int = 0
    tail_warps: int = 4


# preferred config per (head_dim, path); block_m/block_n are trimmed to divide block_size.
# H200, bf16, D128, STA at ~12.5% density (benchmarks/sliding_tile.py, 2026-11-29), ms Wan-1.3B 480p /
# HunyuanVideo 720p: (128,128,8,2) 2.33 / 43.5; (128,128,8,3) 2.35 / 43.8; (128,64,8,3) 2.54 / 51.1;
# warp_specialize: no gain; pointer path 2.44 / 51.3; (128,128,8,3) + index prefetch 2.16 / 40.2 (best;
# the same prefetch with 2 stages gained nothing). D64 and the pointer path are not measured here:
# they keep the dense kernel's tuning.
# 64-row query tails (tail_m=64; H100, 2026-12-07, Wan 480p issued/valid 1.190 -> 1.087): 2.24 ms
# with 4 tail warps, 2.36 with 8, against 2.14-2.17 without: the tail launch costs more than it
# saves, so tails stay off here.
_HEURISTIC = {
    (128, "tma"): BlockSparseConfig(128, 128, 8, 3, False, True),
    (64, "tma"): BlockSparseConfig(128, 128, 8, 3),
    (128, "ptr"): BlockSparseConfig(128, 64, 8, 3),
    (64, "ptr"): BlockSparseConfig(128, 64, 4, 3),
}
# Blocks of 64 rows (video sparse attention's cubes): one warpgroup per query tile. H200, bf16,
# D128, VSA's lists at sparsity 0.875 on Wan-1.3B 480p (benchmarks/video_sparse.py --sweep,
# 2026-12-03): the 128-row configs trimmed to 64 rows, (64,64,8,3) + prefetch, 6.3 ms; 8 warps
# 4.8-7.3 ms whatever the rest; (64,64,4,3) 2.9; (64,32,4,3) + prefetch 2.49 (best; pointer path
# (64,32,4,2) 2.58; 4 stages slower). D64 is not measured: it takes the same.
_HEURISTIC_64_ROWS = {
    "tma": BlockSparseConfig(64, 32, 4, 3, False, True),
    "ptr": BlockSparseConfig(64, 32, 4, 2),
}
_FP32_CONFIG = BlockSparseConfig(64, 32, 4, 2)
_INTERPRET_CONFIG = BlockSparseConfig(32, 32, 4, 1)


def _largest_divisor(block_size: int, cap: int) -> int:
    """The largest of 128, 64, 32, 16 that is <= cap and divides block_size (16 always does)."""
    for t in (128, 64, 32, 16):
        if t <= cap and block_size % t == 0:
            return t
    return 16


def _fit(cfg: BlockSparseConfig, block_size: int) -> BlockSparseConfig:
    block_m = _largest_divisor(block_size, cfg.block_m)
    tail_m = cfg.tail_m if 0 < cfg.tail_m < block_m and block_m % cfg.tail_m == 0 else 0
    return cfg._replace(
        block_m=block_m, block_n=_largest_divisor(block_size, cfg.block_n), tail_m=tail_m
    )


# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------


def _check_inputs(
    q,
    k,
    v,
    kv_indices,
    kv_counts,
    block_valid,
    block_size,
    softmax_scale,
    out,
    key_mask=None,
    lists_per_batch=False,
    lse=None,
):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D [batch, seq, heads, head_dim] tensor")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have stride(-1) == 1, got strides {tuple(t.stride())}")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {q.dtype}; supported: bfloat16, float16, float32")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")
    B, L, H, D = q.shape
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"head_dim {D} is not supported; supported head dims: {SUPPORTED_HEAD_DIMS}"
        )
    if k.shape[-1] != D or v.shape[-1] != D:
        raise ValueError(f"q, k, v head dims differ: {D}, {k.shape[-1]}, {v.shape[-1]}")
    if v.shape != k.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[1] != L:
        raise ValueError(
            f"k/v must be [B={B}, L={L}, Hk, D] like q (tile-major self-attention), "
            f"got {tuple(k.shape)}"
        )
    Hk = k.shape[2]
    if Hk == 0 or H % Hk != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({Hk})")
    if not isinstance(block_size, int) or block_size <= 0 or block_size % 16 != 0:
        raise ValueError(f"block_size must be a positive multiple of 16, got {block_size!r}")
    if L % block_size != 0:
        raise ValueError(f"sequence length L={L} is not a multiple of block_size={block_size}")
    n_blocks = L // block_size
    if not (
        isinstance(softmax_scale, (int, float))
        and softmax_scale > 0.0
        and math.isfinite(softmax_scale)
    ):
        raise ValueError(f"softmax_scale must be a positive finite float, got {softmax_scale!r}")
    for name, t, nd in (
        ("kv_indices", kv_indices, 3),
        ("kv_counts", kv_counts, 2),
        ("block_valid", block_valid, 1),
    ):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor")
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must have dtype int32, got {t.dtype}")
        if t.dim() != nd:
            raise ValueError(f"{name} must be {nd}-D, got shape {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device ({q.device}), got {t.device}")
    Hm = kv_indices.shape[0]
    if lists_per_batch and Hm != B * H:
        raise ValueError(
            f"lists_per_batch: kv_indices must have B*H={B * H} rows in dim 0 (batch-major), got "
            f"shape {tuple(kv_indices.shape)}"
        )
    if not lists_per_batch and Hm not in (1, H):
        raise ValueError(
            f"kv_indices must have 1 or H={H} heads in dim 0, got shape {tuple(kv_indices.shape)}"
        )
    if lse is not None and (
        lse.shape != (B, H, L) or lse.dtype != torch.float32 or not lse.is_contiguous()
    ):
        raise ValueError(f"lse must be a contiguous float32 [B={B}, H={H}, L={L}] tensor")
    if kv_indices.shape[1] != n_blocks or kv_indices.shape[2] < 1:
        raise ValueError(
            f"kv_indices must be [Hm, n_blocks={n_blocks}, max_kv>=1], got {tuple(kv_indices.shape)}"
        )
    if tuple(kv_counts.shape) != (Hm, n_blocks):
        raise ValueError(
            f"kv_counts must be [Hm={Hm}, n_blocks={n_blocks}], got {tuple(kv_counts.shape)}"
        )
    if tuple(block_valid.shape) != (n_blocks,):
        raise ValueError(
            f"block_valid must be [n_blocks={n_blocks}], got {tuple(block_valid.shape)}"
        )
    if out is not None and (
        out.shape != q.shape
        or out.dtype != q.dtype
        or out.device != q.device
        or out.stride(-1) != 1
    ):
        raise ValueError("out must match q's shape, dtype and device, with stride(-1) == 1")
    if key_mask is not None:
        if (
            not isinstance(key_mask, torch.Tensor)
            or key_mask.dim() != 2
            or key_mask.shape[0] not in (1, B)
            or key_mask.shape[1] != L
        ):
            raise ValueError(
                f"key_mask must be a [1 or B={B}, L={L}] tensor, got "
                f"{tuple(getattr(key_mask, 'shape', ()))}"
            )
        if key_mask.device != q.device:
            raise ValueError(f"key_mask must be on q's device ({q.device}), got {key_mask.device}")


class _Plan(NamedTuple):
    full: torch.Tensor  # int32 [Hm, NB, max_full]: start rows of fully valid key sub-blocks
    n_full: torch.Tensor  # int32 [Hm, NB]
    part: torch.Tensor  # int32 [Hm, NB, max_kv]: start rows of partially valid key sub-blocks
    part_end: torch.Tensor  # int32 [Hm, NB, max_kv]: their end rows (exclusive)
    n_part: torch.Tensor  # int32 [Hm, NB]


def _make_plan(kv_indices, kv_counts, block_valid, block_size, block_n) -> _Plan:
    Hm, NB, max_kv = kv_indices.shape
    sub = block_size // block_n
    max_full = max_kv * sub
    dev = kv_indices.device
    full = torch.empty((Hm, NB, max_full), dtype=torch.int32, device=dev)
    part = torch.empty((Hm, NB, max_kv), dtype=torch.int32, device=dev)
    part_end = torch.empty((Hm, NB, max_kv), dtype=torch.int32, device=dev)
    n_full = torch.empty((Hm, NB), dtype=torch.int32, device=dev)
    n_part = torch.empty((Hm, NB), dtype=torch.int32, device=dev)
    _plan_kernel[(Hm * NB,)](
        kv_indices.contiguous(),
        kv_counts.contiguous(),
        block_valid.contiguous(),
        full,
        n_full,
        part,
        part_end,
        n_part,
        NB,
        max_kv,
        max_full,
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        KV_P2=max(16, triton.next_power_of_2(max_kv)),
        SUB=sub,
        num_warps=4,
    )
    return _Plan(full, n_full, part, part_end, n_part)


def block_sparse_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    block_valid: torch.Tensor,
    *,
    block_size: int,
    softmax_scale: float,
    out: torch.Tensor | None = None,
    config: BlockSparseConfig | None = None,
    use_tma: bool | None = None,
    key_mask: torch.Tensor | None = None,
    on_launch: Callable[[Any], None] | None = None,
    lists_per_batch: bool = False,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-sparse softmax(q k^T * softmax_scale) v over a tile-major layout.

    q: ``[B, L, H, D]``; k, v: ``[B, L, Hk, D]``, ``H % Hk == 0`` (GQA: head h reads kv head
    ``h // (H // Hk)``); D in (64, 128); bf16/fp16 (fp32 with ieee dots); any strides with
    ``stride(-1) == 1``. ``L = n_blocks * block_size``, ``block_size`` a multiple of 16.
    kv_indices: int32 ``[Hm, n_blocks, max_kv]``, Hm in (1, H); kv_counts: int32 ``[Hm, n_blocks]``;
    query block ``qb`` of head ``h`` attends to key blocks ``kv_indices[h', qb, :kv_counts[h', qb]]``
    (h' = h if Hm == H else 0), each listed once (a block listed twice counts twice); entries out
    of ``[0, n_blocks)`` are ignored and counts are clamped to ``[0, max_kv]``.
    block_valid: int32 ``[n_blocks]``: block n's first ``block_valid[n]`` rows are tokens, the rest
    padding (masked as keys, written as 0 as queries). A row with no valid key is 0.
    key_mask: optional ``[1 or B, L]`` (bool or integer, nonzero = attend): keys it clears are
    masked as well (a key padding mask; listed blocks are then all run with a key mask).
    lists_per_batch: the lists are ``[B*H, n_blocks, max_kv]``, row ``b*H + h`` for batch b, head h
    (data-dependent lists, such as video sparse attention's top-k, differ per batch element).
    lse: optional float32 ``[B, H, L]`` output: each row's ``log2(sum_j exp2(s_j))`` of the logits
    ``s = q k^T * softmax_scale * log2(e)`` it attended (``+inf`` on padding rows and rows that saw
    no key), what a flash-attention backward recomputes the weights from.
    Returns ``[B, L, H, D]`` contiguous in q's dtype (or writes into ``out``).
    ``config``/``use_tma`` override the tile config and memory path (tests, benchmarks);
    ``on_launch`` is called with the launched compiled kernel (benchmarks read its registers).
    """
    _check_inputs(
        q,
        k,
        v,
        kv_indices,
        kv_counts,
        block_valid,
        block_size,
        softmax_scale,
        out,
        key_mask,
        lists_per_batch,
        lse,
    )
    B, L, H, D = q.shape
    Hk = k.shape[2]
    Hm, n_blocks, max_kv = kv_indices.shape
    if out is None:
        out = torch.empty((B, L, H, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out

    interpret = interpreting()
    use_tma = _choose_tma(use_tma, interpret, q, k, v, out)
    if config is None:
        if interpret:
            config = _INTERPRET_CONFIG
        elif q.dtype == torch.float32:
            config = _FP32_CONFIG
        elif _largest_divisor(block_size, 128) <= 64:
            config = _HEURISTIC_64_ROWS["tma" if use_tma else "ptr"]
        else:
            config = _HEURISTIC[(D, "tma" if use_tma else "ptr")]
    config = _fit(config, block_size)

    plan = _make_plan(kv_indices, kv_counts, block_valid, block_size, config.block_n)

    if key_mask is not None:
        key_mask = key_mask.to(torch.int8).contiguous()
        extra_km = {"HAS_KEY_MASK": True}
        km, stride_kmb = key_mask, (key_mask.stride(0) if key_mask.shape[0] > 1 else 0)
    else:
        extra_km, km, stride_kmb = {}, block_valid, 0  # never read
    upcast = interpret and q.dtype == torch.bfloat16
    dot_precision = "ieee" if (q.dtype == torch.float32 or upcast) else None
    extra = {"UPCAST": True} if upcast else {}

    def launch(block_m: int, num_warps: int, tail: bool = False, **mode: int):
        return _block_sparse_fwd_kernel[(L // config.block_m, B * H)](
            q,
            k,
            v,
            out,
            block_valid,
            plan.full,
            plan.n_full,
            plan.part,
            plan.part_end,
            plan.n_part,
            km,
            stride_kmb,
            block_valid if lse is None else lse,  # (never written without STORE_LSE)
            float(softmax_scale) * _LOG2E,
            q.stride(0),
            q.stride(1),
            q.stride(2),
            k.stride(0),
            k.stride(1),
            k.stride(2),
            v.stride(0),
            v.stride(1),
            v.stride(2),
            out.stride(0),
            out.stride(1),
            out.stride(2),
            H,
            L,
            n_blocks,
            max_kv,
            plan.full.shape[-1],
            PER_HEAD=(Hm == H and H > 1),
            GROUP=H // Hk,
            BLOCK_SIZE=block_size,
            HEAD_DIM=D,
            USE_TMA=bool(use_tma),
            DOT_PRECISION=dot_precision,
            BLOCK_M=block_m,
            BLOCK_N=config.block_n,
            WARP_SPECIALIZE=bool(config.warp_specialize and use_tma and not interpret) and not tail,
            PREFETCH_IDX=bool(config.prefetch_idx),
            num_warps=num_warps,
            num_stages=config.num_stages,
            LISTS_PER_BATCH=bool(lists_per_batch),
            STORE_LSE=lse is not None,
            **extra,
            **extra_km,
            **mode,
        )

    if config.tail_m:
        tails = {"TAIL_M": config.tail_m, "MAIN_M": config.block_m}
        launched = launch(config.block_m, config.num_warps, False, TAIL_MODE=1, **tails)
        launch(config.tail_m, config.tail_warps, True, TAIL_MODE=2, **tails)
    else:
        launched = launch(config.block_m, config.num_warps)
    if on_launch is not None:
        on_launch(launched)
    return out
