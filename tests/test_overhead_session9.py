"""The add-norms' ordinary call on the default path (issue 12) changes nothing but its time.

``add_layer_norm`` / ``add_rms_norm`` skip their checks and ``_dispatch`` where
:func:`normkit._checks.plain_add` says the call is the ordinary one and "auto" is settled by
``x`` alone; the torch backend then runs its form for that call (:attr:`OpImpl.plain`:
``x + residual`` and ATen's norm, no casts). Here: ``plain_add`` answers yes exactly for the
cases it claims; every other call still takes the checks and the general function; the plain
form gives the general form's bits, values and gradients (random weights, random upstream
gradients); ATen's ``eps=None`` is the policy's default, as the plain RMS form assumes; a
backend that may claim the input, a named backend, a use_backend block and inference tensors
keep their routes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import normkit
import normkit.functional as NF
from cases import seed_of
from normkit import _checks, numerics
from normkit.backends import _REGISTRY, AUTO_ORDER, ENV_VAR, Backend, OpImpl

F64 = torch.float64
OPS = ("add_rms_norm", "add_layer_norm")


@pytest.fixture(autouse=True)
def _default_route(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)


def _randn(*shape: int, seed: object, dtype: torch.dtype = torch.float32) -> Tensor:
    generator = torch.Generator().manual_seed(seed_of(str(seed)))
    return torch.randn(shape, generator=generator).to(dtype)


class _Sub(Tensor):
    """A tensor subclass that overrides nothing (still not an exact type)."""


_x, _r = _randn(4, 8, seed="x"), _randn(4, 8, seed="r")
_w, _b = _randn(8, seed="w"), _randn(8, seed="b")

# name -> (x, residual, normalized_shape, weight, bias, eps, residual_dtype), ordinary?
CASES: dict[str, tuple[tuple[Any, ...], bool]] = {
    "ordinary": ((_x, _r, (8,), _w, _b, 1e-5, None), True),
    "no residual": ((_x, None, (8,), _w, _b, 1e-5, None), True),
    "no parameters": ((_x, _r, (8,), None, None, 1e-5, None), True),
    "parameters": ((_x, _r, (8,), nn.Parameter(_w), nn.Parameter(_b), 1e-5, None), True),
    "bfloat16": ((_x.bfloat16(), _r.bfloat16(), (8,), _w.bfloat16(), _b.bfloat16(), 1e-5, None), True),
    "two trailing dims": ((_x, _r, (4, 8), _randn(4, 8, seed="w2"), None, 1e-5, None), True),
    "3-D": ((_x[None], _r[None], (8,), _w, _b, 1e-5, None), True),
    "non-contiguous x": ((_x.t().contiguous().t(), _r, (8,), _w, _b, 1e-5, None), True),
    "residual_dtype its own": ((_x, _r, (8,), _w, _b, 1e-5, torch.float32), False),
    "residual_dtype float64": ((_x, _r, (8,), _w, _b, 1e-5, F64), False),
    "residual float64": ((_x, _r.double(), (8,), _w, _b, 1e-5, None), False),
    "residual broadcast": ((_x, _r[:1], (8,), _w, _b, 1e-5, None), False),
    "residual subclass": ((_x, _r.as_subclass(_Sub), (8,), _w, _b, 1e-5, None), False),
    "residual list": ((_x, [1.0] * 8, (8,), _w, _b, 1e-5, None), False),
    "x subclass": ((_x.as_subclass(_Sub), _r, (8,), _w, _b, 1e-5, None), False),
    "x int": ((_x.long(), _r.long(), (8,), None, None, 1e-5, None), False),
    "shape list": ((_x, _r, [8], _w, _b, 1e-5, None), True),  # (a list or torch.Size: ordinary, 4a78479)
    "shape Size": ((_x, _r, torch.Size([8]), _w, _b, 1e-5, None), True),
    "shape list of a wrong length": ((_x, _r, [4, 8], _w, _b, 1e-5, None), False),
    "shape int": ((_x, _r, 8, _w, _b, 1e-5, None), False),
    "shape empty": ((_x, _r, (), None, None, 1e-5, None), False),
    "shape of a tensor": ((_x, _r, (torch.tensor(8),), _w, _b, 1e-5, None), False),
    "shape wrong": ((_x, _r, (4,), None, None, 1e-5, None), False),
    "shape longer than x": ((_x[0], _r[0], (4, 8), None, None, 1e-5, None), False),
    "eps int": ((_x, _r, (8,), _w, _b, 1, None), False),
    "eps None": ((_x, _r, (8,), _w, _b, None, None), False),  # (add_rms_norm's default: ordinary there)
    "weight float64": ((_x, _r, (8,), _w.double(), _b, 1e-5, None), False),
    "weight wrong shape": ((_x, _r, (8,), _w[:4], _b, 1e-5, None), False),
    "weight meta": ((_x, _r, (8,), _w.to("meta"), _b, 1e-5, None), False),
    "bias float64": ((_x, _r, (8,), _w, _b.double(), 1e-5, None), False),
    "bias meta": ((_x, _r, (8,), _w, _b.to("meta"), 1e-5, None), False),
}


def _call(op: str, args: tuple[Any, ...], **options: Any) -> Any:
    x, residual, shape, weight, bias, eps, residual_dtype = args
    if op == "add_rms_norm":
        return NF.add_rms_norm(x, residual, shape, weight, eps, residual_dtype=residual_dtype, **options)
    return NF.add_layer_norm(x, residual, shape, weight, bias, eps, residual_dtype=residual_dtype, **options)


def _plain_add(op: str, args: tuple[Any, ...]) -> bool:
    x, residual, shape, weight, bias, eps, residual_dtype = args
    eps_ok = type(eps) is float or (eps is None and op == "add_rms_norm")
    params = (weight,) if op == "add_rms_norm" else (weight, bias)
    return _checks.plain_add(x, residual, residual_dtype, shape, eps_ok, *params)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", list(CASES))
def test_plain_add_says_yes_exactly_where_it_claims(op: str, case: str) -> None:
    args, ordinary = CASES[case]
    if op == "add_rms_norm" and case.startswith("bias"):
        ordinary = True  # (add_rms_norm has no bias: it is not asked about one)
    if op == "add_rms_norm" and case == "eps None":
        ordinary = True
    assert _plain_add(op, args) is ordinary


def _spied(monkeypatch: pytest.MonkeyPatch, op: str) -> dict[str, list[Any]]:
    """Replace the torch backend's ``op`` by spies of its general and plain forms (each runs the
    real one) and spy on the op's checks; returns what each saw."""
    seen: dict[str, list[Any]] = {"fn": [], "plain": [], "checks": []}
    real = _REGISTRY["torch"].ops[op]

    def spy(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            seen[name].append(args)
            return fn(*args, **kwargs)

        return call

    ops = {**_REGISTRY["torch"].ops, op: real._replace(fn=spy("fn", real.fn), plain=spy("plain", real.plain))}
    monkeypatch.setitem(_REGISTRY, "torch", dataclasses.replace(_REGISTRY["torch"], ops=ops))
    check = "check_rms_norm" if op == "add_rms_norm" else "check_layer_norm"
    monkeypatch.setattr(_checks, check, spy("checks", getattr(_checks, check)))
    return seen


def _outcome(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except Exception as error:  # noqa: BLE001  (compared below)
        return error


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", list(CASES))
def test_only_the_ordinary_call_skips_the_checks(op: str, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ordinary call runs the plain form, no check; every other call runs the checks and,
    where they pass, the general form; results and errors are those of the backend named."""
    args, _ = CASES[case]
    named = _outcome(lambda: _call(op, args, backend="torch"))
    seen = _spied(monkeypatch, op)
    got = _outcome(lambda: _call(op, args))
    if _plain_add(op, args):
        assert (len(seen["plain"]), len(seen["fn"]), len(seen["checks"])) == (1, 0, 0)
    else:
        assert seen["plain"] == [] and len(seen["checks"]) == 1
        assert len(seen["fn"]) == (0 if isinstance(got, Exception) else 1)
    if isinstance(named, Exception):
        assert type(got) is type(named) and str(got) == str(named)
    else:
        for mine, theirs in zip(got, named, strict=True):
            assert mine.dtype == theirs.dtype
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


# dtype -> tolerance of the float32-or-lower result against the float64 one (rounding of the
# output and of the residual sum in that dtype)
TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 4e-2, torch.float16: 4e-3, F64: 1e-12}


@pytest.mark.parametrize("eps", [None, 1e-3], ids=["eps-default", "eps-given"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("op", OPS)
def test_plain_form_is_the_general_form_to_the_bit(op: str, dtype: torch.dtype, residual: bool, eps: Any) -> None:
    """Values and gradients of the ordinary call (the plain form) against the backend named
    (the general form, through its casts): bit for bit; and against float64 torch."""
    shape = (5, 3, 96)
    x, r = _randn(*shape, seed=(op, "x"), dtype=dtype), _randn(*shape, seed=(op, "r"), dtype=dtype)
    w, b = _randn(96, seed=(op, "w"), dtype=dtype), _randn(96, seed=(op, "b"), dtype=dtype)
    dy, dh = _randn(*shape, seed=(op, "dy"), dtype=dtype), _randn(*shape, seed=(op, "dh"), dtype=dtype)
    eps = 1e-5 if op == "add_layer_norm" and eps is None else eps
    results = []
    for options in ({}, {"backend": "torch"}):
        leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]
        xs, rs, ws, bs = leaves
        call = (xs, rs if residual else None, (96,), ws, bs, eps, None)
        assert _plain_add(op, call)
        y, h = _call(op, call, **options)
        torch.autograd.backward((y, h), (dy, dh))
        results.append([y, h, *(t.grad for t in leaves if t.grad is not None)])
    for mine, theirs in zip(*results, strict=True):
        assert mine.dtype == theirs.dtype
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    h64 = x.double() + r.double() if residual else x.double()
    if op == "add_rms_norm":
        y64 = F.rms_norm(h64, (96,), w.double(), numerics.rms_eps(eps, dtype))
    else:
        y64 = F.layer_norm(h64, (96,), w.double(), b.double(), eps)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(results[0][0].double(), y64, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64], ids=str)
def test_aten_rms_norm_eps_none_is_the_policy_default(dtype: torch.dtype) -> None:
    """The plain RMS form passes ``eps=None`` to ATen: ATen's default must be
    numerics.default_rms_eps (float32's machine epsilon for fp16/bf16 input). Tiny rows make
    eps dominate, so another default shows."""
    x, w = (_randn(6, 32, seed="tiny") * 1e-4).to(dtype), _randn(32, seed="tiny w", dtype=dtype)
    default = torch.rms_norm(x, (32,), w, None)
    assert torch.equal(default, torch.rms_norm(x, (32,), w, numerics.default_rms_eps(dtype)))
    other = torch.finfo(dtype).eps if dtype in (torch.float16, torch.bfloat16) else 1e-6
    assert not torch.equal(default, torch.rms_norm(x, (32,), w, other))


@pytest.mark.parametrize("op", OPS)
def test_routes_that_choose_are_not_skipped(op: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A named backend, a use_backend block, NORMKIT_BACKEND, a 4-D x (memory format kept by
    _dispatch) and a kernel backend whose may_prefer claims the input: no plain form."""
    args = CASES["ordinary"][0]
    x4 = (_randn(2, 3, 4, 8, seed="x4"), _randn(2, 3, 4, 8, seed="r4"), *args[2:])
    seen = _spied(monkeypatch, op)
    _call(op, args, backend="torch")
    _call(op, args, backend="reference")
    with normkit.use_backend("torch"):
        _call(op, args)
    monkeypatch.setenv(ENV_VAR, "torch")
    _call(op, args)
    monkeypatch.setenv(ENV_VAR, "auto")
    _call(op, x4)
    assert seen["plain"] == [] and len(seen["fn"]) == 4
    _call(op, args)
    assert len(seen["plain"]) == 1
    claimed = []
    claimer = OpImpl(lambda *a: claimed.append(a) or (a[0], a[0]), preferred=lambda *a: True, may_prefer=lambda t: True)
    monkeypatch.setitem(_REGISTRY, AUTO_ORDER[0], Backend(AUTO_ORDER[0], {op: claimer}))
    _call(op, args)
    assert len(claimed) == 1 and len(seen["plain"]) == 1


@pytest.mark.parametrize("op", OPS)
def test_inference_tensors_and_no_grad_take_the_plain_form(op: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inference tensors (made under inference_mode, used in and outside it) give the general
    form's bits."""
    args = CASES["ordinary"][0]
    with torch.inference_mode():
        frozen = tuple(t.clone() if isinstance(t, Tensor) else t for t in args)
        inside = _call(op, frozen)
        want = _call(op, frozen, backend="torch")
    outside = _call(op, frozen)
    with torch.no_grad():
        quiet = _call(op, frozen)
    for got in (inside, outside, quiet):
        for mine, theirs in zip(got, want, strict=True):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_numba_keeps_the_large_add_rms_norm_it_claims(monkeypatch: pytest.MonkeyPatch) -> None:
    """A large float32 training call numba claims (MEASURED_FASTER) is not settled: numba runs."""
    numba = _REGISTRY.get("numba")
    if numba is None or not numba.is_available() or "add_rms_norm" not in numba.ops:
        pytest.skip("numba is not installed")
    seen = _spied(monkeypatch, "add_rms_norm")
    x = _randn(256, 1024, seed="large").requires_grad_()
    r, w = _randn(256, 1024, seed="large r"), _randn(1024, seed="large w")
    y, h = NF.add_rms_norm(x, r, (1024,), w)
    assert seen["plain"] == [] and seen["fn"] == []
    torch.testing.assert_close(y, F.rms_norm(x + r, (1024,), w), rtol=1e-5, atol=1e-5)
