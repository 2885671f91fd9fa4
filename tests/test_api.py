"""The one-line wrapper, the registered torch.compile backend, policies, explain and bad input."""

import json
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F

import fv_compile
from fv_compile import FvCompileError


class Block(torch.nn.Module):
    """Video self-attention (SDPA) and cross-attention to text (hand-written)."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.q2 = torch.nn.Linear(dim, dim)
        self.kv2 = torch.nn.Linear(dim, 2 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x, text):
        b, s, c = x.shape
        h, d = self.heads, c // self.heads
        q, k, v = self.qkv(x).view(b, s, 3, h, d).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + a.transpose(1, 2).reshape(b, s, c)
        q = self.q2(x).view(b, s, h, d).transpose(1, 2)
        k, v = self.kv2(text).view(b, -1, 2, h, d).unbind(2)
        w = q @ k.transpose(1, 2).transpose(-2, -1) * d**-0.5
        o = w.softmax(-1) @ v.transpose(1, 2)
        return self.out(x + o.transpose(1, 2).reshape(b, s, c))


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block(), Block()])

    def forward(self, x, text):
        for blk in self.blocks:
            x = blk(x, text)
        return x


def inputs():
    return torch.randn(2, 12, 32), torch.randn(2, 5, 32)


@pytest.fixture
def net():
    return Net().eval()


def test_compile_matches_eager_and_rewrites_every_site(net):
    x, t = inputs()
    cm = fv_compile.compile(net, attention_backend="TORCH_SDPA", compiler="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(cm(x, t), net(x, t), atol=1e-5, rtol=1e-5)
    report = cm.explain()
    assert [s.status for s in report.sites] == ["rewritten"] * 4
    assert [s.role for s in report.sites] == ["self", "cross", "self", "cross"]


@pytest.mark.slow
def test_compile_with_inductor(net):
    x, t = inputs()
    cm = fv_compile.compile(net, attention_backend="TORCH_SDPA")
    with torch.no_grad():
        torch.testing.assert_close(cm(x, t), net(x, t), atol=1e-5, rtol=1e-5)


def test_model_compile_with_registered_backend_name(net):
    x, t = inputs()
    ref = net(x, t)
    net.compile(
        backend="fv_compile", options={"attention_backend": "torch_sdpa", "compiler": "eager"}
    )
    with torch.no_grad():
        torch.testing.assert_close(net(x, t), ref, atol=1e-5, rtol=1e-5)


def test_torch_compile_backend_string(net):
    x, t = inputs()
    cm = torch.compile(net, backend="fv_compile", options={"compiler": "aot_eager"})
    with torch.no_grad():
        torch.testing.assert_close(cm(x, t), net(x, t), atol=1e-5, rtol=1e-5)


def test_policy_dict_routes_roles(net):
    x, t = inputs()
    cm = fv_compile.compile(net, {"self": "TORCH_SDPA", "default": "torch_sdpa"}, compiler="eager")
    with torch.no_grad():
        cm(x, t)
    assert {s.backend for s in cm.explain().sites} == {"TORCH_SDPA"}


def test_a_policy_key_for_a_role_no_site_has_is_said_once():
    """`{"self": ...}` on a model whose video attends jointly with its text chooses nothing."""
    from fv_compile.models import build_model, example_inputs

    model = build_model("hunyuan-tiny")
    args, kwargs = example_inputs(model)
    roles = {"self": "TORCH_SDPA", "cross": "auto"}
    cm = fv_compile.compile(model, roles, compiler="eager")
    with torch.no_grad(), pytest.warns(UserWarning, match=r"names TORCH_SDPA for 'self'") as got:
        cm(*args, **kwargs)
        cm(*args, **kwargs)
    said = [w for w in got if "no attention site of the model has that role" in str(w.message)]
    assert len(said) == 1 and "joint (" in str(said[0].message)
    assert {s.role for s in cm.explain().sites} >= {"joint"}


@pytest.mark.parametrize("regional", [False, True])
def test_policy_callable_sees_each_site(net, regional):
    """Whole-model, the policy sees every site by its path; regionally, each site of the one
    compiled block once, by its path inside the block (every block runs what it chose)."""
    seen = []

    def policy(site):
        seen.append((site.module_path, site.role))
        return "TORCH_SDPA"

    cm = fv_compile.compile(net, policy, compiler="eager", regional=regional)
    with torch.no_grad():
        cm(*inputs())
    if regional:
        assert seen == [("", "self"), ("", "cross")]
    else:
        assert seen == [
            ("blocks.0", "self"),
            ("blocks.0", "cross"),
            ("blocks.1", "self"),
            ("blocks.1", "cross"),
        ]


def test_unknown_backend_lists_the_valid_names(net):
    with pytest.raises(FvCompileError, match=r"valid names: .*TORCH_SDPA"):
        fv_compile.compile(net, "NOT_A_BACKEND")


def test_bad_policy_key_and_compiler_are_rejected(net):
    with pytest.raises(FvCompileError, match="unknown keys"):
        fv_compile.compile(net, {"video": "TORCH_SDPA"})
    with pytest.raises(FvCompileError, match="compiler must be one of"):
        fv_compile.compile(net, compiler="tvm")
    with pytest.raises(FvCompileError, match=r"torch\.nn\.Module"):
        fv_compile.compile(lambda x: x)


class NarrowImpl(fv_compile.AttentionImpl):
    def __init__(self, *a, **k):
        pass

    def forward(self, q, k, v, md):
        raise AssertionError("never chosen")


class NarrowBackend(fv_compile.AttentionBackend):
    @staticmethod
    def get_name():
        return "TEST_NARROW"

    @staticmethod
    def get_impl_cls():
        return NarrowImpl

    @staticmethod
    def get_metadata_cls():
        return fv_compile.AttentionMetadata

    @staticmethod
    def get_builder_cls():
        return None

    @staticmethod
    def get_supported_head_sizes():
        return [64, 128]


fv_compile.register_backend("test_narrow", NarrowBackend)


def test_unsupported_site_falls_back_with_a_warning(net):
    cm = fv_compile.compile(net, "TEST_NARROW", compiler="eager")
    x, t = inputs()
    with torch.no_grad(), pytest.warns(UserWarning, match="TEST_NARROW cannot run"):
        out = cm(x, t)
    torch.testing.assert_close(out, net(x, t), atol=1e-5, rtol=1e-5)
    site = cm.explain().sites[0]
    assert site.backend == "TORCH_SDPA" and "head dim 8" in site.reason


def test_strict_raises_on_unsupported_site(net):
    cm = fv_compile.compile(net, "TEST_NARROW", compiler="eager", strict=True)
    with torch.no_grad(), pytest.raises(Exception, match="TEST_NARROW cannot run it"):
        cm(*inputs())


def test_register_backend_rejects_non_backends():
    with pytest.raises(FvCompileError, match="get_impl_cls"):
        fv_compile.register_backend("bad", object)


def test_model_and_weights_are_not_modified(net):
    before = {k: v.clone() for k, v in net.state_dict().items()}
    forward = net.forward
    cm = fv_compile.compile(net, "TORCH_SDPA", compiler="eager")
    with torch.no_grad():
        cm(*inputs())
    fv_compile.explain(net, *inputs())
    assert net.forward == forward
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_explain_report_table_and_json(net):
    report = fv_compile.explain(net, *inputs(), attention_backend="TORCH_SDPA")
    text = str(report)
    assert "4 attention site(s)" in text and "blocks.1" in text and "cross" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["summary"] == {"found": 4, "rewritten": 4}
    row = data["sites"][1]
    assert (row["form"], row["heads"], row["head_dim"], row["q_len"], row["kv_len"]) == (
        "matmul",
        4,
        8,
        12,
        5,
    )


def test_explain_lists_softmaxes_that_are_not_attention():
    class Router(torch.nn.Module):
        def forward(self, x):
            return (x @ x.new_ones(8, 4)).softmax(-1).amax(-1)

    report = fv_compile.explain(Router(), torch.randn(3, 8))
    assert report.sites == [] and len(report.non_attention) == 1
    assert "not attention" in str(report)


def test_gradients_flow_through_dense_sites(net):
    net.train()
    x, t = inputs()
    cm = fv_compile.compile(net, "TORCH_SDPA", compiler="aot_eager")
    cm(x, t).square().sum().backward()
    got = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    net(x, t).square().sum().backward()
    for g, p in zip(got, net.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-4, rtol=1e-4)


def test_symbolic_trace_graphs_are_rewritten(net):
    gm = torch.fx.symbolic_trace(net)
    x, t = inputs()
    new, report = fv_compile.rewrite_attention(gm, x, t, attention_backend="TORCH_SDPA")
    assert [s.status for s in report.sites] == ["rewritten"] * 4
    assert [s.module_path for s in report.sites] == ["blocks.0", "blocks.0", "blocks.1", "blocks.1"]
    with torch.no_grad():
        torch.testing.assert_close(new(x, t), net(x, t), atol=1e-5, rtol=1e-5)
    assert "fv_compile.attention" not in gm.code


def test_symbolic_trace_bias_scaled_by_a_traced_number_is_rewritten():
    """symbolic_trace records `alpha=q.shape[-1] ** -0.5` as a node holding a number; reading the
    sign of the bias term once called float() on that node and raised TypeError."""

    class BiasScaledByHeadDim(torch.nn.Module):
        def forward(self, q, k, v, bias):
            s = torch.add(q @ k.transpose(-2, -1), bias, alpha=q.shape[-1] ** -0.5)
            return s.softmax(-1) @ v

    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    bias = torch.randn(1, 4, 6, 6)
    model = BiasScaledByHeadDim()
    new, report = fv_compile.rewrite_attention(
        torch.fx.symbolic_trace(model), q, k, v, bias, attention_backend="TORCH_SDPA"
    )
    assert [s.status for s in report.sites] == ["rewritten"]
    torch.testing.assert_close(new(q, k, v, bias), model(q, k, v, bias), atol=1e-5, rtol=1e-5)


def test_rewrite_attention_leaves_the_traced_module_as_it_was(net):
    gm = torch.fx.symbolic_trace(net)
    before = [(n.name, dict(n.meta)) for n in gm.graph.nodes]
    fv_compile.rewrite_attention(gm, *inputs(), attention_backend="TORCH_SDPA")
    fv_compile.find_attention_sites(gm, *inputs())
    assert [(n.name, dict(n.meta)) for n in gm.graph.nodes] == before  # no example values written


def test_gqa_causal_gradients_match_eager():
    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    q = torch.randn(2, 4, 6, 8, requires_grad=True)
    k = torch.randn(2, 2, 6, 8, requires_grad=True)
    v = torch.randn(2, 2, 6, 8, requires_grad=True)

    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return attn(q, k, v)

    cm = fv_compile.compile(Attn(), "TORCH_SDPA", compiler="aot_eager")
    got = torch.autograd.grad(cm(q, k, v).sum(), (q, k, v))
    want = torch.autograd.grad(attn(q, k, v).sum(), (q, k, v))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert cm.explain().sites[0].status == "rewritten"


def test_fastvideo_backend_without_implementation_says_how_to_register(net):
    with pytest.raises(FvCompileError, match="register_backend\\('VMOBA_ATTN'"):
        fv_compile.compile(net, "vmoba_attn")


def test_regional_compile_compiles_the_block_once_and_leaves_the_model_alone(net):
    from torch._dynamo.utils import counters

    x, t = inputs()
    counters.clear()
    cm = fv_compile.compile(net, "TORCH_SDPA", compiler="aot_eager", regional=True)
    with torch.no_grad():
        torch.testing.assert_close(cm(x, t), net(x, t), atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    report = cm.explain()  # the one graph's sites, once per block that ran it
    assert cm.regions == ["blocks"] and report.graphs == 1
    assert [(s.module_path, s.role) for s in report.sites] == [
        ("blocks.0", "self"),
        ("blocks.0", "cross"),
        ("blocks.1", "self"),
        ("blocks.1", "cross"),
    ]
    assert all(type(b) is Block for b in net.blocks)


def test_regional_blocks_announce_their_index_while_they_run(net):
    from fv_compile.regional import current_block

    seen = []
    cm = fv_compile.compile(net, "TORCH_SDPA", compiler="eager", regional=True)
    blocks = cm._compiled.blocks
    for b in blocks:
        b.register_forward_hook(lambda m, a, o: seen.append(current_block()), prepend=True)
    with torch.no_grad():
        cm(*inputs())
    assert seen == list(range(len(net.blocks))) and current_block() is None
    with pytest.raises(TypeError):
        blocks[1](torch.randn(1, 3, 7))  # a failing call (no text) leaves no index behind
    assert current_block() is None


def test_regional_compile_without_repeated_blocks_is_an_error():
    with pytest.raises(FvCompileError, match="no repeated blocks"):
        fv_compile.compile(Block(), regional=True)


def test_dynamic_shapes_leave_sites_alone_with_a_reason(net):
    x, t = inputs()
    cm = fv_compile.compile(net, "TORCH_SDPA", compiler="eager", dynamic=True)
    with torch.no_grad():
        torch.testing.assert_close(cm(x, t), net(x, t))
    report = cm.explain()
    assert report.sites and all(s.status == "skipped" for s in report.sites)
    assert all("dynamic" in s.reason or "symbolic" in s.reason for s in report.sites)


class ReversingImpl(fv_compile.AttentionImpl):
    """Reverses the token order before attention and restores it after: invisible in the output."""

    seen: ClassVar[list] = []

    def __init__(self, num_heads, head_size, softmax_scale, causal=False, **kw):
        self.scale = softmax_scale

    def preprocess_qkv(self, qkv, md):
        type(self).seen.append(tuple(qkv.shape))
        return qkv.flip(1)

    def postprocess_output(self, out, md):
        return out.flip(1)

    def forward(self, q, k, v, md):
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=self.scale
        )
        return o.transpose(1, 2)


class PerTensorImpl(ReversingImpl):
    seen: ClassVar[list] = []
    stacked_preprocess = False


def _reversing_backend(impl):
    class Backend(NarrowBackend):
        @staticmethod
        def get_impl_cls():
            return impl

        @staticmethod
        def get_supported_head_sizes():
            return None

    return Backend


fv_compile.register_backend("test_reverse_stacked", _reversing_backend(ReversingImpl))
fv_compile.register_backend("test_reverse_per_tensor", _reversing_backend(PerTensorImpl))


class SelfAttention(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize(
    "name,impl,calls",
    [
        ("test_reverse_stacked", ReversingImpl, [(6, 5, 2, 8)]),
        ("test_reverse_per_tensor", PerTensorImpl, [(2, 5, 2, 8)] * 3),
    ],
)
def test_preprocess_gets_stacked_qkv_unless_the_impl_opts_out(name, impl, calls):
    q, k, v = (torch.randn(2, 2, 5, 8) for _ in range(3))
    impl.seen.clear()
    cm = fv_compile.compile(SelfAttention(), name, compiler="eager", strict=True)
    with torch.no_grad():
        out = cm(q, k, v)
    torch.testing.assert_close(out, SelfAttention()(q, k, v), atol=1e-5, rtol=1e-5)
    assert impl.seen == calls
