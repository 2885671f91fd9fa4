"""What a new resolution costs (docs/resolution.md): with static shapes (fv_compile's default) one
Dynamo graph per resolution and one compile per distinct static metadata key, nothing on a return;
with `dynamic=True` (or torch's automatic dynamic shapes) one graph whose attention runs as the
model wrote it, for every backend."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import fv_compile
from fv_compile import FastVideoArgs, ForwardBatch
from tests.test_sliding_tile import TILE, VideoDiT, definition_mask

RESOLUTIONS = {
    "A": (5, 7, 9),
    "B": (4, 8, 8),
    "A'": (9, 7, 5),
}  # A' has A's token count, not its grid
STEPS = 2  # per resolution: step 0 dense (sta_dense_steps=1), step 1 sparse
WINDOW = (2, 1, 2)
SYMBOLIC = "symbolic shapes"


def sta_args():
    return FastVideoArgs(
        patch_size=(1, 1, 1), sta_tile_size=TILE, sta_window=WINDOW, sta_dense_steps=1
    )


def tokens(res, dim=32):
    grid = RESOLUTIONS[res]
    return torch.randn(
        1, math.prod(grid), dim, generator=torch.Generator().manual_seed(len(res) + grid[1])
    )


def call(cm, res, step, dim=32):
    grid = RESOLUTIONS[res]
    with (
        torch.no_grad(),
        fv_compile.forward_context(step, ForwardBatch(raw_latent_shape=(1, 4, *grid)), sta_args()),
    ):
        return cm(tokens(res, dim))


def reference(model, res, step, sparse, dim=32):
    """What the compiled model must return: dense attention, or STA's mask on sparse steps."""
    x = tokens(res, dim)
    with torch.no_grad():
        if not sparse or step == 0:
            return model(x)
        mask = definition_mask(RESOLUTIONS[res], TILE, WINDOW)
        return model(x, masks=[mask] * len(model.blocks))


class Budget:
    """Counts, per resolution visited, the Dynamo graphs traced and the graphs compiled (each
    call of the backend's compiler: one per Dynamo graph without metadata, one per metadata
    variant with it), and AOTAutograd's own compile count as a cross-check."""

    def __init__(self, cm):
        self.cm = cm
        self.compiles = 0
        compile_graph = cm._fv_backend.compile_graph

        def counting(gm, example_inputs):
            self.compiles += 1
            return compile_graph(gm, example_inputs)

        cm._fv_backend.compile_graph = counting

    def visit(self, res, steps=STEPS, dim=32, check=None):
        graphs, compiles, aot = (
            self.cm._fv_backend.graphs,
            self.compiles,
            counters["aot_autograd"]["total"],
        )
        for step in range(steps):
            out = call(self.cm, res, step, dim)
            if check is not None:
                check(res, step, out)
        return (
            self.cm._fv_backend.graphs - graphs,
            self.compiles - compiles,
            counters["aot_autograd"]["total"] - aot,
        )


@pytest.mark.parametrize("regional", [False, True], ids=["whole", "regional"])
@pytest.mark.parametrize(
    "backend, keys",
    [("TORCH_SDPA", 1), ("SLIDING_TILE_ATTN", 2)],  # STA: a dense-step and a sparse-step variant
)
def test_a_new_resolution_costs_one_compile_per_static_metadata_key_and_a_return_costs_none(
    backend, keys, regional
):
    counters.clear()
    model = VideoDiT().eval()
    cm = fv_compile.compile(model, backend, compiler="aot_eager", regional=regional)
    budget = Budget(cm)
    sparse = backend == "SLIDING_TILE_ATTN"

    def check(res, step, out):
        torch.testing.assert_close(out, reference(model, res, step, sparse), atol=1e-5, rtol=1e-5)

    spent = [budget.visit(res, check=check) for res in ("A", "B", "A")]
    assert spent == [(1, keys, keys), (1, keys, keys), (0, 0, 0)]
    assert cm.variants_compiled == (2 * keys if sparse else 0)


def test_a_new_grid_of_the_same_token_count_costs_only_its_metadata_keys():
    """Dynamo sees the same shapes (no new graph); STA's grid is a static key (two new variants)."""
    model = VideoDiT().eval()
    cm = fv_compile.compile(model, "SLIDING_TILE_ATTN", compiler="eager")
    budget = Budget(cm)

    def check(res, step, out):
        torch.testing.assert_close(out, reference(model, res, step, True), atol=1e-5, rtol=1e-5)

    assert [budget.visit(res, check=check)[:2] for res in ("A", "A'", "A", "A'")] == [
        (1, 2),
        (0, 2),
        (0, 0),
        (0, 0),
    ]


def test_steps_of_one_resolution_cost_nothing_after_their_first():
    model = VideoDiT().eval()
    cm = fv_compile.compile(model, "SLIDING_TILE_ATTN", compiler="eager")
    budget = Budget(cm)
    assert budget.visit("A", steps=2)[:2] == (1, 2)
    assert budget.visit("A", steps=6)[:2] == (0, 0)  # new timesteps, same static keys: tensors only


BACKENDS = ["auto", "TORCH_SDPA", "TRITON_ATTN", "FLASH_ATTN", "SLIDING_TILE_ATTN"]


def dim_for(backend):
    return 128 if backend == "TRITON_ATTN" else 32  # TRITON_ATTN takes head dims 64 and 128


@pytest.mark.parametrize("backend", BACKENDS)
def test_dynamic_true_compiles_one_graph_whose_attention_runs_as_the_model_wrote_it(backend):
    dim = dim_for(backend)
    model = VideoDiT(dim=dim).eval()
    cm = fv_compile.compile(model, backend, compiler="eager", dynamic=True, regional=False)
    budget = Budget(cm)

    def check(res, step, out):  # every backend, STA too: the model's own (dense) attention
        torch.testing.assert_close(
            out, reference(model, res, step, False, dim), atol=1e-5, rtol=1e-5
        )

    with pytest.warns(UserWarning, match=f"attention site\\(s\\) were traced with {SYMBOLIC}"):
        spent = [budget.visit(res, dim=dim, check=check)[:2] for res in ("A", "B", "A")]
    assert spent == [(1, 1), (0, 0), (0, 0)]
    sites = cm.explain().sites
    assert sites and all(s.status == "skipped" and "dynamic shape" in s.reason for s in sites)


@pytest.mark.parametrize("backend", BACKENDS)
def test_automatic_dynamic_shapes_leave_every_resolution_after_the_first_new_one_as_written(
    backend,
):
    """dynamic=None (torch.compile's default, and what torch.compile(backend="fv_compile") gets):
    the first resolution is static and rewritten; Dynamo recompiles the second with symbolic
    sizes, whose sites stay as the model wrote them; and from then on the first resolution runs
    on that symbolic graph too (Dynamo tries its newest cache entry first), not on its own."""
    dim = dim_for(backend)
    model = VideoDiT(dim=dim).eval()
    cm = fv_compile.compile(model, backend, compiler="eager", dynamic=None, regional=False)
    budget = Budget(cm)
    sparse = backend == "SLIDING_TILE_ATTN"

    def rewritten(res, step, out):
        torch.testing.assert_close(
            out, reference(model, res, step, sparse, dim), atol=1e-5, rtol=1e-5
        )

    def as_written(res, step, out):
        torch.testing.assert_close(
            out, reference(model, res, step, False, dim), atol=1e-5, rtol=1e-5
        )

    steps = STEPS if sparse else 1  # (dense backends: one step is all a resolution costs)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=f".*{SYMBOLIC}")  # none for the static graph
        assert budget.visit("A", steps, dim, rewritten)[:2] == (1, 2 if sparse else 1)
    with pytest.warns(UserWarning, match=SYMBOLIC):
        assert budget.visit("B", steps, dim, as_written)[:2] == (1, 1)
    assert budget.visit("A", steps, dim, as_written)[:2] == (0, 0)
    assert cm._fv_backend.graph_runs == [
        steps,
        2 * steps,
    ]  # A's static graph ran only the first time
    statuses = [s.status for s in cm.explain().sites]
    assert "rewritten" in statuses and "skipped" in statuses


@pytest.mark.parametrize("dynamic", [None, False], ids=["torch-default", "dynamic-false"])
def test_torch_compile_with_the_fv_compile_backend_rewrites_every_resolution_only_with_dynamic_false(
    dynamic, monkeypatch
):
    traced: list[set[str]] = []  # per graph Dynamo handed to the backend: its sites' statuses
    lower_graph = fv_compile.api.lower_graph

    def recording(gm, *args, **kwargs):
        result = lower_graph(gm, *args, **kwargs)
        traced.append({s.status for s in result.sites})
        return result

    monkeypatch.setattr(fv_compile.api, "lower_graph", recording)
    model = VideoDiT().eval()
    opts = {"attention_backend": "TORCH_SDPA", "compiler": "eager"}
    compiled = torch.compile(model, backend="fv_compile", options=opts, dynamic=dynamic)
    for res in ("A", "B", "A"):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.testing.assert_close(
                compiled(tokens(res)), reference(model, res, 0, False), atol=1e-5, rtol=1e-5
            )
    if dynamic is False:
        assert traced == [{"rewritten"}, {"rewritten"}]  # a static graph per resolution
    else:
        assert traced == [
            {"rewritten"},
            {"skipped"},
        ]  # B's graph is symbolic: the model's attention
