"""BatchNorm after training: fold it into the layer before it (:func:`fuse_conv_bn`) and
recompute its running statistics (:func:`recalibrate_batch_norm`). Both work in place and
return the model."""

from __future__ import annotations

import collections
import copy
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import torch
import torch.fx as fx
from torch import nn

from . import modules as nk
from ._probe import (
    compare,
    difference,
    probe_input,
    random_copy,
)
from ._structure import ACT_MODULES
from .modules._base import BackendMixin

__all__ = ["fuse_conv_bn", "recalibrate_batch_norm"]


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
