"""Building blocks shared by the reference video DiTs.

Everything here traces under ``torch.compile(fullgraph=True)``: no ``.item()``,
no data-dependent Python control flow, and position tables are recomputed from
static shapes inside ``forward`` instead of being cached in buffers. Having no
buffers is what lets a full-size model live on the meta device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

Grid = tuple[int, int, int]


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 so bf16 models normalise like the originals."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: the ``1 + scale`` form keeps a zero modulation equal to identity."""
    return x * (1 + scale) + shift


class FeedForward(nn.Module):
    """Two-layer MLP with tanh-approximated GELU, the activation all three families use."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def timestep_sinusoid(
    timestep: torch.Tensor, dim: int, max_period: float = 10000.0
) -> torch.Tensor:
    """Cos-first sinusoidal features of a ``[B]`` timestep, always float32.

    Computed in float32 whatever the model dtype: timesteps go up to 1000 and bf16
    cannot tell neighbouring steps apart there.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timestep.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)
    args = timestep.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Sinusoid followed by the SiLU MLP that every DiT puts after it."""

    def __init__(self, freq_dim: int, out_dim: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.linear_1 = nn.Linear(freq_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        emb = timestep_sinusoid(timestep, self.freq_dim).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(emb)))


class PatchEmbed3d(nn.Module):
    """Non-overlapping 3D patches of a ``[B, C, T, H, W]`` latent, flattened to tokens.

    Tokens come out in (t, h, w) raster order, the order ``rope_3d`` and
    ``unpatchify`` assume.
    """

    def __init__(self, in_channels: int, dim: int, patch_size: Grid) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        x = self.proj(latent)
        grid = (x.shape[2], x.shape[3], x.shape[4])
        return x.flatten(2).transpose(1, 2), grid


def unpatchify(tokens: torch.Tensor, grid: Grid, patch_size: Grid, channels: int) -> torch.Tensor:
    """Inverse of ``PatchEmbed3d`` for a head that emits ``(pt, ph, pw, C)`` per token."""
    t, h, w = grid
    pt, ph, pw = patch_size
    x = tokens.reshape(tokens.shape[0], t, h, w, pt, ph, pw, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(tokens.shape[0], channels, t * pt, h * ph, w * pw)


def rope_3d(
    grid: Grid, axes: Grid, theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 cos/sin tables ``[T*H*W, sum(axes)]`` for 3D rotary embeddings.

    The head dimension is split into a temporal, a height and a width band;
    each band rotates by the token's coordinate along its own axis. Angles are
    repeated per channel pair to match the interleaved layout of ``apply_rope``.
    """
    t, h, w = grid
    bands = []
    for size, dim in zip(grid, axes):
        inv_freq = 1.0 / theta ** (
            torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim
        )
        positions = torch.arange(size, dtype=torch.float32, device=device)
        bands.append(torch.outer(positions, inv_freq))
    angles = torch.cat(
        [
            bands[0][:, None, None, :].expand(t, h, w, -1),
            bands[1][None, :, None, :].expand(t, h, w, -1),
            bands[2][None, None, :, :].expand(t, h, w, -1),
        ],
        dim=-1,
    )
    angles = angles.reshape(t * h * w, -1).repeat_interleave(2, dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs ``(x[2i], x[2i+1])``; real arithmetic so no complex dtypes reach the graph.

    ``cos``/``sin`` must broadcast against ``x`` (the caller places the sequence
    axis); the rotation runs in float32 and casts back.
    """
    x32 = x.float()
    even, odd = x32.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((-odd, even), dim=-1).flatten(-2)
    return (x32 * cos + rotated * sin).to(x.dtype)


@torch.no_grad()
def init_weights(model: nn.Module, seed: int) -> None:
    """Deterministic random weights that keep activations O(1) through depth.

    Real checkpoints zero-initialise adaLN gates and output heads; doing that
    here would make every attention site a no-op on the output, so instead all
    matrices get ``N(0, 1/fan_in)``, biases small noise and norm gains one.
    Draws happen in float32 on the parameter's device from one generator, so a
    seed gives the same weights in every dtype on a given device.
    """
    params = list(model.named_parameters())
    if not params:
        return
    generator = torch.Generator(device=params[0][1].device).manual_seed(seed)
    for name, param in params:
        if param.ndim >= 2:
            std = (param.numel() // param.shape[0]) ** -0.5
        elif name.endswith("bias"):
            std = 0.02
        else:
            param.fill_(1.0)
            continue
        values = torch.empty(param.shape, dtype=torch.float32, device=param.device)
        values.normal_(0.0, std, generator=generator)
        param.copy_(values)
