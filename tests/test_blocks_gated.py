"""gated_rms_norm (Mamba2, Bamba, Falcon-H1) on every backend against the float64 reference.

The oracle is :mod:`normkit.blocks.gated`'s reference run in float64 on the inputs upcast (the
norm has no torch.nn twin); the reference itself is checked by ``gradcheck`` (reverse and
forward mode) and ``gradgradcheck``, and against the torch composition in float64. Every
backend is judged by the self-calibrating bound (``kernel_bound.assert_within_bound``): its
error at most twice that of the torch composition run in the case's own dtype, plus the dtype's
floor. HF's own modules (``MambaRMSNormGated``, ``FalconH1RMSNormGated``), run as they ship, are
the outside check of what the composition computes.

Triton runs on CUDA when there is a device, else under ``TRITON_INTERPRET=1`` (small shapes).
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck

from blocks_cases import BACKENDS, DEVICE, TRITON, needs_triton
from kernel_bound import assert_within_bound
from normkit import functional
from normkit.backends import BackendError

f32, bf16, f16, f64 = torch.float32, torch.bfloat16, torch.float16, torch.float64


class Case(NamedTuple):
    shape: tuple[int, ...]
    group_size: int | None
    block_n: int | None = None  # caps the Triton tile: a group wider than it takes the chunked path
    layout: str = "contiguous"  # or "padded rows" (row stride 2D, read in place), "every other column"


# The shapes: batch 1, primes, non-powers of two, groups of one channel, several groups per row,
# a group wider than one tile, rows with padding, non-contiguous elements.
CASES = {
    "batch 1, one group of 7": Case((1, 7), None),
    "primes, groups of 5": Case((3, 5, 15), 5),
    "two groups of 12": Case((4, 24), 12),
    "groups of 1": Case((2, 3, 4), 1),
    "chunked: groups of 40 in tiles of 16": Case((3, 80), 40, block_n=16),
    "chunked, one group of 37, tiles of 8": Case((2, 37), None, block_n=8),
    "padded rows": Case((5, 12), 4, layout="padded rows"),
    "every other column": Case((2, 3, 10), 5, layout="every other column"),
}

# name -> (a gate is given, norm_before_gate)
MODES = {"Mamba2: gate first": (True, False), "gate after the norm": (True, True), "no gate": (False, False)}


def _inputs(case: Case, has_gate: bool, seed: int = 0, has_weight: bool = True) -> dict[str, torch.Tensor | None]:
    """float64 input, gate, weight and upstream gradient, all random (never unit weights)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=f64)

    return {"x": rand(*case.shape), "gate": 2 * rand(*case.shape) if has_gate else None,
            "weight": rand(case.shape[-1]) if has_weight else None, "dy": rand(*case.shape)}


def _leaf(t: torch.Tensor | None, dtype: torch.dtype, layout: str = "contiguous") -> torch.Tensor | None:
    """A leaf holding ``t`` rounded to ``dtype``, in ``layout``."""
    if t is None:
        return None
    if layout == "contiguous":
        return t.to(device=DEVICE, dtype=dtype, copy=True).requires_grad_()
    d = t.shape[-1]
    wide = torch.zeros(*t.shape[:-1], 2 * d, dtype=dtype, device=DEVICE)
    view = wide[..., :d] if layout == "padded rows" else wide[..., ::2]
    view.copy_(t)
    return view.detach().requires_grad_()  # detach keeps the strides


def _run(backend: str, inputs: dict, dtype: torch.dtype, case: Case, norm_before_gate: bool, *,
         eps: float = 1e-6, param_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``y`` and the gradients of ``(y * dy).sum()`` for x, gate and weight: the input rounded
    to ``dtype`` (in the case's layout), the gate and weight to ``param_dtype`` (default ``dtype``)."""
    x = _leaf(inputs["x"], dtype, case.layout)
    gate = _leaf(inputs["gate"], param_dtype or dtype, case.layout)
    weight = _leaf(inputs["weight"], param_dtype or dtype)
    y = functional.gated_rms_norm(x, gate, weight, eps, group_size=case.group_size,
                                  norm_before_gate=norm_before_gate, backend=backend)
    y.backward(inputs["dy"].to(device=DEVICE, dtype=y.dtype))
    out = {"y": y.detach(), "dx": x.grad}
    if weight is not None:
        out["dweight"] = weight.grad
    if gate is not None:
        out["dgate"] = gate.grad
    return out


@pytest.fixture
def tile(monkeypatch: pytest.MonkeyPatch):
    """Cap the Triton tile for one case (``NORMKIT_TRITON_BLOCK_N``, read at each launch)."""

    def set_tile(case: Case) -> None:
        if case.block_n is not None:
            monkeypatch.setenv("NORMKIT_TRITON_BLOCK_N", str(case.block_n))

    return set_tile


# ---- the reference ------------------------------------------------------------------------------


# (forward AD loads torch's jvp decompositions on first use, which calls torch.jit.script)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("group_size", [None, 3])
def test_reference_gradcheck_and_gradgradcheck(mode: str, group_size: int | None) -> None:
    """The hand-derived backward and jvp of the reference against finite differences, and the
    backward's own derivative (it is written in differentiable ops)."""
    has_gate, norm_before_gate = MODES[mode]
    t = _inputs(Case((2, 3, 6), group_size), has_gate)
    args = tuple(None if v is None else v.clone().requires_grad_() for v in (t["x"], t["gate"], t["weight"]))

    def f(x, gate, weight):
        return functional.gated_rms_norm(x, gate, weight, 1e-5, group_size=group_size,
                                         norm_before_gate=norm_before_gate, backend="reference")

    assert gradcheck(f, args, check_forward_ad=True)
    assert gradgradcheck(f, args)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["primes, groups of 5", "padded rows"])
def test_composition_equals_reference_in_float64(case: str, mode: str) -> None:
    """Two independent float64 formulas (autograd through the composition, the reference's
    hand-derived gradients) agree to float64 rounding."""
    has_gate, norm_before_gate = MODES[mode]
    t = _inputs(CASES[case], has_gate)
    ref = _run("reference", t, f64, CASES[case], norm_before_gate)
    torch_ = _run("torch", t, f64, CASES[case], norm_before_gate)
    for name in ref:
        torch.testing.assert_close(torch_[name], ref[name], rtol=1e-10, atol=1e-10, msg=name)


# ---- every backend against the float64 reference -------------------------------------------------


def _check_within_bound(backend: str, case: Case, mode: str, dtype: torch.dtype,
                        param_dtype: torch.dtype | None = None, has_weight: bool = True) -> None:
    has_gate, norm_before_gate = MODES[mode]
    t = _inputs(case, has_gate, has_weight=has_weight)
    # the oracle sees exactly the rounded inputs the candidate sees
    rounded = {k: None if v is None else v.to(param_dtype or dtype if k in ("gate", "weight") else dtype).double()
               for k, v in t.items() if k != "dy"}
    oracle = _run("reference", {**rounded, "dy": t["dy"]}, f64, case._replace(layout="contiguous"),
                  norm_before_gate)
    baseline = _run("torch", t, dtype, case, norm_before_gate, param_dtype=param_dtype)
    got = _run(backend, t, dtype, case, norm_before_gate, param_dtype=param_dtype)
    assert_within_bound(got, oracle, baseline)


@pytest.mark.parametrize("dtype", [f32, bf16, f16], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_within_bound(backend: str, case: str, mode: str, dtype: torch.dtype, tile) -> None:
    tile(CASES[case])
    _check_within_bound(backend, CASES[case], mode, dtype)


@pytest.mark.parametrize("mode", ["Mamba2: gate first", "gate after the norm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes(backend: str, mode: str) -> None:
    """bf16 activations with an fp32 gate and weight (an fp32 master copy): each gradient comes
    back in its tensor's dtype, within the bound."""
    _check_within_bound(backend, CASES["two groups of 12"], mode, bf16, param_dtype=f32)


@pytest.mark.parametrize("dtype", [f32, bf16], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_without_weight(backend: str, mode: str, dtype: torch.dtype) -> None:
    _check_within_bound(backend, CASES["primes, groups of 5"], mode, dtype, has_weight=False)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_stats_and_out_dtype(backend: str) -> None:
    """``stats_dtype=float64`` computes in float64 and rounds once to the input's dtype;
    ``out_dtype=float32`` keeps a bf16 input's result unrounded to bf16."""
    case = CASES["two groups of 12"]
    t = _inputs(case, True)
    x, gate, w = (t[k].to(bf16) for k in ("x", "gate", "weight"))
    exact = functional.gated_rms_norm(x.double(), gate.double(), w.double(), group_size=12, backend="reference")
    y64 = functional.gated_rms_norm(x, gate, w, group_size=12, stats_dtype=f64, backend=backend)
    assert y64.dtype == bf16 and torch.equal(y64, exact.to(bf16))
    y32 = functional.gated_rms_norm(x, gate, w, group_size=12, out_dtype=f32, backend=backend)
    assert y32.dtype == f32
    torch.testing.assert_close(y32, exact.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(0, 8), (3, 0)], ids=["no rows", "no channels"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend: str, shape: tuple[int, int]) -> None:
    """No rows, or rows of no channels: an empty output and gradients of the right shapes (the
    triton backend declines an empty input with its reason)."""
    x, gate = (torch.randn(shape, device=DEVICE, requires_grad=True) for _ in range(2))
    w = torch.randn(shape[-1], device=DEVICE, requires_grad=True)
    if backend == "triton":
        with pytest.raises(BackendError, match="empty input"):
            functional.gated_rms_norm(x, gate, w, backend=backend)
        return
    y = functional.gated_rms_norm(x, gate, w, backend=backend)
    y.sum().backward()
    assert y.shape == x.grad.shape == gate.grad.shape == shape
    assert torch.equal(w.grad, torch.zeros_like(w))


# ---- the Triton kernels: determinism, layouts, compile, refusals ----------------------------------


@pytest.mark.gpu_schedule
@needs_triton
@pytest.mark.parametrize("mode", MODES)
def test_triton_backward_is_deterministic(mode: str) -> None:
    """Two runs give the same bits (no atomics; the weight partials summed in a fixed order),
    here with several row blocks per group."""
    has_gate, norm_before_gate = MODES[mode]
    case = Case((9, 2, 12), 6)
    t = _inputs(case, has_gate, seed=3)
    first, second = (_run("triton", t, f32, case, norm_before_gate) for _ in range(2))
    for name in first:
        assert torch.equal(first[name], second[name]), name


@needs_triton
def test_triton_reads_padded_rows_in_place() -> None:
    """Rows with a stride of their own reach the kernel as a view (no copy of the input)."""
    from normkit.ops.triton import gated as T

    x = torch.randn(4, 16, device=DEVICE)[:, :8]
    assert T._rows(x).data_ptr() == x.data_ptr()


@needs_triton
def test_triton_nan_propagates() -> None:
    """A NaN in one group makes that group NaN and leaves the others alone."""
    x = torch.randn(2, 8, device=DEVICE)
    x[0, 1] = float("nan")
    y = functional.gated_rms_norm(x, torch.randn(2, 8, device=DEVICE), torch.randn(8, device=DEVICE), group_size=4,
                                  backend="triton")
    assert y[0, :4].isnan().all() and not y[0, 4:].isnan().any() and not y[1].isnan().any()


@needs_triton
def test_triton_double_backward_runs_and_forward_ad_is_refused() -> None:
    x = torch.randn(2, 8, device=DEVICE, requires_grad=True)
    gate = torch.randn(2, 8, device=DEVICE)
    y = functional.gated_rms_norm(x, gate, None, backend="triton")
    (dx,) = torch.autograd.grad(y, x, torch.randn_like(y), create_graph=True)
    dx.pow(2).sum().backward()  # the composition's second derivatives (test_triton_double_backward.py)
    assert x.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="forward-mode AD"):
        torch.func.jvp(lambda t: functional.gated_rms_norm(t, gate, None, backend="triton"), (x,), (x,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend: str) -> None:
    """No graph break through dispatch, the custom ops' fake implementations and their
    autograd; the compiled forward and gradients equal the eager ones."""
    torch._dynamo.reset()
    x0, g0 = torch.randn(3, 8, device=DEVICE), torch.randn(3, 8, device=DEVICE)
    w0, dy = torch.randn(8, device=DEVICE), torch.randn(3, 8, device=DEVICE)

    def f(x, gate, w):
        return functional.gated_rms_norm(x, gate, w, group_size=4, backend=backend)

    results = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        x, g, w = (t.clone().requires_grad_() for t in (x0, g0, w0))
        y = fn(x, g, w)
        y.backward(dy)
        results.append((y.detach(), x.grad, g.grad, w.grad))
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


# ---- HF's modules, as they ship ---------------------------------------------------------------------


def test_matches_hf_mamba2_and_falcon_h1() -> None:
    """The composition is what HF computes: ``MambaRMSNormGated`` (gate first, groups; HF rounds
    before the weight, the same thing in float32) and ``FalconH1RMSNormGated`` (gate after the
    norm, ``n_groups``; fp32 throughout, rounded once: the same bits in bfloat16 too)."""
    mamba2 = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    falcon = pytest.importorskip("transformers.models.falcon_h1.modeling_falcon_h1")
    torch.manual_seed(0)
    x, gate = torch.randn(2, 5, 24), torch.randn(2, 5, 24)
    hf = mamba2.MambaRMSNormGated(24, group_size=8, eps=1e-6)
    with torch.no_grad():
        hf.weight.normal_()
    ours = functional.gated_rms_norm(x, gate, hf.weight, 1e-6, group_size=8, backend="torch")
    torch.testing.assert_close(ours, hf(x, gate), rtol=0, atol=0)
    hf = falcon.FalconH1RMSNormGated(24, eps=1e-6, n_groups=3, norm_before_gate=True).to(bf16)
    with torch.no_grad():
        hf.weight.normal_()
    xb, gb = x.to(bf16), gate.to(bf16)
    ours = functional.gated_rms_norm(xb, gb, hf.weight, 1e-6, group_size=8, norm_before_gate=True, backend="torch")
    torch.testing.assert_close(ours, hf(xb, gb), rtol=0, atol=0)


# ---- outside material: hypothesis over shapes, groups, layouts and dtypes; torch.func ------------


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.integers(1, 4), min_size=0, max_size=2), groups=st.integers(1, 3),
       group_size=st.integers(1, 19), mode=st.sampled_from(sorted(MODES)),
       layout=st.sampled_from(["contiguous", "padded rows", "every other column"]),
       dtype=st.sampled_from([f32, bf16, f16]), block_n=st.sampled_from([None, 4, 8]),
       has_weight=st.booleans(),
       backend=st.sampled_from(["torch", "reference", "triton"] if TRITON else ["torch", "reference"]))
def test_hypothesis_within_bound(rows, groups, group_size, mode, layout, dtype, block_n, has_weight, backend,
                                 monkeypatch) -> None:
    """Any leading shape (none at all: a 1-D input), group count, group size, layout, dtype,
    weight or none, and Triton tile (chunked whenever the tile is narrower than the group)."""
    if block_n is None:
        monkeypatch.delenv("NORMKIT_TRITON_BLOCK_N", raising=False)
    else:
        monkeypatch.setenv("NORMKIT_TRITON_BLOCK_N", str(block_n))
    _check_within_bound(backend, Case((*rows, groups * group_size), group_size, layout=layout), mode, dtype,
                        has_weight=has_weight)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_per_sample_gradients(backend: str) -> None:
    """``vmap(grad(...))``: per-sample weight gradients equal those of one call per sample."""
    torch.manual_seed(1)
    x, gate, dy = (torch.randn(3, 2, 8, device=DEVICE) for _ in range(3))
    w = torch.randn(8, device=DEVICE)

    def loss(w, x, gate, dy):
        return (functional.gated_rms_norm(x, gate, w, group_size=4, backend=backend) * dy).sum()

    batched = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0, 0))(w, x, gate, dy)
    looped = torch.stack([torch.func.grad(loss)(w, *(t[i] for t in (x, gate, dy))) for i in range(3)])
    torch.testing.assert_close(batched, looped, rtol=1e-6, atol=1e-6)


# (the interpreter evaluates both sides of rstd_of's tl.where: the side not taken overflows)
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_extreme_magnitudes_stay_finite(backend: str) -> None:
    """float32 input at 1e20: the squares pass float32's range, the power-of-two rescaling keeps
    the normalized output that of the input at 1 (HF's composition gives 0 there: ``rsqrt(inf)``)."""
    torch.manual_seed(2)
    x, gate, w = torch.randn(2, 12, device=DEVICE), torch.randn(2, 12, device=DEVICE), torch.randn(12, device=DEVICE)
    for norm_before_gate in (False, True):
        def f(t):
            return functional.gated_rms_norm(t, gate, w, group_size=6, norm_before_gate=norm_before_gate,
                                             backend=backend)

        torch.testing.assert_close(f(x * 1e20), f(x), rtol=1e-5, atol=1e-6)
