"""The whole FX pass: find → classify → rewrite → simplify, on a copy of the graph.

Pure FX: a graph in, the sites found and a rewritten graph out. Which backend runs a site is not
decided here: for every proven site the pass asks its caller's `lower(match)` for the id the
site's `fv_compile::attention` node carries (`fv_compile.lowering` registers an impl and answers),
or for None, when the caller leaves the site alone (it then records why on `match.site`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch.fx import GraphModule, Node

from fv_compile.fx_graphs import copy_graph_module
from fv_compile.passes.classify import classify_role
from fv_compile.passes.dead_code import erase_dead
from fv_compile.passes.find_sites import AttentionMatch, match_attention_sites
from fv_compile.passes.rewrite import rewrite_site
from fv_compile.passes.simplify_views import simplify_views
from fv_compile.passes.subgraph import emitted_closure, lift
from fv_compile.site import REWRITTEN, SKIPPED, AttentionSite, NonAttentionSoftmax

SiteLowering = Callable[[AttentionMatch], "int | None"]
"""`lower(match) -> site id`, or None to leave the site as traced (reason on `match.site`)."""


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
    sites: list[AttentionSite]  # in graph order: rewritten and skipped alike
    non_attention: list[NonAttentionSoftmax]
    rewrites: list[SiteRewrite] = field(default_factory=list)  # when asked for (`record`)


def attention_pass(
    gm: GraphModule, lower: SiteLowering, graph_index: int = 0, *, record: bool = False
) -> PassResult:
    """Rewrite every provable attention site of a copy of `gm` to the op node `lower` gives it
    an id for; `gm` itself is left untouched. With `record`, each rewritten site is also lifted
    out, before and after (`SiteRewrite`)."""
    new = copy_graph_module(gm)
    rewrites: list[SiteRewrite] = []
    matches, skipped, others = match_attention_sites(new, graph_index)
    sites: list[AttentionSite] = list(skipped)
    replaced: dict[Node, Node] = {}
    emitted: list[Node] = []
    owned_writes: list[Node] = []
    for match in matches:
        site = match.site
        classify_role(match)
        sid = lower(match)
        if sid is None:
            sites.append(site)
            continue
        first_emitted = len(emitted)
        if rewrite_site(new, match, sid, replaced, emitted) is None:
            site.status, site.reason = (
                SKIPPED,
                "internal check failed: rewritten output would differ",
            )
            sites.append(site)
            continue
        site.status = REWRITTEN
        owned_writes.extend(match.owned_writes)
        if record:
            rewrites.append(_lift_site(new, match, replaced, set(emitted[first_emitted:])))
        sites.append(site)
    if matches:
        bypassed = simplify_views(new)
        # only what the rewrite made dead goes: the replaced outputs and the chains into them
        erase_dead(new.graph, [*replaced, *reversed(emitted), *bypassed], owned_writes)
        new.recompile()
    sites.sort(key=lambda s: _node_order(gm, s))
    return PassResult(new, sites, others, rewrites)


def _lift_site(
    gm: GraphModule, match: AttentionMatch, replaced: dict[Node, Node], own: set[Node]
) -> SiteRewrite:
    # an operand that an earlier site's op now computes is fed the traced node's value, on
    # both sides: the site's own nodes read the earlier op's output by now too
    traced = {new: old for old, new in replaced.items()}

    def traced_name(n: Node) -> str:
        return traced.get(n, n).name

    original, original_inputs = lift(gm, match.nodes, match.output, traced_name)
    out = replaced[match.output]
    rewritten, rewritten_inputs = lift(gm, emitted_closure(out, own.__contains__), out, traced_name)
    return SiteRewrite(match.site, original, original_inputs, rewritten, rewritten_inputs)


def _node_order(old: GraphModule, site: AttentionSite) -> int:
    for i, n in enumerate(old.graph.nodes):
        if n.name == site.node:
            return i
    return 1 << 30
