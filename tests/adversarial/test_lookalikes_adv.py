"""Class 8: look-alikes: programs with a softmax and matmuls around it that are not plain attention
(or are attention only in a form a careless matcher would mis-read). Whatever the pass does with them,
the numbers must be eager's."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.adversarial._harness import B, E, Fn, Proj, check, x_input

H, S, D = 2, 8, 8  # S == D on purpose: a transposed operand still has the right shape
SCALE = 1.0 / math.sqrt(D)


def qkv(seed=0, b=B, h=H, s=S, d=D, skv=None):
    g = torch.Generator().manual_seed(seed)
    skv = skv or s
    return (
        torch.randn(b, h, s, d, generator=g),
        torch.randn(b, h, skv, d, generator=g),
        torch.randn(b, h, skv, d, generator=g),
    )


def scores(q, k):
    return q @ k.transpose(-2, -1) * SCALE


# --- function look-alikes over (q, k, v)


def tanh_softcap(q, k, v):
    cap = 5.0
    s = scores(q, k)
    return (cap * torch.tanh(s / cap)).softmax(-1) @ v


def tanh_softcap_then_causal(q, k, v):
    s = 2.0 * torch.tanh(scores(q, k) * 4.0 / 2.0)
    s = s.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ v


def clamp_logits(q, k, v):
    return scores(q, k).clamp(-0.5, 0.5).softmax(-1) @ v


def renormalised_after_mask(q, k, v, keep):
    p = scores(q, k).softmax(-1) * keep
    p = p / p.sum(-1, keepdim=True)
    return p @ v


def post_softmax_mask(q, k, v, keep):
    return (scores(q, k).softmax(-1) * keep) @ v


def weights_returned(q, k, v):
    p = scores(q, k).softmax(-1)
    return p @ v, p


def scores_returned(q, k, v):
    s = scores(q, k)
    return s.softmax(-1) @ v, s


def softmax_over_query_axis(q, k, v):
    return scores(q, k).softmax(-2) @ v


def softmax_dim2_of_4d(q, k, v):
    return torch.softmax(scores(q, k), dim=2) @ v


def max_shift_key_axis(q, k, v):
    s = scores(q, k)
    return (s - s.amax(-1, keepdim=True)).softmax(-1) @ v


def max_shift_query_axis(q, k, v):
    s = scores(q, k)
    return (s - s.amax(-2, keepdim=True)).softmax(-1) @ v


def mean_shift_query_axis(q, k, v):
    s = scores(q, k)
    return (s - s.mean(-2, keepdim=True) * 3.0).softmax(-1) @ v


def scores_reused_twice(q, k, v):
    s = scores(q, k)
    return s.softmax(-1) @ v + (s * 2.0).softmax(-1) @ v


def scores_reused_in_output(q, k, v):
    s = scores(q, k)
    return s.softmax(-1) @ v + s.mean(-1, keepdim=True)


def weights_reused_for_two_values(q, k, v):
    p = scores(q, k).softmax(-1)
    return p @ v + p @ (v * v)


def log_softmax_weights(q, k, v):
    return scores(q, k).log_softmax(-1) @ v


def exp_of_log_softmax(q, k, v):
    return scores(q, k).log_softmax(-1).exp() @ v


def squared_relu_attention(q, k, v):
    p = F.relu(scores(q, k)) ** 2
    return p / (p.sum(-1, keepdim=True) + 1e-6) @ v


def sigmoid_attention(q, k, v):
    return torch.sigmoid(scores(q, k) - math.log(S)) @ v


def sharpened_weights(q, k, v):
    return scores(q, k).softmax(-1).pow(2) @ v


def weights_scaled_after(q, k, v):
    return (scores(q, k).softmax(-1) * 2.0) @ v


def weights_plus_identity(q, k, v):
    return ((scores(q, k).softmax(-1) + torch.eye(S)) / 2) @ v


def transposed_weights(q, k, v):
    return scores(q, k).softmax(-1).transpose(-2, -1) @ v


def values_on_the_left(q, k, v):
    return (v.transpose(-2, -1) @ scores(q, k).softmax(-1)).transpose(-2, -1)


def no_transpose_q_at_k(q, k, v):
    """q @ k with S == D: shape-valid, but it is not q @ k^T."""
    return (q @ k * SCALE).softmax(-1) @ v


def values_transposed(q, k, v):
    return scores(q, k).softmax(-1) @ v.transpose(-2, -1)


def k_transposed_twice(q, k, v):
    return (q @ k.transpose(-2, -1).transpose(-2, -1) * SCALE).softmax(-1) @ v


def einsum_output_swapped(q, k, v):
    s = torch.einsum("bhqd,bhkd->bhkq", q, k) * SCALE
    return s.softmax(-1) @ v


def einsum_sum_over_heads(q, k, v):
    s = torch.einsum("bhqd,bjkd->bhqk", q, k) * SCALE
    return s.softmax(-1) @ v


def einsum_value_wrong_axis(q, k, v):
    p = torch.einsum("bhqd,bhkd->bhqk", q, k).mul(SCALE).softmax(-1)
    return torch.einsum("bhqk,bhdk->bhqd", p, v)  # contracts v's feature axis with the keys


def linear_attention_feature_softmax(q, k, v):
    return q.softmax(-1) @ (k.softmax(-2).transpose(-2, -1) @ v)


def talking_heads_pre_softmax(q, k, v, mix):
    s = torch.einsum("bhqk,hg->bgqk", scores(q, k), mix)
    return s.softmax(-1) @ v


def talking_heads_post_softmax(q, k, v, mix):
    p = torch.einsum("bhqk,hg->bgqk", scores(q, k).softmax(-1), mix)
    return p @ v


def triu2_not_causal(q, k, v):
    m = torch.ones(S, S, dtype=torch.bool).triu(2)  # lets each query see one future key
    return scores(q, k).masked_fill(m, float("-inf")).softmax(-1) @ v


def tril_minus1_mask(q, k, v):
    keep = torch.ones(S, S, dtype=torch.bool).tril(-1)  # strictly past: row 0 sees nothing
    keep[0, 0] = True
    return scores(q, k).masked_fill(~keep, float("-inf")).softmax(-1) @ v


def anti_causal(q, k, v):
    m = torch.ones(S, S, dtype=torch.bool).tril(-1)
    return scores(q, k).masked_fill(m, float("-inf")).softmax(-1) @ v


def causal_bottom_right_cross(q, k, v):
    """Sq=4 < Skv=8; the mask aligned to the bottom right (decode with a KV prefix)."""
    sq, skv = q.shape[-2], k.shape[-2]
    keep = torch.ones(sq, skv, dtype=torch.bool).tril(skv - sq)
    return scores(q, k).masked_fill(~keep, float("-inf")).softmax(-1) @ v


def causal_top_left_cross(q, k, v):
    sq, skv = q.shape[-2], k.shape[-2]
    keep = torch.ones(sq, skv, dtype=torch.bool).tril()
    return scores(q, k).masked_fill(~keep, float("-inf")).softmax(-1) @ v


def sdpa_is_causal_cross(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def mask_from_scores_themselves(q, k, v):
    s = scores(q, k)
    return s.masked_fill(s < 0, float("-inf")).softmax(-1).nan_to_num(0.0) @ v


def topk_sparsified(q, k, v):
    s = scores(q, k)
    thr = s.topk(3, dim=-1).values[..., -1:]
    return s.masked_fill(s < thr, float("-inf")).softmax(-1) @ v


def where_other_is_not_constant(q, k, v, m):
    s = scores(q, k)
    return torch.where(m, s, -s).softmax(-1) @ v


def where_polarity_inverted(q, k, v, m):
    s = scores(q, k)
    return torch.where(m, float("-inf"), s).softmax(-1) @ v


def negative_scale(q, k, v):
    return (q @ k.transpose(-2, -1) * -0.7).softmax(-1) @ v


def zero_scale(q, k, v):
    return (q @ k.transpose(-2, -1) * 0.0).softmax(-1) @ v


def scale_on_values(q, k, v):
    return scores(q, k).softmax(-1) @ (v * 3.0)


def mask_on_values(q, k, v, keep):
    return scores(q, k).softmax(-1) @ (v * keep[..., :1, :].transpose(-2, -1))


def softmax_of_sum_with_other_scores(q, k, v):
    return (scores(q, k) + scores(v, q)).softmax(-1) @ v


def manual_stable_softmax(q, k, v):
    s = scores(q, k)
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return (e / e.sum(-1, keepdim=True)) @ v


def manual_softmax_wrong_axis_norm(q, k, v):
    e = torch.exp(scores(q, k))
    return (e / e.sum(-2, keepdim=True)) @ v


def gqa_repeat_not_interleave(q, k, v):
    """repeat tiles kv heads (head h uses kv h % Hkv), unlike repeat_interleave (h // n_rep)."""
    k2, v2 = k[:, :2], v[:, :2]
    return F.scaled_dot_product_attention(q, k2.repeat(1, 2, 1, 1), v2.repeat(1, 2, 1, 1))


def gqa_expand_outer_reshape(q, k, v):
    kk, vv = k[:, :2], v[:, :2]
    b, hk, s, d = kk.shape
    kk = kk[:, None].expand(b, 2, hk, s, d).reshape(b, 2 * hk, s, d)
    vv = vv[:, None].expand(b, 2, hk, s, d).reshape(b, 2 * hk, s, d)
    return (q @ kk.transpose(-2, -1) * SCALE).softmax(-1) @ vv


def gqa_k_interleave_v_repeat(q, k, v):
    kk = k[:, :2].repeat_interleave(2, dim=1)
    vv = v[:, :2].repeat(1, 2, 1, 1)
    return (q @ kk.transpose(-2, -1) * SCALE).softmax(-1) @ vv


def heads_axis_attention(q, k, v):
    """Attention across heads: (B, S, H, D) tensors multiplied directly (sequence = heads)."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    return (qt @ kt.transpose(-2, -1) * SCALE).softmax(-1) @ vt


def softmax_then_topk_gather(q, k, v):
    p = scores(q, k).softmax(-1)
    return p.topk(2, dim=-1).values.sum(-1, keepdim=True) * (p @ v)


KEEP = (torch.rand(B, 1, S, S, generator=torch.Generator().manual_seed(21)) > 0.4).float()
KEEP[..., 0] = 1.0
BOOLM = torch.rand(B, 1, S, S, generator=torch.Generator().manual_seed(22)) > 0.5
BOOLM[..., 0] = False
MIX = torch.randn(H, H, generator=torch.Generator().manual_seed(23))


def _args(fn):
    q, k, v = qkv()
    if fn in (causal_bottom_right_cross, causal_top_left_cross, sdpa_is_causal_cross):
        q = q[..., :4, :]
    if fn in (gqa_repeat_not_interleave, gqa_expand_outer_reshape, gqa_k_interleave_v_repeat):
        q, k, v = qkv(h=4)
    extra = {
        renormalised_after_mask: (KEEP,),
        post_softmax_mask: (KEEP,),
        mask_on_values: (KEEP,),
        talking_heads_pre_softmax: (MIX,),
        talking_heads_post_softmax: (MIX,),
        where_other_is_not_constant: (BOOLM,),
        where_polarity_inverted: (BOOLM,),
    }.get(fn, ())
    return (q, k, v) + extra


FUNCS = [
    tanh_softcap,
    tanh_softcap_then_causal,
    clamp_logits,
    renormalised_after_mask,
    post_softmax_mask,
    weights_returned,
    scores_returned,
    softmax_over_query_axis,
    softmax_dim2_of_4d,
    max_shift_key_axis,
    max_shift_query_axis,
    mean_shift_query_axis,
    scores_reused_twice,
    scores_reused_in_output,
    weights_reused_for_two_values,
    log_softmax_weights,
    exp_of_log_softmax,
    squared_relu_attention,
    sigmoid_attention,
    sharpened_weights,
    weights_scaled_after,
    weights_plus_identity,
    transposed_weights,
    values_on_the_left,
    no_transpose_q_at_k,
    values_transposed,
    k_transposed_twice,
    einsum_output_swapped,
    einsum_sum_over_heads,
    einsum_value_wrong_axis,
    linear_attention_feature_softmax,
    talking_heads_pre_softmax,
    talking_heads_post_softmax,
    triu2_not_causal,
    tril_minus1_mask,
    anti_causal,
    causal_bottom_right_cross,
    causal_top_left_cross,
    sdpa_is_causal_cross,
    mask_from_scores_themselves,
    topk_sparsified,
    where_other_is_not_constant,
    where_polarity_inverted,
    negative_scale,
    zero_scale,
    scale_on_values,
    mask_on_values,
    softmax_of_sum_with_other_scores,
    manual_stable_softmax,
    manual_softmax_wrong_axis_norm,
    gqa_repeat_not_interleave,
    gqa_expand_outer_reshape,
    gqa_k_interleave_v_repeat,
    heads_axis_attention,
    softmax_then_topk_gather,
]


@pytest.mark.parametrize("fn", FUNCS, ids=lambda f: f.__name__)
def test_lookalike_is_numerically_unchanged(fn):
    check(Fn(fn), *_args(fn))


# --- module look-alikes with parameters (gradients checked)


class AttentionSinks(nn.Module):
    """A learned logit column per head is concatenated, softmaxed with the keys, then dropped."""

    def __init__(self):
        super().__init__()
        self.p = Proj(E=E, H=H, D=D)
        self.sink = nn.Parameter(torch.tensor([1.5, -0.5]))

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        s = q @ k.transpose(-2, -1) * SCALE
        col = self.sink.view(1, H, 1, 1).expand(s.shape[0], H, s.shape[2], 1)
        p = torch.cat([s, col], dim=-1).softmax(-1)[..., :-1]
        return self.p.merge(p @ v)


class AttentionSinksMaxShifted(AttentionSinks):
    """gpt-oss spelling: the max over keys and sink subtracted before softmax."""

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        s = torch.einsum("bhqd,bhkd->bhqk", q, k) * SCALE
        col = self.sink.reshape(1, -1, 1, 1).expand(s.shape[0], -1, s.shape[-2], -1)
        s = torch.cat([s, col], dim=-1)
        s = s - s.max(dim=-1, keepdim=True).values
        w = torch.softmax(s, dim=-1)[..., :-1]
        return self.p.merge(torch.einsum("bhqk,bhkd->bhqd", w, v))


class CosineAttentionLearnedTemperature(nn.Module):
    """Swin-v2: normalize q, k; scale by exp(logit_scale) clamped."""

    def __init__(self):
        super().__init__()
        self.p = Proj(E=E, H=H, D=D)
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(H, 1, 1)))

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        return self.p.merge(attn.softmax(-1) @ v)


class TemperatureParameterScalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = Proj(E=E, H=H, D=D)
        self.temp = nn.Parameter(torch.tensor(0.6))

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        return self.p.merge(((q @ k.transpose(-2, -1)) / self.temp).softmax(-1) @ v)


class MoERouter(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(E, 4, bias=False)
        self.experts = nn.Parameter(torch.randn(4, E, E) * 0.2)

    def forward(self, x):
        probs = self.gate(x).softmax(-1)  # (B, S, 4)
        top, idx = probs.topk(2, dim=-1)
        top = top / top.sum(-1, keepdim=True)
        ys = torch.einsum("bsd,edf->bsef", x, self.experts)
        picked = torch.gather(ys, 2, idx[..., None].expand(-1, -1, -1, E))
        return (top[..., None] * picked).sum(2)


class RouterDense(nn.Module):
    """A softmax over experts then a matmul with a parameter: product of a softmax with values,
    learned keys (a Perceiver-like reading is fine if its numbers are right)."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(E, 4, bias=False)
        self.table = nn.Parameter(torch.randn(4, E))

    def forward(self, x):
        return self.gate(x).softmax(-1) @ self.table


class TalkingHeadsModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = Proj(E=E, H=H, D=D)
        self.pre = nn.Parameter(torch.eye(H) + 0.3 * torch.randn(H, H))

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        s = torch.einsum("bhqk,hg->bgqk", q @ k.transpose(-2, -1) * SCALE, self.pre)
        return self.p.merge(s.softmax(-1) @ v)


class SoftcapModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = Proj(E=E, H=H, D=D)
        self.cap = 3.0

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        s = (q @ k.transpose(-2, -1)) * SCALE
        s = torch.tanh(s / self.cap) * self.cap
        return self.p.merge(s.softmax(-1) @ v)


MODULES = [
    AttentionSinks,
    AttentionSinksMaxShifted,
    CosineAttentionLearnedTemperature,
    TemperatureParameterScalar,
    MoERouter,
    RouterDense,
    TalkingHeadsModule,
    SoftcapModule,
]


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_lookalike_module_outputs_and_gradients_unchanged(cls):
    torch.manual_seed(0)
    check(cls(), x_input(s=S), grad=True)


def test_temperature_as_tensor_input():
    q, k, v = qkv()
    check(
        Fn(lambda q, k, v, t: ((q @ k.transpose(-2, -1)) * t).softmax(-1) @ v),
        q,
        k,
        v,
        torch.tensor(0.37),
    )


def test_temperature_tensor_per_head_input():
    q, k, v = qkv()
    t = torch.tensor([0.2, 3.0]).view(1, H, 1, 1)
    check(Fn(lambda q, k, v, t: ((q @ k.transpose(-2, -1)) * t).softmax(-1) @ v), q, k, v, t)
