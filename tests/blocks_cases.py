"""What the block-norm test files share: the device their tensors live on and whether the Triton
kernels run here (CUDA, or the CPU interpreter under ``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import os

import pytest
import torch

from normkit.backends import BackendError, get_backend

__all__ = ["BACKENDS", "DEVICE", "TRITON", "needs_triton"]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _triton_runs() -> bool:
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        return get_backend("triton").is_available()
    except BackendError:
        return False


TRITON = _triton_runs()
needs_triton = pytest.mark.skipif(not TRITON, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
BACKENDS = ["torch", "reference", pytest.param("triton", marks=needs_triton)]
