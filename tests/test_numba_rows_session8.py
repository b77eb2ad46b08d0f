"""The numba row norms' weight/bias gradient blocks (:mod:`normkit.ops.numba.row_norm`,
``_bwd_block``: one up to ``MAX_BLOCKS`` rows, else at most ``MAX_BLOCKS`` blocks of at least
``MIN_BLOCK_ROWS`` rows), and the block norms that share them (:mod:`normkit.ops.numba.blocks`):

* ``dw``/``db`` are exactly the documented sums: each block's per-row terms added in row order
  from zero, then the blocks added in block order; at 1, 2 and 3 threads (every call split,
  however small), for row counts around each edge (one block, two, the 16-row minimum, the
  32-block maximum), float32 and bfloat16 input, LayerNorm and RMSNorm, with and without a
  residual gradient;
* ``dx`` of a row does not depend on its batch (whatever blocks the batch makes);
* no rows (the launcher): the weight/bias gradients are zeros, as torch's;
* the modulated norm's blocks never cross a modulation row unless they hold whole ones, and
  cover every row once; the block norms' results at the new block sizes are the same bits at
  1, 2 and 3 threads and match the reference backend in float64.

Random inputs, weights, biases and upstream gradients throughout.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import normkit
import normkit.functional as NF
from cases import seed_of

pytest.importorskip("numba")
_engine = pytest.importorskip("normkit.ops.numba._engine")
row_norm = pytest.importorskip("normkit.ops.numba.row_norm")
blocks = pytest.importorskip("normkit.ops.numba.blocks")
pytestmark = pytest.mark.skipif("numba" not in normkit.backends(), reason="numba backend not registered")

# Row counts: one block (1, 17, 32), just past it (33: 16 + 16 + 1), two blocks of 16 plus a
# remainder (40), the 64-row case the minimum was made for, uneven blocks (300), the last size
# with 16-row blocks (512) and the first past it (513: 32 blocks of 17 rows and a short last one).
ROWS = (1, 17, 32, 33, 40, 64, 300, 512, 513)
THREADS = (1, 2, 3)


@pytest.fixture
def split_every_call(monkeypatch):
    """Every launch split over the threads, however small; the thread count restored after."""
    monkeypatch.setattr(_engine, "PARALLEL_MIN_ELEMENTS", 0)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _expected_sums(x: Tensor, dy: Tensor, mean: Tensor, rstd: Tensor, is_rms: bool) -> tuple[Tensor, Tensor]:
    """``(dw, db)`` as documented: per block of ``_bwd_block(M)`` rows, ``dy * x_hat`` and ``dy``
    added from zero in row order, the blocks then added in block order (float32; ``x_hat`` as the
    kernel forms it from the saved shifted mean and rstd)."""
    xf, g = x.float(), dy.float()
    if is_rms:
        x_hat = xf * rstd[:, None]
    else:
        x_hat = ((xf - xf[:, :1]) - mean[:, None]) * rstd[:, None]
    terms_w, M = g * x_hat, x.shape[0]
    block = row_norm._bwd_block(M)
    parts_w, parts_b = [], []
    for lo in range(0, M, block):
        pw, pb = torch.zeros(x.shape[1]), torch.zeros(x.shape[1])
        for i in range(lo, min(M, lo + block)):
            pw = pw + terms_w[i]
            pb = pb + g[i]
        parts_w.append(pw)
        parts_b.append(pb)
    dw, db = parts_w[0], parts_b[0]
    for pw, pb in zip(parts_w[1:], parts_b[1:], strict=True):
        dw, db = dw + pw, db + pb
    return dw, db


@pytest.mark.parametrize("with_dres", (False, True), ids=("plain", "residual"))
@pytest.mark.parametrize("is_rms", (False, True), ids=("layer_norm", "rms_norm"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("M", ROWS)
def test_weight_grads_are_block_sums_in_order_at_any_thread_count(
    M, dtype, is_rms, with_dres, split_every_call
) -> None:
    L = 67
    g = torch.Generator().manual_seed(seed_of(M, dtype, is_rms, with_dres, "blocks8"))
    x = (torch.randn(M, L, generator=g) * 2 + 3).to(dtype)
    w, b = torch.randn(L, generator=g), torch.randn(L, generator=g)
    dy = torch.randn(M, L, generator=g).to(dtype)
    dres = torch.randn(M, L, generator=g).to(dtype) if with_dres else None
    _, _, mean, rstd = row_norm._row_fwd_impl(x, None, w, None if is_rms else b, 1e-5, is_rms, False)
    want_w, want_b = _expected_sums(x, dy, mean, rstd, is_rms)
    for n in THREADS:
        torch.set_num_threads(n)
        _, dw, db = row_norm._launch_bwd(dy, x, w, mean.data_ptr(), rstd.data_ptr(), dres, is_rms, True, True, L, (L,))
        assert torch.equal(dw.view(torch.int32), want_w.view(torch.int32)), f"dw, M={M} at {n} threads"
        if not is_rms:
            assert torch.equal(db.view(torch.int32), want_b.view(torch.int32)), f"db, M={M} at {n} threads"


@pytest.mark.parametrize("op", ("layer_norm", "rms_norm"))
def test_a_rows_input_gradient_does_not_depend_on_its_batch(op: str, split_every_call) -> None:
    L = 300
    g = torch.Generator().manual_seed(seed_of(op, "batch8"))
    x, dy = torch.randn(513, L, generator=g) * 3 + 1, torch.randn(513, L, generator=g)
    w, b = torch.randn(L, generator=g), torch.randn(L, generator=g)

    def dx_of(rows: slice) -> Tensor:
        xl = x[rows].clone().requires_grad_()
        if op == "layer_norm":
            y = NF.layer_norm(xl, (L,), w, b, backend="numba")
        else:
            y = NF.rms_norm(xl, (L,), w, backend="numba")
        return torch.autograd.grad(y, xl, dy[rows])[0]

    torch.set_num_threads(2)
    whole = dx_of(slice(None))
    for lo, hi in ((0, 1), (5, 22), (100, 164), (13, 313)):
        assert torch.equal(dx_of(slice(lo, hi)), whole[lo:hi]), f"rows {lo}..{hi}"


def test_no_rows_give_zero_weight_and_bias_gradients() -> None:
    """The launcher's zero-row backward (the backend declines empty input, but the custom ops
    and blocks of their own reach it): one block of no rows, dw and db zero, as torch's."""
    L = 16
    g = torch.Generator().manual_seed(seed_of("no rows"))
    x, w = torch.empty(0, L), torch.randn(L, generator=g)
    mean = rstd = torch.empty(0)
    dx, dw, db = row_norm._launch_bwd(
        torch.empty(0, L), x, w, mean.data_ptr(), rstd.data_ptr(), None, False, True, True, L, (L,)
    )
    assert dx.shape == (0, L)
    assert torch.equal(dw, torch.zeros(L)) and torch.equal(db, torch.zeros(L))


@pytest.mark.parametrize("M", (1, 16, 17, 64, 100, 510, 512, 640, 4096))
def test_modulation_blocks_cover_every_row_once_within_a_modulation_row(M: int) -> None:
    for rows in (r for r in range(1, M + 1) if M % r == 0):
        cpb, spb, n = blocks._mod_blocks(M, rows)
        assert cpb == 1 or spb == 1, (M, rows)
        S, chunk = M // rows, -(-rows // cpb)
        seen = []
        for blk in range(n):  # the rows of block blk, as mod_bwd walks them
            c, s_lo = blk % cpb, (blk // cpb) * spb
            mine = [
                i
                for s in range(s_lo, min(S, s_lo + spb))
                for i in range(s * rows + c * chunk, min(s * rows + (c + 1) * chunk, (s + 1) * rows))
            ]
            samples = {i // rows for i in mine}
            assert spb > 1 or len(samples) <= 1, f"M={M} rows={rows}: block {blk} crosses a modulation row"
            assert cpb > 1 or len(mine) == len(samples) * rows, f"M={M} rows={rows}: block {blk} splits a row"
            seen += mine
        assert sorted(seen) == list(range(M)), f"M={M} rows={rows}"
        assert n <= 2 * math.ceil(M / row_norm._bwd_block(M)), f"M={M} rows={rows}: {n} blocks"


def _block_op(name: str, M: int, g: torch.Generator, dtype: torch.dtype) -> tuple[dict[str, Tensor], object]:
    """Leaves and a call of block op ``name`` on ``M`` rows of 40."""
    D = 40

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()

    if name.startswith("modulated"):
        per_token = name.endswith("token")
        N, T = (1, M) if per_token else (4, M // 4)
        mod = (N, T, D) if per_token else (N, 1, D)
        leaves = {"x": leaf(N, T, D), "shift": leaf(*mod), "scale": leaf(*mod), "w": leaf(D), "b": leaf(D)}
        return leaves, lambda be: NF.modulated_layer_norm(*leaves.values(), backend=be)
    if name == "gated":
        leaves = {"x": leaf(M, D), "gate": leaf(M, D), "w": leaf(D)}
        return leaves, lambda be: NF.gated_rms_norm(*leaves.values(), group_size=10, backend=be)
    if name == "sandwich":
        leaves = {"h": leaf(M, D), "r": leaf(M, D), "w1": leaf(D), "w2": leaf(D)}
        return leaves, lambda be: NF.sandwich_rms_norm(*leaves.values(), weight_offset=1.0, backend=be)
    leaves = {"x": leaf(M, D), "alpha": leaf(1), "w": leaf(D), "b": leaf(D)}
    return leaves, lambda be: NF.dyt(*leaves.values(), backend=be)


def _grads(leaves: dict[str, Tensor], call, backend: str, seed: int) -> list[Tensor]:
    out = call(backend)
    out = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed)
    dys = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in out]
    return [*out, *torch.autograd.grad(out, list(leaves.values()), dys)]


@pytest.mark.parametrize("M", (20, 36, 64, 200))
@pytest.mark.parametrize("name", ("modulated per sample", "modulated per token", "gated", "sandwich", "dyt"))
def test_block_norms_at_the_new_block_sizes(name: str, M: int, split_every_call) -> None:
    """Same bits at 1, 2, 3 threads (float32), and the reference backend's results in float64."""
    seed = seed_of(name, M, "block norms 8")
    runs = []
    for n in THREADS:
        torch.set_num_threads(n)
        leaves, call = _block_op(name, M, torch.Generator().manual_seed(seed), torch.float32)
        runs.append(_grads(leaves, call, "numba", seed + 1))
    for n, run in zip(THREADS[1:], runs[1:], strict=True):
        for i, (a, b) in enumerate(zip(runs[0], run, strict=True)):
            assert torch.equal(a, b), f"{name} M={M}: result {i} differs at {n} threads"
    leaves, call = _block_op(name, M, torch.Generator().manual_seed(seed), torch.float64)
    got = _grads(leaves, call, "numba", seed + 1)
    leaves, call = _block_op(name, M, torch.Generator().manual_seed(seed), torch.float64)
    want = _grads(leaves, call, "reference", seed + 1)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"{name} M={M}: result {i}")
