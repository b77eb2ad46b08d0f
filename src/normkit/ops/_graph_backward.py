"""The kernel ops' backward in differentiable torch operations, for a backward that must build a graph.

A kernel's backward writes gradients autograd cannot look into, so it is first-order only. When
autograd runs a backward with ``create_graph=True`` and something it reads requires grad
(gradient penalties, MAML, Hessian-vector products, ``torch.func.jacrev`` of a gradient;
:func:`normkit.ops._autograd.records_graph`), the Triton and numba ops call the functions here
instead of their backward kernel. Each recomputes its op's forward from the tensors the op saved,
as the torch composition at the statistics' precision (float32; float64 for float64 input), and
returns its vector-Jacobian product built as a graph (:func:`normkit.ops._autograd.graph_vjp`):
second and higher derivatives are those of the composition, which equals the kernels' forward up
to rounding.

* The saved statistics (mean, rstd, the pivot) are results of the forward op, whose own
  backward ignores gradients reaching them: the compositions recompute them from the input so
  their dependence on it is differentiated. BatchNorm in eval mode is the exception: its
  statistics are the running ones, constants of the call.
* Nothing is written: BatchNorm and InstanceNorm recompute with the batch statistics and no
  running buffers, so a double backward never moves the running statistics a second time.
* The functions take tensors and flags, not a ``ctx``: each backend's ``_graph_backward``
  module reads its own ops' saved tensors and passes them here (``saved_*``: the ops whose
  saved layout both backends share).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from normkit.blocks import COMPOSITION
from normkit.functional import activate
from normkit.numerics import acc_dtype
from normkit.ops._autograd import graph_vjp

__all__ = [
    "channel",
    "gated",
    "modulated",
    "only",
    "plus",
    "qk",
    "sandwich",
    "saved_sandwich",
    "saved_squash",
    "squash",
    "stand_in",
    "trailing",
]

Grads = tuple[Tensor | None, ...]


def _to(p: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if p is None else p.to(dtype)


def stand_in(like: Tensor, shape: tuple[int, ...], dtype: torch.dtype | None, needed: bool) -> Tensor | None:
    """Zeros requiring grad on ``like``'s device, for an argument the op did not save (a bias or
    a shift that only shifts the output: its gradient is the summed cotangent, and no other
    gradient depends on its value); None where it is absent or its gradient is not needed."""
    if dtype is None or not needed:
        return None
    return torch.zeros(shape, dtype=dtype, device=like.device, requires_grad=True)


def only(grads: Grads, need: tuple[bool, ...]) -> Grads:
    """``grads`` with None wherever autograd did not ask for a gradient."""
    return tuple(g if n else None for g, n in zip(grads, need, strict=True))


def plus(g: Tensor | None, extra: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``g + extra`` in ``dtype``, either possibly None (an empty ``extra`` counts as None)."""
    if extra is None or not extra.numel():
        return g
    return extra.to(dtype) if g is None else g + extra.to(dtype)


def trailing(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    dy: Tensor | None,
    *,
    eps: float,
    is_rms: bool,
    out_dtype: torch.dtype | None = None,
) -> Grads:
    """``(dx, dw, db)`` of LayerNorm or RMSNorm over x's last dim (y in ``out_dtype``, default x's)."""
    L = x.shape[-1]

    def norm(x, weight, bias):
        acc = acc_dtype(x.dtype)
        if is_rms:
            y = F.rms_norm(x.to(acc), (L,), _to(weight, acc), eps)
        else:
            y = F.layer_norm(x.to(acc), (L,), _to(weight, acc), _to(bias, acc), eps)
        return y.to(out_dtype or x.dtype)

    return graph_vjp(norm, (x, weight, bias), (dy,))


def channel(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    dy: Tensor | None,
    *,
    act: str | None,
    groups: int = 0,
    eps: float | None = None,
    centre: Tensor | None = None,
    rstd: Tensor | None = None,
) -> Grads:
    """``(dx, dw, db)`` of ``act`` after a per-channel affine of an ``(N, C, *)`` input normalized
    by one of:

    * GroupNorm (``groups`` > 0; InstanceNorm is one channel a group), with ``eps``;
    * BatchNorm with batch statistics (``centre`` None), with ``eps``, or, for ``eps=None``,
      with the saved per-channel ``rstd``: ``var - var.detach() + rstd**-2`` has the batch
      variance's derivatives and the saved ``var + eps`` as value (an op that did not keep eps);
    * BatchNorm with its running statistics (``centre``, ``rstd``: per channel): constants."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    dims = [0, *range(2, x.dim())]

    def norm(x, weight, bias):
        acc = acc_dtype(x.dtype)
        xa, w, b = x.to(acc), _to(weight, acc), _to(bias, acc)
        if centre is None and not groups and eps is not None:
            y = F.batch_norm(xa, None, None, w, b, True, 0.0, eps)
        else:
            if groups:  # (not F.group_norm: its double backward fails under autograd's vmap)
                xg = xa.reshape(xa.shape[0], groups, -1)
                xc = xg - xg.mean(-1, keepdim=True)
                y = (xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)).reshape(xa.shape)
            elif centre is None:
                xc = xa - xa.mean(dims, keepdim=True)
                var = xc.pow(2).mean(dims, keepdim=True)
                y = xc * torch.rsqrt(var - var.detach() + rstd.detach().to(acc).view(shape).pow(-2))
            else:
                y = (xa - centre.detach().to(acc).view(shape)) * rstd.detach().to(acc).view(shape)
            y = y if w is None else y * w.view(shape)
            y = y if b is None else y + b.view(shape)
        return activate(act, y).to(x.dtype)

    return graph_vjp(norm, (x, weight, bias), (dy,))


def modulated(
    x: Tensor,
    shift: Tensor,
    scale: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    dy: Tensor | None,
    *,
    eps: float,
    is_rms: bool,
) -> Grads:
    """``(dx, dshift, dscale, dw, db)`` of adaLN over ``(M, D)`` rows, ``shift``/``scale`` as
    ``(S, D)`` modulation rows (row ``i`` reads row ``i // (M / S)``)."""
    M = x.shape[0]
    op = COMPOSITION["modulated_rms_norm" if is_rms else "modulated_layer_norm"]

    def norm(x, shift, scale, weight, bias):
        sh, sc = (t.repeat_interleave(M // t.shape[0], 0) for t in (shift, scale))
        if is_rms:
            return op(x, sh, sc, weight, eps)
        return op(x, sh, sc, weight, bias, eps)

    return graph_vjp(norm, (x, shift, scale, weight, bias), (dy,))


def gated(
    x: Tensor,
    gate: Tensor | None,
    weight: Tensor | None,
    dy: Tensor | None,
    *,
    eps: float,
    group_size: int,
    norm_before_gate: bool,
) -> Grads:
    """``(dx, dgate, dw)`` of Mamba2's gated, grouped RMSNorm."""

    def norm(x, gate, weight):
        return COMPOSITION["gated_rms_norm"](x, gate, weight, eps, group_size, norm_before_gate)

    return graph_vjp(norm, (x, gate, weight), (dy,))


def _rms(t: Tensor, w: Tensor | None, eps: float, offset: float, dtype: torch.dtype) -> Tensor:
    acc = acc_dtype(t.dtype)
    xf = t.to(acc)
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (out if w is None else out * (w.to(acc) + offset)).to(dtype)


def qk(
    q: Tensor,
    k: Tensor,
    q_weight: Tensor | None,
    k_weight: Tensor | None,
    dq: Tensor | None,
    dk: Tensor | None,
    *,
    eps: float,
) -> Grads:
    """``(dq, dk, dq_weight, dk_weight)`` of RMSNorm over the last dim of q and of k."""
    dq_in, dqw = graph_vjp(lambda t, w: _rms(t, w, eps, 0.0, q.dtype), (q, q_weight), (dq,))
    dk_in, dkw = graph_vjp(lambda t, w: _rms(t, w, eps, 0.0, k.dtype), (k, k_weight), (dk,))
    return dq_in, dk_in, dqw, dkw


def sandwich(
    hidden: Tensor,
    rout: Tensor,
    w1: Tensor | None,
    w2: Tensor | None,
    dy: Tensor | None,
    drout: Tensor | None,
    *,
    eps: float,
    offset: float,
) -> Grads:
    """``(dhidden, dresidual, dw1, dw2)`` of ``residual_out = residual + rms(hidden) * w1`` and
    ``y = rms(residual_out) * w2`` (``w + offset``), differentiated in two steps through the
    saved ``residual_out``: its gradient ``dr`` (from y and from its own cotangent) is the
    residual's, and the first norm's cotangent. A second derivative reaching the saved
    ``residual_out`` flows on through the forward op's backward, as for any of its results."""
    dr, dw2 = graph_vjp(lambda r, w: _rms(r, w, eps, offset, hidden.dtype), (rout, w2), (dy,))
    dr = plus(dr, drout, rout.dtype)
    if dr is None:
        dr = torch.zeros_like(rout)
    dh, dw1 = graph_vjp(lambda h, w: _rms(h, w, eps, offset, rout.dtype), (hidden, w1), (dr,))
    return dh, dr, dw1, dw2


def squash(
    x: Tensor,
    alpha: Tensor,
    shift: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    dy: Tensor | None,
    *,
    is_erf: bool,
) -> Grads:
    """``(dx, dalpha, dshift, dw, db)`` of DyT (``weight * tanh(alpha * x) + bias``) or Derf
    (``weight * erf(alpha * x + shift) + bias``) over ``(M, D)`` rows."""

    def squash(x, alpha, shift, weight, bias):
        if is_erf:
            return COMPOSITION["derf"](x, alpha, shift, weight, bias)
        return COMPOSITION["dyt"](x, alpha, weight, bias)

    return graph_vjp(squash, (x, alpha, shift, weight, bias), (dy,))


# ---- What both backends' sandwich and DyT/Derf ops saved (the same layout) ------------------


def saved_sandwich(ctx, dy: Tensor | None, dresidual_out: Tensor | None, *_rstd: Tensor | None) -> Grads:
    """The gradients of a sandwich op that saved ``(hidden, residual_out, post_weight,
    next_weight, rstd1, rstd2)`` with ``ctx.eps`` and ``ctx.offset``: one per argument
    ``(hidden, residual, post_weight, next_weight, eps, offset)``."""
    hidden, residual_out, post_weight, next_weight, _, _ = ctx.saved_tensors
    grads = sandwich(hidden, residual_out, post_weight, next_weight, dy, dresidual_out, eps=ctx.eps, offset=ctx.offset)
    return (*only(grads, ctx.needs_input_grad[:4]), None, None)


def saved_squash(ctx, dy: Tensor | None, bias_dtype: torch.dtype | None) -> Grads:
    """The gradients of a DyT/Derf op that saved ``(x, alpha, shift, weight)`` with
    ``ctx.is_erf`` (the bias, not saved, of ``bias_dtype``): one per argument ``(x, alpha,
    shift, weight, bias, is_erf)``."""
    x, alpha, shift, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    bias = stand_in(x, (x.shape[1],), bias_dtype, bool(need[4]))
    grads = squash(x, alpha, shift, weight, bias, dy, is_erf=ctx.is_erf)
    return (*only(grads, need[:5]), None)
