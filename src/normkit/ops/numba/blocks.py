"""The norms of today's blocks on numba kernels: modulated (adaLN), gated, QK and sandwich RMSNorm,
and the normalization-free DyT and Derf.

Each op is one pair of ``torch.library`` custom ops over ``(M, D)`` row views (fake
implementations for ``torch.compile(fullgraph=True)``; eager calls go straight to the kernels
through :func:`~normkit.ops.numba._functions.autograd_pair`):

* ``normkit_numba::mod_fwd(x, shift, scale, weight, bias, eps, is_rms) -> (y, mean, rstd)`` and
  ``mod_bwd``: ``shift``/``scale`` as ``(S, D)`` modulation rows (per sample ``S = N``, per
  token ``S = M``, one for the batch ``S = 1``) in the statistics dtype; their gradients summed
  over the rows sharing a modulation row inside the backward kernel.
* ``normkit_numba::gated_fwd(x, gate, weight, eps, group, gated_after) -> (y, rstd)`` and
  ``gated_bwd``.
* ``normkit_numba::sandwich_fwd(hidden, residual, post_weight, next_weight, eps, offset) ->
  (y, residual_out, rstd1, rstd2)`` and ``sandwich_bwd``: one pass each way.
* ``qk_rms_norm`` is the row kernels' RMSNorm on ``q`` and on ``k`` (one pass each way per tensor).
* ``normkit_numba::squash_fwd(x, alpha, shift, weight, bias, is_erf) -> y`` and ``squash_bwd ->
  (dx, dalpha, dshift, dweight, dbias)``: ``dyt`` (tanh, no shift) and ``derf`` (erf), all five
  gradients from one pass; nothing saved but the inputs (the backward recomputes the squash).

The functions take :mod:`normkit.functional_blocks`' backend arguments, after its checks and
the backend's ``unsupported`` check (:mod:`normkit.ops.numba.backend`). Numerics: see
:mod:`normkit.ops.numba._block_kernels` (statistics in float32, float64 for float64 input;
each result rounded once; deterministic at any thread count; a row's results do not depend on
the other rows). The parameter gradients are summed per block of rows as the row norms' are
(:func:`~normkit.ops.numba.row_norm._bwd_block`: one block up to 32 rows, else at least 16
rows a block, so from 33 to 511 rows their last bits differ from versions with smaller blocks).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor

from normkit.numerics import acc_dtype, rms_eps
from normkit.ops._autograd import vmap_by_loop, without_graph
from normkit.ops.numba import _block_kernels as k
from normkit.ops.numba import _graph_backward, _pages, row_norm
from normkit.ops.numba._engine import acc_np_dtype, as_array, param, split_run
from normkit.ops.numba._functions import autograd_pair
from normkit.ops.numba._row_kernels import sum_blocks
from normkit.ops.numba.backend import modulation_rows

__all__ = [
    "derf",
    "dyt",
    "gated_rms_norm",
    "modulated_layer_norm",
    "modulated_rms_norm",
    "qk_rms_norm",
    "sandwich_rms_norm",
]

MAX_BLOCKS = row_norm.MAX_BLOCKS


def _no_rows(like: Tensor) -> np.ndarray:
    return row_norm._no_rows(like.shape[1], as_array(like).dtype)


def _sum_groups(p: Tensor, group: int) -> Tensor:
    """Every ``group`` consecutive rows of ``p`` summed in order (``p`` itself when 1)."""
    if group == 1:
        return p
    out = p.new_empty((p.shape[0] // group, p.shape[1]))
    split_run(k.sum_groups, out.shape[0], p.numel(), p.numpy(), group, out.numpy())
    return out


def _weight_grads(parts: Tensor, other: Tensor) -> tuple[Tensor, Tensor]:
    """``parts`` and ``other`` ((blocks, D) partial sums) each summed over the blocks in block order."""
    L = parts.shape[1]
    a, b = parts.new_empty(L), parts.new_empty(L)
    split_run(sum_blocks, L, parts.numel(), parts.numpy(), other.numpy(), a.numpy(), b.numpy())
    return a, b


# ---- modulated (adaLN) -------------------------------------------------------------------


def _mod_fwd_impl(x: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None, bias: Tensor | None,
                  eps: float, is_rms: bool) -> tuple[Tensor, Tensor, Tensor]:
    M, D = x.shape
    acc = acc_np_dtype(x.dtype)
    y = _pages.empty_like(x)
    mean = torch.empty(M, dtype=acc_dtype(x.dtype))
    rstd = torch.empty(M, dtype=acc_dtype(x.dtype))
    split_run(k.mod_fwd, M, M * D, as_array(x), shift.numpy(), scale.numpy(), param(weight, acc, D, 1),
              param(bias, acc, D, 0), float(eps), is_rms, as_array(y), mean.numpy(), rstd.numpy())
    return y, mean, rstd


def _mod_blocks(M: int, rows: int) -> tuple[int, int, int]:
    """``(cpb, spb, blocks)`` of :func:`~normkit.ops.numba._block_kernels.mod_bwd`: blocks of
    about the row norms' size (:func:`~normkit.ops.numba.row_norm._bwd_block`: one up to 32
    rows, else at most :data:`MAX_BLOCKS` blocks of at least 16 rows), none crossing a modulation row of ``rows``
    rows unless it holds whole ones (from the shape alone, never the threads)."""
    target = row_norm._bwd_block(M)
    if rows >= target:
        cpb, spb = -(-rows // target), 1
    else:
        cpb, spb = 1, max(1, target // rows)
    return cpb, spb, -(-(M // rows) // spb) * cpb


def _mod_bwd_impl(dy: Tensor, x: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None,
                  bias: Tensor | None, mean: Tensor, rstd: Tensor, is_rms: bool, want_dw: bool,
                  want_db: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    M, D = x.shape
    acc = acc_np_dtype(x.dtype)
    dy = dy.to(x.dtype).contiguous()
    S = max(shift.shape[0], scale.shape[0])  # the finer modulation: its rows cut the blocks
    rows = M // S
    cpb, spb, blocks = _mod_blocks(M, rows)
    dx = _pages.empty_like(x)
    dshp = torch.empty((S * cpb, D), dtype=mean.dtype)
    dscp = torch.empty((S * cpb, D), dtype=mean.dtype)
    dwp = torch.empty((blocks, D), dtype=mean.dtype)
    dbp = torch.empty((blocks, D), dtype=mean.dtype)
    split_run(k.mod_bwd, blocks, M * D, as_array(dy), as_array(x), scale.numpy(), param(weight, acc, D, 1),
              param(bias, acc, D, 0), mean.numpy(), rstd.numpy(), is_rms, rows, cpb, spb, as_array(dx),
              dshp.numpy(), dscp.numpy(), dwp.numpy(), dbp.numpy())
    dshift = _sum_groups(dshp, S * cpb // shift.shape[0])
    dscale = _sum_groups(dscp, S * cpb // scale.shape[0])
    dw, db = _weight_grads(dwp, dbp) if want_dw or want_db else (dwp[0, :0], dbp[0, :0])
    return dx, dshift, dscale, dw if want_dw else dw[:0], db if want_db else db[:0]


@torch.library.custom_op("normkit_numba::mod_fwd", mutates_args=(), device_types="cpu")
def _mod_fwd_op(x: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None, bias: Tensor | None,
                eps: float, is_rms: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _mod_fwd_impl(x, shift, scale, weight, bias, eps, is_rms)


@_mod_fwd_op.register_fake
def _(x, shift, scale, weight, bias, eps, is_rms):
    M = x.shape[0]
    stat = acc_dtype(x.dtype)
    return torch.empty_like(x), x.new_empty(M, dtype=stat), x.new_empty(M, dtype=stat)


@torch.library.custom_op("normkit_numba::mod_bwd", mutates_args=(), device_types="cpu")
def _mod_bwd_op(dy: Tensor, x: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None, bias: Tensor | None,
                mean: Tensor, rstd: Tensor, is_rms: bool, want_dw: bool,
                want_db: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _mod_bwd_impl(dy, x, shift, scale, weight, bias, mean, rstd, is_rms, want_dw, want_db)


@_mod_bwd_op.register_fake
def _(dy, x, shift, scale, weight, bias, mean, rstd, is_rms, want_dw, want_db):
    D = x.shape[1]
    return (torch.empty_like(x), torch.empty_like(shift), torch.empty_like(scale),
            x.new_empty(D if want_dw else 0, dtype=mean.dtype), x.new_empty(D if want_db else 0, dtype=mean.dtype))


def _mod_setup(ctx, inputs, output) -> None:
    x, shift, scale, weight, bias, eps, is_rms = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, shift, scale, weight, bias, mean, rstd)
    ctx.is_rms, ctx.eps = is_rms, eps
    ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)


def _mod_backward(ctx, dy, dmean, drstd):
    x, shift, scale, weight, bias, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    w_dtype, b_dtype = ctx.dtypes
    dx, dshift, dscale, dw, db = _mod_bwd(dy, x, shift, scale, weight, bias, mean, rstd, ctx.is_rms,
                                          bool(need[3]), bool(need[4]))
    return (dx, dshift if need[1] else None, dscale if need[2] else None,
            dw.to(w_dtype) if need[3] else None, db.to(b_dtype) if need[4] else None, None, None)


vmap_by_loop(_mod_fwd_op)
vmap_by_loop(_mod_bwd_op)
_mod_norm, _mod_bwd = autograd_pair(_mod_fwd_op, _mod_setup, _mod_backward, _mod_bwd_op, _mod_fwd_impl,
                                    _mod_bwd_impl, graph_backward=_graph_backward.modulated)


def _modulated(input: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None, bias: Tensor | None,
               eps: float, is_rms: bool) -> Tensor:
    D = input.shape[-1]
    stat = acc_dtype(input.dtype)
    # (S, D) rows in the statistics dtype: a view for a contiguous float32 per-sample/per-token
    # tensor; autograd takes the gradient back to shift's shape and dtype.
    sh, sc = (t.reshape(modulation_rows(t, input.shape), D).to(stat).contiguous() for t in (shift, scale))
    y, _, _ = _mod_norm(input.reshape(-1, D).contiguous(), sh, sc, weight, bias, eps, is_rms)
    return y.view(input.shape)


def modulated_layer_norm(input: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None = None,
                         bias: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """``layer_norm(input, weight, bias, eps) * (1 + scale) + shift``, one fused kernel each way."""
    return _modulated(input, shift, scale, weight, bias, eps, False)


def modulated_rms_norm(input: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None = None,
                       eps: float | None = None) -> Tensor:
    """``rms_norm(input, weight, eps) * (1 + scale) + shift``, one fused kernel each way."""
    return _modulated(input, shift, scale, weight, None, rms_eps(eps, input.dtype), True)


# ---- gated, grouped RMSNorm --------------------------------------------------------------


def _gated_fwd_impl(x: Tensor, gate: Tensor | None, weight: Tensor | None, eps: float, group: int,
                    gated_after: bool) -> tuple[Tensor, Tensor]:
    M, D = x.shape
    y = _pages.empty_like(x)
    rstd = torch.empty((M, D // group), dtype=acc_dtype(x.dtype))
    ga = as_array(gate) if gate is not None else _no_rows(x)
    split_run(k.gated_fwd, M, M * D, as_array(x), ga, param(weight, acc_np_dtype(x.dtype), D, 1), float(eps),
              group, gated_after, as_array(y), rstd.numpy())
    return y, rstd


def _gated_bwd_impl(dy: Tensor, x: Tensor, gate: Tensor | None, weight: Tensor | None, rstd: Tensor,
                    group: int, gated_after: bool, want_dw: bool) -> tuple[Tensor, Tensor, Tensor]:
    M, D = x.shape
    dy = dy.to(x.dtype).contiguous()
    block = row_norm._bwd_block(M)
    blocks = -(-M // block)
    dx = _pages.empty_like(x)
    dgate = _pages.empty_like(gate) if gate is not None else x.new_empty((0, D))
    dwp = torch.empty((blocks, D), dtype=rstd.dtype)
    ga = as_array(gate) if gate is not None else _no_rows(x)
    split_run(k.gated_bwd, blocks, M * D, as_array(dy), as_array(x), ga,
              param(weight, acc_np_dtype(x.dtype), D, 1), rstd.numpy(), group, gated_after, block,
              as_array(dx), as_array(dgate), dwp.numpy())
    dw = _weight_grads(dwp, dwp)[0] if want_dw else dwp[0, :0]
    return dx, dgate, dw


@torch.library.custom_op("normkit_numba::gated_fwd", mutates_args=(), device_types="cpu")
def _gated_fwd_op(x: Tensor, gate: Tensor | None, weight: Tensor | None, eps: float, group: int,
                  gated_after: bool) -> tuple[Tensor, Tensor]:
    return _gated_fwd_impl(x, gate, weight, eps, group, gated_after)


@_gated_fwd_op.register_fake
def _(x, gate, weight, eps, group, gated_after):
    return torch.empty_like(x), x.new_empty((x.shape[0], x.shape[1] // group), dtype=acc_dtype(x.dtype))


@torch.library.custom_op("normkit_numba::gated_bwd", mutates_args=(), device_types="cpu")
def _gated_bwd_op(dy: Tensor, x: Tensor, gate: Tensor | None, weight: Tensor | None, rstd: Tensor, group: int,
                  gated_after: bool, want_dw: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _gated_bwd_impl(dy, x, gate, weight, rstd, group, gated_after, want_dw)


@_gated_bwd_op.register_fake
def _(dy, x, gate, weight, rstd, group, gated_after, want_dw):
    dgate = torch.empty_like(gate) if gate is not None else x.new_empty((0, x.shape[1]))
    return torch.empty_like(x), dgate, x.new_empty(x.shape[1] if want_dw else 0, dtype=rstd.dtype)


def _gated_setup(ctx, inputs, output) -> None:
    x, gate, weight, eps, group, gated_after = inputs
    ctx.save_for_backward(x, gate, weight, output[1])
    ctx.params = (group, gated_after, None if weight is None else weight.dtype)
    ctx.eps = eps


def _gated_backward(ctx, dy, drstd):
    x, gate, weight, rstd = ctx.saved_tensors
    group, gated_after, w_dtype = ctx.params
    need = ctx.needs_input_grad
    dx, dgate, dw = _gated_bwd(dy, x, gate, weight, rstd, group, gated_after, bool(need[2]))
    return (dx, dgate if gate is not None and need[1] else None, dw.to(w_dtype) if need[2] else None,
            None, None, None)


vmap_by_loop(_gated_fwd_op)
vmap_by_loop(_gated_bwd_op)
_gated_norm, _gated_bwd = autograd_pair(_gated_fwd_op, _gated_setup, _gated_backward, _gated_bwd_op,
                                        _gated_fwd_impl, _gated_bwd_impl, graph_backward=_graph_backward.gated)


def gated_rms_norm(input: Tensor, gate: Tensor | None, weight: Tensor | None = None, eps: float = 1e-6,
                   group_size: int | None = None, norm_before_gate: bool = False) -> Tensor:
    """Mamba2's gated, grouped RMSNorm, one fused kernel each way."""
    D = input.shape[-1]
    rows = input.reshape(-1, D).contiguous()
    g = None if gate is None else gate.reshape(-1, D).contiguous()
    y, _ = _gated_norm(rows, g, weight, float(eps), int(group_size or D), bool(norm_before_gate))
    return y.view(input.shape)


# ---- QK-norm ----------------------------------------------------------------------------


def qk_rms_norm(q: Tensor, k: Tensor, q_weight: Tensor | None, k_weight: Tensor | None,
                eps: float | None = None) -> tuple[Tensor, Tensor]:
    """``(rms_norm(q, q_weight), rms_norm(k, k_weight))``: the row kernels' RMSNorm on each (one
    pass each way per tensor; ``eps`` from q's dtype for both, as the reference's)."""
    eps = rms_eps(eps, q.dtype)
    D = q.shape[-1]
    return row_norm.rms_norm(q, (D,), q_weight, eps), row_norm.rms_norm(k, (D,), k_weight, eps)


# ---- sandwich --------------------------------------------------------------------------


def _effective(w: Tensor | None, offset: float, acc: type, D: int) -> np.ndarray:
    """``w + offset`` in the statistics dtype (a missing weight is 1, whatever the offset)."""
    p = param(w, acc, D, 1)
    return p if w is None or offset == 0 else p + p.dtype.type(offset)


def _sandwich_fwd_impl(hidden: Tensor, residual: Tensor, post_weight: Tensor | None, next_weight: Tensor | None,
                       eps: float, offset: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    M, D = hidden.shape
    acc = acc_np_dtype(hidden.dtype)
    y, rout = _pages.empty_like(hidden), _pages.empty_like(residual)
    rstd1 = torch.empty(M, dtype=acc_dtype(hidden.dtype))
    rstd2 = torch.empty(M, dtype=acc_dtype(hidden.dtype))
    split_run(k.sandwich_fwd, M, M * D, as_array(hidden), as_array(residual), _effective(post_weight, offset, acc, D),
              _effective(next_weight, offset, acc, D), float(eps), as_array(y), as_array(rout), rstd1.numpy(),
              rstd2.numpy())
    return y, rout, rstd1, rstd2


def _sandwich_bwd_impl(dy: Tensor, drout: Tensor | None, hidden: Tensor, rout: Tensor, post_weight: Tensor | None,
                       next_weight: Tensor | None, rstd1: Tensor, rstd2: Tensor, offset: float, want_dw1: bool,
                       want_dw2: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    M, D = hidden.shape
    acc = acc_np_dtype(hidden.dtype)
    dy = dy.to(hidden.dtype).contiguous()
    dro = as_array(drout.to(hidden.dtype).contiguous()) if drout is not None else _no_rows(hidden)
    block = row_norm._bwd_block(M)
    blocks = -(-M // block)
    dh, dres = _pages.empty_like(hidden), _pages.empty_like(rout)
    dw1p = torch.empty((blocks, D), dtype=rstd1.dtype)
    dw2p = torch.empty((blocks, D), dtype=rstd1.dtype)
    split_run(k.sandwich_bwd, blocks, M * D, as_array(dy), dro, as_array(hidden), as_array(rout),
              _effective(post_weight, offset, acc, D), _effective(next_weight, offset, acc, D), rstd1.numpy(),
              rstd2.numpy(), block, as_array(dh), as_array(dres), dw1p.numpy(), dw2p.numpy())
    dw1, dw2 = _weight_grads(dw1p, dw2p) if want_dw1 or want_dw2 else (dw1p[0, :0], dw2p[0, :0])
    return dh, dres, dw1 if want_dw1 else dw1[:0], dw2 if want_dw2 else dw2[:0]


@torch.library.custom_op("normkit_numba::sandwich_fwd", mutates_args=(), device_types="cpu")
def _sandwich_fwd_op(hidden: Tensor, residual: Tensor, post_weight: Tensor | None, next_weight: Tensor | None,
                     eps: float, offset: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _sandwich_fwd_impl(hidden, residual, post_weight, next_weight, eps, offset)


@_sandwich_fwd_op.register_fake
def _(hidden, residual, post_weight, next_weight, eps, offset):
    M = hidden.shape[0]
    stat = acc_dtype(hidden.dtype)
    return (torch.empty_like(hidden), torch.empty_like(residual), hidden.new_empty(M, dtype=stat),
            hidden.new_empty(M, dtype=stat))


@torch.library.custom_op("normkit_numba::sandwich_bwd", mutates_args=(), device_types="cpu")
def _sandwich_bwd_op(dy: Tensor, drout: Tensor | None, hidden: Tensor, rout: Tensor, post_weight: Tensor | None,
                     next_weight: Tensor | None, rstd1: Tensor, rstd2: Tensor, offset: float, want_dw1: bool,
                     want_dw2: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _sandwich_bwd_impl(dy, drout, hidden, rout, post_weight, next_weight, rstd1, rstd2, offset, want_dw1,
                              want_dw2)


@_sandwich_bwd_op.register_fake
def _(dy, drout, hidden, rout, post_weight, next_weight, rstd1, rstd2, offset, want_dw1, want_dw2):
    D = hidden.shape[1]
    return (torch.empty_like(hidden), torch.empty_like(rout), hidden.new_empty(D if want_dw1 else 0, dtype=rstd1.dtype),
            hidden.new_empty(D if want_dw2 else 0, dtype=rstd1.dtype))


def _sandwich_setup(ctx, inputs, output) -> None:
    hidden, residual, post_weight, next_weight, eps, offset = inputs
    _, rout, rstd1, rstd2 = output
    ctx.save_for_backward(hidden, rout, post_weight, next_weight, rstd1, rstd2)
    ctx.offset, ctx.eps = offset, eps
    ctx.dtypes = tuple(None if w is None else w.dtype for w in (post_weight, next_weight))


def _sandwich_backward(ctx, dy, drout, drstd1, drstd2):
    hidden, rout, post_weight, next_weight, rstd1, rstd2 = ctx.saved_tensors
    need = ctx.needs_input_grad
    if drout is not None and drout.numel() == 0:
        drout = None
    dh, dres, dw1, dw2 = _sandwich_bwd(dy, drout, hidden, rout, post_weight, next_weight, rstd1, rstd2,
                                       ctx.offset, bool(need[2]), bool(need[3]))
    d1, d2 = ctx.dtypes
    return (dh, dres if need[1] else None, dw1.to(d1) if need[2] else None, dw2.to(d2) if need[3] else None,
            None, None)


vmap_by_loop(_sandwich_fwd_op)
vmap_by_loop(_sandwich_bwd_op)
_sandwich_norm, _sandwich_bwd = autograd_pair(_sandwich_fwd_op, _sandwich_setup, _sandwich_backward,
                                              _sandwich_bwd_op, _sandwich_fwd_impl, _sandwich_bwd_impl,
                                              graph_backward=_graph_backward.sandwich)


def sandwich_rms_norm(hidden: Tensor, residual: Tensor, post_weight: Tensor | None, next_weight: Tensor | None,
                      eps: float | None = None, weight_offset: float = 0.0) -> tuple[Tensor, Tensor]:
    """``(y, residual_out)`` of the Gemma sandwich step, one fused kernel each way."""
    D = hidden.shape[-1]
    y, rout, _, _ = _sandwich_norm(hidden.reshape(-1, D).contiguous(), residual.reshape(-1, D).contiguous(),
                                   post_weight, next_weight, rms_eps(eps, hidden.dtype), float(weight_offset))
    return y.view(hidden.shape), without_graph(rout.view(residual.shape), hidden, residual, post_weight)


# ---- normalization-free: DyT and Derf ------------------------------------------------------


def _number(t: Tensor | None, dtype: torch.dtype) -> float:
    """A one-element parameter's value in the statistics dtype (-0 for a missing shift: see
    :func:`_no_bias`)."""
    return -0.0 if t is None else float(t.detach().reshape(()).to(acc_dtype(dtype)))


@functools.lru_cache(maxsize=64)
def _negative_zeros(D: int, dtype: type) -> np.ndarray:
    return np.full(D, -0.0, dtype)


def _no_bias(bias: Tensor | None, acc: type, D: int) -> np.ndarray:
    """The bias the kernel adds: -0 for a missing one. ``v + (-0)`` is ``v`` for every ``v``,
    signed zeros included (``+0`` would turn ``-0`` into ``+0``), so ``dyt(-0.0)`` is ``-0.0``
    as ``torch.tanh`` gives, with no branch in the kernel. (Not :func:`param`'s fill: its cache
    cannot tell -0.0 from 0.0.)"""
    return _negative_zeros(D, acc) if bias is None else param(bias, acc, D, 0)


def _free_fwd_impl(x: Tensor, alpha: Tensor, shift: Tensor | None, weight: Tensor | None, bias: Tensor | None,
                   is_erf: bool) -> Tensor:
    M, D = x.shape
    acc = acc_np_dtype(x.dtype)
    y = _pages.empty_like(x)
    split_run(k.squash_fwd, M, M * D, as_array(x), _number(alpha, x.dtype), _number(shift, x.dtype),
              param(weight, acc, D, 1), _no_bias(bias, acc, D), is_erf, as_array(y))
    return y


def _free_bwd_impl(dy: Tensor, x: Tensor, alpha: Tensor, shift: Tensor | None, weight: Tensor | None,
                   is_erf: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    M, D = x.shape
    dy = dy.to(x.dtype).contiguous()
    block = row_norm._bwd_block(M)
    blocks = -(-M // block)
    stat = acc_dtype(x.dtype)
    dx = _pages.empty_like(x)
    dwp = torch.empty((blocks, D), dtype=stat)
    dbp = torch.empty((blocks, D), dtype=stat)
    dsp = np.empty((blocks, 2))
    split_run(k.squash_bwd, blocks, M * D, as_array(dy), as_array(x), _number(alpha, x.dtype),
              _number(shift, x.dtype), param(weight, acc_np_dtype(x.dtype), D, 1), is_erf, block, as_array(dx),
              dwp.numpy(), dbp.numpy(), dsp)
    dw, db = _weight_grads(dwp, dbp)
    # the blocks' float64 partial sums added exactly rounded (fsum): order-free, so deterministic
    dalpha = torch.tensor(math.fsum(dsp[:, 0]), dtype=torch.float64).to(alpha.dtype).reshape(alpha.shape)
    dshift = x.new_empty(0) if shift is None else \
        torch.tensor(math.fsum(dsp[:, 1]), dtype=torch.float64).to(shift.dtype).reshape(shift.shape)
    return dx, dalpha, dshift, dw, db


@torch.library.custom_op("normkit_numba::squash_fwd", mutates_args=(), device_types="cpu")
def _free_fwd_op(x: Tensor, alpha: Tensor, shift: Tensor | None, weight: Tensor | None, bias: Tensor | None,
                 is_erf: bool) -> Tensor:
    return _free_fwd_impl(x, alpha, shift, weight, bias, is_erf)


@_free_fwd_op.register_fake
def _(x, alpha, shift, weight, bias, is_erf):
    return torch.empty_like(x)


@torch.library.custom_op("normkit_numba::squash_bwd", mutates_args=(), device_types="cpu")
def _free_bwd_op(dy: Tensor, x: Tensor, alpha: Tensor, shift: Tensor | None, weight: Tensor | None,
                 is_erf: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _free_bwd_impl(dy, x, alpha, shift, weight, is_erf)


@_free_bwd_op.register_fake
def _(dy, x, alpha, shift, weight, is_erf):
    stat = acc_dtype(x.dtype)
    D = x.shape[1]
    return (torch.empty_like(x), torch.empty_like(alpha), x.new_empty(0) if shift is None else torch.empty_like(shift),
            x.new_empty(D, dtype=stat), x.new_empty(D, dtype=stat))


def _free_setup(ctx, inputs, output) -> None:
    x, alpha, shift, weight, bias, is_erf = inputs
    ctx.save_for_backward(x, alpha, shift, weight)
    ctx.is_erf = is_erf
    ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)


def _free_backward(ctx, dy):
    x, alpha, shift, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    w_dtype, b_dtype = ctx.dtypes
    dx, dalpha, dshift, dw, db = _free_bwd(dy, x, alpha, shift, weight, ctx.is_erf)
    return (dx, dalpha if need[1] else None, dshift if shift is not None and need[2] else None,
            dw.to(w_dtype) if need[3] else None, db.to(b_dtype) if b_dtype is not None and need[4] else None, None)


vmap_by_loop(_free_fwd_op)
vmap_by_loop(_free_bwd_op)
_free_norm, _free_bwd = autograd_pair(_free_fwd_op, _free_setup, _free_backward, _free_bwd_op, _free_fwd_impl,
                                      _free_bwd_impl, graph_backward=_graph_backward.squash)


def _norm_free(input: Tensor, alpha: Tensor, shift: Tensor | None, weight: Tensor | None, bias: Tensor | None,
               is_erf: bool) -> Tensor:
    """Rows of the trailing dims the parameters cover (the last dim without them), each parameter
    expanded to that row (autograd sums a smaller one's gradient back over the expansion)."""
    nd = max([1, *(p.dim() for p in (weight, bias) if p is not None)])
    trailing = input.shape[input.dim() - nd:]
    D = math.prod(trailing)
    w, b = (None if p is None else p.expand(trailing).reshape(D) for p in (weight, bias))
    y = _free_norm(input.reshape(-1, D).contiguous(), alpha, shift, w, b, is_erf)
    return y.view(input.shape)


def dyt(input: Tensor, alpha: Tensor, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """``weight * tanh(alpha * input) + bias``, one fused kernel each way."""
    return _norm_free(input, alpha, None, weight, bias, False)


def derf(input: Tensor, alpha: Tensor, shift: Tensor, weight: Tensor | None = None,
         bias: Tensor | None = None) -> Tensor:
    """``weight * erf(alpha * input + shift) + bias``, one fused kernel each way."""
    return _norm_free(input, alpha, shift, weight, bias, True)
