"""DyT and Derf (the normalization-free drop-ins) on every backend, their modules, and
``replace_norms`` on real models.

The oracle is :mod:`normkit.blocks.norm_free`'s reference run in float64 on the inputs upcast
(these have no torch.nn twin); the reference itself is checked by ``gradcheck`` (reverse and
forward mode) and ``gradgradcheck``, and against the torch composition in float64. Every backend
is judged by the self-calibrating bound (``kernel_bound.assert_within_bound``): its error at most
twice that of the torch composition run in the case's own dtype, plus the dtype's floor.
Outside material: hypothesis strategies over shapes, strides and dtypes; a tiny HF Llama, Qwen3
and Gemma3 built from configs, and a ``torch.nn.TransformerEncoder``, for ``replace_norms``.

Triton runs on CUDA when there is a device, else under ``TRITON_INTERPRET=1`` (small shapes).
"""

from __future__ import annotations

import io
from typing import NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

from blocks_cases import BACKENDS, DEVICE, TRITON, needs_triton
from kernel_bound import assert_within_bound
from normkit import functional
from normkit.backends import BackendError
from normkit.blocks import norm_free as R
from normkit.modules.norm_free import Derf, DyT
from normkit.surgery_norm_free import ReplaceReport, replace_norms

OPS = ("dyt", "derf")
f32, bf16, f16, f64 = torch.float32, torch.bfloat16, torch.float16, torch.float64


class Case(NamedTuple):
    shape: tuple[int, ...]
    weight_dims: int | None = 1  # the trailing dims of weight (None: no weight)
    bias_dims: int | None = 1
    block_n: int | None = None  # caps the Triton tile: a row wider than it spans several programs
    layout: str = "contiguous"  # or "padded rows" (row stride 2L, read in place), "every other column",
    # "channels_last" (a 4-D input whose normalized last dim is strided)


# The shapes: batch 1, primes, non-powers of two, a row wider than one tile, many row programs,
# padded, non-contiguous and channels_last input, a 2-D normalized_shape (weight and bias of
# different ranks), no affine, weight only, 0-dim weight and bias (the checks allow any trailing shape).
CASES = {
    "batch 1, width 7": Case((1, 7)),
    "primes": Case((3, 5, 13)),
    "width 96": Case((4, 96)),
    "37 columns in tiles of 16": Case((5, 37), block_n=16),
    "24 rows of 3 in tiles of 8": Case((24, 3), block_n=8),
    "padded rows": Case((6, 12), layout="padded rows"),
    "every other column": Case((2, 3, 10), layout="every other column"),
    "channels_last": Case((2, 3, 4, 5), layout="channels_last"),
    "weight (5, 7), bias (7,)": Case((3, 5, 7), weight_dims=2, bias_dims=1, block_n=16),
    "no affine": Case((4, 9), weight_dims=None, bias_dims=None),
    "weight only": Case((4, 9), bias_dims=None),
    "0-dim weight and bias": Case((4, 6), weight_dims=0, bias_dims=0),
}


def _inputs(case: Case, seed: int = 0) -> dict[str, torch.Tensor | None]:
    """float64 input, alpha, shift, weight, bias and upstream gradient, all random (never unit
    weights); ``x`` spread enough that tanh and erf saturate on some elements."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g, dtype=f64)

    def param(dims: int | None) -> torch.Tensor | None:
        return None if dims is None else rand(*case.shape[len(case.shape) - dims:])

    return {"x": 2 * rand(*case.shape), "alpha": 0.5 + rand(1).abs(), "shift": 0.3 * rand(),
            "weight": param(case.weight_dims), "bias": param(case.bias_dims), "dy": rand(*case.shape)}


def _leaf(t: torch.Tensor | None, dtype: torch.dtype, layout: str = "contiguous") -> torch.Tensor | None:
    """A leaf holding ``t`` rounded to ``dtype``, in ``layout``."""
    if t is None:
        return None
    if layout == "contiguous":
        return t.to(device=DEVICE, dtype=dtype, copy=True).requires_grad_()
    if layout == "channels_last":
        return t.to(device=DEVICE, dtype=dtype, memory_format=torch.channels_last).requires_grad_()
    d = t.shape[-1]
    wide = torch.zeros(*t.shape[:-1], 2 * d, dtype=dtype, device=DEVICE)
    view = wide[..., :d] if layout == "padded rows" else wide[..., ::2]
    view.copy_(t)
    return view.detach().requires_grad_()  # detach keeps the strides


def _run(op: str, backend: str, inputs: dict, dtype: torch.dtype, layout: str = "contiguous",
         param_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``y`` and the gradients of ``(y * dy).sum()``: the input rounded to ``dtype`` (in
    ``layout``), the parameters to ``param_dtype`` (default ``dtype``)."""
    pd = param_dtype or dtype
    x = _leaf(inputs["x"], dtype, layout)
    params = {name: _leaf(inputs[name], pd) for name in ("alpha", "shift", "weight", "bias")}
    if op == "dyt":
        del params["shift"]
    y = getattr(functional, op)(x, *params.values(), backend=backend)
    y.backward(inputs["dy"].to(device=DEVICE, dtype=y.dtype))
    out = {"y": y.detach(), "dx": x.grad}
    out.update({f"d{name}": p.grad for name, p in params.items() if p is not None})
    return out


@pytest.fixture
def tile(monkeypatch: pytest.MonkeyPatch):
    """Cap the Triton tile for one case (``NORMKIT_TRITON_BLOCK_N``, read at each launch)."""

    def set_tile(case: Case) -> None:
        if case.block_n is not None:
            monkeypatch.setenv("NORMKIT_TRITON_BLOCK_N", str(case.block_n))

    return set_tile


# ---- the reference ------------------------------------------------------------------------------


def _reference_args(op: str, weight: bool, bias: bool) -> tuple:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, generator=g, dtype=f64, requires_grad=True)
    alpha = torch.tensor([0.7], dtype=f64, requires_grad=True)
    shift = torch.tensor(0.2, dtype=f64, requires_grad=True)
    w = torch.randn(3, 5, generator=g, dtype=f64, requires_grad=True) if weight else None
    b = torch.randn(5, generator=g, dtype=f64, requires_grad=True) if bias else None
    return (x, alpha, w, b) if op == "dyt" else (x, alpha, shift, w, b)


@pytest.mark.parametrize("affine", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["weight and bias", "weight", "bias", "none"])
@pytest.mark.parametrize("op", OPS)
def test_reference_gradients(op: str, affine: tuple[bool, bool]) -> None:
    """The hand-derived backward and jvp against finite differences, and the backward's own
    derivative (it is written in differentiable ops)."""
    args = _reference_args(op, *affine)
    fn = R.REFERENCE[op]
    assert gradcheck(fn, args)
    assert gradcheck(fn, args, check_forward_ad=True, check_backward_ad=False, check_undefined_grad=False)
    assert gradgradcheck(fn, args)


@pytest.mark.parametrize("op", OPS)
def test_reference_equals_the_composition_in_float64(op: str) -> None:
    """Two independent float64 computations (the reference with its own backward, the torch
    composition through autograd) agree to rounding."""
    t = _inputs(CASES["weight (5, 7), bias (7,)"])
    ref, comp = _run(op, "reference", t, f64), _run(op, "torch", t, f64)
    for name in ref:
        torch.testing.assert_close(ref[name], comp[name], rtol=1e-12, atol=1e-12, msg=name)


# ---- every backend against the float64 oracle ---------------------------------------------------


def _dtypes_of(name: str) -> list[torch.dtype]:
    return [f32, bf16, f16] if name in ("primes", "37 columns in tiles of 16") else [f32, bf16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(("name", "dtype"), [(n, d) for n in CASES for d in _dtypes_of(n)])
def test_within_bound_of_the_float64_reference(backend: str, op: str, name: str, dtype: torch.dtype, tile) -> None:
    case = CASES[name]
    tile(case)
    t = _inputs(case)
    oracle = _run(op, "reference", t, f64)
    baseline = _run(op, "torch", t, dtype)
    assert_within_bound(_run(op, backend, t, dtype, case.layout), oracle, baseline)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_mixed_precision_float32_parameters(backend: str, op: str) -> None:
    """bf16 activations with float32 parameters (autocast-free mixed precision): y in bf16, each
    gradient in its own tensor's dtype."""
    t = _inputs(CASES["primes"])
    got = _run(op, backend, t, bf16, param_dtype=f32)
    assert got["y"].dtype == got["dx"].dtype == bf16
    assert all(got[k].dtype == f32 for k in got if k not in ("y", "dx"))
    assert_within_bound(got, _run(op, "reference", t, f64), _run(op, "torch", t, bf16, param_dtype=f32))


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("op", OPS)
def test_float64_backends_are_exact(backend: str, op: str) -> None:
    t = _inputs(CASES["every other column"])
    got, oracle = _run(op, backend, t, f64, "every other column"), _run(op, "reference", t, f64)
    for name in oracle:
        torch.testing.assert_close(got[name], oracle[name], rtol=1e-12, atol=1e-12, msg=name)


# The interpreter's numpy warns where u * u overflows to inf for erf's derivative (exp(-inf) = 0).
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_special_values(backend: str, op: str) -> None:
    """NaN propagates to its own element only; +-inf saturates to +-weight + bias with a zero
    input gradient, as torch's tanh/erf do."""
    x0 = torch.tensor([[float("nan"), float("inf"), -float("inf"), 0.0, 1e30, -3.0]], device=DEVICE)
    w, b = torch.randn(6, device=DEVICE), torch.randn(6, device=DEVICE)
    alpha, shift = torch.tensor([0.5], device=DEVICE), torch.tensor([0.25], device=DEVICE)
    results = []
    for be in (backend, "reference"):
        x = x0.clone().requires_grad_()
        params = (alpha, w, b) if op == "dyt" else (alpha, shift, w, b)
        y = getattr(functional, op)(x, *params, backend=be)
        y.backward(torch.ones_like(y))
        results.append((y.detach(), x.grad))
    (y, dx), (y_ref, dx_ref) = results
    torch.testing.assert_close(y, y_ref, equal_nan=True)
    torch.testing.assert_close(dx, dx_ref, equal_nan=True)
    assert y[0, 0].isnan() and not y[0, 1:].isnan().any()
    torch.testing.assert_close(y[0, 1:3], torch.stack([w[1] + b[1], -w[2] + b[2]]))
    assert (dx[0, 1:3] == 0).all()


@needs_triton
def test_triton_tanh_is_accurate_in_relative_terms() -> None:
    """tanh near 0, where ``(1 - e) / (1 + e)`` would cancel (the Taylor branch), and across the
    switch at |u| = 1/4 and into saturation: within 4 fp32 ulps of float64, relative."""
    u = torch.cat([torch.logspace(-8, 1.3, 301, dtype=f64), torch.linspace(0.24, 0.26, 41, dtype=f64)])
    u = torch.cat([u, -u]).to(DEVICE)
    y = functional.dyt(u.float(), torch.ones(1, device=DEVICE), backend="triton")
    exact = torch.tanh(u.float().double())
    assert ((y.double() - exact).abs() / exact.abs()).max().item() <= 4 * torch.finfo(f32).eps


# ---- the Triton kernels: determinism, transforms, compile -----------------------------------------


@pytest.mark.gpu_schedule
@needs_triton
@pytest.mark.parametrize("op", OPS)
def test_triton_backward_is_deterministic(op: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs give the same bits (no atomics; the parameter partials summed in a fixed order),
    here with several row programs and several column blocks."""
    monkeypatch.setenv("NORMKIT_TRITON_BLOCK_N", "16")
    t = _inputs(Case((10, 23)), seed=3)
    first, second = (_run(op, "triton", t, f32) for _ in range(2))
    for name in first:
        assert torch.equal(first[name], second[name]), name


@needs_triton
def test_triton_reads_padded_rows_in_place() -> None:
    """Rows with a stride of their own reach the kernel as a view (no copy of the input)."""
    from normkit.ops.triton import norm_free as T

    x = torch.randn(4, 16, device=DEVICE)[:, :8]
    assert T._rows_contiguous(x.reshape(-1, 8)).data_ptr() == x.data_ptr()


@needs_triton
def test_triton_under_torch_func() -> None:
    """Reverse mode under ``torch.func`` (grad, vmap of grad: per-sample gradients) matches the
    reference; forward mode is refused with an error, not silent zeros."""
    x, w, b = torch.randn(3, 4, 6, device=DEVICE), torch.randn(6, device=DEVICE), torch.randn(6, device=DEVICE)
    alpha = torch.tensor([0.6], device=DEVICE)

    def loss(backend: str):
        return lambda a, xs: (functional.dyt(xs, a, w, b, backend=backend) ** 2).sum()

    for transform in (lambda f: torch.func.grad(f)(alpha, x), lambda f: torch.func.vmap(torch.func.grad(f),
                                                                                       in_dims=(None, 0))(alpha, x)):
        torch.testing.assert_close(transform(loss("triton")), transform(loss("reference")))
    with pytest.raises(RuntimeError, match="forward-mode AD"):
        torch.func.jvp(lambda xs: functional.dyt(xs, alpha, w, b, backend="triton"), (x,), (torch.ones_like(x),))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_compile_fullgraph(backend: str, op: str) -> None:
    """No graph break through dispatch, the traced reference and the custom ops' fake
    implementations and autograd; the compiled forward and gradients equal the eager ones."""
    torch._dynamo.reset()
    t = _inputs(Case((3, 8)), seed=5)
    keys = ("x", "alpha", "weight", "bias") if op == "dyt" else ("x", "alpha", "shift", "weight", "bias")

    def f(*args):
        return getattr(functional, op)(*args, backend=backend)

    results = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        args = [t[k].float().to(DEVICE).requires_grad_() for k in keys]
        y = fn(*args)
        y.backward(t["dy"].float().to(DEVICE))
        results.append((y.detach(), *(a.grad for a in args)))
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@settings(max_examples=12, deadline=None)
@given(rows=st.lists(st.integers(1, 5), min_size=1, max_size=2), width=st.integers(1, 40),
       dtype=st.sampled_from([f32, bf16]), layout=st.sampled_from(["contiguous", "every other column"]),
       op=st.sampled_from(OPS), seed=st.integers(0, 2**16))
def test_hypothesis_shapes_strides_dtypes(rows, width, dtype, layout, op, seed) -> None:
    """Random shapes, strides and dtypes: every backend within the bound."""
    t = _inputs(Case((*rows, width)), seed)
    oracle, baseline = _run(op, "reference", t, f64), _run(op, "torch", t, dtype)
    for backend in ("reference", *(("triton",) if TRITON else ())):
        assert_within_bound(_run(op, backend, t, dtype, layout), oracle, baseline)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_precision_controls(backend: str, op: str) -> None:
    """``out_dtype=float32`` on bf16 input: computed as for float32 input, not rounded to bf16 on
    the way; ``stats_dtype=float64`` runs at float64 where the backend can (triton declines: its
    kernels accumulate in float32)."""
    t = _inputs(CASES["primes"])
    names = ("alpha", "weight", "bias") if op == "dyt" else ("alpha", "shift", "weight", "bias")
    x, params = t["x"].to(DEVICE, bf16), [t[n].to(DEVICE, bf16) for n in names]
    fn = getattr(functional, op)
    y = fn(x, *params, backend=backend, out_dtype=f32)
    assert y.dtype == f32
    expected = fn(x.float(), *(p.float() for p in params), backend="reference")
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    if backend == "triton":
        with pytest.raises(BackendError, match="float64"):
            fn(x, *params, backend=backend, stats_dtype=f64)
        return
    y64 = fn(x, *params, backend=backend, stats_dtype=f64, out_dtype=f64)
    torch.testing.assert_close(y64, fn(x.double(), *(p.double() for p in params), backend="reference"))


def test_bad_alpha_is_refused_before_anything_runs() -> None:
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="one number"):
        functional.dyt(x, torch.ones(2))
    with pytest.raises(RuntimeError, match="trailing shape"):
        functional.derf(x, torch.ones(1), torch.zeros(1), torch.ones(3))
    assert x.grad is None


# ---- modules ----------------------------------------------------------------------------------


def test_modules_start_at_the_papers_initialisation() -> None:
    dyt, derf = DyT(6), Derf((2, 6), alpha_init=0.8, shift_init=0.1)
    assert dyt.alpha.shape == (1,) and dyt.alpha.item() == 0.5
    assert torch.equal(dyt.weight, torch.ones(6)) and torch.equal(dyt.bias, torch.zeros(6))
    assert derf.alpha.item() == pytest.approx(0.8) and derf.shift.item() == pytest.approx(0.1)
    assert derf.weight.shape == derf.bias.shape == (2, 6)
    assert Derf(4).shift.item() == 0.0
    assert DyT(4, elementwise_affine=False).weight is None and DyT(4, bias=False).bias is None
    assert repr(dyt) == "DyT((6,), alpha_init=0.5, elementwise_affine=True)"
    assert repr(Derf(3, bias=False, backend="torch")) == ("Derf((3,), alpha_init=0.5, shift_init=0.0, "
                                                          "elementwise_affine=True, bias=False, backend='torch')")
    with torch.no_grad():
        derf.alpha.zero_()
        derf.weight.zero_()
    derf.reset_parameters()
    assert derf.alpha.item() == pytest.approx(0.8) and torch.equal(derf.weight, torch.ones(2, 6))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [DyT, Derf])
def test_module_forward_is_the_functional(cls: type, backend: str) -> None:
    torch.manual_seed(0)
    m = cls(10, backend=backend).to(DEVICE)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    x = torch.randn(3, 4, 10, device=DEVICE)
    params = [m.alpha, *([m.shift] if cls is Derf else []), m.weight, m.bias]
    expected = getattr(functional, cls.__name__.lower())(x, *params, backend="reference")
    torch.testing.assert_close(m(x), expected)


def test_module_dtype_device_and_state_dict_round_trip() -> None:
    """A state_dict (the authors' layout: alpha and shift of shape (1,)) moves between modules;
    bf16 parameters give bf16 gradients."""
    src = Derf(8, alpha_init=0.7, dtype=bf16)
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    assert [(k, tuple(v.shape)) for k, v in src.state_dict().items()] == [
        ("alpha", (1,)), ("shift", (1,)), ("weight", (8,)), ("bias", (8,))]
    buffer = io.BytesIO()
    torch.save(src.state_dict(), buffer)
    buffer.seek(0)
    dst = Derf(8, dtype=bf16)
    dst.load_state_dict(torch.load(buffer))
    x = torch.randn(2, 8, dtype=bf16)
    assert torch.equal(dst(x), src(x))
    dst(x).float().pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.dtype == bf16 for p in dst.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [DyT, Derf])
def test_a_training_step_decreases_the_loss(cls: type, backend: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), cls(16, backend=backend), nn.Linear(16, 1)).to(DEVICE)
    x, target = torch.randn(32, 6, device=DEVICE), torch.randn(32, 1, device=DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert model[1].alpha.grad is not None and model[1].alpha.grad.abs().item() > 0


# ---- replace_norms ---------------------------------------------------------------------------------


class LayerNorm2d(nn.LayerNorm):
    """timm's channels-first LayerNorm2d, as it is written: over dim 1 of an NCHW map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2,
                                norm=nn.LayerNorm(16), enable_nested_tensor=False)
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_()
                m.bias.normal_()
    enc.add_module("stem_norm", LayerNorm2d(4))
    enc.add_module("group_norm", nn.GroupNorm(2, 4))
    return enc


@pytest.mark.parametrize("kind", ["dyt", "derf"])
def test_replace_norms_on_a_torch_transformer(kind: str) -> None:
    model = _encoder()
    norms = {name: m for name, m in model.named_modules() if type(m) is nn.LayerNorm}
    x = torch.randn(2, 5, 16)
    before = model(x)
    report = ReplaceReport()
    result = replace_norms(model, kind, alpha_init=0.3, report=report)
    assert result is model and isinstance(report, ReplaceReport)
    cls = DyT if kind == "dyt" else Derf
    assert sorted(r.name for r in report.replaced) == sorted(norms)
    for name, norm in norms.items():
        new = model.get_submodule(name)
        assert type(new) is cls and new.normalized_shape == (16,) and new.alpha.item() == pytest.approx(0.3)
        assert torch.equal(new.weight, norm.weight) and torch.equal(new.bias, norm.bias)
        assert new.weight is not norm.weight  # copied, not shared: the old norm is gone
    assert {x.name: x.kind for x in report.left} == {"stem_norm": "LayerNorm2d", "group_norm": "GroupNorm"}
    assert all(x.reason for x in report.left) and "left 2" in str(report)
    after = model(x)
    assert after.shape == before.shape and not torch.allclose(after, before)  # the function changed
    after.pow(2).mean().backward()
    assert model.layers[0].norm1.alpha.grad is not None


def test_replace_norms_options_and_errors() -> None:
    with pytest.raises(ValueError, match="kind"):
        replace_norms(nn.LayerNorm(4), "tanh")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shift"):
        replace_norms(nn.LayerNorm(4), "dyt", shift_init=0.1)
    # the model itself a norm: the new module is returned; a shared norm stays shared
    report = ReplaceReport()
    new = replace_norms(nn.LayerNorm(4, bias=False), "derf", shift_init=0.2, report=report)
    assert type(new) is Derf and new.bias is None and new.shift.item() == pytest.approx(0.2)
    assert report.replaced[0].name == ""
    shared = nn.RMSNorm(4)
    model = nn.Sequential(shared, nn.Linear(4, 4), shared).to(bf16)
    report = ReplaceReport()
    model = replace_norms(model, "dyt", alpha_init=lambda name, m: 0.8 if name == "0" else 0.2, backend="torch",
                          report=report)
    assert model[0] is model[2] and len(report.replaced) == 1
    assert model[0].alpha.dtype == bf16 and model[0].alpha.item() == pytest.approx(0.8, rel=1e-2)
    assert model[0].backend == "torch" and model[0].bias is None
    no_affine = replace_norms(nn.Sequential(nn.LayerNorm(4, elementwise_affine=False)), "dyt")
    assert no_affine[0].weight is None and no_affine[0].bias is None


def _tiny_hf(name: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2}
    if name == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    if name == "qwen3":
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=8))
    return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**common, head_dim=8))


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_replace_norms_on_tiny_hf_models(name: str) -> None:
    """Every RMSNorm of a Llama/Qwen3 built offline from a config is replaced (Qwen3's QK-norms
    too, unless ``include`` keeps them), its weight copied; the model trains."""
    model = _tiny_hf(name)
    rms = {n: m for n, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")}
    with torch.no_grad():
        for m in rms.values():
            m.weight.normal_()
    weights = {n: m.weight.detach().clone() for n, m in rms.items()}
    report = ReplaceReport()
    model = replace_norms(model, "derf", report=report)
    assert sorted(r.name for r in report.replaced) == sorted(rms) and not report.left
    for n, w in weights.items():
        new = model.get_submodule(n)
        assert type(new) is Derf and torch.equal(new.weight, w) and new.bias is None
    ids = torch.randint(0, 64, (2, 7))
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    if name == "qwen3":
        report = ReplaceReport()
        replace_norms(_tiny_hf(name), "dyt", include=lambda n, m: not n.endswith(("q_norm", "k_norm")),
                      report=report)
        assert len(report.left) == 4 and all(x.reason == "rejected by include" for x in report.left)


def test_replace_norms_carries_an_offset_weight() -> None:
    """Gemma's RMSNorm scales by ``1 + weight``: the probe finds the offset and the new module's
    weight is the effective scale; normkit's RMSNorm(weight_offset=1) likewise."""
    from normkit.modules import RMSNorm

    model = _tiny_hf("gemma3")
    norms = {n: m for n, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")}
    report = ReplaceReport()
    model = replace_norms(model, "dyt", report=report)
    assert len(report.replaced) == len(norms) and all("weight + 1" in r.carried for r in report.replaced)
    assert all(torch.equal(model.get_submodule(n).weight, 1 + m.weight) for n, m in norms.items())
    nk_norm = RMSNorm(4, weight_offset=1.0)
    new = replace_norms(nk_norm, "dyt")
    assert torch.equal(new.weight, nk_norm.weight + 1)


def test_replace_norms_in_low_precision_and_on_meta() -> None:
    """A bf16 HF RMSNorm passes the probe (HF rounds x_hat before the weight); on the meta device
    nothing can run: the structural match is taken and the report says it was not probed."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    norm = llama.LlamaRMSNorm(8).to(bf16)
    with torch.no_grad():
        norm.weight.normal_()
    report = ReplaceReport()
    new = replace_norms(norm, "dyt", report=report)
    assert type(new) is DyT and new.weight.dtype == bf16 and torch.equal(new.weight, norm.weight)
    with torch.device("meta"):
        model = nn.Sequential(nn.LayerNorm(8), llama.LlamaRMSNorm(8))
    report = ReplaceReport()
    model = replace_norms(model, "derf", report=report)
    assert [type(m) for m in model] == [Derf, Derf] and model[1].alpha.device.type == "meta"
    assert "not probed" in report.replaced[1].carried


def test_replaced_model_state_dict_round_trip() -> None:
    model = replace_norms(_encoder(), "dyt")
    with torch.no_grad():
        model.layers[1].norm2.alpha.fill_(0.9)
    state = model.state_dict()
    fresh = replace_norms(_encoder(), "dyt")
    fresh.load_state_dict(state)
    x = torch.randn(2, 5, 16)
    assert torch.equal(fresh(x), model(x))


def test_a_failed_replace_norms_changes_nothing_and_reports_nothing() -> None:
    model = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4), nn.LayerNorm(4))
    calls = []

    def alpha_init(name: str, m: nn.Module) -> float:
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("no alpha for this one")
        return 0.5

    report = ReplaceReport()
    with pytest.raises(RuntimeError, match="no alpha"):
        replace_norms(model, "dyt", alpha_init=alpha_init, report=report)
    assert type(model[0]) is nn.LayerNorm and type(model[2]) is nn.LayerNorm
    assert not report.replaced and not report.left
