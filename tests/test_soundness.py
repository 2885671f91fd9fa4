"""A rewrite changes nothing but the speed: side effects, gradients, blocked rows, precision and
random numbers come out as eager's. One test per way the pass was once wrong."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import fv_compile

D = 8


def qkv(*shape, dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(requires_grad)
        for _ in range(3)
    ]


def run_both(model, *args, compiler="eager", grad=False, seed=None):
    """`(compiled output, eager output, compiled model, eager twin)`; the twin is a deepcopy
    made before compiling, so buffers can be compared after the call."""
    twin = copy.deepcopy(model)
    cm = fv_compile.compile(model, "TORCH_SDPA", compiler=compiler)
    ctx = torch.enable_grad if grad else torch.no_grad
    with ctx():
        if seed is not None:
            torch.manual_seed(seed)
        out = cm(*args)
        if seed is not None:
            torch.manual_seed(seed)
        ref = twin(*args)
    return out, ref, cm, twin


def statuses(cm):
    return [s.status for s in cm.explain().sites]


# --- 1. side effects ---------------------------------------------------------------------------


class WritesBuffers(torch.nn.Module):
    """A step counter, a static KV cache filled by copy_ / index_copy_ / setitem, around SDPA."""

    def __init__(self):
        super().__init__()
        self.register_buffer("steps", torch.zeros(()))
        self.register_buffer("k_cache", torch.zeros(2, 4, 6, D))
        self.register_buffer("v_cache", torch.zeros(2, 4, 6, D))
        self.register_buffer("q_seen", torch.zeros(2, 4, 2, D))

    def forward(self, q, k, v):
        self.steps.add_(1)
        self.k_cache.copy_(k)
        self.v_cache.index_copy_(2, torch.arange(6), v)
        self.q_seen[:, :, :2] = q[:, :, :2]
        return F.scaled_dot_product_attention(q, self.k_cache, self.v_cache)


def test_inplace_writes_to_buffers_survive_the_rewrite():
    out, ref, cm, twin = run_both(WritesBuffers(), *qkv(2, 4, 6, D))
    assert statuses(cm) == ["rewritten"]
    torch.testing.assert_close(out, ref)
    for name, buf in cm._orig_mod.named_buffers():
        torch.testing.assert_close(buf, dict(twin.named_buffers())[name], msg=name)
    assert cm._orig_mod.steps.item() == 1


class NeighbourWithInplaceMask(torch.nn.Module):
    """Site A is rewritten; site B masks its scores in place and is left alone (its scores are
    also returned). The unused result of B's masked_fill_ must not go with A's dead nodes."""

    def forward(self, q, k, v, keep):
        a = F.scaled_dot_product_attention(q, k, v)
        s = q @ k.transpose(-1, -2) * D**-0.5
        s.masked_fill_(~keep, float("-inf"))
        b = s.softmax(-1) @ v
        return a + b, s.amax()


class WritesInsideTheSite(torch.nn.Module):
    """k and v are the same tensor; it is scaled in place after the scores read it."""

    def forward(self, q, x):
        s = (q @ x.transpose(-1, -2)) * D**-0.5
        p = s.softmax(-1)
        x.mul_(2)
        return p @ x


def test_a_write_between_the_score_and_value_products_leaves_the_site_alone():
    q, x, _ = qkv(2, 4, 6, D)
    out, _ref, cm, _ = run_both(WritesInsideTheSite(), q, x.clone())
    (site,) = cm.explain().sites
    assert site.status == "skipped" and "in place" in site.reason
    x2 = x.clone()
    with torch.no_grad():
        torch.testing.assert_close(out, WritesInsideTheSite()(q, x2))


class MutatedConstantMask(torch.nn.Module):
    """A mask built from constants, then changed in place: not a constant any more."""

    def forward(self, q, k, v):
        keep = torch.ones(6, 6, dtype=torch.bool)
        keep[:, 3:] = False
        s = (q @ k.transpose(-1, -2)) * D**-0.5
        return s.masked_fill(~keep, float("-inf")).softmax(-1) @ v


def test_a_constant_mask_written_in_place_is_not_folded_away():
    out, ref, _cm, _ = run_both(MutatedConstantMask(), *qkv(2, 4, 6, D))
    torch.testing.assert_close(out, ref)


class MaskJoinedWithOr(torch.nn.Module):
    """`pad | extra` builds a new mask: `operator.or_` writes into nothing."""

    def forward(self, q, k, v, pad, extra):
        s = (q @ k.transpose(-1, -2)) * D**-0.5
        return s.masked_fill(~(pad | extra), float("-inf")).softmax(-1) @ v


def test_masks_joined_with_or_are_not_taken_for_writes():
    q, k, v = qkv(2, 4, 6, D)
    g = torch.Generator().manual_seed(5)
    pad, extra = (torch.rand(2, 1, 1, 6, generator=g) > 0.5 for _ in range(2))
    pad[..., 0] = True
    out, ref, cm, _ = run_both(MaskJoinedWithOr(), q, k, v, pad, extra)
    assert [s.status for s in cm.explain().sites] == ["rewritten"]
    torch.testing.assert_close(out, ref)


# --- 2. learned masks get their gradient -------------------------------------------------------


class RelativePositionBias(torch.nn.Module):
    """Swin-style: a learned table indexed by relative position, added to the scores."""

    def __init__(self, heads=4, n=6):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(2 * n - 1, heads))
        pos = torch.arange(n)
        self.register_buffer("index", pos[:, None] - pos[None, :] + n - 1)
        self.q_proj = torch.nn.Linear(D, D)

    def forward(self, x, k, v):
        q = self.q_proj(x)
        bias = self.table[self.index].permute(2, 0, 1)
        return ((q @ k.transpose(-1, -2)) * D**-0.5 + bias).softmax(-1) @ v


class BaddbmmBias(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.randn(1, 6, 6))

    def forward(self, q, k, v):
        s = torch.baddbmm(self.bias, q, k.transpose(1, 2), beta=0.5, alpha=D**-0.5)
        return torch.bmm(s.softmax(-1), v)


@pytest.mark.parametrize(
    "model,shape",
    [(RelativePositionBias(), (2, 4, 6, D)), (BaddbmmBias(), (8, 6, D))],
    ids=["table", "baddbmm"],
)
def test_a_learned_additive_bias_gets_eagers_gradient(model, shape):
    args = qkv(*shape, requires_grad=True)
    out, ref, cm, twin = run_both(model, *args, compiler="aot_eager", grad=True)
    assert statuses(cm) == ["rewritten"]
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, [*cm._orig_mod.parameters(), *args], g)
    want = torch.autograd.grad(ref, [*twin.parameters(), *args], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# --- 3. stop-gradients -------------------------------------------------------------------------


class DetachedKey(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj = torch.nn.Linear(D, D), torch.nn.Linear(D, D)

    def forward(self, x):
        q, k = self.q_proj(x), self.k_proj(x).detach()
        return ((q @ k.transpose(-1, -2)) * D**-0.5).softmax(-1) @ x


def test_a_detached_key_stops_gradients_as_in_eager():
    x = torch.randn(2, 4, 6, D, requires_grad=True)
    out, ref, cm, twin = run_both(DetachedKey(), x, compiler="aot_eager", grad=True)
    assert statuses(cm) == ["rewritten"]
    out.sum().backward()
    ref.sum().backward()
    assert cm._orig_mod.k_proj.weight.grad is None and twin.k_proj.weight.grad is None
    torch.testing.assert_close(cm._orig_mod.q_proj.weight.grad, twin.q_proj.weight.grad)


class DetachedWeights(torch.nn.Module):
    def forward(self, q, k, v):
        return ((q @ k.transpose(-1, -2)) * D**-0.5).softmax(-1).detach() @ v


def test_detached_attention_weights_leave_the_site_alone_when_gradients_flow():
    args = qkv(2, 4, 6, D, requires_grad=True)
    out, ref, cm, _ = run_both(DetachedWeights(), *args, compiler="aot_eager", grad=True)
    (site,) = cm.explain().sites
    assert site.status == "skipped" and "detached" in site.reason
    torch.testing.assert_close(out, ref)


def test_a_detach_that_stops_nothing_is_looked_through_under_no_grad():
    out, ref, cm, _ = run_both(DetachedWeights(), *qkv(2, 4, 6, D))
    assert statuses(cm) == ["rewritten"]
    torch.testing.assert_close(out, ref)


# --- 4. fully masked rows ----------------------------------------------------------------------


class FilledScores(torch.nn.Module):
    def __init__(self, fill, spelling="masked_fill"):
        super().__init__()
        self.fill, self.spelling = fill, spelling

    def forward(self, q, k, v, keep):
        s = (q @ k.transpose(-1, -2)) * D**-0.5
        if self.spelling == "masked_fill":
            s = s.masked_fill(~keep, self.fill)
        else:
            s = torch.where(keep, s, self.fill)
        return s.softmax(-1) @ v


def _keep_with_empty_rows():
    keep = torch.rand(2, 4, 6, 6, generator=torch.Generator().manual_seed(2)) > 0.5
    keep[..., 0] = True
    keep[0, :, 1] = False  # every key of query 1 blocked, batch 0
    keep[1, 2, 4] = False  # and of query 4, batch 1, head 2
    return keep


# fills that block whatever the logits (below -1e30: site.VERY_NEGATIVE)
FILLS = [float("-inf"), torch.finfo(torch.float32).min]
FILL_IDS = ["-inf", "finfo.min"]


@pytest.mark.parametrize("fill", [-1e9, -1e4, -1e20])
def test_a_moderate_fill_is_not_assumed_to_block(fill):
    """Logits beyond 1e4 are within reach of unnormalised q and k; where a row's kept logits
    are all below the fill, eager's weights go to the filled keys. Left alone, and eager's."""
    q, k, v = qkv(2, 4, 6, D)
    q = torch.zeros_like(q)
    q[..., 0] = -(abs(fill) ** 0.5) * 4
    k = k.clone()
    k[..., 0] = k[..., 0].abs() + abs(fill) ** 0.5  # every logit below the fill
    keep = _keep_with_empty_rows()
    out, ref, cm, _ = run_both(FilledScores(fill), q, k, v, keep)
    (site,) = cm.explain().sites
    assert site.status == "skipped" and "does not block" in site.reason, site.reason
    torch.testing.assert_close(out, ref, equal_nan=True)


@pytest.mark.parametrize("spelling", ["masked_fill", "where"])
@pytest.mark.parametrize("fill", FILLS, ids=FILL_IDS)
def test_fully_masked_rows_keep_eagers_values(fill, spelling):
    q, k, v = qkv(2, 4, 6, D)
    out, ref, cm, _ = run_both(FilledScores(fill, spelling), q, k, v, _keep_with_empty_rows())
    assert statuses(cm) == ["rewritten"]
    if fill == -math.inf:
        assert ref[0, :, 1].isnan().all()  # eager: softmax of -inf logits
    else:
        torch.testing.assert_close(ref[0, :, 1], v[0].mean(1))  # eager: a uniform row
    torch.testing.assert_close(out, ref, equal_nan=True)
    assert torch.equal(out.isnan(), ref.isnan())


@pytest.mark.parametrize("fill", FILLS, ids=FILL_IDS)
def test_a_batch_element_keeping_no_key_gets_eagers_rows_written_in_place(fill, monkeypatch):
    """Under a key padding mask, emptiness is per batch element: only that element's rows are
    written (the kernel), and they are eager's, NaN or the mean of v by the fill."""
    from fv_compile.backends.kernels import empty_batches, interpreting

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not interpreting():
        pytest.skip("the in-place fill is a Triton kernel: CUDA or the interpreter")
    calls = []
    real = empty_batches.fill_empty_batches
    monkeypatch.setattr(
        empty_batches, "fill_empty_batches", lambda *a: calls.append(a[1].tolist()) or real(*a)
    )
    q, k, v = (x.to(device) for x in qkv(3, 4, 6, D))
    keep = torch.ones(3, 1, 1, 6, dtype=torch.bool, device=device)
    keep[1] = False  # batch element 1 keeps no key
    keep[2, ..., 3:] = False
    out, ref, cm, _ = run_both(FilledScores(fill), q, k, v, keep)
    assert statuses(cm) == ["rewritten"] and calls and calls[-1] == [False, True, False]
    torch.testing.assert_close(out, ref, equal_nan=True, atol=1e-4, rtol=1e-4)
    assert torch.equal(out.isnan(), ref.isnan())


class SdpaBoolMask(torch.nn.Module):
    def forward(self, q, k, v, keep):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def test_fully_masked_rows_of_sdpa_stay_as_sdpa_gives_them():
    q, k, v = qkv(2, 4, 6, D)
    out, ref, _cm, _ = run_both(SdpaBoolMask(), q, k, v, _keep_with_empty_rows())
    torch.testing.assert_close(out, ref, equal_nan=True)
    assert torch.equal(out.isnan(), ref.isnan())


class PaddingMaskFloat32Min(torch.nn.Module):
    """HF style: an additive float32 mask of finfo.min, bf16 attention, softmax in float32."""

    def forward(self, q, k, v, keep):
        bias = (1.0 - keep.float()) * torch.finfo(torch.float32).min
        s = (q @ k.transpose(-1, -2)) * D**-0.5 + bias
        return s.float().softmax(-1).to(q.dtype) @ v


def test_a_float32_min_padding_mask_keeps_uniform_rows_in_bfloat16():
    q, k, v = qkv(2, 4, 6, D, dtype=torch.bfloat16)
    keep = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    keep[0] = False  # batch 0: every key is padding
    out, ref, cm, _ = run_both(PaddingMaskFloat32Min(), q, k, v, keep)
    assert statuses(cm) == ["rewritten"]
    assert not ref.isnan().any()
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def _sdpa_as_fused_kernels_run_it(q, k, v, attn_mask=None, scale=None, **kwargs):
    """SDPA as its fused CUDA kernels compute it (measured on the H200: the efficient kernel in
    float32): logits in the exp2 domain, where a float32 finfo.min overflows to -inf, and
    rows with no finite logit zeroed."""
    assert attn_mask is not None and attn_mask.is_floating_point() and not kwargs.get("is_causal")
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    s = (q @ k.transpose(-1, -2) * (scale or q.shape[-1] ** -0.5) + attn_mask) * math.log2(math.e)
    p = torch.exp2(s - s.amax(-1, keepdim=True)).nan_to_num(0.0)
    return p / p.sum(-1, keepdim=True).clamp(min=1e-30) @ v


@pytest.mark.parametrize("heads_in_mask", [False, True])
def test_rows_a_finfo_min_mask_blocks_entirely_stay_uniform_when_the_kernel_overflows(
    monkeypatch, heads_in_mask
):
    """A matmul-spelled site with an HF-style float32 finfo.min mask, run by TORCH_SDPA: eager
    gives a row whose every key is masked the mean of v, whatever the kernel computes."""
    from fv_compile.backends import _dense

    q, k, v = qkv(2, 4, 6, D)
    keep = torch.ones(2, 4 if heads_in_mask else 1, 1, 6, dtype=torch.bool)
    keep[0] = False  # batch 0: every key is padding
    keep[1, ..., 2:4] = False
    monkeypatch.setattr(_dense.F, "scaled_dot_product_attention", _sdpa_as_fused_kernels_run_it)
    out, ref, cm, _ = run_both(PaddingMaskFloat32Min(), q, k, v, keep)
    assert statuses(cm) == ["rewritten"]
    torch.testing.assert_close(ref[0], v[0].mean(1, keepdim=True).expand_as(ref[0]))
    torch.testing.assert_close(out, ref)


def _assert_same_gradients(out, ref, inputs):
    """Every input's gradient through `out` equals eager's through `ref`, NaN where it is."""
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, inputs, g)
    want = torch.autograd.grad(ref, inputs, g)
    for a, b in zip(got, want):
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a, b, equal_nan=True, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fill", FILLS, ids=FILL_IDS)
def test_gradients_through_fully_masked_rows_match_eager(fill):
    q, k, v = qkv(2, 4, 6, D, requires_grad=True)
    keep = _keep_with_empty_rows()
    out, ref, _, _ = run_both(FilledScores(fill), q, k, v, keep, compiler="aot_eager", grad=True)
    _assert_same_gradients(out, ref, (q, k, v))


@pytest.mark.parametrize("fill", FILLS, ids=FILL_IDS)
def test_gradients_through_a_batch_element_keeping_no_key_match_eager(fill):
    """Training through a batch element that keeps no key: its rows and every input's
    gradient are eager's (NaN where eager's are)."""
    q, k, v = qkv(3, 4, 6, D, requires_grad=True)
    keep = torch.ones(3, 1, 1, 6, dtype=torch.bool)
    keep[1] = False
    keep[2, ..., 3:] = False
    out, ref, _, _ = run_both(FilledScores(fill), q, k, v, keep, compiler="aot_eager", grad=True)
    torch.testing.assert_close(out, ref, equal_nan=True)
    _assert_same_gradients(out, ref, (q, k, v))


class PadThenCausal(torch.nn.Module):
    def forward(self, q, k, v, keep):
        s = (q @ k.transpose(-1, -2)) * D**-0.5
        s = s.masked_fill(~keep, float("-inf"))
        return s.masked_fill(~keep.transpose(-1, -2), torch.finfo(s.dtype).min).softmax(-1) @ v


def test_a_finite_fill_next_to_another_mask_is_left_alone():
    q, k, v = qkv(2, 4, 6, D)
    out, ref, cm, _ = run_both(PadThenCausal(), q, k, v, _keep_with_empty_rows())
    (site,) = cm.explain().sites
    assert site.status == "skipped" and "finite fill" in site.reason
    torch.testing.assert_close(out, ref, equal_nan=True)


# --- 5. precision ------------------------------------------------------------------------------


class Float32Attention(torch.nn.Module):
    """bf16 activations, attention run in float32 on purpose, float32 result kept."""

    def forward(self, q, k, v):
        s = (q.float() @ k.float().transpose(-1, -2)) * D**-0.5
        return s.softmax(-1) @ v.float()


class CastBackAfter(Float32Attention):
    def forward(self, q, k, v):
        return super().forward(q, k, v).to(torch.bfloat16)


def _float64_reference(q, k, v):
    q, k, v = (x.double() for x in (q, k, v))
    return ((q @ k.transpose(-1, -2)) * D**-0.5).softmax(-1) @ v


def test_an_explicit_float32_attention_stays_float32():
    q, k, v = qkv(2, 4, 16, D, dtype=torch.bfloat16)
    out, _ref, cm, _ = run_both(Float32Attention(), q, k, v)
    (site,) = cm.explain().sites
    assert site.status == "rewritten" and site.dtype == "float32"
    want = _float64_reference(q, k, v)
    assert out.dtype == torch.float32
    assert (out.double() - want).abs().max() < 1e-5  # bf16 rounding would be ~1e-2


def test_an_upcast_cast_back_right_after_runs_in_the_low_dtype():
    q, k, v = qkv(2, 4, 16, D, dtype=torch.bfloat16)
    out, ref, cm, _ = run_both(CastBackAfter(), q, k, v)
    (site,) = cm.explain().sites
    assert site.status == "rewritten" and site.dtype == "bfloat16"
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


# --- 6. random masks ---------------------------------------------------------------------------


class RandomMask(torch.nn.Module):
    """A dropout-like key mask drawn in forward; most draws keep every key."""

    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, q, k, v):
        if self.how == "rand":
            keep = torch.rand(6, 6) > 0.02
        else:
            keep = torch.bernoulli(torch.full((6, 6), 0.98)).bool()
        s = (q @ k.transpose(-1, -2)) * D**-0.5
        return s.masked_fill(~keep, float("-inf")).softmax(-1) @ v


def _seed_whose_draw(how, keeps_all: bool) -> int:
    for seed in range(10_000):
        torch.manual_seed(seed)
        keep = (
            torch.rand(6, 6) > 0.02 if how == "rand" else torch.bernoulli(torch.full((6, 6), 0.98))
        )
        if bool(keep.bool().all()) == keeps_all and (keeps_all or bool(keep.bool().any(-1).all())):
            return seed
    raise AssertionError("no such seed")


@pytest.mark.parametrize("how", ["rand", "bernoulli"])
def test_a_random_mask_is_drawn_on_every_call_never_folded(how):
    """The first call compiles while the draw keeps every key; a mask folded at compile time
    would then be "no mask" forever."""
    q, k, v = qkv(2, 4, 6, D)
    out, ref, cm, twin = run_both(RandomMask(how), q, k, v, seed=_seed_whose_draw(how, True))
    torch.testing.assert_close(out, ref)
    seed = _seed_whose_draw(how, False)
    with torch.no_grad():
        torch.manual_seed(seed)
        out = cm(q, k, v)
        torch.manual_seed(seed)
        ref = twin(q, k, v)
    torch.testing.assert_close(out, ref)


# --- 7. a fill is judged where the softmax sees it ---------------------------------------------


class FillThenScale(torch.nn.Module):
    def __init__(self, fill):
        super().__init__()
        self.fill = fill

    def forward(self, q, k, v, keep):
        s = q @ k.transpose(-1, -2)
        return (s.masked_fill(~keep, self.fill) / 4096).softmax(-1) @ v


def test_a_fill_a_later_scale_shrinks_out_of_blocking_range_leaves_the_site_alone():
    q, k, v = qkv(2, 4, 6, D)
    keep = _keep_with_empty_rows()
    out, ref, cm, _ = run_both(FillThenScale(-1e30), q, k, v, keep)
    (site,) = cm.explain().sites
    assert site.status == "skipped" and "-2.44" in site.reason
    torch.testing.assert_close(out, ref)


def test_a_fill_still_blocking_after_a_later_scale_is_rewritten():
    q, k, v = qkv(2, 4, 6, D)
    fill = torch.finfo(torch.float32).min
    out, ref, cm, _ = run_both(FillThenScale(fill), q, k, v, _keep_with_empty_rows())
    assert statuses(cm) == ["rewritten"]
    torch.testing.assert_close(out, ref)
