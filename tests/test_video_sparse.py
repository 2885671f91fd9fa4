"""VIDEO_SPARSE_ATTN: the reference against the definition's easy cases, the backend (torch and
Triton paths) against the reference, forward and backward, through the pass and on its own."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import fv_compile
from fv_compile import FastVideoArgs, ForwardBatch
from fv_compile.backends.video_sparse import (
    VideoSparseAttentionImpl,
    VideoSparseMetadataBuilder,
    step_sparsity,
)
from fv_compile.backends.vsa_ops import BLOCK, video_sparse_attention
from fv_compile.backends.vsa_reference import topk_cubes, video_sparse_attention_reference
from fv_compile.errors import FvCompileError

ODD_GRID = (5, 6, 7)  # 2 x 2 x 2 cubes (4+1, 4+2, 4+3 tokens): all but the first partial
SCALE = 0.3


def args(**kw):
    return FastVideoArgs(patch_size=(1, 1, 1), **kw)


def batch(grid=ODD_GRID, **kw):
    return ForwardBatch(raw_latent_shape=(1, 4, *grid), **kw)


def qkv(grid, heads=2, dim=16, text=0, dtype=torch.float64, batch_size=1):
    s = math.prod(grid) + text
    return [torch.randn(batch_size, s, heads, dim, dtype=dtype) for _ in range(3)]


def dense(q, k, v, scale=SCALE):
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale
    )
    return out.transpose(1, 2)


def impl_for(text=0, text_first=False, scale=SCALE):
    return VideoSparseAttentionImpl(
        2, 16, scale, joint_text_len=text, joint_text_first=text_first, prefix="blocks.0.attn"
    )


def run_impl(impl, md, q, k, v, gate=None):
    """What fv_compile's op does around an impl: preprocess, forward, postprocess."""
    tq, tk, tv = (impl.preprocess_qkv(x, md) for x in (q, k, v))
    if gate is None:
        out = impl.forward(tq, tk, tv, md)
    else:
        out = impl.forward(tq, tk, tv, impl.preprocess_qkv(gate, md), md)
    return impl.postprocess_output(out, md)


def metadata(grid=ODD_GRID, sparsity=0.0, step=0):
    return VideoSparseMetadataBuilder().build(step, batch(grid), args(VSA_sparsity=sparsity))


# -- the definition -------------------------------------------------------------------------


def test_topk_is_fastvideos_count():
    assert topk_cubes(0.8, 624) == 125  # Wan-1.3B 480p: 6 x 8 x 13 cubes
    assert topk_cubes(0.0, 624) == 624
    assert topk_cubes(1.0, 624) == 1
    assert topk_cubes(0.875, 8) == 1


@pytest.mark.parametrize("text", [0, 5])
def test_reference_at_sparsity_zero_without_a_gate_is_dense_attention(text):
    q, k, v = qkv(ODD_GRID, text=text)
    got = video_sparse_attention_reference(q, k, v, ODD_GRID, 0.0, scale=SCALE, text_len=text)
    torch.testing.assert_close(got, dense(q, k, v), atol=1e-12, rtol=1e-12)


def test_reference_keeping_one_cube_attends_within_that_cube_only():
    # a grid of two cubes along time, keys of the second cube huge: every query cube keeps it
    grid = (8, 4, 4)
    q, k, v = qkv(grid, heads=1)
    q[:] = 1.0
    k[:, 64:] += 10.0
    got = video_sparse_attention_reference(q, k, v, grid, 0.5, scale=SCALE)
    want = dense(q, k[:, 64:], v[:, 64:])
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


# -- the builder ------------------------------------------------------------------------------


def test_builder_counts_cubes_of_an_odd_grid_and_keeps_topk():
    md = metadata(ODD_GRID, sparsity=0.5)
    assert md.grid == ODD_GRID and md.block_valid.tolist() == [64, 48, 32, 24, 16, 12, 8, 6]
    assert md.topk.tolist() == [4]


def test_builder_reads_the_grid_through_the_patch_size():
    fb = ForwardBatch(raw_latent_shape=(1, 16, 5, 12, 14))
    md = VideoSparseMetadataBuilder().build(0, fb, FastVideoArgs(patch_size=(1, 2, 2)))
    assert md.grid == ODD_GRID


def test_sparsity_schedule_dense_steps_then_the_batch_over_the_args():
    a = args(VSA_sparsity=0.5, vsa_dense_steps=2)
    assert step_sparsity(1, ForwardBatch(), a) == 0.0
    assert step_sparsity(2, ForwardBatch(), a) == 0.5
    assert step_sparsity(2, ForwardBatch(VSA_sparsity=0.9), a) == 0.9
    assert step_sparsity(7, ForwardBatch(), args(VSA_sparsity=(0.1, 0.2))) == 0.2


def test_bad_sparsity_and_missing_latent_are_clear_errors():
    with pytest.raises(FvCompileError, match=r"outside \[0, 1\]"):
        step_sparsity(0, ForwardBatch(), args(VSA_sparsity=1.5))
    with pytest.raises(FvCompileError, match="VIDEO_SPARSE_ATTN needs the latent shape"):
        VideoSparseMetadataBuilder().build(0, ForwardBatch(), args())


def test_causal_is_refused():
    with pytest.raises(FvCompileError, match="non-causal"):
        VideoSparseAttentionImpl(2, 16, SCALE, causal=True)


# -- the impl against the reference (torch path: head dim 16) ---------------------------------


@pytest.mark.parametrize("grid", [ODD_GRID, (4, 4, 4), (3, 9, 2)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_impl_equals_the_reference_fine_only(grid, sparsity):
    q, k, v = qkv(grid)
    got = run_impl(impl_for(), metadata(grid, sparsity), q, k, v)
    want = video_sparse_attention_reference(q, k, v, grid, sparsity, scale=SCALE)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("text_first", [False, True])
def test_impl_equals_the_reference_with_joint_text_and_a_gate(text_first):
    q, k, v = qkv(ODD_GRID, text=70)  # two text blocks, the second partial
    gate = torch.rand_like(q)
    impl = impl_for(text=70, text_first=text_first)
    got = run_impl(impl, metadata(sparsity=0.6), q, k, v, gate)
    want = video_sparse_attention_reference(
        q, k, v, ODD_GRID, 0.6, scale=SCALE, gate=gate, text_len=70, text_first=text_first
    )
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_impl_at_sparsity_zero_is_dense_attention():
    q, k, v = qkv(ODD_GRID, text=3)
    got = run_impl(impl_for(text=3), metadata(sparsity=0.0), q, k, v)
    torch.testing.assert_close(got, dense(q, k, v), atol=1e-12, rtol=1e-12)


def test_a_stale_latent_shape_is_a_clear_error():
    q, k, v = qkv((5, 6, 8))
    with pytest.raises(FvCompileError, match="raw_latent_shape"):
        run_impl(impl_for(), metadata(ODD_GRID), q, k, v)


def test_padding_slots_never_reach_the_output():
    # a padding slot reads a real token: poisoning every token a slot reads twice would show
    q, k, v = qkv(ODD_GRID)
    md = metadata(sparsity=0.5)
    impl = impl_for()
    tq, tk, tv = (impl.preprocess_qkv(x, md) for x in (q, k, v))
    pad = torch.ones(tq.shape[1], dtype=torch.bool)
    pad[impl._order(md)[1]] = False
    for t in (tq, tk, tv):
        t[:, pad] = float("nan")
    out = impl.postprocess_output(impl.forward(tq, tk, tv, md), md)
    want = video_sparse_attention_reference(q, k, v, ODD_GRID, 0.5, scale=SCALE)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)


# -- gradients (torch path) -------------------------------------------------------------------


def _grads(fn, tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    grad_out = torch.randn(
        out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    return out, torch.autograd.grad(out, leaves, grad_out.to(out.device, out.dtype))


@pytest.mark.parametrize("gated", [False, True])
def test_op_gradients_equal_the_references_including_the_gate(gated):
    q, k, v = qkv(ODD_GRID, text=5)
    gate = torch.rand_like(q)
    impl = impl_for(text=5)
    md = metadata(sparsity=0.6)
    inputs = [q, k, v, gate] if gated else [q, k, v]

    def ours(*xs):
        return run_impl(impl, md, *xs)

    def ref(*xs):
        g = xs[3] if gated else None
        return video_sparse_attention_reference(
            *xs[:3], ODD_GRID, 0.6, scale=SCALE, gate=g, text_len=5
        )

    out, grads = _grads(ours, inputs)
    want_out, want = _grads(ref, inputs)
    torch.testing.assert_close(out, want_out, atol=1e-12, rtol=1e-12)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


def test_impl_backward_equals_the_references():
    q, k, v = qkv(ODD_GRID, text=5)
    impl = impl_for(text=5)
    md = metadata(sparsity=0.6)
    grad = torch.randn_like(q)
    got = impl.backward(grad, q, k, v, md)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out = video_sparse_attention_reference(*leaves, ODD_GRID, 0.6, scale=SCALE, text_len=5)
    want = torch.autograd.grad(out, leaves, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("gated", [False, True])
def test_op_passes_opcheck(gated):
    from fv_compile.backends.vsa_ops import video_sparse_attention_saving

    q, k, v, gate = (torch.randn(1, 128, 2, 16, dtype=torch.float64) for _ in range(4))
    valid = torch.tensor([64, 30], dtype=torch.int32)
    topk = torch.tensor([1], dtype=torch.int32)
    args = (q, k, v, gate if gated else None, valid, topk, 2, SCALE)
    torch.library.opcheck(video_sparse_attention_saving, args)


def test_op_is_traced_without_a_graph_break():
    q, k, v = (x.float() for x in qkv((4, 4, 4)))
    valid = torch.tensor([64], dtype=torch.int32)
    topk = torch.tensor([1], dtype=torch.int32)
    fn = torch.compile(
        lambda q, k, v: video_sparse_attention(q, k, v, None, valid, topk, 1, SCALE),
        backend="aot_eager",
        fullgraph=True,
    )
    torch.testing.assert_close(fn(q, k, v), dense(q, k, v), atol=1e-5, rtol=1e-5)
    assert q.shape[1] == BLOCK


# -- through the pass -------------------------------------------------------------------------


class Block(torch.nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.heads = heads
        self.attend = None  # a replacement attention on [B, S, H, D] (the reference), or SDPA

    def forward(self, h):
        b, s, c = h.shape
        q, k, v = self.qkv(h).view(b, s, 3, self.heads, c // self.heads).unbind(2)
        if self.attend is not None:
            return self.attend(q, k, v).reshape(b, s, c)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return o.transpose(1, 2).reshape(b, s, c)


class VideoDiT(torch.nn.Module):
    def __init__(self, layers=2, dim=32, heads=2):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x):
        for blk in self.blocks:
            x = x + blk(x)
        return self.out(x)


def reference_model(model, grid, sparsity):
    """`model` with every attention the VSA reference (float64 inside)."""
    import copy

    ref = copy.deepcopy(model)
    for blk in ref.blocks:
        d = blk.qkv.out_features // 3 // blk.heads

        def attend(q, k, v, d=d):
            out = video_sparse_attention_reference(
                q.double(), k.double(), v.double(), grid, sparsity, scale=d**-0.5
            )
            return out.to(q.dtype)

        blk.attend = attend
    return ref


def test_sites_of_a_model_run_vsa_and_match_the_reference():
    model = VideoDiT().eval()
    x = torch.randn(1, math.prod(ODD_GRID), 32)
    cm = fv_compile.compile(model, "VIDEO_SPARSE_ATTN", compiler="eager")
    with torch.no_grad(), fv_compile.forward_context(0, batch(), args(VSA_sparsity=0.6)):
        out = cm(x)
    assert {s.backend for s in cm.explain().sites} == {"VIDEO_SPARSE_ATTN"}
    with torch.no_grad():
        want = reference_model(model, ODD_GRID, 0.6)(x)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_a_sparsity_schedule_runs_fifty_steps_on_one_graph():
    model = VideoDiT().eval()
    x = torch.randn(1, math.prod(ODD_GRID), 32)
    cm = fv_compile.compile(model, "VIDEO_SPARSE_ATTN", compiler="eager")
    schedule = [0.0] * 5 + [min(0.9, 0.03 * i) for i in range(45)]  # FastVideo's ramp
    a = args(vsa_dense_steps=5)
    counters.clear()
    with torch.no_grad():
        refs = {s: reference_model(model, ODD_GRID, s) for s in set(schedule)}
        for step, sparsity in enumerate(schedule):
            fb = batch(VSA_sparsity=sparsity if step >= 5 else 0.7)  # dense steps win
            with fv_compile.forward_context(step, fb, a):
                out = cm(x)
            want = refs[sparsity](x) if step >= 5 else model(x)
            torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    assert cm.variants_compiled == 1


@pytest.mark.parametrize("head_dim", [16, 64])  # the torch path; the Triton kernels
def test_a_compiled_model_trains_like_the_reference(head_dim):
    torch.manual_seed(0)
    dim = 2 * head_dim
    model = VideoDiT(dim=dim)
    ref = reference_model(model, ODD_GRID, 0.6)
    cm = fv_compile.compile(model, "VIDEO_SPARSE_ATTN", compiler="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    x, target = (torch.randn(1, math.prod(ODD_GRID), dim) for _ in range(2))
    for step in range(3):
        with fv_compile.forward_context(step, batch(), args(VSA_sparsity=0.6)):
            loss = F.mse_loss(cm(x), target)
        ref_loss = F.mse_loss(ref(x), target)
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
        for o in (opt, ref_opt):
            o.zero_grad()
        loss.backward()
        ref_loss.backward()
        for p, rp in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, rp.grad, atol=1e-5, rtol=1e-5)
        opt.step()
        ref_opt.step()


# -- the Triton path (the interpreter on the CPU): head dim 64 ---------------------------------


@pytest.mark.parametrize("gated", [False, True])
def test_the_triton_fine_stage_equals_the_reference(gated):
    q, k, v = qkv(ODD_GRID, dim=64, text=5, dtype=torch.float32, batch_size=2)
    gate = torch.rand_like(q) if gated else None
    impl = VideoSparseAttentionImpl(2, 64, 0.125, joint_text_len=5)
    got = run_impl(impl, metadata(sparsity=0.6), q, k, v, gate)
    want = video_sparse_attention_reference(
        *(x.double() for x in (q, k, v)),
        ODD_GRID,
        0.6,
        scale=0.125,
        gate=None if gate is None else gate.double(),
        text_len=5,
    )
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dim", [64, 48])
def test_triton_cube_means_skip_padding_rows_whatever_they_hold(dim):
    from fv_compile.backends.kernels.cube_pool import cube_means

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # (the CPU runs it interpreted)
    valid = torch.tensor([64, 5, 0, 33], dtype=torch.int32, device=dev)
    x = torch.randn(2, 4 * BLOCK + 64, 3, dim, device=dev)  # a text block after the cubes
    rows = torch.arange(BLOCK, device=dev)[None, :] < valid[:, None].long()
    x[:, : 4 * BLOCK].view(2, 4, BLOCK, 3, dim)[:, ~rows] = float("nan")
    x = x.transpose(2, 3).contiguous().transpose(2, 3)  # strided, as a view may be
    got = cube_means(x, valid, 4, BLOCK)
    cubes = x[:, : 4 * BLOCK].unflatten(1, (4, BLOCK)).double()
    kept = torch.where(rows[None, :, :, None, None], cubes, 0.0).sum(2)
    want = (kept / valid.clamp(min=1)[None, :, None, None]).transpose(1, 2)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)
    assert got.dtype == torch.float32 and got.shape == (2, 3, 4, dim)


def test_transposed_lists_name_the_query_blocks_that_list_each_key_block():
    from fv_compile.backends.kernels.block_sparse_bwd import transposed_lists

    idx = torch.tensor([[[2, 0, 1], [1, 2, 0], [0, 1, 2]]], dtype=torch.int32)
    cnt = torch.tensor([[1, 2, 3]], dtype=torch.int32)
    q_idx, q_cnt = transposed_lists(idx, cnt)
    assert q_cnt.tolist() == [[1, 2, 3]]
    assert [q_idx[0, n, : q_cnt[0, n]].tolist() for n in range(3)] == [[2], [1, 2], [0, 1, 2]]


def test_transposed_lists_order_every_key_blocks_row_listing_blocks_first():
    """Random top-k lists: each key block's row holds the query blocks listing it, ascending,
    then every other query block, ascending (the kernel reads only the first `count`)."""
    from fv_compile.backends.kernels.block_sparse_bwd import transposed_lists

    g = torch.Generator().manual_seed(0)
    rows, nb = 3, 9
    idx = torch.stack([torch.randperm(nb, generator=g) for _ in range(rows * nb)])
    idx = idx.view(rows, nb, nb).to(torch.int32)
    cnt = torch.randint(0, nb + 1, (rows, nb), generator=g, dtype=torch.int32)
    q_idx, q_cnt = transposed_lists(idx, cnt)
    for r in range(rows):
        for n in range(nb):
            listing = [m for m in range(nb) if n in idx[r, m, : cnt[r, m]].tolist()]
            rest = [m for m in range(nb) if m not in listing]
            assert q_cnt[r, n] == len(listing)
            assert q_idx[r, n].tolist() == listing + rest


@pytest.mark.parametrize("gated", [False, True])
def test_triton_gradients_equal_the_references(gated):
    q, k, v = qkv(ODD_GRID, dim=64, text=5, dtype=torch.float32, batch_size=2)
    gate = torch.rand_like(q)
    impl = VideoSparseAttentionImpl(2, 64, 0.125, joint_text_len=5)
    md = metadata(sparsity=0.6)
    inputs = [q, k, v, gate] if gated else [q, k, v]

    def ref(*xs):
        xs = [x.double() for x in xs]
        g = xs[3] if gated else None
        return video_sparse_attention_reference(
            *xs[:3], ODD_GRID, 0.6, scale=0.125, gate=g, text_len=5
        )

    _, grads = _grads(lambda *xs: run_impl(impl, md, *xs), inputs)
    _, want = _grads(ref, inputs)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g.double(), w.double(), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("gated", [False, True])
def test_triton_backward_reuses_the_forwards_fine_stage(gated, monkeypatch):
    from fv_compile.backends.kernels import block_sparse_fwd

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # (the CPU runs it interpreted)
    q, k, v = (x.to(dev) for x in qkv(ODD_GRID, dim=64, text=5, dtype=torch.float32))
    gate = torch.rand_like(q)
    impl = VideoSparseAttentionImpl(2, 64, 0.125, joint_text_len=5)
    md = VideoSparseMetadataBuilder().build(0, batch(), args(VSA_sparsity=0.6))
    md.tile_index, md.untile_index, md.block_valid, md.topk = (
        x.to(dev) for x in (md.tile_index, md.untile_index, md.block_valid, md.topk)
    )
    calls = []
    kernel = block_sparse_fwd.block_sparse_attention_fwd
    monkeypatch.setattr(
        block_sparse_fwd,
        "block_sparse_attention_fwd",
        lambda *a, **kw: calls.append(1) or kernel(*a, **kw),
    )
    inputs = [q, k, v, gate] if gated else [q, k, v]
    _grads(lambda *xs: run_impl(impl, md, *xs), inputs)
    assert len(calls) == 1  # the forward's; the backward ran on its saved output and lse


def test_triton_impl_backward_equals_the_references():
    q, k, v = qkv(ODD_GRID, dim=64, dtype=torch.float32)
    impl = VideoSparseAttentionImpl(2, 64, 0.125)
    grad = torch.randn_like(q)
    got = impl.backward(grad, q, k, v, metadata(sparsity=0.7))
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    out = video_sparse_attention_reference(*leaves, ODD_GRID, 0.7, scale=0.125)
    want = torch.autograd.grad(out, leaves, grad.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=2e-5, rtol=2e-5)


def test_gqa_ranks_cubes_per_query_head_and_sums_key_gradients_per_kv_head():
    q = torch.randn(1, math.prod(ODD_GRID), 2, 16, dtype=torch.float64)
    k, v = (torch.randn(1, math.prod(ODD_GRID), 1, 16, dtype=torch.float64) for _ in range(2))
    impl, md = impl_for(), metadata(sparsity=0.6)
    grad = torch.randn_like(q)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    want = video_sparse_attention_reference(
        leaves[0], *(x.repeat_interleave(2, 2) for x in leaves[1:]), ODD_GRID, 0.6, scale=SCALE
    )
    want_grads = torch.autograd.grad(want, leaves, grad)
    torch.testing.assert_close(run_impl(impl, md, q, k, v), want, atol=1e-12, rtol=1e-12)
    for g, w in zip(impl.backward(grad, q, k, v, md), want_grads):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


def test_float64_runs_on_the_torch_path_where_the_kernels_would_run():
    q, k, v = qkv(ODD_GRID, dim=64)  # float64: the interpreter runs the kernels for float32
    got = run_impl(VideoSparseAttentionImpl(2, 64, 0.125), metadata(sparsity=0.5), q, k, v)
    want = video_sparse_attention_reference(q, k, v, ODD_GRID, 0.5, scale=0.125)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_the_forward_kernel_returns_each_rows_log2_sum_exp2_for_per_batch_lists():
    from fv_compile.backends.kernels.block_sparse_fwd import block_sparse_attention_fwd
    from fv_compile.backends.vsa_ops import _fine_torch, top_cube_lists

    q, k, v = qkv((4, 4, 8), dim=64, dtype=torch.float32, batch_size=2)  # two full cubes
    scores = torch.randn(2, 2, 2, 2)
    idx, cnt = top_cube_lists(scores, torch.tensor([1], dtype=torch.int32), 2)
    valid = torch.tensor([64, 64], dtype=torch.int32)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # (the CPU runs it interpreted)
    lse = torch.empty(2, 2, 128, device=dev)
    out = block_sparse_attention_fwd(
        *(x.to(dev) for x in (q, k, v, idx, cnt, valid)),
        block_size=64,
        softmax_scale=0.125,
        lists_per_batch=True,
        lse=lse,
    ).cpu()
    lse = lse.cpu()
    want_out = _fine_torch(q.double(), k.double(), v.double(), idx, cnt, valid, 0.125)
    torch.testing.assert_close(out, want_out.float(), atol=2e-5, rtol=2e-5)
    # row r of (b, h) attends the cube its list keeps: log2(sum exp2(s)) over that cube's keys
    logits = 0.125 * torch.einsum("bqhd,bkhd->bhqk", q, k) * math.log2(math.e)
    kept = idx.view(2, 2, 2, 2)[..., 0].repeat_interleave(64, -1)  # [B, H, L]: the kept cube
    cube_of_key = torch.arange(128) // 64
    logits = logits.masked_fill(cube_of_key != kept[..., None], float("-inf"))
    want = torch.logsumexp(logits / math.log2(math.e), -1) * math.log2(math.e)
    torch.testing.assert_close(lse, want, atol=1e-4, rtol=1e-5)


class JointDiT(torch.nn.Module):
    """Text joins the video inside each block (HunyuanVideo's double blocks), text last."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block(dim, heads) for _ in range(2))

    def forward(self, x, text):
        n = x.shape[1]
        for blk in self.blocks:
            out = blk(torch.cat([x, text], 1))
            x, text = x + out[:, :n], text + out[:, n:]
        return x


def test_joint_text_sites_attend_and_are_attended_densely_through_the_pass():
    model = JointDiT().eval()
    x, text = torch.randn(1, math.prod(ODD_GRID), 32), torch.randn(1, 7, 32)
    cm = fv_compile.compile(model, "VIDEO_SPARSE_ATTN", compiler="eager", regional=False)
    with torch.no_grad(), fv_compile.forward_context(0, batch(), args(VSA_sparsity=0.6)):
        out = cm(x, text)
    sites = cm.explain().sites
    assert {(s.role, s.backend) for s in sites} == {("joint", "VIDEO_SPARSE_ATTN")}
    ref = JointDiT().eval()
    ref.load_state_dict(model.state_dict())
    for blk in ref.blocks:
        blk.attend = lambda q, k, v: video_sparse_attention_reference(
            q.double(), k.double(), v.double(), ODD_GRID, 0.6, scale=16**-0.5, text_len=7
        ).float()
    with torch.no_grad():
        torch.testing.assert_close(out, ref(x, text), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head_dim", [16, 64])  # the torch path; the Triton kernels
def test_a_training_graph_runs_vsa_on_what_its_forward_saved(head_dim, monkeypatch):
    """A site that trains runs as the impl's own code in the graph, so the VSA op's backward
    gets the forward's lists and row statistics: no impl backward recomputing the forward.
    Joint text of 7 tokens fills one block of 64 slots; the partial cubes and that block's
    padding slots are read by the gather and must pass no gradient to the token they read."""
    from fv_compile.backends import video_sparse

    def recomputing(*a, **kw):
        raise AssertionError("the impl's recomputing backward ran")

    monkeypatch.setattr(video_sparse.VideoSparseAttentionImpl, "backward", recomputing)
    torch.manual_seed(0)
    dim = 2 * head_dim
    model = JointDiT(dim=dim)
    ref = JointDiT(dim=dim)
    ref.load_state_dict(model.state_dict())
    for blk in ref.blocks:
        blk.attend = lambda q, k, v: video_sparse_attention_reference(
            q.double(), k.double(), v.double(), ODD_GRID, 0.6, scale=head_dim**-0.5, text_len=7
        ).to(q.dtype)
    x, text = torch.randn(1, math.prod(ODD_GRID), dim), torch.randn(1, 7, dim)
    x, text = x.requires_grad_(), text.requires_grad_()
    cm = fv_compile.compile(model, "VIDEO_SPARSE_ATTN", compiler="aot_eager", regional=False)
    with fv_compile.forward_context(0, batch(), args(VSA_sparsity=0.6)):
        out = cm(x, text)
    want = ref(x, text)
    assert [s.trains for s in cm.explain().sites] == [True, True]
    g = torch.randn_like(want)
    got = torch.autograd.grad(out, [x, text, *model.parameters()], g)
    expected = torch.autograd.grad(want, [x, text, *ref.parameters()], g)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_the_gpu_a_traced_training_site_gives_the_ops_gradients(monkeypatch):
    """The Triton kernels on the GPU: the traced site's gradients (the op's saved backward,
    through the cube gather) equal those of the op with the impl's own backward, padding slots
    of partial cubes and of the text block included."""
    from fv_compile import lowering

    def grads(traced: bool):
        with monkeypatch.context() as m:
            if not traced:
                m.setattr(lowering, "_traced_in_training", lambda *a: False)
            torch.manual_seed(0)
            model = JointDiT(dim=128).cuda()
            x = torch.randn(1, math.prod(ODD_GRID), 128, device="cuda", requires_grad=True)
            text = torch.randn(1, 7, 128, device="cuda", requires_grad=True)
            cm = fv_compile.compile(
                model, "VIDEO_SPARSE_ATTN", compiler="aot_eager", regional=False
            )
            with fv_compile.forward_context(0, batch(), args(VSA_sparsity=0.6)):
                out = cm(x, text)
            g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).cuda()
            return torch.autograd.grad(out, [x, text, *model.parameters()], g)

    for a, b in zip(grads(True), grads(False)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


# -- verify: a VSA site is held to its definition -------------------------------------------


def test_the_definition_equals_the_raster_reference_with_joint_text():
    q, k, v = qkv(ODD_GRID, text=5)
    impl = impl_for(text=5, text_first=True)
    md = metadata(sparsity=0.6)
    want = video_sparse_attention_reference(
        q, k, v, ODD_GRID, 0.6, scale=SCALE, text_len=5, text_first=True
    )
    torch.testing.assert_close(impl.reference(q, k, v, md).double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model, text", [(VideoDiT, 0), (JointDiT, 7)])
def test_verify_holds_vsa_sites_to_their_definition(model, text):
    m = model().eval()
    x = torch.randn(1, math.prod(ODD_GRID), 32)
    inputs = (x,) if not text else (x, torch.randn(1, text, 32))
    with fv_compile.forward_context(0, batch(), args(VSA_sparsity=0.6)):
        report = fv_compile.verify(m, *inputs, attention_backend="VIDEO_SPARSE_ATTN")
    assert report.verified and len(report.rewritten) == 2
    for site in report.rewritten:
        assert site.check.against == "definition" and site.check.output.rel_l2 < 1e-5
        assert site.check.traced.rel_l2 > 1e-2  # the sparsity: shown, not held against it


def test_verify_fails_a_vsa_kernel_that_drops_a_kept_cube(monkeypatch):
    from fv_compile.backends import vsa_ops

    real = vsa_ops.fine_stage

    def drops_one(q, k, v, kv_indices, kv_counts, *rest, **kw):
        return real(q, k, v, kv_indices, (kv_counts - 1).clamp(min=1), *rest, **kw)

    monkeypatch.setattr(vsa_ops, "fine_stage", drops_one)
    m = VideoDiT().eval()
    x = torch.randn(1, math.prod(ODD_GRID), 32)
    with fv_compile.forward_context(0, batch(), args(VSA_sparsity=0.6)):
        report = fv_compile.verify(m, x, attention_backend="VIDEO_SPARSE_ATTN")
    assert not report.verified
    assert all(not s.check.ok and s.check.against == "definition" for s in report.rewritten)


def test_the_definition_ignores_an_impl_ranking_that_is_no_top_k(monkeypatch):
    from fv_compile.backends import video_sparse

    real = video_sparse.top_cube_lists
    monkeypatch.setattr(video_sparse, "top_cube_lists", lambda s, *a: real(-s, *a))  # worst first
    q, k, v = qkv(ODD_GRID)
    want = video_sparse_attention_reference(q, k, v, ODD_GRID, 0.6, scale=SCALE)
    got = impl_for().reference(q, k, v, metadata(sparsity=0.6))
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_verify_backward_holds_vsa_gradients_to_the_definition():
    m = VideoDiT().train()
    x = torch.randn(1, math.prod(ODD_GRID), 32, requires_grad=True)
    with fv_compile.forward_context(0, batch(), args(VSA_sparsity=0.6)):
        report = fv_compile.verify(m, x, attention_backend="VIDEO_SPARSE_ATTN", backward=True)
    assert report.verified and len(report.rewritten) == 2
    for site in report.rewritten:
        assert site.check.against == "definition" and len(site.check.gradients) == 3
        assert all(g.rel_l2 < 1e-4 for g in site.check.gradients)


def test_a_joint_site_whose_text_outgrows_the_video_says_so():
    """Fewer video tokens than text: the longest piece, taken for the video, is the text."""
    from tests.test_sliding_tile import VideoDiT

    grid = (4, 4, 4)
    n = math.prod(grid)
    cm = fv_compile.compile(
        VideoDiT(text_first=True).eval(), "VIDEO_SPARSE_ATTN", compiler="eager", regional=False
    )
    args = FastVideoArgs(patch_size=(1, 1, 1), VSA_sparsity=0.5)
    video, text = torch.randn(1, n, 32), torch.randn(1, 2 * n, 32)
    with (
        torch.no_grad(),
        fv_compile.forward_context(0, ForwardBatch(raw_latent_shape=(1, 4, *grid)), args),
        pytest.raises(fv_compile.FvCompileError, match="took its longest piece"),
    ):
        cm(video, text)
