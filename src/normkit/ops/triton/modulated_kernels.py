"""The modulated (adaLN) norm kernels: ``y = (x_hat * w + b) * (1 + scale) + shift`` per row.

A kernel sees ``M`` rows of ``N`` elements (the last dim; any row stride, unit element
stride). ``shift`` and ``scale`` are ``(groups, N)`` tables of rows: row ``m`` of x takes
table row ``m // GROUP``, so ``GROUP = 1`` is a modulation per token, ``GROUP = L`` one per
sample of ``(B, L, N)`` input, ``GROUP = M`` one for the whole batch (the launcher turns any
other broadcast into a per-token table).

The statistics are those of :mod:`normkit.ops.triton.row_norm_kernels` and share its helpers
and numerics: taken of ``x - pivot`` (the row's first element, 0 for RMSNorm) in units of a
power of two, merged across tiles with Chan's formula on the chunked path, ``rstd`` IEEE-rounded;
``MEAN`` stores the mean of ``x - pivot``. The norm's output ``z = x_hat * w + b`` is modulated
in fp32 and rounded once.

Backward, per element (``c1 = mean(x_hat * w * dz)``, ``c2 = mean(w * dz)`` over the row, 0 for
RMSNorm)::

    z = x_hat * w + b,   dz = dy * (1 + scale)
    dx = rstd * (w * dz - x_hat * c1 - c2)
    dw = sum dz * x_hat,   db = sum dz,   dshift = sum dy,   dscale = sum dy * z

The weight and bias sums run over every row, those of shift and scale over the rows of their
group. Deterministic, no atomics: a program owns a contiguous block of rows that never straddles
a group boundary of a shift/scale table it reduces (the launcher's ``SEGMENT``), keeps the column
sums in registers and writes them as one row of a ``[programs, N]`` fp32 partial buffer, which the
launcher sums in a fixed order. A per-token (``GROUP = 1``) gradient has nothing to reduce: it is
stored per row, in its own dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl

from normkit.ops.triton.jit_helpers import cast_to, chan_merge, pow2_floor, rstd_of
from normkit.ops.triton.row_norm_kernels import _tile_moments

__all__ = ["modulated_norm_bwd_kernel", "modulated_norm_fwd_kernel"]


@triton.jit
def _columns(s0, N, BLOCK_N: tl.constexpr):
    """int64 column indices of the tile starting at ``s0``, and their mask."""
    cols = (s0 + tl.arange(0, BLOCK_N)).to(tl.int64)
    return cols, cols < N


@triton.jit
def _params(W, B, cols, mask, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The fp32 weight and bias of a tile's columns; 1 and 0 (exact no-ops) where absent."""
    w = 1.0
    b = 0.0
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    return w, b


@triton.jit
def _load_shifted(X_ROW, cols, mask, IS_RMS: tl.constexpr):
    """The tile of ``x - pivot`` in fp32 (masked lanes 0)."""
    x = tl.load(X_ROW + cols, mask=mask, other=0.0).to(tl.float32)
    if not IS_RMS:
        x = tl.where(mask, x - tl.load(X_ROW).to(tl.float32), 0.0)
    return x


@triton.jit
def _store_modulated(Y_ROW, SHIFT_ROW, SCALE_ROW, W, B, x, mean, rstd, cols, mask,
                     HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, RNE_BY_HAND: tl.constexpr):
    w, b = _params(W, B, cols, mask, HAS_WEIGHT, HAS_BIAS)
    z = (x - mean) * rstd * w + b
    scale = tl.load(SCALE_ROW + cols, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(SHIFT_ROW + cols, mask=mask, other=0.0).to(tl.float32)
    y = z * (1.0 + scale) + shift
    tl.store(Y_ROW + cols, cast_to(y, Y_ROW, RNE_BY_HAND), mask=mask)


@triton.jit
def modulated_norm_fwd_kernel(
    X, SHIFT, SCALE, Y, W, B, MEAN, RSTD,
    stride_x, stride_y, stride_shift, stride_scale,
    N, SHIFT_GROUP, SCALE_GROUP, eps,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, SINGLE_BLOCK: tl.constexpr, RNE_BY_HAND: tl.constexpr,
):
    """One program per row: statistics, then the modulated output; stores the row's mean of
    ``x - pivot`` and its rstd."""
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    Y += row * stride_y
    SHIFT += (row // SHIFT_GROUP) * stride_shift
    SCALE += (row // SCALE_GROUP) * stride_scale
    n = N * 1.0  # (not .to(): Triton passes an int argument equal to 1 as a constant)
    if SINGLE_BLOCK:
        cols, mask = _columns(0, N, BLOCK_N)
        x = _load_shifted(X, cols, mask, IS_RMS)
        unit = pow2_floor(tl.max(tl.abs(x)))
        mean_u, m2 = _tile_moments(x * (1.0 / unit), mask, n, IS_RMS)
        mean = mean_u * unit
        rstd = rstd_of(m2 / n, unit, eps)
        _store_modulated(Y, SHIFT, SCALE, W, B, x, mean, rstd, cols, mask, HAS_WEIGHT, HAS_BIAS, RNE_BY_HAND)
    else:
        mean = 0.0
        m2 = 0.0  # in units of unit^2
        unit = 0.0
        count = 0.0
        for s0 in range(0, N, BLOCK_N):
            cols, mask = _columns(s0, N, BLOCK_N)
            x = _load_shifted(X, cols, mask, IS_RMS)
            n_b = tl.minimum(N - s0, BLOCK_N) * 1.0
            unit_b = pow2_floor(tl.max(tl.abs(x)))
            mean_bu, m2_b = _tile_moments(x * (1.0 / unit_b), mask, n_b, IS_RMS)
            mean, m2, unit, count = chan_merge(mean, m2, unit, count, mean_bu, m2_b, unit_b, n_b)
        rstd = rstd_of(m2 / n, unit, eps)
        for s0 in range(0, N, BLOCK_N):
            cols, mask = _columns(s0, N, BLOCK_N)
            x = _load_shifted(X, cols, mask, IS_RMS)
            _store_modulated(Y, SHIFT, SCALE, W, B, x, mean, rstd, cols, mask, HAS_WEIGHT, HAS_BIAS,
                             RNE_BY_HAND)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _grad_terms(X, SCALE, DY, MEAN, RSTD, w, b, row, cols, mask, stride_x, stride_scale, stride_dy,
                SCALE_GROUP, IS_RMS: tl.constexpr):
    """x_hat, dy, z, dz = dy * (1 + scale) and w * dz of one tile of one row, and its rstd (fp32).
    Masked lanes have dy = 0, which zeroes every product and sum."""
    x = _load_shifted(X + row * stride_x, cols, mask, IS_RMS)
    rstd = tl.load(RSTD + row)
    x_hat = (x - tl.load(MEAN + row)) * rstd
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + (row // SCALE_GROUP) * stride_scale + cols, mask=mask, other=0.0).to(tl.float32)
    dz = dy * (1.0 + scale)
    return x_hat, dy, x_hat * w + b, dz, w * dz, rstd


# M (the row count) only bounds loops: not specialized, so a new batch size does not recompile.
@triton.jit(do_not_specialize=["M"])
def modulated_norm_bwd_kernel(
    X, SCALE, W, B, MEAN, RSTD, DY, DX, DSHIFT, DSCALE, DW_PART, DB_PART, ROW_DOTS,
    stride_x, stride_scale, stride_dy, stride_dx, stride_dshift, stride_dscale,
    M, N, SCALE_GROUP, SEGMENT, programs_per_segment, rows_per_program,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    COMPUTE_DSHIFT: tl.constexpr, SHIFT_PER_ROW: tl.constexpr,
    COMPUTE_DSCALE: tl.constexpr, SCALE_PER_ROW: tl.constexpr,
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_N: tl.constexpr, SINGLE_BLOCK: tl.constexpr, RNE_BY_HAND: tl.constexpr,
):
    """A program owns rows ``[start, end)`` of segment ``pid // programs_per_segment`` (a
    segment is ``SEGMENT`` consecutive rows, within one group of every table reduced).

    Writes dx, per-token dshift/dscale (``*_PER_ROW``: to ``DSHIFT[row]``, ``DSCALE[row]``), and
    the program's column sums of the others to row ``pid`` of ``DSHIFT``/``DSCALE``/``DW_PART``/
    ``DB_PART``. A wide row first stores its (c1, c2) in ``ROW_DOTS[row]``; the gradient pass
    walks tile columns outermost so the column sums stay in registers across rows."""
    pid = tl.program_id(0).to(tl.int64)
    segment = pid // programs_per_segment
    row_start = segment * SEGMENT + (pid % programs_per_segment) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, (segment + 1) * SEGMENT)
    n = N * 1.0

    if not SINGLE_BLOCK:
        for row in range(row_start, row_end):
            c1 = 0.0
            c2 = 0.0
            for s0 in range(0, N, BLOCK_N):
                cols, mask = _columns(s0, N, BLOCK_N)
                w, _ = _params(W, B, cols, mask, HAS_WEIGHT, False)
                x_hat, _, _, _, wdz, _ = _grad_terms(X, SCALE, DY, MEAN, RSTD, w, 0.0, row, cols, mask,
                                                     stride_x, stride_scale, stride_dy, SCALE_GROUP, IS_RMS)
                c1 += tl.sum(x_hat * wdz)
                c2 += tl.sum(wdz)
            tl.store(ROW_DOTS + 2 * row, c1 / n)
            tl.store(ROW_DOTS + 2 * row + 1, c2 / n)
        tl.debug_barrier()

    for s0 in range(0, N, BLOCK_N):
        cols, mask = _columns(s0, N, BLOCK_N)
        w, b = _params(W, B, cols, mask, HAS_WEIGHT, HAS_BIAS)  # the same columns for every row
        dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        dshift_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        dscale_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for row in range(row_start, row_end):
            x_hat, dy, z, dz, wdz, rstd = _grad_terms(X, SCALE, DY, MEAN, RSTD, w, b, row, cols, mask,
                                                      stride_x, stride_scale, stride_dy, SCALE_GROUP, IS_RMS)
            if SINGLE_BLOCK:
                c1 = tl.sum(x_hat * wdz) / n
                c2 = tl.sum(wdz) / n
            else:
                c1 = tl.load(ROW_DOTS + 2 * row)
                c2 = tl.load(ROW_DOTS + 2 * row + 1)
            if IS_RMS:
                dx = (wdz - x_hat * c1) * rstd
            else:
                dx = (wdz - (x_hat * c1 + c2)) * rstd
            tl.store(DX + row * stride_dx + cols, cast_to(dx, DX, RNE_BY_HAND), mask=mask)
            if COMPUTE_DSHIFT:
                if SHIFT_PER_ROW:
                    tl.store(DSHIFT + row * stride_dshift + cols, cast_to(dy, DSHIFT, RNE_BY_HAND), mask=mask)
                else:
                    dshift_acc += dy
            if COMPUTE_DSCALE:
                if SCALE_PER_ROW:
                    tl.store(DSCALE + row * stride_dscale + cols, cast_to(dy * z, DSCALE, RNE_BY_HAND),
                             mask=mask)
                else:
                    dscale_acc += dy * z
            if COMPUTE_DW:
                dw_acc += dz * x_hat
            if COMPUTE_DB:
                db_acc += dz
        part = pid * N + cols
        if COMPUTE_DSHIFT and not SHIFT_PER_ROW:
            tl.store(DSHIFT + part, dshift_acc, mask=mask)
        if COMPUTE_DSCALE and not SCALE_PER_ROW:
            tl.store(DSCALE + part, dscale_acc, mask=mask)
        if COMPUTE_DW:
            tl.store(DW_PART + part, dw_acc, mask=mask)
        if COMPUTE_DB:
            tl.store(DB_PART + part, db_acc, mask=mask)
