"""Models built from normkit modules keep working with torch's tooling, on every CPU backend.

``torch.compile`` (``fullgraph=True``: no graph break anywhere in normkit, dispatch included),
``torch.export``, ``torch.fx.symbolic_trace``, ``copy.deepcopy`` and ``pickle`` must all give
the numbers of the eager model, in training mode too, where BatchNorm's and InstanceNorm's
running statistics must move exactly as they do eagerly. Backend switches made after tracing
or compiling still take effect (dispatch happens at call time). Every module class traces with
``torch.fx`` inside a model and as the traced root; ``torch.jit.script`` raises an error that says
what to do instead.
"""

from __future__ import annotations

import copy
import dataclasses
import pickle
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import normkit
from cases import (
    BACKENDS,
    MODULE_CLASSES,
    MODULE_ROWS,
    MUST_RUN,
    TOLERANCES,
    Host,
    make_input,
    module_call,
    randomize_,
    seed_of,
)
from normkit.backends import _REGISTRY, ENV_VAR, Backend, OpImpl

CPU_BACKENDS = [b for b in BACKENDS if b in MUST_RUN]
SHAPE = (2, 6, 4, 5)  # (N, C, H, W) into EveryNorm
_F32 = TOLERANCES[torch.float32]


class EveryNorm(nn.Module):
    """One of every normkit module (lazy ones aside), chained on an ``(N, 6, 4, 5)`` input."""

    def __init__(self, backend: str | None = None) -> None:
        super().__init__()
        kw = {"backend": backend}
        self.bn1 = normkit.BatchNorm1d(6, **kw)
        self.bn2 = normkit.BatchNorm2d(6, **kw)
        self.bn3 = normkit.BatchNorm3d(6, **kw)
        self.in1 = normkit.InstanceNorm1d(6, affine=True, track_running_stats=True, **kw)
        self.in2 = normkit.InstanceNorm2d(6, affine=True, **kw)
        self.in3 = normkit.InstanceNorm3d(6, track_running_stats=True, **kw)
        self.gn = normkit.GroupNorm(3, 6, **kw)
        self.ln = normkit.LayerNorm([4, 5], **kw)
        self.rms = normkit.RMSNorm(5, **kw)
        self.lrn = normkit.LocalResponseNorm(3, alpha=1.0, **kw)  # alpha=1: the window matters
        self.add_ln = normkit.FusedAddLayerNorm(5, **kw)
        self.add_rms = normkit.FusedAddRMSNorm(5, residual_dtype=torch.float32, **kw)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        t = self.bn1(x.reshape(n, c, h * w)).reshape(n, c, h, w)
        t = self.bn2(t)
        t = self.bn3(t.reshape(n, c, 2, h // 2, w)).reshape(n, c, h, w)
        t = self.in1(t.reshape(n, c, h * w)).reshape(n, c, h, w)
        t = self.in2(t)
        t = self.in3(t.reshape(n, c, 2, h // 2, w)).reshape(n, c, h, w)
        t = self.lrn(self.rms(self.ln(self.gn(t))))
        t, residual = self.add_ln(t, x)
        t, residual = self.add_rms(t, residual)
        return t * residual


def _model(backend: str) -> EveryNorm:
    return randomize_(EveryNorm(backend), seed_of("EveryNorm", backend))


def _steps(modes: str = "train train eval") -> Iterator[tuple[int, bool, Tensor, Tensor]]:
    """(step, training, input, upstream gradient) for each mode; random gradients, never ones."""
    for i, mode in enumerate(modes.split()):
        x = make_input(SHAPE, torch.float32, seed_of("tooling x", i))
        dy = make_input(SHAPE, torch.float32, seed_of("tooling dy", i), requires_grad=False)
        yield i, mode == "train", x, dy


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_close(actual: Tensor, expected: Tensor, what: str) -> None:
    if not expected.is_floating_point():  # num_batches_tracked
        assert torch.equal(actual, expected), f"{what}: {actual} != {expected}"
        return
    torch.testing.assert_close(actual, expected, rtol=_F32.rtol, atol=_F32.atol, msg=lambda m: f"{what}: {m}")


def _assert_same_state(actual: nn.Module, expected: nn.Module, where: str) -> None:
    a, e = _state(actual), _state(expected)
    assert a.keys() == e.keys()
    for key in e:
        _assert_close(a[key], e[key], f"{where}: {key}")


def _run_both(
    eager: nn.Module, other: nn.Module, call_other: Callable[[Tensor], Tensor], modes: str = "train train eval"
) -> None:
    """Train/eval ``eager`` and ``other`` side by side; compare outputs, gradients (training
    steps, random upstream gradients) and state (running statistics) after every step."""
    for i, training, x, dy in _steps(modes):
        where = f"step {i} ({'train' if training else 'eval'})"
        eager.train(training)
        other.train(training)
        x_other = x.detach().clone().requires_grad_()
        with torch.set_grad_enabled(training):
            expected, actual = eager(x), call_other(x_other)
        _assert_close(actual, expected, f"{where}: output")
        if training:
            expected.backward(dy)
            actual.backward(dy)
            _assert_close(x_other.grad, x.grad, f"{where}: input gradient")
            for (name, p), q in zip(eager.named_parameters(), other.parameters(), strict=True):
                _assert_close(q.grad, p.grad, f"{where}: gradient of {name}")
                p.grad = q.grad = None
        _assert_same_state(other, eager, where)


# ---- torch.compile -----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _fresh_dynamo(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(ENV_VAR, raising=False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_fullgraph_matches_eager_train_and_eval(backend: str) -> None:
    eager = _model(backend)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    _run_both(eager, compiled_model, compiled)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_momentum_none_matches_eager(backend: str) -> None:
    """momentum=None (cumulative average over num_batches_tracked) reads the counter as a
    Python number, which torch's own BatchNorm cannot compile with fullgraph=True either: here
    graph breaks are allowed, the numbers must still be eager's."""
    eager = randomize_(normkit.BatchNorm2d(6, momentum=None, backend=backend), seed_of("momentum None", backend))
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager")
    _run_both(eager, compiled_model, compiled, modes="train train train")


def test_compile_with_inductor_tiny_model() -> None:
    """The default backend (inductor, C++ codegen on the CPU) on a tiny model mixing both
    built-in backends: a training step updates the running statistics like eager."""
    eager = nn.Sequential(normkit.BatchNorm1d(4, backend="reference"), normkit.RMSNorm(3, backend="torch"))
    randomize_(eager, seed_of("inductor")).train()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = make_input((5, 4, 3), torch.float32, seed_of("inductor x"), requires_grad=False)
    with torch.no_grad():
        _assert_close(compiled(x), eager(x), "output")
    _assert_same_state(compiled_model, eager, "after a training step")


@pytest.fixture
def negated(monkeypatch: pytest.MonkeyPatch) -> str:
    """A backend whose layer_norm is torch's negated: which backend ran shows in the numbers."""
    backend = Backend("negated", {"layer_norm": OpImpl(lambda *args: -F.layer_norm(*args))})
    monkeypatch.setitem(_REGISTRY, "negated", backend)
    return "negated"


def _switch_runs(model: nn.Module, run: Callable[[Tensor], Tensor], negated: str, *, attribute: bool = True) -> None:
    """``run`` (``model``, compiled or traced) follows each switch of backend: ``use_backend``
    and (where ``attribute``) ``model.backend``."""
    x = make_input((3, 5), torch.float32, seed_of("switch"), requires_grad=False)
    plain = run(x)
    with normkit.use_backend(negated):
        _assert_close(run(x), -plain, "inside use_backend")
    _assert_close(run(x), plain, "after use_backend")
    if not attribute:
        return
    model.backend = negated
    _assert_close(run(x), -plain, "after module.backend = ...")
    model.backend = None
    _assert_close(run(x), plain, "after module.backend = None")


def test_compiled_model_follows_use_backend_and_module_backend(negated: str) -> None:
    model = randomize_(normkit.LayerNorm(5), seed_of("switch"))
    _switch_runs(model, torch.compile(model, fullgraph=True, backend="aot_eager"), negated)


def test_compiled_model_honours_environment_variable_set_before_compiling(
    negated: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NORMKIT_BACKEND is read when a graph is compiled (documented in normkit.backends: set it
    before compiling); a use_backend block still overrides it in the compiled model."""
    model = randomize_(normkit.LayerNorm(5), seed_of("switch"))
    x = make_input((3, 5), torch.float32, seed_of("switch"), requires_grad=False)
    plain = model(x)
    monkeypatch.setenv(ENV_VAR, negated)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _assert_close(compiled(x), -plain, f"compiled under {ENV_VAR}={negated}")
    with normkit.use_backend("torch"):
        _assert_close(compiled(x), plain, "inside use_backend('torch')")


# ---- torch.export ------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_export_runs_and_matches(backend: str, training: bool) -> None:
    eager = _model(backend).train(training)
    exported = torch.export.export(copy.deepcopy(eager), (make_input(SHAPE, torch.float32, 0, requires_grad=False),))
    module = exported.module()
    for i in range(2):
        x = make_input(SHAPE, torch.float32, seed_of("export x", i), requires_grad=False)
        with torch.no_grad():
            _assert_close(module(x), eager(x), f"call {i}: output")
        _assert_same_state(module, eager, f"call {i}")


# ---- torch.fx ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fx_symbolic_trace_every_module_matches(backend: str) -> None:
    eager = _model(backend)
    traced = torch.fx.symbolic_trace(copy.deepcopy(eager))
    _run_both(eager, traced, traced)


def test_fx_traced_graph_dispatches_at_call_time(negated: str) -> None:
    """The traced graph calls normkit's functional leaves, which resolve the backend when they
    run. (Plain attributes such as ``backend`` or ``eps`` are constants of the graph, as in any
    fx trace, so ``traced.backend = ...`` is not expected to act.)"""
    model = normkit.LayerNorm(5)
    randomize_(model, seed_of("switch"))
    traced = torch.fx.symbolic_trace(model)
    _switch_runs(traced, traced, negated, attribute=False)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fx_symbolic_trace_materialized_lazy_modules(backend: str) -> None:
    lazy = nn.Sequential(normkit.LazyBatchNorm2d(backend=backend), normkit.LazyInstanceNorm2d(backend=backend))
    lazy(make_input(SHAPE, torch.float32, 1, requires_grad=False))  # materializes: 6 channels
    eager = randomize_(lazy, seed_of("lazy fx"))
    traced = torch.fx.symbolic_trace(copy.deepcopy(eager))
    _run_both(eager, traced, traced)


# ---- deepcopy and pickle -----------------------------------------------------------------------


def _pickled(model: nn.Module) -> nn.Module:
    return pickle.loads(pickle.dumps(model))


@pytest.mark.parametrize("clone", [copy.deepcopy, _pickled], ids=["deepcopy", "pickle"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_copies_keep_backend_and_numbers_and_own_their_state(backend: str, clone: Callable[[Any], Any]) -> None:
    original = _model(backend)
    copied = clone(original)
    assert type(copied) is EveryNorm
    for (name, a), b in zip(original.named_modules(), copied.modules(), strict=True):
        assert type(a) is type(b), name
        assert getattr(a, "backend", None) == getattr(b, "backend", None), name
    _run_both(original, copied, copied)
    before = _state(copied)
    original.train()(make_input(SHAPE, torch.float32, 9, requires_grad=False))  # moves only the original's stats
    for key, value in _state(copied).items():
        assert torch.equal(value, before[key]), f"{key} is shared between the original and the copy"


def test_pickled_unmaterialized_lazy_modules_materialize_like_the_original() -> None:
    """(torch cannot deepcopy an unmaterialized lazy module either: UninitializedBuffer.)"""
    lazy = nn.Sequential(normkit.LazyBatchNorm1d(backend="reference"), normkit.LazyInstanceNorm1d())
    copied = _pickled(lazy)
    x = make_input((4, 3, 7), torch.float32, seed_of("lazy copy"), requires_grad=False)
    expected, actual = lazy(x), copied(x)
    _assert_close(actual, expected, "output")
    assert type(copied[0]) is normkit.BatchNorm1d and copied[0].backend == "reference"
    assert type(copied[1]) is normkit.InstanceNorm1d and copied[1].backend is None
    _assert_same_state(copied, lazy, "after the first call")



# ---- every module class: fx (as the traced root and inside a model), TorchScript -------------



# Module classes fx cannot trace today: class -> the defect. Each is removed by its fix.
FX_DEFECTS: dict[str, str] = {}  # module name -> why torch.fx cannot trace it (none today)
FX_ROWS = [pytest.param(name, marks=pytest.mark.xfail(reason=FX_DEFECTS[name], strict=True))
           if name in FX_DEFECTS else name for name in MODULE_ROWS]


def test_module_rows_cover_every_module_class() -> None:
    assert set(MODULE_ROWS) == set(MODULE_CLASSES)


def _built(name: str) -> nn.Module:
    args, kwargs, shape = MODULE_ROWS[name]
    module = getattr(normkit, name)(*args, **kwargs)
    if name.startswith("Lazy"):  # materialize: a lazy module has nothing to trace yet
        module(torch.zeros(shape))
    return randomize_(module, seed_of("every class", name))


def _root_call(module: nn.Module, name: str) -> Callable[[Tensor], Tensor]:
    """The norm ``name`` (or its graph traced as the root), called like :class:`cases.Host` calls it."""
    call = module_call(name)
    return lambda x: call(module, x) * 2.0


def _compare_steps(name: str, eager: Callable[[Tensor], Tensor], traced: Callable[[Tensor], Tensor],
                   eager_module: nn.Module, traced_module: nn.Module, modes: list[bool]) -> None:
    shape = MODULE_ROWS[name][2]
    for i, training in enumerate(modes):
        eager_module.train(training)
        traced_module.train(training)
        x = make_input(shape, torch.float32, seed_of("every class x", name, i))
        x_traced = x.detach().clone().requires_grad_()
        expected, actual = eager(x), traced(x_traced)
        _assert_close(actual, expected, f"{name} step {i}: output")
        dy = torch.randn_like(expected)
        expected.backward(dy)
        actual.backward(dy)
        _assert_close(x_traced.grad, x.grad, f"{name} step {i}: input gradient")
        # by name: a traced graph holds the parameters in the order its forward reads them
        traced_params = dict(traced_module.named_parameters())
        assert set(traced_params) == {p_name for p_name, _ in eager_module.named_parameters()}
        for p_name, p in eager_module.named_parameters():
            q = traced_params[p_name]
            _assert_close(q.grad, p.grad, f"{name} step {i}: gradient of {p_name}")
            p.grad = q.grad = None
        _assert_same_state(traced_module, eager_module, f"{name} step {i}")


@pytest.mark.parametrize("name", FX_ROWS)
def test_fx_traces_every_module_class_inside_a_model(name: str) -> None:
    """The graph calls the module's forward as one leaf: its live ``training`` flag, statistics
    and backend are read when the graph runs (train, train, eval, as eager)."""
    eager = Host(_built(name))
    traced = torch.fx.symbolic_trace(copy.deepcopy(eager))
    _compare_steps(name, eager, traced, eager, traced, [True, True, False])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", FX_ROWS)
def test_fx_traces_every_module_class_as_the_root(name: str, training: bool) -> None:
    """Traced as the root, the module's Python attributes (``training`` among them) are
    constants of the graph, as for torch's own modules; parameters and buffers stay live."""
    eager = _built(name).train(training)
    traced = torch.fx.symbolic_trace(copy.deepcopy(eager))
    _compare_steps(name, _root_call(eager, name), _root_call(traced, name), eager, traced, [training, training])
    copied = copy.deepcopy(traced)
    _compare_steps(name, _root_call(eager, name), _root_call(copied, name), eager, copied, [training])


@pytest.fixture
def reference_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ops the reference backend runs, in order."""
    log: list[str] = []
    backend = _REGISTRY["reference"]

    def spy(op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            log.append(op)
            return fn(*args, **kwargs)

        return run

    ops = {op: impl._replace(fn=spy(op, impl.fn)) for op, impl in backend.ops.items()}
    monkeypatch.setitem(_REGISTRY, "reference", dataclasses.replace(backend, ops=ops))
    return log


@pytest.mark.parametrize("name", FX_ROWS)
def test_fx_graph_of_every_module_class_resolves_the_backend_when_it_runs(
    name: str, reference_calls: list[str]
) -> None:
    x = make_input(MODULE_ROWS[name][2], torch.float32, seed_of("every class dispatch", name), requires_grad=False)
    for call in (torch.fx.symbolic_trace(Host(_built(name))), _root_call(torch.fx.symbolic_trace(_built(name)), name)):
        call(x)
        assert reference_calls == []
        with normkit.use_backend("reference"):
            call(x)
        assert reference_calls, f"{name}: the traced graph did not run the backend of the use_backend block"
        reference_calls.clear()


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", MODULE_ROWS)
def test_jit_script_of_every_module_class_says_what_to_do(name: str) -> None:
    """TorchScript cannot compile call-time dispatch: a clear error naming the way out."""
    model = nn.Sequential(nn.Identity(), _built(name))
    with pytest.raises(RuntimeError, match=r"torch\.jit\.script cannot compile normkit\.\w+.*torch\.compile"):
        torch.jit.script(model)
    if type(model[1]) in normkit.surgery.TWINS.values():  # to_torch turns it back: say so
        with pytest.raises(RuntimeError, match=r"normkit\.to_torch\(model\)"):
            torch.jit.script(model)
        back = normkit.to_torch(model)
        # torch cannot script SyncBatchNorm
        if not isinstance(back[1], (normkit.modules._base.BackendMixin, nn.SyncBatchNorm)):
            torch.jit.script(back)
