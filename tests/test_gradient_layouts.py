"""Gradients whatever the memory layout of the input and of the upstream gradient.

torch 2.13's CPU batch_norm and instance_norm backward compute wrong gradients (errors of order
1, no error raised) for some layouts of the upstream gradient: a channels_last gradient with
non-canonical strides on its size-1 axes (batch_norm), a channels_last gradient of a batch of one
(InstanceNorm2d on a channels_last image). normkit hands ATen's backward the gradient in a layout
it gets right (normkit._layouts.aten_batch_norm_grads / aten_instance_norm_grads) and its own
kernels read any layout. Here every memory order of the input (every third of a 5-D input's),
with the upstream gradient contiguous, in the input's order or in the reversed order, on every
CPU backend, in eager mode and under torch.compile: each gradient within twice torch's own
float32 error (on contiguous tensors) of float64.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import normkit
import normkit.functional as NF
from normkit.testing import assert_within_bound

F64 = torch.float64
BACKENDS = [None, "torch", "numba", "reference"]
SHAPES = {
    3: [(1, 4, 5), (2, 3, 1)],
    4: [(1, 4, 1, 5), (1, 3, 2, 3), (2, 4, 1, 5), (1, 4, 3, 5)],
    5: [(1, 2, 1, 3, 1), (1, 3, 2, 1, 2)],
}


def _module(kind: str, C: int, ndim: int, backend: str | None, last: int = 0) -> torch.nn.Module:
    rank = ndim - 2
    make = {
        "batch_norm": lambda: getattr(normkit, f"BatchNorm{rank}d")(C, backend=backend),
        "instance_norm": lambda: getattr(normkit, f"InstanceNorm{rank}d")(C, affine=True, backend=backend),
        "instance_norm_running": lambda: getattr(normkit, f"InstanceNorm{rank}d")(
            C, affine=True, track_running_stats=True, backend=backend
        ),
        "group_norm": lambda: normkit.GroupNorm(1, C, backend=backend),
        "layer_norm": lambda: normkit.LayerNorm(last, backend=backend),
        "rms_norm": lambda: normkit.RMSNorm(last, backend=backend),
    }[kind]
    m = make()
    g = torch.Generator().manual_seed(C * 7 + ndim)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.rand(p.shape, generator=g, dtype=F64) + 0.5 if p.dim() else p)
        if getattr(m, "running_var", None) is not None:
            m.running_mean.copy_(torch.randn(C, generator=g, dtype=F64))
            m.running_var.copy_(torch.rand(C, generator=g, dtype=F64) + 0.5)
    return m


def _act(backend: str | None) -> Callable[[torch.nn.Module, Tensor], Tensor]:
    """batch_norm_act (silu) with the module's parameters and running statistics."""

    def run(m: torch.nn.Module, x: Tensor) -> Tensor:
        return NF.batch_norm_act(
            x, m.running_mean, m.running_var, m.weight, m.bias, m.training, act="silu", backend=backend
        )

    return run


CASES = [
    ("batch_norm", True),
    ("batch_norm", False),
    ("batch_norm_act", True),
    ("instance_norm", True),
    ("instance_norm_running", True),
    ("instance_norm_running", False),
    ("group_norm", True),
    ("layer_norm", True),
    ("rms_norm", True),
]


def _layouts(shape: tuple[int, ...]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(memory order of x, memory order of dy): every order of x (every third of a 5-D input's
    120), dy contiguous, in x's order or reversed (an order lists the dims from the slowest to
    the fastest)."""
    nd = len(shape)
    ident, rev = tuple(range(nd)), tuple(reversed(range(nd)))
    orders = list(itertools.permutations(range(nd)))[:: 3 if nd == 5 else 1]
    return [(o, d) for o in orders for d in dict.fromkeys((ident, o, rev))]


def _in_order(t: Tensor, order: tuple[int, ...]) -> Tensor:
    inv = [order.index(i) for i in range(t.dim())]
    return t.permute(order).contiguous().permute(inv)


def _grads(
    m: torch.nn.Module, run: Callable[[torch.nn.Module, Tensor], Tensor], x: Tensor, dy: Tensor, dtype: torch.dtype
) -> dict[str, Tensor]:
    m = m.to(dtype)
    xi = x.detach().to(dtype).requires_grad_()
    params = list(m.parameters())
    y = run(m, xi)
    grads = torch.autograd.grad(y, [xi, *params], dy.to(dtype))
    return dict(zip(["y", "dx", *(f"d{n}" for n, _ in m.named_parameters())], [y.detach(), *grads]))


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
@pytest.mark.parametrize(("kind", "training"), CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("ndim", [3, 4, 5])
def test_gradients_on_every_layout(kind: str, training: bool, ndim: int, backend: str | None) -> None:
    if backend == "numba" and kind == "instance_norm_running" and not training:
        pytest.skip("numba declines instance_norm(use_input_stats=False): its unsupported reason")
    for shape in SHAPES[ndim]:
        C = shape[1]
        norm = "batch_norm" if kind == "batch_norm_act" else kind
        m = _module(norm, C, ndim, backend, shape[-1]).train(training)
        run = _act(backend) if kind == "batch_norm_act" else (lambda mod, t: mod(t))
        spatial = torch.Size(shape[2:]).numel()
        if (training and "batch_norm" in kind and shape[0] * spatial < 2) or ("instance" in kind and spatial < 2):
            continue
        g = torch.Generator().manual_seed(sum(shape) * 31 + ndim)
        x = torch.randn(shape, generator=g, dtype=F64)
        dy = torch.randn(shape, generator=g, dtype=F64)
        state = {k: v.clone() for k, v in m.state_dict().items()}
        ref_m = _module(norm, C, ndim, "reference", shape[-1]).train(training)
        ref_m.load_state_dict(state)
        ref = _grads(ref_m, _act("reference") if kind == "batch_norm_act" else run, x, dy, F64)
        on_torch = _module(norm, C, ndim, "torch", shape[-1]).train(training)
        on_torch.load_state_dict(state)
        low = _grads(on_torch, _act("torch") if kind == "batch_norm_act" else run, x, dy, torch.float32)
        for order, dorder in _layouts(shape):
            m.load_state_dict(state)
            got = _grads(m, run, _in_order(x, order), _in_order(dy, dorder), torch.float32)
            try:
                assert_within_bound(got, ref, low)
            except AssertionError as e:
                raise AssertionError(f"{kind} {shape} x in order {order}, dy in order {dorder}: {e}") from None


@pytest.mark.parametrize("compiler", ["aot_eager"])
@pytest.mark.parametrize("kind", ["batch_norm", "instance_norm"])
def test_gradients_on_odd_layouts_under_compile(kind: str, compiler: str) -> None:
    """The layouts ATen gets wrong, through torch.compile (fullgraph): aot_eager runs ATen's
    backward on the traced layouts (Inductor generates its own, right, backward)."""
    shape = (1, 4, 1, 5) if kind == "batch_norm" else (1, 4, 3, 5)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g, dtype=F64)
    dy = torch.randn(shape, generator=g, dtype=F64)
    m = _module(kind, 4, 4, None).train()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    ref = _grads(m, lambda mod, t: mod(t), x, dy, F64)
    m.load_state_dict(state)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: m(t), backend=compiler, fullgraph=True)
    # batch_norm: x contiguous, dy channels_last with odd strides; instance_norm: both channels_last
    x_order, dy_order = ((0, 1, 2, 3), (3, 2, 1, 0)) if kind == "batch_norm" else ((0, 2, 3, 1),) * 2
    got = _grads(m, lambda mod, t: compiled(t), _in_order(x, x_order), _in_order(dy, dy_order), F64)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
@pytest.mark.parametrize("kind", ["batch_norm", "instance_norm", "group_norm"])
def test_per_sample_gradients_of_a_channels_last_batch(kind: str, backend: str | None) -> None:
    """vmap(grad) through functional_call (per-sample gradients) over a channels_last batch: each
    sample's parameter gradients equal those of its own call (BatchNorm in eval)."""
    from torch.func import functional_call, grad, vmap

    m = _module(kind, 3, 4, backend).float().eval()
    params = {k: v.detach() for k, v in m.named_parameters()}
    g = torch.Generator().manual_seed(11)
    xs = torch.randn(4, 3, 5, 6, generator=g).contiguous(memory_format=torch.channels_last)
    up = torch.randn(3, 5, 6, generator=g)

    def loss(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return (functional_call(m, p, (x[None],))[0] * up).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, xs)
    for i in range(xs.shape[0]):
        one = grad(loss)(params, xs[i])
        for name in params:
            torch.testing.assert_close(per_sample[name][i], one[name], msg=f"sample {i} d{name}")
