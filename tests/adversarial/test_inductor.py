"""The adversarial programs again, under Inductor: the rest of the suite compiles with `eager` /
`aot_eager`, where fv_compile's graph is run as written; Inductor fuses around the op, reuses
buffers, reorders mutations and, for metadata variants, compiles at run time. One sample per
class of wrong result, so the CPU budget stays small (a few seconds of Inductor each)."""

import pytest
import torch

from tests.adversarial import test_learned_bias as bias
from tests.adversarial import test_masked_rows as rows
from tests.adversarial import test_mutations as mut
from tests.adversarial import test_precision as prec
from tests.adversarial._harness import check, x_input


@pytest.mark.parametrize("spelling, fill, kind", [
    ("masked_fill", "neginf", "per_query"),
    ("where_keep", "finfo_min", "key_padding"),
    ("additive_keep", "m1e4", "per_head"),
])  # fmt: skip
def test_fully_masked_rows_under_inductor(spelling, fill, kind):
    q, k, v = rows.qkv()
    check(
        rows.MaskedAttention(spelling, rows.FILLS[fill]),
        q,
        k,
        v,
        rows.mask_of(kind),
        compiler="inductor",
    )


@pytest.mark.parametrize(
    "name",
    [
        "kv_cache_copy",
        "step_counter",
        "neighbour_mask_buffer_flipped_between_sites",
        "scores_masked_fill_inplace",
    ],
)
def test_mutations_next_to_sites_under_inductor(name):
    cls, calls = mut.CASES[name]
    torch.manual_seed(0)
    check(cls(), x_input(), calls=calls, compiler="inductor")


def test_learned_bias_gradient_under_inductor():
    torch.manual_seed(0)
    check(bias.SwinRelativeBias(), x_input(s=9), grad=True, compiler="inductor")


def test_fp32_upcast_attention_stays_fp32_under_inductor():
    q, k, v = prec.bf16_qkv()
    cls = prec.FP32_KEPT[0]
    _, _, [(out_c, out_e)] = check(cls(), q, k, v, compiler="inductor")
    prec.assert_fp32_accuracy(out_c, out_e, prec.ref64(q, k, v))
