"""`regional="auto"` (the default) and what a regionally compiled model keeps right: the model's
attributes and hooks set after compiling, attention left in the eager glue (announced), blocks
that never ran (announced), and CUDA-graph steps (marked once per outermost call)."""

import warnings

import pytest
import torch

import fv_compile
from fv_compile import FvCompileError
from tests.test_api import Block, Net, inputs


def run(cm, *args, **kwargs):
    with torch.no_grad():
        return cm(*args, **kwargs)


class Heads(torch.nn.Module):
    """Attention outside any block list, then two small identical heads in a ModuleList."""

    def __init__(self):
        super().__init__()
        self.attn = Block()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(32, 4) for _ in range(2))

    def forward(self, x, text):
        x = self.attn(x, text)
        return torch.cat([h(x) for h in self.heads], -1)


def test_auto_compiles_blocks_when_they_hold_the_weights_and_the_whole_model_otherwise():
    net = Net().eval()
    x, t = inputs()
    cm = fv_compile.compile(net, "TORCH_SDPA", compiler="eager")
    torch.testing.assert_close(run(cm, x, t), net(x, t), atol=1e-5, rtol=1e-5)
    assert cm.regions == ["blocks"] and cm._fv_backend.graph_runs == [2]
    for model in (Block().eval(), Heads().eval()):  # no block list / one holding a few weights
        cm = fv_compile.compile(model, "TORCH_SDPA", compiler="eager")
        torch.testing.assert_close(run(cm, x, t), model(x, t), atol=1e-5, rtol=1e-5)
        assert cm.regions == [] and len(cm.explain().rewritten) == 2
    whole = fv_compile.compile(net, "TORCH_SDPA", compiler="eager", regional=False)
    run(whole, x, t)
    assert whole.regions == [] and whole._fv_backend.graph_runs == [1]


def test_regional_must_be_auto_true_or_false():
    with pytest.raises(FvCompileError, match=r"regional must be 'auto'.*got 'yes'"):
        fv_compile.compile(Net(), regional="yes")
    with pytest.raises(FvCompileError, match="no repeated blocks"):
        fv_compile.compile(Block(), regional=True)
    assert fv_compile.compile(Heads(), regional=False)  # truthy, though Heads has no len()


def test_attention_in_the_glue_is_announced_once():
    model = Heads().eval()
    cm = fv_compile.compile(model, "TORCH_SDPA", compiler="eager", regional=True)  # only the heads
    x, t = inputs()
    with pytest.warns(
        UserWarning, match="(?s)2 attention-like call.*outside its compiled blocks.*test_api.py"
    ):
        out = run(cm, x, t)
    torch.testing.assert_close(out, model(x, t), atol=1e-5, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fv_compile")
        run(cm, x, t)  # checked on the first call only


class Glue(Net):
    """Glue that reads attributes of the model and of its blocks' parent at every call."""

    scale = 1.0

    def forward(self, x, text):
        for blk in self.blocks:
            x = blk(x, text)
        if self.training:
            x = x + 1.0
        return x * self.scale


def test_attributes_and_hooks_set_on_the_model_after_compiling_reach_the_glue():
    model = Glue().eval()
    cm = fv_compile.compile(model, "TORCH_SDPA", compiler="eager")
    x, t = inputs()
    assert cm.regions == ["blocks"]
    model.scale = 3.0  # on the model itself
    cm.train()  # through the wrapper
    seen = []
    model.register_forward_hook(lambda m, a, o: seen.append("model"))
    torch.testing.assert_close(run(cm, x, t), run(model, x, t), atol=1e-5, rtol=1e-5)
    assert seen == ["model", "model"]
    model.blocks[1] = Block()
    with pytest.raises(FvCompileError, match=r"blocks of blocks changed after fv_compile\.compile"):
        run(cm, x, t)


def test_a_model_whose_forward_no_longer_calls_the_blocks_is_announced():
    model = Net().eval()
    cm = fv_compile.compile(model, "TORCH_SDPA", compiler="eager")
    model.forward = lambda x, text: x  # e.g. a hook library patching forward on the instance
    with pytest.warns(UserWarning, match="ran none of its compiled blocks"):
        run(cm, *inputs())


def test_each_outermost_call_is_one_cuda_graph_step(monkeypatch):
    """Marked once per outermost call (blocks and nested compiled models are not new steps),
    whatever the device; on the GPU see tests/test_cuda_graphs.py."""
    assert fv_compile.compile(Net(), mode="reduce-overhead").cuda_graphs
    assert fv_compile.compile(Net(), options={"triton.cudagraphs": True}).cuda_graphs
    assert not fv_compile.compile(Net(), mode="reduce-overhead", compiler="aot_eager").cuda_graphs
    assert not fv_compile.compile(Net()).cuda_graphs
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    inner = fv_compile.compile(Net().eval(), "TORCH_SDPA", compiler="eager")

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x, text):
            return self.inner(x, text) + self.inner(x, text)

    outer = fv_compile.compile(Outer(), "TORCH_SDPA", compiler="eager", regional=False)
    for cm in (inner, outer):
        object.__setattr__(cm, "_cuda_graphs", True)  # as reduce-overhead sets it
    run(inner, *inputs())
    assert len(marks) == 1
    run(outer, *inputs())
    assert len(marks) == 2


def test_a_compiled_model_called_in_an_outer_compiled_frame_runs_its_own_compiled_code():
    inner = fv_compile.compile(Net().eval(), "TORCH_SDPA", compiler="eager")

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x, text):
            return self.inner(x, text) * 2

    outer = fv_compile.compile(Outer(), "TRITON_ATTN", compiler="eager", regional=False)
    runs = sum(inner._entry.backend.graph_runs)
    args = inputs()
    with torch.no_grad():
        out = outer(*args)
        torch.testing.assert_close(out, inner._orig_mod(*args) * 2)
    assert sum(inner._entry.backend.graph_runs) > runs  # the inner model's graphs ran
    assert {s.backend for s in inner.explain().sites} == {"TORCH_SDPA"}  # with its settings
    (brk,) = outer.explain().graph_breaks
    assert "a CompiledModel is called here" in brk.reason


def test_explain_of_a_regional_model_lists_every_block(monkeypatch):
    model = Net().eval()
    model.blocks.append(Block())
    cm = fv_compile.compile(model, "TORCH_SDPA", compiler="eager")
    assert cm.explain().sites == []  # nothing compiled before the first call
    run(cm, *inputs())
    report = cm.explain()
    assert [s.module_path for s in report.sites] == [
        f"blocks.{i}" for i in range(3) for _ in range(2)
    ]
    assert report.graphs == 1 and "6 attention site(s) in 1 graph(s)" in str(report)
    assert [s.module_path for s in fv_compile.explain(model, *inputs()).sites] == [
        s.module_path for s in report.sites
    ]
