"""Property-based tests of the attention matcher: random attention programs and random look-alikes.

Each example is a *program description* (a frozen dataclass whose repr is the falsifying example
hypothesis prints) from which `source()` generates a small Python function, e.g.

    def program(q, k, v, keep0):
        k = k.repeat_interleave(2, dim=1)
        ...
        s = torch.einsum("bhqd,bhkd->bhqk", q, k)
        s = s.masked_fill(~keep0, float("-inf"))
        p = F.softmax(s, dim=-1)
        return p @ v

The function is `exec`'d, run eagerly, and run once more inside torch.compile with the attention
pass (tests/_graphs.py `rewrite`, eager compiler). Invariants:

* attention programs (`Attn`, `Sdpa`): exactly one site, status "rewritten", the expected form and
  scale, one `fv_compile.attention` node and no softmax/SDPA left in the graph, output == eager
  (fp32 inputs, atol = rtol = 1e-5);
* look-alikes (`Attn` with a `perturb`ation, `Router`): no `fv_compile.attention` node, nothing
  reported rewritten, output == eager;
* both: every site is rewritten or carries a non-empty reason, and so does every softmax the pass
  reports as not attention.

Replaying a failure: hypothesis prints `Draw 1 (prog): Attn(...)` (the falsifying description,
shrunk) followed by the generated source. Paste the repr into

    from tests.test_properties import *; check_attention(Attn(...))   # or check_lookalike(...)

Budget: a fixed seed (`derandomize=True`, no example database) and 648 random programs per run
(see the N_* constants), plus a deterministic one-factor-at-a-time sweep (`ONE_FACTOR`, ~270
programs) that runs every form the generators know, each changed alone from a plain base program:
hypothesis' choices also draw on constants collected from the loaded modules, so which rare
combinations the random programs reach varies with the test selection, while the sweep does not.
Every example resets Dynamo, so the recompile limit is never reached and each example costs one
fresh Dynamo trace (~0.1 s with the eager compiler); the file runs in ~3 min on 2 CPU cores.
`test_one_factor_sweep_reaches_every_form` fails if a form drops out of the sweep;
scripts/coverage.py tabulates what is generated (docs/coverage.md).

KNOWN_BUGS lists matcher bugs the generators steer around while open (none now: the two this file
found, test_bug_*, are fixed); FV_PROPERTIES_KNOWN_BUGS=1 generates them anyway.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, currently_in_test_context, given, note, settings
from hypothesis import strategies as st

from tests._graphs import rewrite

# Programs per run. Each test is parametrized by its main form (the score contraction, the SDPA
# mask kind, the look-alike perturbation) so that every form gets its share of examples; hypothesis
# draws everything else.
SCORES = ["@", "torch.matmul", ".matmul", "torch.bmm", ".bmm", "baddbmm", "einsum"]
SDPA_MASKS = ["none", "causal", "bool", "float", "float_inf"]
N_ATTN_EACH = 44  # x 7 score spellings = 308
N_SDPA_EACH = 24  # x 5 mask kinds = 120
N_LOOK_EACH = 15  # x 12 perturbations = 180
N_ROUTER = 40

ATOL = RTOL = 1e-5

# Matcher bugs the generators must steer around while they are open, so that the properties keep
# guarding everything else (add the bug's minimal repro as a test_bug_* test at the end of this
# file). Names the generators understand: "bool_and_additive_masks" (no site mixes a boolean and
# an additive mask), "value_with_query_axis" (no router weighting per-token expert outputs).
# Both were found by these tests and are fixed; their repros are the test_bug_* tests below.
# FV_PROPERTIES_KNOWN_BUGS=1 ignores this set (to check a fix).
KNOWN_BUGS: set[str] = set()
if os.environ.get("FV_PROPERTIES_KNOWN_BUGS") == "1":
    KNOWN_BUGS.clear()


def _settings(n: int):
    return settings(
        max_examples=n,
        derandomize=True,
        deadline=None,
        database=None,
        print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# =================================================================================================
# program descriptions
# =================================================================================================


@dataclass(frozen=True)
class Attn:
    """A hand-written attention program: softmax(scale * q k^T + masks) v, spelled at random.

    layout   "bhsd": q/k/v given [B, H, S, D]; "bshd": given [B, S, H, D] and transposed (or used
             as is by einsum when `native`); "merged"/"merged_bshd": reshaped to [B*H, S, D].
    score    "@", "torch.matmul", ".matmul", "torch.bmm", ".bmm", "baddbmm", "einsum"
    kt       spelling of k^T for the non-einsum contractions
    score_eq einsum equation and operand order ("qk" | "kq"; "[qk]" passes the operands as a list)
    value    "@", "torch.matmul", ".matmul", "torch.bmm", ".bmm", "einsum"; value_eq likewise
    scale    "none" | "mul" | "rmul" | "div" | "div_sqrt" | "mul_pow" | "q_pre" | "qk_pre" | "alpha"
    masks    ((kind, shape), ...) applied to the scores, before the scale when `mask_first`
    gqa      how k/v with H/G heads are expanded to H: "repeat_interleave" | "torch.repeat_interleave"
             | "expand" | "unsqueeze_expand" | None
    """

    seed: int
    B: int
    H: int
    G: int  # GQA ratio: k/v have H // G heads
    Sq: int
    Sk: int
    D: int
    Dv: int
    layout: str
    native: bool
    merge: str
    score: str
    kt: str
    score_eq: tuple[str, str] | None
    value: str
    value_eq: tuple[str, str] | None
    scale: str
    c: float
    prescale_early: bool
    mask_first: bool
    masks: tuple[tuple[str, tuple[int, ...]], ...]
    upcast: str | None
    softmax: str
    dropout: str | None
    gqa: str | None
    flat_out: bool
    op_spelling: str = "op"  # "op" (s * c) | "method" (s.mul(c)) | "fn" (torch.mul(s, c))
    #                          | "inplace" (s.mul_(c), s.add_(b), s.masked_fill_(m, x))
    shift: bool = False  # s = s - s.amax(-1, keepdim=True) before the softmax
    perturb: str | None = None  # set only for look-alikes (see PERTURBATIONS)

    # --- derived -------------------------------------------------------------------------------

    @property
    def Hkv(self) -> int:
        return self.H // self.G

    @property
    def merged(self) -> bool:
        return self.layout.startswith("merged")

    @property
    def score_rank(self) -> int:
        return 3 if self.merged else 4

    @property
    def expected_form(self) -> str:
        return {
            "@": "matmul",
            "torch.matmul": "matmul",
            ".matmul": "matmul",
            "torch.bmm": "bmm",
            ".bmm": "bmm",
            "baddbmm": "baddbmm",
            "einsum": "einsum",
        }[self.score]

    @property
    def expected_scale(self) -> float:
        d = self.D
        return {
            "none": 1.0,
            "mul": self.c,
            "rmul": self.c,
            "div": 1.0 / self.c,
            "div_sqrt": d**-0.5,
            "mul_pow": d**-0.5,
            "q_pre": d**-0.5,
            "qk_pre": d**-0.5,
            "alpha": self.c,
        }[self.scale]

    @property
    def causal(self) -> bool:
        return any(kind.startswith("causal") for kind, _ in self.masks)

    @property
    def mixes_a_finite_fill(self) -> bool:
        """A finite fill (finfo.min, -3e38) next to a mask of another kind: a row every mask blocks
        would hold some fill values and some -inf (or biased) logits, which eager's softmax turns
        into something no single attention call reproduces; the pass leaves such sites alone."""
        kinds = {kind for kind, _ in self.masks}
        finite = kinds & {"fill_min", "fill_given", "where_min"}
        if not finite:
            return False
        same_value = len(finite) == 1 or finite <= {"fill_min", "where_min"}  # both: finfo.min
        return not same_value or bool(kinds - finite)

    def input_names(self) -> list[str]:
        names = ["q", "k", "v"]
        for i, (kind, _) in enumerate(self.masks):
            if kind in ("add", "add_inf"):
                names.append(f"bias{i}")
            elif kind in ("fill_given", "where_drop"):
                names.append(f"drop{i}")
            elif not kind.startswith("causal"):
                names.append(f"keep{i}")
        if self.perturb == "mask_after":
            names.append("gate")
        if self.perturb == "value_wrong_axis":
            names.append("w")
        if self.perturb == "tensor_scale":
            names.append("temp")
        return names

    # --- inputs --------------------------------------------------------------------------------

    def inputs(self) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        B, H, Hkv, Sq, Sk, D, Dv = self.B, self.H, self.Hkv, self.Sq, self.Sk, self.D, self.Dv
        if self.layout in ("bhsd", "merged"):
            shapes = [(B, H, Sq, D), (B, Hkv, Sk, D), (B, Hkv, Sk, Dv)]
        else:
            shapes = [(B, Sq, H, D), (B, Sk, Hkv, D), (B, Sk, Hkv, Dv)]
        out = [torch.randn(*s, generator=g) for s in shapes]
        for kind, shape in self.masks:
            if kind.startswith("causal"):
                continue
            if kind in ("add", "add_inf"):
                m = torch.randn(*shape, generator=g)
                if kind == "add_inf":
                    m = m.masked_fill(torch.rand(*shape, generator=g) < 0.4, float("-inf"))
                    m[..., 0] = 0.5  # every query row keeps a key
                out.append(m)
            else:
                keep = torch.rand(*shape, generator=g) < 0.6
                keep[..., 0] = True  # every query row keeps a key
                out.append(~keep if kind in ("fill_given", "where_drop") else keep)
        if self.perturb == "mask_after":
            shape = self.score_shape()
            out.append((torch.rand(*shape, generator=g) < 0.5).float())
        if self.perturb == "value_wrong_axis":
            lead = self.score_shape()[:-2]
            out.append(torch.randn(*lead, Sq, Dv, generator=g))
        if self.perturb == "tensor_scale":
            out.append(torch.tensor(0.7))
        return out

    def score_shape(self) -> tuple[int, ...]:
        if self.merged:
            return (self.B * self.H, self.Sq, self.Sk)
        return (self.B, self.H, self.Sq, self.Sk)

    # --- source --------------------------------------------------------------------------------

    def source(self) -> str:
        B, H, Hkv, G, Sq, Sk, D, Dv = (
            self.B,
            self.H,
            self.Hkv,
            self.G,
            self.Sq,
            self.Sk,
            self.D,
            self.Dv,
        )
        L: list[str] = []
        emit = L.append
        native = self.native
        if self.prescale_early:
            self._emit_prescale(emit)
        # to the working layout: BHSD, or BSHD when einsum contracts the model's tensors directly
        if self.layout in ("bshd", "merged_bshd") and not native:
            emit("q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)")
        if G > 1:
            hd = 2 if native else 1
            for x, dlast in (("k", D), ("v", Dv)):
                emit(f"{x} = " + _gqa_expand(self.gqa, x, G, hd, B, Hkv, Sk, dlast, native))
        if self.merged:
            for x, s, d in (("q", Sq, D), ("k", Sk, D), ("v", Sk, Dv)):
                emit(
                    f"{x} = "
                    + {
                        "reshape": f"{x}.reshape({B * H}, {s}, {d})",
                        "reshape-1": f"{x}.reshape(-1, {s}, {d})",
                        "flatten": f"{x}.flatten(0, 1)",
                    }[self.merge]
                )
        if not self.prescale_early:
            self._emit_prescale(emit)

        # the score contraction
        kt = _kt(self.kt, self.score_rank)
        if self.score == "@":
            emit(f"s = q @ k.{kt}")
        elif self.score == "torch.matmul":
            emit(f"s = torch.matmul(q, k.{kt})")
        elif self.score == ".matmul":
            emit(f"s = q.matmul(k.{kt})")
        elif self.score == "torch.bmm":
            emit(f"s = torch.bmm(q, k.{kt})")
        elif self.score == ".bmm":
            emit(f"s = q.bmm(k.{kt})")
        elif self.score == "baddbmm":
            emit(
                f"s = torch.baddbmm(torch.empty({B * H}, {Sq}, {Sk}), q, k.{kt}, beta=0, alpha={self.c})"
            )
        else:
            eq, order = self.score_eq
            ops = "q, k" if order.strip("[]") == "qk" else "k, q"
            emit(f'eq = "{eq}"')
            emit(
                f"s = torch.einsum(eq, {ops})"
                if "[" not in order
                else f"s = torch.einsum(eq, [{ops}])"
            )

        def scale_lines():
            c = self.c
            if self.scale == "mul":
                emit(
                    {
                        "op": f"s = s * {c}",
                        "method": f"s = s.mul({c})",
                        "fn": f"s = torch.mul(s, {c})",
                        "inplace": f"s.mul_({c})",
                    }[self.op_spelling]
                )
            elif self.scale == "rmul":
                emit(f"s = {c} * s")
            elif self.scale == "div":
                emit(
                    {
                        "op": f"s = s / {c}",
                        "method": f"s = s.div({c})",
                        "fn": f"s = torch.div(s, {c})",
                        "inplace": f"s.div_({c})",
                    }[self.op_spelling]
                )
            elif self.scale == "div_sqrt":
                emit("s = s / math.sqrt(q.size(-1))")
            elif self.scale == "mul_pow":
                emit("s = s * q.shape[-1] ** -0.5")

        def mask_lines():
            for i, (kind, _shape) in enumerate(self.masks):
                emit(_mask_line(kind, i, Sq, Sk, self.op_spelling))

        if self.perturb == "softcap":
            emit("s = torch.tanh(s / 30.0) * 30.0")
        if self.perturb == "tensor_scale":
            emit("s = s * temp")
        if self.mask_first:
            mask_lines()
            scale_lines()
        else:
            scale_lines()
            mask_lines()
        if self.perturb == "mild_fill":
            emit("s = s.masked_fill(s > 1.0, -1.0)")

        if self.shift:
            emit("s = s - s.amax(-1, keepdim=True)")
        if self.upcast:
            emit("s = s.float()")
        sm = self.softmax
        if self.perturb == "softmax_dim":
            sm = f"s.softmax({-2 if self.score_rank == 3 else 1})"
        elif self.perturb == "softmax_dim_q":
            sm = "F.softmax(s, dim=-2)"
        elif self.perturb == "log_softmax":
            sm = "F.log_softmax(s, dim=-1)"
        emit("p = " + sm.format(s="s", last=self.score_rank - 1))
        if self.upcast == "to":
            emit("p = p.to(q.dtype)")
        elif self.upcast == "type_as":
            emit("p = p.type_as(v)")
        if self.perturb == "active_dropout":
            emit("p = F.dropout(p, p=0.5, training=True)")
        elif self.dropout:
            emit("p = " + self.dropout.format(p="p"))
        if self.perturb == "mask_after":
            emit("p = p * gate")

        # the value contraction
        if self.perturb == "reduce":
            emit("return p.sum(-1), p.amax(-1), p.topk(1, dim=-1).values, p.mean(-2)")
            return _function(self.input_names(), L)
        if self.perturb == "value_wrong_axis":
            eq = "bqk,bqe->bke" if self.score_rank == 3 else "bhqk,bhqe->bhke"
            emit(f'return torch.einsum("{eq}", p, w)')
            return _function(self.input_names(), L)
        if self.value == "@":
            emit("o = p @ v")
        elif self.value == "torch.matmul":
            emit("o = torch.matmul(p, v)")
        elif self.value == ".matmul":
            emit("o = p.matmul(v)")
        elif self.value == "torch.bmm":
            emit("o = torch.bmm(p, v)")
        elif self.value == ".bmm":
            emit("o = p.bmm(v)")
        else:
            eq, order = self.value_eq
            emit(f'o = torch.einsum("{eq}", {"p, v" if order == "pv" else "v, p"})')

        # the output, flattened to [B, Sq, H*Dv] as a model would before its projection
        if self.flat_out:
            out_bshd = native or self._value_out_bshd()
            if self.merged:
                emit(
                    f"o = o.view({B}, {H}, {Sq}, {Dv}).transpose(1, 2).reshape({B}, {Sq}, {H * Dv})"
                )
            elif out_bshd:
                emit(f"o = o.reshape({B}, {Sq}, {H * Dv})")
            else:
                emit(f"o = o.transpose(1, 2).reshape({B}, {Sq}, {H * Dv})")
        if self.perturb == "scores_returned":
            emit("return o, s")
        elif self.perturb == "weights_returned":
            emit("return o, p")
        else:
            emit("return o")
        return _function(self.input_names(), L)

    def _value_out_bshd(self) -> bool:
        """The value einsum writes [B, Sq, H, Dv] (its output puts the query letter 2nd)."""
        if self.value != "einsum" or self.merged:
            return False
        eq, order = self.value_eq
        lhs, out = eq.split("->")
        a, b = lhs.split(",")
        ps = a if order == "pv" else b
        return out[1] == ps[2]

    def _emit_prescale(self, emit):
        if self.scale == "q_pre":
            emit("q = q * q.shape[-1] ** -0.5")
        elif self.scale == "qk_pre":
            emit("q = q * q.shape[-1] ** -0.25")
            emit("k = k * (k.shape[-1] ** -0.25)")


def _function(names: list[str], body: list[str]) -> str:
    return "def program({}):\n{}\n".format(", ".join(names), "\n".join("    " + ln for ln in body))


def _kt(spelling: str, rank: int) -> str:
    if spelling == "transpose(-2, -1)":
        return "transpose(-2, -1)"
    if spelling == "transpose(-1, -2)":
        return "transpose(-1, -2)"
    if spelling == "transpose(pos)":
        return "transpose(1, 2)" if rank == 3 else "transpose(2, 3)"
    if spelling == "mT":
        return "mT"
    if spelling == "permute":
        return "permute(0, 2, 1)" if rank == 3 else "permute(0, 1, 3, 2)"
    raise AssertionError(spelling)


def _gqa_expand(
    how: str, x: str, g: int, hd: int, B: int, hkv: int, s: int, d: int, native: bool
) -> str:
    if how == "repeat_interleave":
        return f"{x}.repeat_interleave({g}, dim={hd})"
    if how == "torch.repeat_interleave":
        return f"torch.repeat_interleave({x}, {g}, dim={hd})"
    if native:  # [B, S, Hkv, D] -> [B, S, Hkv, g, D] -> [B, S, H, D]
        unsq = f"{x}[:, :, :, None]" if how == "expand" else f"{x}.unsqueeze(3)"
        return f"{unsq}.expand({B}, {s}, {hkv}, {g}, {d}).reshape({B}, {s}, {hkv * g}, {d})"
    unsq = f"{x}[:, :, None]" if how == "expand" else f"{x}.unsqueeze(2)"
    return f"{unsq}.expand({B}, {hkv}, {g}, {s}, {d}).reshape({B}, {hkv * g}, {s}, {d})"


_IN_PLACE_MASKS = {
    "add": "s.add_(bias{i})",
    "fill_not": 's.masked_fill_(~keep{i}, float("-inf"))',
    "fill_min": "s.masked_fill_(keep{i}.logical_not(), torch.finfo(s.dtype).min)",
    "fill_given": "s.masked_fill_(drop{i}, -3e38)",
}


def _mask_line(kind: str, i: int, Sq: int, Sk: int, spelling: str = "op") -> str:
    if spelling == "inplace" and kind in _IN_PLACE_MASKS:
        return _IN_PLACE_MASKS[kind].format(i=i)
    return {
        "add": {
            "op": f"s = s + bias{i}",
            "method": f"s = s.add(bias{i})",
            "fn": f"s = torch.add(s, bias{i})",
            "inplace": f"s = s + bias{i}",
        }[spelling],
        "add_inf": f"s = bias{i} + s",
        "fill_not": f's = s.masked_fill(~keep{i}, float("-inf"))',
        "fill_min": f"s = s.masked_fill(keep{i}.logical_not(), torch.finfo(s.dtype).min)",
        "fill_given": f"s = torch.masked_fill(s, drop{i}, -3e38)",
        "where_min": f"s = torch.where(keep{i}, s, torch.finfo(s.dtype).min)",
        "where_inf": f's = torch.where(keep{i}, s, float("-inf"))',
        "where_drop": f's = torch.where(drop{i}, float("-inf"), s)',
        "causal_tril": f's = s.masked_fill(~torch.ones({Sq}, {Sk}, dtype=torch.bool).tril(), float("-inf"))',
        "causal_triu": (
            f"s = s.masked_fill(torch.triu(torch.ones({Sq}, {Sk}, dtype=torch.bool), diagonal=1), "
            'float("-inf"))'
        ),
        "causal_add": f's = s + torch.full(({Sq}, {Sk}), float("-inf")).triu(1)',
        "causal_arange": (
            f"s = s.masked_fill(torch.arange({Sk})[None, :] > torch.arange({Sq})[:, None], "
            'float("-inf"))'
        ),
    }[kind]


@dataclass(frozen=True)
class Sdpa:
    """F.scaled_dot_product_attention with random argument spellings.

    layout "bhsd" | "bshd" (transposed before the call, output transposed back) | "3d" ([B*H, S, D])
    mask   None | (kind, shape) with kind "bool" | "float" | "float_inf"
    call   "keyword" | "positional" (q, k, v, mask, dropout_p, is_causal) | "mixed"
    scale  None (default 1/sqrt(D)) | a number | "expr" (q.shape[-1] ** -0.5)
    gqa    None | "enable_gqa" | "repeat_interleave" | "expand"
    """

    seed: int
    B: int
    H: int
    G: int
    Sq: int
    Sk: int
    D: int
    Dv: int
    layout: str
    fn: str
    call: str
    mask: tuple[str, tuple[int, ...]] | None
    causal: bool
    scale: float | str | None
    dropout: str  # "absent" | "zero"
    gqa: str | None
    flat_out: bool

    @property
    def Hkv(self) -> int:
        return self.H // self.G

    @property
    def expected_scale(self) -> float:
        return self.D**-0.5 if self.scale in (None, "expr") else float(self.scale)

    def input_names(self) -> list[str]:
        return ["q", "k", "v"] + (["mask"] if self.mask else [])

    def inputs(self) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        B, H, Hkv, Sq, Sk, D, Dv = self.B, self.H, self.Hkv, self.Sq, self.Sk, self.D, self.Dv
        if self.layout == "bshd":
            shapes = [(B, Sq, H, D), (B, Sk, Hkv, D), (B, Sk, Hkv, Dv)]
        else:
            shapes = [(B, H, Sq, D), (B, Hkv, Sk, D), (B, Hkv, Sk, Dv)]
        out = [torch.randn(*s, generator=g) for s in shapes]
        if self.mask:
            kind, shape = self.mask
            if kind == "bool":
                m = torch.rand(*shape, generator=g) < 0.6
                m[..., 0] = True
            else:
                m = torch.randn(*shape, generator=g)
                if kind == "float_inf":
                    m = m.masked_fill(torch.rand(*shape, generator=g) < 0.4, float("-inf"))
                    m[..., 0] = 0.0
            out.append(m)
        return out

    def source(self) -> str:
        B, H, Hkv, G, Sq, Sk, D, Dv = (
            self.B,
            self.H,
            self.Hkv,
            self.G,
            self.Sq,
            self.Sk,
            self.D,
            self.Dv,
        )
        L: list[str] = []
        emit = L.append
        if self.layout == "bshd":
            emit("q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)")
        if G > 1 and self.gqa != "enable_gqa":
            for x, d in (("k", D), ("v", Dv)):
                emit(f"{x} = " + _gqa_expand(self.gqa, x, G, 1, B, Hkv, Sk, d, False))
        if self.layout == "3d":
            emit(
                f"q, k, v = q.reshape({B * H}, {Sq}, {D}), k.reshape({B * H}, {Sk}, {D}), "
                f"v.reshape({B * H}, {Sk}, {Dv})"
            )
        m = "mask" if self.mask else "None"
        scale = {None: None, "expr": "q.shape[-1] ** -0.5"}.get(self.scale, self.scale)  # type: ignore[arg-type]
        kw = []
        if self.call == "positional":
            pos = ["q", "k", "v", m, "0.0", str(self.causal)]
        elif self.call == "mixed":
            pos = ["q", "k", "v", m]
            kw += [f"is_causal={self.causal}"] if self.causal else []
            kw += ["dropout_p=0.0"] if self.dropout == "zero" else []
        else:
            pos = []
            kw += ["query=q", "key=k", "value=v"]
            kw += [f"attn_mask={m}"] if self.mask else []
            kw += [f"is_causal={self.causal}"] if self.causal else []
            kw += ["dropout_p=0.0"] if self.dropout == "zero" else []
        if scale is not None:
            kw.append(f"scale={scale}")
        if self.gqa == "enable_gqa":
            kw.append("enable_gqa=True")
        emit(f"o = {self.fn}({', '.join(pos + kw)})")
        if self.flat_out:
            if self.layout == "3d":
                emit(f"o = o.view({B}, {H}, {Sq}, {Dv})")
            emit(f"o = o.transpose(1, 2).reshape({B}, {Sq}, {H * Dv})")
        elif self.layout == "bshd":
            emit("o = o.transpose(1, 2)")
        emit("return o")
        return _function(self.input_names(), L)


@dataclass(frozen=True)
class Router:
    """Not attention: softmax over a router's logits, used to weight expert outputs.

    logits "linear" (F.linear(x, w)) | "matmul" (x @ w.T): a matmul whose softmax output then
    weights per-token expert outputs with einsum "bse,ebsd->bsd" (the "value" has a query axis)
    use    "combine" (einsum over per-token expert outputs) | "topk"
    """

    seed: int
    B: int
    S: int
    Dm: int
    E: int
    logits: str
    use: str

    def avoiding_known_bugs(self) -> Router:
        if (
            "value_with_query_axis" in KNOWN_BUGS
            and self.logits == "matmul"
            and self.use == "combine"
        ):
            return dataclasses.replace(self, logits="linear")
        return self

    def inputs(self) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        return [
            torch.randn(self.B, self.S, self.Dm, generator=g),
            torch.randn(self.E, self.Dm, generator=g),
            torch.randn(self.E, self.Dm, self.Dm, generator=g) * 0.3,
        ]

    def source(self) -> str:
        L = []
        emit = L.append
        emit("logits = F.linear(x, w)" if self.logits == "linear" else "logits = x @ w.T")
        emit("probs = logits.softmax(-1)")
        if self.use == "topk":
            emit("top = probs.topk(2, dim=-1)")
            emit("return top.values, top.indices")
        else:
            emit('experts = torch.einsum("bsd,edf->ebsf", x, experts_w)')
            emit('return torch.einsum("bse,ebsf->bsf", probs, experts)')
        return _function(["x", "w", "experts_w"], L)


# =================================================================================================
# strategies
# =================================================================================================

LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"

MASK_KINDS = [
    "add",
    "add_inf",
    "fill_not",
    "fill_min",
    "fill_given",
    "where_min",
    "where_inf",
    "where_drop",
]
CAUSAL_MASKS = ["causal_tril", "causal_triu", "causal_add", "causal_arange"]

SOFTMAXES = [
    "{s}.softmax(-1)",
    "{s}.softmax(dim=-1)",
    "torch.softmax({s}, dim=-1)",
    "torch.softmax({s}, -1)",
    "F.softmax({s}, -1)",
    "F.softmax({s}, dim=-1)",
    "torch.nn.functional.softmax({s}, dim=-1)",
    "{s}.softmax({last})",
    "F.softmax({s}, dim={last})",
    "torch.softmax({s}, {last})",
    "F.softmax({s}, dim=-1, dtype=torch.float32)",
    "torch.special.softmax({s}, -1)",
]

DROPOUTS = [
    None,
    "F.dropout({p}, p=0.1, training=False)",
    "F.dropout({p}, 0.0)",
    "torch.dropout({p}, 0.3, False)",
    "F.dropout({p}, p=0.2, training=False, inplace=False)",
]


@st.composite
def sizes(draw):
    hkv = draw(st.sampled_from([1, 2]))
    g = draw(st.sampled_from([1, 2, 4] if hkv == 1 else [1, 2]))
    d = draw(st.integers(4, 16))
    dv = draw(st.one_of(st.just(d), st.integers(4, 16)))
    return {
        "B": draw(st.sampled_from([1, 2])),
        "H": hkv * g,
        "G": g,
        "Sq": draw(st.integers(1, 6)),
        "Sk": draw(st.integers(1, 6)),
        "D": d,
        "Dv": dv,
    }


def _mask_shape(draw, full: tuple[int, ...]) -> tuple[int, ...]:
    """A shape that broadcasts to `full` ([B, H, Sq, Sk] or [B*H, Sq, Sk]); keys always full."""
    dims = [draw(st.sampled_from([1, n])) for n in full[:-1]] + [full[-1]]
    lead = 0
    while lead < len(dims) - 1 and dims[lead] == 1:
        lead += 1
    drop = draw(st.integers(0, min(lead, len(dims) - 2)))
    return tuple(dims[drop:])


def score_equation(
    letters: str, layout: str, native: bool, order: str, sep: str = ","
) -> tuple[str, str]:
    """`(equation, order)` of the score einsum (scores always come out [B, H, Sq, Sk] or
    [B*H, Sq, Sk]); `order` "qk" | "kq", in brackets when the operands are passed as a list."""
    b, h, qq, kk, d, _ = letters
    if layout.startswith("merged"):
        qs, ks, out = b + qq + d, b + kk + d, b + qq + kk
    elif native:
        qs, ks, out = b + qq + h + d, b + kk + h + d, b + h + qq + kk
    else:
        qs, ks, out = b + h + qq + d, b + h + kk + d, b + h + qq + kk
    ops = (qs, ks) if order.strip("[]") == "qk" else (ks, qs)
    return f"{ops[0]}{sep}{ops[1]}->{out}", order


def value_equation(
    letters: str, layout: str, native: bool, order: str, out_bshd: bool
) -> tuple[str, str]:
    """`(equation, order)` of the value einsum; `order` "pv" | "vp"; `out_bshd`: [B, Sq, H, Dv] out."""
    b, h, qq, kk, _, e = letters
    if layout.startswith("merged"):
        ps, vs, out = b + qq + kk, b + kk + e, b + qq + e
    else:
        ps = b + h + qq + kk
        vs = b + kk + h + e if native else b + h + kk + e
        out = b + qq + h + e if out_bshd else b + h + qq + e
    return (f"{ps},{vs}->{out}" if order == "pv" else f"{vs},{ps}->{out}"), order


def _einsum_letters(draw, n: int) -> str:
    return "".join(draw(st.permutations(LETTERS))[:n])


@st.composite
def attn_programs(draw, score: str | None = None, perturb: str | None = None):
    if score is None:
        score = draw(st.sampled_from(SCORES))
    sz = draw(sizes())
    # a causal mask needs Sq == Sk: decide it first, so that it is not rare
    causal = draw(st.sampled_from(CAUSAL_MASKS + [None] * 12))
    if causal:
        sz["Sk"] = sz["Sq"]
    B, H, Sq, Sk = sz["B"], sz["H"], sz["Sq"], sz["Sk"]
    if score in ("torch.bmm", ".bmm", "baddbmm"):  # 3-D only
        families = ["merged", "merged_bshd"]
    elif score == "einsum":
        families = ["bhsd", "bshd", "bshd-native-einsum", "merged", "merged_bshd"]
    else:
        families = ["bhsd", "bshd", "merged", "merged_bshd"]
    family = draw(st.sampled_from(families))
    native = family == "bshd-native-einsum"
    layout = "bshd" if native else family
    merged = layout.startswith("merged")
    if native:
        value = "einsum"
    elif merged:
        value = draw(
            st.sampled_from(["@", "torch.matmul", ".matmul", "torch.bmm", ".bmm", "einsum"])
        )
    else:
        value = draw(st.sampled_from(["@", "torch.matmul", ".matmul", "einsum"]))

    # einsum equations, with random letters and operand orders
    letters = _einsum_letters(draw, 6)
    score_eq = value_eq = None
    if score == "einsum":
        order = draw(st.sampled_from(["qk", "kq", "[qk]", "[kq]"]))
        score_eq = score_equation(
            letters, layout, native, order, draw(st.sampled_from([",", ", "]))
        )
    if value == "einsum":
        out_bshd = native or (not merged and draw(st.booleans()))
        value_eq = value_equation(
            letters, layout, native, draw(st.sampled_from(["pv", "vp"])), out_bshd
        )

    if score == "baddbmm":
        scale = "alpha"
    else:
        scale = draw(
            st.sampled_from(
                ["none", "mul", "rmul", "div", "div_sqrt", "mul_pow", "q_pre", "qk_pre"]
            )
        )
    c = (
        draw(st.sampled_from([0.125, 0.3, 0.5, 2.0]))
        if scale in ("mul", "rmul", "alpha")
        else (draw(st.sampled_from([0.7, 2.0, 3.0, 8.0])) if scale == "div" else 1.0)
    )

    full = (B * H, Sq, Sk) if merged else (B, H, Sq, Sk)
    kinds = MASK_KINDS
    n_masks = draw(st.sampled_from([0, 0, 1, 1, 1, 2]))
    masks: list[tuple[str, tuple[int, ...]]] = []
    if causal:
        masks.append((causal, (Sq, Sk)))
        if draw(st.booleans()):  # and a key padding (or any other) mask beside it
            masks.append((draw(st.sampled_from(kinds)), _mask_shape(draw, full)))
    else:
        for _ in range(n_masks):
            masks.append((draw(st.sampled_from(kinds)), _mask_shape(draw, full)))
        if (
            "bool_and_additive_masks" in KNOWN_BUGS
            and len({m[0].startswith("add") for m in masks}) == 2
        ):
            masks = masks[:1]

    return Attn(
        seed=draw(st.integers(0, 2**16)),
        **sz,
        layout=layout,
        native=native,
        merge=draw(st.sampled_from(["reshape", "reshape-1", "flatten"])) if merged else "-",
        score=score,
        kt=draw(
            st.sampled_from(
                ["transpose(-2, -1)", "transpose(-1, -2)", "transpose(pos)", "mT", "permute"]
            )
        ),
        score_eq=score_eq,
        value=value,
        value_eq=value_eq,
        scale=scale,
        c=c,
        prescale_early=draw(st.booleans()) if scale in ("q_pre", "qk_pre") else False,
        mask_first=draw(st.booleans())
        if masks and scale in ("mul", "rmul", "div", "div_sqrt", "mul_pow")
        else False,
        masks=tuple(masks),
        upcast=draw(st.sampled_from([None, None, "to", "type_as"])),
        softmax=draw(st.sampled_from(SOFTMAXES)),
        dropout=draw(st.sampled_from(DROPOUTS)),
        gqa=draw(
            st.sampled_from(
                ["repeat_interleave", "torch.repeat_interleave", "expand", "unsqueeze_expand"]
            )
        )
        if sz["G"] > 1
        else None,
        flat_out=draw(st.booleans()),
        op_spelling=draw(st.sampled_from(["op", "op", "method", "fn", "inplace"])),
        shift=draw(st.sampled_from([False, False, False, True])),
        perturb=perturb,
    )


@st.composite
def sdpa_programs(draw, what: str | None = None):
    if what is None:
        what = draw(st.sampled_from(SDPA_MASKS))
    sz = draw(sizes())
    B, H, Sq, Sk = sz["B"], sz["H"], sz["Sq"], sz["Sk"]
    layout = draw(st.sampled_from(["bhsd", "bshd", "3d"]))
    gqa = None
    if sz["G"] > 1:
        gqa = draw(
            st.sampled_from(
                ([] if layout == "3d" else ["enable_gqa"]) + ["repeat_interleave", "expand"]
            )
        )
    full = (B * H, Sq, Sk) if layout == "3d" else (B, H, Sq, Sk)
    # SDPA refuses attn_mask together with is_causal: one or the other
    mask = (what, _mask_shape(draw, full)) if what not in ("causal", "none") else None
    return Sdpa(
        seed=draw(st.integers(0, 2**16)),
        **sz,
        layout=layout,
        fn=draw(
            st.sampled_from(
                [
                    "F.scaled_dot_product_attention",
                    "torch.nn.functional.scaled_dot_product_attention",
                ]
            )
        ),
        call=draw(st.sampled_from(["keyword", "positional", "mixed"])),
        mask=mask,
        causal=what == "causal",
        scale=draw(st.sampled_from([None, 0.125, 0.4, 1.0, 1, "expr"])),
        dropout=draw(st.sampled_from(["absent", "zero"])),
        gqa=gqa,
        flat_out=draw(st.booleans()),
    )


PERTURBATIONS = [
    "softmax_dim",  # softmax over the heads (4-D) or batch*heads (3-D) axis
    "softmax_dim_q",  # softmax over the query axis
    "scores_returned",  # the scores are also an output
    "weights_returned",  # the attention weights are also an output
    "mask_after",  # weights multiplied by a 0/1 gate after the softmax
    "reduce",  # softmax followed by sum / amax / topk / mean, no value product
    "log_softmax",  # log_softmax instead of softmax
    "active_dropout",  # dropout in training mode on the weights
    "value_wrong_axis",  # "value" product contracting the query axis
    "softcap",  # tanh soft-capped scores (skipped: cannot be proven)
    "tensor_scale",  # scores times a tensor temperature (skipped: not a number)
    "mild_fill",  # a fill with -1.0 (not a mask) driven by the scores themselves
]


@st.composite
def lookalike_programs(draw, perturb: str | None = None):
    if perturb is None:
        perturb = draw(st.sampled_from(PERTURBATIONS))
    return draw(attn_programs(perturb=perturb))


@st.composite
def router_programs(draw):
    return Router(
        seed=draw(st.integers(0, 2**16)),
        B=draw(st.sampled_from([1, 2])),
        S=draw(st.integers(1, 6)),
        Dm=draw(st.integers(2, 12)),
        E=draw(st.integers(2, 6)),
        logits=draw(st.sampled_from(["linear", "matmul"])),
        use=draw(st.sampled_from(["combine", "topk"])),
    ).avoiding_known_bugs()


# =================================================================================================
# checks
# =================================================================================================


def build(prog) -> tuple[object, str]:
    src = prog.source()
    ns = {"torch": torch, "F": F, "math": math}
    code = compile(src, f"<{type(prog).__name__} program>", "exec")
    exec(code, ns)  # our own generated test program
    return ns["program"], src


def _run(prog, fn, args):
    """Eager output and the rewritten graph's output (same RNG state for both)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    with torch.no_grad():
        ref = fn(*args)
    torch.manual_seed(0)
    text, sites, others, out = rewrite(fn, *args)
    return ref, text, sites, others, out


def _close(out, ref, msg, equal_nan=False):
    if isinstance(ref, (tuple, list)):
        assert isinstance(out, (tuple, list)) and len(out) == len(ref), msg
        for o, r in zip(out, ref):
            _close(o, r, msg, equal_nan)
        return
    torch.testing.assert_close(
        out, ref, atol=ATOL, rtol=RTOL, equal_nan=equal_nan, msg=lambda m: f"{m}\n{msg}"
    )


def _describe(prog, src, text, sites, others) -> str:
    rows = "\n".join(
        f"  site: {s.form} {s.layout} status={s.status} reason={s.reason!r}" for s in sites
    )
    rows += "".join(f"\n  not attention: {o.node}: {o.reason}" for o in others)
    return f"\n{prog!r}\n--- source ---\n{src}--- sites ---\n{rows}\n--- graph ---\n{text}"


def _reasons_present(sites, others, msg):
    for s in sites:
        assert s.status == "rewritten" or s.reason, f"skipped site without a reason{msg}"
    for o in others:
        assert o.reason, f"non-attention softmax without a reason{msg}"


def check_attention(prog) -> None:
    """The invariant for a supported attention form: rewritten, right, and equal to eager."""
    fn, src = build(prog)
    if currently_in_test_context():
        note(src)  # printed under the falsifying example
    args = prog.inputs()
    ref, text, sites, others, out = _run(prog, fn, args)
    msg = _describe(prog, src, text, sites, others)
    _reasons_present(sites, others, msg)
    assert len(sites) == 1, f"expected one attention site{msg}"
    site = sites[0]
    if isinstance(prog, Attn) and prog.mixes_a_finite_fill:
        assert site.status == "skipped" and "fill" in site.reason, f"mixed fills rewritten{msg}"
        _close(out, ref, msg)
        return
    assert site.status == "rewritten", f"supported form not rewritten: {site.reason}{msg}"
    form = "sdpa" if isinstance(prog, Sdpa) else prog.expected_form
    assert site.form == form, f"form {site.form} != {form}{msg}"
    scales = [prog.expected_scale]
    if isinstance(prog, Attn) and prog.prescale_early and (prog.merged or prog.G > 1):
        # a q/k pre-scale written before the [B*H] merge or the GQA expansion stays in the graph
        # (the matcher does not fold it into the site's scale): numerically still exact
        scales += [1.0, prog.D**-0.25]
    assert any(math.isclose(site.scale, x, rel_tol=1e-6) for x in scales), (
        f"scale {site.scale} not in {scales}{msg}"
    )
    if prog.causal and prog.Sq > 1:
        assert site.causal, f"causal mask not recognised as causal{msg}"
    assert text.count("fv_compile.attention") == 1, f"expected one attention op{msg}"
    assert "softmax" not in text and "scaled_dot_product" not in text, f"anchor left in graph{msg}"
    _close(out, ref, msg)


def check_lookalike(prog) -> None:
    """The invariant for a program that is not (provably) attention: left alone, and equal."""
    fn, src = build(prog)
    if currently_in_test_context():
        note(src)  # printed under the falsifying example
    args = prog.inputs()
    ref, text, sites, others, out = _run(prog, fn, args)
    msg = _describe(prog, src, text, sites, others)
    _reasons_present(sites, others, msg)
    assert "fv_compile.attention" not in text, f"look-alike was rewritten{msg}"
    assert not [s for s in sites if s.status == "rewritten"], f"look-alike reported rewritten{msg}"
    _close(out, ref, msg, equal_nan=True)  # log_softmax of a -inf mask is -inf, times 0 is nan


# =================================================================================================
# the tests
# =================================================================================================


@pytest.mark.parametrize("score", SCORES)
@_settings(N_ATTN_EACH)
@given(data=st.data())
def test_hand_written_attention_is_rewritten_and_equal(score, data):
    check_attention(data.draw(attn_programs(score=score), label="prog"))


@pytest.mark.parametrize("what", SDPA_MASKS)
@_settings(N_SDPA_EACH)
@given(data=st.data())
def test_sdpa_is_rewritten_and_equal(what, data):
    check_attention(data.draw(sdpa_programs(what=what), label="prog"))


@pytest.mark.parametrize("perturb", PERTURBATIONS)
@_settings(N_LOOK_EACH)
@given(data=st.data())
def test_lookalikes_are_left_alone_and_equal(perturb, data):
    check_lookalike(data.draw(lookalike_programs(perturb=perturb), label="prog"))


@_settings(N_ROUTER)
@given(prog=router_programs())
def test_router_softmax_is_left_alone_and_equal(prog):
    check_lookalike(prog)


# --- a few fixed programs, so the generator itself is covered by readable examples --------------


def test_generator_example_sources_compile_and_run():
    """The generator writes runnable code for every layout/contraction family (a quick smoke test
    of the generator, independent of the pass)."""
    ex = Attn(
        seed=0,
        B=2,
        H=4,
        G=2,
        Sq=3,
        Sk=5,
        D=8,
        Dv=6,
        layout="bshd",
        native=True,
        merge="-",
        score="einsum",
        kt="mT",
        score_eq=("nkhd,nqhd->nhqk", "kq"),
        value="einsum",
        value_eq=("nhqk,nkhe->nqhe", "pv"),
        scale="qk_pre",
        c=1.0,
        prescale_early=True,
        mask_first=False,
        masks=(("fill_not", (2, 1, 1, 5)),),
        upcast="to",
        softmax="F.softmax({s}, dim=-1)",
        dropout=None,
        gqa="expand",
        flat_out=True,
    )
    fn, src = build(ex)
    assert "torch.einsum" in src and "expand" in src
    out = fn(*ex.inputs())
    assert out.shape == (2, 3, 4 * 6) and torch.isfinite(out).all()


# --- every form, one factor at a time -------------------------------------------------------------
#
# Hypothesis' generation is deterministic for one command line, but its choices also draw on
# constants it collects from the modules loaded in the process, so which rare combinations a run
# reaches depends on what else was imported. This deterministic sweep guarantees every form the
# generators know, each changed alone from a plain base program, whatever the context.

_L6 = "bhqkde"
BASE_ATTN = Attn(
    seed=1,
    B=2,
    H=4,
    G=1,
    Sq=3,
    Sk=5,
    D=8,
    Dv=8,
    layout="bhsd",
    native=False,
    merge="-",
    score="@",
    kt="transpose(-2, -1)",
    score_eq=None,
    value="@",
    value_eq=None,
    scale="mul",
    c=0.3,
    prescale_early=False,
    mask_first=False,
    masks=(),
    upcast=None,
    softmax="{s}.softmax(-1)",
    dropout=None,
    gqa=None,
    flat_out=False,
)
BASE_SDPA = Sdpa(
    seed=1,
    B=2,
    H=4,
    G=1,
    Sq=3,
    Sk=5,
    D=8,
    Dv=8,
    layout="bhsd",
    fn="F.scaled_dot_product_attention",
    call="keyword",
    mask=None,
    causal=False,
    scale=None,
    dropout="absent",
    gqa=None,
    flat_out=False,
)


def attn_variant(**kw) -> Attn:
    """BASE_ATTN with `kw`, plus what the change requires (a [B*H] layout for bmm, equations for
    einsum, Sq == Sk for a causal mask, full-size mask shapes where none is given)."""
    p = dataclasses.replace(BASE_ATTN, **kw)
    if (
        p.score in ("torch.bmm", ".bmm", "baddbmm") or p.value in ("torch.bmm", ".bmm")
    ) and not p.merged:
        p = dataclasses.replace(p, layout="merged")
    if p.merged and p.merge == "-":
        p = dataclasses.replace(p, merge="reshape")
    if p.score == "baddbmm":
        p = dataclasses.replace(p, scale="alpha")
    if p.score == "einsum" and p.score_eq is None:
        p = dataclasses.replace(p, score_eq=score_equation(_L6, p.layout, p.native, "qk"))
    if p.value == "einsum" and p.value_eq is None:
        p = dataclasses.replace(p, value_eq=value_equation(_L6, p.layout, p.native, "pv", p.native))
    if p.causal:
        p = dataclasses.replace(p, Sk=p.Sq)
    full = p.score_shape()
    masks = tuple((k, full if shape is None else shape) for k, shape in p.masks)
    return dataclasses.replace(p, masks=masks)


def one_factor_programs() -> list[tuple[str, object]]:
    A, S = attn_variant, lambda **kw: dataclasses.replace(BASE_SDPA, **kw)
    out: list[tuple[str, object]] = []

    def add(name, prog):
        out.append((name, prog))

    for layout in ("bhsd", "bshd", "merged", "merged_bshd"):
        add(f"layout={layout}", A(layout=layout))
    add("layout=bshd-native-einsum", A(layout="bshd", native=True, score="einsum", value="einsum"))
    for score in SCORES:
        add(f"score={score}", A(score=score))
    for value in ("@", "torch.matmul", ".matmul", "torch.bmm", ".bmm", "einsum"):
        add(f"value={value}", A(value=value))
    for kt in ("transpose(-2, -1)", "transpose(-1, -2)", "transpose(pos)", "mT", "permute"):
        add(f"kt={kt}", A(kt=kt))
        add(f"kt={kt}-merged", A(kt=kt, layout="merged", score="torch.bmm"))
    for layout in ("bhsd", "merged"):
        for order in ("qk", "kq", "[qk]", "[kq]"):
            add(
                f"score-einsum-{order}-{layout}",
                A(
                    layout=layout,
                    score="einsum",
                    score_eq=score_equation("nmxyzw", layout, False, order, ", "),
                ),
            )
        for order in ("pv", "vp"):
            for out_bshd in (False, True) if layout == "bhsd" else (False,):
                add(
                    f"value-einsum-{order}{'-bqhe' if out_bshd else ''}-{layout}",
                    A(
                        layout=layout,
                        value="einsum",
                        value_eq=value_equation("BHQKDE", layout, False, order, out_bshd),
                    ),
                )
    for scale in ("none", "mul", "rmul", "div", "div_sqrt", "mul_pow", "q_pre", "qk_pre"):
        add(f"scale={scale}", A(scale=scale, c=2.0 if scale == "div" else 0.3))
        add(
            f"scale={scale}-merged",
            A(scale=scale, c=2.0 if scale == "div" else 0.3, layout="merged_bshd"),
        )
    add("scale=alpha", A(score="baddbmm", c=0.25))
    for scale in ("q_pre", "qk_pre"):
        add(f"scale={scale}-early", A(scale=scale, prescale_early=True, layout="bshd"))
    for spelling in ("op", "method", "fn", "inplace"):
        add(f"op_spelling={spelling}", A(op_spelling=spelling, masks=(("add", None),)))
        add(f"op_spelling={spelling}-div", A(op_spelling=spelling, scale="div", c=3.0))
    for kind in ("fill_not", "fill_min", "fill_given"):
        add(f"op_spelling=inplace-{kind}", A(op_spelling="inplace", masks=((kind, None),)))
    add(
        "causal+padding",
        A(masks=(("causal_tril", None), ("fill_not", (BASE_ATTN.B, 1, 1, BASE_ATTN.Sq)))),
    )
    add("shift", A(shift=True))
    add("shift-masked", A(shift=True, masks=(("fill_not", None),)))
    B, H, Sq, Sk = BASE_ATTN.B, BASE_ATTN.H, BASE_ATTN.Sq, BASE_ATTN.Sk
    for kind in MASK_KINDS:
        for shape in ((B, H, Sq, Sk), (B, 1, 1, Sk), (1, Sq, Sk), (Sq, Sk)):
            add(f"mask={kind}-{'x'.join(map(str, shape))}", A(masks=((kind, shape),)))
        add(f"mask={kind}-merged", A(masks=((kind, (B * H, 1, Sk)),), layout="merged"))
        add(
            f"mask={kind}-before-scale", A(masks=((kind, None),), mask_first=True, scale="div_sqrt")
        )
    for kind in CAUSAL_MASKS:
        add(f"mask={kind}", A(masks=((kind, None),)))
        add(f"mask={kind}-merged", A(masks=((kind, None),), layout="merged", score="torch.bmm"))
        add(
            f"mask={kind}-einsum-bshd",
            A(masks=((kind, None),), layout="bshd", native=True, score="einsum", value="einsum"),
        )
    add("masks=add+add_inf", A(masks=(("add", (1, 1, Sq, Sk)), ("add_inf", (B, 1, 1, Sk)))))
    add("masks=fill_not+where_min", A(masks=(("fill_not", (B, 1, 1, Sk)), ("where_min", (Sq, Sk)))))
    if "bool_and_additive_masks" not in KNOWN_BUGS:
        add("masks=add+fill_not", A(masks=(("add", (1, H, Sq, Sk)), ("fill_not", (B, 1, 1, Sk)))))
        add(
            "masks=where_drop+add_inf-merged",
            A(masks=(("where_drop", (B * H, Sq, Sk)), ("add_inf", (1, 1, Sk))), layout="merged"),
        )
        add(
            "masks=fill_min+add-before-scale",
            A(
                masks=(("fill_min", (Sq, Sk)), ("add", (B, H, Sq, Sk))),
                mask_first=True,
                scale="div",
                c=3.0,
            ),
        )
    for upcast in ("to", "type_as"):
        add(f"upcast={upcast}", A(upcast=upcast))
    for sm in SOFTMAXES:
        add(f"softmax={sm.format(s='x', last='last')}", A(softmax=sm))
        add(f"softmax={sm.format(s='x', last='last')}-merged", A(softmax=sm, layout="merged"))
    for dropout in DROPOUTS[1:]:
        add(f"dropout={dropout.format(p='p')}", A(dropout=dropout))
    for gqa in ("repeat_interleave", "torch.repeat_interleave", "expand", "unsqueeze_expand"):
        for g in (2, 4):
            add(f"gqa={gqa}-{g}", A(gqa=gqa, G=g))
        add(
            f"gqa={gqa}-bshd-native",
            A(gqa=gqa, G=2, layout="bshd", native=True, score="einsum", value="einsum"),
        )
        add(f"gqa={gqa}-merged", A(gqa=gqa, G=2, layout="merged"))
    for merge in ("reshape", "reshape-1", "flatten"):
        add(f"merge={merge}", A(layout="merged", merge=merge))
    for name, kw in (
        ("B=1", {"B": 1}),
        ("H=1", {"H": 1}),
        ("Sq=1", {"Sq": 1}),
        ("Sk=1", {"Sk": 1}),
        ("Sq=Sk=1", {"Sq": 1, "Sk": 1}),
        ("all=1", {"B": 1, "H": 1, "Sq": 1, "Sk": 1}),
        ("Dv!=D", {"Dv": 5}),
        ("D=4", {"D": 4, "Dv": 4}),
        ("D=16", {"D": 16, "Dv": 16}),
        ("flat_out", {"flat_out": True}),
    ):
        add(f"size-{name}", A(**kw))
        add(f"size-{name}-merged", A(**{"layout": "merged_bshd", "flat_out": True, **kw}))

    for layout in ("bhsd", "bshd", "3d"):
        add(f"sdpa-layout={layout}", S(layout=layout))
    add("sdpa-fn=torch.nn.functional", S(fn="torch.nn.functional.scaled_dot_product_attention"))
    for call in ("keyword", "positional", "mixed"):
        add(f"sdpa-call={call}", S(call=call))
        add(f"sdpa-call={call}-mask", S(call=call, mask=("bool", (B, 1, 1, Sk))))
        add(f"sdpa-call={call}-causal-dropout0", S(call=call, causal=True, dropout="zero"))
    for kind in ("bool", "float", "float_inf"):
        for shape in ((B, H, Sq, Sk), (B, 1, 1, Sk), (Sq, Sk)):
            add(f"sdpa-mask={kind}-{'x'.join(map(str, shape))}", S(mask=(kind, shape)))
        add(f"sdpa-mask={kind}-3d", S(mask=(kind, (B * H, Sq, Sk)), layout="3d"))
    for sq, sk in ((3, 5), (4, 4), (5, 3), (1, 4)):
        add(f"sdpa-causal-{sq}x{sk}", S(causal=True, Sq=sq, Sk=sk))
    for scale in (0.125, 1, "expr"):
        add(f"sdpa-scale={scale}", S(scale=scale))
    for gqa in ("enable_gqa", "repeat_interleave", "expand"):
        add(f"sdpa-gqa={gqa}", S(gqa=gqa, G=2))
        add(f"sdpa-gqa={gqa}-bshd-flat", S(gqa=gqa, G=4, layout="bshd", flat_out=True))
    for name, kw in (
        ("B=1", {"B": 1}),
        ("H=1", {"H": 1}),
        ("Sq=1", {"Sq": 1}),
        ("Sk=1", {"Sk": 1}),
        ("Dv!=D", {"Dv": 5}),
    ):
        add(f"sdpa-size-{name}", S(**kw))

    for perturb in PERTURBATIONS:
        add(f"lookalike-{perturb}", A(perturb=perturb, masks=(("fill_not", (B, 1, 1, Sk)),)))
        add(f"lookalike-{perturb}-merged", A(perturb=perturb, layout="merged", score="torch.bmm"))
    for logits in ("linear", "matmul"):
        for use in ("combine", "topk"):
            r = Router(seed=1, B=2, S=4, Dm=6, E=3, logits=logits, use=use)
            if r.avoiding_known_bugs() == r:
                add(f"router-{logits}+{use}", r)
    return out


ONE_FACTOR = one_factor_programs()


@pytest.mark.parametrize("prog", [p for _, p in ONE_FACTOR], ids=[n for n, _ in ONE_FACTOR])
def test_every_form_one_factor_at_a_time(prog):
    if isinstance(prog, Router) or getattr(prog, "perturb", None):
        check_lookalike(prog)
    else:
        check_attention(prog)


# --- the generators reach every form they claim --------------------------------------------------


def generated_programs() -> dict[str, list]:
    """Every program the property tests above generate in one run (no compilation): their
    hypothesis tests replayed with a recorder in place of the checks. scripts/coverage.py
    summarises these in docs/coverage.md."""
    global check_attention, check_lookalike, note
    seen: dict[str, list] = {"attn": [], "sdpa": [], "look": [], "router": []}
    saved = check_attention, check_lookalike, note
    runs = [
        (test_hand_written_attention_is_rewritten_and_equal, "attn", {"score": x}) for x in SCORES
    ]
    runs += [(test_sdpa_is_rewritten_and_equal, "sdpa", {"what": x}) for x in SDPA_MASKS]
    runs += [
        (test_lookalikes_are_left_alone_and_equal, "look", {"perturb": x}) for x in PERTURBATIONS
    ]
    runs += [(test_router_softmax_is_left_alone_and_equal, "router", {})]
    try:

        def note(*_):  # the recorder keeps no notes
            return None

        for test, label, params in runs:
            check_attention = check_lookalike = seen[label].append
            test(**params)
    finally:
        check_attention, check_lookalike, note = saved
    return seen


def _forms_reached(attn: list, sdpa: list, look: list) -> dict[str, set]:
    """For each dimension the generators vary, the values they claim but `programs` never reach."""
    want = {
        "layout": ({p.layout for p in attn}, {"bhsd", "bshd", "merged", "merged_bshd"}),
        "native einsum": ({p.native for p in attn}, {True, False}),
        "score": ({p.score for p in attn}, set(SCORES)),
        "value": (
            {p.value for p in attn},
            {"@", "torch.matmul", ".matmul", "torch.bmm", ".bmm", "einsum"},
        ),
        "k^T": (
            {p.kt for p in attn},
            {"transpose(-2, -1)", "transpose(-1, -2)", "transpose(pos)", "mT", "permute"},
        ),
        "score einsum order": (
            {p.score_eq[1] for p in attn if p.score_eq},
            {"qk", "kq", "[qk]", "[kq]"},
        ),
        "scale": (
            {p.scale for p in attn},
            {"none", "mul", "rmul", "div", "div_sqrt", "mul_pow", "q_pre", "qk_pre", "alpha"},
        ),
        "op spelling": ({p.op_spelling for p in attn}, {"op", "method", "fn", "inplace"}),
        "mask": ({k for p in attn for k, _ in p.masks}, set(MASK_KINDS) | set(CAUSAL_MASKS)),
        "mask rank": ({len(sh) for p in attn for _, sh in p.masks}, {2, 3, 4}),
        "mask before scale": ({p.mask_first for p in attn if p.masks}, {True, False}),
        "softmax": ({p.softmax for p in attn}, set(SOFTMAXES)),
        "dropout": ({p.dropout for p in attn}, set(DROPOUTS)),
        "upcast": ({p.upcast for p in attn}, {None, "to", "type_as"}),
        "gqa": (
            {p.gqa for p in attn + sdpa},
            {
                None,
                "repeat_interleave",
                "torch.repeat_interleave",
                "expand",
                "unsqueeze_expand",
                "enable_gqa",
            },
        ),
        "ratio": ({p.G for p in attn + sdpa}, {1, 2, 4}),
        "merge": ({p.merge for p in attn if p.merged}, {"reshape", "reshape-1", "flatten"}),
        "sdpa layout": ({p.layout for p in sdpa}, {"bhsd", "bshd", "3d"}),
        "sdpa call": ({p.call for p in sdpa}, {"keyword", "positional", "mixed"}),
        "sdpa mask": (
            {p.mask[0] if p.mask else ("causal" if p.causal else "none") for p in sdpa},
            set(SDPA_MASKS),
        ),
        "sdpa scale": ({repr(p.scale) for p in sdpa}, {"None", "0.125", "1", "'expr'"}),
        "perturbation": ({p.perturb for p in look}, set(PERTURBATIONS)),
    }
    for flag in ("B", "H", "Sq", "Sk"):
        want[f"{flag}=1"] = ({getattr(p, flag) == 1 for p in attn + sdpa}, {True, False})
    want["Sq!=Sk"] = ({p.Sq != p.Sk for p in attn + sdpa}, {True, False})
    want["Dv!=D"] = ({p.Dv != p.D for p in attn + sdpa}, {True, False})
    return {k: b - a for k, (a, b) in want.items() if b - a}


def test_one_factor_sweep_reaches_every_form():
    """Every form the generators know is run by the deterministic sweep."""
    progs = [p for _, p in ONE_FACTOR]
    attn = [p for p in progs if isinstance(p, Attn) and not p.perturb]
    sdpa = [p for p in progs if isinstance(p, Sdpa)]
    look = [p for p in progs if isinstance(p, Attn) and p.perturb]
    missing = _forms_reached(attn, sdpa, look)
    assert not missing, f"the one-factor sweep never runs: {missing}"


def test_hypothesis_budget():
    """At least 500 random programs per run, and every parametrized main form gets its share
    (what else each run reaches is tabulated by scripts/coverage.py)."""
    seen = generated_programs()
    assert sum(len(v) for v in seen.values()) >= 500
    assert {p.score for p in seen["attn"]} == set(SCORES)
    assert {p.perturb for p in seen["look"]} == set(PERTURBATIONS)
    assert {
        p.mask[0] if p.mask else ("causal" if p.causal else "none") for p in seen["sdpa"]
    } == set(SDPA_MASKS)


# --- matcher bugs found by the properties above: minimal repros, kept as regression tests ---------


def test_bug_bool_and_additive_masks_on_one_site():
    """Found by these properties: a site with a boolean mask *and* an additive mask crashed the
    compile (rewrite.py `_combined_mask` emitted `torch.where(bool_mask, 0.0, -inf)`, whose example
    value `_Emitter` computed on FakeTensors with real scalar tensors: "Please convert all Tensors
    to FakeTensors")."""

    def program(q, k, v, keep, bias):
        s = q @ k.transpose(-2, -1)
        s = s.masked_fill(~keep, float("-inf"))
        s = s + bias
        return s.softmax(-1) @ v

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, 8, generator=g) for n in (4, 6, 6))
    keep = torch.rand(1, 1, 4, 6, generator=g) > 0.4
    keep[..., 0] = True
    bias = torch.randn(1, 1, 4, 6, generator=g)
    torch._dynamo.reset()
    _, sites, _, out = rewrite(program, q, k, v, keep, bias)
    assert [s.status for s in sites] == ["rewritten"]
    _close(out, program(q, k, v, keep, bias), "")


def test_bug_value_operand_with_a_query_axis():
    """Found by these properties: a softmax over q @ k^T whose "value" is indexed by the query
    position too (per-query values, e.g. a router weighting per-token expert outputs) is not
    attention. The matcher accepted it (the value einsum check did not reject a query label on
    the value operand) and the rewrite then crashed: `permute` with 2 dims on a 3-D tensor."""

    def program(q, k, v):  # q [B, S, D], k [B, T, D], v [T, S, E]
        p = (q @ k.transpose(-2, -1)).softmax(-1)  # [B, S, T]
        return torch.einsum("bst,tse->bse", p, v)

    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 3, 5, generator=g),
        torch.randn(2, 4, 5, generator=g),
        torch.randn(4, 3, 6, generator=g),
    )
    torch._dynamo.reset()
    text, _, _, out = rewrite(program, q, k, v)
    assert "fv_compile.attention" not in text
    _close(out, program(q, k, v), "")
