"""Attacks beyond the listed classes: replacement vs additive masking of garbage keys, float64
attention, `out=` score matmuls into buffers, NaN fix-ups after the softmax, 5-D GQA by broadcasting,
broadcast queries, fused-qkv chunks, bottom-right causal masks with more queries than keys, and a
module attribute (the scale) changed between calls."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.adversarial._harness import B, E, Fn, Proj, S, assert_same_tensor, check, x_input

H, D = 2, 8
SCALE = 1.0 / math.sqrt(D)


def qkv(seed=0, b=B, h=H, s=S, d=D, skv=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    skv = skv or s
    return (
        torch.randn(b, h, s, d, generator=g).to(dtype),
        torch.randn(b, h, skv, d, generator=g).to(dtype),
        torch.randn(b, h, skv, d, generator=g).to(dtype),
    )


# --- masked_fill / where *replace* the masked scores; an additive -inf mask does not: NaN or inf
# garbage in padded key slots (an uninitialised KV cache) is harmless in eager


def garbage_keys(kind):
    q, k, v = qkv(1)
    pad = torch.zeros(B, 1, 1, S, dtype=torch.bool)
    pad[..., -2:] = True
    k = k.clone()
    k[:, :, -2:] = float("nan") if kind == "nan" else (float("inf") if kind == "inf" else 1e30)
    return q, k, v, pad


def masked_fill_garbage(q, k, v, pad):
    return (q @ k.transpose(-2, -1) * SCALE).masked_fill(pad, float("-inf")).softmax(-1) @ v


def where_garbage(q, k, v, pad):
    s = q @ k.transpose(-2, -1) * SCALE
    return torch.where(pad, torch.finfo(s.dtype).min, s).softmax(-1) @ v


def masked_fill_finfo_garbage(q, k, v, pad):
    s = q @ k.transpose(-2, -1) * SCALE
    return s.masked_fill(pad, torch.finfo(s.dtype).min).softmax(-1) @ v


@pytest.mark.parametrize("kind", ["nan", "inf", "huge"])
@pytest.mark.parametrize(
    "fn", [masked_fill_garbage, where_garbage, masked_fill_finfo_garbage], ids=lambda f: f.__name__
)
def test_replacement_mask_over_garbage_key_slots(fn, kind):
    q, k, v, pad = garbage_keys(kind)
    _, _, [(_out_c, out_e)] = check(Fn(fn), q, k, v, pad)
    assert torch.isfinite(out_e).all(), "test premise: eager's replacement hides the garbage"


# --- float64 attention must stay float64-accurate


def f64_sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double())


def f64_hand(q, k, v):
    q, k, v = q.double(), k.double(), v.double()
    return (q @ k.transpose(-2, -1) * SCALE).softmax(-1) @ v


def f64_softmax_dtype(q, k, v):
    p = (q @ k.transpose(-2, -1) * SCALE).softmax(-1, dtype=torch.float64)
    return p @ v.double()


@pytest.mark.parametrize("fn", [f64_sdpa, f64_hand, f64_softmax_dtype], ids=lambda f: f.__name__)
def test_float64_attention_is_float64_accurate(fn):
    q, k, v = qkv(2, s=16, d=16)
    _, _, [(out_c, out_e)] = check(Fn(fn), q, k, v)
    assert out_c.dtype == torch.float64
    err = (out_c - out_e).abs().max().item()
    if (
        fn is f64_softmax_dtype
    ):  # scores are fp32 here; the softmax and the value product are float64
        assert err < 1e-6, f"compiled differs from eager by {err:.2e}"
    else:
        assert err < 1e-12, (
            f"compiled differs from eager's float64 result by {err:.2e} (fp32-sized)"
        )


# --- out= score matmul into a buffer


class BmmOutIntoScratch(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = Proj()
        self.register_buffer("scratch", torch.zeros(B * H, S, S))

    def forward(self, x):
        q, k, v = (t.reshape(B * H, S, D) for t in self.p.qkv(x))
        torch.bmm(q, k.transpose(1, 2), out=self.scratch)
        p = (self.scratch * SCALE).softmax(-1)
        return self.p.merge(torch.bmm(p, v).view(B, H, S, D))


def test_score_matmul_with_out_buffer_keeps_the_buffer_written():
    torch.manual_seed(0)
    check(BmmOutIntoScratch(), x_input(), calls=2)


# --- NaN fix-ups after the softmax of fully masked rows


def nan_to_num_after_softmax(q, k, v, m):
    p = (q @ k.transpose(-2, -1) * SCALE).masked_fill(m, float("-inf")).softmax(-1)
    return torch.nan_to_num(p) @ v


def zero_fully_masked_rows(q, k, v, m):
    p = (q @ k.transpose(-2, -1) * SCALE).masked_fill(m, float("-inf")).softmax(-1)
    p = p.masked_fill(m.all(-1, keepdim=True), 0.0)
    return p @ v


def output_nan_to_num(q, k, v, m):
    o = (q @ k.transpose(-2, -1) * SCALE).masked_fill(m, float("-inf")).softmax(-1) @ v
    return torch.nan_to_num(o, nan=-7.0)


def output_isnan_where(q, k, v, m):
    o = (q @ k.transpose(-2, -1) * SCALE).masked_fill(m, float("-inf")).softmax(-1) @ v
    return torch.where(torch.isnan(o), torch.full_like(o, 3.0), o)


@pytest.mark.parametrize(
    "fn",
    [nan_to_num_after_softmax, zero_fully_masked_rows, output_nan_to_num, output_isnan_where],
    ids=lambda f: f.__name__,
)
def test_nan_fixup_of_fully_masked_rows(fn):
    q, k, v = qkv(3)
    m = torch.rand(B, 1, S, S, generator=torch.Generator().manual_seed(4)) > 0.5
    m[0, 0, 2] = True
    m[1, 0, 7] = True
    check(Fn(fn), q, k, v, m)


# --- shapes by broadcasting


def gqa_5d_broadcast(q, k, v):
    """q (B, Hkv, G, S, D) against k, v (B, Hkv, 1, S, D)."""
    q5 = q.view(B, 2, 2, S, D)
    k5, v5 = k[:, :2, None], v[:, :2, None]
    o = (q5 @ k5.transpose(-2, -1) * SCALE).softmax(-1) @ v5
    return o.reshape(B, 4, S, D)


def broadcast_query(q, k, v):
    """One learned-like query set shared by the batch: q (1, H, S, D)."""
    return (q[:1] @ k.transpose(-2, -1) * SCALE).softmax(-1) @ v


def broadcast_values(q, k, v):
    return (q @ k.transpose(-2, -1) * SCALE).softmax(-1) @ v[:, :1]


def three_d_no_heads(q, k, v):
    q3, k3, v3 = q[:, 0], k[:, 0], v[:, 0]
    return (q3 @ k3.transpose(-2, -1) * SCALE).softmax(-1) @ v3


def decode_single_query(q, k, v):
    return F.scaled_dot_product_attention(q[..., -1:, :], k, v)


def causal_bottom_right_more_queries(q, k, v):
    """Sq = 8 > Skv = 4, mask aligned bottom right: the first 4 queries see no key (NaN rows)."""
    sq, skv = q.shape[-2], k.shape[-2]
    keep = torch.ones(sq, skv, dtype=torch.bool).tril(skv - sq)
    return (q @ k.transpose(-2, -1) * SCALE).masked_fill(~keep, float("-inf")).softmax(-1) @ v


def sdpa_causal_more_queries(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def einsum_weights_contract_queries(q, k, v):
    p = torch.einsum("bhqd,bhkd->bhqk", q, k).mul(SCALE).softmax(-1)
    return torch.einsum("bhqk,bhqd->bhkd", p, v)


CASES = {
    "gqa_5d_broadcast": (gqa_5d_broadcast, lambda: qkv(5, h=4)),
    "broadcast_query": (broadcast_query, lambda: qkv(6)),
    "broadcast_values": (broadcast_values, lambda: qkv(7)),
    "three_d_no_heads": (three_d_no_heads, lambda: qkv(8)),
    "decode_single_query": (decode_single_query, lambda: qkv(9)),
    "causal_bottom_right_more_queries": (causal_bottom_right_more_queries, lambda: qkv(10, skv=4)),
    "sdpa_causal_more_queries": (sdpa_causal_more_queries, lambda: qkv(11, skv=4)),
    "einsum_weights_contract_queries": (einsum_weights_contract_queries, lambda: qkv(12)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_broadcast_and_alignment_shapes_match_eager(name):
    fn, args = CASES[name]
    check(Fn(fn), *args())


# --- fused qkv projections, strided q/k/v


class FusedQkvChunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(E, 3 * H * D)
        self.o = nn.Linear(H * D, E)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        o = (q @ k.transpose(-2, -1) * SCALE).softmax(-1) @ v
        return self.o(o.transpose(1, 2).reshape(b, s, H * D))


class FusedQkvChunkSdpaMutatedSlice(nn.Module):
    """q, k, v are slices of one tensor; an in-place op on the k slice after the attention writes
    into the storage the (already computed) attention read."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(E, 3 * H * D)

    def forward(self, x):
        b, s, _ = x.shape
        fused = self.qkv(x)
        q, k, v = (t.view(b, s, H, D).transpose(1, 2) for t in fused.chunk(3, dim=-1))
        o = F.scaled_dot_product_attention(q, k, v)
        k.mul_(0.0)
        return o, fused


def test_fused_qkv_projection_matches_eager_with_gradients():
    torch.manual_seed(0)
    check(FusedQkvChunk(), x_input(), grad=True)


def test_fused_qkv_slice_mutated_after_attention():
    torch.manual_seed(0)
    check(FusedQkvChunkSdpaMutatedSlice(), x_input())


# --- an attribute the graph depends on changes between calls


class ScaleAttribute(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = Proj()
        self.scale = 0.35

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        return self.p.merge((q @ k.transpose(-2, -1) * self.scale).softmax(-1) @ v)


def test_scale_attribute_changed_between_calls_is_honoured():
    import copy

    import fv_compile

    torch.manual_seed(0)
    m = ScaleAttribute()
    twin = copy.deepcopy(m)
    cm = fv_compile.compile(m, attention_backend="TORCH_SDPA", compiler="eager")
    x = x_input()
    with torch.no_grad():
        assert_same_tensor(cm(x), twin(x), "first scale")
        m.scale = twin.scale = 2.5
        assert_same_tensor(cm(x), twin(x), "after changing the scale attribute")


# --- in-place manual softmax


def manual_softmax_inplace(q, k, v):
    s = q @ k.transpose(-2, -1) * SCALE
    s.sub_(s.amax(-1, keepdim=True)).exp_()
    s.div_(s.sum(-1, keepdim=True))
    return s @ v


def test_inplace_manual_softmax_matches_eager():
    check(Fn(manual_softmax_inplace), *qkv(13))
