"""The options a user types: `torch.compile(backend="fv_compile", options={...})` and
`fv_compile.compile(..., options=...)` check their keys, naming fv_compile's own."""

import pytest
import torch
import torch.nn.functional as F

import fv_compile
from fv_compile import FvCompileError


class Attention(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def _qkv():
    return [torch.randn(1, 2, 8, 16) for _ in range(3)]


def test_torch_compile_with_a_misspelt_option_lists_fv_compiles_own_keys():
    compiled = torch.compile(
        Attention(), backend="fv_compile", options={"attention_backnd": "TORCH_SDPA"}
    )
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as info:
        compiled(*_qkv())
    message = str(info.value)
    assert (
        "unknown option 'attention_backnd'" in message
        and "(did you mean 'attention_backend'?)" in message
    )
    assert "fv_compile's own options are attention_backend, compiler, strict" in message
    assert isinstance(info.value.inner_exception, FvCompileError)


def test_torch_compile_takes_fv_compiles_keys_and_inductors():
    options = {"attention_backend": "TORCH_SDPA", "compiler": "eager", "max-autotune": False}
    compiled = torch.compile(Attention(), backend="fv_compile", options=options)
    q, k, v = _qkv()
    torch.testing.assert_close(compiled(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_fv_compile_compile_rejects_a_misspelt_inductor_option_at_compile():
    with pytest.raises(
        FvCompileError,
        match=r"unknown option 'triton\.cudagraph' .*did you mean 'triton\.cudagraphs'",
    ):
        fv_compile.compile(Attention(), options={"triton.cudagraph": True})


def test_fv_compile_compile_points_its_own_settings_in_options_to_the_arguments():
    with pytest.raises(FvCompileError, match=r"fv_compile\.compile\(model, strict=\.\.\.\)"):
        fv_compile.compile(Attention(), options={"strict": True})
