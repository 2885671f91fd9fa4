"""Torch references for the 8-bit attention kernel (``sage_fwd.py``), no Triton needed.

``exact_attention``: softmax(q k^T * scale) v in float64 (or float32), ``[B, S, H, D]`` in and
out, GQA by repeating kv heads, top-left causal. ``sage_reference``: the kernel's quantisation
(smoothing, per-token INT8 q/k, per-channel FP8 v, P times 448 to FP8) with everything else in
float64, so a test can tell the quantisation error (this reference vs the exact one) from a
kernel bug (the kernel vs this reference). One difference remains: the kernel quantises P
against the running row max of its online softmax, this reference against the final row max.
"""

from __future__ import annotations

import math

import torch

P_SCALE = 448.0
V_RANGE = 448.0


def _bhsd(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to("cpu", dtype).transpose(1, 2)


def _causal_keep(sq: int, sk: int) -> torch.Tensor:
    return torch.ones(sq, sk, dtype=torch.bool).tril()


def exact_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool = False,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Exact attention on the CPU in ``dtype``; rows with no key give 0."""
    qh, kh, vh = (_bhsd(t, dtype) for t in (q, k, v))
    group = qh.shape[1] // kh.shape[1]
    kh, vh = kh.repeat_interleave(group, 1), vh.repeat_interleave(group, 1)
    s = qh @ kh.transpose(-1, -2) * scale
    if causal:
        s = s.masked_fill(~_causal_keep(s.shape[-2], s.shape[-1]), -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ vh).transpose(1, 2)


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer values in [-127, 127], scale per row) of float64 ``[..., D]``."""
    amax = x.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return round_half_away(x / scale).clamp(-127, 127), scale


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """x rounded to FP8 e4m3 (nearest), back in x's dtype."""
    return x.to(torch.float32).to(torch.float8_e4m3fn).to(x.dtype)


def sage_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool = False,
    *,
    smooth_q: bool = True,
    smooth_k: bool = True,
    pv_fp8: bool = True,
) -> torch.Tensor:
    """The kernel's quantisation, float64 elsewhere; ``[B, Sq, H, D]`` float64 on the CPU."""
    qh, kh, vh = (_bhsd(t, torch.float64) for t in (q, k, v))
    group = qh.shape[1] // kh.shape[1]
    if smooth_k:
        kh = kh - kh.mean(-2, keepdim=True)
    mq = qh.mean(-2, keepdim=True) if smooth_q else torch.zeros_like(qh[..., :1, :])
    qi, qs = int8_per_token(qh - mq)
    ki, ks = int8_per_token(kh)
    ki, ks = ki.repeat_interleave(group, 1), ks.repeat_interleave(group, 1)
    bias = mq @ kh.repeat_interleave(group, 1).transpose(-1, -2)  # [B, H, 1, Sk], exact
    s = (qi @ ki.transpose(-1, -2)) * qs * ks.transpose(-1, -2) + bias
    s = s * scale
    if causal:
        s = s.masked_fill(~_causal_keep(s.shape[-2], s.shape[-1]), -math.inf)
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    l_sum = p.sum(-1, keepdim=True)
    vamax = vh.abs().amax(-2, keepdim=True)
    vs = torch.where(vamax > 0, vamax / V_RANGE, torch.ones_like(vamax))
    vq = vh / vs
    if pv_fp8:
        pq, vq = to_e4m3(p * P_SCALE), to_e4m3(vq)
    else:
        pq, vq = (p * P_SCALE).half().double(), vq.half().double()
    out = (pq @ vq.repeat_interleave(group, 1)) * vs.repeat_interleave(group, 1) / P_SCALE
    out = out / torch.where(l_sum > 0, l_sum, torch.ones_like(l_sum))
    return out.transpose(1, 2)


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(relative L2 error, cosine similarity) of ``out`` against ``ref``, in float64."""
    o = out.detach().to("cpu", torch.float64).flatten()
    r = ref.detach().to("cpu", torch.float64).flatten()
    rn = r.norm().item()
    rel = (o - r).norm().item() / (rn if rn > 0 else 1.0)
    cos = torch.nn.functional.cosine_similarity(o, r, dim=0).item()
    return rel, cos
