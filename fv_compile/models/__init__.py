"""Reference video diffusion transformers with random weights.

Three families, each spelling attention differently so the attention matcher
is exercised on every common idiom (module path -> spelling):

=========================================  ==================================================
``wan``       ``blocks.{i}.self_attn``         ``F.scaled_dot_product_attention``, BHSD via transpose
``wan``       ``blocks.{i}.cross_attn``        ``(q @ k^T) * scale``, float32-upcast softmax, ``@ v``
``hunyuan``   ``text_refiner.blocks.{i}.attn`` pre-scaled ``q``, ``q @ k^T`` + additive -inf bias
``hunyuan``   ``double_blocks.{i}.attn``       einsum BSHD, ``masked_fill(~mask, -inf)`` on keys
``hunyuan``   ``single_blocks.{i}.attn``       SDPA with bool ``attn_mask``; GQA ``repeat_interleave``
                                               when ``num_kv_heads`` < ``num_heads`` (``hunyuan-tiny``)
``cogvideox`` ``blocks.{i}.attn``              merged-head ``baddbmm(beta=0, alpha=scale)``/``bmm``
=========================================  ==================================================

Every model's forward is ``forward(latent, timestep, text_states, text_mask=None)``
returning a tensor shaped like ``latent`` ``[B, C, T, H, W]``, and traces with
``torch.compile(fullgraph=True)``.
"""

from .cogvideox import CogVideoXConfig, CogVideoXModel
from .config import DiTConfig
from .diffusers_zoo import from_diffusers
from .hunyuan import HunyuanConfig, HunyuanVideoModel
from .wan import WanConfig, WanModel
from .zoo import PRESETS, build_model, example_inputs, latent_grid, token_count

__all__ = [
    "PRESETS",
    "CogVideoXConfig",
    "CogVideoXModel",
    "DiTConfig",
    "HunyuanConfig",
    "HunyuanVideoModel",
    "WanConfig",
    "WanModel",
    "build_model",
    "example_inputs",
    "from_diffusers",
    "latent_grid",
    "token_count",
]
