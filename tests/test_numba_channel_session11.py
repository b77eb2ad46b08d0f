"""The numba channel kernels' row access (session 11).

The column kernels (channels_last BatchNorm and GroupNorm) read and write each row of C
channels through a 2-D view of the flat storage (no reference counted per row) with their
scratch rows allocated once per call; this may change no bit. Checked here, with random
weights, biases, running statistics and upstream gradients, at shapes large enough to be split
across threads (C prime or odd, blocks with an odd row count, a last partial block), and for
BatchNorm NC* with short segments (its two passes):

* the same bits at 1, 2 and 3 threads (y, running statistics, dx, dw, db), train and eval,
  without and with a fused activation, float32, float64 and bfloat16; for GroupNorm 3 samples
  take the per-sample kernels at 1 and 3 threads and the blocks over all samples at 2;
* every result within normkit.testing's bound of float64 torch (torch in the input's dtype
  as the baseline).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from cases import seed_of
from normkit.testing import assert_within_bound

pytest.importorskip("numba")
cn = pytest.importorskip("normkit.ops.numba.channel_norm")
engine = pytest.importorskip("normkit.ops.numba._engine")

ACTS = {None: lambda z: z, "relu": F.relu, "silu": F.silu}
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
# name: (shape, memory format, groups); each above PARALLEL_MIN_ELEMENTS.
CASES = {
    "bn-cl-C7": ((4, 7, 67, 61), torch.channels_last, 0),  # 2340-row blocks, the last partial
    "bn-cl-C130": ((6, 130, 13, 11), torch.channels_last, 0),  # 126-row blocks (even), 7 blocks
    "bn-cl3d-C33": ((3, 33, 9, 14, 17), torch.channels_last_3d, 0),  # 496-row blocks
    "bn-nchw-short": ((8, 12, 28, 28), torch.contiguous_format, 0),  # two passes over segments
    "gn-cl-G4": ((3, 12, 47, 45), torch.channels_last, 4),  # 1365-row blocks (odd)
}
THREADS = (1, 2, 3)


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _data(shape: tuple[int, ...], fmt: torch.memory_format, dtype: torch.dtype, seed: str):
    g = torch.Generator().manual_seed(seed_of(seed))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 2
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    w, b, rm = (torch.randn(shape[1], generator=g, dtype=torch.float64) for _ in range(3))
    rv = torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5
    x, dy = (t.to(dtype).contiguous(memory_format=fmt) for t in (x, dy))
    return x, w.to(dtype), b.to(dtype), dy, rm.to(dtype), rv.to(dtype)


def _norm(fn_bn, fn_gn, groups: int, training: bool):
    """``(x, w, b, rm, rv) -> y`` for BatchNorm (``groups`` 0, running statistics updated in
    training) or GroupNorm."""
    if groups:
        return lambda x, w, b, rm, rv: fn_gn(x, groups, w, b, 1e-5)
    return lambda x, w, b, rm, rv: fn_bn(x, rm, rv, w, b, training, 0.1, 1e-5)


def _run(fn, x, w, b, dy, rm, rv) -> dict[str, Tensor]:
    xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
    rm, rv = rm.clone(), rv.clone()
    y = fn(xs, ws, bs, rm, rv)
    dx, dw, db = torch.autograd.grad(y, (xs, ws, bs), dy)
    return {"y": y.detach(), "dx": dx, "dw": dw, "db": db, "rm": rm, "rv": rv}


def _numba(groups: int, training: bool, act):
    return _norm(lambda *a: cn.batch_norm(*a, act=act), lambda *a: cn.group_norm(*a, act=act), groups, training)


def _torch(groups: int, training: bool, act):
    norm = _norm(F.batch_norm, F.group_norm, groups, training)
    return lambda *a: ACTS[act](norm(*a))


# (case, training): GroupNorm has no eval mode.
MODES = [
    (case, training) for case, (_, _, groups) in CASES.items() for training in (True, False) if training or not groups
]


@pytest.mark.parametrize(("case", "training"), MODES, ids=[f"{c}-{'train' if t else 'eval'}" for c, t in MODES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", list(ACTS))
def test_same_bits_at_any_thread_count_within_float64_bounds(restore_threads, case, training, dtype, act):
    shape, fmt, groups = CASES[case]
    data = _data(shape, fmt, dtype, f"channel-s11-{case}-{dtype}-{act}-{training}")
    assert data[0].numel() >= engine.PARALLEL_MIN_ELEMENTS  # (so that the threads split it)
    results = {}
    for threads in THREADS:
        torch.set_num_threads(threads)
        results[threads] = _run(_numba(groups, training, act), *data)
        assert results[threads]["y"].stride() == data[0].stride()
    for threads in THREADS[1:]:
        for key, value in results[1].items():
            assert torch.equal(value, results[threads][key]), (key, threads)
    x, w, b, dy, rm, rv = data
    ref = _run(_torch(groups, training, act), *(t.double() for t in data))
    baseline = _run(_torch(groups, training, act), *data)
    if groups:  # (GroupNorm has no running statistics: both stay as given)
        for r in (ref, baseline, results[1]):
            r.pop("rm"), r.pop("rv")
    assert_within_bound(results[1], ref, baseline)


def test_gn_routes_differ_by_thread_count(monkeypatch):
    """The GroupNorm case above takes both channels_last routes (per sample and blocks)."""
    N = CASES["gn-cl-G4"][0][0]
    routes = []
    for threads in THREADS:
        monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
        routes.append(cn._per_sample(N))
    assert routes == [True, False, True]
