"""Every normkit module class x backend x tool: the tool gives eager's numbers, or raises an error
where torch's own twin raises the same; never a silent wrong value.

Tools: ``torch.compile(fullgraph=True)`` (the cheap "eager" backend: the graph capture is what
is tested; inductor has its own case in test_tooling.py), ``torch.export``,
``torch.fx.symbolic_trace``, ``copy.deepcopy``, ``pickle``, ``torch.func`` (``grad`` through
``functional_call``, ``vmap`` over a stack of inputs, ``jvp`` checked by the dot-product identity
``<J t, u> = <t, J^T u>`` against autograd's vector-Jacobian product) and two threads running
the same model inside different ``use_backend`` blocks at the same time.

Each module sits in a small host model (``norm(x) * 2``) the way users hold it. The triton
backend runs a representative module per kernel family (the interpreter is slow); the CPU
backends run every class.
"""

from __future__ import annotations

import copy
import dataclasses
import pickle
import re
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

import normkit
from _outside import raised
from cases import (
    BACKENDS,
    MODULE_CLASSES,
    MODULE_ROWS,
    MUST_RUN,
    TOLERANCES,
    Host,
    make_input,
    randomize_,
    seed_of,
    skip_if_declined,
)
from normkit.backends import _REGISTRY, BackendError

ROWS = MODULE_ROWS
# One module per Triton kernel family (BatchNorm, row norms, the fused activation and residual),
# with the tools whose path differs per backend (custom ops, fake kernels, transform rules):
# copies and fx traces hold the module, not the kernel, and the interpreter is slow.
TRITON_ROWS = ("BatchNorm2d", "InstanceNorm2d", "LayerNorm", "GroupNormAct", "FusedAddRMSNorm")
TRITON_TOOLS = ("compile", "export", "grad", "vmap", "jvp")
TOOLS = ("compile", "export", "fx", "deepcopy", "pickle", "grad", "vmap", "jvp", "threads")
_F32 = TOLERANCES[torch.float32]

# Cells that fail today: (module, backend, tool) -> the defect. Each is removed by its fix.
KNOWN_DEFECTS: dict[tuple[str, str, str], str] = {}


def test_rows_cover_every_module_class() -> None:
    assert set(ROWS) == set(MODULE_CLASSES), "add a row for each new module class"


def _host(name: str, backend: str) -> Host:
    args, kwargs, shape = ROWS[name]
    norm = getattr(normkit, name)(*args, **kwargs, backend=backend)
    if name.startswith("Lazy"):  # materialize: a lazy module has no parameters to copy yet
        norm(torch.zeros(shape))
    return randomize_(Host(norm), seed_of("matrix", name))


def _input(name: str, *tag: object, batch: tuple[int, ...] = (), requires_grad: bool = True) -> Tensor:
    return make_input(batch + ROWS[name][2], torch.float32, seed_of("matrix x", name, *tag),
                      requires_grad=requires_grad)


def _close(actual: Tensor, expected: Tensor, what: str) -> None:
    if not expected.is_floating_point():
        assert torch.equal(actual, expected), f"{what}: {actual} != {expected}"
        return
    torch.testing.assert_close(actual, expected, rtol=_F32.rtol, atol=_F32.atol, msg=lambda m: f"{what}: {m}")


def _same_state(actual: nn.Module, expected: nn.Module, what: str) -> None:
    a, e = actual.state_dict(), expected.state_dict()
    assert a.keys() == e.keys(), what
    for key in e:
        _close(a[key], e[key], f"{what}: {key}")


def _steps(name: str, eager: nn.Module, other: nn.Module, call: Callable[[Tensor], Tensor],
           modes: tuple[bool, ...] = (True, False)) -> None:
    """Train/eval ``eager`` and ``other`` side by side: outputs, gradients under a random
    upstream gradient, and state after every step."""
    for i, training in enumerate(modes):
        eager.train(training)
        other.train(training)
        x = _input(name, "step", i)
        x_other = x.detach().clone().requires_grad_()
        expected, actual = eager(x), call(x_other)
        _close(actual, expected, f"step {i}: output")
        dy = torch.randn(expected.shape, generator=torch.Generator().manual_seed(i))
        expected.backward(dy)
        actual.backward(dy)
        _close(x_other.grad, x.grad, f"step {i}: input gradient")
        for (p_name, p), q in zip(eager.named_parameters(), other.parameters(), strict=True):
            _close(q.grad, p.grad, f"step {i}: gradient of {p_name}")
            p.grad = q.grad = None
        _same_state(other, eager, f"step {i}")


# ---- the tools ---------------------------------------------------------------------------------


def _compile(name: str, eager: Host) -> None:
    torch._dynamo.reset()  # a fresh cache: each cell compiles its own graph
    other = copy.deepcopy(eager)
    # one training step: the statistics update is what a graph can get wrong (eval would only
    # recompile the same graph without it, at ~0.2 s a module)
    _steps(name, eager, other, torch.compile(other, fullgraph=True, backend="eager"), modes=(True,))


def _export(name: str, eager: Host) -> None:
    """Exported in training mode (the graph must carry the statistics update), called twice."""
    eager.train()
    exported = torch.export.export(copy.deepcopy(eager), (_input(name, "export", requires_grad=False),)).module()
    for i in range(2):
        x = _input(name, "export", i).detach()
        with torch.no_grad():
            _close(exported(x), eager(x), f"call {i}: output")
        _same_state(exported, eager, f"call {i}")


def _fx(name: str, eager: Host) -> None:
    traced = torch.fx.symbolic_trace(copy.deepcopy(eager))
    _steps(name, eager, traced, traced)


def _clone(clone: Callable[[Any], Any]) -> Callable[[str, Host], None]:
    def check(name: str, eager: Host) -> None:
        other = clone(eager)
        assert type(other.norm) is type(eager.norm) and other.norm.backend == eager.norm.backend
        _steps(name, eager, other, other)
        before = {k: v.clone() for k, v in other.state_dict().items()}
        eager.train()(_input(name, "moves the original only").detach())
        for key, value in other.state_dict().items():
            assert torch.equal(value, before[key]), f"{key} is shared between the original and the copy"

    return check


def _grad(name: str, eager: Host) -> None:
    """torch.func.grad of a loss through functional_call, with respect to the parameters and the
    input, = autograd's gradients (eval first; training updates running statistics in place,
    which torch's own modules refuse under a transform)."""
    for training in (False, True):
        model, reference = copy.deepcopy(eager).train(training), copy.deepcopy(eager).train(training)
        x = _input(name, "grad", training).detach()
        dy = torch.randn(reference(x).shape, generator=torch.Generator().manual_seed(7))
        reference.load_state_dict(eager.state_dict())  # undo the statistics update of the probe call
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = dict(model.named_buffers())

        def loss(p: dict[str, Tensor], x: Tensor) -> Tensor:
            return (functional_call(model, (p, buffers), (x,)) * dy).sum()

        grads, dx = grad(loss, argnums=(0, 1))(params, x)
        x_ref = x.clone().requires_grad_()
        (reference(x_ref) * dy).sum().backward()
        mode = "train" if training else "eval"
        _close(dx, x_ref.grad, f"{mode}: input gradient")
        for key, p in reference.named_parameters():
            _close(grads[key], p.grad, f"{mode}: gradient of {key}")
        _same_state(model, reference, f"{mode}: state after the call")


def _vmap(name: str, eager: Host) -> None:
    """vmap over a stack of whole inputs (eval: no statistics update) = one call per input."""
    model = copy.deepcopy(eager).eval()
    xs = _input(name, "vmap", batch=(2,)).detach()
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    actual = vmap(lambda x: functional_call(model, state, (x,)))(xs)
    with torch.no_grad():
        expected = torch.stack([eager.eval()(x) for x in xs])
    _close(actual, expected, "vmap")


def _jvp(name: str, eager: Host) -> None:
    """Forward-mode tangent J t checked against autograd: <J t, u> = <t, J^T u> (a zero or wrong
    tangent fails), in eval and in training."""
    for training in (False, True):
        model, reference = copy.deepcopy(eager).train(training), copy.deepcopy(eager).train(training)
        x = _input(name, "jvp", training).detach()
        gen = torch.Generator().manual_seed(11)
        t = torch.randn(x.shape, generator=gen)
        y, jt = jvp(model, (x,), (t,))
        x_ref = x.clone().requires_grad_()
        y_ref = reference(x_ref)
        u = torch.randn(y_ref.shape, generator=gen)
        y_ref.backward(u)
        mode = "train" if training else "eval"
        _close(y, y_ref.detach(), f"{mode}: output under jvp")
        lhs, rhs = (jt.double() * u).sum().item(), (t.double() * x_ref.grad).sum().item()
        assert abs(lhs - rhs) <= 1e-4 * max(1.0, abs(rhs)), f"{mode}: <J t, u> = {lhs:.6g} but <t, J^T u> = {rhs:.6g}"
        _same_state(model, reference, f"{mode}: state after the call")


def _threads(name: str, eager: Host) -> None:
    """Two threads run the same model (backend=None) at the same time, one inside
    ``use_backend(<the cell's backend>)`` and one inside ``use_backend("spy")``, a backend that
    records its calls and delegates to torch's ops: each thread's calls go to its own block."""
    backend = eager.norm.backend
    torch_ops = _REGISTRY["torch"].ops
    calls: dict[str, list[str]] = {"spy": [], backend: []}

    def recording(op: str, impl: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            calls["spy"].append(threading.current_thread().name)
            return impl.fn(*args, **kwargs)

        return impl._replace(fn=run)

    _REGISTRY["spy"] = dataclasses.replace(_REGISTRY["torch"], name="spy",
                                           ops={op: recording(op, impl) for op, impl in torch_ops.items()})
    models = {b: copy.deepcopy(eager).eval() for b in (backend, "spy")}
    for m in models.values():
        m.norm.backend = None
    x = _input(name, "threads").detach()
    with torch.no_grad():
        expected = eager.eval()(x)
    barrier = threading.Barrier(2, timeout=30)
    results: dict[str, Any] = {}

    def work(b: str) -> None:
        try:
            with normkit.use_backend(b):
                barrier.wait()  # both blocks are open before either thread calls the model
                for _ in range(3):
                    with torch.no_grad():
                        results[b] = models[b](x)
                barrier.wait()
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            results[b] = e

    try:
        threads = [threading.Thread(target=work, args=(b,), name=b) for b in (backend, "spy")]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
    finally:
        del _REGISTRY["spy"]
    for b in (backend, "spy"):
        if isinstance(results.get(b), BaseException):
            raise results[b]
        _close(results[b], expected, f"thread in use_backend({b!r})")
    assert calls["spy"] and set(calls["spy"]) == {"spy"}, (
        f"the spy backend ran calls of threads {sorted(set(calls['spy']))}; only the 'spy' thread is in its block"
    )


CHECKS: dict[str, Callable[[str, Host], None]] = {
    "compile": _compile,
    "export": _export,
    "fx": _fx,
    "deepcopy": _clone(copy.deepcopy),
    "pickle": _clone(lambda m: pickle.loads(pickle.dumps(m))),
    "grad": _grad,
    "vmap": _vmap,
    "jvp": _jvp,
    "threads": _threads,
}


def _has_2d_sibling(name: str) -> bool:
    return name[-2:] in ("1d", "3d") and name[:-2] + "2d" in ROWS


def _cells() -> list[Any]:
    cells = []
    for name in ROWS:
        for backend in BACKENDS:
            if backend not in MUST_RUN and name not in TRITON_ROWS:
                continue
            for tool in TOOLS if backend in MUST_RUN else TRITON_TOOLS:
                if tool in ("compile", "export") and (name.startswith("Lazy") or _has_2d_sibling(name)):
                    # ~0.3 s a graph: a lazy module, once materialized, is its non-lazy class, and
                    # the 1d/3d classes share their 2d sibling's forward (only the input check differs)
                    continue
                reason = KNOWN_DEFECTS.get((name, backend, tool))
                marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
                cells.append(pytest.param(name, backend, tool, id=f"{name}-{backend}-{tool}", marks=marks))
    return cells


# Clear errors the documentation promises for a (backend, tool): accepted in place of a result.
DOCUMENTED_ERRORS = {
    ("triton", "jvp"): r"forward-mode AD .* is not supported by normkit's triton kernels",
    ("numba", "jvp"): r"forward-mode AD .* is not supported by normkit's numba kernels",
}

# torch.nn's class standing in for a normkit class without a same-named twin, when asking
# "does torch raise here too?" (only the error is compared, never numbers).
STAND_INS = {"BatchNormAct2d": "BatchNorm2d", "GhostBatchNorm1d": "BatchNorm1d", "GhostBatchNorm2d": "BatchNorm2d",
             "BatchRenorm1d": "BatchNorm1d", "BatchRenorm2d": "BatchNorm2d", "BatchRenorm3d": "BatchNorm3d"}
NORMKIT_ONLY = ("act", "r_max", "d_max", "weight_offset", "residual_dtype")


def _twin_host(name: str) -> Host | None:
    """torch's twin of row ``name`` in the same host, or None where torch has none."""
    args, kwargs, shape = ROWS[name]
    twin = STAND_INS.get(name, name)
    if not hasattr(nn, twin) or name.startswith(("Frozen", "FusedAdd")) or name in ("LayerNorm2d", "RMSNorm2d"):
        return None
    if name.startswith("Ghost"):
        args = args[:1]
    module = getattr(nn, twin)(*args, **{k: v for k, v in kwargs.items() if k not in NORMKIT_ONLY})
    if name.startswith("Lazy"):
        module(torch.zeros(shape))
    return randomize_(Host(module), seed_of("matrix", name))


@pytest.mark.parametrize(("name", "backend", "tool"), _cells())
@skip_if_declined
def test_tool_matches_eager(name: str, backend: str, tool: str) -> None:
    try:
        CHECKS[tool](name, _host(name, backend))
    except (AssertionError, BackendError):
        raise
    except Exception as ours:  # noqa: BLE001 - an error is right only where torch's twin raises it too
        documented = DOCUMENTED_ERRORS.get((backend, tool))
        if documented is not None and re.search(documented, str(ours)):
            return
        twin = _twin_host(name) if tool in ("compile", "export", "fx", "grad", "vmap", "jvp") else None
        theirs = None if twin is None else raised(lambda: CHECKS[tool](name, twin))
        # a graph capture that torch's twin cannot do either (momentum=None reads a tensor as a
        # Python number) may fail differently; a transform must fail as torch's does
        capture = tool in ("compile", "export", "fx")
        if theirs is None or not capture and type(theirs) is not type(ours):
            raise AssertionError(f"normkit raises {type(ours).__name__} where torch's "
                                 f"{'twin runs' if twin is not None else 'tooling should run'} the same") from ours
