"""Video sparse attention on tile-major tensors: the coarse stage, the top-k block lists, the fine
block-sparse stage, their backward, and the custom ops (with fakes and an autograd formula) that
make the whole of it one differentiable call.

Layout: q, k, v (and the gate) are `[B, L, H, D]` with `L = n_blocks * 64`; blocks
`[0, n_video)` are the video's (4, 4, 4) cubes, the rest hold joint attention's text; block n's
first `block_valid[n]` rows are tokens, the others padding that nothing reads (pooling skips it,
the fine stage masks it, its gradients are zero). `topk` is a 1-element int32 tensor, so a
sparsity schedule changes a tensor, never the graph.

Lists: every query row lists all blocks, text first, then the video cubes in falling coarse
score; its count is `n_text + topk` for a video cube, all blocks for text. The list width never
depends on `topk`: one shape for every sparsity. The fine stage's forward runs on
`kernels/block_sparse_fwd.py` (lists per batch element and head) where Triton runs (CUDA or its
interpreter, head dim 64/128), and so does its backward, on `kernels/block_sparse_bwd.py`, from
the forward's saved fine output, row statistics and lists (a backward handed only q, k, v, as
fv_compile's graph op hands an impl, recomputes them); elsewhere both are masked dense torch
(materialising `[B, H, L, L]`: small sizes only).

The coarse stage is the cubes' means (`kernels/cube_pool.py` where Triton runs, else torch), a
`[n_cubes, n_cubes]` softmax per head and an argsort: at Wan-1.3B 480p it is 624 cubes, cheap
beside the fine stage; its backward is
written out (recomputed from q, k, v: it is cheap). No autograd runs inside the ops: a custom
op's body runs below autograd.
"""

from __future__ import annotations

import torch

from fv_compile.backends.block_lists import block_mask
from fv_compile.backends.kernels import TRITON_HEAD_DIMS, interpreting

BLOCK = 64  # tokens per block: a (4, 4, 4) cube, and a block of text
_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # what the Triton kernels take


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _valid_rows(block_valid: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """bool `[n_blocks, BLOCK]`: which rows of each block are tokens."""
    rows = torch.arange(BLOCK, device=block_valid.device)
    return rows[None, :] < block_valid[:n_blocks, None]


def pool_cubes(x: torch.Tensor, block_valid: torch.Tensor, n_video: int) -> torch.Tensor:
    """`[B, H, n_video, D]`: the mean of each video cube's tokens (padding excluded), in float32
    at least."""
    if (x.is_cuda or interpreting()) and x.dtype in _KERNEL_DTYPES:
        from fv_compile.backends.kernels.cube_pool import cube_means

        return cube_means(x, block_valid, n_video, BLOCK)
    cubes = x[:, : n_video * BLOCK].unflatten(1, (n_video, BLOCK))
    keep = _valid_rows(block_valid, n_video)[None, :, :, None, None]
    # masked in x's dtype, summed in float32 at least: one pass, no float32 copy of x
    total = torch.where(keep, cubes, 0.0).sum(2, dtype=_compute_dtype(x.dtype))  # [B, Nv, H, D]
    count = block_valid[:n_video].to(total.dtype).clamp(min=1)
    return (total / count[None, :, None, None]).transpose(1, 2)


def coarse_stage(q, k, v, block_valid, n_video: int, scale: float):
    """`(coarse_out [B, H, Nv, Dv], coarse_scores [B, H, Nv, Nv])`: softmax attention between
    the cubes' mean query, key and value."""
    qc, kc, vc = (pool_cubes(x, block_valid, n_video) for x in (q, k, v))
    scores = scale * qc @ kc.transpose(-2, -1)
    return scores.softmax(-1) @ vc, scores


def top_cube_lists(
    coarse_scores: torch.Tensor, topk: torch.Tensor, n_blocks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(kv_indices int32 [B*H, n_blocks, n_blocks], kv_counts int32 [B*H, n_blocks])`: for each
    (batch, head) row and query block, the text blocks and then the video cubes by falling coarse
    score, and how many of them it attends (text: all)."""
    b, h, nv, _ = coarse_scores.shape
    n_text = n_blocks - nv
    dev = coarse_scores.device
    order = coarse_scores.argsort(dim=-1, descending=True, stable=True).to(torch.int32)
    keep = topk.reshape(()).to(torch.int32).clamp(1, nv)
    counts = (keep + n_text).expand(b, h, nv)
    if n_text:
        text = torch.arange(nv, n_blocks, dtype=torch.int32, device=dev).expand(b, h, nv, n_text)
        every = torch.arange(n_blocks, dtype=torch.int32, device=dev).expand(b, h, n_text, n_blocks)
        order = torch.cat([torch.cat([text, order], -1), every], 2)
        counts = torch.cat([counts, counts.new_full((b, h, n_text), n_blocks)], -1)
    return (
        order.reshape(b * h, n_blocks, n_blocks).contiguous(),
        counts.reshape(b * h, n_blocks).contiguous(),
    )


def coarse_per_token(coarse: torch.Tensor, block_valid: torch.Tensor, n_blocks: int):
    """`[B, L, H, Dv]`: each video token's cube's coarse output; 0 on text and padding rows."""
    b, h, nv, dv = coarse.shape
    rows = coarse.transpose(1, 2)[:, :, None].expand(b, nv, BLOCK, h, dv)
    rows = rows * _valid_rows(block_valid, nv)[None, :, :, None, None]
    rows = rows.reshape(b, nv * BLOCK, h, dv)
    return torch.nn.functional.pad(rows, (0, 0, 0, 0, 0, (n_blocks - nv) * BLOCK))


def _use_kernel(q: torch.Tensor) -> bool:
    """Whether the Triton kernels run this call (float64, say, runs on the torch path)."""
    return (
        (q.is_cuda or interpreting())
        and q.shape[-1] in TRITON_HEAD_DIMS
        and q.dtype in _KERNEL_DTYPES
    )


def _fine_weights(q, k, kv_indices, kv_counts, block_valid, scale):
    """`(p [B, H, L, L], has_key [B, H, L, 1], token [1, L, 1, 1])` of the fine stage as masked
    dense attention: a row without a key (padding included) attends anything, then is zeroed
    (no NaN, no gradient); padding rows and columns are zeroed before the logits (padding may
    hold anything: NaN * 0 = NaN), as the kernel does."""
    b, length, h, _ = q.shape
    mask = block_mask(kv_indices, kv_counts, block_valid, BLOCK).view(b, h, length, length)
    has_key = mask.any(-1, keepdim=True)
    token = _valid_rows(block_valid, length // BLOCK).reshape(1, length, 1, 1)
    qt, kt = (_zero_padding(x, token).transpose(1, 2) for x in (q, k))
    scores = (scale * qt @ kt.transpose(-2, -1)).masked_fill(~(mask | ~has_key), float("-inf"))
    return scores.softmax(-1) * has_key, has_key, token


def _zero_padding(x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    return torch.where(token, x, 0.0).to(_compute_dtype(x.dtype))


def _fine_torch(q, k, v, kv_indices, kv_counts, block_valid, scale):
    p, _, token = _fine_weights(q, k, kv_indices, kv_counts, block_valid, scale)
    return (p @ _zero_padding(v, token).transpose(1, 2)).transpose(1, 2)


def fine_stage(q, k, v, kv_indices, kv_counts, block_valid, scale, lse=None):
    """`[B, L, H, Dv]` block-sparse attention over per-(batch, head) lists, in q's dtype (with
    `lse`, a float32 `[B, H, L]` the kernel fills in for the backward)."""
    if _use_kernel(q):
        from fv_compile.backends.kernels.block_sparse_fwd import block_sparse_attention_fwd

        return block_sparse_attention_fwd(
            q,
            k,
            v,
            kv_indices,
            kv_counts,
            block_valid,
            block_size=BLOCK,
            softmax_scale=scale,
            lists_per_batch=True,
            lse=lse,
        )
    return _fine_torch(q, k, v, kv_indices, kv_counts, block_valid, scale).to(q.dtype)


def vsa_forward(q, k, v, gate, block_valid, topk, n_video: int, scale: float) -> torch.Tensor:
    """VSA on tile-major `[B, L, H, D]` tensors: fine + gate * coarse (fine only without a
    gate), in q's dtype."""
    return _vsa_forward_saving(q, k, v, gate, block_valid, topk, n_video, scale)[0]


def _vsa_forward_saving(q, k, v, gate, block_valid, topk, n_video: int, scale: float):
    """`(out, fine, lse, kv_indices, kv_counts)`: `vsa_forward`'s output and what its backward
    needs from it: the fine stage's output (`out` itself without a gate) and float32 row
    statistics `[B, H, L]` (zeros where the torch path runs: its backward recomputes), and the
    block lists."""
    n_blocks = q.shape[1] // BLOCK
    coarse, scores = coarse_stage(q, k, v, block_valid, n_video, scale)
    kv_indices, kv_counts = top_cube_lists(scores, topk, n_blocks)
    b, length, h, _ = q.shape
    lse = torch.zeros((b, h, length), dtype=torch.float32, device=q.device)
    fine = fine_stage(
        q, k, v, kv_indices, kv_counts, block_valid, scale, lse=lse if _use_kernel(q) else None
    )
    out = fine if gate is None else (fine + gate * coarse_per_token(coarse, block_valid, n_blocks))
    return out.to(q.dtype), fine, lse, kv_indices, kv_counts


def _fine_backward(grad, q, k, v, kv_indices, kv_counts, block_valid, scale, saved=None):
    """`[dq, dk, dv]` of `fine_stage` (zero on padding rows); `saved`, the forward's `(fine
    output, lse)`, spares the kernel path a second forward."""
    if _use_kernel(q):
        from fv_compile.backends.kernels.block_sparse_bwd import block_sparse_attention_bwd

        if saved is None:
            b, length, h, _ = q.shape
            lse = torch.empty((b, h, length), dtype=torch.float32, device=q.device)
            out = fine_stage(q, k, v, kv_indices, kv_counts, block_valid, scale, lse=lse)
        else:
            out, lse = saved
        return block_sparse_attention_bwd(
            grad, q, k, v, out, lse, kv_indices, kv_counts, block_valid, BLOCK, scale
        )
    p, _, token = _fine_weights(q, k, kv_indices, kv_counts, block_valid, scale)
    qt, kt, vt, go = (_zero_padding(x, token).transpose(1, 2) for x in (q, k, v, grad))
    dv = p.transpose(-2, -1) @ go
    dp = go @ vt.transpose(-2, -1)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq, dk = scale * ds @ kt, scale * ds.transpose(-2, -1) @ qt
    return [g.transpose(1, 2).to(x.dtype) for g, x in zip((dq, dk, dv), (q, k, v))]


def _coarse_backward(d_per_token, q, k, v, block_valid, n_video: int, scale: float):
    """`[dq, dk, dv]` (`[B, L, H, D]`) of `coarse_per_token(coarse_stage(q, k, v)[0])` for the
    gradient `d_per_token` of its output."""
    n_blocks = q.shape[1] // BLOCK
    qc, kc, vc = (pool_cubes(x, block_valid, n_video) for x in (q, k, v))
    count = block_valid[:n_video].to(qc.dtype).clamp(min=1)[:, None]  # [Nv, 1]
    p = (scale * qc @ kc.transpose(-2, -1)).softmax(-1)
    d_coarse = pool_cubes(d_per_token, block_valid, n_video) * count  # each cube's rows, summed
    dvc = p.transpose(-2, -1) @ d_coarse
    dp = d_coarse @ vc.transpose(-2, -1)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dqc, dkc = scale * ds @ kc, scale * ds.transpose(-2, -1) @ qc
    # the mean's gradient: each valid row of a cube gets its cube's gradient over its count
    return [coarse_per_token(g / count, block_valid, n_blocks) for g in (dqc, dkc, dvc)]


def vsa_backward(grad, q, k, v, gate, block_valid, topk, n_video: int, scale: float, saved=None):
    """`[dq, dk, dv]` (+ `dgate` with a gate) of `vsa_forward`; the top-k choice is the
    forward's (recomputed from the same inputs, or `saved`: `(fine, lse, kv_indices,
    kv_counts)` from `_vsa_forward_saving`) and passes no gradient (a selection)."""
    n_blocks = q.shape[1] // BLOCK
    dt = _compute_dtype(q.dtype)
    coarse = None
    if saved is None:
        coarse, scores = coarse_stage(q, k, v, block_valid, n_video, scale)
        kv_indices, kv_counts = top_cube_lists(scores, topk, n_blocks)
        fine_saved = None
    else:
        fine, lse, kv_indices, kv_counts = saved
        fine_saved = (fine, lse)
    dq, dk, dv = _fine_backward(
        grad, q, k, v, kv_indices, kv_counts, block_valid, scale, saved=fine_saved
    )
    if gate is None:
        return [dq, dk, dv]
    if coarse is None:
        coarse = coarse_stage(q, k, v, block_valid, n_video, scale)[0]
    dgate = grad.to(dt) * coarse_per_token(coarse, block_valid, n_blocks)
    coarse_grads = _coarse_backward(grad.to(dt) * gate.to(dt), q, k, v, block_valid, n_video, scale)
    dq, dk, dv = (
        (g.to(dt) + c).to(x.dtype) for g, c, x in zip((dq, dk, dv), coarse_grads, (q, k, v))
    )
    return [dq, dk, dv, dgate.to(gate.dtype)]


# -- custom ops: one differentiable call, opaque to Dynamo and Inductor ---------------------------


def video_sparse_attention(q, k, v, gate, block_valid, topk, n_video: int, scale: float):
    """`vsa_forward` on tile-major `[B, L, H, D]` tensors (`gate` `[B, L, H, Dv]` or None),
    differentiable in q, k, v and the gate; its backward reuses the forward's block lists and
    row statistics (no second forward)."""
    return video_sparse_attention_saving(q, k, v, gate, block_valid, topk, n_video, scale)[0]


@torch.library.custom_op("fv_compile::video_sparse_attention", mutates_args=())
def video_sparse_attention_saving(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor | None,
    block_valid: torch.Tensor,
    topk: torch.Tensor,
    n_video: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(out, fine, lse, kv_indices, kv_counts)` of `_vsa_forward_saving`; `fine` is empty
    without a gate (it is `out`, and an op's outputs may not alias). Only `out` is
    differentiable."""
    out, fine, lse, kv_indices, kv_counts = _vsa_forward_saving(
        q, k, v, gate, block_valid, topk, n_video, scale
    )
    fine = fine.contiguous() if gate is not None else q.new_empty(0)
    return out.contiguous(), fine, lse, kv_indices, kv_counts


@video_sparse_attention_saving.register_fake
def _video_sparse_attention_saving_fake(q, k, v, gate, block_valid, topk, n_video, scale):
    b, length, h, _ = q.shape
    n_blocks = length // BLOCK
    out = q.new_empty((b, length, h, v.shape[-1]))
    fine = q.new_empty(out.shape if gate is not None else (0,))
    lse = q.new_empty((b, h, length), dtype=torch.float32)
    kv_indices = q.new_empty((b * h, n_blocks, n_blocks), dtype=torch.int32)
    kv_counts = q.new_empty((b * h, n_blocks), dtype=torch.int32)
    return out, fine, lse, kv_indices, kv_counts


@torch.library.custom_op("fv_compile::video_sparse_attention_backward", mutates_args=())
def video_sparse_attention_backward(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor | None,
    block_valid: torch.Tensor,
    topk: torch.Tensor,
    fine: torch.Tensor,
    lse: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    n_video: int,
    scale: float,
) -> list[torch.Tensor]:
    """`[dq, dk, dv]`, and `dgate` when there is a gate (see `vsa_backward`), from the
    forward's saved fine output, row statistics and lists."""
    saved = (fine, lse, kv_indices, kv_counts)
    grads = vsa_backward(grad, q, k, v, gate, block_valid, topk, n_video, scale, saved=saved)
    return [g.contiguous() for g in grads]


@video_sparse_attention_backward.register_fake
def _video_sparse_attention_backward_fake(
    grad, q, k, v, gate, block_valid, topk, fine, lse, kv_indices, kv_counts, n_video, scale
):
    out = [x.new_empty(x.shape) for x in (q, k, v)]
    if gate is not None:
        out.append(gate.new_empty(gate.shape))
    return out


def _setup_context(ctx, inputs, output):
    q, k, v, gate, block_valid, topk, n_video, scale = inputs
    out, fine, lse, kv_indices, kv_counts = output
    ctx.mark_non_differentiable(fine, lse, kv_indices, kv_counts)
    ctx.save_for_backward(
        q, k, v, gate, block_valid, topk, out if gate is None else fine, lse, kv_indices, kv_counts
    )
    ctx.n_video, ctx.scale = n_video, scale


def _backward(ctx, grad, *_non_differentiable):
    q, k, v, gate, block_valid, topk, fine, lse, kv_indices, kv_counts = ctx.saved_tensors
    grads = torch.ops.fv_compile.video_sparse_attention_backward(
        grad,
        q,
        k,
        v,
        gate,
        block_valid,
        topk,
        fine,
        lse,
        kv_indices,
        kv_counts,
        ctx.n_video,
        ctx.scale,
    )
    dgate = grads[3] if gate is not None else None
    return grads[0], grads[1], grads[2], dgate, None, None, None, None


video_sparse_attention_saving.register_autograd(_backward, setup_context=_setup_context)
