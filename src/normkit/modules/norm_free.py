"""Modules for the normalization-free drop-ins :func:`normkit.functional.dyt` and
:func:`normkit.functional.derf`. torch.nn has neither, so each is an ``nn.Module`` with normkit's
keyword-only ``backend``/``stats_dtype``/``out_dtype``. The parameters are named and shaped as in
the authors' modules (``alpha`` and ``shift`` of shape ``(1,)``, ``weight``, ``bias``), so their
checkpoints load here and back. To swap a built model's LayerNorm/RMSNorm for them, see
:func:`normkit.surgery_norm_free.replace_norms`."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..functional_blocks import derf, dyt
from ._base import BackendMixin

__all__ = ["Derf", "DyT"]

# Leaves for torch.fx symbolic tracing: their argument checks read shapes, which a Proxy cannot.
for _name in ("derf", "dyt"):
    torch.fx.wrap(_name)


class _PointwiseNorm(BackendMixin, nn.Module):
    """What DyT and Derf share: ``normalized_shape``, the learnable ``alpha`` (and Derf's
    ``shift``, with ``shift_init`` set) and the affine, registered in the authors' order."""

    def __init__(self, normalized_shape: int | Sequence[int], alpha_init: float, shift_init: float | None,
                 elementwise_affine: bool, bias: bool, factory: dict, backend: str | None,
                 stats_dtype: torch.dtype | None, out_dtype: torch.dtype | None) -> None:
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, numbers.Integral) else tuple(normalized_shape)
        self.normalized_shape: tuple[int, ...] = tuple(int(n) for n in shape)
        self.alpha_init = float(alpha_init)
        self.elementwise_affine = elementwise_affine
        self.alpha = nn.Parameter(torch.empty(1, **factory))
        if shift_init is not None:
            self.shift_init = float(shift_init)
            self.shift = nn.Parameter(torch.empty(1, **factory))
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, **factory))
            self.bias = nn.Parameter(torch.empty(self.normalized_shape, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self._init_backend(backend, stats_dtype, out_dtype)

    def reset_parameters(self) -> None:
        """``alpha = alpha_init``, ``weight = 1``, ``bias = 0`` (the papers' initialisation)."""
        with torch.no_grad():
            self.alpha.fill_(self.alpha_init)
            if self.weight is not None:
                self.weight.fill_(1.0)
            if self.bias is not None:
                self.bias.zero_()

    def _repr_head(self) -> str:
        return f"{self.normalized_shape}, alpha_init={self.alpha_init}"

    def extra_repr(self) -> str:
        head = f"{self._repr_head()}, elementwise_affine={self.elementwise_affine}"
        if self.elementwise_affine and self.bias is None:
            head += ", bias=False"
        return ", ".join(filter(None, [head, BackendMixin.extra_repr(self)]))


class DyT(_PointwiseNorm):
    """Dynamic Tanh (Zhu, Chen, He, LeCun & Liu, 2025, "Transformers without Normalization",
    arXiv 2503.10622): ``y = weight * tanh(alpha * x) + bias``, elementwise, a drop-in for a
    LayerNorm/RMSNorm over ``normalized_shape`` that computes no statistics.

    torch.nn has no twin, so this is a plain ``nn.Module``; its oracle is
    :mod:`normkit.reference` in float64.

    Args:
        normalized_shape: the input's trailing shape (an int for the last dim), that of
            ``weight`` and ``bias``.
        alpha_init: the initial ``alpha``. ``0.5`` is the paper's default (its
            ``alpha_init_value``, used for ViT, ConvNeXt, DiT, wav2vec 2.0, ...). The paper tunes
            it for LLMs, by width and by position: LLaMA2 7B ``0.8`` before attention and ``0.2``
            before the FFN and the final norm; 13B ``0.6``/``0.15``; 34B and 70B ``0.2``/``0.05``
            (the DyT repository's LLaMA README); its analysis finds smaller values suit wider
            models.
        elementwise_affine: learnable ``weight`` (initialised to ones) and ``bias`` (zeros), as
            the paper's module; False: ``y = tanh(alpha * x)``.
        bias: whether the affine has a bias (False: ``weight * tanh(alpha * x)``, the paper's
            LLaMA form).
        device, dtype: of the parameters.
        backend, stats_dtype, out_dtype: keyword-only, as every normkit module.

    Shape: input ``(*, *normalized_shape)``, output the same.

    Numerics: computed in float32 (float64 for float64 input), the output rounded once to the
    input's dtype; the gradients of ``alpha``, ``weight`` and ``bias`` are sums over the input,
    accumulated in float32 (in a fixed order on the triton backend: bit-reproducible).
    ``alpha`` has shape ``(1,)`` as in the paper's code, so its checkpoints load.
    """

    def __init__(self, normalized_shape: int | Sequence[int], alpha_init: float = 0.5,
                 elementwise_affine: bool = True, bias: bool = True, device=None, dtype=None, *,
                 backend: str | None = None, stats_dtype: torch.dtype | None = None,
                 out_dtype: torch.dtype | None = None) -> None:
        super().__init__(normalized_shape, alpha_init, None, elementwise_affine, bias,
                         {"device": device, "dtype": dtype}, backend, stats_dtype, out_dtype)
        self.reset_parameters()

    def forward(self, input: Tensor) -> Tensor:
        return dyt(input, self.alpha, self.weight, self.bias, **self.call_options())


class Derf(_PointwiseNorm):
    """Dynamic erf (Chen, Lu, Zhu, Sun & Liu, 2025, "Stronger Normalization-Free Transformers",
    arXiv 2512.10938): ``y = weight * erf(alpha * x + shift) + bias``, elementwise, a drop-in for
    a LayerNorm/RMSNorm over ``normalized_shape`` that computes no statistics.

    torch.nn has no twin, so this is a plain ``nn.Module``; its oracle is
    :mod:`normkit.reference` in float64.

    Args:
        normalized_shape: the input's trailing shape (an int for the last dim), that of
            ``weight`` and ``bias``.
        alpha_init: the initial ``alpha``: ``0.5``, the authors' default (``alpha_init_value``
            of their ``Dynamic_erf``, ViT/DiT/LM code); their GPT-2 runs set it per position
            (attention, FFN, final norm), as DyT's LLaMA runs do.
        shift_init: the initial ``shift``: ``0.0``, the authors' default (``shift_init_value``).
        elementwise_affine: learnable ``weight`` (ones) and ``bias`` (zeros), as the authors'
            module; False: ``y = erf(alpha * x + shift)``.
        bias: whether the affine has a bias.
        device, dtype: of the parameters.
        backend, stats_dtype, out_dtype: keyword-only, as every normkit module.

    Shape: input ``(*, *normalized_shape)``, output the same.

    Numerics as :class:`DyT`; the gradient of ``shift`` is a float32 sum over the input too.
    ``alpha`` and ``shift`` have shape ``(1,)`` as in the authors' code, so its checkpoints load.
    """

    def __init__(self, normalized_shape: int | Sequence[int], alpha_init: float = 0.5, shift_init: float = 0.0,
                 elementwise_affine: bool = True, bias: bool = True, device=None, dtype=None, *,
                 backend: str | None = None, stats_dtype: torch.dtype | None = None,
                 out_dtype: torch.dtype | None = None) -> None:
        super().__init__(normalized_shape, alpha_init, shift_init, elementwise_affine, bias,
                         {"device": device, "dtype": dtype}, backend, stats_dtype, out_dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As :meth:`DyT.reset_parameters`, and ``shift = shift_init``."""
        super().reset_parameters()
        with torch.no_grad():
            self.shift.fill_(self.shift_init)

    def _repr_head(self) -> str:
        return f"{super()._repr_head()}, shift_init={self.shift_init}"

    def forward(self, input: Tensor) -> Tensor:
        return derf(input, self.alpha, self.shift, self.weight, self.bias, **self.call_options())
