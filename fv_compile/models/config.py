"""Configuration shared by the reference video DiTs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fv_compile.errors import FvCompileError

Grid = tuple[int, int, int]


@dataclass(frozen=True, kw_only=True)
class VideoDiTConfig:
    """Fields every family needs to build inputs, count tokens and place RoPE.

    ``default_grid`` is the latent grid ``(T, H, W)`` of the resolution the
    preset is usually run at, so ``example_inputs(preset)`` is realistic.
    """

    num_heads: int
    head_dim: int
    text_len: int
    rope_axes: Grid
    default_grid: Grid
    text_dim: int = 4096
    in_channels: int = 16
    patch_size: Grid = (1, 2, 2)
    freq_dim: int = 256
    rope_theta: float = 10000.0
    eps: float = 1e-6

    # Whether forward's ``text_mask`` hides padded text keys inside attention
    # (rather than only zeroing padded text embeddings).
    masks_text_keys: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if sum(self.rope_axes) != self.head_dim or any(d % 2 for d in self.rope_axes):
            raise FvCompileError(
                f"rope_axes {self.rope_axes} must be even and sum to head_dim {self.head_dim}"
            )

    @property
    def hidden_dim(self) -> int:
        return self.num_heads * self.head_dim

    def token_grid(self, grid: tuple[int, ...]) -> Grid:
        """Token grid after patching; rejects latent grids the patch does not tile."""
        if len(grid) != 3 or any(n % p or n <= 0 for n, p in zip(grid, self.patch_size)):
            raise FvCompileError(
                f"latent grid {tuple(grid)} is not a positive multiple of patch {self.patch_size}"
            )
        return (
            grid[0] // self.patch_size[0],
            grid[1] // self.patch_size[1],
            grid[2] // self.patch_size[2],
        )
