"""Training a model with gradient checkpointing on (diffusers' `enable_gradient_checkpointing`,
torch.utils.checkpoint): the checkpoint recomputes each block's forward in the backward and
counts what it saves, so compiling at the first training call must save nothing of its own; a
model compiled whole hides its blocks inside the checkpoint's subgraph, which says so."""

import copy
import warnings

import pytest
import torch

import fv_compile

pytest.importorskip("diffusers")  # before the import below, which needs it
from tests.test_pipelines import tiny_transformer


def _wan(checkpointing: bool = True) -> torch.nn.Module:
    model = tiny_transformer().train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model


def _inputs(width: int = 8):
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(1, 4, 3, 8, width, generator=g),
        torch.tensor([700.0]),
        torch.randn(1, 8, 16, generator=g),
    )


def _gradients(model, call, width: int = 8) -> list[torch.Tensor]:
    model.zero_grad()
    call(*_inputs(width), return_dict=False)[0].square().sum().backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_the_first_training_call_of_each_shape_trains_as_eager(compiler):
    model = _wan()
    twin = copy.deepcopy(model)
    cm = fv_compile.compile(model, "TORCH_SDPA", compiler=compiler)
    for width in (8, 12):  # each new shape compiles inside the checkpointed forward
        got = _gradients(model, cm, width)
        want = _gradients(twin, twin, width)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    assert all(s.status == "rewritten" for s in cm.explain().sites)


def test_a_model_compiled_whole_says_its_checkpointed_attention_runs_as_written():
    model = _wan()
    twin = copy.deepcopy(model)
    cm = fv_compile.compile(model, "TORCH_SDPA", compiler="eager", regional=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _gradients(model, cm)
    for g, w in zip(got, _gradients(twin, twin)):
        torch.testing.assert_close(g, w)
    sites = cm.explain().sites
    assert len(sites) == 4 and all(s.status == "skipped" for s in sites)
    assert all("tag_activation_checkpoint" in s.reason for s in sites), sites[0].reason
    assert {s.module_path for s in sites} >= {"blocks.0.attn1", "blocks.1.attn2"}
    (warning,) = [w for w in caught if "fv_compile: 4 attention site(s) inside" in str(w.message)]
    assert "regional" in str(warning.message)


def test_a_per_step_backend_recomputed_by_the_backward_says_why_it_has_no_metadata():
    model = _wan()
    args = fv_compile.FastVideoArgs(sta_tile_size=(1, 2, 2), sta_window=(2, 1, 1))
    cm = fv_compile.compile(
        model, {"self": "SLIDING_TILE_ATTN"}, compiler="eager", fastvideo_args=args
    )
    out = cm(*_inputs(), return_dict=False)[0]
    with pytest.raises(fv_compile.FvCompileError, match="ran inside a backward pass"):
        out.square().sum().backward()
