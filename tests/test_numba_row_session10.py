"""The numba row norms' small-call path (:mod:`normkit.ops.numba.row_norm`, session 10).

A call below ``_engine.PARALLEL_MIN_ELEMENTS`` elements runs its kernel directly, with plain
``torch.empty_like`` outputs, and its one-block backward allocates ``dw``/``db`` like the weight
where they have its shape. What must hold:

* a row's ``y`` and ``dx`` are the same bits whether its call takes the small path or the split
  one (the same rows inside a larger batch, at 1 and 2 threads), LayerNorm and RMSNorm, plain
  and residual-add, float32 and bfloat16;
* ``dw``/``db`` have the parameters' shapes (one- and two-dimensional ``normalized_shape``) and
  dtypes (float32, and bfloat16 read through float32), each in storage of its own, plain
  tensors, within float32's bounds of the float64 reference; a missing weight or bias gets no
  gradient and the other one still does;
* the no-grad call gives the same bits as the recorded one.

Random inputs, weights, biases and upstream gradients throughout.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import normkit
from cases import seed_of

pytest.importorskip("numba")
_engine = pytest.importorskip("normkit.ops.numba._engine")
row_norm = pytest.importorskip("normkit.ops.numba.row_norm")
pytestmark = pytest.mark.skipif("numba" not in normkit.backends(), reason="numba backend not registered")

WIDTH = 1024
BIG_ROWS = 64  # 64 x 1024: at PARALLEL_MIN_ELEMENTS, split over the threads
SMALL_ROWS = 5  # a prime count of rows, far below it


def _norm(kind: str, x: Tensor, residual: Tensor | None, w: Tensor, b: Tensor, shape) -> Tensor:
    """The norm's output (``y + 2 * residual_out`` for the add-norms, so that both outputs
    carry a gradient)."""
    if kind == "layer_norm":
        return row_norm.layer_norm(x, shape, w, b, 1e-5)
    if kind == "rms_norm":
        return row_norm.rms_norm(x, shape, w, 1e-6)
    fn = row_norm.add_layer_norm if kind == "add_layer_norm" else row_norm.add_rms_norm
    args = (w, b, 1e-5) if kind == "add_layer_norm" else (w, 1e-6)
    y, residual_out = fn(x, residual, shape, *args)
    return y + 2 * residual_out


KINDS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")


def _inputs(kind: str, dtype: torch.dtype, seed: int, rows: int):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, WIDTH, generator=g) * 2 + 1).to(dtype)
    residual = torch.randn(rows, WIDTH, generator=g).to(dtype) if kind.startswith("add") else None
    w = torch.randn(WIDTH, generator=g).to(dtype)
    b = torch.randn(WIDTH, generator=g).to(dtype)
    dy = torch.randn(rows, WIDTH, generator=g).to(dtype)
    return x, residual, w, b, dy


def _grads(kind, x, residual, w, b, dy):
    """``(y, dx)`` of a recorded call and its backward."""
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    b = b.clone().requires_grad_()
    y = _norm(kind, x, residual, w, b, (WIDTH,))
    (dx,) = torch.autograd.grad(y, (x,), dy)
    return y.detach(), dx


@pytest.mark.parametrize("threads", (1, 2))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_small_call_rows_match_split_call(kind, dtype, threads):
    assert SMALL_ROWS * WIDTH < _engine.PARALLEL_MIN_ELEMENTS <= BIG_ROWS * WIDTH
    x, residual, w, b, dy = _inputs(kind, dtype, seed_of("rows", kind, dtype), BIG_ROWS)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y_big, dx_big = _grads(kind, x, residual, w, b, dy)
        lo = 17  # rows 17..21: inside the first thread's range at 2 threads
        part = slice(lo, lo + SMALL_ROWS)
        res = None if residual is None else residual[part]
        y_small, dx_small = _grads(kind, x[part], res, w, b, dy[part])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(y_small, y_big[part])
    assert torch.equal(dx_small, dx_big[part])
    assert dx_small.abs().sum() > 0  # (random weights and dy: a gradient that says something)


@pytest.mark.parametrize("kind", ("layer_norm", "rms_norm"))
def test_no_grad_call_same_bits(kind):
    x, _, w, b, _ = _inputs(kind, torch.float32, seed_of("nograd", kind), SMALL_ROWS)
    recorded = _norm(kind, x.clone().requires_grad_(), None, w.clone().requires_grad_(), b, (WIDTH,))
    with torch.no_grad():
        plain = _norm(kind, x, None, w, b, (WIDTH,))
    assert torch.equal(plain, recorded.detach())


def _reference_grads(kind, x, w, b, dy, shape):
    """``(dw, db)`` of torch in float64 (``db`` None for RMS)."""
    xd = x.double()
    wd = w.double().requires_grad_()
    bd = b.double().requires_grad_()
    if kind == "layer_norm":
        y = F.layer_norm(xd, shape, wd, bd, 1e-5)
        dw, db = torch.autograd.grad(y, (wd, bd), dy.double())
        return dw, db
    y = F.rms_norm(xd, shape, wd, 1e-6)
    (dw,) = torch.autograd.grad(y, (wd,), dy.double())
    return dw, None


@pytest.mark.parametrize(
    "with_weight,with_bias", ((True, True), (True, False), (False, True)), ids=("both", "weight", "bias")
)
@pytest.mark.parametrize("shape", ((64,), (4, 16)), ids=("1d", "2d"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("kind", ("layer_norm", "rms_norm"))
def test_small_call_parameter_gradients(kind, dtype, shape, with_weight, with_bias):
    if kind == "rms_norm" and not with_weight:
        pytest.skip("RMSNorm has no bias: nothing to differentiate")
    g = torch.Generator().manual_seed(seed_of("params", kind, dtype, shape, with_weight, with_bias))
    rows = 8
    x = torch.randn(rows, *shape, generator=g).to(dtype)
    w = torch.randn(shape, generator=g).to(dtype).requires_grad_(with_weight)
    b = torch.randn(shape, generator=g).to(dtype).requires_grad_(with_bias)
    dy = torch.randn(rows, *shape, generator=g).to(dtype)
    xg = x.clone().requires_grad_()
    if kind == "layer_norm":
        y = row_norm.layer_norm(xg, shape, w if with_weight else None, b if with_bias else None, 1e-5)
    else:
        y = row_norm.rms_norm(xg, shape, w, 1e-6)
    y.backward(dy)
    ref_w, ref_b = _reference_grads(kind, x, w.detach(), b.detach(), dy, shape)
    # float32 statistics over `rows` terms per element; bf16 results rounded once more
    rtol = 1e-5 if dtype == torch.float32 else 2 * 2.0**-8
    wanted = [(w, ref_w, with_weight)]
    if kind == "layer_norm":
        wanted.append((b, ref_b, with_bias))
    for p, ref, used in wanted:
        if not used:
            assert p.grad is None
            continue
        got = p.grad
        assert type(got) is Tensor and got.shape == p.shape and got.dtype == p.dtype
        scale = ref.abs().max().item()
        err = (got.double() - ref).abs().max().item()
        assert err <= rtol * scale + 1e-6 * math.sqrt(rows), (err, scale)
    if kind == "layer_norm" and with_weight and with_bias:
        assert w.grad.untyped_storage().data_ptr() != b.grad.untyped_storage().data_ptr()
        assert w.grad._base is None and b.grad._base is None


@pytest.mark.parametrize("layout", ("contiguous", "strided"))
@pytest.mark.parametrize("x_dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_bf16_parameters_read_as_float32(kind, x_dtype, layout):
    """bf16 weights and biases (widened by the launchers, or converted first where strided) give
    the bits of the same values passed as float32: outputs, dx, and dw/db before their rounding
    to bf16."""
    x, residual, w, b, dy = _inputs(kind, x_dtype, seed_of("bf16 params", kind, x_dtype), SMALL_ROWS)
    w16, b16 = w.to(torch.bfloat16), b.to(torch.bfloat16)
    if layout == "strided":  # every other element of a longer parameter
        w16 = torch.stack((w16, -w16), 1).reshape(-1)[::2]
        b16 = torch.stack((b16, -b16), 1).reshape(-1)[::2]
        assert not w16.is_contiguous()
    results = []
    for wp, bp in ((w16, b16), (w16.float(), b16.float())):
        xr = x.clone().requires_grad_()
        wr, br = wp.detach().clone().requires_grad_(), bp.detach().clone().requires_grad_()
        y = _norm(kind, xr, residual, wr, br, (WIDTH,))
        y.backward(dy)
        dw = wr.grad.float()
        db = br.grad.float() if br.grad is not None else None
        results.append((y.detach(), xr.grad, dw, db))
    (y16, dx16, dw16, db16), (y32, dx32, dw32, db32) = results
    assert torch.equal(y16, y32) and torch.equal(dx16, dx32)
    # bf16 parameters get their gradients rounded once from the float32 sums
    assert torch.equal(dw16, dw32.to(torch.bfloat16).float())
    if db32 is not None:
        assert torch.equal(db16, db32.to(torch.bfloat16).float())
    assert dw32.abs().sum() > 0
