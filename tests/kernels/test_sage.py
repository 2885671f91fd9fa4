"""Accuracy of the 8-bit attention kernel (fv_compile/backends/kernels/sage_fwd.py).

Without CUDA the kernel runs under Triton's interpreter (tests/conftest.py sets it), whose int8
and FP8 dots are exact, so these tests measure the real quantisation error at tiny shapes.
Everything is held against float64 exact attention. The documented bounds:

* cosine similarity >= 0.999 on every path;
* relative L2 <= 2% with P V in fp16 (the pre-sm89 path);
* relative L2 <= 4% with P V in FP8 e4m3: its 3 mantissa bits alone put 2.5% relative error on
  zero-mean random V (measured: 3.2-3.4% on the output here, the same as the float64 reference
  of the same quantisation, `sage_reference`).

Inputs are realistic in range: q and k with standard deviation 1.5 (logits of std ~2), and, where
it says so, K with a few outlier channels carrying a constant offset 10-50x their spread, as
video DiT keys have; that is what K smoothing removes.
"""

import pytest
import torch

from fv_compile.backends.kernels.sage_fwd import SageConfig, sage_attention_fwd
from fv_compile.backends.kernels.sage_reference import errors, exact_attention, sage_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
COS_MIN = 0.999
REL_FP16 = 0.02
REL_FP8 = 0.04


def inputs(B, Sq, Sk, H, Hk, D, *, outliers=0.0, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Sq, H, D, generator=g) * 1.5
    k = torch.randn(B, Sk, Hk, D, generator=g) * 1.5
    v = torch.randn(B, Sk, Hk, D, generator=g)
    if outliers:
        offsets = torch.tensor([1.0, -0.5, 0.3]) * outliers * 1.5  # 1/3..1x of `outliers`
        k[..., :3] += offsets
    return tuple(t.to(DEVICE, dtype) for t in (q, k, v))


def check(q, k, v, *, causal=False, pv_fp8=None, rel_max=None, **kw):
    scale = q.shape[-1] ** -0.5
    out = sage_attention_fwd(q, k, v, softmax_scale=scale, causal=causal, pv_fp8=pv_fp8, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert torch.isfinite(out).all()
    rel, cos = errors(out, exact_attention(q, k, v, scale, causal))
    fp16 = pv_fp8 is False
    assert cos >= COS_MIN, f"cosine {cos:.5f}"
    assert rel <= (rel_max or (REL_FP16 if fp16 else REL_FP8)), f"relative L2 {rel:.4f}"
    return rel, cos


# (B, Sq, Sk, H, Hk, D, causal)
CASES = [
    (1, 96, 96, 2, 2, 128, False),
    (1, 96, 96, 2, 2, 64, False),
    (1, 77, 77, 2, 2, 128, True),  # odd length, causal
    (2, 45, 45, 2, 2, 64, True),
    (1, 64, 80, 4, 1, 128, False),  # GQA (MQA)
    (1, 70, 70, 4, 2, 64, True),  # GQA, causal
    (1, 83, 19, 2, 2, 128, False),  # cross-attention to a short text, odd lengths
    (1, 50, 129, 2, 2, 64, False),  # keys past one padded V block
    (1, 70, 19, 2, 2, 64, True),  # causal, more queries than keys (top-left, as SDPA)
    (1, 40, 100, 2, 1, 128, True),  # causal, fewer queries than keys, GQA
]


@pytest.mark.parametrize("B,Sq,Sk,H,Hk,D,causal", CASES)
@pytest.mark.parametrize("pv_fp8", [True, False], ids=["fp8_pv", "fp16_pv"])
def test_within_bound_of_exact_attention(B, Sq, Sk, H, Hk, D, causal, pv_fp8):
    check(*inputs(B, Sq, Sk, H, Hk, D, seed=Sq + Sk), causal=causal, pv_fp8=pv_fp8)


@pytest.mark.parametrize("outliers", [10.0, 30.0, 50.0])
def test_k_outlier_channels_stay_within_bound(outliers):
    check(*inputs(1, 96, 96, 2, 2, 128, outliers=outliers), pv_fp8=False)


@pytest.mark.parametrize("outliers", [10.0, 30.0, 50.0])
def test_without_k_smoothing_outlier_channels_cost_accuracy(outliers):
    q, k, v = inputs(1, 96, 96, 2, 2, 128, outliers=outliers)
    scale = 128**-0.5
    ref = exact_attention(q, k, v, scale)
    smooth = errors(sage_attention_fwd(q, k, v, softmax_scale=scale, pv_fp8=False), ref)[0]
    raw = errors(
        sage_attention_fwd(q, k, v, softmax_scale=scale, pv_fp8=False, smooth_k=False), ref
    )[0]
    assert raw > 2 * smooth, f"with smoothing {smooth:.4f}, without {raw:.4f}"


def test_kernel_matches_the_reference_of_its_quantisation():
    q, k, v = inputs(1, 96, 96, 2, 2, 128, outliers=30.0)
    scale = 128**-0.5
    out = sage_attention_fwd(q, k, v, softmax_scale=scale, pv_fp8=False)
    rel, _ = errors(out, sage_reference(q, k, v, scale, pv_fp8=False))
    assert rel < 0.005, f"kernel vs its float64 quantisation reference: {rel:.4f}"


def test_fp16_inputs():
    check(*inputs(1, 64, 64, 2, 2, 64, dtype=torch.float16), pv_fp8=False)


def test_larger_tiles_give_the_same_accuracy():
    q, k, v = inputs(1, 130, 130, 2, 2, 64)
    check(q, k, v, causal=True, config=SageConfig(64, 64, 4, 1))


def test_float32_is_refused_with_a_reason():
    q = torch.randn(1, 16, 2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        sage_attention_fwd(q, q, q, softmax_scale=0.125)


def test_unsupported_head_dim_is_refused():
    q = torch.randn(1, 16, 2, 96, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="head_dim 96 is not supported"):
        sage_attention_fwd(q, q, q, softmax_scale=0.1)
