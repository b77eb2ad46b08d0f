"""``qk_rms_norm`` and ``sandwich_rms_norm`` on every backend against the float64 reference.

The reference (:mod:`normkit.blocks.qk_sandwich`) is checked by ``gradcheck`` and
``gradgradcheck`` (forward mode too) and against HF's Gemma3RMSNorm; every backend's outputs and
gradients, with random weights and random upstream gradients, are held to the self-calibrating
bound of ``tests/kernel_bound.py`` (at most twice the error of the torch composition run in the
case's own precision, plus the table's floor). The Triton kernels run under
``TRITON_INTERPRET=1`` on the CPU, so the shapes are small.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from kernel_bound import assert_within_bound
from normkit import functional
from normkit.backends import get_backend
from normkit.blocks import qk_sandwich as blocks
from normkit.ops.triton import backend as triton_entry

f32, bf16, f16, f64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = triton_entry.is_available()  # (the entry imports no Triton)
BACKENDS = ["torch", "reference", *(["triton"] if HAS_TRITON else [])]
BLOCK_ENV_VAR = "NORMKIT_TRITON_BLOCK_N"

# torch's own ops warn on a mixed-dtype call of the low-precision baseline.
pytestmark = pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")


class Case(NamedTuple):
    """One call. ``shapes``: (q, k) or (hidden,); ``layout``: how the activations are laid out
    (``"contiguous"``; ``"transposed"``: (B, L, H, D) memory seen as (B, H, L, D), read in
    memory order; ``"padded"``: rows a stride apart, read in place; ``"scattered"``: both, so
    no row order fits and it is copied)."""

    op: str
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype = f32
    param_dtype: torch.dtype | None = None  # None: the activations' dtype
    weights: tuple[bool, bool] = (True, True)
    layout: str = "contiguous"
    block_n: int | None = None  # caps the Triton tile: small values take the chunked path
    offset: float = 0.0  # sandwich: weight_offset
    residual_dtype: torch.dtype | None = None  # sandwich: None is hidden's dtype
    eps: float | None = None

    def __str__(self) -> str:
        parts = [self.op.split("_")[0], "/".join("x".join(map(str, s)) for s in self.shapes),
                 str(self.dtype).removeprefix("torch."), self.layout]
        parts += [f"{k}={v}" for k, v in (("P", self.param_dtype), ("R", self.residual_dtype),
                                          ("block", self.block_n), ("offset", self.offset), ("eps", self.eps))
                  if v not in (None, 0.0)]
        parts += ["noW" + "".join(str(i) for i, w in enumerate(self.weights) if not w)] if not all(self.weights) else []
        return "-".join(str(p).replace("torch.", "") for p in parts)


QK, SW = "qk_rms_norm", "sandwich_rms_norm"
CASES = [
    Case(QK, ((1, 1, 1, 8), (1, 1, 1, 8))),  # batch 1, one head
    Case(QK, ((2, 3, 4, 16), (2, 3, 2, 16)), bf16, param_dtype=f32),  # grouped-query heads, mixed
    Case(QK, ((2, 4, 3, 13), (3, 2, 13)), f16, layout="transposed"),  # leading dims differ, prime D
    Case(QK, ((2, 2, 2, 37), (2, 2, 1, 37)), block_n=16),  # chunked rows, 3 tiles of 16 for D=37
    Case(QK, ((2, 3, 2, 24), (2, 3, 2, 24)), bf16, layout="padded", weights=(True, False), eps=1e-6),
    Case(QK, ((2, 3, 2, 12), (1, 3, 3, 12)), layout="scattered", weights=(False, True)),
    Case(QK, ((3, 7, 2, 8), (3, 7, 1, 8)), bf16, block_n=16),  # tiles of 2 rows, a ragged last one
    Case(SW, ((1, 1, 8),)),
    Case(SW, ((2, 5, 32),), bf16, param_dtype=f32, offset=1.0),  # Gemma: zero-centred weights
    Case(SW, ((2, 3, 48),), bf16, residual_dtype=f32, offset=1.0),  # fp32 residual stream
    Case(SW, ((2, 3, 41),), f16, block_n=16, offset=0.5),  # chunked: three passes, prime D
    Case(SW, ((2, 3, 20),), layout="padded", weights=(False, True)),
    Case(SW, ((2, 3, 2, 12),), bf16, layout="transposed", weights=(True, False), eps=1e-6),
    Case(SW, ((4, 7, 8),), f32, block_n=16),  # tiles of 2 rows
]


def _rand(shape: tuple[int, ...], dtype: torch.dtype, layout: str, gen: torch.Generator) -> torch.Tensor:
    pad = 5 if layout in ("padded", "scattered") else 0
    if layout in ("transposed", "scattered"):
        b, h, length, d = (1,) * (4 - len(shape)) + shape
        t = torch.randn(b, length, h, d + pad, generator=gen).to(DEVICE, dtype)[..., :d].transpose(1, 2)
        return t.reshape(shape)  # a view: (1, H, L, D) -> (H, L, D) keeps the strides
    return torch.randn(*shape[:-1], shape[-1] + pad, generator=gen).to(DEVICE, dtype)[..., : shape[-1]]


class Call(NamedTuple):
    args: tuple  # the op's positional arguments (tensors and None)
    kwargs: dict
    grads: tuple[torch.Tensor, ...]  # random upstream gradients, float64
    names: tuple[str, ...]  # of the results then of the differentiable arguments' gradients


def make_call(case: Case, seed: int = 0) -> Call:
    gen = torch.Generator().manual_seed(seed)
    pdt = case.param_dtype or case.dtype
    d = case.shapes[0][-1]
    w = [torch.randn(d, generator=gen).to(DEVICE, pdt) if on else None for on in case.weights]
    if case.op == QK:
        q, k = (_rand(s, case.dtype, case.layout, gen) for s in case.shapes)
        args, kwargs = (q, k, *w, case.eps), {}
        names = ("q", "k", "dq", "dk", "dq_weight", "dk_weight")
    else:
        hidden = _rand(case.shapes[0], case.dtype, case.layout, gen)
        residual = torch.randn(hidden.shape, generator=gen).to(DEVICE, case.residual_dtype or case.dtype)
        args, kwargs = (hidden, residual, *w, case.eps), {"weight_offset": case.offset}
        names = ("y", "residual_out", "dhidden", "dresidual", "dpost_weight", "dnext_weight")
    outs = args[:2]
    grads = tuple(torch.randn(o.shape, generator=gen, dtype=f64).to(DEVICE) for o in outs)
    return Call(args, kwargs, grads, names)


def run(call: Call, backend: str | None, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Outputs and gradients of ``call`` on ``backend``, its tensors cast to ``dtype`` if given."""
    tensors = [a if not isinstance(a, torch.Tensor) else
               (a.to(dtype) if dtype else a).detach().requires_grad_() for a in call.args]
    op = getattr(functional, QK if call.names[0] == "q" else SW)
    outs = op(*tensors, **call.kwargs, backend=backend)
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, call.grads, strict=True)])
    grads = [t.grad for t in tensors if isinstance(t, torch.Tensor)]
    present = [n for n, a in zip(call.names[2:], call.args[:4], strict=True) if a is not None]
    return dict(zip(call.names[:2], outs, strict=True)) | dict(zip(present, grads, strict=True))


@pytest.fixture
def block_n(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    case = request.getfixturevalue("case")
    if case.block_n is not None:
        monkeypatch.setenv(BLOCK_ENV_VAR, str(case.block_n))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_against_float64_reference(case: Case, backend: str, block_n: None) -> None:
    """Outputs and every gradient within twice the torch composition's own error (same dtype),
    each result in its argument's dtype."""
    call = make_call(case)
    got = run(call, backend)
    oracle = run(call, "reference", f64)
    baseline = run(call, "torch")
    assert_within_bound(got, oracle, baseline)


@st.composite
def _cases(draw: st.DrawFn) -> Case:
    """Any call: leading dims and head counts (size 1, primes), head dims (1, primes, a power of
    two), every dtype, layout, weight presence, tile cap and weight offset."""
    sizes = st.sampled_from([1, 2, 3, 5])
    lead, d = draw(st.lists(sizes, min_size=1, max_size=2)), draw(st.sampled_from([1, 2, 7, 16, 33]))
    op = draw(st.sampled_from([QK, SW]))
    if op == QK:
        shapes = ((*lead, draw(sizes), d), (*draw(st.lists(sizes, min_size=1, max_size=2)), draw(sizes), d))
    else:
        shapes = ((*lead, draw(sizes), d),)
    dtype = draw(st.sampled_from([f32, bf16, f16]))
    return Case(op, shapes, dtype, param_dtype=draw(st.sampled_from([None, f32])),
                weights=(draw(st.booleans()), draw(st.booleans())),
                layout=draw(st.sampled_from(["contiguous", "transposed", "padded", "scattered"])),
                block_n=draw(st.sampled_from([None, 4, 16])), offset=draw(st.sampled_from([0.0, 1.0])),
                residual_dtype=draw(st.sampled_from([None, f32])) if op == SW else None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_against_float64_reference(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hypothesis-drawn calls on every backend, held to the same bound (few under the interpreter)."""

    @settings(max_examples=6 if backend == "triton" else 25, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), phases=(Phase.explicit, Phase.generate))
    @given(case=_cases())
    def check(case: Case) -> None:
        if case.block_n is None:
            monkeypatch.delenv(BLOCK_ENV_VAR, raising=False)
        else:
            monkeypatch.setenv(BLOCK_ENV_VAR, str(case.block_n))
        call = make_call(case)
        assert_within_bound(run(call, backend), run(call, "reference", f64), run(call, "torch"))

    check()


def _gradcheck_inputs(op: str, weights: tuple[bool, bool]):
    gen = torch.Generator().manual_seed(1)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=f64).requires_grad_()  # noqa: E731
    w = [rand(6) if on else None for on in weights]
    if op == QK:
        return (rand(2, 3, 6), rand(1, 2, 6), *w), lambda *a: blocks.qk_rms_norm(*a, 1e-5)
    return (rand(2, 3, 6), rand(2, 3, 6), *w), lambda *a: blocks.sandwich_rms_norm(*a, 1e-5, 0.75)


@pytest.mark.parametrize("weights", [(True, True), (False, True)])
@pytest.mark.parametrize("op", [QK, SW])
def test_reference_gradcheck(op: str, weights: tuple[bool, bool]) -> None:
    """The hand-derived backward and jvp against finite differences, and the backward's own
    derivative (the backward is written in differentiable ops)."""
    inputs, fn = _gradcheck_inputs(op, weights)
    tensors = [t for t in inputs if t is not None]

    def f(*ts):
        it = iter(ts)
        return fn(*(next(it) if a is not None else None for a in inputs))

    assert torch.autograd.gradcheck(f, tensors, check_forward_ad=True, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(f, tensors)


def test_composition_is_gemma3_decoder_layer() -> None:
    """The torch composition is HF Gemma3's post-norm, residual add and pre-norm (and its q/k
    norms), bit for bit in bfloat16; the other backends within the bound of it."""
    gemma3 = pytest.importorskip("transformers.models.gemma3.modeling_gemma3")
    gen = torch.Generator().manual_seed(3)
    d = 24
    post, pre, qn = (gemma3.Gemma3RMSNorm(d, eps=1e-6) for _ in range(3))
    with torch.no_grad():
        for m in (post, pre, qn):
            m.weight.copy_(torch.randn(d, generator=gen) * 0.1)
    hidden, residual = (torch.randn(2, 5, d, generator=gen).to(bf16) for _ in range(2))
    residual_out = residual + post(hidden)
    expected = (pre(residual_out), residual_out)
    got = functional.sandwich_rms_norm(hidden, residual, post.weight.detach(), pre.weight.detach(), 1e-6,
                                       weight_offset=1.0, backend="torch")
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype and torch.equal(g, e)
    q, k = (torch.randn(2, 3, h, d, generator=gen).to(bf16) for h in (4, 2))
    one_plus = 1.0 + qn.weight.detach()
    q_out, k_out = functional.qk_rms_norm(q, k, one_plus, one_plus, 1e-6, backend="torch")
    assert torch.equal(q_out, qn(q)) and torch.equal(k_out, qn(k))


@pytest.mark.gpu_schedule
@pytest.mark.skipif(not HAS_TRITON, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("case", [c for c in CASES if c.block_n and c.shapes[0][-1] == 8], ids=str)
def test_triton_backward_is_deterministic(case: Case, block_n: None) -> None:
    """Several programs per tensor, weight-gradient partials summed in a fixed order: two runs
    give the same bits."""
    call = make_call(case, seed=5)
    first, second = run(call, "triton"), run(call, "triton")
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.skipif(not HAS_TRITON, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
def test_triton_layouts() -> None:
    """Outputs keep a dense input's strides (a transposed q read in memory order); a padded
    input gives packed rows; residual_out is in residual's dtype."""
    q = torch.randn(2, 5, 3, 8, device=DEVICE).transpose(1, 2)
    k = torch.randn(2, 5, 4, 10, device=DEVICE)[..., :8]
    q_out, k_out = functional.qk_rms_norm(q, k, None, None, backend="triton")
    assert q_out.stride() == q.stride() and k_out.is_contiguous()
    ref = functional.qk_rms_norm(q, k, None, None, backend="reference")
    torch.testing.assert_close((q_out, k_out), ref)
    hidden = torch.randn(3, 8, device=DEVICE, dtype=bf16)
    residual = torch.randn(8, 3, device=DEVICE).t()  # another layout: brought into hidden's rows
    y, residual_out = functional.sandwich_rms_norm(hidden, residual, None, None, backend="triton")
    assert y.dtype == bf16 and residual_out.dtype == f32
    torch.testing.assert_close(residual_out, functional.sandwich_rms_norm(hidden, residual, None, None,
                                                                          backend="reference")[1])


@pytest.mark.skipif(not HAS_TRITON, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
def test_triton_refusals() -> None:
    """float64 is declined with the reason; forward-mode AD is an error, not silent zeros; a
    double backward runs the composition (tests/test_triton_double_backward.py)."""
    impl = get_backend("triton").ops[SW]
    x = torch.randn(2, 8, dtype=f64, device=DEVICE)
    assert "float64" in impl.unsupported(x, x, None, None, None, 0.0)
    with pytest.raises(RuntimeError, match="forward-mode AD"):
        torch.func.jvp(lambda h: functional.sandwich_rms_norm(h, h, None, None, backend="triton")[0],
                       (x.float(),), (torch.ones(2, 8, device=DEVICE),))
    q = torch.randn(2, 8, device=DEVICE, requires_grad=True)
    (q_out, _) = functional.qk_rms_norm(q, q.detach(), None, None, backend="triton")
    (dq,) = torch.autograd.grad(q_out, q, torch.randn_like(q_out), create_graph=True)
    dq.pow(2).sum().backward()
    assert q.grad.abs().sum() > 0


@pytest.mark.skipif(not HAS_TRITON, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
def test_triton_vmap_per_sample_gradients() -> None:
    """torch.func: per-sample weight gradients through the kernels equal the reference's."""
    gen = torch.Generator().manual_seed(7)
    hidden, residual = (torch.randn(3, 2, 8, generator=gen).to(DEVICE) for _ in range(2))
    w = torch.randn(8, generator=gen).to(DEVICE)

    def loss(backend: str):
        def f(wt, h, r):
            y, r_out = functional.sandwich_rms_norm(h, r, wt, wt, backend=backend, weight_offset=0.5)
            return (y * h).sum() + (r_out * r).sum()

        return torch.func.vmap(torch.func.grad(f), in_dims=(None, 0, 0))(w, hidden, residual)

    torch.testing.assert_close(loss("triton"), loss("reference"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", [QK, SW])
def test_compile_fullgraph(op: str, backend: str) -> None:
    """No graph break, the same outputs and gradients as eager."""
    case = Case(op, ((2, 3, 2, 8), (2, 3, 1, 8)) if op == QK else ((2, 3, 8),), offset=1.0)
    call = make_call(case)
    fn = getattr(functional, op)

    def model(*args):
        return fn(*args, **call.kwargs, backend=backend)

    results = []
    for f in (model, torch.compile(model, fullgraph=True, backend="aot_eager")):
        tensors = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a for a in call.args]
        outs = f(*tensors)
        torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, call.grads, strict=True)])
        results.append([*outs, *(t.grad for t in tensors if isinstance(t, torch.Tensor))])
    torch._dynamo.reset()
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)


def test_interpreter_is_set_for_cpu_triton() -> None:
    """The Triton cases above ran (not skipped) wherever this suite is meant to run them."""
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        assert HAS_TRITON


@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_nan_stays_in_its_row_and_huge_rows_stay_finite(backend: str) -> None:
    """A NaN makes its own row (and the weight gradient) NaN, no other; a row at 1e20 (squares
    beyond float32) normalizes as the float64 reference does. (The torch composition, like HF's,
    overflows there: not its contract.)"""
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(4, 2, 8, generator=gen).to(DEVICE)
    q[1, 0, 3] = float("nan")
    q[2, 1] *= 1e20
    k = torch.randn(3, 1, 8, generator=gen).to(DEVICE)
    w = torch.randn(8, generator=gen).to(DEVICE)
    qq, ww = q.clone().requires_grad_(), w.clone().requires_grad_()
    q_out, _ = functional.qk_rms_norm(qq, k, ww, None, backend=backend)
    q_out.backward(torch.randn(q_out.shape, generator=gen).to(DEVICE))
    nan_rows = q_out.isnan().any(-1)
    assert nan_rows.tolist() == [[False, False], [True, False], [False, False], [False, False]]
    assert qq.grad.isnan().any(-1).tolist() == nan_rows.tolist() and ww.grad.isnan().all()
    exact = functional.qk_rms_norm(q.double(), k.double(), w.double(), None, backend="reference")[0]
    torch.testing.assert_close(q_out[2], exact[2].float())
    hidden = torch.randn(3, 8, generator=gen).to(DEVICE) * 1e20
    residual = torch.randn(3, 8, generator=gen).to(DEVICE)
    got = functional.sandwich_rms_norm(hidden, residual, w, w, backend=backend, weight_offset=1.0)
    exact = functional.sandwich_rms_norm(hidden.double(), residual.double(), w.double(), w.double(),
                                         backend="reference", weight_offset=1.0)
    torch.testing.assert_close(got, tuple(t.float() for t in exact))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_k(backend: str) -> None:
    """No key rows (an empty cache): q is normalized, k's output and gradients are empty/zero."""
    gen = torch.Generator().manual_seed(12)
    q = torch.randn(2, 3, 8, generator=gen).to(DEVICE).requires_grad_()
    k = torch.randn(0, 1, 8).to(DEVICE).requires_grad_()
    w = torch.randn(8, generator=gen).to(DEVICE).requires_grad_()
    q_out, k_out = functional.qk_rms_norm(q, k, w, w, backend=backend)
    assert k_out.shape == k.shape
    torch.autograd.backward([q_out, k_out], [torch.ones_like(q_out), torch.ones_like(k_out)])
    expected = functional.rms_norm(q.detach(), (8,), w.detach(), backend="reference")
    torch.testing.assert_close(q_out, expected)
    assert w.grad is not None and w.grad.isfinite().all()


def test_composition_rounds_y_once_under_a_lower_precision_residual_stream() -> None:
    """float32 hidden with a bf16 residual stream: y is hidden's dtype, rounded once (the torch
    composition is the kernels' oracle; it once rounded y to bf16 first)."""
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, 64, generator=gen)
    residual = torch.randn(3, 64, generator=gen).to(torch.bfloat16)
    w1, w2 = (torch.randn(64, generator=gen) * 0.3 + 1 for _ in range(2))
    y_torch, r_torch = functional.sandwich_rms_norm(hidden, residual, w1, w2, backend="torch")
    y_ref, r_ref = functional.sandwich_rms_norm(hidden, residual, w1, w2, backend="reference")
    assert y_torch.dtype == torch.float32 and r_torch.dtype == torch.bfloat16
    torch.testing.assert_close(r_torch, r_ref, rtol=0, atol=0)
    torch.testing.assert_close(y_torch, y_ref, rtol=1e-5, atol=1e-5)
