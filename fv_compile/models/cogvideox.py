"""CogVideoX-style DiT: one stream of ``[text; video]`` tokens with expert adaLN.

Attention spelling (what the matcher has to recognise):

* ``blocks.{i}.attn`` - joint self-attention over text tokens prepended to
  video tokens, written as MERGED-HEAD BMM: q, k, v ``[B, H, S, D]`` reshaped
  to ``[B*H, S, D]``, ``torch.baddbmm(empty, q, k^T, beta=0, alpha=scale)``,
  ``softmax(-1)`` in the model dtype, ``torch.bmm(p, v)`` viewed back to
  ``[B, H, S, D]``. LayerNorm on q, k per head; 3D RoPE on the video part only.

Text and video share attention and MLP weights but get separate adaLN
modulation ("expert" norms), as in CogVideoX. Text padding follows the
CogVideoX pipeline: ``text_mask`` zeroes padded text embeddings, attention
itself is never masked.
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
    TimestepEmbedder,
    apply_rope,
    modulate,
    rope_3d,
    unpatchify,
)
from .config import VideoDiTConfig


@dataclass(frozen=True, kw_only=True)
class CogVideoXConfig(VideoDiTConfig):
    num_layers: int
    ffn_dim: int
    time_embed_dim: int = 512


class CogVideoXAttention(nn.Module):
    def __init__(self, cfg: CogVideoXConfig) -> None:
        super().__init__()
        dim = cfg.hidden_dim
        self.num_heads = cfg.num_heads
        self.scale = cfg.head_dim**-0.5
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.norm_q = nn.LayerNorm(cfg.head_dim, eps=1e-6)
        self.norm_k = nn.LayerNorm(cfg.head_dim, eps=1e-6)
        self.to_out = nn.Linear(dim, dim)

    def forward(
        self, video: torch.Tensor, text: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        num_text = text.shape[1]
        x = torch.cat([text, video], dim=1)
        q = self.norm_q(self.to_q(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2))
        k = self.norm_k(self.to_k(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2))
        v = self.to_v(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        q = torch.cat([q[:, :, :num_text], apply_rope(q[:, :, num_text:], cos, sin)], dim=2)
        k = torch.cat([k[:, :, :num_text], apply_rope(k[:, :, num_text:], cos, sin)], dim=2)

        batch, heads, seq, head_dim = q.shape
        q = q.reshape(batch * heads, seq, head_dim)
        k = k.reshape(batch * heads, seq, head_dim)
        v = v.reshape(batch * heads, seq, head_dim)
        scores = torch.empty(batch * heads, seq, seq, dtype=q.dtype, device=q.device)
        scores = torch.baddbmm(scores, q, k.transpose(1, 2), beta=0, alpha=self.scale)
        probs = scores.softmax(dim=-1)
        out = torch.bmm(probs, v).view(batch, heads, seq, head_dim)

        out = self.to_out(out.transpose(1, 2).flatten(2))
        return out[:, num_text:], out[:, :num_text]


class ExpertAdaNorm(nn.Module):
    """LayerNorm with separate shift/scale/gate for video and text tokens."""

    def __init__(self, cond_dim: int, dim: int, eps: float) -> None:
        super().__init__()
        self.linear = nn.Linear(cond_dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(
        self, video: torch.Tensor, text: torch.Tensor, cond: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        shift, scale, gate, t_shift, t_scale, t_gate = self.linear(F.silu(cond))[:, None, :].chunk(
            6, dim=-1
        )
        return (
            modulate(self.norm(video), shift, scale),
            modulate(self.norm(text), t_shift, t_scale),
            gate,
            t_gate,
        )


class CogVideoXBlock(nn.Module):
    def __init__(self, cfg: CogVideoXConfig) -> None:
        super().__init__()
        dim = cfg.hidden_dim
        self.norm1 = ExpertAdaNorm(cfg.time_embed_dim, dim, cfg.eps)
        self.attn = CogVideoXAttention(cfg)
        self.norm2 = ExpertAdaNorm(cfg.time_embed_dim, dim, cfg.eps)
        self.ff = FeedForward(dim, cfg.ffn_dim)

    def forward(
        self,
        video: torch.Tensor,
        text: torch.Tensor,
        cond: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        norm_video, norm_text, gate, t_gate = self.norm1(video, text, cond)
        attn_video, attn_text = self.attn(norm_video, norm_text, cos, sin)
        video = video + gate * attn_video
        text = text + t_gate * attn_text

        norm_video, norm_text, gate, t_gate = self.norm2(video, text, cond)
        num_text = text.shape[1]
        ff = self.ff(torch.cat([norm_text, norm_video], dim=1))
        return video + gate * ff[:, num_text:], text + t_gate * ff[:, :num_text]


class CogVideoXModel(nn.Module):
    def __init__(self, cfg: CogVideoXConfig) -> None:
        super().__init__()
        self.config = cfg
        dim = cfg.hidden_dim
        self.patch_embed = PatchEmbed3d(cfg.in_channels, dim, cfg.patch_size)
        self.text_proj = nn.Linear(cfg.text_dim, dim)
        self.time_embed = TimestepEmbedder(cfg.freq_dim, cfg.time_embed_dim)
        self.blocks = nn.ModuleList(CogVideoXBlock(cfg) for _ in range(cfg.num_layers))
        self.norm_final = nn.LayerNorm(dim, eps=cfg.eps)
        self.norm_out = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.out_mod = nn.Linear(cfg.time_embed_dim, 2 * dim)
        self.proj_out = nn.Linear(dim, math.prod(cfg.patch_size) * cfg.in_channels)

    def forward(
        self,
        latent: torch.Tensor,
        timestep: torch.Tensor,
        text_states: torch.Tensor,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg = self.config
        video, grid = self.patch_embed(latent)
        cos, sin = rope_3d(
            grid, cfg.rope_axes, cfg.rope_theta, latent.device
        )  # [S, D] matches [B, H, S, D]

        if text_mask is not None:
            text_states = text_states * text_mask[..., None].to(text_states.dtype)
        text = self.text_proj(text_states)

        cond = self.time_embed(timestep)
        for block in self.blocks:
            video, text = block(video, text, cond, cos, sin)

        shift, scale = self.out_mod(F.silu(cond))[:, None, :].chunk(2, dim=-1)
        video = self.proj_out(modulate(self.norm_out(self.norm_final(video)), shift, scale))
        return unpatchify(video, grid, cfg.patch_size, cfg.in_channels)
