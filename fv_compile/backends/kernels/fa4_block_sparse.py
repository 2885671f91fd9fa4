"""Block-list attention through flash-attn-4's block-sparse forward (``flash_attn.cute``).

Our block lists (``block_sparse_fwd.py``'s contract) name *tiles* of ``block_size`` rows whose
first ``block_valid[n]`` rows are tokens. FA4 instead takes, per query block of its own tile
height, two lists of key blocks of its tile width (128 rows on Hopper): *full* blocks (computed
without a mask) and *mask* blocks (a ``mask_mod`` decides per element). This module re-expresses
our lists at 128-row *pieces*:

* a key piece whose 128 rows are all tokens is a full block;
* the piece holding the ragged end of a padded tile is a mask block; the mask_mod reads a
  per-(batch, row) table of the keys to attend (only built, and only compiled in, when such pieces
  exist or a key padding mask hides keys, which also makes the lists differ per batch element);
* a piece of pure padding is dropped, and a query piece of pure padding gets empty lists, so
  padding costs nothing on either side.

Rows of padding inside a live query piece are computed and left unspecified (the sliding-tile
backend discards them when it untiles); every token row matches ``block_sparse_attention_fwd``.
The conversion runs on the device with a fixed number of tensor ops (no host sync), so a caller
can build it once per denoising step and reuse it for every layer.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, NamedTuple

import torch

from fv_compile.backends.kernels import FA4_SPARSE_HEAD_DIMS
from fv_compile.backends.kernels.fa4_import import import_flash_attn_cute

PIECE = 128  # FA4's key tile on Hopper (and its sparse block size here)


class Fa4BlockLists(NamedTuple):
    full_cnt: torch.Tensor  # int32 [Bk, Hm, n_pieces]  (Bk: 1, or the batch with a key mask)
    full_idx: torch.Tensor  # int32 [Bk, Hm, n_pieces, n_pieces]
    mask_cnt: torch.Tensor  # int32 [Bk, Hm, n_pieces]
    mask_idx: torch.Tensor  # int32 [Bk, Hm, n_pieces, n_pieces]
    key_table: torch.Tensor | None  # int32 [Bk, L]: 1 for keys to attend; None when no mask blocks


@functools.cache
def fa4_block_sparse() -> tuple[Any, Any] | None:
    """`(flash_attn_func, BlockSparseTensorsTorch)` when flash-attn-4 with block sparsity imports."""
    try:
        fn = import_flash_attn_cute().flash_attn_func
        tensors = import_flash_attn_cute("block_sparsity").BlockSparseTensorsTorch
    except Exception:
        return None
    if "block_sparse_tensors" not in inspect.signature(fn).parameters:
        return None
    return fn, tensors


def supports(q: torch.Tensor, block_size: int) -> bool:
    """Whether FA4 can run these lists: CUDA bf16/fp16, head dim 64/128, tiles of whole pieces."""
    return (
        q.is_cuda
        and q.dtype in (torch.bfloat16, torch.float16)
        and q.shape[-1] in FA4_SPARSE_HEAD_DIMS
        and block_size % PIECE == 0
        and fa4_block_sparse() is not None
    )


def has_ragged_tiles(block_valid_host: torch.Tensor) -> bool:
    """Whether some tile ends inside a piece (then mask blocks and the mask_mod are needed)."""
    return bool(((block_valid_host % PIECE) != 0).any())


def fa4_block_lists(
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    block_valid: torch.Tensor,
    block_size: int,
    ragged: bool,
    key_mask: torch.Tensor | None = None,
) -> Fa4BlockLists:
    """Our per-tile lists `[Hm, NB, K]` / `[Hm, NB]` as FA4 piece lists (see the module doc).

    `ragged` (known on the host from the grid, so no sync here) says whether any tile holds a
    partial piece; without it (and without `key_mask`) no mask blocks or key table are produced.
    `key_mask`, bool `[Bk, L]` (1 or the batch), hides more keys per batch element (a key padding
    mask): the lists then differ per batch element, pieces it partly hides become mask blocks."""
    hm, nb, k = kv_indices.shape
    per = block_size // PIECE
    n_pieces = nb * per
    dev = kv_indices.device
    sub = torch.arange(per, device=dev)
    valid = block_valid.long().clamp(0, block_size)
    key_ok = (torch.arange(block_size, device=dev) < valid[:, None]).reshape(1, -1)  # token rows
    if key_mask is not None:
        key_ok = key_ok & key_mask.bool()
    bk = key_ok.shape[0]
    listed = torch.arange(k, device=dev) < kv_counts.long().clamp(0, k)[..., None]  # [Hm, NB, K]
    kb = kv_indices.long()
    listed = listed & (kb >= 0) & (kb < nb)
    kb = kb.clamp(0, nb - 1)
    piece = (kb[..., None] * per + sub).reshape(hm, nb, k * per)
    rows = key_ok.view(bk, n_pieces, PIECE).sum(-1)[:, piece]  # keys to attend per listed piece
    listed = listed[..., None].expand(hm, nb, k, per).reshape(1, hm, nb, k * per)
    q_live = (sub * PIECE < valid[:, None]).reshape(1, 1, nb, per)  # query pieces holding a token

    def pack(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # kept pieces first, in list order (a stable sort of the drop flags)
        order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices
        ids = piece.expand(bk, hm, nb, k * per).gather(-1, order)[..., :n_pieces].to(torch.int32)
        idx = torch.zeros(bk, hm, nb, n_pieces, dtype=torch.int32, device=dev)
        idx[..., : ids.shape[-1]] = ids
        cnt = keep.sum(-1).clamp(max=n_pieces)
        # every query piece of a tile shares the tile's list; pure-padding pieces get none
        idx = (
            idx[:, :, :, None].expand(bk, hm, nb, per, n_pieces).reshape(bk, hm, n_pieces, n_pieces)
        )
        cnt = (cnt[..., None] * q_live).reshape(bk, hm, n_pieces).to(torch.int32)
        return cnt, idx.contiguous()

    full_cnt, full_idx = pack(listed & (rows == PIECE))
    if ragged or key_mask is not None:
        mask_cnt, mask_idx = pack(listed & (rows > 0) & (rows < PIECE))
        key_table = key_ok.to(torch.int32)
    else:
        mask_cnt, mask_idx, key_table = torch.zeros_like(full_cnt), full_idx, None
    return Fa4BlockLists(full_cnt, full_idx, mask_cnt, mask_idx, key_table)


@functools.cache
def _key_table_mask_mod() -> Any:
    """CuTe mask_mod keeping the keys the table marks (`aux_tensors[0][batch, kv_idx] != 0`).

    flash-attn-4 passes `seqlen_info` before the aux tensors in some releases and not in
    others; the signature of its `call_mask_mod` says which."""
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute import mask as fa4_mask
    from flash_attn.cute import utils

    caller = getattr(fa4_mask.call_mask_mod, "__wrapped__", fa4_mask.call_mask_mod)
    takes_seqlen_info = "seqlen_info" in inspect.signature(caller).parameters

    if takes_seqlen_info:

        @cute.jit
        def key_in_table(batch, head, m_idx, n_idx, seqlen_info, aux_tensors):
            table = aux_tensors[0]
            flag = utils.scalar_to_ssa(table[batch[0], n_idx[0]], cutlass.Int32)
            return flag > utils.scalar_to_ssa(0, cutlass.Int32)

    else:

        @cute.jit
        def key_in_table(batch, head, m_idx, n_idx, aux_tensors):
            table = aux_tensors[0]
            flag = utils.scalar_to_ssa(table[batch[0], n_idx[0]], cutlass.Int32)
            return flag > utils.scalar_to_ssa(0, cutlass.Int32)

    return key_in_table


def fa4_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lists: Fa4BlockLists,
    softmax_scale: float,
) -> torch.Tensor:
    """softmax(q k^T * scale) v over tile-major `[B, L, H, D]` tensors visiting `lists`' pieces."""
    found = fa4_block_sparse()
    if found is None:
        raise ImportError("flash-attn-4 block sparsity is not importable: pip install flash-attn-4")
    flash_attn_func, block_sparse_tensors = found
    tensors = block_sparse_tensors(
        mask_block_cnt=lists.mask_cnt,
        mask_block_idx=lists.mask_idx,
        full_block_cnt=lists.full_cnt,
        full_block_idx=lists.full_idx,
        block_size=(PIECE, PIECE),
    )
    extra: dict[str, Any] = {}
    if lists.key_table is not None:
        table = lists.key_table
        if table.shape[0] != q.shape[0]:  # one table for the batch: the mask_mod indexes by batch
            table = table.expand(q.shape[0], -1).contiguous()
        extra = {"mask_mod": _key_table_mask_mod(), "aux_tensors": [table]}
    out = flash_attn_func(
        q, k, v, softmax_scale=softmax_scale, block_sparse_tensors=tensors, **extra
    )
    return out[0] if isinstance(out, tuple) else out
