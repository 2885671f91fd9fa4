"""Helpers for pass tests: run the pass inside torch.compile and capture what it produced."""

from __future__ import annotations

import re

import torch
from torch._dynamo.testing import normalize_gm

from fv_compile.lowering import lower_graph
from fv_compile.policy import SitePolicy

_SITE_ARG = re.compile(r"(fv_compile\.attention\.default\(.*?), \d+, (\d+), ")


def rewrite(fn, *args, attention_backend="TORCH_SDPA"):
    """`(graph text, sites, outputs)`: the rewritten Dynamo graph of `fn(*args)` as golden text
    (site ids replaced by `SITE`, since they depend on test order), its sites, and what the
    rewritten graph computed."""
    captured = {}

    def backend(gm, example_inputs):
        result = lower_graph(gm, SitePolicy(attention_backend))
        captured["gm"] = result.gm
        captured["sites"] = result.sites
        captured["others"] = result.non_attention
        return result.gm.forward

    with torch.no_grad():
        out = torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)(*args)
    text = normalize_gm(captured["gm"].print_readable(print_output=False))
    text = _SITE_ARG.sub(r"\1, SITE, \2, ", text)
    return text, captured["sites"], captured["others"], out


def assert_close(actual, expected, atol=1e-5, rtol=1e-5):
    if isinstance(expected, (tuple, list)):
        for a, e in zip(actual, expected):
            assert_close(a, e, atol, rtol)
        return
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
