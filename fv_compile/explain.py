"""The report `explain` returns: one row per attention site, the softmaxes that are not attention,
and what Dynamo did not capture: graph breaks, frames it ran eagerly, attention calls outside any
graph.

A site the pass never saw cannot be rewritten, and the site table cannot show it. Three things
hide code from the pass: a graph break (the code between two graphs runs eagerly), a frame Dynamo
gave up on (a graph break it cannot resume from, e.g. inside a loop: the whole function runs
eagerly), and a recompile limit. `explain` reports each of them with Dynamo's reason, and counts
the attention calls (SDPA, softmax) of an eager run against the ones its graphs executed, so
attention that ran outside every graph is named with its source line.
"""

from __future__ import annotations

import os
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from types import FrameType
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fv_compile.site import (
    MASK_ADDITIVE_KEY_PADDING,
    MASK_KEY_PADDING,
    REWRITTEN,
    AttentionSite,
    NonAttentionSoftmax,
    SequenceShard,
    TokenOrder,
)

_COLUMNS = [
    ("site", lambda s: s.module_path or s.node),
    ("form", lambda s: s.form),
    ("layout", lambda s: s.layout),
    ("B", lambda s: s.batch),
    ("H", lambda s: s.heads),
    ("Hkv", lambda s: s.kv_heads),
    ("D", lambda s: s.head_dim),
    ("Sq", lambda s: s.q_len),
    ("Skv", lambda s: s.kv_len),
    ("scale", lambda s: f"{s.scale:.4g}" if s.scale is not None else None),
    ("causal", lambda s: "yes" if s.causal else "no"),
    ("mask", lambda s: _mask_cell(s)),
    ("role", lambda s: s.role),
    ("backend", lambda s: s.backend or "-"),
    ("status", lambda s: s.status),
    ("reason", lambda s: s.reason or ""),
]


def _mask_cell(site: AttentionSite) -> str:
    """`bool`, `additive`, or `bool keys` / `additive keys` for key padding (over batch and keys
    only: the masks the fast dense backends take)."""
    if site.mask is None:
        return "-"
    return (
        f"{site.mask} keys"
        if site.mask_kind in (MASK_KEY_PADDING, MASK_ADDITIVE_KEY_PADDING)
        else site.mask
    )


def _check_cell(site: AttentionSite) -> str:
    c = site.check
    if c is None:
        return "-"
    text = f"{'ok' if c.ok else 'FAIL'} rel {c.output.rel_l2:.1e}"
    if not c.output.nan_match:
        text += " nan-mismatch"
    if c.traced is not None:  # held to its sparse definition; how far that is from dense
        text += f" vs its definition (dense {c.traced.rel_l2:.1e})"
    worst = c.worst_gradient
    if worst is not None:
        text += f", grad {worst.rel_l2:.1e}" + ("" if worst.nan_match else " nan-mismatch")
    return text


# shown when any site was checked (fv_compile.verify, or explain(verify=True))
_CHECK_COLUMN = ("verify", _check_cell)
# shown when any site was tuned under an accuracy budget: the winner, its time and error
_TUNED_COLUMN = ("tuned", lambda s: s.tuning.cell() if s.tuning is not None else "-")


# -- source locations ---------------------------------------------------------------------------


def short_path(path: str, parts: int = 3) -> str:
    """The last `parts` components of a path: enough to find the file, short enough to print."""
    pieces = path.replace("\\", "/").split("/")
    return "/".join(pieces[-parts:])


def where(filename: str | None, line: int | None, function: str | None = None) -> str:
    """`pkg/module.py:123 in fn` (empty when the file is unknown)."""
    if not filename:
        return ""
    text = f"{short_path(filename)}:{line}" if line is not None else short_path(filename)
    return f"{text} in {function}" if function else text


_STACK_LINE = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def stack_location(stack_trace: str | None) -> tuple[str, int, str] | None:
    """The innermost `(file, line, function)` of an FX node's `meta["stack_trace"]`."""
    if not stack_trace:
        return None
    found = _STACK_LINE.findall(stack_trace)
    if not found:
        return None
    filename, line, function = found[-1]
    return filename, int(line), function


# -- Dynamo's messages --------------------------------------------------------------------------


_CONTEXT = "Developer debug context:"
_CHAINED = "*** While handling this graph break, another graph break occurred: ***"


def dynamo_reason(message: str) -> tuple[str, str]:
    """`(reason, hint)` from one of Dynamo's graph-break / failure messages.

    The reason is each graph-break type with its developer context, chained with "; then " when
    handling one break caused another ("Dynamic shape operator (aten.nonzero.default); then graph
    break in loop"); the hint is Dynamo's first hint."""
    reasons, hint = [], ""
    for part in message.split(_CHAINED):
        lines = [ln.strip() for ln in part.strip().splitlines() if ln.strip()]
        if not lines:
            continue
        head = lines[0]
        context = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(_CONTEXT)), "")
        if context and not context.startswith("frame skipped") and len(context) < 120:
            head = f"{head} ({context})"
        reasons.append(head)
        if not hint:
            hint = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Hint:")), "")
    return "; then ".join(reasons) or message.strip()[:200], hint


@dataclass
class GraphBreak:
    """A graph break Dynamo resumed from: the code up to it is one graph, the code after it
    another, and whatever sat at the break (the op it could not trace) ran eagerly."""

    reason: str  # Dynamo's reason, e.g. "Dynamic shape operator (aten.nonzero.default)"
    where: list[str] = field(default_factory=list)  # user lines that broke the graph, when known
    count: int = 1  # how many times Dynamo broke a frame for this reason
    hint: str = ""  # Dynamo's hint for removing it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SkippedFrame:
    """A function Dynamo gave up compiling: all of it runs eagerly (its nested calls may still be
    compiled as frames of their own). Recompile-limit fallbacks are skipped frames too."""

    function: str  # "MochiAttnProcessor2_0.__call__" or the code name
    location: str  # where the function is defined
    reason: str
    where: str = ""  # the user line that made Dynamo give up, when known
    hint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class UncapturedAttention:
    """Attention calls at one source line that ran outside every compiled graph (so no pass saw
    them and nothing rewrote them), from an eager run of the same call."""

    where: str  # the source line of the call
    op: str  # "scaled_dot_product_attention" or "softmax"
    calls: int  # calls at this line in the eager run
    captured: int  # of them, how many ran inside compiled graphs

    @property
    def uncaptured(self) -> int:
        return self.calls - self.captured

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "uncaptured": self.uncaptured}


@dataclass
class ExplainReport:
    sites: list[AttentionSite] = field(default_factory=list)
    non_attention: list[NonAttentionSoftmax] = field(default_factory=list)
    graphs: int = 0
    graph_breaks: list[GraphBreak] = field(default_factory=list)
    skipped_frames: list[SkippedFrame] = field(default_factory=list)
    # None: not measured (only `fv_compile.explain` runs the model eagerly to count)
    uncaptured: list[UncapturedAttention] | None = None
    # per graph whose sites include a backend that works in a token order: whether the graph
    # between them runs in that order, or why not
    token_order: list[TokenOrder] = field(default_factory=list)
    # with sequence_parallel: what became of the stretch between the video sites
    sequence_parallel: list[SequenceShard] = field(default_factory=list)

    @property
    def rewritten(self) -> list[AttentionSite]:
        return [s for s in self.sites if s.status == REWRITTEN]

    @property
    def skipped(self) -> list[AttentionSite]:
        return [s for s in self.sites if s.status != REWRITTEN]

    @property
    def checked(self) -> list[AttentionSite]:
        return [s for s in self.sites if s.check is not None]

    @property
    def verified(self) -> bool:
        """Every rewritten site was checked against the traced code, and every check passed."""
        return all(s.check is not None and s.check.ok for s in self.rewritten)

    @property
    def uncaptured_calls(self) -> int:
        """Attention calls (SDPA, softmax) of the explained call that ran outside every graph."""
        return sum(u.uncaptured for u in self.uncaptured or ())

    def to_dict(self) -> dict[str, Any]:
        return {
            "graphs": self.graphs,
            "sites": [s.to_dict() for s in self.sites],
            "non_attention": [n.to_dict() for n in self.non_attention],
            "graph_breaks": [b.to_dict() for b in self.graph_breaks],
            "skipped_frames": [f.to_dict() for f in self.skipped_frames],
            "uncaptured": None
            if self.uncaptured is None
            else [u.to_dict() for u in self.uncaptured],
            "uncaptured_calls": None if self.uncaptured is None else self.uncaptured_calls,
            "token_order": [t.to_dict() for t in self.token_order],
            "sequence_parallel": [t.to_dict() for t in self.sequence_parallel],
            "summary": {"found": len(self.sites), "rewritten": len(self.rewritten)},
            "verified": self.verified if self.checked else None,
        }

    def __str__(self) -> str:
        head = (
            f"fv_compile: {len(self.sites)} attention site(s) in {self.graphs} graph(s), "
            f"{len(self.rewritten)} rewritten"
        )
        extra = []
        if self.graph_breaks:
            extra.append(f"{sum(b.count for b in self.graph_breaks)} graph break(s)")
        if self.skipped_frames:
            extra.append(f"{len(self.skipped_frames)} frame(s) run eagerly")
        if self.uncaptured_calls:
            extra.append(f"{self.uncaptured_calls} attention call(s) outside any graph")
        if self.checked:
            bad = [s for s in self.checked if not s.check.ok]
            extra.append(f"verified {len(self.checked) - len(bad)}/{len(self.checked)} ok")
        if extra:
            head += "; " + ", ".join(extra)
        tuned = [s for s in self.sites if s.tuning is not None]
        columns = _COLUMNS[:-1] + ([_CHECK_COLUMN] if self.checked else [])
        columns += ([_TUNED_COLUMN] if tuned else []) + _COLUMNS[-1:]
        rows = [[name for name, _ in columns]]
        rows += [
            ["-" if (v := get(s)) is None else str(v) for _, get in columns] for s in self.sites
        ]
        lines = [head, ""] + _table(rows) if self.sites else [head]
        if tuned:
            lines += ["", _tuning_head(tuned)]
            for site in tuned:
                lines.append(
                    f"  {site.module_path or site.node}: {site.tuning.choice} "
                    f"({_TUNING_SOURCES.get(site.tuning.source, site.tuning.source)})"
                )
                lines += [f"    {line}" for line in site.tuning.describe()]
        if self.token_order:
            lines += ["", "token order (backends that reorder their tokens):"]
            lines += [f"  {t.describe()}" for t in self.token_order]
        if self.sequence_parallel:
            lines += ["", f"sequence parallel over {self.sequence_parallel[0].degree} ranks:"]
            lines += [f"  {t.describe()}" for t in self.sequence_parallel]
        if self.non_attention:
            lines += ["", "softmaxes that are not attention:"]
            lines += [
                f"  {n.module_path or '-'} ({n.node}): {n.reason}" for n in self.non_attention
            ]
        if self.uncaptured_calls:
            lines += [
                "",
                "attention that ran outside every graph (never seen by the pass, not rewritten):",
            ]
            for u in self.uncaptured or ():
                if u.uncaptured:
                    lines.append(f"  {u.where}: {u.op} x{u.uncaptured} (of {u.calls} calls)")
        if self.skipped_frames:
            lines += ["", "frames Dynamo did not compile (they ran eagerly):"]
            for f in self.skipped_frames:
                at = f" at {f.where}" if f.where else ""
                lines.append(f"  {f.function} ({f.location}): {f.reason}{at}")
                if f.hint:
                    lines.append(f"    hint: {f.hint}")
        if self.graph_breaks:
            lines += ["", "graph breaks (the code at each break ran eagerly):"]
            for b in self.graph_breaks:
                at = f" at {', '.join(b.where)}" if b.where else ""
                lines.append(f"  {b.reason} x{b.count}{at}")
                if b.hint:
                    lines.append(f"    hint: {b.hint}")
        return "\n".join(lines)

    __repr__ = __str__


_TUNING_SOURCES = {
    "measured": "measured on this call's inputs",
    "cache": "from the tuning cache: measured by an earlier process",
    "only": "the one backend that can run it",
    "unmeasured": "auto's default: the site could not be measured",
}


def _tuning_head(tuned: list[AttentionSite]) -> str:
    budgets = sorted({s.tuning.budget for s in tuned})
    return (
        f"accuracy budget {', '.join(f'{b:g}' for b in budgets)} (relative L2 error of a site's "
        "output against float32 attention on the same inputs): each candidate's error and time, "
        "the fastest qualifying one chosen (approximate backends must be within the budget; "
        "exact ones are held to verify's tolerance for the dtype instead, auto's default always "
        "qualifies):"
    )


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for k, r in enumerate(rows):
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


# -- attention calls: in graphs, and in an eager run --------------------------------------------

SDPA = "scaled_dot_product_attention"
SOFTMAX = "softmax"
_SDPA_FUNCS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_SOFTMAX_FUNCS = {torch.softmax, F.softmax, torch.special.softmax, torch.Tensor.softmax}
Location = tuple[str, int]  # (file, line)


def anchor_kind(node: torch.fx.Node) -> str | None:
    """SDPA or softmax for the nodes the pass anchors on (any spelling), else None."""
    if node.op == "call_function":
        if node.target in _SDPA_FUNCS:
            return SDPA
        if node.target in _SOFTMAX_FUNCS:
            return SOFTMAX
    elif node.op == "call_method" and node.target == "softmax":
        return SOFTMAX
    return None


def graph_anchors(gm: torch.fx.GraphModule) -> list[tuple[str, Location | None]]:
    """`(kind, (file, line))` of every SDPA/softmax call in a Dynamo graph."""
    out = []
    for node in gm.graph.nodes:
        kind = anchor_kind(node)
        if kind is not None:
            loc = stack_location(node.meta.get("stack_trace"))
            out.append((kind, None if loc is None else (loc[0], loc[1])))
    return out


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


class AttentionCallCounter(TorchFunctionMode):
    """Counts SDPA and softmax calls by the source line that made them (eager code only)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[tuple[str, str, int, str]] = Counter()  # (kind, file, line, function)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kind = SDPA if func in _SDPA_FUNCS else SOFTMAX if func in _SOFTMAX_FUNCS else None
        if kind is not None:
            frame: FrameType | None = sys._getframe(1)
            while frame is not None and (
                frame.f_code.co_filename.startswith(_TORCH_DIR)
                or frame.f_code.co_filename == __file__
            ):
                frame = frame.f_back
            if frame is not None:
                self.calls[
                    (kind, frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name)
                ] += 1
        return func(*args, **(kwargs or {}))


def uncaptured_attention(
    eager: Counter[tuple[str, str, int, str]],
    graphs: list[list[tuple[str, Location | None]]],
    runs: list[int],
) -> list[UncapturedAttention]:
    """Per source line: the eager run's attention calls against those the graphs executed."""
    captured: Counter[tuple[str, Location]] = Counter()
    for anchors, n in zip(graphs, runs):
        for kind, loc in anchors:
            if loc is not None:
                captured[(kind, loc)] += n
    out = []
    for (kind, filename, line, function), calls in eager.items():
        got = min(calls, captured.get((kind, (filename, line)), 0))
        out.append(UncapturedAttention(where(filename, line, function), kind, calls, got))
    return sorted(out, key=lambda u: (-u.uncaptured, u.where))
