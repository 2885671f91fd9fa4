"""Every recognised attention form: the golden rewritten graph and numerical equality with eager.

Inputs are fp32 so that equality is tight; the rewritten graphs run the TORCH_SDPA backend.
"""

import math

import expecttest
import torch
import torch.nn.functional as F

from tests._graphs import assert_close, rewrite

B, S, H, D = 2, 6, 4, 8


def bshd(*shape):
    return torch.randn(*shape)


def qkv_bshd(sk=S, hk=H):
    return bshd(B, S, H, D), bshd(B, sk, hk, D), bshd(B, sk, hk, D)


def sdpa_from_bshd(q, k, v):
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return o.transpose(1, 2).reshape(B, S, H * D)


def sdpa_positional_causal_scale(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, None, 0.0, True, scale=0.125)


def sdpa_bool_mask(q, k, v, keep):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def sdpa_gqa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def matmul_div_sqrt(q, k, v):
    w = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    return w.softmax(dim=-1) @ v


def matmul_prescaled_q_upcast(q, k, v):
    q = q * q.shape[-1] ** -0.5
    w = torch.matmul(q, k.mT).float()
    return torch.matmul(F.softmax(w, dim=-1).to(q.dtype), v)


def masked_fill_causal(q, k, v):
    w = q @ k.transpose(-1, -2) * 0.3
    causal = torch.ones(S, S, dtype=torch.bool).triu(1)
    w = w.masked_fill(causal, float("-inf"))
    return torch.softmax(w, -1) @ v


def additive_mask_and_dropout(q, k, v, bias):
    w = torch.matmul(q, k.transpose(2, 3)) * 0.25 + bias
    p = F.dropout(w.softmax(-1), p=0.1, training=False)
    return p @ v


def where_keep_mask(q, k, v, keep):
    w = q @ k.transpose(-2, -1) / 3.0
    w = torch.where(keep, w, torch.finfo(w.dtype).min)
    return w.softmax(-1) @ v


def einsum_bshd(q, k, v):
    w = torch.einsum("bqhd,bkhd->bhqk", q, k) * D**-0.5
    return torch.einsum("bhqk,bkhd->bqhd", w.softmax(-1), v)


def bmm_merged_heads(q, k, v):
    qm = q.transpose(1, 2).reshape(B * H, S, D)
    km = k.transpose(1, 2).reshape(B * H, -1, D)
    vm = v.transpose(1, 2).reshape(B * H, -1, D)
    w = torch.bmm(qm, km.transpose(1, 2)) * 0.5
    o = torch.bmm(w.softmax(-1), vm)
    return o.view(B, H, S, D).transpose(1, 2).reshape(B, S, H * D)


def baddbmm_merged_heads(q, k, v):
    qm = q.transpose(1, 2).reshape(B * H, S, D)
    km = k.transpose(1, 2).reshape(B * H, S, D)
    vm = v.transpose(1, 2).reshape(B * H, S, D)
    w = torch.baddbmm(torch.empty(B * H, S, S), qm, km.transpose(1, 2), beta=0, alpha=0.2)
    return torch.bmm(F.softmax(w, dim=-1), vm)


def gqa_repeat_interleave(q, k, v):
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    v = v.repeat_interleave(H // v.shape[1], dim=1)
    return (q @ k.transpose(-2, -1) * 0.3).softmax(-1) @ v


def gqa_expand(q, k, v):
    g = H // k.shape[1]
    k = k[:, :, None].expand(B, k.shape[1], g, S, D).reshape(B, H, S, D)
    v = v[:, :, None].expand(B, v.shape[1], g, S, D).reshape(B, H, S, D)
    return (q @ k.transpose(-2, -1) * 0.3).softmax(-1) @ v


def cross_attention(x, text):
    q = x.view(B, S, H, D).transpose(1, 2)
    k = text.view(B, 3, H, D).transpose(1, 2)
    w = q @ k.transpose(-2, -1) * 0.2
    return (w.softmax(-1) @ k).transpose(1, 2).reshape(B, S, H * D)


class TestRewrittenForms(expecttest.TestCase):
    def check(self, fn, *args, form, **site):
        text, sites, _, out = rewrite(fn, *args)
        assert_close(out, fn(*args))
        self.assertEqual(len(sites), 1, sites)
        self.assertEqual(sites[0].status, "rewritten", sites[0].reason)
        self.assertEqual(sites[0].form, form)
        for key, value in site.items():
            got = getattr(sites[0], key)
            if isinstance(value, float):
                self.assertAlmostEqual(got, value, places=6, msg=key)
            else:
                self.assertEqual(got, value, key)
        self.assertNotIn("softmax", text)
        self.assertNotIn("matmul", text)
        return text

    def test_sdpa_bshd_transposes_cancel(self):
        text = self.check(sdpa_from_bshd, *qkv_bshd(), form="sdpa", layout="BSHD", heads=H)
        self.assertExpectedInline(
            text,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, L_q_: "f32[2, 6, 4, 8]", L_k_: "f32[2, 6, 4, 8]", L_v_: "f32[2, 6, 4, 8]"):
        l_q_ = L_q_
        l_k_ = L_k_
        l_v_ = L_v_

        attention_default: "f32[2, 6, 4, 8]" = torch.ops.fv_compile.attention.default(l_q_, l_k_, l_v_, None, SITE, 0, []);  l_q_ = l_k_ = l_v_ = None

        reshape: "f32[2, 6, 32]" = attention_default.reshape(2, 6, 32);  attention_default = None
        return (reshape,)
""",
        )

    def test_sdpa_positional_causal_and_scale(self):
        q, k, v = (x.transpose(1, 2) for x in qkv_bshd())
        text = self.check(
            sdpa_positional_causal_scale, q, k, v, form="sdpa", causal=True, scale=0.125
        )
        self.assertExpectedInline(
            text,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, L_q_: "f32[2, 4, 6, 8]", L_k_: "f32[2, 4, 6, 8]", L_v_: "f32[2, 4, 6, 8]"):
        l_q_ = L_q_
        l_k_ = L_k_
        l_v_ = L_v_

        permute: "f32[2, 6, 4, 8]" = l_q_.permute(0, 2, 1, 3);  l_q_ = None
        permute_1: "f32[2, 6, 4, 8]" = l_k_.permute(0, 2, 1, 3);  l_k_ = None
        permute_2: "f32[2, 6, 4, 8]" = l_v_.permute(0, 2, 1, 3);  l_v_ = None
        attention_default: "f32[2, 6, 4, 8]" = torch.ops.fv_compile.attention.default(permute, permute_1, permute_2, None, SITE, 0, []);  permute = permute_1 = permute_2 = None
        permute_3: "f32[2, 4, 6, 8]" = attention_default.permute(0, 2, 1, 3);  attention_default = None
        return (permute_3,)
""",
        )

    def test_sdpa_bool_mask(self):
        q, k, v = (x.transpose(1, 2) for x in qkv_bshd())
        keep = torch.rand(B, 1, S, S) > 0.3
        keep[..., 0] = True
        text = self.check(sdpa_bool_mask, q, k, v, keep, form="sdpa", mask="bool")
        self.assertExpectedInline(
            text,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, L_q_: "f32[2, 4, 6, 8]", L_k_: "f32[2, 4, 6, 8]", L_v_: "f32[2, 4, 6, 8]", L_keep_: "b8[2, 1, 6, 6]"):
        l_q_ = L_q_
        l_k_ = L_k_
        l_v_ = L_v_
        l_keep_ = L_keep_

        permute: "f32[2, 6, 4, 8]" = l_q_.permute(0, 2, 1, 3);  l_q_ = None
        permute_1: "f32[2, 6, 4, 8]" = l_k_.permute(0, 2, 1, 3);  l_k_ = None
        permute_2: "f32[2, 6, 4, 8]" = l_v_.permute(0, 2, 1, 3);  l_v_ = None
        attention_default: "f32[2, 6, 4, 8]" = torch.ops.fv_compile.attention.default(permute, permute_1, permute_2, l_keep_, SITE, 0, []);  permute = permute_1 = permute_2 = l_keep_ = None
        permute_3: "f32[2, 4, 6, 8]" = attention_default.permute(0, 2, 1, 3);  attention_default = None
        return (permute_3,)
""",
        )

    def test_sdpa_enable_gqa(self):
        q, k, v = (x.transpose(1, 2) for x in qkv_bshd(hk=2))
        text = self.check(sdpa_gqa, q, k, v, form="sdpa", heads=H, kv_heads=2)
        self.assertExpectedInline(
            text,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, L_q_: "f32[2, 4, 6, 8]", L_k_: "f32[2, 2, 6, 8]", L_v_: "f32[2, 2, 6, 8]"):
        l_q_ = L_q_
        l_k_ = L_k_
        l_v_ = L_v_

        permute: "f32[2, 6, 4, 8]" = l_q_.permute(0, 2, 1, 3);  l_q_ = None
        permute_1: "f32[2, 6, 2, 8]" = l_k_.permute(0, 2, 1, 3);  l_k_ = None
        permute_2: "f32[2, 6, 2, 8]" = l_v_.permute(0, 2, 1, 3);  l_v_ = None
        attention_default: "f32[2, 6, 4, 8]" = torch.ops.fv_compile.attention.default(permute, permute_1, permute_2, None, SITE, 0, []);  permute = permute_1 = permute_2 = None
        permute_3: "f32[2, 4, 6, 8]" = attention_default.permute(0, 2, 1, 3);  attention_default = None
        return (permute_3,)
""",
        )

    def test_matmul_divided_by_sqrt_d(self):
        q, k, v = (x.transpose(1, 2) for x in qkv_bshd())
        text = self.check(matmul_div_sqrt, q, k, v, form="matmul", layout="BHSD", scale=D**-0.5)
        self.assertExpectedInline(
            text,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, L_k_: "f32[2, 4, 6, 8]", L_q_: "f32[2, 4, 6, 8]", L_v_: "f32[2, 4, 6, 8]"):
        l_k_ = L_k_
        l_q_ = L_q_
        l_v_ = L_v_

        permute: "f32[2, 6, 4, 8]" = l_q_.permute(0, 2, 1, 3);  l_q_ = None
        permute_1: "f32[2, 6, 4, 8]" = l_k_.permute(0, 2, 1, 3);  l_k_ = None
        permute_2: "f32[2, 6, 4, 8]" = l_v_.permute(0, 2, 1, 3);  l_v_ = None
        attention_default: "f32[2, 6, 4, 8]" = torch.ops.fv_compile.attention.default(permute, permute_1, permute_2, None, SITE, 0, []);  permute = permute_1 = permute_2 = None
        permute_3: "f32[2, 4, 6, 8]" = attention_default.permute(0, 2, 1, 3);  attention_default = None
        return (permute_3,)
""",
        )

    def test_matmul_prescaled_q_with_upcast(self):
        q, k, v = (x.transpose(1, 2) for x in qkv_bshd())
        text = self.check(matmul_prescaled_q_upcast, q, k, v, form="matmul", scale=D**-0.5)
        self.assertExpectedInline(
            text,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, L_q_: "f32[2, 4, 6, 8]", L_k_: "f32[2, 4, 6, 8]", L_v_: "f32[2, 4, 6, 8]"):
        l_q_ = L_q_
        l_k_ = L_k_
        l_v_ = L_v_

        permute: "f32[2, 6, 4, 8]" = l_q_.permute(0, 2, 1, 3);  l_q_ = None
        permute_1: "f32[2, 6, 4, 8]" = l_k_.permute(0, 2, 1, 3);  l_k_ = None
        permute_2: "f32[2, 6, 4, 8]" = l_v_.permute(0, 2, 1, 3);  l_v_ = None
        attention_default: "f32[2, 6, 4, 8]" = torch.ops.fv_compile.attention.default(permute, permute_1, permute_2, None, SITE, 0, []);  permute = permute_1 = permute_2 = None
        permute_3: "f32[2, 4, 6, 8]" = attention_default.permute(0, 2, 1, 3);  attention_default = None
        return (permute_3,)
""",
        )

    def test_masked_fill_causal_mask_becomes_causal(self):
        q, k, v = (x.transpose(1, 2) for x in qkv_bshd())
        text = self.check(masked_fill_causal, q, k, v, form="matmul", causal=True, mask=None)
        self.assertExpectedInline(
            text,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, L_k_: "f32[2, 4, 6, 8]", L_q_: "f32[2, 4, 6, 8]", L_v_: "f32[2, 4, 6, 8]"):
        l_k_ = L_k_
        l_q_ = L_q_
        l_v_ = L_v_

        permute: "f32[2, 6, 4, 8]" = l_q_.permute(0, 2, 1, 3);  l_q_ = None
        permute_1: "f32[2, 6, 4, 8]" = l_k_.permute(0, 2, 1, 3);  l_k_ = None
        permute_2: "f32[2, 6, 4, 8]" = l_v_.permute(0, 2, 1, 3);  l_v_ = None
        attention_default: "f32[2, 6, 4, 8]" = torch.ops.fv_compile.attention.default(permute, permute_1, permute_2, None, SITE, 0, []);  permute = permute_1 = permute_2 = None
        permute_3: "f32[2, 4, 6, 8]" = attention_default.permute(0, 2, 1, 3);  attention_default = None
        return (permute_3,)
""",
        )

    def test_additive_mask_with_eval_dropout(self):
        q, k, v = (x.transpose(1, 2) for x in qkv_bshd())
        bias = torch.randn(1, H, S, S)
        text = self.check(
            additive_mask_and_dropout, q, k, v, bias, form="matmul", mask="additive", scale=0.25
        )
        self.assertExpectedInline(
            text,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, L_k_: "f32[2, 4, 6, 8]", L_q_: "f32[2, 4, 6, 8]", L_bias_: "f32[1, 4, 6, 6]", L_v_: "f32[2, 4, 6, 8]"):
        l_k_ = L_k_
        l_q_ = L_q_
        l_bias_ = L_bias_
        l_v_ = L_v_

        permute: "f32[2, 6, 4, 8]" = l_q_.permute(0, 2, 1, 3);  l_q_ = None
        permute_1: "f32[2, 6, 4, 8]" = l_k_.permute(0, 2, 1, 3);  l_k_ = None
        permute_2: "f32[2, 6, 4, 8]" = l_v_.permute(0, 2, 1, 3);  l_v_ = None
        attention_default: "f32[2, 6, 4, 8]" = torch.ops.fv_compile.attention.default(permute, permute_1, permute_2, l_bias_, SITE, 0, []);  permute = permute_1 = permute_2 = l_bias_ = None
        permute_3: "f32[2, 4, 6, 8]" = attention_default.permute(0, 2, 1, 3);  attention_default = None
        return (permute_3,)
""",
        )

    def test_where_mask(self):
        q, k, v = (x.transpose(1, 2) for x in qkv_bshd())
        keep = torch.rand(B, 1, 1, S) > 0.3
        keep[..., 0] = True
        text = self.check(where_keep_mask, q, k, v, keep, form="matmul", mask="bool")
        self.assertExpectedInline(
            text,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, L_k_: "f32[2, 4, 6, 8]", L_q_: "f32[2, 4, 6, 8]", L_keep_: "b8[2, 1, 1, 6]", L_v_: "f32[2, 4, 6, 8]"):
        l_k_ = L_k_
        l_q_ = L_q_
        l_keep_ = L_keep_
        l_v_ = L_v_

        permute: "f32[2, 6, 4, 8]" = l_q_.permute(0, 2, 1, 3);  l_q_ = None
        permute_1: "f32[2, 6, 4, 8]" = l_k_.permute(0, 2, 1, 3);  l_k_ = None
        permute_2: "f32[2, 6, 4, 8]" = l_v_.permute(0, 2, 1, 3);  l_v_ = None
        any_1: "b8[2, 1, 1, 6]" = l_keep_.any(2, True)
        permute_3: "b8[2, 6, 1, 1]" = any_1.permute(0, 3, 1, 2);  any_1 = None
        logical_not: "b8[2, 6, 1, 1]" = torch.logical_not(permute_3);  permute_3 = None
        masked_fill: "f32[2, 6, 4, 8]" = permute_1.masked_fill(logical_not, 0.0);  permute_1 = logical_not = None
        attention_default: "f32[2, 6, 4, 8]" = torch.ops.fv_compile.attention.default(permute, masked_fill, permute_2, l_keep_, SITE, 0, []);  permute = masked_fill = permute_2 = l_keep_ = None
        permute_4: "f32[2, 4, 6, 8]" = attention_default.permute(0, 2, 1, 3);  attention_default = None
        return (permute_4,)
""",
        )

    def test_einsum_bshd(self):
        text = self.check(einsum_bshd, *qkv_bshd(), form="einsum", layout="BSHD", scale=D**-0.5)
        self.assertExpectedInline(
            text,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, L_q_: "f32[2, 6, 4, 8]", L_k_: "f32[2, 6, 4, 8]", L_v_: "f32[2, 6, 4, 8]"):
        l_q_ = L_q_
        l_k_ = L_k_
        l_v_ = L_v_

        attention_default: "f32[2, 6, 4, 8]" = torch.ops.fv_compile.attention.default(l_q_, l_k_, l_v_, None, SITE, 0, []);  l_q_ = l_k_ = l_v_ = None
        return (attention_default,)
""",
        )

    def test_bmm_over_merged_heads_recovers_heads(self):
        text = self.check(bmm_merged_heads, *qkv_bshd(), form="bmm", heads=H, batch=B)
        self.assertExpectedInline(
            text,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, L_q_: "f32[2, 6, 4, 8]", L_k_: "f32[2, 6, 4, 8]", L_v_: "f32[2, 6, 4, 8]"):
        l_q_ = L_q_
        l_k_ = L_k_
        l_v_ = L_v_

        attention_default: "f32[2, 6, 4, 8]" = torch.ops.fv_compile.attention.default(l_q_, l_k_, l_v_, None, SITE, 0, []);  l_q_ = l_k_ = l_v_ = None

        reshape_3: "f32[2, 6, 32]" = attention_default.reshape(2, 6, 32);  attention_default = None
        return (reshape_3,)
""",
        )

    def test_baddbmm_alpha_is_the_scale(self):
        text = self.check(baddbmm_merged_heads, *qkv_bshd(), form="baddbmm", scale=0.2)
        self.assertExpectedInline(
            text,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, L_q_: "f32[2, 6, 4, 8]", L_k_: "f32[2, 6, 4, 8]", L_v_: "f32[2, 6, 4, 8]"):
        l_q_ = L_q_
        l_k_ = L_k_
        l_v_ = L_v_

        attention_default: "f32[2, 6, 4, 8]" = torch.ops.fv_compile.attention.default(l_q_, l_k_, l_v_, None, SITE, 0, []);  l_q_ = l_k_ = l_v_ = None
        permute: "f32[2, 4, 6, 8]" = attention_default.permute(0, 2, 1, 3);  attention_default = None
        reshape: "f32[8, 6, 8]" = permute.reshape(8, 6, 8);  permute = None
        return (reshape,)
""",
        )

    def test_gqa_repeat_interleave_becomes_kv_heads(self):
        q, k, v = (x.transpose(1, 2) for x in qkv_bshd(hk=2))
        text = self.check(gqa_repeat_interleave, q, k, v, form="matmul", heads=H, kv_heads=2)
        self.assertExpectedInline(
            text,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, L_k_: "f32[2, 2, 6, 8]", L_v_: "f32[2, 2, 6, 8]", L_q_: "f32[2, 4, 6, 8]"):
        l_k_ = L_k_
        l_v_ = L_v_
        l_q_ = L_q_

        permute: "f32[2, 6, 4, 8]" = l_q_.permute(0, 2, 1, 3);  l_q_ = None
        permute_1: "f32[2, 6, 2, 8]" = l_k_.permute(0, 2, 1, 3);  l_k_ = None
        permute_2: "f32[2, 6, 2, 8]" = l_v_.permute(0, 2, 1, 3);  l_v_ = None
        attention_default: "f32[2, 6, 4, 8]" = torch.ops.fv_compile.attention.default(permute, permute_1, permute_2, None, SITE, 0, []);  permute = permute_1 = permute_2 = None
        permute_3: "f32[2, 4, 6, 8]" = attention_default.permute(0, 2, 1, 3);  attention_default = None
        return (permute_3,)
""",
        )

    def test_gqa_expand_reshape_becomes_kv_heads(self):
        q, k, v = (x.transpose(1, 2) for x in qkv_bshd(hk=2))
        text = self.check(gqa_expand, q, k, v, form="matmul", heads=H, kv_heads=2)
        self.assertExpectedInline(
            text,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, L_k_: "f32[2, 2, 6, 8]", L_v_: "f32[2, 2, 6, 8]", L_q_: "f32[2, 4, 6, 8]"):
        l_k_ = L_k_
        l_v_ = L_v_
        l_q_ = L_q_

        permute: "f32[2, 6, 4, 8]" = l_q_.permute(0, 2, 1, 3);  l_q_ = None
        permute_1: "f32[2, 6, 2, 8]" = l_k_.permute(0, 2, 1, 3);  l_k_ = None
        permute_2: "f32[2, 6, 2, 8]" = l_v_.permute(0, 2, 1, 3);  l_v_ = None
        attention_default: "f32[2, 6, 4, 8]" = torch.ops.fv_compile.attention.default(permute, permute_1, permute_2, None, SITE, 0, []);  permute = permute_1 = permute_2 = None
        permute_3: "f32[2, 4, 6, 8]" = attention_default.permute(0, 2, 1, 3);  attention_default = None
        return (permute_3,)
""",
        )

    def test_cross_attention_kv_length_differs(self):
        x, text_states = torch.randn(B, S, H * D), torch.randn(B, 3, H * D)
        text = self.check(cross_attention, x, text_states, form="matmul", q_len=S, kv_len=3)
        self.assertExpectedInline(
            text,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, L_x_: "f32[2, 6, 32]", L_text_: "f32[2, 3, 32]"):
        l_x_ = L_x_
        l_text_ = L_text_

        view: "f32[2, 6, 4, 8]" = l_x_.view(2, 6, 4, 8);  l_x_ = None

        view_1: "f32[2, 3, 4, 8]" = l_text_.view(2, 3, 4, 8);  l_text_ = None

        attention_default: "f32[2, 6, 4, 8]" = torch.ops.fv_compile.attention.default(view, view_1, view_1, None, SITE, 0, []);  view = view_1 = None
        reshape: "f32[2, 6, 32]" = attention_default.reshape(2, 6, 32);  attention_default = None
        return (reshape,)
""",
        )


class TestNumerics(expecttest.TestCase):
    """Forms and layouts beyond the goldens, compared with eager."""

    def test_three_dim_scores_without_heads(self):
        q, k, v = torch.randn(3, S, D), torch.randn(3, 5, D), torch.randn(3, 5, 7)
        fn = lambda q, k, v: (q @ k.transpose(1, 2)).softmax(-1) @ v  # noqa: E731
        _, sites, _, out = rewrite(fn, q, k, v)
        assert_close(out, fn(q, k, v))
        self.assertEqual(
            (sites[0].status, sites[0].heads, sites[0].value_head_dim), ("rewritten", 1, 7)
        )

    def test_batch_of_one_and_single_head(self):
        q, k, v = torch.randn(1, 1, S, D), torch.randn(1, 1, S, D), torch.randn(1, 1, S, D)
        _, sites, _, out = rewrite(matmul_div_sqrt, q, k, v)
        assert_close(out, matmul_div_sqrt(q, k, v))
        self.assertEqual(sites[0].status, "rewritten")

    def test_mqa_by_broadcast(self):
        q, k, v = torch.randn(B, H, S, D), torch.randn(B, 1, S, D), torch.randn(B, 1, S, D)
        _, sites, _, out = rewrite(matmul_div_sqrt, q, k, v)
        assert_close(out, matmul_div_sqrt(q, k, v))
        self.assertEqual(sites[0].kv_heads, 1)

    def test_key_padding_mask_broadcast_over_heads_and_queries(self):
        q, k, v = (x.transpose(1, 2) for x in qkv_bshd())
        keep = torch.ones(B, 1, 1, S, dtype=torch.bool)
        keep[0, ..., 4:] = False
        _, _sites, _, out = rewrite(sdpa_bool_mask, q, k, v, keep)
        assert_close(out, sdpa_bool_mask(q, k, v, keep))

    def test_einsum_with_k_first(self):
        def fn(q, k, v):
            w = torch.einsum("bkhd,bqhd->bhqk", k, q)
            return torch.einsum("bkhd,bhqk->bqhd", v, w.softmax(-1))

        args = qkv_bshd()
        _, sites, _, out = rewrite(fn, *args)
        assert_close(out, fn(*args))
        self.assertEqual(sites[0].status, "rewritten")

    def test_two_sites_sharing_inputs(self):
        def fn(q, k, v):
            a = F.scaled_dot_product_attention(q, k, v)
            return F.scaled_dot_product_attention(a, k, v) + (q @ k.mT).softmax(-1) @ v

        q, k, v = (x.transpose(1, 2) for x in qkv_bshd())
        _, sites, _, out = rewrite(fn, q, k, v)
        assert_close(out, fn(q, k, v))
        self.assertEqual([s.status for s in sites], ["rewritten"] * 3)

    def test_in_place_scale_and_bias_on_the_scores(self):
        def fn(q, k, v, bias):
            s = q @ k.transpose(-2, -1)
            s *= 0.3
            s += bias
            return s.softmax(-1) @ v

        q, k, v = (x.transpose(1, 2) for x in qkv_bshd())
        bias = torch.randn(1, 1, S, S)
        _, sites, _, out = rewrite(fn, q, k, v, bias)
        assert_close(out, fn(q, k, v, bias))
        self.assertEqual((sites[0].status, sites[0].mask), ("rewritten", "additive"))
        self.assertAlmostEqual(sites[0].scale, 0.3)

    def test_bf16_with_fp32_softmax(self):
        q, k, v = (x.transpose(1, 2).bfloat16() for x in qkv_bshd())
        _, sites, _, out = rewrite(matmul_prescaled_q_upcast, q, k, v)
        assert_close(out, matmul_prescaled_q_upcast(q, k, v), atol=2e-2, rtol=2e-2)
        self.assertEqual(sites[0].dtype, "bfloat16")


if __name__ == "__main__":
    from torch.testing._internal.common_utils import run_tests

    run_tests()
