"""The numba channel norms' session-8 paths (``normkit.ops.numba.channel_norm``):

* eager calls on plain tensors skip the custom ops: one autograd Function (``ChannelNorm``)
  where autograd records, the kernels alone where it does not; the statistics carry no
  gradient;
* the kernels run over ranges of tasks (one range below ``PARALLEL_MIN_ELEMENTS``, one per
  thread above it): the same bits at 1 and 2 threads on shapes above the threshold, NC* and
  channels_last, every norm;
* what must still reach the custom ops: ``torch.func`` (vmap of grad, jacrev), batched upstream
  gradients (``is_grads_batched``: the eager backward has no storage to read and takes the
  graph backward), double backward, ``torch.jit.trace``, inference tensors.

Random weights, biases and upstream gradients; torch in float64 is the oracle.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from cases import seed_of

pytest.importorskip("numba")
cn = pytest.importorskip("normkit.ops.numba.channel_norm")
engine = pytest.importorskip("normkit.ops.numba._engine")


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# name -> (normkit's function, torch's), both (x, w, b) -> y; BatchNorm in training.
OPS = {
    "batch_norm": (
        lambda x, w, b: cn.batch_norm(x, None, None, w, b, True, 0.1, 1e-5),
        lambda x, w, b: F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5),
    ),
    "batch_norm_eval": (
        lambda x, w, b: cn.batch_norm(x, _RM.to(x.dtype), _RV.to(x.dtype), w, b, False),
        lambda x, w, b: F.batch_norm(x, _RM.to(x.dtype), _RV.to(x.dtype), w, b, False),
    ),
    "batch_norm_relu": (
        lambda x, w, b: cn.batch_norm_act(x, None, None, w, b, True, 0.1, 1e-5, "relu"),
        lambda x, w, b: F.relu(F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)),
    ),
    "group_norm": (lambda x, w, b: cn.group_norm(x, 3, w, b, 1e-5), lambda x, w, b: F.group_norm(x, 3, w, b, 1e-5)),
    "instance_norm": (
        lambda x, w, b: cn.instance_norm(x, None, None, w, b),
        lambda x, w, b: F.instance_norm(x, None, None, w, b),
    ),
}
_RM = torch.linspace(-1, 1, 6, dtype=torch.float64)
_RV = torch.linspace(0.5, 2, 6, dtype=torch.float64)


def _data(shape: tuple[int, ...], seed: str, dtype=torch.float32, channels_last: bool = False):
    g = torch.Generator().manual_seed(seed_of(seed))
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    w, b = (torch.randn(shape[1], generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    if channels_last:
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    return x, w, b, dy


def _grads(fn, x: Tensor, w: Tensor, b: Tensor, dy: Tensor) -> dict[str, Tensor]:
    xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = fn(xs, ws, bs)
    dx, dw, db = torch.autograd.grad(y, (xs, ws, bs), dy)
    return {"y": y.detach(), "dx": dx, "dw": dw, "db": db}


def _same_bits(a: dict[str, Tensor], b: dict[str, Tensor], what: str) -> None:
    for name in a:
        assert torch.equal(a[name].reshape(-1).view(torch.int32), b[name].reshape(-1).view(torch.int32)), (what, name)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("op", sorted(OPS))
def test_ranges_give_the_same_bits_at_one_and_two_threads(op: str, channels_last: bool, restore_threads) -> None:
    # 5 * 6 * 67 * 41 = 82410 elements: above PARALLEL_MIN_ELEMENTS, so two threads run two ranges.
    shape = (5, 6, 67, 41)
    assert shape[0] * shape[1] * shape[2] * shape[3] >= engine.PARALLEL_MIN_ELEMENTS
    x, w, b, dy = _data(shape, f"ranges {op}", channels_last=channels_last)
    results = []
    for n in (1, 2):
        torch.set_num_threads(n)
        results.append(_grads(OPS[op][0], x, w, b, dy))
    _same_bits(results[0], results[1], f"{op} at 1 and 2 threads")
    theirs = _grads(OPS[op][1], *(t.double() for t in (x, w, b, dy)))
    for name, value in results[0].items():
        torch.testing.assert_close(value.double(), theirs[name], rtol=2e-4, atol=2e-4, msg=name)


@pytest.mark.parametrize("op", sorted(OPS))
def test_eager_call_is_one_function_and_a_no_grad_call_none(op: str) -> None:
    x, w, b, dy = _data((4, 6, 5, 7), f"eager {op}")
    mine, torch_fn = OPS[op]
    xs = x.clone().requires_grad_()
    y = mine(xs, w, b)
    assert type(y.grad_fn).__name__ == "ChannelNormBackward"
    with torch.no_grad():
        assert mine(xs, w, b).grad_fn is None
    stats = cn._channel(x.clone().requires_grad_(), w, b, None, None, 3, True, 1e-5, 0)
    assert stats[0].requires_grad and not any(s.requires_grad for s in stats[1:])
    ours = _grads(mine, x.double(), w.double(), b.double(), dy.double())
    theirs = _grads(torch_fn, x.double(), w.double(), b.double(), dy.double())
    for name, value in ours.items():
        torch.testing.assert_close(value, theirs[name], rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("op", ["batch_norm", "group_norm", "batch_norm_relu"])
def test_batched_upstream_gradients_take_the_graph_backward(op: str) -> None:
    x, w, b, _ = _data((3, 6, 4, 5), f"batched {op}", torch.float64)
    g = torch.Generator().manual_seed(seed_of("batched dys", op))
    dys = torch.randn((4, *x.shape), generator=g, dtype=torch.float64)
    results = []
    for fn in OPS[op]:
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        results.append(torch.autograd.grad(fn(xs, ws, bs), (xs, ws, bs), dys, is_grads_batched=True))
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("op", sorted(OPS))
def test_batched_upstream_gradients_with_create_graph_differentiate_again(op: str) -> None:
    """``is_grads_batched`` with ``create_graph``: the batched gradients are differentiable (the
    graph backward, not the backward op, which has no derivative). torch's own GroupNorm fails
    here, so the oracle is one unbatched double backward per upstream gradient."""
    x, w, b, _ = _data((3, 6, 4, 5), f"batched twice {op}", torch.float64)
    g = torch.Generator().manual_seed(seed_of("batched twice dys", op))
    dys = torch.randn((3, *x.shape), generator=g, dtype=torch.float64)
    mine, torch_fn = OPS[op]

    def second(fn, dy, batched):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        (dx,) = torch.autograd.grad(fn(xs, ws, b), xs, dy, create_graph=True, is_grads_batched=batched)
        return torch.autograd.grad((dx * dx).sum(), (xs, ws), materialize_grads=True)

    ours = second(mine, dys, True)
    unbatched = [second(torch_fn, dy, False) for dy in dys]
    for got, name, i in ((ours[0], "x", 0), (ours[1], "w", 1)):
        want = sum(r[i] for r in unbatched)
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9, msg=name)


@pytest.mark.parametrize("op", ["batch_norm", "group_norm", "instance_norm"])
def test_torch_func_goes_through_the_custom_ops(op: str) -> None:
    x, w, b, dy = _data((3, 6, 4, 5), f"func {op}", torch.float64)
    results = []
    for fn in OPS[op]:
        per_sample = torch.func.vmap(
            torch.func.grad(lambda xi, w: (fn(xi[None], w, b) * dy[:1]).sum(), argnums=1), in_dims=(0, None)
        )(x, w)
        jac = torch.func.jacrev(lambda w: fn(x, w, b))(w)
        results.append((per_sample, jac))
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("op", ["batch_norm", "group_norm", "instance_norm"])
def test_double_backward_matches_torch(op: str) -> None:
    x, w, b, dy = _data((3, 6, 4, 5), f"double {op}", torch.float64)
    results = []
    for fn in OPS[op]:
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        (dx,) = torch.autograd.grad(fn(xs, ws, bs), xs, dy, create_graph=True)
        results.append(torch.autograd.grad((dx * dx).sum(), (xs, ws)))
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-9)


def test_jit_trace_records_the_custom_ops() -> None:
    x, w, b, _ = _data((3, 6, 4, 5), "trace")
    m = torch.nn.GroupNorm(3, 6)
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(b)

    class Traced(torch.nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return cn.group_norm(x, 3, m.weight, m.bias)

    module = Traced()
    module.m = m
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, x)
    assert "normkit_numba::channel_fwd" in str(traced.graph)
    x2, _, _, dy2 = _data((5, 6, 4, 5), "trace new input")
    x2.requires_grad_()
    ours = torch.autograd.grad(traced(x2), (x2, m.weight, m.bias), dy2)
    theirs = torch.autograd.grad(m(x2), (x2, m.weight, m.bias), dy2)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_inference_tensors() -> None:
    x, w, b, _ = _data((3, 6, 4, 5), "inference")
    with torch.inference_mode():
        xi = x.clone()
        mean, var = torch.zeros(6), torch.ones(6)
        y = cn.batch_norm(xi, mean, var, w, b, True, 0.1, 1e-5)
        assert y.is_inference()
    torch.testing.assert_close(y, F.batch_norm(x, None, None, w, b, True), rtol=1e-5, atol=1e-5)
    assert not torch.equal(mean, torch.zeros(6))
    # Autograd would save an inference tensor: torch's error, the running statistics untouched.
    wg = w.clone().requires_grad_()
    mean, var = torch.zeros(6), torch.ones(6)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved"):
        cn.batch_norm(xi, mean, var, wg, b, True, 0.1, 1e-5)
    assert torch.equal(mean, torch.zeros(6)) and torch.equal(var, torch.ones(6))
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved"):
        cn.group_norm(xi, 3, wg, b)


def test_failed_update_leaves_the_running_statistics_untouched() -> None:
    x, w, b, _ = _data((3, 6, 4, 5), "failed")
    mean, var = torch.zeros(6), torch.ones(5)
    with pytest.raises(RuntimeError, match="running statistics"):
        cn.batch_norm(x.requires_grad_(), mean, var, w, b, True, 0.1, 1e-5)
    assert torch.equal(mean, torch.zeros(6)) and torch.equal(var, torch.ones(5))
