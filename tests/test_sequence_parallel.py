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
}
STA = FastVideoArgs(patch_size=(1, 2, 2), sta_tile_size=(1, 2, 2), sta_window=(2, 1, 2))
STA_DIVIDING = FastVideoArgs(patch_size=(1, 2, 2), sta_tile_size=(1, 3, 1), sta_window=(2, 1, 2))


def model_for(preset: str) -> torch.nn.Module:
    cfg = PRESETS[preset]
    if preset.startswith("hunyuan"):
        cfg = dataclasses.replace(cfg, num_kv_heads=2)  # divisible by the degree
    return build_model(cfg)


def run_case(name: str, sequence_parallel) -> tuple[torch.Tensor, int, int, int]:
    """The case's output, its number of Dynamo graphs and graph breaks, and how many of its
    graph variants run in tile order."""
    preset, policy = CASES[name]
    torch._dynamo.reset()
    model = model_for(preset)
    args, kwargs = example_inputs(model, grid=GRID)
    cm = fv_compile.compile(
        model, policy, compiler="aot_eager", strict=True, sequence_parallel=sequence_parallel
    )
    batch = ForwardBatch(raw_latent_shape=tuple(args[0].shape))
    args_ = STA_DIVIDING if name.endswith("tile_order") else STA
    with torch.no_grad(), fv_compile.forward_context(0, batch, args_):
        out = cm(*args, **kwargs)
    backend = cm._fv_backend
    return out, backend.graphs, len(backend.graph_break_report()), cm.variants_token_ordered


def _worker(rank: int, world: int, port: int, results: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save({n: run_case(n, world) for n in CASES}, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    results = str(tmp_path_factory.mktemp("sp") / "out")
    mp.spawn(_worker, args=(2, _free_port(), results), nprocs=2)
    return [torch.load(f"{results}.{r}") for r in range(2)]


@pytest.mark.parametrize("case", list(CASES))
def test_every_rank_gets_the_single_process_output(two_ranks, case):
    expected = run_case(case, None)[0]
    for rank in two_ranks:
        torch.testing.assert_close(rank[case][0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_no_extra_dynamo_graphs_and_no_graph_breaks(two_ranks, case):
    _, graphs, breaks, _ = run_case(case, None)
    assert [(r[case][1], r[case][2]) for r in two_ranks] == [(graphs, 0), (graphs, 0)]
    assert breaks == 0


@pytest.mark.parametrize("case", ["wan_sta_tile_order", "hunyuan_sta_tile_order"])
def test_sites_in_tile_order_are_sharded_too(two_ranks, case):
    """The token-order pass hands these sites permuted tokens (joint text kept in place); the
    sequence-parallel rewrite after it must still shard their video tokens, not their text."""
    assert run_case(case, None)[3] > 0
    assert [r[case][3] > 0 for r in two_ranks] == [True, True]


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
    real = ulysses.sequence_parallel_attention

    def counted(*args, **kwargs):
        roles.append(fv_compile.ops.site_runtime(args[4]).role)
        return real(*args, **kwargs)

    monkeypatch.setattr(ulysses, "sequence_parallel_attention", counted)
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
