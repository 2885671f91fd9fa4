"""Attention spelled the ways video and vision models write it beyond the plain forms: each
rewritten graph (golden) and its numbers against eager, gradients included where masks learn."""

import expecttest
import torch
import torch.nn.functional as F

from tests._graphs import assert_close, rewrite

B, H, S, D = 2, 4, 6, 8


def qkv(*shape):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*(shape or (B, H, S, D)), generator=g) for _ in range(3)]


def key_padding(shape=(B, 1, 1, S)):
    keep = torch.rand(*shape, generator=torch.Generator().manual_seed(1)) > 0.4
    keep[..., 0] = True
    return keep


def causal_and_key_padding(q, k, v, keep):
    s = q @ k.transpose(-1, -2) * D**-0.5
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    s = s.masked_fill(~causal, float("-inf")).masked_fill(~keep, float("-inf"))
    return s.softmax(-1) @ v


def einsum_with_ellipsis(q, k, v):
    s = torch.einsum("...qd,...kd->...qk", q, k) * D**-0.5
    return torch.einsum("...qk,...kd->...qd", s.softmax(-1), v)


def latent_queries(latents, k, v):
    """Perceiver: learned queries `[N, H*D]`, shared by every batch element."""
    q = latents.view(3, H, D).transpose(0, 1)
    return ((q @ k.transpose(-1, -2)) * D**-0.5).softmax(-1) @ v


def keys_times_queries(q, k, v):
    """Scores as k @ q^T, normalised over the keys (dim -2), transposed for the value product."""
    return ((k @ q.transpose(-1, -2)) * D**-0.5).softmax(-2).transpose(-1, -2) @ v


def in_place_masked_fill(q, k, v, keep):
    s = q @ k.transpose(-1, -2) * D**-0.5
    s.masked_fill_(~keep, float("-inf"))
    return s.softmax(-1) @ v


def stability_shift(q, k, v):
    s = q @ k.transpose(-1, -2) * D**-0.5
    s = s - s.amax(-1, keepdim=True)
    return s.softmax(-1) @ v


def multi_query_by_expand(q, k, v):
    return F.scaled_dot_product_attention(q, k.expand(B, H, S, D), v.expand(B, H, S, D))


NW, N = 3, 5  # windows per image, tokens per window


def shifted_windows(q, k, v, bias, shift_mask):
    """Swin: per-window attention on `[B*nW, H, N, N]`, a learned relative bias, and the
    shifted-window mask added on a `[B, nW, H, N, N]` view of the scores."""
    s = (q @ k.transpose(-2, -1)) * D**-0.5 + bias
    s = s.view(B, NW, H, N, N) + shift_mask.unsqueeze(1).unsqueeze(0)
    return s.view(-1, H, N, N).softmax(-1) @ v


T, HH, WW = 2, 2, 2  # the token grid of decomposed relative position
L = 1 + T * HH * WW  # a class token, then the grid


def decomposed_relative_position(q, k, v, rel_h, rel_w):
    """MViTv2: relative position terms computed from q, added in place to the grid part of the
    scores viewed as `[B, H, qt, qh, qw, kt, kh, kw]`."""
    s = (q * D**-0.5) @ k.transpose(-2, -1)
    r_q = q[:, :, 1:].reshape(B, H, T, HH, WW, D)
    bh = torch.einsum("bythwc,hkc->bythwk", r_q, rel_h)
    bw = torch.einsum("bythwc,wkc->bythwk", r_q, rel_w)
    grid = s[:, :, 1:, 1:].view(B, H, T, HH, WW, T, HH, WW)
    s[:, :, 1:, 1:] = (grid + bh[..., None, :, None] + bw[..., None, None, :]).view(
        B, H, L - 1, L - 1
    )
    return s.softmax(-1) @ v


class TestMoreSpellings(expecttest.TestCase):
    def check(self, fn, *args, **site):
        text, sites, _, out = rewrite(fn, *args)
        assert_close(out, fn(*args))
        self.assertEqual([s.status for s in sites], ["rewritten"], [s.reason for s in sites])
        for key, value in site.items():
            self.assertEqual(getattr(sites[0], key), value, key)
        self.assertNotIn("softmax", text)
        self.assertNotIn("matmul", text)
        return text

    def check_gradients(self, fn, *args):
        """The compiled function's gradients (aot_eager) of every float input equal eager's."""
        torch._dynamo.reset()
        ins = [a.clone().requires_grad_(a.is_floating_point()) for a in args]
        refs = [a.clone().requires_grad_(a.is_floating_point()) for a in args]
        import fv_compile

        class M(torch.nn.Module):
            def forward(self, *xs):
                return fn(*xs)

        cm = fv_compile.compile(M(), "TORCH_SDPA", compiler="aot_eager")
        out, ref = cm(*ins), fn(*refs)
        g = torch.randn_like(ref)
        out.backward(g)
        ref.backward(g)
        self.assertEqual([s.status for s in cm.explain().sites], ["rewritten"])
        for a, r in zip(ins, refs):
            if r.grad is not None:
                torch.testing.assert_close(a.grad, r.grad, atol=1e-5, rtol=1e-4)

    def test_causal_mask_with_key_padding(self):
        text = self.check(causal_and_key_padding, *qkv(), key_padding(), causal=True, mask="bool")
        self.assertExpectedInline(
            text,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, L_k_: "f32[2, 4, 6, 8]", L_q_: "f32[2, 4, 6, 8]", L_keep_: "b8[2, 1, 1, 6]", L_v_: "f32[2, 4, 6, 8]"):
        l_k_ = L_k_
        l_q_ = L_q_
        l_keep_ = L_keep_
        l_v_ = L_v_

        invert_1: "b8[2, 1, 1, 6]" = ~l_keep_;  l_keep_ = None

        permute: "f32[2, 6, 4, 8]" = l_q_.permute(0, 2, 1, 3);  l_q_ = None
        permute_1: "f32[2, 6, 4, 8]" = l_k_.permute(0, 2, 1, 3);  l_k_ = None
        permute_2: "f32[2, 6, 4, 8]" = l_v_.permute(0, 2, 1, 3);  l_v_ = None
        logical_not: "b8[2, 1, 1, 6]" = torch.logical_not(invert_1)
        logical_not_1: "b8[2, 1, 1, 6]" = torch.logical_not(invert_1);  invert_1 = None
        any_1: "b8[2, 1, 1, 6]" = logical_not_1.any(2, True);  logical_not_1 = None
        permute_3: "b8[2, 6, 1, 1]" = any_1.permute(0, 3, 1, 2);  any_1 = None
        logical_not_2: "b8[2, 6, 1, 1]" = torch.logical_not(permute_3);  permute_3 = None
        masked_fill_1: "f32[2, 6, 4, 8]" = permute_1.masked_fill(logical_not_2, 0.0);  permute_1 = logical_not_2 = None
        attention_default: "f32[2, 6, 4, 8]" = torch.ops.fv_compile.attention.default(permute, masked_fill_1, permute_2, logical_not, SITE, 0, []);  permute = masked_fill_1 = permute_2 = logical_not = None
        permute_4: "f32[2, 4, 6, 8]" = attention_default.permute(0, 2, 1, 3);  attention_default = None
        return (permute_4,)
""",
        )

    def test_einsum_with_ellipsis(self):
        text = self.check(einsum_with_ellipsis, *qkv(), form="einsum")
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

    def test_latent_queries_broadcast_over_the_batch(self):
        latents = torch.randn(3, H * D)
        _, k, v = qkv()
        text = self.check(latent_queries, latents, k, v, q_len=3, kv_len=S, batch=B)
        self.assertExpectedInline(
            text,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, L_latents_: "f32[3, 32]", L_k_: "f32[2, 4, 6, 8]", L_v_: "f32[2, 4, 6, 8]"):
        l_latents_ = L_latents_
        l_k_ = L_k_
        l_v_ = L_v_

        view: "f32[3, 4, 8]" = l_latents_.view(3, 4, 8);  l_latents_ = None

        unsqueeze: "f32[1, 3, 4, 8]" = view.unsqueeze(0);  view = None
        expand: "f32[2, 3, 4, 8]" = unsqueeze.expand(2, 3, 4, 8);  unsqueeze = None
        permute: "f32[2, 6, 4, 8]" = l_k_.permute(0, 2, 1, 3);  l_k_ = None
        permute_1: "f32[2, 6, 4, 8]" = l_v_.permute(0, 2, 1, 3);  l_v_ = None
        attention_default: "f32[2, 3, 4, 8]" = torch.ops.fv_compile.attention.default(expand, permute, permute_1, None, SITE, 0, []);  expand = permute = permute_1 = None
        permute_2: "f32[2, 4, 3, 8]" = attention_default.permute(0, 2, 1, 3);  attention_default = None
        return (permute_2,)
""",
        )
        self.check_gradients(latent_queries, latents, k, v)

    def test_keys_times_queries_normalised_over_dim_minus_2(self):
        text = self.check(keys_times_queries, *qkv())
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

    def test_in_place_masked_fill_on_the_scores(self):
        text = self.check(in_place_masked_fill, *qkv(), key_padding(), mask="bool")
        self.assertExpectedInline(
            text,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, L_k_: "f32[2, 4, 6, 8]", L_q_: "f32[2, 4, 6, 8]", L_keep_: "b8[2, 1, 1, 6]", L_v_: "f32[2, 4, 6, 8]"):
        l_k_ = L_k_
        l_q_ = L_q_
        l_keep_ = L_keep_
        l_v_ = L_v_

        invert: "b8[2, 1, 1, 6]" = ~l_keep_;  l_keep_ = None

        permute: "f32[2, 6, 4, 8]" = l_q_.permute(0, 2, 1, 3);  l_q_ = None
        permute_1: "f32[2, 6, 4, 8]" = l_k_.permute(0, 2, 1, 3);  l_k_ = None
        permute_2: "f32[2, 6, 4, 8]" = l_v_.permute(0, 2, 1, 3);  l_v_ = None
        logical_not: "b8[2, 1, 1, 6]" = torch.logical_not(invert)
        logical_not_1: "b8[2, 1, 1, 6]" = torch.logical_not(invert);  invert = None
        any_1: "b8[2, 1, 1, 6]" = logical_not_1.any(2, True);  logical_not_1 = None
        permute_3: "b8[2, 6, 1, 1]" = any_1.permute(0, 3, 1, 2);  any_1 = None
        logical_not_2: "b8[2, 6, 1, 1]" = torch.logical_not(permute_3);  permute_3 = None
        masked_fill: "f32[2, 6, 4, 8]" = permute_1.masked_fill(logical_not_2, 0.0);  permute_1 = logical_not_2 = None
        attention_default: "f32[2, 6, 4, 8]" = torch.ops.fv_compile.attention.default(permute, masked_fill, permute_2, logical_not, SITE, 0, []);  permute = masked_fill = permute_2 = logical_not = None
        permute_4: "f32[2, 4, 6, 8]" = attention_default.permute(0, 2, 1, 3);  attention_default = None
        return (permute_4,)
""",
        )

    def test_stability_shift_by_the_row_max(self):
        text = self.check(stability_shift, *qkv())
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
        self.check_gradients(stability_shift, *qkv())

    def test_multi_query_by_expand_is_one_kv_head(self):
        q, k, v = qkv()
        text = self.check(multi_query_by_expand, q, k[:, :1], v[:, :1], kv_heads=1)
        self.assertExpectedInline(
            text,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, L_k_: "f32[2, 1, 6, 8]", L_v_: "f32[2, 1, 6, 8]", L_q_: "f32[2, 4, 6, 8]"):
        l_k_ = L_k_
        l_v_ = L_v_
        l_q_ = L_q_

        permute: "f32[2, 6, 4, 8]" = l_q_.permute(0, 2, 1, 3);  l_q_ = None
        permute_1: "f32[2, 6, 1, 8]" = l_k_.permute(0, 2, 1, 3);  l_k_ = None
        permute_2: "f32[2, 6, 1, 8]" = l_v_.permute(0, 2, 1, 3);  l_v_ = None
        attention_default: "f32[2, 6, 4, 8]" = torch.ops.fv_compile.attention.default(permute, permute_1, permute_2, None, SITE, 0, []);  permute = permute_1 = permute_2 = None
        permute_3: "f32[2, 4, 6, 8]" = attention_default.permute(0, 2, 1, 3);  attention_default = None
        return (permute_3,)
""",
        )

    def test_shifted_window_mask_on_a_view_of_the_scores(self):
        q, k, v = qkv(B * NW, H, N, D)
        bias = torch.randn(1, H, N, N)
        shift_mask = torch.zeros(NW, N, N)
        shift_mask[1, :, 3:] = -100.0
        text = self.check(shifted_windows, q, k, v, bias, shift_mask, mask="additive")
        self.assertExpectedInline(
            text,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, L_k_: "f32[6, 4, 5, 8]", L_q_: "f32[6, 4, 5, 8]", L_bias_: "f32[1, 4, 5, 5]", L_shift_mask_: "f32[3, 5, 5]", L_v_: "f32[6, 4, 5, 8]"):
        l_k_ = L_k_
        l_q_ = L_q_
        l_bias_ = L_bias_
        l_shift_mask_ = L_shift_mask_
        l_v_ = L_v_

        unsqueeze: "f32[3, 1, 5, 5]" = l_shift_mask_.unsqueeze(1);  l_shift_mask_ = None
        unsqueeze_1: "f32[1, 3, 1, 5, 5]" = unsqueeze.unsqueeze(0);  unsqueeze = None

        permute: "f32[6, 5, 4, 8]" = l_q_.permute(0, 2, 1, 3);  l_q_ = None
        permute_1: "f32[6, 5, 4, 8]" = l_k_.permute(0, 2, 1, 3);  l_k_ = None
        permute_2: "f32[6, 5, 4, 8]" = l_v_.permute(0, 2, 1, 3);  l_v_ = None
        expand: "f32[2, 3, 1, 5, 5]" = unsqueeze_1.expand(2, 3, 1, 5, 5);  unsqueeze_1 = None
        reshape: "f32[6, 1, 5, 5]" = expand.reshape(6, 1, 5, 5);  expand = None
        add: "f32[6, 4, 5, 5]" = torch.add(l_bias_, reshape);  l_bias_ = reshape = None
        attention_default: "f32[6, 5, 4, 8]" = torch.ops.fv_compile.attention.default(permute, permute_1, permute_2, add, SITE, 0, []);  permute = permute_1 = permute_2 = add = None
        permute_3: "f32[6, 4, 5, 8]" = attention_default.permute(0, 2, 1, 3);  attention_default = None
        return (permute_3,)
""",
        )
        self.check_gradients(shifted_windows, q, k, v, bias, shift_mask)

    def test_decomposed_relative_position_added_in_place_to_a_slice(self):
        q, k, v = qkv(B, H, L, D)
        rel_h, rel_w = torch.randn(HH, HH, D), torch.randn(WW, WW, D)
        text = self.check(decomposed_relative_position, q, k, v, rel_h, rel_w, mask="additive")
        self.assertExpectedInline(
            text,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, L_q_: "f32[2, 4, 9, 8]", L_k_: "f32[2, 4, 9, 8]", L_rel_h_: "f32[2, 2, 8]", L_rel_w_: "f32[2, 2, 8]", L_v_: "f32[2, 4, 9, 8]"):
        l_q_ = L_q_
        l_k_ = L_k_
        l_rel_h_ = L_rel_h_
        l_rel_w_ = L_rel_w_
        l_v_ = L_v_

        getitem: "f32[2, 4, 8, 8]" = l_q_[(slice(None, None, None), slice(None, None, None), slice(1, None, None))]
        r_q: "f32[2, 4, 2, 2, 2, 8]" = getitem.reshape(2, 4, 2, 2, 2, 8);  getitem = None

        bh: "f32[2, 4, 2, 2, 2, 2]" = torch.functional.einsum('bythwc,hkc->bythwk', r_q, l_rel_h_);  l_rel_h_ = None

        bw: "f32[2, 4, 2, 2, 2, 2]" = torch.functional.einsum('bythwc,wkc->bythwk', r_q, l_rel_w_);  r_q = l_rel_w_ = None

        getitem_2: "f32[2, 4, 2, 2, 2, 1, 2, 1]" = bh[(Ellipsis, None, slice(None, None, None), None)];  bh = None
        getitem_3: "f32[2, 4, 2, 2, 2, 1, 1, 2]" = bw[(Ellipsis, None, None, slice(None, None, None))];  bw = None

        permute: "f32[2, 9, 4, 8]" = l_q_.permute(0, 2, 1, 3);  l_q_ = None
        permute_1: "f32[2, 9, 4, 8]" = l_k_.permute(0, 2, 1, 3);  l_k_ = None
        permute_2: "f32[2, 9, 4, 8]" = l_v_.permute(0, 2, 1, 3);  l_v_ = None
        add_2: "f32[2, 4, 2, 2, 2, 1, 2, 2]" = torch.add(getitem_2, getitem_3);  getitem_2 = getitem_3 = None
        expand: "f32[2, 4, 2, 2, 2, 2, 2, 2]" = add_2.expand(2, 4, 2, 2, 2, 2, 2, 2);  add_2 = None
        reshape: "f32[2, 4, 8, 8]" = expand.reshape(2, 4, 8, 8);  expand = None
        full: "f32[2, 4, 8, 9]" = torch.full((2, 4, 8, 9), 0.0, dtype = torch.float32, device = device(type='cpu'))
        slice_scatter: "f32[2, 4, 8, 9]" = torch.slice_scatter(full, reshape, 3, 1, 9, 1);  full = reshape = None
        full_1: "f32[2, 4, 9, 9]" = torch.full((2, 4, 9, 9), 0.0, dtype = torch.float32, device = device(type='cpu'))
        slice_scatter_1: "f32[2, 4, 9, 9]" = torch.slice_scatter(full_1, slice_scatter, 2, 1, 9, 1);  full_1 = slice_scatter = None
        attention_default: "f32[2, 9, 4, 8]" = torch.ops.fv_compile.attention.default(permute, permute_1, permute_2, slice_scatter_1, SITE, 0, []);  permute = permute_1 = permute_2 = slice_scatter_1 = None
        permute_3: "f32[2, 4, 9, 8]" = attention_default.permute(0, 2, 1, 3);  attention_default = None
        return (permute_3,)
""",
        )
        self.check_gradients(decomposed_relative_position, q, k, v, rel_h, rel_w)
