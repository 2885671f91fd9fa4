"""3D tile geometry of a video token grid, and sliding-tile windows as key-tile lists.

Tokens arrive in raster order over the token grid `(T, H, W)`. Sparse video attention works on
tiles `(tt, th, tw)`: tokens are regrouped so each tile is contiguous ("tile-major"), every tile
padded to the full tile volume with its real tokens first. Grids that the tile does not divide
get partial edge tiles, so every resolution works.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, cast

import torch

from fv_compile.errors import FvCompileError

Grid = tuple[int, int, int]


def token_grid(raw_latent_shape: Any, patch: Grid, backend: str) -> Grid:
    """Token grid `(T, H, W)` from the latent `(B, C, T, H, W)` and the DiT patch size, for the
    tiling backend named `backend` (named in its errors)."""
    if raw_latent_shape is None or len(raw_latent_shape) != 5:
        raise FvCompileError(
            f"{backend} needs the latent shape: pass "
            "forward_batch=ForwardBatch(raw_latent_shape=latent.shape) ([B, C, T, H, W])"
        )
    t, h, w = (int(s) for s in raw_latent_shape[2:])
    if t % patch[0] or h % patch[1] or w % patch[2]:
        raise FvCompileError(
            f"latent grid {(t, h, w)} is not divisible by patch size {patch}: pass the latent as "
            "the model receives it, before patchify (ForwardBatch(raw_latent_shape=latent.shape)), "
            "and the DiT's patch size (FastVideoArgs(patch_size=...))"
        )
    return (t // patch[0], h // patch[1], w // patch[2])


def check_text_fits(at: str, total: int, text_len: int, grid: Grid) -> None:
    """Raise for a joint site whose longest piece, taken for the video (`passes/classify`), was
    not: the grid's tokens fit what was taken for text."""
    n = math.prod(grid)
    if total - text_len == n or text_len < n:
        return
    raise FvCompileError(
        f"{at}: this joint site joins {total} tokens, and fv_compile took its longest piece "
        f"({total - text_len}) for the video; but the video grid {grid} holds {n}, which fits "
        "the rest. At this size the text (or another stream joined to the video: a conditioning "
        "frame) is as long as the video or longer, and the video cannot be told from it: route "
        "the site to a dense backend (attention_backend={'joint': 'auto', ...}), or run at a "
        "larger size"
    )


def dense_step(step: int, fastvideo_args: Any, field: str) -> bool:
    """Whether `step` is one of the first steps a recipe runs dense (`sta_dense_steps`,
    `vsa_dense_steps` of the args)."""
    return step < int(getattr(fastvideo_args, field, 0) or 0)


def at_step(schedule: Sequence[Any], step: int, name: str) -> Any:
    """The entry of a per-step schedule for `step`; its last entry holds for the steps after it."""
    if not schedule:
        raise FvCompileError(f"{name} is an empty schedule: give one entry per step")
    return schedule[min(step, len(schedule) - 1)]


def tiles_per_axis(grid: Grid, tile: Grid) -> Grid:
    return cast(Grid, tuple(math.ceil(g / t) for g, t in zip(grid, tile)))  # one per axis


@functools.lru_cache(maxsize=32)
def tile_geometry(grid: Grid, tile: Grid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(tile_index, untile_index, block_valid)` (CPU tensors).

    tile_index  long `[n_tiles * tile_volume]`: for each tile-major slot, the raster index of its
                token, or `T*H*W` for a padding slot (gather from a zero row appended there).
    untile_index long `[T*H*W]`: the tile-major slot of each raster token.
    block_valid int32 `[n_tiles]`: how many real tokens each tile holds (they come first).
    """
    t, h, w = grid
    nt, nh, nw = tiles_per_axis(grid, tile)
    volume = math.prod(tile)
    tt, th, tw = (torch.arange(n) for n in grid)
    # tile coordinates and within-tile raster position of every token, in raster order
    coord = torch.stack(torch.meshgrid(tt, th, tw, indexing="ij"), -1).reshape(-1, 3)
    tsz = torch.tensor(tile)
    tile_id = ((coord // tsz) * torch.tensor([nh * nw, nw, 1])).sum(-1)
    local = ((coord % tsz) * torch.tensor([tile[1] * tile[2], tile[2], 1])).sum(-1)
    # real tokens first within each tile: rank by (tile, local position)
    order = torch.argsort(tile_id * volume + local)
    counts = torch.bincount(tile_id, minlength=nt * nh * nw)
    starts = torch.arange(nt * nh * nw) * volume
    first = torch.cumsum(counts, 0) - counts
    sorted_tile = tile_id[order]
    slot_sorted = starts[sorted_tile] + (torch.arange(t * h * w) - first[sorted_tile])
    untile_index = torch.empty(t * h * w, dtype=torch.long)
    untile_index[order] = slot_sorted
    tile_index = torch.full((nt * nh * nw * volume,), t * h * w, dtype=torch.long)
    tile_index[untile_index] = torch.arange(t * h * w)
    return tile_index, untile_index, counts.to(torch.int32)


def window_start(center: int, window: int, n: int) -> int:
    """First tile of a `window`-tile span centred on `center`, shifted to stay inside `[0, n)`."""
    if window >= n:
        return 0
    return min(max(center - window // 2, 0), n - window)


@functools.lru_cache(maxsize=256)
def window_tiles(n_tiles: Grid, window: Grid) -> torch.Tensor:
    """int32 `[n_query_tiles, K]`: the key tiles each query tile visits, ascending.

    Every query tile sees the same K = prod(min(window, n_tiles)) tiles (windows are shifted at
    the borders rather than cut)."""
    spans = [min(wi, ni) for wi, ni in zip(window, n_tiles)]
    nt, nh, nw = n_tiles
    rows = []
    for a in range(nt):
        sa = window_start(a, window[0], nt)
        for b in range(nh):
            sb = window_start(b, window[1], nh)
            for c in range(nw):
                sc = window_start(c, window[2], nw)
                ta = torch.arange(sa, sa + spans[0])[:, None, None]
                tb = torch.arange(sb, sb + spans[1])[None, :, None]
                tc = torch.arange(sc, sc + spans[2])[None, None, :]
                rows.append((ta * nh * nw + tb * nw + tc).reshape(-1))
    return torch.stack(rows).to(torch.int32)


def window_lists(n_tiles: Grid, windows: list[list[Grid]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Key-tile lists for `windows[layer][head]`: `(kv_indices [L, H, Q, K], kv_counts [L, H, Q])`,
    lists padded to the longest with tile 0 (never read past the count)."""
    per = [[window_tiles(n_tiles, tuple(w)) for w in layer] for layer in windows]
    k_max = max(t.shape[1] for layer in per for t in layer)
    q = math.prod(n_tiles)
    idx = torch.zeros(len(per), len(per[0]), q, k_max, dtype=torch.int32)
    cnt = torch.zeros(len(per), len(per[0]), q, dtype=torch.int32)
    for li, layer in enumerate(per):
        for hi, t in enumerate(layer):
            idx[li, hi, :, : t.shape[1]] = t
            cnt[li, hi] = t.shape[1]
    return idx, cnt
