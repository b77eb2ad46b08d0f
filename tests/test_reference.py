"""normkit.reference on its own: the oracle must be right before anything is judged by it.

- Its hand-derived backward is checked by finite differences (``gradcheck``) and is itself
  differentiable (``gradgradcheck``), in float64, for every op and mode.
- Its float32 arithmetic is numerically stable: on inputs with a large common offset
  (``1e4 + randn``, ``1e5 + randn``) its error against float64 is at most twice torch's own
  float32 error (plus one float32 ulp at the result's magnitude), forward and gradients.
- Its statistics are float32 for bf16/fp16/fp32 input and float64 for float64 input: a
  low-precision result is the float32 computation rounded once, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import gradcheck, gradgradcheck

from cases import LOW_PRECISION, REFERENCE, Tolerance, seed_of
from normkit import reference as R
from normkit.norms import NORMS, Sizes, layout

# Local to this file until cases.TOLERANCES has a row for it.
STABILITY = Tolerance(
    0.0, torch.finfo(torch.float32).eps,
    "float32 on 1e4/1e5 + randn against float64: the input's own ulp (~1e-3 at 1e4) dominates "
    "both torch's and the reference's error, so the reference may be at most twice torch's error, "
    "plus one float32 ulp at the result's magnitude for results torch happens to get exactly.",
    factor=2.0,
)


def _gen(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(seed_of(*parts))


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float64, grad: bool = True) -> Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(grad)


def _positive(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5


# ---- gradcheck / gradgradcheck in float64 ------------------------------------------------------


def _grad_cases() -> list[Any]:
    """(id, function of the differentiable tensors, builder of those tensors from a generator)."""
    cases: list[Any] = []

    def add(id: str, fn: Callable[..., Any], *shapes: tuple[int, ...]) -> None:
        cases.append(pytest.param(fn, shapes, id=id))

    for training in (True, False):
        def bn(x: Tensor, w: Tensor, b: Tensor, training: bool = training) -> Tensor:
            gen = _gen("bn stats")
            mean, var = _randn(gen, 3, grad=False), _positive(gen, 3)
            return R.batch_norm(x, mean, var, w, b, training, 0.1, 1e-3)

        add(f"batch_norm-{'train' if training else 'eval'}", bn, (4, 3, 2), (3,), (3,))
    add("batch_norm-train-no-affine", lambda x: R.batch_norm(x, None, None, None, None, True, 0.1, 1e-3), (5, 3))
    for ns in ((4,), (3, 4), (2, 3, 4)):
        add(f"layer_norm-{'x'.join(map(str, ns))}",
            lambda x, w, b, ns=ns: R.layer_norm(x, ns, w, b, 1e-3), (2, 3, 4), ns, ns)
    add("layer_norm-no-affine", lambda x: R.layer_norm(x, (5,), None, None, 1e-3), (3, 5))
    for groups in (1, 2, 6):
        add(f"group_norm-G{groups}", lambda x, w, b, g=groups: R.group_norm(x, g, w, b, 1e-3), (2, 6, 3), (6,), (6,))

    def instance_stats() -> tuple[Tensor, Tensor]:
        gen = _gen("in stats")
        return _randn(gen, 3, grad=False), _positive(gen, 3)

    add("instance_norm", lambda x, w, b: R.instance_norm(x, None, None, w, b, True, 0.1, 1e-3), (2, 3, 4), (3,), (3,))
    add("instance_norm-running-stats",
        lambda x, w, b: R.instance_norm(x, *instance_stats(), w, b, True, 0.1, 1e-3), (2, 3, 2, 2), (3,), (3,))
    add("instance_norm-use_input_stats-false",
        lambda x, w, b: R.instance_norm(x, *instance_stats(), w, b, False, 0.1, 1e-3), (2, 3, 4), (3,), (3,))
    add("rms_norm", lambda x, w: R.rms_norm(x, (5,), w, 1e-3), (3, 5), (5,))
    add("rms_norm-2d-shape-eps-none", lambda x, w: R.rms_norm(x, (2, 3), w), (2, 2, 3), (2, 3))
    add("rms_norm-no-weight", lambda x: R.rms_norm(x, (4,), None, 1e-3), (3, 4))
    for size in range(1, 6):
        add(f"local_response_norm-size{size}",
            lambda x, s=size: R.local_response_norm(x, s, 0.5, 0.75, 1.0), (2, 6, 3))
    add("local_response_norm-4d", lambda x: R.local_response_norm(x, 3, 1.0, 0.6, 2.0), (1, 5, 2, 3))
    add("add_layer_norm", lambda x, r, w, b: R.add_layer_norm(x, r, (5,), w, b, 1e-3), (3, 5), (3, 5), (5,), (5,))
    add("add_layer_norm-no-residual", lambda x, w, b: R.add_layer_norm(x, None, (4,), w, b, 1e-3), (2, 4), (4,), (4,))
    add("add_rms_norm", lambda x, r, w: R.add_rms_norm(x, r, (5,), w, 1e-3), (3, 5), (3, 5), (5,))
    return cases


GRAD_CASES = _grad_cases()


def _grad_inputs(fn: Callable[..., Any], shapes: tuple[tuple[int, ...], ...]) -> list[Tensor]:
    gen = _gen("gradcheck", fn.__code__.co_firstlineno, shapes)
    return [_randn(gen, *shape) for shape in shapes]


@pytest.mark.parametrize(("fn", "shapes"), GRAD_CASES)
def test_gradcheck(fn: Callable[..., Any], shapes: tuple[tuple[int, ...], ...]) -> None:
    assert gradcheck(fn, _grad_inputs(fn, shapes))


@pytest.mark.parametrize(("fn", "shapes"), GRAD_CASES)
def test_gradgradcheck(fn: Callable[..., Any], shapes: tuple[tuple[int, ...], ...]) -> None:
    inputs = _grad_inputs(fn, shapes)
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    gen = _gen("gradgradcheck upstream", shapes)
    upstream = [_randn(gen, *o.shape) for o in outputs]  # random, never ones
    assert gradgradcheck(fn, inputs, upstream)


@pytest.mark.parametrize("name", list(NORMS))
def test_gradcheck_every_norm_of_the_table(name: str) -> None:
    """Each row's formula in the reference, through its example: first and second derivatives."""
    spec = NORMS[name]
    example = spec.example(Sizes((2, 4, 4), normalized_ndim=1, num_groups=2))
    gen = _gen("table gradcheck", name)
    tensors = list(example.tensors(lambda *shape: _randn(gen, *shape)))

    def fn(*t: Tensor) -> Tensor:
        return example.call(REFERENCE, *t)

    assert gradcheck(fn, tensors)
    assert gradgradcheck(fn, tensors, [_randn(gen, *example.shape)])


# ---- numerical stability in float32 ------------------------------------------------------------

def _oracle(name: str) -> Any:
    """The functions a norm is judged against: torch.nn.functional where the norm has a torch
    twin, else the reference itself (in float64, where it is exact to ~1e-16)."""
    return F if NORMS[name].twin is not None else REFERENCE


def _forward_and_grads(module: Any, op: str, x: Tensor, params: list[Tensor], dy: Tensor,
                       dtype: torch.dtype) -> dict[str, Tensor]:
    """Output and gradients of row ``op``'s example; ``params``: its per-call tensors, then its parameters."""
    spec = NORMS[op]
    call = spec.example(Sizes(tuple(x.shape), spec.sizes.normalized_ndim, spec.sizes.num_groups)).call
    x, *params = (t.detach().to(dtype).requires_grad_() for t in (x, *params))
    y = call(module, x, *params)
    dx, *dparams = torch.autograd.grad(y, (x, *params), dy.to(dtype), allow_unused=True)
    names = [e.name for e in spec.inputs] + list(spec.params)
    results = {"y": y, "dx": dx, **{f"d{name}": d for name, d in zip(names, dparams, strict=True)}}
    return {k: v.detach().double() for k, v in results.items() if v is not None}


@pytest.mark.parametrize("draw", range(8))
@pytest.mark.parametrize("offset", [1e4, 1e5], ids=["1e4", "1e5"])
@pytest.mark.parametrize("op", list(NORMS))
def test_float32_stability_with_a_large_offset(op: str, offset: float, draw: int) -> None:
    """Several draws: one draw's error is a max over a few hundred roundings, noisy by ~2x.
    ("torch" is the norm's oracle: torch's twin, or the reference itself where torch has none.)"""
    example = NORMS[op].example()
    gen = _gen("stability", op, offset, draw)
    x = (torch.randn(example.shape, generator=gen, dtype=torch.float64) + offset).float()  # exact in float32
    _, *params = example.tensors(lambda *shape: _randn(gen, *shape, grad=False).float())
    dy = _randn(gen, *example.shape, grad=False).float()
    oracle = _oracle(op)
    truth = _forward_and_grads(oracle, op, x, params, dy, torch.float64)
    torch32 = _forward_and_grads(oracle, op, x, params, dy, torch.float32)
    ours = _forward_and_grads(REFERENCE, op, x, params, dy, torch.float32)
    failures = []
    for key, exact in truth.items():
        scale = max(1.0, exact.abs().max().item())
        err_torch = (torch32[key] - exact).abs().max().item()
        err = (ours[key] - exact).abs().max().item()
        bound = STABILITY.factor * err_torch + STABILITY.atol * scale
        if not err <= bound:
            failures.append(f"{key}: error {err:.3g} > {bound:.3g} (torch's float32 error {err_torch:.3g}, "
                            f"{err / max(err_torch, 1e-30):.1f}x)")
    assert not failures, f"{op} on {offset:g} + randn, float32 vs float64: " + "; ".join(failures)


# ---- the statistics' dtype ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name", [name for name, spec in NORMS.items() if spec.statistic != "none"])
def test_statistics_dtype(name: str, dtype: torch.dtype) -> None:
    """Normalize on the table's view of each norm returns float64 statistics for float64 input
    and float32 statistics for anything narrower; the output keeps the input's dtype."""
    gen = _gen("stats dtype", name)
    x = _randn(gen, 2, 4, 3, 6, dtype=dtype, grad=False)
    spec = NORMS[name]
    view, dims, param_view = layout(name, x.shape, normalized_ndim=2, num_groups=2)
    y, mean, var = R.Normalize.apply(x.reshape(view), None, None, dims, 1e-5, spec.centered, None, None)
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    assert var.dtype == expected and y.dtype == dtype
    assert mean.dtype == expected


def _low_precision_call(name: str, gen: torch.Generator,
                        dtype: torch.dtype) -> tuple[Callable[..., Tensor], list[Tensor]]:
    """A call of the reference op ``name`` and its tensors (input and parameters) in ``dtype``."""
    example = NORMS[name].example(Sizes((3, 4, 5, 6), normalized_ndim=2, num_groups=2))
    tensors = example.tensors(lambda *shape: _randn(gen, *shape, dtype=dtype))
    return (lambda *tensors: example.call(REFERENCE, *tensors)), list(tensors)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name", list(NORMS))
def test_low_precision_is_float32_rounded_once(name: str, dtype: torch.dtype) -> None:
    """With float32 statistics and arithmetic, a bf16/fp16 result (output and every gradient)
    is exactly the float32 computation on the same values, rounded once to ``dtype``."""
    fn, low = _low_precision_call(name, _gen("rounded once", name), dtype)
    high = [t.detach().float().requires_grad_() for t in low]
    y_low, y_high = fn(*low), fn(*high)
    dy = _randn(_gen("rounded once dy", name), *y_low.shape, dtype=dtype, grad=False)
    grads_low = torch.autograd.grad(y_low, low, dy)
    grads_high = torch.autograd.grad(y_high, high, dy.float())
    assert torch.equal(y_low, y_high.to(dtype)), "output"
    for i, (g_low, g_high) in enumerate(zip(grads_low, grads_high, strict=True)):
        assert g_low.dtype == dtype
        assert torch.equal(g_low, g_high.to(dtype)), f"gradient of tensor {i}"


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=lambda d: str(d).removeprefix("torch."))
def test_running_statistics_of_low_precision_input_are_float32(dtype: torch.dtype) -> None:
    gen = _gen("running low precision")
    x = _randn(gen, 6, 3, 5, dtype=dtype, grad=False)
    stats = [(_randn(gen, 3, dtype=torch.float32, grad=False), _positive(gen, 3).float()) for _ in range(2)]
    stats[1] = (stats[0][0].clone(), stats[0][1].clone())
    R.batch_norm(x, *stats[0], None, None, True, 0.3)
    R.batch_norm(x.float(), *stats[1], None, None, True, 0.3)
    for low, high in zip(stats[0], stats[1], strict=True):
        assert low.dtype == torch.float32 and torch.equal(low, high)
