"""Class 2: stop-gradients inside attention. The rewritten op must not let gradients flow where eager
stops them (.detach() on q, k, v, on the scores, on the weights; torch.no_grad() blocks), and must
deliver the ones eager delivers."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.adversarial._harness import B, Proj, S, check, inv_sqrt, x_input

H, D = 2, 8
SCALE = inv_sqrt(D)


class Base(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.p = Proj(**kw)


class DetachQSdpa(Base):
    def forward(self, x):
        q, k, v = self.p.qkv(x)
        return self.p.merge(F.scaled_dot_product_attention(q.detach(), k, v))


class DetachKHandwritten(Base):
    def forward(self, x):
        q, k, v = self.p.qkv(x)
        return self.p.merge((q @ k.detach().transpose(-2, -1) * SCALE).softmax(-1) @ v)


class DetachKTransposed(Base):
    def forward(self, x):
        q, k, v = self.p.qkv(x)
        kt = k.transpose(-2, -1).detach()
        return self.p.merge(torch.softmax(torch.matmul(q, kt) * SCALE, dim=-1) @ v)


class DetachVEinsum(Base):
    def forward(self, x):
        q, k, v = self.p.qkv(x)
        w = torch.einsum("bhqd,bhkd->bhqk", q, k) * SCALE
        return self.p.merge(torch.einsum("bhqk,bhkd->bhqd", w.softmax(-1), v.detach()))


class DetachScores(Base):
    def forward(self, x):
        q, k, v = self.p.qkv(x)
        s = (q @ k.transpose(-2, -1) * SCALE).detach()
        return self.p.merge(s.softmax(-1) @ v)


class DetachScoresBeforeScale(Base):
    def forward(self, x):
        q, k, v = self.p.qkv(x)
        s = (q @ k.transpose(-2, -1)).detach() * SCALE
        return self.p.merge(s.softmax(-1) @ v)


class DetachWeights(Base):
    def forward(self, x):
        q, k, v = self.p.qkv(x)
        p = (q @ k.transpose(-2, -1) * SCALE).softmax(-1).detach()
        return self.p.merge(p @ v)


class DetachWeightsBmm(Base):
    def forward(self, x):
        q, k, v = self.p.qkv(x)
        q3, k3, v3 = (t.reshape(B * H, S, D) for t in (q, k, v))
        p = torch.bmm(q3, k3.transpose(1, 2)).mul(SCALE).softmax(-1)
        o = torch.bmm(p.detach(), v3)
        return self.p.merge(o.view(B, H, S, D))


class NoGradScores(Base):
    def forward(self, x):
        q, k, v = self.p.qkv(x)
        with torch.no_grad():
            s = q @ k.transpose(-2, -1) * SCALE
        return self.p.merge(s.softmax(-1) @ v)


class NoGradSoftmax(Base):
    def forward(self, x):
        q, k, v = self.p.qkv(x)
        s = q @ k.transpose(-2, -1) * SCALE
        with torch.no_grad():
            p = s.softmax(-1)
        return self.p.merge(p @ v)


class NoGradWholeAttentionPlusResidual(Base):
    def forward(self, x):
        q, k, v = self.p.qkv(x)
        with torch.no_grad():
            o = F.scaled_dot_product_attention(q, k, v)
        return self.p.merge(o + v)


class NoGradWholeHandwritten(Base):
    def forward(self, x):
        q, k, v = self.p.qkv(x)
        with torch.no_grad():
            o = (q @ k.transpose(-2, -1) * SCALE).softmax(-1) @ v
        return self.p.merge(o) + x


class NoGradKProjection(Base):
    def forward(self, x):
        with torch.no_grad():
            k = self.p.split(self.p.wk(x), H)
        q = self.p.split(self.p.wq(x), H)
        v = self.p.split(self.p.wv(x), H)
        return self.p.merge(F.scaled_dot_product_attention(q, k, v))


class DetachVButVAlsoInResidual(Base):
    def forward(self, x):
        q, k, v = self.p.qkv(x)
        o = (q @ k.transpose(-2, -1) * SCALE).softmax(-1) @ v.detach()
        return self.p.merge(o + v)


class DetachOutput(Base):
    def forward(self, x):
        q, k, v = self.p.qkv(x)
        o = F.scaled_dot_product_attention(q, k, v).detach()
        return self.p.merge(o * q)


class DetachQKBothGqa(Base):
    def __init__(self):
        super().__init__(H=4, Hkv=2)

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        k = k.repeat_interleave(2, dim=1)
        v = v.repeat_interleave(2, dim=1)
        return self.p.merge(F.scaled_dot_product_attention(q.detach(), k.detach(), v))


class PartialDetachQ(Base):
    def forward(self, x):
        q, k, v = self.p.qkv(x)
        q = torch.cat([q[..., :4].detach(), q[..., 4:]], dim=-1)
        return self.p.merge((q @ k.transpose(-2, -1) * SCALE).softmax(-1) @ v)


class StraightThroughHardAttention(Base):
    """Forward is hard (argmax) attention, backward is softmax attention's."""

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        p = (q @ k.transpose(-2, -1) * SCALE).softmax(-1)
        hard = F.one_hot(p.argmax(-1), S).to(p.dtype)
        return self.p.merge((hard + p - p.detach()) @ v)


class DetachMaskedScores(Base):
    def __init__(self):
        super().__init__()
        self.register_buffer("causal", torch.ones(S, S, dtype=torch.bool).tril())

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        s = (q @ k.transpose(-2, -1) * SCALE).masked_fill(~self.causal, float("-inf"))
        return self.p.merge(s.detach().softmax(-1) @ v)


class DetachedLearnedBias(Base):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(H, S, S) * 0.5)

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        return self.p.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias.detach()))


class DetachSoftmaxInputOnlyForHalfHeads(Base):
    def __init__(self):
        super().__init__(H=4)

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        s = q @ k.transpose(-2, -1) * SCALE
        s = torch.cat([s[:, :2].detach(), s[:, 2:]], dim=1)
        return self.p.merge(s.softmax(-1) @ v)


PROGRAMS = [
    DetachQSdpa,
    DetachKHandwritten,
    DetachKTransposed,
    DetachVEinsum,
    DetachScores,
    DetachScoresBeforeScale,
    DetachWeights,
    DetachWeightsBmm,
    NoGradScores,
    NoGradSoftmax,
    NoGradWholeAttentionPlusResidual,
    NoGradWholeHandwritten,
    NoGradKProjection,
    DetachVButVAlsoInResidual,
    DetachOutput,
    DetachQKBothGqa,
    PartialDetachQ,
    StraightThroughHardAttention,
    DetachMaskedScores,
    DetachedLearnedBias,
    DetachSoftmaxInputOnlyForHalfHeads,
]


@pytest.mark.parametrize("cls", PROGRAMS, ids=lambda c: c.__name__)
def test_stop_gradient_in_attention_matches_eager_gradients(cls):
    torch.manual_seed(0)
    check(cls(), x_input(), grad=True)


def test_detached_key_projection_gets_no_gradient():
    """Direct statement of the property on the simplest program."""
    torch.manual_seed(0)
    m = DetachKHandwritten()
    check(m, x_input(), grad=True)
    assert m.p.wk.weight.grad is None or not m.p.wk.weight.grad.any()


def test_detached_scores_give_query_and_key_projections_no_gradient():
    torch.manual_seed(0)
    m = DetachScores()
    check(m, x_input(), grad=True)
    for w in (m.p.wq.weight, m.p.wk.weight):
        assert w.grad is None or not w.grad.any()
    assert m.p.wv.weight.grad is not None and m.p.wv.weight.grad.abs().sum() > 0


class SetGradEnabledFalseScores(Base):
    def forward(self, x):
        q, k, v = self.p.qkv(x)
        with torch.set_grad_enabled(False):
            s = q @ k.transpose(-2, -1) * SCALE
            p = s.softmax(-1)
        return self.p.merge(p @ v)


class FrozenKeyProjection(Base):
    def __init__(self):
        super().__init__()
        self.p.wk.requires_grad_(False)

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        return self.p.merge(F.scaled_dot_product_attention(q, k, v))


class DetachInsideHelperMethod(Base):
    def scores(self, q, k):
        return (q @ k.transpose(-2, -1)).detach() * SCALE

    def forward(self, x):
        q, k, v = self.p.qkv(x)
        return self.p.merge(self.scores(q, k).softmax(-1) @ v) + q.sum()


@pytest.mark.parametrize(
    "cls",
    [SetGradEnabledFalseScores, FrozenKeyProjection, DetachInsideHelperMethod],
    ids=lambda c: c.__name__,
)
def test_more_stop_gradient_spellings_match_eager(cls):
    torch.manual_seed(0)
    check(cls(), x_input(), grad=True)
