"""torch's OpInfo samples of the norm functions (``common_methods_invocations.op_db``), run
through ``normkit.functional`` on every backend.

Each sample (input, positional and keyword arguments, as torch's own test suite calls
``torch.nn.functional.<op>``) is run by torch and by normkit in float64, float32 and bfloat16:
the output, the running statistics the call updates, and the gradients of every input that
requires one under a random upstream gradient must match torch's (bfloat16: judged against
torch in float64, at most twice torch's own bfloat16 error). Where torch raises for a sample,
normkit must raise the same exception with the same message. The samples are torch's: they
include negative eps, negative momentum and empty inputs nobody here would have written.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import normkit.functional as NF
from _outside import assert_same_error, assert_same_numbers, clone_tree, op_db, raised
from cases import BACKENDS, MUST_RUN, seed_of, skip_if_declined

OPS = ("batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm", "local_response_norm")
# torch's error samples for layer_norm live under native_layer_norm, whose arguments after the
# input are F.layer_norm's (normalized_shape, weight, bias, eps).
ERROR_SOURCES = {"nn.functional.group_norm": "group_norm", "nn.functional.rms_norm": "rms_norm",
                 "native_layer_norm": "layer_norm"}
DTYPES = (torch.float64, torch.float32, torch.bfloat16)


def _info(name: str) -> Any:
    return next(o for o in op_db() if o.name == name and o.variant_test_name == "")


def _key(obj: Any) -> Any:
    """What a sample is, without its random numbers (torch repeats some samples verbatim)."""
    if isinstance(obj, Tensor):
        return ("T", tuple(obj.shape), obj.requires_grad)
    if isinstance(obj, (tuple, list)):
        return tuple(_key(o) for o in obj)
    if isinstance(obj, dict):
        return tuple(sorted((k, _key(v)) for k, v in obj.items()))
    return obj


def _samples() -> list[Any]:
    torch.manual_seed(0)
    params = []
    for op in OPS:
        seen = set()
        for i, s in enumerate(_info(f"nn.functional.{op}").sample_inputs("cpu", torch.float64, requires_grad=True)):
            call = (s.input, tuple(s.args), dict(s.kwargs))
            if _key(call) in seen:
                continue
            seen.add(_key(call))
            for backend in BACKENDS:
                params.append(pytest.param(op, call, backend, id=f"{op}-{i}-{backend}"))
    return params


def _run(fn: Any, call: tuple[Any, ...], dtype: torch.dtype, **extra: Any) -> tuple[Any, Tensor | BaseException]:
    """``fn(input, *args, **kwargs)`` on a fresh copy of the sample in ``dtype``: the copy (whose
    tensors the call may have updated) and the result or the exception raised."""
    copy = clone_tree(call, dtype)
    x, args, kwargs = copy
    try:
        return copy, fn(x, *args, **kwargs, **extra)
    except Exception as e:  # noqa: BLE001 - compared with normkit's below
        return copy, e


def _tensors(call: Any) -> list[Tensor]:
    x, args, kwargs = call
    return [t for t in (x, *args, *kwargs.values()) if isinstance(t, Tensor)]


@pytest.mark.parametrize(("op", "call", "backend"), _samples())
@skip_if_declined
def test_opinfo_sample_matches_torch(op: str, call: tuple[Any, ...], backend: str) -> None:
    # triton declines float64; its bf16 kernels are fuzzed in test_fuzz.py (the interpreter is slow)
    for dtype in DTYPES if backend in MUST_RUN else (torch.float32,):
        _check(op, call, dtype, backend)


def _check(op: str, call: tuple[Any, ...], dtype: torch.dtype, backend: str) -> None:
    theirs_call, expected = _run(getattr(F, op), call, dtype)
    ours_call, actual = _run(getattr(NF, op), call, dtype, backend=backend)
    if isinstance(expected, BaseException):
        if dtype != torch.float64 and not isinstance(actual, BaseException):
            return  # torch lacks a low-precision CPU kernel (local_response_norm bf16 5-D): no baseline
        assert_same_error(expected, actual if isinstance(actual, BaseException) else None, f"{op} ({dtype})")
        return
    if isinstance(actual, BaseException):
        raise actual
    reference_call, reference = (None, None)
    if dtype != torch.float64:
        reference_call, reference = _run(getattr(F, op), call, torch.float64)
    what = f"{op} ({dtype})"
    assert_same_numbers(actual, expected, reference, dtype, f"{what}: output")
    # the running statistics (and any other tensor the call writes to) after the call
    for i, (a, e) in enumerate(zip(_tensors(ours_call), _tensors(theirs_call))):
        if not e.requires_grad:
            ref = None if reference_call is None else _tensors(reference_call)[i]
            assert_same_numbers(a, e, ref, dtype, f"{what}: argument {i} after the call")
    if not expected.requires_grad:
        return
    gen = torch.Generator().manual_seed(seed_of("opinfo dy", op))
    dy = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    expected.backward(dy.to(dtype))
    actual.backward(dy.to(dtype))
    if reference is not None:
        reference.backward(dy)
    for i, (a, e) in enumerate(zip(_tensors(ours_call), _tensors(theirs_call))):
        if e.requires_grad:
            ref = None if reference_call is None else _tensors(reference_call)[i].grad
            assert_same_numbers(a.grad, e.grad, ref, dtype, f"{what}: gradient of argument {i}")


def _error_samples() -> list[Any]:
    params = []
    for source, op in ERROR_SOURCES.items():
        for i, e in enumerate(_info(source).error_inputs("cpu")):
            s = e.sample_input
            for backend in BACKENDS:
                params.append(pytest.param(op, (s.input, tuple(s.args), dict(s.kwargs)), backend,
                                           id=f"{op}-{i}-{backend}"))
    return params


@pytest.mark.parametrize(("op", "call", "backend"), _error_samples())
def test_opinfo_error_sample_raises_torchs_error(op: str, call: tuple[Any, ...], backend: str) -> None:
    x, args, kwargs = call
    theirs = raised(lambda: getattr(F, op)(*clone_tree((x, *args)), **kwargs))
    assert theirs is not None, f"torch's error sample {op} does not raise"
    ours = raised(lambda: getattr(NF, op)(*clone_tree((x, *args)), **kwargs, backend=backend))
    assert_same_error(theirs, ours, op)
