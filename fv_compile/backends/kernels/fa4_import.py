"""Importing flash-attn-4 with its persistent kernel cache on, as torch.compile's caches are.

flash-attn-4 JIT-compiles its CuTe kernels in every process, a second or two per kernel
configuration, and keeps them only in memory unless `FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1`
was set before `flash_attn.cute` was first imported. A warm start of a compiled model (Inductor's
and AOTAutograd's caches hit) would still pay that JIT for every kernel its sites use. So when
the user has not decided either way and torch's compile caches are on, fv_compile turns the
cache on for the import it makes, next to Inductor's cache: `<inductor cache dir>/flash_attn_cute`,
so that whatever clears or relocates torch's caches (`TORCHINDUCTOR_CACHE_DIR`) does the same for
these kernels. flash-attn-4 keys the entries by a fingerprint of its own sources, cutlass and
tvm-ffi versions, and locks them across processes.

Either variable set by the user wins; `FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=0` keeps the cache off.
Once `flash_attn.cute` is imported (by the user, first), its cache mode is fixed and nothing here
changes it.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

CACHE_ENABLED = "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"
CACHE_DIR = "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"


def _torch_caches_on() -> bool:
    from torch._inductor import config

    return config.fx_graph_cache and not config.force_disable_caches


def persistent_cache_settings() -> dict[str, str]:
    """The environment flash-attn-4 should be imported with: empty when the user chose, when
    torch's caches are off, or when it is already imported."""
    if "flash_attn.cute" in sys.modules or CACHE_ENABLED in os.environ or not _torch_caches_on():
        return {}
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    settings = {CACHE_ENABLED: "1"}
    if CACHE_DIR not in os.environ:
        settings[CACHE_DIR] = os.path.join(cache_dir(), "flash_attn_cute")
    return settings


def import_flash_attn_cute(submodule: str = "") -> ModuleType:
    """`flash_attn.cute` (or `flash_attn.cute.<submodule>`), its kernel cache set up as above."""
    settings = persistent_cache_settings()
    os.environ.update(settings)
    try:
        return importlib.import_module("flash_attn.cute" + (f".{submodule}" if submodule else ""))
    except BaseException:
        if "flash_attn.cute" not in sys.modules:  # not installed: leave no trace of trying
            for name in settings:
                os.environ.pop(name, None)
        raise
