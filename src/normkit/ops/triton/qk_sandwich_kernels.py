"""The kernels of ``qk_rms_norm`` and ``sandwich_rms_norm``: RMS norms over the last dim of
``(M, D)`` row views (any row stride, unit element stride), one launch each way.

* QK: one grid covers the rows of ``q`` then those of ``k``; a program whose id is below
  ``Q_PROGRAMS`` works on q, the others on k (two instances of the same row code, so q and k may
  differ in dtype, row count and weight). Head dims are short (64 to 256), so a program takes a
  ``BLOCK_M x BLOCK_D`` tile of several rows.
* Sandwich: per row, ``h1 = rms(hidden) * w1`` rounded to hidden's dtype, ``r = residual + h1``
  rounded to and stored in residual's dtype (``RESIDUAL_OUT``), ``y = rms(r) * w2``, with
  ``w = weight + OFFSET`` (Gemma's ``1 + weight``) formed in fp32. The backward reads hidden and
  the stored ``r`` and produces ``d residual`` (the upstream ``d residual_out`` plus what comes
  back through the second norm) and ``d hidden`` through the first norm in the same pass::

      dr = dr_out + rstd2 * (g2 - x_hat2 * mean(g2 * x_hat2)),   g2 = dy * w2
      dh = rstd1 * (g1 - x_hat1 * mean(g1 * x_hat1)),            g1 = dr * w1

  ``dr`` enters the first norm's backward unrounded.

A row that fits one tile (``SINGLE_BLOCK``) is read once per direction. A wider one is walked
in ``BLOCK_D`` column tiles: the forward merges per-tile sums of squares, then normalizes (the
sandwich forward takes three passes: the first norm's statistics, the residual add with the
second norm's statistics, the output); the backward first stores each row's dot products in
``ROW_DOTS``, then computes the gradients.

Numerics: those of the row-norm kernels (:mod:`normkit.ops.triton.jit_helpers`): fp32
accumulation, squares taken of ``x / scale`` with ``scale`` a power of two near the row's
largest ``|x|`` (no overflow or underflow; bit-identical in the ordinary range),
``rstd = 1 / sqrt(mean(x^2) + eps)`` IEEE-rounded (0 where that is ``1 / sqrt(0)``), NaN
propagates, results rounded once to nearest even. Row and column offsets are int64.

The backward is deterministic: no atomics. A program owns a contiguous block of rows of one
tensor and writes its weight-gradient column sums, reduced over its rows in a fixed order, to
its own row of a ``[programs, D]`` fp32 buffer, which the launcher sums in a fixed order.
"""

from __future__ import annotations

import triton
import triton.language as tl

from normkit.ops.triton.jit_helpers import cast_to, pow2_floor, rstd_of

__all__ = ["qk_rms_norm_bwd_kernel", "qk_rms_norm_fwd_kernel", "sandwich_rms_norm_bwd_kernel",
           "sandwich_rms_norm_fwd_kernel"]


@triton.jit
def _tile(m0, d0, M, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows and columns (int64) of the tile at (m0, d0), the column mask and the tile's mask."""
    rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
    mask_d = cols < D
    return rows, cols, mask_d, (rows < M)[:, None] & mask_d[None, :]


@triton.jit
def _owned_rows(part, programs, M, BLOCK_M: tl.constexpr):
    """``[row_start, row_end)`` (int64): the rows backward program ``part`` of ``programs``
    owns, whole tiles of BLOCK_M rows, as even a share as whole tiles allow (so that any number
    of programs, one wave of them, gets work: 4096 rows on 132 programs are 31 or 32 each)."""
    tiles = tl.cdiv(M, BLOCK_M)
    p = part.to(tl.int64)
    row_start = (p * tiles // programs) * BLOCK_M
    return row_start, tl.minimum(((p + 1) * tiles // programs) * BLOCK_M, M)


@triton.jit
def _load(P, rows, cols, stride, mask):
    """A tile of rows of ``P`` (row stride ``stride``, unit element stride) as fp32."""
    return tl.load(P + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store(P, rows, cols, stride, mask, value, RNE_BY_HAND: tl.constexpr):
    tl.store(P + rows[:, None] * stride + cols[None, :], cast_to(value, P, RNE_BY_HAND), mask=mask)


@triton.jit
def _weight(W, cols, mask_d, offset, HAS_WEIGHT: tl.constexpr):
    """``weight + offset`` of the tile's columns in fp32, as a row to broadcast; 1 without one."""
    if HAS_WEIGHT:
        w = (tl.load(W + cols, mask=mask_d, other=0.0).to(tl.float32) + offset)[None, :]
    else:
        w = 1.0
    return w


@triton.jit
def _sumsq(x):
    """Per row of the tile: ``(scale, sum((x / scale)^2))``, scale a power of two."""
    scale = pow2_floor(tl.max(tl.abs(x), axis=1))
    xs = x * (1.0 / scale)[:, None]
    return scale, tl.sum(xs * xs, axis=1)


@triton.jit
def _merge(scale, m2, x):
    """Add a tile's sums of squares to the running ``(scale, m2)`` of each row, at the larger scale
    (Chan's merge with the means at 0)."""
    scale_b, m2_b = _sumsq(x)
    new = tl.maximum(scale, scale_b)
    r_old = scale / new
    r_b = scale_b / new
    return new, m2 * (r_old * r_old) + m2_b * (r_b * r_b)


@triton.jit
def _rms_fwd_rows(X, Y, W, RSTD, tile, M, D, stride_x, stride_y, eps, HAS_WEIGHT: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
                  RNE_BY_HAND: tl.constexpr):
    """``y = x * rstd * w`` for the ``BLOCK_M`` rows of tile ``tile``; stores their rstd."""
    m0 = tile.to(tl.int64) * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
    n = D * 1.0  # (not .to(): Triton passes an int argument equal to 1 as a constant)
    if SINGLE_BLOCK:
        rows, cols, mask_d, mask = _tile(m0, 0, M, D, BLOCK_M, BLOCK_D)
        x = _load(X, rows, cols, stride_x, mask)
        scale, m2 = _sumsq(x)
        rstd = rstd_of(m2 / n, scale, eps)
        _store(Y, rows, cols, stride_y, mask, x * rstd[:, None] * _weight(W, cols, mask_d, 0.0, HAS_WEIGHT),
               RNE_BY_HAND)
    else:
        scale = tl.zeros((BLOCK_M,), dtype=tl.float32)
        m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            rows, cols, mask_d, mask = _tile(m0, d0, M, D, BLOCK_M, BLOCK_D)
            scale, m2 = _merge(scale, m2, _load(X, rows, cols, stride_x, mask))
        rstd = rstd_of(m2 / n, scale, eps)
        for d0 in range(0, D, BLOCK_D):
            rows, cols, mask_d, mask = _tile(m0, d0, M, D, BLOCK_M, BLOCK_D)
            x = _load(X, rows, cols, stride_x, mask)
            _store(Y, rows, cols, stride_y, mask, x * rstd[:, None] * _weight(W, cols, mask_d, 0.0, HAS_WEIGHT),
                   RNE_BY_HAND)
    tl.store(RSTD + rows, rstd, mask=rows < M)


@triton.jit(do_not_specialize=["MQ", "MK"])
def qk_rms_norm_fwd_kernel(
    Q, K, QY, KY, QW, KW, QRSTD, KRSTD,
    stride_q, stride_k, stride_qy, stride_ky,
    MQ, MK, D, Q_PROGRAMS, eps,
    Q_HAS_WEIGHT: tl.constexpr, K_HAS_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_BLOCK: tl.constexpr, RNE_BY_HAND: tl.constexpr,
):
    """Programs ``[0, Q_PROGRAMS)`` normalize tiles of q's rows, the rest tiles of k's."""
    pid = tl.program_id(0)
    if pid < Q_PROGRAMS:
        _rms_fwd_rows(Q, QY, QW, QRSTD, pid, MQ, D, stride_q, stride_qy, eps, Q_HAS_WEIGHT,
                      BLOCK_M, BLOCK_D, SINGLE_BLOCK, RNE_BY_HAND)
    else:
        _rms_fwd_rows(K, KY, KW, KRSTD, pid - Q_PROGRAMS, MK, D, stride_k, stride_ky, eps, K_HAS_WEIGHT,
                      BLOCK_M, BLOCK_D, SINGLE_BLOCK, RNE_BY_HAND)


@triton.jit
def _rms_bwd_rows(X, DY, DX, W, RSTD, DW_PART, ROW_DOTS, part, M, D, programs,
                  stride_x, stride_dy, stride_dx, HAS_WEIGHT: tl.constexpr, COMPUTE_DW: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
                  RNE_BY_HAND: tl.constexpr):
    """The rows program ``part`` of ``programs`` owns (:func:`_owned_rows`) of one tensor: with
    ``c = mean(x_hat * w * dy)``,
    ``dx = (w * dy - x_hat * c) * rstd``; ``sum(dy * x_hat)`` over the rows into ``DW_PART[part]``.
    Column tiles outermost, so the weight-gradient sums stay in registers across rows."""
    row_start, row_end = _owned_rows(part, programs, M, BLOCK_M)
    n = D * 1.0
    if not SINGLE_BLOCK:
        for m0 in range(row_start, row_end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
            c = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                rows, cols, mask_d, mask = _tile(m0, d0, row_end, D, BLOCK_M, BLOCK_D)
                rstd = tl.load(RSTD + rows, mask=rows < row_end, other=0.0)
                x_hat = _load(X, rows, cols, stride_x, mask) * rstd[:, None]
                dy = _load(DY, rows, cols, stride_dy, mask)
                c += tl.sum(x_hat * (_weight(W, cols, mask_d, 0.0, HAS_WEIGHT) * dy), axis=1)
            tl.store(ROW_DOTS + rows, c / n, mask=rows < row_end)
        tl.debug_barrier()
    for d0 in range(0, D, BLOCK_D):
        dw_acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for m0 in range(row_start, row_end, BLOCK_M):
            rows, cols, mask_d, mask = _tile(m0, d0, row_end, D, BLOCK_M, BLOCK_D)
            rstd = tl.load(RSTD + rows, mask=rows < row_end, other=0.0)
            x_hat = _load(X, rows, cols, stride_x, mask) * rstd[:, None]  # masked lanes: 0
            dy = _load(DY, rows, cols, stride_dy, mask)
            wdy = _weight(W, cols, mask_d, 0.0, HAS_WEIGHT) * dy
            if SINGLE_BLOCK:
                c = tl.sum(x_hat * wdy, axis=1) / n
            else:
                c = tl.load(ROW_DOTS + rows, mask=rows < row_end, other=0.0)
            _store(DX, rows, cols, stride_dx, mask, (wdy - x_hat * c[:, None]) * rstd[:, None], RNE_BY_HAND)
            if COMPUTE_DW:
                dw_acc += dy * x_hat
        if COMPUTE_DW:
            cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            tl.store(DW_PART + part.to(tl.int64) * D + cols, tl.sum(dw_acc, axis=0), mask=cols < D)


@triton.jit(do_not_specialize=["MQ", "MK"])
def qk_rms_norm_bwd_kernel(
    Q, K, DQY, DKY, DQ, DK, QW, KW, QRSTD, KRSTD, DQW_PART, DKW_PART, ROW_DOTS,
    stride_q, stride_k, stride_dqy, stride_dky, stride_dq, stride_dk,
    MQ, MK, D, Q_PROGRAMS, K_PROGRAMS,
    Q_HAS_WEIGHT: tl.constexpr, K_HAS_WEIGHT: tl.constexpr, COMPUTE_DQW: tl.constexpr,
    COMPUTE_DKW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
    RNE_BY_HAND: tl.constexpr,
):
    """Programs ``[0, Q_PROGRAMS)`` take blocks of q's rows, the rest blocks of k's (whose row
    dots follow q's ``MQ`` in ``ROW_DOTS``)."""
    pid = tl.program_id(0)
    if pid < Q_PROGRAMS:
        _rms_bwd_rows(Q, DQY, DQ, QW, QRSTD, DQW_PART, ROW_DOTS, pid, MQ, D, Q_PROGRAMS,
                      stride_q, stride_dqy, stride_dq, Q_HAS_WEIGHT, COMPUTE_DQW,
                      BLOCK_M, BLOCK_D, SINGLE_BLOCK, RNE_BY_HAND)
    else:
        _rms_bwd_rows(K, DKY, DK, KW, KRSTD, DKW_PART, ROW_DOTS + MQ, pid - Q_PROGRAMS, MK, D,
                      K_PROGRAMS, stride_k, stride_dky, stride_dk, K_HAS_WEIGHT, COMPUTE_DKW,
                      BLOCK_M, BLOCK_D, SINGLE_BLOCK, RNE_BY_HAND)


@triton.jit
def _post_norm_add(H, RES, R_OUT, W1, rows, cols, mask_d, mask, rstd1, offset, stride_h, stride_res,
                   stride_rout, HAS_W1: tl.constexpr, RNE_BY_HAND: tl.constexpr):
    """``r = residual + round_h(h * rstd1 * w1)``, rounded to and stored in residual's dtype; as fp32."""
    h1 = _load(H, rows, cols, stride_h, mask) * rstd1[:, None] * _weight(W1, cols, mask_d, offset, HAS_W1)
    r = _load(RES, rows, cols, stride_res, mask) + cast_to(h1, H, RNE_BY_HAND).to(tl.float32)
    r = cast_to(r, R_OUT, RNE_BY_HAND)
    tl.store(R_OUT + rows[:, None] * stride_rout + cols[None, :], r, mask=mask)
    return tl.where(mask, r.to(tl.float32), 0.0)


@triton.jit(do_not_specialize=["M"])
def sandwich_rms_norm_fwd_kernel(
    H, RES, Y, R_OUT, W1, W2, RSTD1, RSTD2,
    stride_h, stride_res, stride_y, stride_rout,
    M, D, eps, offset,
    HAS_W1: tl.constexpr, HAS_W2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_BLOCK: tl.constexpr, RNE_BY_HAND: tl.constexpr,
):
    """One tile of ``BLOCK_M`` rows per program: post-norm, residual add, next norm."""
    m0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
    n = D * 1.0
    if SINGLE_BLOCK:
        rows, cols, mask_d, mask = _tile(m0, 0, M, D, BLOCK_M, BLOCK_D)
        scale, m2 = _sumsq(_load(H, rows, cols, stride_h, mask))
        rstd1 = rstd_of(m2 / n, scale, eps)
        r = _post_norm_add(H, RES, R_OUT, W1, rows, cols, mask_d, mask, rstd1, offset, stride_h, stride_res,
                           stride_rout, HAS_W1, RNE_BY_HAND)
        scale, m2 = _sumsq(r)
        rstd2 = rstd_of(m2 / n, scale, eps)
        _store(Y, rows, cols, stride_y, mask, r * rstd2[:, None] * _weight(W2, cols, mask_d, offset, HAS_W2),
               RNE_BY_HAND)
    else:
        scale = tl.zeros((BLOCK_M,), dtype=tl.float32)
        m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            rows, cols, mask_d, mask = _tile(m0, d0, M, D, BLOCK_M, BLOCK_D)
            scale, m2 = _merge(scale, m2, _load(H, rows, cols, stride_h, mask))
        rstd1 = rstd_of(m2 / n, scale, eps)
        scale = tl.zeros((BLOCK_M,), dtype=tl.float32)
        m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            rows, cols, mask_d, mask = _tile(m0, d0, M, D, BLOCK_M, BLOCK_D)
            r = _post_norm_add(H, RES, R_OUT, W1, rows, cols, mask_d, mask, rstd1, offset, stride_h,
                               stride_res, stride_rout, HAS_W1, RNE_BY_HAND)
            scale, m2 = _merge(scale, m2, r)
        rstd2 = rstd_of(m2 / n, scale, eps)
        tl.debug_barrier()  # the third pass reads back what the second stored
        for d0 in range(0, D, BLOCK_D):
            rows, cols, mask_d, mask = _tile(m0, d0, M, D, BLOCK_M, BLOCK_D)
            r = _load(R_OUT, rows, cols, stride_rout, mask)
            _store(Y, rows, cols, stride_y, mask, r * rstd2[:, None] * _weight(W2, cols, mask_d, offset, HAS_W2),
                   RNE_BY_HAND)
    tl.store(RSTD1 + rows, rstd1, mask=rows < M)
    tl.store(RSTD2 + rows, rstd2, mask=rows < M)


@triton.jit
def _sandwich_grad_terms(H, R_OUT, DY, DR_OUT, W1, W2, RSTD1, RSTD2, rows, cols, mask_d, mask, row_end, offset,
                         stride_h, stride_rout, stride_dy, stride_drout, HAS_W1: tl.constexpr,
                         HAS_W2: tl.constexpr):
    """The tile's ``x_hat1, rstd1, x_hat2, rstd2, dy, g2 = dy * w2, w1`` (fp32; masked lanes 0)."""
    rstd1 = tl.load(RSTD1 + rows, mask=rows < row_end, other=0.0)[:, None]
    rstd2 = tl.load(RSTD2 + rows, mask=rows < row_end, other=0.0)[:, None]
    x_hat1 = _load(H, rows, cols, stride_h, mask) * rstd1
    x_hat2 = _load(R_OUT, rows, cols, stride_rout, mask) * rstd2
    dy = _load(DY, rows, cols, stride_dy, mask)
    g2 = dy * _weight(W2, cols, mask_d, offset, HAS_W2)
    dr_out = _load(DR_OUT, rows, cols, stride_drout, mask)
    return x_hat1, rstd1, x_hat2, rstd2, dy, g2, dr_out, _weight(W1, cols, mask_d, offset, HAS_W1)


@triton.jit(do_not_specialize=["M"])
def sandwich_rms_norm_bwd_kernel(
    H, R_OUT, DY, DR_OUT, DH, DRES, W1, W2, RSTD1, RSTD2, DW1_PART, DW2_PART, ROW_DOTS,
    stride_h, stride_rout, stride_dy, stride_drout, stride_dh, stride_dres,
    M, D, programs, offset,
    HAS_W1: tl.constexpr, HAS_W2: tl.constexpr, COMPUTE_DW1: tl.constexpr, COMPUTE_DW2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_BLOCK: tl.constexpr, RNE_BY_HAND: tl.constexpr,
):
    """A program owns the rows :func:`_owned_rows` gives it. With ``c2 = mean(x_hat2 * g2)`` and
    ``c1 = mean(x_hat1 * g1)``: ``dr = dr_out + (g2 - x_hat2 * c2) * rstd2``, ``g1 = dr * w1``,
    ``dh = (g1 - x_hat1 * c1) * rstd1``; ``dw1 = sum dr * x_hat1``, ``dw2 = sum dy * x_hat2``.
    A wide row first stores ``(c2, c1)`` in ``ROW_DOTS[2 * row]``."""
    pid = tl.program_id(0)
    row_start, row_end = _owned_rows(pid, programs, M, BLOCK_M)
    n = D * 1.0
    if not SINGLE_BLOCK:
        for m0 in range(row_start, row_end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
            c2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                rows, cols, mask_d, mask = _tile(m0, d0, row_end, D, BLOCK_M, BLOCK_D)
                _, _, x_hat2, _, _, g2, _, _ = _sandwich_grad_terms(
                    H, R_OUT, DY, DR_OUT, W1, W2, RSTD1, RSTD2, rows, cols, mask_d, mask, row_end, offset,
                    stride_h, stride_rout, stride_dy, stride_drout, HAS_W1, HAS_W2)
                c2 += tl.sum(x_hat2 * g2, axis=1)
            c2 = c2 / n
            c1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                rows, cols, mask_d, mask = _tile(m0, d0, row_end, D, BLOCK_M, BLOCK_D)
                x_hat1, _, x_hat2, rstd2, _, g2, dr_out, w1 = _sandwich_grad_terms(
                    H, R_OUT, DY, DR_OUT, W1, W2, RSTD1, RSTD2, rows, cols, mask_d, mask, row_end, offset,
                    stride_h, stride_rout, stride_dy, stride_drout, HAS_W1, HAS_W2)
                dr = dr_out + (g2 - x_hat2 * c2[:, None]) * rstd2
                c1 += tl.sum(x_hat1 * (dr * w1), axis=1)
            tl.store(ROW_DOTS + 2 * rows, c2, mask=rows < row_end)
            tl.store(ROW_DOTS + 2 * rows + 1, c1 / n, mask=rows < row_end)
        tl.debug_barrier()
    for d0 in range(0, D, BLOCK_D):
        dw1_acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        dw2_acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for m0 in range(row_start, row_end, BLOCK_M):
            rows, cols, mask_d, mask = _tile(m0, d0, row_end, D, BLOCK_M, BLOCK_D)
            x_hat1, rstd1, x_hat2, rstd2, dy, g2, dr_out, w1 = _sandwich_grad_terms(
                H, R_OUT, DY, DR_OUT, W1, W2, RSTD1, RSTD2, rows, cols, mask_d, mask, row_end, offset,
                stride_h, stride_rout, stride_dy, stride_drout, HAS_W1, HAS_W2)
            if SINGLE_BLOCK:
                c2 = tl.sum(x_hat2 * g2, axis=1) / n
            else:
                c2 = tl.load(ROW_DOTS + 2 * rows, mask=rows < row_end, other=0.0)
            dr = dr_out + (g2 - x_hat2 * c2[:, None]) * rstd2
            g1 = dr * w1
            if SINGLE_BLOCK:
                c1 = tl.sum(x_hat1 * g1, axis=1) / n
            else:
                c1 = tl.load(ROW_DOTS + 2 * rows + 1, mask=rows < row_end, other=0.0)
            _store(DRES, rows, cols, stride_dres, mask, dr, RNE_BY_HAND)
            _store(DH, rows, cols, stride_dh, mask, (g1 - x_hat1 * c1[:, None]) * rstd1, RNE_BY_HAND)
            if COMPUTE_DW1:
                dw1_acc += dr * x_hat1
            if COMPUTE_DW2:
                dw2_acc += dy * x_hat2
        cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        if COMPUTE_DW1:
            tl.store(DW1_PART + pid.to(tl.int64) * D + cols, tl.sum(dw1_acc, axis=0), mask=cols < D)
        if COMPUTE_DW2:
            tl.store(DW2_PART + pid.to(tl.int64) * D + cols, tl.sum(dw2_acc, axis=0), mask=cols < D)
