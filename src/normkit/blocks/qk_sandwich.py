"""The reference math and the torch compositions of ``qk_rms_norm`` and ``sandwich_rms_norm``.

QK-norm is two independent RMS norms over the last (head) dim, so its reference is
:func:`normkit.reference.rms_norm`'s :class:`~normkit.reference.Normalize` run on ``q`` and on
``k``. The sandwich step of a Gemma 2/3 block is a chain, with ``w1 = post_weight + offset``,
``w2 = next_weight + offset`` and ``rms(x) = x * rsqrt(mean(x^2) + eps)`` over the last dim::

    h1    = rms(hidden) * w1            (rounded to hidden's dtype, as Gemma3RMSNorm does)
    r     = residual + h1               (residual_out, rounded to residual's dtype)
    y     = rms(r) * w2                 (rounded to hidden's dtype)

Its backward, derived by hand (``x_hat1 = rms(hidden)``, ``x_hat2 = rms(r)``, ``rstd`` their
scales, ``mean`` over the last dim, the roundings passing gradients through)::

    g2      = dy * w2
    dr      = dr_out + rstd2 * (g2 - x_hat2 * mean(g2 * x_hat2))     = d residual
    g1      = dr * w1
    dhidden = rstd1 * (g1 - x_hat1 * mean(g1 * x_hat1))
    dw1     = sum(dr * x_hat1),  dw2 = sum(dy * x_hat2)              (over every row)

and its forward-mode derivative, with tangents ``dh, dres, dw1, dw2``::

    dr = dres + rstd1 * (dh - x_hat1 * mean(dh * x_hat1)) * w1 + x_hat1 * dw1
    dy = rstd2 * (dr - x_hat2 * mean(dr * x_hat2)) * w2 + x_hat2 * dw2

A weight of None is no scale at all (1), whatever ``weight_offset``.

Numerics: statistics and arithmetic in float32 (float64 when an input is float64), the weight
offset added in that dtype (``1.0 + weight.float()``, Gemma's), each result rounded once to its
dtype; ``dr`` stays unrounded on its way into the first norm's backward. The parameter
gradients are summed in float64, as :mod:`normkit.reference` does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from .. import reference
from ..numerics import acc_dtype, rms_eps

__all__ = ["COMPOSITION", "REFERENCE", "SandwichRMSNormalize", "qk_rms_norm", "sandwich_rms_norm"]


def qk_rms_norm(q: Tensor, k: Tensor, q_weight: Tensor | None, k_weight: Tensor | None,
                eps: float | None = None) -> tuple[Tensor, Tensor]:
    """``(rms_norm(q, q_weight), rms_norm(k, k_weight))`` over the last dim, each through
    :class:`normkit.reference.Normalize` (its hand-derived backward and jvp)."""
    eps = rms_eps(eps, q.dtype)
    return (reference.rms_norm(q, q.shape[-1:], q_weight, eps),
            reference.rms_norm(k, k.shape[-1:], k_weight, eps))


def _acc(*tensors: Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32: the sandwich's two norms share one
    precision, the higher of hidden's and residual's (a float64 residual stream is normalized in
    float64 either way)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _rms(xa: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(x_hat, rstd)`` over the last dim (the reference's guarded moments: no overflow of the
    squares, ``rstd = 0`` where ``mean(x^2) + eps == 0``)."""
    x_hat, rstd, _ = reference._moments(xa, (-1,), eps)
    return x_hat, rstd


def _scale(w: Tensor | None, offset: float, acc: torch.dtype) -> Tensor | None:
    """The effective weight ``w + offset`` in the accumulation dtype; None stays None (1)."""
    return None if w is None else w.to(acc) + offset


def _times(t: Tensor, w: Tensor | None) -> Tensor:
    return t if w is None else t * w


def _rms_backward(g: Tensor, x_hat: Tensor, rstd: Tensor) -> Tensor:
    """The input gradient of ``x_hat`` for an upstream ``g`` (already times the weight)."""
    return rstd * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))


class SandwichRMSNormalize(torch.autograd.Function):
    """``(y, residual_out)`` of the sandwich step, with the hand-derived backward and
    forward-mode derivative of the module docstring. The backward recomputes everything from
    the saved inputs with differentiable ops, so it can itself be differentiated."""

    generate_vmap_rule = True

    @staticmethod
    def forward(hidden: Tensor, residual: Tensor, post_weight: Tensor | None,  # type: ignore[override]
                next_weight: Tensor | None, eps: float, offset: float) -> tuple[Tensor, Tensor]:
        _, _, _, _, y, r = _sandwich_forward(hidden, residual, post_weight, next_weight, eps, offset)
        return y, r

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        hidden, residual, post_weight, next_weight, eps, offset = inputs
        ctx.save_for_backward(hidden, residual, post_weight, next_weight)
        ctx.save_for_forward(hidden, residual, post_weight, next_weight)
        ctx.eps, ctx.offset = eps, offset

    @staticmethod
    def backward(ctx, dy: Tensor, dr_out: Tensor):  # type: ignore[override]
        hidden, residual, post_weight, next_weight = ctx.saved_tensors
        acc, x_hat1, rstd1, x_hat2, rstd2, w1, w2 = _recompute(ctx)
        dya = dy.to(acc)
        dr = dr_out.to(acc) + _rms_backward(_times(dya, w2), x_hat2, rstd2)
        need = ctx.needs_input_grad
        dhidden = _rms_backward(_times(dr, w1), x_hat1, rstd1).to(hidden.dtype) if need[0] else None
        dresidual = dr.to(residual.dtype) if need[1] else None
        dw1 = dw2 = None
        if post_weight is not None and need[2]:
            dw1 = (dr * x_hat1).double().sum_to_size(post_weight.shape).to(post_weight.dtype)
        if next_weight is not None and need[3]:
            dw2 = (dya * x_hat2).double().sum_to_size(next_weight.shape).to(next_weight.dtype)
        return dhidden, dresidual, dw1, dw2, None, None

    @staticmethod
    def jvp(ctx, dh: Tensor | None, dres: Tensor | None, dw1: Tensor | None,  # type: ignore[override]
            dw2: Tensor | None, *_):
        hidden, residual, post_weight, next_weight = ctx.saved_tensors
        acc, x_hat1, rstd1, x_hat2, rstd2, w1, w2 = _recompute(ctx)
        dr = torch.zeros_like(x_hat1)
        if dres is not None:
            dr = dr + dres.to(acc)
        if dh is not None:
            dha = dh.to(acc)
            dr = dr + _times(rstd1 * (dha - x_hat1 * (dha * x_hat1).mean(-1, keepdim=True)), w1)
        if dw1 is not None:
            dr = dr + x_hat1 * dw1.to(acc)
        dy = _times(rstd2 * (dr - x_hat2 * (dr * x_hat2).mean(-1, keepdim=True)), w2)
        if dw2 is not None:
            dy = dy + x_hat2 * dw2.to(acc)
        return dy.to(hidden.dtype), dr.to(residual.dtype)


def _recompute(ctx) -> tuple[torch.dtype, Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """``(acc, x_hat1, rstd1, x_hat2, rstd2, w1, w2)`` from the saved inputs, differentiably."""
    hidden, residual, post_weight, next_weight = ctx.saved_tensors
    acc = _acc(hidden, residual)
    x_hat1, rstd1, x_hat2, rstd2, _, _ = _sandwich_forward(hidden, residual, post_weight, next_weight,
                                                           ctx.eps, ctx.offset)
    return acc, x_hat1, rstd1, x_hat2, rstd2, _scale(post_weight, ctx.offset, acc), _scale(next_weight, ctx.offset, acc)


def _sandwich_forward(hidden: Tensor, residual: Tensor, post_weight: Tensor | None,
                      next_weight: Tensor | None, eps: float, offset: float):
    """``(x_hat1, rstd1, x_hat2, rstd2, y, residual_out)`` with differentiable ops."""
    acc = _acc(hidden, residual)
    x_hat1, rstd1 = _rms(hidden.to(acc), eps)
    h1 = _times(x_hat1, _scale(post_weight, offset, acc)).to(hidden.dtype)
    r = (residual.to(acc) + h1.to(acc)).to(residual.dtype)
    x_hat2, rstd2 = _rms(r.to(acc), eps)
    y = _times(x_hat2, _scale(next_weight, offset, acc)).to(hidden.dtype)
    return x_hat1, rstd1, x_hat2, rstd2, y, r


_SandwichTraced = reference._without_jvp(SandwichRMSNormalize)


def sandwich_rms_norm(hidden: Tensor, residual: Tensor, post_weight: Tensor | None, next_weight: Tensor | None,
                      eps: float | None = None, weight_offset: float = 0.0) -> tuple[Tensor, Tensor]:
    """``(y, residual_out)`` through :class:`SandwichRMSNormalize` (its twin without jvp under
    torch.compile)."""
    y, r = reference.apply_traced(SandwichRMSNormalize, _SandwichTraced, hidden, residual, post_weight, next_weight,
                                  rms_eps(eps, hidden.dtype), float(weight_offset))
    # One Function computes both: residual_out, which next_weight does not reach, is detached
    # when nothing it depends on is differentiated (no grad, no forward-mode tangent).
    if not any(_tracked(t) for t in (hidden, residual, post_weight)):
        r = r.detach()
    return y, r


def _tracked(t: Tensor | None) -> bool:
    """``t`` is differentiated: it requires grad or carries a forward-mode tangent (dynamo traces
    no forward mode)."""
    if t is None:
        return False
    return t.requires_grad or (not torch.compiler.is_compiling() and fwAD.unpack_dual(t).tangent is not None)


# ---------------------------------------------------------------------------------------------
# The compositions users write today (HF's Qwen3/Gemma3 RMSNorm, in float32).


def _hf_rms_norm(x: Tensor, weight: Tensor | None, eps: float, offset: float = 0.0,
                 out_dtype: torch.dtype | None = None) -> Tensor:
    """Gemma3RMSNorm's steps: ``x`` in float32, ``x * rsqrt(mean(x^2) + eps) * (offset +
    weight.float())``, cast once to ``out_dtype`` (default x's dtype)."""
    xf = x.to(acc_dtype(x.dtype))
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        out = out * (offset + weight.to(xf.dtype))
    return out.to(out_dtype or x.dtype)


def _torch_qk_rms_norm(q: Tensor, k: Tensor, q_weight: Tensor | None, k_weight: Tensor | None,
                       eps: float | None = None) -> tuple[Tensor, Tensor]:
    eps = rms_eps(eps, q.dtype)
    return _hf_rms_norm(q, q_weight, eps), _hf_rms_norm(k, k_weight, eps)


def _torch_sandwich_rms_norm(hidden: Tensor, residual: Tensor, post_weight: Tensor | None,
                             next_weight: Tensor | None, eps: float | None = None,
                             weight_offset: float = 0.0) -> tuple[Tensor, Tensor]:
    """Gemma3DecoderLayer: post-norm, add, pre-norm."""
    eps = rms_eps(eps, hidden.dtype)
    residual_out = (residual + _hf_rms_norm(hidden, post_weight, eps, weight_offset)).to(residual.dtype)
    # y rounded once, to hidden's dtype (a lower-precision residual stream does not round it twice)
    return _hf_rms_norm(residual_out, next_weight, eps, weight_offset, hidden.dtype), residual_out


REFERENCE: dict[str, Callable[..., Any]] = {"qk_rms_norm": qk_rms_norm, "sandwich_rms_norm": sandwich_rms_norm}
COMPOSITION: dict[str, Callable[..., Any]] = {"qk_rms_norm": _torch_qk_rms_norm,
                                              "sandwich_rms_norm": _torch_sandwich_rms_norm}
