"""The numba channel kernels' streamed stores (outputs of 8 MiB or more, NCHW) on segments of odd
length, whose unaligned head and tail chunks take the plain stores: the same bits as a call too
small to stream. GroupNorm's per-sample results do not depend on the batch, so each sample of a
streamed batch is compared with that sample alone (2.2 MB, not streamed)."""

from __future__ import annotations

import pytest
import torch

import normkit
import normkit.functional as NF
from cases import seed_of

pytestmark = pytest.mark.skipif("numba" not in normkit.backends(), reason="numba backend not registered")

SHAPE = (4, 64, 97, 89)  # 8.8 MB of float32: streamed; 97 * 89 elements a segment (odd)


@pytest.mark.parametrize("groups", [64, 16], ids=["instance", "groups of 4"])
def test_streamed_odd_segments_give_each_samples_own_bits(groups: int) -> None:
    from normkit.ops.numba import channel_kernels

    assert SHAPE[0] * SHAPE[1] * SHAPE[2] * SHAPE[3] * 4 >= channel_kernels.STREAM_BYTES
    assert SHAPE[1] * SHAPE[2] * SHAPE[3] * 4 < channel_kernels.STREAM_BYTES
    g = torch.Generator().manual_seed(seed_of("streams", groups))
    x = torch.randn(SHAPE, generator=g) * 3 + 1
    dy = torch.randn(SHAPE, generator=g)
    w, b = torch.randn(SHAPE[1], generator=g), torch.randn(SHAPE[1], generator=g)

    def run(xs: torch.Tensor, dys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xi = xs.clone().requires_grad_()
        y = NF.group_norm_act(xi, groups, w, b, 1e-5, act="silu", backend="numba")
        (dx,) = torch.autograd.grad(y, xi, dys)
        return y.detach(), dx

    y, dx = run(x, dy)
    for n in range(SHAPE[0]):
        y1, dx1 = run(x[n : n + 1], dy[n : n + 1])
        assert torch.equal(y[n : n + 1], y1), n
        assert torch.equal(dx[n : n + 1], dx1), n
