"""Modules for the norms of today's blocks (:mod:`normkit.functional_blocks`): modulated (adaLN),
gated, QK and sandwich RMS norms. torch.nn has none of them, so each is an ``nn.Module`` with
normkit's keyword-only ``backend``/``stats_dtype``/``out_dtype``; their parameters are named as in
the models that use them, so a ``state_dict`` moves between them and these modules."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..functional_blocks import gated_rms_norm, modulated_layer_norm, modulated_rms_norm, qk_rms_norm, sandwich_rms_norm
from ._base import BackendMixin
from ._tracing import module_leaf

__all__ = ["GatedRMSNorm", "ModulatedLayerNorm", "ModulatedRMSNorm", "QKRMSNorm", "SandwichRMSNorm"]

# Leaves for torch.fx symbolic tracing: their argument checks read shapes, which a Proxy cannot.
for _name in ("gated_rms_norm", "modulated_layer_norm", "modulated_rms_norm", "qk_rms_norm", "sandwich_rms_norm"):
    torch.fx.wrap(_name)

_CASTS = ("weight_first", "normalize_first")


def _last_dim(cls: str, normalized_shape: int | Sequence[int]) -> int:
    """The one normalized size of a norm over the last dim (an int or a one-element shape)."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if len(shape) != 1 or not isinstance(shape[0], int) or isinstance(shape[0], bool) or shape[0] <= 0:
        raise ValueError(f"{cls} normalizes the last dim only: normalized_shape must be one positive int, "
                         f"got {normalized_shape!r}")
    return shape[0]


def _check_cast(cls: str, cast: str) -> None:
    if cast not in _CASTS:
        raise ValueError(f"{cls} cast must be one of {_CASTS}; got {cast!r}")


def _vector(size: int, fill: float, factory: dict) -> nn.Parameter:
    return nn.Parameter(torch.full((size,), fill, **factory))


def _scaled(weight: Tensor, offset: float, y: Tensor) -> Tensor:
    """``(weight + offset) * y``: the ``cast="normalize_first"`` product, applied after the norm's
    rounding to the input's dtype (HF LLaMA/Qwen3's ``weight * x_hat.to(input_dtype)``)."""
    return (weight + offset if offset else weight) * y


class ModulatedLayerNorm(BackendMixin, nn.Module):
    """Adaptive LayerNorm (adaLN) of DiT, SD3 and Flux blocks: ``y = layer_norm(x) * (1 + scale) +
    shift`` over the last dim, with ``shift`` and ``scale`` given per call (from the conditioning
    embedding), see :func:`normkit.functional.modulated_layer_norm`.

    Args:
        normalized_shape: ``D``, the last dim (an int or ``(D,)``).
        eps: added to the variance (DiT's ``1e-6``).
        elementwise_affine: learnable ``weight`` (ones) and, with ``bias``, ``bias`` (zeros); DiT's
            norms have none (False, the default): the modulation is the affine.
        bias: whether the affine has a bias.

    Shape: ``forward(input, shift, scale)``: ``input`` ``(*, D)``; ``shift``, ``scale`` broadcast
    to it (``(N, 1, D)`` per sample, ``(N, L, D)`` per token).

    Numerics: float32 statistics and modulation (float64 for float64 input), one rounding to the
    input's dtype.
    """


    def __init__(self, normalized_shape: int | Sequence[int], eps: float = 1e-6, elementwise_affine: bool = False,
                 bias: bool = True, device=None, dtype=None, *, backend: str | None = None,
                 stats_dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        size = _last_dim(type(self).__name__, normalized_shape)
        self.normalized_shape, self.eps, self.elementwise_affine = (size,), eps, elementwise_affine
        factory = {"device": device, "dtype": dtype}
        self.weight = _vector(size, 1.0, factory) if elementwise_affine else None
        self.bias = _vector(size, 0.0, factory) if elementwise_affine and bias else None
        self._init_backend(backend, stats_dtype, out_dtype)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, input: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        return modulated_layer_norm(input, shift, scale, self.weight, self.bias, self.eps, **self.call_options())

    def extra_repr(self) -> str:
        text = f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        options = super().extra_repr()
        return f"{text}, {options}" if options else text


class ModulatedRMSNorm(BackendMixin, nn.Module):
    """:class:`ModulatedLayerNorm` with RMS normalization: ``y = rms_norm(x) * (1 + scale) +
    shift`` (:func:`normkit.functional.modulated_rms_norm`). ``eps=None`` is machine epsilon of
    the statistics' dtype; ``elementwise_affine`` gives a ``weight`` (ones)."""


    def __init__(self, normalized_shape: int | Sequence[int], eps: float | None = None,
                 elementwise_affine: bool = False, device=None, dtype=None, *, backend: str | None = None,
                 stats_dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        size = _last_dim(type(self).__name__, normalized_shape)
        self.normalized_shape, self.eps, self.elementwise_affine = (size,), eps, elementwise_affine
        self.weight = _vector(size, 1.0, {"device": device, "dtype": dtype}) if elementwise_affine else None
        self._init_backend(backend, stats_dtype, out_dtype)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, input: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        return modulated_rms_norm(input, shift, scale, self.weight, self.eps, **self.call_options())

    def extra_repr(self) -> str:
        text = f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        options = super().extra_repr()
        return f"{text}, {options}" if options else text


class GatedRMSNorm(BackendMixin, nn.Module):
    """Gated RMSNorm of Mamba2, Bamba and Falcon-H1 (:func:`normkit.functional.gated_rms_norm`):
    ``y = rms_norm(x * silu(gate)) * weight`` per group of ``group_size`` channels
    (``norm_before_gate=True``: ``rms_norm(x) * weight * silu(gate)``).

    Args:
        hidden_size: the last dim ``D``.
        eps: added to the mean square (``1e-6``).
        group_size: a divisor of ``D`` (``None``: one group, the whole last dim).
        norm_before_gate: where the gate is applied.
        cast (keyword-only): ``"weight_first"`` (one rounding of ``x_hat * weight``) or
            ``"normalize_first"``, HF's ``MambaRMSNormGated``: ``weight * round(x_hat)``, the output
            dtype promoted from the weight's and the input's.

    Shape: ``forward(input, gate=None)``, ``gate`` of ``input``'s shape ``(*, D)``.
    """

    _init_attributes = {"cast": "weight_first"}  # see BackendMixin.init_attributes


    def __init__(self, hidden_size: int, eps: float = 1e-6, group_size: int | None = None,
                 norm_before_gate: bool = False, device=None, dtype=None, *, cast: str = "weight_first",
                 backend: str | None = None, stats_dtype: torch.dtype | None = None,
                 out_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        _check_cast(type(self).__name__, cast)
        size = _last_dim(type(self).__name__, hidden_size)
        if group_size is not None and (type(group_size) is not int or group_size <= 0 or size % group_size):
            raise ValueError(f"GatedRMSNorm group_size must be an int dividing hidden_size {size}; got {group_size!r}")
        if type(norm_before_gate) is not bool:
            raise TypeError(f"GatedRMSNorm norm_before_gate must be a bool, not {type(norm_before_gate).__name__}")
        self.hidden_size, self.eps, self.group_size = size, eps, group_size
        self.norm_before_gate, self.cast = norm_before_gate, cast
        self.weight = _vector(size, 1.0, {"device": device, "dtype": dtype})
        self._init_backend(backend, stats_dtype, out_dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, input: Tensor, gate: Tensor | None = None) -> Tensor:
        options = {"group_size": self.group_size, "norm_before_gate": self.norm_before_gate, **self.call_options()}
        if self.cast == "normalize_first":
            out_dtype = options.pop("out_dtype")
            y = self.weight * gated_rms_norm(input, gate, None, self.eps, **options)
            return y if out_dtype is None else y.to(out_dtype)
        return gated_rms_norm(input, gate, self.weight, self.eps, **options)

    def extra_repr(self) -> str:
        text = f"{self.hidden_size}, eps={self.eps}"
        if self.group_size is not None:
            text += f", group_size={self.group_size}"
        if self.norm_before_gate:
            text += ", norm_before_gate=True"
        if self.cast != "weight_first":
            text += f", cast={self.cast!r}"
        options = super().extra_repr()
        return f"{text}, {options}" if options else text


class QKRMSNorm(BackendMixin, nn.Module):
    """The query and key RMSNorms of an attention layer (Qwen3, Gemma3, OLMo2), both in one call:
    ``forward(q, k) -> (rms_norm(q, q_weight), rms_norm(k, k_weight))`` over the head dim
    (:func:`normkit.functional.qk_rms_norm`).

    Args:
        head_dim: the last dim ``D`` of ``q`` ``(*, Hq, D)`` and ``k`` ``(*, Hk, D)``.
        eps: ``None`` is machine epsilon of the statistics' dtype.
        elementwise_affine: learnable ``q_weight`` and ``k_weight``.
        cast, weight_offset (keyword-only): as :class:`normkit.RMSNorm` (Qwen3:
            ``"normalize_first"``; Gemma3: ``weight_offset=1.0``, weights initialised to 0).
    """

    _init_attributes = {"cast": "weight_first", "weight_offset": 0.0}


    def __init__(self, head_dim: int, eps: float | None = None, elementwise_affine: bool = True, device=None,
                 dtype=None, *, cast: str = "weight_first", weight_offset: float = 0.0, backend: str | None = None,
                 stats_dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        _check_cast(type(self).__name__, cast)
        self.head_dim = _last_dim(type(self).__name__, head_dim)
        self.eps, self.elementwise_affine = eps, elementwise_affine
        self.cast, self.weight_offset = cast, float(weight_offset)
        factory = {"device": device, "dtype": dtype}
        self.q_weight = _vector(self.head_dim, 1.0 - self.weight_offset, factory) if elementwise_affine else None
        self.k_weight = _vector(self.head_dim, 1.0 - self.weight_offset, factory) if elementwise_affine else None
        self._init_backend(backend, stats_dtype, out_dtype)

    def reset_parameters(self) -> None:
        for w in (self.q_weight, self.k_weight):
            if w is not None:
                nn.init.constant_(w, 1.0 - self.weight_offset)

    def _scale(self, w: Tensor | None) -> Tensor | None:
        if w is None or not self.weight_offset:
            return w
        # in float32 for a low-precision weight, as RMSNorm's: 1 + w in bf16 would round a small w
        return (w.float() if w.dtype in (torch.float16, torch.bfloat16) else w) + self.weight_offset

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return qk_norm_forward(self, q, k)

    def extra_repr(self) -> str:
        text = f"{self.head_dim}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        if self.cast != "weight_first":
            text += f", cast={self.cast!r}"
        if self.weight_offset:
            text += f", weight_offset={self.weight_offset}"
        options = super().extra_repr()
        return f"{text}, {options}" if options else text


@module_leaf
def qk_norm_forward(module: QKRMSNorm, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """The forward of :class:`QKRMSNorm`: one ``torch.fx`` leaf, as it reads the weights' dtype
    and the ``cast``/``weight_offset`` options."""
    options = module.call_options()
    if module.cast == "normalize_first" and module.q_weight is not None:
        out_dtype = options.pop("out_dtype")
        q_hat, k_hat = qk_rms_norm(q, k, None, None, module.eps, **options)
        q_out = _scaled(module.q_weight, module.weight_offset, q_hat)
        k_out = _scaled(module.k_weight, module.weight_offset, k_hat)
        return (q_out, k_out) if out_dtype is None else (q_out.to(out_dtype), k_out.to(out_dtype))
    return qk_rms_norm(q, k, module._scale(module.q_weight), module._scale(module.k_weight), module.eps, **options)


class SandwichRMSNorm(BackendMixin, nn.Module):
    """The sandwich-norm step of Gemma 2/3 blocks (:func:`normkit.functional.sandwich_rms_norm`):
    the sublayer's post-norm (``post_weight``), the residual add and the next sublayer's pre-norm
    (``next_weight``) in one call: ``forward(hidden, residual) -> (y, residual_out)``.

    Args:
        hidden_size: the last dim ``D``.
        eps: ``None`` is machine epsilon of the statistics' dtype.
        elementwise_affine: learnable ``post_weight`` and ``next_weight``.
        weight_offset (keyword-only): added to both weights (Gemma: ``1.0``; the weights are then
            initialised to 0, so the initial scale is 1 whatever the offset).
    """

    _init_attributes = {"weight_offset": 0.0}


    def __init__(self, hidden_size: int, eps: float | None = None, elementwise_affine: bool = True, device=None,
                 dtype=None, *, weight_offset: float = 0.0, backend: str | None = None,
                 stats_dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.hidden_size = _last_dim(type(self).__name__, hidden_size)
        self.eps, self.elementwise_affine, self.weight_offset = eps, elementwise_affine, float(weight_offset)
        factory = {"device": device, "dtype": dtype}
        fill = 1.0 - self.weight_offset
        self.post_weight = _vector(self.hidden_size, fill, factory) if elementwise_affine else None
        self.next_weight = _vector(self.hidden_size, fill, factory) if elementwise_affine else None
        self._init_backend(backend, stats_dtype, out_dtype)

    def reset_parameters(self) -> None:
        for w in (self.post_weight, self.next_weight):
            if w is not None:
                nn.init.constant_(w, 1.0 - self.weight_offset)

    def forward(self, hidden: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        # Without affine weights the offset scales nothing: the norm alone.
        offset = self.weight_offset if self.elementwise_affine else 0.0
        return sandwich_rms_norm(hidden, residual, self.post_weight, self.next_weight, self.eps,
                                 weight_offset=offset, **self.call_options())

    def extra_repr(self) -> str:
        text = f"{self.hidden_size}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        if self.weight_offset:
            text += f", weight_offset={self.weight_offset}"
        options = super().extra_repr()
        return f"{text}, {options}" if options else text
