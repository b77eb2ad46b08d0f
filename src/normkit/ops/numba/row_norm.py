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
from torch import Tensor

from normkit.numerics import rms_eps
from normkit.ops._autograd import vmap_by_loop
from normkit.ops.numba import _graph_backward
from normkit.ops.numba import _row_kernels as k
from normkit.ops.numba._engine import (
    acc_np_dtype,
    as_array,
    autograd_pair,
    param,
    split_run,
)

__all__ = [
    "AddNormOutput",
    "add_layer_norm",
    "add_rms_norm",
    "layer_norm",
    "normalize",
    "rms_norm",
]

# Rows per block of the backward's weight/bias partial sums: at most this many blocks, so the
# partials stay small beside the input, and the block size depends on the shape alone.
MAX_BLOCKS = 32


class AddNormOutput(NamedTuple):
    y: Tensor  # norm(residual_out), in x's dtype
    residual_out: Tensor  # x + residual, in x's dtype


def _none_rows(like: np.ndarray) -> np.ndarray:
    return _no_rows(like.shape[1], like.dtype)


@functools.lru_cache(maxsize=64)
def _no_rows(L: int, dtype: np.dtype) -> np.ndarray:
    return np.empty((0, L), dtype)


def _bwd_block(M: int) -> int:
    return max(1, -(-M // MAX_BLOCKS))


def _row_fwd_impl(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None,
                  eps: float, is_rms: bool, store_residual: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    M, L = x.shape
    acc = acc_np_dtype(x.dtype)
    stat_dtype = torch.float64 if acc is np.float64 else torch.float32
    y = torch.empty_like(x)
    mean = torch.empty(M, dtype=stat_dtype)
    rstd = torch.empty(M, dtype=stat_dtype)
    xa = as_array(x)
    none = _none_rows(xa)
    if store_residual:
        residual_out = torch.empty_like(x)
        rout = as_array(residual_out)
    else:
        residual_out, rout = x.new_empty((0, L)), none
    res = none if residual is None else as_array(residual)
    b = param(None if is_rms else bias, acc, 0 if is_rms else L, 0)  # RMS kernels take no bias
    split_run(k.ROW_FWD[is_rms], M, M * L, xa, res, rout, param(weight, acc, L, 1), b, float(eps),
              as_array(y), mean.numpy(), rstd.numpy())
    return y, residual_out, mean, rstd


def _row_bwd_impl(dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor,
                  dresidual_out: Tensor | None, is_rms: bool, want_dw: bool,
                  want_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    M, L = x.shape
    acc = acc_np_dtype(x.dtype)
    if dy.dtype != x.dtype or not dy.is_contiguous():
        dy = dy.to(x.dtype).contiguous()
    dx = torch.empty_like(x)
    block = _bwd_block(M)
    blocks = -(-M // block)
    part_dtype = mean.dtype
    # RMS has no bias: no bias partials (the kernel never touches them).
    dwp = torch.empty((blocks, L), dtype=part_dtype)
    dbp = torch.empty((blocks, 0 if is_rms else L), dtype=part_dtype)
    xa = as_array(x)
    dres = _none_rows(xa) if dresidual_out is None else as_array(dresidual_out.to(x.dtype).contiguous())
    split_run(k.ROW_BWD[is_rms], blocks, M * L, as_array(dy), xa, param(weight, acc, L, 1), mean.numpy(),
              rstd.numpy(), dres, as_array(dx), dwp.numpy(), dbp.numpy(), block)
    dw = torch.empty(L if want_dw or want_db else 0, dtype=part_dtype)
    db = torch.empty(L if want_db else 0, dtype=part_dtype)
    if want_dw or want_db:
        dbp_a = dbp.numpy() if want_db else dbp.numpy()[:, :0]
        split_run(k.sum_blocks, L, blocks * L, dwp.numpy(), dbp_a, dw.numpy(), db.numpy())
    return dx, dw if want_dw else dw[:0], db


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


# ---- the norms, with torch.nn.functional's signatures ------------------------------------------


def _trailing_norm(x: Tensor, residual: Tensor | None, normalized_shape: Sequence[int],
                   weight: Tensor | None, bias: Tensor | None, eps: float, is_rms: bool,
                   store_residual: bool) -> tuple[Tensor, Tensor]:
    L = math.prod(normalized_shape)
    rows = x.reshape(-1, L).contiguous()
    res_rows = None if residual is None else residual.reshape(-1, L).contiguous()
    flat = (None if p is None else p.reshape(-1) for p in (weight, bias))
    y, residual_out, _, _ = _row_norm(rows, res_rows, *flat, eps, is_rms, store_residual)
    return y.view(x.shape), residual_out.view(x.shape) if store_residual else residual_out


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
