"""Backend names (FastVideo's), lookup and user registration. What a backend can run is
declared on its class and read by `abstract.unsupported_reason`."""

from __future__ import annotations

import importlib

from fv_compile.backends.abstract import AttentionBackend
from fv_compile.errors import FvCompileError

# built-in backends load on first use, so importing fv_compile never imports triton or flash-attn
_BUILTIN: dict[str, str] = {
    "TORCH_SDPA": "fv_compile.backends.sdpa:SDPABackend",
    "TRITON_ATTN": "fv_compile.backends.triton_attn:TritonAttentionBackend",
    "FLASH_ATTN": "fv_compile.backends.flash_attn:FlashAttentionBackend",
    "SLIDING_TILE_ATTN": "fv_compile.backends.sliding_tile:SlidingTileAttentionBackend",
    "SAGE_ATTN": "fv_compile.backends.sage:SageAttentionBackend",
    "VIDEO_SPARSE_ATTN": "fv_compile.backends.video_sparse:VideoSparseAttentionBackend",
}
# FastVideo backend names fv_compile has no implementation of (yet): a clearer error than "unknown"
_FASTVIDEO_ONLY = {
    "SAGE_ATTN_THREE",
    "VIDEO_SPARSE_ATTN_H3",
    "VMOBA_ATTN",
    "SLA_ATTN",
    "SAGE_SLA_ATTN",
    "BSA_ATTN",
    "NABLA_ATTN",
}
_USER: dict[str, type[AttentionBackend]] = {}
_LOADED: dict[str, type[AttentionBackend]] = {}


def register_backend(name: str, backend_cls: type[AttentionBackend]) -> None:
    """Make `backend_cls` available under `name` (case-insensitive) to every fv_compile policy."""
    if not isinstance(name, str) or not name:
        raise FvCompileError("register_backend: name must be a non-empty string")
    for attr in ("get_impl_cls", "get_builder_cls"):
        if not callable(getattr(backend_cls, attr, None)):
            raise FvCompileError(
                f"register_backend({name!r}): {backend_cls!r} has no static {attr}(); "
                "subclass fv_compile.AttentionBackend"
            )
    _USER[name.upper()] = backend_cls


def available_backends() -> list[str]:
    return sorted(set(_BUILTIN) | set(_USER))


def get_backend(name: str) -> type[AttentionBackend]:
    """The backend class registered as `name` (case-insensitive)."""
    key = name.upper() if isinstance(name, str) else name
    if key in _USER:
        return _USER[key]
    if key in _LOADED:
        return _LOADED[key]
    if key in _FASTVIDEO_ONLY:
        raise FvCompileError(
            f"{key} is a FastVideo backend fv_compile does not ship; register an implementation "
            f"with fv_compile.register_backend({key!r}, YourBackend), or use one of: "
            f"{', '.join(available_backends())}"
        )
    if key not in _BUILTIN:
        raise FvCompileError(
            f"unknown attention backend {name!r}; valid names: {', '.join(available_backends())} "
            "(or register your own with fv_compile.register_backend)"
        )
    module, attr = _BUILTIN[key].split(":")
    cls = getattr(importlib.import_module(module), attr)
    _LOADED[key] = cls
    return cls


def needs_metadata(backend_cls: type[AttentionBackend]) -> bool:
    """Backends without a builder (`get_builder_cls` returning None or raising
    NotImplementedError, as several of FastVideo's do) run with no per-step metadata."""
    try:
        return backend_cls.get_builder_cls() is not None
    except NotImplementedError:
        return False
