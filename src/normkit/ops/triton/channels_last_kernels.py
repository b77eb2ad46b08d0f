"""GroupNorm and InstanceNorm kernels for channels_last input: channels are the tile's fast axis.

In channels_last memory a sample is ``S`` pixels of ``C`` contiguous channels (the ``(N, C, S)``
view has ``stride_c = 1``). The row kernels (:mod:`normkit.ops.triton.row_norm_kernels`) walk one
(sample, group) row at a time, which there means one group's few channels per pixel, at stride
C: a scalar load per lane and most of every 32-byte sector fetched for nothing (issue 15 item 5).
These kernels give a program a block of ``GROUPS_PER_BLOCK`` whole groups (``R`` channels each,
``R = 1`` for InstanceNorm) of one sample, and a tile of ``BLOCK_S`` pixels by ``BLOCK_C``
channels, channels fastest:

* the block's first channel is a multiple of ``GROUPS_PER_BLOCK * R``, a compile-time number
  the launcher makes a multiple of a 16-byte vector, so the loads along the channels are full
  vectors (SD's UNet GroupNorm, 10 channels a group in bf16: blocks of 12 groups, 120 channels);
* statistics are taken per channel over the pixels (a vector of ``BLOCK_C`` per tile, merged
  across tiles with Chan's formula), then per group: a group's mean is the mean of its
  channels' means, its sum of squared deviations ``sum_c m2_c + S * (mean_c - mean)^2``, exact
  and free of ``E[x^2] - E[x]^2``;
* the pixels of a long row are split across programs ``(sample and block, split)`` in two
  launches each way, as the row kernels split theirs: partial per-channel moments (forward) or
  dot products (backward) stored by the first, merged in split order by the second.

Every order of summation (tiles, splits, channels of a group) depends on ``C``, ``R`` and ``S``
alone: a sample's result does not depend on the batch around it. The numerics are the row
kernels' (their module docstring, "Numerics"): statistics of ``x - pivot`` with the group's first
element as pivot, power-of-two scaling, IEEE-rounded rstd, and ``MEAN``/``RSTD``/``VAR`` hold what
the row kernels store, one entry per (sample, group). The backward leaves dw/db as fp32 partial
sums per (sample, split, channel), summed by the launcher in a fixed order.
"""

from __future__ import annotations

import triton
import triton.language as tl

from normkit.ops.triton.jit_helpers import activate, activate_grad, cast_to, chan_merge, pow2_floor, rstd_of

__all__ = ["channels_last_bwd_kernel", "channels_last_fwd_kernel"]


@triton.jit
def _block_of_program(GROUPS, R: tl.constexpr, GROUPS_PER_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    """``(n, g0, c0, cl, mask_c)``: the sample and first group and channel of this program's
    block, the block's channel indices and which of them exist. ``c0`` is a multiple of the
    compile-time ``GROUPS_PER_BLOCK * R``, which is what lets the compiler prove the loads
    aligned."""
    blocks = tl.cdiv(GROUPS, GROUPS_PER_BLOCK)
    pid = tl.program_id(0)
    n = (pid // blocks).to(tl.int64)
    g0 = (pid % blocks) * GROUPS_PER_BLOCK
    c0 = (pid % blocks) * (GROUPS_PER_BLOCK * R)
    cl = tl.arange(0, BLOCK_C)
    mask_c = (cl < GROUPS_PER_BLOCK * R) & (c0 + cl < GROUPS * R)
    return n, g0, c0, cl, mask_c


@triton.jit
def _pixels(s0, S, mask_c, BLOCK_S: tl.constexpr):
    """The tile's pixel indices (int64: ``s * stride_s`` passes 2**31 in a large sample) and
    its mask."""
    s = (s0 + tl.arange(0, BLOCK_S)).to(tl.int64)[:, None]
    return s, (s < S) & mask_c[None, :]


@triton.jit
def _channel_moments(x, mask, n_b):
    """Per channel: (mean in units of scale, sum of squared deviations in units of scale^2,
    scale) of the shifted tile ``x`` (masked lanes 0) over its ``n_b`` valid pixels."""
    scale = pow2_floor(tl.max(tl.abs(x), axis=0))
    xs = x * (1.0 / scale)[None, :]
    mean_s = tl.sum(xs, axis=0) / n_b
    d = tl.where(mask, xs - mean_s[None, :], 0.0)
    return mean_s, tl.sum(d * d, axis=0), scale


@triton.jit
def _membership(cl, mask_c, R: tl.constexpr, BLOCK_G: tl.constexpr):
    """``[BLOCK_C, BLOCK_G]``: channel ``cl`` belongs to the block's group ``g``."""
    return ((cl // R)[:, None] == tl.arange(0, BLOCK_G)[None, :]) & mask_c[:, None]


@triton.jit
def _group_sum(v, member, R: tl.constexpr):
    """Per group, the sum of the channel vector ``v`` (InstanceNorm: the vector itself)."""
    if R == 1:
        out = v
    else:
        out = tl.sum(tl.where(member, v[:, None], 0.0), axis=0)
    return out


@triton.jit
def _to_channels(v, member, R: tl.constexpr):
    """The group vector ``v`` at each channel of the group (InstanceNorm: itself)."""
    if R == 1:
        out = v
    else:
        out = tl.sum(tl.where(member, v[None, :], 0.0), axis=1)
    return out


@triton.jit
def _group_moments(mean, m2, scale, count, member, mask_c, R: tl.constexpr):
    """A group's ``(mean, biased variance in units of scale^2, scale)`` from its channels'
    ``(mean, m2 in units of scale^2, scale)`` over all ``count`` pixels each: the mean of the
    means, and ``sum_c m2_c + count * (mean_c - mean)^2`` at the largest channel scale."""
    if R == 1:
        g_mean = mean
        g_var = m2 / count
        g_scale = scale
    else:
        g_scale = tl.max(tl.where(member, scale[:, None], 0.0), axis=0)
        g_scale = tl.where(g_scale == 0.0, 1.0, g_scale)  # groups past the last: no channels
        g_mean = _group_sum(mean, member, R) / R
        c_scale = tl.where(mask_c, _to_channels(g_scale, member, R), 1.0)
        ratio = scale / c_scale
        dev = (mean - _to_channels(g_mean, member, R)) / c_scale
        m2_c = m2 * (ratio * ratio) + dev * (dev * count)
        g_var = _group_sum(m2_c, member, R) / (count * R)
    return g_mean, g_var, g_scale


@triton.jit
def _pivots(X, stride_xs, cl, mask_c, member, R: tl.constexpr, BLOCK_S: tl.constexpr):
    """Each channel's pivot: its group's first element, at pixel 0. Read as a tile of which only
    the first pixel is enabled, so it is a vector load per lane like the stream's (a gather of
    one element per channel would be a scalar per lane), then moved to the group's channels."""
    s, mask = _pixels(0, 1, mask_c, BLOCK_S)
    first = tl.sum(tl.load(X + s * stride_xs + cl[None, :], mask=mask, other=0.0).to(tl.float32), axis=0)
    if R == 1:
        pivot = first
    else:
        pivot = _to_channels(_group_sum(tl.where(cl % R == 0, first, 0.0), member, R), member, R)
    return pivot


@triton.jit
def _affine(P, c0, cl, mask_c, HAS: tl.constexpr, default):
    if HAS:
        p = tl.load(P + c0 + cl, mask=mask_c, other=0.0).to(tl.float32)
    else:
        p = default
    return p


@triton.jit
def channels_last_fwd_kernel(
    X,
    Y,
    W,
    B,
    MEAN,
    RSTD,
    VAR,
    PART,
    stride_xn,
    stride_xs,
    stride_yn,
    stride_ys,
    S,
    GROUPS,
    eps,
    split_s,
    splits,
    R: tl.constexpr,
    GROUPS_PER_BLOCK: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_S: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
    SPLIT: tl.constexpr,
    RNE_BY_HAND: tl.constexpr,
):
    """Program ``(sample and block, split)``: statistics of its groups, then ``y = act((x - mean)
    * rstd * w + b)`` over pixels ``[split * split_s, ...)``.

    ``SPLIT`` 1 stores the per-channel moments of its pixels to ``PART[n, split, 0:4, c]``
    (mean, m2, scale, count); 2 merges a channel's partials in split order (every program of
    the sample and block computes the same bits), then normalizes; 0: all pixels in one
    program. ``SINGLE_BLOCK``: they fit one tile, read once."""
    n, g0, c0, cl, mask_c = _block_of_program(GROUPS, R, GROUPS_PER_BLOCK, BLOCK_C)
    split = tl.program_id(1)
    s_lo = split * split_s
    s_hi = tl.minimum(s_lo + split_s, S)
    C = GROUPS * R
    X += n * stride_xn + c0
    Y += n * stride_yn + c0
    member = _membership(cl, mask_c, R, BLOCK_G)
    pivot = _pivots(X, stride_xs, cl, mask_c, member, R, BLOCK_S)

    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)  # in units of scale^2
    scale = tl.zeros([BLOCK_C], dtype=tl.float32)
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    if SINGLE_BLOCK:
        s, mask = _pixels(0, S, mask_c, BLOCK_S)
        x = tl.load(X + s * stride_xs + cl[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, x - pivot[None, :], 0.0)
        mean_s, m2, scale = _channel_moments(x, mask, S * 1.0)
        mean = mean_s * scale
        count += S
    elif SPLIT != 2:
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s, mask = _pixels(s0, S, mask_c, BLOCK_S)
            x = tl.load(X + s * stride_xs + cl[None, :], mask=mask, other=0.0).to(tl.float32)
            x = tl.where(mask, x - pivot[None, :], 0.0)
            n_b = tl.minimum(S - s0, BLOCK_S) * 1.0
            mean_bs, m2_b, scale_b = _channel_moments(x, mask, n_b)
            mean, m2, scale, count = chan_merge(mean, m2, scale, count, mean_bs, m2_b, scale_b, n_b)
    else:
        for j in range(0, splits):
            part = PART + ((n * splits + j) * 4) * C + c0 + cl
            scale_j = tl.load(part + 2 * C, mask=mask_c, other=1.0)
            mean, m2, scale, count = chan_merge(
                mean,
                m2,
                scale,
                count,
                tl.load(part, mask=mask_c, other=0.0) / scale_j,
                tl.load(part + C, mask=mask_c, other=0.0),
                scale_j,
                tl.load(part + 3 * C, mask=mask_c, other=1.0),
            )
    if SPLIT == 1:
        part = PART + ((n * splits + split) * 4) * C + c0 + cl
        tl.store(part, mean, mask=mask_c)
        tl.store(part + C, m2, mask=mask_c)
        tl.store(part + 2 * C, scale, mask=mask_c)
        tl.store(part + 3 * C, count, mask=mask_c)
    else:
        g_mean, g_var, g_scale = _group_moments(mean, m2, scale, S * 1.0, member, mask_c, R)
        g_rstd = rstd_of(g_var, g_scale, eps)
        mean = _to_channels(g_mean, member, R)
        rstd = _to_channels(g_rstd, member, R)
        w = _affine(W, c0, cl, mask_c, HAS_WEIGHT, 1.0)
        b = _affine(B, c0, cl, mask_c, HAS_BIAS, 0.0)
        if SINGLE_BLOCK:
            y = activate((x - mean[None, :]) * rstd[None, :] * w + b, ACT)
            tl.store(Y + s * stride_ys + cl[None, :], cast_to(y, Y, RNE_BY_HAND), mask=mask)
        else:
            for s0 in range(s_lo, s_hi, BLOCK_S):
                s, mask = _pixels(s0, S, mask_c, BLOCK_S)
                x = tl.load(X + s * stride_xs + cl[None, :], mask=mask, other=0.0).to(tl.float32)
                y = activate(((x - pivot[None, :]) - mean[None, :]) * rstd[None, :] * w + b, ACT)
                tl.store(Y + s * stride_ys + cl[None, :], cast_to(y, Y, RNE_BY_HAND), mask=mask)
        if split == 0:
            g = tl.arange(0, BLOCK_G)
            mask_g = (g < GROUPS_PER_BLOCK) & (g0 + g < GROUPS)
            rows = n * GROUPS + g0 + g
            tl.store(MEAN + rows, g_mean, mask=mask_g)
            tl.store(RSTD + rows, g_rstd, mask=mask_g)
            tl.store(VAR + rows, g_var * g_scale * g_scale, mask=mask_g)


@triton.jit
def _grad_terms(
    X, DY, s, cl, stride_xs, stride_dys, mask, pivot, mean, rstd, w, b, HAS_WEIGHT: tl.constexpr, ACT: tl.constexpr
):
    """x_hat, dy and w * dy of one tile (fp32); with an activation, dy is the gradient at its
    input, recomputed from ``x_hat * w + b``. x_hat is formed as in the forward."""
    x = tl.load(X + s * stride_xs + cl[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + s * stride_dys + cl[None, :], mask=mask, other=0.0).to(tl.float32)
    x_hat = ((x - pivot[None, :]) - mean[None, :]) * rstd[None, :]  # masked lanes: dy = 0
    if ACT:
        dy = activate_grad(dy, x_hat * w + b, ACT)
    if HAS_WEIGHT:
        wdy = w * dy
    else:
        wdy = dy
    return x_hat, dy, wdy


@triton.jit
def channels_last_bwd_kernel(
    X,
    W,
    B,
    MEAN,
    RSTD,
    DY,
    DX,
    DW_PART,
    DB_PART,
    ROW_DOTS,
    stride_xn,
    stride_xs,
    stride_dyn,
    stride_dys,
    stride_dxn,
    stride_dxs,
    S,
    GROUPS,
    split_s,
    splits,
    R: tl.constexpr,
    GROUPS_PER_BLOCK: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_S: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
    SPLIT: tl.constexpr,
    RNE_BY_HAND: tl.constexpr,
):
    """Program ``(sample and block, split)``. With ``c1 = mean(x_hat * w * dy)`` and ``c2 =
    mean(w * dy)`` over a group: ``dx = rstd * (w * dy - x_hat * c1 - c2)``; the channel sums
    ``dy * x_hat`` and ``dy`` go to ``DW_PART``/``DB_PART[n, split, c]`` from the first pass.

    ``SPLIT`` 1 stores the per-channel sums for (c1, c2) to ``ROW_DOTS[n, split, 0:2, c]``;
    2 adds a channel's partial sums in split order, then writes dx; 0: all pixels in one
    program. ``B`` is read only with an activation (``HAS_BIAS``), to recompute its input."""
    n, g0, c0, cl, mask_c = _block_of_program(GROUPS, R, GROUPS_PER_BLOCK, BLOCK_C)
    split = tl.program_id(1)
    s_lo = split * split_s
    s_hi = tl.minimum(s_lo + split_s, S)
    C = GROUPS * R
    X += n * stride_xn + c0
    DY += n * stride_dyn + c0
    DX += n * stride_dxn + c0
    member = _membership(cl, mask_c, R, BLOCK_G)
    pivot = _pivots(X, stride_xs, cl, mask_c, member, R, BLOCK_S)
    rows = n * GROUPS + (c0 + cl) // R
    mean = tl.load(MEAN + rows, mask=mask_c, other=0.0)
    rstd = tl.load(RSTD + rows, mask=mask_c, other=0.0)
    w = _affine(W, c0, cl, mask_c, HAS_WEIGHT, 1.0)
    b = _affine(B, c0, cl, mask_c, HAS_BIAS, 0.0)

    a1 = tl.zeros([BLOCK_C], dtype=tl.float32)  # per channel: sum of x_hat * w * dy
    a2 = tl.zeros([BLOCK_C], dtype=tl.float32)  # and of w * dy
    if SPLIT != 2:
        dw = tl.zeros([BLOCK_C], dtype=tl.float32)
        db = tl.zeros([BLOCK_C], dtype=tl.float32)
        if SINGLE_BLOCK:
            s, mask = _pixels(0, S, mask_c, BLOCK_S)
            x_hat, dy, wdy = _grad_terms(
                X, DY, s, cl, stride_xs, stride_dys, mask, pivot, mean, rstd, w, b, HAS_WEIGHT, ACT
            )
            a1 = tl.sum(x_hat * wdy, axis=0)
            a2 = tl.sum(wdy, axis=0)
            dw = tl.sum(dy * x_hat, axis=0)
            db = tl.sum(dy, axis=0)
        else:
            for s0 in range(s_lo, s_hi, BLOCK_S):
                s_b, mask_b = _pixels(s0, S, mask_c, BLOCK_S)
                x_hat_b, dy_b, wdy_b = _grad_terms(
                    X, DY, s_b, cl, stride_xs, stride_dys, mask_b, pivot, mean, rstd, w, b, HAS_WEIGHT, ACT
                )
                a1 += tl.sum(x_hat_b * wdy_b, axis=0)
                a2 += tl.sum(wdy_b, axis=0)
                if COMPUTE_DW:
                    dw += tl.sum(dy_b * x_hat_b, axis=0)
                if COMPUTE_DB:
                    db += tl.sum(dy_b, axis=0)
        part = (n * splits + split) * C + c0 + cl
        if COMPUTE_DW:
            tl.store(DW_PART + part, dw, mask=mask_c)
        if COMPUTE_DB:
            tl.store(DB_PART + part, db, mask=mask_c)
    if SPLIT == 1:
        dots = ROW_DOTS + ((n * splits + split) * 2) * C + c0 + cl
        tl.store(dots, a1, mask=mask_c)
        tl.store(dots + C, a2, mask=mask_c)
    else:
        if SPLIT == 2:
            for j in range(0, splits):
                dots = ROW_DOTS + ((n * splits + j) * 2) * C + c0 + cl
                a1 += tl.load(dots, mask=mask_c, other=0.0)
                a2 += tl.load(dots + C, mask=mask_c, other=0.0)
        n_row = R * S * 1.0
        c1 = _to_channels(_group_sum(a1, member, R) / n_row, member, R)
        c2 = _to_channels(_group_sum(a2, member, R) / n_row, member, R)
        if SINGLE_BLOCK:
            dx = (wdy - (x_hat * c1[None, :] + c2[None, :])) * rstd[None, :]
            tl.store(DX + s * stride_dxs + cl[None, :], cast_to(dx, DX, RNE_BY_HAND), mask=mask)
        else:
            for s0 in range(s_lo, s_hi, BLOCK_S):
                s_b, mask_b = _pixels(s0, S, mask_c, BLOCK_S)
                x_hat_b, dy_b, wdy_b = _grad_terms(
                    X, DY, s_b, cl, stride_xs, stride_dys, mask_b, pivot, mean, rstd, w, b, HAS_WEIGHT, ACT
                )
                dx = (wdy_b - (x_hat_b * c1[None, :] + c2[None, :])) * rstd[None, :]
                tl.store(DX + s_b * stride_dxs + cl[None, :], cast_to(dx, DX, RNE_BY_HAND), mask=mask_b)
