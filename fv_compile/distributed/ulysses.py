"""Ulysses sequence parallelism at each video self- and joint-attention site.

Scope (the per-site form): every op outside the attention sites runs on the full, replicated token
sequence, as without sequence parallelism. At a video self- or joint-attention site each rank takes
its shard of the video tokens of q, k and v (padded to a multiple of the degree), and the op follows
FastVideo's `DistributedAttention` order: all-to-all (sequence shard -> head shard; the padding is
sliced off right after it, so padded keys never count), replicated text tokens sliced to the local
heads (joint attention), `preprocess_qkv`, `impl.forward`, `postprocess_output` (inside
`fv_compile::attention`, on the full sequence: tile indices do not depend on the degree), the text
part of the output all-gathered over heads, the video part all-to-all'ed back and all-gathered over
the sequence. Cross-attention to text stays local and untouched. No per-token table is ever seen
sharded, so the output is the single-process output on every rank; the cost is that the sequence is
sharded only across the sites (sharding the hidden states between sites is the step that gives the
speedup, not done here).

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
    group; returns the replicated `[B, S, H, Dv]` output."""
    sp = SequenceParallel(group_name, degree, rank)
    s = q.shape[1]
    n = s - text_len  # video tokens
    c = -(-n // degree)  # tokens per rank, the last shard padded

    def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if text_first:
            return x[:, :text_len], x[:, text_len:]
        return x[:, n:], x[:, :n]

    def join(text: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        if text_len == 0:
            return video
        return torch.cat([text, video] if text_first else [video, text], 1)

    def scatter(x: torch.Tensor) -> torch.Tensor:
        text, video = split(x)
        video = torch.nn.functional.pad(video, (0, 0, 0, 0, 0, degree * c - n))
        shard = video[:, rank * c : (rank + 1) * c]
        return join(_local_heads(text, sp), _seq_to_heads(shard, sp, n))

    if mask is not None and mask.shape[1] != 1:
        mask = mask.unflatten(1, (degree, mask.shape[1] // degree))[:, rank]
    out = torch.ops.fv_compile.attention(
        scatter(q), scatter(k), scatter(v), mask, site, variant, metadata
    )
    text, video = split(out)
    video = _gather(_heads_to_seq(video, sp, c), sp, 1)[:, :n]
    if text_len:
        text = _gather(text, sp, 2)
    return join(text, video).contiguous()


def _value(node: Any) -> Any:
    return node.meta.get("example_value", node.meta.get("val"))


def shard_attention_sites(gm: GraphModule, sp: SequenceParallel) -> GraphModule:
    """A copy of `gm` whose video self- and joint-attention sites run sequence parallel."""
    gm = copy_graph_module(gm)
    for node in list(gm.graph.nodes):
        if node.target is not torch.ops.fv_compile.attention.default:
            continue
        rt = ops.site_runtime(node.args[4])
        if rt.role not in ("self", "joint"):
            continue  # cross-attention to text: local, on the replicated queries
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
                    f"use a smaller degree that divides {heads} "
                    f"({', '.join(map(str, fits))})"
                )
        text_len = int(rt.joint_text_len or 0) if rt.role == "joint" else 0
        node.target = sequence_parallel_attention
        node.kwargs = dict(
            group_name=sp.group_name,
            degree=sp.degree,
            rank=sp.rank,
            text_len=text_len,
            text_first=bool(rt.joint_text_first),
        )
    gm.recompile()
    return gm
