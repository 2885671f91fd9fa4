"""`fv_compile.verify`: each rewritten site checked against the traced code on the same inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fv_compile
from fv_compile.backends.sdpa import SDPABackend, SDPAImpl
from fv_compile.models import build_model, example_inputs

D = 8


def test_verify_checks_every_rewritten_site_of_a_model():
    model = build_model("wan-tiny")
    args, kwargs = example_inputs(model)
    report = fv_compile.verify(model, *args, attention_backend="TORCH_SDPA", **kwargs)
    assert len(report.rewritten) == 4 and report.verified
    for site in report.sites:
        assert site.check.ok and site.check.output.nan_match
        assert site.check.output.rel_l2 < 1e-5
    assert "verified 4/4 ok" in str(report) and "verify" in str(report).splitlines()[2]
    assert report.to_dict()["sites"][0]["check"]["ok"] is True


def test_verify_leaves_the_model_and_its_output_as_eager():
    model = build_model("wan-tiny")
    args, kwargs = example_inputs(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fv_compile.verify(model, *args, **kwargs)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


class _ShiftedImpl(SDPAImpl):
    def forward(self, query, key, value, attn_metadata):
        return super().forward(query, key, value, attn_metadata) + 1e-2


class ShiftedBackend(SDPABackend):
    """A backend that is wrong by 1e-2 everywhere."""

    @staticmethod
    def get_name() -> str:
        return "SHIFTED_FOR_VERIFY_TEST"

    @staticmethod
    def get_impl_cls():
        return _ShiftedImpl


def test_verify_reports_a_backend_that_gets_the_numbers_wrong():
    fv_compile.register_backend("SHIFTED_FOR_VERIFY_TEST", ShiftedBackend)
    model = build_model("wan-tiny")
    args, kwargs = example_inputs(model)
    report = fv_compile.verify(model, *args, attention_backend="SHIFTED_FOR_VERIFY_TEST", **kwargs)
    assert not report.verified
    assert all(
        not s.check.ok and s.check.output.max_abs == pytest.approx(1e-2, rel=1e-3)
        for s in report.sites
    )
    assert "FAIL" in str(report)


class ChainedSites(torch.nn.Module):
    """The second site's queries are the first site's output itself (no projection between)."""

    def forward(self, q, k, v, text_k, text_v):
        a = F.scaled_dot_product_attention(q, k, v)
        return ((a @ text_k.transpose(-2, -1)) * D**-0.5).softmax(-1) @ text_v


@pytest.mark.parametrize("cross", ["TORCH_SDPA", "SHIFTED_FOR_VERIFY_TEST"])
def test_a_site_reading_an_earlier_sites_output_is_checked_on_eagers_values(cross, monkeypatch):
    """The earlier site's output is an op of the rewritten graph: the later site's original
    nodes are fed the traced value, as its replacement is (a lookup of the op's name failed)."""
    monkeypatch.setitem(
        fv_compile.backends.registry._USER, "SHIFTED_FOR_VERIFY_TEST", ShiftedBackend
    )
    g = torch.Generator().manual_seed(0)
    shapes = [(1, 2, 6, D)] * 3 + [(1, 2, 4, D)] * 2
    args = [torch.randn(*s, generator=g) for s in shapes]
    policy = {"self": "TORCH_SDPA", "cross": cross}
    report = fv_compile.verify(ChainedSites(), *args, attention_backend=policy)
    first, second = report.sites
    assert first.check.ok and first.check.output.rel_l2 < 1e-6
    if cross == "TORCH_SDPA":
        assert second.check.ok and second.check.output.rel_l2 < 1e-6
    else:
        assert not second.check.ok and second.check.output.max_abs == pytest.approx(1e-2, rel=1e-3)


class LearnedBias(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.randn(4, 6, 6))
        self.q = torch.nn.Linear(D, D)

    def forward(self, x, k, v):
        s = (self.q(x) @ k.transpose(-1, -2)) * D**-0.5 + self.bias
        return s.softmax(-1) @ v


def test_verify_backward_checks_the_gradient_of_every_input_that_requires_one():
    x, k, v = (torch.randn(2, 4, 6, D, requires_grad=True) for _ in range(3))
    report = fv_compile.verify(
        LearnedBias(), x, k, v, attention_backend="TORCH_SDPA", backward=True
    )
    (site,) = report.sites
    grads = {g.what for g in site.check.gradients}
    assert len(grads) == 4 and any("bias" in g for g in grads)  # q, k, v and the learned bias
    assert site.check.ok and report.verified


class FullyMasked(torch.nn.Module):
    def forward(self, q, k, v, keep):
        s = (q @ k.transpose(-1, -2)) * D**-0.5
        return s.masked_fill(~keep, float("-inf")).softmax(-1) @ v


def test_verify_compares_nan_patterns_of_fully_masked_rows():
    q, k, v = (torch.randn(2, 4, 6, D) for _ in range(3))
    keep = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    keep[0, :, 2] = False
    (site,) = fv_compile.verify(FullyMasked(), q, k, v, keep, attention_backend="TORCH_SDPA").sites
    assert site.check.ok and site.check.output.nan_match


def test_explain_can_verify_as_it_traces():
    model = build_model("wan-tiny")
    args, kwargs = example_inputs(model)
    report = fv_compile.explain(model, *args, verify=True, **kwargs)
    assert report.verified and all(s.check is not None for s in report.sites)
    assert fv_compile.explain(model, *args, **kwargs).sites[0].check is None


def test_verify_of_a_metadata_backend_outside_a_forward_context_names_the_fix():
    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    q = k = v = torch.randn(1, 2, 8, D)
    with pytest.raises(fv_compile.FvCompileError, match="forward_context"):
        fv_compile.verify(Attn(), q, k, v, attention_backend="SLIDING_TILE_ATTN")
