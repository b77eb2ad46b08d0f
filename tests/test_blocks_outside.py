"""Outside attack on the norms of today's blocks (issue 13), written from the public API only.

Oracles are compositions written here from the papers' formulas (DiT adaLN, Mamba2 gated RMSNorm
with groups, Qwen3 QK-norm with GQA, Gemma sandwich with weight offset, DyT, Derf), run in
float64 under torch.autograd. Each backend's error against them may be at most about twice the
error of the same composition run in the input's dtype, plus a small atol (the flash-attn bound).
A test that found a defect is an ``xfail(strict=True)`` whose reason describes it.
"""

from __future__ import annotations

import copy
import functools
import io
import pickle
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as TF
from torch import Tensor

import normkit
import normkit.functional as F
from normkit.backends import BackendError

BACKENDS = ["torch", "reference", "triton", "numba"]
NO_NUMBA: set[str] = set()  # ops the CPU kernel backend lacks (DyT/Derf have numba kernels now)
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}


@functools.cache
def _available(backend: str) -> bool:
    try:
        F.gated_rms_norm(torch.randn(2, 4), None, backend=backend)
    except (BackendError, ImportError, RuntimeError):
        return False
    return True


def _need(backend: str, op: str | None = None) -> None:
    if not _available(backend):
        pytest.skip(f"backend {backend!r} is not available here (triton needs TRITON_INTERPRET=1 on the CPU)")
    if backend == "numba" and op in NO_NUMBA:
        pytest.skip(f"numba has no {op} kernel")


# ----------------------------------------------------------------------------- oracles (float64)


def _ln(x: Tensor, eps: float) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def _rms(x: Tensor, eps: float) -> Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def _eps(x: Tensor, eps: float | None) -> float:
    return torch.finfo(x.dtype).eps if eps is None else eps


def o_mod_ln(x, shift, scale, weight=None, bias=None, eps=1e-6):
    y = _ln(x, eps)
    y = y * weight if weight is not None else y
    y = y + bias if bias is not None else y
    return y * (1 + scale) + shift


def o_mod_rms(x, shift, scale, weight=None, eps=None):
    y = _rms(x, _eps(x, eps))
    y = y * weight if weight is not None else y
    return y * (1 + scale) + shift


def o_gated(x, gate, weight=None, eps=1e-6, group_size=None, norm_before_gate=False):
    d = x.shape[-1]
    g = group_size or d
    if gate is not None and not norm_before_gate:
        x = x * TF.silu(gate)
    y = _rms(x.reshape(*x.shape[:-1], d // g, g), eps).reshape(x.shape)
    y = y * weight if weight is not None else y
    if gate is not None and norm_before_gate:
        y = y * TF.silu(gate)
    return y


def o_qk(q, k, q_weight, k_weight, eps=None):
    yq, yk = _rms(q, _eps(q, eps)), _rms(k, _eps(k, eps))
    return (yq * q_weight if q_weight is not None else yq), (yk * k_weight if k_weight is not None else yk)


def o_sandwich(hidden, residual, post_weight, next_weight, eps=None, weight_offset=0.0):
    e = _eps(hidden, eps)
    # a missing weight is ones (no offset) or the offset alone (Gemma: weight + 1 with weight 0)
    pw = (post_weight if post_weight is not None else 0.0 if weight_offset else 1.0) + weight_offset
    nw = (next_weight if next_weight is not None else 0.0 if weight_offset else 1.0) + weight_offset
    res = residual + _rms(hidden, e) * pw
    return _rms(res, e) * nw, res


def o_dyt(x, alpha, weight=None, bias=None):
    y = torch.tanh(alpha * x)
    y = y * weight if weight is not None else y
    return y + bias if bias is not None else y


def o_derf(x, alpha, shift, weight=None, bias=None):
    y = torch.erf(alpha * x + shift)
    y = y * weight if weight is not None else y
    return y + bias if bias is not None else y


# ----------------------------------------------------------------------------- the table of cases


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _r(*shape: int, seed: int, scale: float = 1.0, offset: float = 0.0) -> Tensor:
    return torch.randn(*shape, generator=_g(seed), dtype=torch.float64) * scale + offset


N, L, D = 3, 5, 40  # D not a power of two


def _cases() -> dict[str, tuple[Callable, Callable, list, dict]]:
    """name -> (normkit op, float64 oracle, float64 args, kwargs)."""
    x = _r(N, L, D, seed=0, scale=3.0, offset=1.0)
    return {
        "mln-N1D": (F.modulated_layer_norm, o_mod_ln,
                    [x, _r(N, 1, D, seed=1), _r(N, 1, D, seed=2), _r(D, seed=3), _r(D, seed=4)], {}),
        "mln-NLD-noaffine": (F.modulated_layer_norm, o_mod_ln, [x, _r(N, L, D, seed=1), _r(N, L, D, seed=2)], {}),
        "mln-11D": (F.modulated_layer_norm, o_mod_ln, [x, _r(1, 1, D, seed=1), _r(1, 1, D, seed=2)], {"eps": 1e-5}),
        "mln-D": (F.modulated_layer_norm, o_mod_ln, [x, _r(D, seed=1), _r(D, seed=2), _r(D, seed=3)], {}),
        "mrms-N1D": (F.modulated_rms_norm, o_mod_rms,
                     [x, _r(N, 1, D, seed=1), _r(N, 1, D, seed=2), _r(D, seed=3)], {"eps": 1e-6}),
        "mrms-NLD": (F.modulated_rms_norm, o_mod_rms, [x, _r(N, L, D, seed=1), _r(N, L, D, seed=2)], {"eps": 1e-6}),
        "gated-g8": (F.gated_rms_norm, o_gated, [x, _r(N, L, D, seed=5), _r(D, seed=3)], {"group_size": 8}),
        "gated-g8-nbg": (F.gated_rms_norm, o_gated, [x, _r(N, L, D, seed=5), _r(D, seed=3)],
                         {"group_size": 8, "norm_before_gate": True}),
        "gated-whole": (F.gated_rms_norm, o_gated, [x, _r(N, L, D, seed=5), _r(D, seed=3)], {}),
        "gated-nogate": (F.gated_rms_norm, o_gated, [x, None, _r(D, seed=3)], {"group_size": 10}),
        "qk-gqa": (F.qk_rms_norm, o_qk, [_r(2, 3, 4, D, seed=0), _r(2, 3, 2, D, seed=1), _r(D, seed=3), _r(D, seed=4)],
                   {"eps": 1e-6}),
        "qk-lead-differs": (F.qk_rms_norm, o_qk, [_r(2, 3, 4, D, seed=0), _r(5, 1, D, seed=1), _r(D, seed=3), None],
                            {"eps": 1e-6}),
        "sandwich-gemma": (F.sandwich_rms_norm, o_sandwich,
                           [x, _r(N, L, D, seed=6, scale=4.0), _r(D, seed=3, scale=0.1), _r(D, seed=4, scale=0.1)],
                           {"eps": 1e-6, "weight_offset": 1.0}),
        "sandwich-plain": (F.sandwich_rms_norm, o_sandwich, [x, _r(N, L, D, seed=6), _r(D, seed=3), _r(D, seed=4)],
                           {"eps": 1e-6}),
        "dyt": (F.dyt, o_dyt, [x, torch.tensor([0.7], dtype=torch.float64), _r(D, seed=3), _r(D, seed=4)], {}),
        "derf": (F.derf, o_derf, [x, torch.tensor([0.7], dtype=torch.float64), torch.tensor([0.2], dtype=torch.float64),
                                  _r(D, seed=3), _r(D, seed=4)], {}),
    }


CASES = _cases()


def _op_name(case: str) -> str:
    return "dyt" if case == "dyt" else "derf" if case == "derf" else case


def _tuple(out) -> tuple[Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _run(fn: Callable, args: list, kw: dict, **extra) -> tuple[list, tuple[Tensor, ...]]:
    leaves = [None if a is None else a.detach().clone().requires_grad_() for a in args]
    return leaves, _tuple(fn(*leaves, **kw, **extra))


def _errors(fn, oracle, args64, kw, dtype, backend=None, upstream_seed=99):
    """(forward errors, gradient errors) of fn in ``dtype`` against the float64 oracle."""
    args = [None if a is None else a.to(dtype) for a in args64]
    ref_leaves, ref = _run(oracle, [None if a is None else a.double() for a in args], kw)
    gys = [torch.randn(r.shape, generator=_g(upstream_seed + i), dtype=torch.float64) for i, r in enumerate(ref)]
    torch.autograd.backward(list(ref), gys)
    extra = {} if backend is None else {"backend": backend}
    leaves, out = _run(fn, args, kw, **extra)
    torch.autograd.backward(list(out), [g.to(o.dtype) for g, o in zip(gys, out)])
    fwd = [(o.double() - r).abs().max().item() for o, r in zip(out, ref)]
    grad = [None if a is None else (a.grad.double() - b.grad).abs().max().item() for a, b in zip(leaves, ref_leaves)]
    return fwd, grad, out


def _assert_bound(case: str, backend: str, dtype: torch.dtype) -> None:
    fn, oracle, args64, kw = CASES[case]
    base_f, base_g, _ = _errors(oracle, oracle, args64, kw, dtype)
    fwd, grad, out = _errors(fn, oracle, args64, kw, dtype, backend)
    for o in out:
        assert o.dtype == dtype, f"output dtype {o.dtype}, expected the input's {dtype}"
    atol = ATOL[dtype]
    for i, (e, b) in enumerate(zip(fwd, base_f)):
        assert e <= 2 * b + atol, f"output {i}: error {e:.3e} vs composition's {b:.3e} ({case}, {backend}, {dtype})"
    for i, (e, b) in enumerate(zip(grad, base_g)):
        if e is not None:
            assert e <= 2 * b + atol, f"grad of arg {i}: error {e:.3e} vs composition's {b:.3e} ({case}, {backend})"


# ----------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_float32_every_input_gradient_within_bound(case: str, backend: str) -> None:
    """Expectation: forward and the gradient of every input (shift/scale reduced over the broadcast
    axes, weights, gates, residual, alpha/shift scalars) match a float64 composition of the paper's
    formula within 2x the error of that composition run in float32."""
    _need(backend, _op_name(case))
    _assert_bound(case, backend, torch.float32)


LOW_CASES = ["mln-N1D", "mrms-NLD", "gated-g8", "gated-g8-nbg", "qk-gqa", "sandwich-gemma", "dyt", "derf"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LOW_CASES)
def test_low_precision_within_bound(case: str, backend: str, dtype: torch.dtype) -> None:
    """Expectation: in bf16/fp16 every backend is within 2x the composition's own low-precision
    error (numba declines fp16 with a BackendError: no fp16 arithmetic on the CPU)."""
    _need(backend, _op_name(case))
    if backend == "numba" and dtype == torch.float16:
        with pytest.raises(BackendError, match="float16"):
            _assert_bound(case, backend, dtype)
        return
    _assert_bound(case, backend, dtype)


@pytest.mark.parametrize("backend", ["torch", "reference", "numba"])
@pytest.mark.parametrize("case", ["mln-N1D", "mrms-N1D", "gated-g8-nbg", "qk-gqa", "sandwich-gemma", "derf"])
def test_float64_is_float64_exact(case: str, backend: str) -> None:
    """Expectation: float64 input is computed in float64 (errors at the 1e-14 level)."""
    _need(backend, _op_name(case))
    fn, oracle, args64, kw = CASES[case]
    fwd, grad, out = _errors(fn, oracle, args64, kw, torch.float64, backend)
    assert all(o.dtype == torch.float64 for o in out)
    assert max(fwd) < 1e-12 and max(g for g in grad if g is not None) < 1e-11, (fwd, grad)


def test_triton_declines_float64_clearly() -> None:
    """Expectation: the float32-accumulating kernels refuse float64 with a message naming the fix."""
    _need("triton")
    x = torch.randn(2, 8, dtype=torch.float64)
    with pytest.raises(BackendError, match="float64.*backend='torch' or 'reference'"):
        F.gated_rms_norm(x, x, backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_input_with_fp32_modulation_and_weights(backend: str) -> None:
    """Expectation: bf16 activations with fp32 shift/scale/weights (the usual AMP layout) give a
    bf16 output that agrees with the torch composition backend to bf16 rounding, fp32 grads for
    the fp32 inputs, bf16 grad for the input."""
    _need(backend)
    x = _r(N, L, D, seed=0).bfloat16()
    fp = [_r(N, 1, D, seed=1).float(), _r(N, 1, D, seed=2).float(), _r(D, seed=3).float(), _r(D, seed=4).float()]
    outs, grads = [], []
    for bk in ("torch", backend):
        leaves, (y,) = _run(F.modulated_layer_norm, [x, *fp], {}, backend=bk)
        y.backward(torch.randn(y.shape, generator=_g(7)).bfloat16())
        outs.append(y)
        grads.append([t.grad for t in leaves])
    assert outs[1].dtype == torch.bfloat16
    assert [g.dtype for g in grads[1]] == [torch.bfloat16] + [torch.float32] * 4
    torch.testing.assert_close(outs[1].float(), outs[0].float(), atol=2e-2, rtol=2e-2)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=2e-2)


# ----------------------------------------------------------------------------- layouts


def _T(x: Tensor) -> Tensor:
    return x.transpose(1, 2)


def _layout_cases() -> dict[str, tuple[Callable, Callable, list, dict]]:
    """name -> (op, oracle, [(base, view of the base the op is given)], kwargs); gradients are
    compared on the bases, so the op sees the attack's strides and autograd maps them back."""
    d = 8

    def t(*s, seed):
        return torch.randn(*s, generator=_g(seed))

    same = None
    return {
        "mln-transposed-x-expanded-shift": (
            F.modulated_layer_norm, o_mod_ln,
            [(t(2, d, 3, seed=0), _T), (t(2, 1, d, seed=1), lambda s: s.expand(2, 3, d)), (t(2, 3, d, seed=2), same),
             (t(2 * d, seed=3), lambda w: w[::2]), (t(2 * d, seed=4), lambda b: b[1::2])], {}),
        "mrms-sliced-x": (F.modulated_rms_norm, o_mod_rms,
                          [(t(2, 3, 2 * d, seed=0), lambda x: x[..., ::2]), (t(2, 1, d, seed=1), same),
                           (t(2, 1, d, seed=2), same)], {"eps": 1e-6}),
        "gated-channels-last-4d": (
            F.gated_rms_norm, o_gated,
            [(t(2, 3, 3, d, seed=0), lambda x: x.permute(0, 3, 1, 2)), (t(2, d, 3, 3, seed=1), same),
             (t(3, seed=2), same)], {}),
        "gated-transposed-gate": (F.gated_rms_norm, o_gated,
                                  [(t(2, 3, d, seed=0), same), (t(2, d, 3, seed=1), _T), (t(d, seed=2), same)],
                                  {"group_size": 4}),
        "qk-bhld-transposed": (F.qk_rms_norm, o_qk,
                               [(t(2, 4, 5, d, seed=0), _T), (t(2, 2, 5, d, seed=1), _T), (t(d, seed=2), same),
                                (t(d, seed=3), same)], {"eps": 1e-6}),
        "qk-fused-qkv-slices": (F.qk_rms_norm, o_qk,
                                [(t(2, 5, 6, d, seed=0), lambda x: x[:, :, :4]),
                                 (t(2, 5, 6, d, seed=1), lambda x: x[:, :, 4:]), (t(d, seed=2), same), None],
                                {"eps": 1e-6}),
        "sandwich-residual-sliced": (F.sandwich_rms_norm, o_sandwich,
                                     [(t(2, 3, d, seed=0), same), (t(2, 3, 2 * d, seed=1), lambda r: r[..., d:]),
                                      (t(d, seed=2), same), (t(d, seed=3), same)], {"eps": 1e-6}),
        "sandwich-hidden-transposed": (F.sandwich_rms_norm, o_sandwich,
                                       [(t(2, d, 3, seed=0), _T), (t(2, 3, d, seed=1), same), (t(d, seed=2), same),
                                        (t(d, seed=3), same)], {"eps": 1e-6}),
        "dyt-transposed": (F.dyt, o_dyt,
                           [(t(2, d, 3, seed=0), _T), (torch.tensor([0.6]), same), (t(d, seed=2), same),
                            (t(d, seed=3), same)], {}),
        "derf-sliced": (F.derf, o_derf,
                        [(t(2, 3, 2 * d, seed=0), lambda x: x[..., 1::2]), (torch.tensor([0.6]), same),
                         (torch.tensor([0.1]), same), (t(d, seed=2), same), None], {}),
    }


LAYOUTS = _layout_cases()



def _views(pairs: list, dtype: torch.dtype) -> tuple[list, list]:
    leaves, views = [], []
    for pair in pairs:
        if pair is None:
            leaves.append(None)
            views.append(None)
            continue
        base, view = pair
        leaf = base.detach().to(dtype).requires_grad_()
        leaves.append(leaf)
        views.append(leaf if view is None else view(leaf))
    return leaves, views


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(LAYOUTS))
def test_non_contiguous_and_expanded_inputs(case: str, backend: str, request) -> None:
    """Expectation: transposed, sliced, expanded (stride-0) and channels_last inputs give the same
    forward and gradients as contiguous ones (float32 vs the float64 oracle)."""
    _need(backend, case.split("-")[0])
    fn, oracle, pairs, kw = LAYOUTS[case]
    leaves, views = _views(pairs, torch.float32)
    leaves64, views64 = _views(pairs, torch.float64)
    assert any(v is not None and not v.is_contiguous() for v in views)
    out = _tuple(fn(*views, **kw, backend=backend))
    ref = _tuple(oracle(*views64, **kw))
    gys = [torch.randn(r.shape, generator=_g(11 + i)) for i, r in enumerate(ref)]
    torch.autograd.backward(list(out), gys)
    torch.autograd.backward(list(ref), [g.double() for g in gys])
    for o, r in zip(out, ref):
        torch.testing.assert_close(o.double(), r.detach(), atol=2e-5, rtol=1e-5)
    for a, b in zip(leaves, leaves64):
        if a is not None:
            torch.testing.assert_close(a.grad.double(), b.grad, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["expanded", "transposed", "sum"])
def test_non_contiguous_upstream_gradients(mode: str, backend: str) -> None:
    """Expectation: backward is right for stride-0 (``y.sum().backward()``) and transposed grad_outputs."""
    _need(backend)
    for case in ["mln-N1D", "mrms-N1D", "gated-g8", "qk-gqa", "sandwich-plain", "dyt", "derf"]:
        if backend == "numba" and case in NO_NUMBA:
            continue
        fn, oracle, args64, kw = CASES[case]
        args = [None if a is None else a.float() for a in args64]
        leaves, out = _run(fn, args, kw, backend=backend)
        rl, ref = _run(oracle, args64, kw)
        if mode == "sum":
            sum(o.sum() for o in out).backward()
            sum(r.sum() for r in ref).backward()
        else:
            gys = []
            for i, r in enumerate(ref):
                shape = r.shape
                if mode == "expanded":
                    gys.append(torch.randn(shape[-1], generator=_g(i)).expand(shape))
                else:
                    gys.append(torch.randn(*reversed(shape), generator=_g(i)).permute(*reversed(range(len(shape)))))
            torch.autograd.backward(list(out), gys)
            torch.autograd.backward(list(ref), [g.double() for g in gys])
        for a, b in zip(leaves, rl):
            if a is not None:
                torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-4, rtol=1e-5, msg=f"{case} {mode}")


def test_numba_declines_pointwise_ops_clearly() -> None:
    """Expectation: a call the CPU kernel backend does not take (float16) fails loudly, naming the op."""
    _need("numba")
    with pytest.raises(BackendError, match="numba.*dyt"):
        F.dyt(torch.randn(2, 4, dtype=torch.float16), torch.ones(1), backend="numba")
    with pytest.raises(BackendError, match="numba.*derf"):
        F.derf(torch.randn(2, 4, dtype=torch.float16), torch.ones(1), torch.zeros(1), backend="numba")


# ----------------------------------------------------------------------------- transforms


_X = torch.randn(2, 3, 8, generator=_g(0))
_W = torch.randn(8, generator=_g(1))
_W2 = torch.randn(8, generator=_g(2))
_G = torch.randn(2, 3, 8, generator=_g(3))
_SH = torch.randn(2, 1, 8, generator=_g(4))
_SC = torch.randn(2, 1, 8, generator=_g(5))
OPS_OF_X: dict[str, Callable[[Tensor, str], Tensor]] = {
    "mln": lambda x, bk: F.modulated_layer_norm(x, _SH, _SC, _W, _W2, backend=bk),
    "mrms": lambda x, bk: F.modulated_rms_norm(x, _SH, _SC, _W, backend=bk),
    "gated": lambda x, bk: F.gated_rms_norm(x, _G, _W, group_size=4, backend=bk),
    "qk": lambda x, bk: F.qk_rms_norm(x, _G, _W, _W2, backend=bk)[0],
    "sandwich": lambda x, bk: F.sandwich_rms_norm(x, _G, _W, _W2, weight_offset=1.0, backend=bk)[0],
    "dyt": lambda x, bk: F.dyt(x, torch.tensor([0.7]), _W, _W2, backend=bk),
    "derf": lambda x, bk: F.derf(x, torch.tensor([0.7]), torch.tensor([0.1]), _W, _W2, backend=bk),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(OPS_OF_X))
def test_torch_func_grad_vmap_jacrev(op: str, backend: str) -> None:
    """Expectation: torch.func.grad, vjp, jacrev and vmap work on every backend and agree with the
    torch composition backend under plain autograd."""
    _need(backend, op)
    fn = OPS_OF_X[op]
    gy = torch.randn(fn(_X, "torch").shape, generator=_g(9))
    xr = _X.clone().requires_grad_()
    (fn(xr, "torch") * gy).sum().backward()
    g = torch.func.grad(lambda x: (fn(x, backend) * gy).sum())(_X)
    torch.testing.assert_close(g, xr.grad, atol=1e-5, rtol=1e-5)
    vjp = torch.func.vjp(lambda x: fn(x, backend), _X)[1](gy)[0]
    torch.testing.assert_close(vjp, xr.grad, atol=1e-5, rtol=1e-5)
    vx = torch.randn(3, *_X.shape, generator=_g(10))
    torch.testing.assert_close(torch.func.vmap(lambda x: fn(x, backend))(vx),
                               torch.stack([fn(v, "torch") for v in vx]), atol=1e-5, rtol=1e-5)
    row = _X[0, 0]

    def one_row(b):
        return lambda r: fn(torch.cat([r[None, None].expand(2, 1, 8), _X[:, 1:]], 1), b)[0, 0]

    torch.testing.assert_close(torch.func.jacrev(one_row(backend))(row), torch.func.jacrev(one_row("torch"))(row),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(OPS_OF_X))
def test_torch_func_jvp(op: str, backend: str) -> None:
    """Expectation: forward-mode AD works (torch, reference) or fails with a clear message that
    names forward-mode AD (the fused kernel backends have no forward-mode formula)."""
    _need(backend, op)
    fn = OPS_OF_X[op]
    t = torch.randn(_X.shape, generator=_g(12))
    ref = torch.func.jvp(lambda x: fn(x, "torch"), (_X,), (t,))[1]
    if backend in ("triton", "numba"):
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            torch.func.jvp(lambda x: fn(x, backend), (_X,), (t,))
        return
    torch.testing.assert_close(torch.func.jvp(lambda x: fn(x, backend), (_X,), (t,))[1], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(OPS_OF_X))
def test_compile_fullgraph_forward_and_backward(op: str, backend: str) -> None:
    """Expectation: torch.compile(fullgraph=True) traces the op with no graph break, forward and
    backward equal to eager (aot_eager: the autograd graph is traced too)."""
    _need(backend, op)
    fn = OPS_OF_X[op]
    # distinct tensors in every slot here; tied tensors: test_compile_reference_with_one_tensor_in_two_slots
    w, b = _W.clone().requires_grad_(), _W2.clone().requires_grad_()

    def call(x, bk):
        if op == "mln":
            return F.modulated_layer_norm(x, _SH, _SC, w, b, backend=bk)
        return fn(x, bk)

    gy = torch.randn(call(_X, "torch").shape, generator=_g(13))
    xe = _X.clone().requires_grad_()
    ye = call(xe, backend)
    (ye * gy).sum().backward()
    torch._dynamo.reset()
    xc = _X.clone().requires_grad_()
    yc = torch.compile(lambda x: call(x, backend), fullgraph=True, backend="aot_eager")(xc)
    (yc * gy).sum().backward()
    torch.testing.assert_close(yc, ye, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(xc.grad, xe.grad, atol=1e-6, rtol=1e-6)


TIED = {
    "sandwich-tied-weights": lambda x, w: F.sandwich_rms_norm(x, _G, w, w, backend="reference")[0],
    "mln-shift-is-scale": lambda x, w: F.modulated_layer_norm(x, w, w, backend="reference"),
    "gated-input-is-gate": lambda x, w: F.gated_rms_norm(x, x, w, backend="reference"),
    "dyt-weight-is-bias": lambda x, w: F.dyt(x, torch.tensor([0.5]), w, w, backend="reference"),
    "qk-q-is-k": lambda x, w: F.qk_rms_norm(x, x, w, w, backend="reference")[0],
}


@pytest.mark.parametrize("case", list(TIED))
def test_compile_reference_with_one_tensor_in_two_slots(case: str, request) -> None:
    """Expectation: passing one tensor in two argument slots (tied post/next weights, shift is
    scale, a zero-initialised modulation reused, x as its own gate) compiles with fullgraph=True and
    gives eager's gradients, as the torch and numba backends do."""
    fn = TIED[case]
    w = _W.clone().requires_grad_()
    xe = _X.clone().requires_grad_()
    fn(xe, w).sum().backward()
    ge = w.grad.clone()
    w.grad = None
    torch._dynamo.reset()
    xc = _X.clone().requires_grad_()
    torch.compile(fn, fullgraph=True, backend="aot_eager")(xc, w).sum().backward()
    torch.testing.assert_close(w.grad, ge, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(xc.grad, xe.grad, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- determinism


def _all_results(backend: str) -> list[Tensor]:
    d = 40
    x = torch.randn(6, 7, d, generator=_g(0)).requires_grad_()
    sh = torch.randn(6, 1, d, generator=_g(1)).requires_grad_()
    sc = torch.randn(6, 1, d, generator=_g(2)).requires_grad_()
    w = torch.randn(d, generator=_g(3)).requires_grad_()
    b = torch.randn(d, generator=_g(4)).requires_grad_()
    gy = torch.randn(6, 7, d, generator=_g(5))
    F.modulated_layer_norm(x, sh, sc, w, b, backend=backend).backward(gy)
    g = torch.randn(6, 7, d, generator=_g(6)).requires_grad_()
    wg = torch.randn(d, generator=_g(7)).requires_grad_()
    xg = x.detach().clone().requires_grad_()
    yg = F.gated_rms_norm(xg, g, wg, group_size=8, backend=backend)
    yg.backward(gy)
    h, r = x.detach().clone().requires_grad_(), g.detach().clone().requires_grad_()
    pw, nw = w.detach().clone().requires_grad_(), wg.detach().clone().requires_grad_()
    y, res = F.sandwich_rms_norm(h, r, pw, nw, weight_offset=1.0, backend=backend)
    torch.autograd.backward([y, res], [gy, gy.flip(0)])
    q = x.detach().reshape(6, 7, 4, 10).clone().requires_grad_()
    qw = torch.randn(10, generator=_g(8)).requires_grad_()
    qo, _ = F.qk_rms_norm(q, q.detach()[:, :, :2].clone(), qw, None, backend=backend)
    qo.backward(gy.reshape(qo.shape))
    return [x.grad, sh.grad, sc.grad, w.grad, b.grad, yg, xg.grad, g.grad, wg.grad, y, res, h.grad, r.grad, pw.grad,
            nw.grad, qo, q.grad, qw.grad]


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_bitwise_deterministic_at_any_thread_count(backend: str) -> None:
    """Expectation: outputs and every gradient (including the parameter gradients reduced over
    rows) are bitwise equal run twice and at torch.set_num_threads(1), 2 and 3."""
    _need(backend)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        first = _all_results(backend)
        runs = [_all_results(backend)]
        for n in (2, 3):
            torch.set_num_threads(n)
            runs.append(_all_results(backend))
    finally:
        torch.set_num_threads(before)
    for run in runs:
        for i, (a, b) in enumerate(zip(first, run)):
            assert torch.equal(a, b), f"result {i} differs between runs/thread counts"


@pytest.mark.parametrize("backend", ["numba", "triton"])
def test_batch_invariant_rows(backend: str) -> None:
    """Expectation: a row's result does not depend on the batch it is computed in."""
    _need(backend)
    d = 40
    x, g = torch.randn(33, d, generator=_g(0)), torch.randn(33, d, generator=_g(1))
    sh, sc = torch.randn(33, d, generator=_g(2)), torch.randn(33, d, generator=_g(3))
    assert torch.equal(F.modulated_layer_norm(x, sh, sc, backend=backend)[5:7],
                       F.modulated_layer_norm(x[5:7], sh[5:7], sc[5:7], backend=backend))
    assert torch.equal(F.gated_rms_norm(x, g, group_size=8, backend=backend)[5:7],
                       F.gated_rms_norm(x[5:7], g[5:7], group_size=8, backend=backend))
    assert torch.equal(F.sandwich_rms_norm(x, g, None, None, backend=backend)[0][5:9],
                       F.sandwich_rms_norm(x[5:9], g[5:9], None, None, backend=backend)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_are_never_written(backend: str) -> None:
    """Expectation: no op writes into its inputs (a fused residual add must not update residual
    in place), forward or backward."""
    _need(backend)
    x, r, g = torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    w, sh = torch.randn(8), torch.randn(2, 1, 8)
    snap = [t.clone() for t in (x, r, g, w, sh)]
    xs = [t.clone().requires_grad_() for t in (x, r, g, w, sh)]
    outs = [F.sandwich_rms_norm(xs[0], xs[1], xs[3], None, backend=backend),
            F.gated_rms_norm(xs[0], xs[2], xs[3], backend=backend),
            F.modulated_layer_norm(xs[0], xs[4], xs[4] * 2, xs[3], None, backend=backend),
            F.qk_rms_norm(xs[0], xs[1], xs[3], None, backend=backend)]
    flat = [o for t in outs for o in _tuple(t)]
    torch.autograd.backward(flat, [torch.randn(o.shape, generator=_g(i)) for i, o in enumerate(flat)])
    for a, b in zip(snap, xs):
        assert torch.equal(a, b.detach())


# ----------------------------------------------------------------------------- errors and edges


BAD_CALLS = [
    ("shift-wrong-D", RuntimeError, "shift of shape .*must broadcast",
     lambda x, bk: F.modulated_layer_norm(x, torch.zeros(2, 1, 9), torch.zeros(2, 1, 8), backend=bk)),
    ("shift-broadcasts-beyond-input", RuntimeError, "must broadcast to the input's shape",
     lambda x, bk: F.modulated_layer_norm(x, torch.zeros(4, 2, 1, 8), torch.zeros(2, 1, 8), backend=bk)),
    ("mln-weight-wrong", RuntimeError, "weight of shape",
     lambda x, bk: F.modulated_layer_norm(x, torch.zeros(8), torch.zeros(8), torch.ones(9), backend=bk)),
    ("gated-group-not-divisor", ValueError, "group_size must be a positive divisor",
     lambda x, bk: F.gated_rms_norm(x, x, group_size=3, backend=bk)),
    ("gated-group-zero", ValueError, "group_size",
     lambda x, bk: F.gated_rms_norm(x, x, group_size=0, backend=bk)),
    ("gated-gate-broadcast", RuntimeError, "gate of the input's shape",
     lambda x, bk: F.gated_rms_norm(x, x[:, :1], backend=bk)),
    ("qk-head-dim-mismatch", RuntimeError, "same head dim",
     lambda x, bk: F.qk_rms_norm(x, torch.randn(2, 3, 10), None, None, backend=bk)),
    ("sandwich-residual-shape", ValueError, "residual must have the shape of hidden",
     lambda x, bk: F.sandwich_rms_norm(x, x[:1], None, None, backend=bk)),
    ("dyt-alpha-two-numbers", RuntimeError, "alpha to be one number",
     lambda x, bk: F.dyt(x, torch.ones(2), backend=bk)),
    ("derf-weight-wrong", RuntimeError, "weight of the input's trailing shape",
     lambda x, bk: F.derf(x, torch.ones(1), torch.zeros(1), torch.ones(9), backend=bk)),
    ("negative-eps", ValueError, "eps must be non-negative",
     lambda x, bk: F.modulated_layer_norm(x, x, x, eps=-1.0, backend=bk)),
    ("zero-dim-input", ValueError, "at least 1 dim",
     lambda x, bk: F.gated_rms_norm(torch.tensor(1.0), None, backend=bk)),
    ("integer-input", NotImplementedError, "not implemented for 'Long'",
     lambda x, bk: F.modulated_layer_norm(torch.ones(2, 8, dtype=torch.long), torch.zeros(8), torch.zeros(8),
                                          backend=bk)),
    ("stats-dtype-bf16", ValueError, "stats_dtype must be torch.float32 or torch.float64",
     lambda x, bk: F.qk_rms_norm(x, x, None, None, backend=bk, stats_dtype=torch.bfloat16)),
    ("unknown-backend", ValueError, "unknown normkit backend 'tritonn'",
     lambda x, bk: F.dyt(x, torch.ones(1), backend="tritonn")),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,exc,match,call", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_clear_error(name, exc, match, call, backend: str) -> None:
    """Expectation: bad input raises the torch-style exception type with a message saying what
    must hold and what was received, on every backend (the check is before dispatch)."""
    _need(backend)
    x = torch.randn(2, 3, 8)
    with pytest.raises(exc, match=match):
        call(x, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_failed_module_call_changes_nothing(backend: str) -> None:
    """Expectation: a module call that raises leaves parameters and accumulated .grad untouched."""
    _need(backend)
    mods = [(normkit.GatedRMSNorm(8, group_size=4, backend=backend), lambda m, x: m(x, torch.randn(2, 4))),
            (normkit.ModulatedLayerNorm(8, elementwise_affine=True, backend=backend),
             lambda m, x: m(x, torch.zeros(3, 1, 8), torch.zeros(2, 1, 8))),
            (normkit.SandwichRMSNorm(8, weight_offset=1.0, backend=backend), lambda m, x: m(x, x[:1])),
            (normkit.QKRMSNorm(8, backend=backend), lambda m, x: m(x, torch.randn(2, 10)))]
    for m, bad in mods:
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(generator=_g(3))
        for p in m.parameters():
            p.grad = torch.full_like(p, 0.25)
        sd = copy.deepcopy(m.state_dict())
        x = torch.randn(2, 8, requires_grad=True)
        with pytest.raises((RuntimeError, ValueError)):
            bad(m, x)
        for k, v in m.state_dict().items():
            assert torch.equal(v, sd[k]), k
        assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in m.parameters())
        assert x.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input(backend: str) -> None:
    """Expectation: torch/reference return empty results and zero parameter gradients (as
    torch.nn.functional does); the kernel backends, asked explicitly, refuse with a BackendError
    (library policy, as for rms_norm); backend='auto' falls back and returns the empty result."""
    _need(backend)
    x = torch.randn(2, 0, 8, requires_grad=True)
    shift = torch.zeros(8, requires_grad=True)
    if backend in ("triton", "numba"):
        with pytest.raises(BackendError, match="empty input"):
            F.modulated_layer_norm(x, shift, shift, backend=backend)
        assert F.gated_rms_norm(x, x, backend="auto").shape == x.shape
        return
    F.modulated_layer_norm(x, shift, shift * 2, backend=backend).sum().backward()
    assert torch.equal(shift.grad, torch.zeros(8))
    for out in (F.gated_rms_norm(x, x, group_size=4, backend=backend),
                *F.sandwich_rms_norm(x, x, None, None, backend=backend),
                *F.qk_rms_norm(x, x, None, None, backend=backend),
                F.dyt(x, torch.ones(1), backend=backend)):
        assert out.shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_stay_in_their_row(backend: str) -> None:
    """Expectation: a NaN/inf in one row (or one shift element) poisons that row only."""
    _need(backend)
    x = torch.randn(3, 8, generator=_g(0))
    x[0, 2], x[1, 3] = float("nan"), float("inf")
    y = F.modulated_layer_norm(x, torch.zeros(8), torch.zeros(8), backend=backend)
    assert y.isnan().any(-1).tolist() == [True, True, False]
    assert F.gated_rms_norm(x, torch.ones_like(x), group_size=4, backend=backend).isnan().sum(-1).tolist() == [4, 1, 0]
    shift = torch.zeros(3, 8)
    shift[0, 0] = float("nan")
    assert F.modulated_layer_norm(torch.randn(3, 8), shift, torch.zeros(3, 8), backend=backend).isnan().sum() == 1
    if backend != "numba":
        y = F.dyt(x, torch.ones(1), backend=backend)
        assert y[0, 2].isnan() and y[1, 3] == 1.0 and y[2].isfinite().all()


@pytest.mark.parametrize("backend", ["reference", "triton", "numba"])
@pytest.mark.parametrize("magnitude", [1e20, 1e30])
def test_huge_magnitudes_do_not_overflow_the_statistics(backend: str, magnitude: float) -> None:
    """Expectation: float32 rows of magnitude 1e20-1e30 (whose squares overflow float32) are
    normalized correctly by the float64 reference and the kernels (the plain torch composition
    overflows: its output is 0 or NaN there)."""
    _need(backend)
    x = torch.randn(2, 8, generator=_g(0)) * magnitude
    x64 = x.double()
    z = torch.zeros(8)
    torch.testing.assert_close(F.modulated_layer_norm(x, z, z, eps=0.0, backend=backend).double(),
                               _ln(x64, 0.0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(F.gated_rms_norm(x, None, eps=1e-6, backend=backend).double(), _rms(x64, 0.0),
                               atol=1e-5, rtol=1e-5)
    q, _ = F.qk_rms_norm(x, x, None, None, eps=1e-6, backend=backend)
    torch.testing.assert_close(q.double(), _rms(x64, 0.0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton", "numba"])
def test_tiny_magnitudes_with_eps_zero(backend: str, request) -> None:
    """Expectation: with eps=0, float32 rows of magnitude 1e-30 (normal floats whose squares
    underflow) are normalized to the float64 answer, as the reference and triton do."""
    _need(backend)
    x = torch.randn(2, 8, generator=_g(0)) * 1e-30
    x64 = x.double()
    z = torch.zeros(8)
    torch.testing.assert_close(F.gated_rms_norm(x, None, eps=0.0, backend=backend).double(), _rms(x64, 0.0),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(F.modulated_layer_norm(x, z, z, eps=0.0, backend=backend).double(), _ln(x64, 0.0),
                               atol=1e-5, rtol=1e-5)
    q, _ = F.qk_rms_norm(x, x, None, None, eps=0.0, backend=backend)
    torch.testing.assert_close(q.double(), _rms(x64, 0.0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_dtype_is_rounded_once(backend: str) -> None:
    """Expectation: bf16 input with out_dtype=float32 gives float32 results accurate to float32
    (rounded once from the float32 computation, not via bf16), and bf16 gradients for the inputs;
    sandwich's residual_out stays in the residual's dtype."""
    _need(backend)
    x, g = _r(2, 3, 16, seed=0).bfloat16(), _r(2, 3, 16, seed=1).bfloat16()
    w, sh = _r(16, seed=2).bfloat16(), _r(2, 1, 16, seed=3).bfloat16()
    calls = [(F.modulated_layer_norm, o_mod_ln, [x, sh, sh * 2, w], {}),
             (F.gated_rms_norm, o_gated, [x, g, w], {"group_size": 4}),
             (F.qk_rms_norm, o_qk, [x, g, w, None], {"eps": 1e-6}),
             (F.sandwich_rms_norm, o_sandwich, [x, g, w, w], {"eps": 1e-6})]
    if backend != "numba":
        calls.append((F.derf, o_derf, [x, torch.tensor([0.6]).bfloat16(), torch.tensor([0.1]).bfloat16(), w], {}))
    for fn, oracle, args, kw in calls:
        leaves, out = _run(fn, args, kw, backend=backend, out_dtype=torch.float32)
        ref = _tuple(oracle(*[None if a is None else a.double() for a in args], **kw))
        torch.autograd.backward(list(out), [torch.ones_like(o) for o in out])
        assert out[0].dtype == torch.float32
        torch.testing.assert_close(out[0].double(), ref[0], atol=2e-6, rtol=2e-6)
        if fn is F.sandwich_rms_norm:
            assert out[1].dtype == torch.bfloat16
        assert all(a.grad.dtype == torch.bfloat16 for a in leaves if a is not None)


@pytest.mark.parametrize("backend", ["torch", "reference", "numba"])
def test_stats_dtype_float64_on_float32_input(backend: str) -> None:
    """Expectation: stats_dtype=float64 keeps the float32 output dtype and is at least as accurate."""
    _need(backend)
    x = (_r(4, 64, seed=0) * 1e3 + 1e4).float()
    z = torch.zeros(64)
    y = F.modulated_layer_norm(x, z, z, backend=backend, stats_dtype=torch.float64)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), _ln(x.double(), 1e-6), atol=2e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- modules


def _modules() -> dict[str, tuple[torch.nn.Module, Callable[[], tuple]]]:
    x = torch.randn(2, 3, 8, generator=_g(0))
    return {
        "ModulatedLayerNorm": (normkit.ModulatedLayerNorm(8, elementwise_affine=True),
                               lambda: (x, _SH, _SC)),
        "ModulatedRMSNorm": (normkit.ModulatedRMSNorm(8, elementwise_affine=True), lambda: (x, _SH, _SC)),
        "GatedRMSNorm": (normkit.GatedRMSNorm(8, group_size=4, norm_before_gate=True), lambda: (x, _G)),
        "QKRMSNorm": (normkit.QKRMSNorm(8), lambda: (x.reshape(2, 3, 1, 8), _G.reshape(2, 3, 1, 8))),
        "SandwichRMSNorm": (normkit.SandwichRMSNorm(8, weight_offset=1.0), lambda: (x, _G)),
        "DyT": (normkit.DyT(8), lambda: (x,)),
        "Derf": (normkit.Derf(8, shift_init=0.1), lambda: (x,)),
    }


@pytest.mark.parametrize("name", list(_modules()))
def test_module_copy_pickle_state_dict_fx(name: str) -> None:
    """Expectation: deepcopy, pickle, state_dict round-trip and fx.symbolic_trace give bitwise the
    same outputs; the repr names the class and its options."""
    m, make = _modules()[name]
    with torch.no_grad():
        for i, p in enumerate(m.parameters()):
            p.copy_(torch.randn(p.shape, generator=_g(20 + i)) * 0.5 + 0.5)
    args = make()
    y = _tuple(m(*args))
    assert repr(m).startswith(name + "(")
    m2 = copy.deepcopy(m)
    m3 = pickle.loads(pickle.dumps(m))
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    m4 = copy.deepcopy(m)
    with torch.no_grad():
        for p in m4.parameters():
            p.zero_()
    m4.load_state_dict(torch.load(buf))
    gm = torch.fx.symbolic_trace(m)
    for other in (m2, m3, m4, gm):
        for a, b in zip(y, _tuple(other(*args))):
            assert torch.equal(a, b)


def test_module_initialisations_follow_the_papers() -> None:
    """Expectation: DyT alpha=0.5, weight ones, bias zeros; Derf alpha 0.5 and shift 0 of shape (1,)
    (the authors' checkpoints load); DiT's modulated norm has no affine by default."""
    dyt, derf = normkit.DyT(8), normkit.Derf(8)
    assert dyt.alpha.shape == (1,) and dyt.alpha.item() == 0.5
    assert torch.equal(dyt.weight, torch.ones(8)) and torch.equal(dyt.bias, torch.zeros(8))
    assert derf.alpha.shape == (1,) and derf.shift.shape == (1,) and derf.shift.item() == 0.0
    assert list(dict(normkit.ModulatedLayerNorm(8).named_parameters())) == []
    assert isinstance(normkit.DyT(8, alpha_init=0.8), torch.nn.Module) and normkit.DyT(8, alpha_init=0.8).alpha == 0.8


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_backend_matches_functional(backend: str) -> None:
    """Expectation: a module with backend= set computes what the functional op does with it."""
    _need(backend)
    m = normkit.GatedRMSNorm(8, group_size=4, backend=backend)
    with torch.no_grad():
        m.weight.normal_(generator=_g(1))
    torch.testing.assert_close(m(_X, _G), F.gated_rms_norm(_X, _G, m.weight, group_size=4, backend="torch"),
                               atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- replace_norms / convert


def test_replace_norms_on_transformer_encoder() -> None:
    """Expectation: every LayerNorm becomes DyT carrying the norm's weight and bias, alpha as asked,
    the report lists each; the model runs forward and backward."""
    enc = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0), 2,
                                      norm=torch.nn.LayerNorm(16), enable_nested_tensor=False)
    with torch.no_grad():
        for n, p in enc.named_parameters():
            if "norm" in n:
                p.normal_(generator=_g(0))
    old = copy.deepcopy(enc)
    report = normkit.ReplaceReport()
    new = normkit.replace_norms(enc, "dyt", alpha_init=0.3, report=report)
    names = [n for n, m in new.named_modules() if isinstance(m, normkit.DyT)]
    assert names == ["layers.0.norm1", "layers.0.norm2", "layers.1.norm1", "layers.1.norm2", "norm"]
    assert torch.equal(new.layers[1].norm2.weight, old.layers[1].norm2.weight)
    assert torch.equal(new.layers[1].norm2.bias, old.layers[1].norm2.bias)
    assert new.layers[0].norm1.alpha.item() == pytest.approx(0.3)
    assert "replaced 5" in str(report)
    x = torch.randn(2, 5, 16, generator=_g(1))
    new(x).sum().backward()
    expected = torch.tanh(0.3 * x) * old.layers[0].norm1.weight + old.layers[0].norm1.bias
    torch.testing.assert_close(new.layers[0].norm1(x), expected)


def test_replace_norms_hf_qwen3_and_gemma3() -> None:
    """Expectation: HF per-model RMSNorms are replaced (include= keeps Qwen3's QK-norms); Gemma's
    offset weight is carried as 1 + weight; Derf gets shift_init; shared norms stay shared."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    q = transformers.Qwen3Model(cfg)
    report = normkit.ReplaceReport()
    q = normkit.replace_norms(q, "derf", shift_init=0.1, report=report,
                              include=lambda n, m: not n.endswith(("q_norm", "k_norm")))
    kinds = {n: type(m).__name__ for n, m in q.named_modules() if n.endswith(("norm", "layernorm"))}
    assert kinds["layers.0.self_attn.q_norm"] == "Qwen3RMSNorm" and kinds["norm"] == "Derf"
    assert q.norm.shift.item() == pytest.approx(0.1)
    q(input_ids=torch.randint(0, 50, (2, 5))).last_hidden_state.sum().backward()
    gcfg = transformers.Gemma3TextConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    g = transformers.Gemma3TextModel(gcfg)
    with torch.no_grad():
        for n, p in g.named_parameters():
            if "norm" in n:
                p.normal_(0, 0.3)
    w = g.layers[0].input_layernorm.weight.detach().clone()
    g = normkit.replace_norms(g, "dyt")
    torch.testing.assert_close(g.layers[0].input_layernorm.weight.detach(), 1 + w)
    shared = torch.nn.LayerNorm(8)
    seq = normkit.replace_norms(torch.nn.Sequential(shared, torch.nn.Linear(8, 8), shared), "dyt")
    assert seq[0] is seq[2] and isinstance(seq[0], normkit.DyT)
    with pytest.raises(ValueError, match="shift_init"):
        normkit.replace_norms(torch.nn.LayerNorm(8), "dyt", shift_init=0.1)
    with pytest.raises(ValueError, match="kind"):
        normkit.replace_norms(torch.nn.LayerNorm(8), "tanh")


def _grads_after(model: torch.nn.Module, call: Callable[[], Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    model.zero_grad()
    out = call()
    (out * torch.randn(out.shape, generator=_g(1))).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a: tuple, b: tuple, rtol: float) -> None:
    torch.testing.assert_close(b[0], a[0], atol=rtol, rtol=rtol)
    assert set(a[1]) == set(b[1])
    for k in a[1]:
        scale = a[1][k].abs().max().item()
        if scale > 1e-4:  # exactly-zero gradients (to_k.bias under softmax) are rounding noise either way
            torch.testing.assert_close(b[1][k], a[1][k], atol=rtol * scale, rtol=rtol, msg=k)


@pytest.mark.parametrize("backend", [None, "reference", "numba"])
def test_convert_tiny_hf_mamba2(backend: str | None) -> None:
    """Expectation: convert swaps MambaRMSNormGated (n_groups=2: grouped) for GatedRMSNorm with
    outputs and parameter gradients unchanged."""
    transformers = pytest.importorskip("transformers")
    if backend is not None:
        _need(backend)
    torch.manual_seed(0)
    cfg = transformers.Mamba2Config(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16,
                                    expand=2, state_size=8, n_groups=2, chunk_size=8, conv_kernel=4)
    model = transformers.Mamba2Model(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.normal_(1.0, 0.3)
    ids = torch.randint(0, 50, (2, 7), generator=_g(0))
    before = _grads_after(model, lambda: model(input_ids=ids).last_hidden_state)
    converted = normkit.convert(copy.deepcopy(model))
    assert isinstance(converted.layers[0].mixer.norm, normkit.GatedRMSNorm)
    ctx = normkit.use_backend(backend) if backend else normkit.use_backend("auto")
    with ctx:
        after = _grads_after(converted, lambda: converted(input_ids=ids).last_hidden_state)
    _assert_same(before, after, 1e-4)


@pytest.mark.parametrize("backend", [None, "reference", "numba"])
def test_convert_tiny_diffusers_dit(backend: str | None) -> None:
    """Expectation: convert swaps diffusers' AdaLayerNormZero through its adapter; outputs and
    parameter gradients unchanged."""
    diffusers = pytest.importorskip("diffusers")
    if backend is not None:
        _need(backend)
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                            out_channels=4, num_layers=2, sample_size=8, patch_size=2,
                                            num_embeds_ada_norm=10, norm_num_groups=1).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(2, 4, 8, 8, generator=_g(0))
    ts, labels = torch.tensor([1, 5]), torch.tensor([0, 3])
    before = _grads_after(model, lambda: model(x, timestep=ts, class_labels=labels).sample)
    converted = normkit.convert(copy.deepcopy(model))
    assert "Adapter" in type(converted.transformer_blocks[0].norm1).__name__
    ctx = normkit.use_backend(backend) if backend else normkit.use_backend("auto")
    with ctx:
        after = _grads_after(converted, lambda: converted(x, timestep=ts, class_labels=labels).sample)
    _assert_same(before, after, 1e-4)


# ----------------------------------------------------------------------------- strides of each argument


def _last_dim_strided(t: Tensor) -> Tensor:
    """The same values with a last dim that is not unit-stride (stored transposed, or every other
    element for 1-D)."""
    if t.dim() == 1:
        return torch.stack([t, torch.full_like(t, float("nan"))], -1)[:, 0]
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _stride_cases() -> dict[str, tuple[Callable, Callable, list[Tensor], dict]]:
    def t(*s, seed):
        return torch.randn(*s, generator=_g(seed))

    n, seq, d = 2, 3, 8
    x = t(n, seq, d, seed=0)
    return {
        "mln": (F.modulated_layer_norm, o_mod_ln,
                [x, t(n, seq, d, seed=1), t(n, seq, d, seed=2), t(d, seed=3), t(d, seed=4)], {}),
        "mrms": (F.modulated_rms_norm, o_mod_rms, [x, t(n, seq, d, seed=1), t(n, seq, d, seed=2), t(d, seed=3)],
                 {"eps": 1e-6}),
        "gated": (F.gated_rms_norm, o_gated, [x, t(n, seq, d, seed=1), t(d, seed=3)], {"group_size": 4}),
        "gated-nbg": (F.gated_rms_norm, o_gated, [x, t(n, seq, d, seed=1), t(d, seed=3)],
                      {"group_size": 4, "norm_before_gate": True}),
        "qk": (F.qk_rms_norm, o_qk, [x, t(n, seq, d, seed=1), t(d, seed=3), t(d, seed=4)], {"eps": 1e-6}),
        "sandwich": (F.sandwich_rms_norm, o_sandwich, [x, t(n, seq, d, seed=1), t(d, seed=3), t(d, seed=4)],
                     {"eps": 1e-6}),
        "dyt": (F.dyt, o_dyt, [x, torch.tensor([0.6]), t(d, seed=3), t(d, seed=4)], {}),
        "derf": (F.derf, o_derf, [x, torch.tensor([0.6]), torch.tensor([0.1]), t(d, seed=3), t(d, seed=4)], {}),
    }


STRIDES = _stride_cases()
STRIDE_PARAMS = [(op, i) for op, (_, _, args, _) in STRIDES.items() for i, a in enumerate(args) if a.numel() > 1]


@pytest.mark.parametrize("backend", ["reference", "triton", "numba"])
@pytest.mark.parametrize("op,arg", STRIDE_PARAMS, ids=[f"{o}-arg{i}" for o, i in STRIDE_PARAMS])
def test_each_argument_with_a_non_unit_stride_last_dim(op: str, arg: int, backend: str, request) -> None:
    """Expectation: any one argument whose last dim is not unit-stride (a tensor stored
    transposed, e.g. q from a (B, H, D, L) buffer, or a strided weight) gives the same outputs and
    gradients as its contiguous copy."""
    _need(backend, op.split("-")[0])
    fn, oracle, args, kw = STRIDES[op]
    leaves = [a.detach().clone().requires_grad_() for a in args]
    views = [_last_dim_strided(v) if i == arg else v for i, v in enumerate(leaves)]
    assert not views[arg].is_contiguous()
    out = _tuple(fn(*views, **kw, backend=backend))
    leaves64 = [a.detach().double().requires_grad_() for a in args]
    ref = _tuple(oracle(*leaves64, **kw))
    gys = [torch.randn(r.shape, generator=_g(30 + i)) for i, r in enumerate(ref)]
    torch.autograd.backward(list(out), gys)
    torch.autograd.backward(list(ref), [g.double() for g in gys])
    for o, r in zip(out, ref):
        torch.testing.assert_close(o.double(), r.detach(), atol=2e-5, rtol=1e-5)
    for a, b in zip(leaves, leaves64):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,arg", [("qk", 0), ("qk", 1), ("qk", 2), ("sandwich", 3), ("mln", 1), ("gated", 2)])
def test_outputs_require_grad_only_where_an_input_does(op: str, arg: int, backend: str, request) -> None:
    """Expectation: with only one input requiring grad, its gradient is exact, no other input gets
    a gradient, and an output that does not depend on it does not require grad (as with the torch
    composition: k_out does not depend on q; residual_out does not depend on next_weight)."""
    _need(backend, op)
    fn, oracle, args, kw = STRIDES[op]
    leaves = [a.detach().clone().requires_grad_(i == arg) for i, a in enumerate(args)]
    leaves64 = [a.detach().double().requires_grad_(i == arg) for i, a in enumerate(args)]
    out = _tuple(fn(*leaves, **kw, backend=backend))
    ref = _tuple(oracle(*leaves64, **kw))
    keep = [r.requires_grad for r in ref]
    gys = [torch.randn(r.shape, generator=_g(40 + i)) for i, r in enumerate(ref)]
    torch.autograd.backward([o for o, k in zip(out, keep) if k], [g for g, k in zip(gys, keep) if k])
    torch.autograd.backward([r for r in ref if r.requires_grad], [g.double() for g, k in zip(gys, keep) if k])
    torch.testing.assert_close(leaves[arg].grad.double(), leaves64[arg].grad, atol=2e-5, rtol=1e-5)
    assert all(a.grad is None for i, a in enumerate(leaves) if i != arg)
    assert [o.requires_grad for o in out] == keep


def test_numba_declines_unsupported_broadcasts_and_auto_falls_back() -> None:
    """Expectation: numba's modulation kernels take per sample (N, 1, D), per token (N, L, D) and
    (D,); another broadcast ((L, D), (N, 1, 1), mixed per-sample/per-token) is refused by name with a
    BackendError, and backend='auto' computes it anyway."""
    _need("numba")
    x = torch.randn(2, 3, 8, generator=_g(0))
    for shift, scale in [(torch.randn(3, 8), torch.randn(3, 8)), (torch.randn(2, 1, 1), torch.randn(2, 1, 8)),
                         (torch.randn(2, 1, 8), torch.randn(1, 3, 8))]:
        with pytest.raises(BackendError, match="broadcast"):
            F.modulated_layer_norm(x, shift, scale, backend="numba")
        torch.testing.assert_close(F.modulated_layer_norm(x, shift, scale, backend="auto"),
                                   F.modulated_layer_norm(x, shift, scale, backend="torch"), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_convert_tiny_hf_qwen3_gemma3(arch: str, dtype: torch.dtype) -> None:
    """Expectation: convert on tiny Qwen3/Gemma3 (QK-norms, Gemma's offset and sandwich norms) keeps
    outputs and parameter gradients (fp32 and bf16 models)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = {"vocab_size": 50, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}
    if arch == "qwen3":
        model = transformers.Qwen3Model(transformers.Qwen3Config(**common))
    else:
        model = transformers.Gemma3TextModel(transformers.Gemma3TextConfig(**common))
    model = model.eval().to(dtype)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.normal_(0.5, 0.3)
    ids = torch.randint(0, 50, (2, 6), generator=_g(0))

    def call(m):
        return lambda: m(input_ids=ids).last_hidden_state.float()

    before = _grads_after(model, call(model))
    converted = normkit.convert(copy.deepcopy(model))
    assert any(type(m).__module__.startswith("normkit") for m in converted.modules())
    with normkit.use_backend("reference"):
        after = _grads_after(converted, call(converted))
    _assert_same(before, after, 1e-4 if dtype == torch.float32 else 2e-2)


@pytest.mark.gpu_schedule
def test_triton_bitwise_deterministic_run_twice() -> None:
    """Expectation: the fused kernels' outputs and gradients (parameter and shift/scale reductions
    included) are bitwise equal run twice."""
    _need("triton")
    first, second = _all_results("triton"), _all_results("triton")
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"result {i} differs between two runs"


def test_every_block_norm_is_in_the_table_and_explain() -> None:
    """Expectation: all seven ops of issue 13 are in the table of norms and `normkit explain NAME` works.
    (qk_rms_norm and sandwich_rms_norm, two RMSNorms in one call, are the RMSNorm row's fused ops, as
    add_rms_norm is: explain names the row they compute.)"""
    import subprocess
    import sys

    from normkit.norms import NORMS

    names = ["modulated_layer_norm", "modulated_rms_norm", "gated_rms_norm", "qk_rms_norm", "sandwich_rms_norm",
             "dyt", "derf"]
    fused = {op for spec in NORMS.values() for op in spec.fused}
    missing = [n for n in names if n not in NORMS and n not in fused]
    run = subprocess.run([sys.executable, "-m", "normkit", "explain", "qk_rms_norm"], capture_output=True, text=True,
                         timeout=120)
    assert not missing and run.returncode == 0, (missing, run.stderr[-300:])
    assert run.stdout.startswith("qk_rms_norm: ") and "RMSNorm" in run.stdout


def test_convert_tiny_diffusers_sd3_with_qk_rms_norm() -> None:
    """Expectation: convert on a tiny SD3 transformer (AdaLayerNormZero, AdaLayerNormContinuous,
    RMS QK-norm) keeps outputs and parameter gradients, on the reference backend too."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                            caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
                                            pos_embed_max_size=8, qk_norm="rms_norm").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    x, enc = torch.randn(2, 4, 8, 8, generator=_g(0)), torch.randn(2, 5, 16, generator=_g(1))
    pooled, ts = torch.randn(2, 8, generator=_g(2)), torch.tensor([3.0, 7.0])

    def call(m):
        return lambda: m(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled, timestep=ts).sample

    before = _grads_after(model, call(model))
    converted = normkit.convert(copy.deepcopy(model))
    assert "Adapter" in type(converted.transformer_blocks[0].norm1).__name__
    with normkit.use_backend("reference"):
        after = _grads_after(converted, call(converted))
    _assert_same(before, after, 1e-4)
