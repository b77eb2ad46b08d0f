"""The Triton BatchNorm where a channel's run does not start on a 16-byte boundary (NC* input
with ``H * W`` not a multiple of 16, as ResNet's 14x14 and 7x7; issue 15 item 6).

There the reducing kernels read each run through an aligned window (``ALIGN``) and the
elementwise kernels read contiguous tensors flat, gathering each element's channel (``FLAT``).
These tests check that the launchers choose those paths, that the results stay within the
float64 bound with many tiles, windows and flat blocks (small tiles), and that an element
outside a channel's run, read with its vector, never reaches that channel's results.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from kernel_bound import assert_within_bound  # noqa: E402
from normkit import functional, reference  # noqa: E402
from normkit.ops.triton import batch_norm as B  # noqa: E402
from normkit.ops.triton.static_report import recorded_launches  # noqa: E402
from test_triton_batch_norm import Case  # noqa: E402
from test_triton_batch_norm import test_matches_float64_oracle as matches_float64_oracle  # noqa: E402

f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16


def _launches(x: torch.Tensor, dy: torch.Tensor) -> dict[str, dict]:
    """The compile-time flags of each BatchNorm kernel of one training step (recorded, not run)."""
    C = x.shape[1]
    w, b = (torch.ones(C, requires_grad=True) for _ in range(2))
    x = x.detach().requires_grad_()
    with recorded_launches() as launches:
        y = B.batch_norm(x, None, None, w, b, training=True)
        torch.autograd.grad(y, [x, w, b], dy)
    return {launch.name: launch.kwargs for launch in launches}


@pytest.mark.parametrize("dtype", [bf16, f32], ids=str)
@pytest.mark.parametrize("hw", [14, 7])
def test_unaligned_runs_take_the_vector_paths(hw: int, dtype: torch.dtype) -> None:
    x = torch.empty(4, 8, hw, hw, dtype=dtype)
    flags = _launches(x, torch.empty_like(x))
    align = 16 // x.element_size()
    assert flags["batch_norm_stats_kernel"]["ALIGN"] == align
    assert flags["batch_norm_bwd_reduce_kernel"]["ALIGN"] == align
    assert flags["batch_norm_apply_kernel"]["FLAT"]
    assert flags["batch_norm_bwd_apply_kernel"]["FLAT"]


def test_aligned_and_mismatched_layouts_keep_the_tiles() -> None:
    # 16x16 runs start aligned: nothing to do.
    x = torch.empty(2, 8, 16, 16, dtype=bf16)
    flags = _launches(x, torch.empty_like(x))
    assert flags["batch_norm_stats_kernel"]["ALIGN"] == 1
    assert not flags["batch_norm_apply_kernel"]["FLAT"]
    # A channels_last upstream gradient has other runs than x: the window and the flat blocks
    # would not be the same for both, so the backward keeps the tiles (the forward is unchanged).
    x = torch.empty(2, 8, 7, 7, dtype=bf16)
    flags = _launches(x, torch.empty_like(x, memory_format=torch.channels_last))
    assert flags["batch_norm_stats_kernel"]["ALIGN"] == 8
    assert flags["batch_norm_apply_kernel"]["FLAT"]
    assert flags["batch_norm_bwd_reduce_kernel"]["ALIGN"] == 1
    assert not flags["batch_norm_bwd_apply_kernel"]["FLAT"]
    # An input that does not start on a 16-byte boundary: a window could reach past its memory.
    x = torch.empty(2 * 8 * 49 + 1, dtype=bf16)[1:].view(2, 8, 7, 7)
    flags = _launches(x, torch.empty_like(x))
    assert flags["batch_norm_stats_kernel"]["ALIGN"] == 1
    assert not flags["batch_norm_apply_kernel"]["FLAT"]


CASES = [
    Case((3, 5, 7), bf16, param_dtype=f32, block_n=16),  # windows of 16 rows over runs of 7
    Case((2, 6, 3, 5), f16, block_n=8, act="gelu"),  # S = 15: every run starts unaligned
    Case((2, 4, 3, 3), block_n=4),  # fp32 vectors of 4, tiles of 4: windows cross tiles
    Case((5, 3, 7, 7), bf16, bias=False, act="silu"),  # the 7x7 stage, one tile per run
    Case((2, 5, 2, 7), bf16, layout="sliced", block_n=8),  # strided: windows, no flat blocks
    Case((3, 4, 5), f16, param_dtype=f32, stats=False, train_steps=1, act="relu"),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_float64_oracle(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    matches_float64_oracle(case, monkeypatch)


def _step(impl, x: torch.Tensor, dy: torch.Tensor, w: torch.Tensor, b: torch.Tensor, act: str | None):
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    y = impl(x, w, b, act)
    return (y.detach(), *torch.autograd.grad(y, [x, w, b], dy))


def test_channels_last_upstream_gradient_within_bound() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 3, 5, generator=gen).to(DEVICE, bf16)
    dy = torch.randn(3, 5, 3, 5, generator=gen).to(DEVICE, bf16).contiguous(memory_format=torch.channels_last)
    w, b = (torch.randn(5, generator=gen).to(DEVICE) for _ in range(2))

    def ours(x, w, b, act):
        return B.batch_norm(x, None, None, w, b, training=True, act=act)

    def theirs(norm):
        return lambda x, w, b, act: functional.activate(act, norm(x, None, None, w, b, True, 0.1, 1e-5))

    names = ("y", "dx", "dw", "db")
    got = dict(zip(names, _step(ours, x, dy, w, b, "silu"), strict=True))
    want = dict(
        zip(
            names,
            _step(theirs(reference.batch_norm), x.double(), dy.double(), w.double(), b.double(), "silu"),
            strict=True,
        )
    )
    low = dict(zip(names, _step(theirs(F.batch_norm), x, dy, w, b, "silu"), strict=True))
    assert_within_bound(got, want, low)


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
@pytest.mark.parametrize("act", [None, "relu", "silu", "gelu"])
def test_a_neighbours_non_finite_element_stays_in_its_channel(act: str | None, value: float) -> None:
    """Runs of 7 bf16 elements share vectors with their neighbours: an inf or NaN in channel 2
    makes channel 2's results non-finite, as torch's, and no other channel's."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 7, generator=gen)
    x[1, 2, 0] = value  # the first element of a run: it shares a vector with channel 1's end
    x[0, 2, 6] = value  # the last: it shares one with channel 3's start
    x = x.to(DEVICE, bf16)
    dy = torch.randn(2, 4, 7, generator=gen).to(DEVICE, bf16)
    w, b = (torch.randn(4, generator=gen).to(DEVICE) for _ in range(2))
    got = _step(lambda x, w, b, act: B.batch_norm(x, None, None, w, b, training=True, act=act), x, dy, w, b, act)
    want = _step(
        lambda x, w, b, act: functional.activate(act, F.batch_norm(x, None, None, w, b, True)),
        x.float(),
        dy.float(),
        w,
        b,
        act,
    )
    clean = [0, 1, 3]
    for name, g, t in zip(("y", "dx", "dw", "db"), got, want, strict=True):
        per_channel = (lambda v: v[:, clean]) if g.dim() == 3 else (lambda v: v[clean])
        assert torch.isfinite(per_channel(g)).all(), name
        assert torch.isfinite(per_channel(t)).all(), name
        channel_2 = g[:, 2] if g.dim() == 3 else g[2]
        assert bool(torch.isfinite(channel_2).all()) == bool(torch.isfinite(t[:, 2] if t.dim() == 3 else t[2]).all())
