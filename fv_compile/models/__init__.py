"""Reference video diffusion transformers with random weights.

Three families, each spelling attention differently so the attention matcher
is exercised on every common idiom (module path: spelling):

* Wan ``blocks.{i}.self_attn``: ``F.scaled_dot_product_attention`` on BHSD
  transposed from BSHD.
* Wan ``blocks.{i}.cross_attn``: hand-written ``(q @ k^T) * scale``,
  float32-upcast softmax, ``@ v``.
* Hunyuan ``text_refiner.blocks.{i}.attn``: ``q`` pre-scaled by
  ``head_dim**-0.5``, ``q @ k^T`` plus an additive 0/-inf key bias.
* Hunyuan ``double_blocks.{i}.attn``: einsum on BSHD, boolean key mask via
  ``masked_fill(~mask, -inf)``.
* Hunyuan ``single_blocks.{i}.attn``: SDPA with a boolean ``attn_mask``; GQA
  k/v expanded with ``repeat_interleave`` when ``num_kv_heads < num_heads``
  (``hunyuan-tiny``).
* CogVideoX ``blocks.{i}.attn``: merged-head ``[B*H, S, D]``
  ``baddbmm(beta=0, alpha=scale)``, softmax, ``bmm``.

Every model's forward is ``forward(latent, timestep, text_states, text_mask=None)``
returning a tensor shaped like ``latent`` ``[B, C, T, H, W]``, and traces with
``torch.compile(fullgraph=True)``.
"""

from .cogvideox import CogVideoXConfig, CogVideoXModel
from .config import VideoDiTConfig
from .diffusers_zoo import from_diffusers
from .hunyuan import HunyuanConfig, HunyuanVideoModel
from .wan import WanConfig, WanModel
from .zoo import PRESETS, build_model, example_inputs, latent_grid, token_count

__all__ = [
    "PRESETS",
    "CogVideoXConfig",
    "CogVideoXModel",
    "HunyuanConfig",
    "HunyuanVideoModel",
    "VideoDiTConfig",
    "WanConfig",
    "WanModel",
    "build_model",
    "example_inputs",
    "from_diffusers",
    "latent_grid",
    "token_count",
]
