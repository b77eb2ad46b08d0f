"""Normalization-free drop-ins: the reference math and the torch composition of ``dyt`` and
``derf`` (:mod:`normkit.functional_blocks`).

Both are one elementwise squash of an affine map of the input, then the per-feature affine of the
norm they replace; no statistics::

    dyt:   y = weight * tanh(alpha * x) + bias            (Zhu, Chen, He, LeCun & Liu, 2025)
    derf:  y = weight * erf(alpha * x + shift) + bias     (Chen, Lu, Zhu, Sun & Liu, 2025)

``alpha`` and ``shift`` are one learnable number each (one-element tensors of any shape);
``weight`` and ``bias`` have the input's trailing shape (``normalized_shape``) or are None.

The reference (:func:`dyt`, :func:`derf`) is one ``autograd.Function`` for both, with the
backward derived by hand. With ``u = alpha * x + shift``, ``s = squash(u)`` and ``s'`` its
derivative (``1 - s^2`` for tanh, ``2 / sqrt(pi) * exp(-u^2)`` for erf), ``g = dy * weight * s'``::

    dx     = alpha * g
    dalpha = sum(g * x)          dshift = sum(g)        (over every element)
    dweight = sum(dy * s)        dbias  = sum(dy)       (over the leading dims)

and, forward mode, ``dy = weight * s' * (alpha * dx + dalpha * x + dshift) + dweight * s + dbias``.
The backward is written in differentiable torch ops, so it can be differentiated again.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..numerics import acc_dtype
from ..reference import _without_jvp, apply_traced

__all__ = ["COMPOSITION", "REFERENCE", "Squash", "derf", "dyt"]

_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)


def _scalar(t: Tensor, dtype: torch.dtype) -> Tensor:
    """A one-element parameter as a 0-dim tensor of ``dtype``: broadcasting a ``(1, 1)`` alpha
    against a 1-D input would otherwise grow the result's shape."""
    return t.reshape(()).to(dtype)


def _squash(u: Tensor, erf: bool) -> Tensor:
    return torch.erf(u) if erf else torch.tanh(u)


def _squash_grad(u: Tensor, s: Tensor, erf: bool) -> Tensor:
    """``squash'(u)`` given ``s = squash(u)``, in differentiable ops."""
    return _TWO_OVER_SQRT_PI * torch.exp(-u.square()) if erf else 1 - s.square()


def _pre_activation(x: Tensor, alpha: Tensor, shift: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(x, alpha, u = alpha * x + shift)`` at the working precision of ``x``."""
    acc = acc_dtype(x.dtype)
    xa, a = x.to(acc), _scalar(alpha, acc)
    u = a * xa
    if shift is not None:
        u = u + _scalar(shift, acc)
    return xa, a, u


def _affine(y: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    if weight is not None:
        y = y * weight.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


class Squash(torch.autograd.Function):
    """``y = weight * squash(alpha * x + shift) + bias``, squash ``erf`` (``erf=True``) or
    ``tanh``, with the hand-derived backward and forward-mode derivative of the module
    docstring. Computed in float32 (float64 for float64 input), rounded once to ``x``'s dtype;
    the parameter gradients are summed in float64 and returned in each parameter's dtype."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, alpha: Tensor, shift: Tensor | None, weight: Tensor | None,  # type: ignore[override]
                bias: Tensor | None, erf: bool) -> Tensor:
        _, _, u = _pre_activation(x, alpha, shift)
        return _affine(_squash(u, erf), weight, bias).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        x, alpha, shift, weight, bias, erf = inputs
        ctx.save_for_backward(x, alpha, shift, weight)
        ctx.save_for_forward(x, alpha, shift, weight)
        ctx.erf = erf
        ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)

    @staticmethod
    def jvp(ctx, dx: Tensor | None, dalpha: Tensor | None, dshift: Tensor | None,  # type: ignore[override]
            dweight: Tensor | None, dbias: Tensor | None, _derf: None) -> Tensor:
        x, alpha, shift, weight = ctx.saved_tensors
        xa, a, u = _pre_activation(x, alpha, shift)
        s = _squash(u, ctx.erf)
        ds = _squash_grad(u, s, ctx.erf)
        du = torch.zeros_like(u)
        if dx is not None:
            du = du + a * dx.to(u.dtype)
        if dalpha is not None:
            du = du + _scalar(dalpha, u.dtype) * xa
        if dshift is not None:
            du = du + _scalar(dshift, u.dtype)
        dy = du * ds if weight is None else du * ds * weight.to(u.dtype)
        if dweight is not None:
            dy = dy + dweight.to(u.dtype) * s
        if dbias is not None:
            dy = dy + dbias.to(u.dtype)
        return dy.to(x.dtype)

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        x, alpha, shift, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        xa, a, u = _pre_activation(x, alpha, shift)
        s = _squash(u, ctx.erf)
        ds = _squash_grad(u, s, ctx.erf)
        dya = dy.to(u.dtype)
        g = (dya if weight is None else dya * weight.to(u.dtype)) * ds  # the gradient at u
        dx = (g * a).to(x.dtype) if need[0] else None
        # Every parameter gradient is one sum over the input: taken in float64.
        dalpha = (g * xa).double().sum().reshape(alpha.shape).to(alpha.dtype) if need[1] else None
        dshift = g.double().sum().reshape(shift.shape).to(shift.dtype) if shift is not None and need[2] else None
        dweight = (dya * s).double().sum_to_size(weight.shape).to(weight.dtype) if weight is not None and need[3] \
            else None
        dbias = None
        if ctx.bias_meta is not None and need[4]:
            shape, dtype = ctx.bias_meta
            dbias = dya.double().sum_to_size(shape).to(dtype)
        return dx, dalpha, dshift, dweight, dbias, None


_SquashTraced = _without_jvp(Squash)


def _apply(*args: Any) -> Tensor:
    """:class:`Squash` (under torch.compile its twin without jvp: dynamo cannot trace one)."""
    return apply_traced(Squash, _SquashTraced, *args)


def dyt(input: Tensor, alpha: Tensor, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """``weight * tanh(alpha * x) + bias`` (:class:`Squash`)."""
    return _apply(input, alpha, None, weight, bias, False)


def derf(input: Tensor, alpha: Tensor, shift: Tensor, weight: Tensor | None = None,
         bias: Tensor | None = None) -> Tensor:
    """``weight * erf(alpha * x + shift) + bias`` (:class:`Squash`)."""
    return _apply(input, alpha, shift, weight, bias, True)


def _torch_dyt(input: Tensor, alpha: Tensor, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """DyT as its authors' module writes it (``tanh(alpha * x) * weight + bias``), in float32."""
    acc = acc_dtype(input.dtype)
    return _affine(torch.tanh(_scalar(alpha, acc) * input.to(acc)), weight, bias).to(input.dtype)


def _torch_derf(input: Tensor, alpha: Tensor, shift: Tensor, weight: Tensor | None = None,
                bias: Tensor | None = None) -> Tensor:
    """Derf as its authors' module writes it (``erf(alpha * x + shift) * weight + bias``), in float32."""
    acc = acc_dtype(input.dtype)
    u = _scalar(alpha, acc) * input.to(acc) + _scalar(shift, acc)
    return _affine(torch.erf(u), weight, bias).to(input.dtype)


REFERENCE: dict[str, Callable[..., Any]] = {"dyt": dyt, "derf": derf}
COMPOSITION: dict[str, Callable[..., Any]] = {"dyt": _torch_dyt, "derf": _torch_derf}
