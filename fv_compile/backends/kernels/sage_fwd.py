"""8-bit attention forward in Triton (SageAttention2's recipe), read from ``[batch, seq, heads,
head_dim]``.

Two launches: one fused quantisation pass over q, k and v, then the attention kernel.

Quantisation (``_sage_quant_kernel``, one launch; its grid's third axis picks q, k or v):

* **K smoothing**: k minus its mean over tokens, per (batch, kv head). Every score of a query row
  moves by the same ``q . mean_k``, so the softmax is unchanged (exact).
* **Q smoothing**: q minus its mean over tokens, per (batch, head): ``q k^T = (q - mq) k^T +
  mq k^T``; the second term is one value per key, computed here in fp32 from the unquantised
  (smoothed) k and added to the scores as a per-key bias. SageAttention2 subtracts a per-block
  mean instead, which needs a bias per (query block, key) computed inside the kernel; the mean
  over the whole sequence removes the same per-channel offsets of video activations with a bias
  of ``[B, H, Sk]`` floats, exact, and nothing extra in the kernel's inner loop but one load.
* **Q and K to INT8, per token** (one fp32 scale per row of ``head_dim`` values, finer than
  SageAttention2's per-thread groups, so a token's scale never depends on another token's
  magnitude); round half away from zero. ``softmax_scale * log2(e)`` is folded into q's scales.
* **V per channel** to FP8 e4m3 (a scale per (batch, kv head, channel) = max |v| / 448), stored
  transposed ``[B, Hk, D, Sk_pad]`` (keys contiguous: the K-major operand FP8 tensor cores want),
  the pad zero. Where FP8 is unavailable (before sm89) V is scaled the same way into fp16.

Attention (``_sage_fwd_kernel``): ``int8 x int8 -> int32`` ``tl.dot`` for q k^T, dequantised by
the outer product of the two scale vectors, plus the q-smoothing bias; online softmax in the log2
domain; P (<= 1 after the running max) times 448 to FP8 e4m3 (fp16 on the fp16 path) and ``P V``
on the FP8 tensor cores. Two-level accumulation: each key block's ``P V`` starts from a zero
accumulator (the tensor cores' partial sums over ``BLOCK_N`` keys) and is then added into the
fp32 running output on the CUDA cores, as SageAttention2's ``fp32+fp32`` mode does on sm90.

Triton's interpreter runs the same kernels: int8 dots (exact int32) and FP8 casts and dots work
there, so CPU tests measure the real quantisation error.

Shapes: q ``[B, Sq, H, D]``, k/v ``[B, Sk, Hk, D]``, ``H % Hk == 0``, D in (64, 128), bf16/fp16,
``stride(-1) == 1``. ``causal`` is top-left aligned (query i sees keys j <= i), as SDPA's.
Returns a new contiguous ``[B, Sq, H, D]`` tensor of q's dtype. Extra memory: the int8/fp8
copies (1 byte per element), fp32 scales per token and per channel, the bias.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fv_compile.backends.kernels import SAGE_HEAD_DIMS, interpreting

__all__ = ["SageConfig", "attention_quantized", "fp8_available", "quantize", "sage_attention_fwd"]

_LOG2E = 1.4426950408889634
P_SCALE = 448.0  # P in [0, 1] times this fills e4m3's range (its largest finite value)
V_RANGE = 448.0
KV_PAD = 128  # the transposed V's key axis is padded to a multiple of this (>= every BLOCK_N)
_DTYPES = (torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------
# quantisation pass
# --------------------------------------------------------------------------------------------


@triton.jit
def _to_int8_rows(x):
    """Per-row symmetric INT8: (int8 values, fp32 scale per row); x is fp32 ``[rows, D]``."""
    amax = tl.max(tl.abs(x), 1)
    scale = tl.where(amax > 0.0, amax / 127.0, 1.0)
    y = x / scale[:, None]
    xi = tl.where(y >= 0.0, y + 0.5, y - 0.5).to(tl.int8)  # round half away from zero
    return xi, scale


@triton.jit
def _round_e4m3(x):
    """x rounded to the nearest FP8 e4m3 value, still fp32 (|x| <= 448). Used under the
    interpreter only, whose fp32 -> fp8 cast truncates some values where the GPU rounds to
    nearest: rounding first makes its cast exact."""
    a = tl.abs(x)
    e = tl.floor(tl.log2(tl.maximum(a, 0.015625)))  # subnormals share the 2^-6 binade's step
    step = tl.exp2(e - 3.0)
    r = tl.minimum(tl.floor(a / step + 0.5) * step, 448.0)
    return tl.where(x < 0.0, -r, r)


@triton.jit
def _sage_quant_kernel(
    Q,
    K,
    V,
    QM,
    KM,
    VS,
    Q8,
    QS,
    K8,
    KS,
    KB,
    VT,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    H,
    Hk,
    Sq,
    Sk,
    Skp,
    q_mul,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SMOOTH_Q: tl.constexpr,
    SMOOTH_K: tl.constexpr,
    BLOCK_S: tl.constexpr,
    ROUND_FP8: tl.constexpr = False,
):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    which = tl.program_id(2)  # 0: q, 1: k, 2: v
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    if which == 0:
        in_q = rows < Sq
        ptrs = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        x = tl.load(
            ptrs + rows[:, None].to(tl.int64) * stride_qs + offs_d[None, :],
            mask=in_q[:, None],
            other=0.0,
        ).to(tl.float32)
        if SMOOTH_Q:
            mq = tl.load(QM + (b * H + h).to(tl.int64) * HEAD_DIM + offs_d)
            x = tl.where(in_q[:, None], x - mq[None, :], 0.0)
        xi, scale = _to_int8_rows(x)
        row0 = (b * H + h).to(tl.int64) * Sq
        tl.store(Q8 + (row0 + rows[:, None]) * HEAD_DIM + offs_d[None, :], xi, mask=in_q[:, None])
        tl.store(QS + row0 + rows, scale * q_mul, mask=in_q)
    elif which == 1:
        if h < Hk:
            in_k = rows < Sk
            ptrs = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
            x = tl.load(
                ptrs + rows[:, None].to(tl.int64) * stride_ks + offs_d[None, :],
                mask=in_k[:, None],
                other=0.0,
            ).to(tl.float32)
            if SMOOTH_K:
                km = tl.load(KM + (b * Hk + h).to(tl.int64) * HEAD_DIM + offs_d)
                x = tl.where(in_k[:, None], x - km[None, :], 0.0)
            xi, scale = _to_int8_rows(x)
            row0 = (b * Hk + h).to(tl.int64) * Sk
            tl.store(
                K8 + (row0 + rows[:, None]) * HEAD_DIM + offs_d[None, :], xi, mask=in_k[:, None]
            )
            tl.store(KS + row0 + rows, scale, mask=in_k)
            if SMOOTH_Q:
                # the per-key term mean_q . k of every query head reading this kv head, in fp32
                # from the unquantised k (log2 domain, softmax scale folded in)
                for g in range(GROUP):
                    qh = h * GROUP + g
                    mq = tl.load(QM + (b * H + qh).to(tl.int64) * HEAD_DIM + offs_d)
                    bias = tl.sum(x * mq[None, :], 1) * q_mul
                    tl.store(KB + (b * H + qh).to(tl.int64) * Sk + rows, bias, mask=in_k)
    else:
        if h < Hk:
            in_k = rows < Sk
            ptrs = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
            x = tl.load(
                ptrs + rows[:, None].to(tl.int64) * stride_vs + offs_d[None, :],
                mask=in_k[:, None],
                other=0.0,
            ).to(tl.float32)
            vs = tl.load(VS + (b * Hk + h).to(tl.int64) * HEAD_DIM + offs_d)
            y = x / vs[None, :]
            if ROUND_FP8:
                y = _round_e4m3(y)
            y = y.to(VT.dtype.element_ty)
            col0 = (b * Hk + h).to(tl.int64) * HEAD_DIM
            # transposed [D, Skp]; the pad past Sk gets zeros
            tl.store(
                VT + (col0 + offs_d[None, :]) * Skp + rows[:, None], y, mask=(rows < Skp)[:, None]
            )


# --------------------------------------------------------------------------------------------
# attention kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _sage_fwd_block(
    acc,
    l_i,
    m_i,
    q,
    qs,
    k_base,
    ks_base,
    kb_base,
    vt_base,
    Skp,
    lo,
    hi,
    Sk,
    offs_m,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PV_FP8: tl.constexpr,
    ROUND_FP8: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        k_ptrs = k_base + cols[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=(cols < Sk)[:, None], other=0)
            ks = tl.load(ks_base + cols, mask=cols < Sk, other=0.0)
        else:
            k = tl.load(k_ptrs)
            ks = tl.load(ks_base + cols)
        # ---- S = dequant(Q8 K8^T): int32 accumulate, per-token scales (log2 domain) ----
        qk = tl.dot(q, tl.trans(k))
        s = qk.to(tl.float32) * qs[:, None] * ks[None, :]
        if HAS_BIAS:
            if MASKED:
                kb = tl.load(kb_base + cols, mask=cols < Sk, other=0.0)
            else:
                kb = tl.load(kb_base + cols)
            s = s + kb[None, :]
        if MASKED:
            valid = cols[None, :] < Sk
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None])
            s = tl.where(valid, s, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(s, 1))
            m_sub = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        else:
            m_ij = tl.maximum(m_i, tl.max(s, 1))
            m_sub = m_ij
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        # ---- O = O * alpha + P8 V8: a fresh tensor-core accumulator per block, summed in fp32 ----
        vt = tl.load(vt_base + offs_d[:, None].to(tl.int64) * Skp + cols[None, :])  # [D, BLOCK_N]
        if PV_FP8:
            if ROUND_FP8:
                p8 = _round_e4m3(p * 448.0).to(tl.float8e4nv)
            else:
                p8 = (p * 448.0).to(tl.float8e4nv)
        else:
            p8 = (p * 448.0).to(tl.float16)
        pv = tl.dot(p8, tl.trans(vt))
        acc = acc * alpha[:, None] + pv
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _sage_fwd_kernel(
    Q8,
    QS,
    K8,
    KS,
    KB,
    VT,
    VS,
    O,
    stride_ob,
    stride_os,
    stride_oh,
    H,
    Hk,
    Sq,
    Sk,
    Skp,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PV_FP8: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROUND_FP8: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    if CAUSAL:  # heaviest query tiles first
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kh = h // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)

    q_row0 = (b * H + h).to(tl.int64) * Sq
    k_row0 = (b * Hk + kh).to(tl.int64) * Sk
    in_q = offs_m < Sq
    q = tl.load(Q8 + (q_row0 + offs_m[:, None]) * HEAD_DIM + offs_d[None, :], mask=in_q[:, None])
    qs = tl.load(QS + q_row0 + offs_m, mask=in_q, other=0.0)
    k_base = K8 + k_row0 * HEAD_DIM
    ks_base = KS + k_row0
    kb_base = KB + (b * H + h).to(tl.int64) * Sk
    vt_base = VT + (b * Hk + kh).to(tl.int64) * HEAD_DIM * Skp

    if CAUSAL:
        hi = tl.minimum(Sk, m0 + BLOCK_M)
        full_hi = (tl.minimum(Sk, m0 + 1) // BLOCK_N) * BLOCK_N
    else:
        hi = Sk
        full_hi = (Sk // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = _sage_fwd_block(
        acc, l_i, m_i, q, qs, k_base, ks_base, kb_base, vt_base, Skp, 0, full_hi, Sk, offs_m,
        HEAD_DIM, BLOCK_N, False, CAUSAL, HAS_BIAS, PV_FP8, ROUND_FP8,
    )  # fmt: skip
    acc, l_i, m_i = _sage_fwd_block(
        acc, l_i, m_i, q, qs, k_base, ks_base, kb_base, vt_base, Skp, full_hi, hi, Sk, offs_m,
        HEAD_DIM, BLOCK_N, True, CAUSAL, HAS_BIAS, PV_FP8, ROUND_FP8,
    )  # fmt: skip

    vs = tl.load(VS + (b * Hk + kh).to(tl.int64) * HEAD_DIM + offs_d)
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # a row that saw no key writes 0
    out = acc * (vs[None, :] / 448.0) / l_safe[:, None]
    o_ptrs = (
        O
        + b.to(tl.int64) * stride_ob
        + h.to(tl.int64) * stride_oh
        + offs_m[:, None].to(tl.int64) * stride_os
        + offs_d[None, :]
    )
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=in_q[:, None])


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------


class SageConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Hopper-minded defaults (one warpgroup pair per 128-row tile); the benchmark's autotuning
# (benchmarks/sage_attention.py, or FV_SAGE_AUTOTUNE=1) measures the alternatives below.
_DEFAULT = {128: SageConfig(128, 128, 8, 3), 64: SageConfig(128, 128, 8, 3)}
_INTERPRET_CONFIG = SageConfig(32, 32, 4, 1)
TUNE_CONFIGS = [
    SageConfig(128, 128, 8, 3),
    SageConfig(128, 128, 8, 2),
    SageConfig(128, 64, 8, 3),
    SageConfig(128, 64, 4, 3),
]
_QUANT_BLOCK = 64
_QUANT_BLOCK_INTERPRET = 32


def _autotuned():
    configs = [
        triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n}, num_warps=c.num_warps,
                      num_stages=c.num_stages)
        for c in TUNE_CONFIGS
    ]  # fmt: skip
    return triton.autotune(configs=configs, key=["HEAD_DIM", "CAUSAL", "GROUP", "PV_FP8"])(
        _sage_fwd_kernel
    )


_AUTOTUNED = None


def fp8_available(device: torch.device) -> bool:
    """FP8 e4m3 tensor cores: sm89 and later, and Triton's interpreter (which emulates them)."""
    if interpreting():
        return True
    if device.type != "cuda" or not hasattr(torch, "float8_e4m3fn"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D [batch, seq, heads, head_dim] tensor")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have stride(-1) == 1, got strides {tuple(t.stride())}")
    if q.dtype not in _DTYPES:
        raise ValueError(
            f"SAGE_ATTN takes bfloat16 or float16 inputs, got {q.dtype} (8-bit attention "
            "quantises 16-bit activations; run float32 sites on an exact backend)"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")
    B, _, H, D = q.shape
    Bk, _, Hk, Dk = k.shape
    if D not in SAGE_HEAD_DIMS:
        raise ValueError(f"head_dim {D} is not supported; supported head dims: {SAGE_HEAD_DIMS}")
    if Dk != D or v.shape[-1] != D:
        raise ValueError(f"q, k, v head dims differ: {D}, {Dk}, {v.shape[-1]}")
    if v.shape != k.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if Bk != B:
        raise ValueError(f"batch sizes differ: q {B}, k/v {Bk}")
    if Hk == 0 or H % Hk != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({Hk})")


class Quantized(NamedTuple):
    """What the quantisation pass writes (see the module docstring for the layouts)."""

    q8: torch.Tensor  # int8 [B, H, Sq, D]
    q_scale: torch.Tensor  # fp32 [B, H, Sq], softmax_scale * log2(e) folded in
    k8: torch.Tensor  # int8 [B, Hk, Sk, D]
    k_scale: torch.Tensor  # fp32 [B, Hk, Sk]
    k_bias: torch.Tensor | None  # fp32 [B, H, Sk], mean_q . k (log2 domain); None: no Q smoothing
    vt: torch.Tensor  # fp8 e4m3 (or fp16) [B, Hk, D, Sk_pad]
    v_scale: torch.Tensor  # fp32 [B, Hk, D]


def quantize(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float,
    smooth_q: bool = True,
    smooth_k: bool = True,
    pv_fp8: bool | None = None,
) -> Quantized:
    """The fused quantisation pass (one launch), its means and V's channel ranges before it."""
    B, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    dev = q.device
    if pv_fp8 is None:
        pv_fp8 = fp8_available(dev)
    skp = max(triton.cdiv(Sk, KV_PAD), 1) * KV_PAD
    f32 = torch.float32
    # the means and V's ranges: reductions over tokens, fp32 accumulation, no fp32 copies
    qm = torch.mean(q, dim=1, dtype=f32).contiguous() if smooth_q else q.new_empty(0, dtype=f32)
    km = torch.mean(k, dim=1, dtype=f32).contiguous() if smooth_k else q.new_empty(0, dtype=f32)
    vmin, vmax = torch.aminmax(v, dim=1)
    vamax = torch.maximum(vmax.float(), -vmin.float())
    vs = torch.where(vamax > 0, vamax / V_RANGE, torch.ones_like(vamax)).contiguous()

    q8 = torch.empty((B, H, Sq, D), dtype=torch.int8, device=dev)
    qs = torch.empty((B, H, Sq), dtype=f32, device=dev)
    k8 = torch.empty((B, Hk, Sk, D), dtype=torch.int8, device=dev)
    ks = torch.empty((B, Hk, Sk), dtype=f32, device=dev)
    kb = torch.empty((B, H, Sk), dtype=f32, device=dev) if smooth_q else None
    vdt = torch.float8_e4m3fn if pv_fp8 else torch.float16
    vt = torch.empty((B, Hk, D, skp), dtype=vdt, device=dev)
    block = _QUANT_BLOCK_INTERPRET if interpreting() else _QUANT_BLOCK
    grid = (triton.cdiv(max(Sq, skp), block), B * H, 3)
    _sage_quant_kernel[grid](
        q, k, v, qm, km, vs, q8, qs, k8, ks, kb if kb is not None else qs, vt,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        H, Hk, Sq, Sk, skp, float(softmax_scale) * _LOG2E,
        GROUP=H // Hk, HEAD_DIM=D, SMOOTH_Q=bool(smooth_q), SMOOTH_K=bool(smooth_k),
        BLOCK_S=block, ROUND_FP8=bool(pv_fp8) and interpreting(), num_warps=4,
    )  # fmt: skip
    return Quantized(q8, qs, k8, ks, kb, vt, vs)


def sage_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float,
    causal: bool = False,
    smooth_q: bool = True,
    smooth_k: bool = True,
    pv_fp8: bool | None = None,
    config: SageConfig | None = None,
    autotune: bool | None = None,
) -> torch.Tensor:
    """8-bit softmax(q k^T * softmax_scale) v for BSHD tensors (see the module docstring).

    q: ``[B, Sq, H, D]``; k, v: ``[B, Sk, Hk, D]``, ``H % Hk == 0``; D in (64, 128); bf16/fp16.
    ``smooth_q``/``smooth_k``: the mean subtractions (on by default; off only to measure them).
    ``pv_fp8``: P V in FP8 (default where available) or fp16. ``config`` fixes the tiles;
    ``autotune`` (default: ``FV_SAGE_AUTOTUNE=1``) tunes over ``TUNE_CONFIGS`` on the GPU.
    """
    _check_inputs(q, k, v)
    if not (softmax_scale > 0.0 and math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be a positive finite float, got {softmax_scale}")
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    out = torch.empty((B, Sq, H, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if Sk == 0:
        return out.zero_()
    if pv_fp8 is None:
        pv_fp8 = fp8_available(q.device)
    qz = quantize(
        q, k, v, softmax_scale=softmax_scale, smooth_q=smooth_q, smooth_k=smooth_k, pv_fp8=pv_fp8
    )
    return attention_quantized(qz, out, causal=causal, config=config, autotune=autotune)


def attention_quantized(
    qz: Quantized,
    out: torch.Tensor,
    *,
    causal: bool = False,
    config: SageConfig | None = None,
    autotune: bool | None = None,
) -> torch.Tensor:
    """The attention kernel alone on what `quantize` wrote, into ``out`` ``[B, Sq, H, D]``
    (benchmarks time it apart from the quantisation pass)."""
    B, H, Sq, D = qz.q8.shape
    Hk, Sk = qz.k8.shape[1], qz.k8.shape[2]
    pv_fp8 = qz.vt.dtype != torch.float16
    args = (
        qz.q8, qz.q_scale, qz.k8, qz.k_scale,
        qz.k_bias if qz.k_bias is not None else qz.k_scale,
        qz.vt, qz.v_scale, out,
        out.stride(0), out.stride(1), out.stride(2),
        H, Hk, Sq, Sk, qz.vt.shape[-1],
    )  # fmt: skip
    meta = dict(
        GROUP=H // Hk,
        HEAD_DIM=D,
        CAUSAL=bool(causal),
        HAS_BIAS=qz.k_bias is not None,
        PV_FP8=bool(pv_fp8),
    )
    interpret = interpreting()
    if interpret:
        meta["ROUND_FP8"] = bool(pv_fp8)
    if autotune is None:
        autotune = os.environ.get("FV_SAGE_AUTOTUNE", "0") == "1"
    if autotune and config is None and not interpret:
        global _AUTOTUNED
        if _AUTOTUNED is None:
            _AUTOTUNED = _autotuned()

        def grid(m):
            return (triton.cdiv(Sq, m["BLOCK_M"]), B * H)

        _AUTOTUNED[grid](*args, **meta)
        return out
    if config is None:
        config = _INTERPRET_CONFIG if interpret else _DEFAULT[D]
    if KV_PAD % config.block_n:
        raise ValueError(f"block_n must divide {KV_PAD}, got {config.block_n}")
    _sage_fwd_kernel[(triton.cdiv(Sq, config.block_m), B * H)](
        *args,
        **meta,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


def autotuned_config() -> SageConfig | None:
    """The config the autotuner picked last (benchmarks print it), if it ran."""
    best = getattr(_AUTOTUNED, "best_config", None)
    if best is None:
        return None
    return SageConfig(
        best.kwargs["BLOCK_M"], best.kwargs["BLOCK_N"], best.num_warps, best.num_stages
    )
