"""The whole pass: find → classify → choose a backend → rewrite → simplify, on a copy of the graph."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Node

from fv_compile import ops
from fv_compile.backends import registry
from fv_compile.errors import FvCompileError
from fv_compile.passes.classify import classify_role
from fv_compile.passes.dead_code import erase_dead
from fv_compile.passes.find_sites import find_attention_sites
from fv_compile.passes.rewrite import rewrite_site
from fv_compile.passes.simplify_views import simplify_views
from fv_compile.passes.subgraph import emitted_closure, lift
from fv_compile.site import REWRITTEN, SKIPPED, AttentionSite, NonAttentionSoftmax
from fv_compile.policy import SitePolicy

# Backends whose output is dense attention: their backward by recomputation is exact.
_DENSE = {"TORCH_SDPA", "TRITON_ATTN", "FLASH_ATTN"}


@dataclass
class SiteRewrite:
    """One rewritten site lifted out of the graph: the traced nodes it replaced and the nodes
    that replaced them, each a GraphModule whose placeholders are named after the nodes of the
    traced graph that feed it."""

    site: AttentionSite
    original: GraphModule
    original_inputs: list[str]
    rewritten: GraphModule
    rewritten_inputs: list[str]


@dataclass
class PassResult:
    gm: GraphModule
    sites: list[AttentionSite]
    non_attention: list[NonAttentionSoftmax]
    metadata_backends: list[str] = field(default_factory=list)  # backends whose builder runs
    rewrites: list[SiteRewrite] = field(default_factory=list)  # when asked for (`record`)


def copy_graph_module(gm: GraphModule) -> GraphModule:
    """A GraphModule over a copy of `gm.graph` (Dynamo still owns and reads the original)."""
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return GraphModule(gm, graph)


def attention_pass(
    gm: GraphModule, policy: SitePolicy, graph_index: int = 0, *, record: bool = False
) -> PassResult:
    """Rewrite every provable attention site of a copy of `gm`; `gm` itself is left untouched.
    With `record`, each rewritten site is also lifted out, before and after (`SiteRewrite`)."""
    new = copy_graph_module(gm)
    rewrites: list[SiteRewrite] = []
    matches, skipped, others = find_attention_sites(new, graph_index)
    sites: list[AttentionSite] = list(skipped)
    replaced: dict[Node, Node] = {}
    emitted: list[Node] = []
    owned_writes: list[Node] = []
    md_backends: list[str] = []
    for match in matches:
        site = match.site
        classify_role(match)
        name, cls = policy.choose(site)
        site.backend = name
        try:
            impl = construct_impl(cls.get_impl_cls(), site)
        except Exception as e:  # a backend refusing a site at construction is a skip, not a crash
            if policy.strict:
                raise FvCompileError(f"backend {name} refused site {site.module_path or site.node}: {e}") from e
            site.status, site.reason = SKIPPED, f"{name} could not be constructed: {e}"
            sites.append(site)
            continue
        sid = ops.register_site(
            impl,
            name,
            site.scale,
            site.causal,
            exact=name in _DENSE,
            empty_rows=match.empty_rows,
            fill=match.fill,
        )
        first_emitted = len(emitted)
        if rewrite_site(new, match, sid, replaced, emitted) is None:
            site.status, site.reason = SKIPPED, "internal check failed: rewritten output would differ"
            sites.append(site)
            continue
        site.status = REWRITTEN
        owned_writes.extend(match.owned_writes)
        if record:
            rewrites.append(_lift_site(new, match, replaced, set(emitted[first_emitted:])))
        if registry.needs_metadata(cls) and name not in md_backends:
            md_backends.append(name)
        sites.append(site)
    if matches:
        bypassed = simplify_views(new)
        # only what the rewrite made dead goes: the replaced outputs and the chains into them
        erase_dead(new.graph, [*replaced, *reversed(emitted), *bypassed], owned_writes)
        new.recompile()
    sites.sort(key=lambda s: _node_order(new, gm, s))
    return PassResult(new, sites, others, md_backends, rewrites)


def _lift_site(gm: GraphModule, match, replaced: dict[Node, Node], own: set[Node]) -> SiteRewrite:
    original, original_inputs = lift(gm, match.nodes, match.output)
    # an operand that an earlier site's op now computes is fed the traced node's value
    traced = {new: old for old, new in replaced.items()}
    out = replaced[match.output]
    rewritten, rewritten_inputs = lift(
        gm, emitted_closure(out, own.__contains__), out, lambda n: traced.get(n, n).name
    )
    return SiteRewrite(match.site, original, original_inputs, rewritten, rewritten_inputs)


def construct_impl(impl_cls: type, site: AttentionSite) -> Any:
    """Build a site's impl as FastVideo's layers do; impls that accept a `site` keyword (or any
    keyword) also get the whole site row."""
    kwargs: dict[str, Any] = dict(
        num_heads=site.heads,
        head_size=site.head_dim,
        softmax_scale=site.scale,
        causal=site.causal,
        num_kv_heads=site.kv_heads,
        prefix=f"{site.module_path}.impl" if site.module_path else "impl",
    )
    params = inspect.signature(impl_cls.__init__).parameters.values()
    if any(p.kind is p.VAR_KEYWORD or p.name == "site" for p in params):
        kwargs["site"] = site
    return impl_cls(**kwargs)


def _node_order(new: GraphModule, old: GraphModule, site: AttentionSite) -> int:
    for i, n in enumerate(old.graph.nodes):
        if n.name == site.node:
            return i
    return 1 << 30
