"""Class 7: precision. bf16 q/k/v upcast with .float() for an attention whose fp32 result is kept must
be computed as accurately as eager's fp32 math (both compared with a float64 reference); a site
that casts back to bf16 right after may run in bf16, within bf16 tolerance."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.adversarial._harness import BF16_TOL, check

B, H, S, D = 2, 2, 16, 16
SCALE = 1.0 / math.sqrt(D)


def ref64(q, k, v, mask=None):
    q, k, v = q.double(), k.double(), v.double()
    s = q @ k.transpose(-2, -1) * SCALE
    if mask is not None:
        s = s.masked_fill(mask, float("-inf"))
    return s.softmax(-1) @ v


class UpcastSdpaKeepFp32(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float())


class UpcastHandwrittenKeepFp32(nn.Module):
    def forward(self, q, k, v):
        q, k, v = q.float(), k.float(), v.float()
        return (q @ k.transpose(-2, -1) * SCALE).softmax(-1) @ v


class UpcastEinsumKeepFp32(nn.Module):
    def forward(self, q, k, v):
        s = torch.einsum("bhqd,bhkd->bhqk", q.to(torch.float32), k.to(torch.float32)) * SCALE
        return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v.to(torch.float32))


class UpcastMaskedKeepFp32(nn.Module):
    def forward(self, q, k, v, mask):
        s = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(D)
        return s.masked_fill(mask, float("-inf")).softmax(-1) @ v.float()


class UpcastTypeAsFp32Tensor(nn.Module):
    """Upcast via type_as a fp32 buffer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("ref", torch.zeros(()))

    def forward(self, q, k, v):
        q, k, v = q.type_as(self.ref), k.type_as(self.ref), v.type_as(self.ref)
        return F.scaled_dot_product_attention(q, k, v)


class UpcastOutputFeedsFp32Residual(nn.Module):
    def forward(self, q, k, v):
        o = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        return o + 0.0 * q.float()


class ScoresSoftmaxInFp32ValuesFp32(nn.Module):
    """bf16 scores, softmax(dtype=float32), fp32 values: weights and values are fp32."""

    def forward(self, q, k, v):
        s = q.float() @ k.float().transpose(-2, -1) * SCALE
        p = F.softmax(s, dim=-1, dtype=torch.float32)
        return p @ v.float()


FP32_KEPT = [
    UpcastSdpaKeepFp32,
    UpcastHandwrittenKeepFp32,
    UpcastEinsumKeepFp32,
    UpcastTypeAsFp32Tensor,
    UpcastOutputFeedsFp32Residual,
    ScoresSoftmaxInFp32ValuesFp32,
]


def bf16_qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(B, H, S, D, generator=g) * 2).bfloat16() for _ in range(3))


def assert_fp32_accuracy(out_c, out_e, ref):
    err_e = (out_e.double() - ref).abs().max().item()
    err_c = (out_c.double() - ref).abs().max().item()
    assert out_c.dtype == torch.float32
    assert err_e < 1e-5, f"test premise: eager is fp32-accurate ({err_e:.2e})"
    assert err_c <= 4 * err_e + 1e-6, (
        f"compiled error {err_c:.2e} vs eager's {err_e:.2e}: the fp32 attention ran in lower precision"
    )


@pytest.mark.parametrize("cls", FP32_KEPT, ids=lambda c: c.__name__)
def test_upcast_attention_kept_in_fp32_is_fp32_accurate(cls):
    q, k, v = bf16_qkv()
    _, _, [(out_c, out_e)] = check(cls(), q, k, v)
    assert_fp32_accuracy(out_c, out_e, ref64(q, k, v))


def test_upcast_masked_attention_kept_in_fp32_is_fp32_accurate():
    q, k, v = bf16_qkv(1)
    mask = torch.rand(1, 1, S, S, generator=torch.Generator().manual_seed(2)) > 0.6
    mask[..., 0] = False
    _, _, [(out_c, out_e)] = check(UpcastMaskedKeepFp32(), q, k, v, mask)
    assert_fp32_accuracy(out_c, out_e, ref64(q, k, v, mask))


def test_upcast_attention_gradients_match_eager():
    q, k, v = bf16_qkv(3)
    qf, kf, vf = (t.float() for t in (q, k, v))
    check(UpcastHandwrittenKeepFp32(), qf.bfloat16(), kf.bfloat16(), vf.bfloat16(), grad=True)


# --- the result goes back to bf16 right after: bf16 math is legitimate, within bf16 tolerance


class HFStyleSoftmaxUpcastTypeAs(nn.Module):
    def forward(self, q, k, v):
        s = torch.matmul(q, k.transpose(2, 3)) * SCALE
        p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(p, v)


class UpcastSdpaCastBack(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)


class UpcastHandwrittenCastBackBf16(nn.Module):
    def forward(self, q, k, v):
        o = (q.float() @ k.float().transpose(-2, -1) * SCALE).softmax(-1) @ v.float()
        return o.bfloat16()


class SoftmaxFloatTypeAs(nn.Module):
    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * SCALE
        return s.float().softmax(-1).type_as(s) @ v


class Bf16Throughout(nn.Module):
    def forward(self, q, k, v):
        return (q @ k.transpose(-2, -1) * SCALE).softmax(-1) @ v


class DowncastFp32ToBf16ForAttention(nn.Module):
    """fp32 inputs, attention in bf16, result upcast: eager's bf16 rounding must be kept (within
    bf16 tolerance)."""

    def forward(self, q, k, v):
        o = F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
        return o.float()


CAST_BACK = [
    HFStyleSoftmaxUpcastTypeAs,
    UpcastSdpaCastBack,
    UpcastHandwrittenCastBackBf16,
    SoftmaxFloatTypeAs,
    Bf16Throughout,
]


@pytest.mark.parametrize("cls", CAST_BACK, ids=lambda c: c.__name__)
def test_attention_cast_back_to_bf16_within_bf16_tolerance(cls):
    q, k, v = bf16_qkv(4)
    _, _, [(out_c, _out_e)] = check(cls(), q, k, v)
    assert out_c.dtype == torch.bfloat16


def test_downcast_attention_keeps_bf16_rounding_within_tolerance():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    check(DowncastFp32ToBf16ForAttention(), q, k, v, tol=BF16_TOL)


class MixedUpcastOnlyScores(nn.Module):
    """Scores in fp32 from upcast q/k, weights cast to bf16, bf16 values: output bf16."""

    def forward(self, q, k, v):
        s = q.float() @ k.float().transpose(-2, -1) * SCALE
        return s.softmax(-1).to(v.dtype) @ v


class UpcastQKOnlyVStaysBf16ThenFp32Out(nn.Module):
    """Weights fp32, v bf16 upcast late: (p @ v.float()) is fp32 and kept."""

    def forward(self, q, k, v):
        p = (q.float() @ k.float().transpose(-2, -1) * SCALE).softmax(-1)
        return p @ v.float()


def test_scores_in_fp32_weights_cast_to_bf16():
    q, k, v = bf16_qkv(6)
    check(MixedUpcastOnlyScores(), q, k, v)


def test_upcast_values_late_kept_fp32_is_fp32_accurate():
    q, k, v = bf16_qkv(7)
    _, _, [(out_c, out_e)] = check(UpcastQKOnlyVStaysBf16ThenFp32Out(), q, k, v)
    assert_fp32_accuracy(out_c, out_e, ref64(q, k, v))
