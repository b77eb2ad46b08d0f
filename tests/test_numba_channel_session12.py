"""BatchNorm NC* in blocks of channels (``channel_kernels.bn_seg_fwd`` and ``bn_seg_bwd``, session 12).

Where a channel's x and dy fit in ``CHANNEL_CACHE_BYTES`` and its segments are long (the
forward: or a block's run of them), the training forward and the backward take one task per
block of channels (``CHANNEL_BLOCK_BYTES`` of x and dy): the block's sums, then its output or
dx while the block is in cache. Checked here, with random weights, biases, running statistics
and upstream gradients, at shapes large enough to be split across threads (C = 7: ranges of 2,
2 and 3 channels at three threads; C = 12 with short segments):

* the block kernels are the ones that run at these shapes, forward and backward;
* the same bits (y, running statistics, dx, dw, db) at 1, 2 and 3 threads, at any block size
  (one channel, three, a whole range), and as the two passes over (sample, channel) segments,
  without and with a fused activation, float32, float64 and bfloat16;
* every result within normkit.testing's bound of float64 torch (torch in the input's dtype as
  the baseline);
* a NaN or an infinity in a channel gives the two passes' statistics (a NaN variance, not 0).
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
# name: (shape, dtype), odd sizes, each call above PARALLEL_MIN_ELEMENTS. Segments of at least
# SEGMENT_MIN_BYTES (bf16 needs twice the elements): blocks both ways; "short": shorter
# segments, blocks in the forward only (a block's run of segments, 4 of them at three threads,
# still at least SEGMENT_MIN_BYTES).
CASES = {
    "f32": ((9, 7, 33, 34), torch.float32),
    "f64": ((9, 7, 33, 34), torch.float64),
    "bf16": ((5, 7, 45, 46), torch.bfloat16),
    "f32-short": ((16, 12, 23, 29), torch.float32),
    "f64-short": ((40, 12, 11, 13), torch.float64),
    "bf16-short": ((16, 12, 23, 29), torch.bfloat16),
}
THREADS = (1, 2, 3)
# Channels a block of the backward holds (the forward's blocks, x alone, twice as many); None:
# the default CHANNEL_BLOCK_BYTES (every range one block at these shapes).
BLOCKS = (1, 3, None)


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _data(case: str, seed: str):
    shape, dtype = CASES[case]
    g = torch.Generator().manual_seed(seed_of(seed))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 2
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    w, b, rm = (torch.randn(shape[1], generator=g, dtype=torch.float64) for _ in range(3))
    rv = torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5
    return tuple(t.to(dtype) for t in (x, w, b, dy, rm, rv))


def _block_bytes(case: str, channels: int | None) -> int:
    """CHANNEL_BLOCK_BYTES for backward blocks of ``channels`` channels."""
    if channels is None:
        return cn.CHANNEL_BLOCK_BYTES
    (N, _, H, W), dtype = CASES[case]
    return 2 * channels * N * H * W * torch.empty(0, dtype=dtype).element_size()


def _run(fn, x, w, b, dy, rm, rv) -> dict[str, Tensor]:
    xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
    rm, rv = rm.clone(), rv.clone()
    y = fn(xs, rm, rv, ws, bs, True, 0.1, 1e-5)
    dx, dw, db = torch.autograd.grad(y, (xs, ws, bs), dy)
    return {"y": y.detach(), "dx": dx, "dw": dw, "db": db, "rm": rm, "rv": rv}


def _numba(act):
    return lambda *a: cn.batch_norm(*a, act=act)


def _torch(act):
    return lambda *a: ACTS[act](F.batch_norm(*a))


@pytest.mark.parametrize("case", list(CASES))
def test_block_kernels_run_at_these_shapes(monkeypatch, restore_threads, case):
    calls = []
    for name in ("bn_seg_fwd", "bn_seg_bwd", "seg_fwd", "seg_bwd"):
        kernel = getattr(cn.k, name)

        def spy(*args, _kernel=kernel, _name=name):
            calls.append((_name, args[-3] if _name.startswith("bn_") else None))
            return _kernel(*args)

        monkeypatch.setattr(cn.k, name, spy)
    x, w, b, dy, rm, rv = _data(case, f"bn-blocks-route-{case}")
    assert x.numel() >= engine.PARALLEL_MIN_ELEMENTS
    monkeypatch.setattr(cn, "CHANNEL_BLOCK_BYTES", _block_bytes(case, 3))
    torch.set_num_threads(2)
    _run(_numba(None), x, w, b, dy, rm, rv)
    # one range per thread, blocks of 6 channels forward (x alone) and 3 backward (x and dy);
    # short segments: the backward's two passes, each a range per thread
    backward = [("seg_bwd", None)] * 4 if case.endswith("short") else [("bn_seg_bwd", 3)] * 2
    assert calls == [("bn_seg_fwd", 6)] * 2 + backward, calls


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("act", list(ACTS))
def test_same_bits_at_any_thread_count_and_block_within_float64_bounds(monkeypatch, restore_threads, case, act):
    data = _data(case, f"bn-blocks-{case}-{act}")
    with monkeypatch.context() as m:
        m.setattr(cn, "CHANNEL_CACHE_BYTES", 0)  # the two passes over segments
        two_pass = _run(_numba(act), *data)
    for channels in BLOCKS:
        monkeypatch.setattr(cn, "CHANNEL_BLOCK_BYTES", _block_bytes(case, channels))
        for threads in THREADS:
            torch.set_num_threads(threads)
            got = _run(_numba(act), *data)
            for key, value in two_pass.items():
                assert torch.equal(got[key], value), (key, channels, threads)
    ref = _run(_torch(act), *(t.double() for t in data))
    baseline = _run(_torch(act), *data)
    assert_within_bound(two_pass, ref, baseline)


@pytest.mark.parametrize("case", ["f32", "f32-short"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_gives_the_two_passes_statistics(monkeypatch, case, bad):
    x, w, b, dy, rm, rv = _data(case, f"bn-blocks-{case}-{bad}")
    x[4, 5, 6, 7] = bad
    got = _run(_numba(None), x, w, b, dy, rm, rv)
    monkeypatch.setattr(cn, "CHANNEL_CACHE_BYTES", 0)
    two_pass = _run(_numba(None), x, w, b, dy, rm, rv)
    # (an infinity makes the mean infinite and the variance NaN, as torch's)
    assert not got["rm"][5].isfinite() and got["rv"][5].isnan() and got["y"][:, 5].isnan().all()
    assert got["rm"][4].isfinite() and got["y"][:, 4].isfinite().all()
    for key, value in got.items():
        assert torch.equal(value.nan_to_num(7.0), two_pass[key].nan_to_num(7.0)), key
