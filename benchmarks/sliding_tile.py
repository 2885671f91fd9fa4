"""Sliding tile attention (STA) forward on the GPU: our block-sparse Triton kernel against cuDNN
dense SDPA, FlexAttention and (when importable) flash-attn-4 block-sparse, on one mask.

Run on a CUDA machine (not a test):

    python benchmarks/sliding_tile.py --out sta.json
    TRITON_INTERPRET=1 python benchmarks/sliding_tile.py --smoke   # no GPU: the layout/mask logic

The mask: the video token grid is cut into tiles of (6, 8, 8) = 384 tokens, tile-major (tile ``n``
holds rows ``[384n, 384n + 384)``; border tiles are padded: their first ``block_valid[n]`` rows are
tokens, raster order inside the tile). Query tile ``(i, j, k)`` attends to the window of tiles
``[s_d, s_d + w_d)`` per dimension with ``s_d = clamp(i_d - w_d // 2, 0, n_d - w_d)`` (centred,
shifted at the borders, so every query tile sees the same number of tiles). Text tokens (HunyuanVideo)
sit in their own trailing block(s): they attend to everything and everything attends to them.

Variants, on random normal bf16 inputs, timed with CUDA events (median, warm-up excluded):

* ``ours``: ``block_sparse_attention_fwd`` on the padded tile-major layout (plus ``ours(cfg)`` tile
  configs and the pointer path ``ours-ptr``); to show where the time goes, ``ours-all-blocks`` (every
  block listed: the sparse machinery at density 1) and ``triton-dense`` (the dense Triton kernel,
  flash_fwd.py, on the unpadded sequence); ``--variants 'a;b'`` runs a subset;
* ``cudnn-dense``: SDPA with ``sdpa_kernel(CUDNN_ATTENTION)`` on the unpadded sequence (the baseline);
* ``flex``: compiled ``flex_attention`` on the padded layout with ``BlockMask.from_kv_blocks`` built
  from the same lists at 128-row granularity (full blocks: every key valid; partial blocks: a
  ``mask_mod`` on key validity; q blocks of pure padding: no kv blocks);
* ``fa4-direct``: ``flash_attn.cute.flash_attn_func(..., block_sparse_tensors=...)`` on 128-row lists
  built here from the same mask (full blocks; partial blocks with a key-validity ``mask_mod``);
  ``fv-fa4``: SLIDING_TILE_ATTN's flash-attn-4 path (our tile lists converted on the device by
  ``fa4_block_lists``, as the backend does once per step), and ``fv-fa4+convert`` with the
  conversion in every call (both skipped when flash-attn-4 does not import).

With ``--rounds R`` every variant is timed R times, round-robin, and the median round is reported.

TFLOP/s count the computed work: ``4 * B * H * D * sum_qb valid_q(qb) * sum_{kb in list} valid(kb)``
(dense: ``4 * B * H * S^2 * D``); ``speedup`` is cuDNN dense time over the variant's time. Errors:
every variant against an fp32 reference on sampled query tiles of the real shape (keys gathered from
the lists), ours against FlexAttention on all valid rows, and ours against SDPA math with a dense
bool mask on a small grid. The table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

TILE = (6, 8, 8)
SHAPES = [
    # name, token grid (t, h, w), text tokens, heads, head_dim, window in tiles
    dict(name="wan1.3b-480p", grid=(21, 30, 52), text=0, H=12, D=128, window=(2, 2, 3)),
    dict(name="hunyuan-720p", grid=(30, 48, 80), text=256, H=24, D=128, window=(3, 3, 4)),
]
# (block_m, block_n, num_warps, num_stages[, warp_specialize, prefetch_idx, tail_m, tail_warps])
# tried for ours (TMA path)
CONFIGS = [
    (128, 128, 8, 2),
    (128, 128, 8, 3),
    (128, 64, 8, 3),
    (128, 128, 8, 2, True),
    (128, 128, 8, 3, True),
    (128, 128, 8, 2, False, True),
    (128, 128, 8, 3, False, True),  # + index prefetch
    (128, 128, 8, 3, False, True, 64, 4),  # + 64-row query tails (one warpgroup)
    (128, 128, 8, 3, False, True, 64, 8),
]


# ---------------------------------------------------------------------------------------------
# the sliding-tile layout and mask
# ---------------------------------------------------------------------------------------------


def sta_layout(grid, tile, window, text=0):
    """Tile-major layout and block lists of a 3-D sliding-tile mask.

    Returns a dict: ``bs`` (tokens per tile), ``NB`` (blocks), ``S`` (tokens), ``L`` (padded rows),
    ``valid`` (int32 [NB]), ``pos`` (int64 [S]: padded row of each token in raster order, text
    last), ``lists`` (python lists of key blocks per query block), ``idx``/``cnt`` (int32
    ``[1, NB, max_kv]`` / ``[1, NB]``)."""
    bs = tile[0] * tile[1] * tile[2]
    n = [math.ceil(g / a) for g, a in zip(grid, tile)]
    ext = [[min(a, g - i * a) for i in range(nd)] for g, a, nd in zip(grid, tile, n)]
    n_video = n[0] * n[1] * n[2]
    n_text = math.ceil(text / bs)
    NB = n_video + n_text
    valid = torch.zeros(NB, dtype=torch.int32)
    for i in range(n[0]):
        for j in range(n[1]):
            for k in range(n[2]):
                valid[(i * n[1] + j) * n[2] + k] = ext[0][i] * ext[1][j] * ext[2][k]
    for i in range(n_text):
        valid[n_video + i] = min(bs, text - i * bs)
    # padded row of every token (raster order t, h, w; then text)
    t, h, w = torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij")
    t, h, w = t.reshape(-1), h.reshape(-1), w.reshape(-1)
    ti, th, tw = t // tile[0], h // tile[1], w // tile[2]
    lt, lh, lw = t % tile[0], h % tile[1], w % tile[2]
    eh = torch.tensor(ext[1])[th]
    ew = torch.tensor(ext[2])[tw]
    tile_idx = (ti * n[1] + th) * n[2] + tw
    local = (lt * eh + lh) * ew + lw
    pos = torch.cat([tile_idx * bs + local, n_video * bs + torch.arange(text)])
    # block lists
    win = [min(wd, nd) for wd, nd in zip(window, n)]
    text_blocks = list(range(n_video, NB))
    lists = []
    for i in range(n[0]):
        for j in range(n[1]):
            for k in range(n[2]):
                s = [min(max(c - wd // 2, 0), nd - wd) for c, wd, nd in zip((i, j, k), win, n)]
                lst = [
                    (a * n[1] + b) * n[2] + c
                    for a in range(s[0], s[0] + win[0])
                    for b in range(s[1], s[1] + win[1])
                    for c in range(s[2], s[2] + win[2])
                ]
                lists.append(lst + text_blocks)
    for _ in range(n_text):
        lists.append(list(range(NB)))
    max_kv = max(len(x) for x in lists)
    idx = torch.zeros(1, NB, max_kv, dtype=torch.int32)
    cnt = torch.zeros(1, NB, dtype=torch.int32)
    for qb, lst in enumerate(lists):
        idx[0, qb, : len(lst)] = torch.tensor(lst, dtype=torch.int32)
        cnt[0, qb] = len(lst)
    S = int(pos.numel())
    # work on valid tokens: sum_qb valid_q * sum_kb valid_k
    vl = valid.long()
    pairs = sum(int(vl[qb]) * int(vl[torch.tensor(lst)].sum()) for qb, lst in enumerate(lists))
    return dict(
        bs=bs,
        NB=NB,
        S=S,
        L=NB * bs,
        valid=valid,
        pos=pos,
        lists=lists,
        idx=idx,
        cnt=cnt,
        tiles=n,
        window=win,
        n_video=n_video,
        pairs=pairs,
        density=pairs / S**2,
    )


def issued_pairs(lay, block_m=128, block_n=128, tail_m=0):
    """(query row, key) pairs a kernel with these sub-tiles computes, padding included; with
    `tail_m`, a sub-tile of at most that many live rows computes tail_m rows."""
    bs, valid = lay["bs"], lay["valid"].long()
    per_kb = ((valid // block_n) + ((valid % block_n) > 0).long()) * block_n

    def rows(v):
        live = [min(block_m, v - m0) for m0 in range(0, bs, block_m) if m0 < v]
        return sum(tail_m if 0 < n <= tail_m else block_m for n in live)

    live_m = torch.tensor([rows(int(v)) for v in valid])
    return sum(
        int(live_m[qb]) * int(per_kb[torch.tensor(lst)].sum())
        for qb, lst in enumerate(lay["lists"])
    )


def dense_token_mask(lay):
    """bool [S, S] over raster-order tokens (for the small-grid check)."""
    NB = lay["NB"]
    bm = torch.zeros(NB, NB, dtype=torch.bool)
    for qb, lst in enumerate(lay["lists"]):
        bm[qb, lst] = True
    blk = lay["pos"] // lay["bs"]
    return bm[blk][:, blk]


def flex_block_lists(lay, sub=128):
    """128-granular (partial, full) kv block lists for FlexAttention / FA4 on the padded layout:
    ``(kv_num, kv_idx, full_num, full_idx)``, shapes ``[1, 1, NQ]`` / ``[1, 1, NQ, NQ]``."""
    bs, valid = lay["bs"], [int(v) for v in lay["valid"]]
    per = bs // sub
    NQ = lay["NB"] * per
    part_l, full_l = [], []
    for qb, lst in enumerate(lay["lists"]):
        p, f = [], []
        for kb in lst:
            for t in range(per):
                nv = min(max(valid[kb] - t * sub, 0), sub)
                if nv == sub:
                    f.append(kb * per + t)
                elif nv > 0:
                    p.append(kb * per + t)
        for s in range(per):
            live = s * sub < valid[qb]
            part_l.append(p if live else [])
            full_l.append(f if live else [])

    def pack(ls):
        m = NQ  # FlexAttention wants the full [.., NQ, NKV] index width (to_dense, q-block transpose)
        idx = torch.zeros(1, 1, NQ, m, dtype=torch.int32)
        num = torch.zeros(1, 1, NQ, dtype=torch.int32)
        for i, x in enumerate(ls):
            idx[0, 0, i, : len(x)] = torch.tensor(x, dtype=torch.int32)
            num[0, 0, i] = len(x)
        return num, idx

    kv_num, kv_idx = pack(part_l)
    full_num, full_idx = pack(full_l)
    return kv_num, kv_idx, full_num, full_idx


def make_block_mask(lay, device, sub=128):
    from torch.nn.attention.flex_attention import BlockMask

    kv_num, kv_idx, full_num, full_idx = (t.to(device) for t in flex_block_lists(lay, sub))
    L, bs = lay["L"], lay["bs"]
    key_valid = ((torch.arange(L) % bs) < lay["valid"].long().repeat_interleave(bs)).to(device)
    allowed = torch.zeros(lay["NB"], lay["NB"], dtype=torch.bool)
    for qb, lst in enumerate(lay["lists"]):
        allowed[qb, lst] = True
    allowed = allowed.to(device)

    # the whole rule (eager FlexAttention applies mask_mod densely and ignores the block lists;
    # compiled, it runs only in the partial blocks)
    def mask_mod(b, h, q_idx, kv_idx):
        return allowed[q_idx // bs, kv_idx // bs] & key_valid[kv_idx]

    kw = dict(BLOCK_SIZE=sub, mask_mod=mask_mod, seq_lengths=(L, L))
    try:
        return BlockMask.from_kv_blocks(
            kv_num, kv_idx, full_num, full_idx, compute_q_blocks=False, **kw
        )
    except TypeError:
        return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, **kw)


def to_padded(x, lay):
    """[B, S, H, D] raster order -> [B, L, H, D] tile-major (padding: random, it must not matter)."""
    B, _, H, D = x.shape
    out = torch.randn(B, lay["L"], H, D, dtype=x.dtype, device=x.device)
    out[:, lay["pos"].to(x.device)] = x
    return out


# ---------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------


def sampled_reference(q, k, v, lay, qbs, scale):
    """fp32 attention for query blocks ``qbs`` (raster-order BSHD inputs); returns
    {qb: (token indices [n], out [B, n, H, D])}."""
    blk = lay["pos"] // lay["bs"]
    res = {}
    for qb in qbs:
        qi = torch.nonzero(blk == qb).flatten()
        keys = torch.isin(blk, torch.tensor(lay["lists"][qb])).nonzero().flatten()
        qi_d, keys_d = qi.to(q.device), keys.to(q.device)
        qs = q[:, qi_d].float().transpose(1, 2)
        ks = k[:, keys_d].float().transpose(1, 2)
        vs = v[:, keys_d].float().transpose(1, 2)
        s = qs @ ks.transpose(-1, -2) * scale
        res[qb] = (qi, (torch.softmax(s, -1) @ vs).transpose(1, 2))
    return res


def sampled_err(out_raster, ref):
    num = den = 0.0
    for qi, r in ref.values():
        o = out_raster[:, qi.to(out_raster.device)].float()
        num += (o - r).norm().item() ** 2
        den += r.norm().item() ** 2
    return math.sqrt(num / den)


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------------------------
# variants
# ---------------------------------------------------------------------------------------------


def load_fa4():
    """flash-attn-4's block-sparse entry points, from wherever the environment puts them (an
    install outside site-packages goes on PYTHONPATH: docs/kernel-notes.md)."""
    try:
        from flash_attn.cute import flash_attn_func
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

        return (flash_attn_func, BlockSparseTensorsTorch), "flash_attn.cute"
    except Exception as e:
        return None, f"{type(e).__name__}: {str(e)[:200]}"


def small_check(device, interpret=False):
    """Ours vs SDPA math with a dense bool mask on a small grid with padded tiles (and text)."""
    import torch.nn.functional as F

    from fv_compile.backends.kernels.block_sparse_fwd import block_sparse_attention_fwd

    if interpret:
        tile, grid, text, H, D, dtype = (2, 4, 4), (5, 6, 7), 40, 2, 64, torch.float32
    else:
        tile, grid, text, H, D, dtype = TILE, (9, 14, 20), 100, 4, 128, torch.bfloat16
    lay = sta_layout(grid, tile, (2, 1, 2), text=text)
    g = torch.Generator(device=device).manual_seed(1)
    q, k, v = (
        torch.randn(1, lay["S"], H, D, device=device, dtype=dtype, generator=g) for _ in range(3)
    )
    scale = D**-0.5
    qp, kp, vp = (to_padded(x, lay) for x in (q, k, v))
    o = block_sparse_attention_fwd(
        qp,
        kp,
        vp,
        lay["idx"].to(device),
        lay["cnt"].to(device),
        lay["valid"].to(device),
        block_size=lay["bs"],
        softmax_scale=scale,
    )
    o = o[:, lay["pos"].to(device)]
    mask = dense_token_mask(lay).to(device)
    ref = F.scaled_dot_product_attention(
        *(x.float().transpose(1, 2) for x in (q, k, v)), attn_mask=mask, scale=scale
    ).transpose(1, 2)
    res = {
        "grid": grid,
        "tile": tile,
        "text": text,
        "density": lay["density"],
        "ours_vs_sdpa_math_masked": rel(o, ref),
    }
    try:  # flex on the same padded layout (eager on the CPU)
        from torch.nn.attention.flex_attention import flex_attention

        if lay["bs"] % 128 == 0 or interpret:
            bm = make_block_mask(lay, device, sub=128 if lay["bs"] % 128 == 0 else lay["bs"])
            fo = flex_attention(
                *(x.transpose(1, 2) for x in (qp, kp, vp)), block_mask=bm, scale=scale
            )
            res["flex_vs_sdpa_math_masked"] = rel(fo.transpose(1, 2)[:, lay["pos"].to(device)], ref)
    except Exception as e:
        res["flex_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return res


def bench_shape(s, args, fa4):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    from fv_compile.backends.kernels.block_sparse_fwd import (
        BlockSparseConfig,
        block_sparse_attention_fwd,
    )

    from _timing import time_cuda

    dev = args.device
    t0 = time.perf_counter()
    lay = sta_layout(s["grid"], s.get("tile", TILE), s["window"], text=s["text"])
    H, D, B = s["H"], s["D"], 1
    scale = D**-0.5
    S, L = lay["S"], lay["L"]
    sparse_flops = 4.0 * B * H * D * lay["pairs"]
    dense_flops = 4.0 * B * H * D * S * S
    res = {
        "shape": {k: v for k, v in s.items()},
        "S": S,
        "L": L,
        "NB": lay["NB"],
        "tiles": lay["tiles"],
        "window_tiles": lay["window"],
        "density": lay["density"],
        "max_kv": int(lay["cnt"].max()),
        "issued_over_valid_128x128": issued_pairs(lay, 128, 128) / lay["pairs"],
        "issued_over_valid_128x64": issued_pairs(lay, 128, 64) / lay["pairs"],
        "issued_over_valid_128x128_tails64": issued_pairs(lay, 128, 128, 64) / lay["pairs"],
        "variants": {},
    }
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (
        torch.randn(B, S, H, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3)
    )
    qp, kp, vp = (to_padded(x, lay) for x in (q, k, v))
    pos = lay["pos"].to(dev)
    idx, cnt, valid = lay["idx"].to(dev), lay["cnt"].to(dev), lay["valid"].to(dev)
    res["setup_s"] = time.perf_counter() - t0
    print(
        f"  {s['name']}: S={S} L={L} blocks={lay['NB']} tiles={lay['tiles']} window={lay['window']} "
        f"density={lay['density']:.4f} issued/valid={res['issued_over_valid_128x128']:.3f} "
        f"(64-row tails {res['issued_over_valid_128x128_tails64']:.3f})",
        flush=True,
    )

    variants, kinds = {}, {}
    launched = []  # the compiled kernels our variants launch (their registers, spills)
    variants["ours"] = lambda: block_sparse_attention_fwd(
        qp,
        kp,
        vp,
        idx,
        cnt,
        valid,
        block_size=lay["bs"],
        softmax_scale=scale,
        on_launch=launched.append,
    )
    kinds["ours"] = "padded"
    for cfg in CONFIGS:
        c = BlockSparseConfig(*cfg)
        name = "ours" + str(cfg).replace(" ", "")
        variants[name] = lambda c=c: block_sparse_attention_fwd(
            qp,
            kp,
            vp,
            idx,
            cnt,
            valid,
            block_size=lay["bs"],
            softmax_scale=scale,
            on_launch=launched.append,
            config=c,
        )
        kinds[name] = "padded"
    # where the time goes: the same kernel with every block listed (density 1), and the dense
    # Triton kernel (flash_fwd) on the unpadded sequence
    all_idx = (
        torch.arange(lay["NB"], dtype=torch.int32, device=dev)
        .expand(1, lay["NB"], lay["NB"])
        .contiguous()
    )
    all_cnt = torch.full((1, lay["NB"]), lay["NB"], dtype=torch.int32, device=dev)
    variants["ours-all-blocks"] = lambda: block_sparse_attention_fwd(
        qp,
        kp,
        vp,
        all_idx,
        all_cnt,
        valid,
        block_size=lay["bs"],
        softmax_scale=scale,
        on_launch=launched.append,
    )
    kinds["ours-all-blocks"] = "padded-full"
    from fv_compile.backends.kernels.flash_fwd import attention_fwd

    variants["triton-dense"] = lambda: attention_fwd(q, k, v, softmax_scale=scale)
    kinds["triton-dense"] = "dense"
    variants["ours-ptr"] = lambda: block_sparse_attention_fwd(
        qp,
        kp,
        vp,
        idx,
        cnt,
        valid,
        block_size=lay["bs"],
        softmax_scale=scale,
        on_launch=launched.append,
        use_tma=False,
    )
    kinds["ours-ptr"] = "padded"

    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def cudnn():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(qt, kt, vt, scale=scale)

    variants["cudnn-dense"] = cudnn
    kinds["cudnn-dense"] = "bhsd-dense"

    if not args.no_flex:
        sub = 128 if lay["bs"] % 128 == 0 else lay["bs"]
        bm = make_block_mask(lay, dev, sub=sub)
        flex_c = torch.compile(flex_attention, dynamic=False) if dev == "cuda" else flex_attention
        qpt, kpt, vpt = qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2)
        variants["flex"] = lambda: flex_c(qpt, kpt, vpt, block_mask=bm, scale=scale)
        kinds["flex"] = "padded-bhsd"
    if fa4 is not None:
        from fv_compile.backends.kernels.fa4_block_sparse import (
            _key_table_mask_mod,
            fa4_block_lists,
            fa4_block_sparse_attention,
            has_ragged_tiles,
        )

        fa4_fn, BST = fa4
        bs = lay["bs"]
        ragged = has_ragged_tiles(lay["valid"])
        # direct: flash-attn-4 on 128-row lists built here independently (flex_block_lists), the
        # key-validity mask_mod on the partial blocks when there are any
        kv_num, kv_idx, full_num, full_idx = (t.to(dev) for t in flex_block_lists(lay))
        bst = BST(
            mask_block_cnt=kv_num,
            mask_block_idx=kv_idx,
            full_block_cnt=full_num,
            full_block_idx=full_idx,
            block_size=(128, 128),
        )
        key_tok = ((torch.arange(L) % bs) < lay["valid"].long().repeat_interleave(bs)).to(
            torch.int32
        )
        extra = (
            dict(mask_mod=_key_table_mask_mod(), aux_tensors=[key_tok[None].to(dev)])
            if ragged
            else {}
        )

        def fa4_direct():
            o = fa4_fn(qp, kp, vp, softmax_scale=scale, block_sparse_tensors=bst, **extra)
            return o[0] if isinstance(o, tuple) else o

        variants["fa4-direct"] = fa4_direct
        kinds["fa4-direct"] = "padded"
        # fv: SLIDING_TILE_ATTN's flash-attn-4 path: our tile lists converted on the device (once
        # per denoising step in the backend, shared by every layer), then the call
        fv_lists = fa4_block_lists(idx, cnt, valid, bs, ragged)
        variants["fv-fa4"] = lambda: fa4_block_sparse_attention(qp, kp, vp, fv_lists, scale)
        kinds["fv-fa4"] = "padded"
        variants["fv-fa4+convert"] = lambda: fa4_block_sparse_attention(
            qp, kp, vp, fa4_block_lists(idx, cnt, valid, bs, ragged), scale
        )
        kinds["fv-fa4+convert"] = "padded"
        res["fa4_partial_blocks"] = int(kv_num.sum())
        res["fa4_ragged"] = ragged

    # sampled fp32 reference: corners, a middle tile, the most padded tile, the text block
    NB, nv = lay["NB"], lay["n_video"]
    qbs = sorted({0, nv - 1, nv // 2, int(torch.argmin(lay["valid"][:nv])), NB - 1})
    ref = sampled_reference(q, k, v, lay, qbs, scale)

    if args.variants:
        keep = args.variants.split(";")
        variants = {n: f for n, f in variants.items() if n in keep}

    # warp-specialized configs last: a compiler failure there must not cost the other rows
    def _ws(name):
        parts = name.split(",")
        return len(parts) > 4 and parts[4].startswith("True")

    variants = dict(sorted(variants.items(), key=lambda kv: _ws(kv[0])))
    outs = {}
    for name, fn in variants.items():
        r = {}
        try:
            t1 = time.perf_counter()
            o = fn()
            if dev == "cuda":
                torch.cuda.synchronize()
            r["first_call_s"] = time.perf_counter() - t1
            kind = kinds[name]
            if kind.startswith("padded-bhsd"):
                o_r = o.transpose(1, 2)[:, pos]
            elif kind.startswith("padded"):
                o_r = o[:, pos]
            elif kind.startswith("bhsd"):
                o_r = o.transpose(1, 2)
            else:
                o_r = o
            if kind.endswith("dense") or kind.endswith("full"):  # a different (dense) function
                r["err_vs_fp32_sampled"] = float("nan")
            else:
                r["err_vs_fp32_sampled"] = sampled_err(o_r, ref)
            r["nan"] = bool(torch.isnan(o_r).any())
            if name in ("ours", "flex", "fa4-direct", "fv-fa4"):
                outs[name] = o_r
            if dev == "cuda":
                t = time_cuda(fn, target_s=args.target_s, max_reps=50)
            else:  # --dry-cpu: exercise the code paths only
                t1 = time.perf_counter()
                fn()
                t = {"ms": (time.perf_counter() - t1) * 1e3}
            r.update(t)
            fl = {
                "cudnn-dense": dense_flops,
                "triton-dense": dense_flops,
                "ours-all-blocks": 4.0 * B * H * D * S * S,
            }.get(name, sparse_flops)
            r["tflops"] = fl / (t["ms"] * 1e-3) / 1e12
            if name.startswith("ours"):
                kern = launched[-1] if launched else None
                r["n_regs"], r["n_spills"] = (
                    getattr(kern, "n_regs", None),
                    getattr(kern, "n_spills", None),
                )
            del o, o_r
        except Exception as e:
            r["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        res["variants"][name] = r
        print(
            f"  {s['name']:<14} {name:<30} "
            + (
                f"{r['ms']:9.3f} ms {r['tflops']:7.1f} TFLOP/s err {r['err_vs_fp32_sampled']:.1e} "
                f"first {r['first_call_s']:.1f}s"
                if "ms" in r
                else r["error"]
            ),
            flush=True,
        )
    if dev == "cuda" and args.rounds > 1:
        # more rounds, round-robin over the variants that ran: drift in clocks or the machine hits
        # every variant alike; each variant's figure is the median over all its rounds
        timed = [n for n in variants if "ms" in res["variants"][n]]
        for _ in range(args.rounds - 1):
            for name in timed:
                res["variants"][name].setdefault("ms_rounds", [res["variants"][name]["ms"]]).append(
                    time_cuda(variants[name], target_s=args.target_s, max_reps=50)["ms"]
                )
        for name in timed:
            r = res["variants"][name]
            r["ms"] = sorted(r["ms_rounds"])[len(r["ms_rounds"]) // 2]
            fl = {
                "cudnn-dense": dense_flops,
                "triton-dense": dense_flops,
                "ours-all-blocks": 4.0 * B * H * D * S * S,
            }.get(name, sparse_flops)
            r["tflops"] = fl / (r["ms"] * 1e-3) / 1e12
            print(
                f"  {s['name']:<14} {name:<30} rounds "
                + " ".join(f"{m:.3f}" for m in r["ms_rounds"]),
                flush=True,
            )
    if "cudnn-dense" in res["variants"] and "ms" in res["variants"]["cudnn-dense"]:
        base = res["variants"]["cudnn-dense"]["ms"]
        for r in res["variants"].values():
            if "ms" in r:
                r["speedup_vs_cudnn_dense"] = base / r["ms"]
    if "ours" in outs and "flex" in outs:
        res["ours_vs_flex_all_valid_rows"] = rel(outs["ours"], outs["flex"])
    if "ours" in outs and "fa4-direct" in outs:
        res["ours_vs_fa4_all_valid_rows"] = rel(outs["ours"], outs["fa4-direct"])
    if "fv-fa4" in outs and "fa4-direct" in outs:
        res["fv_fa4_vs_fa4_direct_all_valid_rows"] = rel(outs["fv-fa4"], outs["fa4-direct"])
    del outs
    q = k = v = qp = kp = vp = None  # not del: the variants' closures share these names
    if dev == "cuda":
        torch.cuda.empty_cache()
    return res


def env_info():
    import triton

    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }


def print_table(results, info, small):
    print()
    print(
        f"# {info['date']}  {info['gpu']}  torch {info['torch']}  triton {info['triton']}  "
        f"cuDNN {info['cudnn']}"
    )
    print(f"# small-grid check vs SDPA math + dense bool mask: {json.dumps(small)}")
    for r in results:
        vs = r["variants"]
        cu = vs.get("cudnn-dense", {}).get("tflops")
        print(
            f"\n## {r['shape']['name']}: S={r['S']} (padded L={r['L']}), "
            f"H={r['shape']['H']}, D={r['shape']['D']}, "
            f"tiles {r['tiles']}, window {r['window_tiles']}, density {r['density']:.4f} "
            f"(sparsity {1 - r['density']:.3f}); issued/valid work at 128x128 sub-tiles "
            f"{r['issued_over_valid_128x128']:.3f}"
        )
        if "ours_vs_flex_all_valid_rows" in r:
            print(
                f"ours vs flex (all valid rows, real shape): rel err {r['ours_vs_flex_all_valid_rows']:.2e}"
            )
        if "ours_vs_fa4_all_valid_rows" in r:
            print(f"ours vs fa4 (all valid rows): rel err {r['ours_vs_fa4_all_valid_rows']:.2e}")
        if "fv_fa4_vs_fa4_direct_all_valid_rows" in r:
            err = r["fv_fa4_vs_fa4_direct_all_valid_rows"]
            print(f"fv-fa4 vs fa4-direct (all valid rows): rel err {err:.2e}")
        if (
            "fv-fa4" in vs
            and "fa4-direct" in vs
            and "ms" in vs["fv-fa4"]
            and "ms" in vs["fa4-direct"]
        ):
            print(
                f"fv-fa4 / fa4-direct throughput: {vs['fa4-direct']['ms'] / vs['fv-fa4']['ms']:.3f}"
            )
        hdr = (
            f"| {'variant':<30} | {'ms':>9} | {'TFLOP/s':>8} | {'x cuDNN TF':>10} | {'speedup':>8} | "
            f"{'err fp32':>8} | regs/spill |"
        )
        print(hdr)
        print("|" + "|".join("-" * len(c) for c in hdr.strip("|").split("|")) + "|")
        for name, v in vs.items():
            if "ms" not in v:
                print(
                    f"| {name:<30} | {'n/a':>9} | {'':>8} | {'':>10} | {'':>8} | {'':>8} | "
                    f"{v.get('error', '')[:60]}"
                )
                continue
            ratio = f"{v['tflops'] / cu:.3f}" if cu else "n/a"
            rs = f"{v.get('n_regs')}/{v.get('n_spills')}" if "n_regs" in v else ""
            print(
                f"| {name:<30} | {v['ms']:9.3f} | {v['tflops']:8.1f} | {ratio:>10} | "
                f"{v.get('speedup_vs_cudnn_dense', float('nan')):7.2f}x | "
                f"{v['err_vs_fp32_sampled']:8.1e} | {rs:>10} |"
            )


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", help="write all numbers as JSON here")
    ap.add_argument("--only", help="comma-separated shape names")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--variants", help="';'-separated variant names to run (default: all)")
    ap.add_argument("--no-fa4", action="store_true")
    ap.add_argument(
        "--target-s", type=float, default=0.3, help="seconds of timed calls per variant"
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="timing rounds, round-robin over the variants; the median round is reported",
    )
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="the layout/mask logic and a small kernel check; without CUDA, in Triton's "
        "interpreter (TRITON_INTERPRET=1)",
    )
    ap.add_argument("--dry-cpu", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from fv_compile.backends.kernels import interpreting

    cpu = not torch.cuda.is_available()
    if (args.dry_cpu or (args.smoke and cpu)) and not interpreting():
        ap.error("on the CPU the kernels run in Triton's interpreter: set TRITON_INTERPRET=1")
    if cpu and not (args.smoke or args.dry_cpu):
        ap.error("a GPU benchmark: needs CUDA (--smoke checks the layout and mask logic without)")
    args.device = "cuda"
    if args.dry_cpu:  # run bench_shape's code paths on a tiny grid under the interpreter
        args.device = "cpu"
        s = dict(name="dry", grid=(5, 6, 7), tile=(2, 4, 4), text=40, H=2, D=64, window=(2, 1, 2))
        info = {"date": "-", "gpu": "cpu", "torch": torch.__version__, "triton": "-", "cudnn": "-"}
        print_table([bench_shape(s, args, load_fa4()[0])], info, {})
        return

    if args.smoke:
        for s in SHAPES:
            lay = sta_layout(s["grid"], TILE, s["window"], text=s["text"])
            print(
                f"{s['name']}: S={lay['S']} L={lay['L']} blocks={lay['NB']} tiles={lay['tiles']} "
                f"window={lay['window']} max_kv={int(lay['cnt'].max())} density={lay['density']:.4f} "
                f"issued/valid 128x128={issued_pairs(lay) / lay['pairs']:.3f} "
                f"128x64={issued_pairs(lay, 128, 64) / lay['pairs']:.3f}"
            )
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        print("small check:", small_check(dev, interpret=dev == "cpu"))
        return

    torch.backends.cuda.matmul.allow_tf32 = False
    info = env_info()
    print(json.dumps(info), flush=True)
    report = {"env": info}
    fa4, fa4_mod = (None, "disabled") if args.no_fa4 else load_fa4()
    report["fa4"] = fa4_mod if fa4 is not None else f"not importable: {fa4_mod}"
    print("  fa4:", report["fa4"], flush=True)
    small = small_check("cuda")
    report["small_check"] = small
    print("  small check:", small, flush=True)
    shapes = SHAPES
    if args.only:
        shapes = [s for s in SHAPES if s["name"] in set(args.only.split(","))]
    results = []
    for s in shapes:
        results.append(bench_shape(s, args, fa4))
        report["results"] = results
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1, default=str)
    print_table(results, info, small)


if __name__ == "__main__":
    main()
