"""Modulated (adaLN) norms of DiT, SD3 and Flux blocks: the reference and the torch composition.

Over the last dim, with ``z`` the plain norm's output::

    z = x_hat * weight + bias        (layer_norm; rms_norm: x_hat not centred, no bias)
    y = z * (1 + scale) + shift      (shift, scale broadcast against x)

Backward, derived by hand (``sum_b`` sums over the axes ``shift``/``scale`` were broadcast
along, ``mean`` is over the row)::

    dshift  = sum_b(dy)
    dscale  = sum_b(dy * z)
    dz      = dy * (1 + scale)
    dweight = sum(dz * x_hat),  dbias = sum(dz)
    g       = dz * weight
    dx      = rstd * (g - mean(g) - x_hat * mean(g * x_hat))   (rms_norm: without mean(g))

Forward mode, with ``dx, dshift, dscale, dw, db`` the tangents::

    dx_hat = rstd * (dx - mean(dx) - x_hat * mean(dx * x_hat))   (rms_norm: without mean(dx))
    dy     = (dx_hat * weight + x_hat * dw + db) * (1 + scale) + z * dscale + dshift

Numerics (both): the statistics, the normalization and the modulation in float32 (float64 for
float64 input), whatever the dtypes of ``shift``/``scale``/``weight``; the result rounded once to
the input's dtype. The reference sums the broadcast gradients in float64, as
:mod:`normkit.reference` sums its parameter gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..numerics import acc_dtype, rms_eps
from ..reference import _without_jvp, _x_hat, apply_traced

__all__ = ["COMPOSITION", "REFERENCE", "ModulatedNormalize", "modulated_layer_norm", "modulated_rms_norm"]

_LAST = (-1,)


def _to(p: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if p is None else p.to(dtype)


def _affine(x_hat: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """``z = x_hat * weight + bias`` in ``x_hat``'s dtype (either parameter may be None)."""
    z = x_hat if weight is None else x_hat * weight.to(x_hat.dtype)
    return z if bias is None else z + bias.to(x_hat.dtype)


def _summed(t: Tensor, like: Tensor) -> Tensor:
    """``t`` summed over the axes ``like`` was broadcast along, in float64, in ``like``'s dtype."""
    return t.double().sum_to_size(like.shape).to(like.dtype)


class ModulatedNormalize(torch.autograd.Function):
    """``y = (x_hat * weight + bias) * (1 + scale) + shift`` over the last dim (module
    docstring), with a hand-derived backward and forward-mode derivative; ``center=False`` is
    the RMS form. The backward recomputes ``x_hat`` with differentiable ops, so it is itself
    differentiable (``gradgradcheck``); ``vmap`` by the generated rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        x: Tensor,
        shift: Tensor,
        scale: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        center: bool,
    ) -> Tensor:
        acc = acc_dtype(x.dtype)
        x_hat, _ = _x_hat(x.to(acc), _LAST, eps, center, None, None)
        z = _affine(x_hat, weight, bias)
        return (z * (1 + scale.to(acc)) + shift.to(acc)).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        x, shift, scale, weight, bias, eps, center = inputs
        ctx.save_for_backward(x, shift, scale, weight, bias)
        ctx.save_for_forward(x, shift, scale, weight, bias)
        ctx.eps, ctx.center = eps, center

    @staticmethod
    def jvp(ctx, dx: Tensor | None, dshift: Tensor | None, dscale: Tensor | None,  # type: ignore[override]
            dweight: Tensor | None, dbias: Tensor | None, *_) -> Tensor:
        x, _, scale, weight, bias = ctx.saved_tensors
        acc = acc_dtype(x.dtype)
        x_hat, rstd = _x_hat(x.to(acc), _LAST, ctx.eps, ctx.center, None, None)
        dz = torch.zeros_like(x_hat)
        if dx is not None:
            dxa = dx.to(acc)
            dx_hat = dxa - x_hat * (dxa * x_hat).mean(-1, keepdim=True)
            if ctx.center:
                dx_hat = dx_hat - dxa.mean(-1, keepdim=True)
            dz = dz + _affine(rstd * dx_hat, weight, None)
        if dweight is not None:
            dz = dz + x_hat * dweight.to(acc)
        if dbias is not None:
            dz = dz + dbias.to(acc)
        dy = dz * (1 + scale.to(acc))
        if dscale is not None:
            dy = dy + _affine(x_hat, weight, bias) * dscale.to(acc)
        if dshift is not None:
            dy = dy + dshift.to(acc)
        return dy.to(x.dtype)

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        x, shift, scale, weight, bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        acc = acc_dtype(x.dtype)
        dy = dy.to(acc)
        x_hat, rstd = _x_hat(x.to(acc), _LAST, ctx.eps, ctx.center, None, None)
        dz = dy * (1 + scale.to(acc))
        dx = dshift = dscale = dweight = dbias = None
        if need[0]:
            g = _affine(dz, weight, None)
            dx = g - x_hat * (g * x_hat).mean(-1, keepdim=True)
            if ctx.center:
                dx = dx - g.mean(-1, keepdim=True)
            dx = (rstd * dx).to(x.dtype)
        if need[1]:
            dshift = _summed(dy, shift)
        if need[2]:
            dscale = _summed(dy * _affine(x_hat, weight, bias), scale)
        if weight is not None and need[3]:
            dweight = _summed(dz * x_hat, weight)
        if bias is not None and need[4]:
            dbias = _summed(dz, bias)
        return dx, dshift, dscale, dweight, dbias, None, None


_ModulatedNormalizeTraced = _without_jvp(ModulatedNormalize)


def _apply(*args: object) -> Tensor:
    """:class:`ModulatedNormalize` (under torch.compile its twin without jvp)."""
    return apply_traced(ModulatedNormalize, _ModulatedNormalizeTraced, *args)


def modulated_layer_norm(input: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None = None,
                         bias: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """``layer_norm(input, weight, bias, eps) * (1 + scale) + shift`` over the last dim."""
    return _apply(input, shift, scale, weight, bias, eps, True)


def modulated_rms_norm(input: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None = None,
                       eps: float | None = None) -> Tensor:
    """``rms_norm(input, weight, eps) * (1 + scale) + shift`` over the last dim; ``eps=None`` is
    machine epsilon of the statistics' dtype."""
    return _apply(input, shift, scale, weight, None, rms_eps(eps, input.dtype), False)


def _composed_layer_norm(input: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None = None,
                         bias: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """What diffusers writes (``AdaLayerNorm``), with the norm and the modulation in float32."""
    acc = acc_dtype(input.dtype)
    z = F.layer_norm(input.to(acc), (input.shape[-1],), _to(weight, acc), _to(bias, acc), eps)
    return (z * (1 + scale.to(acc)) + shift.to(acc)).to(input.dtype)


def _composed_rms_norm(input: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None = None,
                       eps: float | None = None) -> Tensor:
    """:func:`_composed_layer_norm` with ``torch.nn.functional.rms_norm``."""
    acc = acc_dtype(input.dtype)
    z = F.rms_norm(input.to(acc), (input.shape[-1],), _to(weight, acc), rms_eps(eps, input.dtype))
    return (z * (1 + scale.to(acc)) + shift.to(acc)).to(input.dtype)


REFERENCE: dict[str, Callable[..., Any]] = {
    "modulated_layer_norm": modulated_layer_norm,
    "modulated_rms_norm": modulated_rms_norm,
}
COMPOSITION: dict[str, Callable[..., Any]] = {
    "modulated_layer_norm": _composed_layer_norm,
    "modulated_rms_norm": _composed_rms_norm,
}
