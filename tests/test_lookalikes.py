"""Softmaxes that are not attention, and attention the pass cannot prove: nothing is rewritten,
and each is reported with its reason."""

import pytest
import torch
import torch.nn.functional as F

import fv_compile
from tests._graphs import assert_close, rewrite

B, H, S, D = 2, 3, 5, 8


def qkv():
    return torch.randn(B, H, S, D), torch.randn(B, H, S, D), torch.randn(B, H, S, D)


def softmax_over_query_axis(q, k, v):
    return (q @ k.transpose(-2, -1)).softmax(dim=-2) @ v


def scores_also_returned(q, k, v):
    w = q @ k.transpose(-2, -1) * 0.3
    return w.softmax(-1) @ v, w.sum()


def weights_also_returned(q, k, v):
    p = (q @ k.transpose(-2, -1) * 0.3).softmax(-1)
    return p @ v, p


def mask_after_softmax(q, k, v, keep):
    p = (q @ k.transpose(-2, -1)).softmax(-1) * keep
    return p @ v


def router(x, w):
    logits = x @ w
    probs = logits.softmax(-1)
    return probs.topk(2, dim=-1).values


def softmax_then_sum(q, k, v):
    return (q @ k.transpose(-2, -1)).softmax(-1).sum(-1)


def active_dropout(q, k, v):
    p = F.dropout((q @ k.transpose(-2, -1)).softmax(-1), p=0.5, training=True)
    return p @ v


def sdpa_with_dropout(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=0.2)


def tanh_softcap(q, k, v):
    w = torch.tanh(q @ k.transpose(-2, -1) / 30.0) * 30.0
    return w.softmax(-1) @ v


def mild_fill(q, k, v, masked):
    w = (q @ k.transpose(-2, -1)).masked_fill(masked, -1.0)
    return w.softmax(-1) @ v


def tensor_scale(q, k, v, temp):
    return ((q @ k.transpose(-2, -1)) * temp).softmax(-1) @ v


@pytest.mark.parametrize(
    "fn, reason",
    [
        (softmax_over_query_axis, "not the key axis"),
        (router, "not a product"),
        (softmax_then_sum, "not a product with a value tensor"),
    ],
)
def test_non_attention_softmax_is_left_alone_and_reported(fn, reason):
    args = (torch.randn(B, S, D), torch.randn(D, 4)) if fn is router else qkv()
    text, sites, others, out = rewrite(fn, *args)
    assert sites == []
    assert len(others) == 1 and reason in others[0].reason
    assert "fv_compile.attention" not in text
    assert_close(out, fn(*args))


@pytest.mark.parametrize(
    "fn, reason",
    [
        (scores_also_returned, "also used"),
        (weights_also_returned, "also used"),
        (tanh_softcap, ""),
        (sdpa_with_dropout, "dropout_p"),
        (active_dropout, "dropout"),
    ],
)
def test_attention_that_cannot_be_proven_is_skipped_with_reason(fn, reason):
    args = qkv()
    text, sites, others, _ = rewrite(fn, *args)
    assert "fv_compile.attention" not in text
    reported = [s.reason for s in sites if s.status == "skipped"] + [o.reason for o in others]
    assert reported and reason in reported[0]


def test_mask_applied_after_softmax_is_not_attention():
    q, k, v = qkv()
    keep = (torch.rand(B, 1, S, S) > 0.5).float()
    text, _sites, _others, out = rewrite(mask_after_softmax, q, k, v, keep)
    assert "fv_compile.attention" not in text
    assert_close(out, mask_after_softmax(q, k, v, keep))


def test_fill_that_is_not_a_mask_is_skipped():
    q, k, v = qkv()
    masked = torch.rand(S, S) > 0.5
    _text, sites, _, out = rewrite(mild_fill, q, k, v, masked)
    assert sites[0].status == "skipped" and "not -inf" in sites[0].reason
    assert_close(out, mild_fill(q, k, v, masked))


def test_tensor_valued_scale_is_skipped():
    q, k, v = qkv()
    temp = torch.tensor(0.7)
    text, sites, _others, _ = rewrite(tensor_scale, q, k, v, temp)
    assert "fv_compile.attention" not in text
    assert sites[0].status == "skipped" and "not a number" in sites[0].reason


@pytest.mark.parametrize(
    "layer",
    [
        lambda: torch.nn.MultiheadAttention(16, 2, batch_first=True),
        lambda: torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True),
    ],
    ids=["MultiheadAttention", "TransformerEncoderLayer"],
)
def test_nn_multihead_attention_is_listed_as_left_alone(layer):
    """Dynamo keeps `F.multi_head_attention_forward` whole: explain shows the attention it runs."""
    model = layer().train()  # (eval's fast path is opaque too)
    x = torch.randn(2, 5, 16)
    args = (x, x, x) if isinstance(model, torch.nn.MultiheadAttention) else (x,)
    report = fv_compile.explain(model, *args)
    (site,) = report.sites
    assert site.status == "skipped" and "nn.MultiheadAttention's fused call" in site.reason
