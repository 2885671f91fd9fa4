"""Correctness of the block-sparse flash-attention forward
(fv_compile/backends/kernels/block_sparse_fwd.py).

Without CUDA the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, which
tests/conftest.py sets before any kernel is defined), so shapes stay tiny. Every launch writes
into an output poisoned with NaN, and the padding rows of q/k/v hold garbage (inf/NaN), so an
unwritten element or a padded key that leaks fails the check. The reference is float64 dense
attention on the CPU with the boolean mask built straight from the definition (block lists x
valid rows).
"""

import math

import pytest
import torch

from fv_compile.backends.kernels.block_sparse_fwd import (
    BlockSparseConfig,
    block_sparse_attention_fwd,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-4}
# the interpreter warns about the NaN garbage planted in padded query rows (those rows are zeroed)
pytestmark = pytest.mark.filterwarnings("ignore:All-NaN slice", "ignore:invalid value encountered")


# ---------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------


def dense_mask(kv_indices, kv_counts, block_valid, block_size, H):
    """bool [H, L, L] from the definition: row r (block qb) sees column c (block kb) iff kb is in
    qb's list and c's local index < block_valid[kb]; rows with local index >= block_valid[qb] see
    nothing (they are written as 0)."""
    idx, cnt, valid = kv_indices.cpu().long(), kv_counts.cpu().long(), block_valid.cpu().long()
    Hm, NB, _ = idx.shape
    L = NB * block_size
    local = torch.arange(L) % block_size
    blk = torch.arange(L) // block_size
    key_ok = local < valid[blk]  # [L]
    masks = []
    for hm in range(Hm):
        bm = torch.zeros(NB, NB, dtype=torch.bool)  # block-level: [qb, kb]
        for qb in range(NB):
            for j in range(int(cnt[hm, qb])):
                bm[qb, idx[hm, qb, j]] = True
        m = bm[blk][:, blk] & key_ok[None, :] & key_ok[:, None]
        masks.append(m)
    m = torch.stack(masks)
    return m.expand(H, L, L) if Hm == 1 else m


def reference(q, k, v, mask, scale):
    """float64 masked attention, BSHD in and out; rows with no visible key -> 0."""
    q, k, v = (t.detach().to("cpu", torch.float64).transpose(1, 2) for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, 1)
    v = v.repeat_interleave(group, 1)
    # masked-out keys may hold garbage: it must not matter
    s = (q.nan_to_num(0.0, 0.0, 0.0) @ k.nan_to_num(0.0, 0.0, 0.0).transpose(-1, -2)) * scale
    s = s.masked_fill(~(mask if mask.dim() == 4 else mask[None]), -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ v.nan_to_num(0.0, 0.0, 0.0)).transpose(1, 2)


def rel_err(out, ref):
    out = out.detach().to("cpu", torch.float64)
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------


def make_qkv(B, NB, bs, H, Hk, D, dtype, block_valid):
    L = NB * bs
    q = torch.randn(B, L, H, D, dtype=dtype, device=DEVICE)
    k = torch.randn(B, L, Hk, D, dtype=dtype, device=DEVICE)
    v = torch.randn(B, L, Hk, D, dtype=dtype, device=DEVICE)
    # garbage in the padding rows: padded keys must be masked, padded values must not leak
    pad = (torch.arange(L, device=DEVICE) % bs) >= block_valid.to(DEVICE).long().repeat_interleave(
        bs
    )
    q[:, pad] = float("nan")
    k[:, pad] = float("inf")
    v[:, pad] = float("nan")
    return q, k, v


def random_lists(Hm, NB, max_kv, gen, empty_rows=(), full_rows=()):
    """Distinct random key blocks per (head, query block), in random order; counts in [0, max_kv]."""
    idx = torch.full((Hm, NB, max_kv), -1, dtype=torch.int32)
    cnt = torch.zeros((Hm, NB), dtype=torch.int32)
    for h in range(Hm):
        for qb in range(NB):
            if qb in empty_rows:
                n = 0
            elif qb in full_rows:
                n = min(NB, max_kv)
            else:
                n = int(torch.randint(0, min(NB, max_kv) + 1, (1,), generator=gen))
            perm = torch.randperm(NB, generator=gen)[:n].to(torch.int32)
            idx[h, qb, :n] = perm
            cnt[h, qb] = n
    return idx.to(DEVICE), cnt.to(DEVICE)


def _tma_available():
    return (not CUDA) or torch.cuda.get_device_capability()[0] >= 9


def run_checked(q, k, v, idx, cnt, valid, bs, scale=None, key_mask=None, **kw):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)
    ret = block_sparse_attention_fwd(
        q,
        k,
        v,
        idx,
        cnt,
        valid,
        block_size=bs,
        softmax_scale=scale,
        out=out,
        key_mask=key_mask,
        **kw,
    )
    assert ret is out
    assert not torch.isnan(out).any(), "unwritten or NaN output elements"
    mask = dense_mask(idx, cnt, valid, bs, q.shape[2])
    if key_mask is not None:  # [B|1, L] -> per batch element
        mask = mask[None] & key_mask.cpu().bool()[:, None, None, :]
    ref = reference(q, k, v, mask, scale)
    err = rel_err(out, ref)
    assert err < TOL[q.dtype], f"relative error {err:.3e}"
    # padded query rows are exactly zero
    L = q.shape[1]
    pad = (torch.arange(L) % bs) >= valid.cpu().long().repeat_interleave(bs)
    assert torch.count_nonzero(out.cpu()[:, pad]) == 0
    return out, ref


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------

# (B, NB, bs, H, Hk, Hm, D, dtype)
CASES = [
    (1, 5, 32, 2, 2, 1, 64, torch.bfloat16),  # shared lists
    (1, 4, 48, 2, 2, 2, 64, torch.bfloat16),  # per-head lists, 48-row tiles (16-wide sub-tiles)
    (2, 4, 32, 4, 1, 4, 64, torch.float16),  # GQA 4:1, per-head lists, batch 2
    (1, 3, 64, 2, 1, 1, 128, torch.bfloat16),  # GQA, D128
    (1, 4, 32, 2, 2, 2, 128, torch.float32),
    (1, 5, 48, 2, 1, 1, 64, torch.float32),
]


@pytest.mark.parametrize("B,NB,bs,H,Hk,Hm,D,dtype", CASES)
def test_random_lists_match_float64_reference(B, NB, bs, H, Hk, Hm, D, dtype):
    gen = torch.Generator().manual_seed(hash((B, NB, bs, H, Hk, Hm, D)) % 2**31)
    # partial blocks: some padded, one of pure padding, one full
    valid = torch.randint(1, bs + 1, (NB,), generator=gen, dtype=torch.int32)
    valid[0] = bs
    if NB > 3:
        valid[2] = 0
    valid = valid.to(DEVICE)
    idx, cnt = random_lists(Hm, NB, NB, gen, empty_rows=(1,), full_rows=(NB - 1,))
    q, k, v = make_qkv(B, NB, bs, H, Hk, D, dtype, valid)
    # both memory paths: pointers, and tensor descriptors (the interpreter runs them too)
    paths = [False] + ([True] if _tma_available() else [])
    for use_tma in paths:
        out, _ = run_checked(q, k, v, idx, cnt, valid, bs, use_tma=use_tma)
        # a query block with an empty list gives zeros
        assert torch.count_nonzero(out[:, bs : 2 * bs].float().cpu()) == 0


def test_full_lists_equal_dense_attention_over_valid_keys():
    torch.manual_seed(1)
    NB, bs, H, D = 4, 32, 2, 64
    valid = torch.tensor([32, 20, 32, 7], dtype=torch.int32, device=DEVICE)
    idx = torch.arange(NB, dtype=torch.int32, device=DEVICE).flip(0).expand(1, NB, NB).contiguous()
    cnt = torch.full((1, NB), NB, dtype=torch.int32, device=DEVICE)
    q, k, v = make_qkv(1, NB, bs, H, H, D, torch.float32, valid)
    out = block_sparse_attention_fwd(q, k, v, idx, cnt, valid, block_size=bs, softmax_scale=0.125)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    # dense attention over the compacted valid tokens
    keep = (torch.arange(NB * bs, device=DEVICE) % bs) < valid.long().repeat_interleave(bs)
    qc, kc, vc = (t[:, keep].double().transpose(1, 2) for t in (q, k, v))
    dense = torch.softmax(qc @ kc.transpose(-1, -2) * 0.125, -1) @ vc
    assert rel_err(out[:, keep], dense.transpose(1, 2).cpu()) < 1e-4


def test_empty_lists_give_zeros():
    NB, bs = 3, 32
    valid = torch.full((NB,), bs, dtype=torch.int32, device=DEVICE)
    idx = torch.zeros((1, NB, 2), dtype=torch.int32, device=DEVICE)
    cnt = torch.zeros((1, NB), dtype=torch.int32, device=DEVICE)
    q, k, v = make_qkv(1, NB, bs, 2, 2, 64, torch.bfloat16, valid)
    out, _ = run_checked(q, k, v, idx, cnt, valid, bs)
    assert torch.count_nonzero(out.float()) == 0


def test_shared_and_per_head_lists_agree():
    """Per-head lists that repeat the shared list give the shared result; different per-head
    lists give different heads."""
    gen = torch.Generator().manual_seed(7)
    NB, bs, H = 4, 32, 3
    valid = torch.tensor([32, 16, 32, 30], dtype=torch.int32, device=DEVICE)
    idx1, cnt1 = random_lists(1, NB, 3, gen)
    q, k, v = make_qkv(1, NB, bs, H, H, 64, torch.float32, valid)
    a, _ = run_checked(q, k, v, idx1, cnt1, valid, bs)
    b, _ = run_checked(
        q, k, v, idx1.expand(H, -1, -1).contiguous(), cnt1.expand(H, -1).contiguous(), valid, bs
    )
    assert torch.equal(a, b)
    idxh, cnth = random_lists(H, NB, 3, gen)
    run_checked(q, k, v, idxh, cnth, valid, bs)


@pytest.mark.parametrize("use_tma", [False, True])
def test_memory_paths_and_views(use_tma):
    """Both memory paths (the interpreter runs tensor descriptors too) on strided views:
    q/k/v sliced out of one fused projection without copies."""
    if use_tma and not _tma_available():
        pytest.skip("tensor descriptors need Hopper")
    gen = torch.Generator().manual_seed(3)
    NB, bs, H, D = 3, 48, 2, 64
    valid = torch.tensor([48, 33, 17], dtype=torch.int32, device=DEVICE)
    qkv = torch.randn(1, NB * bs, 3, H, D, dtype=torch.bfloat16, device=DEVICE)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    assert not q.is_contiguous()
    idx, cnt = random_lists(1, NB, NB, gen, full_rows=(0,))
    run_checked(q, k, v, idx, cnt, valid, bs, use_tma=use_tma)


@pytest.mark.parametrize(
    "block_m,block_n,prefetch", [(32, 16, False), (16, 32, False), (32, 16, True)]
)
def test_tile_shapes(block_m, block_n, prefetch):
    gen = torch.Generator().manual_seed(block_m + block_n)
    NB, bs = 3, 32
    valid = torch.tensor([32, 5, 21], dtype=torch.int32, device=DEVICE)
    idx, cnt = random_lists(1, NB, NB, gen, full_rows=(1,))
    q, k, v = make_qkv(1, NB, bs, 2, 1, 64, torch.float16, valid)
    run_checked(
        q,
        k,
        v,
        idx,
        cnt,
        valid,
        bs,
        config=BlockSparseConfig(block_m, block_n, 4, 1, False, prefetch),
    )


# block valid counts whose last live 32-row sub-tile holds <= 16 rows (a tail: 40, 10, 48), more
# (50), exactly 16 (16) or none (0, 64)
TAIL_VALID = [40, 10, 50, 0, 64, 16, 48]


@pytest.mark.parametrize("key_mask", [False, True])
def test_query_tails_run_in_their_own_launch_and_match_the_reference(key_mask):
    """With tail_m, sub-tiles with few live rows are computed by the second launch of short
    tiles: every live row is still attended, every padded row zero, with or without a key mask."""
    gen = torch.Generator().manual_seed(11)
    NB, bs, B = len(TAIL_VALID), 64, 2
    valid = torch.tensor(TAIL_VALID, dtype=torch.int32, device=DEVICE)
    idx, cnt = random_lists(2, NB, 4, gen, full_rows=(0, 1, 2))
    q, k, v = make_qkv(B, NB, bs, 2, 1, 64, torch.bfloat16, valid)
    km = None
    if key_mask:
        km = torch.rand(B, NB * bs, generator=gen) > 0.3
        km = km.to(DEVICE)
    run_checked(
        q, k, v, idx, cnt, valid, bs, key_mask=km, config=BlockSparseConfig(32, 16, 4, 1, tail_m=16)
    )


def test_query_tails_leave_output_and_lse_unchanged():
    """Tails on or off, the kernel computes the same rows the same way: outputs and the saved
    log-sum-exp agree (a tail row redone by the short launch must overwrite the main launch's)."""
    gen = torch.Generator().manual_seed(12)
    NB, bs, H = len(TAIL_VALID), 64, 2
    valid = torch.tensor(TAIL_VALID, dtype=torch.int32, device=DEVICE)
    idx, cnt = random_lists(H, NB, 3, gen, full_rows=(0, 1))
    q, k, v = make_qkv(1, NB, bs, H, H, 64, torch.float16, valid)
    results = []
    for tail_m in (0, 16):
        lse = torch.full((1, H, NB * bs), float("nan"), device=DEVICE)
        out = block_sparse_attention_fwd(
            q,
            k,
            v,
            idx,
            cnt,
            valid,
            block_size=bs,
            softmax_scale=0.125,
            lse=lse,
            config=BlockSparseConfig(32, 16, 4, 1, tail_m=tail_m),
        )
        results.append((out, lse))
    (out0, lse0), (out1, lse1) = results
    assert not torch.isnan(lse1).any(), "a tail row's log-sum-exp was never written"
    torch.testing.assert_close(out1, out0, rtol=0, atol=2e-3)
    torch.testing.assert_close(lse1, lse0, rtol=0, atol=1e-4)


def test_query_tails_that_do_not_divide_the_tile_are_turned_off():
    """A tail_m that is not a proper divisor of the fitted block_m is dropped, not run wrong."""
    from fv_compile.backends.kernels.block_sparse_fwd import _fit

    assert _fit(BlockSparseConfig(128, 128, 8, 3, tail_m=64), 384).tail_m == 64
    assert _fit(BlockSparseConfig(128, 128, 8, 3, tail_m=64), 48).tail_m == 0  # block_m 16
    assert _fit(BlockSparseConfig(128, 128, 8, 3, tail_m=48), 384).tail_m == 0
    assert _fit(BlockSparseConfig(128, 128, 8, 3, tail_m=128), 384).tail_m == 0


def test_out_of_range_entries_are_ignored():
    """Indices outside [0, n_blocks) are skipped and counts are clamped, never read out of bounds."""
    NB, bs = 3, 32
    valid = torch.full((NB,), bs, dtype=torch.int32, device=DEVICE)
    idx = torch.tensor([[[0, 7, 2], [-1, 1, 0], [2, 2, 2]]], dtype=torch.int32, device=DEVICE)
    cnt = torch.tensor([[3, 9, 1]], dtype=torch.int32, device=DEVICE)
    q, k, v = make_qkv(1, NB, bs, 1, 1, 64, torch.float32, valid)
    out = block_sparse_attention_fwd(q, k, v, idx, cnt, valid, block_size=bs, softmax_scale=0.125)
    clean_idx = torch.tensor([[[0, 2, 0], [1, 0, 0], [2, 0, 0]]], dtype=torch.int32, device=DEVICE)
    clean_cnt = torch.tensor([[2, 2, 1]], dtype=torch.int32, device=DEVICE)
    ref = reference(q, k, v, dense_mask(clean_idx, clean_cnt, valid, bs, 1), 0.125)
    assert rel_err(out, ref) < 1e-4


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------


def _args(NB=2, bs=32, H=2, D=64, Hm=1, max_kv=2):
    q = torch.randn(1, NB * bs, H, D, dtype=torch.bfloat16, device=DEVICE)
    idx = torch.zeros((Hm, NB, max_kv), dtype=torch.int32, device=DEVICE)
    cnt = torch.ones((Hm, NB), dtype=torch.int32, device=DEVICE)
    valid = torch.full((NB,), bs, dtype=torch.int32, device=DEVICE)
    return q, q.clone(), q.clone(), idx, cnt, valid


def _call(q, k, v, idx, cnt, valid, bs=32, scale=0.125):
    return block_sparse_attention_fwd(q, k, v, idx, cnt, valid, block_size=bs, softmax_scale=scale)


@pytest.mark.parametrize("batch_mask", [1, 2])
def test_key_mask_hides_keys_per_batch_element(batch_mask):
    """A key padding mask on top of the lists: masked keys get no weight, in full and partial
    blocks alike; a row whose visible keys are all masked is 0."""
    gen = torch.Generator().manual_seed(5)
    B, NB, bs, H = 2, 4, 32, 2
    valid = torch.tensor([32, 20, 32, 9], dtype=torch.int32, device=DEVICE)
    idx, cnt = random_lists(1, NB, 3, gen, full_rows=(0, 1))
    q, k, v = make_qkv(B, NB, bs, H, H, 64, torch.float32, valid)
    key_mask = torch.rand(batch_mask, NB * bs, generator=gen) > 0.4
    key_mask[:, 2 * bs : 3 * bs] = False  # one whole block masked out
    run_checked(q, k, v, idx, cnt, valid, bs, key_mask=key_mask.to(DEVICE))


def test_rejects_key_mask_of_the_wrong_shape():
    valid = torch.full((2,), 32, dtype=torch.int32, device=DEVICE)
    idx, cnt = random_lists(1, 2, 2, torch.Generator().manual_seed(0))
    q, k, v = make_qkv(1, 2, 32, 2, 2, 64, torch.float32, valid)
    with pytest.raises(ValueError, match="key_mask must be a"):
        block_sparse_attention_fwd(
            q,
            k,
            v,
            idx,
            cnt,
            valid,
            block_size=32,
            softmax_scale=0.1,
            key_mask=torch.ones(1, 63, dtype=torch.bool, device=DEVICE),
        )


def test_rejects_block_size_not_multiple_of_16():
    q, k, v, idx, cnt, valid = _args(bs=24)
    with pytest.raises(ValueError, match="block_size"):
        _call(q, k, v, idx, cnt, valid, bs=24)


def test_rejects_length_not_multiple_of_block_size():
    q, k, v, idx, cnt, valid = _args()
    with pytest.raises(ValueError, match="multiple of block_size"):
        _call(q[:, :50], k[:, :50], v[:, :50], idx, cnt, valid)


def test_rejects_bad_index_dtypes_and_shapes():
    q, k, v, idx, cnt, valid = _args()
    with pytest.raises(ValueError, match=r"kv_indices.*int32"):
        _call(q, k, v, idx.long(), cnt, valid)
    with pytest.raises(ValueError, match=r"kv_counts.*int32"):
        _call(q, k, v, idx, cnt.long(), valid)
    with pytest.raises(ValueError, match=r"block_valid.*int32"):
        _call(q, k, v, idx, cnt, valid.long())
    with pytest.raises(ValueError, match="kv_indices"):
        _call(q, k, v, idx[:, :1], cnt, valid)  # wrong n_blocks
    with pytest.raises(ValueError, match="kv_indices"):
        _call(q, k, v, idx.expand(3, -1, -1), cnt, valid)  # Hm not in (1, H)
    with pytest.raises(ValueError, match="kv_counts"):
        _call(q, k, v, idx, cnt[:, :1], valid)
    with pytest.raises(ValueError, match="block_valid"):
        _call(q, k, v, idx, cnt, valid[:1])
    with pytest.raises(ValueError, match="kv_indices"):
        _call(q, k, v, idx[0], cnt, valid)  # 2-D


def test_rejects_head_dim_80():
    q, k, v, idx, cnt, valid = _args(D=80)
    with pytest.raises(ValueError, match="head_dim 80"):
        _call(q, k, v, idx, cnt, valid)


def test_rejects_other_bad_inputs():
    q, k, v, idx, cnt, valid = _args()
    with pytest.raises(ValueError, match="dtype"):
        _call(q, k.half(), v, idx, cnt, valid)
    with pytest.raises(ValueError, match="softmax_scale"):
        _call(q, k, v, idx, cnt, valid, scale=0.0)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        q3 = torch.randn(1, 64, 3, 64, dtype=torch.bfloat16, device=DEVICE)
        _call(q3, k, v, idx, cnt, valid)
    with pytest.raises(ValueError, match="stride"):
        _call(q.transpose(2, 3).contiguous().transpose(2, 3), k, v, idx, cnt, valid)


# ---------------------------------------------------------------------------------------------
# GPU only: real tile size (384 = 6x8x8) and the tuned configs
# ---------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_real_tiles(D, dtype):
    gen = torch.Generator().manual_seed(D)
    NB, bs, H = 6, 384, 2
    valid = torch.tensor([384, 144, 320, 0, 200, 72], dtype=torch.int32, device=DEVICE)
    idx, cnt = random_lists(H, NB, 4, gen, empty_rows=(1,), full_rows=(0,))
    q, k, v = make_qkv(1, NB, bs, H, 1, D, dtype, valid)
    run_checked(q, k, v, idx, cnt, valid, bs)
    run_checked(q, k, v, idx, cnt, valid, bs, use_tma=False)
    run_checked(q, k, v, idx, cnt, valid, bs, config=BlockSparseConfig(128, 64, 8, 3))
    tails = BlockSparseConfig(128, 128, 8, 3, False, True, tail_m=64)
    run_checked(q, k, v, idx, cnt, valid, bs, config=tails)
    run_checked(q, k, v, idx, cnt, valid, bs, config=tails, use_tma=False)
