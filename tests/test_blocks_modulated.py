"""The modulated (adaLN) norms, ``norm(x) * (1 + scale) + shift``, on every backend.

Oracle: :mod:`normkit.blocks.modulated`'s reference run in float64 (these norms have no
torch.nn twin), itself checked by ``gradcheck``/``gradgradcheck`` (forward mode included) and
against the torch composition in float64. Every backend (torch, reference, triton; triton on CUDA
or under ``TRITON_INTERPRET=1``) against it, outputs and the five gradients, within
``kernel_bound``'s self-calibrating bound: the error at most twice that of the composition users
write run in the case's own precision (``F.layer_norm(x) * (1 + scale) + shift`` in bf16 for bf16
input), plus one ulp of the dtype at the result's magnitude. Shapes are small: the interpreter
runs each program in Python.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck

from kernel_bound import assert_within_bound
from normkit import functional
from normkit.backends import backends, get_backend

f64, f32, bf16, f16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPS = ("modulated_layer_norm", "modulated_rms_norm")
# RMSNorm's eps=None depends on the dtype (the float64 oracle would take float64's): explicit in
# the cases, the default checked by test_rms_default_eps.
EPS = {"modulated_layer_norm": 1e-6, "modulated_rms_norm": torch.finfo(f32).eps}
# Every backend that runs these ops (triton where CUDA or TRITON_INTERPRET=1 makes it available).
BACKEND_NAMES = [name for name in backends() if any(op in get_backend(name).ops for op in OPS)]
# Backends that must take every case here; any other may decline a broadcast (the case is skipped).
COMPLETE = ("torch", "reference", "triton")


class Case(NamedTuple):
    op: str
    shape: tuple[int, ...]
    shift: tuple[int, ...]  # the shape of shift and scale (broadcast to ``shape``)
    dtype: torch.dtype = f32
    weight: bool = True
    bias: bool = True
    param_dtype: torch.dtype | None = None  # weight/bias; None: the input's dtype
    mod_dtype: torch.dtype | None = None  # shift/scale; None: the input's dtype
    scale: tuple[int, ...] | None = None  # scale's own shape when it differs from shift's
    row_pad: int = 0  # > 0: x is a row-strided view (rows this many elements apart + width)
    chunked: bool = False  # shift/scale: the two halves of one (N, 1, 2D) embedding (DiT chunks one in 6)
    block_n: int | None = None  # the triton tile: small forces the chunked two-pass path

    def __str__(self) -> str:
        parts = [self.op.removeprefix("modulated_"), "x".join(map(str, self.shape)),
                 "mod" + "x".join(map(str, self.shift)), str(self.dtype).removeprefix("torch.")]
        parts += [f for f, on in (("noW", not self.weight), ("noB", not self.bias), ("emb", self.chunked)) if on]
        parts += [f"{k}={v}".replace("torch.", "") for k, v in (("P", self.param_dtype), ("M", self.mod_dtype),
                  ("scale", self.scale), ("pad", self.row_pad), ("block", self.block_n)) if v]
        return "-".join(parts)


LN, RMS = OPS
CASES = [
    # per sample (N, 1, D): DiT, SD3, Flux
    Case(LN, (1, 1, 8), (1, 1, 8)),  # batch 1, one token
    Case(LN, (2, 7, 13), (2, 1, 13)),  # primes
    Case(LN, (2, 5, 40), (2, 1, 40), bf16, param_dtype=f32, mod_dtype=f32),  # fp32 modulation, bf16 x
    Case(LN, (2, 6, 24), (2, 1, 24), bf16, weight=False, bias=False, chunked=True),  # DiT: no affine
    Case(LN, (3, 6, 37), (3, 1, 37), block_n=8),  # wider than one tile: chunked
    Case(LN, (2, 5, 24), (2, 1, 24), f16, row_pad=8),  # row-strided input, read in place
    # per token (N, L, D) and one for the whole batch ((D,), (1, 1, D))
    Case(LN, (3, 5, 31), (3, 5, 31), bf16),
    Case(LN, (2, 3, 17), (17,), f16, bias=False),
    Case(LN, (4, 19), (1, 19), block_n=4),  # 2-D input, chunked
    # mixed and general broadcasts: expanded to per token, reduced by autograd
    Case(LN, (2, 4, 16), (2, 1, 16), scale=(2, 4, 16)),
    Case(LN, (2, 5, 16), (1, 5, 16), bf16),
    Case(LN, (2, 3, 12), (2, 3, 1)),
    Case(LN, (2, 3, 8), ()),  # one number each
    Case(RMS, (1, 1), (1,)),  # a single element
    Case(RMS, (2, 5, 33), (2, 1, 33), bf16),
    Case(RMS, (2, 4, 50), (2, 1, 50), f16, param_dtype=f32, block_n=16),
    Case(RMS, (4, 9, 20), (4, 9, 20), weight=False),
    Case(RMS, (2, 3, 24), (24,), bf16, mod_dtype=f32, row_pad=5, chunked=True),
    Case(RMS, (3, 2, 4, 10), (3, 1, 1, 10), scale=(1, 2, 1, 10)),  # 4-D, a general scale
]


def _make(case: Case, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random x, shift, scale, weight, bias (as the case asks), each a leaf of its own dtype;
    ``x`` may be a row-strided view and shift/scale chunks of one embedding."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, dtype: torch.dtype = case.dtype) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(DEVICE, dtype)

    d = case.shape[-1]
    x = rand(*case.shape[:-1], d + case.row_pad)[..., :d] if case.row_pad else rand(*case.shape)
    mod_dtype = case.mod_dtype or case.dtype
    if case.chunked:
        emb = rand(*case.shift[:-1], 2 * case.shift[-1], dtype=mod_dtype)
        shift, scale = emb.chunk(2, dim=-1)  # views with the embedding's row stride
    else:
        shift, scale = rand(*case.shift, dtype=mod_dtype), rand(*(case.scale or case.shift), dtype=mod_dtype)
    tensors = {"x": x, "shift": shift, "scale": 0.5 * scale}
    if case.weight:
        tensors["weight"] = rand(d, dtype=case.param_dtype or case.dtype)
    if case.bias and case.op == LN:
        tensors["bias"] = rand(d, dtype=case.param_dtype or case.dtype)
    return tensors


def _args(case: Case, t: dict[str, torch.Tensor]) -> tuple:
    params = (t.get("weight"), t.get("bias")) if case.op == LN else (t.get("weight"),)
    return (t["x"], t["shift"], t["scale"], *params, EPS[case.op])


def _results(y: torch.Tensor, leaves: dict[str, torch.Tensor], dy: torch.Tensor) -> dict[str, torch.Tensor]:
    """y and the gradient of every leaf for the upstream gradient ``dy``."""
    grads = torch.autograd.grad(y, list(leaves.values()), dy.to(y.dtype))
    return {"y": y.detach(), **{"d" + k: g for k, g in zip(leaves, grads, strict=True)}}


def _leaves(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Fresh leaves (x keeps its strides: ``detach`` of the view), cast to ``dtype`` when given."""
    return {k: (t.detach() if dtype is None else t.detach().to(dtype)).requires_grad_() for k, t in tensors.items()}


def _low_precision(case: Case, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The composition users write, every step in the input's dtype: the bound's calibration."""
    x, dt = t["x"], t["x"].dtype
    p = {k: t[k].to(dt) if k in t else None for k in ("weight", "bias")}
    if case.op == LN:
        z = F.layer_norm(x, (x.shape[-1],), p["weight"], p["bias"], EPS[LN])
    else:
        z = F.rms_norm(x, (x.shape[-1],), p["weight"], EPS[RMS])
    return z * (1 + t["scale"].to(dt)) + t["shift"].to(dt)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_against_float64_reference(case: Case, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    why = _declined(case, backend)
    if why is not None:
        pytest.skip(f"{backend} declines: {why}")
    _check_within_bound(case, backend, monkeypatch)


def _declined(case: Case, backend: str) -> str | None:
    """Why ``backend`` declines the case; None where it takes it, or must (:data:`COMPLETE`)."""
    if backend in COMPLETE:
        return None
    return get_backend(backend).ops[case.op].unsupported(*_args(case, _make(case)))


def _check_within_bound(case: Case, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if case.block_n:
        monkeypatch.setenv("NORMKIT_TRITON_BLOCK_N", str(case.block_n))
    else:
        monkeypatch.delenv("NORMKIT_TRITON_BLOCK_N", raising=False)
    tensors = _make(case)
    op = getattr(functional, case.op)
    # in the input's dtype for every run, the float64 oracle's too: the rounding of dy is not the
    # candidate's error (a sum of rounded dy, as dshift of a (1,) shift, carries it whole)
    dy = torch.randn(case.shape, generator=torch.Generator().manual_seed(1)).to(case.dtype).to(DEVICE)

    oracle = _leaves(tensors, f64)
    expected = _results(op(*_args(case, oracle), backend="reference"), oracle, dy)
    low = _leaves(tensors)
    baseline = _results(_low_precision(case, low), low, dy)
    got = _leaves(tensors)
    candidate = _results(op(*_args(case, got), backend=backend), got, dy)
    assert_within_bound(candidate, expected, baseline)


@st.composite
def _cases(draw: st.DrawFn) -> Case:
    """Any input of 1 to 4 dims, and shift/scale each kept or broadcast (size 1, or dropped when
    leading) along every dim: per sample, per token, once, and every other broadcast."""
    op = draw(st.sampled_from(OPS))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=3))) + (draw(st.integers(1, 40)),)

    def modulation() -> tuple[int, ...]:
        kept = tuple(s if draw(st.booleans()) else 1 for s in shape)
        return kept[draw(st.integers(0, len(shape))):]  # leading dims may be absent

    return Case(op, shape, modulation(), draw(st.sampled_from([f32, bf16, f16])), weight=draw(st.booleans()),
                bias=draw(st.booleans()), mod_dtype=draw(st.sampled_from([None, f32])), scale=modulation(),
                row_pad=draw(st.sampled_from([0, 3])), block_n=draw(st.sampled_from([None, 4, 16])))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_cases(), backend=st.sampled_from(BACKEND_NAMES))
def test_hypothesis_within_bound(case: Case, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assume(_declined(case, backend) is None)
    _check_within_bound(case, backend, monkeypatch)


@pytest.mark.parametrize("backend", [b for b in BACKEND_NAMES if b != "torch"])
@pytest.mark.parametrize("op", OPS)
def test_large_and_constant_rows(op: str, backend: str) -> None:
    """float32 input at 1e20 (squares past float32's range) normalizes as at 1, and a constant
    row normalizes to 0: its output is the bias, modulated. (Not the torch composition: ATen's
    float32 norms square the input as it is, and give NaN there.)"""
    case = Case(op, (2, 3, 16), (2, 1, 16))
    t = _make(case, seed=12)
    x = t["x"].clone()
    x[0] *= 1e20
    x[1, 1] = 3.0
    args = (x, *_args(case, t)[1:])
    y = getattr(functional, op)(*args, backend=backend)
    expected = getattr(functional, op)(*(a.double() if isinstance(a, torch.Tensor) else a for a in args),
                                       backend="reference")
    torch.testing.assert_close(y.double(), expected, rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# The reference itself: exact derivatives, and the composition agrees with it in float64.

REF_SHAPES = [((2, 3, 5), (2, 1, 5)), ((2, 3, 5), (2, 3, 5)), ((2, 3, 5), (5,)), ((2, 3, 5), (1, 3, 1))]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(("shape", "mod"), REF_SHAPES, ids=str)
def test_reference_gradcheck(op: str, shape: tuple[int, ...], mod: tuple[int, ...]) -> None:
    case = Case(op, shape, mod, f64)
    leaves = _leaves(_make(case, seed=2))
    fn = getattr(functional, op)

    def run(*tensors: torch.Tensor) -> torch.Tensor:
        return fn(*_args(case, dict(zip(leaves, tensors, strict=True))), backend="reference")

    inputs = tuple(leaves.values())
    assert gradcheck(run, inputs, check_forward_ad=True, check_batched_grad=True,
                     check_batched_forward_grad=True)
    assert gradgradcheck(run, inputs)


@pytest.mark.parametrize("case", [c for c in CASES if not c.row_pad][:6] + [c for c in CASES if c.op == RMS][:3],
                         ids=str)
def test_composition_agrees_with_reference_in_float64(case: Case) -> None:
    t = _make(case._replace(dtype=f64, param_dtype=None, mod_dtype=None))
    fn = getattr(functional, case.op)
    dy = torch.randn(case.shape, dtype=f64, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    runs = []
    for backend in ("torch", "reference"):
        leaves = _leaves(t)
        runs.append(_results(fn(*_args(case, leaves), backend=backend), leaves, dy))
    for name, ref in runs[1].items():
        torch.testing.assert_close(runs[0][name], ref, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_rms_default_eps(backend: str) -> None:
    """``eps=None`` is machine epsilon of float32 (the statistics' dtype) for fp32 and bf16 input."""
    for dtype in (f32, bf16):
        t = _make(Case(RMS, (2, 3, 16), (2, 1, 16), dtype))
        args = (t["x"], t["shift"], t["scale"], t["weight"])
        default = functional.modulated_rms_norm(*args, backend=backend)
        explicit = functional.modulated_rms_norm(*args, torch.finfo(f32).eps, backend=backend)
        assert torch.equal(default, explicit)


# ---------------------------------------------------------------------------------------------
# Triton: determinism, NaN, torch.compile, what it refuses.

needs_triton = pytest.mark.skipif("triton" not in BACKEND_NAMES,
                                  reason="Triton kernels need CUDA or TRITON_INTERPRET=1")


@pytest.mark.gpu_schedule
@needs_triton
@pytest.mark.parametrize("block_n", [None, 8])
@pytest.mark.parametrize("mod", [(3, 1, 24), (24,), (3, 5, 24)], ids=str)
def test_triton_backward_is_deterministic(mod: tuple[int, ...], block_n: int | None,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    if block_n:
        monkeypatch.setenv("NORMKIT_TRITON_BLOCK_N", str(block_n))
    case = Case(LN, (3, 5, 24), mod, bf16, param_dtype=f32)
    tensors = _make(case, seed=4)
    dy = torch.randn(case.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    runs = []
    for _ in range(2):
        leaves = _leaves(tensors)
        runs.append(_results(functional.modulated_layer_norm(*_args(case, leaves), backend="triton"), leaves, dy))
    for name, first in runs[0].items():
        assert torch.equal(first, runs[1][name]), name


@needs_triton
@pytest.mark.parametrize("op", OPS)
def test_triton_nan_stays_in_its_row(op: str) -> None:
    t = _make(Case(op, (2, 3, 12), (2, 1, 12)))
    x = t["x"].clone()
    x[1, 2, 5] = float("nan")
    y = getattr(functional, op)(x, *_args(Case(op, (2, 3, 12), (2, 1, 12)), t)[1:], backend="triton")
    assert y[1, 2].isnan().all()
    assert not y[:, :2].isnan().any() and not y[0].isnan().any()


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("op", OPS)
def test_compile_fullgraph(op: str, backend: str) -> None:
    """One small case per op and backend through torch.compile(fullgraph=True) ("aot_eager":
    Dynamo's trace with the custom ops' fake implementations and autograd; CPU inductor would add
    minutes of C++ compilation to nothing the kernels do), outputs and gradients equal to eager."""
    torch._dynamo.reset()
    get_backend(backend)  # a lazy backend registers outside the trace (an import Dynamo skips)
    case = Case(op, (2, 3, 16), (2, 1, 16))
    tensors = _make(case, seed=6)
    fn = getattr(functional, op)

    def model(*args: torch.Tensor) -> torch.Tensor:
        return fn(*args, backend=backend)

    dy = torch.randn(case.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    runs = []
    for run in (model, torch.compile(model, fullgraph=True, backend="aot_eager")):
        leaves = _leaves(tensors)
        runs.append(_results(run(*_args(case, leaves)), leaves, dy))
    for name, eager in runs[0].items():
        torch.testing.assert_close(runs[1][name], eager, rtol=1e-6, atol=1e-6, msg=name)


@needs_triton
def test_triton_refuses_forward_mode_and_runs_second_order() -> None:
    case = Case(LN, (2, 3, 8), (2, 1, 8))
    leaves = _leaves(_make(case, seed=8))
    y = functional.modulated_layer_norm(*_args(case, leaves), backend="triton")
    (dx,) = torch.autograd.grad(y, leaves["x"], torch.randn_like(y), create_graph=True)
    dx.pow(2).sum().backward()  # the composition's second derivatives (test_triton_double_backward.py)
    assert leaves["x"].grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="forward-mode"):
        torch.func.jvp(lambda x: functional.modulated_layer_norm(x, *_args(case, leaves)[1:], backend="triton"),
                       (leaves["x"].detach(),), (torch.ones_like(leaves["x"]),))


@needs_triton
def test_triton_per_sample_gradients() -> None:
    """``vmap(grad(...))`` (one backward call per sample): the per-sample gradients of weight and
    scale equal those of one call per sample."""
    case = Case(LN, (3, 4, 8), (3, 1, 8))
    t = _make(case, seed=13)
    dy = torch.randn(case.shape, generator=torch.Generator().manual_seed(14)).to(DEVICE)

    def loss(weight, scale, x, shift, bias, dy):
        y = functional.modulated_layer_norm(x, shift, scale, weight, bias, EPS[LN], backend="triton")
        return (y * dy).sum()

    grads = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(None, 0, 0, 0, None, 0))(
        t["weight"], t["scale"], t["x"], t["shift"], t["bias"], dy)
    for i in range(3):
        one = torch.func.grad(loss, argnums=(0, 1))(t["weight"], t["scale"][i], t["x"][i], t["shift"][i], t["bias"],
                                                    dy[i])
        for got, want in zip(grads, one, strict=True):
            torch.testing.assert_close(got[i], want, rtol=1e-6, atol=1e-6)


@needs_triton
def test_triton_vmap_matches_the_batched_call() -> None:
    """vmap over a stack of inputs (one call per element) equals the call on the stacked batch."""
    case = Case(RMS, (3, 4, 8), (3, 1, 8))
    t = _make(case, seed=9)
    args = _args(case, t)
    batched = functional.modulated_rms_norm(*args, backend="triton")
    mapped = torch.func.vmap(lambda x, shift, scale: functional.modulated_rms_norm(
        x, shift, scale, t["weight"], EPS[RMS], backend="triton"))(t["x"], t["shift"], t["scale"])
    assert torch.equal(mapped, batched)


# ---------------------------------------------------------------------------------------------
# Outside material: diffusers' own adaLN layer, its norm call replaced by normkit's.


def _diffusers_layer(norm_type: str) -> torch.nn.Module:
    normalization = pytest.importorskip("diffusers.models.normalization")
    torch.manual_seed(10)
    layer = normalization.AdaLayerNormContinuous(24, 12, elementwise_affine=True, eps=1e-5, norm_type=norm_type)
    with torch.no_grad():
        for p in layer.norm.parameters():  # diffusers starts at ones/zeros: random, so they matter
            p.normal_()
    return layer.to(DEVICE)


def _normkit_adaln(layer: torch.nn.Module, x: torch.Tensor, cond: torch.Tensor, backend: str) -> torch.Tensor:
    """AdaLayerNormContinuous.forward with its ``norm(x) * (1 + scale)[:, None] + shift[:, None]``
    as one normkit call (shift/scale: chunks of the embedding, per sample)."""
    emb = layer.linear(layer.silu(cond).to(x.dtype))
    scale, shift = torch.chunk(emb, 2, dim=1)
    norm = layer.norm
    if isinstance(norm, torch.nn.LayerNorm):
        return functional.modulated_layer_norm(x, shift[:, None], scale[:, None], norm.weight, norm.bias, norm.eps,
                                               backend=backend)
    return functional.modulated_rms_norm(x, shift[:, None], scale[:, None], norm.weight, norm.eps, backend=backend)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("norm_type", ["layer_norm", "rms_norm"])
def test_diffusers_ada_layer_norm_continuous(norm_type: str, backend: str) -> None:
    """diffusers' layer in float64 is the oracle and in float32 the baseline; normkit in float32
    within the bound, the output and the gradients of x, the conditioning and every parameter.
    (diffusers' RMSNorm takes its variance in float32 even for float64 input: a ~1e-7 oracle.)"""
    layer = _diffusers_layer(norm_type)
    gen = torch.Generator().manual_seed(11)
    x, cond = (torch.randn(*s, generator=gen).to(DEVICE) for s in ((2, 5, 24), (2, 12)))
    dy = torch.randn(2, 5, 24, generator=gen).to(DEVICE)

    def run(module: torch.nn.Module, dtype: torch.dtype, fn) -> dict[str, torch.Tensor]:
        module = copy.deepcopy(module).to(dtype)
        leaves = {"x": x.to(dtype).requires_grad_(), "cond": cond.to(dtype).requires_grad_()}
        y = fn(module, leaves["x"], leaves["cond"])
        params = dict(module.named_parameters())
        grads = torch.autograd.grad(y, [*leaves.values(), *params.values()], dy.to(dtype))
        return {"y": y.detach(), **{"d" + k: g for k, g in zip([*leaves, *params], grads, strict=True)}}

    oracle = run(layer, f64, lambda m, x, c: m(x, c))
    baseline = run(layer, f32, lambda m, x, c: m(x, c))
    candidate = run(layer, f32, lambda m, x, c: _normkit_adaln(m, x, c, backend))
    assert_within_bound(candidate, oracle, baseline)
