"""The numba channel norms on the cases session 7 changed or checked
(``normkit.ops.numba.channel_norm``):

* outputs of at least ``STREAM_BYTES`` (y, dx) are stored non-temporally: the same bits as the
  plain stores below the threshold (a GroupNorm/InstanceNorm sample alone, under it, against
  the same sample in a batch over it), and BatchNorm over it against torch in float64;
* a hard case for the statistics: a large common offset, a tiny variance and long 256x256
  maps, forward and backward, against torch in float64 within float32's own rounding of the
  input;
* running statistics that share memory (an ``expand``-ed tensor): BatchNorm follows ATen's
  one-thread loop, InstanceNorm raises torch's error and writes nothing.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

pytest.importorskip("numba")
cn = pytest.importorskip("normkit.ops.numba.channel_norm")
ck = pytest.importorskip("normkit.ops.numba.channel_kernels")


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _grads(fn, x: Tensor, w: Tensor, b: Tensor, dy: Tensor) -> dict[str, Tensor]:
    xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = fn(xs, ws, bs)
    dx, dw, db = torch.autograd.grad(y, (xs, ws, bs), dy)
    return {"y": y.detach(), "dx": dx, "dw": dw, "db": db}


def _bits_equal(a: Tensor, b: Tensor) -> bool:
    return torch.equal(a.reshape(-1).view(torch.int32), b.reshape(-1).view(torch.int32))


# (op, per-sample shape, groups): a sample's output is under STREAM_BYTES, two samples' over it.
STREAMED = [("group_norm", (64, 128, 136), 32), ("instance_norm", (16, 256, 260), 16)]


@pytest.mark.parametrize("op,shape,groups", STREAMED, ids=[s[0] for s in STREAMED])
def test_streamed_output_has_the_bits_of_plain_stores(op: str, shape: tuple, groups: int, restore_threads) -> None:
    numel = torch.Size(shape).numel()
    assert numel * 4 < ck.STREAM_BYTES <= 2 * numel * 4
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, *shape, generator=g) * 3 + 1
    dy = torch.randn(2, *shape, generator=g)
    C = shape[0]
    w, b = torch.randn(C, generator=g), torch.randn(C, generator=g)

    def fn(xs, ws, bs):
        return cn.group_norm(xs, groups, ws, bs, 1e-5)

    batch = _grads(fn, x, w, b, dy)
    for i in range(2):
        alone = _grads(fn, x[i : i + 1], w, b, dy[i : i + 1])
        assert _bits_equal(alone["y"], batch["y"][i : i + 1]), f"y of sample {i}"
        assert _bits_equal(alone["dx"], batch["dx"][i : i + 1]), f"dx of sample {i}"


def test_streamed_batch_norm_matches_torch_in_float64(restore_threads) -> None:
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(4, 16, 181, 191, generator=g, dtype=torch.float64) * 2 + 0.5  # 17.7 MB in float32
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    w, b = torch.randn(16, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)
    assert x.numel() * 4 >= ck.STREAM_BYTES
    got = _grads(
        lambda *a: cn.batch_norm(a[0], None, None, a[1], a[2], True, 0.1, 1e-5),
        x.float(),
        w.float(),
        b.float(),
        dy.float(),
    )
    want = _grads(
        lambda *a: F.batch_norm(a[0], None, None, a[1], a[2], True, 0.1, 1e-5),
        x.float().double(),
        w.float().double(),
        b.float().double(),
        dy.float().double(),
    )
    for name, tol in (("y", 1e-5), ("dx", 1e-5), ("dw", 1e-3), ("db", 1e-3)):
        torch.testing.assert_close(got[name].double(), want[name], rtol=tol, atol=tol, msg=name)


# A large common offset with a tiny spread on long maps: the statistics must cancel the offset
# exactly. float32 holds x to 2^-24 relative (about 6e-5 absolute at 1000), which is 6% of the
# spread of 1e-3: the float64 oracle gets the float32 input itself, so only the kernels'
# arithmetic is judged.
HARD = {
    "instance_norm": lambda x, w, b: cn.instance_norm(x, None, None, w, b),
    "group_norm": lambda x, w, b: cn.group_norm(x, 4, w, b, 1e-5),
    "batch_norm": lambda x, w, b: cn.batch_norm(x, None, None, w, b, True, 0.1, 1e-5),
}
HARD_TORCH = {
    "instance_norm": lambda x, w, b: F.instance_norm(x, None, None, w, b),
    "group_norm": lambda x, w, b: F.group_norm(x, 4, w, b, 1e-5),
    "batch_norm": lambda x, w, b: F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5),
}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("op", list(HARD))
def test_large_offset_tiny_variance_long_maps(op: str, channels_last: bool) -> None:
    g = torch.Generator().manual_seed(9)
    x = (1000.0 + 0.01 * torch.randn(2, 8, 256, 256, generator=g, dtype=torch.float64)).float()
    x[:, :, 0, 0] += 0.05  # the first element of every map well off its mean (5 standard deviations)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(x.shape, generator=g)
    w, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    got = _grads(HARD[op], x, w, b, dy)
    # (the oracle in NCHW: torch's float64 channels_last GroupNorm is itself off by 4e-4 here,
    # its sums not shifted)
    want = _grads(HARD_TORCH[op], x.double().contiguous(), w.double(), b.double(), dy.double().contiguous())
    # y and dx of unit scale: float32 rounding of the result plus the statistics' relative error.
    for name, tol in (("y", 2e-5), ("dx", 2e-3)):
        torch.testing.assert_close(got[name].double(), want[name], rtol=tol, atol=tol, msg=name)
    # dw and db are sums over 2^17-2^18 elements of unit-scale terms.
    for name in ("dw", "db"):
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-4, atol=0.05, msg=name)


def _stats(which: str, dtype: torch.dtype = torch.float64) -> list[Tensor]:
    """Running mean and variance, ``which`` of them (``"mean"``, ``"var"``, ``"both"``) one
    element ``expand``-ed to all channels."""
    mean = torch.zeros(1, dtype=dtype).expand(4) if which != "var" else torch.zeros(4, dtype=dtype)
    var = torch.ones(1, dtype=dtype).expand(4) if which != "mean" else torch.ones(4, dtype=dtype)
    return [mean, var]


@pytest.mark.parametrize("which", ["mean", "var", "both"])
def test_batch_norm_with_expanded_running_statistics_follows_aten(which: str, restore_threads) -> None:
    torch.set_num_threads(1)  # ATen's threads race on shared elements: its one-thread result
    x = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    ours, theirs = _stats(which), _stats(which)
    y = cn.batch_norm(x, *ours, None, None, True, 0.1, 1e-5)
    want = F.batch_norm(x, *theirs, None, None, True, 0.1, 1e-5)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    for a, t in zip(ours, theirs):
        torch.testing.assert_close(a, t, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("which", ["mean", "var", "both"])
def test_instance_norm_with_expanded_running_statistics_raises_torchs_error_and_writes_nothing(which: str) -> None:
    x = torch.randn(3, 4, 5, 5)
    with pytest.raises(RuntimeError) as theirs:
        F.instance_norm(x, *_stats(which, torch.float32), use_input_stats=True)
    ours = _stats(which, torch.float32)
    with pytest.raises(RuntimeError) as raised:
        cn.instance_norm(x, *ours)
    assert str(raised.value) == str(theirs.value)
    assert torch.equal(ours[0], torch.zeros(4)) and torch.equal(ours[1], torch.ones(4))
