"""Sliding tile attention's windows: FastVideo's mask-strategy files, and the window each layer
and head uses at each denoising step (or none: a dense step).

Windows are in tiles, `(wt, wh, ww)`; `tiles.window_lists` turns them into key-tile lists.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, cast

from fv_compile.backends.tiles import Grid, at_step, dense_step
from fv_compile.errors import FvCompileError


def _window(values: Any) -> Grid:
    """A window `(wt, wh, ww)` as the user wrote it, in ints (typed a triple: one of another
    length fails where it is indexed, as it always has)."""
    return cast(Grid, tuple(int(x) for x in values))


def _load_strategy(path: str) -> dict[tuple[int, int, int], Grid]:
    """FastVideo's mask-strategy JSON: `{"<step>_<layer>_<head>": [wt, wh, ww], ...}`."""
    stat = os.stat(path)
    return _parse_strategy(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _parse_strategy(path: str, mtime_ns: int, size: int) -> dict[tuple[int, int, int], Grid]:
    """The table of one version of a strategy file (a changed file is read again)."""
    with open(path) as f:
        raw = json.load(f)
    out = {}
    for key, window in raw.items():
        step, layer, head = (int(x) for x in key.split("_"))
        out[(step, layer, head)] = _window(window)
    return out


def step_windows(
    step: int, forward_batch: Any, args: Any, n_tiles: Grid
) -> list[list[Grid]] | None:
    """Windows `[layer][head]` (in tiles) for this step, or None for a full-attention step."""
    if dense_step(step, args, "sta_dense_steps"):
        return None
    windows: list[list[Grid]] | None = None
    param = getattr(forward_batch, "STA_param", None)
    path = getattr(args, "mask_strategy_file_path", None)
    if param is not None:
        per_step = at_step(param, step, "STA_param")
        windows = [[_window(w) for w in layer] for layer in per_step]
    elif path:
        table = _load_strategy(path)
        layers = 1 + max(k[1] for k in table)
        heads = 1 + max(k[2] for k in table)
        steps = sorted({k[0] for k in table})
        use = max((s for s in steps if s <= step), default=steps[0])
        windows = [
            [table.get((use, li, hi), n_tiles) for hi in range(heads)] for li in range(layers)
        ]
    elif getattr(args, "sta_window", None) is not None:
        windows = [[_window(args.sta_window)]]
    else:
        raise FvCompileError(
            "SLIDING_TILE_ATTN needs windows: set FastVideoArgs(sta_window=(wt, wh, ww)) (in tiles), "
            "FastVideoArgs(mask_strategy_file_path=...), or ForwardBatch(STA_param=...); the "
            "FastVideoArgs go to fv_compile.compile(..., fastvideo_args=...) or to forward_context"
        )
    if all(all(w[i] >= n_tiles[i] for i in range(3)) for layer in windows for w in layer):
        return None
    return windows
