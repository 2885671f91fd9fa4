"""Wan 2.1-style text-to-video DiT.

Attention spellings (what the matcher has to recognise):

* ``blocks.{i}.self_attn`` - ``F.scaled_dot_product_attention`` on ``[B, H, S, D]``
  obtained by transposing ``[B, S, H, D]``; 3D RoPE and RMSNorm (across heads) on q, k.
* ``blocks.{i}.cross_attn`` - hand-written ``(q @ k^T) * scale``, softmax upcast
  to float32 and cast back, ``@ v``; queries are video tokens, keys/values text.

Text padding follows the Wan pipeline: ``text_mask`` zeroes padded text
embeddings, attention itself is never masked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._layers import (
    FeedForward,
    PatchEmbed3d,
    RMSNorm,
    TimestepEmbedder,
    apply_rope,
    modulate,
    rope_3d,
    unpatchify,
)
from .config import VideoDiTConfig


@dataclass(frozen=True, kw_only=True)
class WanConfig(VideoDiTConfig):
    num_layers: int
    ffn_dim: int


class WanSelfAttention(nn.Module):
    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        dim = cfg.hidden_dim
        self.num_heads = cfg.num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        # Wan normalises q/k over the full hidden size, before the head split.
        self.norm_q = RMSNorm(dim, cfg.eps)
        self.norm_k = RMSNorm(dim, cfg.eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))
        k = self.norm_k(self.k(x)).unflatten(-1, (self.num_heads, -1))
        v = self.v(x).unflatten(-1, (self.num_heads, -1))
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        return self.o(out.transpose(1, 2).flatten(2))


class WanCrossAttention(nn.Module):
    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        dim = cfg.hidden_dim
        self.num_heads = cfg.num_heads
        self.scale = cfg.head_dim**-0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, cfg.eps)
        self.norm_k = RMSNorm(dim, cfg.eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        k = self.norm_k(self.k(context)).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        v = self.v(context).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) * self.scale
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = probs @ v
        return self.o(out.transpose(1, 2).flatten(2))


class WanBlock(nn.Module):
    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        dim = cfg.hidden_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = WanSelfAttention(cfg)
        self.norm3 = nn.LayerNorm(dim, eps=cfg.eps)
        self.cross_attn = WanCrossAttention(cfg)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = FeedForward(dim, cfg.ffn_dim)
        # Per-block offset added to the shared time projection: Wan shares one
        # 6*dim projection across blocks and specialises it with this table.
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        time_mod: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (
            (self.modulation + time_mod).unsqueeze(2).unbind(1)
        )
        x = x + gate_sa * self.self_attn(modulate(self.norm1(x), shift_sa, scale_sa), cos, sin)
        x = x + self.cross_attn(self.norm3(x), context)
        return x + gate_ff * self.ffn(modulate(self.norm2(x), shift_ff, scale_ff))


class WanModel(nn.Module):
    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        self.config = cfg
        dim = cfg.hidden_dim
        self.patch_embed = PatchEmbed3d(cfg.in_channels, dim, cfg.patch_size)
        self.text_embed = nn.Sequential(
            nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embed = TimestepEmbedder(cfg.freq_dim, dim)
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.norm_out = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.head_modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.head = nn.Linear(dim, math.prod(cfg.patch_size) * cfg.in_channels)

    def forward(
        self,
        latent: torch.Tensor,
        timestep: torch.Tensor,
        text_states: torch.Tensor,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg = self.config
        x, grid = self.patch_embed(latent)
        cos, sin = rope_3d(grid, cfg.rope_axes, cfg.rope_theta, latent.device)
        cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads of [B, S, H, D]

        if text_mask is not None:
            text_states = text_states * text_mask[..., None].to(text_states.dtype)
        context = self.text_embed(text_states)

        time_emb = self.time_embed(timestep)
        time_mod = self.time_proj(F.silu(time_emb)).unflatten(1, (6, -1))
        for block in self.blocks:
            x = block(x, context, time_mod, cos, sin)

        shift, scale = (self.head_modulation + time_emb[:, None, :]).unsqueeze(2).unbind(1)
        x = self.head(modulate(self.norm_out(x), shift, scale))
        return unpatchify(x, grid, cfg.patch_size, cfg.in_channels)
