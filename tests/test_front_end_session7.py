"""The front end of normkit.functional (session 7): torch's ``__torch_function__`` protocol at
every public op (``torch.fx`` tracing, tensor subclasses, torch function modes, torch.compile),
BatchNorm training handed to ATen without normkit's checks where ATen refuses before writing
the running statistics, and the add-norms' ordinary call without the checks.

Oracles: the eager call for traced graphs (the same function runs), torch.nn.functional for
errors and running statistics, float64 torch for the add-norms' values.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import normkit
import normkit.functional as NF
from _outside import assert_same_error, raised
from cases import seed_of
from normkit import _checks
from normkit.backends import ENV_VAR
from normkit.norms import NORMS

F64 = torch.float64


@pytest.fixture(autouse=True)
def _default_route(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)


def _randn(*shape: int, seed: object, dtype: torch.dtype = torch.float32) -> Tensor:
    g = torch.Generator().manual_seed(seed_of(seed))
    return torch.randn(shape, generator=g, dtype=F64).to(dtype)


# ---- torch.fx: every op of the table of norms, traced from a plain module --------------------


class _Calls(nn.Module):
    """``call(NF, x, *tensors)`` of a norm's example, its tensors held as parameters (or None)."""

    def __init__(self, call: Callable[..., Tensor], tensors: list[Tensor | None]) -> None:
        super().__init__()
        self.call = call
        self.names = []
        for i, t in enumerate(tensors):
            name = f"t{i}"
            self.names.append(name)
            setattr(self, name, None if t is None else nn.Parameter(t))

    def forward(self, x: Tensor) -> Tensor:
        return self.call(NF, x, *(getattr(self, n) for n in self.names))


def _example(name: str, drop_params: bool) -> tuple[nn.Module, Tensor]:
    spec = NORMS[name]
    ex = spec.example()
    x, *tensors = ex.tensors(lambda *s: _randn(*s, seed=(name, s)))
    if drop_params:  # the affine parameters None (the per-call tensors and scalars stay)
        n_affine = len(spec.affine)
        tensors = [*tensors[: len(tensors) - n_affine], *([None] * n_affine)]
    return _Calls(ex.call, tensors), x


@pytest.mark.parametrize("drop_params", [False, True], ids=["params", "None-params"])
@pytest.mark.parametrize("name", list(NORMS))
def test_fx_records_each_op_as_one_node(name: str, drop_params: bool) -> None:
    module, x = _example(name, drop_params)
    traced = torch.fx.symbolic_trace(module)
    targets = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    assert targets == [getattr(NF, name)], traced.code
    torch.testing.assert_close(traced(x), module(x), rtol=0, atol=0)


def test_fx_keyword_arguments_and_options_are_recorded() -> None:
    def f(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return NF.layer_norm(x, (64,), weight=w, bias=b, eps=1e-3, backend="reference")

    traced = torch.fx.symbolic_trace(f)
    (node,) = [n for n in traced.graph.nodes if n.op == "call_function"]
    assert node.target is NF.layer_norm
    assert set(node.kwargs) == {"weight", "bias", "eps", "backend"} and node.kwargs["backend"] == "reference"
    x, w, b = (_randn(*s, seed=("kw", s)) for s in ((8, 64), (64,), (64,)))
    torch.testing.assert_close(traced(x, w, b), f(x, w, b), rtol=0, atol=0)


def test_fx_a_proxy_weight_alone_is_seen() -> None:
    x = _randn(4, 16, seed="proxy weight")

    def f(w: Tensor) -> Tensor:
        return NF.rms_norm(x, (16,), w)

    traced = torch.fx.symbolic_trace(f)
    assert [n.target for n in traced.graph.nodes if n.op == "call_function"] == [NF.rms_norm]
    w = _randn(16, seed="w")
    torch.testing.assert_close(traced(w), f(w), rtol=0, atol=0)


class _Block(nn.Module):
    """A user's pre-norm block written with normkit.functional: add-norm (tuple result
    unpacked), batch_norm with running statistics, and a normkit module inside."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(_randn(32, seed="block w"))
        self.bn_w = nn.Parameter(_randn(32, seed="bn w"))
        self.register_buffer("rm", torch.zeros(32))
        self.register_buffer("rv", torch.ones(32))
        self.ln = normkit.LayerNorm(32)

    def forward(self, x: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
        y, h = NF.add_rms_norm(x, r, (32,), self.w)
        z = NF.batch_norm(y, self.rm, self.rv, self.bn_w, None, self.training, 0.1, 1e-5)
        return self.ln(z), h


def test_fx_traced_block_runs_as_eager_running_statistics_included() -> None:
    eager, traced_from = _Block(), _Block()
    traced = torch.fx.symbolic_trace(traced_from)
    targets = {n.target for n in traced.graph.nodes if n.op == "call_function"}
    assert {NF.add_rms_norm, NF.batch_norm} <= targets
    x, r = _randn(6, 32, seed="x"), _randn(6, 32, seed="r")
    dy = _randn(6, 32, seed="dy")
    outs = []
    for m in (eager, traced):
        xg = x.clone().requires_grad_()
        y, h = m(xg, r)
        (y * dy).sum().backward()
        outs.append((y, h, xg.grad, m.rm.clone(), m.rv.clone()))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(outs[0][3], torch.zeros(32))  # the statistics moved


# ---- tensor subclasses and torch function modes ----------------------------------------------


class _Logged(Tensor):
    calls: list[Any] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        cls.calls.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("where", ["input", "weight", "weight by keyword"])
def test_a_subclass_sees_the_normkit_call(where: str) -> None:
    x, w, b = _randn(5, 24, seed="sub x"), _randn(24, seed="sub w"), _randn(24, seed="sub b")
    expected = NF.layer_norm(x, (24,), w, b)
    _Logged.calls = []
    if where == "input":
        out = NF.layer_norm(x.as_subclass(_Logged), (24,), w, b)
    elif where == "weight":
        out = NF.layer_norm(x, (24,), w.as_subclass(_Logged), b)
    else:
        out = NF.layer_norm(x, (24,), weight=w.as_subclass(_Logged), bias=b)
    assert _Logged.calls[0] is NF.layer_norm
    assert NF.layer_norm in _Logged.calls and F.layer_norm not in _Logged.calls  # one call, not its insides
    assert type(out) is _Logged
    torch.testing.assert_close(out.as_subclass(Tensor), expected, rtol=0, atol=0)


def test_a_subclass_sees_a_block_op_and_both_results() -> None:
    q, k = _randn(2, 3, 8, seed="q").as_subclass(_Logged), _randn(2, 1, 8, seed="k")
    _Logged.calls = []
    out = NF.qk_rms_norm(q, k, None, None)
    assert _Logged.calls[0] is NF.qk_rms_norm
    assert all(type(t) is _Logged for t in out)


class _Seen(torch.overrides.TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.funcs: list[object] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.funcs.append(func)
        return func(*args, **(kwargs or {}))


def test_a_torch_function_mode_sees_the_normkit_call() -> None:
    x, w = _randn(4, 12, seed="mode x"), _randn(12, seed="mode w")
    with _Seen() as seen:
        y = NF.rms_norm(x, (12,), w)
    assert seen.funcs[0] is NF.rms_norm
    torch.testing.assert_close(y, F.rms_norm(x, (12,), w), rtol=0, atol=0)


def test_too_many_arguments_is_still_pythons_error_first() -> None:
    x = _randn(2, 4, seed="arity").as_subclass(_Logged)
    _Logged.calls = []
    with pytest.raises(TypeError, match=r"layer_norm\(\) takes from 2 to 5 positional arguments but 6 were given"):
        NF.layer_norm(x, (4,), None, None, 1e-5, "extra")
    assert _Logged.calls == []


# ---- torch.compile: the protocol traces away, the graph is whole -------------------------------


def test_compile_fullgraph_functions_and_module() -> None:
    torch._dynamo.reset()
    w, b = _randn(16, seed="cw"), _randn(16, seed="cb")

    def f(x: Tensor, r: Tensor, bn: nn.Module) -> Tensor:
        y = NF.layer_norm(x, (16,), w, b) + NF.rms_norm(x, (16,), weight=w)
        z, h = NF.add_layer_norm(y, r, (16,), w, None)
        return bn(z) + NF.batch_norm(h, None, None, w, b, True)

    x, r = _randn(8, 16, seed="cx"), _randn(8, 16, seed="cr")
    compiled_bn, eager_bn = normkit.BatchNorm1d(16), normkit.BatchNorm1d(16)
    got = torch.compile(f, backend="eager", fullgraph=True)(x, r, compiled_bn)
    torch.testing.assert_close(got, f(x, r, eager_bn), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(compiled_bn.running_var, eager_bn.running_var, rtol=1e-6, atol=1e-6)


def test_compiled_module_does_not_recompile_on_its_second_call(monkeypatch: pytest.MonkeyPatch) -> None:
    numba_backend = pytest.importorskip("normkit.ops.numba.backend")
    x = _randn(8, 64, seed="recompile")
    module = normkit.RMSNorm(64)
    module(x)  # the backends loaded (the first call of a process compiled: the subprocess test below)
    # as in a process whose first norm call is compiled: the numba backend's memo not yet filled
    monkeypatch.setattr(numba_backend, "_CLAIMS_SMALL", {})
    torch._dynamo.reset()
    compiled = torch.compile(module, backend="eager")
    compiled(x)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(x)
        compiled(x)


_FIRST_CALL_COMPILED = """
import torch, normkit
x = torch.randn(8, 64)
module = normkit.RMSNorm(64)
compiled = torch.compile(module, backend="eager", fullgraph=True)
y = compiled(x)
torch.testing.assert_close(y, module(x), rtol=0, atol=0)
print("ok")
"""


def test_first_call_of_a_process_compiled_fullgraph() -> None:
    """The first call loads the lazy backends (numba's import): from compiled code that runs
    outside the trace (traced, the import broke the graph)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _FIRST_CALL_COMPILED], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


# ---- BatchNorm training on ATen: which refusals come after ATen writes the statistics --------

C = 3
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.int64)
_SHAPES = ((C,), (1, C), (C, 1), (C + 1,), ())


def _per_channel(rng: random.Random, x_dtype: torch.dtype) -> Tensor | None:
    """A weight, bias or running statistic: None, a good one, or a random bad one."""
    roll = rng.random()
    if roll < 0.15:
        return None
    if roll < 0.55:
        return (torch.rand(C, generator=torch.Generator().manual_seed(rng.randrange(2**31))) + 0.5).to(x_dtype)
    shape, dtype = rng.choice(_SHAPES), rng.choice(_DTYPES)
    if rng.random() < 0.2:
        return torch.ones(shape, dtype=dtype, device="meta")
    return (torch.rand(shape, generator=torch.Generator().manual_seed(rng.randrange(2**31))) + 0.5).to(dtype)


def _bad_calls(n: int, seed: str) -> list[tuple[Tensor, list[Tensor | None], bool]]:
    rng = random.Random(seed_of(seed))
    calls = []
    for _ in range(n):
        x_dtype = rng.choice((torch.float32, torch.bfloat16, torch.float64))
        shape = rng.choice(((4, C), (4, C, 5), (2, C, 3, 3), (2, C, 2, 2, 2), (1, C, 1), (C,)))
        x = _randn(*shape, seed=(seed, len(calls)), dtype=x_dtype)
        if x.dim() == 4 and rng.random() < 0.5:
            x = x.contiguous(memory_format=torch.channels_last)
        calls.append((x, [_per_channel(rng, x_dtype) for _ in range(4)], rng.random() < 0.5))
    return calls


def _snapshot(*stats: Tensor | None) -> list[tuple[Tensor, int] | None]:
    return [None if s is None or s.is_meta else (s.clone(), s._version) for s in stats]


def _unchanged(stats: tuple[Tensor | None, ...], snap: list[tuple[Tensor, int] | None]) -> bool:
    return all(s is None or (torch.equal(t, s[0]) and t._version == s[1]) for t, s in zip(stats, snap, strict=True))


def test_aten_refuses_first_wherever_the_shortcut_says_so() -> None:
    """The trial that establishes :func:`normkit._checks.batch_norm_refuses_first`: every call it
    lets through that ATen refuses leaves both running statistics as they were (values and
    version counters); and without it, ATen does write before refusing some of these calls."""
    refused = wrote_when_not_let_through = 0
    for x, (w, b, rm, rv), grad in _bad_calls(3000, "aten order"):
        snap = _snapshot(rm, rv)
        with torch.set_grad_enabled(grad):
            error = raised(lambda: torch.batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5, True))  # noqa: B023
        if error is None:
            continue
        if _checks.batch_norm_refuses_first(x, rm, rv, w, b):
            refused += 1
            assert _unchanged((rm, rv), snap), (
                x.shape,
                x.dtype,
                [None if t is None else (t.shape, t.dtype, t.device) for t in (w, b, rm, rv)],
                error,
            )
        else:
            wrote_when_not_let_through += not _unchanged((rm, rv), snap)
    assert refused > 500 and wrote_when_not_let_through > 10  # the sweep reached both kinds


def test_batch_norm_training_bad_calls_as_torch_and_change_nothing() -> None:
    """Functional and module (``momentum=None``, the cumulative average) against torch."""
    for i, (x, (w, b, rm, rv), grad) in enumerate(_bad_calls(400, "nf bad")):
        if x.dim() < 2:
            continue
        ours = [t if t is None or t.is_meta else t.clone() for t in (rm, rv)]
        snap = _snapshot(*ours)
        with torch.set_grad_enabled(grad):
            theirs = raised(lambda: F.batch_norm(x, rm, rv, w, b, True))  # noqa: B023
            mine = raised(lambda: NF.batch_norm(x, *ours, w, b, True))  # noqa: B023
        if theirs is None:
            assert mine is None, f"call {i}: torch runs it, normkit raises {mine!r}"
            for a, t in zip(ours, (rm, rv), strict=True):
                if a is not None and not a.is_meta:
                    torch.testing.assert_close(a, t, rtol=0, atol=0)
            continue
        assert _unchanged(tuple(ours), snap), f"call {i}: a refused call wrote the running statistics"
        if _meta_with_column_stat(w, b, rm, rv):
            continue  # known: normkit names the device, ATen a broadcast error of its meta kernel
        assert_same_error(theirs, mine, f"call {i}")
        _module_refuses_alike(x, w, b, rm, rv, grad, i)


def _meta_with_column_stat(*tensors: Tensor | None) -> bool:
    """A meta tensor among them and a ``(C, 1)`` running statistic: ATen then fails in its meta
    kernel ("output with shape [C, 1] doesn't match the broadcast shape [C, C]"), normkit on
    the device first (a call with two defects; not matched yet)."""
    w, b, rm, rv = tensors
    return any(t is not None and t.is_meta for t in tensors) and any(
        t is not None and t.shape == (C, 1) for t in (rm, rv)
    )


def _module_refuses_alike(x: Tensor, w, b, rm, rv, grad: bool, i: int) -> None:  # noqa: ANN001
    if any(
        t is not None and (t.is_meta or t.shape != (C,) or not t.is_floating_point()) for t in (w, b, rm, rv)
    ) or x.dim() not in (2, 3):
        return
    mods = []
    for cls in (nn.BatchNorm1d, normkit.BatchNorm1d):
        m = cls(C, momentum=None).to(x.dtype if x.dtype != torch.bfloat16 else torch.float32)
        with torch.no_grad():
            for name, t in (("weight", w), ("bias", b), ("running_mean", rm), ("running_var", rv)):
                if t is not None:
                    getattr(m, name).data = t.clone()
        mods.append(m)
    snap = _snapshot(mods[1].running_mean, mods[1].running_var, mods[1].num_batches_tracked)
    with torch.set_grad_enabled(grad):
        theirs, mine = (raised(lambda: m(x)) for m in mods)  # noqa: B023
    if theirs is None:
        return
    assert_same_error(theirs, mine, f"module call {i}")
    assert _unchanged((mods[1].running_mean, mods[1].running_var, mods[1].num_batches_tracked), snap)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "momentum=None"])
@pytest.mark.parametrize("shape", [(2, 8, 4, 4), (16, 8), (3, 8, 5)])
def test_batch_norm_training_on_aten_is_torchs(shape: tuple[int, ...], momentum: float | None) -> None:
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}[len(shape)]
    ours_cls = {2: normkit.BatchNorm1d, 3: normkit.BatchNorm1d, 4: normkit.BatchNorm2d}[len(shape)]
    theirs, ours = cls(8, momentum=momentum).double(), ours_cls(8, momentum=momentum).double()
    with torch.no_grad():
        for m in (theirs, ours):
            m.weight.copy_(_randn(8, seed=("bn w", shape), dtype=F64))
            m.bias.copy_(_randn(8, seed=("bn b", shape), dtype=F64))
    for step in range(3):
        x = _randn(*shape, seed=("bn x", shape, step), dtype=F64)
        dy = _randn(*shape, seed=("bn dy", shape, step), dtype=F64)
        grads = []
        for m in (theirs, ours):
            xg = x.clone().requires_grad_()
            y = m(xg)
            (y * dy).sum().backward()
            grads.append(
                (
                    y,
                    xg.grad,
                    m.weight.grad.clone(),
                    m.running_mean.clone(),
                    m.running_var.clone(),
                    m.num_batches_tracked.clone(),
                )
            )
            m.zero_grad()
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- the add-norms' ordinary call ------------------------------------------------------------

ADD_NORMS = {
    "add_rms_norm": (
        lambda x, r, w, b, **kw: NF.add_rms_norm(x, r, (x.shape[-1],), w, **kw),
        lambda h, w, b: F.rms_norm(h, (h.shape[-1],), w),
    ),
    "add_layer_norm": (
        lambda x, r, w, b, **kw: NF.add_layer_norm(x, r, (x.shape[-1],), w, b, **kw),
        lambda h, w, b: F.layer_norm(h, (h.shape[-1],), w, b),
    ),
}


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("op", list(ADD_NORMS))
def test_add_norm_ordinary_call_against_float64_torch(op: str, residual: bool) -> None:
    ours, theirs = ADD_NORMS[op]
    x, r = _randn(8, 96, seed=(op, "x")), _randn(8, 96, seed=(op, "r"))
    w, b = _randn(96, seed=(op, "w")), _randn(96, seed=(op, "b"))
    dy, dh = _randn(8, 96, seed=(op, "dy")), _randn(8, 96, seed=(op, "dh"))
    got, want = [], []
    for dtype, out in ((torch.float32, got), (F64, want)):
        leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (x, r, w, b)]
        xs, rs, ws, bs = leaves
        if residual:
            y, h = ours(xs, rs, ws, bs) if dtype is torch.float32 else (theirs(xs + rs, ws, bs), xs + rs)
        else:
            y, h = ours(xs, None, ws, bs) if dtype is torch.float32 else (theirs(xs, ws, bs), xs)
        torch.autograd.backward((y, h), (dy.to(dtype), dh.to(dtype)))
        out += [y, h, *(t.grad for t in leaves if t.grad is not None)]
    assert len(got) == len(want)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5)


# Calls just off the ordinary one: each takes the checks (errors and results unchanged).
_x, _r, _w = _randn(4, 8, seed="ax"), _randn(4, 8, seed="ar"), _randn(8, seed="aw")
OFF_ORDINARY: dict[str, Callable[[Callable[..., Any]], Any]] = {
    "residual broadcast": lambda f: f(_x, _r[:1], (8,), _w),
    "residual float64": lambda f: f(_x, _r.double(), (8,), _w),
    "residual_dtype": lambda f: f(_x, _r, (8,), _w, residual_dtype=F64),
    "residual_dtype str": lambda f: f(_x, _r, (8,), _w, residual_dtype="float32"),
    "shape list": lambda f: f(_x, _r, [8], _w),
    "shape int": lambda f: f(_x, _r, 8, _w),
    "shape wrong": lambda f: f(_x, _r, (4,), _w),
    "weight float64": lambda f: f(_x, _r, (8,), _w.double()),
    "weight meta": lambda f: f(_x, _r, (8,), _w.to("meta")),
    "eps int": lambda f: f(_x, _r, (8,), _w, eps=1),
    "residual list": lambda f: f(_x, [1.0] * 8, (8,), _w),
    "x int": lambda f: f(_x.long(), _r, (8,), _w),
}


@pytest.mark.parametrize("case", list(OFF_ORDINARY))
@pytest.mark.parametrize("op", [NF.add_rms_norm, NF.add_layer_norm], ids=["add_rms_norm", "add_layer_norm"])
def test_add_norm_off_the_ordinary_call_takes_the_checks(op: Callable[..., Any], case: str) -> None:
    """Against the composition, run at the backend named (the same checks, no shortcut)."""
    call = OFF_ORDINARY[case]
    default = raised(lambda: call(op))
    named = raised(lambda: call(lambda *a, **k: op(*a, **k, backend="torch")))
    if named is None:
        assert default is None, f"{case}: {default!r}"
        got, want = call(op), call(lambda *a, **k: op(*a, **k, backend="torch"))
        for mine, theirs in zip(got, want, strict=True):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    else:
        assert_same_error(named, default, case)


# ---- "auto"'s plan follows the registry ------------------------------------------------------


def test_auto_plan_follows_a_backend_registered_later(monkeypatch: pytest.MonkeyPatch) -> None:
    from normkit.backends import _REGISTRY, Backend, OpImpl, auto_choice

    x = _randn(4, 8, seed="plan")
    assert auto_choice("layer_norm", x) is F.layer_norm
    claimer = OpImpl(lambda *a, **k: -F.layer_norm(*a, **k), preferred=lambda *a, **k: True, may_prefer=lambda t: True)
    monkeypatch.setitem(_REGISTRY, "triton", Backend("triton", {"layer_norm": claimer}))
    assert auto_choice("layer_norm", x) is None
    monkeypatch.undo()
    assert auto_choice("layer_norm", x) is F.layer_norm


def test_every_public_function_takes_part(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each name of normkit.functional's ``__all__`` answers a torch function mode."""
    for name in NF.__all__:
        fn = getattr(NF, name)
        assert hasattr(fn, "__wrapped__"), name
        with _Seen() as seen:
            raised(lambda: fn(object()))  # noqa: B023  (any call: the mode is asked first)
        assert seen.funcs[:1] == [fn], name
