"""BatchNorm's Triton kernels (their launchers are :mod:`normkit.ops.triton.batch_norm`).

BatchNorm reduces over every axis but the channel one, so its rows are not the row norms' rows
(:mod:`normkit.ops.triton.row_norm_kernels`): here an ``(N, C, *spatial)`` input is viewed as a matrix of
``M = N * S`` rows (one per sample and spatial position, ``S = prod(spatial)``) and ``C``
columns, and every statistic is per column. Element ``(m, c)`` lives at::

    (m // S) * stride_n + (m % S) * stride_s + c * stride_c

with the strides of the ``(N, C, S)`` view, so one set of kernels reads both layouts without a
copy:

=====================  ===========  ===========  ===========  ==================================
layout                 stride_n     stride_c     stride_s     a channel is
=====================  ===========  ===========  ===========  ==================================
NC* contiguous         ``C * S``    ``S``        1            N contiguous segments of S
channels_last(_3d)     ``S * C``    1            ``C``        a column of an (N*S, C) matrix
(N, C)                 ``C``        1            (S = 1)      a column
=====================  ===========  ===========  ===========  ==================================

A sliced input keeps its strides too; only a layout whose spatial axes do not merge into one
stride (``reshape`` cannot view it) is copied. Outputs take the input's memory format.

The kernels that read the input work over tiles of ``BLOCK_M`` rows x ``BLOCK_C`` channels. On
an NC* input (``SPATIAL``) a tile's rows are spatial positions of one sample, so the kernels never divide
per element and a tile's rows are one unit-stride run (a 2-D grid over (sample, spatial
block), flattened: issue 15 item 6); otherwise a tile is ``BLOCK_M`` consecutive rows.

Where a channel's run is not provably 16-byte aligned (NC* with ``S`` not a multiple of 16:
Triton specializes integers on divisibility by 16 only; ResNet's 14x14 and 7x7), the compiler
falls to one scalar per lane. Then the reducing kernels read each run through an aligned window
(``ALIGN``: whole vectors, the lanes outside the run discarded), and the elementwise kernels,
when every tensor they touch is contiguous, read the tensor flat (``FLAT``: blocks of
``BLOCK_M`` consecutive elements, each gathering its channel's coefficients): 16-byte loads
and stores at any ``S``.

* ``batch_norm_stats_kernel``: a program owns a run of tiles and a block of channels; it
  merges per-tile (count, mean, M2) of ``x - pivot`` (pivot: one element of the channel) with
  Chan's formula, M2 in units of a power-of-two scale, and writes its partial count, mean, M2
  and scale per channel to ``[P, C]`` buffers (P programs along rows).
* ``batch_norm_finalize_kernel``: the k-way merge of those partials into the batch's centre
  and rstd, the apply kernel's per-channel ``scale = w * rstd`` and ``shift = b``, and the
  running-statistics update, one program per block of channels: nothing runs between the
  kernels of a training step.
* ``batch_norm_apply_kernel``: ``y = ((x - pivot) - mean) * scale + shift`` with per-channel
  fp32 vectors (training: the batch's pivot and mean of ``x - pivot``, ``w * rstd``, b; eval:
  the running mean and 0, and the same from the running variance). Every kernel centres x
  this way (``centre = [pivot; mean]``), so a large common offset cancels exactly first.
* ``batch_norm_bwd_reduce_kernel``: per-program partial ``sum(dy)`` and ``sum(dy * x_hat)``;
  ``batch_norm_bwd_finalize_kernel`` adds them up, in a fixed order, into the means the input
  gradient needs and the parameter gradients.
* ``batch_norm_bwd_apply_kernel``: ``dx = w * rstd * (dy - sum_dy / n - x_hat * sum_dy_xhat / n)``
  (batch statistics) or ``dx = w * rstd * dy`` (running statistics).

Norm + activation (``ACT``, as the row norms): the apply kernel applies the activation before
its store; both backward kernels recompute its input ``z = (x - mean) * scale + shift`` and use
``dz = dy * act'(z)`` in place of ``dy``.

The partials are merged by the finalize kernels, in a fixed order (no atomics).
"""

from __future__ import annotations

import triton
import triton.language as tl

from normkit.ops.triton.jit_helpers import activate, activate_grad, cast_to, chan_merge, pow2_floor

__all__ = [
    "batch_norm_apply_kernel",
    "batch_norm_bwd_finalize_kernel",
    "batch_norm_bwd_apply_kernel",
    "batch_norm_bwd_reduce_kernel",
    "batch_norm_finalize_kernel",
    "batch_norm_stats_kernel",
]


@triton.jit
def _tile(t, c0, M, C, S, S_BLOCKS, stride_n, stride_c, SPATIAL: tl.constexpr, ALIGN: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Tile ``t`` (int64) of BLOCK_M rows x BLOCK_C channels from channel c0: ``(n, c, pos,
    mask, valid)``, where element ``(n, pos, c)`` lives at :func:`_address` (``pos`` is the
    spatial index, or a position in an aligned window), ``mask`` bounds the loads and ``valid``
    marks the lanes that are elements of the channel.

    ``SPATIAL`` (an NC* input, unit spatial stride): tile t is spatial block ``t % S_BLOCKS``
    of sample ``t // S_BLOCKS``, so a tile never straddles two samples and its rows are one
    contiguous run: one division per tile, not per element. With ``ALIGN`` > 1 elements (a
    16-byte vector; the launcher sets it when ``S`` is not a multiple of it, as at ResNet's 14x14
    and 7x7) a channel's run is read through a window starting at the aligned address at or
    before its first element: loads are whole vectors (the bytes before and after the run
    share its vectors, within the same 16-byte-aligned chunks of the allocation) and the
    lanes outside the run are not ``valid``. Otherwise tile t is rows ``[t * BLOCK_M, ...)``
    of the ``(N*S, C)`` matrix (channels_last: a row is C contiguous channels)."""
    c = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)[None, :]  # c * stride_c may pass 2**31
    if SPATIAL:
        n = t // S_BLOCKS
        pos = (t % S_BLOCKS) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
        if ALIGN > 1:
            head = (n * stride_n + c * stride_c) % ALIGN  # the run's first element in its vector
            s = pos - head
            # Bounds in whole vectors (a mask constant over each vector keeps the load wide).
            mask = ((pos // ALIGN) * ALIGN < S + head) & (c < C)
            valid = mask & (s >= 0) & (s < S)
        else:
            mask = (pos < S) & (c < C)
            valid = mask
    else:
        m = t * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
        n = m // S  # S == 1 is a constant: no division then
        pos = m % S
        mask = (m < M) & (c < C)
        valid = mask
    return n, c, pos, mask, valid  # one return: Triton compiles no early return


@triton.jit
def _address(n, c, pos, stride_n, stride_c, stride_s, ALIGN: tl.constexpr):
    """Offset of element ``(n, pos, c)`` of :func:`_tile`; with ``ALIGN``, ``pos`` counts from
    the aligned start of the channel's run, written as a multiple of ALIGN so that the
    compiler sees the alignment."""
    start = n * stride_n + c * stride_c
    if ALIGN > 1:
        offset = (start // ALIGN) * ALIGN + pos
    else:
        offset = start + pos * stride_s
    return offset


@triton.jit
def _floor_div(a, d, inv_d):
    """``a // d`` for int32 ``0 <= a < 2**24`` and ``d >= 1`` through an fp32 product (exact to
    one unit, then corrected): a few instructions where an integer division by a runtime value
    takes a few dozen."""
    q = (a.to(tl.float32) * inv_d).to(tl.int32)
    r = a - q * d
    return tl.where(r < 0, q - 1, tl.where(r >= d, q + 1, q))


@triton.jit
def _flat(t, C, S, TOTAL, BLOCK: tl.constexpr):
    """Elements ``[t * BLOCK, ...)`` (t int64) of a contiguous NC* tensor, as a ``(BLOCK, 1)``
    tile: their flat offsets, channels ``(offset // S) % C`` and mask. The offsets run from an
    aligned start whatever ``S`` is, so loads and stores are whole 16-byte vectors; a block's
    channels come from one int64 division per program and fp32 reciprocals per element (the
    launcher keeps ``S + BLOCK`` and ``C + BLOCK`` under 2**24, where they are exact)."""
    start = t * BLOCK
    plane = start // S  # (sample, channel) plane of the block's first element
    a = (start - plane * S).to(tl.int32) + tl.arange(0, BLOCK)  # position from that plane
    k = (plane % C).to(tl.int32) + _floor_div(a, S, 1.0 / (S * 1.0))
    c = k - C * _floor_div(k, C, 1.0 / (C * 1.0))
    offset = (start + tl.arange(0, BLOCK))[:, None]
    return offset, c.to(tl.int64)[:, None], offset < TOTAL


@triton.jit
def _load_channel(P, c, C):
    """A per-channel fp32 vector gathered at the tile's channels ``c`` (a ``(1, BLOCK_C)`` row,
    or one channel per element of a flat tile)."""
    return tl.load(P + c, mask=c < C, other=0.0)


@triton.jit
def _pivot(X, c, C, stride_xc):
    """Each channel's pivot, its first element ``x[0, c, 0]`` in fp32: read from x itself by
    both the statistics and the finalize kernel (a copy would be one more launch)."""
    return tl.load(X + c.to(tl.int64) * stride_xc, mask=c < C, other=0.0).to(tl.float32)


@triton.jit
def _centred(x, CENTRE, c, C):
    """``(x - pivot) - mean`` with ``CENTRE = [pivot; mean]`` (2, C): the batch's shift and the
    mean of ``x - pivot`` (so a large offset cancels exactly first, as in the statistics), or
    the running mean and 0."""
    return (x - _load_channel(CENTRE, c, C)) - _load_channel(CENTRE + C, c, C)


# M stays specialized (unlike the row norms' backward): the row mask ``m < M`` is what the
# compiler proves 16-aligned when M is, and without it NCHW loads fall to scalars (the static
# report showed 16 -> 2 bytes per lane at ResNet's 56x56).
@triton.jit
def batch_norm_stats_kernel(
    X, MEAN_PART, M2_PART, SCALE_PART, COUNT_PART,
    M, C, S, stride_xn, stride_xc, stride_xs, TILES, S_BLOCKS, tiles_per_program,
    SPATIAL: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (p, j): tiles ``[p * tiles_per_program, ...)`` (see :func:`_tile`), channels
    of block j; writes the mean and M2 of its elements of ``x - shift`` to ``MEAN_PART[p, c]``,
    in units of ``SCALE_PART[p, c]^2`` ``M2_PART[p, c]``, and their count to
    ``COUNT_PART[p, c]`` (per channel: an aligned window holds a different part of each
    channel's run).

    ``shift`` is the channel's first element (``x[0, c, 0]``, :func:`_pivot`): a constant
    channel is then exactly 0 (zero variance, output exactly the bias), and a large common
    offset cancels exactly (Sterbenz)
    before any rounding. The scale, a power of two near the largest ``|x - shift|`` seen, keeps
    the squares in range: at ``|x| ~ 1e20`` they would overflow fp32 (1e40), and the M2 of a
    channel may exceed fp32 while its rstd does not. Scaling by a power of two is exact."""
    pid_m = tl.program_id(0)
    c0 = tl.program_id(1) * BLOCK_C
    t_start = pid_m.to(tl.int64) * tiles_per_program  # int64: offsets may pass 2**31
    t_end = tl.minimum(t_start + tiles_per_program, TILES)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)  # in units of scale^2
    scale = tl.zeros((BLOCK_C,), dtype=tl.float32)
    count = tl.zeros((BLOCK_C,), dtype=tl.float32)
    shift = _pivot(X, (c0 + tl.arange(0, BLOCK_C))[None, :], C, stride_xc)
    for t in range(t_start, t_end):
        n, c, pos, mask, valid = _tile(t, c0, M, C, S, S_BLOCKS, stride_xn, stride_xc, SPATIAL, ALIGN,
                                       BLOCK_M, BLOCK_C)
        x = tl.load(X + _address(n, c, pos, stride_xn, stride_xc, stride_xs, ALIGN), mask=mask,
                    other=0.0).to(tl.float32)
        x = tl.where(valid, x - shift, 0.0)
        n_b = tl.sum(valid.to(tl.float32), axis=0)
        scale_b = pow2_floor(tl.max(tl.abs(x), axis=0))
        xs = x * (1.0 / scale_b)[None, :]  # |xs| < 2
        mean_bs = tl.sum(xs, axis=0) / tl.maximum(n_b, 1.0)
        d = tl.where(valid, xs - mean_bs[None, :], 0.0)
        m2_b = tl.sum(d * d, axis=0)  # in units of scale_b^2
        # An aligned window's last tile may hold none of a channel's elements: merged as one
        # element of value 0 (no 0 / 0), then dropped.
        some = n_b > 0.0
        mean_n, m2_n, scale_n, count_n = chan_merge(mean, m2, scale, count, mean_bs, m2_b, scale_b,
                                                    tl.where(some, n_b, 1.0))
        mean = tl.where(some, mean_n, mean)
        m2 = tl.where(some, m2_n, m2)
        scale = tl.where(some, scale_n, scale)
        count = tl.where(some, count_n, count)
    c = c0 + tl.arange(0, BLOCK_C)
    tl.store(MEAN_PART + pid_m * C + c, mean, mask=c < C)
    tl.store(M2_PART + pid_m * C + c, m2, mask=c < C)
    tl.store(SCALE_PART + pid_m * C + c, scale, mask=c < C)
    tl.store(COUNT_PART + pid_m * C + c, count, mask=c < C)


@triton.jit
def _elements(t, c0, M, C, S, S_BLOCKS, stride_n, stride_c, stride_s, TOTAL, SPATIAL: tl.constexpr,
              FLAT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """The offsets (in a tensor with strides ``stride_*``), channels and mask of tile ``t`` of
    the elementwise kernels: a flat block of a contiguous NC* tensor (``FLAT``, see
    :func:`_flat`), else a :func:`_tile`."""
    if FLAT:
        offset, c, mask = _flat(t, C, S, TOTAL, BLOCK_M)
    else:
        n, c, pos, mask, _ = _tile(t, c0, M, C, S, S_BLOCKS, stride_n, stride_c, SPATIAL, 1, BLOCK_M,
                                   BLOCK_C)
        offset = _address(n, c, pos, stride_n, stride_c, stride_s, 1)
    return offset, c, mask


@triton.jit
def batch_norm_apply_kernel(
    X, Y, CENTRE, SCALE, SHIFT,
    M, C, S, stride_xn, stride_xc, stride_xs, stride_yn, stride_yc, stride_ys, S_BLOCKS, TOTAL,
    ACT: tl.constexpr, SPATIAL: tl.constexpr, FLAT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr, RNE_BY_HAND: tl.constexpr,
):
    """One tile per program: ``y = act((x - mean) * scale + shift)`` (centring first keeps a
    large common offset from costing precision in ``x * scale``). With ``FLAT`` x and y are
    contiguous NC* and share the offsets."""
    c0 = tl.program_id(1) * BLOCK_C
    t = tl.program_id(0).to(tl.int64)
    x_offset, c, mask = _elements(t, c0, M, C, S, S_BLOCKS, stride_xn, stride_xc, stride_xs, TOTAL,
                                  SPATIAL, FLAT, BLOCK_M, BLOCK_C)
    y_offset = x_offset
    if not FLAT:
        y_offset, _, _ = _elements(t, c0, M, C, S, S_BLOCKS, stride_yn, stride_yc, stride_ys, TOTAL,
                                   SPATIAL, FLAT, BLOCK_M, BLOCK_C)
    x = tl.load(X + x_offset, mask=mask, other=0.0).to(tl.float32)
    y = _centred(x, CENTRE, c, C) * _load_channel(SCALE, c, C)
    y = activate(y + _load_channel(SHIFT, c, C), ACT)
    tl.store(Y + y_offset, cast_to(y, Y, RNE_BY_HAND), mask=mask)


@triton.jit
def batch_norm_bwd_reduce_kernel(
    X, DY, CENTRE, RSTD, SCALE, SHIFT, SUM_DY_PART, SUM_DY_XHAT_PART,
    M, C, S, stride_xn, stride_xc, stride_xs, stride_dyn, stride_dyc, stride_dys,
    TILES, S_BLOCKS, tiles_per_program,
    ACT: tl.constexpr, SPATIAL: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program (p, j): fp32 ``sum(dy)`` and ``sum(dy * x_hat)`` over its rows, per channel
    (``dy`` the gradient at the activation's input when there is one). With ``ALIGN`` dy has
    x's strides (the aligned window is the same for both)."""
    pid_m = tl.program_id(0)
    c0 = tl.program_id(1) * BLOCK_C
    t_start = pid_m.to(tl.int64) * tiles_per_program
    t_end = tl.minimum(t_start + tiles_per_program, TILES)
    cols = (c0 + tl.arange(0, BLOCK_C))[None, :]
    rstd = _load_channel(RSTD, cols, C)
    if ACT:
        scale = _load_channel(SCALE, cols, C)
        shift = _load_channel(SHIFT, cols, C)
    sum_dy = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sum_dy_xhat = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t in range(t_start, t_end):
        n, c, pos, mask, valid = _tile(t, c0, M, C, S, S_BLOCKS, stride_xn, stride_xc, SPATIAL, ALIGN,
                                       BLOCK_M, BLOCK_C)
        x = tl.load(X + _address(n, c, pos, stride_xn, stride_xc, stride_xs, ALIGN), mask=mask,
                    other=0.0).to(tl.float32)
        dy = tl.load(DY + _address(n, c, pos, stride_dyn, stride_dyc, stride_dys, ALIGN), mask=mask,
                     other=0.0).to(tl.float32)
        x_c = _centred(x, CENTRE, c, C)
        if ALIGN > 1:  # lanes outside the run hold a neighbour's x and dy (inf or NaN, maybe)
            dy = tl.where(valid, dy, 0.0)
            x_c = tl.where(valid, x_c, 0.0)
        if ACT:
            dy = activate_grad(dy, x_c * scale + shift, ACT)
        sum_dy += tl.sum(dy, axis=0)
        sum_dy_xhat += tl.sum(dy * (x_c * rstd), axis=0)
    c = c0 + tl.arange(0, BLOCK_C)
    tl.store(SUM_DY_PART + pid_m * C + c, sum_dy, mask=c < C)
    tl.store(SUM_DY_XHAT_PART + pid_m * C + c, sum_dy_xhat, mask=c < C)


@triton.jit
def batch_norm_bwd_apply_kernel(
    X, DY, DX, CENTRE, RSTD, SCALE, SHIFT, MEAN_DY, MEAN_DY_XHAT,
    M, C, S, stride_xn, stride_xc, stride_xs, stride_dyn, stride_dyc, stride_dys,
    stride_dxn, stride_dxc, stride_dxs, S_BLOCKS, TOTAL,
    BATCH_STATS: tl.constexpr, ACT: tl.constexpr, SPATIAL: tl.constexpr, FLAT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, RNE_BY_HAND: tl.constexpr,
):
    """``dx = scale * (dy - mean(dy) - x_hat * mean(dy * x_hat))`` with ``scale = w * rstd``;
    with running statistics (``BATCH_STATS=0``) mean and rstd are constants: ``dx = scale * dy``.
    With an activation, ``dy`` is first ``dy * act'((x - mean) * scale + shift)``. With ``FLAT``
    x, dy and dx are contiguous NC* and share the offsets."""
    c0 = tl.program_id(1) * BLOCK_C
    t = tl.program_id(0).to(tl.int64)
    dy_offset, c, mask = _elements(t, c0, M, C, S, S_BLOCKS, stride_dyn, stride_dyc, stride_dys, TOTAL,
                                   SPATIAL, FLAT, BLOCK_M, BLOCK_C)
    x_offset = dy_offset
    dx_offset = dy_offset
    if not FLAT:
        x_offset, _, _ = _elements(t, c0, M, C, S, S_BLOCKS, stride_xn, stride_xc, stride_xs, TOTAL,
                                   SPATIAL, FLAT, BLOCK_M, BLOCK_C)
        dx_offset, _, _ = _elements(t, c0, M, C, S, S_BLOCKS, stride_dxn, stride_dxc, stride_dxs, TOTAL,
                                    SPATIAL, FLAT, BLOCK_M, BLOCK_C)
    g = tl.load(DY + dy_offset, mask=mask, other=0.0).to(tl.float32)
    if BATCH_STATS or ACT:
        x = tl.load(X + x_offset, mask=mask, other=0.0).to(tl.float32)
        x_c = _centred(x, CENTRE, c, C)
    if ACT:
        z = x_c * _load_channel(SCALE, c, C) + _load_channel(SHIFT, c, C)
        g = activate_grad(g, z, ACT)
    if BATCH_STATS:
        x_hat = x_c * _load_channel(RSTD, c, C)
        g = g - _load_channel(MEAN_DY, c, C) - x_hat * _load_channel(MEAN_DY_XHAT, c, C)
    dx = g * _load_channel(SCALE, c, C)
    tl.store(DX + dx_offset, cast_to(dx, DX, RNE_BY_HAND), mask=mask)


@triton.jit
def batch_norm_bwd_finalize_kernel(
    SUM_DY_PART, SUM_DY_XHAT_PART, MEAN_DY, MEAN_DY_XHAT, DW, DB, P, C, M,
    MEANS: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, RNE_BY_HAND: tl.constexpr,
):
    """Program j, channels of block j: ``sum(dy)`` and ``sum(dy * x_hat)`` from the P partials
    of :func:`batch_norm_bwd_reduce_kernel` in a fixed order (tiles of BLOCK_P rows, each summed
    as a tree), then their means over the M rows for the input gradient (``MEANS``; IEEE
    division) and ``db``/``dw`` rounded once to the parameters' dtypes: one launch where it took
    a torch sum, a division and a cast each."""
    c = (tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    mask_c = c < C
    sum_dy = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sum_dy_xhat = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)[:, None]
        offs = p * C + c[None, :]
        mask = (p < P) & mask_c[None, :]
        sum_dy += tl.sum(tl.load(SUM_DY_PART + offs, mask=mask, other=0.0), axis=0)
        sum_dy_xhat += tl.sum(tl.load(SUM_DY_XHAT_PART + offs, mask=mask, other=0.0), axis=0)
    if MEANS:
        m = M * 1.0
        tl.store(MEAN_DY + c, tl.math.div_rn(sum_dy, m), mask=mask_c)
        tl.store(MEAN_DY_XHAT + c, tl.math.div_rn(sum_dy_xhat, m), mask=mask_c)
    if COMPUTE_DW:
        tl.store(DW + c, cast_to(sum_dy_xhat, DW, RNE_BY_HAND), mask=mask_c)
    if COMPUTE_DB:
        tl.store(DB + c, cast_to(sum_dy, DB, RNE_BY_HAND), mask=mask_c)


@triton.jit
def _running_update(R, stride_r, batch, c, mask_c, momentum, keep, RNE_BY_HAND: tl.constexpr):
    """``R[c] = batch * momentum + R[c] * keep`` in fp32 (``keep = 1 - momentum``, both rounded
    to fp32 by the launcher), each product and the sum rounded as written (no FMA), then rounded
    once to R's dtype: :func:`normkit.numerics.update_running_stats`'s arithmetic and order, so
    fp32 statistics get the same bits."""
    r = tl.load(R + c * stride_r, mask=mask_c, other=0.0).to(tl.float32)
    tl.store(R + c * stride_r, cast_to(batch * momentum + r * keep, R, RNE_BY_HAND), mask=mask_c)


@triton.jit
def batch_norm_finalize_kernel(
    MEAN_PART, M2_PART, SCALE_PART, COUNT_PART, PIVOTS, W, B, CENTRE, RSTD, SCALE, SHIFT,
    RUNNING_MEAN, RUNNING_VAR, P, C, M, stride_pivot, stride_w, stride_b, stride_rm, stride_rv,
    eps, momentum, keep,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, UPDATE_MEAN: tl.constexpr,
    UPDATE_VAR: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    RNE_BY_HAND: tl.constexpr,
):
    """Program j, channels of block j: the k-way Chan merge of the P partials of
    :func:`batch_norm_stats_kernel`, the apply kernel's coefficients and the running update,
    in one launch where it took ~27 small ATen ops (issue 15 item 7). In units of the largest
    partial scale (powers of two: exact)::

        mean = sum(n_p * mean_p) / M,   M2 = sum(M2_p) + sum(n_p * (mean_p - mean)^2)

    (deviations of partial means, never ``E[x^2] - E[x]^2``). Writes ``CENTRE = [pivot; mean
    of x - pivot]`` (``PIVOTS``: x, of which the kernel reads the C pivots only, at
    ``c * stride_pivot``), ``RSTD``, ``SCALE = rstd * w`` and ``SHIFT = b`` (fp32; 1 and 0 without
    parameters) for the normalization and its backward. The variance is scaled back in
    float64: at ``|x| ~ 1e20`` it exceeds fp32 where rstd does not; rstd is ``1 / sqrt(var +
    eps)`` in float64 rounded once to fp32, and 0 where ``var + eps == 0`` (ATen's rule).

    The running statistics (``UPDATE_MEAN``/``UPDATE_VAR``; any stride, fp32/bf16/fp16) take
    the batch mean and the unbiased variance (Bessel's ``M / (M - 1)`` in float64 for ``M > 1``,
    then fp32) through :func:`_running_update`; the launcher has checked every argument, so
    the kernel writes all of them or the call fails before it."""
    c = (tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    mask_c = c < C
    scale = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)[:, None]
        mask = (p < P) & mask_c[None, :]
        scale = tl.maximum(scale, tl.max(tl.load(SCALE_PART + p * C + c[None, :], mask=mask,
                                                 other=0.0), axis=0))
    scale = tl.where(mask_c, scale, 1.0)
    total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)[:, None]
        mask = (p < P) & mask_c[None, :]
        n_p = tl.load(COUNT_PART + p * C + c[None, :], mask=mask, other=0.0)
        mean_p = tl.load(MEAN_PART + p * C + c[None, :], mask=mask, other=0.0)
        total += tl.sum(n_p * (mean_p / scale[None, :]), axis=0)
    shifted_mean = total / M * scale
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)[:, None]
        mask = (p < P) & mask_c[None, :]
        offs = p * C + c[None, :]
        n_p = tl.load(COUNT_PART + offs, mask=mask, other=0.0)
        r = tl.load(SCALE_PART + offs, mask=mask, other=0.0) / scale[None, :]
        d = (tl.load(MEAN_PART + offs, mask=mask, other=0.0) - shifted_mean[None, :]) / scale[None, :]
        m2 += tl.sum(tl.load(M2_PART + offs, mask=mask, other=0.0) * (r * r) + n_p * (d * d), axis=0)
    pivot = _pivot(PIVOTS, c, C, stride_pivot)
    scale64 = scale.to(tl.float64)
    var = m2.to(tl.float64) * (scale64 * scale64) / M  # biased
    v = var + eps
    rstd = tl.where(v == 0.0, 0.0, 1.0 / tl.sqrt(v)).to(tl.float32)
    tl.store(CENTRE + c, pivot, mask=mask_c)
    tl.store(CENTRE + C + c, shifted_mean, mask=mask_c)
    tl.store(RSTD + c, rstd, mask=mask_c)
    w_rstd = rstd
    if HAS_W:
        w_rstd = rstd * tl.load(W + c * stride_w, mask=mask_c, other=0.0).to(tl.float32)
    tl.store(SCALE + c, w_rstd, mask=mask_c)
    b = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if HAS_B:
        b = tl.load(B + c * stride_b, mask=mask_c, other=0.0).to(tl.float32)
    tl.store(SHIFT + c, b, mask=mask_c)
    if UPDATE_MEAN:
        _running_update(RUNNING_MEAN, stride_rm, pivot + shifted_mean, c, mask_c, momentum, keep,
                        RNE_BY_HAND)
    if UPDATE_VAR:
        m = M.to(tl.float64)
        unbiased = tl.where(M > 1, var * (m / (m - 1.0)), var).to(tl.float32)
        _running_update(RUNNING_VAR, stride_rv, unbiased, c, mask_c, momentum, keep, RNE_BY_HAND)
