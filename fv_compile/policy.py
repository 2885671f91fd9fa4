"""Which backend runs each site: the user's policy, each backend's support check, and fallback."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from fv_compile.backends import registry
from fv_compile.backends.abstract import AttentionBackend, capabilities, unsupported_reason
from fv_compile.errors import FvCompileError
from fv_compile.site import KEY_PADDING_KINDS, AttentionSite

AUTO = "auto"
ROLES = ("self", "cross", "joint", "default")


# Below this many keys cuDNN beat flash-attn-4 on the H200 (cross-attention to 512 text tokens:
# cuDNN 562 TFLOP/s, FA4 483); above it FA4 led by 1.1-1.2x (docs/benchmarks.md).
_FLASH_MIN_KV = 2048
# A key padded site where flash-attn-4 is absent: at HunyuanVideo's 720p joint site (119,056 keys)
# TRITON_ATTN ran 1.32x (B1) and 1.37x (B2) masked SDPA; shorter sites were not measured, so from
# the order of that length on only (docs/benchmarks.md, key padded attention).
_TRITON_MASKED_MIN_KV = 65536


def dense_default(site: AttentionSite) -> str:
    """The dense backend `auto` picks for a site, as the H200 benchmark decided: flash-attn-4 where
    it is installed and the site is long enough to profit, else SDPA (cuDNN on Hopper; it beat our
    Triton kernel on every shape measured).

    Key padded sites follow the same rule: flash-attn-4 runs them whenever it runs the site
    (`supports` and the declared mask kinds decide; 1.62x masked SDPA at the 720p HunyuanVideo
    site). Where it does not, a very long key padded site goes to TRITON_ATTN (1.32-1.37x masked
    SDPA there), any other to SDPA.

    A site that trains goes to SDPA where a training graph may run it as SDPA itself
    (`SDPABackend.traced_in_training`): SDPA's fused backward then reuses the forward's
    log-sum-exp, where the op's backward, every other dense backend's, recomputes the forward
    first (a Wan-1.3B-size training step on the H200, 10 blocks: 990.8 ms with flash-attn-4's
    forward and that recomputation, 686.3 ms eager, docs/benchmarks.md)."""
    kv_len = site.kv_len or 0
    if site.trains and registry.get_backend("TORCH_SDPA").traced_in_training(site):
        return "TORCH_SDPA"
    if site.device.startswith("cuda") and kv_len >= _FLASH_MIN_KV:
        if unsupported_reason(registry.get_backend("FLASH_ATTN"), site) is None:
            return "FLASH_ATTN"
        if (
            site.mask_kind in KEY_PADDING_KINDS
            and kv_len >= _TRITON_MASKED_MIN_KV
            and unsupported_reason(registry.get_backend("TRITON_ATTN"), site) is None
        ):
            return "TRITON_ATTN"
    return "TORCH_SDPA"


class SitePolicy:
    """Resolves `attention_backend` (a name, a role dict, or a callable `site -> name`)."""

    def __init__(self, spec: Any = AUTO, *, strict: bool = False) -> None:
        self.strict = strict
        self.spec = spec
        if isinstance(spec, str):
            self._check_name(spec)
        elif isinstance(spec, dict):
            unknown = set(spec) - set(ROLES)
            if unknown:
                raise FvCompileError(
                    f"attention_backend policy has unknown keys {sorted(unknown)}; "
                    f"valid keys: {', '.join(ROLES)} (attention roles). To choose a backend per "
                    "site, pass a callable instead: attention_backend=lambda site: 'TORCH_SDPA' "
                    "if site.module_path == 'blocks.0.attn1' else 'auto' (fv_compile.explain(model, "
                    "*inputs) lists every site's path and role)"
                )
            for name in spec.values():
                self._check_name(name)
        elif not callable(spec):
            raise FvCompileError(
                "attention_backend must be a backend name, a dict "
                '{"self": ..., "cross": ..., "joint": ..., "default": ...}, or a callable '
                f"site -> name; got {type(spec).__name__}"
            )

    @staticmethod
    def _check_name(name: Any) -> None:
        if not isinstance(name, str):
            raise FvCompileError(f"attention backend names are strings, got {name!r}")
        if name.lower() != AUTO:
            registry.get_backend(name)

    def requested(self, site: AttentionSite) -> str:
        name = self._named(site)
        return dense_default(site) if name.lower() == AUTO else name.upper()

    def asks_auto(self, site: AttentionSite) -> bool:
        """Whether the user left `site` to `auto` (the default): only such sites are tuned under
        an accuracy budget; a backend the user named runs where they named it."""
        return self._named(site).lower() == AUTO

    def _named(self, site: AttentionSite) -> str:
        """The name the user's spec gives `site`, `auto` unresolved."""
        spec = self.spec
        if isinstance(spec, str):
            name = spec
        elif isinstance(spec, dict):
            by_role: dict[str, str] = spec  # the constructor checked every name
            name = by_role.get(site.role, by_role.get("default", AUTO))
        else:  # a callable (the constructor let nothing else through)
            try:
                name = spec(site)
            except Exception as e:
                raise FvCompileError(
                    f"the attention_backend policy raised {type(e).__name__} at attention site "
                    f"{site.module_path or site.node} ({site.role}-attention): {e}; a policy is "
                    "called with every site found (an fv_compile.AttentionSite) and must return a "
                    "backend name for each"
                ) from e
            self._check_name(name)
        return name

    def choose(self, site: AttentionSite) -> tuple[str, type[AttentionBackend]]:
        """The backend that will run `site`; records a fallback in `site.reason`."""
        name = self.requested(site)
        cls = registry.get_backend(name)
        roles = capabilities(cls).roles
        if isinstance(self.spec, str) and roles is not None and site.role not in roles:
            # one sparse backend for "the model": it applies where it is meant to, dense elsewhere
            fallback = dense_default(site)
            site.reason = f"{name} serves {'/'.join(roles)} attention; {site.role} uses {fallback}"
            return fallback, registry.get_backend(fallback)
        why = unsupported_reason(cls, site)
        if why is None:
            return name, cls
        where = site.module_path or site.node
        if self.strict:
            raise FvCompileError(
                f"attention site {where}: backend {name} cannot run it ({why}); choose another "
                "backend for this site or pass strict=False to fall back to a dense backend"
            )
        fallback = dense_default(site)
        warnings.warn(
            f"fv_compile: {name} cannot run attention site {where} ({why}); using {fallback}",
            stacklevel=2,
        )
        site.reason = f"{name} unsupported: {why}; fell back to {fallback}"
        return fallback, registry.get_backend(fallback)


PolicySpec = str | dict | Callable[[AttentionSite], str]
