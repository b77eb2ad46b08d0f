"""An outside user's attack on session 10's changes: the default path's ordinary call for a list
or ``torch.Size`` ``normalized_shape`` (``_checks.plain_add``) and "auto" settling calls autograd
will not record (``OpImpl.may_prefer_unrecorded``, ``auto_choice(tensors=)``); the numba row
launchers' small-call path (below ``_engine.PARALLEL_MIN_ELEMENTS``: plain ``empty_like``
outputs, one-block dw/db); and the interpreter's share of the triton precisions
(``tests/interpreter_share.py``).

Oracles: the same call with ``backend="torch"`` (errors word for word, values bit for bit where
"auto" settles on ATen, gradients within the table's bound where numba runs); float64 references
with the self-calibrating bound (at most twice torch's own error in the same dtype, plus one ulp);
batch invariance (a row's bits never depend on the other rows: the numba backend's numerics
contract); and pytest's own collection in fresh processes under different hash seeds. Material
nobody here wrote: torch's ``op_db`` samples, hypothesis strategies, torch's ``TwoTensor``.

Each defect found is a strict xfail whose reason is the minimal repro and the suspected cause.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.testing._internal.two_tensor import TwoTensor

import normkit
import normkit.functional as NF
from _outside import NUMBA_ATTACK_MARKS, op_db
from cases import seed_of
from normkit.backends import ENV_VAR
from normkit.testing import assert_within_bound

pytestmark = NUMBA_ATTACK_MARKS

F64 = torch.float64
ROW_OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "normalize")
CLAIMED = (8, 4096)  # a size numba claims float32 rms_norm / add_rms_norm at (see training_claims_only)


@pytest.fixture
def training_claims_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """numba's table as committed at 4a78479, the change attacked here: rms_norm / add_rms_norm
    claimed for calls autograd records only (later runs claim some no-grad classes too, where
    "auto" then gives numba's bits: test_committed_no_grad_claims_run_numba)."""
    nb = pytest.importorskip("normkit.ops.numba.backend")
    for op in ("rms_norm", "add_rms_norm"):
        training = frozenset(c for c in nb.MEASURED_FASTER[op] if c.endswith("/train"))
        monkeypatch.setitem(nb.MEASURED_FASTER, op, training)


# The defects found, each a strict xfail below until fixed (then a plain regression test): the
# minimal repro, the suspected cause, the fix.
DEFECTS = {
    "inference mode": (
        "Under torch.inference_mode() with torch.enable_grad() inside, a tensor that requires grad "
        "(made outside) is not recorded (torch's output: an inference tensor, no grad_fn), but auto "
        "sends it to numba's autograd Function, which raises 'RuntimeError: Inference tensors cannot be "
        "saved for backward': x = torch.randn(8, 4096, requires_grad=True); with torch.inference_mode(), "
        "torch.enable_grad(): NF.rms_norm(x, [4096], torch.randn(4096)) (backend='torch' works; also "
        "NF.batch_norm on a channels_last (32, 8, 64, 64) x with a weight that requires grad, training). "
        "Cause: backends._recorded and numba's preferred() test only grad mode and requires_grad. "
        "Fix: both answer 'not recorded' when torch.is_inference_mode_enabled() (in _recorded: "
        "`if not torch.is_grad_enabled() or torch.is_inference_mode_enabled(): return False`; in "
        "preferred: `autograd = ... and not torch.is_inference_mode_enabled()`); backend='numba' itself "
        "should run its kernels without the Function there. Fixed: _autograd.recording / inference_mode "
        "in the numba and triton eager routes, reference.apply_traced under no_grad there"
    ),
    "list to backend": (
        "add_layer_norm / add_rms_norm hand a list or torch.Size normalized_shape unconverted to the "
        "settled backend's plain function: NF.add_rms_norm(torch.randn(8, 64), torch.randn(8, 64), [64], "
        "torch.randn(64)) calls the torch backend's OpImpl.plain with [64] (a list), though 4a78479 says "
        "the backends get a tuple (layer_norm / rms_norm and the unsettled route convert). Cause: "
        "functional.py's early `return fn(x, residual, normalized_shape, ...)` after auto_choice(plain=True) "
        "runs before the `elif type(normalized_shape) is not tuple` conversion. Fix: convert just before "
        "that early return (only on the settled route, so the common tuple call pays nothing). Fixed (a20cbc8)"
    ),
}


@pytest.fixture(autouse=True)
def _default_route(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)


def _randn(*shape: int, seed: object, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed_of(seed)), dtype=F64).to(dtype)


def _call(op: str, x: Tensor, r: Tensor | None, w: Tensor | None, b: Tensor | None, **kw: Any) -> tuple[Tensor, ...]:
    """``op`` over the last dim through normkit.functional, a list shape, results as a tuple."""
    shape = [x.shape[-1]]
    if op == "layer_norm":
        return (NF.layer_norm(x, shape, w, b, 1e-5, **kw),)
    if op == "rms_norm":
        return (NF.rms_norm(x, shape, w, 1e-6, **kw),)
    if op == "add_layer_norm":
        return tuple(NF.add_layer_norm(x, r, shape, w, b, 1e-5, **kw))
    if op == "add_rms_norm":
        return tuple(NF.add_rms_norm(x, r, shape, w, 1e-6, **kw))
    return (NF.normalize(x, -1, w, b, 1e-5, **kw),)


def _ref64(op: str, x: Tensor, r: Tensor | None, w: Tensor | None, b: Tensor | None) -> Tensor:
    """The first result in float64 by torch.nn.functional (the oracle)."""
    h = x.double() + r.double() if op.startswith("add_") else x.double()
    wd, bd = (None if t is None else t.double() for t in (w, b))
    if "rms" in op:
        return F.rms_norm(h, (h.shape[-1],), wd, 1e-6)
    return F.layer_norm(h, (h.shape[-1],), wd, bd, 1e-5)


def _outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 (the error itself is what is compared)
        return "err", f"{type(e).__name__}: {e}"
    return "ok", out if isinstance(out, tuple) else (out,)


def _same_outcome(auto: Callable[[], Any], torch_: Callable[[], Any], what: object) -> None:
    """Errors word for word, results bit for bit (NaN where NaN), dtypes and shapes equal."""
    (ka, va), (kt, vt) = _outcome(auto), _outcome(torch_)
    assert (ka, va if ka == "err" else None) == (kt, vt if kt == "err" else None), what
    if ka == "ok":
        for mine, theirs in zip(va, vt, strict=True):
            assert type(mine) is type(theirs) and mine.dtype == theirs.dtype and mine.shape == theirs.shape, what
            assert torch.equal(mine.isnan(), theirs.isnan()), what
            assert torch.equal(mine.nan_to_num(0.0), theirs.nan_to_num(0.0)), what


def _in_threads(targets: list[Callable[[], None]]) -> None:
    """Run each of ``targets`` in its own thread, all at once, and wait for them."""
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _leaves(op: str, shape: tuple[int, ...], seed: object, dtype: torch.dtype = torch.float32) -> list[Tensor]:
    d = shape[-1]
    return [
        _randn(*shape, seed=(seed, "x"), dtype=dtype),
        _randn(*shape, seed=(seed, "r"), dtype=dtype),
        _randn(d, seed=(seed, "w"), dtype=dtype),
        _randn(d, seed=(seed, "b"), dtype=dtype),
    ]


# ---- 1. "auto" for calls autograd will not record: torch's bits ---------------------------------

CONTEXTS: dict[str, Callable[[], Any]] = {
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
    "grad on, nothing requires grad": contextlib.nullcontext,
    "autocast bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
    "autocast bf16 + no_grad": lambda: _both(torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad()),
}


@contextlib.contextmanager
def _both(a: Any, b: Any) -> Any:
    with a, b:
        yield


@pytest.mark.usefixtures("training_claims_only")
@pytest.mark.parametrize("shape", [CLAIMED, (8, 64), (300, 1024), (3, 5, 96)], ids=str)
@pytest.mark.parametrize("context", list(CONTEXTS))
@pytest.mark.parametrize("op", ROW_OPS[:4])
def test_unrecorded_auto_gives_torchs_bits(op: str, context: str, shape: tuple[int, ...]) -> None:
    """Every context where autograd records nothing, at numba-claimed and unclaimed sizes: the
    torch backend's bits (numba claims only training calls here)."""
    x, r, w, b = _leaves(op, shape, ("unrecorded", op, shape))
    with CONTEXTS[context]():
        _same_outcome(lambda: _call(op, x, r, w, b), lambda: _call(op, x, r, w, b, backend="torch"), context)


KINDS = {
    "x requires grad under no_grad": lambda x, r, w: (x.requires_grad_(), r, w, torch.no_grad),
    "inference tensors, grad on": lambda x, r, w: (*_inference(x, r), w, contextlib.nullcontext),
    "TwoTensor x and residual": lambda x, r, w: (TwoTensor(x, x.clone()), TwoTensor(r, r.clone()), w, torch.no_grad),
    "weight a Parameter under no_grad": lambda x, r, w: (x, r, torch.nn.Parameter(w), torch.no_grad),
    "a TorchFunctionMode under no_grad": lambda x, r, w: (x, r, w, lambda: _both(_Mode(), torch.no_grad())),
}


class _Mode(TorchFunctionMode):
    """A mode that passes every call through (a profiler's or a tracer's kind)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        return func(*args, **(kwargs or {}))


def _inference(*ts: Tensor) -> tuple[Tensor, ...]:
    with torch.inference_mode():
        return tuple(t.clone() for t in ts)


@pytest.mark.usefixtures("training_claims_only")
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("op", ROW_OPS[:4])
def test_unrecorded_tensors_of_every_kind(op: str, kind: str) -> None:
    x, r, w, b = _leaves(op, CLAIMED, ("kinds", op))
    x, r, w, ctx = KINDS[kind](x, r, w)
    with ctx():
        _same_outcome(lambda: _call(op, x, r, w, b), lambda: _call(op, x, r, w, b, backend="torch"), kind)


@pytest.mark.parametrize("leaf", ["x", "r", "w"])
@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm"])
def test_one_leaf_requiring_grad_is_recorded(op: str, leaf: str) -> None:
    """Only the weight requires grad (or only the input, or only the residual): autograd records
    the call, numba's kernels run it (its bits), and every gradient is within the float64 bound
    of torch's, random upstream gradients, grads accumulated over two backward passes."""
    if op == "rms_norm" and leaf == "r":
        pytest.skip("rms_norm has no residual")
    x, r, w, b = _leaves(op, CLAIMED, ("one leaf", op))
    dys = [_randn(*CLAIMED, seed=("one leaf", op, k)) for k in range(2)]
    grads = {}
    for name in ("auto", "numba", "torch"):
        ts = {"x": x.clone(), "r": r.clone(), "w": w.clone()}
        ts[leaf].requires_grad_()
        out = _call(op, ts["x"], ts["r"], ts["w"], None, **({} if name == "auto" else {"backend": name}))
        for dy in dys:
            out[0].backward(dy, retain_graph=True)
        grads[name] = (out[0].detach(), ts[leaf].grad)
    for mine, theirs in zip(grads["auto"], grads["numba"], strict=True):
        assert torch.equal(mine, theirs)
    for mine, theirs in zip(grads["auto"], grads["torch"], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", [None, "numba"])
@pytest.mark.parametrize("leaf", ["x", "w"])
@pytest.mark.parametrize("shape", [CLAIMED, (64, 4096)], ids=str)
@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm", "layer_norm"])
def test_inference_mode_with_grad_enabled_inside(op: str, shape: tuple[int, ...], leaf: str,
                                                 backend: str | None) -> None:
    """(DEFECTS["inference mode"], fixed.) Nothing is recorded: torch's values, an inference
    tensor without grad_fn, by "auto" and by naming numba."""
    x, r, w, b = _leaves(op, shape, ("inference+grad", op))
    (x if leaf == "x" else w).requires_grad_()
    kw = {} if backend is None else {"backend": backend}
    with torch.inference_mode(), torch.enable_grad():
        got = _call(op, x, r, w, b, **kw)
        want = _call(op, x, r, w, b, backend="torch")
    for mine, theirs in zip(got, want, strict=True):
        assert mine.is_inference() and mine.grad_fn is None and not mine.requires_grad
        torch.testing.assert_close(mine, theirs, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", [None, "numba"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("op", ["batch_norm", "group_norm"])
def test_channel_norms_in_inference_mode_with_grad_enabled_inside(op: str, layout: str,
                                                                  backend: str | None) -> None:
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = _randn(32, 8, 64, 64, seed=("inference+grad", op, "x")).contiguous(memory_format=fmt)
    w = _randn(8, seed=("inference+grad", op, "w")).requires_grad_()
    b = _randn(8, seed=("inference+grad", op, "b"))
    kw = {} if backend is None else {"backend": backend}

    def call(**k: Any) -> Tensor:
        if op == "batch_norm":
            return NF.batch_norm(x, None, None, w, b, training=True, **k)
        return NF.group_norm(x, 4, w, b, **k)

    with torch.inference_mode(), torch.enable_grad():
        got, want = call(**kw), call(backend="torch")
    assert got.is_inference() and got.grad_fn is None
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.usefixtures("training_claims_only")
@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm"])
def test_threads_with_and_without_autograd(op: str) -> None:
    """Two threads, one under no_grad, one training with a weight that requires grad, each
    calling 30 times: each gets its own route's bits (grad mode is per thread)."""
    x, r, w, b = _leaves(op, CLAIMED, ("threads", op))
    want_plain = _call(op, x, r, w, b, backend="torch")[0]
    want_train = _call(op, x, r, w.clone().requires_grad_(), b, backend="numba")[0].detach()
    bad: list[str] = []

    def plain() -> None:
        with torch.no_grad():
            for _ in range(30):
                if not torch.equal(_call(op, x, r, w, b)[0], want_plain):
                    bad.append("no_grad")

    def train() -> None:
        for _ in range(30):
            if not torch.equal(_call(op, x, r, w.clone().requires_grad_(), b)[0].detach(), want_train):
                bad.append("train")

    _in_threads([plain, train])
    assert not bad


@pytest.mark.parametrize("route", ["use_backend", "env"])
@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm"])
def test_a_named_backend_is_not_settled_away(op: str, route: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """use_backend("numba") and NORMKIT_BACKEND=numba under no_grad run numba, not ATen."""
    x, r, w, b = _leaves(op, CLAIMED, ("named", op))
    with torch.no_grad():
        want = _call(op, x, r, w, b, backend="numba")
        if route == "env":
            monkeypatch.setenv(ENV_VAR, "numba")
            got = _call(op, x, r, w, b)
        else:
            with normkit.use_backend("numba"):
                got = _call(op, x, r, w, b)
    for mine, theirs in zip(got, want, strict=True):
        assert torch.equal(mine, theirs)


# Arguments a user gets wrong or spells oddly; each at the claimed size, with and without grad mode.
VARIANTS: dict[str, dict[str, Any]] = {
    "weight float64": {"w": "double"},
    "weight bf16": {"w": "bfloat16"},
    "weight of half the width": {"w": "half width"},
    "weight 2-D": {"w": "2d"},
    "residual float64": {"r": "double"},
    "residual broadcast": {"r": "row"},
    "input bf16": {"x": "bfloat16"},
    "input int64": {"x": "int"},
    "eps int": {"eps": 0},
    "eps negative": {"eps": -1.0},
    "shape int": {"shape": "int"},
    "shape wrong": {"shape": [2048]},
    "shape of a bool": {"shape": [True]},
    "shape negative": {"shape": [-1]},
    "shape empty": {"shape": []},
    "shape of two": {"shape": [8, 4096]},
    "shape torch.Size": {"shape": torch.Size([4096])},
}


def _variant(name: str, x: Tensor, r: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor, Any, float]:
    v = VARIANTS[name]
    conv = {
        "double": lambda t: t.double(),
        "bfloat16": lambda t: t.bfloat16(),
        "half width": lambda t: t[: t.shape[-1] // 2],
        "2d": lambda t: t[None],
        "row": lambda t: t[0],
        "int": lambda t: t.long(),
    }
    x, r, w = (conv[v[k]](t) if k in v else t for k, t in (("x", x), ("r", r), ("w", w)))
    shape = v.get("shape", [4096])
    return x, r, w, 4096 if shape == "int" else shape, v.get("eps", 1e-5)


@pytest.mark.usefixtures("training_claims_only")
@given(name=st.sampled_from(sorted(VARIANTS)), op=st.sampled_from(ROW_OPS[:4]), grad=st.booleans())
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_odd_arguments_give_torchs_errors_and_bits(name: str, op: str, grad: bool) -> None:
    x, r, w, b = _leaves(op, CLAIMED, ("odd", op))
    x, r, w, shape, eps = _variant(name, x, r, w)
    calls = {
        "layer_norm": lambda **k: NF.layer_norm(x, shape, w, b, eps, **k),
        "rms_norm": lambda **k: NF.rms_norm(x, shape, w, eps, **k),
        "add_layer_norm": lambda **k: NF.add_layer_norm(x, r, shape, w, b, eps, **k),
        "add_rms_norm": lambda **k: NF.add_rms_norm(x, r, shape, w, eps, **k),
    }
    with torch.set_grad_enabled(grad):
        _same_outcome(calls[op], lambda: calls[op](backend="torch"), (name, op, grad))


@pytest.mark.parametrize("op", ["nn.functional.layer_norm", "nn.functional.rms_norm"])
def test_op_db_samples_without_autograd_give_torchs_bits(op: str) -> None:
    """torch's own samples (float32, shapes and normalized_shape spellings torch wrote), under
    no_grad and with grad mode on and nothing requiring grad."""
    info = next(i for i in op_db() if i.name == op)
    fn = NF.layer_norm if "layer" in op else NF.rms_norm
    count = 0
    for sample in info.sample_inputs("cpu", torch.float32, requires_grad=False):
        for ctx in (torch.no_grad, contextlib.nullcontext):
            with ctx():
                _same_outcome(
                    lambda s=sample: fn(s.input, *s.args, **s.kwargs),
                    lambda s=sample: fn(s.input, *s.args, **s.kwargs, backend="torch"),
                    (op, sample),
                )
            count += 1
    assert count > 4


@pytest.mark.usefixtures("training_claims_only")
@given(
    rows=st.sampled_from([1, 3, 64, 255, 256, 257]),
    width=st.sampled_from([1, 7, 96, 1023, 1024, 1025, 4096]),
    lead=st.sampled_from([(), (2,)]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    spelling=st.sampled_from(["list", "torch.Size", "tuple"]),
    context=st.sampled_from(sorted(CONTEXTS)),
    op=st.sampled_from(ROW_OPS[:4]),
)
@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
def test_unrecorded_calls_of_any_size_give_torchs_bits(rows, width, lead, dtype, spelling, context, op) -> None:
    """Sizes on both sides of numba's small/large line (2**18 elements) and its short rows (1024):
    no unrecorded row-norm call is claimed by numba, so every one gives the torch backend's bits."""
    shape = (*lead, rows, width)
    x, r, w, b = _leaves(op, shape, ("any size", op, shape, str(dtype)), dtype)
    spell = {"list": list, "torch.Size": torch.Size, "tuple": tuple}[spelling]
    calls = {
        "layer_norm": lambda **k: (NF.layer_norm(x, spell([width]), w, b, 1e-5, **k),),
        "rms_norm": lambda **k: (NF.rms_norm(x, spell([width]), w, None, **k),),
        "add_layer_norm": lambda **k: NF.add_layer_norm(x, r, spell([width]), w, b, 1e-5, **k),
        "add_rms_norm": lambda **k: NF.add_rms_norm(x, r, spell([width]), w, None, **k),
    }
    with CONTEXTS[context]():
        _same_outcome(calls[op], lambda: calls[op](backend="torch"), (shape, dtype, spelling, context, op))


@pytest.mark.parametrize("spelling", ["list", "torch.Size"])
@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
def test_the_settled_add_norm_gets_a_tuple(op: str, spelling: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the settled backend's function receives on "auto" for an ordinary add-norm call."""
    B = sys.modules["normkit.backends"]
    seen: list[type] = []
    impl = B._REGISTRY["torch"].ops[op]

    def spy(fn: Callable[..., Any]) -> Callable[..., Any]:
        return lambda *a: seen.append(type(a[2])) or fn(*a)

    ops = {**B._REGISTRY["torch"].ops, op: impl._replace(fn=spy(impl.fn), plain=spy(impl.plain or impl.fn))}
    monkeypatch.setitem(B._REGISTRY, "torch", dataclasses.replace(B._REGISTRY["torch"], ops=ops))
    x, r, w, b = _leaves(op, (8, 64), ("settled", op))
    shape = [64] if spelling == "list" else torch.Size([64])
    if "rms" in op:
        NF.add_rms_norm(x, r, shape, w, None)
    else:
        NF.add_layer_norm(x, r, shape, w, b)
    assert seen and all(t is tuple for t in seen), seen


# ---- 2. transforms and tracers: torch's values and gradients ----------------------------------


@pytest.mark.parametrize("transform", ["grad", "vjp", "jvp", "vmap", "vmap(grad)", "functional_call", "no_grad(grad)"])
@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm", "layer_norm"])
def test_torch_func_matches_torch(op: str, transform: str) -> None:
    """torch.func's wrappers at the claimed size: the values and gradients of backend="torch"
    (within float32 rounding where numba runs), for each transform; random upstream gradients."""
    x, r, w, b = _leaves(op, CLAIMED, ("func", op))
    dy = _randn(*CLAIMED, seed=("func", op, "dy"))

    def run(**kw: Any) -> tuple[Tensor, ...]:
        def loss(x: Tensor, w: Tensor) -> Tensor:
            return (_call(op, x, r, w, b, **kw)[0] * dy).sum()

        if transform == "grad":
            return torch.func.grad(loss, argnums=(0, 1))(x, w)
        if transform == "no_grad(grad)":
            with torch.no_grad():  # (torch.func.grad ignores an outer no_grad)
                return torch.func.grad(loss, argnums=(0, 1))(x, w)
        if transform == "vjp":
            out, pull = torch.func.vjp(lambda x, w: _call(op, x, r, w, b, **kw)[0], x, w)
            return (out, *pull(dy))
        if transform == "jvp":
            return torch.func.jvp(lambda x: _call(op, x, r, w, b, **kw)[0], (x,), (dy,))
        if transform == "vmap":
            return (torch.func.vmap(lambda xx, rr: _call(op, xx[None], rr[None], w, b, **kw)[0][0])(x, r),)
        if transform == "vmap(grad)":
            g = torch.func.grad(lambda xx, rr, d: (_call(op, xx[None], rr[None], w, b, **kw)[0][0] * d).sum())
            return (torch.func.vmap(g)(x, r, dy),)
        norm = normkit.RMSNorm(4096, eps=1e-6) if "rms" in op else normkit.LayerNorm(4096)
        params = {"weight": w} | ({} if "rms" in op else {"bias": b})
        return (torch.func.grad(lambda p: (torch.func.functional_call(norm, p, (x,)) * dy).sum())(params)["weight"],)

    for mine, theirs in zip(run(), run(backend="torch"), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("shape", [CLAIMED, (300, 1024)], ids=str)
@pytest.mark.parametrize("requires", ["weight", "nothing"])
@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm"])
def test_jit_trace_with_a_captured_weight(op: str, requires: str, shape: tuple[int, int]) -> None:
    """torch.jit.trace of a call whose only tensor that may require grad is a captured weight
    (torch refuses to make it a constant): torch's outcome, word for word, and the trace reruns
    to torch's values, with grad mode on and off."""
    x, r, w, b = _leaves(op, shape, ("trace", op, shape))
    w.requires_grad_(requires == "weight")

    def trace(**kw: Any) -> Any:
        return torch.jit.trace(lambda x: _call(op, x, r, w, b, **kw)[0], (x,))

    (kind, traced), (kind_t, traced_t) = _outcome(trace), _outcome(lambda: trace(backend="torch"))
    assert (kind, traced if kind == "err" else None) == (kind_t, traced_t if kind_t == "err" else None)
    if kind == "ok":
        for ctx in (torch.no_grad, contextlib.nullcontext):
            with ctx():
                torch.testing.assert_close(traced[0](x), traced_t[0](x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm"])
def test_compile_fullgraph_under_no_grad(op: str, grad: bool) -> None:
    """torch.compile(fullgraph=True) of a list-shape call, under no_grad and with grad on:
    torch's values."""
    x, r, w, b = _leaves(op, CLAIMED, ("compile", op))
    torch._dynamo.reset()
    f = torch.compile(lambda x, w: _call(op, x, r, w, b)[0], backend="eager", fullgraph=True)
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(f(x, w), _call(op, x, r, w, b, backend="torch")[0], rtol=1e-6, atol=1e-6)


# ---- 3. numba's row launchers around PARALLEL_MIN_ELEMENTS -------------------------------------

# (rows, width): 65535, 65536, 65537 elements, and neighbours with odd widths; 2 x 32769 is split
# over threads while each of its rows alone is a small call.
THRESHOLD_SHAPES = [(255, 257), (256, 256), (1, 65537), (2, 32769), (257, 255), (128, 511), (1, 7), (3, 1)]


def _numba_step(op: str, x: Tensor, r: Tensor, w: Tensor | None, b: Tensor | None, dy: Tensor) -> list[Tensor]:
    """y (and residual_out), dx, dr, dw, db of one numba call, random upstream gradient."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, r, w, b)]
    outs = _call(op, leaves[0], leaves[1], leaves[2], leaves[3], backend="numba")
    grads = torch.autograd.grad(outs[0], [t for t in leaves if t is not None], dy, allow_unused=True)
    return [o.detach() for o in outs] + [g for g in grads if g is not None]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", THRESHOLD_SHAPES, ids=str)
@pytest.mark.parametrize("op", ROW_OPS)
def test_a_rows_bits_do_not_depend_on_the_batch(op: str, shape: tuple[int, int], threads: int) -> None:
    """The whole call and its first and last rows alone (a small call, the kernel run directly):
    the same bits of y, residual_out and dx at 1 and 2 threads."""
    x, r, w, b = _leaves(op, shape, ("invariant", op, shape))
    dy = _randn(*shape, seed=("invariant", op, shape, "dy"))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        whole = _numba_step(op, x, r, w, b, dy)
        n_out = 2 if op.startswith("add_") else 1
        keep = [*range(n_out), n_out, n_out + 1] if op.startswith("add_") else [0, 1]  # outputs, dx (dr)
        for rows in (slice(0, 1), slice(shape[0] - 1, shape[0])):
            part = _numba_step(op, x[rows], r[rows], w, b, dy[rows])
            for k in keep:
                assert torch.equal(part[k], whole[k][rows]), (k, rows)
    finally:
        torch.set_num_threads(before)


def _bound_check(mine: Tensor, theirs: Tensor, ref: Tensor, what: object) -> None:
    """The library's self-calibrating bound (normkit.testing.assert_within_bound): the error
    against float64 at most twice torch's in the same dtype, plus the tolerance table's floor."""
    assert_within_bound({str(what): mine}, {str(what): ref}, {str(what): theirs})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(255, 257), (256, 256), (2, 32769), (1, 7)], ids=str)
@pytest.mark.parametrize("op", ROW_OPS[:4])
def test_small_and_split_calls_within_twice_torchs_error(op: str, shape: tuple[int, int], dtype: torch.dtype) -> None:
    """y and every gradient against float64 autograd: within twice torch's own error in the
    same dtype; weight without bias for the LayerNorms (dw only)."""
    x, r, w, _ = _leaves(op, shape, ("bound", op, shape), dtype)
    dy = _randn(*shape, seed=("bound", op, shape, "dy"), dtype=dtype)
    mine = _numba_step(op, x, r, w, None, dy)
    leaves = [t.detach().clone().requires_grad_() for t in (x, r, w)]
    theirs = _call(op, *leaves[:3], None, backend="torch")
    theirs = [o.detach() for o in theirs] + list(
        torch.autograd.grad(theirs[0], leaves if op.startswith("add_") else [leaves[0], leaves[2]], dy)
    )
    l64 = [t.double().requires_grad_() for t in (x, r, w)]
    ref = _ref64(op, l64[0], l64[1], l64[2], None)
    refs = [ref.detach()] + ([(l64[0] + l64[1]).detach()] if op.startswith("add_") else [])
    refs += list(torch.autograd.grad(ref, l64 if op.startswith("add_") else [l64[0], l64[2]], dy.double()))
    assert len(mine) == len(theirs) == len(refs)
    for k, (m, t, ref_k) in enumerate(zip(mine, theirs, refs, strict=True)):
        assert m.shape == ref_k.shape and m.dtype == t.dtype, k
        _bound_check(m, t, ref_k, (op, k))


NONCONTIG = {
    "transposed": lambda t: t.t().contiguous().t(),
    "every other column": lambda t: torch.cat([t, t], -1)[:, ::2],
    "expanded row": lambda t: t[:1].expand_as(t),
}


@pytest.mark.parametrize("layout", list(NONCONTIG))
@pytest.mark.parametrize("shape", [(255, 257), (256, 256), (8, 64)], ids=str)
@pytest.mark.parametrize("op", ROW_OPS)
def test_layouts_give_the_contiguous_calls_bits(op: str, shape: tuple[int, int], layout: str) -> None:
    x, r, w, b = _leaves(op, shape, ("layout", op, shape))
    dy = _randn(*shape, seed=("layout", op, shape, "dy"))
    lay = NONCONTIG[layout]
    got = _numba_step(op, lay(x), lay(r), w, b, lay(dy))
    want = _numba_step(op, lay(x).contiguous(), lay(r).contiguous(), w, b, lay(dy).contiguous())
    for k, (mine, theirs) in enumerate(zip(got, want, strict=True)):
        assert mine.shape == theirs.shape and torch.equal(mine, theirs), k


@pytest.mark.parametrize("shape", [(0, 64), (0, 70000), (3, 0)], ids=str)
@pytest.mark.parametrize("op", ROW_OPS)
def test_zero_size_calls(op: str, shape: tuple[int, int]) -> None:
    """numba declines an empty input by name; "auto" gives torch's outcome, values and
    gradients (zero dw/db for no rows)."""
    x, r, w, b = _leaves(op, shape, ("zero", op, shape))
    with pytest.raises(normkit.BackendError, match="empty input"):
        _call(op, x, r, w, b, backend="numba")
    _same_outcome(lambda: _call(op, x, r, w, b), lambda: _call(op, x, r, w, b, backend="torch"), "forward")
    if shape[1]:
        leaves = [t.clone().requires_grad_() for t in (x, w)]
        y = _call(op, leaves[0], r, leaves[1], b)[0]
        y.backward(torch.zeros_like(y))
        assert not leaves[1].grad.any()


@pytest.mark.parametrize("shape", [(64, 4, 6), (4000, 4, 6)], ids=str)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_multi_dim_normalized_shape_gradients(op: str, shape: tuple[int, ...]) -> None:
    """A 2-D normalized_shape (the one-block dw/db's fallback allocation): dw/db of the weight's
    shape, within float32 rounding of float64."""
    x = _randn(*shape, seed=("2d", op, shape))
    w, b = _randn(*shape[1:], seed=("2d", op, "w")), _randn(*shape[1:], seed=("2d", op, "b"))
    dy = _randn(*shape, seed=("2d", op, "dy"))
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    if op == "layer_norm":
        y = NF.layer_norm(leaves[0], list(shape[1:]), leaves[1], leaves[2], backend="numba")
        ref = F.layer_norm(*(t.double() for t in leaves[:1]), shape[1:], leaves[1].double(), leaves[2].double())
    else:
        leaves = leaves[:2]
        y = NF.rms_norm(leaves[0], list(shape[1:]), leaves[1], 1e-6, backend="numba")
        ref = F.rms_norm(leaves[0].double(), shape[1:], leaves[1].double(), 1e-6)
    got = torch.autograd.grad(y, leaves, dy)
    want = torch.autograd.grad(ref, leaves, dy.double())
    for mine, theirs in zip(got, want, strict=True):
        assert mine.shape == theirs.shape
        torch.testing.assert_close(mine.double(), theirs.double(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op", ROW_OPS[:4])
def test_grad_accumulation_retain_graph_and_double_backward(op: str) -> None:
    """Two backward passes over a retained graph accumulate exactly twice the first (the same
    bits each pass), and the double backward matches torch's within float32 rounding."""
    shape = (16, 96)
    x, r, w, b = _leaves(op, shape, ("twice", op))
    dy = _randn(*shape, seed=("twice", op, "dy"))
    leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]
    y = _call(op, *leaves, backend="numba")[0]
    y.backward(dy, retain_graph=True)
    first = [t.grad.clone() for t in leaves if t.grad is not None]
    y.backward(dy)
    for t, g in zip([t for t in leaves if t.grad is not None], first, strict=True):
        assert torch.equal(t.grad, g + g)

    def gg(backend: str) -> tuple[Tensor, ...]:
        ls = [t.clone().requires_grad_() for t in (x, r, w, b)]
        y = _call(op, *ls, backend=backend)[0]
        (gx,) = torch.autograd.grad(y, ls[0], dy, create_graph=True)
        return torch.autograd.grad((gx * dy).sum(), [ls[0], ls[2]])

    for mine, theirs in zip(gg("numba"), gg("torch"), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


# ---- 4. the interpreter's share of the triton precisions (a fresh pytest per hash seed) --------

_COLLECT = textwrap.dedent(
    """
    import json, sys, pytest
    class Spy:
        def __init__(self): self.kept, self.dropped = [], []
        def pytest_deselected(self, items): self.dropped += items
        @pytest.hookimpl(trylast=True)
        def pytest_collection_modifyitems(self, items): self.kept = list(items)
    def row(item):
        p = getattr(getattr(item, "callspec", None), "params", {})
        return [item.nodeid, item.originalname, str(p.get("backend")), str(p.get("dtype")), str(p.get("param_dtype"))]
    spy = Spy()
    pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *sys.argv[1:]], plugins=[spy])
    print("@@" + json.dumps({"kept": [row(i) for i in spy.kept], "dropped": [row(i) for i in spy.dropped]}))
    """
)
_FILES = ["tests/test_parity.py", "tests/test_stricter.py", "tests/test_blocks_gated.py"]
_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def collections() -> dict[str, dict[str, list[list[str]]]]:
    """Kept and dropped items of _FILES under TRITON_INTERPRET=1 for two hash seeds, and with
    NORMKIT_TEST_ALL_PRECISIONS=1 (three processes at once)."""
    runs = {"seed 0": {"PYTHONHASHSEED": "0"}, "seed 4242": {"PYTHONHASHSEED": "4242"}}
    runs["all"] = {"PYTHONHASHSEED": "7", "NORMKIT_TEST_ALL_PRECISIONS": "1"}
    procs = {}
    for name, extra in runs.items():
        env = {**os.environ, "TRITON_INTERPRET": "1", **extra}
        env.pop("PYTEST_XDIST_WORKER", None)
        procs[name] = subprocess.Popen(
            [sys.executable, "-c", _COLLECT, *_FILES], cwd=_ROOT, env=env, stdout=subprocess.PIPE, text=True
        )
    out = {}
    for name, p in procs.items():
        text, _ = p.communicate(timeout=400)
        out[name] = json.loads(next(line for line in text.splitlines() if line.startswith("@@"))[2:])
    return out


def test_every_worker_makes_the_same_choice(collections: dict) -> None:
    assert collections["seed 0"]["kept"] == collections["seed 4242"]["kept"]
    assert collections["seed 0"]["dropped"], "nothing deselected: is TRITON_INTERPRET honoured?"
    assert not collections["all"]["dropped"]


def test_only_triton_low_precision_items_are_deselected(collections: dict) -> None:
    everything = {row[0] for row in collections["all"]["kept"]}
    kept = {row[0] for row in collections["seed 0"]["kept"]}
    dropped = collections["seed 0"]["dropped"]
    assert {row[0] for row in dropped} == everything - kept
    for nodeid, _, backend, dtype, param_dtype in dropped:
        assert backend == "triton", nodeid
        assert {dtype, param_dtype} - {"torch.float32", "torch.float64", "None"}, nodeid


# Found here and fixed in 3307ea0 (kept as the record of what the test guards):
_COVERAGE_DEFECT = (
    "interpreter_share.deselected kept one low-precision variant per case, picked by "
    "crc32(case) % len(variants): nothing made every variant of a test function run somewhere. "
    "Under TRITON_INTERPRET=1, test_parity.py::test_lazy_module_becomes_normkit_module_and_matches_"
    "torch ran (float16, float16 params) on none of its 8 triton cases, and test_stricter.py::"
    "test_low_precision_running_stats_rounded_once (one case) never ran one of bf16/fp16 on triton"
)


def _triton_low(rows: list[list[str]]) -> list[tuple[str, str, tuple[str, str]]]:
    """(function, case, precision) of the triton low-precision items of ``rows``; the case is
    the item's id without its precision parts."""
    out = []
    for nodeid, _, backend, dtype, param_dtype in rows:
        if backend != "triton" or not {dtype, param_dtype} - {"torch.float32", "torch.float64", "None"}:
            continue
        function, _, ids = nodeid.partition("[")
        case = "-".join(p for p in ids.rstrip("]").split("-") if not _PRECISION_ID.match(p))
        out.append((function, case, (dtype, param_dtype)))
    return out


_PRECISION_ID = re.compile(r"^(torch\.)?(bfloat16|float16|float32|float64|dtype\d+|params_\w+|\w+_weight)$")


def test_every_low_precision_variant_still_runs_somewhere(collections: dict) -> None:
    """For each test function, every (dtype, param_dtype) it runs on triton with everything
    collected still runs on triton on at least one case (see _COVERAGE_DEFECT)."""
    every, kept = _triton_low(collections["all"]["kept"]), _triton_low(collections["seed 0"]["kept"])
    want, have = defaultdict(set), defaultdict(set)
    for function, _, precision in every:
        want[function].add(precision)
    for function, _, precision in kept:
        have[function].add(precision)
    assert {f: sorted(v - have[f]) for f, v in want.items() if v - have[f]} == {}


def test_every_case_keeps_a_low_precision(collections: dict) -> None:
    """Each triton case that has low-precision variants keeps at least one of them."""
    every = {(f, c) for f, c, _ in _triton_low(collections["all"]["kept"])}
    kept = {(f, c) for f, c, _ in _triton_low(collections["seed 0"]["kept"])}
    assert len(every) > 100 and every == kept


# ---- 5. numba BatchNorm's one task per channel (0e34253): its route moves with the thread count


def _bn_step(x: Tensor, w: Tensor, b: Tensor, dy: Tensor, threads: int, training: bool) -> list[Tensor]:
    """y, dx, dw, db and the running statistics of one numba BatchNorm call at ``threads``."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rm, rv = _randn(x.shape[1], seed="rm"), _randn(x.shape[1], seed="rv").abs() + 0.5
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        y = NF.batch_norm(leaves[0], rm, rv, leaves[1], leaves[2], training, 0.1, 1e-5, backend="numba")
        return [y.detach(), *torch.autograd.grad(y, leaves, dy), rm, rv]
    finally:
        torch.set_num_threads(before)


# (N, C, H, W): a channel's segment just under and at 4 KiB, its samples at and over 1 MiB both
# ways (x; x and dy), and C below and at the thread count
BN_SHAPES = [(4, 1, 32, 32), (4, 1, 31, 33), (4, 2, 32, 32), (128, 2, 32, 32), (256, 2, 32, 32), (3, 5, 17, 61)]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=str)
def test_batch_norm_bits_do_not_move_with_the_thread_count(shape: tuple[int, ...], training: bool) -> None:
    """One and two threads (by channel at one, by segment at two where C is 1): the same bits of
    y, dx, dw, db and the running statistics (the numerics contract), and within twice torch's
    float32 error of float64."""
    x = _randn(*shape, seed=("bn", shape)) * 3 + 1
    w, b = _randn(shape[1], seed=("bn", "w")), _randn(shape[1], seed=("bn", "b"))
    dy = _randn(*shape, seed=("bn", shape, "dy"))
    one, two = _bn_step(x, w, b, dy, 1, training), _bn_step(x, w, b, dy, 2, training)
    for k, (a, c) in enumerate(zip(one, two, strict=True)):
        assert torch.equal(a, c), k
    ref = [t.double().requires_grad_() for t in (x, w, b)]
    rm, rv = _randn(shape[1], seed="rm").double(), (_randn(shape[1], seed="rv").abs() + 0.5).double()
    y = F.batch_norm(ref[0], rm, rv, ref[1], ref[2], training, 0.1, 1e-5)
    refs = [y.detach(), *torch.autograd.grad(y, ref, dy.double()), rm, rv]
    lt = [t.clone().requires_grad_() for t in (x, w, b)]
    rmt, rvt = _randn(shape[1], seed="rm"), _randn(shape[1], seed="rv").abs() + 0.5
    yt = F.batch_norm(lt[0], rmt, rvt, lt[1], lt[2], training, 0.1, 1e-5)
    theirs = [yt.detach(), *torch.autograd.grad(yt, lt, dy), rmt, rvt]
    for k, (m, t, r) in enumerate(zip(one, theirs, refs, strict=True)):
        _bound_check(m, t, r, ("batch_norm", k))


@pytest.mark.parametrize("op", ["rms_norm", "add_layer_norm", "normalize"])
def test_numba_calls_from_four_threads_give_sequential_bits(op: str) -> None:
    """Four Python threads calling numba's row norms at once, small (direct kernel) and split
    calls mixed, forward and backward: each result is the bits of the same call run alone."""
    shapes = [(8, 64), (300, 257), (2, 32769), (1, 7)]
    data = {s: (*_leaves(op, s, ("threads4", op, s)), _randn(*s, seed=("threads4", op, s, "dy"))) for s in shapes}
    alone = {s: _numba_step(op, *data[s]) for s in shapes}
    bad: list[object] = []

    def work(k: int) -> None:
        for i in range(6):
            s = shapes[(k + i) % len(shapes)]
            got = _numba_step(op, *data[s])
            if not all(torch.equal(a, b) for a, b in zip(got, alone[s], strict=True)):
                bad.append((k, s))

    _in_threads([lambda k=k: work(k) for k in range(4)])
    assert not bad


@pytest.mark.usefixtures("training_claims_only")
@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "grad on, nothing requires grad"])
@pytest.mark.parametrize("name", ["RMSNorm", "LayerNorm"])
def test_modules_without_autograd_give_torch_nns_bits(name: str, context: str) -> None:
    """normkit's module with torch.nn's state (random weights), at the claimed size, where
    autograd records nothing: torch.nn's bits (its parameters require grad; the call is not
    recorded)."""
    theirs = getattr(torch.nn, name)(4096, eps=1e-6)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(_randn(*p.shape, seed=("module", name, p.shape)))
    mine = getattr(normkit, name)(4096, eps=1e-6)
    mine.load_state_dict(theirs.state_dict())
    x = _randn(*CLAIMED, seed=("module", name, "x"))
    with CONTEXTS[context]():
        if context.startswith("grad on"):
            for m in (mine, theirs):
                m.requires_grad_(False)
        assert torch.equal(mine(x), theirs(x))


@pytest.mark.parametrize("backend", ["numba", "triton", "reference"])
@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm", "batch_norm", "group_norm", "modulated_layer_norm", "dyt"])
def test_every_kernel_backend_records_nothing_in_inference_mode(op: str, backend: str) -> None:
    """(DEFECTS["inference mode"]: triton's and the reference's block-norm Functions raised too.) Inside
    torch.inference_mode() with grad enabled, an input requiring grad: an inference tensor, no
    grad_fn, torch's values."""
    if backend not in normkit.backends():
        pytest.skip(f"{backend} is not available here")
    x = _randn(2, 6, 32, seed=("inference", op, "x")).requires_grad_()
    p = [_randn(n, seed=("inference", op, i)) for i, n in enumerate((32, 32, 6, 6))]
    calls = {
        "rms_norm": lambda **k: NF.rms_norm(x, [32], p[0], **k),
        "add_rms_norm": lambda **k: NF.add_rms_norm(x, x.detach() * 2, [32], p[0], **k)[0],
        "batch_norm": lambda **k: NF.batch_norm(x, None, None, p[2], p[3], training=True, **k),
        "group_norm": lambda **k: NF.group_norm(x, 3, p[2], p[3], **k),
        "modulated_layer_norm": lambda **k: NF.modulated_layer_norm(x, x.detach()[:, :1], x.detach()[:, 1:2] * 0.1,
                                                                    p[0], p[1], **k),
        "dyt": lambda **k: NF.dyt(x, torch.tensor(0.7), p[0], p[1], **k),
    }
    with torch.inference_mode(), torch.enable_grad():
        got, want = calls[op](backend=backend), calls[op](backend="reference")
    assert got.is_inference() and got.grad_fn is None
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm"])
def test_committed_no_grad_claims_run_numba(op: str) -> None:
    """Under no_grad at a size the committed table claims without autograd (add_rms_norm 8x4096,
    rms_norm 4096x1024), "auto" gives numba's bits; where it claims training only, torch's."""
    nb = pytest.importorskip("normkit.ops.numba.backend")
    if "numba" not in normkit.backends():
        pytest.skip("numba is not installed")
    for shape in (CLAIMED, (1024, 1024)):
        x, r, w, b = _leaves(op, shape, ("committed", op, shape))
        claimed = nb.shape_class(op, x, autograd=False) in nb.MEASURED_FASTER[op]
        with torch.no_grad():
            got = _call(op, x, r, w, b)
            want = _call(op, x, r, w, b, backend="numba" if claimed else "torch")
        for mine, theirs in zip(got, want, strict=True):
            assert torch.equal(mine, theirs), (shape, claimed)
