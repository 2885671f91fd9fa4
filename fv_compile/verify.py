"""Checking each rewrite where it runs: the traced site and its replacement on the same inputs.

`fv_compile.verify(model, *args)` traces the model once. For every graph the traced code runs as
it was (so the model computes exactly what eager computes), and every rewritten site's original
nodes and its `fv_compile::attention` replacement, each lifted out of the graph, run on the
values that graph computed for the site's inputs. The comparison, forward and (with
`backward=True`) for the gradient of every input that requires one, lands on the site's row
(`AttentionSite.check`): a user can prove the rewrite on their own model before trusting it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Interpreter, Node

from fv_compile import ops
from fv_compile.backends import registry
from fv_compile.context import current_forward_context
from fv_compile.errors import FvCompileError
from fv_compile.fx_graphs import copy_graph_module
from fv_compile.passes.attention_pass import SiteRewrite
from fv_compile.runtime import context_metadata

# relative L2 error a rewrite may show, by the dtype the site computes in: kernels differ from
# eager's matmul/softmax/matmul by accumulation order, and bf16 rounds the weights to 8 bits
_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


@dataclass
class TensorCheck:
    """One tensor of a site (its output, or the gradient of one input) against eager's."""

    what: str  # "output", or "grad <input>" with the input's name in the traced graph
    max_abs: float
    rel_l2: float
    nan_match: bool  # NaN (and +-inf) exactly where eager has them
    ok: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SiteCheck:
    """The rewrite of one site, checked on the inputs the model gave it."""

    output: TensorCheck
    gradients: list[TensorCheck] = field(default_factory=list)
    calls: int = 1  # how many times the site ran during the check (errors are the worst)
    # what `output` and `gradients` were held to: "traced" (the site's own traced code), or
    # "definition" (a sparse impl's `reference`: what its pattern should give on these inputs)
    against: str = "traced"
    # with "definition": the output's distance from the traced dense code, as information (a
    # sparse pattern is meant to differ; `ok` does not depend on it)
    traced: TensorCheck | None = None

    @property
    def ok(self) -> bool:
        return self.output.ok and all(g.ok for g in self.gradients)

    @property
    def worst_gradient(self) -> TensorCheck | None:
        return max(self.gradients, key=lambda g: (not g.ok, g.rel_l2), default=None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "calls": self.calls,
            "against": self.against,
            "output": self.output.to_dict(),
            "gradients": [g.to_dict() for g in self.gradients],
            "traced": None if self.traced is None else self.traced.to_dict(),
        }


def tolerance(dtype: torch.dtype) -> float:
    """The relative L2 error a rewrite of a site computing in `dtype` may show and pass."""
    return _TOLERANCE.get(dtype, 1e-4)


def compare(what: str, got: torch.Tensor, want: torch.Tensor) -> TensorCheck:
    """`got` against `want`: NaN/inf patterns, then the error over the finite entries."""
    tol = tolerance(want.dtype)
    got, want = got.detach(), want.detach()
    if got.shape != want.shape:
        return TensorCheck(what, math.inf, math.inf, False, False)
    g, w = got.double(), want.double()
    nan_match = bool(torch.equal(g.isnan(), w.isnan()) and torch.equal(g.isinf(), w.isinf()))
    inf_match = bool((g[w.isinf()] == w[w.isinf()]).all()) if w.isinf().any() else True
    finite = w.isfinite() & g.isfinite()
    diff = (g - w)[finite]
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    norm = float(w[finite].norm()) if diff.numel() else 0.0
    rel = float(diff.norm()) / norm if norm > 0 else (0.0 if max_abs == 0 else math.inf)
    nan_match = nan_match and inf_match
    return TensorCheck(what, max_abs, rel, nan_match, nan_match and rel <= tol)


class _Capture(Interpreter):
    """Runs a traced graph node by node, keeping the values of the nodes named in `keep`."""

    def __init__(self, gm: GraphModule, keep: set[str]) -> None:
        super().__init__(gm)
        self.keep = keep
        self.values: dict[str, Any] = {}

    def run_node(self, n: Node) -> Any:
        out = super().run_node(n)
        if n.name in self.keep:
            self.values[n.name] = out
        return out


class SiteVerifier:
    """The callable Dynamo runs for one graph under `verify`: the traced graph as it was, plus a
    check of every rewritten site on the values it computed."""

    def __init__(self, gm: GraphModule, rewrites: list[SiteRewrite], *, backward: bool) -> None:
        self.gm = gm
        self.rewrites = rewrites
        self.backward = backward
        self.keep = {name for r in rewrites for name in (*r.original_inputs, *r.rewritten_inputs)}

    def __call__(self, *args: Any) -> Any:
        capture = _Capture(self.gm, self.keep)
        out = capture.run(*args)
        for r in self.rewrites:
            check = self._check(r, capture.values)
            if r.site.check is None or _worse(check, r.site.check):
                check.calls += r.site.check.calls if r.site.check is not None else 0
                r.site.check = check
            else:
                r.site.check.calls += 1
        return out

    def _check(self, r: SiteRewrite, values: dict[str, Any]) -> SiteCheck:
        names = list(dict.fromkeys([*r.original_inputs, *r.rewritten_inputs]))
        grad_names = [n for n in names if self.backward and _takes_gradient(values[n])]
        leaves = {
            n: values[n].detach().clone().requires_grad_(n in grad_names)
            if isinstance(values[n], torch.Tensor)
            else values[n]
            for n in names
        }
        rewritten = _with_metadata(r.rewritten)
        defined = _as_defined(rewritten)
        with torch.enable_grad() if grad_names else torch.no_grad():
            traced = r.original(*(leaves[n] for n in r.original_inputs))
            got = rewritten(*(leaves[n] for n in r.rewritten_inputs))
            want = traced if defined is None else defined(*(leaves[n] for n in r.rewritten_inputs))
        check = SiteCheck(compare("output", got, want))
        if defined is not None:
            check.against, check.traced = "definition", compare("output", got, traced)
        if grad_names:
            gen = torch.Generator(device=want.device).manual_seed(0)
            cotangent = torch.randn(want.shape, generator=gen, device=want.device, dtype=want.dtype)
            inputs = [leaves[n] for n in grad_names]
            g_want = _grads(want, inputs, cotangent)
            g_got = _grads(got, inputs, cotangent)
            for name, gw, gg in zip(grad_names, g_want, g_got):
                check.gradients.append(compare(f"grad {name}", gg, gw))
        return check


def _takes_gradient(value: Any) -> bool:
    """An input the traced model differentiates: a floating tensor that required grad there."""
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.requires_grad


def _grads(
    out: torch.Tensor, inputs: list[torch.Tensor], cotangent: torch.Tensor
) -> list[torch.Tensor]:
    if not out.requires_grad:
        return [torch.zeros_like(x) for x in inputs]
    grads = torch.autograd.grad(out, inputs, cotangent, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


def _worse(a: SiteCheck, b: SiteCheck) -> bool:
    def key(c: SiteCheck) -> tuple[bool, float]:
        worst = c.worst_gradient
        return (not c.ok, max(c.output.rel_l2, worst.rel_l2 if worst else 0.0))

    return key(a) > key(b)


def _with_metadata(gm: GraphModule) -> GraphModule:
    """`gm` with the active forward context's metadata bound into its attention ops, for
    backends with a builder (their sites cannot run without it)."""

    def needy_ops(graph: torch.fx.Graph) -> list[Node]:
        ops_ = [n for n in graph.nodes if n.target is torch.ops.fv_compile.attention.default]
        return [n for n in ops_ if registry.needs_metadata(registry.get_backend(_backend(n)))]

    if not needy_ops(gm.graph):
        return gm
    gm = copy_graph_module(gm)
    needy = needy_ops(gm.graph)
    ctx = current_forward_context()
    if ctx is None:
        raise FvCompileError(
            f"verify: attention backend {_backend(needy[0])} needs per-step metadata; call "
            "fv_compile.verify inside `with fv_compile.forward_context(current_timestep=..., "
            "forward_batch=..., fastvideo_args=...):`"
        )
    owner = ops.SiteOwner()
    # the variants live as long as the module (a plain attribute: Module.__setattr__'s stub
    # admits only tensors and modules)
    gm.fv_site_owner = owner  # type: ignore[assignment]
    for n in needy:
        name = _backend(n)
        q = n.args[0]
        assert isinstance(q, Node)
        device = q.meta["example_value"].device
        layout, tensors = context_metadata(ctx, name, device)
        vid = owner.register_variant({name: layout})
        getters = []
        for t in tensors:
            attr = f"_fv_md_{len(list(gm.buffers()))}"
            gm.register_buffer(attr, t, persistent=False)
            with gm.graph.inserting_before(n):
                getters.append(gm.graph.get_attr(attr))
        n.args = (*n.args[:5], vid, getters)
    gm.recompile()
    return gm


def _as_defined(gm: GraphModule) -> GraphModule | None:
    """A copy of the rewritten site `gm` computing what its sparse impl defines
    (`ops.traced_site(..., reference=True)`), or None when no op of it has a definition
    (dense impls: the traced code is theirs)."""

    def defined(graph: torch.fx.Graph) -> list[Node]:
        sites = [n for n in graph.nodes if n.target is torch.ops.fv_compile.attention.default]
        return [n for n in sites if ops.has_reference(ops.site_runtime(n.args[4]).impl)]

    if not defined(gm.graph):
        return None
    gm = copy_graph_module(gm)
    for n in defined(gm.graph):
        n.target, n.kwargs = ops.traced_site, {"reference": True}
    gm.recompile()
    return gm


def _backend(node: Node) -> str:
    site = node.args[4]  # fv_compile::attention(q, k, v, mask, site, variant, tensors)
    assert isinstance(site, int)
    return ops.site_runtime(site).backend
