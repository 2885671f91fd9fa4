"""A backend declares what it can run on its class; the policy honours the declarations.

A newcomer writes one file: the impl, and the backend with its capabilities. These tests are that
newcomer: a small dense backend that applies boolean masks at one head size, and trains.
"""

import warnings
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F

import fv_compile
from fv_compile.backends.abstract import capabilities, unsupported_reason
from fv_compile.backends.kernels import interpreting
from fv_compile.site import MASK_BOOL, AttentionSite


class MaskedImpl(fv_compile.AttentionImpl):
    calls: ClassVar[list] = []

    def __init__(
        self, num_heads, head_size, softmax_scale, causal=False, num_kv_heads=None, prefix="", **kw
    ):
        self.scale = softmax_scale

    def forward(self, q, k, v, md):
        mask = md.attn_mask
        type(self).calls.append(None if mask is None else mask.dtype)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            scale=self.scale,
        )
        return out.transpose(1, 2)


class MaskedBackend(fv_compile.AttentionBackend):
    head_sizes = (16,)
    mask_kinds = (MASK_BOOL,)
    differentiable = True

    @staticmethod
    def get_name():
        return "TEST_MASKED16"

    @staticmethod
    def get_impl_cls():
        return MaskedImpl

    @staticmethod
    def get_metadata_cls():
        return fv_compile.AttentionMetadata

    @staticmethod
    def get_builder_cls():
        return None


class ForwardOnly(MaskedBackend):
    differentiable = False

    @staticmethod
    def get_name():
        return "TEST_FORWARD_ONLY"


class FastVideoStyle:
    """A backend written for FastVideo: no fv_compile base class, none of the declarations."""

    @staticmethod
    def get_name():
        return "TEST_FASTVIDEO_STYLE"

    @staticmethod
    def get_impl_cls():
        return MaskedImpl

    @staticmethod
    def get_metadata_cls():
        return fv_compile.AttentionMetadata

    @staticmethod
    def get_builder_cls():
        return None

    @staticmethod
    def get_supported_head_sizes():
        return [16]


fv_compile.register_backend("TEST_MASKED16", MaskedBackend)
fv_compile.register_backend("TEST_FORWARD_ONLY", ForwardOnly)
fv_compile.register_backend("TEST_FASTVIDEO_STYLE", FastVideoStyle)


class Attention(torch.nn.Module):
    """`[B, H, S, D]` attention, with a boolean or additive mask when given one."""

    def forward(self, q, k, v, mask=None):
        s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        if mask is not None and mask.dtype == torch.bool:
            s = s.masked_fill(~mask, float("-inf"))
        elif mask is not None:
            s = s + mask
        return s.softmax(-1) @ v


def qkv(d, requires_grad=False):
    return [torch.randn(2, 2, 6, d, requires_grad=requires_grad) for _ in range(3)]


def padding(keep=4):
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[1, ..., keep:] = False
    return mask


def run(backend, *args, **compile_kwargs):
    cm = fv_compile.compile(Attention(), backend, compiler="eager", **compile_kwargs)
    with torch.no_grad():
        out = cm(*args)
    torch.testing.assert_close(out, Attention()(*args), atol=1e-5, rtol=1e-5)
    return cm.explain().sites[0]


def test_a_declared_mask_kind_and_head_size_reach_the_backend():
    MaskedImpl.calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        site = run("TEST_MASKED16", *qkv(16), padding())
    assert (site.backend, site.mask, site.status) == ("TEST_MASKED16", "bool", "rewritten")
    assert MaskedImpl.calls == [torch.bool]  # the impl got the site's mask


def test_an_undeclared_head_size_falls_back_with_the_reason():
    with pytest.warns(UserWarning, match="TEST_MASKED16 cannot run"):
        site = run("TEST_MASKED16", *qkv(8), padding())
    assert site.backend == "TORCH_SDPA" and "head dim 8 (supported: 16)" in site.reason


def test_an_undeclared_mask_kind_falls_back_with_the_reason():
    additive = torch.zeros(2, 1, 1, 6).masked_fill(~padding(), -1e9)
    with pytest.warns(UserWarning, match="TEST_MASKED16 cannot run"):
        site = run("TEST_MASKED16", *qkv(16), additive)
    assert site.backend == "TORCH_SDPA"
    assert "additive attention mask (TEST_MASKED16 takes boolean masks)" in site.reason


def test_strict_names_every_reason():
    # (Dynamo wraps the backend's FvCompileError in its own error)
    with pytest.raises(
        Exception,
        match=r"TEST_FASTVIDEO_STYLE cannot run it \(head dim 8 .*; bool attention mask\)",
    ):
        run("TEST_FASTVIDEO_STYLE", *qkv(8), padding(), strict=True)


def test_a_fastvideo_backend_gets_the_safe_defaults():
    caps = capabilities(FastVideoStyle)
    assert caps.head_sizes == (16,)  # FastVideo's get_supported_head_sizes()
    assert (caps.mask_kinds, caps.causal_cross, caps.differentiable) == (frozenset(), False, False)
    site = run("TEST_FASTVIDEO_STYLE", *qkv(16))  # an unmasked site runs on it
    assert site.backend == "TEST_FASTVIDEO_STYLE"
    with pytest.warns(UserWarning, match="bool attention mask"):  # a mask it never said it applies
        site = run("TEST_FASTVIDEO_STYLE", *qkv(16), padding())
    assert site.backend == "TORCH_SDPA"


def test_a_declared_differentiable_backend_trains_and_an_undeclared_one_refuses():
    q, k, v = qkv(16, requires_grad=True)
    cm = fv_compile.compile(Attention(), "TEST_MASKED16", compiler="aot_eager")
    cm(q, k, v, padding()).square().sum().backward()
    got = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    Attention()(q, k, v, padding()).square().sum().backward()
    for g, x in zip(got, (q, k, v)):
        torch.testing.assert_close(g, x.grad, atol=1e-5, rtol=1e-5)

    cm = fv_compile.compile(Attention(), "TEST_FORWARD_ONLY", compiler="aot_eager")
    with pytest.raises(NotImplementedError, match="TEST_FORWARD_ONLY is forward-only"):
        cm(q, k, v, padding()).square().sum().backward()


def test_every_reason_is_collected():
    site = AttentionSite(
        "m",
        "sdpa",
        "BHSD",
        1,
        4,
        3,
        96,
        32,
        16,
        8,
        0.1,
        causal=True,
        mask="additive",
        role="cross",
        dtype="float32",
        device="cpu",
    )
    why = unsupported_reason(fv_compile.get_backend("SLIDING_TILE_ATTN"), site)
    assert why.split("; ") == [
        "cross-attention (STA serves self/joint attention)",
        "causal attention",
        "additive attention mask (STA takes boolean key padding masks)",
    ]
    why = unsupported_reason(fv_compile.get_backend("TRITON_ATTN"), site)
    # a CPU site runs our kernels only under Triton's interpreter (the CPU suite's default)
    on_cpu = [] if interpreting() else ["device cpu (needs CUDA)"]
    assert why.split("; ") == [
        *on_cpu,
        "head dim 96 (supported: 64, 128)",
        "value head dim 32 differs from qk head dim 96",
        "additive attention mask that is not key padding: it varies over queries or heads "
        "(TRITON_ATTN takes boolean key padding masks and additive key padding masks)",
        "heads not divisible by kv heads",
    ]
    assert unsupported_reason(fv_compile.get_backend("TORCH_SDPA"), site) is None
