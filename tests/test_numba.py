"""The numba backend's own contract, beyond the table-driven parity tests every backend runs.

* Deterministic: bit-identical results (output, input and parameter gradients) at 1, 2 and
  more threads (``torch.set_num_threads``), and on repeated runs.
* Batch-invariant: a row computed alone and inside batches of 1..257 rows, at any position,
  gives the same bits (output and input gradient).
* Calls from several Python threads at once run (numba's workqueue layer would abort the
  process on concurrent launches) and give the single-thread bits.
* ``torch.compile(fullgraph=True)`` traces through the custom ops (no graph break).
* What it declines, with the reason (float16, non-CPU tensors), and float64 gradients
  checked numerically.

Random weights, biases and upstream gradients throughout (never unit weights with
``y.sum()``, which make the input gradient vanish).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import normkit
import normkit.functional as NF
from cases import seed_of
from normkit.backends import BackendError

pytest.importorskip("numba")
_engine = pytest.importorskip("normkit.ops.numba._engine")
pytestmark = pytest.mark.skipif("numba" not in normkit.backends(), reason="numba backend not registered")

L = 37  # odd: the vectorized sums' remainder path too


def _params(n: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g), torch.randn(n, generator=g)


# name -> (x, w, b, dy) -> the tensors whose bits must agree (output(s), then gradients).
def _layer_norm(x, w, b):
    return (NF.layer_norm(x, (x.shape[-1],), w, b, backend="numba"),)


def _rms_norm(x, w, b):
    return (NF.rms_norm(x, (x.shape[-1],), w, backend="numba"),)


def _add_layer_norm(x, w, b):
    # Fixed per column (the same for every row: batch-invariance tests put rows anywhere).
    residual = torch.linspace(-2, 3, x.shape[-1], dtype=x.dtype).expand(x.shape).contiguous()
    return NF.add_layer_norm(x, residual, (x.shape[-1],), w, b, backend="numba")


def _add_rms_norm(x, w, b):
    return NF.add_rms_norm(x, None, (x.shape[-1],), w, backend="numba")


def _normalize(x, w, b):
    return (NF.normalize(x, (-1,), w, b, center=False, backend="numba"),)


OPS: dict[str, Callable[..., tuple[Tensor, ...]]] = {
    "layer_norm": _layer_norm,
    "rms_norm": _rms_norm,
    "add_layer_norm": _add_layer_norm,
    "add_rms_norm": _add_rms_norm,
    "normalize": _normalize,
}
DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def _run(op: str, x: Tensor, dtype: torch.dtype, seed: int) -> list[Tensor]:
    """Outputs, then the gradients of x, weight and bias under random upstream gradients."""
    w, b = (p.to(dtype).requires_grad_() for p in _params(x.shape[-1], seed))
    x = x.detach().to(dtype).requires_grad_()
    outs = OPS[op](x, w, b)
    g = torch.Generator().manual_seed(seed + 1)
    dys = [torch.randn(o.shape, generator=g).to(o.dtype) for o in outs]
    inputs = [x, w] + ([b] if op in ("layer_norm", "add_layer_norm", "normalize") else [])
    grads = torch.autograd.grad(outs, inputs, dys, allow_unused=True)
    return [t.detach() for t in (*outs, *grads) if t is not None]


def _assert_bits(a: list[Tensor], b: list[Tensor], what: str) -> None:
    assert len(a) == len(b)
    for i, (s, t) in enumerate(zip(a, b, strict=True)):
        assert torch.equal(s.view(-1).view(torch.uint8), t.view(-1).view(torch.uint8)), f"{what}: tensor {i} differs"


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_bits_do_not_depend_on_thread_count(op: str, dtype: torch.dtype, restore_threads, monkeypatch) -> None:
    # Every call split over the threads, however small (a real run splits from 2^16 elements).
    monkeypatch.setattr(_engine, "PARALLEL_MIN_ELEMENTS", 0)
    # 300 rows: several blocks of the backward's weight/bias partial sums, split unevenly.
    x = torch.randn(300, L, generator=torch.Generator().manual_seed(seed_of(op)))
    results = {}
    for n in (1, 2, 3, 8):
        torch.set_num_threads(n)
        results[n] = _run(op, x, dtype, seed_of(op, "params"))
    again = _run(op, x, dtype, seed_of(op, "params"))
    for n, r in results.items():
        _assert_bits(results[1], r, f"{op} {dtype} at {n} threads")
    _assert_bits(results[8], again, f"{op} {dtype} run twice")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("op", ("layer_norm", "rms_norm", "add_layer_norm"))
def test_a_row_does_not_depend_on_its_batch(op: str, dtype: torch.dtype, restore_threads) -> None:
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(seed_of(op, "batch"))
    row = torch.randn(1, L, generator=g) * 3 + 1
    w, b = (p.to(dtype) for p in _params(L, seed_of(op, "w")))
    dy_row = torch.randn(1, L, generator=g)

    def row_result(batch: Tensor, at: int) -> list[Tensor]:
        x = batch.to(dtype).requires_grad_()
        outs = OPS[op](x, w, b)
        dy = torch.randn(batch.shape, generator=g)
        dy[at] = dy_row
        dx = torch.autograd.grad(outs[0], x, dy.to(dtype))[0]
        return [outs[0][at].detach(), dx[at]]

    alone = row_result(row, 0)
    for m in (2, 7, 64, 257):
        batch = torch.randn(m, L, generator=g) * 10
        at = (m * 5) // 7
        batch[at] = row[0]
        _assert_bits(alone, row_result(batch, at), f"{op} {dtype}: row {at} of {m}")


def test_concurrent_calls_from_python_threads(restore_threads) -> None:
    torch.set_num_threads(2)
    x = torch.randn(513, 129, generator=torch.Generator().manual_seed(seed_of("concurrent")))
    expected = _run("layer_norm", x, torch.float32, 3)
    barrier = threading.Barrier(4, timeout=60)
    results: list[object] = [None] * 4

    def body(i: int) -> None:
        barrier.wait()
        try:
            results[i] = [_run("layer_norm", x, torch.float32, 3) for _ in range(5)]
        except BaseException as e:  # reported below, in the main thread
            results[i] = e

    threads = [threading.Thread(target=body, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for r in results:
        assert isinstance(r, list), r
        for got in r:
            _assert_bits(expected, got, "a concurrent call")


def test_compiles_fullgraph_without_graph_break() -> None:
    torch._dynamo.reset()
    x = torch.randn(6, L, requires_grad=True)
    w, b = (p.requires_grad_() for p in _params(L, 5))

    def f(x, w, b):
        y, r = NF.add_rms_norm(x, x * 2, (L,), w, backend="numba")
        return NF.layer_norm(y + r, (L,), w, b, backend="numba")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    dy = torch.randn(6, L)
    want = torch.autograd.grad(f(x, w, b), (x, w, b), dy)
    got = torch.autograd.grad(compiled(x, w, b), (x, w, b), dy)
    _assert_bits(list(want), list(got), "compiled")


@pytest.mark.parametrize("op", ("layer_norm", "rms_norm", "add_layer_norm", "normalize"))
def test_float64_gradients_match_finite_differences(op: str) -> None:
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    w, b = (p.double().requires_grad_() for p in _params(6, seed_of(op, "gradcheck")))
    params = (w, b) if op in ("layer_norm", "add_layer_norm", "normalize") else (w,)
    torch.autograd.gradcheck(lambda x, *p: OPS[op](x, *p, *([None] * (2 - len(p)))), (x, *params))


def test_constant_row_with_eps_zero_gives_the_bias_and_zero_gradient() -> None:
    x = torch.full((2, 9), 3.25, requires_grad=True)
    w, b = _params(9, 7)
    y = NF.layer_norm(x, (9,), w, b, eps=0.0, backend="numba")
    dx = torch.autograd.grad(y, x, torch.randn(2, 9))[0]
    assert torch.equal(y, b.expand(2, 9))
    assert torch.equal(dx, torch.zeros_like(dx))


def test_large_common_offset_cancels() -> None:
    x = 1e4 + torch.randn(4, 300, dtype=torch.float64)
    w, b = _params(300, 11)
    got = NF.layer_norm(x.float(), (300,), w, b, backend="numba").double()
    want = NF.layer_norm(x.float().double(), (300,), w.double(), b.double(), backend="reference")
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize(("x", "reason"), [
    (torch.randn(2, 8, dtype=torch.float16), "float16"),
    (torch.randn(2, 8, device="meta"), "CPU tensors"),
])
def test_declines_with_a_reason(x: Tensor, reason: str) -> None:
    with pytest.raises(BackendError, match=reason):
        NF.rms_norm(x, (8,), backend="numba")


@pytest.mark.parametrize(("shape", "grad"), [((8, 4096), True), ((512, 1024), True), ((512, 1024), False)])
def test_auto_picks_numba_only_where_the_benchmark_measured_it_faster(shape: tuple[int, int], grad: bool) -> None:
    from normkit.backends import resolve
    from normkit.ops.numba.backend import MEASURED_FASTER, shape_class

    x = torch.randn(shape, requires_grad=grad)
    w = torch.randn(shape[-1], requires_grad=grad)
    picked = resolve("rms_norm", None, x, (shape[-1],), w, None)
    measured = shape_class("rms_norm", x) in MEASURED_FASTER.get("rms_norm", ())
    assert (picked.__module__ == "normkit.ops.numba.row_norm") == measured


def test_auto_keeps_forward_mode_calls_off_numba() -> None:
    """A call carrying forward-mode tangents never goes to the kernels (they have no forward
    rule): a large float32 RMSNorm under "auto" gives the composition's tangent."""
    import torch.autograd.forward_ad as fwAD

    x, t = torch.randn(512, 1024), torch.randn(512, 1024)
    w = torch.randn(1024, requires_grad=True)
    with fwAD.dual_level():
        y = NF.rms_norm(fwAD.make_dual(x, t), (1024,), w)
        tangent = fwAD.unpack_dual(y).tangent
    with fwAD.dual_level():
        want = fwAD.unpack_dual(NF.rms_norm(fwAD.make_dual(x, t), (1024,), w, backend="torch")).tangent
    torch.testing.assert_close(tangent, want)
