"""The pass on graphs the user traced themselves (`torch.fx.symbolic_trace`, or any GraphModule)."""

from __future__ import annotations

from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import GraphModule
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from fv_compile.explain import ExplainReport
from fv_compile.fx_graphs import copy_graph_module
from fv_compile.lowering import lower_graph
from fv_compile.policy import AUTO, PolicySpec, SitePolicy


class _ValuesProp(FakeTensorProp):
    """FakeTensorProp that also records plain Python results (`x.size(-1)`, `d ** -0.5`): the
    matcher reads a traced scale from them. (torch 2.11's FakeTensorProp keeps tensors only.)"""

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        if _plain(result) and not _plain(n.meta.get("val")):
            n.meta["val"] = result
        return result


def _plain(value: Any) -> bool:
    if isinstance(value, tuple | list):
        return all(_plain(v) for v in value)
    return type(value) in (int, float, bool)


def _with_values(gm: GraphModule, example_inputs: tuple[Any, ...]) -> GraphModule:
    """A copy of `gm` whose every node has the example value the matcher reads (Dynamo graphs
    have them already); `gm`'s own nodes are left as they were."""
    gm = copy_graph_module(gm)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
    _ValuesProp(gm, mode).propagate(*fakes)
    return gm


def rewrite_attention(
    gm: GraphModule,
    *example_inputs: Any,
    attention_backend: PolicySpec = AUTO,
    strict: bool = False,
) -> tuple[GraphModule, ExplainReport]:
    """Rewrite the attention sites of a traced GraphModule; returns a new module and the report.

    `example_inputs` are real or fake tensors shaped like the module's inputs. `gm` is not
    modified (its graph, nodes and node metadata stay as they were); the new module shares its
    parameters and submodules, and keeps the sites' impls alive as long as it lives.
    """
    traced = _with_values(gm, example_inputs)
    result = lower_graph(traced, SitePolicy(attention_backend, strict=strict))
    return result.gm, ExplainReport(result.sites, result.non_attention, 1)


def find_attention_sites(gm: GraphModule, *example_inputs: Any) -> ExplainReport:
    """The report of `rewrite_attention(gm, *example_inputs)`: every attention site of a traced
    GraphModule, what was done with it and why, and the softmaxes that are not attention. `gm`
    is not modified and the rewritten module is dropped."""
    return rewrite_attention(gm, *example_inputs)[1]
