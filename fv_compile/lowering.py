"""Lowering: the attention sites the pass proved, onto backends.

The pass (`fv_compile.passes`) proves where attention is and rewrites each site to one
`fv_compile::attention` node; it knows no backend. This module answers it, site by site: the
policy picks the backend, the backend's impl is built with what it needs (the site row, a dense
fallback for the steps it runs dense), the impl is registered with the op under the id the node
carries; and once the graph is rewritten, the backends whose metadata builder must run before
the graph does are collected. Where a backend works in a token permutation of its own (sliding
tile attention's tile order) and the graph is proven token-wise between its sites, a second copy
of the graph runs that stretch in the permutation (`passes/token_order.py`), for the steps whose
metadata holds one.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.fx import GraphModule

from fv_compile import ops
from fv_compile.backends import registry
from fv_compile.backends.abstract import AttentionBackend, AttentionImpl, capabilities
from fv_compile.context import layer_number
from fv_compile.errors import FvCompileError
from fv_compile.fx_graphs import compile_time, copy_graph_module
from fv_compile.passes.attention_pass import SiteRewrite, attention_pass
from fv_compile.passes.find_sites import AttentionMatch
from fv_compile.passes.token_order import TokenSite, hoist_token_order
from fv_compile.policy import SitePolicy, dense_default
from fv_compile.runtime import PermutedGraph
from fv_compile.site import REWRITTEN, SKIPPED, AttentionSite, NonAttentionSoftmax, TokenOrder


@dataclass
class LoweredGraph:
    """A traced graph with its attention sites rewritten onto backends."""

    gm: GraphModule
    sites: list[AttentionSite]
    non_attention: list[NonAttentionSoftmax]
    metadata_backends: list[str] = field(default_factory=list)  # backends whose builder runs
    rewrites: list[SiteRewrite] = field(default_factory=list)  # when asked for (`record`)
    # the graph's sites stay registered while this is alive: `gm` holds it, and whatever runs
    # the graphs compiled from `gm` (or the lifted `rewrites`) must hold it too
    owner: ops.SiteOwner = field(default_factory=ops.SiteOwner)
    # what became of the token order of a backend that works in one (None: no such backend),
    # and the copy of `gm` that runs in it, when the proof held
    token_order: TokenOrder | None = None
    permuted: PermutedGraph | None = None
    # the id each rewritten site's op node carries in `gm` (what a run can tell its sites by)
    site_ids: dict[int, AttentionSite] = field(default_factory=dict)


@compile_time
def lower_graph(
    gm: GraphModule,
    policy: SitePolicy,
    graph_index: int = 0,
    *,
    record: bool = False,
    block_lists: Sequence[tuple[str, int]] = (),
) -> LoweredGraph:
    """Rewrite every provable attention site of a copy of `gm` onto the backend `policy` picks for
    it; `gm` itself is left untouched. With `record`, each rewritten site is also lifted out,
    before and after (`SiteRewrite`), for `fv_compile.verify`. `block_lists`, the model's
    repeated block lists `[(path, length)]` in model order, number the layers of sites inside
    them (for impls that take a `layer`)."""
    chosen: list[tuple[AttentionSite, str, type[AttentionBackend]]] = []
    by_id: dict[int, tuple[AttentionSite, str, type[AttentionBackend]]] = {}
    owner = ops.SiteOwner()

    def lower(match: AttentionMatch) -> int | None:
        site = match.site
        name, cls = policy.choose(site)
        site.backend = name
        try:
            impl = construct_impl(
                cls.get_impl_cls(), site, layer_number(site.module_path, list(block_lists))
            )
        except Exception as e:  # a backend refusing a site at construction is a skip, not a crash
            if policy.strict:
                raise FvCompileError(
                    f"backend {name} refused site {site.module_path or site.node}: {e}"
                ) from e
            site.status, site.reason = SKIPPED, f"{name} could not be constructed: {e}"
            return None
        chosen.append((site, name, cls))
        assert site.scale is not None, "the matcher sets the scale of every site it proves"
        sid = owner.register_site(
            impl,
            name,
            site.scale,
            site.causal,
            differentiable=capabilities(cls).differentiable,
            empty_rows=match.empty_rows,
            fill=match.fill,
            role=site.role,
            joint_text_len=site.joint_text_len,
            joint_text_first=site.joint_text_first,
            where=site.module_path or site.node,
            traced=site.trains and _traced_in_training(cls, impl, site),
        )
        by_id[sid] = (site, name, cls)
        return sid

    result = attention_pass(gm, lower, graph_index, record=record)
    # whoever holds the rewritten module keeps its sites (a plain attribute: Module.__setattr__'s
    # stub admits only tensors and modules)
    result.gm.fv_site_owner = owner  # type: ignore[assignment]
    metadata_backends: list[str] = []
    for site, name, cls in chosen:
        if (
            site.status == REWRITTEN
            and registry.needs_metadata(cls)
            and name not in metadata_backends
        ):
            metadata_backends.append(name)
    token_order, permuted = _token_order(result.gm, by_id, owner, graph_index)
    if permuted is not None:
        permuted.gm.fv_site_owner = owner  # type: ignore[assignment]  # as result.gm's above
    return LoweredGraph(
        result.gm,
        result.sites,
        result.non_attention,
        metadata_backends,
        result.rewrites,
        owner,
        token_order,
        permuted,
        {sid: row[0] for sid, row in by_id.items() if row[0].status == REWRITTEN},
    )


def _traced_in_training(
    cls: type[AttentionBackend], impl: AttentionImpl, site: AttentionSite
) -> bool:
    """`cls.traced_in_training(site)`, for the impl class of the backend class that declares
    it only: a subclass that brings an impl of its own (a kernel autograd cannot see through)
    inherits the declaration, not its truth."""
    owner = next(c for c in cls.__mro__ if "traced_in_training" in vars(c))
    if owner is AttentionBackend or not issubclass(owner, AttentionBackend):
        return False
    return type(impl) is owner.get_impl_cls() and bool(cls.traced_in_training(site))


def trace_training_sites(gm: GraphModule) -> GraphModule:
    """`gm`, or a copy whose sites marked `traced` (sites that train, on a backend that
    declares `traced_in_training` for them) call `ops.traced_site`, the op's own code, instead
    of the op: autograd then runs the impl's backward with what its forward saved (SDPA's fused
    backward on its log-sum-exp, VSA's on its lists), where the op's backward recomputes the
    forward first. The forward is the same code either way. Applied to the graph handed to the
    compiler only: the passes and `explain` see the op."""
    op = torch.ops.fv_compile.attention.default
    chosen = {
        node.name
        for node in gm.graph.find_nodes(op="call_function", target=op)
        if ops.site_runtime(node.args[4]).traced
    }
    if not chosen:
        return gm
    gm = copy_graph_module(gm)
    for node in gm.graph.find_nodes(op="call_function", target=op):
        if node.name in chosen:
            node.target = ops.traced_site
    gm.recompile()
    return gm


def _token_order(
    gm: GraphModule,
    by_id: dict[int, tuple[AttentionSite, str, type[AttentionBackend]]],
    owner: ops.SiteOwner,
    graph_index: int,
) -> tuple[TokenOrder | None, PermutedGraph | None]:
    """Run the stretch between the sites of a backend that works in a token permutation in that
    permutation, where the pass proves it token-wise: the other sites in it must be dense
    attention (their backends declare `differentiable`: the output is dense attention, which
    commutes with the permutation), non-causal, with no reordering of their own."""
    rewritten = {sid: row for sid, row in by_id.items() if row[0].status == REWRITTEN}
    ordered = {
        name: cls for site, name, cls in rewritten.values() if capabilities(cls).token_permutation
    }
    if not ordered:
        return None, None
    if len(ordered) > 1:
        names = " and ".join(sorted(ordered))
        why = f"{names} each work in a token order of their own"
        return TokenOrder(graph_index, names, False, why), None
    ((name, cls),) = ordered.items()
    sites: dict[int, TokenSite] = {}
    for sid, (site, backend, site_cls) in rewritten.items():
        if backend == name:
            text = int(site.joint_text_len or 0) if site.role == "joint" else 0
            sites[sid] = TokenSite(
                True, int(site.q_len or 0) - text, text, bool(site.joint_text_first)
            )
            continue
        rt = ops.site_runtime(sid)
        if (
            capabilities(site_cls).differentiable
            and not site.causal
            and not (rt.preprocess or rt.postprocess)
        ):
            sites[sid] = TokenSite(False)

    def relabel(sid: int) -> int:
        return owner.register_runtime(replace(ops.site_runtime(sid), tokens_permuted=True))

    result = hoist_token_order(gm, sites, relabel)
    row = TokenOrder(
        graph_index,
        name,
        result.applied,
        result.reason,
        sites=result.sites,
        video_len=result.video_len,
        gathered=result.gathered,
        scattered=result.scattered,
        stopped_at=result.stopped_at,
        bytes_per_site=result.bytes_per_site,
        bytes_hoisted=result.bytes_hoisted,
    )
    permutation = capabilities(cls).token_permutation
    if result.gm is None or permutation is None:  # not applied (cls is one of `ordered`)
        return row, None
    return row, PermutedGraph(result.gm, name, permutation, result.video_len)


def construct_impl(
    impl_cls: type[AttentionImpl], site: AttentionSite, layer: int | None = None
) -> Any:
    """Build a site's impl as FastVideo's layers do. Impls that accept a `site` keyword (or any
    keyword) also get the whole site row; impls with a `dense_fallback` parameter get the impl
    of the dense backend `auto` picks for the site, to run the steps they run dense; impls with a
    `layer` parameter get the site's layer number when it is known (`context.layer_number`)."""
    kwargs: dict[str, Any] = dict(
        num_heads=site.heads,
        head_size=site.head_dim,
        softmax_scale=site.scale,
        causal=site.causal,
        num_kv_heads=site.kv_heads,
        prefix=f"{site.module_path}.impl" if site.module_path else "impl",
    )
    params = inspect.signature(impl_cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD or p.name == "site" for p in params.values()):
        kwargs["site"] = site
    if "dense_fallback" in params:
        kwargs["dense_fallback"] = construct_impl(
            registry.get_backend(dense_default(site)).get_impl_cls(), site
        )
    if "layer" in params and layer is not None:
        kwargs["layer"] = layer
    return impl_cls(**kwargs)
