"""The norms without running statistics: LayerNorm, RMSNorm, GroupNorm, LocalResponseNorm,
ScaleNorm, and the fused residual-add norms of pre-norm transformers."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..functional import (
    add_layer_norm,
    add_rms_norm,
    group_norm,
    layer_norm,
    local_response_norm,
    rms_norm,
    scale_norm,
)
from ._base import BackendMixin
from ._tracing import PLAIN_TENSORS as _PLAIN
from ._tracing import module_leaf

__all__ = ["FusedAddLayerNorm", "FusedAddRMSNorm", "GroupNorm", "LayerNorm", "LocalResponseNorm", "RMSNorm",
           "ScaleNorm"]

# Leaves for torch.fx symbolic tracing: their argument checks read shapes, which a Proxy cannot.
for _name in ("layer_norm", "rms_norm", "group_norm", "local_response_norm", "add_layer_norm", "add_rms_norm",
              "scale_norm"):
    torch.fx.wrap(_name)


# The ops without torch's arity check, for a module's default call on a plain tensor (a module
# passes the right number of arguments; a torch.fx Proxy takes the wrapped ops above, the leaves).
_layer_norm, _rms_norm, _group_norm = (op.__wrapped__ for op in (layer_norm, rms_norm, group_norm))


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
                 backend: str | None = None,
                 stats_dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self._init_backend(backend, stats_dtype, out_dtype)

    def forward(self, input: Tensor) -> Tensor:
        if type(input) in _PLAIN and self.backend is None and self.stats_dtype is None and self.out_dtype is None:
            return _layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)  # (see _layer_norm)
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, **self.call_options())


class RMSNorm(BackendMixin, nn.RMSNorm):
    """:class:`torch.nn.RMSNorm` on normkit's backends: ``y = x / sqrt(E[x^2] + eps) * weight``
    over the trailing ``normalized_shape`` axes (Zhang & Sennrich, 2019).

    Args: as :class:`torch.nn.RMSNorm` (``eps=None``: machine epsilon of float32 for fp16/bf16/fp32
    input, of float64 for float64), plus keyword-only:

    - ``cast``: where a low-precision input is rounded. ``"weight_first"`` (torch's):
      ``y = round(x_hat * w)``, one rounding, output in the input's dtype. ``"normalize_first"``
      (HF LLaMA/T5, ``weight * x_hat.to(input_dtype)``): ``y = w * round(x_hat)``, the
      output dtype promoted from the weight's and the input's (a float32 weight gives float32).
    - ``weight_offset``: ``y = x_hat * (weight_offset + weight)`` (Gemma: 1.0); the weight
      is initialised to ``1 - weight_offset``, so the initial scale is 1 whatever the offset.
    - ``backend``.
    """

    _init_attributes = {"cast": "weight_first", "weight_offset": 0.0}  # see BackendMixin.adopt

    def __init__(self, normalized_shape: int | list[int] | torch.Size, eps: float | None = None,
                 elementwise_affine: bool = True, device=None, dtype=None, *,
                 backend: str | None = None,
                 stats_dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None,
                 cast: str = "weight_first", weight_offset: float = 0.0) -> None:
        if cast not in _CASTS:
            raise ValueError(f"RMSNorm cast must be one of {_CASTS}; got {cast!r}")
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        self.cast, self.weight_offset = cast, float(weight_offset)
        self.reset_parameters()
        self._init_backend(backend, stats_dtype, out_dtype)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.weight is not None and getattr(self, "weight_offset", 0.0):
            with torch.no_grad():
                self.weight.fill_(1.0 - self.weight_offset)

    def _scale(self) -> Tensor | None:
        if self.weight is None or not self.weight_offset:
            return self.weight
        if self.cast == "weight_first" and self.weight.dtype in (torch.float16, torch.bfloat16):
            # In float32, as Gemma's ``1 + weight.float()``: in bf16, 1 + w rounds a small w
            # to a multiple of 2^-7. The product x_hat * scale is still rounded once.
            return self.weight.float() + self.weight_offset
        return self.weight + self.weight_offset

    def forward(self, x: Tensor) -> Tensor:
        if (type(x) in _PLAIN and self.cast == "weight_first" and not self.weight_offset and self.backend is None
                and self.stats_dtype is None and self.out_dtype is None):
            # the default call on a tensor (a torch.fx Proxy takes the leaf): torch.nn.RMSNorm's call
            return _rms_norm(x, self.normalized_shape, self.weight, self.eps)
        return rms_norm_forward(self, x)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.cast != "weight_first":
            text += f", cast={self.cast!r}"
        if self.weight_offset:
            text += f", weight_offset={self.weight_offset}"
        return text


_CASTS = ("weight_first", "normalize_first")


@module_leaf
def add_rms_norm_forward(module: FusedAddRMSNorm, x: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
    """The forward of :class:`FusedAddRMSNorm`, one ``torch.fx`` leaf as :func:`rms_norm_forward`:
    ``cast``/``weight_offset`` as RMSNorm's, on ``y``."""
    options = {"residual_dtype": module.residual_dtype, **module.call_options()}
    if module.cast == "normalize_first" and module.weight is not None:
        out_dtype = options.pop("out_dtype")
        y, residual_out = add_rms_norm(x, residual, module.normalized_shape, None, module.eps, **options)
        y = module._scale() * y
        return (y if out_dtype is None else y.to(out_dtype)), residual_out
    return add_rms_norm(x, residual, module.normalized_shape, module._scale(), module.eps, **options)


@module_leaf
def rms_norm_forward(module: RMSNorm, x: Tensor) -> Tensor:
    """The forward of :class:`RMSNorm`: one ``torch.fx`` leaf, as it reads the weight's dtype
    and the ``cast``/``weight_offset`` options."""
    if module.cast == "normalize_first" and module.weight is not None:
        options = module.call_options()
        out_dtype = options.pop("out_dtype")
        y = module._scale() * rms_norm(x, module.normalized_shape, None, module.eps, **options)
        return y if out_dtype is None else y.to(out_dtype)
    return rms_norm(x, module.normalized_shape, module._scale(), module.eps, **module.call_options())


class GroupNorm(BackendMixin, nn.GroupNorm):
    """:class:`torch.nn.GroupNorm` on normkit's backends: each sample's C channels split into
    ``num_groups`` groups, each normalized over its channels and spatial axes (Wu & He, 2018).

    Args: as :class:`torch.nn.GroupNorm`, plus keyword-only ``backend`` and ``group_size``
    (channels per group), given *instead of* ``num_groups``:
    ``GroupNorm(num_channels=64, group_size=16)`` is ``GroupNorm(4, 64)``. For that spelling
    ``num_groups`` and ``num_channels`` default to ``None``; give exactly one of ``num_groups``
    and ``group_size``. ``num_groups`` is then stored as usual (``state_dict`` and ``repr`` are
    the plain GroupNorm's).
    """

    def __init__(self, num_groups: int | None = None, num_channels: int | None = None, eps: float = 1e-5,
                 affine: bool = True, device=None, dtype=None, *, bias: bool = True,
                 backend: str | None = None,
                 stats_dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None,
                 group_size: int | None = None) -> None:
        # torch's TypeErrors for a missing argument (both are required there); group_size is
        # the one spelling that replaces num_groups
        if num_channels is None:
            raise TypeError("GroupNorm.__init__() missing 1 required positional argument: 'num_channels'")
        if num_groups is None and group_size is None:
            raise TypeError("GroupNorm.__init__() missing 1 required positional argument: 'num_groups'")
        if num_groups is not None and group_size is not None:
            raise ValueError(
                f"give exactly one of num_groups and group_size (channels per group); got num_groups={num_groups}, "
                f"group_size={group_size}"
            )
        if group_size is not None:
            if group_size <= 0 or num_channels % group_size != 0:
                raise ValueError(
                    f"group_size must be a positive divisor of num_channels={num_channels}; got group_size={group_size}"
                )
            num_groups = num_channels // group_size
        super().__init__(num_groups, num_channels, eps, affine, device, dtype, bias=bias)
        self._init_backend(backend, stats_dtype, out_dtype)

    def forward(self, input: Tensor) -> Tensor:
        if type(input) in _PLAIN and self.backend is None and self.stats_dtype is None and self.out_dtype is None:
            return _group_norm(input, self.num_groups, self.weight, self.bias, self.eps)  # (see _layer_norm)
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps, **self.call_options())


class LocalResponseNorm(BackendMixin, nn.LocalResponseNorm):
    """:class:`torch.nn.LocalResponseNorm` on normkit's backends:
    ``y = x / (k + alpha / size * sum_window(x^2)) ** beta`` over ``size`` neighbouring channels
    (Krizhevsky et al., 2012)."""

    def __init__(self, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0, *,
                 backend: str | None = None,
                 stats_dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None) -> None:
        super().__init__(size, alpha, beta, k)
        self._init_backend(backend, stats_dtype, out_dtype)

    def forward(self, input: Tensor) -> Tensor:
        return local_response_norm(input, self.size, self.alpha, self.beta, self.k, **self.call_options())


class FusedAddLayerNorm(LayerNorm):
    """Pre-norm residual step as one module: ``forward(x, residual)`` returns
    ``(layer_norm(x + residual), x + residual)``; see :func:`normkit.functional.add_layer_norm`.

    Same parameters and ``state_dict`` as :class:`LayerNorm`; keyword-only ``residual_dtype``
    stores the residual stream at another precision (e.g. ``torch.float32``).
    """

    _init_attributes = {"residual_dtype": None}  # see BackendMixin.adopt

    def __init__(self, normalized_shape: int | list[int] | torch.Size, eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True, device=None, dtype=None, *,
                 residual_dtype: torch.dtype | None = None, backend: str | None = None,
                 stats_dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype, backend=backend,
                         stats_dtype=stats_dtype, out_dtype=out_dtype)
        self.residual_dtype = residual_dtype

    def forward(self, x: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return add_layer_norm(x, residual, self.normalized_shape, self.weight, self.bias, self.eps,
                              residual_dtype=self.residual_dtype, **self.call_options())


class FusedAddRMSNorm(RMSNorm):
    """:class:`FusedAddLayerNorm` with RMS normalization; same ``state_dict`` as :class:`RMSNorm`,
    and its ``cast`` and ``weight_offset`` options (applied to ``y``; ``residual_out`` is the sum)."""

    _init_attributes = {"residual_dtype": None}  # see BackendMixin.adopt

    def __init__(self, normalized_shape: int | list[int] | torch.Size, eps: float | None = None,
                 elementwise_affine: bool = True, device=None, dtype=None, *,
                 residual_dtype: torch.dtype | None = None, backend: str | None = None,
                 stats_dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None,
                 cast: str = "weight_first", weight_offset: float = 0.0) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype, backend=backend,
                         stats_dtype=stats_dtype, out_dtype=out_dtype, cast=cast, weight_offset=weight_offset)
        self.residual_dtype = residual_dtype

    def forward(self, x: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return add_rms_norm_forward(self, x, residual)


class ScaleNorm(BackendMixin, nn.Module):
    """ScaleNorm (Nguyen & Salazar, 2019, "Transformers without Tears"): each row of the last dim
    scaled to a learned length, ``y = g * x / max(||x||_2, eps)``.

    torch.nn has no twin, so this is a plain ``nn.Module``; its oracle is
    :mod:`normkit.reference` in float64.

    Args:
        d: the size of the last dim; ``g`` is initialised to ``sqrt(d)``, as in the paper (a
            unit row then has the length of a row of unit-variance entries).
        eps: the smallest norm divided by (``1e-5``, the paper's code's clamp).
        device, dtype: of ``g``.
        backend, stats_dtype, out_dtype: keyword-only, as every normkit module.

    Shape: input ``(*, d)``, output the same.

    Numerics: the norm and the scaling in float32 (float64 for float64 input), output in the
    input's dtype; ``g`` is one parameter of shape ``()``.
    """

    def __init__(self, d: int, eps: float = 1e-5, device=None, dtype=None, *, backend: str | None = None,
                 stats_dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.d, self.eps = d, eps
        self.g = nn.Parameter(torch.empty((), device=device, dtype=dtype))
        self.reset_parameters()
        self._init_backend(backend, stats_dtype, out_dtype)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.g.fill_(math.sqrt(self.d))

    def forward(self, input: Tensor) -> Tensor:
        return scale_norm(input, self.g, self.eps, **self.call_options())

    def extra_repr(self) -> str:
        return ", ".join(filter(None, [f"{self.d}, eps={self.eps}", BackendMixin.extra_repr(self)]))
