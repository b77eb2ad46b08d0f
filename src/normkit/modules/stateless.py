"""The norms without running statistics: LayerNorm, RMSNorm, GroupNorm, LocalResponseNorm, and
the fused residual-add norms of pre-norm transformers."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..functional import add_layer_norm, add_rms_norm, group_norm, layer_norm, local_response_norm, rms_norm
from ._base import BackendMixin

__all__ = ["FusedAddLayerNorm", "FusedAddRMSNorm", "GroupNorm", "LayerNorm", "LocalResponseNorm", "RMSNorm"]

# Leaves for torch.fx symbolic tracing: their argument checks read shapes, which a Proxy cannot.
for _name in ("layer_norm", "rms_norm", "group_norm", "local_response_norm", "add_layer_norm", "add_rms_norm"):
    torch.fx.wrap(_name)


class LayerNorm(BackendMixin, nn.LayerNorm):
    """:class:`torch.nn.LayerNorm` on normkit's backends: normalizes the trailing
    ``normalized_shape`` axes of each sample.

    ``y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias``  (Ba et al., 2016)

    Args: as :class:`torch.nn.LayerNorm`, plus keyword-only ``backend``.

    Numerics: float32 statistics (float64 for float64 input), biased variance; fp16/bf16 input
    may come with float32 ``weight`` and ``bias``; the output has the input's dtype.
    """

    def __init__(self, normalized_shape: int | list[int] | torch.Size, eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True, device=None, dtype=None, *,
                 backend: str | None = None) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self._init_backend(backend)

    def forward(self, input: Tensor) -> Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, backend=self.backend)


class RMSNorm(BackendMixin, nn.RMSNorm):
    """:class:`torch.nn.RMSNorm` on normkit's backends: ``y = x / sqrt(E[x^2] + eps) * weight``
    over the trailing ``normalized_shape`` axes (Zhang & Sennrich, 2019).

    Args: as :class:`torch.nn.RMSNorm` (``eps=None``: machine epsilon of float32 for fp16/bf16/fp32
    input, of float64 for float64), plus keyword-only ``backend``.
    """

    def __init__(self, normalized_shape: int | list[int] | torch.Size, eps: float | None = None,
                 elementwise_affine: bool = True, device=None, dtype=None, *,
                 backend: str | None = None) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        self._init_backend(backend)

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.normalized_shape, self.weight, self.eps, backend=self.backend)


class GroupNorm(BackendMixin, nn.GroupNorm):
    """:class:`torch.nn.GroupNorm` on normkit's backends: each sample's C channels split into
    ``num_groups`` groups, each normalized over its channels and spatial axes (Wu & He, 2018).

    Args: as :class:`torch.nn.GroupNorm`, plus keyword-only ``backend``.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None, *, bias: bool = True, backend: str | None = None) -> None:
        super().__init__(num_groups, num_channels, eps, affine, device, dtype, bias=bias)
        self._init_backend(backend)

    def forward(self, input: Tensor) -> Tensor:
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps, backend=self.backend)


class LocalResponseNorm(BackendMixin, nn.LocalResponseNorm):
    """:class:`torch.nn.LocalResponseNorm` on normkit's backends:
    ``y = x / (k + alpha / size * sum_window(x^2)) ** beta`` over ``size`` neighbouring channels
    (Krizhevsky et al., 2012)."""

    def __init__(self, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0, *,
                 backend: str | None = None) -> None:
        super().__init__(size, alpha, beta, k)
        self._init_backend(backend)

    def forward(self, input: Tensor) -> Tensor:
        return local_response_norm(input, self.size, self.alpha, self.beta, self.k, backend=self.backend)


class FusedAddLayerNorm(LayerNorm):
    """Pre-norm residual step as one module: ``forward(x, residual)`` returns
    ``(layer_norm(x + residual), x + residual)``; see :func:`normkit.functional.add_layer_norm`.

    Same parameters and ``state_dict`` as :class:`LayerNorm`; keyword-only ``residual_dtype``
    stores the residual stream at another precision (e.g. ``torch.float32``).
    """

    def __init__(self, normalized_shape: int | list[int] | torch.Size, eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True, device=None, dtype=None, *,
                 residual_dtype: torch.dtype | None = None, backend: str | None = None) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype, backend=backend)
        self.residual_dtype = residual_dtype

    def forward(self, x: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return add_layer_norm(x, residual, self.normalized_shape, self.weight, self.bias, self.eps,
                              residual_dtype=self.residual_dtype, backend=self.backend)


class FusedAddRMSNorm(RMSNorm):
    """:class:`FusedAddLayerNorm` with RMS normalization; same ``state_dict`` as :class:`RMSNorm`."""

    def __init__(self, normalized_shape: int | list[int] | torch.Size, eps: float | None = None,
                 elementwise_affine: bool = True, device=None, dtype=None, *,
                 residual_dtype: torch.dtype | None = None, backend: str | None = None) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype, backend=backend)
        self.residual_dtype = residual_dtype

    def forward(self, x: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return add_rms_norm(x, residual, self.normalized_shape, self.weight, self.eps,
                            residual_dtype=self.residual_dtype, backend=self.backend)
