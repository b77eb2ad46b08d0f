"""Helpers for the tests that run material nobody on this project wrote: torch's ``module_db``
and OpInfo samples, hypothesis strategies, and the tooling matrix.

torch's test database (``torch.testing._internal``) imports ``expecttest`` at module level only
to subclass its ``TestCase``; nothing these tests read touches it. Where ``expecttest`` is not
installed, a stand-in with the one name it needs is put in ``sys.modules`` before the import, so
the suite does not gain a dependency for an unused base class.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import types
import unittest
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

import normkit
from cases import LOW_PRECISION, TOLERANCES, assert_close_to_reference
from kernel_bound import ATOL

__all__ = [
    "NUMBA_ATTACK_MARKS",
    "assert_same_error",
    "assert_same_numbers",
    "clone_tree",
    "module_db",
    "op_db",
    "raised",
]

# The marks of an outside attack on the numba backend: skipped without numba; jit.trace's
# warnings and torch's user warnings are the attacked calls' own, not the test's.
NUMBA_ATTACK_MARKS = [
    pytest.mark.skipif("numba" not in normkit.backends(), reason="numba backend not registered"),
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


def _import_torch_testing() -> None:
    if "expecttest" not in sys.modules and importlib.util.find_spec("expecttest") is None:
        stand_in = types.ModuleType("expecttest")
        stand_in.TestCase = unittest.TestCase  # type: ignore[attr-defined]
        stand_in.ACCEPT = False  # type: ignore[attr-defined]
        sys.modules["expecttest"] = stand_in


@functools.cache
def module_db() -> list[Any]:
    """torch's ``ModuleInfo`` database (imported once: it takes ~2 s)."""
    _import_torch_testing()
    from torch.testing._internal.common_modules import module_db as db

    return list(db)


@functools.cache
def op_db() -> list[Any]:
    """torch's ``OpInfo`` database."""
    _import_torch_testing()
    from torch.testing._internal.common_methods_invocations import op_db as db

    return list(db)


def clone_tree(obj: Any, dtype: torch.dtype | None = None) -> Any:
    """A deep copy of the tensors in ``obj`` (tuples, lists, dicts), each a fresh leaf that keeps
    ``requires_grad``, cast to ``dtype`` when given (floating tensors only)."""
    if isinstance(obj, Tensor):
        t = obj.detach().clone()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.requires_grad_(obj.requires_grad)
    if isinstance(obj, tuple):
        return tuple(clone_tree(o, dtype) for o in obj)
    if isinstance(obj, list):
        return [clone_tree(o, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: clone_tree(v, dtype) for k, v in obj.items()}
    return obj


def raised(fn: Callable[[], Any]) -> BaseException | None:
    """The exception ``fn()`` raises, or None."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the point is to compare whatever is raised
        return e
    return None


def assert_same_error(theirs: BaseException, ours: BaseException | None, what: str) -> None:
    """normkit raised what torch raised: the same type and the same message."""
    assert ours is not None, f"{what}: torch raises {type(theirs).__name__}({theirs}), normkit raises nothing"
    assert type(ours) is type(theirs) and str(ours) == str(theirs), (
        f"{what}: torch raises {type(theirs).__name__}({theirs!s}); normkit raises {type(ours).__name__}({ours!s})"
    )


def assert_same_numbers(actual: Tensor | None, expected: Tensor | None, reference: Tensor | None,
                        dtype: torch.dtype, what: str, *, undefined_free: bool = False) -> None:
    """``actual`` (normkit in ``dtype``) against torch's ``expected`` in the same dtype, by the
    table of tolerances; low precision against the float64 ``reference`` with the 2x-torch-error
    bound; float32 results that differ from torch's are judged by that bound too (when given a
    reference). NaN where torch has NaN (OpInfo samples include eps < 0) counts as equal; where
    torch overflows and float64 does not, normkit may overflow too or be right.

    ``undefined_free``: elements where torch's result (or the float64 one) is not finite are
    not judged at all. For eps=0 on a zero-variance group the formula is 0/0: torch gives NaN,
    a kernel may give its limit (the bias); neither is wrong."""
    if expected is None and actual is None:
        return
    assert actual is not None and expected is not None, \
        f"{what}: normkit gives {actual is not None}, torch {expected is not None}"
    if undefined_free and actual.is_floating_point():
        defined = expected.isfinite() & (True if reference is None else reference.isfinite())
        actual, expected, reference = (None if t is None else t[defined] for t in (actual, expected, reference))
    if reference is not None and actual.is_floating_point() and not expected.isfinite().all():
        # torch overflows where the truth is finite (float32 squares of |x| ~ 1e20): normkit may
        # overflow as torch does, or be right. With no torch error to calibrate against, right
        # is 8 ulps of the magnitude (a bf16 weight gradient summing a few dozen rounded terms
        # is ~2 ulps off), far below the O(1) error of a wrong value. The bound applies to the rest.
        torch_failed = ~expected.isfinite() & reference.isfinite()
        a, r = actual[torch_failed].detach().double(), reference[torch_failed].detach().double()
        right = a.isfinite()
        scale = max(1.0, float(r.abs().max())) if r.numel() else 1.0
        bound = max(8 * torch.finfo(dtype).eps, ATOL.get(dtype, 0.0)) * scale
        assert bool(((a[right] - r[right]).abs() <= bound).all()), f"{what}: wrong where torch overflows"
        keep = ~torch_failed
        actual, expected, reference = (t[keep] for t in (actual, expected, reference))
    if dtype in LOW_PRECISION:
        if reference is not None and not reference.isfinite().all():
            # NaN/inf in the float64 result (eps=0 on a constant input): the same elements must
            # be non-finite in normkit's (NaN or inf: 0/0 against x/0 is rounding, not a defect);
            # the bound applies to the rest.
            bad = ~reference.isfinite()
            assert torch.equal(~actual.isfinite(), bad), f"{what}: non-finite elements differ from float64's"
            actual, expected, reference = (None if t is None else t[~bad] for t in (actual, expected, reference))
        assert_close_to_reference(actual, expected, reference, dtype=dtype, name=what)
        return
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        f"{what}: normkit {tuple(actual.shape)} {actual.dtype}, torch {tuple(expected.shape)} {expected.dtype}"
    )
    if not actual.is_floating_point():
        assert torch.equal(actual, expected), f"{what}: {actual} != torch's {expected}"
        return
    tol = TOLERANCES[dtype]
    error = raised(lambda: torch.testing.assert_close(actual, expected, rtol=tol.rtol, atol=tol.atol, equal_nan=True,
                                                      msg=lambda m: f"{what}: {m}"))
    if error is None:
        return
    if reference is None or not reference.isfinite().all():
        raise error
    # Far from torch's float32 can still be closer to the truth: torch's float32 input gradient
    # of a one-element layer_norm is 6e-5, the exact value 0. Judge by float64 then.
    ref = reference.detach().double()
    err, err_torch = (float((t.detach().double() - ref).abs().max()) for t in (actual, expected))
    bound = 2 * err_torch + ATOL.get(dtype, tol.atol) * max(1.0, float(ref.abs().max()))
    assert err <= bound, f"{error}\nand vs float64: error {err:.3g} > {bound:.3g} (torch's error {err_torch:.3g})"
