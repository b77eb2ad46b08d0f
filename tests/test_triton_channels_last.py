"""GroupNorm and InstanceNorm on channels_last input (issue 15 item 5): a program takes a block of
whole groups of one sample, channels the tile's fast axis (normkit.ops.triton.channels_last).

The launches are recorded to show this path is the one taken; results are judged against the
float64 oracle with the self-calibrating bound (tests/kernel_bound.py), in each of the kernels'
three shapes of work: a block's pixels in one tile, streamed in tiles by one program, and split
across programs. A sample's bits must not depend on the batch around it."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from normkit import reference
from normkit.ops.triton import backend as triton_backend

pytestmark = pytest.mark.skipif(
    not triton_backend.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton's interpreter is not on here",
)

if triton_backend.is_available():
    import triton

    from kernel_bound import assert_within_bound
    from normkit.ops.triton import channels_last as CL
    from normkit.ops.triton import row_norm
    from normkit.ops.triton.static_report import recorded_launches

f32, bf16 = torch.float32, torch.bfloat16
CL_KERNELS = {"channels_last_fwd_kernel", "channels_last_bwd_kernel"}

# (shape, groups): SD's 10 channels a group (blocks of whole groups not a power of two wide,
# several blocks a sample), InstanceNorm with several channel blocks, a group of 16, 3 channels.
SHAPES = [((2, 40, 3, 5), 4), ((2, 160, 2, 3), 16), ((3, 48, 4, 3), 48), ((2, 64, 3, 3), 4), ((2, 3, 5, 4), 3)]
# Tile caps: none (a block's pixels in one tile), 64 (streamed, split across programs).
BLOCK_N = [None, 64]


def _data(shape, seed, dtype=f32, dy_format=torch.channels_last):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 3).to(dtype)
    w, b = (torch.randn(shape[1], generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return x.contiguous(memory_format=torch.channels_last), w, b, dy.contiguous(memory_format=dy_format)


def _step(norm, x, w, b, dy, dtype=None):
    """y and the gradients of x, w, b of ``norm(x, w, b)``, all inputs cast to ``dtype``."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (x, w, b)]
    y = norm(*leaves)
    grads = torch.autograd.grad(y, leaves, dy.to(y.dtype))
    return dict(zip(("y", "dx", "dw", "db"), (y.detach(), *grads), strict=True))


def _group_norm(groups, act=None):
    def triton(x, w, b):
        return row_norm.group_norm_act(x, groups, w, b, 1e-5, act)

    def oracle(x, w, b):
        y = reference.group_norm(x, groups, w, b, 1e-5)
        return {None: y, "silu": F.silu(y), "relu": F.relu(y)}[act]

    def low(x, w, b):
        y = F.group_norm(x, groups, w, b, 1e-5)
        return {None: y, "silu": F.silu(y), "relu": F.relu(y)}[act]

    return triton, oracle, low


def _kernels(norm, *args) -> list:
    with recorded_launches() as launches:
        _step(norm, *args)
    return launches


@pytest.mark.parametrize("block_n", BLOCK_N, ids=lambda n: f"block{n}")
@pytest.mark.parametrize(("shape", "groups"), SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [f32, bf16], ids=str)
def test_group_norm_takes_the_channel_blocks_and_is_exact(
    shape, groups, dtype, block_n, monkeypatch: pytest.MonkeyPatch
) -> None:
    if block_n:
        monkeypatch.setenv(row_norm.BLOCK_ENV_VAR, str(block_n))
    x, w, b, dy = _data(shape, seed=sum(shape) + groups, dtype=dtype)
    triton, oracle, low = _group_norm(groups)
    launches = _kernels(triton, x, w, b, dy)
    assert {launch.name for launch in launches} == CL_KERNELS
    if block_n:  # streamed: every launch of a split is two
        assert all(launch.kwargs["SINGLE_BLOCK"] is False for launch in launches)
    got = _step(triton, x, w, b, dy)
    assert_within_bound(got, _step(oracle, x, w, b, dy, torch.float64), _step(low, x, w, b, dy))
    for name in ("y", "dx"):
        assert got[name].is_contiguous(memory_format=torch.channels_last), name


@pytest.mark.parametrize("act", ["silu", "relu"])
def test_group_norm_act_recomputes_its_input_in_the_backward(act, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(row_norm.BLOCK_ENV_VAR, "64")
    x, w, b, dy = _data((2, 40, 3, 4), seed=5, dtype=bf16)
    triton, oracle, low = _group_norm(4, act)
    got = _step(triton, x, w, b, dy)
    assert_within_bound(got, _step(oracle, x, w, b, dy, torch.float64), _step(low, x, w, b, dy))


@pytest.mark.parametrize("block_n", BLOCK_N, ids=lambda n: f"block{n}")
def test_instance_norm_updates_running_stats(block_n, monkeypatch: pytest.MonkeyPatch) -> None:
    if block_n:
        monkeypatch.setenv(row_norm.BLOCK_ENV_VAR, str(block_n))
    x, w, b, dy = _data((3, 24, 5, 3), seed=7)
    gen = torch.Generator().manual_seed(8)
    stats = torch.randn(24, generator=gen), torch.rand(24, generator=gen) + 0.5
    got_stats = [s.clone() for s in stats]
    want_stats = [s.double() for s in stats]
    launches = _kernels(lambda *a: row_norm.instance_norm(a[0], None, None, *a[1:]), x, w, b, dy)
    assert {launch.name for launch in launches} == CL_KERNELS
    got = _step(lambda *a: row_norm.instance_norm(a[0], *got_stats, *a[1:], True, 0.1, 1e-5), x, w, b, dy)
    want = _step(
        lambda *a: reference.instance_norm(a[0], *want_stats, *a[1:], True, 0.1, 1e-5), x, w, b, dy, torch.float64
    )
    low = _step(lambda *a: F.instance_norm(a[0], None, None, *a[1:], True, 0.1, 1e-5), x, w, b, dy)
    assert_within_bound(got, want, low)
    for g, r in zip(got_stats, want_stats, strict=True):
        torch.testing.assert_close(g.double(), r, rtol=0, atol=1e-6)


@pytest.mark.parametrize("block_n", BLOCK_N, ids=lambda n: f"block{n}")
def test_a_samples_bits_do_not_depend_on_the_batch(block_n, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sample 0 alone and in a batch of 3 (SD-like groups of 10, several blocks a sample): the
    same bits of y and dx."""
    if block_n:
        monkeypatch.setenv(row_norm.BLOCK_ENV_VAR, str(block_n))
    x, w, b, dy = _data((3, 160, 3, 5), seed=9, dtype=bf16)
    norm = _group_norm(16, "silu")[0]
    alone = _step(norm, x[:1], w, b, dy[:1])
    batch = _step(norm, x, w, b, dy)
    assert torch.equal(alone["y"], batch["y"][:1]) and torch.equal(alone["dx"], batch["dx"][:1])


@pytest.mark.gpu_schedule
@pytest.mark.parametrize("block_n", BLOCK_N, ids=lambda n: f"block{n}")
def test_a_second_run_gives_the_same_bits(block_n, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch of test_a_samples_bits_do_not_depend_on_the_batch run twice: the same bits of
    every output and gradient (dw/db sum over the batch in a fixed order)."""
    if block_n:
        monkeypatch.setenv(row_norm.BLOCK_ENV_VAR, str(block_n))
    x, w, b, dy = _data((3, 160, 3, 5), seed=9, dtype=bf16)
    norm = _group_norm(16, "silu")[0]
    first, second = _step(norm, x, w, b, dy), _step(norm, x, w, b, dy)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_strided_input_and_a_gradient_in_another_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A channel slice of a channels_last tensor (pixel stride wider than C) is read in place,
    and a contiguous upstream gradient is laid out for the kernel; results still exact."""
    monkeypatch.setenv(row_norm.BLOCK_ENV_VAR, "64")
    x, w, b, dy = _data((2, 40, 3, 4), seed=11, dy_format=torch.contiguous_format)
    x = torch.cat([x, x[:, :8]], dim=1).contiguous(memory_format=torch.channels_last)[:, :40]
    assert x.stride(1) == 1 and x.stride(3) == 48
    triton, oracle, low = _group_norm(4)
    assert {launch.name for launch in _kernels(triton, x, w, b, dy)} == CL_KERNELS
    assert_within_bound(_step(triton, x, w, b, dy), _step(oracle, x, w, b, dy, torch.float64), _step(low, x, w, b, dy))


def test_fake_outputs_have_the_kernels_strides() -> None:
    """torch.compile plans with the fake implementations: their y and dx strides must be the
    launchers' (for a strided input the channels_last kernels pack the output as (N, S, C))."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(2, 48, 3, 4).contiguous(memory_format=torch.channels_last)[:, :40].reshape(2, 40, 12)
    real = row_norm.row_norm_fwd(
        x, None, None, None, groups=4, per_channel=True, eps=1e-5, is_rms=False, residual_dtype=None
    )
    with FakeTensorMode() as mode:
        fake = torch.ops.normkit.row_norm_fwd(mode.from_tensor(x), None, None, None, 4, True, 1e-5, False, None, 0)
    assert [t.stride() for t in fake] == [t.stride() for t in real]


@pytest.mark.parametrize(
    ("C", "R", "size", "gpb"), [(320, 10, 2, 12), (32, 1, 4, 16), (512, 16, 2, 2), (640, 20, 2, 6), (3, 1, 4, 3)]
)
def test_blocks_start_on_a_vector_and_use_most_of_the_tile(C, R, size, gpb) -> None:
    """SD's UNet GroupNorm (320 channels, 10 a group, bf16) takes 12 groups, 120 of a 128-wide
    tile; every block starts on a 16-byte boundary unless it is the whole pixel."""
    blocks = CL.channel_blocks(C, R, 4096, "fwd", size)
    assert blocks.GROUPS_PER_BLOCK == gpb
    width = gpb * R
    assert width * size % 16 == 0 or gpb == C // R
    assert blocks.BLOCK_C == triton.next_power_of_2(width) and width / blocks.BLOCK_C >= 0.75


@pytest.mark.parametrize(
    ("C", "S", "dtype_size", "programs"), [(32, 256 * 256, 4, 132), (128, 64 * 64, 4, 132), (320, 64 * 64, 2, 132)]
)
def test_reference_shapes_fill_the_sms(C, S, dtype_size, programs) -> None:
    """The style-transfer InstanceNorms and SD's GroupNorm at N=2-4 (the report's shapes) give
    every one of an H100's 132 SMs a program, both directions; the split is the shape's alone."""
    R = 10 if C == 320 else 1
    N = 2 if C == 320 else 4
    for direction in ("fwd", "bwd"):
        blocks = CL.channel_blocks(C, R, S, direction, dtype_size)
        grid = CL._grid(N, C, R, blocks)
        assert grid[0] * grid[1] >= programs, (direction, blocks, grid)


KINDS = {"mean 1e4": lambda x: 1e4 + x, "mean 1e20": lambda x: 1e20 + 1e15 * x, "scale 1e20": lambda x: 1e20 * x}


@pytest.mark.parametrize("block_n", BLOCK_N, ids=lambda n: f"block{n}")
@pytest.mark.parametrize("groups", [2, 8])
@pytest.mark.parametrize("kind", list(KINDS))
def test_large_offsets_and_magnitudes(kind, groups, block_n, monkeypatch: pytest.MonkeyPatch) -> None:
    """A common offset that dwarfs the spread cancels exactly (each group's pivot), squares
    that would overflow fp32 are taken in power-of-two units, per channel and then per group
    at the largest channel scale; where torch's fp32 result is not finite, within the floor."""
    if block_n:
        monkeypatch.setenv(row_norm.BLOCK_ENV_VAR, str(block_n))
    x, w, b, dy = _data((2, 8, 3, 4), seed=groups)
    x = KINDS[kind](x - 3)
    triton, oracle, low = _group_norm(groups)
    got = _step(triton, x, w, b, dy)
    want = _step(oracle, x, w, b, dy, torch.float64)
    low = {k: torch.where(v.isfinite(), v, want[k].to(v.dtype)) for k, v in _step(low, x, w, b, dy).items()}
    assert all(not t.isnan().any() for t in got.values())
    assert_within_bound(got, want, low)


@pytest.mark.parametrize("block_n", BLOCK_N, ids=lambda n: f"block{n}")
@pytest.mark.parametrize("groups", [2, 8])
def test_eps_zero_on_constant_and_tiny_groups(groups, block_n, monkeypatch: pytest.MonkeyPatch) -> None:
    """eps=0: a constant group gives the bias exactly and no gradient to x or w (rstd = 0);
    float32 input of order 1e-36 (variance below fp32's range) normalizes as float64 does."""
    if block_n:
        monkeypatch.setenv(row_norm.BLOCK_ENV_VAR, str(block_n))
    _, w, b, dy = _data((2, 8, 3, 4), seed=12)
    const = torch.full((2, 8, 3, 4), 3.7).contiguous(memory_format=torch.channels_last)
    got = _step(lambda *a: row_norm.group_norm(*a[:1], groups, *a[1:], 0.0), const, w, b, dy)
    assert torch.equal(got["y"], b.view(1, 8, 1, 1).expand_as(got["y"]))
    assert torch.equal(got["dx"], torch.zeros_like(got["dx"])) and torch.equal(got["dw"], torch.zeros_like(w))
    tiny = 1e-36 * torch.randn(2, 8, 3, 4, generator=torch.Generator().manual_seed(13))
    tiny = tiny.contiguous(memory_format=torch.channels_last)
    got = _step(lambda *a: row_norm.group_norm(*a[:1], groups, *a[1:], 0.0), tiny, w, b, dy)
    want = _step(lambda *a: reference.group_norm(*a[:1], groups, *a[1:], 0.0), tiny, w, b, dy, torch.float64)
    for name, t in got.items():
        assert (t.double() - want[name]).abs().max() / want[name].abs().max() < 1e-5, name
