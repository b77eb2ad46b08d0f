"""The row norms on numba kernels: LayerNorm, RMSNorm, their residual-add forms and ``normalize``.

Each norm is one call of two ``torch.library`` custom ops over an ``(M, L)`` view of its
input (the rows are the leading indices, ``L`` the product of ``normalized_shape``):

* ``normkit_numba::row_fwd(x, residual, weight, bias, eps, is_rms, store_residual)
  -> (y, residual_out, mean, rstd)``
* ``normkit_numba::row_bwd(dy, x, weight, mean, rstd, dresidual_out, is_rms, dw, db)
  -> (dx, dw, db)``

Both have fake implementations, so ``torch.compile(fullgraph=True)`` traces through a norm
without a graph break (the kernels stay opaque to Inductor). The kernels themselves are in
:mod:`normkit.ops.numba._row_kernels`; threads and dtypes in :mod:`normkit.ops.numba._engine`.

The functions take ``torch.nn.functional``'s arguments and trust them: ``normkit.functional``
has checked them and the backend's ``unsupported`` check (:mod:`normkit.ops.numba.backend`)
has accepted the call (CPU tensors of float32, float64 or bfloat16).

Numerics: statistics in float32 (float64 for float64 input), bf16 read and written as bits
and rounded once (to nearest even); each row's result is bit-identical whatever the other
rows and the thread count (see :mod:`normkit.ops.numba._row_kernels`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from numba import types
from numba.extending import overload
from torch import Tensor

from normkit.numerics import rms_eps
from normkit.ops._autograd import eager_plain, recording, vmap_by_loop
from normkit.ops.numba import _engine, _graph_backward, _pages
from normkit.ops.numba import _row_kernels as k
from normkit.ops.numba._engine import array_at, decode, element_like, jit, param_tensor, split_run
from normkit.ops.numba._functions import autograd_pair, eager_function

__all__ = [
    "AddNormOutput",
    "add_layer_norm",
    "add_rms_norm",
    "layer_norm",
    "normalize",
    "rms_norm",
]

# Rows per block of the backward's weight/bias partial sums: up to MAX_BLOCKS rows one block
# (summed straight into dw/db: 17x4096 float32 on one thread, 1.45x less CPU time than two
# blocks and their sum); beyond, at most MAX_BLOCKS blocks, so the partials stay small beside
# the input, of at least MIN_BLOCK_ROWS rows, so that zeroing a block's partial rows and adding
# them up afterwards stays small beside the block's rows (LayerNorm backward, 64x4096 float32,
# one thread: 32 blocks of 2 rows 2.65x the CPU time of 4 blocks of 16). The size depends on
# the number of rows alone, never on the threads.
MAX_BLOCKS = 32
MIN_BLOCK_ROWS = 16


class AddNormOutput(NamedTuple):
    y: Tensor  # norm(residual_out), in x's dtype
    residual_out: Tensor  # x + residual, in x's dtype


@functools.lru_cache(maxsize=64)
def _no_rows(L: int, dtype: np.dtype) -> np.ndarray:
    return np.empty((0, L), dtype)


def _bwd_block(M: int) -> int:
    """Rows per block of the backward's weight/bias partial sums for ``M`` rows."""
    if M <= MAX_BLOCKS:
        return max(1, M)
    return max(MIN_BLOCK_ROWS, -(-M // MAX_BLOCKS))


# ---- launchers: tensors passed by address --------------------------------------------------
# A launcher takes every tensor as its data_ptr() and rebuilds the kernels' arrays inside
# (array_at): .numpy() costs 1-2 us a tensor, five to nine tensors a call, several times the
# kernel itself at small shapes. ``like``/``acc`` (element_like) type the elements and the
# statistics. A statistics address of 0 means "not kept" (a no-grad forward): per-call scratch.


@jit(inline="always")
def _stats_at(address, M, acc):
    if address == 0:
        return np.empty(M, acc.dtype)
    return array_at(address, (M,), acc)


def _widened(p, acc):  # pragma: no cover - replaced by the overload inside the launchers
    """A weight or bias row as the kernels read it: itself when float (the statistics dtype),
    else its bf16 bits widened into a new float32 row."""


@overload(_widened)
def _widened_impl(p, acc):
    if isinstance(p.dtype, types.Float):
        return lambda p, acc: p
    return lambda p, acc: decode(p, np.empty(p.shape[0], acc.dtype))


@jit(inline="always")
def _param_at(address, n, plike, acc):
    """The weight or bias of ``n`` elements at ``address`` (``plike``: element_like of its dtype,
    ``acc``'s or bf16's) in the statistics dtype."""
    return _widened(array_at(address, (n,), plike), acc)


@jit(inline="always")
def _partials_at(address, blocks, n, acc):
    if address == 0:  # a gradient not asked for: scratch for the kernel to write
        return np.empty((blocks, n), acc.dtype)
    return array_at(address, (blocks, n), acc)


@jit
def _row_fwd_ln_at(x, res, rout, w, b, eps, y, mean, rstd, M, L, n_res, n_rout, like, acc, wlike, blike, lo, hi):
    k.row_fwd_ln(array_at(x, (M, L), like), array_at(res, (n_res, L), like), array_at(rout, (n_rout, L), like),
                 _param_at(w, L, wlike, acc), _param_at(b, L, blike, acc), eps, array_at(y, (M, L), like),
                 _stats_at(mean, M, acc), _stats_at(rstd, M, acc), lo, hi)


@jit
def _row_fwd_rms_at(x, res, rout, w, b, eps, y, mean, rstd, M, L, n_res, n_rout, like, acc, wlike, blike, lo, hi):
    k.row_fwd_rms(array_at(x, (M, L), like), array_at(res, (n_res, L), like), array_at(rout, (n_rout, L), like),
                  _param_at(w, L, wlike, acc), array_at(b, (0,), acc), eps, array_at(y, (M, L), like),
                  _stats_at(mean, M, acc), _stats_at(rstd, M, acc), lo, hi)


@jit
def _row_bwd_ln_at(dy, x, w, mean, rstd, dres, dx, dwp, dbp, M, L, n_dres, blocks, block, like, acc, wlike, lo, hi):
    k.row_bwd_ln(array_at(dy, (M, L), like), array_at(x, (M, L), like), _param_at(w, L, wlike, acc),
                 array_at(mean, (M,), acc), array_at(rstd, (M,), acc), array_at(dres, (n_dres, L), like),
                 array_at(dx, (M, L), like), _partials_at(dwp, blocks, L, acc), _partials_at(dbp, blocks, L, acc),
                 block, lo, hi)


@jit
def _row_bwd_rms_at(dy, x, w, mean, rstd, dres, dx, dwp, dbp, M, L, n_dres, blocks, block, like, acc, wlike, lo, hi):
    k.row_bwd_rms(array_at(dy, (M, L), like), array_at(x, (M, L), like), _param_at(w, L, wlike, acc),
                  array_at(mean, (M,), acc), array_at(rstd, (M,), acc), array_at(dres, (n_dres, L), like),
                  array_at(dx, (M, L), like), _partials_at(dwp, blocks, L, acc), _partials_at(dbp, blocks, 0, acc),
                  block, lo, hi)


_FWD_AT = {False: _row_fwd_ln_at, True: _row_fwd_rms_at}
_BWD_AT = {False: _row_bwd_ln_at, True: _row_bwd_rms_at}
_BF16_LIKE = element_like(torch.bfloat16)


class _Types(NamedTuple):
    stat: torch.dtype  # of the statistics, partial sums and parameters as the kernels read them
    stat_size: int  # its bytes
    like: np.ndarray  # element_like of the input
    acc: np.ndarray  # element_like of stat


_TYPES = {
    dtype: _Types(stat, stat.itemsize, element_like(dtype), element_like(stat))
    for dtype, stat in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                        (torch.float64, torch.float64))
}


def _param(p: Tensor | None, t: _Types, L: int, fill: float) -> tuple[Tensor, np.ndarray]:
    """``(tensor, like)``: a weight or bias as a launcher passes it. A contiguous bf16 one under
    float32 statistics as it is (its launcher widens it: a bf16 ``.to(float32)`` of each
    parameter costs 4-5 us a call, half of LayerNorm's forward at 8x4096); any other through
    :func:`~normkit.ops.numba._engine.param_tensor`, in the statistics dtype."""
    if p is not None and p.dtype is torch.bfloat16 and t.stat is torch.float32 and p.is_contiguous():
        return p, _BF16_LIKE
    return param_tensor(p, t.stat, L, fill), t.acc


def _empty_like(x: Tensor, n: int) -> Tensor:
    """An output like ``x`` (``n`` elements): below ``_engine.PARALLEL_MIN_ELEMENTS`` (read at
    each call: tests lower it) a plain ``torch.empty_like``, far below :mod:`._pages`' thresholds
    (0.5 us less of a 3.5-4 us launch at (8, 64)); else :func:`._pages.empty_like`."""
    return torch.empty_like(x) if n < _engine.PARALLEL_MIN_ELEMENTS else _pages.empty_like(x)


def _launch_fwd(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None, eps: float,
             is_rms: bool, store_residual: bool, L: int, mean_at: int, rstd_at: int) -> tuple[Tensor, Tensor | None]:
    """``(y, residual_out)`` of rows of ``L`` elements of ``x`` (any shape; ``residual_out``
    None unless ``store_residual``), the statistics written at ``mean_at``/``rstd_at``
    (addresses of ``M`` values in the statistics dtype; 0: not kept)."""
    t = _TYPES[x.dtype]
    if not x.is_contiguous():
        x = x.contiguous()
    n = x.numel()
    M = n // L
    y = _empty_like(x, n)
    rout = _empty_like(x, n) if store_residual else None
    n_res = 0 if residual is None else M
    if n_res and not residual.is_contiguous():
        residual = residual.contiguous()
    w, wlike = _param(weight, t, L, 1.0)
    b, blike = (None, t.acc) if is_rms else _param(bias, t, L, 0.0)  # RMS kernels take no bias
    args = (x.data_ptr(), residual.data_ptr() if n_res else 0, 0 if rout is None else rout.data_ptr(), w.data_ptr(),
            0 if b is None else b.data_ptr(), float(eps), y.data_ptr(), mean_at, rstd_at, M, L, n_res,
            0 if rout is None else M, t.like, t.acc, wlike, blike)
    split_run(_FWD_AT[is_rms], M, n, *args)  # (a small call: one call on this thread, no pool)
    return y, rout


def _launch_bwd(dy: Tensor, x: Tensor, weight: Tensor | None, mean_at: int, rstd_at: int,
              dresidual_out: Tensor | None, is_rms: bool, want_dw: bool, want_db: bool, L: int,
              param_shape: Sequence[int]) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(dx, dw, db)`` of :func:`_launch_fwd` (``dx`` plus ``dresidual_out``, the gradient that
    reached ``residual_out``, when given), from the statistics at ``mean_at``/``rstd_at``; ``dw``
    and ``db`` of ``param_shape`` in the statistics dtype, None where not wanted.

    The weight/bias gradients are summed per block of ``_bwd_block(M)`` rows (in row order),
    then over the blocks in block order: the blocks depend on ``M`` alone, so ``dw`` and ``db``
    have the same bits at any thread count. Up to :data:`MAX_BLOCKS` rows there is one block,
    summed into ``dw`` and ``db`` directly (no partials, no second kernel), on one thread.

    Numerics change of the 16-row minimum: from 33 to 511 rows the blocks are larger than they
    were (2 rows at 64, now 16), so ``dw``/``db`` differ from earlier versions in their last
    bits there; ``dx`` never depends on the blocks, and stays batch-invariant."""
    t = _TYPES[x.dtype]
    if not x.is_contiguous():
        x = x.contiguous()
    n = x.numel()
    M = n // L
    if dy.dtype is not x.dtype or not dy.is_contiguous():
        dy = dy.to(x.dtype).contiguous()
    n_dres = 0
    if dresidual_out is not None:
        n_dres = M
        if dresidual_out.dtype is not x.dtype or not dresidual_out.is_contiguous():
            dresidual_out = dresidual_out.to(x.dtype).contiguous()
    dx = _empty_like(x, n)
    w, wlike = _param(weight, t, L, 1.0)
    kernel = _BWD_AT[is_rms]
    args = (dy.data_ptr(), x.data_ptr(), w.data_ptr(), mean_at, rstd_at,
            dresidual_out.data_ptr() if n_dres else 0, dx.data_ptr())
    block = _bwd_block(M)
    blocks = -(-M // block)
    if blocks <= 1:  # (M = 0 too: block 0, of no rows, leaves dw and db zero)
        # empty_like of the weight as the kernel reads it, where it has their shape: with dx's
        # plain empty_like, 1.5-3 us of the launcher's 7-9 us at (8, 64) (torch.empty(shape,
        # dtype=...) parses its arguments).
        like = w.dtype is t.stat and w.shape == param_shape  # (a bf16 weight is passed as it is)
        dw = db = None
        if want_dw:
            dw = torch.empty_like(w) if like else torch.empty(param_shape, dtype=t.stat)
        if want_db and not is_rms:
            db = torch.empty_like(w) if like else torch.empty(param_shape, dtype=t.stat)
        kernel(*args, 0 if dw is None else dw.data_ptr(), 0 if db is None else db.data_ptr(),
               M, L, n_dres, 1, M, t.like, t.acc, wlike, 0, 1)
        return dx, dw, db
    # RMS has no bias: no bias partials (the kernel never touches them).
    dwp = torch.empty((blocks, L), dtype=t.stat)
    dbp = torch.empty((blocks, 0 if is_rms else L), dtype=t.stat)
    split_run(kernel, blocks, M * L, *args, dwp.data_ptr(), dbp.data_ptr(), M, L, n_dres, blocks, block,
              t.like, t.acc, wlike)
    if not (want_dw or want_db):
        return dx, None, None
    dw = torch.empty(param_shape, dtype=t.stat)
    db = torch.empty(param_shape if want_db else (0,), dtype=t.stat)
    dbp_a = dbp.numpy() if want_db else dbp.numpy()[:, :0]
    split_run(k.sum_blocks, L, blocks * L, dwp.numpy(), dbp_a, dw.numpy().reshape(-1), db.numpy().reshape(-1))
    return dx, dw if want_dw else None, db if want_db else None


def _row_fwd_impl(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None,
                  eps: float, is_rms: bool, store_residual: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    M, L = x.shape
    stat = _TYPES[x.dtype].stat
    mean = torch.empty(M, dtype=stat)
    rstd = torch.empty(M, dtype=stat)
    y, residual_out = _launch_fwd(x, residual, weight, bias, eps, is_rms, store_residual, L,
                               mean.data_ptr(), rstd.data_ptr())
    return y, x.new_empty((0, L)) if residual_out is None else residual_out, mean, rstd


def _row_bwd_impl(dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor,
                  dresidual_out: Tensor | None, is_rms: bool, want_dw: bool,
                  want_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    L = x.shape[1]
    mean, rstd = mean.contiguous(), rstd.contiguous()
    dx, dw, db = _launch_bwd(dy, x, weight, mean.data_ptr(), rstd.data_ptr(), dresidual_out, is_rms,
                           want_dw, want_db, L, (L,))
    # (a custom op's results may not alias one another: a fresh empty tensor for each)
    return dx, mean.new_empty(0) if dw is None else dw, mean.new_empty(0) if db is None else db


# ---- custom ops: what torch.compile sees ---------------------------------------------------


@torch.library.custom_op("normkit_numba::row_fwd", mutates_args=(), device_types="cpu")
def _row_fwd_op(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None,
                eps: float, is_rms: bool, store_residual: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _row_fwd_impl(x, residual, weight, bias, eps, is_rms, store_residual)


@_row_fwd_op.register_fake
def _(x, residual, weight, bias, eps, is_rms, store_residual):
    M, L = x.shape
    stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    residual_out = torch.empty_like(x) if store_residual else x.new_empty((0, L))
    return torch.empty_like(x), residual_out, x.new_empty(M, dtype=stat_dtype), x.new_empty(M, dtype=stat_dtype)


@torch.library.custom_op("normkit_numba::row_bwd", mutates_args=(), device_types="cpu")
def _row_bwd_op(dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor,
                dresidual_out: Tensor | None, is_rms: bool, want_dw: bool,
                want_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _row_bwd_impl(dy, x, weight, mean, rstd, dresidual_out, is_rms, want_dw, want_db)


@_row_bwd_op.register_fake
def _(dy, x, weight, mean, rstd, dresidual_out, is_rms, want_dw, want_db):
    L = x.shape[1]
    return (torch.empty_like(x), x.new_empty(L if want_dw else 0, dtype=mean.dtype),
            x.new_empty(L if want_db else 0, dtype=mean.dtype))


def _setup_context(ctx, inputs, output) -> None:
    x, residual, weight, bias, eps, is_rms, store_residual = inputs
    _, residual_out, mean, rstd = output
    ctx.save_for_backward(residual_out if store_residual else x, weight, mean, rstd)
    ctx.is_rms, ctx.store_residual, ctx.eps = is_rms, store_residual, eps
    ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)


def _backward(ctx, dy, dresidual_out, dmean, drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    w_dtype, b_dtype = ctx.dtypes
    if not ctx.store_residual or dresidual_out is None or dresidual_out.numel() == 0:
        dresidual_out = None
    dx, dw, db = _row_bwd(dy, x, weight, mean, rstd, dresidual_out, ctx.is_rms,
                          bool(need[2]), bool(need[3]))
    return (dx, dx if need[1] else None, dw.to(w_dtype) if need[2] else None,
            db.to(b_dtype) if need[3] else None, None, None, None)


vmap_by_loop(_row_fwd_op)
vmap_by_loop(_row_bwd_op)
_row_norm, _row_bwd = autograd_pair(_row_fwd_op, _setup_context, _backward, _row_bwd_op,
                                   _row_fwd_impl, _row_bwd_impl, graph_backward=_graph_backward.row)


# ---- eager calls: one autograd Function, no custom op ----------------------------------------


def _eager_forward(ctx, x, residual, weight, bias, eps, is_rms, store_residual, L, param_shape):
    """Forward of the row norms' eager Function (:func:`_apply_row_norm`): the kernels on the
    tensors as they are (rows of ``L``, any leading shape), the statistics in one saved tensor.
    Returns ``y``, or ``(y, residual_out)`` where ``store_residual``."""
    M = x.numel() // L
    t = _TYPES[x.dtype]
    stats = torch.empty(2 * M, dtype=t.stat)  # mean, then rstd
    at = stats.data_ptr()
    y, rout = _launch_fwd(x, residual, weight, bias, eps, is_rms, store_residual, L, at, at + M * t.stat_size)
    ctx.save_for_backward(x if rout is None else rout, weight, stats)
    ctx.set_materialize_grads(False)
    ctx.eps, ctx.is_rms, ctx.store_residual, ctx.L, ctx.param_shape = eps, is_rms, store_residual, L, param_shape
    ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
    return y if rout is None else (y, rout)


def _eager_backward(ctx, dy, dresidual_out=None):
    x, weight, stats = ctx.saved_tensors
    need = ctx.needs_input_grad
    if dy is None:  # only residual_out reached the loss
        dy = torch.zeros_like(x)
    at = stats.data_ptr()
    dx, dw, db = _launch_bwd(dy, x, weight, at, at + (stats.numel() // 2) * stats.element_size(), dresidual_out,
                             ctx.is_rms, need[2], need[3], ctx.L, ctx.param_shape)
    w_dtype, b_dtype = ctx.dtypes
    if dw is not None and dw.dtype is not w_dtype:
        dw = dw.to(w_dtype)
    if db is not None and db.dtype is not b_dtype:
        db = db.to(b_dtype)
    return dx, dx if need[1] else None, dw, db, None, None, None, None, None


class _FlatCtx(NamedTuple):
    """What :func:`normkit.ops.numba._graph_backward.row` reads of the custom op's ctx, from
    the eager Function's: the saved rows as ``(M, L)``, the weight flat."""

    saved_tensors: tuple[Tensor | None, ...]
    needs_input_grad: tuple[bool, ...]
    dtypes: tuple[torch.dtype | None, torch.dtype | None]
    eps: float
    is_rms: bool
    store_residual: bool


def _graph_grads(ctx, dy: Tensor | None, dresidual_out: Tensor | None = None) -> tuple[Tensor | None, ...]:
    """The eager Function's gradients in differentiable torch operations (a backward that
    builds a graph): the custom op's formula on the rows, reshaped back."""
    x, weight, _ = ctx.saved_tensors
    L = ctx.L

    def rows(t):
        return None if t is None else t.reshape(-1, L)

    flat = _FlatCtx((rows(x), None if weight is None else weight.reshape(-1), None, None), ctx.needs_input_grad,
                    ctx.dtypes, ctx.eps, ctx.is_rms, ctx.store_residual)
    dx, dres, dw, db, *_ = _graph_backward.row(flat, rows(dy), rows(dresidual_out), None, None)
    shape = x.shape
    return (None if dx is None else dx.reshape(shape), None if dres is None else dres.reshape(shape),
            None if dw is None else dw.reshape(ctx.param_shape), None if db is None else db.reshape(ctx.param_shape),
            None, None, None, None, None)


# The row norms' autograd in eager code on plain tensors (:func:`eager_plain`), called with
# ``(x, residual, weight, bias, eps, is_rms, store_residual, L, param_shape)``: no custom-op
# dispatch, the tensors as they are. The custom ops' Function (``_row_norm``) serves torch.func,
# whose transforms need its vmap rule and ``setup_context``; compiled code calls the ops.
_apply_row_norm = eager_function("RowNorm", _eager_forward, _eager_backward, _graph_grads)


# ---- the norms, with torch.nn.functional's signatures ------------------------------------------


def _trailing_norm(x: Tensor, residual: Tensor | None, normalized_shape: Sequence[int],
                   weight: Tensor | None, bias: Tensor | None, eps: float, is_rms: bool,
                   store_residual: bool) -> tuple[Tensor, Tensor | None]:
    """``(y, residual_out)`` (``residual_out`` None unless ``store_residual``)."""
    L = math.prod(normalized_shape)
    if eager_plain(x, residual, weight, bias):
        if recording(x, residual, weight, bias):
            if not x.is_contiguous():  # (recorded: the copy's gradient flows back to x)
                x = x.contiguous()
            if residual is not None and not residual.is_contiguous():
                residual = residual.contiguous()
            out = _apply_row_norm(x, residual, weight, bias, eps, is_rms, store_residual, L, normalized_shape)
            return out if store_residual else (out, None)
        return _launch_fwd(x, residual, weight, bias, eps, is_rms, store_residual, L, 0, 0)
    rows = x.reshape(-1, L).contiguous()
    res_rows = None if residual is None else residual.reshape(-1, L).contiguous()
    flat = (None if p is None else p.reshape(-1) for p in (weight, bias))
    y, residual_out, _, _ = _row_norm(rows, res_rows, *flat, eps, is_rms, store_residual)
    return y.view(x.shape), residual_out.view(x.shape) if store_residual else None


def layer_norm(input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """``torch.nn.functional.layer_norm``, one fused kernel per direction."""
    return _trailing_norm(input, None, normalized_shape, weight, bias, eps, False, False)[0]


def rms_norm(input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None = None,
             eps: float | None = None) -> Tensor:
    """``torch.nn.functional.rms_norm``; ``eps=None`` is the machine epsilon of the statistics'
    dtype (float32 for bf16 input), as torch's."""
    eps = rms_eps(eps, input.dtype)
    return _trailing_norm(input, None, normalized_shape, weight, None, eps, True, False)[0]


def _add_norm(x, residual, normalized_shape, weight, bias, eps, is_rms, residual_dtype) -> tuple[Tensor, Tensor]:
    dtype = residual_dtype or x.dtype
    if dtype != x.dtype or (residual is not None and residual.dtype != x.dtype):
        # Mixed precisions (a float32 residual stream under bf16 activations): the sum in its
        # own dtype first, then the plain norm of it, y rounded to x's dtype.
        residual_out = x.to(dtype) if residual is None else x.to(dtype) + residual.to(dtype)
        if is_rms:
            y = rms_norm(residual_out, normalized_shape, weight, eps)
        else:
            y = layer_norm(residual_out, normalized_shape, weight, bias, eps)
        return y.to(x.dtype), residual_out
    if is_rms:
        eps = rms_eps(eps, x.dtype)
    # A plain tuple, as every backend returns (normkit.functional splits exactly tuples).
    return _trailing_norm(x, residual, normalized_shape, weight, bias, eps, is_rms, True)


def add_layer_norm(x: Tensor, residual: Tensor | None, normalized_shape: Sequence[int],
                   weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5,
                   residual_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """``(y, residual_out)``: ``residual_out = x + residual`` and ``y = layer_norm(residual_out)`` in one pass (x and
    residual read once; the gradient reaching ``residual_out`` is added in the same backward
    pass). A residual or ``residual_dtype`` of another dtype than x's is summed first."""
    return _add_norm(x, residual, normalized_shape, weight, bias, eps, False, residual_dtype)


def add_rms_norm(x: Tensor, residual: Tensor | None, normalized_shape: Sequence[int],
                 weight: Tensor | None = None, eps: float | None = None,
                 residual_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """As :func:`add_layer_norm`, with RMSNorm."""
    return _add_norm(x, residual, normalized_shape, weight, None, eps, True, residual_dtype)


def normalize(input: Tensor, dims: tuple[int, ...], weight: Tensor | None = None,
              bias: Tensor | None = None, eps: float = 1e-5, center: bool = True) -> Tensor:
    """``normkit.functional.normalize``: ``dims`` moved last (a view; already contiguous rows
    for a channels_last input normalized over its channels), the layer_norm (``center``) or
    rms_norm kernel over them, moved back. A contiguous input gets a contiguous output (a
    copy); RMS with a bias adds it afterwards."""
    n = len(dims)
    last = tuple(range(input.dim() - n, input.dim()))
    moved = input.movedim(dims, last)
    shape = tuple(moved.shape[-n:])
    if center:
        y = layer_norm(moved, shape, weight, bias, eps)
    else:
        y = rms_norm(moved, shape, weight, eps)
        if bias is not None:
            y = y + bias.to(y.dtype)
    y = y.movedim(last, dims)
    return y.contiguous() if input.is_contiguous() else y
