"""The Triton BatchNorm's finalize kernel: running statistics and the affine coefficients in
the launch that finishes the statistics (issue 15 item 7).

A training step is six Triton launches and no ATen op. The running update keeps
:mod:`normkit.numerics`' policy and arithmetic: with the batch's own mean and unbiased variance,
:func:`normkit.numerics.update_running_stats` gives the same bits for fp32, bf16 and fp16
running statistics. The batch statistics are read back from the kernel itself: with momentum 1
a running statistic becomes exactly the batch's (``b * 1 + r * 0``).
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from normkit import functional, numerics  # noqa: E402
from normkit.ops.triton import batch_norm as B  # noqa: E402
from normkit.ops.triton import static_report  # noqa: E402

f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
EPS = 1e-5

# (input shape, input dtype, layout): prime channel counts, a 7x7 NC* run (aligned window and
# flat blocks), channels_last, (N, C).
INPUTS = [
    ((3, 5, 7, 7), f32, "contiguous"),
    ((2, 7, 3, 5), bf16, "channels_last"),
    ((6, 3), f16, "contiguous"),
]
# momentum=0.1 (torch's default), an arbitrary one, and the cumulative average of
# momentum=None after four batches, from numerics' own factor.
MOMENTA = [0.1, 0.37, numerics.momentum_factor(None, torch.tensor(4))]


def _input(shape, dtype, layout, gen) -> torch.Tensor:
    x = (torch.randn(shape, generator=gen) * 3 + 2).to(device=DEVICE, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _params(C: int, dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple((torch.randn(C, generator=gen) * 0.5 + lo).to(device=DEVICE, dtype=dtype) for lo in (1.0, 0.0))


def _batch_stats(x, w, b) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch mean and unbiased variance the kernel computes (fp32), via momentum 1."""
    C = x.shape[1]
    mean, var = torch.randn(C, device=DEVICE), torch.rand(C, device=DEVICE)
    B.batch_norm(x, mean, var, w, b, True, 1.0, EPS)
    return mean, var


@pytest.mark.parametrize("momentum", MOMENTA)
@pytest.mark.parametrize("stats_dtype", [f32, bf16, f16], ids=str)
@pytest.mark.parametrize(("shape", "dtype", "layout"), INPUTS, ids=str)
def test_running_update_has_numerics_bits(shape, dtype, layout, stats_dtype, momentum) -> None:
    gen = torch.Generator().manual_seed(7)
    x = _input(shape, dtype, layout, gen)
    w, b = _params(shape[1], dtype, gen)
    batch_mean, batch_var = _batch_stats(x, w, b)
    running = [
        (torch.randn(shape[1], generator=gen) + lo).abs().to(device=DEVICE, dtype=stats_dtype) for lo in (0.0, 1.0)
    ]
    want = [r.clone() for r in running]
    numerics.update_running_stats(*want, batch_mean, batch_var, momentum)
    B.batch_norm(x, *running, w, b, True, momentum, EPS)
    for got, expected in zip(running, want, strict=True):
        assert torch.equal(got, expected), (got - expected).abs().max()


@pytest.mark.parametrize("which", ["mean", "var"])
def test_one_running_statistic_alone(which: str) -> None:
    """One statistic given, the other None: only the given one is written, with its bits."""
    gen = torch.Generator().manual_seed(3)
    x = _input((4, 6, 3, 3), f32, "contiguous", gen)
    w, b = _params(6, f32, gen)
    batch = dict(zip(("mean", "var"), _batch_stats(x, w, b), strict=True))
    stat = torch.rand(6, generator=gen).to(DEVICE) + 0.5
    want = stat.clone()
    args = (want, None) if which == "mean" else (None, want)
    numerics.update_running_stats(*args, batch["mean"], batch["var"], 0.1)
    B.batch_norm(x, *((stat, None) if which == "mean" else (None, stat)), w, b, True, 0.1, EPS)
    assert torch.equal(stat, want)


def test_strided_running_statistics_and_parameters() -> None:
    """Running statistics and parameters that are strided views (as vmap's per-element
    selections, or an expanded weight) are read and written at their strides: the elements
    between them untouched, the results those of dense copies."""
    gen = torch.Generator().manual_seed(5)
    C = 5
    x = _input((3, C, 4, 4), bf16, "channels_last", gen)
    storage = torch.randn(2, 2 * C, generator=gen).abs().to(DEVICE)
    mean, var = storage[0, ::2], storage[1, ::2]
    weight = torch.full((1,), 1.5, device=DEVICE).expand(C)
    bias = torch.randn(C, 3, generator=gen).to(DEVICE)[:, 1]
    dense = [mean.clone(), var.clone()]
    before = storage.clone()
    y = B.batch_norm(x, mean, var, weight, bias, True, 0.2, EPS)
    y_dense = B.batch_norm(x, *dense, weight.contiguous(), bias.contiguous(), True, 0.2, EPS)
    assert torch.equal(y, y_dense)
    assert torch.equal(mean, dense[0]) and torch.equal(var, dense[1])
    assert torch.equal(storage[:, 1::2], before[:, 1::2])


def test_failed_call_writes_nothing() -> None:
    """A running statistic of the wrong size fails before any launch: the other one, given and
    valid, keeps its values (torch's error type and message)."""
    x = torch.randn(2, 4, 3, device=DEVICE)
    mean, var = torch.zeros(4, device=DEVICE), torch.ones(5, device=DEVICE)
    with pytest.raises(RuntimeError, match="running statistics should contain 4 elements not 5"):
        B.batch_norm(x, mean, var, None, None, True, 0.1, EPS)
    assert torch.equal(mean, torch.zeros(4, device=DEVICE))
    with pytest.raises(RuntimeError):  # the public entry point refuses it too
        functional.batch_norm(x, mean, var, training=True, backend="triton")
    assert torch.equal(mean, torch.zeros(4, device=DEVICE))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_training_step_is_six_launches(dtype: str, layout: str) -> None:
    """Forward and backward with running statistics and bf16/fp32 parameters: the statistics
    and finalize kernels, the normalization, and the backward's reduce, finalize and apply
    kernels; no ATen op between them (cuDNN's count is 2-3)."""
    case = static_report.Case("running", "batch_norm", (2, 8, 7, 7), dtype, layout)
    step = static_report.record_step(case)
    names = [launch.kernel.fn.__name__ for launch in step.launches]
    assert names == [
        "batch_norm_stats_kernel",
        "batch_norm_finalize_kernel",
        "batch_norm_apply_kernel",
        "batch_norm_bwd_reduce_kernel",
        "batch_norm_bwd_finalize_kernel",
        "batch_norm_bwd_apply_kernel",
    ]
    assert not step.aten_ops, step.aten_ops
