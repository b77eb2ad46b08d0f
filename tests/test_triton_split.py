"""GroupNorm and InstanceNorm rows split across programs (issue 15 item 4): a row longer than one
tile is reduced by several programs (partial moments, then their merge in split order), both
directions. The split depends on the row's shape alone, so a sample's result is the same bits
whatever the batch around it, and the same on every run."""

from __future__ import annotations

import pytest
import torch

from normkit import reference
from normkit.ops.triton import backend as triton_backend

pytestmark = pytest.mark.skipif(not triton_backend.is_available(), reason="Triton cannot run here")

if triton_backend.is_available():
    from normkit.ops.triton import row_norm
    from normkit.ops.triton.static_report import recorded_launches


def _step(x: torch.Tensor, groups: int, w: torch.Tensor, b: torch.Tensor, dy: torch.Tensor):
    x = x.detach().requires_grad_()
    w, b = w.detach().requires_grad_(), b.detach().requires_grad_()
    y = row_norm.group_norm(x, groups, w, b, 1e-5)
    return (y.detach(), *torch.autograd.grad(y, (x, w, b), dy))


def _data(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 3).to(dtype)
    w = torch.randn(shape[1], generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(shape[1], generator=gen, dtype=torch.float64).to(dtype)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return x, w, b, dy


@pytest.mark.parametrize("channels_last", [False, True])
def test_long_rows_are_split_and_exact(monkeypatch: pytest.MonkeyPatch, channels_last: bool) -> None:
    monkeypatch.setenv(row_norm.BLOCK_ENV_VAR, "16")
    x, w, b, dy = _data((1, 4, 8, 9), seed=1)
    if channels_last:
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    with recorded_launches() as launches:
        _step(x, 2, w, b, dy)
    grids = [(launch.name, launch.grid, launch.kwargs["SPLIT"]) for launch in launches]
    assert [g[2] for g in grids] == [1, 2, 1, 2], grids
    if channels_last:  # one program's block holds both groups (tests/test_triton_channels_last.py)
        assert all(g[0].startswith("channels_last_") and g[1][0] == 1 and g[1][1] > 1 for g in grids), grids
    else:
        assert all(g[1][0] == 2 and g[1][1] > 1 for g in grids), grids  # 2 rows, each over several programs
    got = _step(x, 2, w, b, dy)
    xd, wd, bd = (t.double().requires_grad_() for t in (x, w, b))
    yd = reference.group_norm(xd, 2, wd, bd, 1e-5)
    want = (yd.detach(), *torch.autograd.grad(yd, (xd, wd, bd), dy.double()))
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), r, rtol=0, atol=2e-5 * max(1.0, r.abs().max().item()))


def test_a_samples_result_does_not_depend_on_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sample 0 alone and in a batch of 3: the same bits of y and dx (the split, like the tile
    order, is fixed by the row's shape). dw/db sum over the batch, so they are not compared."""
    monkeypatch.setenv(row_norm.BLOCK_ENV_VAR, "16")
    x, w, b, dy = _data((3, 6, 5, 13), seed=2, dtype=torch.bfloat16)
    alone = _step(x[:1], 3, w, b, dy[:1])
    batch = _step(x, 3, w, b, dy)
    assert torch.equal(alone[0], batch[0][:1]) and torch.equal(alone[1], batch[1][:1])
    again = _step(x, 3, w, b, dy)
    assert all(torch.equal(a, c) for a, c in zip(batch, again, strict=True))


def test_instance_norm_rows_split_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(row_norm.BLOCK_ENV_VAR, "8")
    x, w, b, dy = _data((2, 3, 40), seed=3)
    rm, rv = torch.zeros(3), torch.ones(3)
    xr = x.detach().requires_grad_()
    with recorded_launches() as launches:
        row_norm.instance_norm(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5)
    assert max(launch.grid[1] for launch in launches) > 1
    y = row_norm.instance_norm(xr, rm, rv, w, b, True, 0.1, 1e-5)
    rm_ref, rv_ref = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    xd = x.double().requires_grad_()
    yd = reference.instance_norm(xd, rm_ref, rv_ref, w.double(), b.double(), True, 0.1, 1e-5)
    torch.testing.assert_close(y.double(), yd, rtol=0, atol=2e-5 * yd.abs().max().item())
    torch.testing.assert_close(rm.double(), rm_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(rv.double(), rv_ref, rtol=0, atol=1e-6)
    dx, = torch.autograd.grad(y, xr, dy)
    dxd, = torch.autograd.grad(yd, xd, dy.double())
    torch.testing.assert_close(dx.double(), dxd, rtol=0, atol=2e-5 * dxd.abs().max().item())


@pytest.mark.parametrize(("R", "S", "channels_fast"), [(10, 4096, False), (10, 4096, True), (1, 65536, False),
                                                     (3, 81, False)])
def test_the_split_covers_the_row_in_whole_tiles(R: int, S: int, channels_fast: bool) -> None:
    """SD's UNet GroupNorm (R=10, S=64x64: a tile is one channel's run, so the split is along
    the channels, or along s for channels_last) and a style-transfer InstanceNorm row."""
    for direction in ("fwd", "bwd"):
        blocks = row_norm._blocks(R, S, direction, 2, None, channels_fast)
        split = row_norm._split(R, S, blocks, per_channel=True)
        if blocks.SINGLE_BLOCK:
            assert split.splits == 1
            continue
        assert split.splits > 1
        assert split.split_r % blocks.BLOCK_R == 0 or split.split_r == R
        assert split.split_s % blocks.BLOCK_S == 0 or split.split_s == S
        assert split.splits == split.splits_s * -(-R // split.split_r) and split.splits_s * split.split_s >= S
        assert row_norm._split(R, S, blocks, per_channel=False).splits == 1  # LayerNorm rows: never


def test_rows_of_one_tile_are_never_split() -> None:
    single = row_norm._blocks(20, 256, "fwd", 2, None)
    assert single.SINGLE_BLOCK and row_norm._split(20, 256, single, per_channel=True).splits == 1
