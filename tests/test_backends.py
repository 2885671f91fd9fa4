"""The dense backends through the whole pass: TRITON_ATTN (under the Triton interpreter on CPU)
and FLASH_ATTN (which needs flash-attn; without it, a clear fallback or error)."""

import pytest
import torch
import torch.nn.functional as F

import fv_compile
from fv_compile.backends.flash_attn import flash_kernel

pytest.importorskip("triton")


class SelfAndCross(torch.nn.Module):
    """Self-attention (SDPA, causal) and cross-attention to 8 text tokens, head dim 64, GQA."""

    def forward(self, q, k, v, text_k, text_v):
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        w = (a @ text_k.transpose(-2, -1) * 0.125).softmax(-1)
        return w @ text_v


def inputs(dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    shapes = [(1, 4, 20, 64), (1, 2, 20, 64), (1, 2, 20, 64), (1, 4, 8, 64), (1, 4, 8, 64)]
    return [torch.randn(*s, generator=g, dtype=dtype).to(device) for s in shapes]


# TRITON_ATTN runs on a GPU, or on the CPU under the Triton interpreter (tests/conftest.py turns
# it on where there is no GPU); float32 on a GPU goes through TF32 tensor cores
_TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_TRITON_TOL = 2e-3 if _TRITON_DEVICE == "cuda" else 1e-4


def test_triton_attn_matches_eager():
    model, args = SelfAndCross(), inputs(device=_TRITON_DEVICE)
    cm = fv_compile.compile(model, "TRITON_ATTN", compiler="eager")
    with torch.no_grad():
        out = cm(*args)
        ref = model(*args)
    assert (out - ref).norm() / ref.norm() < _TRITON_TOL
    assert [s.backend for s in cm.explain().sites] == ["TRITON_ATTN", "TRITON_ATTN"]


def test_triton_attn_sends_masked_and_odd_head_dim_sites_to_a_dense_fallback():
    class Masked(torch.nn.Module):
        def forward(self, q, k, v, keep):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)

    q = k = v = torch.randn(1, 2, 6, 32)
    keep = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    cm = fv_compile.compile(Masked(), "TRITON_ATTN", compiler="eager")
    with torch.no_grad(), pytest.warns(UserWarning, match="TRITON_ATTN cannot run"):
        cm(q, k, v, keep)
    (site,) = cm.explain().sites
    assert site.backend == "TORCH_SDPA" and "head dim 32" in site.reason


@pytest.mark.skipif(flash_kernel() is not None, reason="flash-attn is installed")
def test_flash_attn_without_flash_attn_falls_back_or_names_the_package():
    model, args = SelfAndCross(), inputs()
    cm = fv_compile.compile(model, "FLASH_ATTN", compiler="eager")
    with torch.no_grad(), pytest.warns(UserWarning, match="flash-attn is not installed"):
        cm(*args)
    strict = fv_compile.compile(model, "FLASH_ATTN", compiler="eager", strict=True)
    with torch.no_grad(), pytest.raises(Exception, match="flash-attn is not installed"):
        strict(*args)
    with pytest.raises(ImportError, match="pip install flash-attn"):
        fv_compile.get_backend("flash_attn").get_impl_cls()(
            num_heads=1, head_size=64, softmax_scale=1.0
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["TRITON_ATTN", "FLASH_ATTN"])
def test_dense_backends_on_gpu_bf16(backend):
    if backend == "FLASH_ATTN" and flash_kernel() is None:
        pytest.skip("flash-attn not installed")
    model = SelfAndCross()
    args = [a.cuda() for a in inputs(torch.bfloat16)]
    cm = fv_compile.compile(model, backend, compiler="inductor", strict=backend == "TRITON_ATTN")
    with torch.no_grad():
        out, ref = cm(*args).float(), model(*args).float()
    assert (out - ref).norm() / ref.norm() < 2e-2
