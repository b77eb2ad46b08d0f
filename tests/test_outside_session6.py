"""An outside user's attack on two changes: the default path settled on ATen before normkit's
checks (``normkit.backends.auto_choice``), and numba's second derivatives through the torch
composition (``create_graph=True``).

The oracle is torch itself: ``torch.nn.functional`` and ``torch.nn`` for the default path (the
same error type and message, the same result to the bit, nothing changed by a failed call), and
``backend="torch"`` in float64 for the numba double backward. Every case draws random inputs,
weights and upstream gradients.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

import normkit
from _outside import assert_same_error, raised
from blocks_cases import DEVICE, TRITON
from normkit import functional as NF
from normkit import functional_blocks as FB

F64 = torch.float64


def _randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


# ---- the settled default path against torch.nn.functional ----------------------------------

X = _randn(2, 6, 5, 5)
W6, B6, W5 = _randn(6, seed=1), _randn(6, seed=2), _randn(5, seed=3)

# Calls of the four ops the settled path hands to ATen (and batch_norm's long path), good and
# bad: each runs as ``call(module)`` with module torch.nn.functional or normkit.functional.
CALLS: dict[str, Callable[[Any], Tensor]] = {
    "ln int shape": lambda m: m.layer_norm(X, 5),
    "ln shape of a 1-d tensor": lambda m: m.layer_norm(X, torch.tensor([5])),
    "ln float in shape": lambda m: m.layer_norm(X, (5.0,)),
    "ln bool in shape": lambda m: m.layer_norm(X, (True,)),
    "ln shape mismatch": lambda m: m.layer_norm(X, (4,)),
    "ln empty shape": lambda m: m.layer_norm(X, ()),
    "ln negative shape": lambda m: m.layer_norm(X, (-5,)),
    "ln weight of other shape": lambda m: m.layer_norm(X, (5,), W6),
    "ln weight 2-d": lambda m: m.layer_norm(X, (5,), W5[None]),
    "ln weight float64": lambda m: m.layer_norm(X, (5,), W5.double()),
    "ln weight float16": lambda m: m.layer_norm(X, (5,), W5.half()),
    "ln bf16 input float weight": lambda m: m.layer_norm(X.bfloat16(), (5,), W5),
    "ln weight on meta": lambda m: m.layer_norm(X, (5,), W5.to("meta")),
    "ln input on meta": lambda m: m.layer_norm(X.to("meta"), (5,), W5),
    "ln weight a list": lambda m: m.layer_norm(X, (5,), [1.0] * 5),
    "ln input a list": lambda m: m.layer_norm([1.0, 2.0], (2,)),
    "ln int input": lambda m: m.layer_norm(X.long(), (5,)),
    "ln complex input": lambda m: m.layer_norm(torch.ones(3, 4, dtype=torch.cfloat), (4,)),
    "ln eps a str": lambda m: m.layer_norm(X, (5,), None, None, "a"),
    "ln eps an int": lambda m: m.layer_norm(X, (5,), None, None, 1),
    "ln eps a 0-dim tensor": lambda m: m.layer_norm(X, (5,), None, None, torch.tensor(1e-3)),
    "ln empty batch": lambda m: m.layer_norm(torch.ones(0, 5), (5,)),
    "ln no features": lambda m: m.layer_norm(torch.ones(3, 0), (0,)),
    "ln non-contiguous": lambda m: m.layer_norm(X.transpose(1, 3), (6,), W6, B6),
    "rms int shape": lambda m: m.rms_norm(X, 5),
    "rms shape mismatch": lambda m: m.rms_norm(X, (4,)),
    "rms weight float64": lambda m: m.rms_norm(X, (5,), W5.double()),
    "rms weight bool": lambda m: m.rms_norm(X, (5,), W5 > 0),
    "rms int input": lambda m: m.rms_norm(X.long(), (5,)),
    "rms eps an int": lambda m: m.rms_norm(X, (5,), None, 1),
    "rms weight on meta": lambda m: m.rms_norm(X, (5,), W5.to("meta")),
    "rms half input float weight": lambda m: m.rms_norm(X.half(), (5,), W5),
    "gn groups not dividing": lambda m: m.group_norm(X, 4),
    "gn zero groups": lambda m: m.group_norm(X, 0),
    "gn negative groups": lambda m: m.group_norm(X, -2),
    "gn float groups": lambda m: m.group_norm(X, 2.0),
    "gn str groups": lambda m: m.group_norm(X, "2"),
    "gn None groups": lambda m: m.group_norm(X, None),
    "gn bool groups": lambda m: m.group_norm(X, True),
    "gn 0-dim tensor groups": lambda m: m.group_norm(X, torch.tensor(2)),
    "gn 1-d input": lambda m: m.group_norm(torch.ones(6), 2),
    "gn one value a group": lambda m: m.group_norm(torch.ones(1, 6), 6),
    "gn empty batch": lambda m: m.group_norm(torch.ones(0, 6, 3), 2),
    "gn weight of other shape": lambda m: m.group_norm(X, 2, W5),
    "gn weight float64": lambda m: m.group_norm(X, 2, W6.double()),
    "gn weight on meta": lambda m: m.group_norm(X, 2, W6.to("meta")),
    "gn int input": lambda m: m.group_norm(X.long(), 2),
    "gn bf16 input float affine": lambda m: m.group_norm(X.bfloat16(), 2, W6, B6),
    "in one spatial element": lambda m: m.instance_norm(torch.ones(2, 3, 1)),
    "in 2-d input": lambda m: m.instance_norm(torch.ones(2, 3)),
    "in 1-d input": lambda m: m.instance_norm(torch.ones(6)),
    "in no running stats in eval": lambda m: m.instance_norm(X, use_input_stats=False),
    "in weight of other shape": lambda m: m.instance_norm(X, weight=W5),
    "in affine float64": lambda m: m.instance_norm(X, weight=W6.double(), bias=B6.double()),
    "in weight on meta": lambda m: m.instance_norm(X, weight=W6.to("meta")),
    "in int input": lambda m: m.instance_norm(X.long()),
    "in momentum a str": lambda m: m.instance_norm(X, momentum="a"),
    "in eps a str": lambda m: m.instance_norm(X, eps="a"),
    "in half input float affine": lambda m: m.instance_norm(X.half(), weight=W6, bias=B6),
    "in eval with running_mean only": lambda m: m.instance_norm(X, torch.zeros(6), None, use_input_stats=False),
    "in eval with running_var only": lambda m: m.instance_norm(X, None, torch.ones(6), use_input_stats=False),
    "in training with running_var only": lambda m: m.instance_norm(X, None, torch.ones(6)),
    "bn int input": lambda m: m.batch_norm(X.long(), None, None, training=True),
    "bn affine float64": lambda m: m.batch_norm(X, None, None, W6.double(), B6.double(), True),
    "bn one value a channel": lambda m: m.batch_norm(torch.ones(1, 6), None, None, training=True),
}


class _PassThrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        return func(*args, **(kwargs or {}))


# Where the call runs: the settled path (no context), and each thing that must not change what
# the user sees (a backend named, a torch function mode, inference mode, CPU autocast).
CONTEXTS: dict[str, Callable[[], contextlib.AbstractContextManager[Any]]] = {
    "default": contextlib.nullcontext,
    "use_backend torch": lambda: normkit.use_backend("torch"),
    "torch function mode": _PassThrough,
    "inference_mode": torch.inference_mode,
    "autocast bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
}


def _outcome(call: Callable[[], Tensor], context: Callable[[], Any]) -> Tensor | BaseException:
    with context():
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - the point is to compare whatever is raised
            return e


def _assert_same_outcome(theirs: Tensor | BaseException, ours: Tensor | BaseException, what: str) -> None:
    if isinstance(theirs, BaseException):
        assert_same_error(theirs, ours if isinstance(ours, BaseException) else None, what)
        return
    assert isinstance(ours, Tensor), f"{what}: torch returns a tensor, normkit raises {ours!r}"
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, what
    if theirs.device.type != "meta":
        assert torch.equal(ours, theirs) or (ours.isnan() == theirs.isnan()).all(), what


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("context", list(CONTEXTS))
@pytest.mark.parametrize("case", list(CALLS))
def test_functional_call_is_torch_s_in_every_context(case: str, context: str) -> None:
    call = CALLS[case]
    theirs = _outcome(lambda: call(F), CONTEXTS[context])
    ours = _outcome(lambda: call(NF), CONTEXTS[context])
    _assert_same_outcome(theirs, ours, f"{case} ({context})")


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(0, 4), min_size=1, max_size=4),
    trailing=st.lists(st.integers(-1, 4), min_size=0, max_size=3),
    groups=st.integers(-1, 5),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64, torch.int32]),
    param_dtype=st.sampled_from([None, torch.float32, torch.float64]),
)
def test_random_shapes_fail_as_torch_fails(shape, trailing, groups, dtype, param_dtype) -> None:  # noqa: ANN001
    x = (torch.randn(shape, dtype=F64) * 3).to(dtype)
    weight = None if param_dtype is None else torch.randn([max(d, 0) for d in trailing], dtype=param_dtype)
    channel_weight = None if param_dtype is None or len(shape) < 2 else torch.randn(shape[1], dtype=param_dtype)
    calls = {
        "layer_norm": lambda m: m.layer_norm(x, trailing, weight, weight),
        "rms_norm": lambda m: m.rms_norm(x, trailing, weight),
        "group_norm": lambda m: m.group_norm(x, groups, channel_weight, channel_weight),
        "instance_norm": lambda m: m.instance_norm(x, None, None, channel_weight, channel_weight),
    }
    for name, call in calls.items():
        theirs = _outcome(lambda call=call: call(F), contextlib.nullcontext)
        if name == "instance_norm" and x.numel() == 0:
            continue  # (an empty instance_norm is normkit's own: the empty output, by design)
        ours = _outcome(lambda call=call: call(NF), contextlib.nullcontext)
        _assert_same_outcome(theirs, ours, f"{name}{tuple(shape)} {trailing} groups={groups} {dtype} {param_dtype}")


# ---- modules against torch.nn: the same outcome, and a failed call changes nothing ----------

MODULES: dict[str, Callable[[Any], nn.Module]] = {
    "BatchNorm2d": lambda ns: ns.BatchNorm2d(6),
    "BatchNorm2d momentum None": lambda ns: ns.BatchNorm2d(6, momentum=None),
    "BatchNorm2d untracked": lambda ns: ns.BatchNorm2d(6, track_running_stats=False),
    "InstanceNorm2d": lambda ns: ns.InstanceNorm2d(6),
    "InstanceNorm2d tracked": lambda ns: ns.InstanceNorm2d(6, affine=True, track_running_stats=True),
    "GroupNorm": lambda ns: ns.GroupNorm(3, 6),
    "LayerNorm": lambda ns: ns.LayerNorm([5, 5]),
    "LayerNorm no bias": lambda ns: ns.LayerNorm(5, bias=False),
    "RMSNorm": lambda ns: ns.RMSNorm([5], eps=1e-3),
    "RMSNorm default eps": lambda ns: ns.RMSNorm(5),
    "LazyBatchNorm2d": lambda ns: ns.LazyBatchNorm2d(),
    "LazyInstanceNorm2d": lambda ns: ns.LazyInstanceNorm2d(affine=True, track_running_stats=True),
}
INPUTS: dict[str, Callable[[], Tensor]] = {
    "float": lambda: _randn(4, 6, 5, 5, seed=4),
    "other channels": lambda: _randn(4, 7, 5, 5, seed=4),
    "no batch dim": lambda: _randn(6, 5, 5, seed=4),
    "int": lambda: torch.randint(0, 5, (4, 6, 5, 5)),
    "float64": lambda: _randn(4, 6, 5, 5, dtype=F64, seed=4),
    "float16": lambda: _randn(4, 6, 5, 5, dtype=torch.half, seed=4),
    "bfloat16": lambda: _randn(4, 6, 5, 5, dtype=torch.bfloat16, seed=4),
    "meta": lambda: torch.empty(4, 6, 5, 5, device="meta"),
    "one value a channel": lambda: _randn(1, 6, 1, 1, seed=4),
    "non-contiguous": lambda: _randn(5, 5, 6, 4, seed=4).permute(3, 2, 0, 1),
}
CONVERSIONS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "as built": lambda m: m,
    ".half()": lambda m: m.half(),
    ".double()": lambda m: m.double(),
    ".to(bfloat16)": lambda m: m.to(torch.bfloat16),
}


def _state(module: nn.Module) -> dict[str, Tensor | None]:
    return {
        k: None if isinstance(v, nn.parameter.UninitializedTensorMixin) else v.detach().clone()
        for k, v in module.state_dict().items()
    }


def _assert_same_state(a: dict[str, Tensor | None], b: dict[str, Tensor | None], what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        if a[k] is None or b[k] is None:
            assert a[k] is None and b[k] is None, f"{what}: {k}"
        else:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{what}: {k}"


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", list(MODULES))
def test_module_call_is_torch_s_and_a_failed_one_changes_nothing(name: str) -> None:
    for conversion, convert in CONVERSIONS.items():
        for training in (True, False):
            for input_name, make in INPUTS.items():
                torch.manual_seed(1)
                theirs = convert(MODULES[name](nn)).train(training)
                for p in theirs.parameters():
                    if not isinstance(p, nn.parameter.UninitializedParameter):
                        with torch.no_grad():
                            p.copy_(torch.randn_like(p))
                ours = convert(MODULES[name](normkit)).train(training)
                ours.load_state_dict(theirs.state_dict())
                x, before = make(), _state(ours)
                what = f"{name} {conversion} training={training} input={input_name}"
                y_theirs = _outcome(lambda: theirs(x), contextlib.nullcontext)  # noqa: B023
                y_ours = _outcome(lambda: ours(x), contextlib.nullcontext)  # noqa: B023
                _assert_same_outcome(y_theirs, y_ours, what)
                if isinstance(y_ours, BaseException):
                    # (torch increments num_batches_tracked before a call that then fails)
                    _assert_same_state(before, _state(ours), f"{what}: a failed call changed the state")
                else:
                    _assert_same_state(_state(theirs), _state(ours), what)


# ---- numba second derivatives --------------------------------------------------------------

pytest.importorskip("numba")

D = 24
# Ops through the numba kernels, each ``call(backend, *tensors)`` over the differentiated
# tensors' shapes; the running statistics are fresh zeros and ones at each call.
NUMBA_OPS: dict[str, tuple[tuple[tuple[int, ...], ...], Callable[..., Any]]] = {
    "batch_norm with running stats": (
        ((4, 6, 3, 5), (6,), (6,)),
        lambda be, x, w, b: NF.batch_norm(
            x, torch.zeros(6, dtype=x.dtype), torch.ones(6, dtype=x.dtype), w, b, True, backend=be
        ),
    ),
    "group_norm_act": (
        ((3, 6, 4, 5), (6,), (6,)),
        lambda be, x, w, b: NF.group_norm_act(x, 3, w, b, act="silu", backend=be),
    ),
    "layer_norm": (((3, 5, D), (D,), (D,)), lambda be, x, w, b: NF.layer_norm(x, (D,), w, b, backend=be)),
    "add_rms_norm": (((3, 5, D), (3, 5, D), (D,)), lambda be, x, r, w: NF.add_rms_norm(x, r, (D,), w, backend=be)),
    "dyt": (((3, 5, D), (1,), (D,), (D,)), lambda be, x, a, w, b: FB.dyt(x, a, w, b, backend=be)),
}


def _penalty_gradients(name: str, backend: str, wrap: Callable[..., Any]) -> list[Tensor]:
    """The gradients of a gradient penalty ``sum_i |d<y, g>/d t_i|^2`` (``y`` every result,
    ``g`` random) with respect to every tensor ``t_i``, the op run through ``wrap``."""
    shapes, call = NUMBA_OPS[name]
    leaves = [_randn(*s, dtype=F64, seed=10 + i).requires_grad_() for i, s in enumerate(shapes)]
    out = wrap(lambda *t: call(backend, *t), *leaves)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o * _randn(*o.shape, dtype=F64, seed=30 + i)).sum() for i, o in enumerate(outs))
    first = torch.autograd.grad(loss, leaves, create_graph=True)
    penalty = sum((f**2).sum() for f in first)
    return [g.detach() for g in (*first, *torch.autograd.grad(penalty, leaves, materialize_grads=True))]


def _checkpointed(fn: Callable[..., Any], *args: Tensor) -> Any:
    return checkpoint.checkpoint(fn, *args, use_reentrant=False)


@pytest.mark.parametrize("name", list(NUMBA_OPS))
def test_numba_double_backward_through_non_reentrant_checkpoint(name: str) -> None:
    # Checkpointing lets a backward unpack its saved tensors once; the numba backward read them
    # once to decide whether to build a graph and again to compute (CheckpointError).
    expected = _penalty_gradients(name, "torch", _checkpointed)
    actual = _penalty_gradients(name, "numba", _checkpointed)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(NUMBA_OPS))
def test_numba_double_backward_without_checkpoint(name: str) -> None:
    expected = _penalty_gradients(name, "torch", lambda fn, *t: fn(*t))
    actual = _penalty_gradients(name, "numba", lambda fn, *t: fn(*t))
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_numba_checkpointed_batch_norm_moves_running_stats_as_often_as_without() -> None:
    # Held: the checkpoint's recomputation stops once the saved tensors are back, before numba's
    # launcher writes the running statistics (ATen writes them during the recomputation: torch
    # moves them twice). normkit moves them once, as an unchecked call does.
    x = _randn(4, 6, 3, 5, dtype=F64).requires_grad_()
    mean, var = torch.zeros(6, dtype=F64), torch.ones(6, dtype=F64)
    y = _checkpointed(lambda t: NF.batch_norm(t, mean, var, None, None, True, backend="numba"), x)
    after_forward = (mean.clone(), var.clone())
    (dx,) = torch.autograd.grad((y * torch.randn_like(y)).sum(), x, create_graph=True)
    torch.autograd.grad((dx**2).sum(), x)
    assert torch.equal(mean, after_forward[0]) and torch.equal(var, after_forward[1])


def test_numba_double_backward_twice_with_retain_graph() -> None:
    def run(backend: str) -> list[Tensor]:
        x, w = _randn(3, 6, 4, 5, dtype=F64).requires_grad_(), _randn(6, dtype=F64, seed=1).requires_grad_()
        y = NF.group_norm(x, 2, w, None, backend=backend)
        g = _randn(3, 6, 4, 5, dtype=F64, seed=2)
        got = []
        for _ in range(2):
            first = torch.autograd.grad(y, (x, w), g, create_graph=True, retain_graph=True)
            got += torch.autograd.grad(sum((f**2).sum() for f in first), (x, w), retain_graph=True)
        y.backward(g, retain_graph=True)
        y.backward(g)
        return [*got, x.grad, w.grad]

    for a, e in zip(run("numba"), run("torch"), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_numba_vmap_grad_keeps_the_kernel_bits() -> None:
    x, w = _randn(5, 3, D), _randn(D, seed=1)
    direction = _randn(D, seed=2)

    def loss(weight: Tensor, rows: Tensor) -> Tensor:
        return (NF.rms_norm(rows, (D,), weight, backend="numba") * direction).sum()

    per_sample = []
    for i in range(5):
        leaf = w.clone().requires_grad_()
        loss(leaf, x[i]).backward()
        per_sample.append(leaf.grad)
    assert torch.equal(torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(w, x), torch.stack(per_sample))


def test_numba_jacrev_of_grad_through_residual_out() -> None:
    x, r, w = _randn(4, 5, dtype=F64), _randn(4, 5, dtype=F64, seed=1), _randn(5, dtype=F64, seed=2)

    def loss(x: Tensor, r: Tensor, w: Tensor, backend: str) -> Tensor:
        y, residual_out = NF.add_rms_norm(x, r, (5,), w, backend=backend)
        return (y**2).sum() + (residual_out**3 * w).sum()

    for argnums in (0, 1, 2):
        jac = torch.func.jacrev(torch.func.grad(loss, argnums=2), argnums=argnums)
        torch.testing.assert_close(jac(x, r, w, "numba"), jac(x, r, w, "torch"), rtol=1e-10, atol=1e-10)


CHANNEL_OPS: dict[str, Callable[..., Tensor]] = {
    "batch_norm": lambda x, w, b, be: NF.batch_norm(x, None, None, w, b, True, backend=be),
    "batch_norm_act": lambda x, w, b, be: NF.batch_norm_act(x, None, None, w, b, True, act="silu", backend=be),
    "group_norm": lambda x, w, b, be: NF.group_norm(x, 3, w, b, backend=be),
    "group_norm_act": lambda x, w, b, be: NF.group_norm_act(x, 3, w, b, act="gelu", backend=be),
    "instance_norm": lambda x, w, b, be: NF.instance_norm(x, None, None, w, b, backend=be),
}


@pytest.mark.parametrize("name", list(CHANNEL_OPS))
def test_numba_nested_torch_func_grad_matches_torch(name: str) -> None:
    op = CHANNEL_OPS[name]
    x, w, b = _randn(4, 6, 3, 5, dtype=F64), _randn(6, dtype=F64, seed=1), _randn(6, dtype=F64, seed=2)
    direction, upstream = _randn(6, dtype=F64, seed=3), _randn(4, 6, 3, 5, dtype=F64, seed=4)

    def loss(w: Tensor, x: Tensor, backend: str) -> Tensor:
        return (op(x, w, b, backend) ** 3 * upstream).sum()

    def grad_of_grad(argnums: int, backend: str) -> Tensor:
        return torch.func.grad(lambda *wx: (torch.func.grad(loss)(*wx, backend) * direction).sum(), argnums=argnums)(
            w, x
        )

    for argnums in (0, 1):
        torch.testing.assert_close(
            grad_of_grad(argnums, "numba"), grad_of_grad(argnums, "torch"), rtol=1e-10, atol=1e-10
        )


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 3),
    groups=st.sampled_from([1, 2, 3]),
    per_group=st.integers(1, 3),
    spatial=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    channels_last=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_numba_group_norm_second_derivatives_over_random_shapes(
    n, groups, per_group, spatial, channels_last, seed
) -> None:  # noqa: ANN001
    shape = (n, groups * per_group, *spatial)
    if n * per_group * math.prod(spatial) < 2:
        return  # (torch refuses one value a group)
    x = _randn(*shape, dtype=F64, seed=seed)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = _randn(shape[1], dtype=F64, seed=seed + 1), _randn(shape[1], dtype=F64, seed=seed + 2)
    upstream, direction = _randn(*shape, dtype=F64, seed=seed + 3), _randn(*shape, dtype=F64, seed=seed + 4)

    def second(backend: str) -> list[Tensor]:
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        y = NF.group_norm(leaves[0], groups, leaves[1], leaves[2], backend=backend)
        first = torch.autograd.grad(y, leaves, upstream, create_graph=True)
        return list(torch.autograd.grad((first[0] * direction).sum(), leaves, materialize_grads=True))

    for a, e in zip(second("numba"), second("torch"), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", [None, "torch", "reference", "numba"])
@pytest.mark.parametrize("unwritable", ["inference", "expanded"])
@pytest.mark.parametrize("inference", ["running_mean", "running_var"])
def test_instance_norm_unwritable_running_stat_fails_as_torch_and_changes_nothing(
    inference: str, unwritable: str, backend: str | None
) -> None:
    # ATen's instance_norm copies the new statistics in after its batch norm, the mean first:
    # its refusal of an inference tensor came after a write (of the mean, or of the inference
    # tensor itself). (ATen's batch_norm updates such statistics without complaint, as normkit.)
    op = "instance_norm"
    x = _randn(4, 6, 3, 3)

    def stats() -> dict[str, Tensor]:
        out = {"running_mean": _randn(6, seed=1), "running_var": _randn(6, seed=2).abs() + 0.5}
        if unwritable == "expanded":  # (every element the same memory)
            out[inference] = out[inference][:1].expand(6)
        else:
            with torch.inference_mode():
                out[inference] = out[inference].clone()
        return out

    theirs, ours = stats(), stats()
    error = raised(lambda: getattr(F, op)(x, theirs["running_mean"], theirs["running_var"], None, None, True))
    assert error is not None
    before = {k: v.clone() for k, v in ours.items()}
    got = raised(
        lambda: getattr(NF, op)(x, ours["running_mean"], ours["running_var"], None, None, True, backend=backend)
    )
    assert_same_error(error, got, f"{op} with an inference {inference}, backend={backend}")
    for k in ours:
        assert torch.equal(ours[k], before[k]), f"{k} changed by a failed call"


def test_numba_double_backward_in_threads_is_the_single_thread_bits() -> None:
    def penalty_gradients(seed: int) -> list[Tensor]:
        x, w = _randn(4, 6, 8, 8, seed=seed).requires_grad_(), _randn(6, seed=seed + 1).requires_grad_()
        y = NF.group_norm(x, 3, w, None, backend="numba")
        dx, dw = torch.autograd.grad(y, (x, w), _randn(*y.shape, seed=seed + 2), create_graph=True)
        return list(torch.autograd.grad((dx**2).sum() + (dw**2).sum(), (x, w)))

    expected = {seed: penalty_gradients(seed) for seed in range(6)}
    got: dict[int, list[Tensor]] = {}
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for _ in range(3):
                got[seed] = penalty_gradients(seed)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in expected]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for seed, grads in expected.items():
        assert all(torch.equal(a, e) for a, e in zip(got[seed], grads, strict=True)), seed


KERNEL_OPS: dict[str, tuple[tuple[int, ...], Callable[..., Tensor]]] = {
    "layer_norm": ((3, 5, 32), lambda x, w, be: NF.layer_norm(x, (32,), w[:32], None, backend=be)),
    "rms_norm": ((3, 5, 32), lambda x, w, be: NF.rms_norm(x, (32,), w[:32], backend=be)),
    "batch_norm": ((4, 64, 3, 5), lambda x, w, be: NF.batch_norm(x, None, None, w, None, True, backend=be)),
    "group_norm": ((2, 64, 3, 5), lambda x, w, be: NF.group_norm(x, 8, w, None, backend=be)),
}


@pytest.mark.parametrize("backend", ["numba", "triton"])
@pytest.mark.parametrize("name", list(KERNEL_OPS))
def test_checkpointed_double_backward_is_the_unchecked_bits(name: str, backend: str) -> None:
    # The checkpoint recomputes the same forward: the same bits, and no CheckpointError from a
    # backward that unpacks its saved tensors twice.
    if backend == "triton" and not TRITON:
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    device = DEVICE if backend == "triton" else "cpu"
    shape, call = KERNEL_OPS[name]

    def penalty_gradients(wrap: Callable[..., Any]) -> list[Tensor]:
        x, w = _randn(*shape).to(device).requires_grad_(), _randn(64, seed=1).to(device).requires_grad_()
        y = wrap(lambda x, w: call(x, w, backend), x, w)
        dx, dw = torch.autograd.grad(y, (x, w), _randn(*shape, seed=2).to(device), create_graph=True)
        return list(torch.autograd.grad((dx**2).sum() + (dw**2).sum(), (x, w)))

    plain = penalty_gradients(lambda fn, *t: fn(*t))
    checkpointed = penalty_gradients(_checkpointed)
    assert all(torch.equal(a, e) for a, e in zip(checkpointed, plain, strict=True))


# Upstream gradients as autograd hands them over: expanded (``y.sum()``, ``y.mean()``) or
# strided (a cotangent of another layout), into a double backward.
UPSTREAM: dict[str, Callable[[Tensor], Tensor]] = {
    "sum and mean": lambda y: (y**3).sum() + y.mean(),
    "transposed": lambda y: (
        y * _randn(*reversed(y.shape), dtype=F64, seed=3).permute(*reversed(range(y.dim())))
    ).sum(),
}


@pytest.mark.parametrize("upstream", list(UPSTREAM))
@pytest.mark.parametrize("name", list(KERNEL_OPS))
def test_numba_double_backward_of_expanded_and_strided_upstream_gradients(name: str, upstream: str) -> None:
    shape, call = KERNEL_OPS[name]

    def second(backend: str) -> list[Tensor]:
        x, w = _randn(*shape, dtype=F64).requires_grad_(), _randn(64, dtype=F64, seed=1).requires_grad_()
        dx, dw = torch.autograd.grad(UPSTREAM[upstream](call(x, w, backend)), (x, w), create_graph=True)
        direction = _randn(64, dtype=F64, seed=4)
        return [dx, dw, *torch.autograd.grad((dx**2).sum() + (dw * direction).sum(), (x, w))]

    for a, e in zip(second("numba"), second("torch"), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
