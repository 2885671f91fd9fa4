"""CUDA graphs without ceremony: `mode="reduce-overhead"` on a regionally compiled model, called
as a denoising loop calls it (no `torch.compiler.cudagraph_mark_step_begin()`), outputs kept
across calls, and per-layer STA windows that stay per layer when every block replays its own
recorded graph. The GPU tests skip without CUDA; the CPU one checks the metadata variants that
CUDA graphs' static input buffers rely on."""

import math

import pytest
import torch
from torch._dynamo.utils import counters

import fv_compile
from fv_compile import FastVideoArgs, ForwardBatch
from tests.test_sliding_tile import GRID, TILE, VideoDiT, definition_mask

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def per_layer_masks(windows_step, device):
    return [
        torch.stack([definition_mask(GRID, TILE, w) for w in layer])[None].to(device)
        for layer in windows_step
    ]


@pytest.mark.gpu
@needs_cuda
def test_reduce_overhead_regional_needs_no_mark_step_and_kept_outputs_stay_valid():
    torch.manual_seed(0)
    model = VideoDiT(layers=3, dim=128, heads=2).cuda().to(torch.bfloat16).eval()
    cm = fv_compile.compile(model, "TORCH_SDPA", mode="reduce-overhead")
    assert cm.cuda_graphs and cm.regions == ["blocks"]
    xs = [
        torch.randn(1, math.prod(GRID), 128, device="cuda", dtype=torch.bfloat16) for _ in range(5)
    ]
    counters.clear()
    with torch.no_grad():
        outs = [cm(x) for x in xs]  # warm-up, recording, replays: each call one step
        refs = [model(x) for x in xs]
    # the last block's output is the model's output: without the copy, each replay overwrote it
    for out, ref in zip(outs, refs):
        assert rel(out, ref) < 2e-2
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert len(cm.explain().sites) == 3


@pytest.mark.gpu
@needs_cuda
def test_per_layer_sta_windows_differ_per_layer_under_cuda_graphs():
    """Every block shares one compiled graph; CUDA graphs record one replay per block position,
    each with the lists of its own layer (read from `current_block()` while recording), and the
    step's lists arrive as inputs: both steps, every replay, match per-layer masked attention."""
    torch.manual_seed(0)
    model = VideoDiT(layers=3, dim=128, heads=2).cuda().to(torch.bfloat16).eval()
    x = torch.randn(1, math.prod(GRID), 128, device="cuda", dtype=torch.bfloat16)
    windows = {  # [layer][head], the widest window (3, 2, 3) in both steps: one variant
        0: [[(1, 1, 1), (3, 2, 3)], [(2, 2, 2), (1, 1, 3)], [(3, 1, 1), (1, 2, 1)]],
        1: [[(3, 2, 3), (2, 1, 3)], [(1, 1, 1), (1, 1, 1)], [(2, 2, 2), (3, 1, 1)]],
    }
    param = [windows[0], windows[1]]
    args = FastVideoArgs(patch_size=(1, 1, 1), sta_tile_size=TILE, sta_kernel="triton")
    cm = fv_compile.compile(model, "SLIDING_TILE_ATTN", mode="reduce-overhead", strict=True)
    kept = []
    counters.clear()
    with torch.no_grad():
        for step in (0, 1, 0, 1, 0, 1):
            fb = ForwardBatch(raw_latent_shape=(1, 4, *GRID), STA_param=param)
            with fv_compile.forward_context(step, fb, args):
                kept.append((step, cm(x)))
        refs = {s: model(x, masks=per_layer_masks(windows[s], "cuda")) for s in (0, 1)}
        uniform = model(x, masks=per_layer_masks([windows[0][0]] * 3, "cuda"))
    # on the attention's part of the output (the residual stream x would hide it)
    for step, out in kept:
        assert rel(out.float() - x.float(), refs[step].float() - x.float()) < 3e-2, step
    assert (
        rel(uniform.float() - x.float(), refs[0].float() - x.float()) > 0.1
    )  # the layers' windows do change the answer
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert cm.variants_compiled == 1


def test_windows_that_change_size_between_steps_get_a_variant_per_width():
    """STA's key lists are as wide as the step's widest window: a graph (static shapes, CUDA
    graphs' static input buffers) is compiled per width, never fed lists of another."""
    model = VideoDiT().eval()
    x = torch.randn(1, math.prod(GRID), 32)
    windows = {0: [[(1, 1, 1)] * 2] * 2, 1: [[(3, 2, 3)] * 2] * 2}
    args = FastVideoArgs(patch_size=(1, 1, 1), sta_tile_size=TILE)
    cm = fv_compile.compile(model, "SLIDING_TILE_ATTN", compiler="eager")
    with torch.no_grad():
        for step in (0, 1, 0):
            fb = ForwardBatch(raw_latent_shape=(1, 4, *GRID), STA_param=[windows[0], windows[1]])
            with fv_compile.forward_context(step, fb, args):
                out = cm(x)
            torch.testing.assert_close(
                out, model(x, masks=per_layer_masks(windows[step], "cpu")), atol=1e-5, rtol=1e-5
            )
    assert cm.variants_compiled == 2


@pytest.mark.parametrize("mode", ["reduce-overhead", None])
def test_sites_keep_no_step_cache_under_cuda_graphs(mode, monkeypatch):
    """A tensor a backend keeps in the step cache while CUDA graphs warm up or record would be a
    live allocation in their pool that no output tracks (CUDA graph trees stop there): under
    CUDA graphs the sites see no step cache; without them they share the step's."""
    from fv_compile.backends import sliding_tile

    seen = []
    real = sliding_tile.step_cache
    monkeypatch.setattr(sliding_tile, "step_cache", lambda: seen.append(real()) or seen[-1])
    model = VideoDiT(layers=2).eval()
    x = torch.randn(1, math.prod(GRID), 32)
    args = FastVideoArgs(patch_size=(1, 1, 1), sta_tile_size=TILE, sta_window=(2, 1, 2))
    cm = fv_compile.compile(model, "SLIDING_TILE_ATTN", mode=mode, regional=False)
    with (
        torch.no_grad(),
        fv_compile.forward_context(0, ForwardBatch(raw_latent_shape=(1, 4, *GRID)), args),
    ):
        out = cm(x)
    torch.testing.assert_close(
        out, model(x, masks=[definition_mask(GRID, TILE, (2, 1, 2))] * 2), atol=1e-5, rtol=1e-5
    )
    assert seen and all((cache is None) == (mode is not None) for cache in seen)
