"""Many compiles of one model class in one process.

Nothing here relies on Dynamo being reset between the compiles of one test: every loop runs past
Dynamo's recompile limit (8) inside a single test.
"""

import gc
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.eval_frame import _get_total_cache_entry_count

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
        cm = fv_compile.compile(model, backend, compiler="eager")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error")  # no eager fallback warning either
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
        assert (backend.graphs, backend.graph_runs, len(backend.sites)) == (1, [30], 2), f"compile #{i + 1}"


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
        cm = fv_compile.compile(model, "TORCH_SDPA", compiler="eager")
        torch.testing.assert_close(run(cm, x), model(x), atol=1e-5, rtol=1e-5)
        assert len(cm.explain().rewritten) == sites, f"compile #{i + 1}"
        assert sum(cm._fv_backend.graph_runs) == 2, f"compile #{i + 1}"


@pytest.mark.skipif(not fv_compile.api._ISOLATE, reason="this torch has no isolate_recompiles")
def test_many_live_compiles_of_a_graph_break_model_each_keep_their_graphs():
    model = LoopBreakNet().eval()
    x = x_in()
    alive = [fv_compile.compile(model, ("TORCH_SDPA", "auto")[i % 2], compiler="eager") for i in range(PAST_LIMIT)]
    for _ in range(2):
        for i, cm in enumerate(alive):
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the skipped forward, announced once per compile
                warnings.filterwarnings("error", message="fv_compile: this call")  # but no eager call
                torch.testing.assert_close(cm(x), model(x), atol=1e-5, rtol=1e-5)
            assert cm._fv_backend.graphs == 1, f"compile #{i + 1}"


@pytest.mark.parametrize("cls", [Net, BreakNet, LoopBreakNet])
def test_freeing_a_compiled_model_frees_its_compiled_code(cls):
    model = cls().eval()
    x = x_in()
    backends = []
    for _ in range(2 * PAST_LIMIT):
        cm = fv_compile.compile(model, "TORCH_SDPA", compiler="eager")
        run(cm, x)
        backends.append(weakref.ref(cm._fv_backend))
        del cm
        gc.collect()
    assert all(b() is None for b in backends)
    # entries of freed compiles do not pile up on the model's code objects
    assert _get_total_cache_entry_count(cls.forward) <= 1
    assert _get_total_cache_entry_count(Block.forward) <= 1
