"""sequence_parallel between the sites: the ops between two video self-attention sites run on
each rank's share of the tokens only where the pass proves every one of them keeps each token's
value apart from the others' (fv_compile/passes/token_order.py, `shard_token_stretch`).

An adversary's list: ops that mix, move, count or draw over the tokens must leave each site
sharding on its own, with the reason in explain; ops that only look at each token (or at a
per-token table, a position computed from the length) may run sharded. Every rank's output is
the single-process output either way. Two processes over gloo, spawned once for the module; 33
tokens, shares of 17 and 16.
"""

from __future__ import annotations

import os
import re
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fv_compile
from tests.test_token_order import Cumsum, Lambda, Mutation, OverTokens, Shift, TinyDiT

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)

S, DIM = 33, 32


class Positional(torch.nn.Module):
    """What depends on a token's position: a learned embedding, a buffer of per-token scales,
    and angles from `torch.arange` over the tokens."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.pos = torch.nn.Parameter(torch.randn(1, S, DIM, generator=g))
        self.register_buffer("scale", torch.rand(S, 1, generator=g) + 0.5)

    def forward(self, x):
        angle = torch.arange(x.shape[1], dtype=x.dtype)[None, :, None]
        return (x + self.pos) * self.scale * torch.cos(angle)


class ReshapeKeepingTokens(torch.nn.Module):
    """Views that name the token count as a constant (the share has fewer)."""

    def forward(self, x):
        b, s, c = x.shape
        return (x.view(b, s, 2, c // 2) * 0.5).reshape(b, s, c).expand(b, s, c) + x


# name -> (the op between the sites, whether the stretch may run sharded, the reason when not)
BETWEEN = {
    "nothing": (None, True, None),
    "per_token_positions": (Positional, True, None),
    "constant_token_sizes": (ReshapeKeepingTokens, True, None),
    "cumsum": (Cumsum, False, r"\.cumsum is not known"),
    "shift": (Shift, False, r"cutting the video tokens"),
    "mutation": (Mutation, False, r"writes into a tensor"),
    "mean_over_tokens": (OverTokens, False, r"reduces over the token dim"),
    "softmax_over_tokens": (
        lambda: Lambda(lambda x: x * x.softmax(1)),
        False,
        r"over the token dim",
    ),
    "roll": (lambda: Lambda(lambda x: x + torch.roll(x, 1, 1)), False, r"torch\.roll"),
    "flip": (lambda: Lambda(lambda x: x + x.flip(1)), False, r"\.flip"),
    "sort": (lambda: Lambda(lambda x: x + x.sort(1).values), False, r"\.sort"),
    "gram": (
        lambda: Lambda(lambda x: x + (x.transpose(1, 2) @ x).transpose(1, 2)[:, :1].sum()),
        False,
        r"two permuted values",
    ),
    "reduce_everything": (
        lambda: Lambda(lambda x: x - x.mean(dim=(), keepdim=True)),
        False,
        r"reduces over every dim",
    ),
}


def build(name: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    make = BETWEEN[name][0]
    torch.manual_seed(0)
    model = TinyDiT(dim=DIM, between=None if make is None else make()).eval()
    g = torch.Generator().manual_seed(1)
    return model, (torch.randn(1, S, DIM, generator=g), torch.randn(S, 1, DIM // 2, generator=g))


def run(name: str, sequence_parallel) -> tuple[torch.Tensor, list[dict]]:
    torch._dynamo.reset()
    model, args = build(name)
    cm = fv_compile.compile(
        model,
        "TORCH_SDPA",
        compiler="aot_eager",
        regional=False,
        sequence_parallel=sequence_parallel,
    )
    with torch.no_grad():
        out = cm(*args)
    return out, [row.to_dict() for row in cm.explain().sequence_parallel]


def _worker(rank: int, world: int, port: int, results: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save({name: run(name, world) for name in BETWEEN}, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    results = str(tmp_path_factory.mktemp("sp_stretch") / "out")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, results), nprocs=2)
    return [torch.load(f"{results}.{r}") for r in range(2)]


@pytest.mark.parametrize("name", list(BETWEEN))
def test_every_rank_gets_the_single_process_output(two_ranks, name):
    expected, _ = run(name, None)
    for rank in two_ranks:
        torch.testing.assert_close(rank[name][0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", [n for n, (_, ok, _) in BETWEEN.items() if ok])
def test_token_wise_ops_run_on_the_share(two_ranks, name):
    for rank in two_ranks:
        (row,) = rank[name][1]
        assert row["sharded"] and row["sites"] == 2 and row["video_len"] == S, row


@pytest.mark.parametrize("name", [n for n, (_, ok, _) in BETWEEN.items() if not ok])
def test_an_op_that_looks_across_tokens_keeps_each_site_sharding_on_its_own(two_ranks, name):
    why = BETWEEN[name][2]
    (row,) = two_ranks[0][name][1]
    assert not row["sharded"] and row["stopped_at"], row
    assert re.search(why, row["reason"]), row["reason"]


def test_explain_says_what_ran_on_the_share(two_ranks):
    """The report a user reads names the stretch and its borders."""
    from fv_compile.site import SequenceShard

    (row,) = two_ranks[0]["nothing"][1]
    text = SequenceShard(**row).describe()
    assert "2 site(s) and the ops between them run on this rank's share" in text
    assert "of the 33 video tokens (1/2)" in text


def test_dropout_between_the_sites_keeps_each_site_sharding_on_its_own():
    """Random draws would differ on a share; checked without processes (the proof alone)."""
    from fv_compile.distributed.ulysses import SequenceParallel, shard_attention_sites
    from fv_compile.lowering import lower_graph
    from fv_compile.policy import SitePolicy

    captured = {}

    def backend(gm, example_inputs):
        result = lower_graph(gm, SitePolicy("TORCH_SDPA"))
        captured["gm"] = result.gm
        return result.gm.forward

    model = TinyDiT(dim=DIM, between=Lambda(lambda x: F.dropout(x, 0.5, True))).eval()
    _, args = build("nothing")
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True, dynamic=False)(*args)
    _, row = shard_attention_sites(captured["gm"], SequenceParallel("unused", 2, 0))
    assert not row.applied and "draws random numbers" in row.reason
