"""The Triton kernels' gradients on every layout family torch's own CPU kernels get wrong (see
tests/test_gradient_layouts.py): a channels_last batch of one, channels_last strides that are not
the format's own on size-1 axes, an upstream gradient in another order than the input. Each
result within twice torch's float32 error (contiguous tensors) of the float64 reference.

Runs on CUDA when there is a device, else under Triton's interpreter (``TRITON_INTERPRET=1``),
with tiny shapes."""

from __future__ import annotations

import os

import pytest
import torch
from torch import Tensor

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

import normkit.functional as NF  # noqa: E402
from normkit.testing import assert_within_bound  # noqa: E402

F64 = torch.float64
ORDERS = {"contiguous": (0, 1, 2, 3), "channels_last": (0, 2, 3, 1), "reversed": (3, 2, 1, 0)}
KINDS = ["batch_norm", "batch_norm_act", "instance_norm", "group_norm"]


def _in_order(t: Tensor, order: tuple[int, ...]) -> Tensor:
    inv = [order.index(i) for i in range(t.dim())]
    return t.permute(order).contiguous().permute(inv)


def _run(kind: str, backend: str, x: Tensor, dy: Tensor, params: list[Tensor]) -> dict[str, Tensor]:
    xi = x.detach().requires_grad_()
    w, b = (p.detach().to(x).requires_grad_() for p in params)
    if kind == "batch_norm":
        y = NF.batch_norm(xi, None, None, w, b, True, backend=backend)
    elif kind == "batch_norm_act":
        y = NF.batch_norm_act(xi, None, None, w, b, True, act="silu", backend=backend)
    elif kind == "instance_norm":
        y = NF.instance_norm(xi, weight=w, bias=b, backend=backend)
    else:
        y = NF.group_norm(xi, 2, w, b, backend=backend)
    dx, dw, db = torch.autograd.grad(y, (xi, w, b), dy.to(y))
    return {"y": y.detach(), "dx": dx, "dweight": dw, "dbias": db}


@pytest.mark.parametrize("shape", [(1, 4, 1, 5), (1, 4, 3, 5), (2, 4, 3, 5)], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_triton_gradients_on_every_layout_family(kind: str, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(sum(shape) * 13 + KINDS.index(kind))
    x = torch.randn(shape, generator=g, dtype=F64)
    dy = torch.randn(shape, generator=g, dtype=F64)
    params = [torch.rand(shape[1], generator=g, dtype=F64) + 0.5, torch.randn(shape[1], generator=g, dtype=F64)]
    ref = _run(kind, "reference", x, dy, params)
    low = _run(kind, "torch", x.float(), dy, params)
    for x_name, x_order in ORDERS.items():
        for dy_name, dy_order in ORDERS.items():
            xs = _in_order(x.float(), x_order).to(DEVICE)
            got = _run(kind, "triton", xs, _in_order(dy.float(), dy_order).to(DEVICE), params)
            try:
                assert_within_bound({k: v.cpu() for k, v in got.items()}, ref, low)
            except AssertionError as e:
                raise AssertionError(f"x {x_name}, dy {dy_name}: {e}") from None
