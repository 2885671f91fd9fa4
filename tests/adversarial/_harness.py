"""Shared harness for the adversarial suite: compile a program with fv_compile, run it next to an
eager twin (a deepcopy made before compiling), and demand that nothing observable differs.

What `check` compares, call after call:
  * outputs: NaN pattern equal (NaN where eager is NaN, nowhere else), infinities equal, values
    within tolerance;
  * gradients (grad=True): of every parameter and every input that requires grad; a gradient eager
    leaves as None must be None or all-zero in the compiled run, a compiled None stands for zeros;
  * state after each call: every parameter and buffer of the model against the twin's, and the
    inputs (programs may mutate them);
  * the user's model is not changed by `compile()` itself (parameter identity and values, buffers,
    module tree, `forward`), nor its structure by running.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

import fv_compile

BACKEND = "TORCH_SDPA"

FP32_TOL = dict(atol=1e-5, rtol=1e-4)
BF16_TOL = dict(atol=2e-2, rtol=2e-2)


# ----------------------------------------------------------------------------------------------
# comparisons


def tol_for(t: torch.Tensor) -> dict:
    if t.dtype in (torch.bfloat16, torch.float16):
        return BF16_TOL
    return FP32_TOL


def assert_same_tensor(actual, expected, what: str, tol: dict | None = None):
    """Same shape, dtype, NaN pattern, infinities, and values within tolerance."""
    assert isinstance(actual, torch.Tensor), f"{what}: compiled gave {type(actual).__name__}"
    assert actual.shape == expected.shape, (
        f"{what}: shape {tuple(actual.shape)} vs eager {tuple(expected.shape)}"
    )
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} vs eager {expected.dtype}"
    if not expected.is_floating_point() and not expected.is_complex():
        assert torch.equal(actual, expected), f"{what}: integer/bool values differ"
        return
    a, e = actual.detach(), expected.detach()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        only_c = (nan_a & ~nan_e).sum().item()
        only_e = (nan_e & ~nan_a).sum().item()
        raise AssertionError(
            f"{what}: NaN pattern differs: {only_c} NaN only in compiled, {only_e} NaN only in eager "
            f"(of {e.numel()}); compiled at eager-NaN positions: "
            f"{a[nan_e & ~nan_a].flatten()[:6].tolist()}"
        )
    tol = tol or tol_for(e)
    torch.testing.assert_close(a, e, equal_nan=True, msg=lambda m: f"{what}: {m}", **tol)


def assert_same_tree(actual, expected, what: str, tol: dict | None = None):
    fa, _ = tree_flatten(actual)
    fe, _ = tree_flatten(expected)
    assert len(fa) == len(fe), f"{what}: {len(fa)} leaves vs eager {len(fe)}"
    for i, (a, e) in enumerate(zip(fa, fe)):
        if isinstance(e, torch.Tensor):
            assert_same_tensor(a, e, f"{what}[{i}]", tol)
        else:
            assert a == e, f"{what}[{i}]: {a!r} vs eager {e!r}"


def assert_same_grad(actual, expected, what: str, tol: dict | None = None):
    if expected is None:
        if actual is not None:
            assert not torch.any(actual != 0), (
                f"{what}: eager leaves no gradient, compiled has a nonzero one "
                f"(max |g| {actual.abs().max().item():.3g})"
            )
        return
    if actual is None:
        actual = torch.zeros_like(expected)
    assert_same_tensor(actual, expected, what, tol)


# ----------------------------------------------------------------------------------------------
# the model's identity


def snapshot(model: nn.Module) -> dict:
    return {
        "params": [
            (n, p, p.detach().clone()) for n, p in model.named_parameters(remove_duplicate=False)
        ],
        "buffers": [
            (n, b, b.detach().clone()) for n, b in model.named_buffers(remove_duplicate=False)
        ],
        "modules": [(n, type(m), id(m)) for n, m in model.named_modules(remove_duplicate=False)],
        "forward": {
            n: ("forward" in m.__dict__, m.__dict__.get("forward"), type(m).forward)
            for n, m in model.named_modules(remove_duplicate=False)
        },
        "training": [(n, m.training) for n, m in model.named_modules(remove_duplicate=False)],
        "requires_grad": [
            (n, p.requires_grad) for n, p in model.named_parameters(remove_duplicate=False)
        ],
    }


def assert_structure_unchanged(model: nn.Module, snap: dict, when: str):
    now = [(n, type(m), id(m)) for n, m in model.named_modules(remove_duplicate=False)]
    assert now == snap["modules"], f"{when}: module tree changed"
    params = list(model.named_parameters(remove_duplicate=False))
    assert [n for n, _ in params] == [n for n, _, _ in snap["params"]], (
        f"{when}: parameter names changed"
    )
    for (n, p), (_, p0, _) in zip(params, snap["params"]):
        assert p is p0, f"{when}: parameter {n} replaced by another object"
    assert [(n, p.requires_grad) for n, p in params] == snap["requires_grad"], (
        f"{when}: requires_grad changed"
    )
    bufs = list(model.named_buffers(remove_duplicate=False))
    assert [n for n, _ in bufs] == [n for n, _, _ in snap["buffers"]], (
        f"{when}: buffer names changed"
    )
    for n, m in model.named_modules(remove_duplicate=False):
        had, inst, cls = snap["forward"][n]
        assert ("forward" in m.__dict__) == had and m.__dict__.get("forward") is inst, (
            f"{when}: {n or 'model'}.forward patched on the instance"
        )
        assert type(m).forward is cls, f"{when}: {n or 'model'}'s class forward changed"
    assert [(n, m.training) for n, m in model.named_modules(remove_duplicate=False)] == snap[
        "training"
    ], f"{when}: train/eval flags changed"


def assert_values_unchanged(model: nn.Module, snap: dict, when: str):
    for (n, p), (_, _, v0) in zip(model.named_parameters(remove_duplicate=False), snap["params"]):
        assert torch.equal(p.detach(), v0) or (
            torch.isnan(v0).any() and torch.equal(torch.isnan(p.detach()), torch.isnan(v0))
        ), f"{when}: parameter {n} values changed"
    for (n, b), (_, b0, v0) in zip(model.named_buffers(remove_duplicate=False), snap["buffers"]):
        assert b is b0, f"{when}: buffer {n} replaced by another object"
        assert torch.equal(b, v0) or (
            b.is_floating_point()
            and torch.equal(torch.isnan(b), torch.isnan(v0))
            and torch.equal(b.nan_to_num(), v0.nan_to_num())
        ), f"{when}: buffer {n} values changed"


def assert_state_like_twin(model: nn.Module, twin: nn.Module, when: str):
    for (n, p), (_, pt) in zip(
        model.named_parameters(remove_duplicate=False),
        twin.named_parameters(remove_duplicate=False),
    ):
        assert_same_tensor(
            p.detach(), pt.detach(), f"{when}: parameter {n}", tol=dict(atol=0, rtol=0)
        )
    for (n, b), (_, bt) in zip(
        model.named_buffers(remove_duplicate=False), twin.named_buffers(remove_duplicate=False)
    ):
        tol = dict(atol=0, rtol=0) if b.dtype in (torch.bool, torch.int64, torch.int32) else None
        assert_same_tensor(b, bt, f"{when}: buffer {n}", tol)


# ----------------------------------------------------------------------------------------------
# running


def clone_args(args, grad_inputs):
    out = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            c = a.detach().clone()
            if i in grad_inputs:
                c.requires_grad_(True)
            out.append(c)
        else:
            out.append(copy.deepcopy(a))
    return out


def _loss(out, finite_masks):
    """A scalar that weights every element of every floating output differently; positions where
    eager produced a non-finite value are left out (their NaN is compared in the forward check)."""
    leaves, _ = tree_flatten(out)
    total = 0.0
    for k, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and leaf.requires_grad:
            g = torch.Generator().manual_seed(1000 + k)
            w = torch.randn(leaf.shape, generator=g).to(leaf.dtype)
            total = (
                total
                + (torch.where(finite_masks[k], leaf, torch.zeros((), dtype=leaf.dtype)) * w)
                .float()
                .sum()
            )
    return total


def _finite_masks(out):
    leaves, _ = tree_flatten(out)
    return [
        torch.isfinite(x.detach())
        if isinstance(x, torch.Tensor) and x.is_floating_point()
        else None
        for x in leaves
    ]


def check(
    model: nn.Module,
    *args,
    grad: bool = False,
    grad_inputs: tuple[int, ...] | None = None,
    compiler: str | None = None,
    calls: int = 1,
    seed: int | None = 0,
    tol: dict | None = None,
    grad_tol: dict | None = None,
    fresh_args: bool = True,
):
    """Run `model` compiled by fv_compile and its eager twin `calls` times on `args`; assert that
    every observable thing agrees. Returns `(compiled_model, explain_report, [(out_c, out_e), ...])`.

    grad: differentiate a weighted sum of the outputs and compare the gradients of every
        parameter and of the floating inputs (`grad_inputs`: the argument indices; default all
        floating tensor args).
    seed: `torch.manual_seed(seed)` before each eager call and each compiled call (None: not reset).
    """
    if grad_inputs is None:
        grad_inputs = tuple(
            i
            for i, a in enumerate(args)
            if grad and isinstance(a, torch.Tensor) and a.is_floating_point()
        )
    twin = copy.deepcopy(model)
    snap = snapshot(model)
    compiler = compiler or ("aot_eager" if grad else "eager")
    cm = fv_compile.compile(model, attention_backend=BACKEND, compiler=compiler)
    assert_structure_unchanged(model, snap, "after compile()")
    assert_values_unchanged(model, snap, "after compile()")

    results = []
    for call in range(calls):
        if fresh_args or call == 0:
            args_e = clone_args(args, grad_inputs)
            args_c = clone_args(args, grad_inputs)
        if grad:
            for p in model.parameters():
                p.grad = None
            for p in twin.parameters():
                p.grad = None
        ctx = torch.enable_grad() if grad else torch.no_grad()
        with ctx:
            if seed is not None:
                torch.manual_seed(seed)
            out_e = twin(*args_e)
            if seed is not None:
                torch.manual_seed(seed)
            out_c = cm(*args_c)
        tag = f"call {call + 1}"
        assert_same_tree(out_c, out_e, f"{tag}: output", tol)
        assert_structure_unchanged(model, snap, f"{tag}: after running")
        assert_state_like_twin(model, twin, f"{tag}: state after the call")
        for i, (a_c, a_e) in enumerate(zip(args_c, args_e)):
            if isinstance(a_e, torch.Tensor):
                assert_same_tensor(a_c.detach(), a_e.detach(), f"{tag}: input {i} after the call")
        if grad:
            masks = _finite_masks(out_e)
            loss_e = _loss(out_e, masks)
            loss_c = _loss(out_c, masks)
            if isinstance(loss_e, torch.Tensor) and loss_e.requires_grad:
                loss_e.backward()
                assert isinstance(loss_c, torch.Tensor) and loss_c.requires_grad, (
                    f"{tag}: eager output is differentiable, compiled output is not"
                )
                loss_c.backward()
            for (n, p), (_, pt) in zip(model.named_parameters(), twin.named_parameters()):
                assert_same_grad(p.grad, pt.grad, f"{tag}: grad of parameter {n}", grad_tol)
            for i in grad_inputs:
                assert_same_grad(
                    args_c[i].grad, args_e[i].grad, f"{tag}: grad of input {i}", grad_tol
                )
        results.append((out_c, out_e))
    return cm, cm.explain(), results


def statuses(report) -> list[str]:
    return [s.status for s in report.sites]


def assert_rewritten(report, n: int | None = None):
    """The control's attention was found and rewritten (the adversarial neighbours are then really
    next to a rewritten site)."""
    rew = report.rewritten
    if n is None:
        assert rew, f"expected a rewritten site; report:\n{report}"
    else:
        assert len(rew) == n, f"expected {n} rewritten site(s), got {len(rew)}; report:\n{report}"


def reset():
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# building blocks for programs

B, S, E = 2, 8, 16


class Fn(nn.Module):
    """A function as a module, to compile a program written as one function."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


class Proj(nn.Module):
    """x (B, S, E) -> q, k, v in (B, H, S, D); out-projection back to E."""

    def __init__(self, E=E, H=2, D=8, Hkv=None, bias=True, dtype=torch.float32):
        super().__init__()
        self.H, self.D, self.Hkv = H, D, Hkv or H
        self.wq = nn.Linear(E, H * D, bias=bias, dtype=dtype)
        self.wk = nn.Linear(E, self.Hkv * D, bias=bias, dtype=dtype)
        self.wv = nn.Linear(E, self.Hkv * D, bias=bias, dtype=dtype)
        self.wo = nn.Linear(H * D, E, bias=bias, dtype=dtype)

    def split(self, t, h):
        b, s, _ = t.shape
        return t.view(b, s, h, self.D).transpose(1, 2)

    def qkv(self, x, ctx=None):
        ctx = x if ctx is None else ctx
        return (
            self.split(self.wq(x), self.H),
            self.split(self.wk(ctx), self.Hkv),
            self.split(self.wv(ctx), self.Hkv),
        )

    def merge(self, o):
        b, h, s, d = o.shape
        return self.wo(o.transpose(1, 2).reshape(b, s, h * d))


def x_input(b=B, s=S, e=E, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, s, e, generator=g).to(dtype)


def qkv_inputs(b=B, h=2, s=S, d=8, dtype=torch.float32, seed=2, skv=None, hkv=None):
    g = torch.Generator().manual_seed(seed)
    skv = skv or s
    hkv = hkv or h
    return (
        torch.randn(b, h, s, d, generator=g).to(dtype),
        torch.randn(b, hkv, skv, d, generator=g).to(dtype),
        torch.randn(b, hkv, skv, d, generator=g).to(dtype),
    )


def inv_sqrt(d):
    return 1.0 / math.sqrt(d)
