"""Launchers, ``torch.library`` custom ops and the public Triton DyT and Derf.

Both are one call of two custom ops over the input seen as ``(M, L)`` rows (``L`` the size of
``normalized_shape``; see :mod:`normkit.ops.triton.norm_free_kernels`):

* ``normkit::norm_free_fwd(x, alpha, shift, weight, bias, is_erf) -> y``
* ``normkit::norm_free_bwd(dy, x, alpha, shift, weight, is_erf, <gradient dtypes>) -> (dx, dalpha, dshift, dw, db)``

with fake (meta) implementations, so ``torch.compile(fullgraph=True)`` traces through without a
graph break, called through ``_launch.eager_and_compiled`` as the row norms are (``torch.func``
reverse mode and ``vmap`` work; forward-mode AD is refused with an error; the backward has no
derivative of its own: a double backward runs the torch composition instead).

:func:`dyt` and :func:`derf` take the backend arguments of :mod:`normkit.functional_blocks` and
trust them (checked there and by the backend's ``unsupported`` check). ``weight`` and ``bias`` may
each have any trailing shape of the input: the shorter is broadcast to the longer (a view, made
dense for the kernel) before the launch, and autograd sums its gradient back.

Tile size: up to :data:`TILE` elements per program; ``block_n=`` on the launchers, or
``$NORMKIT_TRITON_BLOCK_N`` read at each launch, caps it (a power of two), which is how the
tests reach rows split across several column blocks with small shapes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from normkit.ops.triton import _graph_backward
from normkit.ops.triton._launch import (
    FP_FUSION,
    block_override,
    cdiv,
    dense,
    device_of,
    eager_and_compiled,
    interpreted,
    next_power_of_2,
    vmap_by_loop,
)
from normkit.ops.triton.norm_free_kernels import norm_free_bwd_kernel, norm_free_fwd_kernel, norm_free_grads_kernel
from normkit.ops.triton.occupancy import resident_programs

__all__ = ["TILE", "derf", "dyt", "norm_free_bwd", "norm_free_fwd"]

# Elements per program. The backward keeps four fp32 accumulator tiles live beside x, dy and the
# squash, so it gets half the forward's tile.
TILE = {"fwd": 4096, "bwd": 2048}
# The gradients' kernel: tiles of GRADS_ROWS partial rows x GRADS_TILE / GRADS_ROWS columns.
GRADS_TILE, GRADS_ROWS = 4096, 16


class _Blocks(NamedTuple):
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int


def _blocks(M: int, L: int, direction: str, block_n: int | None) -> _Blocks:
    """As much of a row as fits in the tile, then as many rows as fit."""
    tile = block_override(block_n) or TILE[direction]
    bn = min(next_power_of_2(L), tile)
    bm = min(next_power_of_2(M), max(1, tile // bn))
    return _Blocks(bm, bn, min(max(bm * bn // 256, 1), 8))


def _rows_contiguous(t: Tensor) -> Tensor:
    """``t`` with unit element stride (its rows may be strided: the kernels take a row stride)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _one(t: Tensor | None) -> Tensor | None:
    """A one-element parameter as the kernel reads it (``P[0]``)."""
    return None if t is None else t.reshape(1)


def norm_free_fwd(x: Tensor, alpha: Tensor, shift: Tensor | None, weight: Tensor | None, bias: Tensor | None,
                  *, is_erf: bool, block_n: int | None = None) -> Tensor:
    """``y = weight * squash(alpha * x + shift) + bias`` over ``x``, an ``(M, L)`` view with unit
    element stride; ``weight``/``bias`` of ``L`` elements. ``y`` is contiguous, in x's dtype."""
    M, L = x.shape
    weight, bias = dense(weight), dense(bias)
    y = torch.empty((M, L), dtype=x.dtype, device=x.device)
    blocks = _blocks(M, L, "fwd", block_n)
    grid = (cdiv(M, blocks.BLOCK_M), cdiv(L, blocks.BLOCK_N))
    with device_of(x):
        norm_free_fwd_kernel[grid](
            x, _one(alpha), _one(shift), weight, bias, y, M, L, x.stride(0),
            IS_ERF=is_erf, HAS_SHIFT=shift is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            BLOCK_M=blocks.BLOCK_M, BLOCK_N=blocks.BLOCK_N, RNE_BY_HAND=interpreted(),
            num_warps=blocks.num_warps, enable_fp_fusion=FP_FUSION,
        )
    return y


def _row_programs(row_blocks: int, col_blocks: int, num_warps: int, device: torch.device) -> int:
    """Row programs of the backward: one wave of resident programs in all
    (:mod:`~normkit.ops.triton.occupancy`; each writes a row of dw/db partials, so more programs
    is more partial traffic); on the CPU interpreter, a few."""
    resident = resident_programs(device, num_warps)
    target = 4 if resident is None else resident
    programs = max(1, min(row_blocks, target // col_blocks))
    return cdiv(row_blocks, cdiv(row_blocks, programs))


def norm_free_bwd(
    dy: Tensor, x: Tensor, alpha: Tensor, shift: Tensor | None, weight: Tensor | None, *, is_erf: bool,
    dx_dtype: torch.dtype | None, dalpha_dtype: torch.dtype | None, dshift_dtype: torch.dtype | None,
    dw_dtype: torch.dtype | None, db_dtype: torch.dtype | None, block_n: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`norm_free_fwd`: ``(dx, dalpha, dshift, dw, db)``, each in the dtype
    asked for, or empty where that dtype is None. ``dx`` is ``(M, L)`` contiguous, ``dalpha`` and
    ``dshift`` have one element, ``dw`` and ``db`` ``L``. The parameter gradients are summed from
    fp32 per-program partials over a fixed shape: bit-reproducible."""
    M, L = x.shape
    dev = x.device
    weight = dense(weight)
    dy = _rows_contiguous(dy)
    blocks = _blocks(M, L, "bwd", block_n)
    row_blocks, col_blocks = cdiv(M, blocks.BLOCK_M), cdiv(L, blocks.BLOCK_N)
    programs = _row_programs(row_blocks, col_blocks, blocks.num_warps, dev)

    def part(shape: tuple[int, ...], dtype: torch.dtype | None) -> Tensor:
        return torch.empty(shape if dtype is not None else (0,), dtype=torch.float32, device=dev)

    dx = torch.empty((M, L) if dx_dtype is not None else (0,), dtype=dx_dtype or x.dtype, device=dev)
    dw_part, db_part = part((programs, L), dw_dtype), part((programs, L), db_dtype)
    dalpha_part, dshift_part = part((programs, col_blocks), dalpha_dtype), part((programs, col_blocks), dshift_dtype)
    with device_of(x):
        norm_free_bwd_kernel[(programs, col_blocks)](
            x, dy, _one(alpha), _one(shift), weight, dx, dw_part, db_part, dalpha_part, dshift_part,
            M, L, x.stride(0), dy.stride(0), cdiv(row_blocks, programs),
            IS_ERF=is_erf, HAS_SHIFT=shift is not None, HAS_WEIGHT=weight is not None,
            COMPUTE_DX=dx_dtype is not None, COMPUTE_DW=dw_dtype is not None, COMPUTE_DB=db_dtype is not None,
            COMPUTE_DALPHA=dalpha_dtype is not None, COMPUTE_DSHIFT=dshift_dtype is not None,
            BLOCK_M=blocks.BLOCK_M, BLOCK_N=blocks.BLOCK_N, RNE_BY_HAND=interpreted(),
            num_warps=blocks.num_warps, enable_fp_fusion=FP_FUSION,
        )

    # The partials summed in a fixed order (the same partials give the same bits on every run)
    # and each gradient rounded to its dtype, in one launch.
    def grad(shape: tuple[int, ...], dtype: torch.dtype | None) -> Tensor:
        return torch.empty(shape if dtype is not None else (0,), dtype=dtype or torch.float32, device=dev)

    dalpha, dshift = grad((1,), dalpha_dtype), grad((1,), dshift_dtype)
    dw, db = grad((L,), dw_dtype), grad((L,), db_dtype)
    if any(d is not None for d in (dalpha_dtype, dshift_dtype, dw_dtype, db_dtype)):
        block = min(next_power_of_2(max(L, 1)), GRADS_TILE // GRADS_ROWS)
        with device_of(x):
            norm_free_grads_kernel[(cdiv(max(L, 1), block),)](
                dw_part, db_part, dalpha_part, dshift_part, dw, db, dalpha, dshift, programs, L, programs * col_blocks,
                COMPUTE_DW=dw_dtype is not None, COMPUTE_DB=db_dtype is not None,
                COMPUTE_DALPHA=dalpha_dtype is not None, COMPUTE_DSHIFT=dshift_dtype is not None,
                BLOCK_P=GRADS_ROWS, BLOCK_N=block, RNE_BY_HAND=interpreted(), num_warps=4,
                enable_fp_fusion=FP_FUSION,
            )
    return dx, dalpha, dshift, dw, db


# ---------------------------------------------------------------------------------------------
# Custom ops: what torch.compile sees.


@torch.library.custom_op("normkit::norm_free_fwd", mutates_args=())
def _norm_free_fwd_op(x: Tensor, alpha: Tensor, shift: Tensor | None, weight: Tensor | None,
                      bias: Tensor | None, is_erf: bool) -> Tensor:
    return norm_free_fwd(x, alpha, shift, weight, bias, is_erf=is_erf)


@_norm_free_fwd_op.register_fake
def _(x, alpha, shift, weight, bias, is_erf):
    return x.new_empty(x.shape)


@torch.library.custom_op("normkit::norm_free_bwd", mutates_args=())
def _norm_free_bwd_op(
    dy: Tensor, x: Tensor, alpha: Tensor, shift: Tensor | None, weight: Tensor | None, is_erf: bool,
    dx_dtype: torch.dtype | None, dalpha_dtype: torch.dtype | None, dshift_dtype: torch.dtype | None,
    dw_dtype: torch.dtype | None, db_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return norm_free_bwd(dy, x, alpha, shift, weight, is_erf=is_erf, dx_dtype=dx_dtype, dalpha_dtype=dalpha_dtype,
                         dshift_dtype=dshift_dtype, dw_dtype=dw_dtype, db_dtype=db_dtype)


@_norm_free_bwd_op.register_fake
def _(dy, x, alpha, shift, weight, is_erf, dx_dtype, dalpha_dtype, dshift_dtype, dw_dtype, db_dtype):
    def grad(shape: tuple[int, ...], dtype: torch.dtype | None) -> Tensor:
        return x.new_empty(shape if dtype is not None else (0,), dtype=dtype or torch.float32)

    L = x.shape[1]
    dx = x.new_empty(x.shape if dx_dtype is not None else (0,), dtype=dx_dtype or x.dtype)
    return dx, grad((1,), dalpha_dtype), grad((1,), dshift_dtype), grad((L,), dw_dtype), grad((L,), db_dtype)


def _setup_context(ctx, inputs, output) -> None:
    x, alpha, shift, weight, bias, is_erf = inputs
    ctx.save_for_backward(x, alpha, shift, weight)
    ctx.is_erf = is_erf
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (x, alpha, shift, weight, bias))


def _backward(ctx, dy):
    x, alpha, shift, weight = ctx.saved_tensors
    dtypes = [dtype if need else None for dtype, need in zip(ctx.dtypes, ctx.needs_input_grad, strict=False)]
    if not any(dtypes):
        return (None,) * 6
    dx, dalpha, dshift, dw, db = _norm_free_backward(dy, x, alpha, shift, weight, ctx.is_erf, *dtypes)
    dalpha = dalpha.view(alpha.shape) if dtypes[1] else None
    dshift = dshift.view(shift.shape) if dtypes[2] else None
    return (dx if dtypes[0] else None, dalpha, dshift, dw if dtypes[3] else None, db if dtypes[4] else None, None)


torch.library.register_autograd("normkit::norm_free_fwd", _backward, setup_context=_setup_context)
vmap_by_loop(_norm_free_fwd_op)
vmap_by_loop(_norm_free_bwd_op)
_norm_free, _norm_free_backward = eager_and_compiled(_norm_free_fwd_op, _setup_context, _backward,
                                                     _norm_free_bwd_op, graph_backward=_graph_backward.squash)


# ---------------------------------------------------------------------------------------------
# The public functions, with normkit.functional's signatures.


def _squash(input: Tensor, alpha: Tensor, shift: Tensor | None, weight: Tensor | None, bias: Tensor | None,
            is_erf: bool) -> Tensor:
    shape = input.shape[-1:]  # rows of the last dim, or of the longer trailing shape of weight and bias
    for p in (weight, bias):
        if p is not None and p.dim() > len(shape):
            shape = p.shape
    L = math.prod(shape)
    # reshape is a view whenever the rows are evenly strided; it copies only when no single row
    # stride describes the input.
    rows = _rows_contiguous(input.reshape(-1, L))
    weight, bias = (None if p is None else p.expand(shape).reshape(L) for p in (weight, bias))
    return _norm_free(rows, alpha, shift, weight, bias, is_erf).view(input.shape)


def dyt(input: Tensor, alpha: Tensor, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """``weight * tanh(alpha * input) + bias`` (:func:`normkit.functional.dyt`) in one Triton
    kernel per direction."""
    return _squash(input, alpha, None, weight, bias, False)


def derf(input: Tensor, alpha: Tensor, shift: Tensor, weight: Tensor | None = None,
         bias: Tensor | None = None) -> Tensor:
    """``weight * erf(alpha * input + shift) + bias`` (:func:`normkit.functional.derf`) in one
    Triton kernel per direction."""
    return _squash(input, alpha, shift, weight, bias, True)
