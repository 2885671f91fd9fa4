"""Conformance on whole models: the zoo's tiny presets and diffusers' video transformers.

For each model: every attention site is found and rewritten (the count is asserted explicitly),
the compiled output equals eager, each site's role (self / cross / joint) is right for its module
path, and fv_compile does not split the model into more Dynamo graphs than plain torch.compile.

Tolerance: fp32, max |compiled - eager| < 1e-5 *absolute*. The outputs of these random-weight
models are O(1) (max |eager| is between 1.9 and 3.7 for all of them), so an absolute bound is
also a relative bound of ~5e-6 at the largest values; the test also asserts that scale, so a
change of init that inflates the outputs makes the test fail loudly instead of getting looser.

Everything runs with compiler="eager" (the rewritten FX graph is executed as is) and the
TORCH_SDPA backend, so the file stays fast on a CPU.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import fv_compile
from fv_compile.models import build_model, example_inputs

ATOL = 1e-5
TEXT_LEN = 16  # every tiny config here uses 16 text tokens


def _zoo(preset):
    def make():
        model = build_model(preset)
        args, kwargs = example_inputs(model)
        return model, args, kwargs

    return make


def _diffusers(class_name):
    def make():
        pytest.importorskip("diffusers")
        from fv_compile.models import from_diffusers

        return from_diffusers(class_name)

    return make


# model id -> (factory, number of attention sites, [(module-path regex, role)])
MODELS = {
    "wan-tiny": (
        _zoo("wan-tiny"),
        4,
        [(r"blocks\.\d+\.self_attn", "self"), (r"blocks\.\d+\.cross_attn", "cross")],
    ),
    "hunyuan-tiny": (
        _zoo("hunyuan-tiny"),
        5,
        [
            (r"text_refiner\.blocks\.\d+\.attn", "self"),
            (r"double_blocks\.\d+\.attn", "joint"),
            (r"single_blocks\.\d+\.attn", "joint"),
        ],
    ),
    "cogvideox-tiny": (_zoo("cogvideox-tiny"), 2, [(r"blocks\.\d+\.attn", "joint")]),
    "diffusers-WanTransformer3DModel": (
        _diffusers("WanTransformer3DModel"),
        4,
        [(r"blocks\.\d+\.attn1", "self"), (r"blocks\.\d+\.attn2", "cross")],
    ),
    "diffusers-CogVideoXTransformer3DModel": (
        _diffusers("CogVideoXTransformer3DModel"),
        2,
        [(r"transformer_blocks\.\d+\.attn1", "joint")],
    ),
    "diffusers-HunyuanVideoTransformer3DModel": (
        _diffusers("HunyuanVideoTransformer3DModel"),
        5,
        [
            (r"context_embedder\.token_refiner\.refiner_blocks\.\d+\.attn", "self"),
            (r"transformer_blocks\.\d+\.attn", "joint"),
            (r"single_transformer_blocks\.\d+\.attn", "joint"),
        ],
    ),
}


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@pytest.mark.parametrize("name", list(MODELS))
def test_model_conforms(name):
    make, n_sites, roles = MODELS[name]
    model, args, kwargs = make()

    with torch.no_grad():
        ref = _first(model(*args, **kwargs))

        counter = CompileCounter()
        torch.compile(model, backend=counter, dynamic=False)(*args, **kwargs)
        plain_graphs = counter.frame_count

        torch._dynamo.reset()
        # the whole model, as plain torch.compile above (regional compiles are tested elsewhere)
        cm = fv_compile.compile(
            model, attention_backend="TORCH_SDPA", compiler="eager", regional=False
        )
        out = _first(cm(*args, **kwargs))

    report = cm.explain()
    table = f"\n{report}"

    # every site found, and rewritten
    assert len(report.sites) == n_sites, table
    assert [s.status for s in report.sites] == ["rewritten"] * n_sites, table
    assert all(not s.reason for s in report.sites), table

    # the role of each site, from its module path
    for site in report.sites:
        want = [role for pattern, role in roles if re.fullmatch(pattern, site.module_path)]
        assert want, f"no expected role for {site.module_path!r}{table}"
        assert site.role == want[0], (
            f"{site.module_path}: role {site.role}, expected {want[0]}{table}"
        )
        if site.role == "joint":
            assert site.joint_text_len == TEXT_LEN, table
    # every expected kind of site is present (a pattern that matches nothing is a lost site)
    for pattern, _ in roles:
        assert any(re.fullmatch(pattern, s.module_path) for s in report.sites), (
            f"no site matches {pattern!r}{table}"
        )

    # output equal to eager (fp32, absolute 1e-5 on O(1) outputs)
    assert ref.abs().max().item() < 10.0, "outputs grew: revisit the absolute tolerance"
    err = (out - ref).abs().max().item()
    assert err < ATOL, f"max |compiled - eager| = {err:.3g}{table}"

    # no more Dynamo graphs than plain torch.compile
    assert plain_graphs >= 1
    assert report.graphs <= plain_graphs, (
        f"{report.graphs} graphs vs {plain_graphs} with plain torch.compile"
    )
