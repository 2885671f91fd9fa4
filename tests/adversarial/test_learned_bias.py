"""Class 3: learned additive masks and biases. The bias parameter's gradient must reach it through the
rewritten op exactly as in eager."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.adversarial._harness import B, Proj, S, check, inv_sqrt, x_input

H, D = 2, 8
SCALE = inv_sqrt(D)


class SwinRelativeBias(nn.Module):
    """Swin: a (2W-1)^2 x H table indexed by a buffer of relative position indices over a W x W window."""

    W = 3  # 9 tokens

    def __init__(self):
        super().__init__()
        W = self.W
        self.p = Proj(H=H, D=D)
        self.table = nn.Parameter(torch.randn((2 * W - 1) ** 2, H) * 0.5)
        coords = torch.stack(
            torch.meshgrid(torch.arange(W), torch.arange(W), indexing="ij")
        ).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (W - 1)
        self.register_buffer("index", rel[..., 0] * (2 * W - 1) + rel[..., 1])

    def forward(self, x):
        n = self.W * self.W
        q, k, v = self.p.qkv(x)
        q = q * SCALE
        attn = q @ k.transpose(-2, -1)
        bias = self.table[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()
        attn = attn + bias.unsqueeze(0)
        return self.p.merge(attn.softmax(dim=-1) @ v)


class SwinShiftedWindowMask(SwinRelativeBias):
    """Swin with the shifted-window mask (0 / -100 additive) on top of the relative bias."""

    def __init__(self):
        super().__init__()
        n = self.W * self.W
        m = torch.zeros(B, n, n)
        m[1, :, :4] = -100.0
        self.register_buffer("shift_mask", m)

    def forward(self, x):
        n = self.W * self.W
        q, k, v = self.p.qkv(x)
        attn = (q * SCALE) @ k.transpose(-2, -1)
        bias = self.table[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        attn = attn + bias.unsqueeze(0) + self.shift_mask.unsqueeze(1)
        return self.p.merge(F.softmax(attn, -1) @ v)


class AlibiLearnedSlopes(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = Proj()
        self.slopes = nn.Parameter(torch.tensor([0.5, 0.125]))
        pos = torch.arange(S)
        self.register_buffer("dist", (pos[None, :] - pos[:, None]).float())

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        s = q @ k.transpose(-2, -1) * SCALE
        s = s + self.slopes.view(1, H, 1, 1) * self.dist
        return self.p.merge(s.softmax(-1) @ v)


class AlibiCausalLearnedSlopesSdpa(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = Proj()
        self.slopes = nn.Parameter(torch.tensor([0.25, 0.0625]))
        pos = torch.arange(S)
        self.register_buffer("dist", (pos[None, :] - pos[:, None]).float())
        self.register_buffer("future", torch.ones(S, S, dtype=torch.bool).triu(1))

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        bias = (self.slopes[:, None, None] * self.dist).masked_fill(self.future, float("-inf"))
        return self.p.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=bias))


class BaddbmmLearnedBias(nn.Module):
    """Bloom-style: baddbmm(bias, q, k^T, beta=1, alpha=scale) with a learned (S, S) bias."""

    def __init__(self):
        super().__init__()
        self.p = Proj()
        self.bias = nn.Parameter(torch.randn(1, S, S) * 0.3)

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        q3, k3, v3 = (t.reshape(B * H, S, D) for t in (q, k, v))
        s = torch.baddbmm(self.bias, q3, k3.transpose(1, 2), beta=1.0, alpha=SCALE)
        return self.p.merge(torch.bmm(s.softmax(-1), v3).view(B, H, S, D))


class BaddbmmLearnedBiasBetaHalf(BaddbmmLearnedBias):
    def forward(self, x):
        q, k, v = self.p.qkv(x)
        q3, k3, v3 = (t.reshape(B * H, S, D) for t in (q, k, v))
        s = torch.baddbmm(
            self.bias.expand(B * H, S, S), q3, k3.transpose(1, 2), beta=0.5, alpha=SCALE
        )
        return self.p.merge(torch.bmm(s.softmax(-1), v3).view(B, H, S, D))


class BaddbmmBetaZeroIgnoresNanBias(nn.Module):
    """beta=0: the input tensor is ignored (even NaN in it); an additive-bias reading is wrong."""

    def __init__(self):
        super().__init__()
        self.p = Proj()
        b = torch.zeros(B * H, S, S)
        b[:, :, 0] = float("nan")
        self.register_buffer("junk", b)

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        q3, k3, v3 = (t.reshape(B * H, S, D) for t in (q, k, v))
        s = torch.baddbmm(self.junk, q3, k3.transpose(1, 2), beta=0.0, alpha=SCALE)
        return self.p.merge(torch.bmm(s.softmax(-1), v3).view(B, H, S, D))


class SdpaLearnedFloatMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = Proj()
        self.bias = nn.Parameter(torch.randn(H, S, S) * 0.5)

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        return self.p.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias))


class T5RelativeBucketBias(nn.Module):
    """T5: an Embedding of relative-position buckets gives a per-head bias; no scaling of the scores."""

    def __init__(self):
        super().__init__()
        self.p = Proj()
        self.rel = nn.Embedding(7, H)
        pos = torch.arange(S)
        self.register_buffer("bucket", (pos[None, :] - pos[:, None]).clamp(-3, 3) + 3)

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        bias = self.rel(self.bucket).permute(2, 0, 1).unsqueeze(0)
        scores = torch.matmul(q, k.transpose(3, 2)) + bias
        return self.p.merge(torch.matmul(F.softmax(scores.float(), dim=-1).type_as(scores), v))


class LearnedBiasPlusBoolMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = Proj()
        self.bias = nn.Parameter(torch.randn(1, H, 1, S) * 0.5)
        pad = torch.zeros(B, 1, 1, S, dtype=torch.bool)
        pad[1, ..., -2:] = True
        self.register_buffer("pad", pad)

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        s = (q @ k.transpose(-2, -1)) * SCALE + self.bias
        s = s.masked_fill(self.pad, torch.finfo(s.dtype).min)
        return self.p.merge(s.softmax(-1) @ v)


class LearnedBiasAddedBeforeScale(nn.Module):
    """(qk + bias) * scale: the bias is scaled too."""

    def __init__(self):
        super().__init__()
        self.p = Proj()
        self.bias = nn.Parameter(torch.randn(S, S))

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        s = (q @ k.transpose(-2, -1) + self.bias) * SCALE
        return self.p.merge(s.softmax(-1) @ v)


class LearnedBiasSubtracted(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = Proj()
        self.bias = nn.Parameter(torch.randn(H, 1, S))

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        s = q @ k.transpose(-2, -1) * SCALE - self.bias
        return self.p.merge(s.softmax(-1) @ v)


class LearnedMultiplicativeGate(nn.Module):
    """scores * learned per-key gate: not an additive bias (and not a constant scale)."""

    def __init__(self):
        super().__init__()
        self.p = Proj()
        self.gate = nn.Parameter(torch.rand(S) + 0.5)

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        s = q @ k.transpose(-2, -1) * SCALE * self.gate
        return self.p.merge(s.softmax(-1) @ v)


class LearnedPerHeadScaleParam(nn.Module):
    """Per-head learned scale (a Parameter), e.g. logit scale per head."""

    def __init__(self):
        super().__init__()
        self.p = Proj()
        self.head_scale = nn.Parameter(torch.tensor([0.3, 1.7]).view(1, H, 1, 1))

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        s = (q @ k.transpose(-2, -1)) * self.head_scale
        return self.p.merge(s.softmax(-1) @ v)


class BiasFromInputRequiringGrad(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = Proj()

    def forward(self, x, bias):
        q, k, v = self.p.qkv(x)
        return self.p.merge((q @ k.transpose(-2, -1) * SCALE + bias).softmax(-1) @ v)


PROGRAMS = [
    (SwinRelativeBias, 9),
    (SwinShiftedWindowMask, 9),
    (AlibiLearnedSlopes, S),
    (AlibiCausalLearnedSlopesSdpa, S),
    (BaddbmmLearnedBias, S),
    (BaddbmmLearnedBiasBetaHalf, S),
    (SdpaLearnedFloatMask, S),
    (T5RelativeBucketBias, S),
    (LearnedBiasPlusBoolMask, S),
    (LearnedBiasAddedBeforeScale, S),
    (LearnedBiasSubtracted, S),
    (LearnedMultiplicativeGate, S),
    (LearnedPerHeadScaleParam, S),
]


@pytest.mark.parametrize("cls, s", PROGRAMS, ids=[c.__name__ for c, _ in PROGRAMS])
def test_learned_bias_gradient_matches_eager(cls, s):
    torch.manual_seed(0)
    check(cls(), x_input(s=s), grad=True)


def test_baddbmm_beta_zero_ignores_its_input():
    torch.manual_seed(0)
    check(BaddbmmBetaZeroIgnoresNanBias(), x_input())


def test_bias_tensor_input_gets_its_gradient():
    torch.manual_seed(0)
    bias = torch.randn(B, H, S, S)
    check(BiasFromInputRequiringGrad(), x_input(), bias, grad=True)


def test_swin_table_gradient_is_nonzero_and_equal():
    torch.manual_seed(0)
    m = SwinRelativeBias()
    check(m, x_input(s=9), grad=True)
    assert m.table.grad is not None and m.table.grad.abs().sum() > 0
