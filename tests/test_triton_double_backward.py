"""Second (and higher) derivatives through the Triton kernels (``backend="triton"``).

A kernel's backward is first-order; when autograd runs it with ``create_graph=True`` the Triton
ops compute their gradients in differentiable torch operations instead
(``normkit.ops.triton._graph_backward``, over the compositions in ``normkit.ops._graph_backward``).
Triton declines float64, so ``gradgradcheck`` is out: the oracle is torch's double backward of
the same call in float64, and the kernels' float32 (and bfloat16) results must stay within
twice torch's own error in that precision (``normkit.testing``'s bound). Every case draws random
inputs, weights, first cotangents and second-order directions, and the first cotangent itself
is differentiated (as ``gradgradcheck`` does): a Hessian-vector product for every input.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from blocks_cases import DEVICE, needs_triton
from double_backward_cases import CASES, SHAPE, Case, D, check_first_order_keeps_the_kernel, second_order, tensors
from kernel_bound import assert_within_bound
from normkit import functional as NF
from normkit import functional_blocks as FB
from normkit.backends import get_backend

pytestmark = needs_triton

F64, F32 = torch.float64, torch.float32


IMAGE = (3, 6, 4, 5)
_RUNNING = (torch.linspace(-1, 1, 6), torch.linspace(0.5, 2, 6))


def _eval_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    return tuple(t.to(x.device, x.dtype) for t in _RUNNING)


# CASES (double_backward_cases.py) has one case per op; the variants add the other layout of
# GroupNorm/InstanceNorm (channels_last has its own launcher), BatchNorm in eval mode, the gate
# after the norm, gradients reaching only some inputs.
VARIANTS: dict[str, Case] = {
    "group_norm channels_last": CASES["group_norm"]._replace(channels_last=True),
    "group_norm_act contiguous": CASES["group_norm_act"]._replace(channels_last=False),
    "batch_norm_act contiguous": CASES["batch_norm_act"]._replace(channels_last=False),
    "instance_norm channels_last": CASES["instance_norm"]._replace(channels_last=True),
    "batch_norm eval": Case(
        (IMAGE, (6,), (6,)), lambda be, x, w, b: NF.batch_norm(x, *_eval_stats(x), w, b, False, backend=be)
    ),
    "batch_norm_act eval relu": Case(
        (IMAGE, (6,), (6,)),
        lambda be, x, w, b: NF.batch_norm_act(x, *_eval_stats(x), w, b, False, act="relu", backend=be),
    ),
    "batch_norm no affine": Case((IMAGE,), lambda be, x: NF.batch_norm(x, None, None, None, None, True, backend=be)),
    "group_norm_act silu no bias": Case(
        (IMAGE, (6,)), lambda be, x, w: NF.group_norm_act(x, 3, w, None, act="silu", backend=be)
    ),
    "gated_rms_norm norm_before_gate": Case(
        (SHAPE, SHAPE, (D,)),
        lambda be, x, g, w: FB.gated_rms_norm(x, g, w, group_size=12, norm_before_gate=True, backend=be),
    ),
    "add_rms_norm residual only": Case(
        (SHAPE,), lambda be, r: NF.add_rms_norm(_fixed(r), r, (D,), None, 1e-5, backend=be)
    ),
    "add_layer_norm no residual": Case(
        (SHAPE, (D,), (D,)), lambda be, x, w, b: NF.add_layer_norm(x, None, (D,), w, b, backend=be)
    ),
    "modulated_layer_norm scale only": Case(
        ((3, 1, D),), lambda be, sc: FB.modulated_layer_norm(_fixed(sc, SHAPE), _fixed(sc, (D,)), sc, backend=be)
    ),
    "qk_rms_norm k only": Case(
        ((2, 1, 4, 16),), lambda be, k: FB.qk_rms_norm(_fixed(k, (2, 3, 4, 16)), k, None, None, backend=be)[1]
    ),
    "sandwich next_weight only": Case(
        ((D,),), lambda be, w2: FB.sandwich_rms_norm(_fixed(w2, SHAPE), _fixed(w2, SHAPE).flip(0), None, w2, backend=be)
    ),
    "dyt alpha only": Case(((1,),), lambda be, a: FB.dyt(_fixed(a, SHAPE), a, None, None, backend=be)),
}


def _fixed(like: Tensor, shape: tuple[int, ...] | None = None) -> Tensor:
    """A fixed random tensor (no gradient) of ``shape`` (default ``like``'s), ``like``'s dtype and device."""
    t = torch.randn(shape or like.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    return t.to(like.device, like.dtype)


def _judge(case: Case, dtype: torch.dtype, seed: int) -> None:
    ts = tensors(case, dtype, seed, DEVICE)
    got = second_order(case, "triton", ts, seed=3)
    low = second_order(case, "torch", ts, seed=3)
    ref = second_order(case, "torch", [t.double() for t in ts], seed=3)
    assert_within_bound(got, ref, low)


def test_every_triton_op_has_a_case() -> None:
    assert set(get_backend("triton").ops) <= set(CASES)


@pytest.mark.parametrize("name", [*CASES, *VARIANTS])
def test_triton_second_derivatives_within_the_bound(name: str) -> None:
    _judge(CASES.get(name) or VARIANTS[name], F32, seed=len(name))


@pytest.mark.parametrize("name", ["layer_norm", "add_rms_norm", "group_norm_act", "batch_norm", "sandwich_rms_norm"])
def test_triton_bfloat16_second_derivatives_within_the_bound(name: str) -> None:
    """bfloat16 input: the composition runs in float32 and rounds like torch's."""
    _judge(CASES[name], torch.bfloat16, seed=len(name))


def test_add_norm_float32_residual_stream_of_bfloat16_input() -> None:
    """``residual_dtype=float32``: the saved ``residual_out`` is float32, x's gradient bfloat16."""
    case = Case(
        (SHAPE, SHAPE, (D,)),
        lambda be, x, r, w: NF.add_rms_norm(x, r.float(), (D,), w, 1e-5, residual_dtype=F32, backend=be),
    )
    _judge(case, torch.bfloat16, seed=9)


def test_third_derivative_within_the_bound() -> None:
    gen = torch.Generator().manual_seed(5)
    x0, w0 = (torch.randn(s, generator=gen, dtype=F64).to(DEVICE) for s in ((4, 9), (9,)))

    def third(be: str, dtype: torch.dtype) -> dict[str, Tensor]:
        x, w = x0.to(dtype).requires_grad_(), w0.to(dtype).requires_grad_()
        (dx,) = torch.autograd.grad(NF.rms_norm(x, (9,), w, 1e-5, backend=be).pow(3).sum(), x, create_graph=True)
        (ddx,) = torch.autograd.grad(dx.pow(2).sum(), x, create_graph=True)
        return dict(zip(("x", "w"), torch.autograd.grad(ddx.sin().sum(), (x, w)), strict=True))

    assert_within_bound(third("triton", F32), third("torch", F64), third("torch", F32))


def test_torch_func_hessian_vector_products() -> None:
    """``jacrev(grad)`` (torch.func's nested reverse mode) through the kernels: torch's Hessian."""
    gen = torch.Generator().manual_seed(8)
    x0, w0 = (torch.randn(s, generator=gen, dtype=F64).to(DEVICE) for s in ((3, 8), (8,)))

    def hess(be: str, dtype: torch.dtype) -> dict[str, Tensor]:
        w = w0.to(dtype)
        loss = torch.func.grad(lambda t: NF.layer_norm(t, (8,), w, None, backend=be).pow(2).sum())
        return {"hessian": torch.func.jacrev(loss)(x0.to(dtype))}

    assert_within_bound(hess("triton", F32), hess("torch", F64), hess("torch", F32))


@pytest.mark.parametrize("op", ["rms_norm", "add_layer_norm", "group_norm", "batch_norm", "dyt", "qk_rms_norm"])
def test_first_order_keeps_the_kernel(op: str) -> None:
    check_first_order_keeps_the_kernel(CASES[op], "triton", DEVICE)


@pytest.mark.parametrize("op", ["batch_norm", "instance_norm"])
def test_double_backward_moves_running_statistics_once(op: str) -> None:
    """The double backward recomputes the batch statistics without writing the running ones."""
    gen = torch.Generator().manual_seed(12)
    x0, w0, dy = (torch.randn(s, generator=gen, dtype=F64).to(DEVICE) for s in ((4, 3, 5, 6), (3,), (4, 3, 5, 6)))
    results = {}
    for be, dtype in (("triton", F32), ("torch", F64), ("torch", F32)):
        x, w = x0.to(dtype).requires_grad_(), w0.to(dtype).requires_grad_()
        rm, rv = torch.zeros(3, dtype=dtype, device=DEVICE), torch.ones(3, dtype=dtype, device=DEVICE)
        norm = NF.batch_norm if op == "batch_norm" else NF.instance_norm
        y = norm(x, rm, rv, w, None, True, 0.3, backend=be)
        after_forward = (rm.clone(), rv.clone())
        (dx,) = torch.autograd.grad(y, x, dy.to(dtype), create_graph=True)
        results[be, dtype] = dict(zip(("x", "w"), torch.autograd.grad(dx.pow(2).sum(), (x, w)), strict=True))
        assert torch.equal(rm, after_forward[0]) and torch.equal(rv, after_forward[1])
    assert_within_bound(results["triton", F32], results["torch", F64], results["torch", F32])


def test_gradient_penalty_reaches_the_parameters() -> None:
    """A gradient penalty (WGAN-GP style) through a Triton LayerNorm: the penalty's gradient
    reaches weight and bias as torch's does."""
    gen = torch.Generator().manual_seed(14)
    x0, w0, b0 = (torch.randn(s, generator=gen, dtype=F64).to(DEVICE) for s in ((16, 32), (32,), (32,)))
    out = {}
    for be, dtype in (("triton", F32), ("torch", F64), ("torch", F32)):
        x, w, b = (t.to(dtype).requires_grad_() for t in (x0, w0, b0))
        y = NF.layer_norm(x, (32,), w, b, backend=be)
        (dx,) = torch.autograd.grad(y.tanh().sum(), x, create_graph=True)
        penalty = (dx.norm(dim=1) - 1).pow(2).mean()
        out[be, dtype] = dict(
            zip(
                ("w", "b"), torch.autograd.grad(penalty, (w, b), allow_unused=True, materialize_grads=True), strict=True
            )
        )
    assert_within_bound(out["triton", F32], out["torch", F64], out["torch", F32])


def test_checkpointed_double_backward() -> None:
    """Under non-reentrant activation checkpointing the op's saved tensors unpack once: the
    backward that chooses between kernel and composition reads them once for both."""
    gen = torch.Generator().manual_seed(16)
    x0, w0 = (torch.randn(s, generator=gen).to(DEVICE) for s in ((6, 16), (16,)))
    out = {}
    for checkpointed in (False, True):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()

        def f(t: Tensor) -> Tensor:
            return NF.rms_norm(t, (16,), w, 1e-5, backend="triton").sin()

        y = torch.utils.checkpoint.checkpoint(f, x, use_reentrant=False) if checkpointed else f(x)
        (dx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        out[checkpointed] = torch.autograd.grad(dx.pow(2).sum(), (x, w))
    for p, q in zip(out[True], out[False], strict=True):
        torch.testing.assert_close(p, q)
