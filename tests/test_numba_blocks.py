"""The numba kernels of today's block norms (modulated, gated, QK, sandwich, DyT, Derf): accuracy and contract.

* Accuracy: outputs and every gradient (random weights, biases, shift/scale and upstream
  gradients) within the self-calibrating bound (``kernel_bound.assert_within_bound``) of the
  float64 reference, calibrated by the torch composition run in the case's dtype; float32 and
  bfloat16, float64 against the reference directly.
* Deterministic: bit-identical results at 1, 2 and 3 threads (shapes above the kernels'
  parallel threshold, with several backward blocks per modulation row and several modulation
  rows per block).
* Batch-invariant: a sample's output and input gradients are the same bits alone and inside a
  larger batch.
* ``torch.compile(fullgraph=True)`` traces through every custom op; bad input is refused with
  the reason, before anything is computed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import pytest
import torch
from torch import Tensor

import normkit
from kernel_bound import assert_within_bound
from normkit import functional as NF
from normkit.backends import BackendError, get_backend

pytest.importorskip("numba")
pytestmark = pytest.mark.skipif("numba" not in normkit.backends(), reason="numba backend not registered")

f32, bf16, f16, f64 = torch.float32, torch.bfloat16, torch.float16, torch.float64


class Case(NamedTuple):
    op: str
    shapes: dict[str, tuple[int, ...] | None]  # leaf name -> shape (None: passed as None)
    options: dict[str, object] = {}
    strided: tuple[str, ...] = ()  # leaves passed as every other element of a wider row (not contiguous)


def _modulated(shape: tuple[int, ...], shift: tuple[int, ...], scale: tuple[int, ...], rms: bool,
               affine: bool = True) -> Case:
    d = shape[-1]
    shapes = {"input": shape, "shift": shift, "scale": scale, "weight": (d,) if affine else None}
    if not rms:
        shapes["bias"] = (d,) if affine else None
    return Case("modulated_rms_norm" if rms else "modulated_layer_norm", shapes)


def _gated(shape: tuple[int, ...], group_size: int | None, gate: bool, before: bool) -> Case:
    return Case("gated_rms_norm", {"input": shape, "gate": shape if gate else None, "weight": shape[-1:]},
                {"group_size": group_size, "norm_before_gate": before})


def _sandwich(shape: tuple[int, ...], offset: float, weights: bool = True) -> Case:
    w = shape[-1:] if weights else None
    return Case("sandwich_rms_norm", {"hidden": shape, "residual": shape, "post_weight": w, "next_weight": w},
                {"weight_offset": offset})


def _qk(q: tuple[int, ...], k: tuple[int, ...]) -> Case:
    return Case("qk_rms_norm", {"q": q, "k": k, "q_weight": q[-1:], "k_weight": k[-1:]})


def _free(op: str, shape: tuple[int, ...], weight: tuple[int, ...] | None, bias: tuple[int, ...] | None,
          alpha: tuple[int, ...] = (1,)) -> Case:
    """DyT / Derf (alpha and shift one-element tensors of the given shape; weight and bias of the
    input's trailing dims, not necessarily the same ones)."""
    scalars = {"alpha": alpha, "shift": alpha} if op == "derf" else {"alpha": alpha}
    return Case(op, {"input": shape, **scalars, "weight": weight, "bias": bias})


# Batch 1, primes, non-powers of two, per-sample / per-token / whole-batch modulation (and shift
# and scale of different kinds), groups, the sandwich with Gemma's offset, grouped-query QK.
CASES = {
    "adaLN LN per sample": _modulated((2, 5, 37), (2, 1, 37), (2, 1, 37), rms=False),
    "adaLN LN per token": _modulated((2, 5, 37), (2, 5, 37), (2, 5, 37), rms=False),
    "adaLN LN shift once, scale per token, no affine": _modulated((3, 4, 19), (19,), (3, 4, 19), False, False),
    "adaLN RMS per sample, batch 1": _modulated((1, 1, 7), (1, 1, 7), (1, 1, 7), rms=True),
    "adaLN RMS per token, scale per sample": _modulated((2, 3, 4, 24), (2, 3, 4, 24), (2, 1, 1, 24), rms=True),
    "gated: Mamba2, groups of 5": _gated((3, 5, 15), 5, gate=True, before=False),
    "gated: after the norm, one group": _gated((4, 37), None, gate=True, before=True),
    "gated: no gate, groups of 1": _gated((2, 3, 4), 1, gate=False, before=False),
    "gated: batch 1": _gated((1, 7), None, gate=True, before=False),
    "sandwich: Gemma offset": _sandwich((3, 37), 1.0),
    "sandwich: no weights, batch 1": _sandwich((1, 1, 8), 0.0, weights=False),
    "qk: grouped-query heads": _qk((2, 3, 4, 16), (2, 3, 2, 16)),
    "adaLN LN, non-contiguous input and shift": _modulated((2, 5, 37), (2, 1, 37), (2, 5, 37), rms=False)._replace(
        strided=("input", "shift")),
    "gated, non-contiguous input and gate": _gated((3, 20), 5, gate=True, before=False)._replace(
        strided=("input", "gate")),
    "sandwich, non-contiguous hidden": _sandwich((3, 2, 37), 1.0)._replace(strided=("hidden",)),
    "dyt": _free("dyt", (3, 5, 37), (37,), (37,)),
    "dyt batch 1, no affine, (1, 1) alpha": _free("dyt", (1, 7), None, None, alpha=(1, 1)),
    "dyt weight (4, 5), bias (5,)": _free("dyt", (2, 3, 4, 5), (4, 5), (5,)),
    "derf": _free("derf", (3, 5, 37), (37,), (37,)),
    "derf weight only, 0-dim alpha": _free("derf", (2, 24), (24,), None, alpha=()),
    "derf bias (3, 8), no weight": _free("derf", (2, 3, 8), None, (3, 8)),
    "dyt, non-contiguous input": _free("dyt", (3, 2, 37), (37,), (37,))._replace(strided=("input",)),
    "derf, non-contiguous input": _free("derf", (3, 2, 37), (37,), (37,))._replace(strided=("input",)),
}


def _inputs(case: Case, seed: int = 0) -> dict[str, Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    return {name: None if shape is None else torch.randn(shape, generator=g, dtype=f64)
            for name, shape in case.shapes.items()}


def _call(case: Case, leaves: dict[str, Tensor | None], backend: str) -> tuple[Tensor, ...]:
    out = getattr(NF, case.op)(*leaves.values(), **case.options, backend=backend)
    return out if isinstance(out, tuple) else (out,)


def _leaf(t: Tensor | None, dtype: torch.dtype, strided: bool) -> Tensor | None:
    if t is None:
        return None
    if not strided:
        return t.detach().to(dtype).requires_grad_()
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=dtype)
    view = wide[..., ::2]
    view.copy_(t)
    return view.detach().requires_grad_()  # detach keeps the strides


def _run(case: Case, inputs: dict[str, Tensor | None], dtype: torch.dtype, backend: str,
         dys: list[Tensor] | None = None, seed: int = 1, param_dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Outputs ``y0, y1, ...`` and the gradients ``d<leaf>`` under random upstream gradients; the
    leaves in ``dtype``, all but the first (the input) in ``param_dtype`` when given."""
    first = next(iter(inputs))
    leaves = {n: _leaf(t, dtype if n == first or param_dtype is None else param_dtype, n in case.strided)
              for n, t in inputs.items()}
    outs = _call(case, leaves, backend)
    if dys is None:
        g = torch.Generator().manual_seed(seed)
        dys = [torch.randn(o.shape, generator=g, dtype=f64) for o in outs]
    torch.autograd.backward(outs, [d.to(o.dtype) for d, o in zip(dys, outs, strict=True)])
    res = {f"y{i}": o.detach() for i, o in enumerate(outs)}
    res.update({f"d{n}": t.grad for n, t in leaves.items() if t is not None})
    return res


@pytest.mark.parametrize("dtype", [f32, bf16], ids=str)
@pytest.mark.parametrize("name", CASES)
def test_within_bound_of_float64_reference(name: str, dtype: torch.dtype) -> None:
    case = CASES[name]
    inputs = _inputs(case)
    reference = _run(case, inputs, f64, "reference")
    baseline = _run(case, inputs, dtype, "torch")
    assert_within_bound(_run(case, inputs, dtype, "numba"), reference, baseline)


@pytest.mark.parametrize("name", ["adaLN RMS per token, scale per sample", "gated: Mamba2, groups of 5",
                                  "qk: grouped-query heads"])
def test_bf16_input_with_float32_parameters(name: str) -> None:
    """Mixed precision: bf16 input, float32 shift/scale/gate/weights (for QK: a bf16 q beside a
    float32 k, each normalized in its own dtype)."""
    case = CASES[name]
    inputs = _inputs(case)
    reference = _run(case, inputs, f64, "reference")
    baseline = _run(case, inputs, bf16, "torch", param_dtype=f32)
    assert_within_bound(_run(case, inputs, bf16, "numba", param_dtype=f32), reference, baseline)


@pytest.mark.parametrize("name", ["adaLN LN per token", "gated: Mamba2, groups of 5", "sandwich: Gemma offset"])
def test_float64_matches_reference(name: str) -> None:
    case = CASES[name]
    inputs = _inputs(case)
    got, want = _run(case, inputs, f64, "numba"), _run(case, inputs, f64, "reference")
    for key, ref in want.items():
        torch.testing.assert_close(got[key], ref, rtol=1e-10, atol=1e-10, msg=key)


# Above the kernels' parallel threshold (2^16 elements): ranges split over threads; 512 rows make
# 32 backward blocks, 4 per sample of 128 rows (chunks) or 16 per-token modulation rows each.
BIG = {
    "adaLN LN per sample": _modulated((4, 128, 160), (4, 1, 160), (4, 1, 160), rms=False),
    "adaLN RMS per token": _modulated((4, 128, 160), (4, 128, 160), (4, 128, 160), rms=True),
    "adaLN LN shift once, scale per sample": _modulated((4, 128, 160), (160,), (4, 1, 160), rms=False),
    "gated: Mamba2": _gated((4, 128, 160), 40, gate=True, before=False),
    "gated: after": _gated((512, 160), None, gate=True, before=True),
    "sandwich": _sandwich((512, 160), 1.0),
    "qk": _qk((4, 128, 2, 64), (4, 128, 1, 64)),
    "dyt": _free("dyt", (4, 128, 160), (160,), (160,)),
    "derf": _free("derf", (4, 128, 160), (160,), (160,)),
}


@pytest.mark.parametrize("dtype", [f32, bf16], ids=str)
@pytest.mark.parametrize("name", BIG)
def test_deterministic_across_thread_counts(name: str, dtype: torch.dtype) -> None:
    case = BIG[name]
    inputs = _inputs(case)
    before = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            runs.append(_run(case, inputs, dtype, "numba"))
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        for key, t in runs[0].items():
            assert torch.equal(t, other[key]), f"{key} differs between thread counts"


@pytest.mark.parametrize("name", BIG)
def test_batch_invariant(name: str) -> None:
    """Sample 0 (the leading index) alone and inside the batch: its outputs and input gradients
    (not the cross-row sums: shift/scale/weight gradients) are the same bits."""
    case = BIG[name]
    inputs = _inputs(case)
    g = torch.Generator().manual_seed(1)
    outs = _call(case, {n: None if t is None else t.float() for n, t in inputs.items()}, "numba")
    dys = [torch.randn(o.shape, generator=g, dtype=f64) for o in outs]
    full = _run(case, inputs, f32, "numba", dys)
    # every tensor of 2 dims or more leads with the batch (weights and a (D,) shift do not)
    alone = {n: t[:1] if t is not None and t.dim() >= 2 else t for n, t in inputs.items()}
    one = _run(case, alone, f32, "numba", [d[:1] for d in dys])
    rowwise = [k for k in one if k.startswith("y") or k in ("dinput", "dgate", "dhidden", "dresidual", "dq", "dk")]
    for key in rowwise:
        assert torch.equal(one[key], full[key][:1]), f"{key} of sample 0 changes with the batch"


def test_compile_fullgraph_traces_every_custom_op() -> None:
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g).requires_grad_()

    x, sh, sc, w, b = r(2, 3, 8), r(2, 1, 8), r(2, 1, 8), r(8), r(8)
    gate, res, alpha, shift = r(2, 3, 8), r(2, 3, 8), r(1), r(1)

    def f(x, sh, sc, w, b, gate, res, alpha, shift):
        x = NF.derf(NF.dyt(x, alpha, w, b, backend="numba"), alpha, shift, None, b, backend="numba")
        y1 = NF.modulated_layer_norm(x, sh, sc, w, b, backend="numba")
        y2 = NF.gated_rms_norm(y1, gate, w, group_size=4, backend="numba")
        y3, r3 = NF.sandwich_rms_norm(y2, res, w, b, weight_offset=1.0, backend="numba")
        q, k = NF.qk_rms_norm(y3.view(2, 3, 2, 4), r3.view(2, 3, 2, 4), w[:4], None, backend="numba")
        return (q * k).sum() + NF.modulated_rms_norm(r3, sh, sc, backend="numba").square().sum()

    args = (x, sh, sc, w, b, gate, res, alpha, shift)
    eager = f(*args)
    want = torch.autograd.grad(eager, args)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    got = torch.autograd.grad(compiled, args)
    torch.testing.assert_close(compiled, eager)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e)


REFUSALS: dict[str, tuple[Callable[[], object], str]] = {
    "float16": (lambda: NF.modulated_rms_norm(torch.randn(2, 4, dtype=f16), torch.randn(4, dtype=f16),
                                              torch.randn(4, dtype=f16), backend="numba"), "float16 is declined"),
    "shift broadcast along the tokens of a batch": (
        lambda: NF.modulated_layer_norm(torch.randn(2, 3, 4), torch.randn(1, 3, 4), torch.randn(2, 1, 4),
                                        backend="numba"), "otherwise than per sample"),
    "scale broadcast along D": (
        lambda: NF.modulated_layer_norm(torch.randn(2, 3, 4), torch.randn(2, 1, 4), torch.randn(2, 3, 1),
                                        backend="numba"), "otherwise than per sample"),
    "sandwich with a float32 residual beside bf16": (
        lambda: NF.sandwich_rms_norm(torch.randn(2, 4, dtype=bf16), torch.randn(2, 4), None, None,
                                     backend="numba"), "keeps both in one dtype"),
    "gated float16 gate": (lambda: NF.gated_rms_norm(torch.randn(2, 4), torch.randn(2, 4, dtype=f16),
                                                     backend="numba"), "float16 is declined"),
    "qk float16 k": (lambda: NF.qk_rms_norm(torch.randn(2, 4), torch.randn(2, 4, dtype=f16), None, None,
                                            backend="numba"), "float16 is declined"),
    "dyt float16": (lambda: NF.dyt(torch.randn(2, 4, dtype=f16), torch.ones(1), backend="numba"),
                    "float16 is declined"),
    "derf float16 shift": (lambda: NF.derf(torch.randn(2, 4), torch.ones(1), torch.zeros(1, dtype=f16),
                                           backend="numba"), "float16 is declined"),
    "dyt empty input": (lambda: NF.dyt(torch.randn(0, 4), torch.ones(1), backend="numba"), "empty input"),
}


def test_auto_picks_numba_only_where_measured_faster() -> None:
    """MEASURED_FASTER's classes: a large float32 DiT-sized call in training goes to numba; a small
    one, a bf16 one, QK-norm's head-dim rows and DyT's forward stay on the torch composition."""
    numba = get_backend("numba")

    def preferred(op: str, *args: object) -> bool:
        return bool(numba.ops[op].preferred(*args))

    x = torch.randn(2, 256, 1152, requires_grad=True)
    shift = torch.randn(2, 1, 1152)
    assert preferred("modulated_layer_norm", x, shift, shift, None, None, 1e-6)
    assert preferred("modulated_rms_norm", x.detach(), shift, shift, None, None)
    assert not preferred("modulated_rms_norm", x[:, :4], shift, shift, None, None)
    assert not preferred("modulated_rms_norm", x.bfloat16(), shift, shift, None, None)
    assert preferred("gated_rms_norm", x, x, None, 1e-6, 1152, False)
    assert not preferred("gated_rms_norm", x, x, None, 1e-6, 576, False)  # groups below 1024: "/short", not measured
    assert not preferred("gated_rms_norm", x.detach(), x.detach(), None, 1e-6, 1152, False)  # forward: not claimed
    assert preferred("sandwich_rms_norm", x, x, None, None, None, 0.0)
    q = torch.randn(1, 2048, 16, 128, requires_grad=True)
    assert not preferred("qk_rms_norm", q, q, None, None, None)
    alpha = torch.ones(1, requires_grad=True)
    assert preferred("dyt", x.detach(), alpha, None, None)  # training: alpha requires grad
    assert not preferred("dyt", x.detach(), alpha.detach(), None, None)  # forward: not claimed
    assert preferred("derf", x.detach(), alpha.detach(), alpha.detach(), None, None)
    assert not preferred("derf", x[:, :, :768], alpha, alpha, None, None)  # ViT rows: "/short", not measured


@pytest.mark.parametrize("name", REFUSALS)
def test_bad_input_is_refused_with_the_reason(name: str) -> None:
    call, reason = REFUSALS[name]
    with pytest.raises(BackendError, match=reason):
        call()


def test_torch_checks_still_apply() -> None:
    """The public checks run before the backend: a gate of another shape is refused as on every backend."""
    with pytest.raises(RuntimeError, match="expected gate of the input's shape"):
        NF.gated_rms_norm(torch.randn(2, 4), torch.randn(2, 5), backend="numba")


def test_gate_sigmoid_matches_float64_over_the_float32_range() -> None:
    """The float32 gate's vectorized exp: ``y = rms(1) * silu(gate)`` (eps 0: exactly silu) within
    4e-7 relative of float64 up to ``|gate| = ln(FLT_MAX)``, and beyond it as torch's float32
    silu (|error| under 1e-36); NaN and infinities as torch's."""
    g = torch.Generator().manual_seed(0)
    edges = [0.0, 1e-30, -1e-30, 20.0, -20.0, 87.5, -87.5, 88.5, -88.5, 88.72, -88.72, 88.73, -88.73, 104.0, -104.0,
             150.0, -150.0, float("inf"), -float("inf"), float("nan")]
    z = torch.cat([torch.tensor(edges), 30 * torch.randn(4099, generator=g)])[None]
    y = NF.gated_rms_norm(torch.ones_like(z), z, None, 0.0, norm_before_gate=True, backend="numba").double()
    want = torch.nn.functional.silu(z.double())
    assert torch.equal(y.isnan(), want.isnan()) and torch.equal(y.isinf(), want.isinf())
    inside = z.abs() <= 88.72
    rel = ((y - want).abs() / want.abs()).nan_to_num(0.0)
    assert rel[inside].max() <= 4e-7
    assert (y - want)[~inside].nan_to_num(0.0, 0.0, 0.0).abs().max() <= 1e-36


@pytest.mark.parametrize("op", ["dyt", "derf"])
def test_squash_matches_float64_over_the_float32_range(op: str) -> None:
    """The float32 tanh and erf (vectorized polynomials, not libm): within 2 ulp of float64 over
    the float32 range, on both sides of each branch point (tanh 0.625, erf 0.9 and the clamp at
    4), down to subnormals; +-inf -> +-1, NaN -> NaN as torch's; and the input gradient at
    ``alpha = 1`` (the squash's derivative) within 4e-6 relative of float64's where that is
    representable, tanh's as torch's ``1 - y^2``."""
    g = torch.Generator().manual_seed(0)
    edges = [0.0, -0.0, 1e-30, -1e-30, 1e-40, 0.6249, 0.625, 0.8999, 0.9, -0.9, 3.99, 4.0, 4.01, 20.0, -20.0,
             float("inf"), -float("inf"), float("nan")]
    x = torch.cat([torch.tensor(edges), torch.linspace(-6, 6, 200_001), 30 * torch.randn(4099, generator=g),
                   torch.logspace(-38, 1, 10_000)])[None].requires_grad_()
    one = torch.ones(1)
    y = NF.dyt(x, one, backend="numba") if op == "dyt" else NF.derf(x, one, torch.zeros(1), backend="numba")
    y.backward(torch.ones_like(y))
    exact = torch.tanh if op == "dyt" else torch.erf
    x64 = x.detach().double().requires_grad_()
    want = exact(x64)
    want.backward(torch.ones_like(want))
    assert torch.equal(y.isnan(), want.isnan()) and torch.equal(y.isinf(), want.isinf())
    ulp = torch.from_numpy(np.spacing(want.detach().abs().float().numpy())).double()
    assert ((y.detach().double() - want.detach()).abs() / ulp).nan_to_num(0.0).max() <= 2.0
    dx, dx64 = x.grad.double(), x64.grad
    if op == "dyt":
        dx64 = (1 - exact(x.detach()).square()).double()  # torch's float32 tanh backward: its cancellation too
    # relative, plus (tanh) an ulp of 1 or two: 1 - y^2 near |y| = 1 is the rounding of y, squared
    err = (dx - dx64).abs() - (3e-7 if op == "dyt" else 0.0)
    big = dx64.abs() > 1e-30
    assert (err / dx64.abs())[big].max() <= 4e-6
    assert torch.equal(dx.isnan(), dx64.isnan())
