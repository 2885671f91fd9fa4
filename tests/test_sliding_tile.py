"""SLIDING_TILE_ATTN: geometry, windows and the whole backend through the pass, against masks built
straight from the definition."""

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import fv_compile
from fv_compile import FastVideoArgs, ForwardBatch
from fv_compile.backends.block_lists import block_mask, block_sparse_reference
from fv_compile.backends.kernels.fa4_block_sparse import fa4_block_sparse
from fv_compile.backends.sliding_tile import (
    SlidingTileAttentionImpl,
    SlidingTileMetadataBuilder,
    layer_index,
)
from fv_compile.backends.tiles import tile_geometry, tiles_per_axis, window_lists

GRID, TILE = (5, 7, 9), (2, 4, 4)


def definition_mask(grid, tile, window) -> torch.Tensor:
    """Token i attends token j iff j's tile lies in the window of i's tile (raster order)."""
    n_tiles = tiles_per_axis(grid, tile)
    coords = list(itertools.product(*(range(g) for g in grid)))
    tiles = torch.tensor([[c[a] // tile[a] for a in range(3)] for c in coords])
    start = torch.stack(
        [
            (tiles[:, a] - window[a] // 2).clamp(0, max(n_tiles[a] - window[a], 0))
            if window[a] < n_tiles[a]
            else torch.zeros_like(tiles[:, a])
            for a in range(3)
        ],
        -1,
    )
    span = torch.tensor([min(w, n) for w, n in zip(window, n_tiles)])
    inside = (tiles[None, :, :] >= start[:, None, :]) & (
        tiles[None, :, :] < (start + span)[:, None, :]
    )
    return inside.all(-1)


def raster_mask_from_lists(grid, tile, windows_layer):
    """The token mask our geometry + block lists describe, mapped back to raster order."""
    _tile_index, untile_index, valid = tile_geometry(grid, tile)
    idx, cnt = window_lists(tiles_per_axis(grid, tile), [windows_layer])
    mask = block_mask(idx[0], cnt[0], valid, math.prod(tile))
    return mask[:, untile_index][:, :, untile_index]


@pytest.mark.parametrize("window", [(1, 1, 1), (2, 1, 2), (3, 2, 3), (1, 9, 9)])
def test_block_lists_match_the_definition_on_an_odd_grid(window):
    got = raster_mask_from_lists(GRID, TILE, [window])[0]
    assert torch.equal(got, definition_mask(GRID, TILE, window))


def test_every_query_tile_sees_the_same_number_of_tiles():
    _idx, cnt = window_lists(tiles_per_axis(GRID, TILE), [[(2, 1, 2)]])
    assert (cnt == 2 * 1 * 2).all()


def test_tile_untile_round_trip_with_partial_tiles():
    tile_index, untile_index, valid = tile_geometry(GRID, TILE)
    n = math.prod(GRID)
    x = torch.randn(2, n, 3)
    tiled = torch.cat([x, torch.zeros(2, 1, 3)], 1)[:, tile_index]
    assert torch.equal(tiled[:, untile_index], x)
    assert valid.sum() == n and tiled.shape[1] == math.prod(tiles_per_axis(GRID, TILE)) * 32
    # padding slots sit at the end of each tile and hold zeros
    per_tile = tiled.view(2, -1, 32, 3)
    for t, v in enumerate(valid.tolist()):
        assert (per_tile[:, t, v:] == 0).all()


def test_full_window_block_lists_equal_dense_attention():
    q, k, v = (torch.randn(1, 4 * 32, 2, 16) for _ in range(3))
    n_tiles = (1, 2, 2)
    idx, cnt = window_lists(n_tiles, [[(1, 2, 2)]])
    valid = torch.full((4,), 32, dtype=torch.int32)
    out = block_sparse_reference(q, k, v, idx[0], cnt[0], valid, 32, 0.25)
    ref = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), scale=0.25)
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_layer_index_comes_from_the_module_path():
    assert layer_index("blocks.7.attn1.impl") == 7
    assert layer_index("transformer_blocks.12.attn.impl") == 12
    assert layer_index("attn.impl") == 0


class Block(torch.nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.heads = heads

    def forward(self, h, mask):
        b, s, c = h.shape
        q, k, v = self.qkv(h).view(b, s, 3, self.heads, c // self.heads).unbind(2)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
        )
        return o.transpose(1, 2).reshape(b, s, c)


class VideoDiT(torch.nn.Module):
    """Blocks of self-attention over video tokens (optionally joint with text), SDPA;
    `masks[layer]` turns each block into the masked reference. Text joins the video between
    the blocks, so only a whole-model compile (`regional=False`) sees which tokens are text."""

    def __init__(self, layers=2, dim=32, heads=2, text_first=False):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.text_first = text_first

    def forward(self, x, text=None, masks=None):
        n = x.shape[1]
        for i, blk in enumerate(self.blocks):
            h = x if text is None else torch.cat([text, x] if self.text_first else [x, text], 1)
            o = blk(h, None if masks is None else masks[i])
            x = x + (o[:, -n:] if (text is not None and self.text_first) else o[:, :n])
        return x


def sta_args(**kw):
    return FastVideoArgs(patch_size=(1, 1, 1), sta_tile_size=TILE, **kw)


def batch():
    return ForwardBatch(raw_latent_shape=(1, 4, *GRID))


def test_uniform_window_matches_masked_reference():
    model = VideoDiT().eval()
    x = torch.randn(1, math.prod(GRID), 32)
    cm = fv_compile.compile(model, "SLIDING_TILE_ATTN", compiler="eager")
    mask = definition_mask(GRID, TILE, (2, 1, 2))
    with torch.no_grad(), fv_compile.forward_context(0, batch(), sta_args(sta_window=(2, 1, 2))):
        out = cm(x)
    torch.testing.assert_close(out, model(x, masks=[mask, mask]), atol=1e-5, rtol=1e-5)
    assert {s.backend for s in cm.explain().sites} == {"SLIDING_TILE_ATTN"}


@pytest.mark.parametrize("regional", [False, True])
def test_per_layer_per_head_per_step_windows(regional):
    model = VideoDiT().eval()
    x = torch.randn(1, math.prod(GRID), 32)
    windows = {
        0: [[(1, 1, 1), (3, 2, 3)], [(2, 2, 2), (1, 1, 3)]],
        1: [[(3, 1, 1), (1, 2, 1)], [(1, 1, 1), (2, 1, 3)]],
    }
    param = [windows[0], windows[1]]
    cm = fv_compile.compile(model, "SLIDING_TILE_ATTN", compiler="eager", regional=regional)
    for step in (0, 1):
        fb = ForwardBatch(raw_latent_shape=(1, 4, *GRID), STA_param=param)
        masks = [
            torch.stack([definition_mask(GRID, TILE, w) for w in windows[step][layer]])[None]
            for layer in range(2)
        ]
        with torch.no_grad(), fv_compile.forward_context(step, fb, sta_args()):
            out = cm(x)
        torch.testing.assert_close(out, model(x, masks=masks), atol=1e-5, rtol=1e-5)


def test_mask_strategy_file_in_fastvideo_format(tmp_path):
    strategy = {f"0_{layer}_{head}": [1, 2, 1] for layer in range(2) for head in range(2)}
    path = tmp_path / "mask_strategy.json"
    path.write_text(json.dumps(strategy))
    md = SlidingTileMetadataBuilder().build(0, batch(), sta_args(mask_strategy_file_path=str(path)))
    assert not md.dense and tuple(md.kv_indices.shape[:2]) == (2, 2)
    assert (md.kv_counts == 2).all()


@pytest.mark.parametrize("text_first", [False, True])
def test_joint_text_attends_everything_and_is_attended(text_first):
    model = VideoDiT(text_first=text_first).eval()
    n, t = math.prod(GRID), 5
    x, text = torch.randn(1, n, 32), torch.randn(1, t, 32)
    cm = fv_compile.compile(model, "SLIDING_TILE_ATTN", compiler="eager", regional=False)
    video = definition_mask(GRID, TILE, (1, 1, 2))
    full = torch.ones(n + t, n + t, dtype=torch.bool)
    sl = slice(t, None) if text_first else slice(0, n)
    full[sl, sl] = video
    with torch.no_grad(), fv_compile.forward_context(0, batch(), sta_args(sta_window=(1, 1, 2))):
        out = cm(x, text)
    sites = cm.explain().sites
    assert {s.role for s in sites} == {"joint"} and {s.backend for s in sites} == {
        "SLIDING_TILE_ATTN"
    }
    torch.testing.assert_close(out, model(x, text, masks=[full, full]), atol=1e-5, rtol=1e-5)


def test_dense_then_sparse_schedule_compiles_the_frame_once():
    model = VideoDiT().eval()
    x = torch.randn(1, math.prod(GRID), 32)
    cm = fv_compile.compile(model, "SLIDING_TILE_ATTN", compiler="eager")
    args = sta_args(sta_window=(2, 1, 2), sta_dense_steps=10)
    mask = definition_mask(GRID, TILE, (2, 1, 2))
    counters.clear()
    with torch.no_grad():
        dense_ref, sparse_ref = model(x), model(x, masks=[mask, mask])
        for step in range(50):
            with fv_compile.forward_context(step, batch(), args):
                out = cm(x)
            torch.testing.assert_close(
                out, dense_ref if step < 10 else sparse_ref, atol=1e-5, rtol=1e-5
            )
    assert counters["stats"]["unique_graphs"] == 1
    assert cm.variants_compiled == 2


def test_cross_attention_goes_to_the_dense_default():
    class Cross(torch.nn.Module):
        def forward(self, x, text):
            q = x.view(1, -1, 2, 16).transpose(1, 2)
            k = text.view(1, -1, 2, 16).transpose(1, 2)
            return F.scaled_dot_product_attention(q, k, k)

    cm = fv_compile.compile(Cross(), "SLIDING_TILE_ATTN", compiler="eager")
    with torch.no_grad():
        cm(torch.randn(1, 10, 32), torch.randn(1, 3, 32))
    (site,) = cm.explain().sites
    assert site.backend == "TORCH_SDPA" and "cross uses TORCH_SDPA" in site.reason


def test_missing_windows_and_latent_shape_are_clear_errors():
    builder = SlidingTileMetadataBuilder()
    with pytest.raises(fv_compile.FvCompileError, match="sta_window"):
        builder.build(0, batch(), sta_args())
    with pytest.raises(fv_compile.FvCompileError, match="SLIDING_TILE_ATTN needs the latent shape"):
        builder.build(0, ForwardBatch(), sta_args(sta_window=(1, 1, 1)))


def test_sparse_kernel_choice_is_checked():
    builder = SlidingTileMetadataBuilder()
    with pytest.raises(
        fv_compile.FvCompileError, match="sta_kernel='fast' is not one of auto, triton"
    ):
        builder.build(0, batch(), sta_args(sta_window=(1, 1, 1), sta_kernel="fast"))
    assert (
        builder.build(0, batch(), sta_args(sta_window=(1, 1, 1), sta_kernel="triton")).kernel
        == "triton"
    )


@pytest.mark.skipif(fa4_block_sparse() is not None, reason="flash-attn-4 is installed here")
def test_asking_for_flash_attn_without_it_says_how_to_install():
    with pytest.raises(fv_compile.FvCompileError, match="pip install flash-attn-4"):
        SlidingTileMetadataBuilder().build(
            0, batch(), sta_args(sta_window=(1, 1, 1), sta_kernel="flash_attn")
        )


@pytest.mark.parametrize("text_first", [False, True])
def test_impl_without_a_site_takes_the_text_length_it_is_told(text_first):
    """FastVideo-style construction (no site): joint text declared at construction attends
    everything and is attended, before or after the video."""
    md = SlidingTileMetadataBuilder().build(0, batch(), sta_args(sta_window=(2, 1, 2)))
    n, text = math.prod(GRID), 5
    impl = SlidingTileAttentionImpl(
        num_heads=2,
        head_size=64,
        softmax_scale=0.125,
        joint_text_len=text,
        joint_text_first=text_first,
    )
    q, k, v = (torch.randn(1, n + text, 2, 64) for _ in range(3))
    out = impl.postprocess_output(
        impl.forward(*(impl.preprocess_qkv(x, md) for x in (q, k, v)), md), md
    )
    mask = torch.ones(n + text, n + text, dtype=torch.bool)
    video = slice(text, None) if text_first else slice(0, n)
    mask[video, video] = definition_mask(GRID, TILE, (2, 1, 2))
    ref = F.scaled_dot_product_attention(
        *(x.transpose(1, 2) for x in (q, k, v)), attn_mask=mask, scale=0.125
    )
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=2e-4, rtol=2e-4)


def test_impl_without_a_site_never_guesses_text_from_surplus_tokens():
    md = SlidingTileMetadataBuilder().build(0, batch(), sta_args(sta_window=(2, 1, 2)))
    impl = SlidingTileAttentionImpl(
        num_heads=2, head_size=64, softmax_scale=0.125, prefix="blocks.0.attn"
    )
    with pytest.raises(
        fv_compile.FvCompileError, match=r"320 tokens.*holds 315.*raw_latent_shape.*joint_text_len="
    ):
        impl.preprocess_qkv(torch.randn(1, math.prod(GRID) + 5, 2, 64), md)
    told = SlidingTileAttentionImpl(
        num_heads=2, head_size=64, softmax_scale=0.125, joint_text_len=5
    )
    with pytest.raises(
        fv_compile.FvCompileError, match="5 text tokens \\+ 315 video = 320 expected"
    ):
        told.preprocess_qkv(torch.randn(1, math.prod(GRID) + 7, 2, 64), md)
    with pytest.raises(fv_compile.FvCompileError, match="joint_text_len must be"):
        SlidingTileAttentionImpl(num_heads=2, head_size=64, softmax_scale=0.125, joint_text_len=-1)


def _stale_batch():
    """A latent one frame short of the call's: the grid (4, 7, 9) holds 63 tokens fewer."""
    return ForwardBatch(raw_latent_shape=(1, 4, GRID[0] - 1, *GRID[1:]))


def test_stale_smaller_latent_shape_on_a_self_attention_site_is_an_error():
    """The surplus video tokens of a self-attention site must not be taken for text."""
    model = VideoDiT().eval()
    x = torch.randn(1, math.prod(GRID), 32)
    cm = fv_compile.compile(model, "SLIDING_TILE_ATTN", compiler="eager")
    with (
        torch.no_grad(),
        fv_compile.forward_context(0, _stale_batch(), sta_args(sta_window=(2, 1, 2))),
        pytest.raises(
            fv_compile.FvCompileError,
            match=r"self-attention site has 315 tokens, all of them video.*holds 252"
            r".*raw_latent_shape=latent\.shape",
        ),
    ):
        cm(x)
    assert all(s.role == "self" and s.joint_text_len is None for s in cm.explain().sites)


@pytest.mark.parametrize("text_first", [False, True])
def test_stale_latent_shape_on_a_joint_site_is_an_error(text_first):
    model = VideoDiT(text_first=text_first).eval()
    x, text = torch.randn(1, math.prod(GRID), 32), torch.randn(1, 5, 32)
    cm = fv_compile.compile(model, "SLIDING_TILE_ATTN", compiler="eager", regional=False)
    with (
        torch.no_grad(),
        fv_compile.forward_context(0, _stale_batch(), sta_args(sta_window=(2, 1, 2))),
        pytest.raises(
            fv_compile.FvCompileError, match=r"joint site has 320 tokens, 5 of them text.*holds 252"
        ),
    ):
        cm(x, text)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or fa4_block_sparse() is None,
    reason="needs CUDA and flash-attn-4",
)
def test_flash_attn_and_triton_sparse_kernels_agree_through_the_pass():
    grid, tile, window = (
        (5, 12, 20),
        (2, 8, 8),
        (2, 1, 2),
    )  # partial tiles on two axes, 7 text tokens
    model = VideoDiT(dim=128, heads=2).cuda().to(torch.bfloat16).eval()
    x = torch.randn(1, math.prod(grid), 128, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(1, 7, 128, device="cuda", dtype=torch.bfloat16)
    fb = ForwardBatch(raw_latent_shape=(1, 4, *grid))
    n = math.prod(grid)
    mask = torch.ones(n + 7, n + 7, dtype=torch.bool)
    mask[:n, :n] = definition_mask(grid, tile, window)
    key_padding = torch.ones(1, 1, 1, n + 7, dtype=torch.bool, device="cuda")
    key_padding[..., n + 4 :] = False  # 4 of the 7 text tokens are real
    with torch.no_grad():
        ref = model(x, text, masks=[mask.cuda()] * 2)
        ref_padded = model(x, text, masks=[mask.cuda() & key_padding] * 2)
        for kernel in ("triton", "flash_attn"):
            cm = fv_compile.compile(model, "SLIDING_TILE_ATTN", compiler="eager", regional=False)
            args = FastVideoArgs(
                patch_size=(1, 1, 1), sta_tile_size=tile, sta_window=window, sta_kernel=kernel
            )
            with fv_compile.forward_context(0, fb, args):
                out = cm(x, text)
                out_padded = cm(x, text, masks=[key_padding] * 2)
            for got, want in ((out, ref), (out_padded, ref_padded)):
                assert ((got - want).float().norm() / want.float().norm()).item() < 2e-2, kernel


@pytest.mark.parametrize("dim", [32, 128])  # head dim 16: reference path; 64: the Triton kernel
def test_joint_text_padding_mask_hides_padded_text_keys(dim):
    """HunyuanVideo-style joint attention with a key padding mask over the text: per batch
    element, padded text tokens are attended by nobody; everything else is STA as usual."""
    model = VideoDiT(dim=dim).eval()
    n, t = math.prod(GRID), 7
    x, text = torch.randn(2, n, dim), torch.randn(2, t, dim)
    keep = torch.ones(2, n + t, dtype=torch.bool)
    keep[1, n + 3 :] = False  # batch element 1 has 3 text tokens, element 0 all 7
    key_padding = keep[:, None, None, :]
    sta = torch.ones(n + t, n + t, dtype=torch.bool)
    sta[:n, :n] = definition_mask(GRID, TILE, (2, 1, 2))
    cm = fv_compile.compile(
        model, "SLIDING_TILE_ATTN", compiler="eager", regional=False, strict=True
    )
    with torch.no_grad(), fv_compile.forward_context(0, batch(), sta_args(sta_window=(2, 1, 2))):
        out = cm(x, text, masks=[key_padding, key_padding])
    ref = model(x, text, masks=[sta & key_padding] * 2)
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    assert all(s.backend == "SLIDING_TILE_ATTN" and s.mask_keys_only for s in cm.explain().sites)


def test_masks_that_vary_over_queries_stay_dense():
    model = VideoDiT().eval()
    n = math.prod(GRID)
    x = torch.randn(1, n, 32)
    mask = torch.rand(n, n) > 0.5
    cm = fv_compile.compile(model, "SLIDING_TILE_ATTN", compiler="eager")
    with (
        torch.no_grad(),
        fv_compile.forward_context(0, batch(), sta_args(sta_window=(2, 1, 2))),
        pytest.warns(UserWarning, match="mask over queries or heads"),
    ):
        out = cm(x, masks=[mask, mask])
    torch.testing.assert_close(out, model(x, masks=[mask, mask]), atol=1e-5, rtol=1e-5)
    site = cm.explain().sites[0]
    assert site.backend == "TORCH_SDPA" and "STA takes key padding masks" in site.reason


def test_a_site_shorter_than_the_video_grid_is_a_clear_error():
    md = SlidingTileMetadataBuilder().build(0, batch(), sta_args(sta_window=(2, 1, 2)))
    impl = SlidingTileAttentionImpl(
        num_heads=2, head_size=64, softmax_scale=0.125, prefix="refiner.attn"
    )
    with pytest.raises(ValueError, match=r"refiner\.attn: 16 tokens.*not video attention"):
        impl.preprocess_qkv(torch.randn(1, 16, 2, 64), md)


def test_forcing_flash_attn_where_it_cannot_run_says_why():
    md = SlidingTileMetadataBuilder().build(0, batch(), sta_args(sta_window=(2, 1, 2)))
    md.kernel = "flash_attn"  # as if flash-attn-4 were installed: the call itself cannot use it
    impl = SlidingTileAttentionImpl(num_heads=2, head_size=64, softmax_scale=0.125)
    q = impl.preprocess_qkv(torch.randn(1, math.prod(GRID), 2, 64), md)
    with pytest.raises(ValueError, match=r"tile \(2, 4, 4\) = 32 tokens.*sta_kernel='auto'"):
        impl.forward(q, q, q, md)


@pytest.fixture
def built(monkeypatch):
    """The layers whose block lists the impls build, in order (a spy on `_build_lists`)."""
    layers = []
    original = SlidingTileAttentionImpl._build_lists

    def counting(self, md, volume, text, fa4, layer):
        layers.append(layer)
        return original(self, md, volume, text, fa4, layer)

    monkeypatch.setattr(SlidingTileAttentionImpl, "_build_lists", counting)
    return layers


@pytest.mark.parametrize("per_layer", [False, True])
def test_block_lists_are_built_once_per_step_and_layer(built, per_layer):
    model = VideoDiT(layers=3).eval()
    x = torch.randn(1, math.prod(GRID), 32)
    cm = fv_compile.compile(model, "SLIDING_TILE_ATTN", compiler="eager")
    windows = [[(2, 1, 2)] * 2, [(1, 1, 1)] * 2, [(3, 1, 1)] * 2] if per_layer else [[(2, 1, 2)]]
    for step in range(2):
        fb = ForwardBatch(raw_latent_shape=(1, 4, *GRID), STA_param=[windows])
        with torch.no_grad(), fv_compile.forward_context(step, fb, sta_args()):
            cm(x)
    assert built == ([0, 1, 2] * 2 if per_layer else [0, 0])


class DoubleSingle(torch.nn.Module):
    """HunyuanVideo's shape: a list of `double_blocks`, then a list of `single_blocks` of another
    class; layer numbers run through both (single_blocks.0 is layer 2 here)."""

    class Single(Block):
        pass

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.double_blocks = torch.nn.ModuleList(Block(dim, heads) for _ in range(2))
        self.single_blocks = torch.nn.ModuleList(self.Single(dim, heads) for _ in range(2))

    def forward(self, x, masks=None):
        for i, blk in enumerate([*self.double_blocks, *self.single_blocks]):
            x = x + blk(x, None if masks is None else masks[i])
        return x


@pytest.mark.parametrize("regional", [False, True])
def test_layer_numbers_tell_double_blocks_from_single_blocks(regional):
    model = DoubleSingle().eval()
    x = torch.randn(1, math.prod(GRID), 32)
    layers = [(1, 1, 1), (3, 2, 3), (2, 1, 2), (1, 2, 1)]  # one window per layer, all four differ
    fb = ForwardBatch(raw_latent_shape=(1, 4, *GRID), STA_param=[[[w] for w in layers]])
    cm = fv_compile.compile(model, "SLIDING_TILE_ATTN", compiler="eager", regional=regional)
    with torch.no_grad(), fv_compile.forward_context(0, fb, sta_args()):
        out = cm(x)
    masks = [definition_mask(GRID, TILE, w) for w in layers]
    torch.testing.assert_close(out, model(x, masks=masks), atol=1e-5, rtol=1e-5)


def test_the_step_cache_belongs_to_the_forward_context(built):
    """Lists built in one step's context are that context's: a new context builds afresh even
    for the same metadata, and nothing outlives the context at module level."""
    md = SlidingTileMetadataBuilder().build(0, batch(), sta_args(sta_window=(2, 1, 2)))
    impl = SlidingTileAttentionImpl(num_heads=2, head_size=64, softmax_scale=0.125)
    q = impl.preprocess_qkv(torch.randn(1, math.prod(GRID), 2, 64), md)
    with fv_compile.forward_context(0) as ctx:
        impl.forward(q, q, q, md)
        impl.forward(q, q, q, md)
    assert built == [0] and ctx.cache
    with fv_compile.forward_context(0):
        impl.forward(q, q, q, md)
    assert built == [0, 0]
    impl.forward(q, q, q, md)  # outside any context: built, never kept
    impl.forward(q, q, q, md)
    assert built == [0, 0, 0, 0]
    import fv_compile.backends.sliding_tile as sta

    assert not [k for k, v in vars(sta).items() if k.isupper() and isinstance(v, dict) and v]


def test_a_changed_strategy_file_is_read_again(tmp_path):
    path = tmp_path / "mask_strategy.json"
    args = sta_args(mask_strategy_file_path=str(path))
    lists = []
    for window, pad in (((1, 1, 1), ""), ((2, 1, 2), " ")):  # (a size change, whatever the clock)
        path.write_text(json.dumps({f"0_0_{h}": window for h in range(2)}) + pad)
        md = SlidingTileMetadataBuilder().build(0, batch(), args)
        lists.append(int(md.kv_counts.max()))
    assert lists[0] < lists[1]


def test_gqa_sites_are_tiled_like_multi_head_ones():
    """k and v with fewer heads than q (GQA) must be reordered into tiles too: the op used to
    skip the per-tensor reorder whenever the shapes of q, k and v differed, and STA then ran its
    block lists over raster-order tokens."""

    class Gqa(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(
                q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
            )

    n = math.prod(GRID)
    q, k, v = torch.randn(1, 2, n, 16), torch.randn(1, 1, n, 16), torch.randn(1, 1, n, 16)
    cm = fv_compile.compile(Gqa(), "SLIDING_TILE_ATTN", compiler="eager", strict=True)
    mask = definition_mask(GRID, TILE, (2, 1, 2))
    with torch.no_grad(), fv_compile.forward_context(0, batch(), sta_args(sta_window=(2, 1, 2))):
        out = cm(q, k, v)
    ref = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask
    )
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    (site,) = cm.explain().sites
    assert (site.heads, site.kv_heads, site.backend) == (2, 1, "SLIDING_TILE_ATTN")


# -- verify: a sparse site is held to its definition, not to dense attention ------------------


@pytest.mark.parametrize(
    "dim, text_first, text_attends_all",
    [(32, False, True), (32, True, True), (32, False, False), (32, True, False)]
    + [(128, False, True)],  # head dim 64: the Triton kernel (interpreted on a CPU: slow, once)
)
def test_verify_holds_sta_sites_to_their_definition_and_shows_the_distance_to_dense(
    text_first, text_attends_all, dim
):
    """Per-layer, per-head windows, joint text and a key padding mask: each site's output
    equals STA's definition (float32: to rounding) while it stays far from dense attention."""
    model = VideoDiT(dim=dim, text_first=text_first).eval()
    n, t = math.prod(GRID), 5
    x, text = torch.randn(2, n, dim), torch.randn(2, t, dim)
    keep = torch.ones(2, n + t, dtype=torch.bool)
    keep[1, (3 if text_first else n + 3) : (t if text_first else None)] = False
    param = [[[(1, 1, 1), (3, 2, 3)], [(2, 2, 2), (1, 1, 3)]]]
    fb = ForwardBatch(raw_latent_shape=(1, 4, *GRID), STA_param=param)
    with fv_compile.forward_context(0, fb, sta_args(sta_text_attends_all=text_attends_all)):
        report = fv_compile.verify(
            model,
            x,
            text,
            masks=[keep[:, None, None, :]] * 2,
            attention_backend="SLIDING_TILE_ATTN",
        )
    assert report.verified and len(report.rewritten) == 2
    for site in report.rewritten:
        assert site.check.against == "definition" and site.check.output.rel_l2 < 1e-4
        assert site.check.traced.rel_l2 > 1e-2  # the sparsity, shown but not held against it
    assert "vs its definition (dense" in str(report)


def test_verify_fails_an_sta_kernel_that_drops_a_listed_tile(monkeypatch):
    from fv_compile.backends import sliding_tile

    real = sliding_tile.block_sparse_attention

    def drops_the_last_tile(q, k, v, index, counts, valid, *rest):
        return real(q, k, v, index, (counts - 1).clamp(min=1), valid, *rest)

    monkeypatch.setattr(sliding_tile, "block_sparse_attention", drops_the_last_tile)
    model = VideoDiT().eval()
    x = torch.randn(1, math.prod(GRID), 32)
    with fv_compile.forward_context(0, batch(), sta_args(sta_window=(2, 1, 2))):
        report = fv_compile.verify(model, x, attention_backend="SLIDING_TILE_ATTN")
    assert not report.verified
    assert all(not s.check.ok and s.check.against == "definition" for s in report.rewritten)


def test_verify_of_a_dense_sta_step_is_dense_attention():
    model = VideoDiT().eval()
    x = torch.randn(1, math.prod(GRID), 32)
    args = sta_args(sta_window=(2, 1, 2), sta_dense_steps=1)
    with fv_compile.forward_context(0, batch(), args):
        report = fv_compile.verify(model, x, attention_backend="SLIDING_TILE_ATTN")
    assert report.verified
    assert all(s.check.traced.rel_l2 < 1e-5 for s in report.rewritten)


def test_the_sta_definition_takes_tokens_in_tile_order_when_the_graph_runs_in_it():
    grid, tile, window = (4, 8, 8), (2, 4, 4), (1, 2, 1)
    n = math.prod(grid)
    args = FastVideoArgs(patch_size=(1, 1, 1), sta_tile_size=tile, sta_window=window)
    md = SlidingTileMetadataBuilder().build(0, ForwardBatch(raw_latent_shape=(1, 4, *grid)), args)
    impl = SlidingTileAttentionImpl(2, 16, 0.25)
    q, k, v = (torch.randn(1, n, 2, 16) for _ in range(3))
    raster = impl.reference(q, k, v, md)
    mask = definition_mask(grid, tile, window)
    want = F.scaled_dot_product_attention(
        *(x.transpose(1, 2) for x in (q, k, v)), attn_mask=mask, scale=0.25
    ).transpose(1, 2)
    torch.testing.assert_close(raster, want, atol=1e-5, rtol=1e-5)
    gather = md.token_gather
    object.__setattr__(md, "tokens_permuted", True)
    tiled = impl.reference(q[:, gather], k[:, gather], v[:, gather], md)
    torch.testing.assert_close(tiled, raster[:, gather], atol=1e-6, rtol=1e-6)


def test_a_joint_sequence_whose_pieces_are_equally_long_falls_back_with_why():
    """cat([text, video]) with as many text tokens as video ones: the lengths do not tell the
    video, so no sparse backend takes the site (it would tile the wrong piece)."""
    grid = (2, 4, 4)
    n = math.prod(grid)
    model = VideoDiT(text_first=True).eval()
    x, text = torch.randn(1, n, 32), torch.randn(1, n, 32)
    cm = fv_compile.compile(model, "SLIDING_TILE_ATTN", compiler="eager", regional=False)
    args = FastVideoArgs(patch_size=(1, 1, 1), sta_tile_size=(1, 2, 2), sta_window=(1, 1, 1))
    batch = ForwardBatch(raw_latent_shape=(1, 4, *grid))
    with torch.no_grad(), fv_compile.forward_context(0, batch, args), pytest.warns(UserWarning):
        out = cm(x, text)
    sites = cm.explain().sites
    assert [(s.role, s.joint_text_len, s.backend) for s in sites] == [
        ("joint", None, "TORCH_SDPA")
    ] * 2
    assert all("video tokens are not known" in s.reason for s in sites)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x, text))


def test_a_joint_site_whose_text_outgrows_the_video_says_so():
    """Fewer video tokens than text: the longest piece, taken for the video, is the text."""
    grid = (2, 2, 2)
    n = math.prod(grid)
    model = VideoDiT(text_first=True).eval()
    cm = fv_compile.compile(model, "SLIDING_TILE_ATTN", compiler="eager", regional=False)
    args = FastVideoArgs(patch_size=(1, 1, 1), sta_tile_size=(1, 2, 2), sta_window=(1, 1, 1))
    batch = ForwardBatch(raw_latent_shape=(1, 4, *grid))
    video, text = torch.randn(1, n, 32), torch.randn(1, 2 * n, 32)
    with (
        torch.no_grad(),
        fv_compile.forward_context(0, batch, args),
        pytest.raises(fv_compile.FvCompileError, match="took its longest piece"),
    ):
        cm(video, text)
