"""Our tile block lists re-expressed as flash-attn-4 piece lists
(fv_compile/backends/kernels/fa4_block_sparse.py).

The conversion is plain tensor code, checked on the CPU: the token mask the piece lists describe
(full pieces, plus mask pieces restricted to token rows) must equal the mask of the tile lists on
every token query row. The FA4 kernel itself runs only where flash-attn-4 and a GPU are present.
"""

import pytest
import torch

from fv_compile.backends.kernels.fa4_block_sparse import (
    PIECE,
    fa4_block_lists,
    fa4_block_sparse_attention,
    has_ragged_tiles,
    supports,
)


def tile_mask(idx, cnt, valid, bs):
    """bool [Hm, L, L]: row r (tile qb) sees key c (tile kb) iff kb is listed for qb and c is a token."""
    hm, nb, _ = idx.shape
    blk = torch.arange(nb * bs) // bs
    key_tok = (torch.arange(nb * bs) % bs) < valid.long()[blk]
    out = torch.zeros(hm, nb, nb, dtype=torch.bool)
    for h in range(hm):
        for qb in range(nb):
            for j in range(int(cnt[h, qb])):
                kb = int(idx[h, qb, j])
                if 0 <= kb < nb:
                    out[h, qb, kb] = True
    return out[:, blk][:, :, blk] & key_tok


def piece_mask(lists, L):
    """bool [Bk, Hm, L, L] that FA4 computes from piece lists (full pieces unmasked, mask pieces
    through the key table)."""
    bk, hm, n_pieces = lists.full_cnt.shape
    table = (
        torch.ones(bk, L, dtype=torch.bool) if lists.key_table is None else lists.key_table.bool()
    )
    piece = torch.arange(L) // PIECE
    out = torch.zeros(bk, hm, n_pieces, n_pieces, dtype=torch.bool)
    part = torch.zeros(bk, hm, n_pieces, n_pieces, dtype=torch.bool)
    for b in range(bk):
        for h in range(hm):
            for qp in range(n_pieces):
                for j in range(int(lists.full_cnt[b, h, qp])):
                    out[b, h, qp, lists.full_idx[b, h, qp, j]] = True
                for j in range(int(lists.mask_cnt[b, h, qp])):
                    part[b, h, qp, lists.mask_idx[b, h, qp, j]] = True
    full = out[:, :, piece][:, :, :, piece]
    return full | (part[:, :, piece][:, :, :, piece] & table[:, None, None, :])


def random_lists(hm, nb, k, gen):
    idx = torch.full((hm, nb, k), -1, dtype=torch.int32)
    cnt = torch.zeros(hm, nb, dtype=torch.int32)
    for h in range(hm):
        for qb in range(nb):
            n = int(torch.randint(0, k + 1, (1,), generator=gen))
            idx[h, qb, :n] = torch.randperm(nb, generator=gen)[:n].to(torch.int32)
            cnt[h, qb] = n
    return idx, cnt


@pytest.mark.parametrize("hm", [1, 3])
@pytest.mark.parametrize("valid", [[256, 200, 128, 0, 72, 256], [384, 384, 20, 383, 1]])
def test_piece_lists_describe_the_tile_mask_on_token_rows(hm, valid):
    bs = 256 if max(valid) <= 256 else 384
    valid = torch.tensor(valid, dtype=torch.int32)
    nb = valid.numel()
    idx, cnt = random_lists(hm, nb, 4, torch.Generator().manual_seed(nb + hm))
    lists = fa4_block_lists(idx, cnt, valid, bs, ragged=has_ragged_tiles(valid))
    q_tok = (torch.arange(nb * bs) % bs) < valid.long().repeat_interleave(bs)
    want, got = tile_mask(idx, cnt, valid, bs), piece_mask(lists, nb * bs)[0]
    assert torch.equal(got[:, q_tok], want[:, q_tok])


def test_pure_padding_pieces_are_never_visited():
    valid = torch.tensor([256, 100, 0], dtype=torch.int32)
    idx = torch.tensor([[[0, 1, 2], [2, 1, 0], [1, 0, 2]]], dtype=torch.int32)
    cnt = torch.tensor([[3, 3, 3]], dtype=torch.int32)
    lists = fa4_block_lists(idx, cnt, valid, 256, ragged=True)
    # pieces: 0,1 full (tile 0); 2 partial (100 rows), 3 empty (tile 1); 4,5 empty (tile 2)
    assert lists.full_cnt[0, 0].tolist() == [2, 2, 2, 0, 0, 0]  # [batch, head, query piece]
    assert lists.mask_cnt[0, 0].tolist() == [1, 1, 1, 0, 0, 0]
    assert sorted(lists.full_idx[0, 0, 0, :2].tolist()) == [0, 1]
    assert lists.mask_idx[0, 0, 0, 0].item() == 2


def test_whole_piece_tiles_need_no_mask():
    valid = torch.tensor([384, 256, 128], dtype=torch.int32)
    idx = torch.tensor([[[0, 1], [1, 2], [2, 0]]], dtype=torch.int32)
    cnt = torch.tensor([[2, 2, 2]], dtype=torch.int32)
    assert not has_ragged_tiles(valid)
    lists = fa4_block_lists(idx, cnt, valid, 384, ragged=False)
    assert lists.key_table is None and int(lists.mask_cnt.sum()) == 0
    q_tok = (torch.arange(3 * 384) % 384) < valid.long().repeat_interleave(384)
    assert torch.equal(
        piece_mask(lists, 3 * 384)[0][:, q_tok], tile_mask(idx, cnt, valid, 384)[:, q_tok]
    )


def test_a_key_padding_mask_gives_lists_per_batch_element():
    valid = torch.tensor([256, 256, 200], dtype=torch.int32)
    idx = torch.tensor([[[0, 1, 2], [0, 1, 2], [0, 1, 2]]], dtype=torch.int32)
    cnt = torch.tensor([[3, 3, 3]], dtype=torch.int32)
    key_mask = torch.ones(2, 3 * 256, dtype=torch.bool)
    key_mask[0, 512 + 150 :] = False  # batch 0: a short text in the last tile
    key_mask[1, 100:300] = False  # batch 1: hides all of piece 1, part of pieces 0 and 2
    lists = fa4_block_lists(idx, cnt, valid, 256, ragged=False, key_mask=key_mask)
    q_tok = (torch.arange(3 * 256) % 256) < valid.long().repeat_interleave(256)
    want = tile_mask(idx, cnt, valid, 256)[0] & key_mask[:, None, :]
    got = piece_mask(lists, 3 * 256)[:, 0]
    assert torch.equal(got[:, q_tok], want[:, q_tok])
    # batch 1: pieces 3, 4 full; 0, 2 (mask) and 5 (ragged tile) partial; piece 1 wholly hidden: dropped
    assert lists.full_cnt[1, 0, 0].item() == 2 and lists.mask_cnt[1, 0, 0].item() == 3


def test_runs_only_where_flash_attn_4_can():
    q = torch.empty(1, 384, 2, 128, dtype=torch.bfloat16)
    assert not supports(q, 384)  # CPU
    if torch.cuda.is_available():
        assert not supports(q.cuda(), 192)  # tiles of part pieces


def _fa4_here() -> bool:
    if not torch.cuda.is_available():
        return False
    return supports(torch.empty(1, 1, 1, 128, dtype=torch.bfloat16, device="cuda"), 384)


@pytest.mark.gpu
@pytest.mark.skipif(not _fa4_here(), reason="needs CUDA and flash-attn-4")
@pytest.mark.parametrize("hm,key_padding", [(1, False), (2, False), (1, True)])
def test_fa4_matches_the_masked_reference_on_token_rows(hm, key_padding):
    gen = torch.Generator().manual_seed(hm)
    bs, H, D, B = 384, 2, 128, 2
    valid = torch.tensor([384, 144, 384, 0, 200, 72], dtype=torch.int32)
    nb = valid.numel()
    idx, cnt = random_lists(hm, nb, 4, gen)
    cnt[:, 0] = 0  # a tile with no keys
    key_mask = None
    if key_padding:  # batch element 1 hides a span of keys, batch element 0 nothing
        key_mask = torch.ones(B, nb * bs, dtype=torch.bool)
        key_mask[1, 300:900] = False
    q, k, v = (torch.randn(B, nb * bs, H, D, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    lists = fa4_block_lists(
        idx.cuda(),
        cnt.cuda(),
        valid.cuda(),
        bs,
        ragged=True,
        key_mask=None if key_mask is None else key_mask.cuda(),
    )
    out = fa4_block_sparse_attention(q, k, v, lists, D**-0.5).float().cpu()
    mask = tile_mask(idx, cnt, valid, bs).expand(H, -1, -1)[None]
    if key_mask is not None:
        mask = mask & key_mask[:, None, None, :]
    qt, kt, vt = (x.float().cpu().transpose(1, 2) for x in (q, k, v))
    s = (qt @ kt.transpose(-1, -2) * D**-0.5).masked_fill(~mask, float("-inf"))
    ref = torch.softmax(s, -1).nan_to_num(0.0) @ vt
    q_tok = (torch.arange(nb * bs) % bs) < valid.long().repeat_interleave(bs)
    seen = mask.expand(B, H, -1, -1).any(-1) & q_tok  # [B, H, L]: token rows with at least one key
    got, want = out.transpose(1, 2)[seen], ref[seen]
    assert (got - want).norm() / want.norm() < 1e-2
