"""SAGE_ATTN (8-bit attention) through the whole pass: chosen by name only, its declared limits
reported as fallback reasons, forward only. On the CPU it runs under the Triton interpreter."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import fv_compile
from fv_compile.backends.abstract import capabilities
from fv_compile.backends.kernels.sage_reference import errors
from fv_compile.models import build_model, example_inputs
from fv_compile.models.zoo import PRESETS

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class SelfAndCross(torch.nn.Module):
    """Causal GQA self-attention (SDPA) and cross-attention to 8 text tokens (matmul + softmax)."""

    def forward(self, q, k, v, text_k, text_v):
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        w = (a @ text_k.transpose(-2, -1) * 0.125).softmax(-1)
        return w @ text_v


def inputs(dtype=torch.bfloat16, head_dim=64):
    g = torch.Generator().manual_seed(0)
    d = head_dim
    shapes = [(1, 4, 40, d), (1, 2, 40, d), (1, 2, 40, d), (1, 4, 8, d), (1, 4, 8, d)]
    return [(torch.randn(*s, generator=g) * 1.5).to(DEVICE, dtype) for s in shapes]


def test_compiled_model_runs_every_site_on_sage_within_bound():
    model, args = SelfAndCross(), inputs()
    cm = fv_compile.compile(model, "SAGE_ATTN", compiler="eager", strict=True)
    with torch.no_grad():
        out = cm(*args)
        ref = model(*[a.double() for a in args])
    assert [s.backend for s in cm.explain().sites] == ["SAGE_ATTN", "SAGE_ATTN"]
    rel, cos = errors(out, ref)
    assert cos >= 0.999 and rel <= 0.04, (rel, cos)


def test_auto_never_picks_sage():
    model, args = SelfAndCross(), inputs()
    cm = fv_compile.compile(model, "auto", compiler="eager")
    with torch.no_grad():
        cm(*args)
    assert "SAGE_ATTN" not in {s.backend for s in cm.explain().sites}


def test_sage_is_declared_forward_only():
    caps = capabilities(fv_compile.get_backend("SAGE_ATTN"))
    assert not caps.differentiable
    assert caps.dtypes == frozenset({"bfloat16", "float16"})


def test_backward_through_a_sage_site_raises():
    model, args = SelfAndCross(), inputs()
    args[0].requires_grad_(True)
    cm = fv_compile.compile(model, "SAGE_ATTN", compiler="eager")
    out = cm(*args)
    with pytest.raises(NotImplementedError, match="SAGE_ATTN is forward-only"):
        out.sum().backward()


def test_float32_site_is_not_run_on_sage_and_says_why():
    model, args = SelfAndCross(), inputs(torch.float32)
    cm = fv_compile.compile(model, "SAGE_ATTN", compiler="eager")
    with torch.no_grad(), pytest.warns(UserWarning, match="SAGE_ATTN cannot run"):
        cm(*args)
    for site in cm.explain().sites:
        assert site.backend != "SAGE_ATTN"
        assert "dtype float32 (supported: bfloat16, float16)" in site.reason


def test_float32_site_with_strict_raises():
    model, args = SelfAndCross(), inputs(torch.float32)
    cm = fv_compile.compile(model, "SAGE_ATTN", compiler="eager", strict=True)
    with torch.no_grad(), pytest.raises(Exception, match="SAGE_ATTN cannot run it"):
        cm(*args)


def test_unsupported_head_dim_falls_back_with_the_reason():
    model, args = SelfAndCross(), inputs(head_dim=32)
    cm = fv_compile.compile(model, "SAGE_ATTN", compiler="eager")
    with torch.no_grad(), pytest.warns(UserWarning, match="SAGE_ATTN cannot run"):
        cm(*args)
    for site in cm.explain().sites:
        assert site.backend != "SAGE_ATTN" and "head dim 32 (supported: 64, 128)" in site.reason


def test_wan_model_with_head_dim_64_runs_all_sites_on_sage_and_matches_eager():
    cfg = dataclasses.replace(PRESETS["wan-tiny"], head_dim=64, rope_axes=(22, 20, 22))
    model = build_model(cfg, dtype=torch.bfloat16, device=DEVICE)
    args, kwargs = example_inputs(model)
    cm = fv_compile.compile(model, "SAGE_ATTN", compiler="eager", strict=True)
    with torch.no_grad():
        out, ref = cm(*args, **kwargs), model(*args, **kwargs)
    assert {s.backend for s in cm.explain().sites} == {"SAGE_ATTN"}
    rel, cos = errors(out, ref)
    assert cos >= 0.999 and rel <= 0.02, (rel, cos)
