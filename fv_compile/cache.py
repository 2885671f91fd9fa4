"""fv_compile's version in the keys of Inductor's caches (FX graph cache, AOTAutograd cache).

Our pass runs before Inductor, as a Dynamo backend, so Inductor hashes the graph the pass made:
a change to the pass that changes that graph changes the key by itself. What the graph does not
show is the op behind its `fv_compile::attention` nodes: its fake implementation (the output
shapes and strides Inductor compiles against), its schema and its autograd formula. A cache
keyed without them replays code compiled against an old op (seen: a stride assertion at run time
after the fake implementation changed). So every graph fv_compile hands to Inductor carries a
no-op `CustomGraphPass` whose `uuid()` is a hash of fv_compile's source: any edit to the package
is a cache miss, an unchanged package in a new process is a hit.

What cached code may bake in, and why a hit is still right in a new process: the rewritten graph
names each site by an id from a per-process counter (`ops.SiteOwner.register_site`), and the op resolves
the id to its `AttentionImpl` at run time, in the process that runs it. The ids are part of the
graph, hence of the key; a hit needs the same graph, which in a new process means the same ids,
registered by the pass that produced this very graph in this process. The op's Python body never
enters the compiled code, so the impl a hit runs is always the one this process chose (a test
compiles with one backend, then hits the cache with another and sees the second one run).
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

_PACKAGE = os.path.dirname(os.path.abspath(__file__))

# Inductor config hooks that are part of the cache key on every torch fv_compile supports; the
# key pass takes the first one nobody uses.
_HOOKS = (
    "post_grad_custom_post_pass",
    "post_grad_custom_pre_pass",
    "joint_custom_post_pass",
    "joint_custom_pre_pass",
)


@functools.cache
def source_key() -> str:
    """A hash of every Python file of the fv_compile package (paths and contents)."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(_PACKAGE):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                digest.update(os.path.relpath(path, _PACKAGE).replace(os.sep, "/").encode())
                digest.update(b"\0")
                with open(path, "rb") as f:
                    digest.update(f.read())
                digest.update(b"\0")
    return digest.hexdigest()


class SourceKeyPass(CustomGraphPass):
    """Changes no graph; its uuid puts fv_compile's source hash into Inductor's cache keys."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        return None

    def uuid(self) -> Any:
        return f"fv_compile-{source_key()}"


def with_source_key(options: dict[str, Any]) -> dict[str, Any]:
    """Inductor `options` plus the key pass, in the first cache-keyed hook the user's options
    and Inductor's global config leave free (the user's own passes stay as they are)."""
    from torch._inductor import config

    out = dict(options)
    for hook in _HOOKS:
        current = out[hook] if hook in out else getattr(config, hook, None)
        if not current:
            out[hook] = SourceKeyPass()
            return out
    current = out.get(_HOOKS[0], getattr(config, _HOOKS[0]))
    if isinstance(current, (list, tuple)):  # torch >= 2.13 runs (and keys) a list of passes
        out[_HOOKS[0]] = [*current, SourceKeyPass()]
        return out
    warnings.warn(
        "fv_compile: every Inductor custom-pass hook that is part of the cache key is in use "
        f"({', '.join(_HOOKS)}), so fv_compile cannot key its graphs by its own version: Inductor's "
        "caches are off for them (a cached graph could hold an older fv_compile op). Free one "
        "hook, or pass a list of passes to post_grad_custom_post_pass, to keep the caches",
        UserWarning,
        stacklevel=3,
    )
    out["fx_graph_cache"] = False
    out["force_disable_caches"] = True
    return out
