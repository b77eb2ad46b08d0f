"""Model surgery: swap a built model's normalization layers for normkit's and back
(folding BatchNorm into a convolution and recalibrating it: :mod:`normkit.folding`).

Every function works in place and returns the model. Where the model itself is the module to
replace by another object (an adapter's result at the root), the return value is the new
module: always use it (``model = normkit.convert(model)``).

Nothing is replaced on trust: each replacement first runs beside the module it replaces on
small adversarial inputs of every rank the module takes (:mod:`normkit._probe`) and is kept
only if it takes them all and both agree.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from . import modules as nk
from ._probe import (
    Outcome,
    compare,
    compare_inputs,
    nearer_truth,
    probe_inputs,
    random_copy,
    tensor_home,
)
from ._structure import Adapter, Candidate, Probe, missing_arguments, norm_like, structural_candidates
from .adapters_blocks import block_candidates
from .backends import get_backend
from .modules._base import BackendMixin

__all__ = [
    "ConvertReport",
    "Converted",
    "Left",
    "Probe",
    "convert",
    "register_adapter",
    "to_torch",
]

# torch.nn class -> its normkit twin. A twin subclasses its torch class and adds only plain
# attributes (BackendMixin.init_attributes), so converting is a class swap, as torch's own Lazy
# modules become their non-lazy class (``cls_to_become``): the same Parameter and buffer
# objects, device, dtype, requires_grad, training mode and hooks, with nothing copied.
TWINS: dict[type[nn.Module], type[BackendMixin]] = {
    nn.BatchNorm1d: nk.BatchNorm1d,
    nn.BatchNorm2d: nk.BatchNorm2d,
    nn.BatchNorm3d: nk.BatchNorm3d,
    nn.LazyBatchNorm1d: nk.LazyBatchNorm1d,
    nn.LazyBatchNorm2d: nk.LazyBatchNorm2d,
    nn.LazyBatchNorm3d: nk.LazyBatchNorm3d,
    nn.SyncBatchNorm: nk.SyncBatchNorm,
    nn.InstanceNorm1d: nk.InstanceNorm1d,
    nn.InstanceNorm2d: nk.InstanceNorm2d,
    nn.InstanceNorm3d: nk.InstanceNorm3d,
    nn.LazyInstanceNorm1d: nk.LazyInstanceNorm1d,
    nn.LazyInstanceNorm2d: nk.LazyInstanceNorm2d,
    nn.LazyInstanceNorm3d: nk.LazyInstanceNorm3d,
    nn.LayerNorm: nk.LayerNorm,
    nn.GroupNorm: nk.GroupNorm,
    nn.RMSNorm: nk.RMSNorm,
    nn.LocalResponseNorm: nk.LocalResponseNorm,
}
# normkit twin -> torch.nn class, for to_torch.
_TORCH_OF = {twin: cls for cls, twin in TWINS.items()}


# ---- the report -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Converted:
    """A module :func:`convert` replaced: its name in the model (``""``: the model itself), its
    class and its replacement's, and how the replacement was checked."""

    name: str
    before: str
    after: str
    check: str


@dataclass(frozen=True)
class Left:
    """A norm-like module :func:`convert` left in place, and why."""

    name: str
    kind: str
    reason: str


@dataclass
class ConvertReport:
    """What :func:`convert` did: ``converted`` and ``left`` (norm-like modules it kept: a
    class name containing "norm", running statistics, or a ``weight`` with an ``eps``).
    ``str(report)`` is a readable summary."""

    converted: list[Converted] = field(default_factory=list)
    left: list[Left] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} module(s), left {len(self.left)} norm-like module(s)"]
        lines += [f"  {c.name or '(model)'}: {c.before} -> {c.after} ({c.check})" for c in self.converted]
        lines += [f"  left {x.name or '(model)'} ({x.kind}): {x.reason}" for x in self.left]
        return "\n".join(lines)


# ---- adapters -------------------------------------------------------------------------------

_ADAPTERS: list[tuple[Callable[[nn.Module], bool], Adapter, Callable[[nn.Module], list[Probe]] | None]] = []


def register_adapter(match: type[nn.Module] | Callable[[nn.Module], bool], fn: Adapter, *,
                     probes: Callable[[nn.Module], list[Probe]] | None = None) -> None:
    """Teach :func:`convert` a third-party norm class: for a module ``m`` that ``match``es (an
    exact class, ``type(m) is match``, or a predicate ``match(m) -> bool``), ``fn(m)`` returns
    the normkit module with the same semantics, sharing ``m``'s parameters. Adapters registered
    later are tried first, and before the built-in ones (:mod:`normkit.adapters_blocks`); an
    adapter's module is kept only if its forward takes every argument ``m``'s does and it passes
    the probe (see :func:`convert`). ``probes(m)``: for a norm whose forward takes more than its
    input, the calls to probe it with (a list of :class:`normkit.surgery.Probe`; by default
    ``forward(input)`` alone)."""
    if isinstance(match, type):
        cls = match
        match = lambda m: type(m) is cls
    _ADAPTERS.insert(0, (match, fn, probes))


# ---- convert --------------------------------------------------------------------------------


class _Plan(NamedTuple):
    module: nn.Module
    name: str
    new: nn.Module | None  # None: a class swap to ``twin``
    twin: type[BackendMixin] | None
    check: str


def _check_text(outcome: Outcome) -> str:
    return f"probe agrees to {outcome.error:.1g}"


def _probe_swap(m: nn.Module, twin: type[BackendMixin], backend: str | None) -> str | Outcome:
    """Check text for a class swap of ``m`` to ``twin``, or the failed probe's Outcome."""
    device, dtype = tensor_home(m)
    if isinstance(m, nn.modules.lazy.LazyModuleMixin):  # it becomes its cls_to_become when first called
        return "not probed: a Lazy module has no shape before its first call"
    if device.type == "meta":
        return "not probed: on the meta device"
    if isinstance(m, nn.SyncBatchNorm) and m.training and dist.is_available() and dist.is_initialized():
        return "not probed: a training SyncBatchNorm would run a collective"
    shadow = twin.adopt(copy.copy(m), backend=backend)  # shares m's parameter and buffer dicts
    outcome = compare_inputs(m.forward, shadow.forward, probe_inputs(m, device, dtype), dict(m.named_parameters()),
                             dict(m.named_buffers()), truth=_truth_without_state(m, dtype))
    return outcome if outcome.reason is not None else _check_text(outcome)


def _cast(tree: Any, dtype: torch.dtype) -> Any:
    """``tree``'s floating tensors and floating dtypes in ``dtype`` (tuples, lists, dicts kept)."""
    if isinstance(tree, torch.Tensor):
        return tree.to(dtype) if tree.is_floating_point() else tree
    if isinstance(tree, torch.dtype):
        return dtype if tree.is_floating_point else tree
    if isinstance(tree, (tuple, list)):
        return type(tree)(_cast(t, dtype) for t in tree)
    if isinstance(tree, dict):
        return {k: _cast(v, dtype) for k, v in tree.items()}
    return tree


def _in_float64(m: nn.Module, dtype: torch.dtype) -> Callable[..., Any]:
    """``m``'s forward run in float64 on its own parameters (differentiably cast, so their
    gradients are ``m``'s), the results rounded to ``dtype``: the truth a low-precision run is
    judged by."""
    def forward(*args: Any, **kwargs: Any) -> Any:
        state = {n: _cast(t, torch.float64) for n, t in (*m.named_parameters(), *m.named_buffers())}
        out = torch.func.functional_call(m, state, _cast(args, torch.float64), _cast(kwargs, torch.float64))
        return _cast(out, dtype)
    return forward


def _truth_without_state(m: nn.Module, dtype: torch.dtype) -> Callable[..., Any] | None:
    """:func:`_in_float64` of ``m`` for :func:`~normkit._probe.nearer_truth`, where ``m`` has no
    buffers (its float64 run would leave running statistics in copies, not where the probe
    reads them); else None."""
    return None if any(True for _ in m.buffers()) else _in_float64(m, dtype)


def _compare_probes(m: nn.Module, new: nn.Module, probes: list[Probe], gradients: bool) -> Outcome:
    """The worst agreement of ``new`` with ``m`` on a candidate's own probes (inputs the module
    takes by construction), or the first disagreement, naming the probe.

    In float16/bfloat16 a block's norm (``norm(x) * (1 + scale) + shift``) rounds after each
    step where normkit rounds once, and cancellation in the backward makes their gradients
    differ by more than a few roundings. There a disagreement is forgiven where ``new`` is as
    close to the float64 truth as twice ``m``'s own error (the tests' bound): a wrong formula is
    O(1) off the truth."""
    worst = Outcome(0.0, None)
    params, buffers = dict(m.named_parameters()), dict(m.named_buffers())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for probe in probes:
            old_fn, new_fn = (lambda x, p=probe: p.call(m.forward, x)), (lambda x, p=probe: p.call(new.forward, x))
            outcome = compare(old_fn, new_fn, probe.x, params, buffers, gradients=gradients)
            if probe.x.dtype in (torch.float16, torch.bfloat16):
                truth = _in_float64(m, probe.x.dtype)
                truth_fn = lambda x, p=probe, f=truth: p.call(f, x)  # noqa: E731
                outcome = nearer_truth(outcome, truth_fn, old_fn, new_fn, probe.x, params, buffers,
                                       gradients=gradients)
            if outcome.reason is not None:
                return Outcome(outcome.error, f"on probe {probe.label}: {outcome.reason}")
            worst = max(worst, outcome, key=lambda o: o.error)
    return worst


def _try(m: nn.Module, candidate: Candidate, backend: str | None, gradients: bool = True,
         which: slice = slice(None)) -> tuple[nn.Module | None, Outcome]:
    """Build a candidate for ``m`` and probe it (on the ``which`` slice of the probe inputs)."""
    try:
        new = candidate.build(m)
        if isinstance(new, BackendMixin):
            new.backend = backend
        missing = missing_arguments(m.forward, new.forward)
        if missing:  # the probe calls forward(input) alone: it would never see these
            return None, Outcome(float("inf"), f"{type(m).__name__}.forward takes {', '.join(missing)}, which "
                                               f"{type(new).__name__}.forward cannot take")
        if candidate.probes is not None:
            probes = candidate.probes(m)[which]
        else:
            # The inputs come from the candidate's feature count: every candidate of one module
            # gets the same layouts, and must take each one the module takes.
            inputs = probe_inputs(new, *tensor_home(m))[which]
    except Exception as exc:  # noqa: BLE001 - a candidate that cannot be built is refused
        return None, Outcome(float("inf"), f"cannot build or probe it: {type(exc).__name__}: {exc}")
    if candidate.probes is not None:
        return new, _compare_probes(m, new, probes, gradients)
    return new, compare_inputs(m.forward, new.forward, inputs, dict(m.named_parameters()), dict(m.named_buffers()),
                               gradients=gradients)


def _signature(m: nn.Module) -> tuple[Any, ...]:
    """Modules with equal signatures compute the same function of their tensors: one choice
    of replacement serves them all (a model repeats one norm per layer)."""
    plain = tuple(sorted((k, v) for k, v in vars(m).items()
                         if not k.startswith("_") and isinstance(v, (int, float, str, bool, tuple, type(None)))))
    tensors = tuple((n, tuple(t.shape), t.dtype, isinstance(t, nn.Parameter))
                    for n, t in (*m.named_parameters(), *m.named_buffers()))
    children = tuple((n, type(c), repr(c)) for n, c in m.named_children())
    return type(m), plain, tensors, children


def _choose(m: nn.Module, backend: str | None) -> tuple[Candidate | None, str]:
    """The replacement that agrees with ``m`` on probes, or None and why."""
    user = [Candidate(getattr(fn, "__name__", "adapter"), fn, probes) for match, fn, probes in _ADAPTERS if match(m)]
    try:
        built_in, reason = structural_candidates(m)
    except Exception as exc:  # noqa: BLE001 - odd attributes (an int normalized_shape): no match
        built_in, reason = [], f"reading its attributes failed: {type(exc).__name__}: {exc}"
    built_in = block_candidates(m) + built_in  # a block's norm (gated, modulated) is the closer match
    if not user and not built_in:
        return None, reason or "no candidate"
    # Choose on a copy with random parameters, in the model's dtype and in bfloat16: at the
    # initial weights, or in float32, candidates that differ in a cast order or an offset agree.
    try:
        sample = random_copy(m)
        low = random_copy(m).to(torch.bfloat16) if tensor_home(sample)[1] != torch.bfloat16 else None
    except Exception as exc:  # noqa: BLE001 - state deepcopy cannot copy (a lock, a process group)
        return None, f"it cannot be copied to probe: {type(exc).__name__}: {exc}"
    scored, refusals = [], []
    for order, candidate in enumerate(user + built_in):
        _, outcome = _try(sample, candidate, backend, gradients=False)
        if outcome.reason is not None:
            refusals.append(f"{candidate.label}: {outcome.reason}")
            continue
        # The tie-break measures an error, not a refusal: the ordinary input of each layout
        # (every fourth, see probe_inputs) suffices.
        tie = _try(low, candidate, backend, gradients=False, which=slice(None, None, 4))[1].error \
            if low is not None else 0.0
        # A user's adapter that agrees wins; among the built-in ones the closest does.
        scored.append(((order if order < len(user) else len(user), tie, outcome.error, order), candidate))
    if not scored:
        return None, "no normkit module agrees with it on a probe; " + "; ".join(refusals)
    return min(scored, key=lambda s: s[0])[1], ""


def _adapt(m: nn.Module, backend: str | None, chosen: dict[Any, tuple[Candidate | None, str]]
           ) -> tuple[nn.Module | None, str]:
    """The verified replacement of a third-party norm ``m`` and its check text, or None and why."""
    try:
        key: Any = _signature(m)
        hash(key)
    except TypeError:
        key = id(m)
    if key not in chosen:
        chosen[key] = _choose(m, backend)
    best, reason = chosen[key]
    if best is None:
        return None, reason
    if tensor_home(m)[0].type == "meta":
        new = best.build(m)
        if isinstance(new, BackendMixin):
            new.backend = backend
        return new, "probed on a random copy on the CPU (the model is on the meta device)"
    new, outcome = _try(m, best, backend)
    if outcome.reason is not None or new is None:
        return None, f"{best.label} agreed on random parameters but not on the module's own: {outcome.reason}"
    return new, _check_text(outcome)


def _plan(model: nn.Module, backend: str | None) -> tuple[list[_Plan], list[Left]]:
    plans: list[_Plan] = []
    left: list[Left] = []
    seen: set[int] = set()
    chosen: dict[Any, tuple[Candidate | None, str]] = {}

    def visit(name: str, m: nn.Module) -> None:
        if id(m) in seen:
            return
        seen.add(id(m))
        cls = type(m)
        if not cls.__module__.startswith("normkit."):
            twin = TWINS.get(cls)
            if twin is not None:
                check = _probe_swap(m, twin, backend)
                if isinstance(check, Outcome):
                    left.append(Left(name, cls.__name__, f"its normkit twin fails the probe: {check.reason}"))
                else:
                    plans.append(_Plan(m, name, None, twin, check))
                return
            if norm_like(m) or any(match(m) for match, *_ in _ADAPTERS) or block_candidates(m):
                new, text = _adapt(m, backend, chosen)
                if new is None:
                    left.append(Left(name, cls.__name__, text))
                else:
                    plans.append(_Plan(m, name, new, None, text))
                    return  # its submodules (timm's act, drop) go with it
        for child_name, child in m.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return plans, left


def convert(model: nn.Module, backend: str | None = None, *, strict: bool = False,
            report: ConvertReport | None = None) -> nn.Module:
    """Replace, in place, every normalization layer of ``model`` by its normkit twin; returns
    the model (``model = normkit.convert(model)``: a norm at the root is replaced too).

    - Exact torch.nn classes (``type(m) is nn.BatchNorm2d``, ...; see :data:`TWINS`, Lazy and
      SyncBatchNorm included) become their twin by a class swap
      (:meth:`~normkit.modules._base.BackendMixin.adopt`): the same Parameter and buffer
      objects, hooks, training mode.
    - Any other norm-like module (a class name containing "norm", running statistics, or a
      ``weight`` with an ``eps``) is matched by its structure: its attributes (``weight``,
      ``bias``, ``eps``/``variance_epsilon``, ``normalized_shape``, ``data_format``,
      ``num_groups``, running statistics, timm's ``act``/``drop`` submodules) name the normkit
      modules that may compute the same thing (LayerNorm, LayerNorm2d, RMSNorm with each
      ``cast`` and ``weight_offset``, RMSNorm2d, GroupNorm(Act), BatchNorm(Act), Frozen
      BatchNorm), and the probe picks the one that agrees. This covers HF's per-model RMSNorm
      copies (LLaMA, Mistral, Qwen2/3, T5; Gemma's ``1 + weight``), ConvNeXt(V2)'s LayerNorm,
      timm's LayerNorm, LayerNorm2d, GroupNorm, GroupNormAct, BatchNormAct2d and torchvision's
      FrozenBatchNorm2d, and torch.nn subclasses whose forward is their parent's. Adapters
      from :func:`register_adapter` are tried first. The replacement shares the module's
      Parameters.
    - The norms of today's blocks, whose forward takes more than the input, have built-in
      adapters (:mod:`normkit.adapters_blocks`): gated RMSNorms (HF's ``MambaRMSNormGated`` and
      its copies) become :class:`~normkit.GatedRMSNorm`; diffusers' ``AdaLayerNormZero``,
      ``AdaLayerNormZeroSingle`` and ``AdaLayerNormContinuous`` become adapters that keep their
      submodules and modulate through one ``modulated_layer_norm``/``modulated_rms_norm`` call.
      Their probes pass the extra arguments too (the gate, the conditioning embedding). A
      replacement whose forward cannot take every argument the module's forward takes is never
      used.

    Every replacement is verified before it sticks: it runs beside the module on small inputs
    (:func:`normkit._probe.probe_inputs`: 2-D to 5-D with the features last or at dim 1, each
    with ordinary values, outliers, a large offset and tiny magnitudes) and is dropped, the
    original kept, if it refuses an input the module takes or differs on one (output, input and
    parameter gradients, running-statistic updates, compared within a few roundings of the dtype; for a block
    adapter in float16/bfloat16, or within twice the module's own error of the float64 truth). Probes change
    no buffer, gradient or random state, and skip the module's own hooks. Not probed, and said so in the report:
    class swaps of uninitialized Lazy modules and of modules on the meta device (structural
    matches of those are still chosen on a random CPU copy).

    ``backend`` is set on every module converted (``None``: resolved at each call); the probe
    runs on it. ``report``: a :class:`ConvertReport` to fill with what was converted and every
    norm-like module left, with the reason. ``strict=True`` raises ``RuntimeError``, changing
    nothing, if any norm-like module would be left. Otherwise leftovers, when no ``report`` is
    passed, give one ``UserWarning``: convert never skips a norm silently.
    """
    if backend is not None and backend != "auto":
        get_backend(backend)  # a misspelt name fails before anything changes
    plans, left = _plan(model, backend)
    if strict and left:
        summary = ConvertReport([], left)
        raise RuntimeError(f"convert(strict=True): {len(left)} norm-like module(s) have no verified normkit "
                           f"replacement; the model is unchanged.\n{summary}")
    if report is not None:
        report.converted.extend(Converted(p.name, type(p.module).__name__, type(p.new).__name__ if p.new is not None
                                          else p.twin.__name__, p.check) for p in plans)
        report.left.extend(left)
    elif left and not strict:
        names = ", ".join(f"{x.name or '(model)'} ({x.kind})" for x in left[:5])
        more = f" and {len(left) - 5} more" if len(left) > 5 else ""
        warnings.warn(f"normkit.convert left {len(left)} norm-like module(s) unconverted: {names}{more}. Pass "
                      "report=normkit.ConvertReport() to see why, or strict=True to make this an error.",
                      UserWarning, stacklevel=2)
    replacements = {id(p.module): p.new for p in plans if p.new is not None}
    for p in plans:
        if p.new is not None:
            _carry_hooks(p.module, p.new)
    for parent in list(model.modules()):
        # _modules, not named_children(): that skips a child already seen, so a norm held twice by
        # one parent (a reused module) would keep its second slot
        for child_name, child in list(parent._modules.items()):
            new = None if child is None else replacements.get(id(child))
            if new is not None:
                setattr(parent, child_name, new)
    for p in plans:
        if p.twin is not None:
            p.twin.adopt(p.module, backend=backend)
    return replacements.get(id(model), model)


# The hooks a module holds (torch.nn.Module's own dicts of them); a replacement takes the very same
# dicts, so a hook keeps firing and its handle still removes it.
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def _carry_hooks(old: nn.Module, new: nn.Module) -> None:
    """``new`` (a module built to replace ``old``, not a class swap) runs ``old``'s hooks."""
    for name in _HOOK_DICTS:
        hooks = getattr(old, name, None)
        if hooks and not getattr(new, name, None):
            setattr(new, name, hooks)
    if getattr(old, "_is_full_backward_hook", None) is not None:
        new._is_full_backward_hook = old._is_full_backward_hook


def to_torch(model: nn.Module) -> nn.Module:
    """The exact inverse of :func:`convert`'s class swaps: each normkit twin of a torch.nn class
    becomes that class again (same Parameter objects, the attributes normkit added removed), in
    place; returns ``model``. A twin whose options change its forward (RMSNorm ``cast`` or
    ``weight_offset``, ``stats_dtype``/``out_dtype``) stays normkit, as do layers with no torch
    class of the same forward (LayerNorm2d, RMSNorm2d, FrozenBatchNorm, norm+act, fused-add),
    and adapters' replacements are not undone."""
    for m in model.modules():
        cls = _TORCH_OF.get(type(m))
        if cls is None:
            continue
        attributes = type(m).init_attributes()
        # A twin's __init__ defaults are torch's forward; ``backend`` only picks where it runs.
        if any(getattr(m, name) != default for name, default in attributes.items() if name != "backend"):
            continue
        m.__class__ = cls
        for name in attributes:
            m.__dict__.pop(name, None)
    return model
