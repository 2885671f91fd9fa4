"""The dense sites' backward: eager's gradients at any length. The float32 recomputation works a
block of query rows at a time (so a 32k-token site trains without its score matrix in memory);
half-precision CUDA sites with no mask take SDPA's flash-attention backward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fv_compile
from fv_compile import ops

B, H, S, D = 2, 4, 7, 8
ROWS_PER_BLOCK = 2  # 7 query rows: blocks of 2, 2, 2 and 1


def qkv(*shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_() for _ in range(3)
    ]


class CausalGqa(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


class FilledScores(torch.nn.Module):
    def __init__(self, fill):
        super().__init__()
        self.fill = fill

    def forward(self, q, k, v, keep):
        s = (q @ k.transpose(-1, -2)) * D**-0.5
        return s.masked_fill(~keep, self.fill).softmax(-1) @ v


class LearnedBias(torch.nn.Module):
    """An additive bias learned per head and query row, or one shared by every row."""

    def __init__(self, shape):
        super().__init__()
        self.bias = torch.nn.Parameter(
            torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        )

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)


class KeyPadding(torch.nn.Module):
    def forward(self, q, k, v, keep):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def _keep(shape):
    keep = torch.rand(*shape, generator=torch.Generator().manual_seed(2)) > 0.4
    keep[..., 0] = True
    if shape[-2] == 1:
        keep[0] = False  # batch 0: every key is padding
    else:
        keep[0, :, 1] = False  # batch 0: every key of query 1 blocked
    return keep


def _cases():
    q, k, v = qkv(B, H, S, D)
    kg, vg = qkv(B, 2, S, D, seed=3)[:2]
    return {
        "causal-gqa": (CausalGqa(), (q, kg, vg)),
        "neginf-fill-empty-rows": (FilledScores(float("-inf")), (q, k, v, _keep((B, H, S, S)))),
        "finite-fill-empty-rows": (FilledScores(-1e9), (q, k, v, _keep((B, H, S, S)))),
        "bias-per-row": (LearnedBias((1, H, S, S)), (q, k, v)),
        "bias-shared-by-rows": (LearnedBias((1, 1, 1, S)), (q, k, v)),
        "key-padding-empty-batch": (KeyPadding(), (q, k, v, _keep((B, 1, 1, S)))),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_blocks_of_query_rows_give_eagers_gradients(case, monkeypatch):
    model, args = _cases()[case]
    twin = copy.deepcopy(model)
    blocks = []
    real = ops._blocked_logits

    def counted(*a, **kw):
        blocks.append(a[0].shape[-2])
        return real(*a, **kw)

    monkeypatch.setattr(ops, "_blocked_logits", counted)
    monkeypatch.setattr(ops, "_BACKWARD_BLOCK_ELEMENTS", B * H * S * ROWS_PER_BLOCK)
    cm = fv_compile.compile(model, "TORCH_SDPA", compiler="aot_eager")
    out, ref = cm(*args), twin(*args)
    assert cm.explain().sites[0].status == "rewritten"
    g = torch.randn_like(ref)
    leaves = [a for a in args if a.requires_grad]
    got = torch.autograd.grad(out, [*cm._orig_mod.parameters(), *leaves], g)
    want = torch.autograd.grad(ref, [*twin.parameters(), *leaves], g)
    assert blocks == [2, 2, 2, 1]
    for a, b in zip(got, want):
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a, b, equal_nan=True, atol=1e-5, rtol=1e-4)


def test_a_long_site_trains_in_blocks_of_bounded_size(monkeypatch):
    """The largest block holds `_BACKWARD_BLOCK_ELEMENTS` weights, whatever the length."""
    blocks = []
    real = ops._blocked_logits

    def counted(*a, **kw):
        scores, filled = real(*a, **kw)
        blocks.append(scores.numel())
        return scores, filled

    monkeypatch.setattr(ops, "_blocked_logits", counted)
    monkeypatch.setattr(ops, "_BACKWARD_BLOCK_ELEMENTS", 1 << 14)
    q, k, v = qkv(1, 2, 512, D)
    cm = fv_compile.compile(CausalGqa(), "TORCH_SDPA", compiler="aot_eager")
    cm(q, k, v).sum().backward()
    assert len(blocks) == 32 and max(blocks) == 1 << 14


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class SelfAttention(torch.nn.Module):
    """Wan's form: `[B, S, H, D]` projections, SDPA over heads-first views."""

    def __init__(self, dim=256, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).unbind(2)
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
        return out.transpose(1, 2).flatten(2)


@needs_cuda
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend", ["TORCH_SDPA", "TRITON_ATTN"])
def test_half_precision_cuda_sites_train_through_flash_backward(backend, compiler, monkeypatch):
    taken = []
    real = ops._flash_backward
    monkeypatch.setattr(ops, "_flash_backward", lambda *a: taken.append(1) or real(*a))
    torch.manual_seed(0)
    model = SelfAttention().cuda().to(torch.bfloat16)
    twin = copy.deepcopy(model).float()
    x = torch.randn(2, 1024, 256, device="cuda")
    cm = fv_compile.compile(model, backend, compiler=compiler)
    cm(x.to(torch.bfloat16).requires_grad_()).float().square().sum().backward()
    twin(x.requires_grad_()).square().sum().backward()
    assert taken
    got, want = model.qkv.weight.grad.float(), twin.qkv.weight.grad
    assert ((got - want).norm() / want.norm()).item() < 2e-2


@needs_cuda
def test_a_long_cuda_site_trains_without_its_score_matrix():
    """16k tokens, 4 heads: the float32 weights alone would be 4 GiB; the backward stays far
    below that in bf16 (flash) and float32 (blocks) alike."""
    s, heads = 16384, 4
    for dtype in (torch.bfloat16, torch.float32):
        q, k, v = qkv(1, heads, s, 64, dtype=dtype, device="cuda")
        cm = fv_compile.compile(CausalGqa(), "TORCH_SDPA", compiler="aot_eager")
        out = cm(q, k, v)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out.sum().backward()
        torch.cuda.synchronize()
        assert torch.cuda.max_memory_allocated() - base < (1 << 31), dtype
