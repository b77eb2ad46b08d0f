"""Model surgery: swap a built model's normalization layers for normkit's and back, fold
BatchNorm into the convolution before it, and recalibrate BatchNorm statistics.

Every function works in place and returns the model. Where the model itself is the module to
replace by another object (an adapter's result at the root), the return value is the new
module: always use it (``model = normkit.convert(model)``).

Nothing is replaced on trust: each replacement first runs beside the module it replaces on
small adversarial inputs of every rank the module takes (:mod:`normkit._probe`) and is kept
only if it takes them all and both agree.
"""

from __future__ import annotations

import collections
import copy
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn

from . import modules as nk
from ._probe import (
    Outcome,
    compare,
    compare_inputs,
    difference,
    probe_input,
    probe_inputs,
    random_copy,
    tensor_home,
)
from ._structure import ACT_MODULES, Adapter, Candidate, norm_like, structural_candidates
from .backends import get_backend
from .modules._base import BackendMixin

__all__ = [
    "ConvertReport",
    "Converted",
    "Left",
    "convert",
    "fuse_conv_bn",
    "recalibrate_batch_norm",
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

_ADAPTERS: list[tuple[Callable[[nn.Module], bool], Adapter]] = []


def register_adapter(match: type[nn.Module] | Callable[[nn.Module], bool], fn: Adapter) -> None:
    """Teach :func:`convert` a third-party norm class: for a module ``m`` that ``match``es (an
    exact class, ``type(m) is match``, or a predicate ``match(m) -> bool``), ``fn(m)`` returns
    the normkit module with the same semantics, sharing ``m``'s parameters. Adapters registered
    later are tried first, and before the built-in ones; an adapter's module is kept only if it
    passes the probe (see :func:`convert`)."""
    if isinstance(match, type):
        cls = match
        match = lambda m: type(m) is cls
    _ADAPTERS.insert(0, (match, fn))


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
                             dict(m.named_buffers()))
    return outcome if outcome.reason is not None else _check_text(outcome)


def _try(m: nn.Module, build: Adapter, backend: str | None, gradients: bool = True,
         which: slice = slice(None)) -> tuple[nn.Module | None, Outcome]:
    """Build a candidate for ``m`` and probe it (on the ``which`` slice of the probe inputs)."""
    try:
        new = build(m)
        if isinstance(new, BackendMixin):
            new.backend = backend
        # The inputs come from the candidate's feature count: every candidate of one module
        # gets the same layouts, and must take each one the module takes.
        inputs = probe_inputs(new, *tensor_home(m))[which]
    except Exception as exc:  # noqa: BLE001 - a candidate that cannot be built is refused
        return None, Outcome(float("inf"), f"cannot build or probe it: {type(exc).__name__}: {exc}")
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
    user = [Candidate(getattr(fn, "__name__", "adapter"), fn) for match, fn in _ADAPTERS if match(m)]
    try:
        built_in, reason = structural_candidates(m)
    except Exception as exc:  # noqa: BLE001 - odd attributes (an int normalized_shape): no match
        built_in, reason = [], f"reading its attributes failed: {type(exc).__name__}: {exc}"
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
        _, outcome = _try(sample, candidate.build, backend, gradients=False)
        if outcome.reason is not None:
            refusals.append(f"{candidate.label}: {outcome.reason}")
            continue
        # The tie-break measures an error, not a refusal: the ordinary input of each layout
        # (every fourth, see probe_inputs) suffices.
        tie = _try(low, candidate.build, backend, gradients=False, which=slice(None, None, 4))[1].error \
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
    new, outcome = _try(m, best.build, backend)
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
            if norm_like(m) or any(match(m) for match, _ in _ADAPTERS):
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

    Every replacement is verified before it sticks: it runs beside the module on small inputs
    (:func:`normkit._probe.probe_inputs`: 2-D to 5-D with the features last or at dim 1, each
    with ordinary values, outliers, a large offset and tiny magnitudes) and is dropped, the
    original kept, if it refuses an input the module takes or differs on one (output, input and
    parameter gradients, running-statistic updates, compared within a few roundings of the dtype). Probes change
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
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            new = replacements.get(id(child))
            if new is not None:
                setattr(parent, child_name, new)
    for p in plans:
        if p.twin is not None:
            p.twin.adopt(p.module, backend=backend)
    return replacements.get(id(model), model)


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


# ---- fuse_conv_bn ---------------------------------------------------------------------------

_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Classes whose eval-mode forward is exactly BatchNorm with the running statistics: folded into
# Identity without a doubt. Any other BatchNorm subclass is folded only as its probe allows.
_PLAIN_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                      nk.BatchNorm1d, nk.BatchNorm2d, nk.BatchNorm3d, nk.SyncBatchNorm)


def _after_fold(bn: nn.Module) -> nn.Module:
    """What is left of ``bn`` once its affine is folded away: its activation (normkit's
    ``act=`` name, or timm's ``drop`` and ``act`` submodules, applied in that order)."""
    if type(bn) in _PLAIN_BATCH_NORMS:
        return nn.Identity()
    act = getattr(bn, "act", None)
    if isinstance(act, str):
        return ACT_MODULES[act]()
    rest = [m for m in (getattr(bn, "drop", None), act) if isinstance(m, nn.Module) and not isinstance(m, nn.Identity)]
    return rest[0] if len(rest) == 1 else nn.Sequential(*rest) if rest else nn.Identity()


def _layer_input(layer: nn.Module) -> tuple[int, ...]:
    if isinstance(layer, nn.Linear):
        return (3, layer.in_features)
    spatial = (d * (k - 1) + 3 for d, k in zip(layer.dilation, layer.kernel_size, strict=True))
    return (2, layer.in_channels, *spatial)


def _check_fold(name: str, layer: nn.Module, bn: nn.Module, post: nn.Module) -> None:
    """Raise unless ``post(folded layer)`` computes ``bn(layer)``, on a random float64 copy."""
    pair = random_copy(nn.ModuleList([layer, bn])).double().eval()
    folded = copy.deepcopy(pair[0])
    with torch.no_grad():
        _fold(folded, pair[1])
    if isinstance(pair[1], BackendMixin):
        pair[1].backend = None
    tail = _after_fold(pair[1]).double()
    x = probe_input(_layer_input(layer), torch.device("cpu"), torch.float64)
    outcome = compare(lambda x: pair[1].forward(pair[0].forward(x)), lambda x: tail.forward(folded.forward(x)), x,
                      {}, {})
    if outcome.reason is not None:
        raise RuntimeError(
            f"fuse_conv_bn cannot fold {name} ({type(bn).__name__}): its forward is not BatchNorm followed by "
            f"{post!r} ({outcome.reason}); the model is unchanged. Fold it by hand, or convert it "
            "(normkit.convert) or replace it by a plain BatchNorm first"
        )


class _Pair(NamedTuple):
    parent: nn.Module
    layer: nn.Module
    name: str  # the BatchNorm's qualified name in the model
    attr: str  # its attribute name in ``parent``
    bn: nn.modules.batchnorm._BatchNorm


class _OneLevel(fx.Tracer):
    """Traces a parent's own forward only: every submodule is a leaf, one ``call_module`` node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _channels_match(layer: nn.Module, bn: nn.Module) -> bool:
    return (layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels) == bn.num_features


def _fold_pairs(model: nn.Module, linear: bool) -> tuple[list[_Pair], list[tuple[str, str]]]:
    """The (layer, BatchNorm) pairs whose fold keeps the forward, and the ``(name, why)`` of
    each BatchNorm left that follows a Conv or Linear among its parent's children or in its
    parent's forward. ``linear``: Linear + BatchNorm1d pairs are folded (example inputs check
    them: whether BatchNorm1d normalizes the Linear's output features depends on the rank)."""
    uses = collections.Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    pairs: list[_Pair] = []
    left: list[tuple[str, str]] = []
    for prefix, parent in model.named_modules():
        children = dict(parent.named_children())
        names = list(children)
        adjacent = {b: a for a, b in zip(names, names[1:], strict=False)
                    if isinstance(children[a], _FOLDABLE) and isinstance(children[b], nn.modules.batchnorm._BatchNorm)
                    and _channels_match(children[a], children[b])}
        if not any(isinstance(c, nn.modules.batchnorm._BatchNorm) for c in children.values()) or \
                not any(isinstance(c, _FOLDABLE) for c in children.values()):
            continue
        qualified = lambda attr, prefix=prefix: f"{prefix}.{attr}" if prefix else attr
        found: dict[str, str] = {}  # BatchNorm attribute -> the layer attribute whose output is its only input
        why: dict[str, str] = {}
        if isinstance(parent, nn.Sequential) and type(parent).forward is nn.Sequential.forward:
            found = dict(adjacent)  # a plain Sequential's forward is its children in order
        else:
            try:
                graph = _OneLevel().trace(parent)
            except Exception as exc:  # noqa: BLE001 - untraceable forward: nothing known about the data flow
                for attr in adjacent:
                    why[attr] = f"its parent's forward cannot be traced by torch.fx ({type(exc).__name__}: {exc})"
                graph = None
            if graph is not None:
                calls = collections.defaultdict(list)
                reads = [n.target for n in graph.nodes if n.op == "get_attr"]
                for node in graph.nodes:
                    if node.op == "call_module":
                        calls[node.target].append(node)
                for attr, bn in children.items():
                    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or len(calls[attr]) != 1:
                        if attr in adjacent:
                            why[attr] = f"the forward calls it {len(calls[attr])} times"
                        continue
                    node = calls[attr][0]
                    src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
                    if not (isinstance(src, fx.Node) and src.op == "call_module" and src.target in children
                            and isinstance(children[src.target], _FOLDABLE)
                            and _channels_match(children[src.target], bn)):
                        if attr in adjacent:
                            why[attr] = f"its input is not {adjacent[attr]}'s output alone"
                        continue
                    layer_attr = src.target
                    if len(calls[layer_attr]) != 1 or len(src.users) != 1:
                        why[attr] = f"{layer_attr}'s output is used elsewhere too, or it is called more than once"
                    elif any(r.split(".")[0] in (attr, layer_attr) for r in reads):
                        why[attr] = f"the forward reads the tensors of {layer_attr} or {attr} directly"
                    else:
                        found[attr] = layer_attr
        for attr, layer_attr in found.items():
            layer, bn = children[layer_attr], children[attr]
            if uses[id(layer)] > 1 or uses[id(bn)] > 1:
                why[attr] = f"{layer_attr} or {attr} is registered more than once in the model"
            elif isinstance(layer, nn.Linear) and not linear:
                why[attr] = ("a Linear + BatchNorm1d pair is folded only when example_inputs confirm it (BatchNorm1d "
                             "normalizes dim 1, the Linear's features are the last dim: they agree on 2-D input only)")
            else:
                pairs.append(_Pair(parent, layer, qualified(attr), attr, bn))
        left += [(qualified(attr), reason) for attr, reason in why.items()]
    return pairs, left


def _tensors_of(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _tensors_of(item)]
    return []


def _run_model(model: nn.Module, inputs: tuple[Any, ...]) -> list[torch.Tensor]:
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            return [t.detach().clone() for t in _tensors_of(model(*inputs))]
    finally:
        for m, mode in modes:
            m.training = mode


def fuse_conv_bn(model: nn.Module, *, example_inputs: tuple[Any, ...] | torch.Tensor | None = None) -> nn.Module:
    """Fold each eval-mode BatchNorm into the Conv1d/2d/3d or Linear whose output it normalizes,
    in place; returns ``model``. The layer's weight and bias absorb the BatchNorm::

        s = bn.weight / sqrt(running_var + eps);   W <- W * s;   b <- (b - running_mean) * s + bn.bias

    and the BatchNorm is replaced by what its forward applies after the normalization:
    ``nn.Identity()`` for a plain BatchNorm, the activation of a norm+act layer (normkit's
    ``BatchNormAct2d(act="silu")`` becomes ``nn.SiLU()``; timm's ``BatchNormAct2d`` becomes its
    own ``act`` module, after its ``drop`` if that is not Identity). Every fold except those of
    plain BatchNorm classes is first checked on a random float64 copy of the pair; a BatchNorm
    subclass whose forward is something else raises. Computed in float64, stored in the layer's
    dtype.

    A pair is folded only where the forward is known to feed the layer's output, and only
    that, to the BatchNorm: in a plain ``nn.Sequential`` the children in order; in any other
    parent, its forward traced by ``torch.fx`` (each submodule a leaf) must call the BatchNorm
    once on the layer's call, whose output has no other use, reading neither's tensors directly.
    A Linear + BatchNorm1d pair is folded only with ``example_inputs`` (BatchNorm1d normalizes
    dim 1, so the fold is right for 2-D input only). Pairs left (an untraceable parent, a conv
    whose output is used elsewhere too, an operation in between, a Linear without example
    inputs) are listed in one ``UserWarning``.

    ``example_inputs``: a tuple of arguments for ``model`` (or one tensor). The model runs on
    them in eval mode under ``no_grad`` before and after folding; if any output tensor moved by
    more than a few roundings of its dtype (relative to its largest magnitude), the model is
    restored exactly and ``RuntimeError`` names the pairs folded.

    Raises ``RuntimeError``, changing nothing, if a BatchNorm to fold is in training mode, has
    no running statistics, or is a subclass whose forward the fold would not keep.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    pairs, left = _fold_pairs(model, linear=example_inputs is not None)
    posts = []
    for _, layer, name, _, bn in pairs:
        if bn.training:
            raise RuntimeError(
                f"fuse_conv_bn folds running statistics, but {name} ({type(bn).__name__}) is in training "
                "mode, where it normalizes with batch statistics: call model.eval() first"
            )
        if bn.running_mean is None:
            raise RuntimeError(f"fuse_conv_bn: {name} has track_running_stats=False, so nothing to fold")
        post = _after_fold(bn)
        if type(bn) not in _PLAIN_BATCH_NORMS:
            _check_fold(name, layer, bn, post)
        posts.append(post)
    expected = _run_model(model, example_inputs) if example_inputs is not None and pairs else None
    saved = [(p.layer.weight.detach().clone(), p.layer.bias.detach().clone() if p.layer.bias is not None else None)
             for p in pairs]
    with torch.no_grad():
        for pair, post in zip(pairs, posts, strict=True):
            _fold(pair.layer, pair.bn)
            setattr(pair.parent, pair.attr, post)
    if expected is not None:
        actual = _run_model(model, example_inputs)
        reasons = [f"{len(actual)} output tensors where it gave {len(expected)}"] if len(actual) != len(expected) \
            else [o.reason for i, (e, a) in enumerate(zip(expected, actual, strict=True))
                  if (o := difference(e, a, f"output {i}")).reason is not None]
        if reasons:
            with torch.no_grad():
                for pair, (weight, bias) in zip(pairs, saved, strict=True):
                    pair.layer.weight.copy_(weight)
                    if bias is None:
                        pair.layer.bias = None
                    else:
                        pair.layer.bias.copy_(bias)
                    setattr(pair.parent, pair.attr, pair.bn)
            raise RuntimeError(
                f"fuse_conv_bn: folding changed the model's output on example_inputs ({reasons[0]}); the model is "
                f"restored. Pairs folded: {', '.join(p.name for p in pairs)}. Fold them by hand where the forward "
                "feeds the layer's output to the BatchNorm alone"
            )
    if left:
        listed = "; ".join(f"{name}: {why}" for name, why in left)
        warnings.warn(f"fuse_conv_bn left {len(left)} BatchNorm(s) unfolded: {listed}", UserWarning, stacklevel=2)
    return model


def _fold(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    w = layer.weight
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    shift = -bn.running_mean.double() * scale
    if bn.weight is not None:
        scale = scale * bn.weight.double()
        shift = shift * bn.weight.double()
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    bias = layer.bias.double() * scale if layer.bias is not None else 0.0
    w.copy_(w.double() * scale.reshape((-1,) + (1,) * (w.dim() - 1)))
    new_bias = (bias + shift).to(w.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias, requires_grad=w.requires_grad)
    else:
        layer.bias.copy_(new_bias)


# ---- recalibrate_batch_norm -----------------------------------------------------------------


def recalibrate_batch_norm(model: nn.Module, batches: Iterable[Any]) -> nn.Module:
    """Recompute every BatchNorm's running statistics from ``batches``; returns ``model``.

    Each BatchNorm with running statistics (torch's, normkit's and their subclasses) is reset
    and set to ``momentum=None`` (the cumulative average, so every batch counts equally), then
    ``model(batch)`` runs under ``no_grad`` for each batch (a tuple or list is unpacked
    ``model(*batch)``, a dict ``model(**batch)``) with the BatchNorms in training mode and
    every other module in eval mode (dropout off: the statistics are those inference sees).
    Momentum and each module's training mode are restored afterwards, also on error.
    Use after weight averaging (SWA), pruning or fusing changes the activations.

    Raises ``ValueError`` before touching anything if ``batches`` is empty.
    """
    batches = iter(batches)
    first = next(batches, _EMPTY)
    if first is _EMPTY:
        raise ValueError("recalibrate_batch_norm needs at least one batch; got an empty iterable")
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in norms]
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for batch in _chain(first, batches):
                if isinstance(batch, dict):
                    model(**batch)
                elif isinstance(batch, (tuple, list)):
                    model(*batch)
                else:
                    model(batch)
    finally:
        for m, momentum in momenta:
            m.momentum = momentum
        for m, mode in modes:
            m.training = mode
    return model


_EMPTY = object()


def _chain(first: Any, rest: Iterable[Any]) -> Iterator[Any]:
    yield first
    yield from rest
