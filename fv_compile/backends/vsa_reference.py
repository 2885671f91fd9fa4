"""Video sparse attention (VSA, arXiv 2505.13389) written straight from its definition, on tokens in
raster order: the reference the backend and its kernels are checked against.

Nothing here is shared with the fast path but the top-k count (`topk_cubes`, the one formula
both must agree on): cubes come from token coordinates, not from `tiles.tile_geometry`; the
fine stage is a dense softmax under a token mask, not block lists. It runs in the dtype it is
given (float64 in the tests) and is differentiable by autograd (the top-k choice itself is
not: it is a selection, as in FastVideo's kernel).
"""

from __future__ import annotations

import math

import torch

from fv_compile.backends.tiles import Grid

CUBE: Grid = (4, 4, 4)  # FastVideo's VSA_TILE_SIZE: 64 tokens


def topk_cubes(sparsity: float, n_cubes: int) -> int:
    """How many key cubes each query cube keeps: FastVideo's
    `max(1, min(ceil((1 - sparsity) * n_cubes), n_cubes))`; sparsity 0 keeps every cube."""
    return max(1, min(math.ceil((1.0 - float(sparsity)) * n_cubes), n_cubes))


def cube_of_token(grid: Grid, cube: Grid = CUBE) -> tuple[torch.Tensor, int]:
    """`(cube_id [T*H*W] long, n_cubes)`: each raster token's cube, cubes in raster order of the
    cube grid (edge cubes partial where `cube` does not divide `grid`)."""
    n = [math.ceil(g / c) for g, c in zip(grid, cube)]
    t, h, w = torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij")
    ids = ((t // cube[0]) * n[1] + h // cube[1]) * n[2] + w // cube[2]
    return ids.reshape(-1), math.prod(n)


def video_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Grid,
    sparsity: float,
    *,
    scale: float,
    gate: torch.Tensor | None = None,
    cube: Grid = CUBE,
    text_len: int = 0,
    text_first: bool = False,
) -> torch.Tensor:
    """VSA on `[B, S, H, D]` tensors, `S = text_len + T*H*W` (the video in raster order, the text
    before it when `text_first`, else after it); `gate` `[B, S, H, D]` or None (fine only).

    Coarse stage: q, k, v averaged over each cube's tokens, softmax attention cube to cube; each
    query cube keeps the `topk_cubes(sparsity, n_cubes)` key cubes of highest coarse score.
    Fine stage: each video token attends the tokens of its cube's kept cubes and every text
    token; each text token attends every token. Output: fine + gate * (the coarse output of the
    token's cube; 0 for text tokens)."""
    b, s, h, _ = q.shape
    n = math.prod(grid)
    if s != n + text_len or k.shape[:3] != q.shape[:3] or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q, k, v must be [B, {n + text_len}, H, D] for grid {grid} + {text_len} text tokens, "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    video = slice(text_len, s) if text_first else slice(0, n)
    cube_id, n_cubes = cube_of_token(grid, cube)
    cube_id = cube_id.to(q.device)
    # [n_cubes, n] averaging matrix over each cube's tokens
    member = (cube_id[None, :] == torch.arange(n_cubes, device=q.device)[:, None]).to(q.dtype)
    pool = member / member.sum(1, keepdim=True)
    qc, kc, vc = (torch.einsum("cn,bnhd->bhcd", pool, x[:, video]) for x in (q, k, v))
    coarse_scores = scale * qc @ kc.transpose(-2, -1)  # [B, H, C, C]
    coarse = coarse_scores.softmax(-1) @ vc  # [B, H, C, Dv]
    kept = torch.zeros_like(coarse_scores, dtype=torch.bool)
    top = coarse_scores.topk(topk_cubes(sparsity, n_cubes), dim=-1).indices
    kept.scatter_(-1, top, True)
    # token mask: video x video from the kept cubes, text rows and columns all open
    allowed = torch.ones(b, h, s, s, dtype=torch.bool, device=q.device)
    allowed[:, :, video, video] = kept[:, :, cube_id][:, :, :, cube_id]
    scores = scale * q.transpose(1, 2) @ k.transpose(1, 2).transpose(-2, -1)
    fine = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v.transpose(1, 2)
    out = fine.transpose(1, 2)  # [B, S, H, Dv]
    if gate is None:
        return out
    per_token = torch.zeros_like(out)
    per_token[:, video] = coarse[:, :, cube_id].transpose(1, 2)
    return out + gate * per_token
