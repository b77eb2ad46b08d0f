"""The numba LayerNorm forward's one-pass statistics (:func:`_centred_stats` of
:mod:`normkit.ops.numba._row_kernels`): ``sum(d)`` and ``sum(d^2)`` of the row shifted by its
first element in one pass, the two-pass variance where the first element lies more than one
standard deviation from the mean.

* hard rows, float32: a large common offset with a small spread, seen from a first element
  near the mean (one pass) and from an outlying one (two passes), constant and two-valued
  rows, lengths within and beyond one sum chunk: ``mean`` and ``rstd`` against float64
  statistics of the same float32 values, and the outputs and gradients against torch in
  float64 within the self-calibrating bound;
* a batch mixing rows of both paths, split over 1-3 threads: each row's bits are those of the
  row computed alone.

Random weights, biases and upstream gradients throughout.
"""

from __future__ import annotations

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
_row_norm = pytest.importorskip("normkit.ops.numba.row_norm")
pytestmark = pytest.mark.skipif("numba" not in normkit.backends(), reason="numba backend not registered")

CHUNK = pytest.importorskip("normkit.ops.numba._row_kernels").CHUNK
LENGTHS = (5, 64, 1000, CHUNK, CHUNK + 37)
# rstd's error against float64 statistics of the same float32 values, in float32 ulps: the
# two-pass variance's is a few rounding errors of the sums; the one-pass one, kept only where
# mean^2 <= var, at most about three times that.
RSTD_ULPS = 16


def _hard_rows(L: int, seed: int) -> Tensor:
    """float32 rows that stress the statistics: offset 1e4 with spread 1e-2 (first element at
    the mean: one pass; first element 40 spreads out: two passes), offset -3e5 with spread 1,
    a spread of 1e3 around 0, an offset of 1 with spread 1e-5, a constant row, a row of two
    values and a row whose first element alone differs."""
    g = torch.Generator().manual_seed(seed)
    rows = [
        1e4 + 1e-2 * torch.randn(L, generator=g, dtype=torch.float64),
        1e4 + 1e-2 * torch.randn(L, generator=g, dtype=torch.float64),
        -3e5 + torch.randn(L, generator=g, dtype=torch.float64),
        1e3 * torch.randn(L, generator=g, dtype=torch.float64),
        1 + 1e-5 * torch.randn(L, generator=g, dtype=torch.float64),
        torch.full((L,), 7.25, dtype=torch.float64),
        torch.where(torch.arange(L) % 2 == 0, 3.0, -1.0).double(),
        torch.full((L,), -2.0, dtype=torch.float64),
    ]
    rows[0][0] = rows[0].mean()
    rows[1][0] = 1e4 + 0.4
    rows[7][0] = 5.0
    return torch.stack(rows).float()


@pytest.mark.parametrize("L", LENGTHS)
def test_hard_rows_statistics_match_float64(L: int) -> None:
    x = _hard_rows(L, seed_of(L, "hard stats"))
    w = torch.randn(L, generator=torch.Generator().manual_seed(seed_of(L, "w")))
    b = torch.randn(L, generator=torch.Generator().manual_seed(seed_of(L, "b")))
    _, _, mean, rstd = _row_norm._row_fwd_impl(x, None, w, b, 1e-5, False, False)
    x64 = x.double()
    pivot = x64[:, :1]
    want_mean = (x64 - pivot).mean(1)
    want_rstd = (x64.var(1, unbiased=False) + 1e-5).rsqrt()
    ulp = torch.finfo(torch.float32).eps
    # mean of the shifted row: within a few rounding errors of its sum's terms.
    spread = (x64 - pivot).abs().mean(1)
    assert ((mean.double() - want_mean).abs() <= 8 * ulp * spread + 1e-30).all(), (mean, want_mean)
    rel = ((rstd.double() - want_rstd) / want_rstd).abs()
    assert (rel <= RSTD_ULPS * ulp).all(), rel


@pytest.mark.parametrize("L", LENGTHS)
def test_hard_rows_within_the_bound(L: int) -> None:
    seed = seed_of(L, "hard bound")
    g = torch.Generator().manual_seed(seed)
    x = _hard_rows(L, seed).double()
    w, b = torch.randn(L, generator=g, dtype=torch.float64), torch.randn(L, generator=g, dtype=torch.float64)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    inputs = {"x": x, "w": w.float().double(), "b": b.float().double()}

    def results(fn, dtype: torch.dtype) -> dict[str, Tensor]:
        leaves = {k: v.to(dtype).requires_grad_() for k, v in inputs.items()}
        y = fn(leaves["x"], (L,), leaves["w"], leaves["b"], 1e-5)
        grads = torch.autograd.grad(y, list(leaves.values()), dy.to(dtype))
        return {"y": y, **{f"d{k}": v for k, v in zip(leaves, grads, strict=True)}}

    def numba(*args):
        return NF.layer_norm(*args, backend="numba")

    got = results(numba, torch.float32)
    assert_within_bound(got, results(TF.layer_norm, torch.float64), results(TF.layer_norm, torch.float32))
    # A constant row (and the row of two values's mirror image) normalizes to the bias exactly.
    assert torch.equal(got["y"][5].detach(), inputs["b"].float())


def test_rows_of_both_paths_bits_do_not_depend_on_batch_or_threads(monkeypatch) -> None:
    monkeypatch.setattr(_engine, "PARALLEL_MIN_ELEMENTS", 0)
    L = 300
    g = torch.Generator().manual_seed(seed_of("both paths"))
    x = torch.randn(37, L, generator=g) * 3 + 50
    x[::3, 0] = x[::3].mean(1)  # first element at the mean: one pass
    x[1::3, 0] += 30  # first element ten spreads out: two passes
    x = torch.cat([x, _hard_rows(L, seed_of("both paths", "hard"))])
    w, b = torch.randn(L, generator=g), torch.randn(L, generator=g)
    dy = torch.randn(x.shape, generator=g)

    def run(rows: Tensor, grads: Tensor) -> tuple[Tensor, ...]:
        xl = rows.clone().requires_grad_()
        y = NF.layer_norm(xl, (L,), w, b, backend="numba")
        (dx,) = torch.autograd.grad(y, xl, grads)
        return y.detach(), dx

    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            y, dx = run(x, dy)
            for i in range(x.shape[0]):
                y_alone, dx_alone = run(x[i : i + 1], dy[i : i + 1])
                where = f"row {i}, {threads} threads"
                assert torch.equal(y[i].view(torch.int32), y_alone[0].view(torch.int32)), f"y {where}"
                assert torch.equal(dx[i].view(torch.int32), dx_alone[0].view(torch.int32)), f"dx {where}"
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("op", "L", "dtype"),
    [("layer_norm", 2049, torch.float32), ("rms_norm", 2049, torch.float32), ("layer_norm", 4099, torch.bfloat16)],
    ids=str,
)
def test_streamed_outputs_equal_cached_ones(op: str, L: int, dtype: torch.dtype) -> None:
    """Outputs of at least ``STREAM_MIN_BYTES`` are written with non-temporal stores (rows not
    64-byte aligned here: element-wise ends around the streamed middle); the same rows in
    slices too small to stream give the same bits, y and dx."""
    kernels = pytest.importorskip("normkit.ops.numba._row_kernels")
    item = torch.finfo(dtype).bits // 8
    M = kernels.STREAM_MIN_BYTES // (L * item) + 3
    g = torch.Generator().manual_seed(seed_of(op, L, dtype, "stream"))
    x = (torch.randn(M, L, generator=g) * 2 + 1).to(dtype)
    w, b = torch.randn(L, generator=g).to(dtype), torch.randn(L, generator=g).to(dtype)
    dy = torch.randn(M, L, generator=g).to(dtype)

    def run(rows: Tensor, grads: Tensor) -> tuple[Tensor, Tensor]:
        xl = rows.clone().requires_grad_()
        if op == "layer_norm":
            y = NF.layer_norm(xl, (L,), w, b, backend="numba")
        else:
            y = NF.rms_norm(xl, (L,), w, backend="numba")
        (dx,) = torch.autograd.grad(y, xl, grads)
        return y.detach(), dx

    y, dx = run(x, dy)
    step = M // 8 + 1
    for lo in range(0, M, step):
        y_part, dx_part = run(x[lo : lo + step], dy[lo : lo + step])
        assert torch.equal(y[lo : lo + step].view(torch.int16), y_part.view(torch.int16)), f"y rows {lo}.."
        assert torch.equal(dx[lo : lo + step].view(torch.int16), dx_part.view(torch.int16)), f"dx rows {lo}.."
