"""Correctness of the Triton flash-attention forward (fv_compile/backends/kernels/flash_fwd.py).

Without CUDA the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, which
tests/conftest.py sets before any kernel is defined), so shapes stay tiny. Every launch writes
into an output poisoned with NaN, so an element the kernel never wrote fails the check. The
reference is float64 on the CPU.
"""

import math

import pytest
import torch

from fv_compile.backends.kernels.flash_fwd import FlashConfig, attention_fwd

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-4}


def reference(q, k, v, scale, causal=False, kv_lengths=None):
    """float64 softmax(q k^T * scale + masks) v, BSHD in and out; rows with no key -> 0."""
    q, k, v = (t.detach().to("cpu", torch.float64).transpose(1, 2) for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, 1)
    v = v.repeat_interleave(group, 1)
    B, Sk = k.shape[0], k.shape[2]
    if kv_lengths is not None:  # padded keys may hold garbage: they must not matter
        pad = torch.arange(Sk)[None, :] >= kv_lengths.cpu()[:, None].long()
        k = k.masked_fill(pad.view(B, 1, Sk, 1), 0.0)
        v = v.masked_fill(pad.view(B, 1, Sk, 1), 0.0)
    s = q @ k.transpose(-1, -2) * scale
    Sq = s.shape[2]
    keep = torch.ones(B, 1, Sq, Sk, dtype=torch.bool)
    if causal:
        keep &= torch.ones(Sq, Sk, dtype=torch.bool).tril()
    if kv_lengths is not None:
        keep &= (torch.arange(Sk)[None, :] < kv_lengths.cpu()[:, None].long()).view(B, 1, 1, Sk)
    s = s.masked_fill(~keep, -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ v).transpose(1, 2)


def rel_err(out, ref):
    out = out.detach().to("cpu", torch.float64)
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def run_checked(q, k, v, *, causal=False, kv_lengths=None, scale=None, **kw):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)
    ret = attention_fwd(
        q, k, v, softmax_scale=scale, causal=causal, kv_lengths=kv_lengths, out=out, **kw
    )
    assert ret is out
    assert not torch.isnan(out).any(), "unwritten or NaN output elements"
    ref = reference(q, k, v, scale, causal, kv_lengths)
    err = rel_err(out, ref)
    assert err < TOL[q.dtype], f"relative error {err:.3e}"
    return out, ref


def rand(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


# (B, Sq, Sk, H, Hk, D, causal, dtype)
CASES = [
    (1, 32, 32, 1, 1, 64, False, torch.bfloat16),
    (2, 37, 37, 2, 2, 64, True, torch.bfloat16),
    (1, 50, 77, 2, 1, 128, False, torch.float16),
    (1, 50, 77, 2, 2, 128, True, torch.bfloat16),
    (1, 70, 19, 2, 2, 64, True, torch.float16),  # more queries than keys, causal
    (1, 45, 9, 2, 2, 128, False, torch.bfloat16),  # cross-attention to a short text
    (2, 1, 33, 2, 2, 64, False, torch.float16),  # a single query
    (1, 40, 40, 4, 1, 64, True, torch.float32),
    (1, 33, 65, 2, 2, 128, False, torch.float32),
]


@pytest.mark.parametrize("B,Sq,Sk,H,Hk,D,causal,dtype", CASES)
def test_matches_float64_reference(B, Sq, Sk, H, Hk, D, causal, dtype):
    torch.manual_seed(hash((B, Sq, Sk, H, Hk, D, causal)) % 2**31)
    q, k, v = (
        rand(B, Sq, H, D, dtype=dtype),
        rand(B, Sk, Hk, D, dtype=dtype),
        rand(B, Sk, Hk, D, dtype=dtype),
    )
    run_checked(q, k, v, causal=causal)


def test_output_is_new_contiguous_tensor_of_q_dtype():
    q, k, v = rand(1, 20, 2, 64), rand(1, 24, 2, 64), rand(1, 24, 2, 64)
    out = attention_fwd(q, k, v, softmax_scale=0.125)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert rel_err(out, reference(q, k, v, 0.125)) < 1e-2


@pytest.mark.parametrize("Hk", [1, 2])
def test_gqa(Hk):
    torch.manual_seed(Hk)
    q, k, v = rand(1, 40, 4, 64), rand(1, 56, Hk, 64), rand(1, 56, Hk, 64)
    run_checked(q, k, v)
    run_checked(q, k, v, causal=True)


def _tma_available():
    return (not CUDA) or torch.cuda.get_device_capability()[0] >= 9


@pytest.mark.parametrize("use_tma", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_kv_lengths_with_fully_masked_batch(causal, use_tma):
    if use_tma and not _tma_available():
        pytest.skip("tensor descriptors need Hopper")
    torch.manual_seed(11)
    B, Sq, Sk = 4, 36, 45
    q, k, v = rand(B, Sq, 2, 64), rand(B, Sk, 2, 64), rand(B, Sk, 2, 64)
    # garbage in the padded keys must not leak (not even as NaN * 0)
    k[1, 13:] = float("inf")
    v[1, 13:] = float("nan")
    kv_lengths = torch.tensor([0, 13, Sk, 1000], dtype=torch.int32, device=DEVICE)
    out, _ = run_checked(q, k, v, causal=causal, kv_lengths=kv_lengths, use_tma=use_tma)
    assert torch.count_nonzero(out[0]) == 0, "a batch with no valid key must give zeros"


@pytest.mark.parametrize("block_m,block_n", [(64, 32), (32, 64), (16, 16)])
def test_tile_shapes(block_m, block_n):
    """Causal masking and ragged edges with query tiles wider, narrower, equal to key tiles."""
    torch.manual_seed(block_m + block_n)
    q, k, v = rand(1, 83, 2, 64), rand(1, 71, 1, 64), rand(1, 71, 1, 64)
    cfg = FlashConfig(block_m, block_n, 4, 1)
    run_checked(q, k, v, config=cfg)
    run_checked(q, k, v, causal=True, config=cfg)
    kv_lengths = torch.tensor([40], dtype=torch.int32, device=DEVICE)
    run_checked(q, k, v, causal=True, kv_lengths=kv_lengths, config=cfg)


def test_non_contiguous_views():
    torch.manual_seed(5)
    B, S, H, D = 2, 39, 2, 64
    qkv = rand(B, S, 3, H, D)  # fused projection output, sliced without copies
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    assert not q.is_contiguous()
    run_checked(q, k, v)
    # BHSD storage seen as BSHD, and a key/value pair interleaved in one buffer
    qb = rand(B, H, S, D).transpose(1, 2)
    kv = rand(B, 21, 2, H, D)
    run_checked(qb, kv[:, :, 0], kv[:, :, 1], causal=True)


def test_both_memory_paths_agree():
    """The tensor-descriptor path (Hopper) and the pointer path compute the same thing.
    The interpreter runs tensor descriptors too, so this runs on the CPU as well."""
    if not _tma_available():
        pytest.skip("tensor descriptors need Hopper")
    torch.manual_seed(3)
    q, k, v = rand(2, 45, 2, 64), rand(2, 50, 1, 64), rand(2, 50, 1, 64)
    kv_lengths = torch.tensor([50, 17], dtype=torch.int32, device=DEVICE)
    for causal in (False, True):
        a, _ = run_checked(q, k, v, causal=causal, kv_lengths=kv_lengths, use_tma=True)
        b, _ = run_checked(q, k, v, causal=causal, kv_lengths=kv_lengths, use_tma=False)
        # descriptors for k/v only, plain loads/stores for q/o
        cfg = FlashConfig(32, 32, 4, 1, tma_qo=False)
        c, _ = run_checked(q, k, v, causal=causal, kv_lengths=kv_lengths, use_tma=True, config=cfg)
        assert rel_err(a, b.double().cpu()) < 1e-2
        assert rel_err(c, b.double().cpu()) < 1e-2


def _qkv(D=64, dtype=torch.bfloat16, H=2, Hk=2):
    return (
        rand(1, 8, H, D, dtype=dtype),
        rand(1, 8, Hk, D, dtype=dtype),
        rand(1, 8, Hk, D, dtype=dtype),
    )


def test_rejects_unsupported_head_dim():
    q, k, v = _qkv(D=80)
    with pytest.raises(ValueError, match="64, 128"):
        attention_fwd(q, k, v, softmax_scale=0.1)


def test_rejects_dtype_mismatch():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="dtype"):
        attention_fwd(q, k.half(), v, softmax_scale=0.1)


def test_rejects_heads_not_multiple_of_kv_heads():
    q, k, v = _qkv(H=3, Hk=2)
    with pytest.raises(ValueError, match="multiple"):
        attention_fwd(q, k, v, softmax_scale=0.1)


def test_rejects_bad_layouts_and_lengths():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="stride"):
        attention_fwd(q.transpose(2, 3).contiguous().transpose(2, 3), k, v, softmax_scale=0.1)
    with pytest.raises(ValueError, match="4-D"):
        attention_fwd(q[0], k, v, softmax_scale=0.1)
    with pytest.raises(ValueError, match="kv_lengths"):
        attention_fwd(
            q, k, v, softmax_scale=0.1, kv_lengths=torch.ones(2, dtype=torch.int32, device=DEVICE)
        )
    with pytest.raises(ValueError, match="softmax_scale"):
        attention_fwd(q, k, v, softmax_scale=0.0)


# ---------------------------------------------------------------------------------------------
# GPU only: real tile sizes and the tuned configs (no timings here: see benchmarks/attention.py)
# ---------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_real_sizes(D, causal, dtype):
    torch.manual_seed(D + causal)
    q, k, v = (
        rand(2, 1000, 4, D, dtype=dtype),
        rand(2, 1100, 2, D, dtype=dtype),
        rand(2, 1100, 2, D, dtype=dtype),
    )
    kv_lengths = torch.tensor([1100, 555], dtype=torch.int32, device=DEVICE)
    run_checked(q, k, v, causal=causal)
    run_checked(q, k, v, causal=causal, kv_lengths=kv_lengths)
    run_checked(q, k, v, causal=causal, use_tma=False)


@pytest.mark.gpu
@gpu
def test_gpu_cross_attention_and_fused_views():
    torch.manual_seed(0)
    qkv = rand(1, 3000, 3, 4, 128)
    run_checked(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    q, k, v = rand(1, 3000, 4, 128), rand(1, 512, 4, 128), rand(1, 512, 4, 128)
    run_checked(q, k, v, kv_lengths=torch.tensor([300], dtype=torch.int32, device=DEVICE))


@pytest.mark.gpu
@gpu
def test_gpu_autotune_path(monkeypatch):
    """FV_FLASH_AUTOTUNE=1 picks among _TUNE_CONFIGS (Hopper TMA path only) and stays correct."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the autotuned path is the Hopper TMA path")
    monkeypatch.setenv("FV_FLASH_AUTOTUNE", "1")
    torch.manual_seed(1)
    q, k, v = rand(1, 700, 2, 128), rand(1, 900, 2, 128), rand(1, 900, 2, 128)
    run_checked(q, k, v)
    run_checked(q, k, v, kv_lengths=torch.tensor([333], dtype=torch.int32, device=DEVICE))
