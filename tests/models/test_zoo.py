import ast
import dataclasses
import pathlib
import sys

import pytest
import torch

import fv_compile.models
from fv_compile.models import (
    PRESETS,
    build_model,
    example_inputs,
    from_diffusers,
    latent_grid,
    token_count,
)

TINY = [name for name in PRESETS if name.endswith("-tiny")]
REAL = [name for name in PRESETS if not name.endswith("-tiny")]

# Parameter counts of the full-size presets, within a few percent of the published models.
REAL_PARAMS = {
    "wan2.1-1.3b": (1.3e9, 1.5e9),
    "wan2.1-14b": (13.5e9, 15e9),
    "hunyuanvideo": (12e9, 13.5e9),
    "cogvideox-5b": (5e9, 6e9),
}


@pytest.fixture(scope="module", params=TINY)
def tiny(request):
    model = build_model(request.param)
    args, kwargs = example_inputs(model)
    return model, args, kwargs


def test_tiny_forward_shape_and_finite(tiny):
    model, args, kwargs = tiny
    out = model(*args, **kwargs)
    assert out.shape == args[0].shape
    assert torch.isfinite(out).all()
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_fullgraph_compile_matches_eager(tiny):
    model, args, kwargs = tiny
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args, **kwargs), model(*args, **kwargs))


def test_text_mask_all_valid_is_a_no_op(tiny):
    model, (latent, timestep, text), _ = tiny
    all_valid = torch.ones(text.shape[:2], dtype=torch.bool)
    torch.testing.assert_close(
        model(latent, timestep, text, all_valid), model(latent, timestep, text)
    )


def test_text_mask_hides_padded_tokens(tiny):
    model, (latent, timestep, text), _ = tiny
    mask = torch.ones(text.shape[:2], dtype=torch.bool)
    mask[:, text.shape[1] // 2 :] = False
    padded = model(latent, timestep, text, mask)
    assert not torch.allclose(padded, model(latent, timestep, text), atol=1e-4)
    # Whatever sits in the padded positions must not reach the output.
    noisy = torch.where(mask[..., None], text, 100 * torch.randn_like(text))
    torch.testing.assert_close(model(latent, timestep, noisy, mask), padded)


@pytest.mark.parametrize("preset", TINY)
def test_bfloat16_forward_is_finite(preset):
    model = build_model(preset, dtype=torch.bfloat16)
    args, kwargs = example_inputs(model)
    assert args[0].dtype == torch.bfloat16 and args[1].dtype == torch.float32
    assert torch.isfinite(model(*args, **kwargs)).all()


def test_weights_and_inputs_are_seeded():
    a, b, c = (build_model("wan-tiny", seed=s) for s in (0, 0, 1))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.blocks[0].self_attn.q.weight, c.blocks[0].self_attn.q.weight)
    first, second = example_inputs("wan-tiny", seed=3), example_inputs("wan-tiny", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(first[0], second[0]))


def test_latent_grid_and_token_count():
    assert latent_grid(81, 480, 832) == (21, 60, 104)
    assert latent_grid(1, 480, 832) == (1, 60, 104)
    assert token_count("wan2.1-1.3b", (21, 60, 104)) == 32_760
    assert token_count("wan2.1-1.3b") == 32_760
    (latent, _, text), _ = example_inputs(
        "wan2.1-1.3b", frames=81, height=480, width=832, device="meta"
    )
    assert latent.shape == (1, 16, 21, 60, 104) and text.shape == (1, 512, 4096)
    (latent, _, _), _ = example_inputs("wan-tiny", grid=(3, 4, 6), batch=2)
    assert latent.shape == (2, 4, 3, 4, 6)


def test_bad_grids_are_rejected():
    with pytest.raises(ValueError, match="not both"):
        example_inputs("wan-tiny", grid=(2, 8, 8), frames=5)
    with pytest.raises(ValueError, match="patch"):
        example_inputs("wan-tiny", grid=(2, 7, 8))
    with pytest.raises(ValueError, match="patch"):
        token_count("cogvideox-tiny", (2, 8, 9))


@pytest.mark.parametrize("call", [build_model, example_inputs, token_count])
def test_unknown_preset_lists_valid_names(call):
    with pytest.raises(ValueError) as err:
        call("wan-huge")
    for name in PRESETS:
        assert name in str(err.value)


def test_hunyuan_tiny_single_stream_is_gqa():
    cfg = PRESETS["hunyuan-tiny"]
    assert cfg.num_kv_heads == 1 < cfg.num_heads
    gqa = build_model(cfg)
    mha = build_model(dataclasses.replace(cfg, num_kv_heads=None))
    assert gqa.single_blocks[0].qkv_dim == (2 + 2 * 1) * cfg.head_dim
    assert mha.single_blocks[0].qkv_dim == 3 * cfg.hidden_dim
    args, kwargs = example_inputs(mha)
    assert mha(*args, **kwargs).shape == args[0].shape
    with pytest.raises(ValueError, match="num_kv_heads"):
        dataclasses.replace(cfg, num_kv_heads=3)


@pytest.mark.parametrize("preset", REAL)
def test_real_presets_build_on_meta(preset):
    model = build_model(preset, dtype=torch.bfloat16, device="meta")
    params = list(model.parameters())
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in params)
    low, high = REAL_PARAMS[preset]
    assert low < sum(p.numel() for p in params) < high
    args, kwargs = example_inputs(model)
    assert args[0].is_meta
    assert model(*args, **kwargs).shape == args[0].shape


def test_diffusers_is_only_imported_lazily():
    package = pathlib.Path(fv_compile.models.__file__).parent
    for source in package.glob("*.py"):
        for node in ast.parse(source.read_text()).body:
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] == "diffusers" for n in names), (
                f"{source.name} imports diffusers eagerly"
            )


@pytest.mark.parametrize(
    "class_name, attention_sites",
    [
        ("WanTransformer3DModel", 4),
        ("CogVideoXTransformer3DModel", 2),
        ("HunyuanVideoTransformer3DModel", 5),
    ],
)
def test_from_diffusers_tiny_runs(class_name, attention_sites):
    pytest.importorskip("diffusers")
    model, args, kwargs = from_diffusers(class_name)
    sites = [name for name, m in model.named_modules() if type(m).__name__.endswith("Attention")]
    assert len(sites) == attention_sites
    out = model(*args, **kwargs)[0]
    assert out.shape == args[0].shape and torch.isfinite(out).all()


def test_from_diffusers_config_override_and_errors(monkeypatch):
    pytest.importorskip("diffusers")
    model, _, _ = from_diffusers("WanTransformer3DModel", {"num_layers": 1})
    assert len(model.blocks) == 1
    with pytest.raises(ValueError, match="WanTransformer3DModel"):
        from_diffusers("FluxTransformer2DModel")
    with pytest.raises(ValueError, match="tiny"):
        from_diffusers("WanTransformer3DModel", "wan-huge")
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match="pip install"):
        from_diffusers("WanTransformer3DModel")
