"""How normkit modules meet torch's tracers: ``torch.fx.symbolic_trace`` and ``torch.jit.script``.

A module's forward reads shapes (input checks) and Python state (``momentum=None``'s counter,
the backend), which an ``fx`` Proxy cannot. So each forward is one function of the module,
``forward_fn(module, *inputs)``, decorated with :func:`module_leaf`: under ``symbolic_trace``
it becomes one ``call_function`` node, and the checks and the backend choice run when the graph
runs (dispatch stays resolved at call time).

* In a traced *model* the node gets the submodule itself (a ``get_attr`` of its name), so the
  graph reads its live ``training`` flag, running statistics and ``backend`` attribute.
* When the normkit module is itself the traced root there is no name to refer to it by
  (``torch.fx`` would emit ``get_attr('')``, which fails). The node then gets the root's
  parameters and buffers as ``get_attr`` nodes (so ``graph.to(device)`` and
  ``load_state_dict`` act) and a snapshot of its other attributes (``training``, ``eps``,
  ``backend``, ...) taken when tracing: they are constants of the graph (``.eval()`` on it
  does not change them; torch's own ``BatchNorm2d`` cannot be traced as the root at all, fx
  raises ``TraceError`` on its control flow). Such a graph cannot be pickled (its node
  calls a closure over the snapshot); ``copy.deepcopy`` works.

``torch.jit.script`` cannot compile the Python dispatch of a forward; scripting a model that
holds a normkit module raises :class:`NotScriptableError` saying what to do instead.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["PLAIN_TENSORS", "NotScriptableError", "module_leaf", "refuse_scripting"]

F = TypeVar("F", bound=Callable[..., Any])

# The exact types of a plain tensor: an input of one of them is no fx Proxy, so a forward may
# skip its leaf's tracer test (a subclass takes the leaf).
PLAIN_TENSORS = frozenset({torch.Tensor, nn.Parameter})


def _tracer_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any | None:
    for a in args:  # (no tuple of both built: this runs on every forward)
        if isinstance(a, torch.fx.Proxy):
            return a.tracer
    for a in kwargs.values():
        if isinstance(a, torch.fx.Proxy):
            return a.tracer
    return None


def _at_root(fn: Callable[..., Any], module: nn.Module) -> Callable[..., Any]:
    """``fn`` bound to a snapshot of the root module's Python attributes; its tensors come in
    as the first argument (live, from the graph's ``get_attr`` nodes) at every call."""
    snapshot = copy.copy(module)  # its own __dict__: later changes to the original do not leak in

    def run(tensors: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        bound = copy.copy(snapshot)
        bound._parameters = {**snapshot._parameters, **{k: v for k, v in tensors.items() if k in snapshot._parameters}}
        bound._buffers = {**snapshot._buffers, **{k: v for k, v in tensors.items() if k in snapshot._buffers}}
        return fn(bound, *args, **kwargs)

    run.__name__ = run.__qualname__ = f"{fn.__name__}_of_root"
    return run


def module_leaf(fn: F) -> F:
    """Make ``fn(module, *args, **kwargs)`` one ``torch.fx`` node wherever it is called from
    (``torch.fx.wrap`` only patches the defining file's globals, so a forward importing ``fn``
    by name was traced into); outside fx tracing it is ``fn``."""

    @functools.wraps(fn)  # (``leaf.__wrapped__`` is ``fn``: forwards call it on plain tensors)
    def leaf(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        tracer = _tracer_of(args, kwargs)
        if tracer is None:
            return fn(module, *args, **kwargs)
        if module is getattr(tracer, "root", None):
            tensors = dict(module.named_parameters(recurse=False))
            tensors.update(module.named_buffers(recurse=False))
            return tracer.create_proxy("call_function", _at_root(fn, module), (tensors, *args), kwargs)
        return tracer.create_proxy("call_function", fn, (module, *args), kwargs)

    return leaf  # type: ignore[return-value]


class NotScriptableError(RuntimeError):
    """``torch.jit.script`` was given a model holding a normkit module."""


def refuse_scripting(module: nn.Module) -> nn.Module:
    """``__prepare_scriptable__`` of every normkit module: TorchScript cannot compile normkit's
    call-time backend dispatch (nor the Triton ops), so say what works instead."""
    from ..surgery import TWINS  # torch.nn class -> normkit twin: what to_torch turns back

    name = type(module).__name__
    if type(module) in TWINS.values():
        instead = (
            "convert the model back to torch.nn modules before scripting "
            "(model = normkit.to_torch(model) turns each normkit module with torch's options back "
            "into its torch.nn class, same parameters), or "
        )
    else:
        instead = f"normkit.{name} has no torch.nn twin to convert back to: "
    raise NotScriptableError(
        f"torch.jit.script cannot compile normkit.{name}: its forward picks a backend at call time "
        f"in Python, which TorchScript does not support. Instead, {instead}use torch.compile(model) "
        "or torch.export.export(model, args), which support every normkit module on every backend."
    )
