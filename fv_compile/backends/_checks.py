"""What the kernel backends' support checks share."""

from __future__ import annotations

import os


def interpreting() -> bool:
    """Whether Triton kernels run in its interpreter (`TRITON_INTERPRET=1`): on the CPU too."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
