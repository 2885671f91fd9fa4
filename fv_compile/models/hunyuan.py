"""HunyuanVideo-style DiT: token refiner, dual-stream then single-stream blocks.

Attention spellings (what the matcher has to recognise):

* ``text_refiner.blocks.{i}.attn`` - self-attention over text only, fused qkv,
  ``q`` PRE-SCALED by ``head_dim**-0.5`` before ``q @ k^T``, additive float
  key-padding bias (0 / -inf), ``softmax``, ``@ v``.
* ``double_blocks.{i}.attn`` - joint attention over ``[video; text]`` with
  separate per-stream weights, spelled with EINSUM on ``[B, S, H, D]``:
  ``einsum("bqhd,bkhd->bhqk") * scale``, boolean key mask via
  ``masked_fill(~mask, -inf)``, ``softmax(-1)``, ``einsum("bhqk,bkhd->bqhd")``.
* ``single_blocks.{i}.attn`` - ``F.scaled_dot_product_attention`` on
  ``[B, H, S, D]`` with a boolean ``attn_mask`` ``[B, 1, 1, S]``; with
  ``num_kv_heads < num_heads`` (``hunyuan-tiny``) k/v are GQA heads expanded by
  ``repeat_interleave`` on the head axis. The qkv projection is fused with the
  MLP input (``linear1``) in the enclosing block, as in HunyuanVideo.

3D RoPE rotates only the video part of q and k. With ``text_mask=None`` no mask
op is emitted at all. Not modelled: the CLIP pooled vector and the guidance
embedding (the timestep embedding alone drives modulation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fv_compile.errors import FvCompileError

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
class HunyuanConfig(VideoDiTConfig):
    num_double_layers: int
    num_single_layers: int
    num_refiner_layers: int = 2
    mlp_ratio: float = 4.0
    num_kv_heads: int | None = None  # single-stream blocks only; None means plain multi-head

    masks_text_keys: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_heads % self.kv_heads:
            raise FvCompileError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.kv_heads}"
            )

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.hidden_dim * self.mlp_ratio)


class RefinerAttention(nn.Module):
    def __init__(self, cfg: HunyuanConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_dim, 3 * cfg.hidden_dim)
        self.proj = nn.Linear(cfg.hidden_dim, cfg.hidden_dim)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor | None) -> torch.Tensor:
        q, k, v = (
            self.qkv(x)
            .unflatten(-1, (3, self.num_heads, self.head_dim))
            .permute(2, 0, 3, 1, 4)
            .unbind(0)
        )
        q = q * self.head_dim**-0.5
        scores = q @ k.transpose(-2, -1)
        if key_bias is not None:
            scores = scores + key_bias
        out = scores.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).flatten(2))


class RefinerBlock(nn.Module):
    def __init__(self, cfg: HunyuanConfig) -> None:
        super().__init__()
        dim = cfg.hidden_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.eps)
        self.attn = RefinerAttention(cfg)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.eps)
        self.mlp = FeedForward(dim, cfg.mlp_dim)
        self.gates = nn.Linear(dim, 2 * dim)

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor, key_bias: torch.Tensor | None
    ) -> torch.Tensor:
        gate_attn, gate_mlp = self.gates(F.silu(cond))[:, None, :].chunk(2, dim=-1)
        x = x + gate_attn * self.attn(self.norm1(x), key_bias)
        return x + gate_mlp * self.mlp(self.norm2(x))


class TokenRefiner(nn.Module):
    """Contextualises raw text embeddings before they meet video tokens.

    Conditioned on the timestep plus the mean of the valid text embeddings, so
    padded text never leaks in, not even through the pooled vector.
    """

    def __init__(self, cfg: HunyuanConfig) -> None:
        super().__init__()
        dim = cfg.hidden_dim
        self.proj_in = nn.Linear(cfg.text_dim, dim)
        self.pool_proj = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(RefinerBlock(cfg) for _ in range(cfg.num_refiner_layers))

    def forward(
        self, text: torch.Tensor, text_mask: torch.Tensor | None, time_emb: torch.Tensor
    ) -> torch.Tensor:
        if text_mask is None:
            pooled = text.mean(dim=1)
            key_bias = None
        else:
            weights = text_mask[..., None].to(text.dtype)
            pooled = (text * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
            key_bias = torch.zeros(text_mask.shape, dtype=text.dtype, device=text.device)
            key_bias = key_bias.masked_fill(~text_mask, float("-inf"))[:, None, None, :]
        cond = time_emb + self.pool_proj(pooled)
        x = self.proj_in(text)
        for block in self.blocks:
            x = block(x, cond, key_bias)
        return x


class DoubleStreamAttention(nn.Module):
    def __init__(self, cfg: HunyuanConfig) -> None:
        super().__init__()
        dim = cfg.hidden_dim
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.img_qkv = nn.Linear(dim, 3 * dim)
        self.txt_qkv = nn.Linear(dim, 3 * dim)
        self.img_q_norm = RMSNorm(cfg.head_dim, cfg.eps)
        self.img_k_norm = RMSNorm(cfg.head_dim, cfg.eps)
        self.txt_q_norm = RMSNorm(cfg.head_dim, cfg.eps)
        self.txt_k_norm = RMSNorm(cfg.head_dim, cfg.eps)
        self.img_proj = nn.Linear(dim, dim)
        self.txt_proj = nn.Linear(dim, dim)

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        img_q, img_k, img_v = (
            self.img_qkv(img).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(2)
        )
        txt_q, txt_k, txt_v = (
            self.txt_qkv(txt).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(2)
        )
        img_q = apply_rope(self.img_q_norm(img_q), cos, sin)
        img_k = apply_rope(self.img_k_norm(img_k), cos, sin)
        q = torch.cat([img_q, self.txt_q_norm(txt_q)], dim=1)
        k = torch.cat([img_k, self.txt_k_norm(txt_k)], dim=1)
        v = torch.cat([img_v, txt_v], dim=1)

        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * self.scale
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        probs = scores.softmax(-1)
        out = torch.einsum("bhqk,bkhd->bqhd", probs, v).flatten(2)

        img_out, txt_out = out.split([img.shape[1], txt.shape[1]], dim=1)
        return self.img_proj(img_out), self.txt_proj(txt_out)


class DoubleStreamBlock(nn.Module):
    def __init__(self, cfg: HunyuanConfig) -> None:
        super().__init__()
        dim = cfg.hidden_dim
        self.img_mod = nn.Linear(dim, 6 * dim)
        self.txt_mod = nn.Linear(dim, 6 * dim)
        self.img_norm1 = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.txt_norm1 = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.attn = DoubleStreamAttention(cfg)
        self.img_norm2 = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.txt_norm2 = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.img_mlp = FeedForward(dim, cfg.mlp_dim)
        self.txt_mlp = FeedForward(dim, cfg.mlp_dim)

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        vec: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        vec = F.silu(vec)
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)[
            :, None, :
        ].chunk(6, dim=-1)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)[
            :, None, :
        ].chunk(6, dim=-1)
        img_attn, txt_attn = self.attn(
            modulate(self.img_norm1(img), i_shift1, i_scale1),
            modulate(self.txt_norm1(txt), t_shift1, t_scale1),
            cos,
            sin,
            key_mask,
        )
        img = img + i_gate1 * img_attn
        txt = txt + t_gate1 * txt_attn
        img = img + i_gate2 * self.img_mlp(modulate(self.img_norm2(img), i_shift2, i_scale2))
        txt = txt + t_gate2 * self.txt_mlp(modulate(self.txt_norm2(txt), t_shift2, t_scale2))
        return img, txt


class SingleStreamAttention(nn.Module):
    """Attention core only: the projections are fused into the block's ``linear1``."""

    def __init__(self, cfg: HunyuanConfig) -> None:
        super().__init__()
        self.groups = cfg.num_heads // cfg.kv_heads

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None
    ) -> torch.Tensor:
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.groups > 1:
            k = k.repeat_interleave(self.groups, dim=1)
            v = v.repeat_interleave(self.groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return out.transpose(1, 2).flatten(2)


class SingleStreamBlock(nn.Module):
    def __init__(self, cfg: HunyuanConfig) -> None:
        super().__init__()
        dim = cfg.hidden_dim
        self.num_heads = cfg.num_heads
        self.kv_heads = cfg.kv_heads
        self.head_dim = cfg.head_dim
        self.qkv_dim = (cfg.num_heads + 2 * cfg.kv_heads) * cfg.head_dim
        self.mlp_dim = cfg.mlp_dim
        self.modulation = nn.Linear(dim, 3 * dim)
        self.pre_norm = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.linear1 = nn.Linear(dim, self.qkv_dim + self.mlp_dim)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.eps)
        self.attn = SingleStreamAttention(cfg)
        self.linear2 = nn.Linear(dim + self.mlp_dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        vec: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        shift, scale, gate = self.modulation(F.silu(vec))[:, None, :].chunk(3, dim=-1)
        qkv, mlp = self.linear1(modulate(self.pre_norm(x), shift, scale)).split(
            [self.qkv_dim, self.mlp_dim], dim=-1
        )
        q, k, v = qkv.unflatten(-1, (-1, self.head_dim)).split(
            [self.num_heads, self.kv_heads, self.kv_heads], dim=2
        )
        q, k = self.q_norm(q), self.k_norm(k)
        num_video = cos.shape[0]
        q = torch.cat([apply_rope(q[:, :num_video], cos, sin), q[:, num_video:]], dim=1)
        k = torch.cat([apply_rope(k[:, :num_video], cos, sin), k[:, num_video:]], dim=1)
        out = self.attn(q, k, v, attn_mask)
        return x + gate * self.linear2(torch.cat([out, F.gelu(mlp, approximate="tanh")], dim=-1))


class HunyuanVideoModel(nn.Module):
    def __init__(self, cfg: HunyuanConfig) -> None:
        super().__init__()
        self.config = cfg
        dim = cfg.hidden_dim
        self.img_in = PatchEmbed3d(cfg.in_channels, dim, cfg.patch_size)
        self.time_in = TimestepEmbedder(cfg.freq_dim, dim)
        self.text_refiner = TokenRefiner(cfg)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(cfg) for _ in range(cfg.num_double_layers)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(cfg) for _ in range(cfg.num_single_layers)
        )
        self.final_norm = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.final_mod = nn.Linear(dim, 2 * dim)
        self.final_proj = nn.Linear(dim, math.prod(cfg.patch_size) * cfg.in_channels)

    def forward(
        self,
        latent: torch.Tensor,
        timestep: torch.Tensor,
        text_states: torch.Tensor,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``text_mask`` is a ``[B, L_text]`` bool, True for real tokens; each row needs one True."""
        cfg = self.config
        img, grid = self.img_in(latent)
        num_video = img.shape[1]
        cos, sin = rope_3d(grid, cfg.rope_axes, cfg.rope_theta, latent.device)
        cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads of [B, S, H, D]

        vec = self.time_in(timestep)
        txt = self.text_refiner(text_states, text_mask, vec)

        key_mask = None
        if text_mask is not None:
            video_keys = torch.ones(img.shape[0], num_video, dtype=torch.bool, device=img.device)
            key_mask = torch.cat([video_keys, text_mask], dim=1)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, cos, sin, key_mask)

        x = torch.cat([img, txt], dim=1)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        for block in self.single_blocks:
            x = block(x, vec, cos, sin, attn_mask)

        shift, scale = self.final_mod(F.silu(vec))[:, None, :].chunk(2, dim=-1)
        out = self.final_proj(modulate(self.final_norm(x[:, :num_video]), shift, scale))
        return unpatchify(out, grid, cfg.patch_size, cfg.in_channels)
