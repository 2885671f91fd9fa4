"""Split a backend's metadata into graph inputs (tensors) and a graph-variant key (the rest).

Tensors of the metadata enter the compiled graph as inputs, so new values never recompile.
Everything else (ints, floats, strings, the structure itself) is a static key: each distinct key
selects a graph variant compiled once and cached. `current_timestep` is the exception that keeps a
denoising loop on one variant: it travels as a 0-d int64 tensor.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from fv_compile.errors import FvCompileTypeError


class _TensorSlot:
    def __repr__(self) -> str:
        return "<tensor>"


_TENSOR = _TensorSlot()


@dataclass(frozen=True)
class MetadataLayout:
    """Everything about a metadata object except its tensors; hashable, and the variant key."""

    cls: type
    spec_repr: str
    static_leaves: tuple[Any, ...]
    spec: Any = dataclasses.field(compare=False, hash=False, repr=False)
    field_names: tuple[str, ...] = dataclasses.field(compare=False, hash=False, repr=False)

    def rebuild(self, tensors: list[torch.Tensor]) -> Any:
        it = iter(tensors)
        leaves = [next(it) if leaf is _TENSOR else leaf for leaf in self.static_leaves]
        fields = pytree.tree_unflatten(leaves, self.spec)
        init = {f.name for f in dataclasses.fields(self.cls) if f.init}
        obj = self.cls(**{k: v for k, v in fields.items() if k in init})
        for k, v in fields.items():
            if k not in init:
                object.__setattr__(obj, k, v)
        return obj

    def tensor_fields(self) -> dict[str, int]:
        """The fields that hold a tensor themselves, each with its index among the tensors."""
        slots: list[Any] = []
        count = 0
        for leaf in self.static_leaves:
            if leaf is _TENSOR:
                slots.append(_Slot(count))
                count += 1
            else:
                slots.append(leaf)
        fields = pytree.tree_unflatten(slots, self.spec)
        return {k: v.index for k, v in fields.items() if isinstance(v, _Slot)}


@dataclass(frozen=True)
class _Slot:
    index: int


def flatten_metadata(md: Any, device: torch.device) -> tuple[MetadataLayout, list[torch.Tensor]]:
    """`(layout, tensors)` for a dataclass metadata object."""
    if not dataclasses.is_dataclass(md) or isinstance(md, type):
        raise FvCompileTypeError(
            f"attention metadata must be a dataclass instance (got {type(md).__name__}); "
            "subclass fv_compile.AttentionMetadata with @dataclass"
        )
    fields = {f.name: getattr(md, f.name) for f in dataclasses.fields(md)}
    if isinstance(fields.get("current_timestep"), int):
        fields["current_timestep"] = torch.tensor(fields["current_timestep"], device=device)
    leaves, spec = pytree.tree_flatten(fields)
    tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    static = tuple(_TENSOR if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves)
    for leaf in static:
        try:
            hash(leaf)
        except TypeError:
            raise FvCompileTypeError(
                f"{type(md).__name__} holds an unhashable {type(leaf).__name__}; metadata fields "
                "must be tensors or hashable values (ints, floats, strings, tuples)"
            ) from None
    layout = MetadataLayout(type(md), repr(spec), static, spec, tuple(fields))
    return layout, tensors
