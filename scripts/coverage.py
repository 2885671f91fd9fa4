"""Write docs/coverage.md: which attention sites fv_compile finds and rewrites in each model.

    python scripts/coverage.py            # writes docs/coverage.md
    python scripts/coverage.py --stdout   # prints it instead

(with the Python that has fv_compile and its test extras, e.g. the one scripts/setup.sh makes).

For each model (the zoo's tiny presets, plus diffusers' Wan, CogVideoX and HunyuanVideo when
diffusers is installed) the table compares

* sites *present*, counted without the matcher: the model is traced by a plain `torch.compile`
  whose backend only counts the *anchors* Dynamo captured (every softmax and every
  scaled_dot_product_attention call, by their torch targets, nothing else), split by whether the
  innermost module that ran the anchor is an attention module (its class name contains
  "Attention" or "Attn");
* sites *found* and *rewritten*, from `fv_compile.explain` (forms, roles, skip reasons).

It also summarises the programs tests/test_properties.py generates, by replaying its
(derandomized) hypothesis tests with a recorder in place of the check: the counts are those of
the programs the tests run.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch
import torch.nn.functional as F

import fv_compile
from fv_compile.models import build_model, example_inputs

ZOO = ["wan-tiny", "hunyuan-tiny", "cogvideox-tiny"]
DIFFUSERS = [
    "WanTransformer3DModel",
    "CogVideoXTransformer3DModel",
    "HunyuanVideoTransformer3DModel",
]
COMMAND = "python scripts/coverage.py"

_SOFTMAX_FNS = {F.softmax, torch.softmax, torch.special.softmax, torch.nn.functional.softmax}
_SDPA_FNS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}


# --- sites present: anchors counted by a plain torch.compile backend ----------------------------


def _innermost_module(node: torch.fx.Node) -> tuple[str, str]:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return path, name.rsplit(".", 1)[-1]


def _anchor_kind(node: torch.fx.Node) -> str | None:
    if node.op == "call_function" and node.target in _SDPA_FNS:
        return "sdpa"
    if node.op == "call_function" and node.target in _SOFTMAX_FNS:
        return "softmax"
    if node.op == "call_method" and node.target == "softmax":
        return "softmax"
    return None


class AnchorCounter:
    """A Dynamo backend that runs each graph as captured and counts its attention anchors."""

    def __init__(self) -> None:
        self.graphs = 0
        self.anchors: list[tuple[str, str, bool]] = []  # (kind, module class, in attention module)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1
        for node in gm.graph.nodes:
            kind = _anchor_kind(node)
            if kind is not None:
                _, cls = _innermost_module(node)
                in_attn = "attention" in cls.lower() or "attn" in cls.lower()
                self.anchors.append((kind, cls, in_attn))
        return gm.forward


# --- one model -----------------------------------------------------------------------------------


def _models():
    for preset in ZOO:

        def make(preset=preset):
            model = build_model(preset)
            args, kwargs = example_inputs(model)
            return model, args, kwargs

        yield preset, "zoo", make
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return
    from fv_compile.models import from_diffusers

    for cls in DIFFUSERS:
        yield f"diffusers {cls}", "diffusers", (lambda cls=cls: from_diffusers(cls))


def measure(name: str, make) -> dict:
    model, args, kwargs = make()
    t0 = time.perf_counter()
    torch._dynamo.reset()
    counter = AnchorCounter()
    with torch.no_grad():
        torch.compile(model, backend=counter, dynamic=False)(*args, **kwargs)
    torch._dynamo.reset()
    report = fv_compile.explain(model, *args, attention_backend="TORCH_SDPA", **kwargs)
    torch._dynamo.reset()
    present = sum(1 for _, _, in_attn in counter.anchors if in_attn)
    return {
        "name": name,
        "anchors_total": len(counter.anchors),
        "present": present,
        "anchor_kinds": collections.Counter(k for k, _, in_attn in counter.anchors if in_attn),
        "plain_graphs": counter.graphs,
        "graphs": report.graphs,
        "found": len(report.sites),
        "rewritten": len(report.rewritten),
        "forms": collections.Counter(s.form for s in report.sites),
        "roles": collections.Counter(s.role for s in report.sites),
        "skipped": [(s.module_path or s.node, s.reason) for s in report.skipped],
        "non_attention": [(n.module_path or n.node, n.reason) for n in report.non_attention],
        "sites": report.sites,
        "seconds": time.perf_counter() - t0,
    }


# --- the property tests' generated programs -----------------------------------------------------


def property_stats() -> dict[str, collections.Counter]:
    """Replay tests/test_properties.py's hypothesis tests with a recorder instead of the checks."""
    import tests.test_properties as tp

    return tp.generated_programs()


def _count(items, key) -> collections.Counter:
    c: collections.Counter = collections.Counter()
    for it in items:
        v = key(it)
        for x in v if isinstance(v, (list, tuple, set)) else [v]:
            c[x] += 1
    return c


def _fmt(counter: collections.Counter) -> str:
    return ", ".join(
        f"{k} {v}" for k, v in sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0])))
    )


def property_section(seen) -> list[str]:
    import tests.test_properties as tp

    attn, sdpa, look, router = seen["attn"], seen["sdpa"], seen["look"], seen["router"]
    total = sum(len(v) for v in seen.values())
    sweep = [p for _, p in tp.ONE_FACTOR]
    s_attn = [p for p in sweep if isinstance(p, tp.Attn) and not p.perturb]
    s_sdpa = [p for p in sweep if isinstance(p, tp.Sdpa)]
    s_look = [
        p for p in sweep if isinstance(p, (tp.Attn, tp.Router)) and getattr(p, "perturb", True)
    ]
    missing = tp._forms_reached(attn, sdpa, look)
    lines = [
        "## Generated programs (tests/test_properties.py)",
        "",
        (
            f"Per run: **{total} random programs** (hypothesis, fixed seed: `derandomize=True`, no "
            f"database) — {len(attn)} hand-written attention, {len(sdpa)} SDPA, {len(look)} look-alikes "
            f"built on random attention programs, {len(router)} router softmaxes — plus a deterministic "
            f"**one-factor-at-a-time sweep of {len(sweep)} programs** ({len(s_attn)} hand-written "
            f"attention, {len(s_sdpa)} SDPA, {len(s_look)} look-alikes/routers) that changes each form "
            "alone from a plain base program, so every form below is run whatever hypothesis draws. "
            "Each attention program must be rewritten (one `fv_compile.attention` node, the expected "
            "form and scale, no softmax/SDPA left) and equal eager within atol = rtol = 1e-5 (fp32); "
            "each look-alike must be left alone and equal eager; every site or softmax reported as "
            "not rewritten carries a reason."
        ),
        "",
        "The counts below are those of the random programs as this script replays them. Hypothesis "
        "also draws on constants it collects from the modules loaded in the process, so a pytest run "
        "with other test files loaded can reach a slightly different (still fixed) set; the "
        "parametrized main forms (score contraction, SDPA mask, perturbation) get their share in "
        "every context. Forms the random programs of this replay never reached (the sweep runs "
        "them anyway): "
        + (", ".join(f"{k}: {sorted(map(str, v))}" for k, v in missing.items()) or "none")
        + ".",
        "",
        "Open matcher bugs the random generators steer around (`KNOWN_BUGS`): "
        + (", ".join(f"`{b}`" for b in sorted(tp.KNOWN_BUGS)) or "none")
        + ". The bugs these tests found are kept as regression tests (`test_bug_*`).",
        "",
        "| dimension | values drawn (count) |",
        "|---|---|",
    ]

    def row(name, counter):
        lines.append(f"| {name} | {_fmt(counter)} |")

    both = attn + sdpa
    row(
        "attention: layout",
        _count(attn, lambda p: p.layout + (" (einsum on BSHD)" if p.native else "")),
    )
    row("attention: score contraction", _count(attn, lambda p: p.score))
    row("attention: value contraction", _count(attn, lambda p: p.value))
    row("attention: k^T spelling", _count([p for p in attn if p.score != "einsum"], lambda p: p.kt))
    row(
        "attention: einsum operand order",
        _count([p for p in attn if p.score_eq], lambda p: p.score_eq[1]),
    )
    row("attention: scale", _count(attn, lambda p: p.scale))
    row("attention: scale/mask op spelling", _count(attn, lambda p: p.op_spelling))
    row("attention: masks", _count(attn, lambda p: [k for k, _ in p.masks] or ["none"]))
    row(
        "attention: two masks on one site",
        _count(
            [p for p in attn if len(p.masks) == 2],
            lambda p: "+".join(
                sorted("additive" if k.startswith("add") else "boolean" for k, _ in p.masks)
            ),
        ),
    )
    row(
        "attention: mask rank", _count(attn, lambda p: [f"{len(s)}-D" for _, s in p.masks] or ["-"])
    )
    row(
        "attention: mask before scale", _count([p for p in attn if p.masks], lambda p: p.mask_first)
    )
    row("attention: upcast", _count(attn, lambda p: p.upcast or "none"))
    row(
        "attention: softmax spelling",
        _count(attn, lambda p: p.softmax.replace("{s}", "x").replace("{last}", "last")),
    )
    row("attention: dropout", _count(attn, lambda p: (p.dropout or "none").replace("{p}", "p")))
    row("attention: GQA expansion", _count(attn, lambda p: p.gqa or "none"))
    row("attention: [B*H] merge", _count([p for p in attn if p.merged], lambda p: p.merge))
    row("SDPA: layout", _count(sdpa, lambda p: p.layout))
    row("SDPA: call", _count(sdpa, lambda p: p.call))
    row("SDPA: mask", _count(sdpa, lambda p: p.mask[0] if p.mask else "none"))
    row("SDPA: is_causal", _count(sdpa, lambda p: p.causal))
    row("SDPA: scale", _count(sdpa, lambda p: repr(p.scale)))
    row("SDPA: GQA", _count(sdpa, lambda p: p.gqa or "none"))
    row("GQA ratio (both)", _count(both, lambda p: p.G))
    row(
        "edge sizes (both)",
        _count(
            both,
            lambda p: [
                n
                for n, ok in (
                    ("B=1", p.B == 1),
                    ("H=1", p.H == 1),
                    ("Sq=1", p.Sq == 1),
                    ("Sk=1", p.Sk == 1),
                    ("Sq!=Sk", p.Sq != p.Sk),
                    ("Dv!=D", p.Dv != p.D),
                )
                if ok
            ],
        ),
    )
    row("look-alike perturbation", _count(look, lambda p: p.perturb))
    row("router", _count(router, lambda p: f"{p.logits}+{p.use}"))
    lines.append("")
    return lines


# --- the document ----------------------------------------------------------------------------


def render(results: list[dict], seen) -> str:
    lines = [
        "# Attention-site coverage",
        "",
        f"<!-- Generated by scripts/coverage.py: do not edit. Regenerate with `{COMMAND}`. -->",
        f"Generated by `scripts/coverage.py` (`{COMMAND}`); do not edit by hand.",
        f"torch {torch.__version__}"
        + (
            f", diffusers {_diffusers_version()}"
            if _diffusers_version()
            else ", diffusers not installed"
        )
        + ", CPU, fp32, tiny configs, TORCH_SDPA backend.",
        "",
        "## Models",
        "",
        "| model | found / present | rewritten | forms | roles | graphs (fv / plain) | skipped (reason) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        skipped = "; ".join(f"`{p}`: {why}" for p, why in r["skipped"]) or "none"
        lines.append(
            f"| {r['name']} | {r['found']} / {r['present']} | {r['rewritten']} | {_fmt(r['forms'])} "
            f"| {_fmt(r['roles'])} | {r['graphs']} / {r['plain_graphs']} | {skipped} |"
        )
    lines += [
        "",
        (
            "*present* is counted without the matcher: a plain `torch.compile` whose backend counts "
            "the anchors Dynamo captured (every softmax — `Tensor.softmax`, `torch.softmax`, "
            "`F.softmax`, `torch.special.softmax` — and every `scaled_dot_product_attention` call) "
            "whose innermost module is an attention module (class name containing `Attention` or "
            "`Attn`). Anchors outside attention modules are counted separately below (none in these models). "
            "*found* / *rewritten* / forms / roles come from `fv_compile.explain`."
        ),
        "",
        "| model | anchors in attention modules | anchors elsewhere | softmaxes judged not attention |",
        "|---|---|---|---|",
    ]
    for r in results:
        other = "; ".join(f"`{p}`: {why}" for p, why in r["non_attention"]) or "none"
        lines.append(
            f"| {r['name']} | {_fmt(r['anchor_kinds']) or '0'} | "
            f"{r['anchors_total'] - r['present']} | {other} |"
        )
    lines += ["", "### Sites", ""]
    for r in results:
        lines += [
            f"**{r['name']}**",
            "",
            "| site | form | layout | H / Hkv | D | Sq | Skv | mask | causal | role | status |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in r["sites"]:
            lines.append(
                f"| `{s.module_path or s.node}` | {s.form} | {s.layout} | {s.heads} / {s.kv_heads} | "
                f"{s.head_dim} | {s.q_len} | {s.kv_len} | {s.mask or '-'} | {'yes' if s.causal else 'no'} "
                f"| {s.role} | {s.status} |"
            )
        lines.append("")
    if seen is not None:
        lines += property_section(seen)
    return "\n".join(lines).rstrip() + "\n"


def _diffusers_version() -> str | None:
    try:
        import diffusers
    except ImportError:
        return None
    return diffusers.__version__


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--stdout", action="store_true", help="print instead of writing docs/coverage.md"
    )
    ap.add_argument(
        "--no-properties", action="store_true", help="skip the generated-program summary"
    )
    opts = ap.parse_args()
    os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")
    import logging

    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    results = []
    for name, _, make in _models():
        r = measure(name, make)
        print(
            f"{name}: {r['found']}/{r['present']} found, {r['rewritten']} rewritten ({r['seconds']:.1f}s)",
            file=sys.stderr,
        )
        results.append(r)
    seen = None if opts.no_properties else property_stats()
    text = render(results, seen)
    if opts.stdout:
        print(text)
        return
    out = ROOT / "docs" / "coverage.md"
    out.write_text(text)
    print(f"wrote {out.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
