"""What every llmx Triton kernel module needs: the optional Triton import, and whether a kernel can run.

TRITON_INTERPRET is read once, here, at import: @triton.jit binds to the interpreter only if the variable
was set before the kernel modules are imported (tests set it in conftest before importing them).
"""

from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch references need no Triton
    triton = None
    tl = None


def triton_available(device) -> bool:
    """Whether a Triton kernel can run on ``device``: CUDA with Triton, or CPU in the interpreter."""
    if triton is None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return INTERPRET and device.type == "cpu"
