"""What a compiled model derives from its own call when the caller sets no forward context.

A diffusers pipeline calls its transformer as it always has (`pipe.transformer =
fv_compile.compile(pipe.transformer, ...)`, then `pipe(...)`): no `forward_context`. Backends with
per-step metadata still need the step, the latent grid and the run's settings, so the compiled
model makes the context itself, only when a backend asks for it (a dense model reads nothing):

* the latent grid: `raw_latent_shape` from the call's latent, the `hidden_states` argument (or
  `latent`, `latents`, `sample`, ..., or the first 5-D tensor), `[B, C, T, H, W]` (a frames-first
  `[B, T, C, H, W]` latent is recognised by the model's `config.in_channels`; a patchified
  `[B, S, C]` one with `num_frames`, `height`, `width` arguments, as LTX-Video takes it); left
  unset when the call has no latent, for the builder that needs it to say so;
* the patch size: the model's `config.patch_size` (and `patch_size_t`);
* the step: the `step_index` diffusers pipelines pass to `transformer.cache_context(...)` around
  each call, else a per-loop counter driven by the `timestep` argument: a new, lower timestep is
  the next step, the same timestep the same step (the second CFG pass), a higher one starts a
  new loop at step 0 (denoising timesteps decrease); each thread counts its own loop;
* the rest (`sta_window`, `sta_dense_steps`, `mask_strategy_file_path`, ...): the
  `fastvideo_args` given to `fv_compile.compile`.

Calls of one step with the same latent shape (the two CFG passes, or one batch-2 CFG call) share
one context, so each backend's metadata is built once per step.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import inspect
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch

from fv_compile.context import FastVideoArgs, ForwardBatch, ForwardContext
from fv_compile.errors import FvCompileError

_LATENT_NAMES = ("hidden_states", "latent", "latents", "sample", "x", "video")
_TIMESTEP_NAMES = ("timestep", "timesteps", "t")
_FIX = """call the compiled model inside a forward context that says it:

    with fv_compile.forward_context(current_timestep=i, forward_batch=fv_compile.ForwardBatch(
            raw_latent_shape=latent.shape), fastvideo_args=args):
        out = compiled_model(...)"""

# the step_index of the diffusers `cache_context(...)` block the current call runs in
_LOOP_STEP: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "fv_compile_loop_step", default=None
)


@contextlib.contextmanager
def cache_context(inner: Callable[..., Any], name: str, **kwargs: Any) -> Iterator[None]:
    """The wrapped model's `cache_context(name, **kwargs)`, noting the `step_index` a pipeline
    passes: the exact denoising step of the calls inside, read without touching a tensor."""
    step = kwargs.get("step_index")
    token = _LOOP_STEP.set(None if step is None else int(step))
    try:
        with inner(name, **kwargs):
            yield
    finally:
        _LOOP_STEP.reset(token)


def model_patch_size(model: torch.nn.Module) -> tuple[int, int, int] | None:
    """`(pt, ph, pw)` from the model's config (`patch_size` as a triple, or an int with
    `patch_size_t`), or None when the config does not say."""
    config = getattr(model, "config", None)
    patch = _config_value(config, "patch_size")
    if patch is None:
        return None
    if isinstance(patch, int):
        pt = _config_value(config, "patch_size_t") or 1
        return (int(pt), patch, patch)
    patch = tuple(int(p) for p in patch)
    if len(patch) == 3:
        return patch
    if len(patch) == 2:
        return (1, *patch)
    return None


def _config_value(config: Any, name: str) -> Any:
    if config is None:
        return None
    try:
        return getattr(config, name)
    except AttributeError:
        return config.get(name) if isinstance(config, dict) else None


class StepClock:
    """The denoising step of a call, counted from the timestep argument (see module doc).

    A timestep tensor is read once per new tensor: the same tensor object again (a pipeline's
    second CFG pass) is the same step without a read, which on the GPU would be a host sync."""

    def __init__(self) -> None:
        self.step = 0
        self.value: float | None = None
        self._tensor: weakref.ref[torch.Tensor] | None = None
        self._version = -1

    def forget(self) -> None:
        self.value, self._tensor = None, None

    def step_of(self, timestep: Any) -> int:
        if isinstance(timestep, torch.Tensor):
            if (
                self._tensor is not None
                and self._tensor() is timestep
                and timestep._version == self._version
            ):
                return self.step
            if timestep.numel() == 0:
                raise FvCompileError(f"the timestep argument is an empty tensor; {_FIX}")
            # the largest entry: per-token timesteps (Wan 2.2 TI2V) hold 0 on conditioning frames
            value = float(timestep.detach().reshape(-1).max())
            self._tensor, self._version = weakref.ref(timestep), timestep._version
        else:
            value = float(timestep)
            self._tensor = None
        if self.value is None or value > self.value:
            self.step = 0
        elif value < self.value:
            self.step += 1
        self.value = value
        return self.step


class DerivedContexts:
    """Makes the forward context of a call from its arguments (one per step and latent shape)."""

    def __init__(self, model: torch.nn.Module, fastvideo_args: Any = None) -> None:
        self.fastvideo_args = _with_model_patch(model, fastvideo_args)
        config = getattr(model, "config", None)
        channels = _config_value(config, "in_channels")
        self._channels = int(channels) if isinstance(channels, int) else None
        try:
            self._signature: inspect.Signature | None = inspect.signature(model.forward)
        except (TypeError, ValueError):
            self._signature = None
        # each thread runs its own denoising loop: its own clock, its own last context
        self._per_thread = threading.local()
        self.made = 0  # contexts made so far (one per step and latent shape)

    def _loop(self) -> threading.local:
        """The calling thread's loop: its step clock and the context of its last call."""
        state = self._per_thread
        if not hasattr(state, "clock"):
            state.clock, state.last = StepClock(), None
        return state

    @property
    def clock(self) -> StepClock:
        return self._loop().clock

    def for_call(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Callable[[], ForwardContext]:
        """A function returning this call's context, derived on its first use."""
        step_index = _LOOP_STEP.get()
        made: list[ForwardContext] = []

        def resolve() -> ForwardContext:
            if not made:
                made.append(self._context(args, kwargs, step_index))
            return made[0]

        return resolve

    def _context(self, args, kwargs, step_index: int | None) -> ForwardContext:
        arguments = self._arguments(args, kwargs)
        shape = self._latent_shape(args, arguments)
        if step_index is not None:
            step = step_index
            self.clock.forget()
        else:
            timestep = next(
                (arguments[n] for n in _TIMESTEP_NAMES if arguments.get(n) is not None), None
            )
            if timestep is None:
                raise FvCompileError(
                    "a backend needs the denoising step, but this call of the compiled model has no "
                    f"timestep argument ({', '.join(_TIMESTEP_NAMES)}) and runs in no diffusers "
                    f"cache_context(step_index=...); {_FIX}"
                )
            step = self.clock.step_of(timestep)
        key = (step, shape)
        loop = self._loop()
        if loop.last is not None and loop.last[0] == key:
            return loop.last[1]
        ctx = ForwardContext(step, ForwardBatch(raw_latent_shape=shape), self.fastvideo_args)
        loop.last = (key, ctx)
        self.made += 1
        return ctx

    def _arguments(self, args, kwargs) -> dict[str, Any]:
        if self._signature is not None:
            try:
                return dict(self._signature.bind_partial(*args, **kwargs).arguments)
            except TypeError:
                pass
        return dict(kwargs)

    def _latent_shape(self, args, arguments: dict[str, Any]) -> tuple[int, ...] | None:
        """`(B, C, T, H, W)` of the call's latent; None when the call has none (a builder that
        needs it says so, naming `raw_latent_shape`)."""
        latent = next(
            (arguments[n] for n in _LATENT_NAMES if isinstance(arguments.get(n), torch.Tensor)),
            None,
        )
        if latent is None or latent.dim() not in (3, 5):
            latent = next((a for a in args if isinstance(a, torch.Tensor) and a.dim() == 5), latent)
        if isinstance(latent, torch.Tensor) and latent.dim() == 5:
            b, c, t, h, w = latent.shape
            if self._channels is not None and c != self._channels and t == self._channels:
                b, t, c = b, c, t  # [B, T, C, H, W] (CogVideoX)
            return (b, c, t, h, w)
        if isinstance(latent, torch.Tensor) and latent.dim() == 3:
            frames, height, width = (arguments.get(n) for n in ("num_frames", "height", "width"))
            if isinstance(frames, int) and isinstance(height, int) and isinstance(width, int):
                return (
                    latent.shape[0],
                    latent.shape[2],
                    frames,
                    height,
                    width,
                )  # tokens (LTX-Video)
        return None


def _with_model_patch(model: torch.nn.Module, fastvideo_args: Any) -> Any:
    """`fastvideo_args` (a copy, never the caller's object) with the model's patch size; an
    explicit patch size that contradicts the model's config is an error."""
    args = FastVideoArgs() if fastvideo_args is None else copy.copy(fastvideo_args)
    patch = model_patch_size(model)
    given = getattr(args, "patch_size", None)
    if patch is None:
        return args
    if given is not None:
        if tuple(int(p) for p in given) != patch:
            raise FvCompileError(
                f"fastvideo_args.patch_size={tuple(given)} contradicts the model's config "
                f"(patch size {patch}): drop patch_size from fastvideo_args, or set the model's"
            )
        return args
    try:
        args.patch_size = patch
    except AttributeError:
        raise FvCompileError(
            f"fastvideo_args ({type(args).__name__}) has no settable patch_size: pass "
            "fv_compile.FastVideoArgs(...) with your STA settings"
        ) from None
    return args


def check_fastvideo_args(fastvideo_args: Any) -> None:
    """Reject settings the metadata builders would reject later, at compile time."""
    if fastvideo_args is None:
        return
    if isinstance(fastvideo_args, dict):
        raise FvCompileError(
            "fastvideo_args must be an object with attributes, e.g. "
            "fv_compile.FastVideoArgs(sta_window=(3, 3, 3), sta_dense_steps=10), not a dict"
        )
    window = getattr(fastvideo_args, "sta_window", None)
    if window is not None and (
        not isinstance(window, (tuple, list))
        or len(window) != 3
        or not all(isinstance(w, int) and w > 0 for w in window)
    ):
        raise FvCompileError(
            f"fastvideo_args.sta_window must be three positive tile counts (wt, wh, ww), got {window!r}"
        )
    dense = getattr(fastvideo_args, "sta_dense_steps", 0)
    if not isinstance(dense, int) or isinstance(dense, bool) or dense < 0:
        raise FvCompileError(f"fastvideo_args.sta_dense_steps must be an int >= 0, got {dense!r}")
    order = getattr(fastvideo_args, "sta_token_order", "auto")
    if order not in ("auto", "per_site"):
        raise FvCompileError(
            f"fastvideo_args.sta_token_order must be 'auto' or 'per_site', got {order!r}"
        )
