"""Block lists: which key blocks each query block of a tile-major sequence attends to, the text
blocks joint attention adds to them, and attention over them (kernel dispatch, and the dense
reference the kernels are checked against).

Lists are `(kv_indices [Hm, Q, K], kv_counts [Hm, Q], block_valid [n_blocks])`: query block q of
head h attends to key blocks `kv_indices[h, q, :kv_counts[h, q]]`, and block n holds
`block_valid[n]` real tokens, first (see `kernels/block_sparse_fwd.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fv_compile.backends.kernels import TRITON_HEAD_DIMS, interpreting


def with_text_blocks(idx, cnt, valid, text: int, volume: int, text_attends_all: bool):
    """Add `ceil(text / volume)` text blocks after the video tiles to block lists `[Hm, Q, K]`."""
    hm, n_video, k = idx.shape
    n_text = -(-text // volume)
    total = n_video + n_text
    dev = idx.device
    text_ids = torch.arange(n_video, total, dtype=torch.int32, device=dev)
    text_valid = (text - torch.arange(n_text, device=dev) * volume).clamp(0, volume).to(torch.int32)
    width = total if text_attends_all else max(k, n_text)
    video_rows = F.pad(idx, (0, width - k))
    if text_attends_all:
        at = cnt[..., None].long() + torch.arange(n_text, device=dev)
        video_rows = video_rows.scatter(-1, at, text_ids.expand(hm, n_video, n_text))
        text_rows = torch.arange(total, dtype=torch.int32, device=dev).expand(hm, n_text, width)
        counts = torch.cat([cnt + n_text, cnt.new_full((hm, n_text), total)], 1)
    else:
        text_rows = F.pad(text_ids.expand(hm, n_text, n_text), (0, width - n_text))
        counts = torch.cat([cnt, cnt.new_full((hm, n_text), n_text)], 1)
    return torch.cat([video_rows, text_rows], 1), counts, torch.cat([valid, text_valid])


def block_sparse_attention(
    q, k, v, kv_indices, kv_counts, block_valid, block_size, scale, key_mask=None
):
    """Attention over tile-major tensors visiting only the listed key blocks (and, with
    `key_mask` `[B|1, L]`, only the keys it keeps)."""
    kernel_ok = (
        (q.is_cuda or interpreting()) and q.shape[-1] in TRITON_HEAD_DIMS and block_size % 16 == 0
    )
    if kernel_ok:
        from fv_compile.backends.kernels.block_sparse_fwd import (
            block_sparse_attention_fwd,  # imports triton
        )

        return block_sparse_attention_fwd(
            q,
            k,
            v,
            kv_indices,
            kv_counts,
            block_valid,
            block_size=block_size,
            softmax_scale=scale,
            key_mask=key_mask,
        )
    return block_sparse_reference(
        q, k, v, kv_indices, kv_counts, block_valid, block_size, scale, key_mask
    )


def block_mask(kv_indices, kv_counts, block_valid, block_size: int) -> torch.Tensor:
    """The boolean `[Hm, L, L]` token mask that block lists describe (True = attend)."""
    hm, nq, _ = kv_indices.shape
    nb = block_valid.shape[0]
    listed = torch.zeros(hm, nq, nb + 1, dtype=torch.bool, device=kv_indices.device)
    k_pos = torch.arange(kv_indices.shape[-1], device=kv_indices.device)
    live = k_pos < kv_counts[..., None]
    # entries past a row's count point at a spare column, so they can never clear a listed block
    listed.scatter_(-1, torch.where(live, kv_indices.long(), nb), True)
    listed = listed[..., :nb]
    local = torch.arange(block_size, device=kv_indices.device)
    key_ok = (local[None, :] < block_valid[:, None].to(local.device)).reshape(-1)
    mask = listed.repeat_interleave(block_size, 1).repeat_interleave(block_size, 2)
    return mask & key_ok


def block_sparse_reference(
    q, k, v, kv_indices, kv_counts, block_valid, block_size, scale, key_mask=None
):
    """Dense SDPA with the block lists' mask; rows without a key (padding) give 0."""
    mask = block_mask(kv_indices, kv_counts, block_valid, block_size)[None]
    if key_mask is not None:
        mask = mask & key_mask[:, None, None, :]
    h, hk = q.shape[2], k.shape[2]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    if hk != h:
        kt, vt = kt.repeat_interleave(h // hk, 1), vt.repeat_interleave(h // hk, 1)
    scores = (qt.float() @ kt.float().transpose(-2, -1)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.nan_to_num(scores.softmax(-1))
    return (probs @ vt.float()).to(q.dtype).transpose(1, 2)
