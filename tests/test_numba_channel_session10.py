"""BatchNorm NC* backward, one task per channel (``channel_kernels.bn_seg_bwd``, session 10).

Where a channel's segments are long and its x and dy fit in ``CHANNEL_CACHE_BYTES``, the
backward takes one task per channel (its sums, then its dx while it is in cache) instead of
the two passes over (sample, channel) segments. Checked here, for random weights, biases and
upstream gradients:

* the choice is made at the shapes tested (so that the comparisons below exercise it), and not
  for short segments or channels too large for the cache;
* both ways give the same bits (output, statistics, running statistics, dx, dw, db), in training
  and eval, without and with a fused activation, float32, float64 and bfloat16, at 1 and 2
  threads, with and without dx;
* the results stay within float64 torch's bounds.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from cases import seed_of

pytest.importorskip("numba")
cn = pytest.importorskip("normkit.ops.numba.channel_norm")

ACTS = {None: lambda z: z, "relu": F.relu, "silu": F.silu}
# (shape, dtype): segments of at least SEGMENT_MIN_BYTES; bf16 needs twice the elements.
SHAPES = {
    torch.float32: (4, 6, 40, 40),
    torch.float64: (3, 5, 24, 24),
    torch.bfloat16: (3, 4, 48, 48),
}
TOL = {torch.float32: 2e-5, torch.float64: 1e-12, torch.bfloat16: 3e-2}


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _data(shape: tuple[int, ...], dtype: torch.dtype, seed: str):
    g = torch.Generator().manual_seed(seed_of(seed))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 2
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    w, b = (torch.randn(shape[1], generator=g, dtype=torch.float64) for _ in range(2))
    rm = torch.randn(shape[1], generator=g, dtype=torch.float64)
    rv = torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5
    return x.to(dtype), w.to(dtype), b.to(dtype), dy.to(dtype), rm, rv


def _run(x, w, b, dy, rm, rv, training: bool, act, want_dx: bool) -> dict[str, Tensor]:
    """normkit's BatchNorm and its gradients (running statistics updated in training)."""
    xs = x.detach().clone().requires_grad_(want_dx)
    ws, bs = (t.detach().clone().requires_grad_() for t in (w, b))
    rm, rv = rm.to(x.dtype).clone(), rv.to(x.dtype).clone()
    y = cn.batch_norm(xs, rm, rv, ws, bs, training, 0.1, 1e-5, act)
    leaves = (xs, ws, bs) if want_dx else (ws, bs)
    grads = torch.autograd.grad(y, leaves, dy)
    out = dict(zip(("dx", "dw", "db") if want_dx else ("dw", "db"), grads))
    return {"y": y.detach(), "rm": rm, "rv": rv, **out}


def _reference(x, w, b, dy, rm, rv, training: bool, act) -> dict[str, Tensor]:
    """torch in float64."""
    xs, ws, bs = (t.detach().double().requires_grad_() for t in (x, w, b))
    rm, rv = rm.clone(), rv.clone()
    y = ACTS[act](F.batch_norm(xs, rm, rv, ws, bs, training, 0.1, 1e-5))
    dx, dw, db = torch.autograd.grad(y, (xs, ws, bs), dy.double())
    return {"y": y.detach(), "rm": rm, "rv": rv, "dx": dx, "dw": dw, "db": db}


def test_chosen_where_the_channel_fits(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    for dtype, (N, C, *sp) in SHAPES.items():
        S = sp[0] * sp[1]
        item = torch.empty(0, dtype=dtype).element_size()
        assert cn._by_channel(N, C, S, item, 2), dtype
    assert cn._by_channel(32, 64, 56 * 56, 4, 2)  # the ResNet shape: 800 KB a channel
    assert not cn._by_channel(32, 64, 28 * 28, 4, 2)  # 3 KB segments
    assert not cn._by_channel(128, 64, 56 * 56, 4, 2)  # 3.2 MB a channel
    assert not cn._by_channel(4, 1, 4096, 4, 2)  # fewer channels than threads


@pytest.mark.parametrize("dtype", list(SHAPES), ids=str)
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("want_dx", [True, False], ids=["dx", "no_dx"])
def test_same_bits_as_two_passes_within_float64_bounds(monkeypatch, restore_threads, dtype, act, training, want_dx):
    data = _data(SHAPES[dtype], dtype, f"bn-by-channel-{dtype}-{act}-{training}")
    results = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results[threads] = _run(*data, training, act, want_dx)
        with monkeypatch.context() as m:
            m.setattr(cn, "CHANNEL_CACHE_BYTES", 0)  # the two passes over segments
            two_pass = _run(*data, training, act, want_dx)
        for key, value in results[threads].items():
            assert torch.equal(value, two_pass[key]), (key, threads)
    for key, value in results[1].items():
        assert torch.equal(value, results[2][key]), key
    ref = _reference(*data, training, act)
    for key, value in results[1].items():
        err = (value.double() - ref[key]).abs().max().item()
        scale = ref[key].abs().max().item() + 1
        assert err <= TOL[dtype] * scale, (key, err)


def test_nan_input_gives_nan_statistics_as_two_passes(monkeypatch):
    x, w, b, dy, rm, rv = _data(SHAPES[torch.float32], torch.float32, "bn-by-channel-nan")
    x[1, 2, 3, 4] = float("nan")
    got = _run(x, w, b, dy, rm, rv, True, None, True)
    monkeypatch.setattr(cn, "CHANNEL_CACHE_BYTES", 0)
    two_pass = _run(x, w, b, dy, rm, rv, True, None, True)
    assert got["rm"][2].isnan() and got["y"][:, 2].isnan().all()
    for key, value in got.items():
        assert torch.equal(value.nan_to_num(7.0), two_pass[key].nan_to_num(7.0)), key
