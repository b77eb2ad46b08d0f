"""How :func:`normkit.convert` reads a third-party norm: from its attributes (``weight``,
``bias``, ``eps``/``variance_epsilon``, ``normalized_shape``, ``data_format``, ``num_groups``,
running statistics, timm's ``act``/``drop`` submodules) it lists the normkit modules that may
compute the same thing, each built to share the module's tensors. It never decides alone: the
probe (:mod:`normkit._probe`) keeps the candidate that agrees with the module, or none.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from torch import Tensor, nn

from . import modules as nk
from ._probe import tensor_home

__all__ = ["ACT_MODULES", "Adapter", "Candidate", "Probe", "missing_arguments", "norm_like", "structural_candidates"]

Adapter = Callable[[nn.Module], nn.Module]

# normkit's activation names and the torch modules that compute them (GELU: the exact erf form).
ACT_MODULES: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}


class Probe(NamedTuple):
    """One probe call of a module whose forward takes more than its input (a gate, a
    conditioning embedding): ``call(forward, x)`` calls ``forward`` with ``x`` and the other
    arguments the probe holds fixed, and returns one tensor (a tuple of results flattened and
    concatenated). Gradients are compared for ``x`` and the module's parameters; a probe of each
    varied argument covers them all."""

    label: str
    x: Tensor
    call: Callable[[Callable[..., Any], Tensor], Tensor]


class Candidate(NamedTuple):
    """A normkit module that may replace a norm: a label for the report, how to build it, and,
    for a norm whose forward takes more than the input, its probes (``probes(module)``; None:
    :func:`normkit._probe.probe_inputs`, the input alone)."""

    label: str
    build: Adapter
    probes: Callable[[nn.Module], list[Probe]] | None = None


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def missing_arguments(original: Callable[..., Any], replacement: Callable[..., Any]) -> list[str]:
    """The arguments a call of ``original`` may pass that ``replacement`` cannot take: a
    positional one past its positional parameters, a keyword it lacks (the first parameter, the
    input, apart: models pass it by position, and its name differs from norm to norm), ``*args``
    or ``**kwargs``. A probe calls a norm with its input alone, so without this a norm with a
    ``gate`` argument (HF's ``MambaRMSNormGated``) would pass for an RMSNorm and crash, or lose
    its gate, at the model's first call. Empty where a signature cannot be read."""
    try:
        old = list(inspect.signature(original).parameters.values())
        new = list(inspect.signature(replacement).parameters.values())
    except (TypeError, ValueError):
        return []
    kinds = {p.kind for p in new}
    positional = sum(p.kind in _POSITIONAL for p in new)
    keywords = {p.name for p in new if p.kind in _KEYWORD}
    missing = []
    for at, p in enumerate(old):
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            takes = inspect.Parameter.VAR_POSITIONAL in kinds
        elif p.kind is inspect.Parameter.VAR_KEYWORD:
            takes = inspect.Parameter.VAR_KEYWORD in kinds
        else:
            takes = (p.kind not in _POSITIONAL or at < positional or inspect.Parameter.VAR_POSITIONAL in kinds) and \
                (at == 0 or p.kind not in _KEYWORD or p.name in keywords or inspect.Parameter.VAR_KEYWORD in kinds)
        if not takes:
            missing.append({inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}.get(p.kind, "")
                           + p.name)
    return missing


def _eps(m: nn.Module) -> tuple[bool, float | None]:
    for name in ("eps", "variance_epsilon", "epsilon"):
        value = getattr(m, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
    found = isinstance(m, nn.RMSNorm)  # torch's eps=None (machine epsilon)
    return found, None


def _tensor(m: nn.Module, name: str) -> Tensor | None:
    value = getattr(m, name, None)
    return value if isinstance(value, Tensor) else None


def _share(new: nn.Module, old: nn.Module, names: Iterable[str]) -> nn.Module:
    """``new`` holding ``old``'s tensors under ``names`` (Parameters as parameters, buffers as
    buffers) and ``old``'s training mode."""
    for name in names:
        value = _tensor(old, name)
        if name in new._parameters:
            if value is not None and not isinstance(value, nn.Parameter):
                raise TypeError(f"{name} is a buffer in {type(old).__name__}, a parameter in {type(new).__name__}")
            setattr(new, name, value)
        elif name in new._buffers and value is not None:
            setattr(new, name, value)
    return new.train(old.training)


def _like(m: nn.Module) -> dict[str, Any]:
    device, dtype = tensor_home(m)
    return {"device": device, "dtype": dtype}


def _act_name(m: nn.Module) -> tuple[list[str | None], str | None]:
    """The normkit activation names ``m``'s ``act`` (and ``drop``) submodules may compute
    (timm's norm+act layers: norm, then ``drop``, then ``act``), or why there is none."""
    act, drop = getattr(m, "act", None), getattr(m, "drop", None)
    if isinstance(drop, nn.Module) and not isinstance(drop, nn.Identity):
        return [], f"its drop layer {type(drop).__name__} has no normkit equivalent"
    if act is None or isinstance(act, nn.Identity):
        return [None], None
    if not isinstance(act, nn.Module):
        return [], f"its act attribute is a {type(act).__name__}, not a module"
    names = [name for name, cls in ACT_MODULES.items() if type(act) is cls]
    if not names or getattr(act, "approximate", "none") != "none":
        return [], f"its activation {act!r} has no fused normkit equivalent"
    return names, None


_BN_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _batch_norm_candidates(m: nn.Module) -> tuple[list[Candidate], str | None]:
    acts, reason = _act_name(m)
    if reason is not None:
        return [], reason
    weight = _tensor(m, "weight")
    channels = getattr(m, "num_features", None) or (len(m.running_mean) if _tensor(m, "running_mean") is not None
                                                    else None)
    found, eps = _eps(m)
    if channels is None or not found:
        return [], "it has running statistics but no num_features or eps"
    if weight is not None and not isinstance(weight, nn.Parameter) and _tensor(m, "running_mean") is not None:
        if acts != [None]:
            return [], "normkit has no frozen BatchNorm with an activation"
        frozen = [nk.FrozenBatchNorm2d, nk.FrozenBatchNorm1d, nk.FrozenBatchNorm3d]
        return [Candidate(cls.__name__, lambda m, cls=cls: _share(cls(channels, eps, **_like(m)), m, _BN_STATE))
                for cls in frozen], None
    momentum = getattr(m, "momentum", 0.1)
    options = {"affine": weight is not None, "track_running_stats": _tensor(m, "running_mean") is not None}
    bias = {"bias": _tensor(m, "bias") is not None} if weight is not None else {}

    def make(cls: type[nn.Module], **extra: Any) -> Adapter:
        return lambda m: _share(cls(channels, eps, momentum, **options, **bias, **extra, **_like(m)), m, _BN_STATE)

    if acts != [None]:
        return [Candidate(f"BatchNormAct2d(act={a!r})", make(nk.BatchNormAct2d, act=a)) for a in acts], None
    dims = [cls for base, cls in ((nn.BatchNorm1d, nk.BatchNorm1d), (nn.BatchNorm2d, nk.BatchNorm2d),
                                  (nn.BatchNorm3d, nk.BatchNorm3d)) if isinstance(m, base)]
    return [Candidate(cls.__name__, make(cls))
            for cls in dims or (nk.BatchNorm2d, nk.BatchNorm1d, nk.BatchNorm3d)], None


def _group_norm_candidates(m: nn.Module) -> tuple[list[Candidate], str | None]:
    acts, reason = _act_name(m)
    found, eps = _eps(m)
    if reason is not None or not found:
        return [], reason or "it has num_groups but no eps"
    weight = _tensor(m, "weight")
    channels = getattr(m, "num_channels", None) or (len(weight) if weight is not None else None)
    if channels is None:
        return [], "it has num_groups but no num_channels"
    options = {"affine": weight is not None, "bias": _tensor(m, "bias") is not None or weight is None}

    def make(cls: type[nn.Module], **extra: Any) -> Adapter:
        return lambda m: _share(cls(m.num_groups, channels, eps, **options, **extra, **_like(m)), m, ("weight", "bias"))

    if acts != [None]:
        return [Candidate(f"GroupNormAct(act={a!r})", make(nk.GroupNormAct, act=a)) for a in acts], None
    return [Candidate("GroupNorm", make(nk.GroupNorm))], None


def _row_norm_candidates(m: nn.Module) -> tuple[list[Candidate], str | None]:
    """LayerNorm and RMSNorm over the last axes or over the channels of (N, C, H, W)."""
    acts, reason = _act_name(m)
    found, eps = _eps(m)
    if reason is not None or acts != [None]:
        return [], reason or "its activation has no fused normkit row norm"
    if not found:
        return [], "it has no eps, variance_epsilon or epsilon attribute"
    weight, bias = _tensor(m, "weight"), _tensor(m, "bias")
    shape = getattr(m, "normalized_shape", None) or (tuple(weight.shape) if weight is not None else None)
    if shape is None:
        return [], "it has neither normalized_shape nor a weight"
    shape = tuple(shape)
    fmt = getattr(m, "data_format", None)
    layer_norms = {"channels_first": ["2d"], "channels_last": ["last"]}.get(fmt, ["last", "2d"])
    flat = len(shape) == 1
    names = ("weight", "bias")
    found_ln = [
        Candidate("LayerNorm" if where == "last" else "LayerNorm2d",
                   lambda m, where=where: _share(
                       (nk.LayerNorm(shape, eps, weight is not None, bias is not None, **_like(m)) if where == "last"
                        else nk.LayerNorm2d(shape[0], eps, weight is not None, bias is not None, **_like(m))),
                       m, names))
        for where in layer_norms if where == "last" or flat
    ]
    if bias is not None or isinstance(m, nn.LayerNorm):
        return found_ln, None
    rms = [
        Candidate(f"RMSNorm(cast={cast!r}, weight_offset={offset})",
                   lambda m, cast=cast, offset=offset: _share(
                       nk.RMSNorm(shape, eps, weight is not None, cast=cast, weight_offset=offset, **_like(m)),
                       m, names))
        for cast in ("normalize_first", "weight_first") for offset in (0.0, 1.0)
        if weight is not None or (cast, offset) == ("weight_first", 0.0)
    ]
    if flat and fmt != "channels_last":
        rms.append(Candidate("RMSNorm2d", lambda m: _share(nk.RMSNorm2d(shape[0], eps, weight is not None, **_like(m)),
                                                            m, names)))
    return rms + found_ln, None


def structural_candidates(m: nn.Module) -> tuple[list[Candidate], str | None]:
    """The normkit modules that may compute what ``m`` computes, judged from its attributes
    (the probe decides), or why there are none."""
    if _tensor(m, "running_mean") is not None or isinstance(m, nn.modules.batchnorm._BatchNorm):
        return _batch_norm_candidates(m)
    if isinstance(getattr(m, "num_groups", None), int):
        return _group_norm_candidates(m)
    if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) or _tensor(m, "weight") is not None or \
            getattr(m, "normalized_shape", None) is not None:
        return _row_norm_candidates(m)
    return [], "no normkit module matches its attributes (no weight, normalized_shape or running statistics)"


_NORM_MODULES = ("torch.nn.modules.normalization", "torch.nn.modules.batchnorm", "torch.nn.modules.instancenorm")


def norm_like(m: nn.Module) -> bool:
    cls = type(m)
    if cls.__module__ in ("torch.nn.utils.parametrizations", "torch.nn.utils.parametrize"):
        return False  # weight/spectral norm reparametrize weights; they normalize no activations
    if next(m.children(), None) is not None and not (m._parameters or m._buffers):
        return False  # a block holding norms (timm's ConvNormAct, NormMlpClassifierHead): its children are seen
    return ("norm" in cls.__name__.lower() or cls.__module__ in _NORM_MODULES
            or _tensor(m, "running_mean") is not None
            or (_tensor(m, "weight") is not None and _eps(m)[0]))
