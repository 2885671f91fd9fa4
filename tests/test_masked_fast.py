"""Masked attention at full speed: a mask that varies over batch and keys only (boolean key
padding, or an additive mask proven to be 0 or one blocking value per key) runs on TRITON_ATTN and
FLASH_ATTN with eager's numbers, fully masked rows included; every other mask keeps the masked
path, and `explain` says why.

TRITON_ATTN runs here on the CPU under the Triton interpreter (tests/conftest.py turns it on), in
float32 at tiny shapes. The FLASH_ATTN tests and the bf16 / CUDA-graph ones need a GPU (and
flash-attn-4) and skip without them.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fv_compile
from fv_compile.backends import flash_attn as flash_module
from fv_compile.backends.abstract import capabilities, unsupported_reason
from fv_compile.backends.flash_attn import flash_varlen_kernel
from fv_compile.backends.kernels.key_padding import KeyPadding, kept_keys, keys_first
from fv_compile.policy import dense_default
from fv_compile.site import (
    MASK_ADDITIVE_KEY_PADDING,
    MASK_KEY_PADDING,
    AttentionSite,
)

pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TOL = dict(atol=2e-3, rtol=2e-3) if CUDA else dict(atol=1e-4, rtol=1e-4)  # fp32: TF32 on a GPU
MIN32 = torch.finfo(torch.float32).min


def qkv(b=2, h=2, s=12, d=64, hk=None, dtype=torch.float32, device=DEVICE, sk=None):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, s, d, generator=g, dtype=dtype)
    k = torch.randn(b, hk or h, sk or s, d, generator=g, dtype=dtype)
    v = torch.randn(b, hk or h, sk or s, d, generator=g, dtype=dtype)
    return q.to(device), k.to(device), v.to(device)


def keep_pattern(b=2, s=12, device=DEVICE):
    """Batch 0 keeps a scattered set of keys (not a suffix pattern), batch 1 all but the last 5."""
    keep = torch.ones(b, s, dtype=torch.bool)
    keep[0, [1, 4, 5, 9]] = False
    keep[1, s - 5 :] = False
    return keep.to(device)


# --- the masks, as models write them ----------------------------------------------------------


class Sdpa(torch.nn.Module):
    """SDPA with a key mask the model builds from a boolean `keep` [B, Sk]."""

    def __init__(self, how: str = "bool", gqa: bool = False):
        super().__init__()
        self.how, self.gqa = how, gqa

    def forward(self, q, k, v, keep):
        keep = keep[:, None, None, :]
        if self.how == "bool":
            mask = keep
        elif self.how == "-inf":
            mask = torch.where(keep, 0.0, float("-inf"))
        elif self.how == "finfo.min":
            mask = (1.0 - keep.float()) * MIN32  # HF style
        else:  # a number: `(1 - keep) * value`, LTX-Video style
            mask = (1 - keep.to(q.dtype)) * float(self.how)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.gqa)


class Matmul(torch.nn.Module):
    """The unfused spelling: scores, then a fill (masked_fill) or an additive mask."""

    def __init__(self, fill: float, additive: bool = False):
        super().__init__()
        self.fill, self.additive = fill, additive

    def forward(self, q, k, v, keep):
        s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        keep = keep[:, None, None, :]
        if self.additive:  # a float32 mask: the softmax runs in float32 (HF style)
            s = s + (1.0 - keep.float()) * self.fill
        else:  # finfo.min of the scores' dtype ("min"), or a number
            s = s.masked_fill(~keep, torch.finfo(s.dtype).min if self.fill == "min" else self.fill)
        return s.softmax(-1).to(v.dtype) @ v


def run(model, backend, *args, compiler="eager"):
    """`(compiled output, eager output, the site)`. Eager SDPA runs its math kernel, PyTorch's
    definition of SDPA: its fused CUDA kernels disagree on rows with no key (measured on the
    H200: cuDNN returns neither zeros nor the mean of v in bf16, the efficient kernel zeros for
    a finfo.min mask where the math kernel gives the mean of v)."""
    cm = fv_compile.compile(model, backend, compiler=compiler)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = cm(*args)
        with sdpa_kernel([SDPBackend.MATH]):
            ref = model(*args)
    (site,) = cm.explain().sites
    return out, ref, site, cm


def assert_same(out, ref):
    assert torch.equal(out.isnan(), ref.isnan())
    torch.testing.assert_close(out, ref, equal_nan=True, **TOL)


# --- TRITON_ATTN: key padding at full speed ---------------------------------------------------


def test_boolean_key_padding_runs_on_triton_attn_and_matches_masked_sdpa():
    out, ref, site, cm = run(Sdpa("bool"), "TRITON_ATTN", *qkv(), keep_pattern())
    assert (site.backend, site.status, site.mask_kind) == (
        "TRITON_ATTN",
        "rewritten",
        MASK_KEY_PADDING,
    )
    assert "bool keys" in str(cm.explain())
    assert_same(out, ref)


@pytest.mark.parametrize("how", ["-inf", "finfo.min", "-3e38"])
def test_an_additive_key_mask_of_zero_or_one_blocking_value_runs_on_triton_attn(how):
    out, ref, site, cm = run(Sdpa(how), "TRITON_ATTN", *qkv(), keep_pattern())
    assert (site.backend, site.mask, site.mask_kind) == (
        "TRITON_ATTN",
        "additive",
        MASK_ADDITIVE_KEY_PADDING,
    )
    assert "additive keys" in str(cm.explain())
    assert_same(out, ref)


def test_an_additive_finfo_min_key_mask_in_the_unfused_spelling_runs_on_triton_attn():
    out, ref, site, _ = run(Matmul(MIN32, additive=True), "TRITON_ATTN", *qkv(), keep_pattern())
    assert (site.form, site.backend, site.mask_kind) == (
        "matmul",
        "TRITON_ATTN",
        MASK_ADDITIVE_KEY_PADDING,
    )
    assert_same(out, ref)


def test_each_batch_element_attends_its_own_number_of_keys():
    q, k, v = qkv(b=3, s=10)
    keep = (
        torch.arange(10, device=DEVICE)[None, :] < torch.tensor([10, 6, 1], device=DEVICE)[:, None]
    )
    out, _, site, _ = run(Sdpa("bool"), "TRITON_ATTN", q, k, v, keep)
    assert site.backend == "TRITON_ATTN"
    for b, n in enumerate([10, 6, 1]):  # each batch element: dense attention on its first n keys
        alone = F.scaled_dot_product_attention(
            q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n]
        )
        torch.testing.assert_close(out[b : b + 1], alone, **TOL)


def test_a_batch_element_with_a_whole_segment_of_keys_masked():
    """Joint attention: 8 video keys, then 4 text keys; batch 0 keeps no text key at all."""
    keep = torch.ones(2, 12, dtype=torch.bool, device=DEVICE)
    keep[0, 8:] = False
    keep[1, 10:] = False
    out, ref, site, _ = run(Sdpa("bool"), "TRITON_ATTN", *qkv(), keep)
    assert site.backend == "TRITON_ATTN"
    assert_same(out, ref)


EVERY_KEY_MASKED = {
    # model, what eager gives the batch element that keeps no key
    "sdpa-bool": (Sdpa("bool"), "zero"),
    "sdpa-additive--inf": (Sdpa("-inf"), "zero"),
    "sdpa-additive-finfo.min": (Sdpa("finfo.min"), "mean of v"),
    "fill--inf": (Matmul(float("-inf")), "nan"),
    "fill-finfo.min": (Matmul("min"), "mean of v"),
    "additive-finfo.min": (Matmul(MIN32, additive=True), "mean of v"),
}


@pytest.mark.parametrize("case", list(EVERY_KEY_MASKED))
def test_a_batch_element_with_every_key_masked_keeps_eagers_rows(case):
    model, eager_gives = EVERY_KEY_MASKED[case]
    q, k, v = qkv()
    keep = keep_pattern()
    keep[1] = False
    out, ref, site, _ = run(model, "TRITON_ATTN", q, k, v, keep)
    assert site.backend == "TRITON_ATTN", site.reason
    row = ref[1]
    if eager_gives == "zero":
        assert torch.equal(row, torch.zeros_like(row))
    elif eager_gives == "nan":
        assert row.isnan().all()
    else:
        torch.testing.assert_close(row, v[1].mean(1, keepdim=True).expand_as(row), **TOL)
    assert_same(out, ref)


def test_key_padding_with_grouped_query_attention():
    q, k, v = qkv(h=4, hk=2)
    out, ref, site, _ = run(Sdpa("bool", gqa=True), "TRITON_ATTN", q, k, v, keep_pattern())
    assert (site.backend, site.heads, site.kv_heads) == ("TRITON_ATTN", 4, 2)
    assert_same(out, ref)


@pytest.mark.parametrize("d", [64, 128])
def test_key_padding_at_both_head_dims_of_the_kernel_and_cross_attention(d):
    q, k, v = qkv(b=2, h=1, s=5, sk=9, d=d)
    keep = torch.tensor(
        [[1, 1, 0, 1, 1, 1, 0, 0, 1], [0, 0, 0, 0, 0, 0, 0, 1, 1]], dtype=torch.bool, device=DEVICE
    )
    out, ref, site, _ = run(Sdpa("bool"), "TRITON_ATTN", q, k, v, keep)
    assert (site.backend, site.head_dim) == ("TRITON_ATTN", d)
    assert_same(out, ref)


def test_key_padding_under_inductor():
    out, ref, site, _ = run(
        Sdpa("-inf"), "TRITON_ATTN", *qkv(), keep_pattern(), compiler="inductor"
    )
    assert site.backend == "TRITON_ATTN"
    assert_same(out, ref)


# --- masks that are not key padding keep the masked path, with the reason ----------------------


def test_an_additive_key_mask_with_a_non_blocking_value_keeps_the_masked_path():
    out, ref, site, _ = run(Sdpa("-5"), "TRITON_ATTN", *qkv(), keep_pattern())
    assert site.backend == "TORCH_SDPA" and site.mask_kind == "additive"
    assert "it takes the value -5, neither 0 nor blocking" in site.reason
    assert_same(out, ref)


@pytest.mark.parametrize("how", ["-10000", "-1e9"])
def test_an_additive_key_mask_of_a_moderate_value_keeps_the_masked_path(how):
    """-1e4 blocks only logits far above it: the mask is added, as eager adds it."""
    out, ref, site, _ = run(Sdpa(how), "TRITON_ATTN", *qkv(), keep_pattern())
    assert site.backend == "TORCH_SDPA" and "neither 0 nor blocking" in site.reason
    assert_same(out, ref)


def test_an_additive_key_mask_whose_fully_blocked_rows_rounding_decides_keeps_the_masked_path():
    """softmax(s - 1e35) blocks, but a row it blocks entirely is softmax(s) up to the rounding
    of s - 1e35, in the dtype eager adds in."""
    _, _, site, _ = run(Sdpa("-1e35"), "TRITON_ATTN", *qkv(), keep_pattern())
    assert site.backend == "TORCH_SDPA" and "which rounding decides" in site.reason


def test_an_additive_mask_handed_in_as_data_keeps_the_masked_path():
    class Given(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    mask = torch.zeros(2, 1, 1, 12, device=DEVICE).masked_fill(
        ~keep_pattern()[:, None, None, :], -math.inf
    )
    out, ref, site, _ = run(Given(), "TRITON_ATTN", *qkv(), mask)
    assert site.backend == "TORCH_SDPA" and "not known at compile time" in site.reason
    assert_same(out, ref)


def test_a_mask_that_varies_over_queries_keeps_the_masked_path():
    class PerQuery(torch.nn.Module):
        def forward(self, q, k, v, keep):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)

    keep = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(1)).to(DEVICE) > 0.3
    out, ref, site, _ = run(PerQuery(), "TRITON_ATTN", *qkv(), keep)
    assert site.backend == "TORCH_SDPA" and "boolean mask over queries or heads" in site.reason
    assert_same(out, ref)


def test_a_key_mask_with_causal_attention_keeps_the_masked_path():
    class CausalPadded(torch.nn.Module):
        def forward(self, q, k, v, keep):
            s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
            causal = torch.ones(12, 12, dtype=torch.bool, device=q.device).tril()
            s = s.masked_fill(~causal, float("-inf")).masked_fill(
                ~keep[:, None, None, :], float("-inf")
            )
            return s.softmax(-1) @ v

    keep = keep_pattern()
    keep[:, 0] = True
    out, ref, site, _ = run(CausalPadded(), "TRITON_ATTN", *qkv(), keep)
    assert site.causal and site.backend == "TORCH_SDPA"
    assert "causal attention with an attention mask" in site.reason
    assert_same(out, ref)


def test_an_additive_mask_over_queries_says_it_is_not_key_padding():
    site = AttentionSite(
        "m",
        "sdpa",
        "BHSD",
        1,
        4,
        4,
        64,
        64,
        16,
        16,
        0.125,
        mask="additive",
        dtype="float32",
        device=DEVICE,  # a device TRITON_ATTN runs on here: the mask is the only reason
    )
    why = unsupported_reason(fv_compile.get_backend("TRITON_ATTN"), site)
    assert why == (
        "additive attention mask that is not key padding: it varies over queries or heads "
        "(TRITON_ATTN takes boolean key padding masks and additive key padding masks)"
    )


# --- declarations and routing -------------------------------------------------------------------


def test_the_fast_dense_backends_declare_key_padding_without_causal():
    for name in ("TRITON_ATTN", "FLASH_ATTN"):
        caps = capabilities(fv_compile.get_backend(name))
        assert caps.mask_kinds == {MASK_KEY_PADDING, MASK_ADDITIVE_KEY_PADDING}
        assert not caps.mask_with_causal


def _long_padded_site(**kw):
    row = dict(
        batch=1,
        heads=24,
        kv_heads=24,
        head_dim=128,
        value_head_dim=128,
        q_len=119056,
        kv_len=119056,
        scale=128**-0.5,
        mask="bool",
        mask_keys_only=True,
        role="joint",
        dtype="bfloat16",
        device="cuda:0",
    )
    row.update(kw)
    return AttentionSite("blocks.0.attn", "sdpa", "BHSD", **row)


def test_auto_runs_long_key_padded_sites_on_flash_attn_4(monkeypatch):
    monkeypatch.setattr(flash_module, "flash_kernel", lambda: ("FA4", None))
    monkeypatch.setattr(flash_module, "flash_varlen_kernel", lambda: object())
    assert dense_default(_long_padded_site()) == "FLASH_ATTN"
    additive = _long_padded_site(mask="additive", mask_values=(float("-inf"), 0.0))
    assert dense_default(additive) == "FLASH_ATTN"
    assert dense_default(_long_padded_site(mask_keys_only=False)) == "TORCH_SDPA"
    assert dense_default(_long_padded_site(mask="additive", mask_values=None)) == "TORCH_SDPA"


def test_a_flash_attn_without_seqused_k_leaves_key_padded_sites_to_triton_or_sdpa(monkeypatch):
    monkeypatch.setattr(flash_module, "flash_kernel", lambda: ("FA2", None))
    monkeypatch.setattr(flash_module, "flash_varlen_kernel", lambda: None)
    why = unsupported_reason(fv_compile.get_backend("FLASH_ATTN"), _long_padded_site())
    assert why == "a key padding mask needs flash-attn-4's seqused_k (FA2 is installed)"
    assert dense_default(_long_padded_site()) == "TRITON_ATTN"  # measured: 1.32x masked SDPA
    assert dense_default(_long_padded_site(mask=None, mask_keys_only=False)) == "FLASH_ATTN"


def test_auto_gives_key_padded_sites_to_triton_only_where_measured(monkeypatch):
    """Without flash-attn-4: TRITON_ATTN beat masked SDPA at 119,056 keys; shorter masked sites
    (not measured) and unmasked ones (cuDNN beat it) stay on SDPA, and so does a head dim the
    kernel does not compile for."""
    monkeypatch.setattr(flash_module, "flash_kernel", lambda: None)
    assert dense_default(_long_padded_site()) == "TRITON_ATTN"
    assert dense_default(_long_padded_site(q_len=4096, kv_len=4096)) == "TORCH_SDPA"
    assert dense_default(_long_padded_site(mask=None, mask_keys_only=False)) == "TORCH_SDPA"
    assert dense_default(_long_padded_site(head_dim=96, value_head_dim=96)) == "TORCH_SDPA"


# --- the reorder itself -------------------------------------------------------------------------


def test_keys_first_puts_each_batch_elements_kept_keys_first_in_order():
    k = torch.arange(2 * 6, dtype=torch.float32).view(2, 6, 1, 1)
    keep = torch.tensor([[0, 1, 0, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    k2, v2, counts = keys_first(k, -k, keep)
    assert k2[0].flatten().tolist() == [1, 3, 4, 0, 2, 5]
    assert k2[1].flatten().tolist() == [6, 7, 8, 9, 10, 11]
    assert torch.equal(v2, -k2) and counts.tolist() == [3, 6] and counts.dtype == torch.int32


def test_keys_first_with_one_mask_for_the_whole_batch():
    k = torch.randn(3, 5, 2, 4)
    keep = torch.tensor([[1, 0, 1, 0, 1]], dtype=torch.bool)
    k2, _, counts = keys_first(k, k, keep)
    assert torch.equal(k2[:, :3], k[:, [0, 2, 4]]) and counts.tolist() == [3, 3, 3]


def test_an_additive_mask_is_key_padding_only_with_a_proof():
    mask = torch.zeros(1, 1, 1, 4)
    with pytest.raises(ValueError, match="only from a site whose mask fv_compile proved"):
        kept_keys(mask, 4, KeyPadding())
    assert kept_keys(mask, 4, KeyPadding(limit=-1e4)).all()
    with pytest.raises(ValueError, match="batch and keys only"):
        kept_keys(torch.ones(1, 1, 4, 4, dtype=torch.bool), 4, KeyPadding())


# --- proving a mask's values from the graph ------------------------------------------------------


def test_a_masks_values_are_proven_with_torchs_own_rounding():
    """LTX-Video's `(1 - keep.to(bf16)) * -10000.0` is -9984 in bf16, and -3.4e38 overflows
    bfloat16 to -inf: the values are those the mask holds, not the literal's."""
    q, k, v = qkv(dtype=torch.bfloat16)
    _, _, site, _ = run(Sdpa("-10000"), "TRITON_ATTN", q, k, v, keep_pattern())
    assert site.mask_values == (-9984.0, 0.0)
    assert "it takes the value -9984, neither 0 nor blocking" in site.reason
    _, _, site, _ = run(Sdpa("-3.4e38"), "TRITON_ATTN", q, k, v, keep_pattern())
    assert site.mask_values == (-math.inf, 0.0) and site.mask_kind == MASK_ADDITIVE_KEY_PADDING


def test_a_mask_written_in_place_has_values_no_proof_covers():
    class Written(torch.nn.Module):
        def forward(self, q, k, v, keep):
            mask = torch.zeros(2, 1, 1, 12, device=q.device)
            mask[..., 9:] = -3.0  # a value no op before the write shows
            mask = mask.masked_fill(~keep[:, None, None, :], float("-inf"))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    out, ref, site, _ = run(Written(), "TRITON_ATTN", *qkv(), keep_pattern())
    assert site.mask_values is None and "not known at compile time" in site.reason
    assert_same(out, ref)


# --- a real model ---------------------------------------------------------------------------------


def test_diffusers_hunyuan_video_runs_its_joint_sites_on_triton_attn():
    pytest.importorskip("diffusers")
    from fv_compile.models import from_diffusers

    config = {"attention_head_dim": 64, "rope_axes_dim": (16, 24, 24)}  # a head dim the kernel has
    model, args, kwargs = from_diffusers(
        "HunyuanVideoTransformer3DModel", config=config, batch=2, device=DEVICE
    )
    text_mask = args[3].clone()
    text_mask[1, 5:] = 0  # a CFG-like batch: the second prompt is shorter
    args = (*args[:3], text_mask)
    cm = fv_compile.compile(
        model, "TRITON_ATTN", compiler="eager", regional=False
    )  # the refiner too
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = cm(*args, **kwargs)[0]
        ref = model(*args, **kwargs)[0]
    torch.testing.assert_close(out, ref, **TOL)
    sites = cm.explain().sites
    joint = [s for s in sites if s.role == "joint"]
    assert len(joint) == 4 and all(
        s.backend == "TRITON_ATTN" and s.mask_kind == MASK_KEY_PADDING for s in joint
    )
    refiner = [s for s in sites if s.role != "joint"]  # its mask varies over queries: masked SDPA
    assert refiner and all(
        s.backend == "TORCH_SDPA" and "over queries or heads" in s.reason for s in refiner
    )


# --- on the GPU: FLASH_ATTN (flash-attn-4), bf16, CUDA graphs -----------------------------------

gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")
fa4 = pytest.mark.skipif(
    not CUDA or flash_varlen_kernel() is None, reason="needs CUDA and flash-attn-4"
)
BF16_TOL = dict(atol=2e-2, rtol=2e-2)


def _bf16(b=2, h=4, hk=None, s=1000, sk=None, d=128):
    return qkv(b=b, h=h, hk=hk, s=s, sk=sk, d=d, dtype=torch.bfloat16)


def _gpu_keep(b=2, sk=1000):
    keep = torch.rand(b, sk, generator=torch.Generator().manual_seed(3)) > 0.2  # scattered
    keep[-1, sk - 300 :] = False  # and a suffix
    return keep.cuda()


@fa4
@pytest.mark.parametrize("how", ["bool", "-inf", "finfo.min"])
@pytest.mark.parametrize("backend", ["FLASH_ATTN", "TRITON_ATTN"])
def test_gpu_key_padding_matches_exact_attention_over_the_kept_keys_in_bf16(backend, how):
    """Against float64 attention over the kept keys, not eager: on torch 2.11 + CUDA, eager SDPA
    given a float32 additive mask with bf16 q, k, v is itself off (max error 0.44 for a -inf
    mask, NaN everywhere for finfo.min, against 1.3e-3 with the same mask as booleans)."""
    q, k, v = _bf16()
    keep = _gpu_keep()
    out, _, site, _ = run(Sdpa(how), backend, q, k, v, keep, compiler="inductor")
    assert site.backend == backend
    scores = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    exact = scores.softmax(-1) @ v.double()
    torch.testing.assert_close(out.double(), exact, **BF16_TOL)


@fa4
@pytest.mark.parametrize("case", list(EVERY_KEY_MASKED))
def test_gpu_flash_attn_keeps_eagers_rows_for_a_batch_element_with_no_key(case):
    model, _ = EVERY_KEY_MASKED[case]
    q, k, v = _bf16(s=300)
    keep = _gpu_keep(sk=300)
    keep[0] = False
    out, ref, site, _ = run(model, "FLASH_ATTN", q, k, v, keep)
    assert site.backend == "FLASH_ATTN", site.reason
    assert torch.equal(out.isnan(), ref.isnan())
    torch.testing.assert_close(out.float(), ref.float(), equal_nan=True, **BF16_TOL)


@fa4
def test_gpu_flash_attn_key_padding_with_gqa_and_cross_attention():
    q, k, v = _bf16(h=8, hk=2, s=700, sk=2500)
    out, ref, site, _ = run(Sdpa("bool", gqa=True), "FLASH_ATTN", q, k, v, _gpu_keep(sk=2500))
    assert (site.backend, site.kv_heads) == ("FLASH_ATTN", 2)
    torch.testing.assert_close(out.float(), ref.float(), **BF16_TOL)


@gpu
@pytest.mark.parametrize("backend", ["FLASH_ATTN", "TRITON_ATTN"])
def test_gpu_key_padding_replays_in_a_cuda_graph_with_new_masks(backend):
    if backend == "FLASH_ATTN" and flash_varlen_kernel() is None:
        pytest.skip("needs flash-attn-4")
    q, k, v = _bf16(s=512)
    keep = _gpu_keep(sk=512)
    model = Sdpa("bool")
    cm = fv_compile.compile(model, backend, compiler="inductor", strict=True)
    with torch.no_grad():
        for _ in range(2):  # warm up: compile, kernel JIT
            cm(q, k, v, keep)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # a host sync inside would raise here
            out = cm(q, k, v, keep)
        keep.copy_(torch.rand(keep.shape, device="cuda") > 0.5)  # new lengths, same graph
        keep[0, :3] = True
        graph.replay()
        torch.cuda.synchronize()
        ref = model(q, k, v, keep)
    torch.testing.assert_close(out.float(), ref.float(), **BF16_TOL)
