"""Gated, grouped RMSNorm (Mamba2, Bamba, Falcon-H1): the reference and the torch composition.

With ``a = silu(gate)`` and each row's last dim cut into groups of ``group_size`` channels::

    u     = x * a          (norm_before_gate=False, Mamba2's)    u = x    (True, or no gate)
    rstd  = 1 / sqrt(mean(u^2) + eps)                            (per group)
    u_hat = u * rstd
    y     = u_hat * w      (False, or no gate)                   y = u_hat * w * a    (True)

Backward, derived by hand, with ``g = dy * w`` the gradient at ``u_hat * a`` (True) or
``u_hat`` (otherwise), ``gh = g * a`` (True) or ``g``, the means over each group::

    du     = rstd * (gh - u_hat * mean(gh * u_hat))
    dx     = du * a                          (False)             dx = du    (True, no gate)
    dgate  = du * x * silu'(gate)            (False)             dgate = g * u_hat * silu'(gate)   (True)
    dw     = sum(dy * u_hat)                 (False, no gate)    dw = sum(dy * u_hat * a)          (True)

with ``silu'(z) = s * (1 + z * (1 - s))``, ``s = sigmoid(z)``. Forward mode, with ``dx, dz, dw``
the tangents of ``x, gate, weight``::

    du_t   = dx * a + x * silu'(gate) * dz   (False)             du_t = dx  (True, no gate)
    du_hat = rstd * (du_t - u_hat * mean(u_hat * du_t))
    dy     = du_hat * w + u_hat * dw         (False, no gate)
    dy     = (du_hat * w + u_hat * dw) * a + u_hat * w * silu'(gate) * dz                    (True)

Numerics: the gate, the statistics and the normalization in float32 (float64 for float64
input), as HF's ``MambaRMSNormGated`` computes them (``x.float() * silu(gate.float())``); the
result rounded once to the input's dtype (HF rounds the normalized value, then multiplies by
the weight: Falcon-H1 and mamba_ssm's reference round once, as here). The reference's weight
gradient is summed in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..numerics import acc_dtype
from ..reference import _moments, _without_jvp, apply_traced

__all__ = ["COMPOSITION", "REFERENCE", "GatedRMSNormalize", "gated_rms_norm", "gated_rms_norm_composed"]


def _grouped(t: Tensor, group_size: int) -> Tensor:
    """``(*, D)`` viewed as ``(*, D / group_size, group_size)`` (one group of 0 for ``D = 0``)."""
    d = t.shape[-1]
    return t.reshape(*t.shape[:-1], d // group_size if group_size else 1, group_size)


def _silu_grad(z: Tensor) -> Tensor:
    """``d silu(z) / dz = s * (1 + z * (1 - s))`` with ``s = sigmoid(z)``."""
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


class _Terms(NamedTuple):
    """The forward's quantities at the accumulation dtype, in the grouped view."""

    x: Tensor
    z: Tensor | None  # the gate
    a: Tensor | None  # silu(gate)
    u_hat: Tensor
    rstd: Tensor
    w: Tensor | None


def _terms(x: Tensor, gate: Tensor | None, weight: Tensor | None, eps: float, group_size: int,
           norm_before_gate: bool) -> _Terms:
    """The forward's quantities, recomputed from the saved inputs with differentiable ops (the
    backward and the jvp are themselves differentiable)."""
    acc = acc_dtype(x.dtype)
    xa = _grouped(x.to(acc), group_size)
    z = None if gate is None else _grouped(gate.to(acc), group_size)
    a = None if z is None else z * torch.sigmoid(z)
    u = xa * a if a is not None and not norm_before_gate else xa
    u_hat, rstd, _ = _moments(u, (-1,), eps)
    w = None if weight is None else _grouped(weight.to(acc), group_size)
    return _Terms(xa, z, a, u_hat, rstd, w)


class GatedRMSNormalize(torch.autograd.Function):
    """``gated_rms_norm`` with the hand-derived backward and forward-mode derivative of the
    module docstring. ``forward(x, gate, weight, eps, group_size, norm_before_gate)``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, gate: Tensor | None, weight: Tensor | None, eps: float,  # type: ignore[override]
                group_size: int, norm_before_gate: bool) -> Tensor:
        t = _terms(x, gate, weight, eps, group_size, norm_before_gate)
        y = t.u_hat if t.w is None else t.u_hat * t.w
        if t.a is not None and norm_before_gate:
            y = y * t.a
        return y.reshape(x.shape).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        x, gate, weight, eps, group_size, norm_before_gate = inputs
        ctx.save_for_backward(x, gate, weight)
        ctx.save_for_forward(x, gate, weight)
        ctx.params = (eps, group_size, norm_before_gate)

    @staticmethod
    def jvp(ctx, dx: Tensor | None, dgate: Tensor | None, dweight: Tensor | None,  # type: ignore[override]
            *_) -> Tensor:
        x, gate, weight = ctx.saved_tensors
        eps, group_size, norm_before_gate = ctx.params
        t = _terms(x, gate, weight, eps, group_size, norm_before_gate)
        acc = t.x.dtype
        gated_after = t.a is not None and norm_before_gate
        du_t = torch.zeros_like(t.u_hat)
        if dx is not None:
            dxa = _grouped(dx.to(acc), group_size)
            du_t = du_t + (dxa if t.a is None or norm_before_gate else dxa * t.a)
        if dgate is not None and t.a is not None and not norm_before_gate:
            du_t = du_t + t.x * _silu_grad(t.z) * _grouped(dgate.to(acc), group_size)
        du_hat = t.rstd * (du_t - t.u_hat * (t.u_hat * du_t).mean(-1, keepdim=True))
        dy = du_hat if t.w is None else du_hat * t.w
        if dweight is not None:
            dy = dy + t.u_hat * _grouped(dweight.to(acc), group_size)
        if gated_after:
            dy = dy * t.a
            if dgate is not None:
                n_out = t.u_hat if t.w is None else t.u_hat * t.w
                dy = dy + n_out * _silu_grad(t.z) * _grouped(dgate.to(acc), group_size)
        return dy.reshape(x.shape).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        x, gate, weight = ctx.saved_tensors
        eps, group_size, norm_before_gate = ctx.params
        t = _terms(x, gate, weight, eps, group_size, norm_before_gate)
        dya = _grouped(dy.to(t.x.dtype), group_size)
        gated_after = t.a is not None and norm_before_gate
        g = dya if t.w is None else dya * t.w
        gh = g * t.a if gated_after else g
        du = t.rstd * (gh - t.u_hat * (gh * t.u_hat).mean(-1, keepdim=True))
        dx = dgate = dweight = None
        if ctx.needs_input_grad[0]:
            dx = (du if t.a is None or norm_before_gate else du * t.a).reshape(x.shape).to(x.dtype)
        if gate is not None and ctx.needs_input_grad[1]:
            da = g * t.u_hat if norm_before_gate else du * t.x
            dgate = (da * _silu_grad(t.z)).reshape(gate.shape).to(gate.dtype)
        if weight is not None and ctx.needs_input_grad[2]:
            # one sum over every row (batch x sequence): float64, as the reference's other norms
            dw = dya * t.u_hat * t.a if gated_after else dya * t.u_hat
            dweight = dw.double().reshape(x.shape).sum_to_size(weight.shape).to(weight.dtype)
        return dx, dgate, dweight, None, None, None


_GatedRMSNormalizeTraced = _without_jvp(GatedRMSNormalize)


def gated_rms_norm(input: Tensor, gate: Tensor | None, weight: Tensor | None, eps: float, group_size: int,
                   norm_before_gate: bool) -> Tensor:
    """The reference: :class:`GatedRMSNormalize` (its twin without jvp under torch.compile)."""
    return apply_traced(GatedRMSNormalize, _GatedRMSNormalizeTraced, input, gate, weight, eps, group_size,
                        norm_before_gate)


def gated_rms_norm_composed(input: Tensor, gate: Tensor | None, weight: Tensor | None, eps: float,
                            group_size: int, norm_before_gate: bool) -> Tensor:
    """The composition users write today (HF's ``MambaRMSNormGated``, Falcon-H1's
    ``norm_before_gate``), at float32 (float64 for float64 input), rounded once."""
    acc = acc_dtype(input.dtype)
    hidden = input.to(acc)
    if gate is not None and not norm_before_gate:
        hidden = hidden * torch.nn.functional.silu(gate.to(acc))
    groups = _grouped(hidden, group_size)
    variance = groups.pow(2).mean(-1, keepdim=True)
    hidden = (groups * torch.rsqrt(variance + eps)).reshape(input.shape)
    if weight is not None:
        hidden = hidden * weight.to(acc)
    if gate is not None and norm_before_gate:
        hidden = hidden * torch.nn.functional.silu(gate.to(acc))
    return hidden.to(input.dtype)


REFERENCE: dict[str, Callable[..., Any]] = {"gated_rms_norm": gated_rms_norm}
COMPOSITION: dict[str, Callable[..., Any]] = {"gated_rms_norm": gated_rms_norm_composed}
