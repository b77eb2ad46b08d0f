"""The accuracy bound of every Triton kernel test: :func:`normkit.testing.assert_within_bound`
(STYLE.md's self-calibrating bound), the kernel's error against the float64 oracle at most
twice the error of torch run in the case's own precision, plus the table's floor times
``max(1, |oracle|)``. ``ATOL`` is that floor per dtype, read from :data:`normkit.testing.TOLERANCES`."""

from __future__ import annotations

import torch

from normkit.testing import TOLERANCES, assert_within_bound

__all__ = ["ATOL", "assert_within_bound"]

ATOL: dict[torch.dtype, float] = {
    dtype: TOLERANCES[dtype].atol for dtype in (torch.float32, torch.bfloat16, torch.float16)
}
