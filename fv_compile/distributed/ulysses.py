"""Ulysses sequence parallelism at the video self- and joint-attention sites, and between them.

Between the sites: where the pass proves every op from the first such site to the last keeps
each token's value apart from the others' (`passes.token_order.shard_token_stretch`: norms,
linears, gated residuals, MLPs, cross-attention whose queries are the video tokens, per-token
tables such as RoPE's), that stretch runs on this rank's share of the video tokens (consecutive
chunks of `ceil(n / degree)` in rank order, the last shorter; joint text tokens whole on every
rank). The values entering it are cut to the share, the values leaving it are gathered whole
once (`gather_tokens`), and each site runs on its share (`sharded_sequence_parallel_attention`):
FastVideo's `DistributedAttention` order, all-to-all (sequence shard -> head shard; the padding of
the last share sliced off right after it, so padded keys never count), replicated text tokens
sliced to the local heads (joint attention), `preprocess_qkv`, `impl.forward`,
`postprocess_output` (inside `fv_compile::attention`, on the full sequence: tile indices do not
depend on the degree), the text part of the output all-gathered over heads, the video part
all-to-all'ed back to the share. With regional compile each block is such a stretch (cut at its
input, gathered at its output); compiled whole, the stretch spans every block.

Where the proof fails (an op that mixes, moves or counts tokens; explain says which), each site
takes its share of the replicated tokens and gathers its output (`sequence_parallel_attention`):
correct, but only the attention is split. Cross-attention to text stays local and untouched.

Collectives are `_c10d_functional` ops inside the compiled graph, after Dynamo: no graph break, no
host sync, CUDA-graph safe. The rank and degree are constants of each process's own graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule

from fv_compile import ops
from fv_compile.errors import FvCompileError
from fv_compile.fx_graphs import copy_graph_module
from fv_compile.passes.token_order import (
    TokenOrderResult,
    TokenShard,
    TokenSite,
    shard_token_stretch,
)

_NO_GROUP = (
    "sequence_parallel needs an initialised process group: launch with torchrun and call "
    "torch.distributed.init_process_group() before fv_compile.compile(..., sequence_parallel=...)"
)


@dataclass(frozen=True)
class SequenceParallel:
    """The group the attention sites shard over: its name, size and this process's rank in it."""

    group_name: str
    degree: int
    rank: int
    backends: str = ""  # `torch.distributed.get_backend(group)`: "nccl", "cpu:gloo,cuda:nccl", ...

    def backend_for(self, device: torch.device) -> str | None:
        """The collective backend the group runs for tensors on `device`, None where unknown."""
        if not self.backends:
            return None
        if ":" not in self.backends:
            return self.backends
        for part in self.backends.split(","):
            kind, _, name = part.partition(":")
            if kind.strip() == device.type:
                return name.strip()
        return None

    def check_serves(self, device: torch.device, where: str) -> None:
        """The collectives run where the tensors are: NCCL only on CUDA, and gloo's all-gather on
        CUDA tensors has been seen to crash the process (a segmentation fault, no Python error),
        so CUDA needs NCCL and the CPU gloo."""
        want = {"cuda": "nccl", "cpu": "gloo"}.get(device.type)
        backend = self.backend_for(device)
        if want is not None and backend in ("nccl", "gloo") and backend != want:
            raise FvCompileError(
                f"{where}: sequence_parallel on {device.type} tensors needs a process group that "
                f"runs {want} for {device.type}, this one runs {backend} ({self.backends!r}); call "
                f"torch.distributed.init_process_group('{want}') (or 'cpu:gloo,cuda:nccl' for both)"
            )


def resolve(spec: Any) -> SequenceParallel | None:
    """`sequence_parallel=` as given to `fv_compile.compile`: None (off), a degree (the default
    group's size) or a `torch.distributed.ProcessGroup`."""
    if spec is None:
        return None
    import torch.distributed as dist

    if isinstance(spec, bool) or not isinstance(spec, (int, dist.ProcessGroup)):
        raise FvCompileError(
            "sequence_parallel must be a degree (int) or a torch.distributed.ProcessGroup this "
            f"process belongs to, got {type(spec).__name__}"
        )
    if not dist.is_available() or not dist.is_initialized():
        raise FvCompileError(_NO_GROUP)
    if isinstance(spec, int):
        world = dist.get_world_size()
        if spec != world:
            raise FvCompileError(
                f"sequence_parallel={spec} but the default process group has {world} ranks: pass "
                f"sequence_parallel={world}, or a group of {spec} ranks "
                f"(torch.distributed.new_group) as sequence_parallel=group"
            )
        group = dist.group.WORLD
    else:
        group = spec
    rank = dist.get_rank(group) if group is not None else -1
    if group is None or rank < 0:
        raise FvCompileError(
            "sequence_parallel must be a degree (int) or a torch.distributed.ProcessGroup this "
            "process belongs to, got a group it is not a member of"
        )
    return SequenceParallel(
        group.group_name, dist.get_world_size(group), rank, str(dist.get_backend(group))
    )


def _wait(t: torch.Tensor) -> torch.Tensor:
    return torch.ops._c10d_functional.wait_tensor(t)


def _seq_to_heads(x: torch.Tensor, sp: SequenceParallel, n: int) -> torch.Tensor:
    """`[B, c, H, D]` (this rank's tokens, all heads) -> `[B, n, H/W, D]` (every token, the
    rank's heads), the padding beyond `n` dropped."""
    w = sp.degree
    b, c, h, d = x.shape
    x = x.reshape(b, c, w, h // w, d).permute(2, 0, 1, 3, 4).contiguous()
    y = _wait(
        torch.ops._c10d_functional.all_to_all_single(
            x.flatten(0, 1), [b] * w, [b] * w, sp.group_name
        )
    )
    y = y.reshape(w, b, c, h // w, d).permute(1, 0, 2, 3, 4).reshape(b, w * c, h // w, d)
    return y[:, :n]


def _heads_to_seq(x: torch.Tensor, sp: SequenceParallel, c: int) -> torch.Tensor:
    """`[B, n, H/W, D]` -> `[B, c, H, D]`: the inverse of `_seq_to_heads` (re-padded)."""
    w = sp.degree
    b, n, hl, d = x.shape
    x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, w * c - n))
    x = x.reshape(b, w, c, hl, d).permute(1, 0, 2, 3, 4).contiguous()
    y = _wait(
        torch.ops._c10d_functional.all_to_all_single(
            x.flatten(0, 1), [b] * w, [b] * w, sp.group_name
        )
    )
    return y.reshape(w, b, c, hl, d).permute(1, 2, 0, 3, 4).reshape(b, c, w * hl, d)


def _gather(x: torch.Tensor, sp: SequenceParallel, dim: int) -> torch.Tensor:
    """All ranks' `x` concatenated along `dim`, in rank order."""
    y = _wait(
        torch.ops._c10d_functional.all_gather_into_tensor(x.contiguous(), sp.degree, sp.group_name)
    )
    y = y.reshape(sp.degree, *x.shape)
    return torch.cat(y.unbind(0), dim)


def _local_heads(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    hl = x.shape[2] // sp.degree
    return x[:, :, sp.rank * hl : (sp.rank + 1) * hl]


def _split_text(
    x: torch.Tensor, text_len: int, text_first: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(text, video)` of a joint `[B, S, ...]` sequence (text first or last)."""
    if text_first:
        return x[:, :text_len], x[:, text_len:]
    return x[:, x.shape[1] - text_len :], x[:, : x.shape[1] - text_len]


def _join_text(text: torch.Tensor, video: torch.Tensor, text_len: int, text_first: bool):
    if text_len == 0:
        return video
    return torch.cat([text, video] if text_first else [video, text], 1)


def sharded_sequence_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    site: int,
    variant: int,
    metadata: list[torch.Tensor],
    *,
    group_name: str,
    degree: int,
    rank: int,
    text_len: int,
    text_first: bool,
    video_len: int,
) -> torch.Tensor:
    """`fv_compile::attention` on this rank's share of the video tokens of q, k and v (chunks of
    `ceil(video_len / degree)` in rank order; joint text tokens whole on every rank), run
    Ulysses-style over the group; returns the rank's share of the output. The mask, when the
    site has one, is the whole site's: the op sees every token."""
    sp = SequenceParallel(group_name, degree, rank)
    n = video_len
    c = TokenShard(degree, rank).chunk(n)  # tokens per rank, the last share padded

    def scatter(x: torch.Tensor) -> torch.Tensor:
        text, video = _split_text(x, text_len, text_first)
        video = torch.nn.functional.pad(video, (0, 0, 0, 0, 0, c - video.shape[1]))
        return _join_text(_local_heads(text, sp), _seq_to_heads(video, sp, n), text_len, text_first)

    if mask is not None and mask.shape[1] != 1:
        mask = mask.unflatten(1, (degree, mask.shape[1] // degree))[:, rank]
    local = q.shape[1] - text_len
    out = torch.ops.fv_compile.attention(
        scatter(q), scatter(k), scatter(v), mask, site, variant, metadata
    )
    text, video = _split_text(out, text_len, text_first)
    video = _heads_to_seq(video, sp, c)[:, :local]
    if text_len:
        text = _gather(text, sp, 2)
    return _join_text(text, video, text_len, text_first).contiguous()


def gather_tokens(
    x: torch.Tensor,
    *,
    dim: int,
    segments: tuple[tuple[int, bool], ...],
    video_len: int,
    chunk: int,
    order: list[int] | None,
    group_name: str,
    degree: int,
) -> torch.Tensor:
    """Every rank's share of `x`'s video tokens along `dim`, made whole: `segments` are the
    share's `(length, sharded)` pieces of that dim (text pieces are whole on every rank); each
    sharded piece is padded to `chunk`, gathered in rank order and cut to `video_len`. `order`:
    the memory order (outermost dim first) the whole value is to have, None for contiguous."""
    sp = SequenceParallel(group_name, degree, -1)
    pieces = x.split([m for m, _ in segments], dim)
    out = []
    for piece, (m, sharded) in zip(pieces, segments):
        if sharded:
            pad = [0, 0] * (piece.dim() - 1 - dim) + [0, chunk - m]
            piece = _gather(torch.nn.functional.pad(piece, pad), sp, dim)
            piece = piece.narrow(dim, 0, video_len)
        out.append(piece)
    whole = out[0] if len(out) == 1 else torch.cat(out, dim)
    # a fresh copy: a cut of the padded gather counts as contiguous when its outer dims have size
    # one, yet keeps their strides, and the next block's guards check every stride
    if order is None:
        return whole.clone(memory_format=torch.contiguous_format)
    inverse = [order.index(d) for d in range(len(order))]
    return whole.permute(order).clone(memory_format=torch.contiguous_format).permute(inverse)


def sequence_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    site: int,
    variant: int,
    metadata: list[torch.Tensor],
    *,
    group_name: str,
    degree: int,
    rank: int,
    text_len: int,
    text_first: bool,
) -> torch.Tensor:
    """`fv_compile::attention` on replicated `[B, S, H, D]` q, k, v, run Ulysses-style over the
    group; returns the replicated `[B, S, H, Dv]` output: the rank's share of each, through
    `sharded_sequence_parallel_attention`, and the output's shares gathered."""
    n = q.shape[1] - text_len  # video tokens
    shard = TokenShard(degree, rank)
    c, start = shard.chunk(n), shard.start(n)
    local = max(0, shard.local(n))  # (a rank past the last token has an empty share)

    def share(x: torch.Tensor) -> torch.Tensor:
        text, video = _split_text(x, text_len, text_first)
        return _join_text(text, video[:, start : start + local], text_len, text_first)

    out = sharded_sequence_parallel_attention(
        share(q), share(k), share(v), mask, site, variant, metadata,
        group_name=group_name, degree=degree, rank=rank, text_len=text_len,
        text_first=text_first, video_len=n,
    )  # fmt: skip
    text = (text_len, False)
    video = (local, True)
    segments = (text, video) if text_first and text_len else (video, text) if text_len else (video,)
    return gather_tokens(
        out, dim=1, segments=segments, video_len=n, chunk=c, order=None,
        group_name=group_name, degree=degree,
    )  # fmt: skip


def _value(node: Any) -> Any:
    return node.meta.get("example_value", node.meta.get("val"))


def _check_site(node: Any, rt: ops.SiteRuntime, sp: SequenceParallel) -> None:
    q, k, v = (_value(a) for a in node.args[:3])
    where = rt.where or "an attention site"
    if any(x is not None and x.requires_grad for x in (q, k, v)):
        raise FvCompileError(
            f"{where}: sequence_parallel runs inference only; call the compiled model under "
            "torch.no_grad() (or compile without sequence_parallel to train)"
        )
    sp.check_serves(q.device, where)
    for what, heads in (("heads", q.shape[2]), ("key/value heads", k.shape[2])):
        if heads % sp.degree:
            fits = [d for d in range(1, heads + 1) if heads % d == 0]
            more = "more ranks than" if sp.degree > heads else "a degree that does not divide"
            raise FvCompileError(
                f"{where}: sequence_parallel degree {sp.degree} is {more} its {heads} {what}; "
                f"use a smaller degree that divides {heads} ({', '.join(map(str, fits))})"
            )


def _text(rt: ops.SiteRuntime) -> tuple[int, bool]:
    return (int(rt.joint_text_len or 0) if rt.role == "joint" else 0), bool(rt.joint_text_first)


def shard_attention_sites(
    gm: GraphModule, sp: SequenceParallel, example: list[Any] | None = None
) -> tuple[GraphModule, TokenOrderResult]:
    """A copy of `gm` whose video self- and joint-attention sites run sequence parallel, and
    what the stretch between them became: where the pass proves the ops between the sites
    token-wise (`passes.token_order`), that stretch runs on the rank's share of the video
    tokens, each site on its share (`sharded_sequence_parallel_attention`), and the tokens are
    gathered once where they leave it; every other such site takes its share of replicated
    tokens and gathers its output (`sequence_parallel_attention`). `example`: the graph's
    inputs."""
    op = torch.ops.fv_compile.attention.default
    video: dict[int, int] = {}  # site id -> its video tokens, for the sites that shard
    sites: dict[int, TokenSite] = {}
    permuted = False
    for node in gm.graph.find_nodes(op="call_function", target=op):
        sid = node.args[4]
        rt = ops.site_runtime(sid)
        permuted |= rt.tokens_permuted
        if rt.role in ("self", "joint"):
            _check_site(node, rt, sp)
            video[sid] = _value(node.args[0]).shape[1] - _text(rt)[0]
        elif rt.differentiable and not rt.causal and not (rt.preprocess or rt.postprocess):
            sites[sid] = TokenSite(False)  # dense attention: its queries may come sharded
    result = TokenOrderResult(None, reason="no video self- or joint-attention site")
    if permuted:
        result = TokenOrderResult(
            None, reason="the sites take their tokens in tile order (the token-order pass ran)"
        )
    elif video:
        longest = max(video.values())
        for sid, n in video.items():
            if n == longest:
                text_len, text_first = _text(ops.site_runtime(sid))
                sites[sid] = TokenSite(True, n, text_len, text_first)
        collective = dict(group_name=sp.group_name, degree=sp.degree)

        def anchor(node: Any) -> tuple[Any, dict[str, Any]]:
            site = sites[node.args[4]]
            return sharded_sequence_parallel_attention, dict(
                **collective, rank=sp.rank, text_len=site.text_len,
                text_first=site.text_first, video_len=site.video_len,
            )  # fmt: skip

        result = shard_token_stretch(
            gm, sites, TokenShard(sp.degree, sp.rank), anchor, (gather_tokens, collective), example
        )
    # (the stretch's graph is a copy already)
    gm = result.gm if result.gm is not None else copy_graph_module(gm)
    for node in list(gm.graph.find_nodes(op="call_function", target=op)):
        rt = ops.site_runtime(node.args[4])
        if rt.role not in ("self", "joint"):
            continue  # cross-attention to text: local, on the replicated queries
        text_len, text_first = _text(rt)
        node.target = sequence_parallel_attention
        node.kwargs = dict(
            group_name=sp.group_name,
            degree=sp.degree,
            rank=sp.rank,
            text_len=text_len,
            text_first=text_first,
        )
    gm.recompile()
    return gm, result
