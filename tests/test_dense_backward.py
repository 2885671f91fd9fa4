"""The dense sites' backward: eager's gradients at any length. An unmasked TORCH_SDPA site that
trains runs as SDPA itself, so SDPA's own backward runs. Every other dense site takes the op's
backward: a float32 recomputation a block of query rows at a time (so a 32k-token site trains
without its score matrix in memory), or SDPA's flash-attention backward for half-precision CUDA
sites with no mask."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fv_compile
from fv_compile import ops
from fv_compile.backends import registry
from fv_compile.backends.sdpa import SDPABackend, SDPAImpl
from fv_compile.policy import dense_default
from fv_compile.site import AttentionSite

B, H, S, D = 2, 4, 7, 8
ROWS_PER_BLOCK = 2  # 7 query rows: blocks of 2, 2, 2 and 1


class _OwnSDPAImpl(SDPAImpl):
    """SDPA's forward in an impl class of its own, as a backend bringing its own kernel has."""


class _DenseThroughTheOp(SDPABackend):
    """A dense backend whose sites train through the op's backward, as FLASH_ATTN's and
    TRITON_ATTN's do (neither runs on the CPU): SDPA's, but with an impl of its own, so it
    does not inherit SDPA's `traced_in_training`."""

    @staticmethod
    def get_name() -> str:
        return OP_BACKWARD

    @staticmethod
    def get_impl_cls() -> type[SDPAImpl]:
        return _OwnSDPAImpl


OP_BACKWARD = "TEST_DENSE_THROUGH_THE_OP"


@pytest.fixture
def op_backward(monkeypatch) -> str:
    """The name of `_DenseThroughTheOp`, registered for one test (a dense backend registered for
    good would be a candidate of every accuracy-budget test)."""
    monkeypatch.setitem(registry._USER, OP_BACKWARD, _DenseThroughTheOp)
    return OP_BACKWARD


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
        "finite-fill-empty-rows": (
            FilledScores(torch.finfo(torch.float32).min),
            (q, k, v, _keep((B, H, S, S))),
        ),
        "bias-per-row": (LearnedBias((1, H, S, S)), (q, k, v)),
        "bias-shared-by-rows": (LearnedBias((1, 1, 1, S)), (q, k, v)),
        "key-padding-empty-batch": (KeyPadding(), (q, k, v, _keep((B, 1, 1, S)))),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_blocks_of_query_rows_give_eagers_gradients(case, monkeypatch, op_backward):
    model, args = _cases()[case]
    twin = copy.deepcopy(model)
    blocks = []
    real = ops._blocked_logits

    def counted(*a, **kw):
        blocks.append(a[0].shape[-2])
        return real(*a, **kw)

    monkeypatch.setattr(ops, "_blocked_logits", counted)
    monkeypatch.setattr(ops, "_BACKWARD_BLOCK_ELEMENTS", B * H * S * ROWS_PER_BLOCK)
    cm = fv_compile.compile(model, op_backward, compiler="aot_eager")
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


def test_a_long_site_trains_in_blocks_of_bounded_size(monkeypatch, op_backward):
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
    cm = fv_compile.compile(CausalGqa(), op_backward, compiler="aot_eager")
    cm(q, k, v).sum().backward()
    assert len(blocks) == 32 and max(blocks) == 1 << 14


def _spy_on_backwards(monkeypatch) -> list[str]:
    taken: list[str] = []
    for name in ("_blockwise_backward", "_flash_backward", "traced_site"):
        real = getattr(ops, name)
        monkeypatch.setattr(
            ops, name, lambda *a, _n=name, _f=real, **kw: taken.append(_n) or _f(*a, **kw)
        )
    return taken


class CrossAndSelf(torch.nn.Module):
    """A causal self-attention site and a cross-attention one, both unmasked SDPA."""

    def forward(self, q, k, v, text):
        x = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(x, text, text)


@pytest.mark.parametrize("compiler", ["eager", "aot_eager", "inductor"])
def test_unmasked_sdpa_sites_train_through_sdpas_own_backward(compiler, monkeypatch):
    taken = _spy_on_backwards(monkeypatch)
    q, k, v = qkv(B, H, S, D)
    text = qkv(B, H, 5, D, seed=4)[0]
    model = CrossAndSelf()
    cm = fv_compile.compile(model, "TORCH_SDPA", compiler=compiler)
    out, ref = cm(q, k, v, text), model(q, k, v, text)
    assert [s.status for s in cm.explain().sites] == ["rewritten"] * 2
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v, text), g)
    want = torch.autograd.grad(ref, (q, k, v, text), g)
    assert "traced_site" in taken and set(taken) == {"traced_site"}
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_sites_that_do_not_train_keep_the_op(monkeypatch):
    """Under no_grad, and under grad mode with nothing requiring a gradient, the site runs
    `fv_compile::attention` (what the inference figures measure)."""
    taken = _spy_on_backwards(monkeypatch)
    q, k, v = (x.detach() for x in qkv(B, H, S, D))
    for grad in (False, True):
        cm = fv_compile.compile(CausalGqa(), "TORCH_SDPA", compiler="aot_eager")
        with torch.set_grad_enabled(grad):
            cm(q, k, v)
        assert cm.explain().sites[0].status == "rewritten"
    assert taken == []


def test_a_masked_sdpa_site_trains_through_the_ops_backward(monkeypatch):
    """A mask keeps the op: its backward gives eager's gradients on fully blocked rows, which
    SDPA's kernels do not all agree on."""
    taken = _spy_on_backwards(monkeypatch)
    q, k, v = qkv(B, H, S, D)
    cm = fv_compile.compile(KeyPadding(), "TORCH_SDPA", compiler="aot_eager")
    cm(q, k, v, _keep((B, 1, 1, S))).sum().backward()
    assert taken == ["_blockwise_backward"]


def test_a_gqa_sdpa_site_trains_through_the_ops_backward(monkeypatch):
    """Fewer kv heads than query heads: SDPA may run its math kernel there, whose autograd would
    keep every site's `[Sq, Sk]` weights until the backward; the op's backward keeps none."""
    taken = _spy_on_backwards(monkeypatch)
    q = qkv(B, H, S, D)[0]
    k, v = qkv(B, 2, S, D, seed=3)[:2]
    cm = fv_compile.compile(CausalGqa(), "TORCH_SDPA", compiler="aot_eager")
    cm(q, k, v).sum().backward()
    assert taken == ["_blockwise_backward"]


def _site(**kw):
    row = dict(module_path="attn", form="sdpa", layout="BHSD", batch=1, heads=12, kv_heads=12)
    row.update(head_dim=128, value_head_dim=128, q_len=32760, kv_len=32760, device="cuda:0")
    return AttentionSite(**{**row, "dtype": "bfloat16", **kw})


def test_auto_trains_an_unmasked_cuda_site_on_sdpa_and_infers_on_flash_attn(monkeypatch):
    """As on the H200 with flash-attn-4 installed: a long site runs FLASH_ATTN for inference,
    and SDPA (its own fused backward) when it trains; a GQA site that trains keeps FLASH_ATTN
    (SDPA's autograd could keep its weights), as does a masked one."""
    from fv_compile import policy

    monkeypatch.setattr(policy, "unsupported_reason", lambda cls, site: None)
    monkeypatch.setattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert dense_default(_site()) == "FLASH_ATTN"
    assert dense_default(_site(trains=True)) == "TORCH_SDPA"
    assert dense_default(_site(trains=True, kv_heads=4)) == "FLASH_ATTN"
    padded = dict(mask="bool", mask_keys_only=True)
    assert dense_default(_site(trains=True, **padded)) == "FLASH_ATTN"


def test_a_site_that_trains_is_marked_so():
    q, k, v = qkv(B, H, S, D)
    trained = fv_compile.compile(CausalGqa(), compiler="eager")
    trained(q, k, v)
    inferred = fv_compile.compile(CausalGqa(), compiler="eager")
    with torch.no_grad():
        inferred(q, k, v)
    assert [s.trains for s in trained.explain().sites] == [True]
    assert [s.trains for s in inferred.explain().sites] == [False]


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
@pytest.mark.parametrize(
    "backend, path", [("TORCH_SDPA", "traced_site"), ("TRITON_ATTN", "_flash_backward")]
)
def test_half_precision_cuda_sites_train_on_a_fused_backward(backend, path, compiler, monkeypatch):
    """TORCH_SDPA's sites train through SDPA's own backward, TRITON_ATTN's through the op's
    flash-attention backward; both within bf16 rounding of float32 eager."""
    taken = _spy_on_backwards(monkeypatch)
    torch.manual_seed(0)
    model = SelfAttention().cuda().to(torch.bfloat16)
    twin = copy.deepcopy(model).float()
    x = torch.randn(2, 1024, 256, device="cuda")
    cm = fv_compile.compile(model, backend, compiler=compiler)
    cm(x.to(torch.bfloat16).requires_grad_()).float().square().sum().backward()
    twin(x.requires_grad_()).square().sum().backward()
    assert path in taken and "_blockwise_backward" not in taken
    got, want = model.qkv.weight.grad.float(), twin.qkv.weight.grad
    assert ((got - want).norm() / want.norm()).item() < 2e-2


@needs_cuda
def test_a_long_cuda_site_trains_without_its_score_matrix(op_backward):
    """16k tokens, 4 heads: the float32 weights alone would be 4 GiB; the backward stays far
    below that in bf16 (flash) and float32 (blocks) alike."""
    s, heads = 16384, 4
    for dtype in (torch.bfloat16, torch.float32):
        q, k, v = qkv(1, heads, s, 64, dtype=dtype, device="cuda")
        cm = fv_compile.compile(CausalGqa(), op_backward, compiler="aot_eager")
        out = cm(q, k, v)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out.sum().backward()
        torch.cuda.synchronize()
        assert torch.cuda.max_memory_allocated() - base < (1 << 31), dtype


class Causal(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@needs_cuda
def test_a_long_cuda_sdpa_site_keeps_no_score_matrix_between_forward_and_backward():
    """A site SDPA's autograd trains keeps its log-sum-exp for the backward, not its weights
    (4 GiB in bfloat16 at 16k tokens and 8 heads)."""
    q, k, v = qkv(1, 8, 16384, 64, dtype=torch.bfloat16, device="cuda")
    cm = fv_compile.compile(Causal(), "TORCH_SDPA", compiler="aot_eager")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    cm(q, k, v).sum().backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < (1 << 30)
