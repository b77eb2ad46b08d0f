"""The accuracy bound of every Triton kernel test (STYLE.md's self-calibrating bound): the
kernel's error against the float64 oracle may be at most twice the error of torch run in the
case's own precision, plus ``ATOL[dtype]`` times ``max(1, |oracle|)``."""

from __future__ import annotations

import torch

__all__ = ["ATOL", "assert_within_bound"]

f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16

ATOL = {
    f32: 1e-5,  # summation order differs from ATen's; on tiny rows/batches ATen's own error is ~0
    # Half an ulp of the low-precision output at its largest magnitude (2**-8 relative for bf16,
    # 2**-11 for fp16): kernel and torch round nearly the same fp32 value, and a rounding that
    # goes the other way on the largest element need not coincide with torch's largest error.
    bf16: 2**-8,
    f16: 2**-11,
}


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_within_bound(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                        low: dict[str, torch.Tensor]) -> None:
    """``got`` (kernel), ``want`` (float64 oracle) and ``low`` (torch in the case's precision):
    the same results by name, each kernel result of torch's dtype and the oracle's shape and
    within the bound."""
    assert got.keys() == want.keys()
    for name, oracle in want.items():
        kernel, torch_low = got[name], low[name]
        assert (kernel.dtype, kernel.shape) == (torch_low.dtype, oracle.shape), name
        bound = 2 * _err(torch_low, oracle) + ATOL[torch_low.dtype] * max(1.0, oracle.abs().max().item())
        assert _err(kernel, oracle) <= bound, (
            f"{name}: error {_err(kernel, oracle):.3g} vs float64 > bound {bound:.3g} "
            f"(torch in {torch_low.dtype}: {_err(torch_low, oracle):.3g})"
        )
