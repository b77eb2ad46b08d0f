"""Testing a normalization kernel against an exact oracle: the bound normkit's own tests,
``normkit check`` and the Triton kernel tests use, for your kernels too.

A low-precision kernel cannot match a float64 result exactly, and a fixed tolerance is either
too loose for one shape or too tight for another. The bound here calibrates itself (flash-attn's
test of its kernels): run the same call three ways,

- ``candidate``: the kernel under test, in the precision under test;
- ``reference``: the exact answer, the same call in float64 (torch's op in float64, or
  ``normkit.reference`` where torch has no such op);
- ``baseline``: an established implementation (torch's op) in the precision under test,

and require::

    max|candidate - reference| <= factor * max|baseline - reference| + atol * max(1, max|reference|)

that is, the kernel may be as inexact as torch in that precision, ``factor`` times over, plus a
floor of ``atol`` per unit of the result's magnitude for elements where torch happens to round
exactly and the kernel the other way. :data:`TOLERANCES` holds ``factor`` and ``atol`` per dtype,
each with the reason for its number; it is the only table of tolerances in normkit.

Example: a hand-written RMSNorm, checked in bfloat16 against torch, with random weights and a
random upstream gradient (unit weights and ``y.sum().backward()`` make the input gradient
identically zero, and the test would assert nothing)::

    import torch
    from normkit.testing import assert_within_bound

    def my_rms_norm(x, w, eps=1e-6):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps) * w).to(x.dtype)

    x = torch.randn(64, 1000, dtype=torch.float64)
    w = torch.randn(1000, dtype=torch.float64)
    dy = torch.randn(64, 1000, dtype=torch.float64)

    def run(fn, dtype):
        xs, ws = x.to(dtype).detach().requires_grad_(), w.to(dtype).detach().requires_grad_()
        y = fn(xs, ws)
        y.backward(dy.to(dtype))
        return {"y": y, "dx": xs.grad, "dw": ws.grad}

    torch_rms = lambda x, w: torch.nn.functional.rms_norm(x, x.shape[-1:], w, 1e-6)
    assert_within_bound(run(my_rms_norm, torch.bfloat16),       # candidate
                        run(torch_rms, torch.float64),           # reference
                        run(torch_rms, torch.bfloat16))          # baseline

:func:`assert_close_to_reference` is the one-tensor form normkit's tests use (float32 and
float64 results are compared with torch's directly, low precision by the bound), and
:func:`bound` returns the numbers without asserting (``normkit check`` prints them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "LOW_PRECISION",
    "TOLERANCES",
    "Bound",
    "Tolerance",
    "assert_close_to_reference",
    "assert_within_bound",
    "bound",
    "max_error",
]

LOW_PRECISION: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)


class Tolerance(NamedTuple):
    """``rtol``/``atol`` for a direct comparison with torch (``torch.testing.assert_close``), and
    the self-calibrating bound ``factor * err(baseline) + atol * max(1, max|reference|)``
    (``factor`` 0: no baseline, the floor alone). ``reason`` says where the numbers come from."""

    rtol: float
    atol: float
    reason: str
    factor: float = 2.0


TOLERANCES: dict[Any, Tolerance] = {
    torch.float64: Tolerance(
        1e-10, 1e-10,
        "float64 against torch float64: only summation order differs, ~1e-15 relative per op; "
        "1e-10 leaves room for sums over thousands of elements and still catches any formula "
        "error (a wrong eps, biased vs unbiased variance, a missing term) by many orders.",
    ),
    torch.float32: Tolerance(
        2e-5, 2e-5,
        "float32 against torch float32: ATen reduces with vectorized/Welford sums, the reference "
        "two-pass, a kernel in tiles; each is within ~log2(N) * 6e-8 relative of the truth, so a "
        "few 1e-6 apart for N up to 4099 and gradients that are sums over the batch, and on tiny "
        "rows or batches torch's own error is ~0 and calibrates nothing. 2e-5 is ~100x that, still "
        "far below any real bug (a wrong variance estimator shifts results by 1/N >= 2.4e-4).",
    ),
    torch.bfloat16: Tolerance(
        0.0, 2.0**-7,
        "bfloat16 against float64: at most twice torch's own bf16 error (flash-attn's bound), plus "
        "one bf16 ulp (eps = 2^-7) at the magnitude of the result, for the elements torch happens "
        "to round exactly where the candidate rounds the other way.",
    ),
    torch.float16: Tolerance(
        0.0, 2.0**-10,
        "float16 against float64: at most twice torch's own fp16 error, plus one fp16 ulp "
        "(eps = 2^-10) at the magnitude of the result.",
    ),
    "no_baseline": Tolerance(
        0.0, 2.0,
        "low precision where torch itself cannot run the call on the CPU (local_response_norm of "
        "bf16/fp16 4-D/5-D input: no avg_pool3d kernel): a result computed in fp32 and rounded once "
        "is within half an ulp; allow atol ulps (eps(dtype) each) at the magnitude of the result.",
        factor=0.0,
    ),
    "oracle": Tolerance(
        1e-10, 1e-10,
        "normkit.reference in float64 against torch in float64: two independent exact-arithmetic "
        "oracles must agree to float64 rounding, or one of them is wrong.",
        factor=0.0,
    ),
    "seed_printed": Tolerance(
        0.0, 1e-4,
        "a tutorial's printed output has 4 decimals (rounding error <= 5e-5) of a float32 computation.",
        factor=0.0,
    ),
    "seed_printed_input": Tolerance(
        0.0, 1e-3,
        "seed 003 prints its random input with 4 decimals too; re-feeding the printed input moves "
        "the output by up to |weight| / std * 5e-5 * (1 + 1/sqrt(N)) plus the output's own rounding.",
        factor=0.0,
    ),
    "seed_allclose": Tolerance(
        1e-5, 1e-6,
        "seed 001 compares its from-scratch models with torch.allclose(..., atol=1e-6) and the "
        "default rtol=1e-5, and prints True.",
        factor=0.0,
    ),
    "seed_allclose_grad": Tolerance(
        1e-5, 1e-5,
        "gradients of seed 001's from-scratch models (autograd through mean/var in float32) against "
        "normkit's: outputs are O(1) and gradients O(1) sums, float32 rounding ~1e-6.",
        factor=0.0,
    ),
}


class Bound(NamedTuple):
    """One quantity judged by the bound: the candidate's error against the reference, the
    baseline's, and the bound itself (``ok`` when ``error <= limit``)."""

    error: float
    baseline_error: float
    limit: float

    @property
    def ok(self) -> bool:
        return self.error <= self.limit

    @property
    def ratio(self) -> float:
        """``error / limit``: the quantity closest to its bound has the largest ratio."""
        return self.error / self.limit if self.limit > 0 else (0.0 if self.error == 0 else float("inf"))


def max_error(a: Tensor, b: Tensor) -> float:
    """``max|a - b|`` in float64; 0 for empty tensors."""
    return (a.detach().double() - b.detach().double()).abs().max().item() if a.numel() else 0.0


def bound(candidate: Tensor, reference: Tensor, baseline: Tensor | None, dtype: torch.dtype | None = None) -> Bound:
    """The self-calibrating bound of ``candidate`` (computed in ``dtype``, default its own) against
    the float64 ``reference``, calibrated by ``baseline`` (torch in ``dtype``; ``None`` where
    torch cannot run the call: the ``"no_baseline"`` row, in ulps of ``dtype``)."""
    dtype = dtype or candidate.dtype
    scale = max(1.0, reference.detach().abs().max().item()) if reference.numel() else 1.0
    error = max_error(candidate, reference)
    if baseline is None:
        tol = TOLERANCES["no_baseline"]
        return Bound(error, 0.0, tol.atol * torch.finfo(dtype).eps * scale)
    tol = TOLERANCES[dtype]
    baseline_error = max_error(baseline, reference)
    return Bound(error, baseline_error, tol.factor * baseline_error + tol.atol * scale)


def assert_within_bound(candidate: Mapping[str, Tensor], reference: Mapping[str, Tensor],
                        baseline: Mapping[str, Tensor]) -> None:
    """Every named result of ``candidate`` has ``baseline``'s dtype, ``reference``'s shape, and
    stays within :func:`bound` (the names: outputs and gradients, e.g. ``"y"``, ``"dx"``)."""
    assert candidate.keys() == reference.keys(), f"results {sorted(candidate)} != reference's {sorted(reference)}"
    for name, ref in reference.items():
        got, low = candidate[name], baseline[name]
        assert (got.dtype, got.shape) == (low.dtype, ref.shape), (
            f"{name}: {got.dtype} {tuple(got.shape)}, expected {low.dtype} {tuple(ref.shape)}")
        b = bound(got, ref, low)
        assert b.ok, (f"{name}: error {b.error:.3g} vs float64 > bound {b.limit:.3g} "
                      f"(baseline in {low.dtype}: {b.baseline_error:.3g})")


def assert_close_to_reference(
    actual: Tensor,
    expected: Tensor | None,
    reference: Tensor | None = None,
    *,
    dtype: torch.dtype | None = None,
    name: str = "",
) -> None:
    """Judge ``actual`` (computed in ``dtype``, default ``actual.dtype``) by :data:`TOLERANCES`.

    ``expected`` is torch's result for the same call in the same dtype, or ``None`` where torch
    cannot run it; ``reference`` the same call in float64 (needed for low precision). Pass the
    input's dtype as ``dtype`` for float32 weight gradients of a bf16 input.

    float64/float32: ``actual`` equals ``expected`` within ``TOLERANCES[dtype]``'s rtol/atol.
    bf16/fp16: :func:`bound` against ``reference`` with ``expected`` as the baseline.
    Integer tensors (``num_batches_tracked``): exactly equal.
    """
    dtype = dtype or actual.dtype
    label = f"{name} ({dtype})" if name else str(dtype)
    if expected is not None:
        assert actual.shape == expected.shape, \
            f"{label}: shape {tuple(actual.shape)} != torch's {tuple(expected.shape)}"
        assert actual.dtype == expected.dtype, f"{label}: dtype {actual.dtype} != torch's {expected.dtype}"
    if not dtype.is_floating_point:
        assert expected is not None and torch.equal(actual, expected), f"{label}: {actual} != torch's {expected}"
        return
    if dtype not in LOW_PRECISION:
        if expected is None:
            raise ValueError(f"{label}: a {dtype} result is compared with torch's; got expected=None")
        tol = TOLERANCES[dtype]
        torch.testing.assert_close(actual, expected, rtol=tol.rtol, atol=tol.atol, msg=lambda m: f"{label}: {m}")
        return
    if reference is None:
        raise ValueError(f"{label}: low precision is judged against a float64 reference; got reference=None")
    assert actual.shape == reference.shape, \
        f"{label}: shape {tuple(actual.shape)} != reference {tuple(reference.shape)}"
    b = bound(actual, reference, expected, dtype)
    how = ("no torch baseline" if expected is None
           else f"{TOLERANCES[dtype].factor:g} * torch's error {b.baseline_error:.3g} + floor")
    assert b.ok, f"{label}: max abs error {b.error:.3g} vs float64 exceeds {b.limit:.3g} ({how})"
