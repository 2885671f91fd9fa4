"""A real third-party model: diffusers' WanTransformer3DModel at a tiny config, compiled in one line."""

import pytest
import torch

import fv_compile
from tests._torch_bugs import inductor_cpu_masked_gather

diffusers = pytest.importorskip("diffusers")


def tiny_wan():
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        rope_max_seq_len=32,
    ).eval()
    latent = torch.randn(1, 4, 3, 8, 8)
    timestep = torch.tensor([500])
    text = torch.randn(1, 7, 32)
    return model, (latent, timestep, text)


def test_tiny_wan_has_four_sites_all_rewritten_and_output_equal():
    model, args = tiny_wan()
    cm = fv_compile.compile(model, attention_backend="TORCH_SDPA", compiler="aot_eager")
    with torch.no_grad():
        ref = model(*args, return_dict=False)[0]
        out = cm(*args, return_dict=False)[0]
    assert (out - ref).abs().max().item() < 1e-5
    sites = cm.explain().sites
    assert len(sites) == 4
    assert [s.status for s in sites] == ["rewritten"] * 4
    assert [(s.module_path, s.role) for s in sites] == [
        ("blocks.0.attn1", "self"),
        ("blocks.0.attn2", "cross"),
        ("blocks.1.attn1", "self"),
        ("blocks.1.attn2", "cross"),
    ]
    assert {(s.heads, s.head_dim, s.q_len) for s in sites} == {(2, 16, 48)}


def test_explain_lists_the_wan_sites():
    model, args = tiny_wan()
    report = fv_compile.explain(model, *args, return_dict=False, attention_backend="TORCH_SDPA")
    text = str(report)
    assert "4 attention site(s)" in text and "4 rewritten" in text
    assert "blocks.1.attn2" in text


@inductor_cpu_masked_gather
def test_an_sta_variant_under_inductor_computes_what_eager_computes():
    """Metadata variants compile at run time, outside Dynamo. They must compile the static graph
    Dynamo traced: fakified afresh, the text length (16) and the head dim (16) became one
    duck-sized symbol and Inductor's CPU code returned NaN. Text length = head dim on purpose."""
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32,
    ).eval()  # fmt: skip
    args = (torch.randn(1, 4, 3, 8, 8), torch.tensor([999.0]), torch.randn(1, 16, 32))
    fva = fv_compile.FastVideoArgs(sta_window=(1, 1, 1), sta_tile_size=(1, 2, 2))
    policy = {"self": "SLIDING_TILE_ATTN", "default": "TORCH_SDPA"}
    eager = fv_compile.compile(model, policy, compiler="eager", fastvideo_args=fva)
    inductor = fv_compile.compile(model, policy, fastvideo_args=fva)
    with torch.no_grad():
        ref = eager(*args, return_dict=False)[0]
        out = inductor(*args, return_dict=False)[0]
    assert inductor.variants_compiled == 1
    assert out.isfinite().all()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
