"""Timing, memory, output error and attention share: the numbers one variant is judged by.

Every function here takes a device and does the right thing on it: CUDA events and the caching
allocator's peak on a GPU, `perf_counter` on a CPU (where ops are synchronous, and where the process
allocator gives no per-run peak, so memory is reported as unknown rather than as a misleading RSS).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.autograd import DeviceType

ATTENTION_OP = "fv_compile::attention"
STEP_RANGE = "fv_compile.report::step"


# A variant's timing is flagged as noisy past either ratio (see `timing_outliers`).
NOISY_MAX_OVER_MEDIAN = 1.5
NOISY_MAX_OVER_MIN = 2.0
TIMING_RULE = (
    f"a variant's timing is flagged as noisy when its slowest timed loop took more than "
    f"{NOISY_MAX_OVER_MEDIAN:g}x its median loop (max/median > {NOISY_MAX_OVER_MEDIAN:g}) or more "
    f"than {NOISY_MAX_OVER_MIN:g}x its fastest (max/min > {NOISY_MAX_OVER_MIN:g}); speedups use "
    "medians, which one slow loop does not move, but a flagged variant's numbers deserve a rerun "
    "(more --repeat, an idle machine)"
)


@dataclass
class LatencyStats:
    """Per-step latency over the timed repeats, in milliseconds."""

    median_ms: float
    min_ms: float
    max_ms: float
    samples_ms: list[float]

    @classmethod
    def of(cls, samples_ms: list[float]) -> LatencyStats:
        return cls(
            statistics.median(samples_ms), min(samples_ms), max(samples_ms), list(samples_ms)
        )


def timing_outliers(latency: LatencyStats) -> str | None:
    """Why `latency` is noisy by `TIMING_RULE` ("max/median 11.8x, max/min 650x; 2 of 10 loops
    above 1.5x the median"), or None when it is not."""
    lat = latency
    over_median = lat.max_ms / lat.median_ms if lat.median_ms > 0 else math.inf
    over_min = lat.max_ms / lat.min_ms if lat.min_ms > 0 else math.inf
    if over_median <= NOISY_MAX_OVER_MEDIAN and over_min <= NOISY_MAX_OVER_MIN:
        return None
    slow = sum(s > NOISY_MAX_OVER_MEDIAN * lat.median_ms for s in lat.samples_ms)
    return (
        f"max/median {over_median:.2g}x, max/min {over_min:.3g}x; {slow} of "
        f"{len(lat.samples_ms)} loops above {NOISY_MAX_OVER_MEDIAN:g}x the median"
    )


@dataclass
class OutputError:
    """How far a variant's output moved from eager's, worst over the steps of the loop.

    rel_fro is ||out - ref||_F / ||ref||_F; cosine is the cosine similarity of the flattened
    tensors. All three are computed in float64, so they measure the variant, not the metric.
    """

    max_abs: float
    rel_fro: float
    cosine: float

    def worst(self, other: OutputError) -> OutputError:
        return OutputError(
            _nan_max(self.max_abs, other.max_abs),
            _nan_max(self.rel_fro, other.rel_fro),
            _nan_min(self.cosine, other.cosine),
        )


@dataclass
class AttentionShare:
    """One profiled step: the time spent in attention and how it was attributed, and where the
    rest of the step went.

    kernel_ms: of attention_ms, the time in the attention kernels the ops called (the outermost
        ATen attention ops inside them; None when a backend's kernel is not an ATen op); the
        rest is the ops' own overhead (dispatch, metadata, layout copies). kernels counts them by
        name (`aten::_scaled_dot_product_flash_attention_for_cpu`).
    compiled_ms: the time inside compiled graphs (Dynamo's "Torch-Compiled Region" ranges); the
        step's remainder ran eagerly (the code between regionally compiled blocks, graph breaks).
    step_kernels_ms / op_kernels_ms: on a GPU, the device time of every kernel of the step
        and of the kernels launched inside the attention ops (each kernel once), by
        `kernel_kind` (a copy under an op is layout work of ours around the backend's kernel;
        GEMMs are the step's other floor).
    top_kernels: the step's costliest kernels, `(name, launches, ms)`.
    """

    attention_ms: float
    step_ms: float
    calls: int
    method: str
    kernel_ms: float | None = None
    kernels: dict[str, int] = field(default_factory=dict)
    compiled_ms: float | None = None
    step_kernels_ms: dict[str, float] = field(default_factory=dict)
    op_kernels_ms: dict[str, float] = field(default_factory=dict)
    top_kernels: list[tuple[str, int, float]] = field(default_factory=list)
    share: float = field(init=False)

    def __post_init__(self) -> None:
        self.share = self.attention_ms / self.step_ms if self.step_ms > 0 else math.nan

    @property
    def overhead_ms(self) -> float | None:
        """Attention ops' time outside their kernels."""
        return None if self.kernel_ms is None else max(0.0, self.attention_ms - self.kernel_ms)

    @property
    def eager_ms(self) -> float | None:
        """The step's time outside compiled graphs."""
        return None if self.compiled_ms is None else max(0.0, self.step_ms - self.compiled_ms)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_time(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of host wall time until `fn`'s device work is done; for calls that compile."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def device_time(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds `fn` takes on the device: CUDA events on a GPU (host launch overhead that the GPU
    hides does not count), perf_counter on a CPU."""
    if device.type != "cuda":
        return wall_time(fn, device)
    synchronize(device)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    """Peak bytes allocated since the last reset on a GPU; None on a CPU, where no per-run peak
    exists."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def first_tensor(output: Any) -> torch.Tensor:
    """The model's main output: the tensor itself, or the first tensor of a tuple/list/dict
    (diffusers models return `(sample,)` with `return_dict=False`)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        items = list(output.values())
    elif isinstance(output, (tuple, list)):
        items = list(output)
    else:
        items = []
    for item in items:
        if isinstance(item, torch.Tensor):
            return item
    raise TypeError(f"the model returned {type(output).__name__}, which holds no tensor to compare")


def output_error(output: torch.Tensor, reference: torch.Tensor) -> OutputError:
    """Error of `output` against `reference`; raises if their shapes differ."""
    if output.shape != reference.shape:
        raise ValueError(
            f"output shape {tuple(output.shape)} differs from eager's {tuple(reference.shape)}"
        )
    out = output.detach().to(torch.float64).flatten()
    ref = reference.detach().to(device=out.device, dtype=torch.float64).flatten()
    diff = out - ref
    ref_norm = ref.norm()
    rel = (diff.norm() / ref_norm).item() if ref_norm > 0 else diff.norm().item()
    denom = out.norm() * ref_norm
    cosine = (out @ ref / denom).item() if denom > 0 else math.nan
    return OutputError(diff.abs().max().item(), rel, cosine)


def profile_attention(step: Callable[[], Any], device: torch.device) -> AttentionShare:
    """Profile one call of `step` and attribute its time to attention (see `attention_share`)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    synchronize(device)
    with torch.profiler.profile(activities=activities, acc_events=True) as prof:
        with torch.profiler.record_function(STEP_RANGE):
            step()
        synchronize(device)
    return attention_share(list(prof.events()), on_gpu=device.type == "cuda")


def attention_share(events: list[Any], *, on_gpu: bool) -> AttentionShare:
    """A profiled step's time attributed to attention.

    Attention is every outermost `fv_compile::attention` op (the one op each rewritten site
    became, so nothing else is counted and nothing inside it is counted twice). On a GPU both
    sides are device kernel time: each kernel counted once, under the runtime call that launched
    it (torch's own per-event totals also add a kernel to the module-loading events that share
    its op's id, counting it twice under the op); on a CPU both are CPU time.
    """
    # host-side ranges only: on a GPU the step's range also appears as a device annotation
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    attention = [e for e in cpu if e.name == ATTENTION_OP and not _inside(e, ATTENTION_OP)]
    steps = [e for e in cpu if e.name == STEP_RANGE]
    regions = [e for e in cpu if _is_region(e.name) and not _inside(e, None, _is_region)]
    kernels = [k for op in attention for k in _outermost(op, _is_attention_kernel)]
    names: dict[str, int] = {}
    for k in kernels:
        name = _kernel_name(k)
        names[name] = names.get(name, 0) + 1
    if not on_gpu:
        return AttentionShare(
            sum(e.cpu_time_total for e in attention) / 1e3,
            sum(e.cpu_time_total for e in steps) / 1e3,
            len(attention),
            "CPU time of fv_compile::attention ops / CPU time of the step",
            kernel_ms=sum(k.cpu_time_total for k in kernels) / 1e3
            if kernels or not attention
            else None,
            kernels=names,
            compiled_ms=sum(e.cpu_time_total for e in regions) / 1e3,
        )
    launched = _device_kernels(events, cpu)
    ops, aten_kernels, region_set = (
        set(map(id, attention)),
        set(map(id, kernels)),
        set(map(id, regions)),
    )
    attention_ms = kernel_ms = compiled_ms = step_ms = 0.0
    step_kinds: dict[str, float] = {}
    op_kinds: dict[str, float] = {}
    top: dict[str, tuple[int, float]] = {}
    for kernel, owner in launched:
        ms = kernel.time_range.elapsed_us() / 1e3
        kind = kernel_kind(kernel.name)
        step_ms += ms
        step_kinds[kind] = step_kinds.get(kind, 0.0) + ms
        launches, total = top.get(kernel.name, (0, 0.0))
        top[kernel.name] = (launches + 1, total + ms)
        chain = set(map(id, _self_and_ancestors(owner)))
        if chain & ops:
            attention_ms += ms
            op_kinds[kind] = op_kinds.get(kind, 0.0) + ms
            if chain & aten_kernels:
                kernel_ms += ms
        if chain & region_set:
            compiled_ms += ms
    costliest = sorted(top.items(), key=lambda item: -item[1][1])[:TOP_KERNELS]
    return AttentionShare(
        attention_ms,
        step_ms,
        len(attention),
        "GPU kernel time launched under fv_compile::attention / GPU kernel time of the step",
        kernel_ms=kernel_ms if kernels or not attention else None,
        kernels=names,
        compiled_ms=compiled_ms,
        step_kernels_ms=step_kinds,
        op_kernels_ms=op_kinds,
        top_kernels=[(name, n, ms) for name, (n, ms) in costliest],
    )


def _device_kernels(events: list[Any], cpu: list[Any]) -> list[tuple[Any, Any]]:
    """Each device kernel of the profile once, with the CPU event that launched it: the runtime
    call (`cudaLaunchKernel`, `cuLaunchKernel`, `cudaMemcpyAsync`, ...) whose correlation id
    the kernel carries as its own, which sits under the op that made it. Raises when kernels
    ran and none has such a call (no attribution is possible, and a share of 0 would be a wrong
    number)."""
    by_id: dict[int, list[Any]] = {}
    for e in cpu:
        by_id.setdefault(e.id, []).append(e)
    found = []
    for e in events:
        if e.device_type != DeviceType.CUDA or getattr(e, "is_user_annotation", False):
            continue
        calls = [c for c in by_id.get(e.id, []) if c.name.startswith("cu")]
        found.append((e, calls[0] if len(calls) == 1 else None))
    if found and all(owner is None for _, owner in found):
        raise RuntimeError(
            f"the profiler linked none of the step's {len(found)} device kernels to the runtime "
            "call that launched it, so attention's share cannot be measured on this torch build"
        )
    return found


def _self_and_ancestors(event: Any) -> list[Any]:
    chain = []
    while event is not None:
        chain.append(event)
        event = event.cpu_parent
    return chain


TOP_KERNELS = 12  # kernels a profiled step lists by name

# Device kernels by what they do, from their names: attention kernels (ATen's SDPA family,
# flash-attn, cuDNN, ours), GEMMs (cuBLAS, CUTLASS), copies (layout and gather/scatter work,
# memcpy/memset), reductions (norms, softmax), other pointwise work; Inductor's kernels below.
_KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "attention", "attn", "cudnn", "sdpa", "block_sparse")),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "matmul", "splitk")),
    (
        "copy",
        (
            "copy",
            "clone",
            "memcpy",
            "memset",
            "catarray",
            "gather",
            "scatter",
            "index",
            "transpose",
        ),
    ),
    ("reduction", ("reduce", "norm", "softmax")),
    ("pointwise", ("elementwise", "vectorized")),
)


KERNEL_KINDS = tuple(kind for kind, _ in _KERNEL_KINDS) + ("other",)


# Inductor names its kernels after the ops it fused (and the module paths they came from, so
# "attention" can name a norm): its prefixes decide first
_INDUCTOR_KINDS = (
    ("triton_tem_", "gemm"),
    ("triton_red_", "reduction"),
    ("triton_per_", "reduction"),
)
_LAYOUT_OPS = {"clone", "copy", "to", "view", "permute", "transpose", "cat", "slice", "unsqueeze"}


def kernel_kind(name: str) -> str:
    """What a device kernel does, judged by its name: one of attention, gemm, copy,
    reduction, pointwise, other."""
    lowered = name.lower()
    for prefix, kind in _INDUCTOR_KINDS:
        if lowered.startswith(prefix):
            return kind
    if lowered.startswith("triton_poi_"):
        fused = lowered.removeprefix("triton_poi_").removeprefix("fused_").split("_")
        ops = {op for op in fused if op and not op.isdigit()}
        return "copy" if ops <= _LAYOUT_OPS else "pointwise"
    for kind, words in _KERNEL_KINDS:
        if any(w in lowered for w in words):
            return kind
    return "other"


# ATen's attention ops (SDPA and the kernels it dispatches to: flash, efficient, cuDNN, math)
_KERNEL_WORDS = ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention")


def _is_attention_kernel(name: str) -> bool:
    return name.startswith("aten::") and any(w in name for w in _KERNEL_WORDS)


def _is_region(name: str) -> bool:
    return name.startswith("Torch-Compiled Region")


def _outermost(event: Any, match) -> list[Any]:
    """The outermost descendants of `event` whose name `match`es."""
    found = []
    for child in event.cpu_children:
        if match(child.name):
            found.append(child)
        else:
            found += _outermost(child, match)
    return found


def _kernel_name(event: Any) -> str:
    """The most specific attention op under `event` (SDPA's dispatch target when it has one)."""
    for child in event.cpu_children:
        if _is_attention_kernel(child.name):
            return _kernel_name(child)
    return event.name


def _inside(event: Any, name: str | None, match=None) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if match(parent.name) if match is not None else parent.name == name:
            return True
        parent = parent.cpu_parent
    return False


def _nan_max(a: float, b: float) -> float:
    return a if math.isnan(a) else b if math.isnan(b) else max(a, b)


def _nan_min(a: float, b: float) -> float:
    return a if math.isnan(a) else b if math.isnan(b) else min(a, b)
