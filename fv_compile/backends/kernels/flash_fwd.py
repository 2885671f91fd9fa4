"""Flash-attention forward in Triton, read straight from ``[batch, seq, heads, head_dim]``.

One program computes a ``BLOCK_M`` tile of query rows of one (batch, head) against all of its
keys with the online softmax (FlashAttention-2 order: running max ``m``, running sum ``l``,
fp32 accumulator; ``exp2`` with ``softmax_scale * log2(e)`` folded into one FMA per score).

The key loop is split in two so that the common case carries no mask at all:

* blocks ``[0, full_hi)`` are valid for every query row of the tile: no mask, no bounds check;
* blocks ``[full_hi, hi)`` (the ragged tail of the keys, the ``kv_lengths`` edge, the causal
  diagonal) apply ``-inf`` to invalid scores and guard the max against all ``-inf`` rows.

Two ways to read memory, chosen per launch by a ``constexpr``:

* ``USE_TMA`` (Hopper, CUDA): device-side tensor descriptors, one 2-D ``[seq, head_dim]`` view per
  (batch, head) built from the BSHD strides; loads go through the bulk tensor copy engine and rows
  past the end (queries past ``Sq``, keys past ``kv_lengths[b]``) come back as zeros.
* pointers (the Triton interpreter, pre-Hopper GPUs, views whose base or strides are not
  16-byte aligned): plain masked ``tl.load``/``tl.store``.

Shapes: q ``[B, Sq, H, D]``, k/v ``[B, Sk, Hk, D]`` with ``H % Hk == 0`` (query head ``h`` reads
kv head ``h // (H // Hk)``), any strides with ``stride(-1) == 1``; the output is a new contiguous
``[B, Sq, H, D]`` tensor of q's dtype. ``causal`` is top-left aligned like SDPA's ``is_causal``
(query ``i`` sees keys ``j <= i``). ``kv_lengths`` (int32 ``[B]``) masks keys ``j >= kv_lengths[b]``.
A query row with no valid key yields zeros.

Tile configs are measured on the H200 (see docs/kernel-notes.md) and live in ``_HEURISTIC``
beside the kernel; ``FV_FLASH_AUTOTUNE=1`` autotunes over ``_TUNE_CONFIGS`` instead.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from fv_compile.backends.kernels import TRITON_HEAD_DIMS, interpreting

__all__ = ["SUPPORTED_HEAD_DIMS", "FlashConfig", "attention_fwd"]

SUPPORTED_HEAD_DIMS = TRITON_HEAD_DIMS
_SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_block(
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
    lo,
    hi,
    kv_end,
    offs_m,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    USE_TMA: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Fold key blocks ``[lo, hi)`` into (acc, l_i, m_i). ``MASKED`` adds bounds/causal masks.
    With ``USE_TMA`` the k/v descriptors end at row ``kv_end`` so rows past it read as zeros;
    otherwise the masked loads of ``k_base``/``v_base`` do the same."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_offs = offs_n[:, None] * stride_ks + offs_d[None, :]
    kv_offs_v = offs_n[:, None] * stride_vs + offs_d[None, :]
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        # ---- S = Q K^T ----
        if USE_TMA:
            k = k_desc.load([start_n, 0])
        else:
            k_ptrs = k_base + start_n.to(tl.int64) * stride_ks + kv_offs
            if MASKED:
                k = tl.load(k_ptrs, mask=(start_n + offs_n)[:, None] < kv_end, other=0.0)
            else:
                k = tl.load(k_ptrs)
        if UPCAST:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        # ---- online softmax in the log2 domain ----
        if MASKED:
            cols = start_n + offs_n
            valid = cols[None, :] < kv_end
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None])
            qk = tl.where(valid, qk, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            # a row with no valid key so far keeps m = -inf; subtract 0 there to avoid inf - inf
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
        else:
            v_ptrs = v_base + start_n.to(tl.int64) * stride_vs + kv_offs_v
            if MASKED:
                v = tl.load(v_ptrs, mask=(start_n + offs_n)[:, None] < kv_end, other=0.0)
            else:
                v = tl.load(v_ptrs)
        if UPCAST:
            # round P to the input dtype as the GPU path does, then compute in fp32
            acc = tl.dot(
                p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc, input_precision=DOT_PRECISION
            )
        else:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q,
    K,
    V,
    O,
    KV_LENS,
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
    Sq,
    Sk,
    SK_BUCKET: tl.constexpr,  # autotune key only
    GROUP: tl.constexpr,  # H // Hk
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KV_LENS: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
    TMA_QO: tl.constexpr = True,  # with USE_TMA: q load / o store through descriptors too
    UPCAST: tl.constexpr = False,  # interpreter only: its bf16 dot is wrong, dot in fp32 instead
):
    pid_m = tl.program_id(0)
    if CAUSAL:
        # heaviest query tiles (most keys) first: better tail balance
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kh = h // GROUP
    m0 = pid_m * BLOCK_M

    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + kh.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kh.to(tl.int64) * stride_vh
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh

    # keys [0, kv_end) exist for this batch
    kv_end = Sk
    if HAS_KV_LENS:
        kv_end = tl.maximum(tl.minimum(tl.load(KV_LENS + b).to(tl.int32), Sk), 0)
    # [0, full_hi): every row of the tile sees every key of the block; [full_hi, hi): masked
    if CAUSAL:
        hi = tl.minimum(kv_end, m0 + BLOCK_M)
        full_hi = (tl.minimum(kv_end, m0 + 1) // BLOCK_N) * BLOCK_N
    else:
        hi = kv_end
        full_hi = (kv_end // BLOCK_N) * BLOCK_N

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)

    if USE_TMA:
        # the kv views end at kv_end: padded keys are never read, they come back as zeros
        kv_rows = tl.maximum(kv_end, 1)
        k_desc = tl.make_tensor_descriptor(
            k_base,
            shape=[kv_rows, HEAD_DIM],
            strides=[stride_ks, 1],
            block_shape=[BLOCK_N, HEAD_DIM],
        )
        v_desc = tl.make_tensor_descriptor(
            v_base,
            shape=[kv_rows, HEAD_DIM],
            strides=[stride_vs, 1],
            block_shape=[BLOCK_N, HEAD_DIM],
        )
    else:
        k_desc = None
        v_desc = None
    if USE_TMA and TMA_QO:
        q_desc = tl.make_tensor_descriptor(
            q_base, shape=[Sq, HEAD_DIM], strides=[stride_qs, 1], block_shape=[BLOCK_M, HEAD_DIM]
        )
        q = q_desc.load([m0, 0])
    else:
        q_ptrs = q_base + offs_m[:, None].to(tl.int64) * stride_qs + offs_d[None, :]
        q = tl.load(q_ptrs, mask=offs_m[:, None] < Sq, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    acc, l_i, m_i = _attn_fwd_block(
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
        0,
        full_hi,
        kv_end,
        offs_m,
        qk_scale,
        HEAD_DIM,
        BLOCK_N,
        False,
        CAUSAL,
        USE_TMA,
        WARP_SPECIALIZE,
        DOT_PRECISION,
        UPCAST,
    )
    acc, l_i, m_i = _attn_fwd_block(
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
        full_hi,
        hi,
        kv_end,
        offs_m,
        qk_scale,
        HEAD_DIM,
        BLOCK_N,
        True,
        CAUSAL,
        USE_TMA,
        False,
        DOT_PRECISION,
        UPCAST,
    )

    # rows that saw no key have l == 0 and acc == 0: write 0, not 0/0
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = (acc / l_safe[:, None]).to(O.dtype.element_ty)
    if USE_TMA and TMA_QO:
        o_desc = tl.make_tensor_descriptor(
            o_base, shape=[Sq, HEAD_DIM], strides=[stride_os, 1], block_shape=[BLOCK_M, HEAD_DIM]
        )
        o_desc.store([m0, 0], out)
    else:
        o_ptrs = o_base + offs_m[:, None].to(tl.int64) * stride_os + offs_d[None, :]
        tl.store(o_ptrs, out, mask=offs_m[:, None] < Sq)


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------


class FlashConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    warp_specialize: bool = (
        False  # tl.range(warp_specialize=...): no effect on Hopper in triton 3.6
    )
    tma_qo: bool = True  # on the TMA path, q/o through descriptors too (else plain loads/stores)


def _sk_bucket(sk: int) -> int:
    """0: short keys (cross-attention to text), 1: medium, 2: long (video self-attention)."""
    return 0 if sk <= 1024 else (1 if sk <= 8192 else 2)


# (head_dim, causal, dtype kind, sk bucket) -> config, for the TMA path on Hopper; ``None`` is a
# wildcard bucket. Measured on the H200 with triton 3.6 (docs/kernel-notes.md, two sweeps): what
# wins everywhere at D128 is two CTAs of one warpgroup each per SM (128x64 tiles, 4 warps,
# 2 stages: 255 registers and ~96 KB of shared memory each), so one CTA's softmax overlaps the
# other's tensor-core work. Long self-attention: 541 TFLOP/s = 0.95x cuDNN.
_HEURISTIC: dict[tuple, FlashConfig] = {
    (128, False, "16", None): FlashConfig(128, 64, 4, 2),
    (128, True, "16", None): FlashConfig(128, 64, 4, 2),
    (64, False, "16", None): FlashConfig(128, 128, 4, 3, tma_qo=False),
    (64, True, "16", None): FlashConfig(128, 128, 4, 3, tma_qo=False),
}
# pointer path (no TMA: pre-Hopper, or views whose base/strides are not 16-byte aligned)
_HEURISTIC_PTR: dict[int, FlashConfig] = {
    128: FlashConfig(128, 64, 8, 3),
    64: FlashConfig(128, 64, 4, 3),
}
# fp32 (ieee dots; correctness path, not tuned)
_FP32_CONFIG = FlashConfig(64, 32, 4, 2)
# the interpreter: small tiles run fastest on the CPU
_INTERPRET_CONFIG = FlashConfig(32, 32, 4, 1)

# curated list for FV_FLASH_AUTOTUNE=1 (TMA path)
_TUNE_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
    for (bm, bn, w, st) in [
        (128, 64, 4, 2),
        (128, 128, 8, 3),
        (64, 64, 4, 3),
        (128, 128, 4, 3),
        (256, 64, 8, 2),
        (128, 64, 8, 3),
    ]
]
_attn_fwd_autotuned = triton.autotune(
    configs=_TUNE_CONFIGS, key=["HEAD_DIM", "CAUSAL", "SK_BUCKET", "HAS_KV_LENS", "GROUP"]
)(_attn_fwd_kernel)  # opt-in: costs ~5.6 s more than the heuristic on the first call (H200)


def _lookup(head_dim: int, causal: bool, dtype: torch.dtype, sk: int) -> FlashConfig:
    kind = "32" if dtype == torch.float32 else "16"
    bucket = _sk_bucket(sk)
    for key in ((head_dim, causal, kind, bucket), (head_dim, causal, kind, None)):
        if key in _HEURISTIC:
            return _HEURISTIC[key]
    return FlashConfig(128, 64, 4, 3)


# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------


def _tma_allocator(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Device-side tensor descriptors need scratch memory; install a torch allocator unless
    someone else already set one."""
    try:
        from triton.runtime import _allocation

        unset = type(_allocation._allocator.get()).__name__ == "NullAllocator"
    except Exception:  # private API moved: just install ours
        unset = True
    if unset:
        triton.set_allocator(_tma_allocator)


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """TMA wants 16-byte aligned bases and 16-byte multiple row strides."""
    for t in tensors:
        es = t.element_size()
        if t.data_ptr() % 16 != 0:
            return False
        if any((s * es) % 16 != 0 for s in t.stride()[:-1]):
            return False
    return True


def _choose_tma(use_tma: bool | None, interpret: bool, q, k, v, out) -> bool:
    """The memory path of a launch: tensor descriptors on Hopper when every tensor's base and
    strides allow them (unless the caller forced a path), plain pointers otherwise."""
    if use_tma is None:
        use_tma = (
            not interpret
            and q.is_cuda
            and q.dtype != torch.float32
            and torch.cuda.get_device_capability(q.device)[0] >= 9
            and _tma_ok(q, k, v, out)
        )
    if use_tma and not interpret:
        _ensure_allocator()
    return bool(use_tma)


def _check_inputs(q, k, v, kv_lengths, out):
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
    B, _Sq, H, D = q.shape
    Bk, _Sk, Hk, Dk = k.shape
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"head_dim {D} is not supported; supported head dims: {SUPPORTED_HEAD_DIMS}"
        )
    if Dk != D or v.shape[-1] != D:
        raise ValueError(f"q, k, v head dims differ: {D}, {Dk}, {v.shape[-1]}")
    if v.shape != k.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if Bk != B:
        raise ValueError(f"batch sizes differ: q {B}, k/v {Bk}")
    if Hk == 0 or H % Hk != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({Hk})")
    if kv_lengths is not None:
        if kv_lengths.shape != (B,) or kv_lengths.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"kv_lengths must be an int32 tensor of shape [{B}], "
                f"got {kv_lengths.dtype} {tuple(kv_lengths.shape)}"
            )
        if kv_lengths.device != q.device:
            raise ValueError("kv_lengths must be on q's device")
    if out is not None and (
        out.shape != q.shape
        or out.dtype != q.dtype
        or out.device != q.device
        or out.stride(-1) != 1
    ):
        raise ValueError("out must match q's shape, dtype and device, with stride(-1) == 1")


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float,
    causal: bool = False,
    kv_lengths: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: FlashConfig | None = None,
    use_tma: bool | None = None,
    on_launch: Callable[[Any], None] | None = None,
) -> torch.Tensor:
    """softmax(q k^T * softmax_scale [+ masks]) v for BSHD tensors.

    q: ``[B, Sq, H, D]``; k, v: ``[B, Sk, Hk, D]``, ``H % Hk == 0`` (GQA); D in (64, 128);
    bf16/fp16 (fp32 computed with ieee dots); any strides with ``stride(-1) == 1``.
    causal: top-left aligned (query i sees keys j <= i), as SDPA's ``is_causal``.
    kv_lengths: optional int32 ``[B]``; keys ``j >= kv_lengths[b]`` are masked. Rows with no
    valid key are 0. Returns ``[B, Sq, H, D]`` contiguous (or writes into ``out``).
    ``config``/``use_tma`` override the tile config and the memory path (tests, benchmarks);
    ``on_launch`` is called with the launched compiled kernel (benchmarks read its registers).
    """
    _check_inputs(q, k, v, kv_lengths, out)
    if not (softmax_scale > 0.0 and math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be a positive finite float, got {softmax_scale}")
    B, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    if out is None:
        out = torch.empty((B, Sq, H, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out

    interpret = interpreting()
    use_tma = _choose_tma(use_tma, interpret, q, k, v, out)
    if kv_lengths is not None and kv_lengths.dtype != torch.int32:
        kv_lengths = kv_lengths.to(torch.int32)

    # the interpreter computes bf16 dots wrongly (triton 3.9): dot in fp32 there
    upcast = interpret and q.dtype == torch.bfloat16
    dot_precision = "ieee" if (q.dtype == torch.float32 or upcast) else None
    common = dict(
        SK_BUCKET=0,
        GROUP=H // Hk,
        HEAD_DIM=D,
        CAUSAL=bool(causal),
        HAS_KV_LENS=kv_lengths is not None,
        USE_TMA=bool(use_tma),
        DOT_PRECISION=dot_precision,
    )
    if upcast:
        common["UPCAST"] = True
    args = (
        q,
        k,
        v,
        out,
        kv_lengths if kv_lengths is not None else q,
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
        Sq,
        Sk,
    )

    if (
        config is None
        and use_tma
        and not interpret
        and q.dtype != torch.float32
        and os.environ.get("FV_FLASH_AUTOTUNE", "0") == "1"
    ):

        def autotuned_grid(meta):
            return (triton.cdiv(Sq, meta["BLOCK_M"]), B * H)

        common["SK_BUCKET"] = _sk_bucket(Sk)  # part of the autotune key only
        _attn_fwd_autotuned[autotuned_grid](*args, **common, WARP_SPECIALIZE=False)
        return out

    if config is None:
        if interpret:
            config = _INTERPRET_CONFIG
        elif q.dtype == torch.float32:
            config = _FP32_CONFIG
        elif use_tma:
            config = _lookup(D, bool(causal), q.dtype, Sk)
        else:
            config = _HEURISTIC_PTR[D]
    grid = (triton.cdiv(Sq, config.block_m), B * H)
    launched = _attn_fwd_kernel[grid](
        *args,
        **common,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        WARP_SPECIALIZE=bool(config.warp_specialize) and bool(use_tma),
        TMA_QO=bool(config.tma_qo),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if on_launch is not None:
        on_launch(launched)
    return out
