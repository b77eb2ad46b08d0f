"""LayerNorm2d and RMSNorm2d: normalize the channels of ``(N, C, H, W)`` at every pixel, without
the user permuting to channels-last and back (ConvNeXt's and timm's ``LayerNorm2d``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..functional import normalize
from ..numerics import rms_eps
from ._base import BackendMixin
from ._tracing import module_leaf

__all__ = ["LayerNorm2d", "RMSNorm2d"]

@module_leaf
def channels_first_forward(module: LayerNorm2d | RMSNorm2d, input: Tensor) -> Tensor:
    """Check the input, then normalize dim 1: one leaf function for ``torch.fx`` symbolic
    tracing (the checks read shapes, which a Proxy cannot)."""
    _check_4d(module, input)
    if isinstance(module, RMSNorm2d):
        eps = rms_eps(module.eps, input.dtype)
        return normalize(input, (1,), module.weight, None, eps, center=False, **module.call_options())
    return normalize(input, (1,), module.weight, module.bias, module.eps, **module.call_options())



def _check_4d(module: nn.Module, input: Tensor) -> None:
    if input.dim() != 4:
        raise ValueError(f"expected 4D input (got {input.dim()}D input)")
    channels = module.normalized_shape[0]
    if input.shape[1] != channels:
        raise ValueError(
            f"{type(module).__name__}({channels}) normalizes dim 1 of (N, C, H, W); got an input of "
            f"shape {list(input.shape)}: pass channels-first input with C={channels}"
        )


class LayerNorm2d(BackendMixin, nn.LayerNorm):
    """LayerNorm over the channels of ``(N, C, H, W)``, separately at every ``(n, h, w)``.

    ``y[n, :, h, w] = (x - E_c[x]) / sqrt(Var_c[x] + eps) * weight + bias``; the same as
    ``LayerNorm(C)`` on ``x.permute(0, 2, 3, 1)``, permuted back (ConvNeXt, Liu et al. 2022).
    It is :func:`normkit.functional.normalize` over ``dims=(1,)``.

    Args: ``num_channels`` (C), ``eps``, ``elementwise_affine``, ``bias``, ``device``,
    ``dtype`` as :class:`torch.nn.LayerNorm`, plus keyword-only ``backend``. ``eps`` defaults to
    torch LayerNorm's 1e-5; ConvNeXt and timm checkpoints were trained with ``eps=1e-6``: pass it.

    Shape: ``(N, C, H, W)`` in and out; a ``channels_last`` input gives a ``channels_last``
    output. ``state_dict``: ``weight`` and ``bias`` of shape ``(C,)``, as timm's LayerNorm2d
    (it also subclasses ``nn.LayerNorm``).

    Numerics: float32 statistics (float64 for float64 input), biased variance.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, *, backend: str | None = None,
                 stats_dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None) -> None:
        super().__init__(num_channels, eps, elementwise_affine, bias, device, dtype)
        self._init_backend(backend, stats_dtype, out_dtype)

    def forward(self, input: Tensor) -> Tensor:
        return channels_first_forward(self, input)


class RMSNorm2d(BackendMixin, nn.RMSNorm):
    """RMSNorm over the channels of ``(N, C, H, W)``, separately at every ``(n, h, w)``:
    ``y = x / sqrt(E_c[x^2] + eps) * weight`` (Zhang & Sennrich, 2019), i.e.
    :func:`normkit.functional.normalize` over ``dims=(1,)`` with ``center=False``.

    Args: ``num_channels`` (C), ``eps`` (``None``: machine epsilon of the statistics' dtype,
    as :class:`torch.nn.RMSNorm`), ``elementwise_affine``, ``device``, ``dtype``, plus
    keyword-only ``backend``. ``state_dict``: ``weight`` of shape ``(C,)``.
    """

    def __init__(self, num_channels: int, eps: float | None = None, elementwise_affine: bool = True,
                 device=None, dtype=None, *, backend: str | None = None,
                 stats_dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None) -> None:
        super().__init__(num_channels, eps, elementwise_affine, device, dtype)
        self._init_backend(backend, stats_dtype, out_dtype)

    def forward(self, x: Tensor) -> Tensor:
        return channels_first_forward(self, x)
