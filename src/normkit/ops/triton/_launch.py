"""Host-side helpers shared by the Triton launchers (row norms and BatchNorm)."""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

__all__ = ["BLOCK_ENV_VAR", "block_override", "device_of", "interpreted", "strides"]

# Caps a launcher's tile, in elements (a power of two): how the tests reach the chunked paths
# and many programs with small shapes. Read at each launch; ``block_n=`` on a launcher wins.
BLOCK_ENV_VAR = "NORMKIT_TRITON_BLOCK_N"


def block_override(block_n: int | None) -> int | None:
    """``block_n``, else ``$NORMKIT_TRITON_BLOCK_N``, else None; checked to be a power of two."""
    if block_n is None and os.environ.get(BLOCK_ENV_VAR):
        block_n = int(os.environ[BLOCK_ENV_VAR])
    if block_n is not None and (block_n < 1 or block_n & (block_n - 1)):
        raise ValueError(f"block_n must be a power of two >= 1, got {block_n}")
    return block_n


def device_of(t: Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def interpreted() -> bool:
    """Running under Triton's CPU interpreter (see ``_cast_to`` in the kernels)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def strides(t3: Tensor) -> tuple[int, int, int]:
    """The strides of an ``(N, C, S)`` view, as the kernels take them."""
    return t3.stride(0), t3.stride(1), t3.stride(2)
