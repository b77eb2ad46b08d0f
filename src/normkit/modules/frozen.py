"""FrozenBatchNorm1d/2d/3d: BatchNorm with fixed statistics and affine, in train mode too
(detection and segmentation backbones fine-tuned with small batches), and
:func:`freeze_batch_norm` / :func:`unfreeze_batch_norm` to swap them into a model and back."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import functional as NF
from ._base import BackendMixin
from ._tracing import module_leaf
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = [
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "freeze_batch_norm",
    "unfreeze_batch_norm",
]


@module_leaf
def frozen_batch_norm_forward(module: _FrozenBatchNorm, input: Tensor) -> Tensor:
    """Eval-mode batch norm whatever ``module.training`` says (one ``torch.fx`` leaf)."""
    if input.dim() not in module._dims:
        dims = " or ".join(f"{d}D" for d in module._dims)
        raise ValueError(f"expected {dims} input (got {input.dim()}D input)")
    return NF.batch_norm(input, module.running_mean, module.running_var, module.weight, module.bias,
                         False, 0.0, module.eps, **module.call_options())



class _FrozenBatchNorm(BackendMixin, nn.Module):
    """``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``, always.

    Unlike ``BatchNorm.eval()``, the statistics stay fixed under ``model.train()``, and
    ``weight`` and ``bias`` are buffers, not parameters: an optimizer built from
    ``model.parameters()`` never sees them (torchvision's ``FrozenBatchNorm2d``).

    Args: ``num_features`` (C), ``eps``, ``device``, ``dtype``, keyword-only ``backend``.

    ``state_dict``: BatchNorm's keys (``weight``, ``bias``, ``running_mean``, ``running_var``,
    ``num_batches_tracked``), so a BatchNorm checkpoint loads as is and back;
    ``num_batches_tracked`` is kept but never incremented, and a checkpoint without it (as
    torchvision's FrozenBatchNorm2d writes) loads too. The input gradient is
    ``dy * weight / sqrt(running_var + eps)``.
    """

    _dims: tuple[int, ...] = ()
    _twin: type[nn.modules.batchnorm._BatchNorm]

    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None, *,
                 backend: str | None = None,
                 stats_dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if num_features <= 0:
            raise ValueError(f"num_features must be positive; got {num_features}")
        kw = {"device": device, "dtype": dtype}
        self.num_features, self.eps = num_features, eps
        self.register_buffer("weight", torch.ones(num_features, **kw))
        self.register_buffer("bias", torch.zeros(num_features, **kw))
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        self._init_backend(backend, stats_dtype, out_dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        key = prefix + "num_batches_tracked"
        if key not in state_dict:  # torchvision's FrozenBatchNorm2d has no counter
            state_dict[key] = self.num_batches_tracked.clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, input: Tensor) -> Tensor:
        return frozen_batch_norm_forward(self, input)

    def extra_repr(self) -> str:
        options = BackendMixin.extra_repr(self)
        return f"{self.num_features}, eps={self.eps}" + (f", {options}" if options else "")


class FrozenBatchNorm1d(_FrozenBatchNorm):
    """:class:`FrozenBatchNorm2d` for ``(N, C)`` or ``(N, C, L)`` input."""

    _dims = (2, 3)
    _twin = BatchNorm1d


class FrozenBatchNorm2d(_FrozenBatchNorm):
    __doc__ = _FrozenBatchNorm.__doc__
    _dims = (4,)
    _twin = BatchNorm2d


class FrozenBatchNorm3d(_FrozenBatchNorm):
    """:class:`FrozenBatchNorm2d` for ``(N, C, D, H, W)`` input."""

    _dims = (5,)
    _twin = BatchNorm3d


_FROZEN_OF = {1: FrozenBatchNorm1d, 2: FrozenBatchNorm2d, 3: FrozenBatchNorm3d}
_BN_DIM = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}


def _bn_dim(module: nn.Module) -> int | None:
    """1, 2 or 3 for a BatchNorm1d/2d/3d (torch's or normkit's, not SyncBatchNorm), else None."""
    for cls, dim in _BN_DIM.items():
        if isinstance(module, cls):
            return dim
    return None


def _options(module: nn.Module) -> dict[str, Any]:
    """``module``'s backend and precision options (their defaults for a torch.nn module)."""
    return {name: getattr(module, name, default) for name, default in BackendMixin._init_attributes.items()}


def _frozen(bn: nn.modules.batchnorm._BatchNorm, dim: int) -> _FrozenBatchNorm:
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"cannot freeze {type(bn).__name__}(track_running_stats=False): it has no statistics to "
            "freeze; train it with track_running_stats=True or recalibrate it first"
        )
    ref = bn.running_mean
    frozen = _FROZEN_OF[dim](bn.num_features, bn.eps, device=ref.device, dtype=ref.dtype, **_options(bn))
    # The same tensors, not copies: freezing moves nothing and costs no memory.
    frozen.running_mean, frozen.running_var = bn.running_mean, bn.running_var
    if bn.weight is not None:
        frozen.weight = bn.weight.detach()
    if bn.bias is not None:
        frozen.bias = bn.bias.detach()
    if bn.num_batches_tracked is not None:
        frozen.num_batches_tracked = bn.num_batches_tracked
    return frozen.train(bn.training)


def _swap(model: nn.Module, make) -> nn.Module:
    """Replace every submodule ``m`` for which ``make(m)`` returns a module, in place. All
    replacements are built before any is made, so an error leaves the model unchanged."""
    memo: dict[int, nn.Module | None] = {}  # a module shared by two parents gets one replacement

    def once(m: nn.Module) -> nn.Module | None:
        if id(m) not in memo:
            memo[id(m)] = make(m)
        return memo[id(m)]

    plan = [(parent, name, once(child)) for parent in model.modules() for name, child in parent.named_children()]
    root = once(model)
    for parent, name, new in plan:
        if new is not None:
            setattr(parent, name, new)
    return model if root is None else root


def freeze_batch_norm(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d in ``model`` (torch's or normkit's) by the matching
    FrozenBatchNorm, in place, sharing its tensors (same device and dtype); returns ``model``
    (or, when ``model`` itself is a BatchNorm, its frozen replacement). SyncBatchNorm is left alone.

    Raises ``ValueError``, changing nothing, if one of them has no running statistics.
    """
    def make(m: nn.Module) -> nn.Module | None:
        dim = _bn_dim(m)
        return None if dim is None else _frozen(m, dim)

    return _swap(model, make)


def unfreeze_batch_norm(model: nn.Module) -> nn.Module:
    """The inverse of :func:`freeze_batch_norm`: every FrozenBatchNorm becomes a normkit
    BatchNorm1d/2d/3d with ``weight`` and ``bias`` as trainable parameters (sharing the frozen
    tensors' storage), in place; returns ``model``."""
    def make(m: nn.Module) -> nn.Module | None:
        if not isinstance(m, _FrozenBatchNorm):
            return None
        ref = m.running_mean
        bn = m._twin(m.num_features, m.eps, device=ref.device, dtype=ref.dtype, **_options(m))
        bn.weight, bn.bias = nn.Parameter(m.weight), nn.Parameter(m.bias)
        bn.running_mean, bn.running_var, bn.num_batches_tracked = m.running_mean, m.running_var, m.num_batches_tracked
        return bn.train(m.training)

    return _swap(model, make)
