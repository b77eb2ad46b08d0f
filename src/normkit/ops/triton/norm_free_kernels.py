"""The kernels of the normalization-free drop-ins, one pair for DyT and Derf (``IS_ERF``).

``y = w * squash(alpha * x + shift) + b`` is elementwise: a kernel sees the input as ``M`` rows
of ``L`` elements (``L`` the size of ``normalized_shape``: ``w`` and ``b`` are indexed by the
column), any row stride, unit element stride, and a program owns a ``BLOCK_M x BLOCK_N`` tile of
it. The output and the input gradient are written contiguous.

The backward is deterministic: no atomics. A program walks a fixed run of row blocks of one
column block, keeps its sums in fp32 registers, and writes them once: the column sums of
``dy * s`` and ``dy`` (for ``dw``, ``db``) to row ``pid_m`` of ``[programs_m, L]`` buffers, its
scalar sums of ``g * x`` and ``g`` (for ``dalpha``, ``dshift``) to ``[programs_m, programs_n]``
buffers; ``norm_free_grads_kernel`` sums each buffer in a fixed order and rounds each parameter
gradient once, all in one launch.

Numerics:

* Everything in fp32 whatever the input dtype, rounded once at the store (bf16 by hand under the
  interpreter, :func:`~normkit.ops.triton.jit_helpers.cast_to`).
* tanh is computed here from ``exp`` (libdevice's ``tanh`` does not run under Triton's CPU
  interpreter, where the tests run): ``(1 - e) / (1 + e)`` with ``e = exp(-2|u|)`` for
  ``|u| >= 1/4``, and below that its odd Taylor series to ``u^11`` (the first term left out is
  under ``2^-26`` of the result), since ``1 - e`` would cancel: at ``u = 1e-5`` it leaves 3e-3
  relative error, worse than bf16. Its derivative is ``4e / (1 + e)^2``, accurate in relative
  terms also where ``1 - tanh^2`` would cancel (large ``|u|``). NaN propagates; ``u = +-inf``
  gives ``+-1`` and a zero derivative.
* erf is ``tl.math.erf``; its derivative ``2 / sqrt(pi) * exp(-u^2)``.
* Offsets are int64 (row indices are widened before they multiply a stride).
"""

from __future__ import annotations

import triton
import triton.language as tl

from normkit.ops.triton.jit_helpers import cast_to

__all__ = ["norm_free_bwd_kernel", "norm_free_fwd_kernel", "norm_free_grads_kernel"]


@triton.jit
def _tanh(u, e):
    """``tanh(u)`` given ``e = exp(-2|u|)``."""
    a = tl.abs(u)
    a2 = a * a
    # tanh(a) = a - a^3/3 + 2a^5/15 - 17a^7/315 + 62a^9/2835 - 1382a^11/155925 + ...
    series = a * (1.0 + a2 * (-0.3333333333333333 + a2 * (0.13333333333333333 + a2 * (
        -0.05396825396825397 + a2 * (0.021869488536155203 + a2 * -0.008863235529902197)))))
    t = tl.where(a < 0.25, series, (1.0 - e) / (1.0 + e))
    return tl.where(u < 0.0, -t, t)


@triton.jit
def _squash(u, IS_ERF: tl.constexpr):
    """``(squash(u), squash'(u))``: erf or tanh."""
    if IS_ERF:
        s = tl.math.erf(u)
        ds = 1.1283791670955126 * tl.exp(-(u * u))  # 2 / sqrt(pi)
    else:
        e = tl.exp(-2.0 * tl.abs(u))
        s = _tanh(u, e)
        ds = (4.0 * e) / ((1.0 + e) * (1.0 + e))
    return s, ds


@triton.jit
def _tile(row_block, col_block, M, L, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row indices ``[BLOCK_M, 1]`` and column indices ``[1, BLOCK_N]`` (int64: the block
    numbers come in int64) of a tile, and its masks."""
    rows = (row_block * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64))[:, None]
    cols = (col_block * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64))[None, :]
    return rows, cols, rows < M, cols < L


@triton.jit
def _pre_activation(X, ALPHA, SHIFT, x_offs, mask, HAS_SHIFT: tl.constexpr):
    """``(x, u = alpha * x + shift)`` as fp32."""
    x = tl.load(X + x_offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(ALPHA).to(tl.float32) * x
    if HAS_SHIFT:
        u += tl.load(SHIFT).to(tl.float32)
    return x, u


# M is a runtime value that is never specialized: a new batch size does not recompile.
@triton.jit(do_not_specialize=["M"])
def norm_free_fwd_kernel(
    X, ALPHA, SHIFT, W, B, Y,
    M, L, stride_xm,
    IS_ERF: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RNE_BY_HAND: tl.constexpr,
):
    """``Y = W * squash(ALPHA * X + SHIFT) + B`` on the tile ``(program_id(0), program_id(1))``."""
    rows, cols, mask_m, mask_n = _tile(tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), M, L,
                                       BLOCK_M, BLOCK_N)
    mask = mask_m & mask_n
    _, u = _pre_activation(X, ALPHA, SHIFT, rows * stride_xm + cols, mask, HAS_SHIFT)
    y, _ = _squash(u, IS_ERF)
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=mask_n, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(Y + rows * L + cols, cast_to(y, Y, RNE_BY_HAND), mask=mask)


@triton.jit(do_not_specialize=["M"])
def norm_free_bwd_kernel(
    X, DY, ALPHA, SHIFT, W, DX, DW_PART, DB_PART, DALPHA_PART, DSHIFT_PART,
    M, L, stride_xm, stride_dym, row_blocks_per_program,
    IS_ERF: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    COMPUTE_DALPHA: tl.constexpr, COMPUTE_DSHIFT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RNE_BY_HAND: tl.constexpr,
):
    """Program ``(pid_m, pid_n)`` owns row blocks ``[pid_m * row_blocks_per_program, ...)`` of
    column block ``pid_n``. With ``g = dy * w * squash'(u)``: ``dx = alpha * g``; partial sums
    of ``g * x`` (dalpha), ``g`` (dshift), ``dy * s`` (dw) and ``dy`` (db)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    col = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    w = 1.0
    if HAS_WEIGHT:  # the same columns for every row block: loaded once
        w = tl.load(W + col[None, :], mask=col[None, :] < L, other=0.0).to(tl.float32)
    alpha = tl.load(ALPHA).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dalpha_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dshift_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first = pid_m * row_blocks_per_program
    last = tl.minimum(first + row_blocks_per_program, tl.cdiv(M, BLOCK_M))
    for block in range(first, last):
        rows, cols, mask_m, mask_n = _tile(block, pid_n, M, L, BLOCK_M, BLOCK_N)
        mask = mask_m & mask_n
        x, u = _pre_activation(X, ALPHA, SHIFT, rows * stride_xm + cols, mask, HAS_SHIFT)
        dy = tl.load(DY + rows * stride_dym + cols, mask=mask, other=0.0).to(tl.float32)
        s, ds = _squash(u, IS_ERF)
        g = dy * w * ds  # the gradient at u; 0 outside the tile's mask (dy = 0 there)
        if COMPUTE_DX:
            tl.store(DX + rows * L + cols, cast_to(alpha * g, DX, RNE_BY_HAND), mask=mask)
        if COMPUTE_DALPHA:
            dalpha_acc += g * x
        if COMPUTE_DSHIFT:
            dshift_acc += g
        if COMPUTE_DW:
            dw_acc += dy * s
        if COMPUTE_DB:
            db_acc += dy
    part = pid_m * L + col
    if COMPUTE_DW:
        tl.store(DW_PART + part, tl.sum(dw_acc, axis=0), mask=col < L)
    if COMPUTE_DB:
        tl.store(DB_PART + part, tl.sum(db_acc, axis=0), mask=col < L)
    scalar_part = pid_m * tl.num_programs(1) + pid_n
    if COMPUTE_DALPHA:
        tl.store(DALPHA_PART + scalar_part, tl.sum(dalpha_acc))
    if COMPUTE_DSHIFT:
        tl.store(DSHIFT_PART + scalar_part, tl.sum(dshift_acc))


@triton.jit
def _partial_sum(PART, rows, width, cols, BLOCK_P: tl.constexpr):
    """Column sums over the ``rows`` rows of a ``[rows, width]`` fp32 buffer at ``cols``, in a
    fixed order (tiles of BLOCK_P rows, each summed as a tree)."""
    acc = tl.zeros(cols.shape, dtype=tl.float32)
    for p0 in range(0, rows, BLOCK_P):
        p = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)[:, None]
        mask = (p < rows) & (cols[None, :] < width)
        acc += tl.sum(tl.load(PART + p * width + cols[None, :], mask=mask, other=0.0), axis=0)
    return acc


@triton.jit
def norm_free_grads_kernel(
    DW_PART, DB_PART, DALPHA_PART, DSHIFT_PART, DW, DB, DALPHA, DSHIFT,
    P, L, SCALARS,
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, COMPUTE_DALPHA: tl.constexpr,
    COMPUTE_DSHIFT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, RNE_BY_HAND: tl.constexpr,
):
    """The parameter gradients from the backward's partials, each rounded once to its
    parameter's dtype, in one launch (it took a torch sum and a cast a gradient): program j sums
    columns ``[j * BLOCK_N, ...)`` of the ``[P, L]`` weight and bias partials; program 0 also
    the ``SCALARS`` alpha and shift partials."""
    cols = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    if COMPUTE_DW:
        tl.store(DW + cols, cast_to(_partial_sum(DW_PART, P, L, cols, BLOCK_P), DW, RNE_BY_HAND), mask=cols < L)
    if COMPUTE_DB:
        tl.store(DB + cols, cast_to(_partial_sum(DB_PART, P, L, cols, BLOCK_P), DB, RNE_BY_HAND), mask=cols < L)
    if tl.program_id(0) == 0:
        first = tl.arange(0, 1).to(tl.int64)
        if COMPUTE_DALPHA:  # the scalar partials as a [SCALARS, 1] buffer
            total = _partial_sum(DALPHA_PART, SCALARS, 1, first, BLOCK_P)
            tl.store(DALPHA + first, cast_to(total, DALPHA, RNE_BY_HAND))
        if COMPUTE_DSHIFT:
            total = _partial_sum(DSHIFT_PART, SCALARS, 1, first, BLOCK_P)
            tl.store(DSHIFT + first, cast_to(total, DSHIFT, RNE_BY_HAND))
