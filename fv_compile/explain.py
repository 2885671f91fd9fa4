"""The report `explain` returns: one row per attention site, plus the softmaxes that are not attention."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fv_compile.passes.site import REWRITTEN, AttentionSite, NonAttentionSoftmax

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
    ("mask", lambda s: s.mask or "-"),
    ("role", lambda s: s.role),
    ("backend", lambda s: s.backend or "-"),
    ("status", lambda s: s.status),
    ("reason", lambda s: s.reason or ""),
]


@dataclass
class ExplainReport:
    sites: list[AttentionSite] = field(default_factory=list)
    non_attention: list[NonAttentionSoftmax] = field(default_factory=list)
    graphs: int = 0

    @property
    def rewritten(self) -> list[AttentionSite]:
        return [s for s in self.sites if s.status == REWRITTEN]

    @property
    def skipped(self) -> list[AttentionSite]:
        return [s for s in self.sites if s.status != REWRITTEN]

    def to_dict(self) -> dict[str, Any]:
        return {
            "graphs": self.graphs,
            "sites": [s.to_dict() for s in self.sites],
            "non_attention": [n.to_dict() for n in self.non_attention],
            "summary": {"found": len(self.sites), "rewritten": len(self.rewritten)},
        }

    def __str__(self) -> str:
        head = (
            f"fv_compile: {len(self.sites)} attention site(s) in {self.graphs} graph(s), "
            f"{len(self.rewritten)} rewritten"
        )
        rows = [[name for name, _ in _COLUMNS]]
        rows += [["-" if (v := get(s)) is None else str(v) for _, get in _COLUMNS] for s in self.sites]
        lines = [head, ""] + _table(rows) if self.sites else [head]
        if self.non_attention:
            lines += ["", "softmaxes that are not attention:"]
            lines += [f"  {n.module_path or '-'} ({n.node}): {n.reason}" for n in self.non_attention]
        return "\n".join(lines)

    __repr__ = __str__


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for k, r in enumerate(rows):
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return out
