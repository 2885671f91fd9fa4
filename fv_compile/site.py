"""The vocabulary every layer shares: what the pass reports about each attention site, and each
softmax it judged not to be attention.

These rows are public: `explain` prints them, site policies and backends' support checks read
them. It sits at the bottom of the package so that the pass, the backends and the policy can all
speak it without importing one another. The matcher's internal details live in
`passes/find_sites.py`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

REWRITTEN = "rewritten"
SKIPPED = "skipped"

SITE_ROLES = ("self", "cross", "joint")  # AttentionSite.role

# The masks a site can have (`AttentionSite.mask_kind`), and a backend can declare it applies
# (`AttentionBackend.mask_kinds`). A backend that takes MASK_BOOL takes key padding masks too, and
# one that takes MASK_ADDITIVE takes additive key padding masks.
MASK_BOOL = "bool"  # boolean, True = attend, over any of batch, heads, queries, keys
MASK_ADDITIVE = "additive"  # float, added to the logits
MASK_KEY_PADDING = "key_padding"  # boolean, varying over batch and keys only
# float, varying over batch and keys only, whose every value is proven (from the graph) to be 0
# or one value that blocks (`blocking_limit`), with eager's fully blocked rows reproducible
# (`AttentionSite.additive_padding_issue`): attention over the keys it keeps
MASK_ADDITIVE_KEY_PADDING = "additive_key_padding"
MASK_KINDS = (MASK_BOOL, MASK_ADDITIVE, MASK_KEY_PADDING, MASK_ADDITIVE_KEY_PADDING)
KEY_PADDING_KINDS = (MASK_KEY_PADDING, MASK_ADDITIVE_KEY_PADDING)

# A logit at or below this (at the softmax input, after every later scale) is blocked: exp() of it,
# against any row maximum above -1e30 + 104, underflows to zero in float32 and below. The rule
# assumes logits of magnitude below 1e30, which no float32 attention computes (its softmax would be
# an arg-max); a moderate fill (-1e4, -1e9) is not assumed to block: logits of 1e4 are within
# reach of unnormalised q and k, and where they are, eager's weights go to the filled keys.
VERY_NEGATIVE = -1.0e30


def blocking_limit(scale: float) -> float:
    """The largest logit (at the softmax input) a finite fill may end at and still count as
    blocking: -1e30, and -1e30 in units of the unscaled q.k when the scores are scaled up."""
    return min(VERY_NEGATIVE, VERY_NEGATIVE * scale)


# What eager gives a row whose every key an additive key padding mask blocks with one finite value
# c: softmax(s + c) over all its keys. When c swamps every logit the blocking rule allows (finfo.min),
# s + c rounds to c: uniform weights, the mean of v. A smaller c (-1e35) leaves s + c to rounding in
# whatever dtype eager adds in, which a fast path cannot reproduce: such masks keep the masked path.
EMPTY_UNIFORM = "uniform"


def fully_blocked_rows(fill: float, scale: float) -> str | None:
    """EMPTY_UNIFORM when every logit `s` the blocking rule assumes (`|s| <= -blocking_limit`)
    gives `s + fill == fill` in float32 (and so in every narrower dtype), else None."""
    import torch  # the site vocabulary imports no torch at module level

    bound = -blocking_limit(scale)
    c = torch.tensor(fill, dtype=torch.float32)
    if math.isfinite(fill) and bool((c + bound == c) & (c - bound == c)):  # rounding is monotonic
        return EMPTY_UNIFORM
    return None


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
    # an additive mask: every value it can take as the op receives it, proven from the graph (it
    # is built from booleans and constants); None when they are not known at compile time
    mask_values: tuple[float, ...] | None = None
    role: str = "self"  # self | cross | joint
    dtype: str = ""
    device: str = ""
    # the site's output takes part in autograd where it runs (a training graph): gradients flow
    # back through it to q, k, v or the mask
    trains: bool = False
    backend: str | None = None
    status: str = SKIPPED
    reason: str = ""
    node: str = ""  # name of the anchor node (softmax or SDPA call) in the traced graph
    graph: int = 0  # index of the Dynamo graph the site was found in
    joint_text_len: int | None = None  # joint attention: how many tokens are text
    joint_text_first: bool | None = None  # joint attention: text tokens precede the video ones
    # `fv_compile.verify`'s comparison of the rewrite with the traced code (a SiteCheck), if run
    check: Any = None
    # under an accuracy budget: the backends measured for the site, and which won (a SiteTuning)
    tuning: Any = None

    @property
    def mask_kind(self) -> str | None:
        """None, MASK_KEY_PADDING (a boolean mask over batch and keys only), MASK_BOOL (any other
        boolean mask), MASK_ADDITIVE_KEY_PADDING (see `additive_padding_issue`) or MASK_ADDITIVE
        (any other additive mask)."""
        if self.mask == MASK_BOOL and self.mask_keys_only:
            return MASK_KEY_PADDING
        if self.mask == MASK_ADDITIVE and self.additive_padding_issue() is None:
            return MASK_ADDITIVE_KEY_PADDING
        return self.mask

    @property
    def padding_fill(self) -> float | None:
        """The one value an additive key padding mask blocks keys with (-inf or finite), or None
        (no such mask, or it blocks no key)."""
        if self.mask != MASK_ADDITIVE or self.mask_values is None:
            return None
        limit = blocking_limit(self.scale or 1.0)
        blocks = {v for v in self.mask_values if v <= limit}
        return blocks.pop() if len(blocks) == 1 else None

    def additive_padding_issue(self) -> str | None:
        """None when the site's additive mask is key padding: it varies over batch and keys only,
        and every value it takes is 0 (attend) or one value that blocks (-inf, or finite and at
        most `blocking_limit(scale)`) with which eager's fully blocked rows are reproducible
        (`fully_blocked_rows`); else why not, phrased for `explain`. Attention under such a
        mask is attention over the keys it keeps."""
        if self.mask != MASK_ADDITIVE:
            return "it is not additive"
        if not self.mask_keys_only:
            return "it varies over queries or heads"
        if self.mask_values is None:
            return (
                "its values are not known at compile time (not built from booleans and constants)"
            )
        limit = blocking_limit(self.scale or 1.0)
        odd = [v for v in self.mask_values if v != 0 and not v <= limit]
        if odd:
            return f"it takes the value {odd[0]:g}, neither 0 nor blocking (<= {limit:g})"
        blocks = sorted({v for v in self.mask_values if v <= limit})
        if len(blocks) > 1:
            return f"it blocks with more than one value ({', '.join(f'{b:g}' for b in blocks)})"
        if (
            blocks
            and math.isfinite(blocks[0])
            and fully_blocked_rows(blocks[0], self.scale or 1.0) is None
        ):
            return (
                f"a row it blocks entirely gets softmax(logits + {blocks[0]:g}) in eager, which "
                "rounding decides (a fast backend takes -inf, or a value like finfo.min that "
                "swamps every logit)"
            )
        return None

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["check"] = self.check.to_dict() if self.check is not None else None
        row["tuning"] = self.tuning.to_dict() if self.tuning is not None else None
        if self.mask_values is not None:  # strict JSON: -inf as a string
            row["mask_values"] = [v if math.isfinite(v) else str(v) for v in self.mask_values]
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


@dataclass
class TokenOrder:
    """What became of the token order of a backend that works in one (sliding tile attention's
    tile order) in one graph: whether the stretch between its sites runs in that order, gathered
    once where the tokens enter it and scattered once where they leave, or why each site keeps
    reordering its own q, k, v and output."""

    graph: int
    backend: str
    hoisted: bool
    reason: str = ""  # why not, when not
    sites: int = 0  # sites that receive their tokens already in order
    video_len: int = 0
    gathered: list[str] = field(default_factory=list)  # graph values gathered where tokens enter
    scattered: list[str] = field(default_factory=list)  # graph values scattered where they leave
    stopped_at: str = ""  # the node that stopped the proof, when one did
    note: str = ""  # e.g. what regional compilation leaves out of reach
    bytes_per_site: int = 0  # what the sites' own reorders copy per call (q, k, v, output)
    bytes_hoisted: int = 0  # what the gathers and scatters at the borders copy instead

    def describe(self) -> str:
        if not self.hoisted:
            return f"graph {self.graph}: each {self.backend} site reorders its own tokens: {self.reason}"
        text = (
            f"graph {self.graph}: {self.sites} {self.backend} site(s) run in its token order between "
            f"{len(self.gathered)} gather(s) where the tokens enter ({', '.join(self.gathered)}) and "
            f"{len(self.scattered)} scatter(s) where they leave ({', '.join(self.scattered)}): "
            f"{_mib(self.bytes_hoisted)} copied per call instead of {_mib(self.bytes_per_site)}, at the "
            "steps whose metadata holds the order as a permutation (other steps run per site)"
        )
        return text + (f"; {self.note}" if self.note else "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SequenceShard:
    """What sequence parallelism made of the graphs compiled with one outcome: whether the
    stretch between their video self- and joint-attention sites runs on each rank's share of the
    video tokens (cut where the tokens enter it, gathered once where they leave), or why each
    such site takes its share of replicated tokens and gathers its own output."""

    degree: int
    sharded: bool
    reason: str = ""  # why not, when not
    sites: int = 0  # sites run on their share, per graph
    video_len: int = 0
    cut: list[str] = field(default_factory=list)  # graph values cut to the share where they enter
    gathered: list[str] = field(default_factory=list)  # values gathered whole where they leave
    stopped_at: str = ""  # the node that stopped the proof, when one did
    graphs: int = 1  # compiled graphs (blocks, metadata variants) with this outcome

    def describe(self) -> str:
        times = f"{self.graphs} compiled graph(s)"
        if not self.sharded:
            return f"{times}: each video site shards and gathers its own tokens: {self.reason}"
        return (
            f"{times}: {self.sites} site(s) and the ops between them run on this rank's share "
            f"of the {self.video_len} video tokens (1/{self.degree}), cut where they enter "
            f"({', '.join(self.cut)}) and gathered where they leave ({', '.join(self.gathered)})"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mib(n: int) -> str:
    return f"{n / 2**20:.3g} MiB"
