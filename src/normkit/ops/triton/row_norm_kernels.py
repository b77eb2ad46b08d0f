"""The row-norm kernels, one pair for LayerNorm, RMSNorm, GroupNorm and InstanceNorm.

Each norm is "reduce a row, normalize it, apply an affine"; what differs is which elements form a
row and which affine parameter an element uses. A kernel sees ``M`` rows of ``R`` segments of
``S`` contiguous elements (the row length is ``R * S``) and processes a row in tiles of
``BLOCK_R x BLOCK_S``:

=============  ====================  ===  ==========  ====================================
norm           row                   R    S           affine index of element (row, r, s)
=============  ====================  ===  ==========  ====================================
LayerNorm      one leading index     1    prod(norm)  ``s``            (``PER_SEGMENT=0``)
RMSNorm        as LayerNorm, ``IS_RMS``: not centred, no bias
GroupNorm      (sample, group)       C/G  spatial     ``(row % G) * R + r``  (channel)
InstanceNorm   (sample, channel)     1    spatial     ``row % C``      (GroupNorm with G=C)
=============  ====================  ===  ==========  ====================================

Memory layout: every tensor is addressed as an ``(N, C, S)`` strided view, the convention of
the BatchNorm kernels. Row ``m`` is group ``m % GROUPS`` of sample ``m // GROUPS`` and element
``(r, s)`` of it lives at::

    (m // GROUPS) * stride_n + ((m % GROUPS) * R + r) * stride_c + s * stride_s

A LayerNorm/RMSNorm input is ``(M, 1, L)`` (any row stride, unit element stride); a GroupNorm
or InstanceNorm input is ``(N, C, prod(spatial))``, so contiguous input (``stride_s = 1``) and
channels_last input (``stride_c = 1``, ``stride_s = C``) are read in place and the outputs are
written in the input's layout. Triton specializes a stride equal to 1, so the contiguous axis is
known at compile time and loads along it are vectorized.

A row that fits in one tile (``SINGLE_BLOCK``) is read once and kept in registers. A wider row
is walked in tiles, twice: the forward merges per-tile mean and centred sum of squares with
Chan's formula (never ``E[x^2] - E[x]^2``), then normalizes; the backward first computes the two
row dot products of the input gradient, then the gradients. Statistics are fp32 whatever the
input dtype.

A GroupNorm/InstanceNorm row that takes several tiles is split across programs ``(row, split)``
(``SPLIT``, blocks of whole tiles chosen from the row's shape alone by the launcher): each
direction is then two launches, the first storing each block's partial sums (the forward's
moments, the backward's two dot products), the second merging a row's partials in split order
(every program of the row computes the same bits) and writing its block. The row is read twice,
as unsplit; SD's UNet GroupNorm at N=2 gets 192 programs instead of 64.

Numerics:

* Shift: a centred norm takes its statistics of ``x - pivot``, with ``pivot`` the row's first
  element (the reference's choice), and the forward and backward both form
  ``x_hat = ((x - pivot) - mean) * rstd``: a large common offset (``1e4 + noise``) cancels
  exactly (Sterbenz) before any rounding, and a constant row has exactly zero variance. So
  ``MEAN`` holds the mean of ``x - pivot`` (0 for RMSNorm, which does not centre); the launcher
  adds the pivot back where the true mean is needed.
* ``VAR`` is the biased variance itself (InstanceNorm's running variance), never recovered
  from rstd (``rstd^-2 - eps`` cancels to a negative number on a constant input).
* ``rstd = 1 / sqrt(var + eps)`` with IEEE-rounded square root and division (``sqrt_rn``,
  ``div_rn``: not the approximate forms a GPU compiles ``1.0 / tl.sqrt`` to), and ``rstd = 0``
  when ``var + eps == 0`` (``eps=0`` on a constant row), ATen's batch/instance-norm rule: the
  output is then the bias and the input gradient 0, not ``0 * inf = NaN``.
* Scale: moments are taken of ``(x - pivot) / scale``, with ``scale`` a power of two near the
  largest ``|x - pivot|`` (per tile, merged to the row's largest), so squares neither overflow
  (``|x| ~ 1e20``: 1e40 is beyond fp32, though rstd = 1e-20 is not) nor underflow. Scaling by a
  power of two commutes with rounding: in the ordinary range the results are bit for bit those
  of the unscaled formulas. ``VAR`` is inf where the variance itself exceeds fp32. With
  ``eps=0`` rstd is taken from the scaled variance too, so float32 input below ``1e-19``
  (variance below fp32's range) normalizes as float64 does, not to silent zeros; rstd itself
  is inf (as torch's) where it passes fp32's max (a row of zeros and one ``1e-38``, 16+ long).
  A tile whose largest element is inf or NaN is not scaled (``x / inf`` would make the whole
  row NaN): RMSNorm of a row holding an inf is then torch's 0 at the finite elements.
* relu propagates NaN as torch's does (``relu(NaN) = NaN``, and its gradient passes dy).
* Launches pin ``enable_fp_fusion=False`` (``_launch.FP_FUSION``): no FMA contraction, every
  product and sum rounds as written, as under the interpreter the tests run on.
* Offsets within a row are int64 (``_tile``), as are row starts and the partial-sum rows.

The backward is deterministic: no atomics. The weight and bias gradients leave the kernel as
fp32 partial sums in a fixed layout which the launcher sums in a fixed order:

* ``PER_SEGMENT=0`` (one parameter per column): a program owns a contiguous block of rows and
  writes the column sums over its rows to row ``pid`` of a ``[programs, S]`` buffer.
* ``PER_SEGMENT=1`` (one parameter per channel): every (row, segment, tile column) writes its sum
  to ``[M, R, cdiv(S, BLOCK_S)]``, which is tiny (``N * C`` numbers per tile column).

Norm + activation (``ACT``, see :data:`~normkit.ops.triton.jit_helpers.ACT_CODES`): the forward
applies the activation to the
affine output before its one store; the backward recomputes the pre-activation
``z = x_hat * w + b`` from x and the saved statistics and continues with ``dz = dy * act'(z)``
in place of ``dy``, so the normalized tensor is never written to memory.

Only APIs present in Triton 3.6 are used.
"""

from __future__ import annotations

import triton
import triton.language as tl

from normkit.ops.triton.jit_helpers import (
    activate,
    activate_grad,
    cast_to,
    chan_merge,
    pow2_floor,
    rstd_of,
)

__all__ = ["row_norm_bwd_kernel", "row_norm_fwd_kernel"]


@triton.jit
def _row_start(row, R, GROUPS, stride_n, stride_c):
    """Offset of the first element of row ``row`` (sample ``row // GROUPS``, group
    ``row % GROUPS``); GROUPS = 1 is specialized, so row norms pay no division."""
    return (row // GROUPS) * stride_n + (row % GROUPS) * R * stride_c


@triton.jit
def _tile(r0, s0, R, S, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """Indices, in-row positions ``r * S + s`` and masks of the tile whose first element is
    (r0, s0); memory offsets are ``r * stride_c + s * stride_s``. int64: within one sample a
    channels_last row reaches ``C * S`` elements, which may pass 2**31."""
    r = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
    s = (s0 + tl.arange(0, BLOCK_S)).to(tl.int64)[None, :]
    mask_r = r < R
    mask_s = s < S
    return r, s, r * S + s, mask_r, mask_s





@triton.jit
def _rows_of_program(M):
    """``[start, end)``: this program's rows, ``M`` rows dealt in order and evenly (sizes
    differing by at most one) over the grid's first axis. int64: row * R * S may pass 2**31."""
    pid = tl.program_id(0).to(tl.int64)
    programs = tl.num_programs(0).to(tl.int64)
    return pid * M // programs, (pid + 1) * M // programs


@triton.jit
def _split_block(split, split_r, split_s, splits_s, R, S):
    """``(r_lo, r_hi, s_lo, s_hi)``: the block of a row that program ``split`` of a split row
    owns (splits numbered s-fastest; block edges are multiples of the tile, so no tile is
    shared). An unsplit row (``split_r = R``, ``split_s = S``) is one block."""
    r_lo = (split // splits_s) * split_r
    s_lo = (split % splits_s) * split_s
    return r_lo, tl.minimum(r_lo + split_r, R), s_lo, tl.minimum(s_lo + split_s, S)


@triton.jit
def _load_affine(P, row, r, s, mask_r, mask_s, R, GROUPS, PER_SEGMENT: tl.constexpr):
    """The affine parameter of each tile element, as fp32, broadcastable against the tile."""
    if PER_SEGMENT:
        p = tl.load(P + (row % GROUPS) * R + r, mask=mask_r, other=0.0)
    else:
        p = tl.load(P + s, mask=mask_s, other=0.0)
    return p.to(tl.float32)


@triton.jit
def _load_input(X, RESIDUAL, RESIDUAL_OUT, x_offs, y_offs, mask, HAS_RESIDUAL: tl.constexpr,
                STORE_RESIDUAL_OUT: tl.constexpr, RNE_BY_HAND: tl.constexpr):
    """x (+ residual), rounded to and stored in the residual dtype when asked, as fp32.
    RESIDUAL has X's element strides, RESIDUAL_OUT Y's."""
    x = tl.load(X + x_offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(RESIDUAL + x_offs, mask=mask, other=0.0).to(tl.float32)
    if STORE_RESIDUAL_OUT:
        # Normalize the stored value, not the unrounded sum: the backward reads it back as x.
        x = cast_to(x, RESIDUAL_OUT, RNE_BY_HAND)
        tl.store(RESIDUAL_OUT + y_offs, x, mask=mask)
        x = x.to(tl.float32)
    return x


@triton.jit
def _pivot(X, RESIDUAL, RESIDUAL_OUT, HAS_RESIDUAL: tl.constexpr,
           STORE_RESIDUAL_OUT: tl.constexpr, IS_RMS: tl.constexpr, RNE_BY_HAND: tl.constexpr):
    """The row's first element as normalized (x + residual, rounded as stored), fp32: the shift
    of a centred norm's statistics. 0 for RMSNorm. X and RESIDUAL point at the row."""
    if IS_RMS:
        pivot = 0.0
    else:
        pivot = tl.load(X).to(tl.float32)
        if HAS_RESIDUAL:
            pivot += tl.load(RESIDUAL).to(tl.float32)
        if STORE_RESIDUAL_OUT:
            pivot = cast_to(pivot, RESIDUAL_OUT, RNE_BY_HAND).to(tl.float32)
    return pivot





@triton.jit
def _tile_moments(x, mask, count, IS_RMS: tl.constexpr):
    """(mean, sum of squared deviations) of the ``count`` valid elements of the shifted tile
    ``x`` (masked lanes hold 0).

    RMSNorm does not centre: its "mean" is 0 and the sum is of x^2, so the merge below
    needs no special case."""
    if IS_RMS:
        mean = 0.0
        m2 = tl.sum(x * x)
    else:
        mean = tl.sum(x) / count
        d = tl.where(mask, x - mean, 0.0)
        m2 = tl.sum(d * d)
    return mean, m2


@triton.jit
def _store_output(Y, W, B, x, mean, rstd, row, r, s, offs, mask, mask_r, mask_s, R, GROUPS,
                  HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, PER_SEGMENT: tl.constexpr,
                  ACT: tl.constexpr, RNE_BY_HAND: tl.constexpr):
    y = (x - mean) * rstd  # x is shifted by the row's pivot, as mean
    if HAS_WEIGHT:
        y = y * _load_affine(W, row, r, s, mask_r, mask_s, R, GROUPS, PER_SEGMENT)
    if HAS_BIAS:
        y = y + _load_affine(B, row, r, s, mask_r, mask_s, R, GROUPS, PER_SEGMENT)
    y = activate(y, ACT)
    tl.store(Y + offs, cast_to(y, Y, RNE_BY_HAND), mask=mask)


@triton.jit
def _row_pointers(row, X, RESIDUAL, Y, RESIDUAL_OUT, stride_xn, stride_xc, stride_yn, stride_yc, stride_residual_row,
                  R, GROUPS, HAS_RESIDUAL: tl.constexpr, STORE_RESIDUAL_OUT: tl.constexpr):
    """X, RESIDUAL, Y and RESIDUAL_OUT moved to row ``row``'s first element."""
    X += _row_start(row, R, GROUPS, stride_xn, stride_xc)
    Y += _row_start(row, R, GROUPS, stride_yn, stride_yc)
    if HAS_RESIDUAL:
        RESIDUAL += row * stride_residual_row
    if STORE_RESIDUAL_OUT:
        RESIDUAL_OUT += _row_start(row, R, GROUPS, stride_yn, stride_yc)
    return X, RESIDUAL, Y, RESIDUAL_OUT


@triton.jit
def _row_in_one_tile(row, X, RESIDUAL, Y, RESIDUAL_OUT, W, B, MEAN, RSTD, VAR,
                     stride_xn, stride_xc, stride_xs, stride_yn, stride_yc, stride_ys, stride_residual_row,
                     R, S, GROUPS, eps, IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                     STORE_RESIDUAL_OUT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     PER_SEGMENT: tl.constexpr, ACT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
                     RNE_BY_HAND: tl.constexpr):
    """The forward of a row that fits one tile: read once, kept in registers."""
    X, RESIDUAL, Y, RESIDUAL_OUT = _row_pointers(row, X, RESIDUAL, Y, RESIDUAL_OUT, stride_xn, stride_xc, stride_yn,
                                                 stride_yc, stride_residual_row, R, GROUPS, HAS_RESIDUAL,
                                                 STORE_RESIDUAL_OUT)
    n = R * S * 1.0
    pivot = _pivot(X, RESIDUAL, RESIDUAL_OUT, HAS_RESIDUAL, STORE_RESIDUAL_OUT, IS_RMS, RNE_BY_HAND)
    r, s, _, mask_r, mask_s = _tile(0, 0, R, S, BLOCK_R, BLOCK_S)
    mask = mask_r & mask_s
    y_offs = r * stride_yc + s * stride_ys
    x = _load_input(X, RESIDUAL, RESIDUAL_OUT, r * stride_xc + s * stride_xs, y_offs, mask,
                    HAS_RESIDUAL, STORE_RESIDUAL_OUT, RNE_BY_HAND)
    x = tl.where(mask, x - pivot, 0.0)
    scale = pow2_floor(tl.max(tl.abs(x)))
    mean_s, m2 = _tile_moments(x * (1.0 / scale), mask, n, IS_RMS)
    mean = mean_s * scale
    var_s = m2 / n
    rstd = rstd_of(var_s, scale, eps)
    _store_output(Y, W, B, x, mean, rstd, row, r, s, y_offs, mask, mask_r, mask_s, R, GROUPS,
                  HAS_WEIGHT, HAS_BIAS, PER_SEGMENT, ACT, RNE_BY_HAND)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)
    tl.store(VAR + row, var_s * scale * scale)


# M (the row count, which varies with the batch) only bounds the row loop: not specialized, so
# a new batch size does not recompile.
@triton.jit(do_not_specialize=["M"])
def row_norm_fwd_kernel(
    X, RESIDUAL, Y, RESIDUAL_OUT, W, B, MEAN, RSTD, VAR, PART,
    stride_xn, stride_xc, stride_xs,
    stride_yn, stride_yc, stride_ys,  # Y and RESIDUAL_OUT are allocated alike
    stride_residual_row,  # the add-norms' residual: X's element strides, its own row stride
    M, R, S, GROUPS, eps, split_r, split_s, splits_s, splits,
    IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, STORE_RESIDUAL_OUT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, PER_SEGMENT: tl.constexpr, ACT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, SINGLE_BLOCK: tl.constexpr, SPLIT: tl.constexpr,
    RNE_BY_HAND: tl.constexpr, ROW_LOOP: tl.constexpr = False,
):
    """Statistics, then ``y = act((x - mean) * rstd * w + b)``; stores each row's mean of
    ``x - pivot``, its rstd and its biased variance.

    ``SINGLE_BLOCK`` rows: one program per row, or with ``ROW_LOOP`` a program normalizes its
    rows (:func:`_rows_of_program`) one after the other (short rows: fewer, longer-lived
    programs, issue 15 item 8). Wider rows: one program per row, or per (row, split).

    ``SPLIT`` (a chunked row split across ``splits`` programs ``(row, split)``, each a block of
    ``split_r x split_s`` of the row's ``R x S``, see :func:`_split_block`): 1 stores the moments
    of the program's block to ``PART[row, split]`` (mean, m2, scale, count); 2 merges the row's
    partials in split order (the same bits in every program of the row) and normalizes its
    block; the program of split 0 stores the statistics. 0: the whole row in one program."""
    if SINGLE_BLOCK and ROW_LOOP:
        row_start, row_end = _rows_of_program(M)
        for row in range(row_start, row_end):
            _row_in_one_tile(row, X, RESIDUAL, Y, RESIDUAL_OUT, W, B, MEAN, RSTD, VAR,
                             stride_xn, stride_xc, stride_xs, stride_yn, stride_yc, stride_ys, stride_residual_row,
                             R, S, GROUPS, eps, IS_RMS, HAS_RESIDUAL, STORE_RESIDUAL_OUT, HAS_WEIGHT, HAS_BIAS,
                             PER_SEGMENT, ACT, BLOCK_R, BLOCK_S, RNE_BY_HAND)
    elif SINGLE_BLOCK:  # (no loop: a loop of one row cost the wide tiles registers, 64 -> 95 at 16384)
        _row_in_one_tile(tl.program_id(0).to(tl.int64), X, RESIDUAL, Y, RESIDUAL_OUT, W, B, MEAN, RSTD, VAR,
                         stride_xn, stride_xc, stride_xs, stride_yn, stride_yc, stride_ys, stride_residual_row,
                         R, S, GROUPS, eps, IS_RMS, HAS_RESIDUAL, STORE_RESIDUAL_OUT, HAS_WEIGHT, HAS_BIAS,
                         PER_SEGMENT, ACT, BLOCK_R, BLOCK_S, RNE_BY_HAND)
    else:
        row = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        r_lo, r_hi, s_lo, s_hi = _split_block(split, split_r, split_s, splits_s, R, S)
        X, RESIDUAL, Y, RESIDUAL_OUT = _row_pointers(row, X, RESIDUAL, Y, RESIDUAL_OUT, stride_xn, stride_xc,
                                                     stride_yn, stride_yc, stride_residual_row, R, GROUPS,
                                                     HAS_RESIDUAL, STORE_RESIDUAL_OUT)
        n = R * S * 1.0  # (not .to(): Triton passes an int argument equal to 1 as a constant)
        pivot = _pivot(X, RESIDUAL, RESIDUAL_OUT, HAS_RESIDUAL, STORE_RESIDUAL_OUT, IS_RMS, RNE_BY_HAND)
        # Pass 1: per-tile moments merged with Chan's parallel formula (stable for any width),
        # over the program's columns (s_lo..s_hi: the whole row unless SPLIT).
        mean = 0.0
        m2 = 0.0  # in units of scale^2
        scale = 0.0
        count = 0.0
        if SPLIT != 2:
            for r0 in range(r_lo, r_hi, BLOCK_R):
                for s0 in range(s_lo, s_hi, BLOCK_S):
                    r, s, _, mask_r, mask_s = _tile(r0, s0, R, S, BLOCK_R, BLOCK_S)
                    mask = mask_r & mask_s
                    x = _load_input(X, RESIDUAL, RESIDUAL_OUT, r * stride_xc + s * stride_xs,
                                    r * stride_yc + s * stride_ys, mask,
                                    HAS_RESIDUAL, STORE_RESIDUAL_OUT, RNE_BY_HAND)
                    x = tl.where(mask, x - pivot, 0.0)
                    n_b = tl.minimum(R - r0, BLOCK_R) * tl.minimum(S - s0, BLOCK_S) * 1.0
                    scale_b = pow2_floor(tl.max(tl.abs(x)))
                    mean_bs, m2_b = _tile_moments(x * (1.0 / scale_b), mask, n_b, IS_RMS)
                    mean, m2, scale, count = chan_merge(mean, m2, scale, count, mean_bs, m2_b, scale_b, n_b)
        if SPLIT == 1:
            part = PART + (row * splits + split) * 4
            tl.store(part, mean)
            tl.store(part + 1, m2)
            tl.store(part + 2, scale)
            tl.store(part + 3, count)
        else:
            if SPLIT == 2:  # the row's partials, merged in split order: the same bits in every program
                for j in range(0, splits):
                    part = PART + (row * splits + j) * 4
                    scale_j = tl.load(part + 2)
                    mean, m2, scale, count = chan_merge(mean, m2, scale, count, tl.load(part) / scale_j,
                                                        tl.load(part + 1), scale_j, tl.load(part + 3))
            var_s = m2 / n
            rstd = rstd_of(var_s, scale, eps)
            # Pass 2 re-reads the row: from RESIDUAL_OUT when pass 1 wrote it (one tensor instead
            # of x and residual, and already rounded). The barrier makes those writes visible.
            if STORE_RESIDUAL_OUT:
                tl.debug_barrier()
            for r0 in range(r_lo, r_hi, BLOCK_R):
                for s0 in range(s_lo, s_hi, BLOCK_S):
                    r, s, _, mask_r, mask_s = _tile(r0, s0, R, S, BLOCK_R, BLOCK_S)
                    mask = mask_r & mask_s
                    y_offs = r * stride_yc + s * stride_ys
                    if STORE_RESIDUAL_OUT:
                        x = tl.load(RESIDUAL_OUT + y_offs, mask=mask, other=0.0).to(tl.float32)
                    else:
                        x = tl.load(X + r * stride_xc + s * stride_xs, mask=mask,
                                    other=0.0).to(tl.float32)
                    x -= pivot
                    _store_output(Y, W, B, x, mean, rstd, row, r, s, y_offs, mask, mask_r, mask_s, R,
                                  GROUPS, HAS_WEIGHT, HAS_BIAS, PER_SEGMENT, ACT, RNE_BY_HAND)
        if SPLIT != 1 and split == 0:
            tl.store(MEAN + row, mean)
            tl.store(RSTD + row, rstd)
            tl.store(VAR + row, var_s * scale * scale)


@triton.jit
def _load_grad_terms(X_ROW, x_offs, DY_TILE, MEAN, RSTD, w, b, row, mask,
                     IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, ACT: tl.constexpr):
    """x_hat, dy and w * dy of one tile of one row (``X_ROW + x_offs``, ``DY_TILE``), and the
    row's rstd (all fp32). With an activation, "dy" is the gradient at its input,
    ``dy * act'(x_hat * w + b)``. x_hat is formed as in the forward, from ``x - pivot``."""
    x = tl.load(X_ROW + x_offs, mask=mask, other=0.0).to(tl.float32)
    if not IS_RMS:
        x -= tl.load(X_ROW).to(tl.float32)
    dy = tl.load(DY_TILE, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + row)
    x_hat = (x - tl.load(MEAN + row)) * rstd  # masked lanes: dy = 0 zeroes every product below
    if ACT:
        if HAS_WEIGHT:
            dy = activate_grad(dy, x_hat * w + b, ACT)
        else:
            dy = activate_grad(dy, x_hat + b, ACT)
    if HAS_WEIGHT:
        wdy = w * dy
    else:
        wdy = dy
    return x_hat, dy, wdy, rstd


# M (the row count, which varies with the batch) only bounds the row loop: not specialized, so
# a new batch size does not recompile (issue 15 item 9).
@triton.jit(do_not_specialize=["M"])
def row_norm_bwd_kernel(
    X, W, B, MEAN, RSTD, DY, DX, DRESIDUAL_OUT, DRESIDUAL, DW_PART, DB_PART, ROW_DOTS,
    stride_xn, stride_xc, stride_xs,
    stride_dyn, stride_dyc, stride_dys,
    stride_dxn, stride_dxc, stride_dxs,  # DX and DRESIDUAL are allocated alike
    stride_dresidual_out_row,  # the add-norms' gradient at residual_out: X's element strides
    M, R, S, GROUPS, split_r, split_s, splits_s, splits,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr, HAS_DRESIDUAL_OUT: tl.constexpr, STORE_DRESIDUAL: tl.constexpr,
    PER_SEGMENT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, SINGLE_BLOCK: tl.constexpr, SPLIT: tl.constexpr,
    RNE_BY_HAND: tl.constexpr,
):
    """A program owns the rows of :func:`_rows_of_program` (a split row: one row per program).

    With ``c1 = mean(x_hat * w * dy)`` and ``c2 = mean(w * dy)`` over the row (``c2 = 0`` for
    RMSNorm): ``dx = rstd * (w * dy - x_hat * c1 - c2)``, ``dw = sum dy * x_hat``,
    ``db = sum dy``. A wide row first stores (c1, c2) in ``ROW_DOTS[row]``; the gradient pass
    then walks tile columns outermost so the column sums of dw/db stay in registers across rows.
    ``B`` is read only with an activation (``HAS_BIAS``), to recompute its input.

    ``SPLIT`` (a row split across programs ``(row, split)`` as in the forward, one row per
    program): 1 stores the program's sums for (c1, c2) to ``ROW_DOTS[row, split]``; 2 adds the
    row's partial sums in split order and computes the gradients of its columns.
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    r_lo, r_hi, s_lo, s_hi = _split_block(split, split_r, split_s, splits_s, R, S)
    row_start, row_end = _rows_of_program(M)
    n = R * S * 1.0
    num_s_blocks = tl.cdiv(S, BLOCK_S)

    if not SINGLE_BLOCK and SPLIT != 2:
        for row in range(row_start, row_end):
            c1 = 0.0
            c2 = 0.0
            for r0 in range(r_lo, r_hi, BLOCK_R):
                for s0 in range(s_lo, s_hi, BLOCK_S):
                    r, s, _, mask_r, mask_s = _tile(r0, s0, R, S, BLOCK_R, BLOCK_S)
                    w_tile = 1.0
                    if HAS_WEIGHT:
                        w_tile = _load_affine(W, row, r, s, mask_r, mask_s, R, GROUPS,
                                              PER_SEGMENT)
                    b_tile = 0.0
                    if HAS_BIAS:
                        b_tile = _load_affine(B, row, r, s, mask_r, mask_s, R, GROUPS,
                                              PER_SEGMENT)
                    x_row = X + _row_start(row, R, GROUPS, stride_xn, stride_xc)
                    dy_tile = (DY + _row_start(row, R, GROUPS, stride_dyn, stride_dyc)
                               + r * stride_dyc + s * stride_dys)
                    x_hat, dy, wdy, rstd = _load_grad_terms(x_row, r * stride_xc + s * stride_xs,
                                                            dy_tile, MEAN, RSTD, w_tile, b_tile,
                                                            row, mask_r & mask_s, IS_RMS,
                                                            HAS_WEIGHT, ACT)
                    c1 += tl.sum(x_hat * wdy)
                    c2 += tl.sum(wdy)
            if SPLIT == 1:
                tl.store(ROW_DOTS + 2 * (row * splits + split), c1)
                tl.store(ROW_DOTS + 2 * (row * splits + split) + 1, c2)
            else:
                tl.store(ROW_DOTS + 2 * row, c1 / n)
                tl.store(ROW_DOTS + 2 * row + 1, c2 / n)
        if SPLIT == 0:
            tl.debug_barrier()
    c1_split = 0.0
    c2_split = 0.0
    if SPLIT == 2:  # one row per program: its partial sums, added in split order
        for j in range(0, splits):
            c1_split += tl.load(ROW_DOTS + 2 * (row_start * splits + j))
            c2_split += tl.load(ROW_DOTS + 2 * (row_start * splits + j) + 1)
        c1_split = c1_split / n
        c2_split = c2_split / n

    for r0 in range(r_lo, r_hi if SPLIT != 1 else r_lo, BLOCK_R):  # (SPLIT 1 stops at the sums)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            r, s, cols, mask_r, mask_s = _tile(r0, s0, R, S, BLOCK_R, BLOCK_S)
            mask = mask_r & mask_s
            x_offs = r * stride_xc + s * stride_xs
            dy_offs = r * stride_dyc + s * stride_dys
            dx_offs = r * stride_dxc + s * stride_dxs
            w_col = 1.0
            b_col = 0.0
            if HAS_WEIGHT and not PER_SEGMENT:  # the same columns for every row: load once
                w_col = _load_affine(W, 0, r, s, mask_r, mask_s, R, GROUPS, PER_SEGMENT)
            if HAS_BIAS and not PER_SEGMENT:
                b_col = _load_affine(B, 0, r, s, mask_r, mask_s, R, GROUPS, PER_SEGMENT)
            dw_acc = tl.zeros((BLOCK_R, BLOCK_S), dtype=tl.float32)
            db_acc = tl.zeros((BLOCK_R, BLOCK_S), dtype=tl.float32)
            for row in range(row_start, row_end):
                w = w_col
                b = b_col
                if HAS_WEIGHT and PER_SEGMENT:
                    w = _load_affine(W, row, r, s, mask_r, mask_s, R, GROUPS, PER_SEGMENT)
                if HAS_BIAS and PER_SEGMENT:
                    b = _load_affine(B, row, r, s, mask_r, mask_s, R, GROUPS, PER_SEGMENT)
                x_row = X + _row_start(row, R, GROUPS, stride_xn, stride_xc)
                dy_tile = DY + _row_start(row, R, GROUPS, stride_dyn, stride_dyc) + dy_offs
                x_hat, dy, wdy, rstd = _load_grad_terms(x_row, x_offs, dy_tile, MEAN, RSTD, w, b,
                                                        row, mask, IS_RMS, HAS_WEIGHT, ACT)
                if SINGLE_BLOCK:
                    c1 = tl.sum(x_hat * wdy) / n
                    c2 = tl.sum(wdy) / n
                elif SPLIT == 2:
                    c1 = c1_split
                    c2 = c2_split
                else:
                    c1 = tl.load(ROW_DOTS + 2 * row)
                    c2 = tl.load(ROW_DOTS + 2 * row + 1)
                if IS_RMS:
                    dx = (wdy - x_hat * c1) * rstd
                else:
                    dx = (wdy - (x_hat * c1 + c2)) * rstd
                if HAS_DRESIDUAL_OUT:
                    dx += tl.load(DRESIDUAL_OUT + row * stride_dresidual_out_row + x_offs,
                                  mask=mask, other=0.0).to(tl.float32)
                dx_start = _row_start(row, R, GROUPS, stride_dxn, stride_dxc)
                tl.store(DX + dx_start + dx_offs, cast_to(dx, DX, RNE_BY_HAND), mask=mask)
                if STORE_DRESIDUAL:
                    tl.store(DRESIDUAL + dx_start + dx_offs, cast_to(dx, DRESIDUAL, RNE_BY_HAND),
                             mask=mask)
                if PER_SEGMENT:
                    part = (row * R + r) * num_s_blocks + s0 // BLOCK_S
                    if COMPUTE_DW:
                        tl.store(DW_PART + part, tl.sum(dy * x_hat, axis=1, keep_dims=True),
                                 mask=mask_r)
                    if COMPUTE_DB:
                        tl.store(DB_PART + part, tl.sum(dy, axis=1, keep_dims=True),
                                 mask=mask_r)
                else:
                    if COMPUTE_DW:
                        dw_acc += dy * x_hat
                    if COMPUTE_DB:
                        db_acc += dy
            if not PER_SEGMENT:  # R == 1: cols are the column indices
                if COMPUTE_DW:
                    tl.store(DW_PART + pid.to(tl.int64) * S + cols, dw_acc, mask=mask)
                if COMPUTE_DB:
                    tl.store(DB_PART + pid.to(tl.int64) * S + cols, db_acc, mask=mask)
