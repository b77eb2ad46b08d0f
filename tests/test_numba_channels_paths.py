"""The numba channel norms' two schedules of channels_last GroupNorm/InstanceNorm give the same
bits: one task per sample (statistics, then output while the sample is in cache) and blocks
of rows over all samples (the schedule at small batches, where samples are too few for the
threads). The launcher picks by batch size and thread count, so any difference would break
determinism across thread counts and batch invariance.

Shapes span more than one block of rows (``channel_norm.BLOCK_ELEMENTS // C``), odd group
sizes, every activation; float64 is also checked against torch in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from cases import seed_of

pytest.importorskip("numba")
cn = pytest.importorskip("normkit.ops.numba.channel_norm")

ACTS = {None: lambda y: y, "relu": F.relu, "silu": F.silu, "gelu": F.gelu}

# (shape, groups, act): C=8 gives blocks of 2048 rows, so 48x50 positions are two blocks (the
# second partial); groups of 1, 3 and 8 channels; 3-D spatial; one position.
CASES = [
    ((3, 8, 48, 50), 4, None),
    ((2, 8, 48, 50), 8, "relu"),
    ((2, 6, 37, 61), 2, "silu"),
    ((3, 6, 5, 7), 6, "gelu"),
    ((2, 8, 3, 4, 5), 1, None),
    ((2, 6, 1, 1), 3, "relu"),
]


def _case_id(case: tuple) -> str:
    shape, groups, act = case
    return f"{'x'.join(map(str, shape))}-G{groups}-{act}"


def _run(x: Tensor, groups: int, act: str | None, seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    C = x.shape[1]
    w, b = (torch.randn(C, generator=g, dtype=torch.float64).to(x.dtype).requires_grad_() for _ in range(2))
    xs = x.detach().clone().requires_grad_()
    y = cn.group_norm_act(xs, groups, w, b, 1e-5, act)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(x.dtype)
    dx, dw, db = torch.autograd.grad(y, (xs, w, b), dy)
    return {"y": y.detach(), "dx": dx, "dw": dw, "db": db}


def _input(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 2).to(dtype)
    return x.contiguous(memory_format={4: torch.channels_last, 5: torch.channels_last_3d}[x.dim()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_per_sample_and_blocked_schedules_give_the_same_bits(case: tuple, dtype: torch.dtype, monkeypatch) -> None:
    shape, groups, act = case
    x = _input(shape, dtype, seed_of(_case_id(case)))
    results = {}
    for per_sample in (True, False):
        monkeypatch.setattr(cn, "_per_sample", lambda N, per_sample=per_sample: per_sample)
        results[per_sample] = _run(x, groups, act, seed_of(_case_id(case), "grads"))
    for name, value in results[True].items():
        other = results[False][name]
        assert torch.equal(value.reshape(-1).view(torch.uint8), other.reshape(-1).view(torch.uint8)), name


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_per_sample_schedule_matches_torch_in_float64(case: tuple, monkeypatch) -> None:
    shape, groups, act = case
    monkeypatch.setattr(cn, "_per_sample", lambda N: True)
    x = _input(shape, torch.float64, seed_of(_case_id(case), "f64"))
    mine = _run(x, groups, act, seed_of(_case_id(case), "f64 grads"))

    def oracle(x: Tensor, groups: int, w: Tensor, b: Tensor, eps: float, act: str | None) -> Tensor:
        return ACTS[act](F.group_norm(x, groups, w, b, eps))

    monkeypatch.setattr(cn, "group_norm_act", oracle)
    torch_result = _run(x, groups, act, seed_of(_case_id(case), "f64 grads"))
    for name, value in mine.items():
        torch.testing.assert_close(value, torch_result[name], rtol=1e-10, atol=1e-10, msg=name)
