"""Turn a built model normalization-free: :func:`replace_norms` swaps its LayerNorm/RMSNorm layers
for :class:`~normkit.modules.norm_free.DyT` or :class:`~normkit.modules.norm_free.Derf`.

Unlike :func:`normkit.convert`, which keeps every output and gradient, this changes what the
model computes: it is an explicit opt-in, and the model needs training (or fine-tuning) after it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import modules as nk
from ._structure import norm_like
from .backends import get_backend
from .modules.norm_free import Derf, DyT
from .surgery import Left

__all__ = ["ReplaceReport", "Replaced", "replace_norms"]

# Norms whose forward is known: no probe. normkit's RMSNorm may scale by ``weight_offset + weight``.
_KNOWN: dict[type[nn.Module], str] = {nn.LayerNorm: "layer", nk.LayerNorm: "layer",
                                      nn.RMSNorm: "rms", nk.RMSNorm: "rms"}
_SUFFIXES = ("LayerNorm", "RMSNorm")


@dataclass(frozen=True)
class Replaced:
    """A norm :func:`replace_norms` replaced: its name in the model (``""``: the model itself),
    its class, the new module's, and what was carried over."""

    name: str
    before: str
    after: str
    carried: str


@dataclass
class ReplaceReport:
    """What :func:`replace_norms` did: ``replaced`` and ``left`` (the other norm-like modules, with
    the reason: a norm over channels or the batch, a norm that takes more than its input, ...).
    ``str(report)`` is a readable summary."""

    replaced: list[Replaced] = field(default_factory=list)
    left: list[Left] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"replaced {len(self.replaced)} norm(s), left {len(self.left)} norm-like module(s)"]
        lines += [f"  {r.name or '(model)'}: {r.before} -> {r.after} ({r.carried})" for r in self.replaced]
        lines += [f"  left {x.name or '(model)'} ({x.kind}): {x.reason}" for x in self.left]
        return "\n".join(lines)


class _Affine(NamedTuple):
    weight: Tensor | None  # the effective scale (weight + offset)
    bias: Tensor | None
    shape: tuple[int, ...]
    carried: str


def _eps(m: nn.Module) -> tuple[bool, float | None]:
    for attr in ("eps", "variance_epsilon", "epsilon"):
        if hasattr(m, attr):
            value = getattr(m, attr)
            return True, None if value is None else float(value)
    return False, None


def _param(m: nn.Module, name: str) -> Tensor | None:
    t = getattr(m, name, None)
    return t if isinstance(t, Tensor) else None


def _takes_one_input(m: nn.Module) -> bool:
    try:
        params = inspect.signature(m.forward).parameters.values()
    except (TypeError, ValueError):
        return True
    required = [p for p in params if p.default is inspect.Parameter.empty
                and p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    return len(required) <= 1


def _probe(m: nn.Module, weight: Tensor, bias: Tensor | None, eps: float | None) -> tuple[str, float] | str:
    """``(kind, offset)`` with which ``m`` computes ``layer_norm``/``rms_norm`` of the last dim with
    scale ``weight + offset`` (offset 0, or Gemma's 1), checked on a random ``(2, 3, D)`` input in
    ``m``'s dtype; else why not."""
    shape = tuple(weight.shape)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *shape, generator=generator).to(device=weight.device, dtype=weight.dtype)
    try:
        with torch.no_grad():
            y = m.forward(x)  # the module's own forward: its hooks do not run
    except Exception as exc:  # noqa: BLE001 - a forward that refuses the probe is not a last-dim norm
        return f"its forward refuses a (2, 3, {shape[0]}) input: {type(exc).__name__}: {exc}"
    if not isinstance(y, Tensor) or y.shape != x.shape:
        return "its forward does not return one tensor of its input's shape"
    xf, w, b = x.double(), weight.double(), None if bias is None else bias.double()
    for kind in ("layer", "rms"):
        for offset in (0.0, 1.0):
            if kind == "rms":
                if b is not None:
                    continue
                expected = F.rms_norm(xf, shape, w + offset, eps)
            else:
                expected = F.layer_norm(xf, shape, w + offset, b, 1e-5 if eps is None else eps)
            # a few roundings of the module's dtype: cast orders differ (HF rounds x_hat first)
            tol = 8 * torch.finfo(weight.dtype).eps * max(1.0, expected.abs().max().item())
            if (y.double() - expected).abs().max().item() <= tol:
                return kind, offset
    return "its output is neither layer_norm nor rms_norm of the last dim with weight (+ 1) and its eps"


def _affine(m: nn.Module) -> _Affine | str:
    """The affine to carry into the new module, or why ``m`` is not a norm over the last dim."""
    cls = type(m)
    weight, bias = _param(m, "weight"), _param(m, "bias")
    if cls in _KNOWN:
        shape = tuple(m.normalized_shape)
        offset = float(getattr(m, "weight_offset", 0.0)) if cls is nk.RMSNorm else 0.0
        carried = _carried(weight, bias, offset)
        return _Affine(None if weight is None else weight + offset if offset else weight, bias, shape, carried)
    name = cls.__name__
    if cls.__module__.startswith("normkit."):
        return f"normkit's {name} is not a plain LayerNorm/RMSNorm (it takes or does more than a token norm)"
    if not name.endswith(_SUFFIXES):
        return (f"not a LayerNorm/RMSNorm over the last dim: DyT/Derf replace token norms (LayerNorm, RMSNorm); "
                f"{name} normalizes over other axes (channels, groups, the batch) or is not recognised")
    if getattr(m, "data_format", "channels_last") != "channels_last" or getattr(m, "channels_first", False):
        return "a channels-first LayerNorm (it normalizes dim 1, not the last dim)"
    has_eps, eps = _eps(m)
    if weight is None or weight.dim() != 1 or not has_eps:
        return "not recognised as a last-dim norm: it needs a 1-D weight and an eps/variance_epsilon attribute"
    if not _takes_one_input(m):
        return "its forward takes more than the input (a gate, a modulation or a residual)"
    if weight.device.type == "meta":
        return _Affine(weight, bias, tuple(weight.shape), _carried(weight, bias, 0.0) + "; not probed (meta device)")
    probe = _probe(m, weight.detach(), None if bias is None else bias.detach(), eps)
    if isinstance(probe, str):
        return probe
    _, offset = probe
    return _Affine(weight + offset if offset else weight, bias, tuple(weight.shape), _carried(weight, bias, offset))


def _carried(weight: Tensor | None, bias: Tensor | None, offset: float) -> str:
    if weight is None:
        return "no affine"
    scale = f"weight + {offset:g}" if offset else "weight"
    return f"{scale} and bias copied" if bias is not None else f"{scale} copied"


def _home(m: nn.Module, model: nn.Module) -> dict:
    for t in (*m.parameters(), *m.buffers(), *model.parameters()):
        return {"device": t.device, "dtype": t.dtype if t.is_floating_point() else None}
    return {}


def _build(kind: str, affine: _Affine, alpha: float | None, shift_init: float | None, backend: str | None,
           factory: dict) -> nn.Module:
    options = {"elementwise_affine": affine.weight is not None, "bias": affine.bias is not None,
               "backend": backend, **factory}
    if alpha is not None:
        options["alpha_init"] = alpha
    if kind == "derf":
        if shift_init is not None:
            options["shift_init"] = shift_init
        new: nn.Module = Derf(affine.shape, **options)
    else:
        new = DyT(affine.shape, **options)
    with torch.no_grad():
        for name in ("weight", "bias"):
            source = getattr(affine, name)
            if source is not None:
                target = getattr(new, name)
                target.copy_(source.detach().reshape(target.shape))
                target.requires_grad_(source.requires_grad)  # a frozen norm gives a frozen affine
    return new


def replace_norms(
    model: nn.Module,
    kind: Literal["dyt", "derf"],
    *,
    alpha_init: float | Callable[[str, nn.Module], float] | None = None,
    shift_init: float | None = None,
    include: Callable[[str, nn.Module], bool] | None = None,
    backend: str | None = None,
    report: ReplaceReport | None = None,
) -> nn.Module:
    """Replace, in place, every LayerNorm and RMSNorm of ``model`` over its last dim(s) by
    :class:`~normkit.modules.norm_free.DyT` (``kind="dyt"``) or
    :class:`~normkit.modules.norm_free.Derf` (``"derf"``); returns the model
    (``model = normkit.replace_norms(model, "dyt")``, as :func:`normkit.convert`).

    **This changes the model's function** (unlike :func:`normkit.convert`, which keeps every
    output and gradient): DyT/Derf compute no statistics, so the replaced model is a different
    network that needs training or fine-tuning. The papers train from scratch with these layers
    in place of the norms; this is the explicit opt-in for doing so from a built model.

    Replaced: ``torch.nn.LayerNorm``/``RMSNorm`` and normkit's (exact classes, any
    ``normalized_shape``), and any other module whose class name ends in "LayerNorm" or
    "RMSNorm" (HF's per-model copies: LLaMA, Qwen2/3, Mistral, T5, Gemma) with a 1-D ``weight``
    and an ``eps``/``variance_epsilon`` that, on a probe input, computes ``layer_norm`` or
    ``rms_norm`` of the last dim with scale ``weight`` or ``1 + weight`` (Gemma). Left, each with
    the reason in the report: channels-first norms (timm/ConvNeXt LayerNorm2d), GroupNorm,
    BatchNorm, InstanceNorm, norms whose forward takes more than the input (gated, modulated,
    fused-add), anything ``include`` rejects.

    The new module has the norm's ``normalized_shape``, device and dtype; the norm's effective
    scale (``weight``, plus the offset of an offset-weight norm) and ``bias`` are copied into its
    ``weight``/``bias`` (the DyT paper keeps the norm's affine; a norm without one gives a module
    without one, a norm without bias one without bias); ``alpha`` and ``shift`` start at their
    initial values. A norm shared by several parents is replaced by one shared module. The old
    module's hooks are not carried over.

    Args:
        model: changed in place; where the model itself is a norm the new module is returned.
        kind: ``"dyt"`` or ``"derf"``.
        alpha_init: the initial ``alpha`` (None: the module's default, 0.5), or a function of
            ``(name, norm)`` giving it per layer, as the DyT paper's LLaMA runs do (7B: 0.8 for
            the norms before attention, 0.2 before the FFN and for the final norm).
        shift_init: Derf's initial ``shift`` (None: 0.0); not allowed with ``"dyt"``.
        include: a predicate on ``(name, norm)``; a norm it rejects is left (e.g. keep Qwen3's
            QK-norms: ``include=lambda name, m: not name.endswith(("q_norm", "k_norm"))``).
        backend: set on every new module (None: resolved at each call).
        report: a :class:`ReplaceReport` to fill: ``str(report)`` lists what was replaced and
            what was left and why.
    """
    if kind not in ("dyt", "derf"):
        raise ValueError(f"replace_norms: kind must be 'dyt' or 'derf', got {kind!r}")
    if shift_init is not None and kind != "derf":
        raise ValueError("replace_norms: shift_init is Derf's; DyT has no shift")
    if backend is not None and backend != "auto":
        get_backend(backend)  # a misspelt name fails before anything changes
    report = ReplaceReport() if report is None else report
    found = ReplaceReport()  # copied into ``report`` once every module is built: a failure reports nothing
    new_of: dict[int, nn.Module] = {}
    seen: set[int] = set()

    def visit(name: str, m: nn.Module) -> None:
        if id(m) in seen:
            return
        seen.add(id(m))
        if isinstance(m, (DyT, Derf)):
            return
        affine = _affine(m) if norm_like(m) or type(m).__name__.endswith(_SUFFIXES) else None
        if isinstance(affine, _Affine) and include is not None and not include(name, m):
            affine = "rejected by include"
        if isinstance(affine, _Affine):
            alpha = alpha_init(name, m) if callable(alpha_init) else alpha_init
            new = _build(kind, affine, alpha, shift_init, backend, _home(m, model))
            new.train(m.training)
            new_of[id(m)] = new
            found.replaced.append(Replaced(name, type(m).__name__, type(new).__name__, affine.carried))
            return
        if isinstance(affine, str):
            found.left.append(Left(name, type(m).__name__, affine))
        for child_name, child in m.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    for parent in list(model.modules()):
        # _modules, not named_children(): that skips a child already seen, so a norm held twice by
        # one parent (weight tying of modules) would keep its second slot
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in new_of:
                setattr(parent, child_name, new_of[id(child)])
    report.replaced.extend(found.replaced)
    report.left.extend(found.left)
    return new_of.get(id(model), model)
