"""Model surgery: swap a built model's normalization layers for normkit's and back, fold
BatchNorm into the convolution before it, and recalibrate BatchNorm statistics.

Every function works in place and returns the model. Where the model itself is the module to
replace by another object (an adapter's result at the root), the return value is the new
module: always use it (``model = normkit.convert(model)``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from . import modules as nk
from .backends import get_backend
from .modules.frozen import _swap

__all__ = ["convert", "fuse_conv_bn", "recalibrate_batch_norm", "register_adapter", "to_torch"]

# torch.nn class -> its normkit twin. A twin subclasses its torch class and adds only the plain
# ``backend`` attribute, so converting is a class swap, as torch's own Lazy modules become their
# non-lazy class (``cls_to_become``): the same Parameter and buffer objects, device, dtype,
# requires_grad, training mode and hooks, with nothing copied.
TWINS: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: nk.BatchNorm1d,
    nn.BatchNorm2d: nk.BatchNorm2d,
    nn.BatchNorm3d: nk.BatchNorm3d,
    nn.InstanceNorm1d: nk.InstanceNorm1d,
    nn.InstanceNorm2d: nk.InstanceNorm2d,
    nn.InstanceNorm3d: nk.InstanceNorm3d,
    nn.LayerNorm: nk.LayerNorm,
    nn.GroupNorm: nk.GroupNorm,
    nn.RMSNorm: nk.RMSNorm,
    nn.LocalResponseNorm: nk.LocalResponseNorm,
}
# normkit class -> torch.nn class, for to_torch. LayerNorm2d, RMSNorm2d, the Frozen, fused-add
# and other normkit-only layers have no torch class with their forward: to_torch leaves them.
_TORCH_OF = {twin: cls for cls, twin in TWINS.items()}

Adapter = Callable[[nn.Module], nn.Module]
_ADAPTERS: list[tuple[Callable[[nn.Module], bool], Adapter]] = []


def register_adapter(match: type[nn.Module] | Callable[[nn.Module], bool], fn: Adapter) -> None:
    """Teach :func:`convert` a third-party norm class: for a module ``m`` that ``match``es (an
    exact class, ``type(m) is match``, or a predicate ``match(m) -> bool``), ``fn(m)`` returns
    the normkit module with the same semantics, sharing ``m``'s parameters. Adapters registered
    later are tried first."""
    if isinstance(match, type):
        cls = match
        match = lambda m: type(m) is cls
    _ADAPTERS.insert(0, (match, fn))


def _named(module_path: str, class_name: str) -> Callable[[nn.Module], bool]:
    """Match a class by module path and name, so its package need not be installed."""
    return lambda m: type(m).__name__ == class_name and type(m).__module__ == module_path


def _share(new: nn.Module, old: nn.Module, *names: str) -> nn.Module:
    """``new`` with ``old``'s Parameter objects under ``names`` and ``old``'s training mode."""
    for name in names:
        setattr(new, name, getattr(old, name))
    return new.train(old.training)


def _like(p: torch.Tensor) -> dict[str, Any]:
    return {"device": p.device, "dtype": p.dtype}


def _llama_rms_norm(m: nn.Module) -> nn.Module:
    # weight * (x * rsqrt(mean(x^2) + eps)).to(input_dtype), statistics in float32.
    new = nk.RMSNorm(m.weight.shape, m.variance_epsilon, cast="normalize_first", **_like(m.weight))
    return _share(new, m, "weight")


def _t5_layer_norm(m: nn.Module) -> nn.Module:
    # T5 rounds x_hat to the weight's dtype when that is fp16/bf16, then multiplies: exactly
    # normalize_first when the weight and input dtypes agree (a float32 weight with bf16 input
    # keeps x_hat in float32 in T5 and is rounded once more here).
    new = nk.RMSNorm(m.weight.shape, m.variance_epsilon, cast="normalize_first", **_like(m.weight))
    return _share(new, m, "weight")


def _channels_first_layer_norm(m: nn.Module) -> nn.Module:
    """HF ConvNextLayerNorm / timm LayerNorm2d: nn.LayerNorm subclasses that permute around it."""
    channels_first = getattr(m, "data_format", "channels_first") == "channels_first"
    ref = m.weight if m.weight is not None else torch.empty(0)
    if channels_first:
        new = nk.LayerNorm2d(m.normalized_shape[0], m.eps, m.elementwise_affine, m.bias is not None, **_like(ref))
    else:
        new = nk.LayerNorm(m.normalized_shape, m.eps, m.elementwise_affine, m.bias is not None, **_like(ref))
    return _share(new, m, "weight", "bias")


register_adapter(_named("transformers.models.t5.modeling_t5", "T5LayerNorm"), _t5_layer_norm)
register_adapter(_named("transformers.models.llama.modeling_llama", "LlamaRMSNorm"), _llama_rms_norm)
register_adapter(_named("transformers.models.convnext.modeling_convnext", "ConvNextLayerNorm"),
                 _channels_first_layer_norm)
register_adapter(lambda m: type(m).__name__ == "LayerNorm2d" and type(m).__module__.startswith("timm."),
                 _channels_first_layer_norm)


def convert(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Replace, in place, every normalization layer of ``model`` by its normkit twin; returns it.

    - Exact torch.nn classes (``type(m) is nn.BatchNorm2d``, ...; see :data:`TWINS`) become
      their twin by a class swap: the same Parameter and buffer objects, hooks, training mode.
      Subclasses (they may have their own ``forward``) and SyncBatchNorm are left alone.
    - Third-party classes with a registered adapter (:func:`register_adapter`; built in:
      HF ``LlamaRMSNorm``, ``T5LayerNorm``, ``ConvNextLayerNorm``, timm ``LayerNorm2d``) are
      replaced by the adapter's normkit module, sharing their parameters.

    ``backend`` is set on every module converted (``None``: resolved at each call).
    """
    if backend is not None and backend != "auto":
        get_backend(backend)  # a misspelt name fails before anything changes
    def make(m: nn.Module) -> nn.Module | None:
        for match, fn in _ADAPTERS:
            if match(m):
                new = fn(m)
                new.backend = backend
                return new
        return None

    model = _swap(model, make)
    for m in model.modules():
        twin = TWINS.get(type(m))
        if twin is not None:
            m.__class__ = twin
            m.backend = backend
    return model


def to_torch(model: nn.Module) -> nn.Module:
    """The reverse of :func:`convert` for normkit's torch twins: each becomes its exact torch.nn
    class (same Parameter objects), in place; returns ``model``. Layers with no torch class of
    the same forward (LayerNorm2d, RMSNorm2d, FrozenBatchNorm, fused-add norms, RMSNorm with
    ``cast``/``weight_offset`` set, modules with ``stats_dtype``/``out_dtype`` set) stay normkit modules, and adapters are not undone."""
    for m in model.modules():
        cls = _TORCH_OF.get(type(m))
        if cls is None:
            continue
        if isinstance(m, nk.RMSNorm) and (m.cast != "weight_first" or m.weight_offset):
            continue
        if m.stats_dtype is not None or m.out_dtype is not None:  # torch has no precision controls
            continue
        m.__class__ = cls
        for extra in ("backend", "stats_dtype", "out_dtype", "cast", "weight_offset"):
            m.__dict__.pop(extra, None)
    return model


_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """Fold each eval-mode BatchNorm into the Conv1d/2d/3d or Linear just before it, in place.

    Wherever a BatchNorm1d/2d/3d directly follows such a layer among its parent's
    ``named_children`` (a Sequential-like chain), the layer's weight and bias absorb it::

        s = bn.weight / sqrt(running_var + eps);   W <- W * s;   b <- (b - running_mean) * s + bn.bias

    and the BatchNorm becomes ``nn.Identity()``. Computed in float64, stored in the layer's
    dtype. Only children order is read, not the forward: a model whose forward uses its
    children out of order (or the conv's output elsewhere too) must not be fused.

    Raises ``RuntimeError``, changing nothing, if a BatchNorm to fold is in training mode or
    has no running statistics.
    """
    pairs = []
    for parent in model.modules():
        children = list(parent.named_children())
        for (_, layer), (name, bn) in zip(children, children[1:], strict=False):
            if isinstance(layer, _FOLDABLE) and isinstance(bn, _BATCH_NORMS):
                out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
                if out == bn.num_features:
                    pairs.append((parent, layer, name, bn))
    for _, _, name, bn in pairs:
        if bn.training:
            raise RuntimeError(
                f"fuse_conv_bn folds running statistics, but {name} ({type(bn).__name__}) is in training "
                "mode, where it normalizes with batch statistics: call model.eval() first"
            )
        if bn.running_mean is None:
            raise RuntimeError(f"fuse_conv_bn: {name} has track_running_stats=False, so nothing to fold")
    with torch.no_grad():
        for parent, layer, name, bn in pairs:
            _fold(layer, bn)
            setattr(parent, name, nn.Identity())
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


def _chain(first: Any, rest: Iterable[Any]) -> Iterable[Any]:
    yield first
    yield from rest
