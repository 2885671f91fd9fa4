"""Metadata from a backend's builder reaches every site as graph inputs: per-step values never
recompile, static fields select cached graph variants, and the builder runs once per context."""

from dataclasses import dataclass
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import fv_compile
from fv_compile import AttentionBackend, AttentionImpl, AttentionMetadata, AttentionMetadataBuilder


@dataclass
class StepMetadata(AttentionMetadata):
    gain: torch.Tensor | None = None
    negate: bool = False


class StepBuilder(AttentionMetadataBuilder):
    calls = 0

    def build(self, current_timestep, forward_batch, fastvideo_args):
        StepBuilder.calls += 1
        return StepMetadata(
            current_timestep=current_timestep,
            gain=torch.tensor(1.0 + current_timestep),
            negate=getattr(fastvideo_args, "negate", False),
        )


class StepImpl(AttentionImpl):
    """Dense attention times a per-step gain: the output shows which metadata arrived."""

    seen_timesteps: ClassVar[list] = []

    def __init__(
        self, num_heads, head_size, softmax_scale, causal=False, num_kv_heads=None, prefix="", **kw
    ):
        self.scale = softmax_scale

    def forward(self, q, k, v, md):
        StepImpl.seen_timesteps.append(md.current_timestep)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=self.scale
        ).transpose(1, 2)
        out = out * md.gain
        return -out if md.negate else out


class StepBackend(AttentionBackend):
    @staticmethod
    def get_name():
        return "TEST_STEP"

    @staticmethod
    def get_impl_cls():
        return StepImpl

    @staticmethod
    def get_metadata_cls():
        return StepMetadata

    @staticmethod
    def get_builder_cls():
        return StepBuilder


fv_compile.register_backend("TEST_STEP", StepBackend)


class TwoSites(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.proj(x).view(2, 5, 3, 2, 8).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v)
        b = (q @ k.transpose(-2, -1) * 8**-0.5).softmax(-1) @ v
        return a + b


@pytest.fixture
def model():
    return TwoSites().eval()


def test_outputs_follow_per_step_metadata_and_compile_once(model):
    x = torch.randn(2, 5, 16)
    cm = fv_compile.compile(model, "TEST_STEP", compiler="eager")
    counters.clear()
    with torch.no_grad():
        ref = model(x)
        for step in range(20):
            with fv_compile.forward_context(current_timestep=step):
                out = cm(x)
            torch.testing.assert_close(out, ref * (1 + step), atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    assert cm.explain().graphs == 1
    assert cm.variants_compiled == 1


def test_current_timestep_reaches_the_impl_as_a_tensor(model):
    cm = fv_compile.compile(model, "TEST_STEP", compiler="eager")
    StepImpl.seen_timesteps.clear()
    with torch.no_grad(), fv_compile.forward_context(current_timestep=7):
        cm(torch.randn(2, 5, 16))
    assert [int(t) for t in StepImpl.seen_timesteps] == [7, 7]
    assert all(isinstance(t, torch.Tensor) for t in StepImpl.seen_timesteps)


def test_static_field_selects_a_cached_variant_without_a_dynamo_recompile(model):
    x = torch.randn(2, 5, 16)
    cm = fv_compile.compile(model, "TEST_STEP", compiler="aot_eager")
    counters.clear()
    with torch.no_grad():
        ref = model(x)
        for negate in (False, True, False, True):
            args = SimpleNamespace(negate=negate)
            with fv_compile.forward_context(current_timestep=1, fastvideo_args=args):
                out = cm(x)
            torch.testing.assert_close(out, -2 * ref if negate else 2 * ref, atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    assert cm.variants_compiled == 2


def test_builder_runs_once_per_context_for_all_sites_and_cfg_passes(model):
    cm = fv_compile.compile(model, "TEST_STEP", compiler="eager")
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        with fv_compile.forward_context(current_timestep=0):
            cm(x)
        StepBuilder.calls = 0
        with fv_compile.forward_context(current_timestep=3):
            cm(x)  # conditional pass
            cm(x)  # unconditional pass
    assert StepBuilder.calls == 1


def test_metadata_backend_without_context_names_the_with_line(model):
    cm = fv_compile.compile(model, "TEST_STEP", compiler="eager")
    with torch.no_grad(), pytest.raises(fv_compile.FvCompileError) as err:
        cm(torch.randn(2, 5, 16))
    assert "with fv_compile.forward_context(current_timestep=i" in str(err.value)


def test_metadata_threads_through_inductor(model):
    x = torch.randn(2, 5, 16)
    cm = fv_compile.compile(model, "TEST_STEP", compiler="inductor")
    with torch.no_grad():
        ref = model(x)
        for step in (0, 4):
            with fv_compile.forward_context(current_timestep=step):
                torch.testing.assert_close(cm(x), ref * (1 + step), atol=1e-5, rtol=1e-5)
    assert cm.variants_compiled == 1


def test_metadata_graph_inputs_are_placeholders(model):
    cm = fv_compile.compile(model, "TEST_STEP", compiler="eager")
    with torch.no_grad(), fv_compile.forward_context(current_timestep=2):
        cm(torch.randn(2, 5, 16))
    (dispatch,) = cm._fv_backend.dispatches
    (variant,) = dispatch.variants.values()
    gm = variant.__self__
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    assert names[-2:] == ["fv_md_test_step_0", "fv_md_test_step_1"]
