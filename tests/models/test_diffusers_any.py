"""from_diffusers builds any diffusers video transformer, at any size: presets, constructor
overrides, latent grids and pixel videos through each class's own VAE."""

import pytest
import torch

from fv_compile import FvCompileError
from fv_compile.models import from_diffusers

pytest.importorskip("diffusers")


def _runs(model, args, kwargs):
    with torch.no_grad():
        out = model(*args, **kwargs)[0]
    return out.shape == args[0].shape and bool(torch.isfinite(out).all())


def test_ltx_video_takes_patchified_tokens_with_its_latent_grid():
    model, args, kwargs = from_diffusers("LTXVideoTransformer3DModel")
    assert args[0].shape == (1, 2 * 8 * 8, 8)
    assert (kwargs["num_frames"], kwargs["height"], kwargs["width"]) == (2, 8, 8)
    assert _runs(model, args, kwargs)


def test_a_pixel_video_maps_through_the_classs_own_vae():
    _, _, kwargs = from_diffusers(
        "LTXVideoTransformer3DModel", video=(17, 96, 128)
    )  # 8x in time, 32x in space
    assert (kwargs["num_frames"], kwargs["height"], kwargs["width"]) == (3, 3, 4)
    _, args, _ = from_diffusers(
        "WanTransformer3DModel", video=(9, 64, None)
    )  # Wan's 4x8; width: the preset's
    assert args[0].shape[2:] == (3, 8, 16)


def test_config_overrides_apply_on_top_of_a_preset():
    model, _, _ = from_diffusers(
        "WanTransformer3DModel", "tiny", config={"num_layers": 3, "ffn_dim": 48}
    )
    assert len(model.blocks) == 3 and model.config.ffn_dim == 48


def test_a_class_without_a_preset_of_its_own_is_shrunk_and_runs():
    model, args, kwargs = from_diffusers("SkyReelsV2Transformer3DModel")
    assert model.config.num_layers == 2 and model.config.attention_head_dim == 16
    assert sum(p.numel() for p in model.parameters()) < 1e6
    assert _runs(model, args, kwargs)


def test_an_image_transformer_is_not_a_video_transformer():
    with pytest.raises(
        FvCompileError,
        match=r"unsupported diffusers class 'FluxTransformer2DModel'.*\*Transformer3DModel",
    ):
        from_diffusers("FluxTransformer2DModel")
