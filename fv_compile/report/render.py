"""Writing a report: `report.md` for people, `report.json` for tools, `speedup.png` for slides.

The markdown tables and the printed table come from the same rows, so what the terminal shows is
what the file says. Accuracy columns sit beside the speed columns in every view, the chart included.
"""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path
from typing import Any

from fv_compile.report.measure import KERNEL_KINDS, TIMING_RULE, AttentionShare
from fv_compile.report.run import Report
from fv_compile.report.variants import FV_COMPILE, RAN_DENSE, SERVED_NO_SITE, VariantResult

COMPILE_COLUMN = "compile s (cold / warm)"

VARIANT_COLUMNS = [
    "variant", "status", "ms/step (median)", "min-max ms", "vs eager", "vs torch.compile",
    "max abs err", "rel err", "cos sim", COMPILE_COLUMN, "graphs", "recompiles",
    "metadata variants", "peak mem", "attention share", "sites rewritten", "verified", "compiled",
]  # fmt: skip


# The terminal gets the columns that decide adoption; report.md has them all.
TERMINAL_COLUMNS = [
    "variant", "status", "ms/step (median)", "vs eager", "vs torch.compile", "rel err", "cos sim",
    COMPILE_COLUMN, "graphs", "recompiles", "peak mem", "attention share", "verified",
]  # fmt: skip

NOISY = "noisy timing"


def status_cell(r: VariantResult) -> str:
    """ "ok", "ran dense", "served no site", "FAILED (phase)"; ", noisy timing" when the timing
    is flagged; the steps a sparse backend ran dense when only some did."""
    if not r.ok:
        return f"FAILED ({r.failed_during})"
    text = r.status
    if r.dense_steps and r.status == "ok" and r.latency is not None:
        text += f" ({len(r.dense_steps)} step(s) dense)"
    return text + (f", {NOISY}" if r.timing_flag else "")


def variant_rows(report: Report) -> list[list[str]]:
    rows = []
    for r in report.variants:
        share = report.eager_attention.share if r.kind == "eager" else r.attention
        if share is not None and r.kind != "eager" and not share.calls:
            share = None  # no fv_compile::attention op to time (plain torch.compile)
        if not r.ok:
            rows.append([r.name, status_cell(r)] + ["-"] * (len(VARIANT_COLUMNS) - 2))
            continue
        lat, err = r.latency, r.error_vs_eager
        assert lat is not None, "a variant that did not fail was timed"
        rows.append([
            r.name,
            status_cell(r),
            f"{lat.median_ms:.2f}",
            f"{lat.min_ms:.2f}-{lat.max_ms:.2f}",
            _ratio(r.speedup_vs_eager),
            _ratio(r.speedup_vs_torch_compile),
            "ref" if r.kind == "eager" else _sci(err.max_abs if err else None),
            "ref" if r.kind == "eager" else _sci(err.rel_fro if err else None),
            "ref" if r.kind == "eager" else (f"{err.cosine:.6f}" if err else "-"),
            _compile_cell(r),
            _int(r.graphs),
            _int(r.recompiles),
            _int(r.metadata_variants),
            _bytes(r.peak_memory_bytes),
            "-" if share is None else f"{100 * share.share:.1f}%",
            _sites(r.explain),
            _verified(r.verify),
            r.regional or "-",
        ])  # fmt: skip
    return rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """Aligned columns for a terminal."""
    table = [header] + rows
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def terminal_table(report: Report) -> str:
    """The variants table for stdout; peak memory is left out where it is not measured (CPU)."""
    columns = [c for c in TERMINAL_COLUMNS if c != "peak mem" or report.environment["gpu"]]
    keep = [VARIANT_COLUMNS.index(c) for c in columns]
    return text_table(columns, [[row[i] for i in keep] for row in variant_rows(report)])


def report_notes(report: Report) -> list[str]:
    """What the table's cells cannot say: variants that ran dense, noisy timings (with the rule),
    what the fv_compile variants compiled, warm compiles that missed the caches."""
    notes = []
    for r in report.variants:
        if r.ok and r.dense_reason and r.dense_steps:
            if r.status == RAN_DENSE:
                lead = "ran dense, not sparse: every step of the loop was full attention"
            else:
                lead = f"ran {len(r.dense_steps)} of {report.config.get('steps')} step(s) as full attention"
            notes.append(f"**{r.name}** {lead}: {r.dense_reason}.")
        if r.ok and r.unserved_reason:
            notes.append(
                f"**{r.name}** served no site, so its numbers are another backend's: "
                f"{r.unserved_reason}."
            )
    noisy = [r for r in report.variants if r.ok and r.timing_flag]
    if noisy:
        notes.append(
            "Noisy timing ("
            + "; ".join(f"**{r.name}**: {r.timing_flag}" for r in noisy)
            + f"). Rule: {TIMING_RULE}."
        )
    compiled = [r.regional for r in report.variants if r.kind == FV_COMPILE and r.ok and r.regional]
    if compiled:
        regional = report.config.get("regional", "auto")
        how = (
            "by default (regional='auto')" if regional == "auto" else f"with regional={regional!r}"
        )
        notes.append(
            f"fv_compile variants are fv_compile.compile(model, backend) as a user gets it {how}: "
            f"it compiled {compiled[0]}"
            + ("; the code between the blocks runs eagerly." if "blocks" in compiled[0] else ".")
        )
    for r in report.variants:
        if r.ok and r.warm_note and r.warm_compile_s is not None and "no cache hits" in r.warm_note:
            notes.append(f"**{r.name}** warm compile: {r.warm_note}.")
    return notes


def busy_cpu_note(report: Report) -> str | None:
    """A warning when other processes were using the CPU as the run began: CPU timings can then
    swing by several times (threads of one op wait on a descheduled sibling)."""
    env = report.environment
    load = env.get("load_average_1min")
    if env["gpu"] is not None or load is None or load < 0.5:
        return None
    return (
        f"Other processes were using the CPU when this run began (1-min load average {load} on "
        f"{env['cpu_count']} cores): CPU timings vary with that load; rerun on an idle machine "
        "to compare."
    )


def render_markdown(report: Report) -> str:
    w, env = report.workload, report.environment
    parts = [
        f"# fv_compile report: {w['model']}",
        "",
        f"{w['class']}, {w['parameters'] / 1e6:.2f} M parameters, batch {w['batch']}, latent grid "
        f"{tuple(w['latent_grid'])}, {w['video_tokens']} video tokens, {w['dtype']} on "
        f"{env['gpu'] or env['cpu']}. Measured in one process in {report.wall_s:.0f} s.",
        "",
        "## Variants",
        "",
        markdown_table(VARIANT_COLUMNS, variant_rows(report)),
        "",
    ]
    if note := busy_cpu_note(report):
        parts += [f"> {note}", ""]
    failed = [r for r in report.variants if not r.ok]
    if failed:
        parts += ["## Failed variants", ""]
        parts += [
            f"- **{r.name}** failed during {r.failed_during}: `{_one_line(r.error)}`"
            for r in failed
        ]
        parts += ["", "Full tracebacks are in report.json.", ""]
    if notes := report_notes(report):
        parts += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    if report.analysis:
        parts += ["## fv_compile against plain torch.compile on this CPU", ""]
        parts += [p + "\n" for p in report.analysis]
    parts += ["## Attention share of one step", "", _attention_table(report), ""]
    if report.eager_attention.error:
        parts += [
            f"Eager attention could not be isolated: `{_one_line(report.eager_attention.error)}`",
            "",
        ]
    if kernels := _kernel_tables(report):
        parts += ["## GPU kernels of one profiled step", "", kernels, ""]
    parts += ["## Attention sites", ""]
    for r in report.variants:
        if r.kind == FV_COMPILE and r.explain_text:
            parts += [f"### {r.name}", "", "```", r.explain_text, "```", ""]
    parts += [
        "## Environment",
        "",
        markdown_table(["", ""], [[k, _cell(v)] for k, v in env.items()]),
        "",
    ]
    parts += [
        "## Configuration",
        "",
        markdown_table(["", ""], [[k, _cell(v)] for k, v in report.config.items()]),
        "",
    ]
    parts += ["## Method", ""] + [f"- **{k}**: {v}" for k, v in report.methods.items()] + [""]
    return "\n".join(parts)


def can_plot() -> bool:
    """Whether matplotlib (the optional `report` extra) is installed."""
    return importlib.util.find_spec("matplotlib") is not None


def write_report(report: Report, out_dir: str | Path, *, plot: bool = True) -> dict[str, Path]:
    """Write report.md, report.json and speedup.png into `out_dir`. The chart is skipped when
    `plot` is False or matplotlib is missing: minutes of measurement are never lost to it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "report.md", "json": out / "report.json"}
    paths["markdown"].write_text(render_markdown(report))
    paths["json"].write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if plot and can_plot():
        paths["plot"] = out / "speedup.png"
        plot_speedup(report, paths["plot"])
    return paths


def plot_speedup(report: Report, path: Path) -> None:
    """Bar per variant: median latency, min-max whiskers, speedup over eager and error above it.
    Uses matplotlib's Agg canvas directly, so no GUI backend or pyplot state is touched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    variants = report.variants
    fig = Figure(figsize=(max(6.0, 1.6 * len(variants) + 2), 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = range(len(variants))
    medians = [r.latency.median_ms if r.latency else 0.0 for r in variants]
    lows = [r.latency.median_ms - r.latency.min_ms if r.latency else 0.0 for r in variants]
    highs = [r.latency.max_ms - r.latency.median_ms if r.latency else 0.0 for r in variants]
    colors = [
        "#9e9e9e" if r.kind == "eager" else "#5c7cfa" if r.kind != FV_COMPILE else "#f08c00"
        for r in variants
    ]
    ax.bar(xs, medians, color=colors, yerr=[lows, highs], capsize=4)
    top = max(medians + [1e-9])
    for x, r in zip(xs, variants, strict=True):
        y = (r.latency.max_ms if r.latency else 0.0) + 0.02 * top
        ax.text(x, y, _bar_label(r), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), [r.name for r in variants], rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("ms per step (median; whiskers min-max)")
    ax.set_ylim(0, top * 1.35)
    w, env = report.workload, report.environment
    ax.set_title(
        f"{w['model']}: {w['video_tokens']} tokens, {w['dtype']}, {env['gpu'] or env['cpu']}",
        fontsize=10,
    )
    fig.savefig(path, dpi=120)


def _bar_label(r: VariantResult) -> str:
    if not r.ok:
        return "failed"
    if r.kind == "eager":
        return "1.00x (ref)"
    label = (
        _ratio(r.speedup_vs_eager)
        + " vs eager"
        + (f" ({r.status})" if r.status in (RAN_DENSE, SERVED_NO_SITE) else "")
    )
    if r.error_vs_eager is not None:
        label += f"\nrel err {r.error_vs_eager.rel_fro:.1e}"
    return label


def _profiled_shares(report: Report) -> list[tuple[str, AttentionShare]]:
    shares = [("eager (TORCH_SDPA sites, eager ops)", report.eager_attention.share)]
    shares += [(r.name, r.attention) for r in report.variants if r.attention and r.attention.calls]
    return [(name, a) for name, a in shares if a is not None]


def _kernel_tables(report: Report) -> str:
    """Each profiled step's device time by kernel kind, the part of it launched inside the
    attention ops, and its costliest kernels; empty where no step ran on a GPU."""
    shares = [(name, a) for name, a in _profiled_shares(report) if a.step_kernels_ms]
    if not shares:
        return ""
    kinds = [k for k in KERNEL_KINDS if any(k in a.step_kernels_ms for _, a in shares)]
    rows = [
        [name, f"{sum(a.step_kernels_ms.values()):.2f}"]
        + [f"{a.step_kernels_ms.get(k, 0.0):.2f}" for k in kinds]
        + [", ".join(f"{k} {ms:.2f}" for k, ms in sorted(a.op_kernels_ms.items())) or "-"]
        for name, a in shares
    ]
    header = ["profiled step", "kernels ms"] + [f"{k} ms" for k in kinds]
    header += ["inside the attention ops (ms)"]
    parts = [markdown_table(header, rows), ""]
    for name, a in shares:
        top = [[kernel[:100], str(n), f"{ms:.2f}"] for kernel, n, ms in a.top_kernels]
        if top:
            parts += [
                f"Costliest kernels, {name}:",
                "",
                markdown_table(["kernel", "launches", "ms"], top),
                "",
            ]
    return "\n".join(parts).rstrip()


def _attention_table(report: Report) -> str:
    rows = [
        [name, f"{a.attention_ms:.2f}", f"{a.step_ms:.2f}", f"{100 * a.share:.1f}%", str(a.calls)]
        for name, a in _profiled_shares(report)
    ]
    header = ["profiled step", "attention ms", "step ms", "share", "attention ops"]
    return markdown_table(header, rows) if rows else "No step could be profiled."


def _compile_cell(r: VariantResult) -> str:
    """`cold / warm` seconds; warm is "-" where it was not measured (the note says why), and
    marked "(miss)" when the second compile found nothing in the caches."""
    if r.compile_s is None:
        return "-"
    warm = "-" if r.warm_compile_s is None else f"{r.warm_compile_s:.1f}"
    if r.warm_compile_s is not None and r.warm_note and "no cache hits" in r.warm_note:
        warm += " (miss)"
    return f"{r.compile_s:.1f} / {warm}"


def _sites(explain: dict[str, Any] | None) -> str:
    if not explain:
        return "-"
    summary = explain["summary"]
    backends = Counter(s["backend"] for s in explain["sites"] if s["status"] == "rewritten")
    used = ", ".join(f"{name} x{n}" for name, n in backends.items())
    return f"{summary['rewritten']}/{summary['found']}" + (f" ({used})" if used else "")


def _verified(v: dict[str, Any] | None) -> str:
    if not v:
        return "-"
    if "error" in v:
        return "not run: " + _one_line(v["error"])[:60]
    if not v["sites"]:
        return "no sites"
    text = f"{v['sites'] - v['failed']}/{v['sites']} ok"
    if v["worst_rel_l2"] is not None:
        text += f" (worst {v['worst_rel_l2']:.1e})"
    if v.get("against_definition"):
        text += (
            f", {v['against_definition']} against their sparse definition "
            f"(up to {v['worst_vs_dense']:.1e} from dense)"
        )
    return text + (f", {v['nan_mismatch']} NaN mismatch" if v["nan_mismatch"] else "")


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _sci(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def _int(x: int | None) -> str:
    return "-" if x is None else str(x)


def _bytes(x: int | None) -> str:
    return "n/a" if x is None else f"{x / 2**30:.2f} GiB"


def _cell(v: Any) -> str:
    return "-" if v is None or v == "" else str(v)


def _one_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0][:300] if lines else ""
