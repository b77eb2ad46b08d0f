"""The numba row kernels' own paths (:mod:`normkit.ops.numba._row_kernels`), beyond the contract
tests of ``tests/test_numba.py``:

* every row length from 1 to 33 (the vectorized sums' and loops' remainders at any vector
  width up to 32 lanes) and lengths around and beyond one sum chunk (``CHUNK``: the chunked
  sums of long rows), LayerNorm, RMSNorm and their residual-add forms, forward and backward,
  float32, bfloat16 and float64, against torch in float64 with the self-calibrating bound;
* the rows the forward finishes on its scaled path (variance overflowing, zero with
  ``eps=0``, NaN) placed among ordinary rows and split over threads: each row's bits are those
  of the row computed alone;
* the backward's one-pass weight/bias terms: bits independent of the thread count on long rows,
  and a weight or bias gradient asked for alone equal to the one computed with both.

Random weights, biases and upstream gradients throughout.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as TF
from torch import Tensor

import normkit
import normkit.functional as NF
from cases import seed_of
from normkit.testing import assert_within_bound

pytest.importorskip("numba")
_engine = pytest.importorskip("normkit.ops.numba._engine")
_kernels = pytest.importorskip("normkit.ops.numba._row_kernels")
pytestmark = pytest.mark.skipif("numba" not in normkit.backends(), reason="numba backend not registered")

CHUNK = _kernels.CHUNK
LENGTHS = [*range(1, 34), CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 3]
DTYPES = (torch.float32, torch.bfloat16, torch.float64)
# Centred ops take a bias; the add forms also return (and differentiate) residual_out.
CENTRED = ("layer_norm", "add_layer_norm")


def _torch_op(op: str) -> Callable[..., tuple[Tensor, ...]]:
    """torch's twin of ``op`` on (x, residual, w, b): the oracle (in float64) and the baseline."""

    def run(x, r, w, b):
        h = x + r if op.startswith("add_") else x
        L = (x.shape[-1],)
        y = TF.layer_norm(h, L, w, b, 1e-5) if op in CENTRED else TF.rms_norm(h, L, w, 1e-6)
        return (y, h) if op.startswith("add_") else (y,)

    return run


def _numba_op(op: str) -> Callable[..., tuple[Tensor, ...]]:
    def run(x, r, w, b):
        L = (x.shape[-1],)
        if op == "layer_norm":
            return (NF.layer_norm(x, L, w, b, 1e-5, backend="numba"),)
        if op == "rms_norm":
            return (NF.rms_norm(x, L, w, 1e-6, backend="numba"),)
        if op == "add_layer_norm":
            return tuple(NF.add_layer_norm(x, r, L, w, b, 1e-5, backend="numba"))
        return tuple(NF.add_rms_norm(x, r, L, w, 1e-6, backend="numba"))

    return run


def _results(
    fn: Callable[..., tuple[Tensor, ...]], op: str, inputs: dict[str, Tensor], dys: list[Tensor], dtype: torch.dtype
) -> dict[str, Tensor]:
    """Outputs and the gradients of every input, ``fn`` run on ``inputs`` cast to ``dtype``."""
    leaves = {k: v.to(dtype).requires_grad_() for k, v in inputs.items()}
    outs = fn(leaves["x"], leaves.get("r"), leaves["w"], leaves.get("b"))
    grads = torch.autograd.grad(outs, list(leaves.values()), [d.to(o.dtype) for d, o in zip(dys, outs, strict=True)])
    names = ["y", "residual_out"][: len(outs)]
    return {**dict(zip(names, outs, strict=True)), **{f"d{k}": g for k, g in zip(leaves, grads, strict=True)}}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("op", ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"))
def test_every_remainder_and_chunked_length_within_the_bound(op: str, L: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(seed_of(op, L, "rows"))
    M = 5
    inputs = {
        "x": torch.randn(M, L, generator=g, dtype=torch.float64) * 2 + 0.5,
        "w": torch.randn(L, generator=g, dtype=torch.float64),
    }
    if op.startswith("add_"):
        inputs["r"] = torch.randn(M, L, generator=g, dtype=torch.float64)
    if op in CENTRED:
        inputs["b"] = torch.randn(L, generator=g, dtype=torch.float64)
    # Round the inputs to the case's dtype first: every run then sees the same values.
    inputs = {k: v.to(dtype).double() for k, v in inputs.items()}
    dys = [torch.randn(M, L, generator=g, dtype=torch.float64) for _ in range(2 if op.startswith("add_") else 1)]
    got = _results(_numba_op(op), op, inputs, dys, dtype)
    want = _results(_torch_op(op), op, inputs, dys, torch.float64)
    base = _results(_torch_op(op), op, inputs, dys, dtype)
    assert_within_bound(got, want, base)


def _unusual_batch(L: int, seed: int) -> tuple[Tensor, list[int]]:
    """Ordinary rows with, at scattered positions, rows the forward finishes on its scaled path:
    squares overflowing float32, a constant row (variance 0 with eps=0), values whose variance
    underflows, a NaN and an infinity."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(41, L, generator=g)
    specials = {
        3: torch.randn(L, generator=g) * 1e20,
        10: torch.full((L,), -2.5),
        17: torch.randn(L, generator=g) * 1e-30,
        25: torch.randn(L, generator=g),
        33: torch.randn(L, generator=g) + 4,
    }
    specials[25][L // 2] = float("nan")
    specials[33][0] = float("inf")
    for i, row in specials.items():
        x[i] = row
    return x, sorted(specials)


@pytest.mark.parametrize("op", ("layer_norm", "rms_norm"))
@pytest.mark.parametrize("L", (7, 300, CHUNK + 9))
def test_scaled_path_rows_among_ordinary_ones(op: str, L: int, monkeypatch) -> None:
    monkeypatch.setattr(_engine, "PARALLEL_MIN_ELEMENTS", 0)
    x, specials = _unusual_batch(L, seed_of(op, L, "unusual"))
    if op == "rms_norm":
        x[10] = 0.0  # RMSNorm's zero variance: a zero row
    w = torch.randn(L, generator=torch.Generator().manual_seed(seed_of(op, "w")))
    b = torch.randn(L, generator=torch.Generator().manual_seed(seed_of(op, "b")))

    def run(rows: Tensor) -> Tensor:
        wd, bd = w.to(rows.dtype), b.to(rows.dtype)
        if op == "layer_norm":
            return NF.layer_norm(rows, (L,), wd, bd, eps=0.0, backend="numba")
        return NF.rms_norm(rows, (L,), wd, eps=0.0, backend="numba")

    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            y = run(x)
            for i in range(x.shape[0]):
                alone = run(x[i : i + 1])[0]
                assert torch.equal(y[i].view(torch.int32), alone.view(torch.int32)), f"row {i} at {threads} threads"
    finally:
        torch.set_num_threads(before)
    # The overflowing and underflowing rows normalize as in float64 (torch's float32 gives
    # inf/NaN or 0 there); a row of variance 0 gives the bias (LayerNorm) or zeros (RMSNorm).
    for i in (3, 17):
        ref = run(x[i : i + 1].double() * (1e-20 if i == 3 else 1e30)).float()
        torch.testing.assert_close(y[i : i + 1], ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[10], b if op == "layer_norm" else torch.zeros(L))
    assert y[25].isnan().all()
    assert torch.isfinite(y[[i for i in range(x.shape[0]) if i not in specials]]).all()


@pytest.mark.parametrize("op", ("layer_norm", "rms_norm", "add_layer_norm"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_long_rows_bits_do_not_depend_on_thread_count(op: str, dtype: torch.dtype, monkeypatch) -> None:
    monkeypatch.setattr(_engine, "PARALLEL_MIN_ELEMENTS", 0)
    L, M = CHUNK + 5, 70  # chunked sums; 5 blocks (4 of 16 rows, 1 of 6) for the weight/bias partials
    g = torch.Generator().manual_seed(seed_of(op, dtype, "long"))
    inputs = {
        "x": torch.randn(M, L, generator=g, dtype=torch.float64),
        "w": torch.randn(L, generator=g, dtype=torch.float64),
    }
    if op.startswith("add_"):
        inputs["r"] = torch.randn(M, L, generator=g, dtype=torch.float64)
    if op in CENTRED:
        inputs["b"] = torch.randn(L, generator=g, dtype=torch.float64)
    dys = [torch.randn(M, L, generator=g, dtype=torch.float64) for _ in range(2 if op.startswith("add_") else 1)]
    before = torch.get_num_threads()
    try:
        runs = {}
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs[threads] = _results(_numba_op(op), op, inputs, dys, dtype)
    finally:
        torch.set_num_threads(before)
    for threads, r in runs.items():
        for name, t in r.items():
            assert torch.equal(t.view(-1).view(torch.uint8), runs[1][name].view(-1).view(torch.uint8)), (
                f"{name} at {threads} threads"
            )


@pytest.mark.parametrize("L", (33, CHUNK + 1))
def test_weight_or_bias_gradient_alone_equals_both(L: int) -> None:
    g = torch.Generator().manual_seed(seed_of(L, "alone"))
    x, dy = torch.randn(300, L, generator=g), torch.randn(300, L, generator=g)
    w, b = torch.randn(L, generator=g), torch.randn(L, generator=g)

    def grads(need_w: bool, need_b: bool) -> list[Tensor | None]:
        wl, bl = w.clone().requires_grad_(need_w), b.clone().requires_grad_(need_b)
        xl = x.clone().requires_grad_()
        y = NF.layer_norm(xl, (L,), wl, bl, backend="numba")
        y.backward(dy)
        return [xl.grad, wl.grad, bl.grad]

    dx, dw, db = grads(True, True)
    only_w, only_b = grads(True, False), grads(False, True)
    assert torch.equal(only_w[0], dx) and torch.equal(only_w[1], dw) and only_w[2] is None
    assert torch.equal(only_b[0], dx) and only_b[1] is None and torch.equal(only_b[2], db)


def test_rms_norm_keeps_the_sign_of_zero() -> None:
    """y = x * rstd * w, as torch's rms_norm: a -0.0 input gives -0.0 times the sign of w."""
    x = torch.tensor([[-0.0, 0.0, 1.0, -2.0]])
    w = torch.tensor([1.5, -1.5, 1.0, 1.0])
    got = NF.rms_norm(x, (4,), w, backend="numba")
    want = TF.rms_norm(x, (4,), w)
    assert torch.equal(torch.signbit(got), torch.signbit(want))
