"""The table of double-backward cases both kernel backends' tests run (tests/test_numba_double_backward.py,
tests/test_triton_double_backward.py): one small case per op, random tensors, and the second-order
quantities every case compares (first gradients with a graph, then Hessian-vector products with
respect to every input and to the first cotangent)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from normkit import functional as NF
from normkit import functional_blocks as FB

__all__ = ["CASES", "D", "SHAPE", "Case", "check_first_order_keeps_the_kernel", "second_order", "tensors"]

F64 = torch.float64


class Case(NamedTuple):
    shapes: tuple[tuple[int, ...], ...]  # the differentiated tensors, in call order
    call: Callable[..., Tensor | tuple[Tensor, ...]]  # call(backend, *tensors)
    channels_last: bool = False


def rows(op: str, eps: float = 1e-5) -> Case:
    calls = {
        "layer_norm": lambda be, x, w, b: NF.layer_norm(x, x.shape[-1:], w, b, eps, backend=be),
        "rms_norm": lambda be, x, w: NF.rms_norm(x, x.shape[-1:], w, eps, backend=be),
        "add_layer_norm": lambda be, x, r, w, b: NF.add_layer_norm(x, r, x.shape[-1:], w, b, eps, backend=be),
        "add_rms_norm": lambda be, x, r, w: NF.add_rms_norm(x, r, x.shape[-1:], w, eps, backend=be),
    }
    return calls[op]


# One small case per op (each backend's test checks none of its ops is missing).
SHAPE, D = (3, 5, 24), 24
CASES: dict[str, Case] = {
    "layer_norm": Case((SHAPE, (D,), (D,)), rows("layer_norm")),
    "rms_norm": Case((SHAPE, (D,)), rows("rms_norm")),
    "add_layer_norm": Case((SHAPE, SHAPE, (D,), (D,)), rows("add_layer_norm")),
    "add_rms_norm": Case((SHAPE, SHAPE, (D,)), rows("add_rms_norm")),
    "normalize": Case(((2, 6, 4, 5), (6,), (6,)), lambda be, x, w, b: NF.normalize(x, 1, w, b, backend=be)),
    "batch_norm": Case(
        ((4, 6, 3, 5), (6,), (6,)), lambda be, x, w, b: NF.batch_norm(x, None, None, w, b, True, backend=be)
    ),
    "batch_norm_act": Case(
        ((4, 6, 3, 5), (6,), (6,)),
        lambda be, x, w, b: NF.batch_norm_act(x, None, None, w, b, True, act="silu", backend=be),
        channels_last=True,
    ),
    "group_norm": Case(((3, 6, 4, 5), (6,), (6,)), lambda be, x, w, b: NF.group_norm(x, 3, w, b, backend=be)),
    "group_norm_act": Case(
        ((3, 6, 4, 5), (6,), (6,)),
        lambda be, x, w, b: NF.group_norm_act(x, 2, w, b, act="gelu", backend=be),
        channels_last=True,
    ),
    "instance_norm": Case(
        ((3, 4, 5, 6), (4,), (4,)), lambda be, x, w, b: NF.instance_norm(x, None, None, w, b, backend=be)
    ),
    "modulated_layer_norm": Case(
        (SHAPE, (3, 1, D), (3, 5, D), (D,), (D,)),
        lambda be, x, sh, sc, w, b: FB.modulated_layer_norm(x, sh, sc, w, b, backend=be),
    ),
    "modulated_rms_norm": Case(
        (SHAPE, (D,), (3, 1, D), (D,)), lambda be, x, sh, sc, w: FB.modulated_rms_norm(x, sh, sc, w, backend=be)
    ),
    "gated_rms_norm": Case(
        (SHAPE, SHAPE, (D,)), lambda be, x, g, w: FB.gated_rms_norm(x, g, w, group_size=8, backend=be)
    ),
    "qk_rms_norm": Case(
        ((2, 3, 4, 16), (2, 1, 4, 16), (16,), (16,)), lambda be, q, k, wq, wk: FB.qk_rms_norm(q, k, wq, wk, backend=be)
    ),
    "sandwich_rms_norm": Case(
        (SHAPE, SHAPE, (D,), (D,)),
        lambda be, h, r, w1, w2: FB.sandwich_rms_norm(h, r, w1, w2, weight_offset=1.0, backend=be),
    ),
    "dyt": Case((SHAPE, (1,), (D,), (D,)), lambda be, x, a, w, b: FB.dyt(x, a, w, b, backend=be)),
    "derf": Case((SHAPE, (1,), (1,), (D,), (D,)), lambda be, x, a, s, w, b: FB.derf(x, a, s, w, b, backend=be)),
}


def tensors(case: Case, dtype: torch.dtype, seed: int, device: str | torch.device = "cpu") -> list[Tensor]:
    """The case's random tensors (drawn in float64 on the CPU, then cast and moved)."""
    gen = torch.Generator().manual_seed(seed)
    out = [torch.randn(s, generator=gen, dtype=F64).to(device, dtype) for s in case.shapes]
    if case.channels_last:
        out[0] = out[0].contiguous(memory_format=torch.channels_last)
    return out


def second_order(case: Case, backend: str | None, tensors: list[Tensor], seed: int) -> dict[str, Tensor]:
    """First gradients (with a graph) of ``<y, g>`` for a random ``g`` requiring grad, then the
    gradients of ``sum_i <grad_i, v_i>`` (random ``v``) with respect to every input and ``g``."""
    gen = torch.Generator().manual_seed(seed)

    def randn(t: Tensor) -> Tensor:
        return torch.randn(t.shape, generator=gen, dtype=F64).to(t.device, t.dtype)

    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = case.call(backend, *leaves)
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
    gs = [randn(o).requires_grad_() for o in outs]
    first = torch.autograd.grad(outs, leaves, gs, create_graph=True, materialize_grads=True)
    total = sum((f * randn(f)).sum() for f in first)
    second = torch.autograd.grad(total, leaves + gs, materialize_grads=True)
    names = [f"d{i}" for i in range(len(leaves))] + [f"dd{i}" for i in range(len(leaves))]
    names += [f"dg{i}" for i in range(len(gs))]
    return dict(zip(names, [t.detach() for t in (*first, *second)], strict=True))


def check_first_order_keeps_the_kernel(case: Case, backend: str, device: str | torch.device = "cpu") -> None:
    """A first-order backward, and one under a single ``torch.func.grad`` (grad mode on, nothing
    to differentiate further), run the kernel: the same bits. With ``create_graph=True`` the
    composition's first derivatives agree with them to float32 rounding."""
    x, *params = tensors(case, torch.float32, seed=4, device=device)

    def first(t: Tensor) -> Tensor:
        y = case.call(backend, t, *params)
        return y[0] if isinstance(y, tuple) else y

    g = torch.randn(first(x).shape, generator=torch.Generator().manual_seed(2)).to(device)
    leaf = x.clone().requires_grad_()
    (plain,) = torch.autograd.grad(first(leaf), leaf, g)
    assert not plain.requires_grad
    assert torch.equal(torch.func.grad(lambda t: (first(t) * g).sum())(x), plain)
    (graph,) = torch.autograd.grad(first(leaf), leaf, g, create_graph=True)
    assert graph.requires_grad
    torch.testing.assert_close(graph, plain, rtol=1e-4, atol=1e-5)
