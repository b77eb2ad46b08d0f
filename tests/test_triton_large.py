"""Triton norms on one sample of more than 2**31 elements, on a GPU (issue 15 item 1).

An address computed in int32 anywhere in a kernel wraps past 2**31 elements and reads or
writes the wrong memory silently; the CPU interpreter cannot show it at these sizes. Run by
``make gpu-check`` with ``TRITON_DEBUG=1`` (kernels compiled with Triton's overflow checks), each
case training-steps one sample of 640 x 2048 x 2048 bf16 elements (5.4 GB a tensor, about 25 GB
in all) and checks the results of the channels stored last, past 2**31, against float64 on
their slice: within the self-calibrating bound of STYLE.md (torch in bf16 on the same slice as
the baseline). Skipped without CUDA or without the memory.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (and about 30 GB of its memory)", allow_module_level=True)

from normkit import reference  # noqa: E402
from normkit.testing import assert_within_bound  # noqa: E402

SHAPE = (1, 640, 2048, 2048)  # C * H * W = 2.68e9 > 2**31 in one sample
GROUPS = 32
NEEDED_BYTES = 30 * 2**30


def _group_norm(x, w, b):
    from normkit.ops.triton import row_norm

    return row_norm.group_norm(x, GROUPS, w, b)


def _batch_norm(x, w, b):
    from normkit.ops.triton import batch_norm

    return batch_norm.batch_norm(x, None, None, w, b, training=True)


# (norm, memory format, the channels checked: one GroupNorm group or two BatchNorm channels, the
# last in memory, and how torch and the float64 reference compute them on their own slice)
CASES = {
    "group_norm-channels_last": (
        _group_norm,
        torch.channels_last,
        SHAPE[1] // GROUPS,
        lambda x, w, b: F.group_norm(x, 1, w, b),
        lambda x, w, b: reference.group_norm(x, 1, w, b),
    ),
    "batch_norm-contiguous": (
        _batch_norm,
        torch.contiguous_format,
        2,
        lambda x, w, b: F.batch_norm(x, None, None, w, b, True),
        lambda x, w, b: reference.batch_norm(x, None, None, w, b, True, 0.1, 1e-5),
    ),
}


def _step(norm, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    y = norm(x, w, b)
    dx, dw, db = torch.autograd.grad(y, [x, w, b], dy)
    return {"y": y.detach(), "dx": dx, "dw": dw, "db": db}


@pytest.mark.parametrize("case", list(CASES))
def test_one_sample_past_2_31_elements(case: str) -> None:
    norm, memory_format, checked, torch_norm, float64_norm = CASES[case]
    free, _ = torch.cuda.mem_get_info()
    if free < NEEDED_BYTES:
        pytest.skip(f"needs {NEEDED_BYTES / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    gen = torch.Generator(device="cuda").manual_seed(0)
    C = SHAPE[1]
    x = torch.randn(SHAPE, generator=gen, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=memory_format)
    dy = torch.randn(SHAPE, generator=gen, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=memory_format)
    w = torch.randn(C, generator=gen, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(C, generator=gen, device="cuda", dtype=torch.bfloat16)
    got = _step(norm, x, w, b, dy)
    torch.cuda.synchronize()  # a device-side overflow assertion surfaces here
    tail = slice(C - checked, C)
    got = {k: v[tail] if v.dim() == 1 else v[:, tail] for k, v in got.items()}
    x, dy, w, b = x[:, tail], dy[:, tail], w[tail], b[tail]
    want = _step(float64_norm, x.double(), w.double(), b.double(), dy.double())
    low = _step(torch_norm, x, w, b, dy)
    assert_within_bound(got, want, low)
