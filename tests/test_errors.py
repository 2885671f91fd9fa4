"""docs/errors.md, row by row: each error is raised with its documented message and leaves the
user's model and the backend registry as they were; and the page agrees with the code."""

from __future__ import annotations

import ast
import copy
import dataclasses
import pathlib
import pickle
import re
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import fv_compile
from fv_compile import FastVideoArgs, ForwardBatch, FvCompileError
from fv_compile.backends import registry
from fv_compile.backends.sdpa import SDPABackend, SDPAImpl
from tests.test_sliding_tile import GRID, TILE, VideoDiT

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "errors.md"
PACKAGE = ROOT / "fv_compile"
NOT_SCANNED = ("fv_compile/report/", "fv_compile/cli.py")  # argparse errors of the report command
FAMILY = {"FvCompileError", "FvCompileTypeError", "MissingDependency", "NotSupportedByBackend"}
BUILTIN = {
    "ValueError",
    "TypeError",
    "RuntimeError",
    "ImportError",
    "NotImplementedError",
    "KeyError",
    "IndexError",
}


# -- the page --------------------------------------------------------------------------------------


@dataclass
class Row:
    key: str  # the id, or for an internal check its file
    when: str
    message: str  # the message start, `{…}` for run-time values

    def regex(self, anchored_in_code: bool = False) -> str:
        chunks = [re.escape(_squash(c)) for c in self.message.split("{…}")]
        body = ".*?".join(chunks)
        return r"(?:^|\x00)" + body if anchored_in_code else body


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def _rows() -> tuple[dict[str, Row], list[Row]]:
    """(error rows by id, internal-check rows) of docs/errors.md."""
    errors: dict[str, Row] = {}
    internal: list[Row] = []
    for line in DOC.read_text().splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) in (3, 4), f"a row of docs/errors.md does not have 3 or 4 cells: {line}"
        key = cells[0].strip("`")
        if key.startswith("fv_compile/"):
            message = (
                cells[1][1:-1] if cells[1].startswith("`") and cells[1].count("`") == 2 else ""
            )
            internal.append(Row(key, cells[2], message))
        else:
            assert cells[2].startswith("`") and cells[2].endswith("`"), (
                f"message not quoted: {line}"
            )
            assert key not in errors, f"id {key} twice in docs/errors.md"
            errors[key] = Row(key, cells[1], cells[2][1:-1])
    return errors, internal


ROWS, INTERNAL = _rows()


# -- the code ------------------------------------------------------------------------------------


def _render(node: ast.AST) -> list[str]:
    """The string literals under `node` in source order, f-string fields as `{…}`."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return ["".join(v.value if isinstance(v, ast.Constant) else "{…}" for v in node.values)]
    return [text for child in ast.iter_child_nodes(node) for text in _render(child)]


@dataclass
class Raise:
    file: str
    line: int
    cls: str
    texts: list[str]

    def joined(self) -> str:
        return "\x00".join(_squash(t) for t in self.texts)


def _code_raises() -> list[Raise]:
    """Every FvCompileError-family construction and every `raise <built-in>(...)` in fv_compile,
    with the text its message is made of (module constants and methods it calls included)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(NOT_SCANNED):
            continue
        tree = ast.parse(path.read_text())
        named: dict[str, ast.AST] = {}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                named.setdefault(node.name, node)
        for node in tree.body:
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        named[target.id] = node.value
        raised_builtins = {
            id(n.exc)
            for n in ast.walk(tree)
            if isinstance(n, ast.Raise) and isinstance(n.exc, ast.Call)
        }
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args):
                continue
            cls = node.func.id
            if cls not in FAMILY and not (cls in BUILTIN and id(node) in raised_builtins):
                continue
            message = node.args[0]
            texts = _render(message)
            for sub in ast.walk(
                message
            ):  # `_MISSING_CONTEXT.format(...)`, `self._length_error(...)`
                name = (
                    sub.id
                    if isinstance(sub, ast.Name)
                    else sub.attr
                    if isinstance(sub, ast.Attribute)
                    else None
                )
                if name in named:
                    texts += [re.sub(r"\{[a-z_]+\}", "{…}", t) for t in _render(named[name])]
            found.append(Raise(rel, node.lineno, cls, texts))
    return found


RAISES = _code_raises()


def test_every_documented_message_is_one_the_code_makes():
    family = [r for r in RAISES if r.cls in FAMILY]
    for row in ROWS.values():
        pattern = re.compile(row.regex(anchored_in_code=True), re.DOTALL)
        assert any(pattern.search(r.joined()) for r in family), (
            f"docs/errors.md `{row.key}`: no code makes {row.message!r}"
        )


def test_every_error_the_code_can_raise_is_documented():
    patterns = [re.compile(row.regex(anchored_in_code=True), re.DOTALL) for row in ROWS.values()]
    missing = [
        f"{r.file}:{r.line} {r.texts[:1]}"
        for r in RAISES
        if r.cls in FAMILY and not any(p.search(r.joined()) for p in patterns)
    ]
    assert not missing, (
        "errors missing from docs/errors.md (add a row: id, when, message start, fix; and a case "
        "here that triggers it):\n" + "\n".join(missing)
    )


def test_built_in_exceptions_are_raised_only_by_documented_internal_checks():
    folders = [row.key for row in INTERNAL if row.key.endswith("/")]
    checks = [row for row in INTERNAL if not row.key.endswith("/")]
    undocumented = []
    for r in RAISES:
        if r.cls not in BUILTIN or r.file.startswith(tuple(folders)):
            continue
        pattern_ok = any(
            row.key == r.file and re.search(row.regex(anchored_in_code=True), r.joined(), re.DOTALL)
            for row in checks
        )
        if not pattern_ok:
            undocumented.append(f"{r.file}:{r.line} {r.cls} {r.texts[:1]}")
    assert not undocumented, (
        "built-in exceptions on a user path (make them FvCompileError, or document them as internal "
        "checks in docs/errors.md):\n" + "\n".join(undocumented)
    )
    for row in checks:
        here = [r for r in RAISES if r.file == row.key and r.cls in BUILTIN]
        assert any(re.search(row.regex(True), r.joined(), re.DOTALL) for r in here), (
            f"stale internal row {row}"
        )


def test_every_documented_error_has_a_case_here():
    cased = {case.split("/")[0] for case in CASES}
    assert not set(ROWS) - cased, (
        f"rows of docs/errors.md without a case here: {sorted(set(ROWS) - cased)}"
    )
    assert not cased - set(ROWS), (
        f"cases here for no row of docs/errors.md: {sorted(cased - set(ROWS))}"
    )


# -- what must not change ----------------------------------------------------------------------------


def snapshot(model: torch.nn.Module) -> dict[str, Any]:
    """Everything of `model` an error must leave alone: tensors (identity and values), the module
    tree, forward on the class and on every instance, hooks, modes."""
    return {
        "params": [
            (n, p, p.detach().clone(), p.requires_grad, p.grad)
            for n, p in model.named_parameters(remove_duplicate=False)
        ],
        "buffers": [(n, b, b.clone()) for n, b in model.named_buffers(remove_duplicate=False)],
        "modules": [
            (n, m, type(m), m.training, m.__dict__.get("forward"), type(m).forward)
            for n, m in model.named_modules(remove_duplicate=False)
        ],
        "class_forward": type(model).forward,
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
        "attributes": sorted(model.__dict__),
    }


def assert_unchanged(model: torch.nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    assert [n for n, *_ in after["params"]] == [n for n, *_ in before["params"]]
    for (name, p, value, grad_flag, grad), (_, p2, _, grad_flag2, grad2) in zip(
        before["params"], after["params"]
    ):
        assert p2 is p, f"parameter {name} was replaced"
        assert _same(p.detach(), value), f"parameter {name} changed"
        assert (grad_flag2, grad2) == (grad_flag, grad), (
            f"parameter {name}: requires_grad or .grad changed"
        )
    assert [n for n, *_ in after["buffers"]] == [n for n, *_ in before["buffers"]]
    for (name, b, value), (_, b2, _) in zip(before["buffers"], after["buffers"]):
        assert b2 is b and _same(b, value), f"buffer {name} changed"
    assert [(n, id(m), *rest) for n, m, *rest in after["modules"]] == [
        (n, id(m), *rest) for n, m, *rest in before["modules"]
    ], "the module tree (or a module's forward or mode) changed"
    assert after["class_forward"] is before["class_forward"]
    assert after["hooks"] == before["hooks"] and after["attributes"] == before["attributes"]


CHANGES = {
    "parameter value": lambda m: m.blocks[0].qkv.weight.data.add_(1),
    "parameter replaced": lambda m: setattr(
        m.blocks[0].qkv, "weight", torch.nn.Parameter(m.blocks[0].qkv.weight.clone())
    ),
    "parameter grad": lambda m: setattr(
        m.blocks[0].qkv.weight, "grad", torch.zeros_like(m.blocks[0].qkv.weight)
    ),
    "buffer value": lambda m: m.scale.mul_(2),
    "module replaced": lambda m: setattr(m.blocks[1], "out", torch.nn.Linear(32, 32)),
    "instance forward": lambda m: setattr(m.blocks[0], "forward", lambda x, mask=None: x),
    "hook": lambda m: m.register_forward_hook(lambda *a: None),
    "mode": lambda m: m.blocks[0].train(),
    "attribute": lambda m: setattr(m, "_orig_mod", None),
    "class forward": lambda m: setattr(type(m), "forward", lambda self, x, mask=None: x),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_the_unchanged_check_notices_each_kind_of_change(change):
    net = type("Watched", (Net,), {})().eval()  # a class of its own: "class forward" patches it
    before = snapshot(net)
    CHANGES[change](net)
    with pytest.raises(AssertionError):
        assert_unchanged(net, before)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and bool(((a == b) | (a.isnan() & b.isnan())).all())
    )


def registry_snapshot() -> dict[str, Any]:
    names = registry.available_backends()
    return {
        "names": names,
        "classes": {n: registry.get_backend(n) for n in names},
        "user": dict(registry._USER),
    }


# -- models --------------------------------------------------------------------------------------


class Block(torch.nn.Module):
    """Self-attention through SDPA (optionally masked)."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        b, s, c = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, c // self.heads).transpose(1, 3).unbind(2)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return x + self.out(a.transpose(1, 2).reshape(b, s, c))


class Net(torch.nn.Module):
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block(dim, heads) for _ in range(2))
        self.register_buffer("scale", torch.ones(dim))

    def forward(self, x, mask=None):
        for blk in self.blocks:
            x = blk(x, mask)
        return x * self.scale


class GraphBreakNet(Net):
    def forward(self, x, mask=None):
        x = self.blocks[0](x, mask)
        torch._dynamo.graph_break()
        return self.blocks[1](x, mask)


class Outer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = Net()

    def forward(self, x):
        return self.body(x)


class TimedDiT(VideoDiT):
    def forward(self, x, timestep):
        return super().forward(x)


def x_in(dim=32, dtype=torch.float32):
    return torch.randn(2, 12, dim, dtype=dtype)


def video():
    return torch.randn(1, GRID[0] * GRID[1] * GRID[2], 32)


def sta_args(**kw):
    kw.setdefault("patch_size", (1, 1, 1))
    return FastVideoArgs(sta_tile_size=TILE, **kw)


def sta_batch(grid=GRID):
    return ForwardBatch(raw_latent_shape=(1, 4, *grid))


def quiet(fn: Callable[[], Any]) -> Callable[[], Any]:
    """`fn` without grad and with fallback warnings silenced."""

    def run():
        import warnings

        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn()

    return run


def in_context(cm, x, step=0, batch=None, args=None):
    def run():
        with fv_compile.forward_context(step, sta_batch() if batch is None else batch, args):
            return cm(x)

    return quiet(run)


# -- test backends (registered per test through monkeypatch, so the registry is restored) ---------


class _MetaImpl(SDPAImpl):
    pass


def backend_with(builder_build=None, impl_cls=_MetaImpl, name="TEST_ERR"):
    class Builder(fv_compile.AttentionMetadataBuilder):
        def build(self, current_timestep, forward_batch, fastvideo_args):
            return builder_build(current_timestep, forward_batch, fastvideo_args)

    class Backend(SDPABackend):
        @staticmethod
        def get_name():
            return name

        @staticmethod
        def get_impl_cls():
            return impl_cls

        @staticmethod
        def get_builder_cls():
            return Builder if builder_build is not None else None

    return Backend


@dataclass
class SetMetadata(fv_compile.AttentionMetadata):
    layers: set = dataclasses.field(default_factory=set)  # not a pytree node, and unhashable


@dataclass(slots=True)
class SlotMetadata:
    current_timestep: int


class ShortImpl(SDPAImpl):
    def forward(self, q, k, v, md):
        return super().forward(q, k, v, md)[:, :1]


class RefusingImpl(SDPAImpl):
    def __init__(self, *args, **kwargs):
        raise RuntimeError("this backend takes no site today")


# -- one case per row: (model to watch, the call that must raise[, further checks]) ---------------

Case = Callable[[pytest.MonkeyPatch], tuple]
CASES: dict[str, Case] = {}


def case(key: str):
    def register(fn: Case) -> Case:
        assert key not in CASES
        CASES[key] = fn
        return fn

    return register


# compile(), explain(), verify() arguments


@case("not-a-module/compile")
def _(mp):
    return Net(), lambda: fv_compile.compile(lambda x: x)


@case("not-a-module/explain")
def _(mp):
    return Net(), lambda: fv_compile.explain(lambda x: x, x_in())


@case("not-a-module/verify")
def _(mp):
    return Net(), lambda: fv_compile.verify(lambda x: x, x_in())


@case("already-compiled")
def _(mp):
    net = Net()
    cm = fv_compile.compile(net, compiler="eager")
    return net, lambda: fv_compile.compile(cm)


@case("regional-value")
def _(mp):
    net = Net()
    return net, lambda: fv_compile.compile(net, regional="blocks")


@case("accuracy-budget")
def _(mp):
    net = Net()
    return net, lambda: fv_compile.compile(net, accuracy_budget=2)


@case("accuracy-budget/torch-compile-option")
def _(mp):
    gm = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())

    def trigger():
        return fv_compile.fv_compile_backend(gm, [], options={"accuracy_budget": "2%"})

    return Net(), trigger


def _one_rank_group(call):
    """`call()` inside a one-process gloo group, torn down after."""
    import torch.distributed as dist

    def trigger():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        try:
            return call()
        finally:
            dist.destroy_process_group()

    return trigger


@case("sp-value")
def _(mp):
    net = Net()
    return net, lambda: fv_compile.compile(net, sequence_parallel="ulysses")


@case("sp-no-group")
def _(mp):
    net = Net()
    return net, lambda: fv_compile.compile(net, sequence_parallel=2)


@case("sp-degree")
def _(mp):
    net = Net()
    return net, _one_rank_group(lambda: fv_compile.compile(net, sequence_parallel=2))


@case("sp-heads")
def _(mp):
    from fv_compile.distributed.ulysses import SequenceParallel

    net = Net()  # 4 heads
    mp.setattr(fv_compile.api, "resolve_sequence_parallel", lambda _: SequenceParallel("g", 3, 0))
    cm = fv_compile.compile(net, "TORCH_SDPA", compiler="eager", sequence_parallel=3)
    return net, lambda: quiet(lambda: cm(x_in()))(), lambda e: "(1, 2, 4)" in str(e)


@case("sp-device")
def _(mp):
    from fv_compile.distributed.ulysses import SequenceParallel

    net = Net()  # on the CPU, the group's collectives NCCL's
    group = SequenceParallel("g", 1, 0, "nccl")
    mp.setattr(fv_compile.api, "resolve_sequence_parallel", lambda _: group)
    cm = fv_compile.compile(net, "TORCH_SDPA", compiler="eager", sequence_parallel=1)
    return (
        net,
        lambda: quiet(lambda: cm(x_in()))(),
        lambda e: "init_process_group('gloo')" in str(e),
    )


@case("sp-inference")
def _(mp):
    net = Net()

    def call():
        cm = fv_compile.compile(net, "TORCH_SDPA", compiler="eager", sequence_parallel=1)
        return cm(x_in())

    return net, _one_rank_group(call)  # with gradients on: the weights train


@case("option-unknown/torch-compile")
def _(mp):
    gm = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())

    def trigger():
        return fv_compile.fv_compile_backend(gm, [], options={"attention_backnd": "TORCH_SDPA"})

    return (
        Net(),
        trigger,
        lambda e: "did you mean 'attention_backend'" in str(e) and "compiler, strict" in str(e),
    )


@case("option-unknown/compile")
def _(mp):
    net = Net()
    return (
        net,
        lambda: fv_compile.compile(net, options={"max_autotun": True}),
        lambda e: "'max_autotune'" in str(e),
    )


@case("option-is-an-argument")
def _(mp):
    net = Net()
    return net, lambda: fv_compile.compile(net, options={"attention_backend": "TORCH_SDPA"})


@case("backend-kwarg")
def _(mp):
    net = Net()
    return net, lambda: fv_compile.compile(net, backend="inductor")


@case("compiler")
def _(mp):
    net = Net()
    return net, lambda: fv_compile.compile(net, compiler="tvm")


@case("unknown-backend/name")
def _(mp):
    net = Net()
    return net, lambda: fv_compile.compile(net, "NOT_A_BACKEND")


@case("unknown-backend/policy-value")
def _(mp):
    net = Net()
    return net, lambda: fv_compile.compile(net, {"self": "TORCH_SPDA"})


@case("unknown-backend/callable-returns-it")
def _(mp):
    """Raised while Dynamo compiles: fv_compile's error, not Dynamo's BackendCompilerFailed."""
    net = Net()
    cm = fv_compile.compile(net, lambda site: "NOT_A_BACKEND", compiler="eager")
    return net, quiet(lambda: cm(x_in())), lambda err: type(err) is FvCompileError


@case("fastvideo-only-backend")
def _(mp):
    net = Net()
    return net, lambda: fv_compile.compile(net, "VMOBA_ATTN")


@case("unknown-role")
def _(mp):
    net = Net()
    return net, lambda: fv_compile.compile(net, {"video": "TORCH_SDPA"})


@case("policy-names-a-site")
def _(mp):
    net = Net()
    return (
        net,
        lambda: fv_compile.compile(net, {"blocks.0.attn": "TORCH_SDPA"}),
        lambda err: "blocks.0.attn" in str(err),
    )


@case("policy-type")
def _(mp):
    net = Net()
    return net, lambda: fv_compile.compile(net, 3)


@case("backend-name-type/policy-value")
def _(mp):
    net = Net()
    return net, lambda: fv_compile.compile(net, {"self": 3})


@case("backend-name-type/callable-returns-it")
def _(mp):
    net = Net()
    cm = fv_compile.compile(net, lambda site: None, compiler="eager")
    return net, quiet(lambda: cm(x_in()))


@case("regional-no-blocks")
def _(mp):
    block = Block()
    return block, lambda: fv_compile.compile(block, regional=True)


@case("fastvideo-args-dict")
def _(mp):
    net = Net()
    return net, lambda: fv_compile.compile(net, fastvideo_args={"sta_window": (3, 3, 3)})


@case("sta-window")
def _(mp):
    net = Net()
    return net, lambda: fv_compile.compile(net, fastvideo_args=FastVideoArgs(sta_window=(3, 3)))


@case("sta-dense-steps")
def _(mp):
    net = Net()
    return net, lambda: fv_compile.compile(net, fastvideo_args=FastVideoArgs(sta_dense_steps=-1))


@case("sta-token-order")
def _(mp):
    net = Net()
    return net, lambda: fv_compile.compile(
        net, fastvideo_args=FastVideoArgs(sta_token_order="model")
    )


@case("patch-size-contradicts")
def _(mp):
    net = Net()
    net.config = types.SimpleNamespace(patch_size=(1, 2, 2))
    return net, lambda: fv_compile.compile(net, fastvideo_args=FastVideoArgs(patch_size=(1, 1, 1)))


@case("patch-size-not-settable")
def _(mp):
    class SlotArgs:
        __slots__ = ("sta_window",)

        def __init__(self):
            self.sta_window = (3, 3, 3)

    net = Net()
    net.config = types.SimpleNamespace(patch_size=(1, 2, 2))
    return net, lambda: fv_compile.compile(net, fastvideo_args=SlotArgs())


# register_backend


@case("register-name")
def _(mp):
    return Net(), lambda: fv_compile.register_backend("", SDPABackend)


@case("register-class")
def _(mp):
    return Net(), lambda: fv_compile.register_backend("NOT_A_CLASS", object)


# the first call


def _strict(net, backend, x):
    cm = fv_compile.compile(net, backend, compiler="eager", strict=True, regional=False)
    return net, quiet(lambda: cm(x))


@case("strict-unsupported/head-size")
def _(mp):
    return (*_strict(Net(), "TRITON_ATTN", x_in()), lambda err: "head dim 8" in str(err))


@case("strict-unsupported/dtype")
def _(mp):
    return (
        *_strict(Net(128, 2).double(), "TRITON_ATTN", x_in(128, torch.float64)),
        lambda err: "dtype float64" in str(err),
    )


@case("strict-unsupported/device")
def _(mp):
    mp.setenv("TRITON_INTERPRET", "0")  # a CPU without the interpreter: the kernel cannot run here
    return (
        *_strict(Net(128, 2), "TRITON_ATTN", x_in(128)),
        lambda err: "device cpu (needs CUDA)" in str(err),
    )


@case("strict-unsupported/flash-attn-missing")
def _(mp):
    from fv_compile.backends.flash_attn import flash_kernel

    if flash_kernel() is not None:
        pytest.skip("flash-attn is installed here")
    return (
        *_strict(Net(128, 2), "FLASH_ATTN", x_in(128)),
        lambda err: "pip install flash-attn-4" in str(err),
    )


@case("strict-refused")
def _(mp):
    mp.setitem(registry._USER, "TEST_REFUSING", backend_with(impl_cls=RefusingImpl))
    net = Net()
    cm = fv_compile.compile(net, "TEST_REFUSING", compiler="eager", strict=True)
    return net, quiet(lambda: cm(x_in())), lambda err: "takes no site today" in str(err)


@case("policy-raised")
def _(mp):
    net = Net()
    cm = fv_compile.compile(net, lambda site: {}[site.role], compiler="eager")
    return net, quiet(lambda: cm(x_in())), lambda err: isinstance(err.__cause__, KeyError)


@case("untraceable")
def _(mp):
    net = GraphBreakNet()
    cm = fv_compile.compile(net, "TORCH_SDPA", compiler="eager", regional=False, fullgraph=True)
    line = f"test_errors.py:{GraphBreakNet.forward.__code__.co_firstlineno + 2}"
    return (
        net,
        quiet(lambda: cm(x_in())),
        lambda err: line in str(err) and "graph_break()" in str(err),
    )


@case("dtype-mismatch/whole-model")
def _(mp):
    net = Net()
    cm = fv_compile.compile(net, "TORCH_SDPA", compiler="eager", regional=False)
    return (
        net,
        quiet(lambda: cm(x_in(dtype=torch.bfloat16))),
        lambda err: "`x` (bfloat16)" in str(err),
    )


@case("dtype-mismatch/eager-code-between-blocks")
def _(mp):
    from fv_compile.models import build_model, example_inputs

    model = build_model("wan-tiny")
    args, kwargs = example_inputs(model, dtype=torch.bfloat16)
    cm = fv_compile.compile(
        model, "TORCH_SDPA", compiler="eager"
    )  # regional: patch_embed runs eagerly
    assert cm.regions
    return (
        model,
        quiet(lambda: cm(*args, **kwargs)),
        lambda err: "`latent` (bfloat16)" in str(err) and "float32" in str(err),
    )


@case("dtype-mismatch/explain")
def _(mp):
    net = Net()
    return net, quiet(lambda: fv_compile.explain(net, x_in(dtype=torch.bfloat16)))


# every call: the forward context and metadata


@case("missing-context")
def _(mp):
    model = VideoDiT()
    opts = {"attention_backend": "SLIDING_TILE_ATTN", "compiler": "eager"}
    compiled = torch.compile(model, backend="fv_compile", options=opts)
    return model, quiet(lambda: compiled(video()))


class CheckpointedDiT(VideoDiT):
    """VideoDiT with each block under torch.utils.checkpoint, as diffusers' gradient
    checkpointing runs them: the backward recomputes each block's forward."""

    def forward(self, x, text=None, masks=None):
        for blk in self.blocks:
            x = x + torch.utils.checkpoint.checkpoint(blk, x, None, use_reentrant=False)
        return x


@case("recomputed-without-context")
def _(mp):
    model = CheckpointedDiT()
    args = sta_args(sta_window=(1, 1, 1))
    cm = fv_compile.compile(model, "SLIDING_TILE_ATTN", compiler="eager", fastvideo_args=args)
    x = video().requires_grad_()

    def trigger():
        with fv_compile.forward_context(
            current_timestep=0, forward_batch=sta_batch(), fastvideo_args=args
        ):
            out = cm(x)
        torch.autograd.grad(out.sum(), x)  # (no parameter's .grad is written)

    return model, trigger


@case("verify-needs-context")
def _(mp):
    model = VideoDiT()
    return model, quiet(
        lambda: fv_compile.verify(model, video(), attention_backend="SLIDING_TILE_ATTN")
    )


@case("no-timestep")
def _(mp):
    model = VideoDiT()
    cm = fv_compile.compile(
        model, "SLIDING_TILE_ATTN", compiler="eager", fastvideo_args=sta_args(sta_window=(2, 1, 2))
    )
    return model, quiet(lambda: cm(video()))


@case("empty-timestep")
def _(mp):
    model = TimedDiT()
    cm = fv_compile.compile(
        model, "SLIDING_TILE_ATTN", compiler="eager", fastvideo_args=sta_args(sta_window=(2, 1, 2))
    )
    return model, quiet(lambda: cm(video(), torch.tensor([])))


@case("no-latent-shape")
def _(mp):
    model = VideoDiT()
    cm = fv_compile.compile(model, "SLIDING_TILE_ATTN", compiler="eager")
    return model, in_context(cm, video(), batch=ForwardBatch(), args=sta_args(sta_window=(2, 1, 2)))


@case("patch-indivisible")
def _(mp):
    model = VideoDiT()
    cm = fv_compile.compile(model, "SLIDING_TILE_ATTN", compiler="eager")
    return model, in_context(cm, video(), args=sta_args(patch_size=(1, 2, 2), sta_window=(2, 1, 2)))


@case("sequence-vs-grid")
def _(mp):
    model = VideoDiT()
    cm = fv_compile.compile(model, "SLIDING_TILE_ATTN", compiler="eager")
    stale = sta_batch(
        (GRID[0], GRID[1], GRID[2] - 1)
    )  # one column short: 280 grid tokens, 315 in the site
    return (
        model,
        in_context(cm, video(), batch=stale, args=sta_args(sta_window=(2, 1, 2))),
        lambda err: "315 tokens" in str(err) and "raw_latent_shape" in str(err),
    )


@case("no-windows")
def _(mp):
    model = VideoDiT()
    cm = fv_compile.compile(model, "SLIDING_TILE_ATTN", compiler="eager")
    return model, in_context(cm, video(), args=sta_args())


@case("patch-size-unknown")
def _(mp):
    model = VideoDiT()
    cm = fv_compile.compile(model, "SLIDING_TILE_ATTN", compiler="eager")
    args = types.SimpleNamespace(
        sta_window=(2, 1, 2), sta_tile_size=TILE
    )  # FastVideo-like, no patch size
    return model, in_context(cm, video(), args=args)


@case("sta-kernel-name")
def _(mp):
    model = VideoDiT()
    cm = fv_compile.compile(model, "SLIDING_TILE_ATTN", compiler="eager")
    return model, in_context(cm, video(), args=sta_args(sta_window=(2, 1, 2), sta_kernel="cuda"))


@case("sta-token-order-name")
def _(mp):
    model = VideoDiT()
    cm = fv_compile.compile(model, "SLIDING_TILE_ATTN", compiler="eager")
    return model, in_context(
        cm, video(), args=sta_args(sta_window=(2, 1, 2), sta_token_order="model")
    )


@case("sta-kernel-fa4-missing")
def _(mp):
    from fv_compile.backends.kernels.fa4_block_sparse import fa4_block_sparse

    if fa4_block_sparse() is not None:
        pytest.skip("flash-attn-4 is installed here")
    model = VideoDiT()
    cm = fv_compile.compile(model, "SLIDING_TILE_ATTN", compiler="eager")
    return model, in_context(
        cm, video(), args=sta_args(sta_window=(2, 1, 2), sta_kernel="flash_attn")
    )


@case("sta-kernel-fa4-cannot-run")
def _(mp):
    from fv_compile.backends import sliding_tile

    mp.setattr(
        sliding_tile, "fa4_block_sparse", lambda: object()
    )  # as if flash-attn-4 were installed
    model = VideoDiT()
    cm = fv_compile.compile(model, "SLIDING_TILE_ATTN", compiler="eager")
    return model, in_context(
        cm, video(), args=sta_args(sta_window=(2, 1, 2), sta_kernel="flash_attn")
    )


def _metadata_case(mp, build, *, mask=False):
    mp.setitem(registry._USER, "TEST_ERR", backend_with(build))
    net = Net()
    cm = fv_compile.compile(net, "TEST_ERR", compiler="eager")
    m = torch.ones(12, 12, dtype=torch.bool).tril() if mask else None
    return net, quiet(lambda: _call_in_context(cm, x_in(), m))


def _call_in_context(cm, x, mask):
    with fv_compile.forward_context(0):
        return cm(x, mask)


@case("builder-raised")
def _(mp):
    def build(step, batch, args):
        return {"windows": batch.STA_windows}  # a field this ForwardBatch does not have

    net, run = _metadata_case(mp, build)
    return (
        net,
        run,
        lambda err: isinstance(err.__cause__, AttributeError) and "TEST_ERR" in str(err),
    )


@case("metadata-not-dataclass")
def _(mp):
    return _metadata_case(mp, lambda step, batch, args: {"current_timestep": step})


@case("metadata-unhashable")
def _(mp):
    return _metadata_case(mp, lambda step, batch, args: SetMetadata(step, {1, 2}))


@case("metadata-no-mask-field")
def _(mp):
    return _metadata_case(mp, lambda step, batch, args: SlotMetadata(step), mask=True)


@case("backend-output-shape")
def _(mp):
    mp.setitem(registry._USER, "TEST_SHORT", backend_with(impl_cls=ShortImpl))
    net = Net()
    cm = fv_compile.compile(net, "TEST_SHORT", compiler="eager")
    return net, quiet(lambda: cm(x_in()))


@case("forward-only-backward")
def _(mp):
    model = VideoDiT().requires_grad_(False)
    cm = fv_compile.compile(model, "SLIDING_TILE_ATTN", compiler="eager")
    x = video().requires_grad_(True)

    def run():
        with fv_compile.forward_context(0, sta_batch(), sta_args(sta_window=(2, 1, 2))):
            out = cm(x)
        out.sum().backward()

    return model, run, lambda err: isinstance(err, NotImplementedError)


@case("own-backward-mask-grad")
def _(mp):
    class OwnBackwardImpl(SDPAImpl):
        def backward(self, grad, query, key, value, attn_metadata):
            return [torch.zeros_like(x) for x in (query, key, value)]

    class OwnBackward(SDPABackend):
        differentiable = False

        @staticmethod
        def get_name() -> str:
            return "OWN_BACKWARD"

        @staticmethod
        def get_impl_cls():
            return OwnBackwardImpl

    class LearnedBias(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.zeros(1, 2, 12, 12))

        def forward(self, x):
            q = x.view(1, 12, 2, 16).transpose(1, 2)
            return F.scaled_dot_product_attention(q, q, q, attn_mask=self.bias)

    mp.setitem(registry._USER, "OWN_BACKWARD", OwnBackward)
    model = LearnedBias()
    cm = fv_compile.compile(model, "OWN_BACKWARD", compiler="eager", strict=True)
    return model, lambda: cm(torch.randn(1, 12, 32)).sum().backward()


# after compile


@case("pickle")
def _(mp):
    net = Net()
    cm = fv_compile.compile(net, compiler="eager")
    return net, lambda: pickle.dumps(cm)


@case("blocks-changed")
def _(mp):
    net = Net()
    cm = fv_compile.compile(net, "TORCH_SDPA", compiler="eager", regional=True)
    quiet(lambda: cm(x_in()))()
    net.blocks[0] = Block()  # the user's change, before the watched call
    return net, quiet(lambda: cm(x_in()))


@case("child-replaced")
def _(mp):
    outer = Outer()
    cm = fv_compile.compile(outer, "TORCH_SDPA", compiler="eager", regional=True)
    quiet(lambda: cm(x_in()))()
    outer.body = Net()
    return outer, quiet(lambda: cm(x_in()))


# backend impls built by hand


@case("flash-attn-missing")
def _(mp):
    from fv_compile.backends.flash_attn import FlashAttentionImpl, flash_kernel

    if flash_kernel() is not None:
        pytest.skip("flash-attn is installed here")
    return Net(), lambda: FlashAttentionImpl(2, 64, 0.125), lambda err: isinstance(err, ImportError)


@case("sta-causal")
def _(mp):
    from fv_compile.backends.sliding_tile import SlidingTileAttentionImpl

    return Net(), lambda: SlidingTileAttentionImpl(2, 64, 0.125, causal=True)


@case("joint-text-len")
def _(mp):
    from fv_compile.backends.sliding_tile import SlidingTileAttentionImpl

    return Net(), lambda: SlidingTileAttentionImpl(2, 64, 0.125, joint_text_len=-1)


def _vsa_model():
    model = VideoDiT()
    return model, fv_compile.compile(model, "VIDEO_SPARSE_ATTN", compiler="eager")


@case("no-latent-shape/vsa")
def _(mp):
    model, cm = _vsa_model()
    return model, in_context(cm, video(), batch=ForwardBatch(), args=sta_args())


@case("text-outgrows-video")
def _(mp):
    model = VideoDiT(text_first=True)
    cm = fv_compile.compile(model, "SLIDING_TILE_ATTN", compiler="eager", regional=False)
    n = GRID[0] * GRID[1] * GRID[2]

    def run():
        with fv_compile.forward_context(0, sta_batch(), sta_args(sta_window=(1, 1, 1))):
            return cm(video(), torch.randn(1, 2 * n, 32))

    return model, quiet(run), lambda err: f"holds {n}, which fits the rest" in str(err)


@case("vsa-sequence-vs-grid")
def _(mp):
    model, cm = _vsa_model()
    stale = sta_batch((GRID[0], GRID[1], GRID[2] - 1))
    return model, in_context(cm, video(), batch=stale, args=sta_args())


@case("vsa-sparsity")
def _(mp):
    model, cm = _vsa_model()
    return model, in_context(cm, video(), args=sta_args(VSA_sparsity=1.5))


@case("empty-schedule")
def _(mp):
    model = VideoDiT()
    cm = fv_compile.compile(model, "SLIDING_TILE_ATTN", compiler="eager")
    batch = ForwardBatch(raw_latent_shape=(1, 4, *GRID), STA_param=[])
    return model, in_context(cm, video(), batch=batch, args=sta_args())


@case("vsa-causal")
def _(mp):
    from fv_compile.backends.video_sparse import VideoSparseAttentionImpl

    return Net(), lambda: VideoSparseAttentionImpl(2, 64, 0.125, causal=True)


@case("vsa-forward-order")
def _(mp):
    from fv_compile.backends.video_sparse import (
        VideoSparseAttentionImpl,
        VideoSparseMetadataBuilder,
    )

    md = VideoSparseMetadataBuilder().build(0, sta_batch(), sta_args())
    q = torch.randn(1, GRID[0] * GRID[1] * GRID[2], 2, 16)
    return Net(), lambda: VideoSparseAttentionImpl(2, 16, 0.25).forward(q, q, q, md)


# reference models


def _zoo(call: Callable[[], Any], check=None):
    return (Net(), call) if check is None else (Net(), call, check)


@case("unknown-preset")
def _(mp):
    from fv_compile.models import build_model

    return _zoo(lambda: build_model("wan-huge"))


@case("video-too-small")
def _(mp):
    from fv_compile.models import example_inputs

    return _zoo(lambda: example_inputs("wan-tiny", frames=1, height=4, width=4))


@case("grid-and-size")
def _(mp):
    from fv_compile.models import example_inputs

    return _zoo(lambda: example_inputs("wan-tiny", grid=(2, 16, 16), frames=5))


@case("not-a-zoo-model")
def _(mp):
    from fv_compile.models import example_inputs

    net = Net()
    net.config = object()
    return net, lambda: example_inputs(net), lambda err: isinstance(err, TypeError)


@case("valid-text-len")
def _(mp):
    from fv_compile.models import example_inputs

    return _zoo(lambda: example_inputs("hunyuan-tiny", valid_text_len=0))


@case("rope-axes")
def _(mp):
    from fv_compile.models.zoo import PRESETS

    return _zoo(lambda: dataclasses.replace(PRESETS["wan-tiny"], rope_axes=(11, 11, 10)))


@case("latent-grid-vs-patch")
def _(mp):
    from fv_compile.models import example_inputs

    return _zoo(lambda: example_inputs("wan-tiny", grid=(2, 15, 16)))


@case("kv-heads")
def _(mp):
    from fv_compile.models.zoo import PRESETS

    return _zoo(lambda: dataclasses.replace(PRESETS["hunyuan-tiny"], num_kv_heads=3))


@case("diffusers-missing")
def _(mp):
    from fv_compile.models.diffusers_zoo import from_diffusers

    mp.setitem(sys.modules, "diffusers", None)  # `import diffusers` raises ImportError
    return _zoo(
        lambda: from_diffusers("WanTransformer3DModel"), lambda err: isinstance(err, ImportError)
    )


@case("diffusers-class")
def _(mp):
    from fv_compile.models.diffusers_zoo import from_diffusers

    return _zoo(lambda: from_diffusers("FluxTransformer2DModel"))


@case("diffusers-preset")
def _(mp):
    from fv_compile.models.diffusers_zoo import from_diffusers

    return _zoo(lambda: from_diffusers("WanTransformer3DModel", "huge"))


@case("diffusers-config-key")
def _(mp):
    pytest.importorskip("diffusers")
    from fv_compile.models.diffusers_zoo import from_diffusers

    return _zoo(
        lambda: from_diffusers("WanTransformer3DModel", config={"num_layer": 1}),
        lambda e: "'num_layers'" in str(e),
    )


@case("diffusers-build")
def _(mp):
    pytest.importorskip("diffusers")
    from fv_compile.models.diffusers_zoo import from_diffusers

    return _zoo(lambda: from_diffusers("WanTransformer3DModel", config={"ffn_dim": -1}))


@case("diffusers-inputs")
def _(mp):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.configuration_utils import register_to_config

    from fv_compile.models.diffusers_zoo import from_diffusers

    class ControlTransformer3DModel(diffusers.ModelMixin, diffusers.ConfigMixin):
        @register_to_config
        def __init__(self, in_channels: int = 4):
            super().__init__()

        def forward(self, hidden_states, control_hidden_states):
            return hidden_states

    mp.setattr(diffusers, "ControlTransformer3DModel", ControlTransformer3DModel, raising=False)
    return _zoo(
        lambda: from_diffusers("ControlTransformer3DModel"),
        lambda e: "'control_hidden_states'" in str(e),
    )


@pytest.mark.parametrize("key", sorted(CASES))
def test_each_documented_error_says_its_message_and_changes_nothing(key, monkeypatch):
    model, trigger, *check = CASES[key](monkeypatch)
    row = ROWS[key.split("/")[0]]
    before, backends = snapshot(model), registry_snapshot()
    with pytest.raises(FvCompileError) as info:
        trigger()
    message = _squash(str(info.value))
    assert re.match(row.regex(), message, re.DOTALL), (
        f"`{row.key}` documents {row.message!r}; got {message!r}"
    )
    if check:
        assert check[0](info.value), f"{key}: {info.value!r}"
    assert_unchanged(model, before)
    assert registry_snapshot() == backends


# -- translations leave every other error alone --------------------------------------------------


def test_an_error_of_the_model_itself_is_raised_as_torch_raised_it():
    net = Net()
    cm = fv_compile.compile(net, "TORCH_SDPA", compiler="eager", regional=False)
    with pytest.raises(torch._dynamo.exc.TorchRuntimeError) as info:
        quiet(lambda: cm(torch.randn(2, 12, 31)))()  # a width the model's Linear does not take
    assert not isinstance(info.value, FvCompileError)


def test_a_dtype_error_inside_the_model_is_not_blamed_on_the_inputs():
    class HalfInside(Net):
        def forward(self, x, mask=None):
            return self.blocks[0].qkv(x.to(torch.bfloat16))  # the model's own cast, fp32 inputs

    net = HalfInside()
    cm = fv_compile.compile(net, "TORCH_SDPA", compiler="eager", regional=False)
    with pytest.raises(RuntimeError) as info:
        quiet(lambda: cm(x_in()))()
    assert not isinstance(info.value, FvCompileError)


def test_a_dynamo_backend_failure_that_is_not_fv_compiles_stays_dynamos(monkeypatch):
    def broken(self, gm, example_inputs):
        raise ZeroDivisionError("not fv_compile's")

    monkeypatch.setattr(fv_compile.api.FvCompileBackend, "compile_graph", broken)
    cm = fv_compile.compile(Net(), "TORCH_SDPA", compiler="aot_eager", regional=False)
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="not fv_compile's"):
        quiet(lambda: cm(x_in()))()


def test_without_fullgraph_a_graph_break_splits_the_graph_and_explain_names_it():
    net = GraphBreakNet()
    cm = fv_compile.compile(net, "TORCH_SDPA", compiler="eager", regional=False)
    x = x_in()
    with torch.no_grad():
        torch.testing.assert_close(cm(x), net(x))
    (graph_break,) = cm.explain().graph_breaks
    assert "graph_break" in graph_break.reason and len(cm.explain().rewritten) == 2


def test_deep_copying_a_compiled_model_is_the_pickle_error():
    cm = fv_compile.compile(Net(), compiler="eager")
    with pytest.raises(FvCompileError, match=ROWS["pickle"].regex()):
        copy.deepcopy(cm)
