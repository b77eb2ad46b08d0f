"""Which backend computes a call: the resolution order, resolved at call time, never cached.

1. the ``backend=`` argument of the call (or the module's ``backend`` attribute),
2. else the innermost ``with normkit.use_backend(name):`` block,
3. else the ``NORMKIT_BACKEND`` environment variable,
4. else ``"auto"``, which on the CPU picks torch's ATen kernels for every standard op.

A spy wraps every op of the torch and reference backends in the registry, so each test sees
which backend really ran, not only what ``current_backend()`` claims.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

import normkit
import normkit.functional as NF
from cases import FUSED_ADD_CASES, LAZY_CASES, NORM_CASES, NormCase, make_input, randomize_, seed_of
from normkit.backends import _REGISTRY, AUTO_ORDER, ENV_VAR, OpImpl, resolve
from normkit.backends import OPS as OP_SPECS
from normkit.norms import NORMS

BUILTIN = ("torch", "reference")


class _Arguments:
    """A stand-in for a functional namespace: ``_Arguments().layer_norm(*args)`` is ``args``."""

    def __getattr__(self, op: str) -> Callable[..., tuple[Any, ...]]:
        return lambda *args: args


def _valid_args(op: str) -> tuple[Any, ...]:
    """A valid call of each op, random weights and biases included (the norms of the table
    from their rows' examples, with running statistics where the op takes them)."""
    gen = torch.Generator().manual_seed(seed_of("valid", op))

    def r(*shape: int) -> Tensor:
        return torch.randn(shape, generator=gen)

    mask = torch.ones(2, 5, dtype=torch.bool).index_fill_(1, torch.tensor([4]), False)
    calls: dict[str, Callable[[], tuple[Any, ...]]] = {
        "masked_batch_norm": lambda: (r(2, 3, 5), mask, r(3), r(3).abs() + 0.5, r(3), r(3), True, 0.1, 1e-5),
        "masked_instance_norm": lambda: (r(2, 3, 5), mask, r(3), r(3).abs() + 0.5, r(3), r(3), True, 0.1, 1e-5),
        "local_response_norm": lambda: (r(2, 6, 5), 3, 1.0, 0.75, 1.0),
        "add_layer_norm": lambda: (r(2, 5), r(2, 5), (5,), r(5), r(5), 1e-5),
        "add_rms_norm": lambda: (r(2, 5), r(2, 5), (5,), r(5), None),
        "normalize": lambda: (r(2, 3, 5), (1,), r(3), r(3), 1e-5),
        "batch_norm_act": lambda: (r(4, 3, 5), r(3), r(3).abs() + 0.5, r(3), r(3), True, 0.1, 1e-5),
        "group_norm_act": lambda: (r(2, 6, 5), 3, r(6), r(6), 1e-5),
        # the blocks that are no row of the table (qk, sandwich) or whose row's example passes
        # keywords (gated_rms_norm's group_size): positional arguments, the same for the public
        # function and the backends
        "gated_rms_norm": lambda: (r(2, 3, 8), r(2, 3, 8), r(8), 1e-6),
        "qk_rms_norm": lambda: (r(2, 3, 4, 8), r(2, 3, 2, 8), r(8), r(8), None),
        "sandwich_rms_norm": lambda: (r(2, 3, 8), r(2, 3, 8), r(8), r(8), None),
    }
    if op in calls:
        return calls[op]()
    if op in NORMS:
        example = NORMS[op].example()
        args = example.call(_Arguments(), *example.tensors(r))
        spec = OP_SPECS[op]
        stats = {i: r(*example.param_shape).abs() + 0.5 for i in spec.in_place_at}
        return tuple(stats.get(i, a) for i, a in enumerate(args))
    raise KeyError(f"no valid call of op {op!r}: add one")


OPS = list(OP_SPECS)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts from "auto": no variable from the caller's shell, no open block."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert normkit.current_backend() == "auto"


@pytest.fixture
def ran(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """The (backend, op) of every call the built-in backends run, in order."""
    log: list[tuple[str, str]] = []

    def spy(name: str, op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            log.append((name, op))
            return fn(*args, **kwargs)

        return run

    for name in BUILTIN:
        backend = _REGISTRY[name]
        # (the ordinary call's form too, OpImpl.plain, where the default path calls it)
        ops = {op: impl._replace(fn=spy(name, op, impl.fn), plain=impl.plain and spy(name, op, impl.plain))
               for op, impl in backend.ops.items()}
        monkeypatch.setitem(_REGISTRY, name, dataclasses.replace(backend, ops=ops))
    return log


def _call(op: str, **kwargs: Any) -> Any:
    return OP_SPECS[op].function(*_valid_args(op), **kwargs)


# ---- the registry ------------------------------------------------------------------------------


def test_backends_lists_the_builtin_backends_in_auto_order() -> None:
    names = normkit.backends()
    assert {"torch", "reference"} <= set(names)
    assert all(isinstance(n, str) for n in names) and len(set(names)) == len(names)
    in_order = [n for n in names if n in AUTO_ORDER]
    assert in_order == [n for n in AUTO_ORDER if n in in_order], f"{names} is not in auto's order {AUTO_ORDER}"
    for name in names:
        assert _REGISTRY[name].is_available()


def test_builtin_backends_run_every_functional_op() -> None:
    for name in BUILTIN:
        assert set(_REGISTRY[name].ops) == set(OPS), f"backend {name!r} lacks {set(OPS) - set(_REGISTRY[name].ops)}"


@pytest.mark.parametrize("op", OPS)
def test_auto_on_cpu_resolves_to_torch(op: str) -> None:
    args = _valid_args(op)
    assert resolve(op, "auto", *args) is _REGISTRY["torch"].ops[op].fn
    assert resolve(op, None, *args) is _REGISTRY["torch"].ops[op].fn


@pytest.mark.parametrize("op", OPS)
def test_auto_runs_torch_and_explicit_names_run_their_backend(op: str, ran: list[tuple[str, str]]) -> None:
    _call(op)
    _call(op, backend="auto")
    for name in BUILTIN:
        _call(op, backend=name)
    assert ran == [("torch", op), ("torch", op), ("torch", op), ("reference", op)]


def test_auto_takes_the_next_backend_where_torch_cannot_or_should_not(
    monkeypatch: pytest.MonkeyPatch, ran: list[tuple[str, str]]
) -> None:
    torch_backend = _REGISTRY["torch"]
    ops = dict(torch_backend.ops)
    del ops["rms_norm"]  # torch lacks the op
    ops["layer_norm"] = ops["layer_norm"]._replace(preferred=lambda *a, **k: False)  # torch declines to be picked
    ops["group_norm"] = ops["group_norm"]._replace(unsupported=lambda *a, **k: "not this one")
    monkeypatch.setitem(_REGISTRY, "torch", dataclasses.replace(torch_backend, ops=ops))
    for op in ("rms_norm", "layer_norm", "group_norm", "batch_norm"):
        _call(op)
    assert ran == [("reference", "rms_norm"), ("reference", "layer_norm"), ("reference", "group_norm"),
                   ("torch", "batch_norm")]


# ---- the resolution order ----------------------------------------------------------------------

# (backend= argument, use_backend block, NORMKIT_BACKEND) -> the backend that runs
ORDER = [
    (None, None, None, "torch"),
    (None, None, "", "torch"),
    (None, None, "reference", "reference"),
    (None, None, "auto", "torch"),
    (None, "reference", None, "reference"),
    (None, "reference", "torch", "reference"),
    (None, "torch", "reference", "torch"),
    (None, "auto", "reference", "torch"),
    ("reference", None, None, "reference"),
    ("reference", "torch", "torch", "reference"),
    ("torch", "reference", "reference", "torch"),
    ("auto", "reference", "reference", "torch"),
]


@pytest.mark.parametrize(("arg", "block", "env", "expected"), ORDER)
@pytest.mark.parametrize("op", ["layer_norm", "batch_norm"])
def test_resolution_order(
    op: str, arg: str | None, block: str | None, env: str | None, expected: str,
    monkeypatch: pytest.MonkeyPatch, ran: list[tuple[str, str]],
) -> None:
    if env is not None:
        monkeypatch.setenv(ENV_VAR, env)
    current = block or env or "auto"
    if block is None:
        assert normkit.current_backend() == current
        _call(op, backend=arg)
    else:
        with normkit.use_backend(block):
            assert normkit.current_backend() == current
            _call(op, backend=arg)
    assert ran == [(expected, op)]


def test_nested_blocks_innermost_wins_and_each_exit_restores(ran: list[tuple[str, str]]) -> None:
    seen = []

    def step() -> None:
        seen.append(normkit.current_backend())
        _call("layer_norm")

    with normkit.use_backend("reference"):
        step()
        with normkit.use_backend("torch"):
            step()
            with normkit.use_backend("reference"):
                step()
            step()
        step()
    step()
    assert seen == ["reference", "torch", "reference", "torch", "reference", "auto"]
    assert [name for name, _ in ran] == ["reference", "torch", "reference", "torch", "reference", "torch"]


def test_block_exit_on_exception_restores_the_outer_backend(ran: list[tuple[str, str]]) -> None:
    with normkit.use_backend("reference"):
        with pytest.raises(KeyError):
            with normkit.use_backend("torch"):
                raise KeyError("inside")
        assert normkit.current_backend() == "reference"
        _call("rms_norm")
    assert normkit.current_backend() == "auto"
    assert ran == [("reference", "rms_norm")]


def test_environment_variable_is_read_at_call_time(monkeypatch: pytest.MonkeyPatch, ran: list[tuple[str, str]]) -> None:
    _call("group_norm")
    monkeypatch.setenv(ENV_VAR, "reference")
    assert normkit.current_backend() == "reference"
    _call("group_norm")
    monkeypatch.setenv(ENV_VAR, "torch")
    _call("group_norm")
    monkeypatch.delenv(ENV_VAR)
    assert normkit.current_backend() == "auto"
    _call("group_norm")
    assert [name for name, _ in ran] == ["torch", "reference", "torch", "torch"]


# ---- modules: dispatch at call time ------------------------------------------------------------


def _one_case_per_module() -> list[NormCase]:
    first: dict[str, NormCase] = {}
    for case in NORM_CASES:
        if 0 not in case.shape:
            first.setdefault(case.module, case)
    return list(first.values())


MODULE_CASES = _one_case_per_module()


@pytest.mark.parametrize("case", [pytest.param(c, id=c.module) for c in MODULE_CASES + list(LAZY_CASES[:1])])
def test_module_built_before_use_backend_obeys_it(case: NormCase, ran: list[tuple[str, str]]) -> None:
    module = case.build(normkit)
    if not case.module.startswith("Lazy"):  # a lazy module has no parameters to randomize yet
        randomize_(module, seed_of(case.id))
    x = case.input(torch.float32, seed_of(case.id), requires_grad=False)
    module(x)
    with normkit.use_backend("reference"):
        module(x)
    module(x)
    assert [name for name, _ in ran] == ["torch", "reference", "torch"]
    assert {op for _, op in ran} == {case.op}


def test_module_built_inside_a_block_does_not_keep_its_backend(ran: list[tuple[str, str]]) -> None:
    with normkit.use_backend("reference"):
        module = normkit.BatchNorm2d(3)
        assert module.backend is None
    module(torch.randn(2, 3, 4, 5))
    assert ran == [("torch", "batch_norm")]


def test_module_built_under_the_environment_variable_does_not_keep_it(
    monkeypatch: pytest.MonkeyPatch, ran: list[tuple[str, str]]
) -> None:
    monkeypatch.setenv(ENV_VAR, "reference")
    module = normkit.GroupNorm(2, 4)
    monkeypatch.delenv(ENV_VAR)
    module(torch.randn(2, 4, 3))
    assert ran == [("torch", "group_norm")]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.module) for c in MODULE_CASES])
def test_module_backend_attribute_switches_and_beats_the_block(case: NormCase, ran: list[tuple[str, str]]) -> None:
    module = randomize_(case.build(normkit, backend="reference"), seed_of(case.id))
    x = case.input(torch.float32, seed_of(case.id), requires_grad=False)
    module(x)  # constructor's choice
    with normkit.use_backend("reference"):
        module.backend = "torch"
        module(x)  # the module's attribute beats the block
        module.backend = None
        module(x)  # None: the block decides again
    module.backend = "auto"
    module(x)
    assert [name for name, _ in ran] == ["reference", "torch", "reference", "torch"]
    assert "backend" not in "".join(module.state_dict())  # the choice is not part of checkpoints


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in FUSED_ADD_CASES[:2]])
def test_fused_add_modules_dispatch_at_call_time(case: Any, ran: list[tuple[str, str]]) -> None:
    module = getattr(normkit, case.module)(case.normalized_shape, residual_dtype=case.residual_dtype)
    x = make_input(case.shape, torch.float32, seed_of(case.id), requires_grad=False)
    residual = make_input(case.shape, torch.float32, seed_of(case.id, "residual"), requires_grad=False)
    module(x, residual)
    with normkit.use_backend("reference"):
        module(x, residual)
    assert ran == [("torch", case.op), ("reference", case.op)]


def test_use_backend_auto_is_valid_and_current_backend_reports_every_level(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert normkit.current_backend() == "auto"
    monkeypatch.setenv(ENV_VAR, "reference")
    assert normkit.current_backend() == "reference"
    with normkit.use_backend("torch"):
        assert normkit.current_backend() == "torch"
        with normkit.use_backend("auto"):
            assert normkit.current_backend() == "auto"
        assert normkit.current_backend() == "torch"
    assert normkit.current_backend() == "reference"


def test_explicit_backend_is_not_overridden_by_a_broken_environment(
    monkeypatch: pytest.MonkeyPatch, ran: list[tuple[str, str]]
) -> None:
    """Levels below the one that decides are never consulted: a misspelt NORMKIT_BACKEND does
    not break a call that names its backend or runs inside a block."""
    monkeypatch.setenv(ENV_VAR, "nope")
    _call("layer_norm", backend="reference")
    with normkit.use_backend("torch"):
        _call("layer_norm")
    assert ran == [("reference", "layer_norm"), ("torch", "layer_norm")]


def test_a_registered_backend_is_picked_up_without_reimporting(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests and users may register a backend at any time; the next call sees it."""
    sentinel = torch.full((2, 5), 7.0)
    extra = dataclasses.replace(_REGISTRY["torch"], name="extra",
                                ops={"layer_norm": OpImpl(lambda *a, **k: sentinel)})
    monkeypatch.setitem(_REGISTRY, "extra", extra)
    assert "extra" in normkit.backends()
    assert NF.layer_norm(torch.randn(2, 5), (5,), backend="extra") is sentinel
    with normkit.use_backend("extra"):
        assert normkit.LayerNorm(5)(torch.randn(2, 5)) is sentinel
