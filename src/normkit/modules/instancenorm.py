"""InstanceNorm1d/2d/3d and their Lazy variants: drop-ins for torch.nn's, on any normkit backend."""

from __future__ import annotations

import warnings

from torch import Tensor, nn

from .. import functional as NF
from ..masked import masked_instance_norm
from ._lazy import MaterializeOnSuccess
from ._tracing import PLAIN_TENSORS, module_leaf
from .batchnorm import NormBaseMixin

__all__ = [
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LazyInstanceNorm1d",
    "LazyInstanceNorm2d",
    "LazyInstanceNorm3d",
]


@module_leaf
def instance_norm_forward(
    module: nn.modules.instancenorm._InstanceNorm, input: Tensor, mask: Tensor | None = None
) -> Tensor:
    """torch's ``_InstanceNorm.forward`` semantics (no-batch-dim input included), as one leaf
    function for ``torch.fx`` symbolic tracing. With a ``mask`` (``(N, L)`` bool, True = real
    token) each instance's statistics count its real tokens only
    (:func:`normkit.masked.masked_instance_norm`)."""
    module._check_input_dim(input)
    feature_dim = input.dim() - module._get_no_batch_dim()
    if input.size(feature_dim) != module.num_features:
        if module.affine:
            raise ValueError(
                f"expected input's size at dim={feature_dim} to match num_features"
                f" ({module.num_features}), but got: {input.size(feature_dim)}."
            )
        warnings.warn(
            f"input's size at dim={feature_dim} does not match num_features. "
            "You can silence this warning by not passing in num_features, "
            "which is not used because affine=False",
            stacklevel=3,
        )
    if mask is not None:
        return masked_instance_norm(
            input,
            mask,
            module.running_mean,
            module.running_var,
            module.weight,
            module.bias,
            module.training or not module.track_running_stats,
            module.momentum if module.momentum is not None else 0.0,
            module.eps,
            backend=module.call_options(masked=True)["backend"],
        )
    unbatched = input.dim() == module._get_no_batch_dim()
    args = (
        input.unsqueeze(0) if unbatched else input,
        module.running_mean,
        module.running_var,
        module.weight,
        module.bias,
        module.training or not module.track_running_stats,
        module.momentum if module.momentum is not None else 0.0,
        module.eps,
    )
    if module.backend is None and module.stats_dtype is None and module.out_dtype is None:
        out = _instance_norm(*args)  # the default call: no options to pass (nor arguments to count)
    else:
        out = NF.instance_norm(*args, **module.call_options())
    return out.squeeze(0) if unbatched else out


_instance_norm = NF.instance_norm.__wrapped__  # type: ignore[attr-defined]
_instance_norm_forward = instance_norm_forward.__wrapped__  # type: ignore[attr-defined]  # (the leaf's function)


class _InstanceNormMixin(NormBaseMixin):
    def forward(self, input: Tensor) -> Tensor:
        if type(input) in PLAIN_TENSORS:  # not traced by fx: the leaf's tracer test is not needed
            return _instance_norm_forward(self, input)
        return instance_norm_forward(self, input)


class InstanceNorm1d(_InstanceNormMixin, nn.InstanceNorm1d):
    """:class:`torch.nn.InstanceNorm1d` on normkit's backends: (N, C, L) or (C, L), each
    (sample, channel) normalized over L.

    ``y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias``  (Ulyanov et al., 2016)

    Args: as :class:`torch.nn.InstanceNorm1d` (note ``affine=False`` and
    ``track_running_stats=False`` by default), plus keyword-only ``backend``, ``stats_dtype`` and
    ``out_dtype``.

    Numerics: float32 statistics (float64 for float64 input); running statistics, when tracked,
    move towards the batch average of the per-instance mean and unbiased variance.

    ``forward(x, mask=None)``: for padded sequences, ``mask`` is an ``(N, L)`` bool tensor (True =
    real token) for ``x`` of shape ``(N, C, L)``; each instance is normalized over its real
    tokens only (its unbiased variance over its own real count for the running statistics),
    padded outputs and input gradients are 0. When the input's statistics are used, a sample with
    no real token raises ``ValueError``; so does a bad mask, with no buffer changed.
    """

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        return instance_norm_forward(self, input, mask)


class InstanceNorm2d(_InstanceNormMixin, nn.InstanceNorm2d):
    """:class:`torch.nn.InstanceNorm2d` on normkit's backends: (N, C, H, W) or (C, H, W).
    See :class:`InstanceNorm1d`."""


class InstanceNorm3d(_InstanceNormMixin, nn.InstanceNorm3d):
    """:class:`torch.nn.InstanceNorm3d` on normkit's backends: (N, C, D, H, W) or (C, D, H, W).
    See :class:`InstanceNorm1d`."""


class LazyInstanceNorm1d(MaterializeOnSuccess, _InstanceNormMixin, nn.LazyInstanceNorm1d):
    """:class:`torch.nn.LazyInstanceNorm1d`: becomes a normkit :class:`InstanceNorm1d` at the first call."""

    cls_to_become = InstanceNorm1d  # type: ignore[assignment]


class LazyInstanceNorm2d(MaterializeOnSuccess, _InstanceNormMixin, nn.LazyInstanceNorm2d):
    """:class:`torch.nn.LazyInstanceNorm2d`: becomes a normkit :class:`InstanceNorm2d` at the first call."""

    cls_to_become = InstanceNorm2d  # type: ignore[assignment]


class LazyInstanceNorm3d(MaterializeOnSuccess, _InstanceNormMixin, nn.LazyInstanceNorm3d):
    """:class:`torch.nn.LazyInstanceNorm3d`: becomes a normkit :class:`InstanceNorm3d` at the first call."""

    cls_to_become = InstanceNorm3d  # type: ignore[assignment]
