"""The backend registry: which implementation computes a normalization call.

Every op a backend may implement is declared once, by :func:`define_op` on its public function
(:mod:`normkit.functional`, :mod:`normkit.masked`): an :class:`OpSpec` that names the arguments
the dispatcher reads (the input, the arguments updated in place, the residual's dtype), in
:data:`OPS`.

A backend is a name plus a table of ops (``"layer_norm"``, ``"batch_norm"``, ...). Each op is an
:class:`OpImpl`: the function (same arguments as :mod:`normkit.functional`, minus ``backend``),
an ``unsupported`` check that says why this backend cannot run a given call, and a ``preferred``
check that says whether ``"auto"`` should pick it for that call.

The backend of a call is resolved when the call runs, never when a module is built:

1. the ``backend=`` argument of the call (or of the module),
2. else the innermost ``with normkit.use_backend(name):`` block of this thread and asyncio task
   (a :class:`contextvars.ContextVar`: a block in one thread or task never changes what another
   runs; a thread starts outside every block, a task starts in the blocks it was created in),
3. else the ``NORMKIT_BACKEND`` environment variable,
4. else ``"auto"``.

A backend named explicitly either runs the call or raises :class:`BackendError`; it never falls
back.

Under ``torch.compile`` the choice is made while tracing: ``use_backend`` blocks and a module's
``backend`` attribute are guarded (changing them recompiles), but ``NORMKIT_BACKEND`` is read
once per compiled graph, like the rest of the process environment: set it before compiling.
Dynamo cannot read a ContextVar, so compiled code reads a per-thread copy of the block stack
(a ``threading.local``, which dynamo guards per thread). Threads are exact under compile too.
asyncio tasks are exact in eager code only: compiled code sees the blocks open in its thread,
whichever task opened them (a task without a block, running while another task's block is open
across an ``await``, sees that block; a task created inside a block that has since closed does
not see it), and raises :class:`BackendError` where blocks of several tasks overlap. In async
code that runs compiled models, pass ``backend=`` to the modules instead of ``use_backend``.

``"auto"`` walks :data:`AUTO_ORDER` and takes the first backend that is available, runs
the call and is preferred for it. Where the input alone settles that walk (a small CPU tensor:
no kernel backend claims it, so ATen runs it), :func:`auto_choice` answers before the argument
checks, and :mod:`normkit.functional` hands the call to ATen, whose checks are torch's own.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import torch

from ._environ import EnvWatch

__all__ = [
    "AUTO_ORDER",
    "Backend",
    "BackendError",
    "OPS",
    "OpImpl",
    "OpSpec",
    "auto_choice",
    "backends",
    "current_backend",
    "define_op",
    "get_backend",
    "probing",
    "register_backend",
    "resolve",
    "use_backend",
]

ENV_VAR = "NORMKIT_BACKEND"
# NORMKIT_BACKEND as eager calls read it: os.environ's value, re-read only after a change
_ENV = EnvWatch(ENV_VAR)

# "auto" tries these in order. The kernel backends first: each claims only the calls its
# committed benchmark shows it winning (its ``preferred`` check), Triton on CUDA tensors, numba
# on CPU tensors; torch's ATen kernels next, exact and fast wherever they exist; the reference
# last, for what ATen does not compute.
AUTO_ORDER: tuple[str, ...] = ("triton", "numba", "torch", "reference")


class BackendError(NotImplementedError):
    """A backend was asked for by name but cannot run this call (or does not exist here).
    ``reason`` is the backend's own reason for declining, where it gave one."""

    reason: str | None = None


def _declined(message: str, reason: str | None = None) -> BackendError:
    error = BackendError(message)
    error.reason = reason
    return error


class WouldRun(Exception):  # noqa: N818 (not an error: the answer of a probe)
    """Raised by :func:`resolve` inside :func:`probing` instead of returning: the call would
    run ``op`` of ``backend``."""

    def __init__(self, backend: str, op: str) -> None:
        super().__init__(f"{backend} would run {op}")
        self.backend, self.op = backend, op


def _never(*args: Any, **kwargs: Any) -> str | None:
    return None


def _always(*args: Any, **kwargs: Any) -> bool:
    return True


# The call options every public op takes (keyword-only) that are not passed to the backends.
CALL_OPTIONS = frozenset({"backend", "stats_dtype", "out_dtype"})


@dataclass(frozen=True)
class OpSpec:
    """One op as the dispatcher sees it: its arguments by name, never by position.

    ``params`` are the arguments of its backend functions, in order (the public function's,
    without the call options ``backend``/``stats_dtype``/``out_dtype``). ``input`` is the
    tensor whose dtype and memory format the result follows; ``in_place`` the arguments
    updated in place (running statistics), written back after a call run at another precision;
    ``residual_dtype`` the argument that gives a second result's dtype (``residual_out``), if
    any. ``function`` is the public function (what :func:`normkit.support_matrix` calls)."""

    name: str
    params: tuple[str, ...]
    function: Callable[..., Any] = field(repr=False, compare=False)
    input: str = "input"
    in_place: tuple[str, ...] = ()
    residual_dtype: str | None = None
    # ops with several results and no residual_dtype (qk_rms_norm, sandwich_rms_norm): for each
    # result, the argument whose dtype it has; those named in ``kept`` keep it under out_dtype
    results: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()
    # the positions of input and in_place, computed once (the dispatcher reads them per call)
    input_at: int = field(init=False, repr=False, compare=False)
    in_place_at: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_at", self.at(self.input))
        object.__setattr__(self, "in_place_at", tuple(self.at(a) for a in self.in_place))
        for arg in (*((self.residual_dtype,) if self.residual_dtype is not None else ()), *self.results, *self.kept):
            self.at(arg)

    def at(self, arg: str) -> int:
        """The position of argument ``arg`` among :attr:`params` (ValueError if it has none)."""
        if arg not in self.params:
            raise ValueError(f"op {self.name!r} has no argument {arg!r}; its arguments are {list(self.params)}")
        return self.params.index(arg)


# Every op, by name: filled by define_op as normkit.functional and normkit.masked are imported.
OPS: dict[str, OpSpec] = {}

_F = TypeVar("_F", bound=Callable[..., Any])


def define_op(
    *,
    input: str = "input",
    in_place: tuple[str, ...] = (),
    residual_dtype: str | None = None,
    results: tuple[str, ...] = (),
    kept: tuple[str, ...] = (),
) -> Callable[[_F], _F]:
    """Declare the decorated public function an op (named after it) in :data:`OPS`; its
    backend arguments are its own, less the call options."""

    def declare(fn: _F) -> _F:
        params = tuple(p for p in inspect.signature(fn).parameters if p not in CALL_OPTIONS)
        # a misspelt argument name fails here
        spec = OpSpec(fn.__name__, params, fn, input, in_place, residual_dtype, results, kept)
        OPS[spec.name] = spec
        return fn

    return declare


class OpImpl(NamedTuple):
    """One op of one backend.

    ``unsupported(*args, **kwargs)`` returns ``None`` when the backend can run the call, else
    a short reason. ``preferred(*args, **kwargs)`` tells ``"auto"`` whether to pick it; ``"auto"``
    asks it first, so it answers for any call that passed the argument checks, supported or not
    (``False`` where unsure). Both receive the same arguments as ``fn`` and must not touch the
    tensors' data.

    ``may_prefer(input)``, where given, says from the input tensor alone whether ``preferred``
    could say yes to any call with that input (``False``: it would say no, whatever the other
    arguments). It is asked before the argument checks (any tensor, nothing else checked), so
    that :func:`auto_choice` can settle the common call without them; ``None``: not known.

    ``plain``, where given, computes what ``fn`` computes, for the ordinary call only: checked
    arguments, every tensor of an exact tensor type (no ``__torch_function__`` to honour) and of
    the input's dtype and device, no option that converts (``residual_dtype``), not compiling.
    It may skip what only other calls need (casts, torch.nn.functional's Python wrapper); the
    default path calls it where it knows the call is that one (``auto_choice(..., plain=True)``).

    ``may_prefer_unrecorded(input)``, where given, is ``may_prefer`` for a call autograd will not
    record (grad mode off, inference mode, or no tensor argument requiring grad): a backend whose claims are for
    training calls only says no there. :func:`auto_choice` asks it only after ``may_prefer`` said
    yes, and only where the caller passed the call's tensors. It must give a call that
    ``torch.jit.trace`` records ``may_prefer``'s answer (the trace's check reruns the call under
    ``torch.no_grad()``, and must take the route the trace took).
    """

    fn: Callable[..., Any]
    unsupported: Callable[..., str | None] = _never
    preferred: Callable[..., bool] = _always
    may_prefer: Callable[[torch.Tensor], bool] | None = None
    plain: Callable[..., Any] | None = None
    may_prefer_unrecorded: Callable[[torch.Tensor], bool] | None = None


def _available() -> bool:
    return True


@dataclass(frozen=True)
class Backend:
    name: str
    ops: Mapping[str, OpImpl]
    is_available: Callable[[], bool] = _available
    description: str = ""


class _Table(dict):  # type: ignore[type-arg]
    """A registry table (:data:`_REGISTRY`, :data:`_LAZY`) that forgets what ``"auto"`` worked
    out from it (its candidate backends, each op's plan) whenever it changes, however it is
    changed (``register_backend``, or a test's ``monkeypatch.setitem``): that is built once,
    not looked up on every call. (A registered :class:`Backend`'s table of ops is not changed
    in place: a changed backend is registered again.)"""

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        _forget()

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(key)
        _forget()

    def pop(self, *args: Any) -> Any:
        _forget()
        return super().pop(*args)

    def popitem(self) -> Any:
        _forget()
        return super().popitem()

    def setdefault(self, key: Any, default: Any = None) -> Any:
        _forget()
        return super().setdefault(key, default)

    def update(self, *args: Any, **kwargs: Any) -> None:
        super().update(*args, **kwargs)
        _forget()

    def clear(self) -> None:
        super().clear()
        _forget()


# AUTO_ORDER -> the backends its names resolve to (lazy ones loaded, absent ones left out):
# what "auto" walks, emptied by every change to the registry tables.
_CANDIDATES: dict[tuple[str, ...], tuple[Backend, ...]] = {}


class _Plan(NamedTuple):
    """What settles "auto" for one op before its checks (:func:`auto_choice`): the function of
    the first backend that takes every call (``fn``, with its ``is_available`` where that is not
    always true), after asking each kernel backend before it whether it may prefer the input
    (``asks``: its ``may_prefer``, ``may_prefer_unrecorded`` and ``is_available``). ``fn`` None:
    never settled early. ``plain``: that backend's function for the ordinary call
    (:attr:`OpImpl.plain`, else ``fn``)."""

    fn: Callable[..., Any] | None
    asks: tuple[
        tuple[Callable[[torch.Tensor], bool], Callable[[torch.Tensor], bool] | None, Callable[[], bool]], ...
    ] = ()
    available: Callable[[], bool] | None = None
    plain: Callable[..., Any] | None = None


# op -> its plan, built from _CANDIDATES on the op's first call; emptied with it.
_PLANS: dict[str, _Plan] = {}


def _forget() -> None:
    _CANDIDATES.clear()
    _PLANS.clear()


_REGISTRY: dict[str, Backend] = _Table()
# The stack of use_backend() blocks of this thread and asyncio task: the truth, read in eager code.
_ACTIVE: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("normkit_use_backend", default=())


class _ThreadBlocks(threading.local):
    """What compiled code reads instead of :data:`_ACTIVE` (dynamo reads and guards a
    ``threading.local`` per thread, but cannot read a ContextVar): this thread's stack, or
    :data:`_OVERLAP` while use_backend blocks of several asyncio tasks (contexts) overlap here."""

    def __init__(self) -> None:  # runs once in each thread that touches it
        self.stack: tuple[str, ...] | None = ()
        self.open = 0  # blocks open in this thread, over all its contexts


_THREAD = _ThreadBlocks()
_OVERLAP = None  # the stack of no single context: compiled code must not guess
# Backends whose module is imported on first use (Triton's import is slow): name -> (probe,
# loader). The probe is a cheap check, with no import, of whether the backend could be available.
_LAZY: dict[str, tuple[Callable[[], bool], Callable[[], None]]] = _Table()
# Lazy backends' ``{op: unsupported}`` checks, importable without their dependencies: what
# probing() asks, so normkit.support_matrix() is the same on machines with and without them.
_DECLARED: dict[str, Callable[[], Mapping[str, Callable[..., str | None]]]] = {}
# Inside probing(): resolve() answers with WouldRun / BackendError and nothing runs.
_PROBING: contextvars.ContextVar[bool] = contextvars.ContextVar("normkit_probing", default=False)


def register_backend(backend: Backend) -> None:
    """Add ``backend`` to the registry (replacing one of the same name)."""
    _REGISTRY[backend.name] = backend


def register_lazy_backend(
    name: str,
    loader: Callable[[], None],
    probe: Callable[[], bool],
    declared: Callable[[], Mapping[str, Callable[..., str | None]]] | None = None,
) -> None:
    """Register ``loader``, which registers backend ``name`` when first needed. ``probe`` says,
    without importing anything heavy, whether the backend could be available here at all.
    ``declared`` returns its ops' ``unsupported`` checks without importing its dependencies
    (for :func:`probing`; else probing loads the backend where it can)."""
    _TRIED.discard(name)
    if declared is not None:
        _DECLARED[name] = declared
    _LAZY[name] = (probe, loader)  # (last: the change that empties _CANDIDATES)


_TRIED: set[str] = set()
# Lazy backends whose probe said no, with that probe (a new registration or probe asks again).
_ABSENT: dict[str, Callable[[], bool]] = {}


def _lookup(name: str) -> Backend | None:
    if name in _REGISTRY:
        return _REGISTRY[name]
    probe, loader = _LAZY.get(name, (None, None))
    if probe is None or _ABSENT.get(name) is probe:
        return None
    if torch.compiler.is_compiling():  # (dynamo cannot trace a lock; the first call loads eagerly)
        return _load(name, probe, loader)
    # One thread loads a backend; threads asking meanwhile wait for its registration (without
    # the lock they found it tried but not yet registered, and called it unavailable).
    with _LOAD_LOCK:
        return _REGISTRY.get(name) or _load(name, probe, loader)


def _load(name: str, probe: Callable[[], bool], loader: Callable[[], object]) -> Backend | None:
    if name in _TRIED:
        return _REGISTRY.get(name)
    if not probe():
        # Asked once per probe: whether a backend could run here is a property of the machine,
        # and "auto" asks on every call (a probe reads the environment and the CUDA runtime).
        _ABSENT[name] = probe
        return None
    _TRIED.add(name)
    loader()
    return _REGISTRY.get(name)


_LOAD_LOCK = threading.RLock()  # (reentrant: a loader registers through this module)


def _known() -> list[str]:
    return sorted(set(_REGISTRY) | set(_LAZY) | {"auto"})


def get_backend(name: str) -> Backend:
    """The registered backend called ``name``; ``ValueError`` for an unknown name."""
    backend = _lookup(name)
    if backend is None and name in _LAZY:
        raise BackendError(f"normkit backend {name!r} is not available on this machine")
    if backend is None:
        raise ValueError(f"unknown normkit backend {name!r}; expected one of {_known()}")
    return backend


def backends() -> list[str]:
    """Names of the backends that can run on this machine, in ``"auto"``'s order."""
    names = [n for n in AUTO_ORDER if n in _REGISTRY or n in _LAZY]
    names += sorted(n for n in set(_REGISTRY) | set(_LAZY) if n not in names)
    found = [(n, _lookup(n)) for n in names]
    return [n for n, b in found if b is not None and b.is_available()]


def _blocks(compiling: bool) -> tuple[str, ...]:
    if not compiling:
        return _ACTIVE.get()
    stack = _THREAD.stack
    if stack is None:
        raise BackendError(
            "torch.compile sees use_backend() per thread, and use_backend blocks of several asyncio "
            "tasks overlap in this thread: pass backend= to the modules (or functions) called from "
            "compiled code in these tasks, or keep each task's block from spanning an await"
        )
    return stack


def current_backend() -> str:
    """The backend name a call without ``backend=`` would use right now, in this thread and
    asyncio task."""
    return _current(torch.compiler.is_compiling())


def _current(compiling: bool) -> str:
    stack = _blocks(compiling)
    return stack[-1] if stack else _env_backend()


def _env_backend() -> str:
    """``NORMKIT_BACKEND``, or ``"auto"`` where it is unset or empty (under compile dynamo reads
    it once per graph)."""
    return os.environ.get(ENV_VAR) or "auto"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Within the block, calls without an explicit ``backend=`` use backend ``name``.

    >>> with normkit.use_backend("reference"):
    ...     y = model(x)
    """
    if name != "auto":
        get_backend(name)  # fail at the ``with`` line for a misspelt name
    outer = _ACTIVE.get()
    token = _ACTIVE.set((*outer, name))
    _sync_thread(outer, _ACTIVE.get())
    try:
        yield
    finally:
        inner = _ACTIVE.get()
        _THREAD.open -= 1
        _sync_thread(inner, outer, opened=0)
        try:
            _ACTIVE.reset(token)
        except ValueError:
            # Closed from another context (a generator holding the block closed elsewhere): that
            # context never entered this block, so its stack has nothing to undo; the thread's
            # count above is what compiled code reads, and it is already down.
            pass


def _sync_thread(before: tuple[str, ...], after: tuple[str, ...], *, opened: int = 1) -> None:
    """Move this thread's copy of the stack from ``before`` to ``after`` (this context's
    stacks), or mark it ambiguous when another context in this thread moved it in between."""
    _THREAD.open += opened
    if _THREAD.open == 0:
        _THREAD.stack = ()  # no block open anywhere in this thread: unambiguous again
    elif _THREAD.stack == before:
        _THREAD.stack = after
    else:
        _THREAD.stack = _OVERLAP


@contextlib.contextmanager
def probing() -> Iterator[None]:
    """Within the block, a call naming a backend is checked but never run: :func:`resolve`
    raises :class:`WouldRun` where the backend would run it, :class:`BackendError` (with its
    ``reason``) where it declines. Availability on this machine is not asked, and lazy
    backends answer with their declared checks, so the answer is the same on every machine.
    Stand-in tensors (meta, or ones that report another device) are enough: checks read
    shapes, dtypes, strides and devices, never data. For :func:`normkit.support_matrix`."""
    token = _PROBING.set(True)
    try:
        yield
    finally:
        _PROBING.reset(token)


def _declared_checks(name: str) -> Mapping[str, Callable[..., str | None]]:
    if name in _DECLARED:
        return _DECLARED[name]()
    backend = get_backend(name)
    return {op: impl.unsupported for op, impl in backend.ops.items()}


def _probe(op: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    if name == "auto":
        raise BackendError("probing() answers for a backend named explicitly, not for 'auto'")
    check = _declared_checks(name).get(op)
    if check is None:
        raise _declined(f"normkit backend {name!r} has no {op}", f"no {op} op")
    reason = check(*args, **kwargs)
    if reason is not None:
        raise _declined(f"normkit backend {name!r} cannot run this {op} call: {reason}", reason)
    raise WouldRun(name, op)


def _auto_candidates() -> tuple[Backend, ...]:
    """The backends of :data:`AUTO_ORDER` found here, in its order (each lazy one looked up, so
    loaded or found absent, on the first call)."""
    if torch.compiler.is_compiling():
        _find_candidates()  # run, not traced: see there
    found = _CANDIDATES.get(AUTO_ORDER)
    if found is None:
        found = _find_candidates()
    return found


@torch.compiler.assume_constant_result
def _find_candidates() -> tuple[Backend, ...]:
    # Under torch.compile dynamo runs this instead of tracing it. The first call of a process may
    # come from compiled code: traced, a lazy backend's import (numba's) fails a fullgraph
    # compile, and filling _CANDIDATES while tracing changed a global that the graph's guards
    # had read empty, so the second call recompiled.
    found = _CANDIDATES.get(AUTO_ORDER)
    if found is None:
        looked_up = [_lookup(name) for name in AUTO_ORDER]  # (a lazy load empties _CANDIDATES)
        found = _CANDIDATES[AUTO_ORDER] = tuple(b for b in looked_up if b is not None)
    return found


def auto_choice(
    op: str, input: torch.Tensor, plain: bool = False, tensors: tuple[Any, ...] = ()
) -> Callable[..., Any] | None:
    """The function a call of ``op`` with this input and no ``backend=`` runs, where that is
    settled before its other arguments are looked at; else ``None`` (:func:`resolve` decides,
    after the checks). Settled means: not compiling or probing, no ``use_backend`` block, no
    ``NORMKIT_BACKEND`` other than ``"auto"``, and in :data:`AUTO_ORDER` every backend before
    the first that takes every call of ``op`` (``preferred`` and ``unsupported`` the defaults:
    ``"torch"``) sure from ``input`` that it would not prefer the call (``may_prefer``) or
    unavailable. The common small call on the CPU, where "auto" always runs ATen, is settled
    here in a few attribute reads (the walk over the backends is worked out once per op).

    ``plain=True`` (the caller knows the call is the ordinary one, :attr:`OpImpl.plain`): that
    backend's function for it. ``tensors``: the call's arguments (those that are not tensors
    are passed over), where the caller has them at hand: a backend whose ``may_prefer`` says yes
    is then also asked its ``may_prefer_unrecorded`` where autograd will not record the call."""
    if torch.compiler.is_compiling() or _ACTIVE.get() or _PROBING.get():  # (dynamo cannot read a ContextVar)
        return None
    env = _ENV.get()
    if env and env != "auto":
        return None
    fn, asks, available, plain_fn = _PLANS.get(op) or _plan(op)
    for may_prefer, unrecorded, is_available in asks:
        if (
            may_prefer(input)
            and is_available()
            and (unrecorded is None or _recorded(tensors) or unrecorded(input))
        ):
            return None
    if available is not None and not available():
        return None
    return plain_fn if plain else fn


def _recorded(tensors: tuple[Any, ...]) -> bool:
    """Whether autograd may record a call with these arguments: grad mode on outside inference
    mode (which records nothing even under ``enable_grad``) and one of them a tensor that
    requires grad; True for ``()`` (not known)."""
    if not tensors:
        return True
    if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():  # (never under compile)
        return False
    for t in tensors:  # (a loop, not any() over a generator: asked on the default path)
        if isinstance(t, torch.Tensor) and t.requires_grad:
            return True
    return False


def _plan(op: str) -> _Plan:
    asks = []
    plan = _Plan(None)
    for impl in _auto_candidates():
        entry = impl.ops.get(op)
        if entry is None:
            continue
        if entry.preferred is _always and entry.unsupported is _never:
            available = None if impl.is_available is _available else impl.is_available
            plan = _Plan(entry.fn, tuple(asks), available, entry.plain or entry.fn)
            break
        if entry.may_prefer is None:  # not known from the input: resolve() asks after the checks
            break
        asks.append((entry.may_prefer, entry.may_prefer_unrecorded, impl.is_available))
    _PLANS[op] = plan
    return plan


def resolve(op: str, backend: str | None, *args: Any, **kwargs: Any) -> Callable[..., Any]:
    """The function that computes ``op`` for this call on the resolved backend."""
    compiling = torch.compiler.is_compiling()  # asked once: every branch below reads it
    if backend is not None:
        name = backend
    elif compiling:
        name = _current(compiling)
    else:  # _current, inline: this runs on every call of the default path
        stack = _ACTIVE.get()
        name = stack[-1] if stack else _ENV.get() or "auto"
    if not compiling and _PROBING.get():  # dynamo cannot read a ContextVar
        _probe(op, name, args, kwargs)
    if name != "auto":
        impl = get_backend(name)
        if not impl.is_available():
            raise BackendError(f"normkit backend {name!r} is not available on this machine")
        entry = impl.ops.get(op)
        if entry is None:
            raise _declined(f"normkit backend {name!r} has no {op}", f"no {op} op")
        reason = entry.unsupported(*args, **kwargs)
        if reason is not None:
            raise _declined(f"normkit backend {name!r} cannot run this {op} call: {reason}", reason)
        return entry.fn
    for impl in _auto_candidates():
        entry = impl.ops.get(op)
        if (  # (the default checks are not called: this loop runs on every call)
            entry is not None
            and (impl.is_available is _available or impl.is_available())
            # preferred first: a kernel backend's says no to most calls in a few attribute reads
            and (entry.preferred is _always or entry.preferred(*args, **kwargs))
            and (entry.unsupported is _never or entry.unsupported(*args, **kwargs) is None)
        ):
            return entry.fn
    raise BackendError(f"no normkit backend can run this {op} call")
