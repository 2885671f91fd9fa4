"""Class 1: in-place mutations next to attention sites.

A rewrite replaces a chain of nodes by one op placed somewhere in the graph; every in-place op near
the chain (on buffers, on views of q/k/v, between the score and the value matmul, on masks shared
with a neighbouring site) must still happen, in its place, with the values eager sees."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.adversarial._harness import B, E, Proj, S, assert_rewritten, check, inv_sqrt, x_input

H, D = 2, 8
SCALE = inv_sqrt(D)


def hand(q, k, v, scale=SCALE):
    return (q @ k.transpose(-2, -1) * scale).softmax(-1) @ v


class BufAddBeforeSdpa(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = Proj()
        self.register_buffer("buf", torch.zeros(3))

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        self.buf.add_(1)
        return self.p.merge(F.scaled_dot_product_attention(q, k, v))


class BufAddAfterHandwritten(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = Proj()
        self.register_buffer("buf", torch.arange(4.0))

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        o = hand(q, k, v)
        self.buf.add_(1)
        return self.p.merge(o)


class BufAddBetweenScoresAndValues(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = Proj()
        self.register_buffer("buf", torch.ones(2, 2))

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        s = q @ k.transpose(-2, -1) * SCALE
        self.buf.mul_(3.0)
        p = s.softmax(-1)
        self.buf.add_(0.5)
        return self.p.merge(p @ v)


class StepCounter(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = Proj()
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.step += 1
        q, k, v = self.p.qkv(x)
        return self.p.merge(F.scaled_dot_product_attention(q, k, v))


class StepCounterUsedInOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = Proj()
        self.register_buffer("step", torch.zeros(()))

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        o = hand(q, k, v)
        self.step.add_(1.0)
        return self.p.merge(o) * self.step


class KVCacheCopy(nn.Module):
    """k, v are written into static cache buffers, and the attention reads the caches."""

    def __init__(self):
        super().__init__()
        self.p = Proj()
        self.register_buffer("kc", torch.zeros(B, H, S, D))
        self.register_buffer("vc", torch.zeros(B, H, S, D))

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        self.kc.copy_(k)
        self.vc.copy_(v * 2)
        return self.p.merge(hand(q, self.kc, self.vc))


class KVCacheIndexCopyDecode(nn.Module):
    """A static KV cache of length L; each call appends 2 tokens at `pos` with index_copy_ and attends
    over the filled prefix (the rest masked with -inf)."""

    L = 8

    def __init__(self):
        super().__init__()
        self.p = Proj()
        self.register_buffer("kc", torch.zeros(B, H, self.L, D))
        self.register_buffer("vc", torch.zeros(B, H, self.L, D))
        self.register_buffer("pos", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        q, k, v = self.p.qkv(x)  # x: (B, 2, E)
        idx = self.pos + torch.arange(2)
        self.kc.index_copy_(2, idx, k)
        self.vc.index_copy_(2, idx, v)
        self.pos.add_(2)
        valid = torch.arange(self.L) < self.pos
        s = (q @ self.kc.transpose(-2, -1)) * SCALE
        s = s.masked_fill(~valid, float("-inf"))
        return self.p.merge(s.softmax(-1) @ self.vc)


class KVCacheSetitemSdpa(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = Proj()
        self.register_buffer("kc", torch.zeros(B, H, 2 * S, D))
        self.register_buffer("vc", torch.zeros(B, H, 2 * S, D))

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        self.kc[:, :, S:] = self.kc[:, :, :S]
        self.vc[:, :, S:] = self.vc[:, :, :S]
        self.kc[:, :, :S] = k
        self.vc[:, :, :S] = v
        return self.p.merge(F.scaled_dot_product_attention(q, self.kc, self.vc))


class KVCacheReadThenWrite(nn.Module):
    """Attend over the old cache contents, then overwrite them: the attention must read before the write."""

    def __init__(self):
        super().__init__()
        self.p = Proj()
        self.register_buffer("kc", torch.randn(B, H, S, D))
        self.register_buffer("vc", torch.randn(B, H, S, D))

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        o = hand(q, self.kc, self.vc)
        self.kc.copy_(k)
        self.vc.copy_(v)
        return self.p.merge(o)


class CacheViewAddAfterAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = Proj()
        self.register_buffer("vc", torch.randn(B, H, S, D))

    def forward(self, x):
        q, k, _ = self.p.qkv(x)
        o = F.scaled_dot_product_attention(q, k, self.vc)
        self.vc[:, :, 0].add_(1.0)
        return self.p.merge(o)


class BufferMulFillZeroMaskedFill(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = Proj()
        self.register_buffer("a", torch.full((4,), 2.0))
        self.register_buffer("b", torch.ones(4))
        self.register_buffer("c", torch.ones(4))
        self.register_buffer("d", torch.arange(4.0))
        self.register_buffer("sel", torch.tensor([True, False, True, False]))

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        self.a.mul_(1.5)
        s = q @ k.transpose(-2, -1) * SCALE
        self.b.fill_(7.0)
        p = s.softmax(-1)
        self.c.zero_()
        o = p @ v
        self.d.masked_fill_(self.sel, -3.0)
        return self.p.merge(o)


class SetitemRecordsOutputStat(nn.Module):
    """A buffer records a statistic of the attention output: the write depends on the rewritten op."""

    def __init__(self):
        super().__init__()
        self.p = Proj()
        self.register_buffer("stat", torch.zeros(3))

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        o = hand(q, k, v)
        self.stat[0] = o.mean()
        self.stat[1] = o.abs().max()
        return self.p.merge(o)


class KProjViewAddBefore(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = Proj()

    def forward(self, x):
        kp = self.p.wk(x)
        kp.view(B, S, H, D).add_(1.0)
        q = self.p.split(self.p.wq(x), H)
        k = self.p.split(kp, H)
        v = self.p.split(self.p.wv(x), H)
        return self.p.merge(hand(q, k, v))


class VProjViewMulBeforeSdpa(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = Proj()

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        v.mul_(-2.0)
        return self.p.merge(F.scaled_dot_product_attention(q, k, v))


class KViewAddAfterAttentionAndReused(nn.Module):
    """k is mutated after the attention and then used again: the attention must see the old k."""

    def __init__(self):
        super().__init__()
        self.p = Proj()

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        o = hand(q, k, v)
        k.add_(1.0)
        return self.p.merge(o), k.sum(-1)


class QAddAfterSdpaAndReused(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = Proj()

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        o = F.scaled_dot_product_attention(q, k, v)
        q.mul_(0.0)
        o2 = F.scaled_dot_product_attention(q, k, v)
        return self.p.merge(o + o2)


class VMulBetweenScoresAndValues(nn.Module):
    """eager: scores from the old k, weights applied to the doubled v."""

    def __init__(self):
        super().__init__()
        self.p = Proj()

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        s = q @ k.transpose(-2, -1) * SCALE
        v.mul_(2.0)
        return self.p.merge(s.softmax(-1) @ v)


class KAddBetweenScoresAndValues(nn.Module):
    """eager: scores use the k before the add_; a fused op reading k at the value matmul is wrong."""

    def __init__(self):
        super().__init__()
        self.p = Proj()

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        s = q @ k.transpose(-2, -1) * SCALE
        k.add_(1.0)
        return self.p.merge(s.softmax(-1) @ v)


class QZeroBetweenScoresAndSoftmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = Proj()

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        s = torch.matmul(q, k.transpose(-2, -1)) / (D**0.5)
        q.zero_()
        p = torch.softmax(s, dim=-1)
        return self.p.merge(torch.matmul(p, v))


class VIsKAliasMutatedAfterScores(nn.Module):
    """v is k (self-similarity attention); k mutated after scores changes v too."""

    def __init__(self):
        super().__init__()
        self.p = Proj()

    def forward(self, x):
        q, k, _ = self.p.qkv(x)
        s = q @ k.transpose(-2, -1) * SCALE
        k.mul_(3.0)
        return self.p.merge(s.softmax(-1) @ k)


class ScoresMaskedFillInplace(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = Proj()
        self.register_buffer("causal", torch.ones(S, S, dtype=torch.bool).triu(1))

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        w = q @ k.transpose(-2, -1)
        w.div_(D**0.5)
        w.masked_fill_(self.causal, float("-inf"))
        return self.p.merge(w.softmax(-1) @ v)


class ScoresAddBiasInplace(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = Proj()
        self.register_buffer("bias", torch.randn(H, S, S))

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        w = q @ k.transpose(-2, -1)
        w.mul_(SCALE)
        w.add_(self.bias)
        return self.p.merge(w.softmax(-1) @ v)


class ScoresMutatedAfterSoftmax(nn.Module):
    """s.mul_(0) after the softmax: the weights were computed from the old s; s is then read again."""

    def __init__(self):
        super().__init__()
        self.p = Proj()

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        s = q @ k.transpose(-2, -1) * SCALE
        p = s.softmax(-1)
        s.mul_(0.0)
        return self.p.merge(p @ v) + s.sum()


class WeightsMulInplaceByKeep(nn.Module):
    """Post-softmax mask applied in place: not attention."""

    def __init__(self):
        super().__init__()
        self.p = Proj()
        self.register_buffer(
            "keep", (torch.rand(S, S, generator=torch.Generator().manual_seed(3)) > 0.4).float()
        )

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        p = (q @ k.transpose(-2, -1) * SCALE).softmax(-1)
        p.mul_(self.keep)
        return self.p.merge(p @ v)


class QPrescaleInplaceOperator(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = Proj()

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        q *= SCALE
        k += 0.25
        return self.p.merge((q @ k.transpose(-2, -1)).softmax(-1) @ v)


class OutputMutatedInplace(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = Proj()

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        o = F.scaled_dot_product_attention(q, k, v)
        o.mul_(2.0)
        o += 1.0
        return self.p.merge(o)


class InputMutatedBeforeAttention(nn.Module):
    def forward(self, q, k, v):
        k.mul_(0.5)
        v.add_(1.0)
        return (q @ k.transpose(-2, -1) * SCALE).softmax(-1) @ v


class InputMutatedBetweenScoresAndValues(nn.Module):
    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * SCALE
        v.add_(1.0)
        k.zero_()
        return s.softmax(-1) @ v


class DropoutInplaceEval(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = Proj()

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        p = (q @ k.transpose(-2, -1) * SCALE).softmax(-1)
        p = F.dropout(p, 0.3, training=False, inplace=True)
        return self.p.merge(p @ v)


class NeighbourMaskBufferFlippedBetweenSites(nn.Module):
    """Two sites share a key-padding mask buffer; it is changed in place between them."""

    def __init__(self):
        super().__init__()
        self.p = Proj()
        m = torch.zeros(B, 1, 1, S, dtype=torch.bool)
        m[0, ..., -3:] = True
        self.register_buffer("pad", m)

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        a = (q @ k.transpose(-2, -1) * SCALE).masked_fill(self.pad, float("-inf")).softmax(-1) @ v
        self.pad[..., :2] = True
        b = (q @ k.transpose(-2, -1) * SCALE).masked_fill(self.pad, float("-inf")).softmax(-1) @ v
        return self.p.merge(a + b)


class NeighbourSkippedSiteMaskMutated(nn.Module):
    """Site A returns its weights (must be left alone) and its mask is then mutated; site B is
    ordinary attention over the mutated mask."""

    def __init__(self):
        super().__init__()
        self.p = Proj()

    def forward(self, x, mask):
        q, k, v = self.p.qkv(x)
        pa = (q @ k.transpose(-2, -1) * SCALE).masked_fill(~mask, float("-inf")).softmax(-1)
        a = pa @ v
        mask.logical_not_()
        mask[..., 0] = True
        b = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.p.merge(a + b), pa


class NeighbourAdditiveMaskScaledInplace(nn.Module):
    """An additive float mask used by site A, then rescaled in place before site B uses it."""

    def __init__(self):
        super().__init__()
        self.p = Proj()
        self.register_buffer("amask", torch.randn(1, 1, S, S))

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=self.amask)
        self.amask.mul_(4.0)
        b = (q @ k.transpose(-2, -1) * SCALE + self.amask).softmax(-1) @ v
        return self.p.merge(a - b)


class NeighbourMaskFilledAfterLastSite(nn.Module):
    """Mask of the (lookalike: mild fill -1.0) site is cleared after use; calls repeat."""

    def __init__(self):
        super().__init__()
        self.p = Proj()
        self.register_buffer(
            "m", torch.rand(S, S, generator=torch.Generator().manual_seed(5)) > 0.5
        )

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        a = (q @ k.transpose(-2, -1) * SCALE).masked_fill(self.m, -1.0).softmax(-1) @ v
        b = F.scaled_dot_product_attention(
            q, k, v, attn_mask=~self.m | torch.eye(S, dtype=torch.bool)
        )
        self.m.copy_(self.m.roll(1, dims=-1))
        return self.p.merge(a + b)


class ParamEmaUnderNoGrad(nn.Module):
    """An EMA-style in-place update of a parameter under no_grad next to the site."""

    def __init__(self):
        super().__init__()
        self.p = Proj()
        self.gain = nn.Parameter(torch.ones(E))

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        o = self.p.merge(F.scaled_dot_product_attention(q, k, v))
        with torch.no_grad():
            self.gain.mul_(0.9).add_(0.1)
        return o * self.gain


CASES = {
    "buf_add_before_sdpa": (BufAddBeforeSdpa, 1),
    "buf_add_after_handwritten": (BufAddAfterHandwritten, 1),
    "buf_ops_between_scores_and_values": (BufAddBetweenScoresAndValues, 2),
    "step_counter": (StepCounter, 3),
    "step_counter_used_in_output": (StepCounterUsedInOutput, 3),
    "kv_cache_copy": (KVCacheCopy, 2),
    "kv_cache_setitem_sdpa": (KVCacheSetitemSdpa, 3),
    "kv_cache_read_then_write": (KVCacheReadThenWrite, 2),
    "cache_view_add_after_attention": (CacheViewAddAfterAttention, 2),
    "buffer_mul_fill_zero_masked_fill": (BufferMulFillZeroMaskedFill, 2),
    "setitem_records_output_stat": (SetitemRecordsOutputStat, 1),
    "k_proj_view_add_before": (KProjViewAddBefore, 1),
    "v_proj_mul_before_sdpa": (VProjViewMulBeforeSdpa, 1),
    "k_add_after_attention_reused": (KViewAddAfterAttentionAndReused, 1),
    "q_zeroed_between_two_sdpa": (QAddAfterSdpaAndReused, 1),
    "v_mul_between_scores_and_values": (VMulBetweenScoresAndValues, 1),
    "k_add_between_scores_and_values": (KAddBetweenScoresAndValues, 1),
    "q_zero_between_scores_and_softmax": (QZeroBetweenScoresAndSoftmax, 1),
    "v_is_k_mutated_after_scores": (VIsKAliasMutatedAfterScores, 1),
    "scores_masked_fill_inplace": (ScoresMaskedFillInplace, 1),
    "scores_add_bias_inplace": (ScoresAddBiasInplace, 1),
    "scores_mutated_after_softmax": (ScoresMutatedAfterSoftmax, 1),
    "weights_mul_inplace_by_keep": (WeightsMulInplaceByKeep, 1),
    "q_prescale_inplace_operator": (QPrescaleInplaceOperator, 1),
    "output_mutated_inplace": (OutputMutatedInplace, 1),
    "dropout_inplace_eval": (DropoutInplaceEval, 1),
    "neighbour_mask_buffer_flipped_between_sites": (NeighbourMaskBufferFlippedBetweenSites, 2),
    "neighbour_additive_mask_scaled_inplace": (NeighbourAdditiveMaskScaledInplace, 2),
    "neighbour_mask_filled_after_last_site": (NeighbourMaskFilledAfterLastSite, 3),
    "param_ema_under_no_grad": (ParamEmaUnderNoGrad, 2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_mutation_next_to_site_matches_eager(name):
    cls, calls = CASES[name]
    torch.manual_seed(0)
    check(cls(), x_input(), calls=calls)


def test_inplace_buffer_update_survives_rewrite_of_neighbouring_site():
    m = BufAddBeforeSdpa()
    _cm, rep, _ = check(m, x_input(), calls=2)
    assert_rewritten(rep, 1)
    assert torch.equal(m.buf, torch.full((3,), 2.0)), f"buffer after 2 calls: {m.buf}"


def test_step_counter_buffer_counts_every_call():
    m = StepCounter()
    check(m, x_input(), calls=3)
    assert m.step.item() == 3


def test_static_kv_cache_index_copy_decode_steps_match_eager():
    torch.manual_seed(0)
    m = KVCacheIndexCopyDecode()
    check(m, x_input(s=2), calls=3)
    assert m.pos.item() == 6


def test_neighbouring_site_mask_input_mutated_between_sites():
    torch.manual_seed(0)
    mask = torch.rand(B, 1, S, S, generator=torch.Generator().manual_seed(9)) > 0.3
    mask[..., 0] = True
    check(NeighbourSkippedSiteMaskMutated(), x_input(), mask)


@pytest.mark.parametrize("cls", [InputMutatedBeforeAttention, InputMutatedBetweenScoresAndValues])
def test_inputs_mutated_in_place_next_to_site(cls):
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    check(cls(), q, k, v)


@pytest.mark.parametrize(
    "cls",
    [
        KProjViewAddBefore,
        VMulBetweenScoresAndValues,
        ScoresMaskedFillInplace,
        ScoresAddBiasInplace,
        QPrescaleInplaceOperator,
    ],
)
def test_mutation_next_to_site_gradients_match_eager(cls):
    torch.manual_seed(0)
    check(cls(), x_input(), grad=True)


class VMutatedThroughBaseBetweenScoresAndValues(nn.Module):
    """v's base (the projection output) is written after the scores: eager's p @ v sees the write."""

    def __init__(self):
        super().__init__()
        self.p = Proj()

    def forward(self, x):
        q = self.p.split(self.p.wq(x), H)
        k = self.p.split(self.p.wk(x), H)
        vbase = self.p.wv(x)
        v = self.p.split(vbase, H)
        s = q @ k.transpose(-2, -1) * SCALE
        vbase.add_(1.0)
        return self.p.merge(s.softmax(-1) @ v)


class KMutatedThroughBaseBetweenScoresAndValues(nn.Module):
    """k's base is written after the scores: eager's scores used the old k."""

    def __init__(self):
        super().__init__()
        self.p = Proj()

    def forward(self, x):
        q = self.p.split(self.p.wq(x), H)
        kbase = self.p.wk(x)
        k = self.p.split(kbase, H)
        v = self.p.split(self.p.wv(x), H)
        s = q @ k.transpose(-2, -1) * SCALE
        kbase.mul_(-1.0)
        return self.p.merge(s.softmax(-1) @ v)


class CacheSliceViewMutatedBetweenScoresAndValues(nn.Module):
    """k, v are views of a cache buffer; the cache is written between the score and value matmuls."""

    def __init__(self):
        super().__init__()
        self.p = Proj()
        self.register_buffer("cache", torch.randn(2, B, H, S, D))

    def forward(self, x):
        q = self.p.split(self.p.wq(x), H)
        k, v = self.cache[0], self.cache[1]
        s = q @ k.transpose(-2, -1) * SCALE
        self.cache[:, :, :, 0] = 5.0
        return self.p.merge(s.softmax(-1) @ v)


class MaskMutatedBetweenScoresAndFill(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = Proj()
        self.register_buffer("m", torch.zeros(B, 1, 1, S, dtype=torch.bool))

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        s = q @ k.transpose(-2, -1) * SCALE
        self.m[..., -3:] = True
        return self.p.merge(s.masked_fill(self.m, float("-inf")).softmax(-1) @ v)


class MaskMutatedBetweenFillAndSoftmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = Proj()
        m = torch.zeros(B, 1, 1, S, dtype=torch.bool)
        m[..., -2:] = True
        self.register_buffer("m", m)

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        s = (q @ k.transpose(-2, -1) * SCALE).masked_fill(self.m, float("-inf"))
        self.m.logical_not_()
        self.m[..., 0] = False
        return self.p.merge(s.softmax(-1) @ v)


class AdditiveMaskMutatedBetweenAddAndSoftmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = Proj()
        self.register_buffer("bias", torch.randn(1, H, S, S))

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        s = q @ k.transpose(-2, -1) * SCALE + self.bias
        self.bias.mul_(10.0)
        return self.p.merge(s.softmax(-1) @ v)


ALIAS_CASES = [
    VMutatedThroughBaseBetweenScoresAndValues,
    KMutatedThroughBaseBetweenScoresAndValues,
    CacheSliceViewMutatedBetweenScoresAndValues,
    MaskMutatedBetweenScoresAndFill,
    MaskMutatedBetweenFillAndSoftmax,
    AdditiveMaskMutatedBetweenAddAndSoftmax,
]


@pytest.mark.parametrize("cls", ALIAS_CASES, ids=lambda c: c.__name__)
def test_write_through_an_alias_inside_the_site_matches_eager(cls):
    torch.manual_seed(0)
    check(cls(), x_input(), calls=2)


class KWrittenByNamedDunderBetweenScoresAndValues(nn.Module):
    """`k.__imul__(3)` called by name: Dynamo records a `call_method` of the dunder, which
    writes into k as `k *= 3` does."""

    def __init__(self, method: str):
        super().__init__()
        self.p = Proj()
        self.method = method

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        k = k + 1.0
        s = q @ k.transpose(-2, -1) * SCALE
        getattr(k, self.method)(3.0)
        return self.p.merge(s.softmax(-1) @ v), k


@pytest.mark.parametrize("method", ["__imul__", "__itruediv__", "__iadd__", "__isub__"])
def test_an_in_place_dunder_called_by_name_is_a_write(method):
    torch.manual_seed(0)
    check(KWrittenByNamedDunderBetweenScoresAndValues(method), x_input(), calls=1)
