"""Many compiles of one model class in one process, Dynamo's eager fallbacks said out loud, and
`explain` reporting what Dynamo never captured (graph breaks, skipped frames, attention outside
every graph).

Nothing here relies on Dynamo being reset between the compiles of one test: every loop runs past
Dynamo's recompile limit (8) inside a single test. Tests of graph breaks and frames of the model's
own code compile the whole model (`regional=False`); `regional="auto"` would compile the blocks.
"""

import gc
import json
import math
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

import fv_compile

LIMIT = torch._dynamo.config.recompile_limit
PAST_LIMIT = LIMIT + 4


class Block(torch.nn.Module):
    """Self-attention through SDPA, then a hand-written softmax attention."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, s, c = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, c // self.heads).transpose(1, 3).unbind(2)
        a = F.scaled_dot_product_attention(q, k, v)
        w = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        return self.out(x + (a + w @ v).transpose(1, 2).reshape(b, s, c))


class Net(torch.nn.Module):
    def __init__(self, layers=2):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block() for _ in range(layers))

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x


class BreakNet(Net):
    """A data-dependent op between the blocks: Dynamo breaks the graph there and resumes."""

    def forward(self, x):
        x = self.blocks[0](x)
        x = x + (x > 0).nonzero().shape[0] * 0
        return self.blocks[1](x)


class LoopBreakNet(Net):
    """The same op inside the loop over blocks: Dynamo cannot resume in a loop and skips the
    whole forward; the blocks are then compiled as frames of their own."""

    def forward(self, x):
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i == 0:
                x = x + (x > 0).nonzero().shape[0] * 0
        return x


def x_in(s=12):
    return torch.randn(2, s, 32)


def run(cm, *args):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cm(*args)


# -- many compiles of one class -----------------------------------------------------------------


def test_explain_and_compile_keep_working_past_the_recompile_limit():
    first, second = Net().eval(), Net().eval()
    x = x_in()
    for i in range(PAST_LIMIT):
        report = fv_compile.explain(first, x, attention_backend="TORCH_SDPA")
        assert (report.graphs, len(report.rewritten)) == (1, 4), f"explain #{i + 1}: {report}"
    for i in range(PAST_LIMIT):
        model = (first, second)[i % 2]
        backend = ("TORCH_SDPA", "auto")[i // 2 % 2]
        cm = fv_compile.compile(model, backend, compiler="eager", regional=False)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings(
                "error", message="fv_compile"
            )  # no eager fallback warning either
            torch.testing.assert_close(cm(x), model(x), atol=1e-5, rtol=1e-5)
        assert len(cm.explain().rewritten) == 4, f"compile #{i + 1}"


def test_regional_compiles_keep_working_and_every_block_shares_one_graph():
    model = Net(layers=30).eval()
    x = x_in()
    want = model(x)
    for i in range(PAST_LIMIT):
        cm = fv_compile.compile(model, "TORCH_SDPA", compiler="eager", regional=True)
        torch.testing.assert_close(run(cm, x), want, atol=1e-5, rtol=1e-5)
        backend = cm._fv_backend
        assert (backend.graphs, backend.graph_runs, len(backend.sites)) == (1, [30], 2), (
            f"compile #{i + 1}"
        )


@pytest.mark.parametrize("isolated", [True, False], ids=["isolated", "torch-without-isolation"])
@pytest.mark.parametrize("cls", [BreakNet, LoopBreakNet])
def test_models_with_graph_breaks_keep_compiling(cls, isolated, monkeypatch):
    """The frames Dynamo compiles on their own after a break live on the model's code objects,
    shared by every compile of the class; a freed CompiledModel's entries there are dropped (on
    any torch; `isolate_recompiles` is torch >= 2.12)."""
    if isolated and not fv_compile.api._ISOLATE:
        pytest.skip("this torch has no isolate_recompiles")
    monkeypatch.setattr(fv_compile.api, "_ISOLATE", isolated)
    model = cls().eval()
    x = x_in()
    sites = 4 if cls is BreakNet else 2  # LoopBreakNet: one Block graph serves both blocks
    for i in range(PAST_LIMIT):
        cm = fv_compile.compile(model, "TORCH_SDPA", compiler="eager", regional=False)
        torch.testing.assert_close(run(cm, x), model(x), atol=1e-5, rtol=1e-5)
        assert len(cm.explain().rewritten) == sites, f"compile #{i + 1}"
        assert sum(cm._fv_backend.graph_runs) == 2, f"compile #{i + 1}"


@pytest.mark.skipif(not fv_compile.api._ISOLATE, reason="this torch has no isolate_recompiles")
def test_many_live_compiles_of_a_graph_break_model_each_keep_their_graphs():
    model = LoopBreakNet().eval()
    x = x_in()
    alive = [
        fv_compile.compile(model, ("TORCH_SDPA", "auto")[i % 2], compiler="eager", regional=False)
        for i in range(PAST_LIMIT)
    ]
    for _ in range(2):
        for i, cm in enumerate(alive):
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the skipped forward, announced once per compile
                warnings.filterwarnings(
                    "error", message="fv_compile: this call"
                )  # but no eager call
                torch.testing.assert_close(cm(x), model(x), atol=1e-5, rtol=1e-5)
            assert cm._fv_backend.graphs == 1, f"compile #{i + 1}"


def test_without_isolation_live_compiles_past_the_limit_fall_back_loudly(monkeypatch):
    """On a torch without isolate_recompiles, live CompiledModels of one class share the limit of
    the frames a graph break leaves to Dynamo: the one past it says so instead of running eagerly
    in silence."""
    monkeypatch.setattr(fv_compile.api, "_ISOLATE", False)
    model = LoopBreakNet().eval()
    alive = [
        fv_compile.compile(model, "TORCH_SDPA", compiler="eager", regional=False)
        for _ in range(LIMIT + 1)
    ]
    for cm in alive[:LIMIT]:
        run(cm, x_in())
    with (
        torch.no_grad(),
        pytest.warns(UserWarning, match="(?s)ran no compiled graph.*recompile limit"),
    ):
        alive[LIMIT](x_in())


@pytest.mark.parametrize("cls", [Net, BreakNet, LoopBreakNet])
def test_freeing_a_compiled_model_frees_its_compiled_code(cls):
    model = cls().eval()
    x = x_in()
    backends = []
    for _ in range(2 * PAST_LIMIT):
        cm = fv_compile.compile(model, "TORCH_SDPA", compiler="eager", regional=False)
        run(cm, x)
        backends.append(weakref.ref(cm._fv_backend))
        del cm
        gc.collect()
    assert all(b() is None for b in backends)
    # entries of freed compiles do not pile up on the model's code objects
    assert len(_debug_get_cache_entry_list(cls.forward)) <= 1
    assert len(_debug_get_cache_entry_list(Block.forward)) <= 1


# -- eager fallbacks are announced --------------------------------------------------------------


def test_hitting_the_recompile_limit_warns_and_says_what_to_do():
    model = Net().eval()
    cm = fv_compile.compile(model, "TORCH_SDPA", compiler="eager", regional=False)
    with torch.no_grad():
        for s in range(4, 4 + LIMIT):  # LIMIT shapes: LIMIT graphs
            with warnings.catch_warnings():  # no fv_compile warning before the limit
                warnings.filterwarnings("error", message="fv_compile")
                cm(x_in(s))
        big = x_in(30)
        with pytest.warns(
            UserWarning, match="(?s)ran no compiled graph.*recompile limit.*dynamic=True"
        ):
            out = cm(big)
        torch.testing.assert_close(out, model(big), atol=1e-5, rtol=1e-5)  # eagerly, but right
        with pytest.warns(UserWarning, match="hit Dynamo's recompile limit on an earlier call"):
            cm(x_in(31))
    assert any("recompile limit" in f.reason for f in cm.explain().skipped_frames)


def test_a_frame_dynamo_skips_is_announced_with_its_reason():
    cm = fv_compile.compile(LoopBreakNet().eval(), "TORCH_SDPA", compiler="eager", regional=False)
    with (
        torch.no_grad(),
        pytest.warns(
            UserWarning, match="(?s)could not compile 1 frame.*forward.*graph break in loop"
        ),
    ):
        cm(x_in())
    (frame,) = cm.explain().skipped_frames
    assert (
        frame.function == "forward"
        and "aten.nonzero" in frame.reason
        and "test_recompile" in frame.where
    )


def test_a_call_that_runs_no_compiled_graph_warns():
    cm = fv_compile.compile(Net().eval(), "TORCH_SDPA", compiler="eager", regional=False)
    with (
        torch.no_grad(),
        torch.compiler.set_stance("force_eager"),
        pytest.warns(UserWarning, match="ran no compiled graph.*force_eager"),
    ):
        cm(x_in())


# -- explain: what Dynamo did not capture -------------------------------------------------------


def test_explain_of_a_clean_model_has_nothing_uncaptured():
    report = fv_compile.explain(Net().eval(), x_in())
    assert report.graph_breaks == [] and report.skipped_frames == []
    assert report.uncaptured_calls == 0
    assert sorted((u.op, u.calls, u.captured) for u in report.uncaptured) == [
        ("scaled_dot_product_attention", 2, 2),
        ("softmax", 2, 2),
    ]
    assert "outside" not in str(report) and "graph break" not in str(report)


def test_explain_reports_a_graph_break_with_its_reason_and_line():
    report = fv_compile.explain(BreakNet().eval(), x_in())
    assert report.graphs == 2 and len(report.sites) == 4 and report.uncaptured_calls == 0
    (brk,) = report.graph_breaks
    assert "Dynamic shape operator (aten.nonzero.default)" in brk.reason and brk.count >= 1
    assert any("test_recompile_and_breaks.py" in w and "forward" in w for w in brk.where)
    assert "capture_dynamic_output_shape_ops" in brk.hint
    text = str(report)
    assert "graph break(s)" in text and "aten.nonzero.default" in text


class PerSampleAttention(torch.nn.Module):
    """Mochi's pattern: a loop over the batch that selects the valid text tokens with nonzero,
    then attends: the break in the loop makes Dynamo run the whole function eagerly."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, x, text, mask):
        b, s, c = x.shape
        h = torch.cat([x, text], 1)
        q, k, v = (
            self.qkv(h)
            .view(b, h.shape[1], 3, self.heads, c // self.heads)
            .transpose(1, 3)
            .unbind(2)
        )
        outs = []
        for i in range(b):
            keep = torch.cat([torch.arange(s), s + torch.nonzero(mask[i]).flatten()])
            o = F.scaled_dot_product_attention(
                q[i : i + 1, :, keep], k[i : i + 1, :, keep], v[i : i + 1, :, keep]
            )
            outs.append(o[:, :, :s])
        return torch.cat(outs).transpose(1, 2).reshape(b, s, c)


def test_explain_names_attention_that_ran_outside_every_graph():
    model = PerSampleAttention().eval()
    x, text = torch.randn(2, 6, 32), torch.randn(2, 3, 32)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    with pytest.warns(UserWarning, match="(?s)ran no compiled graph.*graph break in loop"):
        report = fv_compile.explain(model, x, text, mask)
    assert report.sites == []
    (missed,) = [u for u in report.uncaptured if u.uncaptured]
    assert (missed.op, missed.calls, missed.captured) == ("scaled_dot_product_attention", 2, 0)
    assert "test_recompile_and_breaks.py" in missed.where and "forward" in missed.where
    assert report.uncaptured_calls == 2
    assert any("graph break in loop" in f.reason for f in report.skipped_frames)
    text_report = str(report)
    assert "2 attention call(s) outside any graph" in text_report
    assert "attention that ran outside every graph" in text_report
    data = json.loads(json.dumps(report.to_dict()))
    assert (
        data["uncaptured_calls"] == 2 and data["skipped_frames"] and data["summary"]["found"] == 0
    )


def tiny_mochi():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.MochiTransformer3DModel(
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        pooled_projection_dim=16,
        in_channels=4,
        text_embed_dim=16,
        time_embed_dim=16,
        max_sequence_length=8,
    ).eval()
    latent = torch.randn(1, 4, 2, 8, 8)
    text = torch.randn(1, 8, 16)
    text_mask = (torch.arange(8) < 6).long()[None]
    return model, (latent, text, torch.tensor([500]), text_mask)


def test_explain_on_mochi_shows_the_attention_its_graph_breaks_hide():
    """diffusers' Mochi selects each sample's valid text tokens with nonzero inside a loop over
    the batch, in MochiAttnProcessor2_0.__call__: Dynamo skips that function, so its SDPA (the
    blocks' joint attention) always runs eagerly; the one site found is the text pooler's."""
    model, args = tiny_mochi()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = fv_compile.explain(model, *args, return_dict=False)
    assert [s.module_path for s in report.sites] == ["pooler"]
    (missed,) = [u for u in report.uncaptured if u.uncaptured]
    assert "attention_processor.py" in missed.where and "__call__" in missed.where
    assert (missed.op, missed.uncaptured) == (
        "scaled_dot_product_attention",
        2,
    )  # 2 layers x batch 1
    skipped = {f.function: f for f in report.skipped_frames}
    assert (
        "aten.nonzero" in skipped["__call__"].reason
        and "graph break in loop" in skipped["__call__"].reason
    )
    assert any("aten.nonzero" in b.reason for b in report.graph_breaks)
    text = str(report)
    assert "outside any graph" in text and "attention_processor.py" in text


def test_explain_reads_the_model_and_leaves_it_alone():
    model = BreakNet().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    forward = model.forward
    fv_compile.explain(model, x_in())
    assert model.forward == forward and not hasattr(model, "_orig_mod")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert math.isclose(
        sum(p.numel() for p in model.parameters()), sum(v.numel() for v in before.values())
    )
