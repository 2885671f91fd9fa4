"""Run by tests/test_cache.py in a fresh process: compile a small model with Inductor, caches on,
and print what the caches did, which impl ran and the error against eager, as JSON."""

import json
import sys

import torch
from torch._dynamo.utils import counters

import fv_compile
from fv_compile.backends.sdpa import SDPABackend, SDPAImpl

from _two_block_net import TwoBlockNet  # this folder: the probe runs as a script


class SpyImpl(SDPAImpl):
    calls = 0

    def forward(self, q, k, v, md):
        type(self).calls += 1
        return super().forward(q, k, v, md)


class SpyBackend(SDPABackend):
    @staticmethod
    def get_name():
        return "TEST_CACHE_SPY"

    @staticmethod
    def get_impl_cls():
        return SpyImpl


def sta_run() -> dict:
    """A model whose sites read per-step metadata: its graphs compile at run time, per variant."""
    model = TwoBlockNet().eval()
    x = torch.randn(1, 64, 32)
    args = fv_compile.FastVideoArgs(
        patch_size=(1, 1, 1), sta_tile_size=(1, 2, 2), sta_window=(1, 1, 1)
    )
    batch = fv_compile.ForwardBatch(raw_latent_shape=(1, 4, 1, 8, 8))
    cm = fv_compile.compile(model, "SLIDING_TILE_ATTN")
    before = dict(counters["aot_autograd"])
    with torch.no_grad(), fv_compile.forward_context(0, batch, args):
        out = cm(x)
    hits = counters["aot_autograd"]["autograd_cache_hit"] - before.get("autograd_cache_hit", 0)
    return {
        "sta_hit": hits,
        "sta_variants": cm.variants_compiled,
        "sta_finite": bool(out.isfinite().all()),
    }


def main() -> None:
    backend, key = sys.argv[1], sys.argv[2]
    if key != "-":  # as if fv_compile's source had changed
        fv_compile.cache.source_key = lambda: key
    fv_compile.register_backend("TEST_CACHE_SPY", SpyBackend)
    torch.manual_seed(0)
    model = TwoBlockNet().eval()
    x = torch.randn(2, 16, 32)
    cm = fv_compile.compile(model, backend)
    with torch.no_grad():
        err = (cm(x) - model(x)).abs().max().item()
    aot, fx = counters["aot_autograd"], counters["inductor"]
    print(
        json.dumps(
            {
                "err": err,
                "spy_calls": SpyImpl.calls,
                "aot_hit": aot["autograd_cache_hit"],
                "aot_miss": aot["autograd_cache_miss"],
                "fx_hit": fx["fxgraph_cache_hit"],
                "fx_miss": fx["fxgraph_cache_miss"],
                "backend": [s.backend for s in cm.explain().sites],
                **(sta_run() if "--sta" in sys.argv else {}),
            }
        )
    )


if __name__ == "__main__":
    main()
