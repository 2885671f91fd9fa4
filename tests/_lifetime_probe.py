"""Run by tests/test_lifetimes.py in a fresh process: compile 200 small models one after the
other and print, as JSON, what of them is still alive."""

import gc
import json
import weakref

import torch
import torch.nn.functional as F

import fv_compile
from fv_compile import ops


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.qkv(x).view(1, 8, 3, 2, 8).transpose(1, 3).unbind(2)
        return x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, 8, 16)


class Blocks(torch.nn.Module):
    """Regionally compiled by default: its blocks hold all of its weights."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block() for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


impls: list[weakref.ref] = []
site_ids: list[int] = []
_register = ops.SiteOwner.register_site


def _spy(owner, impl, *args, **kwargs):
    impls.append(weakref.ref(impl))
    site_ids.append(_register(owner, impl, *args, **kwargs))
    return site_ids[-1]


ops.SiteOwner.register_site = _spy


def one_model(i: int, x: torch.Tensor, models: list[weakref.ref]) -> None:
    model = (Blocks() if i % 2 else Block()).eval()
    models.append(weakref.ref(model))
    cm = fv_compile.compile(model, "TORCH_SDPA", compiler="eager")
    with torch.no_grad():
        torch.testing.assert_close(cm(x), model(x))
    if i % 10 == 0:
        fv_compile.explain(model, x)


def count(type_name: str) -> int:
    return sum(type(o).__name__ == type_name for o in gc.get_objects())


def main() -> None:
    x = torch.randn(1, 8, 16)
    models: list[weakref.ref] = []
    for i in range(80):  # warm up: Dynamo's bounded caches (its last 64 compile records) fill
        one_model(i, x, models)
    gc.collect()
    objects, guards = len(gc.get_objects()), count("CheckFunctionManager")
    for i in range(80, 200):
        one_model(i, x, models)
    gc.collect()
    print(
        json.dumps(
            {
                "sites": len(site_ids),
                "impls_alive": sum(r() is not None for r in impls),
                "models_alive": sum(m() is not None for m in models),
                "sites_registered": len(set(site_ids) & set(ops._SITES)),
                "guard_managers_added": count("CheckFunctionManager") - guards,
                "objects_per_compile": (len(gc.get_objects()) - objects) / 120,
            }
        )
    )


if __name__ == "__main__":
    main()
