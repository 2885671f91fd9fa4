"""The vocabulary every layer shares: what the pass reports about each attention site, and each
softmax it judged not to be attention.

These rows are public: `explain` prints them, site policies and backends' support checks read
them. It sits at the bottom of the package so that the pass, the backends and the policy can all
speak it without importing one another. The matcher's internal details live in
`passes/find_sites.py`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

REWRITTEN = "rewritten"
SKIPPED = "skipped"

SITE_ROLES = ("self", "cross", "joint")  # AttentionSite.role

# The masks a site can have (`AttentionSite.mask_kind`), and a backend can declare it applies
# (`AttentionBackend.mask_kinds`). A backend that takes MASK_BOOL takes key padding masks too.
MASK_BOOL = "bool"  # boolean, True = attend, over any of batch, heads, queries, keys
MASK_ADDITIVE = "additive"  # float, added to the logits
MASK_KEY_PADDING = "key_padding"  # boolean, varying over batch and keys only
MASK_KINDS = (MASK_BOOL, MASK_ADDITIVE, MASK_KEY_PADDING)


@dataclass
class AttentionSite:
    """One attention computation found in a traced graph.

    Sizes are those of the canonical `[batch, seq, heads, head_dim]` view the backend receives.
    `heads` is 1 when the model merged batch and heads and the split could not be recovered.
    """

    module_path: str
    form: str  # sdpa | matmul | bmm | baddbmm | einsum
    layout: str  # the model's layout of q, e.g. BHSD, BSHD, (B*H)SD
    batch: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    value_head_dim: int | None = None
    q_len: int | None = None
    kv_len: int | None = None
    scale: float | None = None
    causal: bool = False
    mask: str | None = None  # None | MASK_BOOL | MASK_ADDITIVE
    mask_keys_only: bool = False  # the mask varies over batch and keys only (key padding)
    role: str = "self"  # self | cross | joint
    dtype: str = ""
    device: str = ""
    backend: str | None = None
    status: str = SKIPPED
    reason: str = ""
    node: str = ""  # name of the anchor node (softmax or SDPA call) in the traced graph
    graph: int = 0  # index of the Dynamo graph the site was found in
    joint_text_len: int | None = None  # joint attention: how many tokens are text
    joint_text_first: bool | None = None  # joint attention: text tokens precede the video ones
    # `fv_compile.verify`'s comparison of the rewrite with the traced code (a SiteCheck), if run
    check: Any = None

    @property
    def mask_kind(self) -> str | None:
        """None, MASK_ADDITIVE, MASK_KEY_PADDING (a boolean mask over batch and keys only) or
        MASK_BOOL (any other boolean mask)."""
        if self.mask == MASK_BOOL and self.mask_keys_only:
            return MASK_KEY_PADDING
        return self.mask

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["check"] = self.check.to_dict() if self.check is not None else None
        return row


@dataclass
class NonAttentionSoftmax:
    """A softmax the matcher examined and left alone, with the reason."""

    module_path: str
    node: str
    reason: str
    graph: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
