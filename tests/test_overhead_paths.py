"""The default path's shortcuts (issue 12) change nothing but the time a call takes.

A small CPU call with no backend named is settled on ATen before its checks
(:func:`normkit.backends.auto_choice`): LayerNorm, RMSNorm and GroupNorm then call ATen directly
(its checks are torch's own), BatchNorm and InstanceNorm after normkit's checks (ATen can write
the running statistics before it refuses a call). Each test here compares the shortcut with what
it replaces: torch.nn.functional's result and gradients to the bit, its errors, the backend
named by every other route, a replaced "torch" backend, a torch function mode, and the kernel
backends' claims on large inputs.
"""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import normkit
import normkit.functional as NF
from cases import seed_of
from normkit.backends import _REGISTRY, ENV_VAR, OpImpl, auto_choice

backends_module = sys.modules["normkit.backends"]


def _rand(*shape: int, seed: str, **kwargs) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed_of(seed)), **kwargs)


@pytest.fixture(autouse=True)
def _default_route(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)


# op -> (normkit call, torch call, (input shape, parameter shape)); random parameters.
CALLS = {
    "layer_norm": (
        lambda x, w, b, **kw: NF.layer_norm(x, (x.shape[-1],), w, b, **kw),
        lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b),
        ((8, 64), (64,)),
    ),
    "rms_norm": (
        lambda x, w, b, **kw: NF.rms_norm(x, (x.shape[-1],), w, **kw),
        lambda x, w, b: F.rms_norm(x, (x.shape[-1],), w),
        ((8, 64), (64,)),
    ),
    "group_norm": (
        lambda x, w, b, **kw: NF.group_norm(x, 2, w, b, **kw),
        lambda x, w, b: F.group_norm(x, 2, w, b),
        ((2, 8, 4, 4), (8,)),
    ),
    "batch_norm": (
        lambda x, w, b, **kw: NF.batch_norm(x, None, None, w, b, True, **kw),
        lambda x, w, b: F.batch_norm(x, None, None, w, b, True),
        ((2, 8, 4, 4), (8,)),
    ),
    "instance_norm": (
        lambda x, w, b, **kw: NF.instance_norm(x, weight=w, bias=b, **kw),
        lambda x, w, b: F.instance_norm(x, weight=w, bias=b),
        ((2, 8, 4, 4), (8,)),
    ),
}


def _leaves(op: str, layout: torch.memory_format = torch.contiguous_format) -> list[torch.Tensor]:
    x_shape, p_shape = CALLS[op][2]
    x = _rand(*x_shape, seed=f"{op} x").contiguous(memory_format=layout)
    return [t.requires_grad_() for t in (x, _rand(*p_shape, seed=f"{op} w"), _rand(*p_shape, seed=f"{op} b"))]


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "cl"])
@pytest.mark.parametrize("op", list(CALLS))
def test_default_call_is_torch_to_the_bit(op: str, layout: torch.memory_format) -> None:
    """Output (and its layout) and every gradient, with a random upstream gradient, equal
    torch.nn.functional's exactly: the shortcut makes torch's own ATen call."""
    ours, theirs, (x_shape, _) = CALLS[op]
    if layout is torch.channels_last and len(x_shape) != 4:
        pytest.skip("channels_last needs a 4-D input")
    a, b = _leaves(op, layout), _leaves(op, layout)
    y, expected = ours(*a), theirs(*b)
    dy = _rand(*y.shape, seed=f"{op} dy")
    y.backward(dy)
    expected.backward(dy)
    assert torch.equal(y, expected)
    assert y.is_contiguous(memory_format=layout)
    for mine, torch_s in zip(a, b, strict=True):
        if torch_s.grad is None:  # (rms_norm has no bias)
            assert mine.grad is None
        else:
            assert torch.equal(mine.grad, torch_s.grad)


@pytest.mark.parametrize("op", list(CALLS))
def test_small_cpu_call_is_settled_on_torch(op: str) -> None:
    x = _leaves(op)[0]
    assert auto_choice(op, x) is _REGISTRY["torch"].ops[op].fn


def test_every_route_that_names_a_backend_unsettles_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """backend=, a use_backend block and NORMKIT_BACKEND still choose: the reference runs
    (its result is not ATen's bits, so the test can tell)."""
    x, w, b = (t.detach() for t in _leaves("layer_norm"))
    ref = NF.layer_norm(x, (64,), w, b, backend="reference")
    assert not torch.equal(ref, F.layer_norm(x, (64,), w, b))
    with normkit.use_backend("reference"):
        assert auto_choice("layer_norm", x) is None
        assert torch.equal(NF.layer_norm(x, (64,), w, b), ref)
    monkeypatch.setenv(ENV_VAR, "reference")
    assert auto_choice("layer_norm", x) is None
    assert torch.equal(NF.layer_norm(x, (64,), w, b), ref)
    monkeypatch.setenv(ENV_VAR, "auto")
    assert auto_choice("layer_norm", x) is _REGISTRY["torch"].ops["layer_norm"].fn


def test_a_replaced_torch_backend_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto's candidates are rebuilt when the registry changes: a replaced "torch" op runs (it is
    no longer torch.nn.functional's, so no ATen shortcut), and the original is back after."""
    x, w, b = (t.detach() for t in _leaves("layer_norm"))
    torch_backend = _REGISTRY["torch"]
    ops = {**torch_backend.ops, "layer_norm": OpImpl(lambda *args: -F.layer_norm(*args))}
    monkeypatch.setitem(_REGISTRY, "torch", dataclasses.replace(torch_backend, ops=ops))
    assert torch.equal(NF.layer_norm(x, (64,), w, b), -F.layer_norm(x, (64,), w, b))
    monkeypatch.undo()
    assert torch.equal(NF.layer_norm(x, (64,), w, b), F.layer_norm(x, (64,), w, b))


def test_a_kernel_backend_that_may_prefer_the_input_is_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend before "torch" whose may_prefer says yes unsettles the call: its preferred is
    asked (after the checks) and it runs when it says yes."""
    x, w, b = (t.detach() for t in _leaves("layer_norm"))
    asked = []
    claimer = OpImpl(
        lambda *args: torch.zeros_like(args[0]),
        preferred=lambda *args: asked.append(args) or True,
        may_prefer=lambda t: True,
    )
    first = backends_module.AUTO_ORDER[0]
    monkeypatch.setitem(_REGISTRY, first, backends_module.Backend(first, {"layer_norm": claimer}))
    assert auto_choice("layer_norm", x) is None
    assert torch.equal(NF.layer_norm(x, (64,), w, b), torch.zeros_like(x))
    assert len(asked) == 1


@pytest.mark.parametrize("op", ["rms_norm", "batch_norm"])
def test_numba_keeps_the_large_calls_it_claims(op: str) -> None:
    """A large float32 call of an op numba claims is not settled: auto still asks numba."""
    numba = _REGISTRY.get("numba")
    if numba is None or not numba.is_available() or op not in numba.ops:
        pytest.skip("numba is not installed")
    x = torch.empty(4096, 1024) if op == "rms_norm" else torch.empty(32, 64, 16, 16)
    assert auto_choice(op, x) is None


class _Seen(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.funcs: list[object] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.funcs.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("op", list(CALLS))
def test_a_torch_function_mode_sees_the_normkit_op(op: str) -> None:
    """normkit.functional's ops take part in __torch_function__ as torch.nn.functional's do: a
    torch function mode sees the normkit op (and, as under torch, not the ops inside it)."""
    ours, theirs, _ = CALLS[op]
    leaves = [t.detach() for t in _leaves(op)]
    with _Seen() as seen:
        ours(*leaves)
    assert getattr(NF, op) in seen.funcs


# Bad calls on the settled path: (op, normkit call, torch call), the same arguments.
_x2, _x4 = torch.randn(3, 5), torch.randn(2, 4, 3)
BAD = {
    "ln-weight-shape": (
        lambda **kw: NF.layer_norm(_x2, (5,), torch.ones(4), **kw),
        lambda: F.layer_norm(_x2, (5,), torch.ones(4)),
    ),
    "ln-shape": (lambda **kw: NF.layer_norm(_x2, (4,), **kw), lambda: F.layer_norm(_x2, (4,))),
    "ln-weight-dtype": (
        lambda **kw: NF.layer_norm(_x2, (5,), torch.ones(5, dtype=torch.float64), **kw),
        lambda: F.layer_norm(_x2, (5,), torch.ones(5, dtype=torch.float64)),
    ),
    "ln-weight-meta": (
        lambda **kw: NF.layer_norm(_x2, (5,), torch.ones(5, device="meta"), **kw),
        lambda: F.layer_norm(_x2, (5,), torch.ones(5, device="meta")),
    ),
    "ln-shape-str": (lambda **kw: NF.layer_norm(_x2, "5", **kw), lambda: F.layer_norm(_x2, "5")),
    "ln-int-input": (
        lambda **kw: NF.layer_norm(torch.ones(3, 5, dtype=torch.long), (5,), **kw),
        lambda: F.layer_norm(torch.ones(3, 5, dtype=torch.long), (5,)),
    ),
    "rms-weight-shape": (
        lambda **kw: NF.rms_norm(_x2, (5,), torch.ones(3), **kw),
        lambda: F.rms_norm(_x2, (5,), torch.ones(3)),
    ),
    "gn-groups": (lambda **kw: NF.group_norm(_x4, 3, **kw), lambda: F.group_norm(_x4, 3)),
    "gn-1d": (lambda **kw: NF.group_norm(torch.randn(4), 2, **kw), lambda: F.group_norm(torch.randn(4), 2)),
    "gn-one-per-group": (
        lambda **kw: NF.group_norm(torch.randn(1, 4), 4, **kw),
        lambda: F.group_norm(torch.randn(1, 4), 4),
    ),
    "in-one-spatial": (
        lambda **kw: NF.instance_norm(torch.randn(2, 3, 1), **kw),
        lambda: F.instance_norm(torch.randn(2, 3, 1)),
    ),
    "in-no-stats-in-eval": (
        lambda **kw: NF.instance_norm(_x4, use_input_stats=False, **kw),
        lambda: F.instance_norm(_x4, use_input_stats=False),
    ),
    "in-weight-size": (
        lambda **kw: NF.instance_norm(_x4, weight=torch.ones(3), **kw),
        lambda: F.instance_norm(_x4, weight=torch.ones(3)),
    ),
    "gn-weight-size": (
        lambda **kw: NF.group_norm(_x4, 2, torch.ones(3), **kw),
        lambda: F.group_norm(_x4, 2, torch.ones(3)),
    ),
    # batch_norm in eval is settled on ATen (it only reads the running statistics)
    "bn-eval-no-stats": (
        lambda **kw: NF.batch_norm(_x4, None, torch.ones(4), **kw),
        lambda: F.batch_norm(_x4, None, torch.ones(4)),
    ),
    "bn-eval-negative-eps": (
        lambda **kw: NF.batch_norm(_x4, torch.zeros(4), torch.ones(4), eps=-1.0, **kw),
        lambda: F.batch_norm(_x4, torch.zeros(4), torch.ones(4), eps=-1.0),
    ),
    "bn-eval-stat-size": (
        lambda **kw: NF.batch_norm(_x4, torch.zeros(3), torch.ones(4), **kw),
        lambda: F.batch_norm(_x4, torch.zeros(3), torch.ones(4)),
    ),
    "bn-eval-weight-meta": (
        lambda **kw: NF.batch_norm(_x4, torch.zeros(4), torch.ones(4), torch.ones(4, device="meta"), **kw),
        lambda: F.batch_norm(_x4, torch.zeros(4), torch.ones(4), torch.ones(4, device="meta")),
    ),
    "bn-eval-stat-dtype": (
        lambda **kw: NF.batch_norm(_x4, torch.zeros(4, dtype=torch.float64), torch.ones(4), **kw),
        lambda: F.batch_norm(_x4, torch.zeros(4, dtype=torch.float64), torch.ones(4)),
    ),
    "bn-eval-stat-grad": (
        lambda **kw: NF.batch_norm(_x4, torch.zeros(4, requires_grad=True), torch.ones(4), **kw),
        lambda: F.batch_norm(_x4, torch.zeros(4, requires_grad=True), torch.ones(4)),
    ),
    "bn-eval-1d": (
        lambda **kw: NF.batch_norm(torch.randn(4), torch.zeros(4), torch.ones(4), **kw),
        lambda: F.batch_norm(torch.randn(4), torch.zeros(4), torch.ones(4)),
    ),
}


def test_batch_norm_eval_is_torch_to_the_bit() -> None:
    """In eval the settled call is ATen's: output and every gradient (input, weight, bias) equal
    torch's exactly, with random running statistics, and the statistics are not written."""
    stats = [_rand(8, seed="bn eval mean"), _rand(8, seed="bn eval var").abs() + 0.5]
    mine, theirs = _leaves("batch_norm"), _leaves("batch_norm")
    y = NF.batch_norm(mine[0], *[s.clone() for s in stats], mine[1], mine[2], False)
    assert auto_choice("batch_norm", mine[0]) is _REGISTRY["torch"].ops["batch_norm"].fn
    expected = F.batch_norm(theirs[0], *stats, theirs[1], theirs[2], False)
    dy = _rand(*y.shape, seed="bn eval dy")
    y.backward(dy)
    expected.backward(dy)
    assert torch.equal(y, expected)
    for a, b in zip(mine, theirs, strict=True):
        assert torch.equal(a.grad, b.grad)


def test_batch_norm_eval_failed_call_changes_nothing() -> None:
    rm, rv = _rand(4, seed="bn eval rm"), _rand(4, seed="bn eval rv").abs()
    before = rm.clone(), rv.clone()
    for bad in (torch.ones(4, device="meta"), torch.ones(3), torch.ones(4, dtype=torch.float64)):
        with pytest.raises(RuntimeError):
            NF.batch_norm(_x4, rm, rv, bad, None, False)
        assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


def _error(call) -> tuple[type, str]:
    with pytest.raises(Exception) as info:
        call()
    return info.type, str(info.value)


@pytest.mark.parametrize("case", list(BAD))
def test_settled_bad_call_raises_what_torch_raises(case: str) -> None:
    """Settled on ATen, a bad call raises torch's error; so does the long way (backend='torch',
    normkit's checks)."""
    ours, theirs = BAD[case]
    expected = _error(theirs)
    assert _error(ours) == expected
    assert _error(lambda: ours(backend="torch")) == expected


def test_batch_norm_module_failed_call_changes_nothing() -> None:
    """ATen's batch_norm writes the running statistics before it refuses a weight on another
    device; normkit's checks run first on the default path, so nothing moves (counter included)."""
    bn = normkit.BatchNorm2d(3)
    bn.weight = nn.Parameter(torch.ones(3, device="meta"))
    before = {k: v.clone() for k, v in bn.state_dict().items() if k != "weight"}
    with pytest.raises(RuntimeError, match="is not on the expected device"):
        bn(_rand(4, 3, 2, 2, seed="bn meta"))
    for k, v in before.items():
        assert torch.equal(bn.state_dict()[k], v), k


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["BatchNorm2d", "InstanceNorm2d", "GroupNorm", "LayerNorm", "RMSNorm"])
def test_module_default_forward_is_torch_s(name: str, train: bool) -> None:
    """The modules' default forward (their shortcuts) against torch.nn's twin: output, gradients
    and buffers, random parameters and upstream gradient."""
    args = {"GroupNorm": (2, 8), "LayerNorm": (8,), "RMSNorm": (8,)}.get(name, (8,))
    kwargs = {"affine": True, "track_running_stats": True} if name == "InstanceNorm2d" else {}
    ours, theirs = getattr(normkit, name)(*args, **kwargs), getattr(nn, name)(*args, **kwargs)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(_rand(*p.shape, seed=f"{name} param {p.shape}"))
    ours.load_state_dict(theirs.state_dict())
    ours.train(train), theirs.train(train)
    x = _rand(2, 8, 4, 8, seed=f"{name} x")
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, expected = ours(xa), theirs(xb)
    dy = _rand(*y.shape, seed=f"{name} dy")
    y.backward(dy)
    expected.backward(dy)
    assert torch.equal(y, expected)
    assert torch.equal(xa.grad, xb.grad)
    for (k, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), k
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k


def test_instance_norm_of_an_empty_batch_stays_normkit_s() -> None:
    """An empty batch with affine parameters: torch raises, normkit returns the empty output
    (its documented difference); the settled path leaves it to normkit."""
    x, w = torch.randn(0, 3, 4), torch.ones(3)
    with pytest.raises(IndexError):
        F.instance_norm(x, weight=w, bias=w)
    assert NF.instance_norm(x, weight=w, bias=w).shape == x.shape
