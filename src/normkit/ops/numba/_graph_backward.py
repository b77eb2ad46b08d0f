"""The numba ops' backward for a backward that must build a graph: each function reads what its
op's ``setup_context`` saved (and ``ctx.eps``) and calls the op's torch composition in
:mod:`normkit.ops._graph_backward`. The ops' modules pass them to
:func:`~normkit.ops.numba._functions.autograd_pair`'s ``graph_backward=``.
"""

from __future__ import annotations

from normkit.ops import _graph_backward as composed
from normkit.ops._graph_backward import only, plus, stand_in
from normkit.ops.numba.channel_kernels import ACT_CODES

__all__ = ["channel", "gated", "modulated", "row", "sandwich", "squash"]

_ACT_NAMES = {code: name for name, code in ACT_CODES.items()}


def row(ctx, dy, dresidual_out, dmean, drstd):
    """:mod:`.row_norm`'s ``row_fwd``: LayerNorm or RMSNorm of the saved rows (x, or
    ``residual_out = x + residual`` for the add-norms, whose gradient both x and residual get)."""
    x, weight, _, _ = ctx.saved_tensors
    need = ctx.needs_input_grad
    bias = stand_in(x, (x.shape[1],), ctx.dtypes[1], bool(need[3]))
    dx, dw, db = composed.trailing(x, weight, bias, dy, eps=ctx.eps, is_rms=ctx.is_rms)
    if ctx.store_residual:
        dx = plus(dx, dresidual_out, x.dtype)
    return (*only((dx, dx, dw, db), need[:4]), None, None, None)


def channel(ctx, dy, *_stats):
    """:mod:`.channel_norm`'s ``channel_fwd``: GroupNorm (InstanceNorm: one channel a group),
    BatchNorm with batch statistics, or BatchNorm with its running statistics, then ``act``."""
    x, weight, bias, pivot, mean, rstd = ctx.saved_tensors
    eval_stats = not ctx.groups and not ctx.batch_stats
    grads = composed.channel(
        x,
        weight,
        bias,
        dy,
        act=_ACT_NAMES[ctx.act],
        groups=ctx.groups,
        eps=ctx.eps,
        centre=pivot + mean if eval_stats else None,
        rstd=rstd if eval_stats else None,
    )
    return (*only(grads, ctx.needs_input_grad[:3]), None, None, None, None, None, None)


def modulated(ctx, dy, dmean, drstd):
    """:mod:`.blocks`' ``mod_fwd``: adaLN over ``(M, D)`` rows, ``shift``/``scale`` as ``(S, D)``
    modulation rows (row ``i`` reads row ``i // (M / S)``)."""
    x, shift, scale, weight, bias, _, _ = ctx.saved_tensors
    grads = composed.modulated(x, shift, scale, weight, bias, dy, eps=ctx.eps, is_rms=ctx.is_rms)
    return (*only(grads, ctx.needs_input_grad[:5]), None, None)


def gated(ctx, dy, drstd):
    """:mod:`.blocks`' ``gated_fwd``: Mamba2's gated, grouped RMSNorm."""
    x, gate, weight, _ = ctx.saved_tensors
    group, gated_after, _ = ctx.params
    grads = composed.gated(x, gate, weight, dy, eps=ctx.eps, group_size=group, norm_before_gate=gated_after)
    return (*only(grads, ctx.needs_input_grad[:3]), None, None, None)


def sandwich(ctx, dy, drout, drstd1, drstd2):
    """:mod:`.blocks`' ``sandwich_fwd``: the Gemma sandwich step through the saved ``residual_out``."""
    return composed.saved_sandwich(ctx, dy, drout)


def squash(ctx, dy):
    """:mod:`.blocks`' ``squash_fwd``: DyT or Derf over ``(M, D)`` rows."""
    return composed.saved_squash(ctx, dy, ctx.dtypes[1])
