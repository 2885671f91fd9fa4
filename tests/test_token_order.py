"""Tile order once per model: the stretch between sliding tile attention's sites runs in tile
order when the graph is proven token-wise there (fv_compile/passes/token_order.py), and computes
what the per-site reorders compute; where the proof fails nothing changes and explain says why."""

import contextlib
import math
from dataclasses import dataclass

import expecttest
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import normalize_gm

import fv_compile
from fv_compile import FastVideoArgs, ForwardBatch
from fv_compile.backends._dense import sdpa_bshd
from fv_compile.backends.abstract import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadata,
    AttentionMetadataBuilder,
)
from fv_compile.lowering import lower_graph
from fv_compile.models import build_model, example_inputs
from fv_compile.policy import SitePolicy
from tests._graphs import _SITE_ARG
from tests._torch_bugs import inductor_cpu_masked_gather

GRID, TILE = (2, 4, 4), (1, 2, 2)  # 32 tokens in 8 tiles of 4: the tile divides the grid
N = math.prod(GRID)
STA = {"self": "SLIDING_TILE_ATTN", "default": "TORCH_SDPA"}


def sta_args(order="auto", **kw):
    kw.setdefault("sta_window", (1, 1, 1))
    return FastVideoArgs(patch_size=(1, 1, 1), sta_tile_size=TILE, sta_token_order=order, **kw)


def batch(grid=GRID):
    return ForwardBatch(raw_latent_shape=(1, 4, *grid))


class Block(torch.nn.Module):
    """Pre-norm self-attention with a per-token table on q and k (RoPE's place), then an MLP;
    `between(x)` runs between the attention and the MLP (what the proof must judge)."""

    def __init__(self, dim=32, heads=2, between=None):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)
        self.mlp = torch.nn.Linear(dim, dim)
        self.heads = heads
        self.between = between

    def forward(self, x, table):
        b, s, c = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, s, 3, self.heads, c // self.heads).unbind(2)
        q, k = q * table, k * table
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.out(o.transpose(1, 2).reshape(b, s, c))
        if self.between is not None:
            x = self.between(x)
        return x + F.gelu(self.mlp(x))


class TinyDiT(torch.nn.Module):
    def __init__(self, layers=2, dim=32, between=None):
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            Block(dim, between=between if i == 0 else None) for i in range(layers)
        )
        self.head = torch.nn.Linear(dim, 4)

    def forward(self, x, table):
        for blk in self.blocks:
            x = blk(x, table)
        return self.head(x)


def inputs(dim=32, heads=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, N, dim, generator=g), torch.randn(N, 1, dim // heads, generator=g)


def run_both(model, args, *, policy=STA, regional=False, fb=None, fva=sta_args, compiler="eager"):
    """`(per-site output, tile-order output, the tile-order compiled model)`, one call each;
    `fva(order)` gives the FastVideoArgs of either order."""
    out = {}
    for order in ("per_site", "auto"):
        cm = fv_compile.compile(model, policy, compiler=compiler, regional=regional)
        torch.manual_seed(0)  # (a model that draws random numbers draws the same ones)
        with torch.no_grad(), fv_compile.forward_context(0, fb or batch(), fva(order)):
            out[order] = cm(*args)
    return out["per_site"], out["auto"], cm


# --- the models -------------------------------------------------------------------------------


def test_tiny_dit_runs_in_tile_order_between_one_gather_and_one_scatter():
    model = TinyDiT().eval()
    ref, out, cm = run_both(model, inputs())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert cm.variants_token_ordered == 1
    (row,) = cm.explain().token_order
    assert row.hoisted and row.sites == 2 and row.video_len == N
    assert row.gathered == ["l_args_0_", "l_args_1_"] and len(row.scattered) == 1  # x and the table


@pytest.mark.parametrize("regional", [False, True])
def test_wan_zoo_model(regional):
    model = build_model("wan-tiny")
    args, kwargs = example_inputs(model)
    tiles = FastVideoArgs(sta_window=(1, 1, 1), sta_tile_size=(2, 4, 4))
    fb = ForwardBatch(raw_latent_shape=tuple(args[0].shape))
    out = {}
    for order in ("per_site", "auto"):
        tiles.sta_token_order = order
        cm = fv_compile.compile(model, STA, compiler="eager", regional=regional)
        with torch.no_grad(), fv_compile.forward_context(0, fb, tiles):
            out[order] = cm(*args, **kwargs)
    torch.testing.assert_close(out["auto"], out["per_site"], atol=1e-5, rtol=1e-5)
    rows = cm.explain().token_order
    assert rows and all(r.hoisted for r in rows), [r.reason for r in rows]
    assert cm.variants_token_ordered >= 1
    if not regional:  # model-wide: the patch embedding and the RoPE angles in, the head out
        (row,) = rows
        assert (row.sites, row.gathered, row.scattered) == (2, ["flatten", "reshape"], ["x_8"])
    else:
        assert all("regional compile" in r.note for r in rows)


def test_hunyuan_zoo_model_joint_text_and_key_padding():
    """Joint attention: only the video tokens move, the text (and its padding mask) stays."""
    model = build_model("hunyuan-tiny")
    args, kwargs = example_inputs(model)
    assert kwargs["text_mask"].logical_not().any()  # padded text keys are masked
    tiles = FastVideoArgs(sta_window=(1, 1, 1), sta_tile_size=(2, 4, 4))
    fb = ForwardBatch(raw_latent_shape=tuple(args[0].shape))
    policy = {"joint": "SLIDING_TILE_ATTN", "default": "TORCH_SDPA"}
    out = {}
    for order in ("per_site", "auto"):
        tiles.sta_token_order = order
        cm = fv_compile.compile(model, policy, compiler="eager", regional=False)
        with torch.no_grad(), fv_compile.forward_context(0, fb, tiles):
            out[order] = cm(*args, **kwargs)
    torch.testing.assert_close(out["auto"], out["per_site"], atol=1e-5, rtol=1e-5)
    (row,) = cm.explain().token_order
    assert row.hoisted and row.sites == 4, row.reason
    assert row.gathered == ["flatten", "reshape", "video_keys"] and row.scattered == ["out_7"]


def _tiny_diffusers_wan():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32,
    ).eval()  # fmt: skip
    return model, (torch.randn(1, 4, 3, 8, 8), torch.tensor([999.0]), torch.randn(1, 16, 32))


@pytest.mark.parametrize("regional", [False, True])
def test_diffusers_wan_transformer(regional):
    """diffusers writes RoPE's even and odd channels into a fresh `empty_like` buffer: writes the
    proof follows (the buffer is the stretch's own, every read comes after the last write)."""
    model, args = _tiny_diffusers_wan()
    out = {}
    for order in ("per_site", "auto"):
        fva = FastVideoArgs(sta_window=(1, 1, 1), sta_tile_size=(1, 2, 2), sta_token_order=order)
        cm = fv_compile.compile(model, STA, compiler="eager", fastvideo_args=fva, regional=regional)
        with torch.no_grad():
            out[order] = cm(*args, return_dict=False)[0]
    torch.testing.assert_close(out["auto"], out["per_site"], atol=1e-5, rtol=1e-5)
    rows = cm.explain().token_order
    assert rows and all(r.hoisted for r in rows), [r.reason for r in rows]
    assert cm.variants_token_ordered == 1
    if not regional:
        (row,) = rows
        assert row.gathered == ["flatten", "freqs_cos", "freqs_sin"] and len(row.scattered) == 1


@inductor_cpu_masked_gather
def test_diffusers_wan_under_inductor():
    """The rewritten graph through Inductor: the order's placeholders become metadata inputs."""
    model, args = _tiny_diffusers_wan()
    fva = FastVideoArgs(sta_window=(1, 1, 1), sta_tile_size=(1, 2, 2))
    eager = fv_compile.compile(model, STA, compiler="eager", fastvideo_args=fva, regional=True)
    inductor = fv_compile.compile(model, STA, fastvideo_args=fva, regional=True)
    with torch.no_grad():
        ref = eager(*args, return_dict=False)[0]
        out = inductor(*args, return_dict=False)[0]
    assert inductor.variants_token_ordered == 1
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


# --- steps and grids ----------------------------------------------------------------------------


def test_dense_steps_run_as_traced_and_sparse_steps_in_tile_order():
    """A dense step has no tile order: it runs the graph as traced, with no reordering at all
    (dense attention needs none); the sparse steps run the tile-order variant."""
    model = TinyDiT().eval()
    x, table = inputs()
    cm = fv_compile.compile(model, STA, compiler="eager", regional=False)
    ref = fv_compile.compile(model, STA, compiler="eager", regional=False)
    with torch.no_grad():
        for step in range(3):
            with fv_compile.forward_context(step, batch(), sta_args(sta_dense_steps=1)):
                out = cm(x, table)
            with fv_compile.forward_context(step, batch(), sta_args("per_site", sta_dense_steps=1)):
                want = ref(x, table)
            torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert cm.variants_compiled == 2 and cm.variants_token_ordered == 1


def test_regional_blocks_keep_their_strides_and_compile_once():
    """The scatter at a block's exit gives back the strides the block was traced with (Wan's
    tokens come out of the patch embedding transposed): the next block's guards pass, and a
    dense-then-sparse loop compiles one block graph, in two variants."""
    model = build_model("wan-tiny")
    args, kwargs = example_inputs(model)
    latent, _, text = args
    fva = FastVideoArgs(sta_tile_size=(1, 4, 4), sta_window=(1, 1, 1), sta_dense_steps=1)
    cm = fv_compile.compile(model, STA, compiler="eager", fastvideo_args=fva, regional=True)
    with torch.no_grad():
        for t in (900, 600, 300):
            cm(latent, torch.tensor([t]), text, **kwargs)
    assert cm._fv_backend.graphs == 1
    assert cm.variants_compiled == 2 and cm.variants_token_ordered == 1


def test_an_unknown_token_order_setting_is_refused_at_compile_time():
    with pytest.raises(
        fv_compile.FvCompileError, match="sta_token_order must be 'auto' or 'per_site'"
    ):
        fv_compile.compile(TinyDiT(), STA, fastvideo_args=FastVideoArgs(sta_token_order="hoisted"))


def test_a_tile_that_pads_the_grid_keeps_the_per_site_order():
    """With partial tiles tile order is no permutation (it has padding slots): the proof holds,
    but the step's metadata holds no order, and the graph runs as traced."""
    model = TinyDiT().eval()

    def fva(order):
        return FastVideoArgs(
            patch_size=(1, 1, 1),
            sta_tile_size=(1, 3, 2),
            sta_window=(1, 1, 1),
            sta_token_order=order,
        )

    ref, out, cm = run_both(model, inputs(), fva=fva)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert cm.variants_compiled == 1 and cm.variants_token_ordered == 0
    assert cm.explain().token_order[0].hoisted


class JointDiT(torch.nn.Module):
    """Video tokens attend jointly with text, joined before or after them, every block."""

    def __init__(self, text_first, layers=2, dim=32):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block(dim) for _ in range(layers))
        self.text_first = text_first

    def forward(self, x, table, text):
        n, t = x.shape[1], text.shape[1]
        full = (
            torch.cat([torch.ones_like(table[:t]), table])
            if self.text_first
            else torch.cat([table, torch.ones_like(table[:t])])
        )
        for blk in self.blocks:
            h = blk(torch.cat([text, x] if self.text_first else [x, text], 1), full)
            x, text = (h[:, t:], h[:, :t]) if self.text_first else (h[:, :n], h[:, n:])
        return x, text


@pytest.mark.parametrize("text_first", [False, True])
def test_joint_text_stays_in_place_and_only_video_tokens_move(text_first):
    model = JointDiT(text_first).eval()
    x, table = inputs()
    text = torch.randn(1, 5, 32)
    policy = {"joint": "SLIDING_TILE_ATTN", "default": "TORCH_SDPA"}
    ref, out, cm = run_both(model, (x, table, text), policy=policy)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert {s.role for s in cm.explain().sites} == {"joint"}
    (row,) = cm.explain().token_order
    assert row.hoisted and row.sites == 2, row.reason
    assert cm.variants_token_ordered == 1


def test_a_dense_backend_site_between_sta_sites_stays_in_the_stretch():
    model = TinyDiT(layers=3).eval()

    def policy(site):
        return "TORCH_SDPA" if site.module_path == "blocks.1" else "SLIDING_TILE_ATTN"

    ref, out, cm = run_both(model, inputs(), policy=policy)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    (row,) = cm.explain().token_order
    assert row.hoisted and row.sites == 2


def test_sta_kernel_path_through_the_interpreter():
    """Head dim 64 and tiles of 16 tokens: the Triton block-sparse kernel (interpreted on the
    CPU), not the reference, runs the sites in both orders."""
    grid, tile = (2, 8, 8), (1, 4, 4)
    n = math.prod(grid)
    model = TinyDiT(dim=128).eval()
    g = torch.Generator().manual_seed(0)
    x, table = torch.randn(1, n, 128, generator=g), torch.randn(n, 1, 64, generator=g)
    out = {}
    for order in ("per_site", "auto"):
        fva = FastVideoArgs(
            patch_size=(1, 1, 1), sta_tile_size=tile, sta_window=(1, 1, 1), sta_token_order=order
        )
        cm = fv_compile.compile(model, STA, compiler="eager", regional=False)
        with torch.no_grad(), fv_compile.forward_context(0, batch(grid), fva):
            out[order] = cm(x, table)
    torch.testing.assert_close(out["auto"], out["per_site"], atol=1e-4, rtol=1e-4)
    assert cm.variants_token_ordered == 1


# --- where the proof fails, nothing changes -----------------------------------------------------


class Cumsum(torch.nn.Module):
    def forward(self, x):
        return x + 0.01 * x.cumsum(1)  # each token sees the tokens before it


class Shift(torch.nn.Module):
    def forward(self, x):
        return x + 0.5 * F.pad(x[:, 1:], (0, 0, 0, 1))  # each token reads the next: a token slice


class Mutation(torch.nn.Module):
    def forward(self, x):
        x = x * 1.0
        x.mul_(2.0)
        return x


class OverTokens(torch.nn.Module):
    def forward(self, x):
        return x - x.mean(dim=1, keepdim=True)  # a reduction over the token dim


class MergeTokens(torch.nn.Module):
    def forward(self, x):
        b, s, c = x.shape
        return x.reshape(b, s // 2, 2 * c).reshape(b, s, c)  # reshapes that merge tokens


class Lambda(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize(
    "between, why",
    [
        (Cumsum(), r"\.cumsum is not known to commute"),
        (Lambda(lambda x: x * x.softmax(1)), r"normalises over the token dim"),
        (
            Lambda(lambda x: x + (x.transpose(1, 2) @ x).transpose(1, 2)[:, :1].sum()),
            r"two permuted values",
        ),
        (Lambda(lambda x: x + torch.roll(x, 1, 1)), r"torch\.roll is not known"),
        (Lambda(lambda x: F.relu(x * 1.0, True)), r"writes into a tensor"),
        (Lambda(lambda x: F.dropout(x, 0.5, True)), r"draws random numbers"),
        (Shift(), r"slice \[1:32\] cutting the video tokens"),
        (Mutation(), r"\.mul_ writes into a tensor"),
        (OverTokens(), r"\.mean reduces over the token dim"),
        (MergeTokens(), r"merges or splits the token dim"),
        (Lambda(lambda x: x + x.flip(1)), r"\.flip is not known"),
        (Lambda(lambda x: x + x[:, torch.arange(N - 1, -1, -1)]), r"indexing with tensors"),
        (Lambda(lambda x: x + x.sort(1).values), r"\.sort is not known"),
        (
            Lambda(lambda x: x + (x.transpose(1, 2) @ torch.eye(N)).transpose(1, 2)),
            r"contracts over the token dim",
        ),
        (Lambda(lambda x: F.layer_norm(x, (N, x.shape[2]))), r"normalises over the token dim"),
        (Lambda(lambda x: x - x.flatten(0, 1).mean(0)), r"\.mean reduces over the token dim"),
        (Lambda(lambda x: x + x.transpose(1, 2)), r"permuted along different dims"),
        (
            Lambda(lambda x: x.unflatten(1, GRID).flatten(1, 3)),
            r"merges or splits the token dim",
        ),
    ],
)
def test_a_position_dependent_op_between_the_sites_leaves_the_graph_alone(between, why):
    model = TinyDiT(between=between).eval()
    ref, out, cm = run_both(model, inputs())
    assert [s.backend for s in cm.explain().sites] == ["SLIDING_TILE_ATTN"] * 2
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert cm.variants_token_ordered == 0
    (row,) = cm.explain().token_order
    assert not row.hoisted and row.stopped_at
    import re

    assert re.search(why, row.reason), row.reason
    assert "each SLIDING_TILE_ATTN site reorders its own tokens" in str(cm.explain())


@pytest.mark.parametrize("reduce", ["mean", "amax", "var"])
def test_a_reduction_over_an_empty_dim_list_reduces_the_tokens_too(reduce):
    """`x.mean(dim=())` reduces over every dim, the tokens with them: a proof that reads the
    empty list as "no token dim among the reduced ones" would run it on permuted tokens."""
    model = TinyDiT(between=Lambda(lambda x: x - getattr(x, reduce)(dim=(), keepdim=True))).eval()
    ref, out, cm = run_both(model, inputs())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    (row,) = cm.explain().token_order
    assert not row.hoisted and f".{reduce} reduces over every dim" in row.reason, row.reason


class Positional(torch.nn.Module):
    """Adds what depends on a token's position: a learned embedding, a buffer of per-token
    scales and RoPE-like angles from `torch.arange` over the tokens."""

    def __init__(self, dim=32):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.pos = torch.nn.Parameter(torch.randn(1, N, dim, generator=g))
        self.register_buffer("scale", torch.rand(N, 1, generator=g) + 0.5)

    def forward(self, x):
        angle = torch.arange(x.shape[1], dtype=x.dtype)[None, :, None]
        return (x + self.pos) * self.scale * torch.cos(angle)


def test_positions_computed_or_stored_between_the_sites_enter_in_tile_order():
    model = TinyDiT(between=Positional()).eval()
    ref, out, cm = run_both(model, inputs())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    (row,) = cm.explain().token_order
    assert row.hoisted and cm.variants_token_ordered == 1, row.reason


def test_a_channel_vector_as_long_as_the_token_dim_is_not_reordered():
    """With as many channels as tokens, a `[C]` bias and a `[N, 1]` scale have the same length:
    only the one that broadcasts along the tokens may be gathered."""
    g = torch.Generator().manual_seed(4)
    bias, scale = torch.randn(N, generator=g), torch.randn(N, 1, generator=g)
    model = TinyDiT(dim=N, between=Lambda(lambda x: (x + bias) * scale)).eval()
    ref, out, cm = run_both(model, inputs(dim=N))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert cm.variants_token_ordered == 1


def test_each_batch_item_keeps_its_own_per_token_table():
    model = TinyDiT().eval()
    g = torch.Generator().manual_seed(5)
    x, table = torch.randn(2, N, 32, generator=g), torch.randn(2, N, 1, 16, generator=g)
    fb = ForwardBatch(raw_latent_shape=(2, 4, *GRID))
    ref, out, cm = run_both(model, (x, table), fb=fb)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert cm.variants_token_ordered == 1


class MaskedMiddle(torch.nn.Module):
    """A dense masked self-attention between two STA blocks: permuted queries and keys need the
    mask permuted alike, which a mask over keys only can be and a `[S, S]` one is not here."""

    def __init__(self, mask):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block() for _ in range(2))
        self.register_buffer("mask", mask)

    def forward(self, x, table):
        x = self.blocks[0](x, table)
        b, s, c = x.shape
        q = x.view(b, s, 2, c // 2).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, q, q, attn_mask=self.mask)
        return self.blocks[1](x + o.transpose(1, 2).reshape(b, s, c), table)


def _sta_in_blocks(site):
    return "SLIDING_TILE_ATTN" if site.module_path.startswith("blocks") else "TORCH_SDPA"


def test_a_key_mask_of_a_dense_site_in_the_stretch_is_gathered_with_the_keys():
    mask = torch.rand(1, 1, 1, N, generator=torch.Generator().manual_seed(6)) > 0.3
    mask[..., 0] = True
    ref, out, cm = run_both(MaskedMiddle(mask).eval(), inputs(), policy=_sta_in_blocks)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert [s.backend for s in cm.explain().sites].count("TORCH_SDPA") == 1
    assert cm.variants_token_ordered == 1


def test_a_dense_site_mask_over_queries_and_keys_leaves_the_graph_alone():
    mask = torch.rand(1, 1, N, N, generator=torch.Generator().manual_seed(6)) > 0.3
    mask |= torch.eye(N, dtype=torch.bool)
    ref, out, cm = run_both(MaskedMiddle(mask).eval(), inputs(), policy=_sta_in_blocks)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    (row,) = cm.explain().token_order
    assert not row.hoisted and "varies over the (permuted) queries" in row.reason


def test_dense_steps_leave_a_masked_dense_site_in_the_traced_order():
    """On a dense step no site reorders: the mask of the dense site in between must meet its
    keys in the traced order, and on the sparse steps in tile order."""
    mask = torch.rand(1, 1, 1, N, generator=torch.Generator().manual_seed(6)) > 0.3
    mask[..., 0] = True
    model, (x, table) = MaskedMiddle(mask).eval(), inputs()
    cm = fv_compile.compile(model, _sta_in_blocks, compiler="eager", regional=False)
    ref = fv_compile.compile(model, _sta_in_blocks, compiler="eager", regional=False)
    with torch.no_grad():
        for step in range(3):
            with fv_compile.forward_context(step, batch(), sta_args(sta_dense_steps=1)):
                out = cm(x, table)
            with fv_compile.forward_context(step, batch(), sta_args("per_site", sta_dense_steps=1)):
                want = ref(x, table)
            torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert cm.variants_compiled == 2 and cm.variants_token_ordered == 1


class JointSelfJoint(torch.nn.Module):
    """Joint attention with the text after the video, video-only self-attention, then joint
    attention with the text first: the text moves between the ends while the video is permuted."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block() for _ in range(3))

    def forward(self, x, table, text):
        n, t = x.shape[1], text.shape[1]
        ones = torch.ones_like(table[:t])
        h = self.blocks[0](torch.cat([x, text], 1), torch.cat([table, ones]))
        x, text = h[:, :n], h[:, n:]
        x = self.blocks[1](x, table)
        return self.blocks[2](torch.cat([text, x], 1), torch.cat([ones, table]))


def test_text_after_then_before_the_video_with_a_video_only_site_between():
    policy = {"joint": "SLIDING_TILE_ATTN", "self": "SLIDING_TILE_ATTN", "default": "TORCH_SDPA"}
    x, table = inputs()
    text = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(8))
    ref, out, cm = run_both(JointSelfJoint().eval(), (x, table, text), policy=policy)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    (row,) = cm.explain().token_order
    assert row.hoisted and row.sites == 3, row.reason


class TableWrittenBetween(torch.nn.Module):
    """Scales the per-token table in place between the two blocks: the second site must read
    the scaled table, which a gather taken once where the table enters would not hold."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block() for _ in range(2))

    def forward(self, x, table):
        table = table.clone()
        x = self.blocks[0](x, table)
        table.mul_(2.0)
        return self.blocks[1](x, table)


def test_a_write_into_a_value_entering_the_stretch_leaves_the_graph_alone():
    ref, out, cm = run_both(TableWrittenBetween().eval(), inputs())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    (row,) = cm.explain().token_order
    assert not row.hoisted and "which enters the stretch" in row.reason, row.reason


def test_a_matmul_batched_over_the_tokens_with_per_token_weights_leaves_the_graph_alone():
    """`x[:, :, None] @ W` with W `[N, C, C]` pairs token i with weight i: the weights would have
    to move with the tokens."""
    weights = torch.randn(N, 32, 32, generator=torch.Generator().manual_seed(9)) * 0.1
    model = TinyDiT(between=Lambda(lambda x: x + (x.unsqueeze(2) @ weights).squeeze(2))).eval()
    ref, out, cm = run_both(model, inputs())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    (row,) = cm.explain().token_order
    assert not row.hoisted and "batches over the token dim" in row.reason, row.reason


class FlipAfterTheLastSite(torch.nn.Module):
    """A position-dependent op after the last site: outside the stretch, so it must read the
    tokens scattered back to the traced order."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block() for _ in range(2))

    def forward(self, x, table):
        for blk in self.blocks:
            x = blk(x, table)
        return x + x.flip(1).cumsum(1)


def test_a_position_dependent_op_after_the_last_site_reads_the_traced_order():
    ref, out, cm = run_both(FlipAfterTheLastSite().eval(), inputs())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    (row,) = cm.explain().token_order
    assert row.hoisted and row.sites == 2 and len(row.scattered) == 1, row.reason


class Escapes(torch.nn.Module):
    """Returns an intermediate from between the sites too: it would leave the stretch."""

    def __init__(self):
        super().__init__()
        self.dit = TinyDiT()

    def forward(self, x, table):
        h = self.dit.blocks[0](x, table)
        return self.dit.head(self.dit.blocks[1](h, table)), h


def test_an_intermediate_escaping_the_stretch_leaves_the_graph_alone():
    model = Escapes().eval()
    ref, out, cm = run_both(model, inputs())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    (row,) = cm.explain().token_order
    assert (
        not row.hoisted and "outside the stretch" in row.reason and "the graph output" in row.reason
    )


def test_a_site_on_an_unknown_backend_in_the_stretch_leaves_the_graph_alone():
    class Opaque(AttentionBackend):  # declares nothing: may depend on positions
        @staticmethod
        def get_name():
            return "OPAQUE_TEST"

        @staticmethod
        def get_impl_cls():
            return _DenseImpl

        @staticmethod
        def get_metadata_cls():
            return AttentionMetadata

        @staticmethod
        def get_builder_cls():
            return None

    fv_compile.register_backend("OPAQUE_TEST", Opaque)
    model = TinyDiT(layers=3).eval()

    def policy(site):
        return "OPAQUE_TEST" if site.module_path == "blocks.1" else "SLIDING_TILE_ATTN"

    ref, out, cm = run_both(model, inputs(), policy=policy)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    (row,) = cm.explain().token_order
    assert not row.hoisted and "may depend on token positions" in row.reason


def test_a_rewritten_graph_that_does_not_trace_is_given_up(monkeypatch):
    """The rewritten copy is run on fake tensors before it is kept: a graph that would not
    trace (a stride-sensitive op handed a value of other strides, say) is dropped, as traced."""
    import torch.fx.passes.fake_tensor_prop as ftp

    def broken(self, *args):
        raise RuntimeError("view size is not compatible with input tensor's size and stride")

    monkeypatch.setattr(ftp.FakeTensorProp, "propagate_dont_convert_inputs", broken)
    model = TinyDiT().eval()
    ref, out, cm = run_both(model, inputs())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    (row,) = cm.explain().token_order
    assert (
        not row.hoisted
        and "internal check failed: the rewritten graph does not trace" in row.reason
    )
    assert cm.variants_token_ordered == 0


# --- gradients ----------------------------------------------------------------------------------


class _DenseImpl(AttentionImpl):
    def __init__(
        self, num_heads, head_size, softmax_scale, causal=False, num_kv_heads=None, prefix="", **kw
    ):
        self.scale = softmax_scale

    def forward(self, q, k, v, md):
        return sdpa_bshd(
            q, k, v, attn_mask=getattr(md, "attn_mask", None), scale=self.scale, causal=False
        )


_PERM = torch.randperm(N, generator=torch.Generator().manual_seed(7))


@dataclass
class _ShuffleMetadata(AttentionMetadata):
    token_gather: torch.Tensor | None = None
    token_scatter: torch.Tensor | None = None


class _ShuffleBuilder(AttentionMetadataBuilder):
    def build(self, current_timestep, forward_batch, fastvideo_args):
        if getattr(fastvideo_args, "sta_token_order", "auto") == "per_site":
            return _ShuffleMetadata(current_timestep)
        return _ShuffleMetadata(current_timestep, _PERM, torch.argsort(_PERM))


class _ShuffleImpl(_DenseImpl):
    """Dense attention that, like a tiled kernel, works on its tokens in an order of its own (it
    reorders them itself unless the graph hands them over in it): differentiable."""

    stacked_preprocess = False

    def preprocess_qkv(self, x, md):
        return x if getattr(md, "tokens_permuted", False) else x.index_select(1, _PERM)

    def postprocess_output(self, out, md):
        return (
            out
            if getattr(md, "tokens_permuted", False)
            else out.index_select(1, torch.argsort(_PERM))
        )


class _ShuffleBackend(AttentionBackend):
    token_permutation = ("token_gather", "token_scatter")
    differentiable = True
    roles = ("self",)

    @staticmethod
    def get_name():
        return "SHUFFLE_TEST"

    @staticmethod
    def get_impl_cls():
        return _ShuffleImpl

    @staticmethod
    def get_metadata_cls():
        return _ShuffleMetadata

    @staticmethod
    def get_builder_cls():
        return _ShuffleBuilder


def test_gradients_through_the_tile_order_equal_the_per_site_ones():
    """Sliding tile attention is forward-only; a differentiable backend that works in a token
    permutation checks the backward of the hoisted graph (gathers, scatters, table gathers)."""
    fv_compile.register_backend("SHUFFLE_TEST", _ShuffleBackend)
    model = TinyDiT().train()
    x, table = inputs()
    grads = {}
    for order in ("per_site", "auto"):
        model.zero_grad()
        xg, tg = x.clone().requires_grad_(), table.clone().requires_grad_()
        cm = fv_compile.compile(
            model, {"self": "SHUFFLE_TEST", "default": "TORCH_SDPA"}, compiler="eager"
        )
        with fv_compile.forward_context(3, batch(), FastVideoArgs(sta_token_order=order)):
            out = cm(xg, tg)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads[order] = [xg.grad, tg.grad] + [p.grad.clone() for p in model.parameters()]
        if order == "auto":
            assert cm.variants_token_ordered == 1
    for a, b in zip(grads["auto"], grads["per_site"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gradients_reach_a_learned_positional_embedding_between_the_sites():
    """The embedding enters the stretch through a gather: its gradient comes back through the
    gather's backward, in the traced order."""
    fv_compile.register_backend("SHUFFLE_TEST", _ShuffleBackend)
    model = TinyDiT(between=Positional()).train()
    x, table = inputs()
    grads = {}
    for order in ("per_site", "auto"):
        model.zero_grad()
        cm = fv_compile.compile(
            model, {"self": "SHUFFLE_TEST", "default": "TORCH_SDPA"}, compiler="eager"
        )
        with fv_compile.forward_context(3, batch(), FastVideoArgs(sta_token_order=order)):
            out = cm(x, table)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads[order] = [p.grad.clone() for p in model.parameters()]
        if order == "auto":
            assert cm.variants_token_ordered >= 1
    for a, b in zip(grads["auto"], grads["per_site"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# --- the graph ----------------------------------------------------------------------------------


def _hoisted_graph(model, *args):
    captured = {}

    def backend(gm, example_inputs):
        result = lower_graph(gm, SitePolicy(STA))
        captured["result"] = result
        return result.gm.forward

    torch._dynamo.reset()
    # the sites need a forward context to run: the graph is what counts
    with torch.no_grad(), contextlib.suppress(AttributeError):
        torch.compile(model, backend=backend, fullgraph=True, dynamic=False)(*args)
    result = captured["result"]
    text = normalize_gm(result.permuted.gm.print_readable(print_output=False))
    return _SITE_ARG.sub(r"\1, SITE, \2, ", text), result


class TestTileOrderGraph(expecttest.TestCase):
    def test_one_gather_in_one_scatter_out(self):
        model = TinyDiT(layers=2, dim=8).eval()
        x, table = torch.randn(1, N, 8), torch.randn(N, 1, 4)
        text, _ = _hoisted_graph(model, x, table)
        self.assertEqual(text.count("fv_token_gather)"), 2)  # the tokens, and the per-token table
        self.assertEqual(text.count("fv_token_scatter)"), 1)
        self.assertExpectedInline(
            text,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, L_x_: "f32[1, 32, 8]", L_self_modules_blocks_modules_0_modules_norm_parameters_weight_: "f32[8]", L_self_modules_blocks_modules_0_modules_norm_parameters_bias_: "f32[8]", L_self_modules_blocks_modules_0_modules_qkv_parameters_weight_: "f32[24, 8]", L_self_modules_blocks_modules_0_modules_qkv_parameters_bias_: "f32[24]", L_table_: "f32[32, 1, 4]", L_self_modules_blocks_modules_0_modules_out_parameters_weight_: "f32[8, 8]", L_self_modules_blocks_modules_0_modules_out_parameters_bias_: "f32[8]", L_self_modules_blocks_modules_0_modules_mlp_parameters_weight_: "f32[8, 8]", L_self_modules_blocks_modules_0_modules_mlp_parameters_bias_: "f32[8]", L_self_modules_blocks_modules_1_modules_norm_parameters_weight_: "f32[8]", L_self_modules_blocks_modules_1_modules_norm_parameters_bias_: "f32[8]", L_self_modules_blocks_modules_1_modules_qkv_parameters_weight_: "f32[24, 8]", L_self_modules_blocks_modules_1_modules_qkv_parameters_bias_: "f32[24]", L_self_modules_blocks_modules_1_modules_out_parameters_weight_: "f32[8, 8]", L_self_modules_blocks_modules_1_modules_out_parameters_bias_: "f32[8]", L_self_modules_blocks_modules_1_modules_mlp_parameters_weight_: "f32[8, 8]", L_self_modules_blocks_modules_1_modules_mlp_parameters_bias_: "f32[8]", L_self_modules_head_parameters_weight_: "f32[4, 8]", L_self_modules_head_parameters_bias_: "f32[4]", fv_token_gather: "i64[32]", fv_token_scatter: "i64[32]"):
        l_x_ = L_x_
        l_self_modules_blocks_modules_0_modules_norm_parameters_weight_ = L_self_modules_blocks_modules_0_modules_norm_parameters_weight_
        l_self_modules_blocks_modules_0_modules_norm_parameters_bias_ = L_self_modules_blocks_modules_0_modules_norm_parameters_bias_
        l_self_modules_blocks_modules_0_modules_qkv_parameters_weight_ = L_self_modules_blocks_modules_0_modules_qkv_parameters_weight_
        l_self_modules_blocks_modules_0_modules_qkv_parameters_bias_ = L_self_modules_blocks_modules_0_modules_qkv_parameters_bias_
        l_table_ = L_table_
        l_self_modules_blocks_modules_0_modules_out_parameters_weight_ = L_self_modules_blocks_modules_0_modules_out_parameters_weight_
        l_self_modules_blocks_modules_0_modules_out_parameters_bias_ = L_self_modules_blocks_modules_0_modules_out_parameters_bias_
        l_self_modules_blocks_modules_0_modules_mlp_parameters_weight_ = L_self_modules_blocks_modules_0_modules_mlp_parameters_weight_
        l_self_modules_blocks_modules_0_modules_mlp_parameters_bias_ = L_self_modules_blocks_modules_0_modules_mlp_parameters_bias_
        l_self_modules_blocks_modules_1_modules_norm_parameters_weight_ = L_self_modules_blocks_modules_1_modules_norm_parameters_weight_
        l_self_modules_blocks_modules_1_modules_norm_parameters_bias_ = L_self_modules_blocks_modules_1_modules_norm_parameters_bias_
        l_self_modules_blocks_modules_1_modules_qkv_parameters_weight_ = L_self_modules_blocks_modules_1_modules_qkv_parameters_weight_
        l_self_modules_blocks_modules_1_modules_qkv_parameters_bias_ = L_self_modules_blocks_modules_1_modules_qkv_parameters_bias_
        l_self_modules_blocks_modules_1_modules_out_parameters_weight_ = L_self_modules_blocks_modules_1_modules_out_parameters_weight_
        l_self_modules_blocks_modules_1_modules_out_parameters_bias_ = L_self_modules_blocks_modules_1_modules_out_parameters_bias_
        l_self_modules_blocks_modules_1_modules_mlp_parameters_weight_ = L_self_modules_blocks_modules_1_modules_mlp_parameters_weight_
        l_self_modules_blocks_modules_1_modules_mlp_parameters_bias_ = L_self_modules_blocks_modules_1_modules_mlp_parameters_bias_
        l_self_modules_head_parameters_weight_ = L_self_modules_head_parameters_weight_
        l_self_modules_head_parameters_bias_ = L_self_modules_head_parameters_bias_

        index_select: "f32[1, 32, 8]" = torch.index_select(l_x_, 1, fv_token_gather);  l_x_ = None

        layer_norm: "f32[1, 32, 8]" = torch.nn.functional.layer_norm(index_select, (8,), l_self_modules_blocks_modules_0_modules_norm_parameters_weight_, l_self_modules_blocks_modules_0_modules_norm_parameters_bias_, 1e-05);  l_self_modules_blocks_modules_0_modules_norm_parameters_weight_ = l_self_modules_blocks_modules_0_modules_norm_parameters_bias_ = None
        linear: "f32[1, 32, 24]" = torch._C._nn.linear(layer_norm, l_self_modules_blocks_modules_0_modules_qkv_parameters_weight_, l_self_modules_blocks_modules_0_modules_qkv_parameters_bias_);  layer_norm = l_self_modules_blocks_modules_0_modules_qkv_parameters_weight_ = l_self_modules_blocks_modules_0_modules_qkv_parameters_bias_ = None
        view: "f32[1, 32, 3, 2, 4]" = linear.reshape(1, 32, 3, 2, 4);  linear = None
        unbind = view.unbind(2);  view = None
        q: "f32[1, 32, 2, 4]" = unbind[0]
        k: "f32[1, 32, 2, 4]" = unbind[1]
        v: "f32[1, 32, 2, 4]" = unbind[2];  unbind = None

        index_select_1: "f32[32, 1, 4]" = torch.index_select(l_table_, 0, fv_token_gather);  l_table_ = fv_token_gather = None

        q_1: "f32[1, 32, 2, 4]" = q * index_select_1;  q = None
        k_1: "f32[1, 32, 2, 4]" = k * index_select_1;  k = None

        attention_default: "f32[1, 32, 2, 4]" = torch.ops.fv_compile.attention.default(q_1, k_1, v, None, SITE, 0, []);  q_1 = k_1 = v = None

        reshape: "f32[1, 32, 8]" = attention_default.reshape(1, 32, 8);  attention_default = None
        linear_1: "f32[1, 32, 8]" = torch._C._nn.linear(reshape, l_self_modules_blocks_modules_0_modules_out_parameters_weight_, l_self_modules_blocks_modules_0_modules_out_parameters_bias_);  reshape = l_self_modules_blocks_modules_0_modules_out_parameters_weight_ = l_self_modules_blocks_modules_0_modules_out_parameters_bias_ = None
        x: "f32[1, 32, 8]" = index_select + linear_1;  index_select = linear_1 = None

        linear_2: "f32[1, 32, 8]" = torch._C._nn.linear(x, l_self_modules_blocks_modules_0_modules_mlp_parameters_weight_, l_self_modules_blocks_modules_0_modules_mlp_parameters_bias_);  l_self_modules_blocks_modules_0_modules_mlp_parameters_weight_ = l_self_modules_blocks_modules_0_modules_mlp_parameters_bias_ = None
        gelu: "f32[1, 32, 8]" = torch._C._nn.gelu(linear_2);  linear_2 = None
        x_1: "f32[1, 32, 8]" = x + gelu;  x = gelu = None

        layer_norm_1: "f32[1, 32, 8]" = torch.nn.functional.layer_norm(x_1, (8,), l_self_modules_blocks_modules_1_modules_norm_parameters_weight_, l_self_modules_blocks_modules_1_modules_norm_parameters_bias_, 1e-05);  l_self_modules_blocks_modules_1_modules_norm_parameters_weight_ = l_self_modules_blocks_modules_1_modules_norm_parameters_bias_ = None
        linear_3: "f32[1, 32, 24]" = torch._C._nn.linear(layer_norm_1, l_self_modules_blocks_modules_1_modules_qkv_parameters_weight_, l_self_modules_blocks_modules_1_modules_qkv_parameters_bias_);  layer_norm_1 = l_self_modules_blocks_modules_1_modules_qkv_parameters_weight_ = l_self_modules_blocks_modules_1_modules_qkv_parameters_bias_ = None
        view_1: "f32[1, 32, 3, 2, 4]" = linear_3.reshape(1, 32, 3, 2, 4);  linear_3 = None
        unbind_1 = view_1.unbind(2);  view_1 = None
        q_2: "f32[1, 32, 2, 4]" = unbind_1[0]
        k_2: "f32[1, 32, 2, 4]" = unbind_1[1]
        v_1: "f32[1, 32, 2, 4]" = unbind_1[2];  unbind_1 = None

        q_3: "f32[1, 32, 2, 4]" = q_2 * index_select_1;  q_2 = None
        k_3: "f32[1, 32, 2, 4]" = k_2 * index_select_1;  k_2 = index_select_1 = None

        attention_default_1: "f32[1, 32, 2, 4]" = torch.ops.fv_compile.attention.default(q_3, k_3, v_1, None, SITE, 0, []);  q_3 = k_3 = v_1 = None

        reshape_1: "f32[1, 32, 8]" = attention_default_1.reshape(1, 32, 8);  attention_default_1 = None
        linear_4: "f32[1, 32, 8]" = torch._C._nn.linear(reshape_1, l_self_modules_blocks_modules_1_modules_out_parameters_weight_, l_self_modules_blocks_modules_1_modules_out_parameters_bias_);  reshape_1 = l_self_modules_blocks_modules_1_modules_out_parameters_weight_ = l_self_modules_blocks_modules_1_modules_out_parameters_bias_ = None
        x_2: "f32[1, 32, 8]" = x_1 + linear_4;  x_1 = linear_4 = None

        linear_5: "f32[1, 32, 8]" = torch._C._nn.linear(x_2, l_self_modules_blocks_modules_1_modules_mlp_parameters_weight_, l_self_modules_blocks_modules_1_modules_mlp_parameters_bias_);  l_self_modules_blocks_modules_1_modules_mlp_parameters_weight_ = l_self_modules_blocks_modules_1_modules_mlp_parameters_bias_ = None
        gelu_1: "f32[1, 32, 8]" = torch._C._nn.gelu(linear_5);  linear_5 = None
        x_3: "f32[1, 32, 8]" = x_2 + gelu_1;  x_2 = gelu_1 = None

        linear_6: "f32[1, 32, 4]" = torch._C._nn.linear(x_3, l_self_modules_head_parameters_weight_, l_self_modules_head_parameters_bias_);  x_3 = l_self_modules_head_parameters_weight_ = l_self_modules_head_parameters_bias_ = None

        index_select_2: "f32[1, 32, 4]" = torch.index_select(linear_6, 1, fv_token_scatter);  linear_6 = fv_token_scatter = None
        return (index_select_2,)
""",
        )
