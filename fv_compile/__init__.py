"""fv_compile: torch.compile for video diffusion transformers.

One line finds every attention site of a model, however it was written, and runs it on a pluggable
FastVideo-style attention backend:

    cm = fv_compile.compile(model, attention_backend="TORCH_SDPA")
"""

from fv_compile import ops as _ops  # registers the fv_compile::attention custom op
from fv_compile.api import (
    CompiledModel,
    FvCompileBackend,
    compile,
    explain,
    fv_compile_backend,
    verify,
)
from fv_compile.api import register_dynamo_backend as _register_dynamo_backend
from fv_compile.backends.abstract import (
    AttentionBackend,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadata,
    AttentionMetadataBuilder,
)
from fv_compile.backends.registry import available_backends, get_backend, register_backend
from fv_compile.context import (
    DiTConfig,
    FastVideoArgs,
    ForwardBatch,
    PipelineConfig,
    forward_context,
)
from fv_compile.errors import FvCompileError
from fv_compile.explain import ExplainReport
from fv_compile.graph import find_attention_sites, rewrite_attention
from fv_compile.site import AttentionSite, NonAttentionSoftmax
from fv_compile.tuning import CandidateResult, SiteTuning
from fv_compile.verify import SiteCheck, TensorCheck

__version__ = "0.1.0"

_register_dynamo_backend()
del _ops

__all__ = [
    "AttentionBackend",
    "AttentionImpl",
    "AttentionLayer",
    "AttentionMetadata",
    "AttentionMetadataBuilder",
    "AttentionSite",
    "CandidateResult",
    "CompiledModel",
    "DiTConfig",
    "ExplainReport",
    "FastVideoArgs",
    "ForwardBatch",
    "FvCompileBackend",
    "FvCompileError",
    "NonAttentionSoftmax",
    "PipelineConfig",
    "SiteCheck",
    "SiteTuning",
    "TensorCheck",
    "available_backends",
    "compile",
    "explain",
    "find_attention_sites",
    "forward_context",
    "fv_compile_backend",
    "get_backend",
    "register_backend",
    "rewrite_attention",
    "verify",
]
