"""sequence_parallel: every rank's output is the single-process output, on gloo with 2 processes.

The processes are spawned once per module (they cost seconds each); each case is one test.
"""

from __future__ import annotations

import dataclasses
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch._subclasses.fake_tensor import FakeTensor

import fv_compile
from fv_compile import FastVideoArgs, ForwardBatch
from fv_compile.models import PRESETS, build_model, example_inputs

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)

GRID = (3, 6, 10)  # 3 x 3 x 5 = 45 video tokens: does not divide by 2
CASES = {
    "wan_sdpa": ("wan-tiny", "TORCH_SDPA"),
    "wan_sta": ("wan-tiny", {"self": "SLIDING_TILE_ATTN", "default": "TORCH_SDPA"}),
    "hunyuan_sdpa": ("hunyuan-tiny", "TORCH_SDPA"),
    "hunyuan_sta": ("hunyuan-tiny", {"joint": "SLIDING_TILE_ATTN", "default": "TORCH_SDPA"}),
    # a tile that divides the 3 x 3 x 5 token grid: the stretch between the sites runs in tile order
    "wan_sta_tile_order": ("wan-tiny", {"self": "SLIDING_TILE_ATTN", "default": "TORCH_SDPA"}),
    "hunyuan_sta_tile_order": (
        "hunyuan-tiny",
        {"joint": "SLIDING_TILE_ATTN", "default": "TORCH_SDPA"},
    ),
    # one graph for the whole model: the stretch runs from the first block to the last
    "wan_sdpa_whole_model": ("wan-tiny", "TORCH_SDPA"),
    "hunyuan_sdpa_whole_model": ("hunyuan-tiny", "TORCH_SDPA"),
    # an op between the sites that mixes tokens: each site shards and gathers on its own
    "token_mixing_between_sites": ("token-mixing", "TORCH_SDPA"),
    "diffusers_wan": ("diffusers-wan", "TORCH_SDPA"),
    "wan_vsa": ("wan-tiny", {"self": "VIDEO_SPARSE_ATTN", "default": "TORCH_SDPA"}),
}
# run by 4 processes (models with 4 heads): 45 tokens in shares of 12, 12, 12 and 9
CASES_4 = {
    "wan_sdpa_4_ranks": ("wan-tiny-4h", "TORCH_SDPA"),
    "hunyuan_sta_4_ranks": (
        "hunyuan-tiny-4h",
        {"joint": "SLIDING_TILE_ATTN", "default": "TORCH_SDPA"},
    ),
}
STA = FastVideoArgs(patch_size=(1, 2, 2), sta_tile_size=(1, 2, 2), sta_window=(2, 1, 2))
STA_DIVIDING = FastVideoArgs(patch_size=(1, 2, 2), sta_tile_size=(1, 3, 1), sta_window=(2, 1, 2))
VSA = FastVideoArgs(patch_size=(1, 2, 2), VSA_sparsity=0.5)


class TokenMixing(torch.nn.Module):
    """Two self-attention layers with a mean over the tokens between them."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv0 = torch.nn.Linear(dim, 3 * dim)
        self.qkv1 = torch.nn.Linear(dim, 3 * dim)

    def attend(self, qkv: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = qkv(x).view(b, s, 3, self.heads, -1).unbind(2)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        return out.transpose(1, 2).reshape(b, s, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attend(self.qkv0, x)
        x = x - x.mean(dim=1, keepdim=True)
        return x + self.attend(self.qkv1, x)


def model_for(preset: str) -> torch.nn.Module:
    if preset == "token-mixing":
        torch.manual_seed(0)
        return TokenMixing()
    if preset == "diffusers-wan":
        from fv_compile.models import from_diffusers

        return from_diffusers("WanTransformer3DModel", grid=GRID)[0]
    if preset.endswith("-4h"):
        cfg = PRESETS[preset.removesuffix("-4h")]
        extra = {"num_kv_heads": 4} if preset.startswith("hunyuan") else {}
        return build_model(dataclasses.replace(cfg, num_heads=4, **extra))
    cfg = PRESETS[preset]
    if preset.startswith("hunyuan"):
        cfg = dataclasses.replace(cfg, num_kv_heads=2)  # divisible by the degree
    return build_model(cfg)


def inputs_for(preset: str, model: torch.nn.Module) -> tuple[tuple, dict]:
    if preset == "token-mixing":
        return (torch.randn(1, 45, 16, generator=torch.Generator().manual_seed(1)),), {}
    if preset == "diffusers-wan":
        from fv_compile.models import from_diffusers

        _, args, kwargs = from_diffusers("WanTransformer3DModel", grid=GRID)
        return args, kwargs
    return example_inputs(model, grid=GRID)


def run_case(name: str, sequence_parallel) -> tuple[torch.Tensor, int, int, int, list]:
    """The case's output, its number of Dynamo graphs and graph breaks, how many of its graph
    variants run in tile order, and what sequence parallelism made of its graphs."""
    preset, policy = {**CASES, **CASES_4}[name]
    torch._dynamo.reset()
    model = model_for(preset)
    args, kwargs = inputs_for(preset, model)
    cm = fv_compile.compile(
        model,
        policy,
        compiler="aot_eager",
        strict=True,
        sequence_parallel=sequence_parallel,
        regional=False if name.endswith("whole_model") else "auto",
    )
    batch = ForwardBatch(raw_latent_shape=tuple(args[0].shape))
    args_ = STA_DIVIDING if name.endswith("tile_order") else VSA if name.endswith("vsa") else STA
    with torch.no_grad(), fv_compile.forward_context(0, batch, args_):
        out = cm(*args, **kwargs)
    out = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
    backend = cm._fv_backend
    return (
        out,
        backend.graphs,
        len(backend.graph_break_report()),
        cm.variants_token_ordered,
        [row.to_dict() for row in cm.explain().sequence_parallel],
    )


def _worker(rank: int, world: int, port: int, results: str, cases: list[str]) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save({n: run_case(n, world) for n in cases}, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    results = str(tmp_path_factory.mktemp("sp") / "out")
    mp.spawn(_worker, args=(2, _free_port(), results, list(CASES)), nprocs=2)
    return [torch.load(f"{results}.{r}") for r in range(2)]


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    results = str(tmp_path_factory.mktemp("sp4") / "out")
    mp.spawn(_worker, args=(4, _free_port(), results, list(CASES_4)), nprocs=4)
    return [torch.load(f"{results}.{r}") for r in range(4)]


@pytest.mark.parametrize("case", list(CASES_4))
def test_four_ranks_each_get_the_single_process_output_from_their_share(four_ranks, case):
    expected = run_case(case, None)[0]
    for rank in four_ranks:
        torch.testing.assert_close(rank[case][0], expected, atol=1e-5, rtol=1e-5)
        rows = rank[case][4]
        assert rows and all(row["sharded"] for row in rows), rows


@pytest.mark.parametrize("case", list(CASES))
def test_every_rank_gets_the_single_process_output(two_ranks, case):
    expected = run_case(case, None)[0]
    for rank in two_ranks:
        torch.testing.assert_close(rank[case][0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_no_extra_dynamo_graphs_and_no_graph_breaks(two_ranks, case):
    _, graphs, breaks, _, _ = run_case(case, None)
    assert [(r[case][1], r[case][2]) for r in two_ranks] == [(graphs, 0), (graphs, 0)]
    assert breaks == 0


@pytest.mark.parametrize("case", ["wan_sta_tile_order", "hunyuan_sta_tile_order"])
def test_sites_in_tile_order_are_sharded_too(two_ranks, case):
    """The token-order pass hands these sites permuted tokens (joint text kept in place); the
    sequence-parallel rewrite after it must still shard their video tokens, not their text."""
    assert run_case(case, None)[3] > 0
    assert [r[case][3] > 0 for r in two_ranks] == [True, True]


SHARDED_BETWEEN_SITES = [
    "wan_sdpa",
    "wan_vsa",
    "wan_sta",
    "hunyuan_sdpa",
    "hunyuan_sta",
    "wan_sdpa_whole_model",
    "hunyuan_sdpa_whole_model",
    "diffusers_wan",
]


@pytest.mark.parametrize("case", SHARDED_BETWEEN_SITES)
def test_the_ops_between_the_sites_run_on_each_ranks_share_of_the_tokens(two_ranks, case):
    for rank in two_ranks:
        rows = rank[case][4]
        assert rows and all(row["sharded"] for row in rows), rows
        assert {row["video_len"] for row in rows} == {45}


def test_one_graph_shards_the_stretch_over_every_block(two_ranks):
    """Whole-model compile: the tokens are cut once where they enter the first block."""
    (row,) = two_ranks[0]["wan_sdpa_whole_model"][4]
    assert row["sites"] == PRESETS["wan-tiny"].num_layers


def test_an_op_mixing_the_tokens_keeps_each_site_sharding_on_its_own(two_ranks):
    (row,) = two_ranks[0]["token_mixing_between_sites"][4]
    assert not row["sharded"]
    assert "reduces over the token dim" in row["reason"]


@pytest.mark.parametrize("case", ["wan_sta_tile_order", "hunyuan_sta_tile_order"])
def test_sites_in_tile_order_shard_on_their_own(two_ranks, case):
    rows = two_ranks[0][case][4]
    assert any("tile order" in row["reason"] for row in rows if not row["sharded"])


def test_no_process_group_is_a_clear_error():
    with pytest.raises(fv_compile.FvCompileError, match="init_process_group"):
        fv_compile.compile(model_for("wan-tiny"), sequence_parallel=2)


def _errors_worker(rank: int, world: int, port: int, results: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    messages = {}
    try:
        try:
            fv_compile.compile(model_for("wan-tiny"), sequence_parallel=3)
        except fv_compile.FvCompileError as e:
            messages["size"] = str(e)
        model = build_model(dataclasses.replace(PRESETS["wan-tiny"], num_heads=1))
        args, _ = example_inputs(model, grid=GRID)
        cm = fv_compile.compile(model, "TORCH_SDPA", compiler="eager", sequence_parallel=2)
        try:
            with torch.no_grad():
                cm(*args)
        except fv_compile.FvCompileError as e:
            messages["heads"] = str(e)
        torch.save(messages, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_errors(tmp_path_factory):
    results = str(tmp_path_factory.mktemp("sp_errors") / "out")
    mp.spawn(_errors_worker, args=(2, _free_port(), results), nprocs=2)
    return torch.load(f"{results}.0")


def test_a_degree_other_than_the_group_size_names_the_fix(two_rank_errors):
    assert "sequence_parallel=2" in two_rank_errors["size"]


def test_more_ranks_than_heads_names_a_smaller_degree(two_rank_errors):
    assert "use a smaller degree" in two_rank_errors["heads"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (NCCL)")
def test_nccl_at_world_size_one_gives_the_output_without_sequence_parallel():
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = model_for("wan-tiny").cuda()
        args, kwargs = example_inputs(model, grid=GRID)
        outs = []
        for sp in (None, 1):
            torch._dynamo.reset()
            cm = fv_compile.compile(model, "TORCH_SDPA", sequence_parallel=sp)
            with torch.no_grad():
                outs.append(cm(*args, **kwargs))
        torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    finally:
        dist.destroy_process_group()


def test_self_sites_run_sequence_parallel_and_cross_sites_stay_local(monkeypatch):
    from fv_compile.distributed import ulysses

    roles = []
    real = ulysses.sharded_sequence_parallel_attention

    def counted(*args, **kwargs):
        if not isinstance(args[0], FakeTensor):  # (the pass's own check runs it on fakes)
            roles.append(fv_compile.ops.site_runtime(args[4]).role)
        return real(*args, **kwargs)

    # every site of the two blocks runs through it: on its share, or on replicated tokens
    monkeypatch.setattr(ulysses, "sharded_sequence_parallel_attention", counted)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = model_for("wan-tiny")  # 2 blocks: self- and cross-attention each
        args, kwargs = example_inputs(model, grid=GRID)
        cm = fv_compile.compile(model, "TORCH_SDPA", compiler="eager", sequence_parallel=1)
        with torch.no_grad():
            cm(*args, **kwargs)
    finally:
        dist.destroy_process_group()
    assert roles == ["self", "self"]


@pytest.mark.parametrize(
    "backends, device, serves",
    [
        ("gloo", "cpu", True),
        ("nccl", "cuda", True),
        ("cpu:gloo,cuda:nccl", "cpu", True),
        ("cpu:gloo,cuda:nccl", "cuda", True),
        ("nccl", "cpu", False),
        ("gloo", "cuda", False),
        ("cpu:gloo,cuda:gloo", "cuda", False),
    ],
)
def test_a_group_serves_a_device_only_with_that_devices_collective_backend(
    backends, device, serves
):
    from fv_compile.distributed.ulysses import SequenceParallel

    sp = SequenceParallel("g", 1, 0, backends)
    if serves:
        sp.check_serves(torch.device(device), "site")
    else:
        with pytest.raises(fv_compile.FvCompileError, match="needs a process group that runs"):
            sp.check_serves(torch.device(device), "site")
