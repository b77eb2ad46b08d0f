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

Four kernels, each over tiles of ``BLOCK_M`` rows x ``BLOCK_C`` channels:

* ``batch_norm_stats_kernel``: a program owns a contiguous block of rows and a block of
  channels; it merges per-tile (count, mean, M2) of ``x - pivot`` (pivot: one element of the
  channel) with Chan's formula, M2 in units of a power-of-two scale, and writes its partial
  mean, M2 and scale per channel to ``[P, C]`` buffers (P programs along the rows).
* ``batch_norm_apply_kernel``: ``y = ((x - pivot) - mean) * scale + shift`` with per-channel
  fp32 vectors (training: the batch's pivot and mean of ``x - pivot``, ``w * rstd``, b; eval:
  the running mean and 0, and the same from the running variance). Every kernel centres x
  this way (``centre = [pivot; mean]``), so a large common offset cancels exactly first.
* ``batch_norm_bwd_reduce_kernel``: per-program partial ``sum(dy)`` and ``sum(dy * x_hat)``.
* ``batch_norm_bwd_apply_kernel``: ``dx = w * rstd * (dy - sum_dy / n - x_hat * sum_dy_xhat / n)``
  (batch statistics) or ``dx = w * rstd * dy`` (running statistics).

Norm + activation (``ACT``, as the row norms): the apply kernel applies the activation before
its store; both backward kernels recompute its input ``z = (x - mean) * scale + shift`` and use
``dz = dy * act'(z)`` in place of ``dy``.

The partials are merged by the launcher, in a fixed order (no atomics).
"""

from __future__ import annotations

import triton
import triton.language as tl

from normkit.ops.triton.jit_helpers import activate, activate_grad, cast_to, chan_merge, pow2_floor

__all__ = [
    "batch_norm_apply_kernel",
    "batch_norm_bwd_apply_kernel",
    "batch_norm_bwd_reduce_kernel",
    "batch_norm_stats_kernel",
]


@triton.jit
def _tile(m0, c0, M, C, S, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row and channel indices of the tile at (m0, c0), its (sample, position) split and mask."""
    m = m0 + tl.arange(0, BLOCK_M)[:, None]  # m0 is int64
    c = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)[None, :]  # c * stride_c may pass 2**31
    return m // S, m % S, c, (m < M) & (c < C)  # S == 1 is a constant: no division then


@triton.jit
def _offsets(n, s, c, stride_n, stride_c, stride_s):
    return n * stride_n + s * stride_s + c * stride_c


@triton.jit
def _load_channel(P, c0, C, BLOCK_C: tl.constexpr):
    """A per-channel fp32 vector, as a (1, BLOCK_C) row of the tile."""
    c = c0 + tl.arange(0, BLOCK_C)[None, :]
    return tl.load(P + c, mask=c < C, other=0.0)


@triton.jit
def _centred(x, CENTRE, c0, C, BLOCK_C: tl.constexpr):
    """``(x - pivot) - mean`` with ``CENTRE = [pivot; mean]`` (2, C): the batch's shift and the
    mean of ``x - pivot`` (so a large offset cancels exactly first, as in the statistics), or
    the running mean and 0."""
    return (x - _load_channel(CENTRE, c0, C, BLOCK_C)) - _load_channel(CENTRE + C, c0, C, BLOCK_C)


@triton.jit
def batch_norm_stats_kernel(
    X, SHIFT, MEAN_PART, M2_PART, SCALE_PART,
    M, C, S, stride_xn, stride_xc, stride_xs, rows_per_program,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (p, j): rows ``[p * rows_per_program, ...)``, channels of block j; writes the
    mean and M2 of its rows of ``x - shift`` to ``MEAN_PART[p, c]`` and, in units of
    ``SCALE_PART[p, c]^2``, ``M2_PART[p, c]`` (the count is implied).

    ``shift`` is one element of the channel: a constant channel is then exactly 0 (zero
    variance, output exactly the bias), and a large common offset cancels exactly (Sterbenz)
    before any rounding. The scale, a power of two near the largest ``|x - shift|`` seen, keeps
    the squares in range: at ``|x| ~ 1e20`` they would overflow fp32 (1e40), and the M2 of a
    channel may exceed fp32 while its rstd does not. Scaling by a power of two is exact."""
    pid_m = tl.program_id(0)
    c0 = tl.program_id(1) * BLOCK_C
    row_start = pid_m.to(tl.int64) * rows_per_program  # int64: offsets may pass 2**31
    row_end = tl.minimum(row_start + rows_per_program, M)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)  # in units of scale^2
    scale = tl.zeros((BLOCK_C,), dtype=tl.float32)
    count = 0.0
    for m0 in range(row_start, row_end, BLOCK_M):
        n, s, c, mask = _tile(m0, c0, row_end, C, S, BLOCK_M, BLOCK_C)
        x = tl.load(X + _offsets(n, s, c, stride_xn, stride_xc, stride_xs), mask=mask,
                    other=0.0).to(tl.float32)
        x = tl.where(mask, x - _load_channel(SHIFT, c0, C, BLOCK_C), 0.0)
        n_b = tl.minimum(row_end - m0, BLOCK_M).to(tl.float32)
        scale_b = pow2_floor(tl.max(tl.abs(x), axis=0))
        xs = x * (1.0 / scale_b)[None, :]  # |xs| < 2
        mean_bs = tl.sum(xs, axis=0) / n_b
        d = tl.where(mask, xs - mean_bs[None, :], 0.0)
        m2_b = tl.sum(d * d, axis=0)  # in units of scale_b^2
        mean, m2, scale, count = chan_merge(mean, m2, scale, count, mean_bs, m2_b, scale_b, n_b)
    c = c0 + tl.arange(0, BLOCK_C)
    tl.store(MEAN_PART + pid_m * C + c, mean, mask=c < C)
    tl.store(M2_PART + pid_m * C + c, m2, mask=c < C)
    tl.store(SCALE_PART + pid_m * C + c, scale, mask=c < C)


@triton.jit
def batch_norm_apply_kernel(
    X, Y, CENTRE, SCALE, SHIFT,
    M, C, S, stride_xn, stride_xc, stride_xs, stride_yn, stride_yc, stride_ys,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, RNE_BY_HAND: tl.constexpr,
):
    """One tile per program: ``y = act((x - mean) * scale + shift)`` (centring first keeps a
    large common offset from costing precision in ``x * scale``)."""
    m0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    c0 = tl.program_id(1) * BLOCK_C
    n, s, c, mask = _tile(m0, c0, M, C, S, BLOCK_M, BLOCK_C)
    x = tl.load(X + _offsets(n, s, c, stride_xn, stride_xc, stride_xs), mask=mask,
                other=0.0).to(tl.float32)
    y = _centred(x, CENTRE, c0, C, BLOCK_C) * _load_channel(SCALE, c0, C, BLOCK_C)
    y = activate(y + _load_channel(SHIFT, c0, C, BLOCK_C), ACT)
    tl.store(Y + _offsets(n, s, c, stride_yn, stride_yc, stride_ys), cast_to(y, Y, RNE_BY_HAND),
             mask=mask)


@triton.jit
def batch_norm_bwd_reduce_kernel(
    X, DY, CENTRE, RSTD, SCALE, SHIFT, SUM_DY_PART, SUM_DY_XHAT_PART,
    M, C, S, stride_xn, stride_xc, stride_xs, stride_dyn, stride_dyc, stride_dys,
    rows_per_program,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (p, j): fp32 ``sum(dy)`` and ``sum(dy * x_hat)`` over its rows, per channel
    (``dy`` the gradient at the activation's input when there is one)."""
    pid_m = tl.program_id(0)
    c0 = tl.program_id(1) * BLOCK_C
    row_start = pid_m.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    rstd = _load_channel(RSTD, c0, C, BLOCK_C)
    if ACT:
        scale = _load_channel(SCALE, c0, C, BLOCK_C)
        shift = _load_channel(SHIFT, c0, C, BLOCK_C)
    sum_dy = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sum_dy_xhat = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        n, s, c, mask = _tile(m0, c0, row_end, C, S, BLOCK_M, BLOCK_C)
        x = tl.load(X + _offsets(n, s, c, stride_xn, stride_xc, stride_xs), mask=mask,
                    other=0.0).to(tl.float32)
        dy = tl.load(DY + _offsets(n, s, c, stride_dyn, stride_dyc, stride_dys), mask=mask,
                     other=0.0).to(tl.float32)
        x_c = _centred(x, CENTRE, c0, C, BLOCK_C)
        if ACT:
            dy = activate_grad(dy, x_c * scale + shift, ACT)
        sum_dy += tl.sum(dy, axis=0)
        sum_dy_xhat += tl.sum(dy * (x_c * rstd), axis=0)  # masked lanes: dy = 0
    c = c0 + tl.arange(0, BLOCK_C)
    tl.store(SUM_DY_PART + pid_m * C + c, sum_dy, mask=c < C)
    tl.store(SUM_DY_XHAT_PART + pid_m * C + c, sum_dy_xhat, mask=c < C)


@triton.jit
def batch_norm_bwd_apply_kernel(
    X, DY, DX, CENTRE, RSTD, SCALE, SHIFT, MEAN_DY, MEAN_DY_XHAT,
    M, C, S, stride_xn, stride_xc, stride_xs, stride_dyn, stride_dyc, stride_dys,
    stride_dxn, stride_dxc, stride_dxs,
    BATCH_STATS: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    RNE_BY_HAND: tl.constexpr,
):
    """``dx = scale * (dy - mean(dy) - x_hat * mean(dy * x_hat))`` with ``scale = w * rstd``;
    with running statistics (``BATCH_STATS=0``) mean and rstd are constants: ``dx = scale * dy``.
    With an activation, ``dy`` is first ``dy * act'((x - mean) * scale + shift)``."""
    m0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    c0 = tl.program_id(1) * BLOCK_C
    n, s, c, mask = _tile(m0, c0, M, C, S, BLOCK_M, BLOCK_C)
    g = tl.load(DY + _offsets(n, s, c, stride_dyn, stride_dyc, stride_dys), mask=mask,
                other=0.0).to(tl.float32)
    if BATCH_STATS or ACT:
        x = tl.load(X + _offsets(n, s, c, stride_xn, stride_xc, stride_xs), mask=mask,
                    other=0.0).to(tl.float32)
        x_c = _centred(x, CENTRE, c0, C, BLOCK_C)
    if ACT:
        z = x_c * _load_channel(SCALE, c0, C, BLOCK_C) + _load_channel(SHIFT, c0, C, BLOCK_C)
        g = activate_grad(g, z, ACT)
    if BATCH_STATS:
        x_hat = x_c * _load_channel(RSTD, c0, C, BLOCK_C)
        g = g - _load_channel(MEAN_DY, c0, C, BLOCK_C) \
            - x_hat * _load_channel(MEAN_DY_XHAT, c0, C, BLOCK_C)
    dx = g * _load_channel(SCALE, c0, C, BLOCK_C)
    tl.store(DX + _offsets(n, s, c, stride_dxn, stride_dxc, stride_dxs),
             cast_to(dx, DX, RNE_BY_HAND), mask=mask)
