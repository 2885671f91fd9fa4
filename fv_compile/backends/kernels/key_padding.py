"""Key padding on the device: every batch element's kept keys first, and how many it keeps.

Softmax and the weighted sum of values are sums over keys, so attention is the same under any
permutation of its keys. Under a mask that varies over batch and keys only (text padding), it is
attention over the keys the mask keeps, and a flash kernel runs that at full speed given each
batch element's number of keys (flash-attn-4's `seqused_k`, our Triton kernel's `kv_lengths`).
`keys_first` reorders k and v so that each batch element's kept keys come first, in their order
(a stable partition by prefix sums, and one gather of k and v), and counts them. The mask need not
be a suffix: any key mask works, and different batch elements (a CFG batch) keep different keys.

Cost: the gather reads and writes k and v once (HunyuanVideo 720p, 119,056 keys x 24 heads x 128:
~2.9 GB, ~0.7 ms at the H200's ~4.2 TB/s, against ~250 ms of attention). Whether the mask is
already a suffix is only known from its data, and deciding it would cost a host sync, so the
gather always runs. Fixed shapes, no host sync: it runs inside CUDA graphs.

Not for causal attention (a causal mask depends on key positions): the backends using this
declare `mask_with_causal = False`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from fv_compile.site import (
    EMPTY_UNIFORM,
    MASK_ADDITIVE_KEY_PADDING,
    AttentionSite,
    blocking_limit,
    fully_blocked_rows,
)


class KeyPadding(NamedTuple):
    """How an impl reads its site's key padding mask: static facts from the site row."""

    # an additive mask keeps the keys whose value is above this; None: a boolean mask (True = keep)
    limit: float | None = None
    # EMPTY_UNIFORM for an additive mask that blocks with one finite value: eager gives a batch
    # element whose every key is blocked the mean of v (softmax of equal logits). None: such rows
    # are the op's to fix (`ops._eager_empty_rows`: boolean masks, fills, -inf)
    empty: str | None = None

    @classmethod
    def of_site(cls, site: AttentionSite | None) -> KeyPadding:
        """The reading of `site`'s mask; a boolean reading without a site (a mask that reaches an
        impl built outside fv_compile must then be boolean: an additive one is refused)."""
        if site is None or site.mask_kind != MASK_ADDITIVE_KEY_PADDING:
            return cls()
        scale = site.scale or 1.0
        fill = site.padding_fill
        empty = None
        if fill is not None and fill != float("-inf"):
            empty = fully_blocked_rows(fill, scale)
        return cls(limit=blocking_limit(scale), empty=empty)


def kept_keys(mask: torch.Tensor, kv_len: int, padding: KeyPadding) -> torch.Tensor:
    """bool `[B|1, kv_len]`: the keys `mask` (`[B|1, 1, 1, Sk|1]`) keeps."""
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
        raise ValueError(
            "a key padding mask is [B|1, 1, 1, Sk] (it varies over batch and keys only), got "
            f"{tuple(mask.shape)}"
        )
    if mask.dtype == torch.bool:
        keep = mask[:, 0, 0]
    elif padding.limit is None:
        raise ValueError(
            "an additive mask is taken as key padding only from a site whose mask fv_compile proved "
            "to be 0 or one blocking value per key (MASK_ADDITIVE_KEY_PADDING)"
        )
    else:
        keep = mask[:, 0, 0] > padding.limit
    return keep.expand(keep.shape[0], kv_len)


def keys_first(
    key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(k, v, counts)`: `[B, Sk, Hk, D]` key and value with every batch element's kept keys first,
    in their order (the blocked ones after them, in theirs), and int32 `[B]` how many it keeps.

    `keep`: bool `[B|1, Sk]`; with one row, every batch element keeps the same keys."""
    b = key.shape[0]
    order = kept_first_order(keep)  # [B|1, Sk]
    counts = keep.sum(1, dtype=torch.int32).expand(b).contiguous()
    if keep.shape[0] == 1:
        return key.index_select(1, order[0]), value.index_select(1, order[0]), counts
    # one flat row gather per tensor: batched advanced indexing (key[rows, order]) took 8.5 ms
    # on the H200 for a CFG pair at HunyuanVideo 720p, where one pass over k and v is ~1.4 ms
    sk = key.shape[1]
    flat = (order + sk * torch.arange(b, device=key.device)[:, None]).flatten()
    k, v = (x.flatten(0, 1).index_select(0, flat).unflatten(0, (b, sk)) for x in (key, value))
    return k, v, counts


def kept_first_order(keep: torch.Tensor) -> torch.Tensor:
    """int64 `[R, N]` of bool `keep` `[R, N]`: each row's positions with the kept ones first,
    each group in order (a stable partition, by prefix sums: no sort)."""
    n = keep.shape[1]
    kept_before = keep.cumsum(1)  # kept positions <= j (int64)
    count = kept_before[:, -1:]
    j = torch.arange(n, device=keep.device)
    # a kept position goes to its rank among the kept; a blocked one after all of them, by its rank
    dest = torch.where(keep, kept_before - 1, count + j - kept_before)
    return torch.empty_like(dest).scatter_(1, dest, j.expand_as(dest))


def key_padded_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    padding: KeyPadding,
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Attention on `[B, S, H, D]` tensors under a key padding mask, through `run(q, k, v,
    counts)`: a dense kernel that attends keys `[0, counts[b])` of batch element b.

    A batch element that keeps no key gets what eager gives it when `padding.empty` says (see
    `KeyPadding`); otherwise its rows are `run`'s (zeros, or unspecified) and the op replaces them
    with eager's values."""
    keep = kept_keys(mask, key.shape[1], padding)
    k, v, counts = keys_first(key, value, keep)
    out = run(query, k, v, counts)
    if padding.empty == EMPTY_UNIFORM:
        groups = query.shape[2] // value.shape[2]
        mean = value.mean(1, keepdim=True, dtype=torch.float32).to(out.dtype)  # [B, 1, Hk, Dv]
        out = torch.where(
            (counts == 0).view(-1, 1, 1, 1), mean.repeat_interleave(groups, dim=2), out
        )
    return out
