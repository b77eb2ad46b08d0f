"""The numba ops' backward in differentiable torch operations, for a backward that must build a graph.

A kernel's backward writes gradients autograd cannot look into, so it is first-order only. When
autograd runs a backward with ``create_graph=True`` and something it reads requires grad
(gradient penalties, MAML, Hessian-vector products, ``torch.func.jacrev`` of a gradient),
:func:`~normkit.ops.numba._engine.autograd_pair` calls the function here instead of the kernel.
Each recomputes its op's forward from the tensors the op saved, as the torch composition at the
statistics' precision (float32; float64 for float64 input), and returns its vector-Jacobian
product built as a graph (:func:`normkit.ops._autograd.graph_vjp`): second and higher
derivatives are those of the composition, which equals the kernels' forward up to rounding.

* The saved statistics (mean, rstd, the pivot) are results of the forward op, whose own
  backward ignores gradients reaching them: the compositions recompute them from the input so
  their dependence on it is differentiated. BatchNorm in eval mode is the exception: its
  statistics are the running ones, constants of the call.
* Nothing is written: BatchNorm and InstanceNorm recompute with the batch statistics and no
  running buffers, so a double backward never moves the running statistics a second time.
* Each function reads its op's ``ctx`` (what its ``setup_context`` saved, and ``ctx.eps``):
  the ops' modules pass them to ``autograd_pair(..., graph_backward=...)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from normkit.blocks import COMPOSITION
from normkit.functional import activate
from normkit.numerics import acc_dtype
from normkit.ops._autograd import graph_vjp
from normkit.ops.numba.channel_kernels import ACT_CODES

__all__ = ["channel", "gated", "modulated", "row", "sandwich", "squash"]

_ACT_NAMES = {code: name for name, code in ACT_CODES.items()}


def _to(p: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if p is None else p.to(dtype)


def _stand_in(dtype: torch.dtype | None, n: int, needed: bool) -> Tensor | None:
    """A zero bias requiring grad, for an op that did not save its bias (a bias shifts the output
    only: its gradient is the summed cotangent, and no other gradient depends on its value)."""
    if dtype is None or not needed:
        return None
    return torch.zeros(n, dtype=dtype, requires_grad=True)


def _only(grads: tuple[Tensor | None, ...], need: tuple[bool, ...]) -> tuple[Tensor | None, ...]:
    return tuple(g if n else None for g, n in zip(grads, need, strict=True))


def row(ctx, dy, dresidual_out, dmean, drstd):
    """:mod:`.row_norm`'s ``row_fwd``: LayerNorm or RMSNorm of the saved rows (x, or
    ``residual_out = x + residual`` for the add-norms, whose gradient both x and residual get)."""
    x, weight, _, _ = ctx.saved_tensors
    need = ctx.needs_input_grad
    L = x.shape[1]
    bias = _stand_in(ctx.dtypes[1], L, bool(need[3]))

    def norm(x, weight, bias):
        acc = acc_dtype(x.dtype)
        if ctx.is_rms:
            y = F.rms_norm(x.to(acc), (L,), _to(weight, acc), ctx.eps)
        else:
            y = F.layer_norm(x.to(acc), (L,), _to(weight, acc), _to(bias, acc), ctx.eps)
        return y.to(x.dtype)

    dx, dw, db = graph_vjp(norm, (x, weight, bias), (dy,))
    if ctx.store_residual and dresidual_out is not None and dresidual_out.numel():
        dx = dresidual_out.to(x.dtype) if dx is None else dx + dresidual_out.to(x.dtype)
    return (*_only((dx, dx, dw, db), need[:4]), None, None, None)


def channel(ctx, dy, *_stats):
    """:mod:`.channel_norm`'s ``channel_fwd``: GroupNorm (InstanceNorm: one channel a group),
    BatchNorm with batch statistics, or BatchNorm with its running statistics, then ``act``."""
    x, weight, bias, pivot, mean, rstd = ctx.saved_tensors

    def norm(x, weight, bias):
        acc = acc_dtype(x.dtype)
        xa, w, b = x.to(acc), _to(weight, acc), _to(bias, acc)
        if ctx.groups:
            y = F.group_norm(xa, ctx.groups, w, b, ctx.eps)
        elif ctx.batch_stats:
            y = F.batch_norm(xa, None, None, w, b, True, 0.0, ctx.eps)
        else:  # eval: the running statistics are constants of the call
            shape = (1, -1) + (1,) * (x.dim() - 2)
            centre = (pivot + mean).detach().to(acc).view(shape)
            y = (xa - centre) * rstd.detach().to(acc).view(shape)
            y = y if w is None else y * w.view(shape)
            y = y if b is None else y + b.view(shape)
        return activate(_ACT_NAMES[ctx.act], y).to(x.dtype)

    dx, dw, db = graph_vjp(norm, (x, weight, bias), (dy,))
    return (*_only((dx, dw, db), ctx.needs_input_grad[:3]), None, None, None, None, None, None)


def modulated(ctx, dy, dmean, drstd):
    """:mod:`.blocks`' ``mod_fwd``: adaLN over ``(M, D)`` rows, ``shift``/``scale`` as ``(S, D)``
    modulation rows (row ``i`` reads row ``i // (M / S)``)."""
    x, shift, scale, weight, bias, _, _ = ctx.saved_tensors
    M = x.shape[0]
    op = COMPOSITION["modulated_rms_norm" if ctx.is_rms else "modulated_layer_norm"]

    def norm(x, shift, scale, weight, bias):
        sh, sc = (t.repeat_interleave(M // t.shape[0], 0) for t in (shift, scale))
        if ctx.is_rms:
            return op(x, sh, sc, weight, ctx.eps)
        return op(x, sh, sc, weight, bias, ctx.eps)

    grads = graph_vjp(norm, (x, shift, scale, weight, bias), (dy,))
    return (*_only(grads, ctx.needs_input_grad[:5]), None, None)


def gated(ctx, dy, drstd):
    """:mod:`.blocks`' ``gated_fwd``: Mamba2's gated, grouped RMSNorm."""
    x, gate, weight, _ = ctx.saved_tensors
    group, gated_after, _ = ctx.params

    def norm(x, gate, weight):
        return COMPOSITION["gated_rms_norm"](x, gate, weight, ctx.eps, group, gated_after)

    grads = graph_vjp(norm, (x, gate, weight), (dy,))
    return (*_only(grads, ctx.needs_input_grad[:3]), None, None, None)


def sandwich(ctx, dy, drout, drstd1, drstd2):
    """:mod:`.blocks`' ``sandwich_fwd``: ``residual_out = residual + rms(hidden) * w1`` and
    ``y = rms(residual_out) * w2`` (``w + offset``), differentiated in two steps through the
    saved ``residual_out``: its gradient ``dr`` (from y and from its own cotangent) is the
    residual's, and the first norm's cotangent. A second derivative reaching the saved
    ``residual_out`` flows on through the forward op's backward, as for any of its results."""
    hidden, rout, w1, w2, _, _ = ctx.saved_tensors
    need = ctx.needs_input_grad

    def norm(t, w, dtype):
        acc = acc_dtype(t.dtype)
        xf = t.to(acc)
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + ctx.eps)
        return (out if w is None else out * (w.to(acc) + ctx.offset)).to(dtype)

    dr, dw2 = graph_vjp(lambda r, w: norm(r, w, hidden.dtype), (rout, w2), (dy,))
    if drout is not None and drout.numel():
        dr = drout.to(rout.dtype) if dr is None else dr + drout.to(rout.dtype)
    if dr is None:
        dr = torch.zeros_like(rout)
    dh, dw1 = graph_vjp(lambda h, w: norm(h, w, rout.dtype), (hidden, w1), (dr,))
    return (*_only((dh, dr, dw1, dw2), need[:4]), None, None)


def squash(ctx, dy):
    """:mod:`.blocks`' ``squash_fwd``: DyT (``weight * tanh(alpha * x) + bias``) or Derf
    (``weight * erf(alpha * x + shift) + bias``) over ``(M, D)`` rows."""
    x, alpha, shift, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    bias = _stand_in(ctx.dtypes[1], x.shape[1], bool(need[4]))

    def squash(x, alpha, shift, weight, bias):
        if ctx.is_erf:
            return COMPOSITION["derf"](x, alpha, shift, weight, bias)
        return COMPOSITION["dyt"](x, alpha, weight, bias)

    grads = graph_vjp(squash, (x, alpha, shift, weight, bias), (dy,))
    return (*_only(grads, need[:5]), None)
