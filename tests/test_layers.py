"""fv_compile's imports only point down its layers, and no modules import each other in a circle.

The layer order is written here, once (README's layout section draws the same picture). Every
import counts, wherever it is written: at module level, inside a function, under
`if TYPE_CHECKING:`, and as the `"module:attr"` strings the backend registry imports lazily. An
import inside a function is no way around a layer.
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "fv_compile"

# Top to bottom. A module may import modules of its own layer and of the layers below it, never
# above; within a layer, no cycles. "pkg.*" is the package `pkg` and every module inside it.
LAYERS: list[list[str]] = [
    ["fv_compile.__main__", "fv_compile.cli"],  # the command line
    ["fv_compile.report.*"],  # the speedup report, over the public API
    ["fv_compile"],  # the public API
    ["fv_compile.api"],  # compile, explain, verify, the torch.compile backend
    ["fv_compile.tuning"],  # auto under an accuracy budget: measure, decide, cache
    ["fv_compile.graph", "fv_compile.verify"],  # user-traced graphs; checking rewrites
    ["fv_compile.lowering"],  # sites -> backends: policy, impls, site registration, metadata
    [
        "fv_compile.policy",
        "fv_compile.runtime",
        "fv_compile.regional",
        "fv_compile.pipelines",
        "fv_compile.cache",
        "fv_compile.distributed.*",
    ],
    ["fv_compile.user_errors"],  # what went wrong, phrased for the user
    ["fv_compile.explain", "fv_compile.ops"],  # the report rows; the op sites become
    ["fv_compile.passes.*"],  # pure FX: a graph in, sites and a graph out; knows no backend
    ["fv_compile.backends", "fv_compile.backends.registry"],  # names -> backend classes
    # one file per backend; a backend never imports another one
    [
        "fv_compile.backends.sdpa",
        "fv_compile.backends.flash_attn",
        "fv_compile.backends.triton_attn",
        "fv_compile.backends.sliding_tile",
        "fv_compile.backends.sage",
        "fv_compile.backends.video_sparse",
    ],
    # what dense backends share (_dense), and sliding tile attention's parts by job: tile
    # geometry, windows per layer and step, block lists and attention over them; video sparse
    # attention's stages and ops (over block lists) and its reference
    [
        "fv_compile.backends._dense",
        "fv_compile.backends.sta_windows",
        "fv_compile.backends.block_lists",
        "fv_compile.backends.vsa_ops",
        "fv_compile.backends.vsa_reference",
    ],
    ["fv_compile.backends.tiles"],
    ["fv_compile.backends.abstract"],  # FastVideo's API and the declared capabilities
    ["fv_compile.backends.kernels.*"],  # Triton kernels, flash-attn-4 adapters
    ["fv_compile.metadata", "fv_compile.fx_graphs", "fv_compile.models.*"],
    ["fv_compile.context", "fv_compile.site", "fv_compile.errors"],  # the shared vocabulary
]

# the backend modules of the per-backend layer: none may import another
BACKENDS = LAYERS[12]
assert "fv_compile.backends.sdpa" in BACKENDS

_IMPORT_STRING = re.compile(r"^(fv_compile(?:\.\w+)*):\w+$")


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str, modules: set[str]) -> str | None:
    """The module `name` refers to (`pkg.mod.attr` -> `pkg.mod`), or None outside fv_compile."""
    if name != "fv_compile" and not name.startswith("fv_compile."):
        return None
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_in(source: str, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """The fv_compile modules that `source` (the text of `module`) imports, wherever it does."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports the module pkg.mod; `from mod import name`, mod
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            lazy = _IMPORT_STRING.match(node.value)
            if lazy:
                names = [lazy.group(1)]
        for name in names:
            target = _resolve(name, modules)
            if target is not None and target != module:
                found.add(target)
    return found


def layer_of(module: str) -> int:
    for i, layer in enumerate(LAYERS):
        for pattern in layer:
            if pattern.endswith(".*"):
                if module == pattern[:-2] or module.startswith(pattern[:-1]):
                    return i
            elif module == pattern:
                return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")


GRAPH = {
    m: imports_in(p.read_text(), m, p.name == "__init__.py", set(MODULES))
    for m, p in MODULES.items()
}


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    up = sorted(
        f"{t} (layer {layer_of(t)})" for t in GRAPH[module] if layer_of(t) < layer_of(module)
    )
    assert not up, f"{module} (layer {layer_of(module)}) imports up the layers: {', '.join(up)}"


def test_no_backend_imports_another():
    for module in BACKENDS:
        others = sorted(GRAPH[module] & (set(BACKENDS) - {module}))
        assert not others, (
            f"{module} imports {others}: share code through backends/_dense.py or a kernel"
        )


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph`, as `[a, b, ..., a]`, or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        path.append(m)
        for t in sorted(graph.get(m, ())):
            if t in path:
                return path[path.index(t) :] + [t]
            if t not in done:
                found = visit(t)
                if found:
                    return found
        path.pop()
        done.add(m)
        return None

    for m in sorted(graph):
        if m not in done:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycles():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_check_sees_every_kind_of_import():
    """A function-level import, a TYPE_CHECKING import, a relative import and a registry string
    all count; a name imported from a module counts as that module."""
    modules = {
        "fv_compile",
        "fv_compile.a",
        "fv_compile.a.b",
        "fv_compile.c",
        "fv_compile.d",
        "fv_compile.e",
    }
    source = (
        "from typing import TYPE_CHECKING\n"
        "import torch\n"
        "if TYPE_CHECKING:\n    from fv_compile.c import Thing\n"
        "def f():\n    from fv_compile import d\n"
        "from . import b\n"
        "LAZY = {'X': 'fv_compile.e:Backend'}\n"
        "NOT_AN_IMPORT = 'fv_compile is fast'\n"
    )
    assert imports_in(source, "fv_compile.a", True, modules) == {
        "fv_compile.a.b",
        "fv_compile.c",
        "fv_compile.d",
        "fv_compile.e",
    }
    assert find_cycle({"x": {"y"}, "y": {"z"}, "z": {"x"}}) == ["x", "y", "z", "x"]
    assert find_cycle({"x": {"y"}, "y": set()}) is None
