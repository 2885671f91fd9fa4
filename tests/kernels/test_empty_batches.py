"""The in-place fill of batch elements that keep no key (kernels/empty_batches.py), against
`torch.where`; under Triton's interpreter without CUDA."""

import pytest
import torch

from fv_compile.backends.kernels.empty_batches import fill_empty_batches

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("fill", ["zero", "nan", "per-batch"])
@pytest.mark.parametrize("empty", [[False, False, False], [False, True, False], [True, True, True]])
def test_only_the_empty_batch_elements_are_written(fill, empty):
    b, s, h, dv = 3, 37, 2, 16  # rows not a multiple of the kernel's block
    out = torch.randn(b, s, h, dv, device=DEVICE, dtype=torch.bfloat16)
    values = {
        "zero": torch.zeros(b, h, dv),
        "nan": torch.full((b, h, dv), float("nan")),
        "per-batch": torch.randn(b, h, dv),
    }[fill].to(DEVICE, torch.bfloat16)
    flags = torch.tensor(empty, device=DEVICE)
    want = torch.where(flags.view(b, 1, 1, 1), values[:, None], out)
    got = fill_empty_batches(out.clone(), flags, values)
    torch.testing.assert_close(got, want, equal_nan=True, atol=0, rtol=0)


def test_a_strided_output_is_refused():
    out = torch.zeros(2, 8, 2, 16, device=DEVICE).transpose(1, 2)
    with pytest.raises(ValueError, match="contiguous"):
        fill_empty_batches(out, torch.tensor([True, False], device=DEVICE), torch.zeros(2, 8, 16))
