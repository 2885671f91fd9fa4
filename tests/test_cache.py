"""Inductor's caches and fv_compile: a warm process hits them and runs its own impls; a changed
fv_compile misses them; the key pass leaves the user's own passes alone."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from fv_compile.cache import SourceKeyPass, source_key, with_source_key

PROBE = os.path.join(os.path.dirname(__file__), "_cache_probe.py")


def probe(cache_dir, backend, key="-", *extra):
    env = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(cache_dir),
        "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "0",
    }
    done = subprocess.run(
        [sys.executable, PROBE, backend, key, *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_warm_process_hits_the_caches_and_runs_its_own_impls(tmp_path):
    """Three fresh processes, one cache directory. The second compiles the same model with
    another backend: the rewritten graph is the same (site ids included), so it is a hit, and
    the cached code calls this process's impl (the spy runs), with eager's numbers. The third
    runs a changed fv_compile (another source key): a miss. The metadata variants an STA model
    compiles at run time hit the caches too."""
    cold = probe(tmp_path, "TORCH_SDPA", "-", "--sta")
    assert (cold["aot_miss"], cold["aot_hit"], cold["err"] < 1e-5) == (1, 0, True), cold
    assert (cold["sta_hit"], cold["sta_variants"], cold["sta_finite"]) == (0, 1, True), cold
    warm = probe(tmp_path, "TEST_CACHE_SPY", "-", "--sta")
    assert (warm["sta_hit"], warm["sta_variants"], warm["sta_finite"]) == (1, 1, True), warm
    assert (warm["aot_hit"], warm["aot_miss"], warm["err"] < 1e-5) == (1, 0, True), warm
    assert warm["spy_calls"] == 2 and warm["backend"] == ["TEST_CACHE_SPY"] * 2, warm
    changed = probe(tmp_path, "TORCH_SDPA", key="another-fv_compile")
    assert (changed["aot_hit"], changed["aot_miss"], changed["fx_hit"]) == (0, 1, 0), changed


class UserPass(CustomGraphPass):
    def __call__(self, graph):
        pass

    def uuid(self):
        return "user"


def test_the_key_pass_takes_a_free_hook_and_leaves_the_users_passes_alone():
    key = source_key()
    assert len(key) == 64 and key == source_key()
    assert SourceKeyPass().uuid() == f"fv_compile-{key}"
    opts = with_source_key({"max_autotune": True})
    assert isinstance(opts["post_grad_custom_post_pass"], SourceKeyPass) and opts["max_autotune"]
    mine = UserPass()
    opts = with_source_key({"post_grad_custom_post_pass": mine})
    assert opts["post_grad_custom_post_pass"] is mine
    assert isinstance(opts["post_grad_custom_pre_pass"], SourceKeyPass)
    hooks = (
        "post_grad_custom_post_pass",
        "post_grad_custom_pre_pass",
        "joint_custom_post_pass",
        "joint_custom_pre_pass",
    )
    with (
        torch._inductor.config.patch({hook: mine for hook in hooks}),  # the user's global config
        pytest.warns(UserWarning, match="caches are off"),
    ):
        opts = with_source_key({})
    assert opts["force_disable_caches"] and all(hook not in opts for hook in hooks)
    with torch._inductor.config.patch({hook: mine for hook in hooks[1:]}):
        opts = with_source_key(
            {"post_grad_custom_post_pass": [mine]}
        )  # a list: one more pass in it
    assert opts["post_grad_custom_post_pass"][0] is mine
    assert isinstance(opts["post_grad_custom_post_pass"][1], SourceKeyPass)
