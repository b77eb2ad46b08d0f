"""The default path's per-call cost without autograd (issue 12) changes nothing but its time.

Two routes are new: a ``normalized_shape`` spelt as a list or a ``torch.Size`` of ints is an
ordinary call (:func:`normkit._checks.plain_add`: no checks, the add-norms' plain form, and the
backends get a tuple), and "auto" settles a call autograd will not record (grad mode off, or no
tensor argument requiring grad) before the checks where a kernel backend claims only training
calls of that input (:attr:`normkit.backends.OpImpl.may_prefer_unrecorded`). Here: the bits,
values and gradients of every spelling and route against ``backend="torch"`` and float64; torch's
errors word for word; the backend that runs; ``torch.compile(fullgraph=True)``, ``torch.func``,
``torch.jit.trace``, ``use_backend`` and ``NORMKIT_BACKEND``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import normkit
import normkit.functional as NF
from normkit import _checks
from normkit.backends import _REGISTRY, AUTO_ORDER, ENV_VAR, Backend, BackendError, OpImpl, auto_choice
from test_overhead_session9 import _default_route, _randn  # noqa: F401  (an autouse fixture: no NORMKIT_BACKEND)

F64 = torch.float64
OPS = ("rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm")
D = 96  # the normalized width of the small cases (not a power of two)


def _call(
    op: str, x: Tensor, r: Tensor | None, shape: Any, w: Tensor | None, b: Tensor | None, eps: Any, **options: Any
) -> tuple[Tensor, ...]:
    """``op`` through normkit.functional, its results as a tuple."""
    if op == "rms_norm":
        return (NF.rms_norm(x, shape, w, eps, **options),)
    if op == "layer_norm":
        return (NF.layer_norm(x, shape, w, b, 1e-5 if eps is None else eps, **options),)
    if op == "add_rms_norm":
        return tuple(NF.add_rms_norm(x, r, shape, w, eps, **options))
    return tuple(NF.add_layer_norm(x, r, shape, w, b, 1e-5 if eps is None else eps, **options))


def _torch64(op: str, x: Tensor, r: Tensor | None, w: Tensor, b: Tensor, eps: Any) -> Tensor:
    """The first result in float64 by torch (the oracle)."""
    h = x.double() + r.double() if op.startswith("add_") else x.double()
    if "rms" in op:
        return F.rms_norm(h, (h.shape[-1],), w.double(), eps)
    return F.layer_norm(h, (h.shape[-1],), w.double(), b.double(), 1e-5 if eps is None else eps)


# name -> normalized_shape for x of shape (5, 3, D), and whether plain_add calls it ordinary
SHAPES: dict[str, tuple[Any, bool]] = {
    "tuple": ((D,), True),
    "list": ([D], True),
    "torch.Size": (torch.Size([D]), True),
    "x.shape[-1:]": (None, True),  # filled per call: the input's own trailing size
    "list of two": ([3, D], True),
    "empty list": ([], False),
    "list of a bool": ([True], False),
    "list of a 0-dim tensor": ([torch.tensor(D)], False),
    "list of a float": ([float(D)], False),
    "list too long": ([2, 5, 3, D], False),
    "list wrong": ([D - 1], False),
}


def _shape(name: str, x: Tensor) -> Any:
    shape = SHAPES[name][0]
    return x.shape[-1:] if shape is None else shape


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("add", [False, True], ids=["norm", "add-norm"])
def test_plain_add_says_yes_exactly_for_ints(name: str, add: bool) -> None:
    x, w = _randn(5, 3, D, seed="x"), _randn(*(3, D) if name == "list of two" else (D,), seed="w")
    r = _randn(5, 3, D, seed="r") if add else None
    assert _checks.plain_add(x, r, None, _shape(name, x), True, w, w) is SHAPES[name][1]
    assert _checks.plain_trailing(x, _shape(name, x), True, w) is SHAPES[name][1]


def _leaves(op: str, dtype: torch.dtype, seed: object) -> list[Tensor]:
    x, r = (_randn(5, 3, D, seed=(seed, k), dtype=dtype) for k in ("x", "r"))
    w, b = (_randn(D, seed=(seed, k), dtype=dtype) for k in ("w", "b"))
    return [t.requires_grad_() for t in (x, r, w, b)]


def _run(op: str, name: str, leaves: list[Tensor], seed: object, **options: Any) -> list[Tensor]:
    """Results and gradients (random upstream gradients) of one call."""
    x, r, w, b = (t.detach().clone().requires_grad_() for t in leaves)
    outs = _call(op, x, r, _shape(name, x), w, b, None, **options)
    grads = [_randn(*o.shape, seed=(seed, "dy", i), dtype=o.dtype) for i, o in enumerate(outs)]
    torch.autograd.backward(outs, grads)
    return [*(o.detach() for o in outs), *(t.grad for t in (x, r, w, b) if t.grad is not None)]


ORDINARY = [name for name, (_, ordinary) in SHAPES.items() if ordinary and name != "list of two"]


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64], ids=str)
@pytest.mark.parametrize("name", ORDINARY)
@pytest.mark.parametrize("op", OPS)
def test_every_spelling_gives_the_named_backends_bits(op: str, name: str, dtype: torch.dtype, grad: bool) -> None:
    """A list / torch.Size shape on the default path: values and gradients bit for bit those of
    the tuple call on the backend that "auto" runs for it, close to float64 torch."""
    seed = ("spell", op, name, dtype)
    leaves = _leaves(op, dtype, seed)
    if grad:
        got = _run(op, name, leaves, seed)
        want = _run(op, "tuple", leaves, seed, backend="torch")
    else:
        with torch.no_grad():
            x, r, w, b = leaves
            got = list(_call(op, x, r, _shape(name, x), w, b, None))
            want = list(_call(op, x, r, (D,), w, b, None, backend="torch"))
        assert all(t.grad_fn is None for t in got)
    for mine, theirs in zip(got, want, strict=True):
        assert mine.dtype == theirs.dtype
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    x, r, w, b = leaves
    tol = {torch.float32: 1e-5, torch.bfloat16: 4e-2, F64: 1e-12}[dtype]
    torch.testing.assert_close(got[0].double(), _torch64(op, x, r, w, b, None), rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["list", "torch.Size", "x.shape[-1:]"])
@pytest.mark.parametrize("op", OPS)
def test_each_backend_gets_a_tuple_and_gives_its_own_bits(op: str, name: str) -> None:
    """A named backend, and "auto" where it is not settled before the checks, receive the shape as a
    tuple (the form the non-ordinary path has always passed) and give the tuple call's bits."""
    x, r, w, b = (t.detach() for t in _leaves(op, torch.float32, ("named", op)))
    seen: list[Any] = []
    for backend in normkit.backends():
        impl = _REGISTRY[backend].ops.get(op)
        if impl is None:
            continue
        want = _outcome(lambda backend=backend: _call(op, x, r, (D,), w, b, None, backend=backend))
        if isinstance(want, BackendError):  # (a kernel backend for another device)
            continue
        with pytest.MonkeyPatch.context() as patch:
            spy = impl._replace(fn=lambda *a, fn=impl.fn: seen.append(a[1] if "add" not in op else a[2]) or fn(*a))
            ops = {**_REGISTRY[backend].ops, op: spy}
            patch.setitem(_REGISTRY, backend, dataclasses.replace(_REGISTRY[backend], ops=ops))
            got = _call(op, x, r, _shape(name, x), w, b, None, backend=backend)
            with normkit.use_backend(backend):
                again = _call(op, x, r, _shape(name, x), w, b, None)
            patch.setenv(ENV_VAR, backend)
            env = _call(op, x, r, _shape(name, x), w, b, None)
        for outs in (got, again, env):
            for mine, theirs in zip(outs, want, strict=True):
                torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    assert seen and all(type(s) is tuple and s == (D,) for s in seen), seen


def _outcome(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except Exception as error:  # noqa: BLE001  (compared below)
        return error


@pytest.mark.parametrize("name", [n for n, (_, ordinary) in SHAPES.items() if not ordinary])
@pytest.mark.parametrize("op", ["rms_norm", "layer_norm"])
def test_other_lists_raise_torchs_errors(op: str, name: str) -> None:
    """Lists that are not ordinary still take the checks: the error, or the result, is torch's."""
    x = _randn(5, 3, D, seed="ex")
    shape = _shape(name, x)
    theirs = _outcome(lambda: F.rms_norm(x, shape, None) if op == "rms_norm" else F.layer_norm(x, shape))
    mine = _outcome(lambda: NF.rms_norm(x, shape, None) if op == "rms_norm" else NF.layer_norm(x, shape))
    if isinstance(theirs, Exception):
        assert type(mine) is type(theirs) and str(mine) == str(theirs)
    else:
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def _claimer(seen: list[str]) -> OpImpl:
    """A kernel backend's op that claims, from the input, only calls autograd records."""
    return OpImpl(
        lambda *a: seen.append("claimer") or ((-a[0], a[0]) if len(a) > 5 else -a[0]),
        preferred=lambda *a, **k: True,
        may_prefer=lambda t: True,
        may_prefer_unrecorded=lambda t: False,
    )


@pytest.mark.parametrize("op", OPS)
def test_a_training_only_claim_leaves_unrecorded_calls_settled(op: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """auto_choice asks may_prefer_unrecorded only where autograd will not record the call: no
    tensor requires grad, or grad mode is off; a weight that requires grad is a recorded call."""
    seen: list[str] = []
    monkeypatch.setitem(_REGISTRY, AUTO_ORDER[0], Backend(AUTO_ORDER[0], {op: _claimer(seen)}))
    x, r, w, b = (t.detach() for t in _leaves(op, torch.float32, ("claim", op)))
    want = _call(op, x, r, (D,), w, b, None, backend="torch")
    for name in ("tuple", "list"):
        got = _call(op, x, r, _shape(name, x), w, b, None)  # grad mode on, nothing requires grad
        with torch.no_grad():
            quiet = _call(op, x, r, _shape(name, x), w.requires_grad_(), b, None)
        w.requires_grad_(False)
        assert seen == []
        for outs in (got, quiet):
            for mine, theirs in zip(outs, want, strict=True):
                torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    _call(op, x, r, (D,), w.requires_grad_(), b, None)
    assert seen == ["claimer"]
    assert auto_choice(op, x) is None  # no tensors given: not known, so the claimer is asked on
    assert auto_choice(op, x, tensors=(x, 3, None)) is not None


@pytest.fixture
def numba_backend() -> Any:
    backend = pytest.importorskip("normkit.ops.numba.backend")
    if "numba" not in normkit.backends():
        pytest.skip("numba is not installed")
    return backend


INPUTS = [(8, 4096), (8, 64), (300, 1024), (2, 4, 8, 8), (32, 8, 64, 64)]


@pytest.mark.parametrize("table", ["committed", "small unrecorded claims"])
def test_numba_may_prefer_unrecorded_answers_as_the_class_would(
    numba_backend: Any, table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its no implies that no class of an unrecorded call of that input (either training flag) is
    claimed, for every op, with the committed table and with one that claims small calls too; and
    it is asked only where may_prefer said yes, so it never says yes where that said no."""
    nb = numba_backend
    if table != "committed":
        grown = {op: classes | {"float32/small", "float32/small/short"} for op, classes in nb.MEASURED_FASTER.items()}
        monkeypatch.setattr(nb, "MEASURED_FASTER", grown)
    for op in nb.MEASURED_FASTER:
        unrecorded = nb._may_prefer_unrecorded(op)
        for shape in INPUTS:
            x = _randn(*shape, seed=(op, shape))
            for grad in (False, True):
                with torch.set_grad_enabled(grad):
                    if unrecorded(x):
                        continue
                    for train in (False, True):
                        cls = nb.shape_class(op, x, training=train, autograd=False)
                        assert cls not in nb.MEASURED_FASTER[op], (op, shape, grad, cls)


@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm"])
def test_numba_runs_only_where_autograd_records(numba_backend: Any, op: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a table that claims rms_norm / add_rms_norm float32 calls for training only (the
    committed one at 4a78479): at 8x4096 a call with nothing requiring grad runs ATen (the torch
    backend's bits) with grad mode on or off, and one with a weight that requires grad runs
    numba's kernels."""
    table = numba_backend.MEASURED_FASTER
    monkeypatch.setitem(table, op, frozenset(c for c in table[op] if c.endswith("/train")))
    x, r, w = (_randn(*s, seed=("numba", op, k)) for s, k in (((8, 4096), "x"), ((8, 4096), "r"), ((4096,), "w")))
    want = _call(op, x, r, [4096], w, None, 1e-6, backend="torch")
    for ctx in (torch.enable_grad, torch.no_grad):
        with ctx():
            got = _call(op, x, r, [4096], w, None, 1e-6)
        for mine, theirs in zip(got, want, strict=True):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    trained = _call(op, x, r, [4096], w.clone().requires_grad_(), None, 1e-6)
    numba = _call(op, x, r, (4096,), w.clone().requires_grad_(), None, 1e-6, backend="numba")
    aten = _call(op, x, r, (4096,), w.clone().requires_grad_(), None, 1e-6, backend="torch")
    assert type(trained[0].grad_fn) is type(numba[0].grad_fn) is not type(aten[0].grad_fn)
    for mine, theirs in zip(trained, numba, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("grad", [True, False], ids=["x-requires-grad", "nothing-requires-grad"])
@pytest.mark.parametrize("rows", [8, 300])
@pytest.mark.parametrize("op", OPS)
def test_jit_trace_check_takes_the_traced_route(op: str, rows: int, grad: bool) -> None:
    """torch.jit.trace reruns the call under no_grad to check the trace: the route (settled or
    not) must not depend on it, at a small and a large numba-claimed size."""
    x, r = _randn(rows, 1024, seed=("trace", op, "x")), _randn(rows, 1024, seed=("trace", op, "r"))
    w, b = _randn(1024, seed=("trace", "w")), _randn(1024, seed=("trace", "b"))

    def f(x: Tensor) -> Tensor:
        return _call(op, x, r, [1024], w, b, None)[0]

    traced = torch.jit.trace(f, (x.clone().requires_grad_(grad),))
    torch.testing.assert_close(traced(x), f(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op", OPS)
def test_compile_fullgraph_and_func_take_lists(op: str) -> None:
    """A list shape under torch.compile(fullgraph=True) and torch.func.grad: torch's results."""
    x, r, w, b = (t.detach() for t in _leaves(op, torch.float32, ("compile", op)))

    def f(x: Tensor, w: Tensor) -> Tensor:
        return _call(op, x, r, [D], w, b, None)[0]

    want = _call(op, x, r, (D,), w, b, None, backend="torch")[0]
    torch._dynamo.reset()
    got = torch.compile(f, backend="eager", fullgraph=True)(x, w)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    dy = _randn(5, 3, D, seed=("compile", op, "dy"))

    def loss(x: Tensor, w: Tensor, call: Callable[..., tuple[Tensor, ...]], **options: Any) -> Tensor:
        return (call(op, x, r, [D], w, b, None, **options)[0] * dy).sum()

    grads = torch.func.grad(loss, argnums=(0, 1))(x, w, _call)
    expected = torch.func.grad(loss, argnums=(0, 1))(x, w, _call, backend="torch")
    for mine, theirs in zip(grads, expected, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("dims", [2, 4], ids=["2-D", "4-D"])
@pytest.mark.parametrize("op", OPS)
def test_auto_choice_is_asked_once_per_call(op: str, dims: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A call a kernel backend claims asks auto_choice once (the front end's answer is passed to
    _dispatch, not asked again) and runs that backend; an unclaimed one runs torch's op."""
    seen: list[str] = []
    monkeypatch.setitem(_REGISTRY, AUTO_ORDER[0], Backend(AUTO_ORDER[0], {op: _claimer(seen)}))
    asked: list[str] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        asked.append(args[0])
        return auto_choice(*args, **kwargs)

    monkeypatch.setattr(NF, "auto_choice", counted)
    shape = (2, 3, 4, D) if dims == 4 else (12, D)
    x, r = _randn(*shape, seed=("once", op, "x")), _randn(*shape, seed=("once", op, "r"))
    w, b = _randn(D, seed=("once", op, "w")).requires_grad_(), _randn(D, seed=("once", op, "b"))
    _call(op, x, r, [D], w, b, None)
    assert (asked, seen) == ([op], ["claimer"])
    with torch.no_grad():
        got = _call(op, x, r, [D], w, b, None)
    want = _call(op, x, r, (D,), w.detach(), b, None, backend="torch")
    assert (asked, seen) == ([op, op], ["claimer"])
    for mine, theirs in zip(got, want, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
