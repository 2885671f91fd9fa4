"""Attacks through the values logits can take: scales that are not positive, casts that round
or overflow the scores before the softmax, shifts that are not finite, fills that do not dwarf
the logits they block. Each site is either equal to eager or left alone with its reason."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.adversarial._harness import Fn, check

S, D = 8, 8
SCALE = 1.0 / math.sqrt(D)


def qkv(seed=0, gain=1.0):
    g = torch.Generator().manual_seed(seed)
    return tuple(gain * torch.randn(2, 2, S, D, generator=g) for _ in range(3))


def tril() -> torch.Tensor:
    return torch.ones(S, S, dtype=torch.bool).tril()


def _left_alone(fn, *args, reason: str):
    cm, report, _ = check(Fn(fn), *args)
    (site,) = report.sites
    assert site.status == "skipped" and reason in site.reason, site.reason
    return cm


# --- scales: a fused kernel's causal path assumes a positive one


@pytest.mark.parametrize("scale", [-0.3, 0.0])
def test_sdpa_with_a_constant_causal_mask_and_a_non_positive_scale_is_left_alone(scale):
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=tril(), scale=scale)

    _left_alone(fn, *qkv(), reason="not a finite positive factor")


@pytest.mark.parametrize("alpha", [-0.3, 0.0])
def test_baddbmm_with_a_non_positive_alpha_and_a_causal_fill_is_left_alone(alpha):
    def fn(q, k, v):
        q, k, v = (x.flatten(0, 1) for x in (q, k, v))
        s = torch.baddbmm(torch.zeros(q.shape[0], S, S), q, k.mT, beta=0, alpha=alpha)
        s = s.masked_fill(~tril(), float("-inf"))
        return torch.bmm(s.softmax(-1), v)

    _left_alone(fn, *qkv(), reason="not a finite positive factor")


# --- shifts: softmax is invariant to adding one finite value to every logit, to no other


@pytest.mark.parametrize("shift", [float("nan"), float("inf"), float("-inf")])
def test_a_constant_shift_that_is_not_finite_is_left_alone(shift):
    def fn(q, k, v):
        return ((q @ k.mT) * SCALE + shift).softmax(-1) @ v

    _left_alone(fn, *qkv(), reason="softmax is invariant only to a finite shift")


def test_a_finite_constant_shift_is_dropped():
    def fn(q, k, v):
        return (3.5 + (q @ k.mT) * SCALE).softmax(-1) @ v

    _, report, _ = check(Fn(fn), *qkv())
    (site,) = report.sites
    assert site.status == "rewritten" and site.mask is None


@pytest.mark.parametrize("value", [float("nan"), float("-inf"), float("inf"), -2.0])
def test_a_one_element_tensor_shift_known_at_run_time_is_added_as_a_mask(value):
    def fn(q, k, v, t):
        return ((q @ k.mT) * SCALE + t).softmax(-1) @ v

    _, report, _ = check(Fn(fn), *qkv(), torch.tensor([value]))
    (site,) = report.sites
    assert site.status == "rewritten" and site.mask == "additive"


# --- casts of the logits: widening is free, narrowing rounds or overflows them in eager


def _scores_cast(to: torch.dtype):
    def fn(q, k, v):
        return ((q @ k.mT) * SCALE).to(to).softmax(-1) @ v.to(to)

    return fn


@pytest.mark.parametrize("to", [torch.float16, torch.bfloat16])
def test_logits_cast_to_a_narrower_dtype_before_the_softmax_are_left_alone(to):
    q, k, v = qkv(gain=20.0)  # logits beyond float16's range, coarse in bfloat16
    _left_alone(_scores_cast(to), q, k, v, reason="casts the logits from float32 to")


def test_a_softmax_dtype_narrower_than_the_logits_is_left_alone():
    def fn(q, k, v):
        return F.softmax((q @ k.mT) * SCALE, -1, dtype=torch.float16) @ v.half()

    _left_alone(fn, *qkv(gain=20.0), reason="dtype argument casts the logits")


def test_logits_cast_between_half_dtypes_are_left_alone():
    def fn(q, k, v):
        return ((q @ k.mT) * SCALE).bfloat16().softmax(-1) @ v.bfloat16()

    q, k, v = (x.half() for x in qkv())
    _left_alone(fn, q, k, v, reason="casts the logits from float16 to bfloat16")


def test_logits_widened_before_the_softmax_are_rewritten():
    def fn(q, k, v):
        return (((q @ k.mT) * SCALE).float().softmax(-1)).to(v.dtype) @ v

    _, report, _ = check(Fn(fn), *(x.bfloat16() for x in qkv()))
    (site,) = report.sites
    assert site.status == "rewritten", site.reason
