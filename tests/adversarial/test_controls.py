"""Controls: ordinary attention in the spellings people write. Each must be rewritten (so the
adversarial neighbours elsewhere are really next to a rewritten site) and be numerically eager's,
outputs and gradients."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.adversarial._harness import B, Proj, S, assert_rewritten, check, x_input

H, D = 2, 8
SCALE = 1.0 / math.sqrt(D)


class Base(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.p = Proj(**kw)


class Sdpa(Base):
    def forward(self, x):
        return self.p.merge(F.scaled_dot_product_attention(*self.p.qkv(x)))


class SdpaCausalScaleKwarg(Base):
    def forward(self, x):
        q, k, v = self.p.qkv(x)
        return self.p.merge(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3))


class SdpaBoolMaskBuffer(Base):
    def __init__(self):
        super().__init__()
        keep = torch.ones(B, 1, 1, S, dtype=torch.bool)
        keep[1, ..., -3:] = False
        self.register_buffer("keep", keep)

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        return self.p.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=self.keep))


class SdpaEnableGqa(Base):
    def __init__(self):
        super().__init__(H=4, Hkv=2)

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        return self.p.merge(F.scaled_dot_product_attention(q, k, v, enable_gqa=True))


class Matmul(Base):
    def forward(self, x):
        q, k, v = self.p.qkv(x)
        return self.p.merge(
            torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * SCALE, -1), v)
        )


class MatmulMt(Base):
    def forward(self, x):
        q, k, v = self.p.qkv(x)
        return self.p.merge(F.softmax(q @ k.mT / math.sqrt(D), dim=3) @ v)


class MatmulPermuteKt(Base):
    """k projected straight into (B, H, D, S)."""

    def forward(self, x):
        b, s, _ = x.shape
        q = self.p.split(self.p.wq(x), H)
        kt = self.p.wk(x).view(b, s, H, D).permute(0, 2, 3, 1)
        v = self.p.split(self.p.wv(x), H)
        return self.p.merge((q @ kt * SCALE).softmax(-1) @ v)


class PrescaledQ(Base):
    def forward(self, x):
        q, k, v = self.p.qkv(x)
        q = q * SCALE
        return self.p.merge((q @ k.transpose(-2, -1)).softmax(-1) @ v)


class SplitScaleQK(Base):
    def forward(self, x):
        q, k, v = self.p.qkv(x)
        c = D**-0.25
        return self.p.merge(((q * c) @ (k * c).transpose(-2, -1)).softmax(-1) @ v)


class EinsumBHSD(Base):
    def forward(self, x):
        q, k, v = self.p.qkv(x)
        w = torch.einsum("bhid,bhjd->bhij", q, k) * SCALE
        return self.p.merge(torch.einsum("bhij,bhjd->bhid", w.softmax(-1), v))


class EinsumBSHD(Base):
    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (w(x).view(b, s, H, D) for w in (self.p.wq, self.p.wk, self.p.wv))
        w = torch.einsum("bqhd,bkhd->bhqk", q, k) * SCALE
        o = torch.einsum("bhqk,bkhd->bqhd", w.softmax(-1), v)
        return self.p.wo(o.reshape(b, s, H * D))


class Bmm(Base):
    def forward(self, x):
        q, k, v = (t.reshape(B * H, S, D) for t in self.p.qkv(x))
        w = torch.bmm(q, k.transpose(1, 2)) * SCALE
        return self.p.merge(torch.bmm(w.softmax(-1), v).view(B, H, S, D))


class BaddbmmZeroBias(Base):
    def forward(self, x):
        q, k, v = (t.reshape(B * H, S, D) for t in self.p.qkv(x))
        w = torch.baddbmm(torch.zeros(B * H, S, S), q, k.transpose(1, 2), beta=0.0, alpha=SCALE)
        return self.p.merge(torch.bmm(w.softmax(-1), v).view(B, H, S, D))


class CausalTrilBuffer(Base):
    """GPT-2 style: a registered lower-triangular bool buffer and torch.where with finfo.min."""

    def __init__(self):
        super().__init__()
        self.register_buffer(
            "bias", torch.tril(torch.ones(S, S, dtype=torch.bool)).view(1, 1, S, S)
        )

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        w = torch.matmul(q, k.transpose(-1, -2)) / (v.size(-1) ** 0.5)
        w = torch.where(self.bias[:, :, :S, :S], w, torch.tensor(torch.finfo(w.dtype).min))
        return self.p.merge(F.softmax(w, dim=-1) @ v)


class KeyPaddingMaskedFill(Base):
    def forward(self, x, pad):
        q, k, v = self.p.qkv(x)
        w = (q @ k.transpose(-2, -1) * SCALE).masked_fill(pad[:, None, None, :], float("-inf"))
        return self.p.merge(w.softmax(-1) @ v)


class HFAdditiveMask(Base):
    def forward(self, x, attention_mask):
        q, k, v = self.p.qkv(x)
        ext = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        w = q @ k.transpose(-2, -1) * SCALE + ext
        return self.p.merge(w.softmax(-1) @ v)


class GqaRepeatInterleave(Base):
    def __init__(self):
        super().__init__(H=4, Hkv=2)

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        return self.p.merge((q @ k.transpose(-2, -1) * SCALE).softmax(-1) @ v)


class GqaHFExpand(Base):
    def __init__(self):
        super().__init__(H=4, Hkv=2)

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        b, hk, s, d = k.shape
        k = k[:, :, None].expand(b, hk, 2, s, d).reshape(b, hk * 2, s, d)
        v = v[:, :, None].expand(b, hk, 2, s, d).reshape(b, hk * 2, s, d)
        return self.p.merge(F.scaled_dot_product_attention(q, k, v))


class MqaBroadcast(Base):
    def __init__(self):
        super().__init__(H=4, Hkv=1)

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        return self.p.merge((q @ k.transpose(-2, -1) * SCALE).softmax(-1) @ v)


class CrossAttention(Base):
    def forward(self, x, ctx):
        q, k, v = self.p.qkv(x, ctx)
        return self.p.merge((q @ k.transpose(-2, -1) * SCALE).softmax(-1) @ v)


class CrossAttentionSdpaMask(Base):
    def forward(self, x, ctx, ctx_keep):
        q, k, v = self.p.qkv(x, ctx)
        return self.p.merge(
            F.scaled_dot_product_attention(q, k, v, attn_mask=ctx_keep[:, None, None, :])
        )


class SoftmaxModule(Base):
    def __init__(self):
        super().__init__()
        self.sm = nn.Softmax(dim=-1)

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        return self.p.merge(self.sm(q @ k.transpose(-2, -1) * SCALE) @ v)


class EvalDropout(Base):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.eval()

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        return self.p.merge(self.drop((q @ k.transpose(-2, -1) * SCALE).softmax(-1)) @ v)


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Sdpa(), Matmul()])

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def pad_mask():
    m = torch.zeros(B, S, dtype=torch.bool)
    m[1, -3:] = True
    return m


CONTROLS = {
    "sdpa": (Sdpa, lambda: (x_input(),), 1),
    "sdpa_causal_scale_kwarg": (SdpaCausalScaleKwarg, lambda: (x_input(),), 1),
    "sdpa_bool_mask_buffer": (SdpaBoolMaskBuffer, lambda: (x_input(),), 1),
    "sdpa_enable_gqa": (SdpaEnableGqa, lambda: (x_input(),), 1),
    "matmul": (Matmul, lambda: (x_input(),), 1),
    "matmul_mT": (MatmulMt, lambda: (x_input(),), 1),
    "matmul_permuted_kt": (MatmulPermuteKt, lambda: (x_input(),), 1),
    "prescaled_q": (PrescaledQ, lambda: (x_input(),), 1),
    "split_scale_qk": (SplitScaleQK, lambda: (x_input(),), 1),
    "einsum_bhsd": (EinsumBHSD, lambda: (x_input(),), 1),
    "einsum_bshd": (EinsumBSHD, lambda: (x_input(),), 1),
    "bmm": (Bmm, lambda: (x_input(),), 1),
    "baddbmm_zero_bias": (BaddbmmZeroBias, lambda: (x_input(),), 1),
    "causal_tril_buffer_where": (CausalTrilBuffer, lambda: (x_input(),), 1),
    "key_padding_masked_fill": (KeyPaddingMaskedFill, lambda: (x_input(), pad_mask()), 1),
    "hf_additive_mask": (HFAdditiveMask, lambda: (x_input(), (~pad_mask()).long()), 1),
    "gqa_repeat_interleave": (GqaRepeatInterleave, lambda: (x_input(),), 1),
    "gqa_hf_expand": (GqaHFExpand, lambda: (x_input(),), 1),
    "mqa_broadcast": (MqaBroadcast, lambda: (x_input(),), 1),
    "cross_attention": (CrossAttention, lambda: (x_input(), x_input(s=5, seed=3)), 1),
    "cross_attention_sdpa_mask": (
        CrossAttentionSdpaMask,
        lambda: (
            x_input(),
            x_input(s=5, seed=3),
            torch.tensor([[True] * 5, [True, True, False, False, False]]),
        ),
        1,
    ),
    "softmax_module": (SoftmaxModule, lambda: (x_input(),), 1),
    "eval_dropout": (EvalDropout, lambda: (x_input(),), 1),
    "two_layers": (TwoLayers, lambda: (x_input(),), 2),
}


@pytest.mark.parametrize("name", list(CONTROLS))
def test_ordinary_attention_is_rewritten_and_matches_eager(name):
    cls, args, n = CONTROLS[name]
    torch.manual_seed(0)
    _, rep, _ = check(cls(), *args())
    assert_rewritten(rep, n)


@pytest.mark.parametrize(
    "name",
    [
        "sdpa",
        "matmul",
        "einsum_bshd",
        "bmm",
        "gqa_hf_expand",
        "hf_additive_mask",
        "causal_tril_buffer_where",
        "cross_attention",
    ],
)
def test_ordinary_attention_gradients_match_eager(name):
    cls, args, n = CONTROLS[name]
    torch.manual_seed(0)
    _, rep, _ = check(cls(), *args(), grad=True)
    assert_rewritten(rep, n)


def test_compile_does_not_touch_the_user_model():
    """compile() and running leave the user's module object as it was (checked inside check), and
    the eval/train flag, hooks and state_dict keys too."""
    torch.manual_seed(0)
    m = TwoLayers()
    hooks_before = dict(m._forward_hooks), dict(m._forward_pre_hooks)
    keys = list(m.state_dict())
    check(m, x_input(), calls=2)
    assert (dict(m._forward_hooks), dict(m._forward_pre_hooks)) == hooks_before
    assert list(m.state_dict()) == keys
    assert type(m) is TwoLayers
