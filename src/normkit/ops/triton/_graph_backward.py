"""The Triton ops' backward for a backward that must build a graph (``create_graph=True`` with
something it reads requiring grad): each function reads what its op's ``setup_context`` saved
and calls the op's torch composition in :mod:`normkit.ops._graph_backward`, so second and
higher derivatives (gradient penalties, MAML, Hessian-vector products) are the composition's.
The launchers pass them to :func:`~normkit.ops.triton._launch.eager_and_compiled`'s
``graph_backward=``; a first-order backward runs the kernels.
"""

from __future__ import annotations

from normkit.ops import _graph_backward as composed
from normkit.ops._graph_backward import only, plus, stand_in
from normkit.ops.triton.jit_helpers import ACT_CODES

__all__ = ["batch", "gated", "modulated", "qk", "row", "sandwich", "squash"]

_ACT_NAMES = {code: name for name, code in ACT_CODES.items()}


def row(ctx, dy, dresidual_out, dmean, drstd, dvar):
    """:mod:`.row_norm`'s ``row_norm_fwd`` over an ``(N, C, S)`` view: GroupNorm/InstanceNorm
    (``per_channel``, then ``act``; contiguous or channels_last), or LayerNorm/RMSNorm of
    ``(M, 1, L)`` rows: x, or the stored ``residual_out = x + residual`` of the add-norms,
    whose gradient both x and residual get."""
    x, weight, bias, _, _ = ctx.saved_tensors
    groups, per_channel, is_rms, has_residual_out, act = ctx.meta
    x_dtype, residual_dtype, _, b_dtype = ctx.dtypes
    need = ctx.needs_input_grad
    if bias is None:  # saved only for an activation
        bias = stand_in(x, (x.shape[1] if per_channel else x.shape[2],), b_dtype, bool(need[3]))
    if per_channel:
        dx, dw, db = composed.channel(x, weight, bias, dy, act=_ACT_NAMES[act], groups=groups, eps=ctx.eps)
    else:
        dx, dw, db = composed.trailing(x, weight, bias, dy, eps=ctx.eps, is_rms=is_rms, out_dtype=x_dtype)
    dresidual = None
    if has_residual_out:
        dx = plus(dx, dresidual_out, x.dtype)
        dresidual = None if dx is None or residual_dtype is None else dx.to(residual_dtype)
    dx = None if dx is None else dx.to(x_dtype)
    return (*only((dx, dresidual, dw, db), need[:4]), None, None, None, None, None, None)


def batch(ctx, dy):
    """:mod:`.batch_norm`'s ``batch_norm_fwd``: BatchNorm with batch statistics (recomputed; the
    op keeps ``rstd``, not eps) or with its running ones (``centre``: constants), then ``act``."""
    x, weight, bias, centre, rstd = ctx.saved_tensors[:5]  # then the kernels' scale, shift
    w_dtype, b_dtype = ctx.dtypes
    need = ctx.needs_input_grad
    if bias is None:  # saved only for an activation
        bias = stand_in(x, (x.shape[1],), b_dtype, bool(need[2]))
    grads = composed.channel(
        x, weight, bias, dy, act=_ACT_NAMES[ctx.act], rstd=rstd, centre=None if ctx.batch_stats else centre.sum(0)
    )
    return (*only(grads, need[:3]), None, None, None, None, None, None)


def modulated(ctx, dy, dmean, drstd):
    """:mod:`.modulated`'s ``modulated_norm_fwd``: adaLN over ``(M, D)`` rows; the shift, not
    saved (it only shifts y), is a stand-in of its shape."""
    x, scale, weight, bias, _, _ = ctx.saved_tensors
    shift_group, _, is_rms = ctx.meta
    need = ctx.needs_input_grad
    rows = (x.shape[0] // shift_group, x.shape[1])
    shift = stand_in(x, rows, ctx.dtypes[1], bool(need[1]))
    if shift is None:
        shift = x.new_zeros(rows, dtype=ctx.dtypes[1])
    grads = composed.modulated(x, shift, scale, weight, bias, dy, eps=ctx.eps, is_rms=is_rms)
    return (*only(grads, need[:5]), None, None, None, None)


def gated(ctx, dy, drstd):
    """:mod:`.gated`'s ``gated_rms_norm_fwd``: Mamba2's gated, grouped RMSNorm."""
    x, gate, weight, _ = ctx.saved_tensors
    group_size, norm_before_gate = ctx.meta
    grads = composed.gated(x, gate, weight, dy, eps=ctx.eps, group_size=group_size, norm_before_gate=norm_before_gate)
    return (*only(grads, ctx.needs_input_grad[:3]), None, None, None)


def qk(ctx, dq_out, dk_out, dq_rstd, dk_rstd):
    """:mod:`.qk_sandwich`'s ``qk_rms_norm_fwd``: RMSNorm of q and of k."""
    q, k, q_weight, k_weight, _, _ = ctx.saved_tensors
    grads = composed.qk(q, k, q_weight, k_weight, dq_out, dk_out, eps=ctx.eps)
    return (*only(grads, ctx.needs_input_grad[:4]), None)


def sandwich(ctx, dy, dresidual_out, drstd1, drstd2):
    """:mod:`.qk_sandwich`'s ``sandwich_rms_norm_fwd``: the Gemma sandwich step through the
    saved ``residual_out``."""
    return composed.saved_sandwich(ctx, dy, dresidual_out)


def squash(ctx, dy):
    """:mod:`.norm_free`'s ``norm_free_fwd``: DyT or Derf over ``(M, D)`` rows."""
    return composed.saved_squash(ctx, dy, ctx.dtypes[4])
