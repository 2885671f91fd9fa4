"""Classes 4 and 5: fully masked rows, and fills judged before a later scale.

Eager's hand-written attention gives NaN on a row whose every key is filled with -inf, a uniform
average of v on a row filled with one finite value (finfo.min, -1e9, -1e4 via masked_fill), and
plain softmax attention on a row where a small additive -1e4 keeps the scores' differences; SDPA
with a boolean or -inf mask gives 0 on such a row. The rewritten graph must reproduce each exactly:
NaN where eager is NaN, nowhere else, and eager's values elsewhere."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.adversarial._harness import B, S, assert_same_tensor, check

H, D = 2, 8
SCALE = 1.0 / math.sqrt(D)
NEG_INF = float("-inf")

FILLS = {"neginf": NEG_INF, "finfo_min": "finfo_min", "m1e4": -1e4, "m1e9": -1e9}


def fill_value(fill, dtype):
    return torch.finfo(dtype).min if fill == "finfo_min" else fill


class MaskedAttention(nn.Module):
    """`masked` (bool, True = masked) applied with one spelling and one fill."""

    def __init__(self, spelling, fill):
        super().__init__()
        self.spelling, self.fill = spelling, fill

    def forward(self, q, k, v, masked):
        f = fill_value(self.fill, q.dtype)
        s = q @ k.transpose(-2, -1) * SCALE
        if self.spelling == "masked_fill":
            s = s.masked_fill(masked, f)
        elif self.spelling == "where_keep":
            s = torch.where(~masked, s, f)
        elif self.spelling == "where_masked":
            s = torch.where(masked, torch.full_like(s, f), s)
        elif self.spelling == "additive_keep":  # HF: (1 - keep) * fill
            s = s + (1.0 - (~masked).to(s.dtype)) * f
        elif self.spelling == "additive_prebuilt":
            s = s + torch.zeros(masked.shape, dtype=s.dtype).masked_fill(masked, f)
        else:
            raise AssertionError(self.spelling)
        return torch.softmax(s, dim=-1) @ v


class SdpaBoolMask(nn.Module):
    def forward(self, q, k, v, masked):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=~masked)


class SdpaFloatMask(nn.Module):
    def __init__(self, fill):
        super().__init__()
        self.fill = fill

    def forward(self, q, k, v, masked):
        f = fill_value(self.fill, q.dtype)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=torch.zeros(masked.shape, dtype=q.dtype).masked_fill(masked, f)
        )


def qkv(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, S, D, generator=g).to(dtype) for _ in range(3))


def mask_of(kind):
    """A boolean "masked" tensor with fully masked rows, per kind."""
    g = torch.Generator().manual_seed(7)
    if kind == "per_query":  # (B, 1, S, 1): some queries see no key
        m = torch.zeros(B, 1, S, 1, dtype=torch.bool)
        m[0, 0, 2] = m[1, 0, 5] = True
        m[1, 0, 0] = True
    elif kind == "per_head":  # (1, H, S, S): head 1 has two fully masked rows, others random
        m = torch.rand(1, H, S, S, generator=g) > 0.6
        m[0, 1, 0] = True
        m[0, 1, 3] = True
    elif kind == "per_batch":  # (B, 1, 1, 1): batch 1 fully masked
        m = torch.zeros(B, 1, 1, 1, dtype=torch.bool)
        m[1] = True
    elif kind == "key_padding":  # (B, 1, 1, S): batch 0 pads 3 keys, batch 1 pads all
        m = torch.zeros(B, 1, 1, S, dtype=torch.bool)
        m[0, ..., -3:] = True
        m[1] = True
    elif kind == "diag_inclusive_causal":  # triu(0): row 0 sees nothing
        m = torch.ones(S, S, dtype=torch.bool).triu(0)
    elif kind == "full_shape_random":  # (B, H, S, S) random with a few full rows
        m = torch.rand(B, H, S, S, generator=g) > 0.5
        m[0, 0, 1] = True
        m[1, 1, 6] = True
    else:
        raise AssertionError(kind)
    return m


SPELLINGS = ["masked_fill", "where_keep", "where_masked", "additive_keep", "additive_prebuilt"]
KINDS = [
    "per_query",
    "per_head",
    "per_batch",
    "key_padding",
    "diag_inclusive_causal",
    "full_shape_random",
]

# every spelling x fill on two kinds, every kind on the -inf and finfo.min masked_fill
MATRIX = sorted(
    {(sp, f, kd) for sp in SPELLINGS for f in FILLS for kd in ("per_query", "key_padding")}
    | {
        (sp, f, kd)
        for sp in ("masked_fill", "additive_keep")
        for f in ("neginf", "finfo_min")
        for kd in KINDS
    }
    | {
        ("where_keep", f, kd)
        for f in ("m1e4", "m1e9")
        for kd in ("per_head", "diag_inclusive_causal")
    }
)


@pytest.mark.parametrize("spelling, fill, kind", MATRIX)
def test_fully_masked_rows_reproduce_eager(spelling, fill, kind):
    q, k, v = qkv()
    check(MaskedAttention(spelling, FILLS[fill]), q, k, v, mask_of(kind))


@pytest.mark.parametrize("kind", KINDS)
def test_sdpa_bool_mask_fully_masked_rows_reproduce_eager(kind):
    q, k, v = qkv()
    check(SdpaBoolMask(), q, k, v, mask_of(kind))


@pytest.mark.parametrize("fill", list(FILLS))
def test_sdpa_float_mask_fully_masked_rows_reproduce_eager(fill):
    q, k, v = qkv()
    check(SdpaFloatMask(FILLS[fill]), q, k, v, mask_of("per_query"))


@pytest.mark.parametrize(
    "spelling, fill",
    [
        ("masked_fill", "neginf"),
        ("masked_fill", "finfo_min"),
        ("additive_keep", "finfo_min"),
        ("where_keep", "m1e4"),
    ],
)
def test_fully_masked_rows_bf16_reproduce_eager(spelling, fill):
    q, k, v = qkv(torch.bfloat16)
    check(MaskedAttention(spelling, FILLS[fill]), q, k, v, mask_of("key_padding"))


def test_neginf_fill_gives_nan_rows_exactly_where_eager_does():
    q, k, v = qkv()
    m = mask_of("per_query")
    _, _, [(out_c, out_e)] = check(MaskedAttention("masked_fill", NEG_INF), q, k, v, m)
    rows = m[..., 0].expand(B, H, S)
    assert torch.isnan(out_e[rows]).all() and not torch.isnan(out_e[~rows]).any()
    assert torch.isnan(out_c[rows]).all(), "compiled lost the NaN of a fully -inf row"
    assert not torch.isnan(out_c[~rows]).any()


@pytest.mark.parametrize("fill", ["finfo_min", "m1e9", "m1e4"])
def test_finite_fill_fully_masked_row_is_mean_of_values(fill):
    q, k, v = qkv()
    m = mask_of("key_padding")
    _, _, [(out_c, out_e)] = check(MaskedAttention("masked_fill", FILLS[fill]), q, k, v, m)
    mean_v = v[1].mean(dim=-2, keepdim=True).expand(H, S, D)
    torch.testing.assert_close(out_e[1], mean_v)  # eager: uniform weights
    torch.testing.assert_close(out_c[1], mean_v, atol=1e-5, rtol=1e-4)


def test_small_additive_fill_keeps_score_differences_on_fully_masked_row():
    """s + (-1e4) on every key of a row: the softmax still sees s's differences (ulp of 1e4 is ~1e-3)."""
    q, k, v = qkv()
    m = mask_of("key_padding")
    _, _, [(out_c, out_e)] = check(MaskedAttention("additive_keep", -1e4), q, k, v, m)
    plain = torch.softmax(q[1] @ k[1].transpose(-2, -1) * SCALE, -1) @ v[1]
    torch.testing.assert_close(out_e[1], plain, atol=5e-3, rtol=0)
    assert_same_tensor(out_c, out_e, "output")


def test_neginf_fill_gradient_on_partially_masked_rows():
    """A mask without full rows; gradients of q, k, v must match (and be finite)."""
    g = torch.Generator().manual_seed(3)
    m = torch.rand(B, 1, S, S, generator=g) > 0.6
    m[..., 0] = False
    q, k, v = qkv()
    check(MaskedAttention("masked_fill", NEG_INF), q, k, v, m, grad=True, grad_inputs=(0, 1, 2))


@pytest.mark.parametrize("fill", ["finfo_min", "m1e4"])
def test_finite_fill_fully_masked_row_gradient(fill):
    q, k, v = qkv()
    check(
        MaskedAttention("masked_fill", FILLS[fill]),
        q,
        k,
        v,
        mask_of("key_padding"),
        grad=True,
        grad_inputs=(0, 1, 2),
    )


# ---------------------------------------------------------------------------------------------
# class 5: a fill is judged by the value it has when it reaches the softmax


class FillThenScale(nn.Module):
    def __init__(self, fill, post):
        super().__init__()
        self.fill, self.post = fill, post

    def forward(self, q, k, v, masked):
        s = (q @ k.transpose(-2, -1)).masked_fill(masked, fill_value(self.fill, q.dtype))
        s = s * self.post
        return s.softmax(-1) @ v


class FillThenDivide(nn.Module):
    def __init__(self, fill, div):
        super().__init__()
        self.fill, self.div = fill, div

    def forward(self, q, k, v, masked):
        s = (q @ k.transpose(-2, -1)).masked_fill(masked, self.fill) / self.div
        return F.softmax(s, dim=-1) @ v


class FillThenAdditiveUnmask(nn.Module):
    """masked_fill(-1e4) then + 1e4 on the same positions: nothing is masked any more."""

    def forward(self, q, k, v, masked):
        s = (q @ k.transpose(-2, -1) * SCALE).masked_fill(masked, -1e4)
        s = s + masked.to(s.dtype) * 1e4
        return s.softmax(-1) @ v


class FillThenAddBias(nn.Module):
    def __init__(self, fill):
        super().__init__()
        self.fill = fill

    def forward(self, q, k, v, masked, bias):
        s = (q @ k.transpose(-2, -1) * SCALE).masked_fill(masked, fill_value(self.fill, q.dtype))
        return (s + bias).softmax(-1) @ v


class TwoFillsDifferentValues(nn.Module):
    def __init__(self, f1, f2):
        super().__init__()
        self.f1, self.f2 = f1, f2

    def forward(self, q, k, v, m1, m2):
        s = (q @ k.transpose(-2, -1) * SCALE).masked_fill(m1, self.f1).masked_fill(m2, self.f2)
        return s.softmax(-1) @ v


class MildFill(nn.Module):
    def __init__(self, fill):
        super().__init__()
        self.fill = fill

    def forward(self, q, k, v, masked):
        return (q @ k.transpose(-2, -1) * SCALE).masked_fill(masked, self.fill).softmax(-1) @ v


class PositiveFill(nn.Module):
    """Forcing attention onto some keys: +1e4 is not a mask."""

    def forward(self, q, k, v, masked):
        return (q @ k.transpose(-2, -1) * SCALE).masked_fill(masked, 1e4).softmax(-1) @ v


class FillNextToHugeLogits(nn.Module):
    """Logits of magnitude ~1e4: -1e4 is then a competitor, not a mask."""

    def forward(self, q, k, v, masked):
        s = (q @ k.transpose(-2, -1)) * 3000.0
        return s.masked_fill(masked, -1e4).softmax(-1) @ v


class FillWithTensorValue(nn.Module):
    def forward(self, q, k, v, masked, value):
        return (q @ k.transpose(-2, -1) * SCALE).masked_fill(masked, value).softmax(-1) @ v


class LogOfKeepMask(nn.Module):
    """s + log(keep): -inf where keep is 0 (fully masked rows give NaN)."""

    def forward(self, q, k, v, masked):
        return (q @ k.transpose(-2, -1) * SCALE + (~masked).float().log()).softmax(-1) @ v


class MultiplicativeMaskPlusFill(nn.Module):
    """s * keep + (1 - keep) * -1e9: the masked scores are replaced, not kept."""

    def forward(self, q, k, v, masked):
        keep = (~masked).float()
        s = q @ k.transpose(-2, -1) * SCALE
        return (s * keep + (1 - keep) * -1e9).softmax(-1) @ v


def rand_mask(seed, p=0.5, shape=(B, 1, S, S)):
    m = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > p
    return m


FILL_SCALE_CASES = [
    ("m1e4_times_1over4096", FillThenScale(-1e4, 1 / 4096)),
    ("m1e9_times_1e-9", FillThenScale(-1e9, 1e-9)),
    ("neginf_times_1over4096", FillThenScale(NEG_INF, 1 / 4096)),
    ("finfo_min_times_0.125", FillThenScale("finfo_min", 0.125)),
    ("m1e4_times_2", FillThenScale(-1e4, 2.0)),
    ("m1e4_div_4096", FillThenDivide(-1e4, 4096.0)),
    ("m1e4_div_sqrt_d", FillThenDivide(-1e4, math.sqrt(D))),
    ("m100_div_64", FillThenDivide(-100.0, 64.0)),
]


@pytest.mark.parametrize("name", [n for n, _ in FILL_SCALE_CASES])
def test_fill_judged_after_later_scale(name):
    mod = dict(FILL_SCALE_CASES)[name]
    q, k, v = qkv()
    m = rand_mask(11)
    m[0, 0, 3] = True  # one fully masked row
    check(mod, q, k, v, m)


def test_fill_undone_by_later_additive_term():
    q, k, v = qkv()
    check(FillThenAdditiveUnmask(), q, k, v, rand_mask(12))


@pytest.mark.parametrize("fill", ["neginf", "m1e4", "finfo_min"])
def test_fill_followed_by_additive_bias(fill):
    q, k, v = qkv()
    m = rand_mask(13)
    m[1, 0, 4] = True
    bias = torch.randn(1, H, S, S, generator=torch.Generator().manual_seed(14))
    check(FillThenAddBias(FILLS[fill]), q, k, v, m, bias)


@pytest.mark.parametrize(
    "f1, f2", [(-1e4, -1e9), (NEG_INF, -1.0), (-1e9, -1e4), (-1.0, NEG_INF), (NEG_INF, -1e4)]
)
def test_two_fills_with_different_values(f1, f2):
    """Rows masked by a mix of both fills: eager gives the weight to the less negative fill's keys."""
    q, k, v = qkv()
    m1 = rand_mask(15)
    m2 = ~m1 & rand_mask(16, 0.3)
    m1[0, 0, 2] = True  # row fully covered by m1 alone
    m2[0, 0, 5] = True
    m1[0, 0, 5, :3] = True
    m2[0, 0, 5, :3] = False
    m1[1, 0, 6, ::2] = True  # row covered by m1 | m2, half each
    m2[1, 0, 6, 1::2] = True
    check(TwoFillsDifferentValues(f1, f2), q, k, v, m1, m2)


@pytest.mark.parametrize("fill", [-1.0, -8.0, -30.0, 0.0])
def test_mild_fill_is_not_a_mask(fill):
    q, k, v = qkv()
    check(MildFill(fill), q, k, v, rand_mask(17))


def test_positive_fill_is_not_a_mask():
    q, k, v = qkv()
    check(PositiveFill(), q, k, v, rand_mask(18, 0.8))


def test_fill_next_to_huge_logits_is_a_competitor():
    q, k, v = qkv()
    m = torch.ones(B, 1, S, S, dtype=torch.bool)
    m[..., 0] = False  # one key visible per row, 7 filled with -1e4
    check(FillNextToHugeLogits(), q, k, v, m)


@pytest.mark.parametrize("value", [NEG_INF, -1e4, -0.5])
def test_fill_with_tensor_value(value):
    q, k, v = qkv()
    m = rand_mask(19)
    m[0, 0, 0] = True
    check(FillWithTensorValue(), q, k, v, m, torch.tensor(value))


def test_log_of_keep_mask_fully_masked_rows():
    q, k, v = qkv()
    check(LogOfKeepMask(), q, k, v, mask_of("per_query"))


def test_multiplicative_mask_plus_fill_fully_masked_rows():
    q, k, v = qkv()
    check(MultiplicativeMaskPlusFill(), q, k, v, mask_of("key_padding"))


# ---------------------------------------------------------------------------------------------
# masks that only together cover a row


class TwoNegInfFills(nn.Module):
    """causal fill, then a key-padding fill: rows whose few visible keys are all padded become fully
    masked only through the composition."""

    def forward(self, q, k, v, pad):
        s = q @ k.transpose(-2, -1) * SCALE
        s = s.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), NEG_INF)
        return s.masked_fill(pad, NEG_INF).softmax(-1) @ v


class SameFiniteFillTwice(nn.Module):
    def forward(self, q, k, v, pad):
        s = q @ k.transpose(-2, -1) * SCALE
        lo = torch.finfo(s.dtype).min
        s = s.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), lo)
        return s.masked_fill(pad, lo).softmax(-1) @ v


class CausalPlusPaddingAdditiveFinfoMin(nn.Module):
    """HF's classic: two additive finfo.min masks summed: where both apply the sum overflows to -inf;
    a row mixing -inf and finfo.min entries averages v over the finfo.min keys only."""

    def forward(self, q, k, v, pad):
        lo = torch.finfo(q.dtype).min
        causal = torch.zeros(S, S).masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), lo)
        padm = torch.zeros(pad.shape).masked_fill(pad, lo)
        return (q @ k.transpose(-2, -1) * SCALE + causal + padm).softmax(-1) @ v


class SdpaBoolMaskAndCausalComposed(nn.Module):
    def forward(self, q, k, v, pad):
        keep = ~pad & torch.ones(S, S, dtype=torch.bool).tril()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def leading_pad():
    pad = torch.zeros(B, 1, 1, S, dtype=torch.bool)
    pad[0, ..., :3] = True  # with causal: queries 0..2 of batch 0 see no key
    pad[1, ..., 1::2] = True
    return pad


@pytest.mark.parametrize(
    "cls",
    [
        TwoNegInfFills,
        SameFiniteFillTwice,
        CausalPlusPaddingAdditiveFinfoMin,
        SdpaBoolMaskAndCausalComposed,
    ],
    ids=lambda c: c.__name__,
)
def test_rows_fully_masked_only_by_composed_masks(cls):
    q, k, v = qkv()
    check(cls(), q, k, v, leading_pad())


def test_neginf_fully_masked_rows_gradients_reproduce_eager_nan_pattern():
    """Eager's backward on a -inf row: masked_fill's backward zeroes the NaN score gradients (q, k
    gradients finite), the value gradient is NaN through the NaN weights. Same pattern required."""
    q, k, v = qkv()
    check(
        MaskedAttention("masked_fill", NEG_INF),
        q,
        k,
        v,
        mask_of("per_query"),
        grad=True,
        grad_inputs=(0, 1, 2),
    )
