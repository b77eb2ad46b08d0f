"""Second (and higher) derivatives through the numba kernels: explicit ``backend="numba"`` and
``"auto"`` where it picks numba.

A kernel's backward is first-order; when autograd runs it with ``create_graph=True`` the numba
ops compute their gradients in differentiable torch operations instead
(``normkit.ops.numba._graph_backward``). The oracle is torch's double backward of the same call
(``backend="torch"``): equal within float64 rounding for float64 input, and for the float32
calls "auto" sends to numba within the self-calibrating bound against torch in float64. Every
case draws random inputs, weights, first cotangents and second-order directions, and the first
cotangent itself is differentiated (as ``gradgradcheck`` does).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import normkit
from double_backward_cases import CASES, SHAPE, Case, D, check_first_order_keeps_the_kernel, rows
from double_backward_cases import second_order as _second_order
from double_backward_cases import tensors as _tensors
from kernel_bound import assert_within_bound
from normkit import functional as NF
from normkit import functional_blocks as FB
from normkit.backends import get_backend
from normkit.ops.numba.backend import MEASURED_FASTER

pytest.importorskip("numba")

F64, F32 = torch.float64, torch.float32


# Variants: the gate after the norm, gradients reaching only some inputs, no affine.
VARIANTS: dict[str, Case] = {
    "gated_rms_norm norm_before_gate": Case(
        (SHAPE, SHAPE, (D,)),
        lambda be, x, g, w: FB.gated_rms_norm(x, g, w, group_size=12, norm_before_gate=True, backend=be),
    ),
    "layer_norm weight only": Case(((D,),), lambda be, w: NF.layer_norm(_FIXED, (D,), w, None, backend=be)),
    "add_rms_norm residual only": Case((SHAPE,), lambda be, r: NF.add_rms_norm(_FIXED, r, (D,), None, backend=be)),
    "sandwich next_weight only": Case(
        ((D,),), lambda be, w2: FB.sandwich_rms_norm(_FIXED, _FIXED.flip(0), None, w2, backend=be)
    ),
    "dyt alpha only": Case(((1,),), lambda be, a: FB.dyt(_FIXED, a, None, None, backend=be)),
    "batch_norm eval": Case(
        ((4, 6, 3, 5), (6,), (6,)),
        lambda be, x, w, b: NF.batch_norm(
            x,
            torch.linspace(-1, 1, 6, dtype=x.dtype),
            torch.linspace(0.5, 2, 6, dtype=x.dtype),
            w,
            b,
            False,
            backend=be,
        ),
    ),
}
_FIXED = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7), dtype=F64)


def test_every_numba_op_has_a_case() -> None:
    assert set(get_backend("numba").ops) <= set(CASES)


@pytest.mark.parametrize("name", [*CASES, *VARIANTS])
def test_explicit_numba_second_derivatives_match_torch_float64(name: str) -> None:
    case = CASES.get(name) or VARIANTS[name]
    tensors = _tensors(case, F64, seed=len(name))
    got = _second_order(case, "numba", tensors, seed=3)
    want = _second_order(case, "torch", tensors, seed=3)
    for key, ref in want.items():
        torch.testing.assert_close(got[key], ref, rtol=1e-9, atol=1e-9, msg=f"{name} {key}")


@pytest.mark.parametrize("name", list(CASES))
def test_explicit_numba_bfloat16_second_derivatives_within_the_bound(name: str) -> None:
    """bfloat16 input: the composition runs in float32 and rounds like torch's, within twice
    torch's own bfloat16 error against torch in float64."""
    case = CASES[name]
    tensors = _tensors(case, torch.bfloat16, seed=len(name))
    got = _second_order(case, "numba", tensors, seed=5)
    low = _second_order(case, "torch", tensors, seed=5)
    ref = _second_order(case, "torch", [t.double() for t in tensors], seed=5)
    assert_within_bound(got, ref, low)


SMALL: dict[str, Case] = {
    "rms_norm": CASES["rms_norm"]._replace(shapes=((2, 3, 6), (6,))),
    "add_layer_norm": CASES["add_layer_norm"]._replace(shapes=((3, 5), (3, 5), (5,), (5,))),
    "group_norm_act": CASES["group_norm_act"]._replace(shapes=((2, 4, 2, 3), (4,), (4,))),
    "batch_norm": CASES["batch_norm"]._replace(shapes=((3, 2, 2, 2), (2,), (2,))),
    "sandwich_rms_norm": CASES["sandwich_rms_norm"]._replace(shapes=((2, 5), (2, 5), (5,), (5,))),
    "derf": CASES["derf"]._replace(shapes=((2, 5), (1,), (1,), (5,), (5,))),
}


@pytest.mark.parametrize("name", list(SMALL))
def test_gradgradcheck(name: str) -> None:
    """The second derivatives against finite differences of the first (float64, small shapes)."""
    case = SMALL[name]
    tensors = [t.requires_grad_() for t in _tensors(case, F64, seed=11)]
    assert torch.autograd.gradgradcheck(lambda *ts: case.call("numba", *ts), tensors)


def test_third_derivative_matches_torch() -> None:
    x0 = torch.randn(4, 9, generator=torch.Generator().manual_seed(5), dtype=F64)
    w0 = torch.randn(9, generator=torch.Generator().manual_seed(6), dtype=F64)
    results = {}
    for be in ("numba", "torch"):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        (dx,) = torch.autograd.grad(NF.rms_norm(x, (9,), w, backend=be).pow(3).sum(), x, create_graph=True)
        (ddx,) = torch.autograd.grad(dx.pow(2).sum(), x, create_graph=True)
        results[be] = torch.autograd.grad(ddx.sin().sum(), (x, w))
    for p, q in zip(results["numba"], results["torch"], strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-9)


def test_torch_func_hessian_vector_products() -> None:
    """``jacrev(grad)`` (torch.func's nested reverse mode) through the kernels equals torch's."""
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(8), dtype=F64)
    w = torch.randn(8, generator=torch.Generator().manual_seed(9), dtype=F64)

    def hess(be):
        return torch.func.jacrev(torch.func.grad(lambda t: NF.layer_norm(t, (8,), w, None, backend=be).pow(2).sum()))(x)

    torch.testing.assert_close(hess("numba"), hess("torch"), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("op", ["rms_norm", "add_layer_norm", "group_norm", "dyt"])
def test_first_order_keeps_the_kernel(op: str) -> None:
    check_first_order_keeps_the_kernel(CASES[op], "numba")


@pytest.mark.parametrize("op", ["batch_norm", "instance_norm"])
def test_double_backward_moves_running_statistics_once(op: str) -> None:
    x = torch.randn(4, 3, 5, 6, generator=torch.Generator().manual_seed(12), dtype=F64, requires_grad=True)
    w = torch.randn(3, generator=torch.Generator().manual_seed(13), dtype=F64, requires_grad=True)
    stats = {}
    for be in ("numba", "torch"):
        rm, rv = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
        if op == "batch_norm":
            y = NF.batch_norm(x, rm, rv, w, None, True, 0.3, backend=be)
        else:
            y = NF.instance_norm(x, rm, rv, w, None, True, 0.3, backend=be)
        after_forward = (rm.clone(), rv.clone())
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(15), dtype=F64)
        (dx,) = torch.autograd.grad(y, x, dy, create_graph=True)
        stats[be] = torch.autograd.grad(dx.pow(2).sum(), (x, w))
        assert torch.equal(rm, after_forward[0]) and torch.equal(rv, after_forward[1])
    for p, q in zip(stats["numba"], stats["torch"], strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-9)


# ---- "auto": the float32 calls it sends to numba (autograd records them: the "/train" classes) ---------------

M, L = 256, 1024  # 2^18 elements, rows of 1024: "float32/large/train"
AUTO: dict[str, Case] = {
    "rms_norm": Case(((M, L), (L,)), rows("rms_norm")),
    "add_rms_norm": Case(((M, L), (M, L), (L,)), rows("add_rms_norm")),
    "batch_norm": Case(  # NCHW: the class claimed (channels_last is not)
        ((4, 64, 32, 32), (64,), (64,)), lambda be, x, w, b: NF.batch_norm(x, None, None, w, b, True, backend=be)
    ),
    "modulated_layer_norm": Case(((2, 128, L), (2, 1, L), (2, 1, L), (L,), (L,)), CASES["modulated_layer_norm"].call),
    "modulated_rms_norm": Case(((2, 128, L), (2, 128, L), (2, 1, L), (L,)), CASES["modulated_rms_norm"].call),
    "gated_rms_norm": Case(
        ((M, L), (M, L), (L,)), lambda be, x, g, w: FB.gated_rms_norm(x, g, w, group_size=L, backend=be)
    ),
    "sandwich_rms_norm": Case(((M, L), (M, L), (L,), (L,)), CASES["sandwich_rms_norm"].call),
    "dyt": Case(((M, L), (1,), (L,), (L,)), CASES["dyt"].call),
    "derf": Case(((M, L), (1,), (1,), (L,), (L,)), CASES["derf"].call),
    # Not claimed by auto today (skipped until MEASURED_FASTER lists a "/train" class for them).
    "layer_norm": Case(((M, L), (L,), (L,)), rows("layer_norm")),
    "add_layer_norm": Case(((M, L), (M, L), (L,), (L,)), rows("add_layer_norm")),
    "group_norm": Case(((4, 64, 32, 32), (64,), (64,)), lambda be, x, w, b: NF.group_norm(x, 32, w, b, backend=be)),
    "instance_norm": Case(((4, 64, 32, 32), (64,), (64,)), CASES["instance_norm"].call),
}


def _auto_trains_on_numba(op: str) -> bool:
    return any(c.endswith("/train") for c in MEASURED_FASTER.get(op, ()))


def test_every_op_auto_trains_on_numba_has_a_case() -> None:
    assert {op for op in MEASURED_FASTER if _auto_trains_on_numba(op)} <= set(AUTO)


def _runs_numba(case: Case, backend: str | None, tensors: list[Tensor]) -> bool:
    """Whether the call's autograd graph holds a numba kernel's node (the op ran on numba)."""
    out = case.call(backend, *(t.detach().requires_grad_() for t in tensors))
    todo = [o.grad_fn for o in (out if isinstance(out, tuple) else (out,))]
    seen = set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if getattr(getattr(node, "_forward_cls", None), "__module__", "") == "normkit.ops.numba._functions":
            return True
        todo.extend(n for n, _ in node.next_functions)
    return False


@pytest.mark.parametrize("op", list(AUTO))
def test_auto_picks_numba_and_its_second_derivatives_are_within_the_bound(op: str) -> None:
    if not _auto_trains_on_numba(op):
        pytest.skip(f"auto does not send training calls of {op} to numba")
    case = AUTO[op]
    tensors = _tensors(case, F32, seed=len(op))
    assert _runs_numba(case, None, tensors), f"auto does not send this {op} call to numba"
    assert not _runs_numba(case, "torch", tensors)
    got = _second_order(case, None, tensors, seed=5)
    low = _second_order(case, "torch", tensors, seed=5)
    ref = _second_order(case, "torch", [t.double() for t in tensors], seed=5)
    assert_within_bound(got, ref, low)


@pytest.mark.parametrize("cls", [normkit.DyT, normkit.Derf])
def test_default_module_gradient_penalty(cls) -> None:
    """A gradient penalty through a default DyT/Derf in training (auto -> numba) reaches alpha as torch's does."""
    x = torch.randn(256, 1024, generator=torch.Generator().manual_seed(14), requires_grad=True)
    grads = []
    for backend in (None, "torch"):
        m = cls(1024, backend=backend) if backend else cls(1024)
        (dx,) = torch.autograd.grad(m(x).pow(2).sum(), x, create_graph=True)
        grads.append(torch.autograd.grad(dx.pow(2).sum(), m.alpha)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
