"""numba kernels of the norms of today's blocks: modulated (adaLN), gated (grouped) and sandwich
RMSNorm, and the normalization-free DyT and Derf.

They are the row kernels of :mod:`normkit.ops.numba._row_kernels` with one more step around
the normalization, built from the same pieces (the chunked, vectorized row sums, the strict
elementwise loops): every tensor is an ``(M, D)`` C-contiguous array of rows, flags are data
(``is_rms``; a 0-row ``gate``/``dres`` for "none"; ones/zeros for a missing weight/bias), and
one specialisation is compiled per input dtype (float32, float64, bf16 bits).

* :func:`mod_fwd` / :func:`mod_bwd`: ``y = (x_hat * w + b) * (1 + scale) + shift``; ``shift``
  and ``scale`` are ``(S, D)`` arrays of modulation rows, row ``i`` of x reading row
  ``i // rows`` of each (per sample: ``rows = L``; per token: 1; one for the batch: ``M``).
* :func:`gated_fwd` / :func:`gated_bwd`: RMSNorm per group of ``group`` channels of
  ``u = x * silu(gate)`` (``gated_after``: of ``x``, the output times ``silu(gate)``).
* :func:`sandwich_fwd` / :func:`sandwich_bwd`: ``r = res + rms(h) * w1`` (stored), ``y = rms(r) * w2``.
* :func:`squash_fwd` / :func:`squash_bwd`: ``y = w * squash(alpha * x + shift) + b``, squash
  tanh (DyT) or erf (Derf), elementwise; float32 tanh, erf and exp are the vectorized
  polynomials of :mod:`normkit.ops.numba._vector_math`, float64 calls libm.
* :func:`sum_groups`: ``out[s] = sum of p[s * group + c]`` over ``c`` in order.

Numerics (the same for every row, whatever the batch or the thread count): statistics as the
row kernels (float32, float64 for float64 input; a row whose squares overflow takes the
scaled path); results rounded once. Cross-row sums (weight, shift and scale gradients) are
kept per block of rows fixed by the shape, in row order, and the blocks added in block order
(DyT/Derf's alpha and shift gradients: per row in the statistics dtype, per block in float64).
"""

from __future__ import annotations

import numpy as np

from normkit.ops.numba._engine import decode, encode, jit, staging
from normkit.ops.numba._row_kernels import (
    _accumulate,
    _add,
    _input_grad,
    _row_dots,
    _row_sum,
    _row_sumsq,
    _scaled_stats,
)
from normkit.ops.numba._row_kernels import _scale as _scaled_rows
from normkit.ops.numba._vector_math import erf_rows, exp_rows, sigmoid_rows, tanh_rows

__all__ = [
    "gated_bwd",
    "gated_fwd",
    "mod_bwd",
    "mod_fwd",
    "sandwich_bwd",
    "sandwich_fwd",
    "squash_bwd",
    "squash_fwd",
    "sum_groups",
]


@jit
def _stats(v, is_rms, eps):
    """``(shift, mean, rstd)`` of a row as the row kernels take them (shift: the first element
    of a centred row; ``rstd = 0`` on a constant row with ``eps=0``; the scaled path on overflow
    and, with ``eps=0``, on underflow)."""
    # Scalars in the statistics dtype (an int would widen float32 arithmetic to float64).
    zero, one, n = v.dtype.type(0.0), v.dtype.type(1.0), v.dtype.type(v.shape[0])
    shift = zero if is_rms else v[0]
    mu = zero if is_rms else _row_sum(v, shift) / n
    var = _row_sumsq(v, shift, mu) / n
    r_std = zero if var + eps == zero else one / np.sqrt(var + eps)
    if not np.isfinite(var) or var + eps == zero:
        mu, r_std = _scaled_stats(v, shift, is_rms, eps)
    return shift, mu, r_std


# ---- modulated (adaLN) -------------------------------------------------------------------


@jit
def _modulate(v, shift, mu, r_std, w, b, sh, sc, out):
    """``out = (x_hat * w + b) * (1 + sc) + sh``."""
    one = w.dtype.type(1.0)
    for j in range(v.shape[0]):
        out[j] = ((v[j] - shift - mu) * r_std * w[j] + b[j]) * (one + sc[j]) + sh[j]


@jit
def _mod_grads(v, g, shift, mu, r_std, w, b, sc, dsh, dsc, dz):
    """``dsh += g``, ``dsc += g * z`` (``z = x_hat * w + b``) and ``dz = g * (1 + sc)``."""
    one = w.dtype.type(1.0)
    for j in range(v.shape[0]):
        dsh[j] += g[j]
        dsc[j] += g[j] * ((v[j] - shift - mu) * r_std * w[j] + b[j])
        dz[j] = g[j] * (one + sc[j])


@jit
def mod_fwd(x, sh, sc, w, b, eps, is_rms, y, mean, rstd, lo, hi):
    """Rows ``lo..hi-1``: ``y = (x_hat * w + b) * (1 + sc[i // rows_sc]) + sh[i // rows_sh]``;
    ``mean`` (of the shifted row; 0 for RMS) and ``rstd`` per row."""
    M, D = x.shape
    rows_sh, rows_sc = M // sh.shape[0], M // sc.shape[0]
    eps_ = w.dtype.type(eps)
    xbuf = np.empty(D, w.dtype)
    ybuf = np.empty(D, w.dtype)
    for i in range(lo, hi):
        v = decode(x[i], xbuf)
        shift, mu, r_std = _stats(v, is_rms, eps_)
        mean[i] = mu
        rstd[i] = r_std
        out = staging(y[i], ybuf)
        _modulate(v, shift, mu, r_std, w, b, sh[i // rows_sh], sc[i // rows_sc], out)
        encode(out, y[i])


@jit
def mod_bwd(dy, x, sc, w, b, mean, rstd, is_rms, rows, cpb, spb, dx, dshp, dscp, dwp, dbp, lo, hi):
    """``dx`` of :func:`mod_fwd` for the rows of blocks ``lo..hi-1``, and the blocks' partial
    sums. The rows are cut by modulation row (``rows`` rows each: the finer of shift's and
    scale's): block ``blk`` holds ``spb`` whole modulation rows, or chunk ``blk % cpb`` of
    ``cpb`` chunks of one (one of ``cpb``, ``spb`` is 1). ``dshp[s * cpb + c]`` /
    ``dscp[s * cpb + c]``: the sums of ``dy`` and ``dy * z`` over chunk ``c`` of modulation row
    ``s``; ``dwp[blk]``/``dbp[blk]`` those of ``dz * x_hat`` and ``dz`` over the block (``dz =
    dy * (1 + scale)``), all in row order."""
    M, D = x.shape
    S = M // rows
    rows_sc = M // sc.shape[0]
    chunk = -(-rows // cpb)
    zero, n = w.dtype.type(0.0), w.dtype.type(D)
    xbuf = np.empty(D, w.dtype)
    gbuf = np.empty(D, w.dtype)
    zbuf = np.empty(D, w.dtype)
    obuf = np.empty(D, w.dtype)
    for blk in range(lo, hi):
        dw = dwp[blk]
        db = dbp[blk]
        dw[:] = zero
        db[:] = zero
        c = blk % cpb
        s_lo = (blk // cpb) * spb
        for s in range(s_lo, min(S, s_lo + spb)):
            dsh = dshp[s * cpb + c]
            dsc = dscp[s * cpb + c]
            dsh[:] = zero
            dsc[:] = zero
            first = s * rows + c * chunk
            for i in range(first, min(first + chunk, (s + 1) * rows)):
                v = decode(x[i], xbuf)
                g = decode(dy[i], gbuf)
                shift = zero if is_rms else v[0]
                mu, r_std = mean[i], rstd[i]
                _mod_grads(v, g, shift, mu, r_std, w, b, sc[i // rows_sc], dsh, dsc, zbuf)
                sum_g, sum_gx = _row_dots(v, zbuf, w, shift, mu, r_std)
                c_g = zero if is_rms else sum_g / n
                _accumulate(v, zbuf, shift, mu, r_std, dw)
                if not is_rms:
                    _add(zbuf, db)
                out = staging(dx[i], obuf)
                _input_grad(v, zbuf, w, shift, mu, r_std, c_g, sum_gx / n, out)
                encode(out, dx[i])


@jit
def sum_groups(p, group, out, lo, hi):
    """``out[s] = p[s * group] + p[s * group + 1] + ...`` (``group`` rows, in order) for ``s``
    in ``lo..hi-1``."""
    for s in range(lo, hi):
        o = out[s]
        o[:] = p[s * group]
        for c in range(1, group):
            r = p[s * group + c]
            for j in range(o.shape[0]):
                o[j] += r[j]


# ---- gated, grouped RMSNorm --------------------------------------------------------------


@jit
def _gate_rows(v, z, sig, gated_after, u, a):
    """``a = z * sig`` (silu of the gate) and ``u = x * a`` (``x`` when gated after)."""
    for j in range(v.shape[0]):
        a[j] = z[j] * sig[j]
        u[j] = v[j] if gated_after else v[j] * a[j]


@jit
def _times(out, a):
    """``out *= a``."""
    for j in range(out.shape[0]):
        out[j] = out[j] * a[j]


@jit
def gated_fwd(x, gate, w, eps, group, gated_after, y, rstd, lo, hi):
    """Rows ``lo..hi-1``: per group of ``group`` channels, ``y = u * rstd * w`` with ``u = x *
    silu(gate)`` (``x`` where ``gate`` has no rows or ``gated_after``; then, with a gate, ``y``
    times ``silu(gate)``); ``rstd[i, k]`` of group ``k`` of row ``i``."""
    M, D = x.shape
    has_gate = gate.shape[0] > 0
    zero, one, n, eps_ = w.dtype.type(0.0), w.dtype.type(1.0), w.dtype.type(group), w.dtype.type(eps)
    xbuf = np.empty(D, w.dtype)
    zbuf = np.empty(D, w.dtype)
    sbuf = np.empty(D, w.dtype)
    abuf = np.empty(D, w.dtype)
    ubuf = np.empty(D, w.dtype)
    ybuf = np.empty(D, w.dtype)
    bits = np.empty(D, np.uint32)
    for i in range(lo, hi):
        v = decode(x[i], xbuf)
        u = v
        if has_gate:
            z = decode(gate[i], zbuf)
            sigmoid_rows(z, sbuf, bits)
            _gate_rows(v, z, sbuf, gated_after, ubuf, abuf)
            u = ubuf
        out = staging(y[i], ybuf)
        for k in range(D // group):
            lo_k, hi_k = k * group, (k + 1) * group
            uk = u[lo_k:hi_k]
            var = _row_sumsq(uk, zero, zero) / n
            r_std = zero if var + eps_ == zero else one / np.sqrt(var + eps_)
            if not np.isfinite(var) or var + eps_ == zero:
                r_std = _scaled_stats(uk, zero, True, eps_)[1]
            rstd[i, k] = r_std
            _scaled_rows(uk, r_std, w[lo_k:hi_k], out[lo_k:hi_k])
        if has_gate and gated_after:
            _times(out, abuf)
        encode(out, y[i])


@jit
def gated_bwd(dy, x, gate, w, rstd, group, gated_after, block, dx, dgate, dwp, lo, hi):
    """``dx`` (and ``dgate`` where ``gate`` has rows) of :func:`gated_fwd` for the rows of
    blocks ``lo..hi-1`` (``block`` rows each), from ``x``, ``gate`` and the saved ``rstd``;
    each block's partial sum of ``p * u_hat`` into ``dwp[blk]``, in row order. With ``p = dy``
    (``dy * silu(gate)`` when gated after), per group: ``du = rstd * (p * w - u_hat * mean(p *
    w * u_hat))``; ``dx = du * silu(gate)`` (gate before) or ``du``; ``dgate = silu'(gate) *
    (du * x)`` (before) or ``silu'(gate) * dy * w * u_hat`` (after)."""
    M, D = x.shape
    has_gate = gate.shape[0] > 0
    zero, one, n = w.dtype.type(0.0), w.dtype.type(1.0), w.dtype.type(group)
    xbuf = np.empty(D, w.dtype)
    zbuf = np.empty(D, w.dtype)
    ubuf = np.empty(D, w.dtype)
    ybuf = np.empty(D, w.dtype)
    pbuf = np.empty(D, w.dtype)
    dbuf = np.empty(D, w.dtype)
    gbuf = np.empty(D, w.dtype)
    sbuf = np.empty(D, w.dtype)
    bits = np.empty(D, np.uint32)
    for blk in range(lo, hi):
        dw = dwp[blk]
        dw[:] = zero
        for i in range(blk * block, min(M, (blk + 1) * block)):
            v = decode(x[i], xbuf)
            g = decode(dy[i], ybuf)
            z = decode(gate[i], zbuf) if has_gate else xbuf
            p = pbuf if has_gate and gated_after else g
            if has_gate:
                sigmoid_rows(z, sbuf, bits)
                for j in range(D):
                    a = z[j] * sbuf[j]
                    ubuf[j] = v[j] if gated_after else v[j] * a
                    pbuf[j] = g[j] * a if gated_after else a  # gate before: pbuf keeps silu(gate)
            else:
                ubuf[:] = v
            du = staging(dx[i], dbuf)
            for k in range(D // group):
                lo_k, hi_k = k * group, (k + 1) * group
                u, pk, wk, r_std = ubuf[lo_k:hi_k], p[lo_k:hi_k], w[lo_k:hi_k], rstd[i, k]
                c_gx = _row_dots(u, pk, wk, zero, zero, r_std)[1] / n
                _accumulate(u, pk, zero, zero, r_std, dw[lo_k:hi_k])
                _input_grad(u, pk, wk, zero, zero, r_std, zero, c_gx, du[lo_k:hi_k])
            if has_gate:
                dz = staging(dgate[i], gbuf)
                for j in range(D):
                    sig = sbuf[j]
                    silu_grad = sig * (one + z[j] * (one - sig))
                    if gated_after:
                        dz[j] = silu_grad * (g[j] * w[j] * (ubuf[j] * rstd[i, j // group]))
                    else:
                        dz[j] = silu_grad * (du[j] * v[j])
                        du[j] = du[j] * pbuf[j]
                encode(dz, dgate[i])
            encode(du, dx[i])


# ---- sandwich (post-norm, residual add, next pre-norm) -------------------------------------


@jit
def sandwich_fwd(h, res, w1, w2, eps, y, rout, rstd1, rstd2, lo, hi):
    """Rows ``lo..hi-1``: ``h1 = rms(h) * w1`` rounded to h's dtype, ``rout = res + h1``
    (stored, rounded), ``y = rms(rout) * w2``; ``rstd1``, ``rstd2`` per row."""
    D = h.shape[1]
    eps_ = w1.dtype.type(eps)
    hbuf = np.empty(D, w1.dtype)
    rbuf = np.empty(D, w1.dtype)
    ybuf = np.empty(D, w1.dtype)
    for i in range(lo, hi):
        v = decode(h[i], hbuf)
        r_std = _stats(v, True, eps_)[2]
        rstd1[i] = r_std
        s = staging(rout[i], rbuf)
        _scaled_rows(v, r_std, w1, s)
        encode(s, rout[i])
        h1 = decode(rout[i], rbuf)  # h1 rounded to h's dtype, as the composition's
        r = decode(res[i], ybuf)
        s = staging(rout[i], rbuf)
        for j in range(D):
            s[j] = r[j] + h1[j]
        encode(s, rout[i])
        v = decode(rout[i], rbuf)  # the rounded sum is what is normalized
        r_std = _stats(v, True, eps_)[2]
        rstd2[i] = r_std
        out = staging(y[i], ybuf)
        _scaled_rows(v, r_std, w2, out)
        encode(out, y[i])


@jit
def sandwich_bwd(dy, drout, h, rout, w1, w2, rstd1, rstd2, block, dh, dres, dw1p, dw2p, lo, hi):
    """For the rows of blocks ``lo..hi-1``: ``dr = drout + rms'(rout)[dy * w2]`` (stored in
    ``dres``, rounded; unrounded on into the first norm), ``dh = rms'(h)[dr * w1]``; the
    blocks' partial sums of ``dr * x_hat1`` and ``dy * x_hat2`` in ``dw1p[blk]``/``dw2p[blk]``.
    ``drout`` with no rows: no gradient reached ``residual_out``."""
    M, D = h.shape
    has_drout = drout.shape[0] > 0
    zero, n = w1.dtype.type(0.0), w1.dtype.type(D)
    vbuf = np.empty(D, w1.dtype)
    gbuf = np.empty(D, w1.dtype)
    dbuf = np.empty(D, w1.dtype)
    obuf = np.empty(D, w1.dtype)
    for blk in range(lo, hi):
        dw1 = dw1p[blk]
        dw2 = dw2p[blk]
        dw1[:] = zero
        dw2[:] = zero
        for i in range(blk * block, min(M, (blk + 1) * block)):
            v = decode(rout[i], vbuf)
            g = decode(dy[i], gbuf)
            r_std = rstd2[i]
            c_gx = _row_dots(v, g, w2, zero, zero, r_std)[1] / n
            _accumulate(v, g, zero, zero, r_std, dw2)
            dr = staging(dres[i], dbuf)
            _input_grad(v, g, w2, zero, zero, r_std, zero, c_gx, dr)
            if has_drout:
                d0 = decode(drout[i], gbuf)
                for j in range(D):
                    dr[j] = dr[j] + d0[j]
            encode(dr, dres[i])
            v = decode(h[i], vbuf)
            r_std = rstd1[i]
            c_gx = _row_dots(v, dr, w1, zero, zero, r_std)[1] / n
            _accumulate(v, dr, zero, zero, r_std, dw1)
            out = staging(dh[i], obuf)
            _input_grad(v, dr, w1, zero, zero, r_std, zero, c_gx, out)
            encode(out, dh[i])



# ---- normalization-free: DyT and Derf -----------------------------------------------------


@jit
def _pre_activation(v, alpha, shift, u):
    """``u = alpha * v + shift``."""
    for j in range(v.shape[0]):
        u[j] = alpha * v[j] + shift


@jit
def _squash(u, s, t, bits, is_erf):
    if is_erf:
        erf_rows(u, s, t, bits)
    else:
        tanh_rows(u, s, t, bits)


@jit
def _squash_grad(u, s, is_erf, ds, t, bits):
    """``ds = squash'(u)``: ``1 - s^2`` (tanh), ``2 / sqrt(pi) * exp(-u^2)`` (erf)."""
    one = s.dtype.type(1.0)
    if is_erf:
        for j in range(u.shape[0]):
            t[j] = u[j] * u[j]
        exp_rows(t, -1.0, ds, bits)
        c = s.dtype.type(1.1283791670955126)
        for j in range(u.shape[0]):
            ds[j] = c * ds[j]
    else:
        for j in range(u.shape[0]):
            ds[j] = one - s[j] * s[j]


@jit
def _weight_affine(s, w, b, out):
    """``out = s * w + b``."""
    for j in range(s.shape[0]):
        out[j] = s[j] * w[j] + b[j]


@jit
def _param_grads(g, s, dw, db):
    """``dw += g * s``, ``db += g``."""
    for j in range(g.shape[0]):
        dw[j] += g[j] * s[j]
        db[j] += g[j]


@jit
def _input_grads(g, w, alpha, ds, out):
    """``ds = g * w * ds`` (the gradient at u, in place) and ``out = alpha * ds``."""
    for j in range(g.shape[0]):
        gu = g[j] * w[j] * ds[j]
        ds[j] = gu
        out[j] = alpha * gu


@jit
def squash_fwd(x, alpha, shift, w, b, is_erf, y, lo, hi):
    """Rows ``lo..hi-1``: ``y = w * squash(alpha * x + shift) + b``, squash erf (``is_erf``) or tanh."""
    D = x.shape[1]
    a, sh = w.dtype.type(alpha), w.dtype.type(shift)
    xbuf = np.empty(D, w.dtype)
    ubuf = np.empty(D, w.dtype)
    sbuf = np.empty(D, w.dtype)
    ybuf = np.empty(D, w.dtype)
    tbuf = np.empty(D, w.dtype)
    bits = np.empty(D, np.uint32)
    for i in range(lo, hi):
        v = decode(x[i], xbuf)
        _pre_activation(v, a, sh, ubuf)
        _squash(ubuf, sbuf, tbuf, bits, is_erf)
        out = staging(y[i], ybuf)
        _weight_affine(sbuf, w, b, out)
        encode(out, y[i])


@jit
def squash_bwd(dy, x, alpha, shift, w, is_erf, block, dx, dwp, dbp, dsp, lo, hi):
    """For the rows of blocks ``lo..hi-1`` (``block`` rows each) of :func:`squash_fwd`, with
    ``g = dy * w * squash'(u)``: ``dx = alpha * g``; the blocks' partial sums, in row order, of
    ``dy * squash(u)`` and ``dy`` (``dwp[blk]``, ``dbp[blk]``) and, in float64, of ``g * x`` and
    ``g`` (``dsp[blk, 0]``, ``dsp[blk, 1]``: alpha's and shift's gradients), each row's sum
    taken first in the statistics dtype (the row kernels' chunked sums)."""
    M, D = x.shape
    a, sh = w.dtype.type(alpha), w.dtype.type(shift)
    zero, one = w.dtype.type(0.0), w.dtype.type(1.0)
    ones = np.ones(D, w.dtype)
    xbuf = np.empty(D, w.dtype)
    gbuf = np.empty(D, w.dtype)
    ubuf = np.empty(D, w.dtype)
    sbuf = np.empty(D, w.dtype)
    dbuf = np.empty(D, w.dtype)
    obuf = np.empty(D, w.dtype)
    tbuf = np.empty(D, w.dtype)
    bits = np.empty(D, np.uint32)
    for blk in range(lo, hi):
        dw = dwp[blk]
        db = dbp[blk]
        dw[:] = zero
        db[:] = zero
        sum_gx, sum_g = 0.0, 0.0
        for i in range(blk * block, min(M, (blk + 1) * block)):
            v = decode(x[i], xbuf)
            g = decode(dy[i], gbuf)
            _pre_activation(v, a, sh, ubuf)
            _squash(ubuf, sbuf, tbuf, bits, is_erf)
            _squash_grad(ubuf, sbuf, is_erf, dbuf, tbuf, bits)
            _param_grads(g, sbuf, dw, db)
            out = staging(dx[i], obuf)
            _input_grads(g, w, a, dbuf, out)
            row_g, row_gx = _row_dots(v, dbuf, ones, zero, zero, one)
            sum_g += row_g
            sum_gx += row_gx
            encode(out, dx[i])
        dsp[blk, 0] = sum_gx
        dsp[blk, 1] = sum_g
