"""numba kernels of the row norms: LayerNorm, RMSNorm and their residual-add forms.

Every tensor is an ``(M, L)`` C-contiguous array: ``M`` rows normalized over their ``L``
elements. One forward and one backward kernel serve every norm; what differs is passed as
data: ``is_rms`` (not centred, no bias), a 0-row ``res``/``rout``/``dres`` array for "no
residual", ones/zeros for a missing weight/bias. ``w`` and ``b`` are always in the
statistics dtype (float32, float64 for float64 input), which also types the kernels' scratch
rows, so one specialisation is compiled per input dtype (float32, float64, bf16 bits).

Numerics (the same for every row, whatever the batch or the thread count):

* a centred row is shifted by its first element (``d = x - x[0]``: a large common offset
  cancels exactly, a constant row has variance exactly 0), then two passes: ``mean`` of ``d``,
  then the biased variance ``sum((d - mean)^2) / L``, never ``E[x^2] - E[x]^2``;
* the row sums (:func:`_row_sum` and its twins; chunks of :data:`CHUNK` elements, their sums
  added in float64 in chunk order) may be reassociated by the compiler, which
  vectorizes them: the order of additions is fixed in the compiled code and depends on ``L``
  only (not on the row's address, the batch or the threads); elementwise arithmetic rounds
  as written;
* a row whose variance is not finite in its dtype (``|x| ~ 1e20`` in float32: the squares
  overflow, as torch's do) has its moments taken again of the row scaled by a power of two
  (:func:`_scaled_stats`): a finite, correct result where torch gives inf/NaN;
* ``rstd = 1 / sqrt(var + eps)``, and 0 where ``var + eps == 0`` on a constant row (``eps=0``:
  output the bias, input gradient 0); with ``eps=0`` a row whose variance underflows (float32
  below ``|x| ~ 1e-19``) is scaled as an overflowing one is, and normalizes as float64 does;
* the backward recomputes ``x_hat`` from x and the saved (shifted) mean and rstd; the weight
  and bias gradients are summed per block of ``block`` rows (a size fixed by the shape) into a
  row of ``dwp``/``dbp`` each, in row order, and :func:`sum_blocks` adds the blocks in block
  order.
"""

from __future__ import annotations

import math

import numpy as np

from normkit.ops.numba._engine import decode, encode, jit, staging, sum_jit

__all__ = ["row_bwd", "row_fwd", "sum_blocks"]


# Row sums in chunks of CHUNK elements: each chunk a vectorized sum in the statistics dtype,
# the chunks' sums added in float64 in chunk order. A row of at most CHUNK elements is one
# chunk; a longer one keeps float32's error of a 4096-element sum instead of one growing with
# the row (2^24 elements in one float32 sum: 1.5e-4 relative error, 300x ATen's). The order
# still depends on the row length alone.
CHUNK = 4096


@sum_jit
def _chunk_sum(v, lo, hi, shift):
    """``sum(v[lo:hi] - shift)``."""
    acc = shift - shift
    for j in range(lo, hi):
        acc += v[j] - shift
    return acc


@sum_jit
def _chunk_sumsq(v, lo, hi, shift, centre):
    """``sum((v[lo:hi] - shift - centre)^2)``."""
    acc = shift - shift
    for j in range(lo, hi):
        d = v[j] - shift - centre
        acc += d * d
    return acc


@sum_jit
def _chunk_dots(v, g, w, lo, hi, shift, mu, r_std):
    """``(sum(g * w), sum(g * w * x_hat))`` over ``lo..hi-1``."""
    acc_g = shift - shift
    acc_gx = shift - shift
    for j in range(lo, hi):
        gw = g[j] * w[j]
        acc_g += gw
        acc_gx += gw * ((v[j] - shift - mu) * r_std)
    return acc_g, acc_gx


@jit
def _row_sum(v, shift):
    """``sum(v - shift)``, in chunks."""
    n = v.shape[0]
    if n <= CHUNK:
        return _chunk_sum(v, 0, n, shift)
    total = 0.0
    for lo in range(0, n, CHUNK):
        total += _chunk_sum(v, lo, min(n, lo + CHUNK), shift)
    return v.dtype.type(total)


@jit
def _row_sumsq(v, shift, centre):
    """``sum((v - shift - centre)^2)``, in chunks."""
    n = v.shape[0]
    if n <= CHUNK:
        return _chunk_sumsq(v, 0, n, shift, centre)
    total = 0.0
    for lo in range(0, n, CHUNK):
        total += _chunk_sumsq(v, lo, min(n, lo + CHUNK), shift, centre)
    return v.dtype.type(total)


@jit
def _row_dots(v, g, w, shift, mu, r_std):
    """``(sum(g * w), sum(g * w * x_hat))``, in chunks."""
    n = v.shape[0]
    if n <= CHUNK:
        return _chunk_dots(v, g, w, 0, n, shift, mu, r_std)
    total_g, total_gx = 0.0, 0.0
    for lo in range(0, n, CHUNK):
        a, b = _chunk_dots(v, g, w, lo, min(n, lo + CHUNK), shift, mu, r_std)
        total_g += a
        total_gx += b
    return v.dtype.type(total_g), v.dtype.type(total_gx)


# The elementwise loops, each in a function of its own: with few arrays in a loop LLVM's
# run-time alias checks stay under its limit and the loop is vectorized (LayerNorm's backward
# loop over dw, db, dx, dy, x and w together was not: 2.4x slower than RMSNorm's). Strict
# arithmetic: each element rounds as written, whatever the vector width.


@jit
def _affine(v, shift, mu, r_std, w, b, out):
    """``out = (v - shift - mu) * r_std * w + b``."""
    for j in range(v.shape[0]):
        out[j] = (v[j] - shift - mu) * r_std * w[j] + b[j]


@jit
def _accumulate(v, g, shift, mu, r_std, dw):
    """``dw += g * x_hat``."""
    for j in range(v.shape[0]):
        dw[j] += g[j] * ((v[j] - shift - mu) * r_std)


@jit
def _add(g, db):
    """``db += g``."""
    for j in range(g.shape[0]):
        db[j] += g[j]


@jit
def _input_grad(v, g, w, shift, mu, r_std, c_g, c_gx, out):
    """``out = r_std * ((g * w - c_g) - x_hat * c_gx)``."""
    for j in range(v.shape[0]):
        out[j] = r_std * ((g[j] * w[j] - c_g) - ((v[j] - shift - mu) * r_std) * c_gx)


@jit
def _scaled_stats(v, shift, is_rms, eps):
    """``(mean, rstd)`` of a row whose squares overflow (``|x| ~ 1e20`` in float32) or, with
    ``eps=0``, underflow to a zero variance (``|x| ~ 1e-30``): moments of ``(v - shift) * s``,
    ``s`` the power of two below ``1 / max|v - shift|`` (exact scaling), scaled back. A constant
    row (every ``v - shift`` 0) has rstd 0, as on the fast path. Only rows whose variance is not
    finite, or whose ``var + eps`` is 0, come here, decided by the row alone."""
    zero = eps - eps
    big = zero
    for j in range(v.shape[0]):
        d = abs(v[j] - shift)
        if d != d:  # NaN
            return zero + np.nan, zero + np.nan
        big = max(big, d)
    if is_rms and np.isinf(big):  # as torch: mean square inf, rstd 0 (finite x -> 0, inf -> NaN)
        return zero, zero
    if big == 0:  # a constant row (eps=0): rstd 0, the output is the bias
        return zero, zero
    if not np.isfinite(big):
        return zero + np.nan, zero + np.nan
    s = eps - eps + math.ldexp(1.0, -math.frexp(big)[1])
    n = v.shape[0]
    mu_s = zero
    if not is_rms:
        for j in range(n):
            mu_s += (v[j] - shift) * s
        mu_s /= n
    var_s = zero
    for j in range(n):
        d = (v[j] - shift) * s - mu_s
        var_s += d * d
    var_s /= n
    return mu_s / s, s / np.sqrt(var_s + eps * s * s)


@jit
def row_fwd(x, res, rout, w, b, eps, is_rms, y, mean, rstd, lo, hi):
    """``y = x_hat * w + b`` of rows ``lo..hi-1`` of ``x`` (or of ``rout = x + res``, stored,
    when ``rout`` has rows; ``res`` with no rows: a zero residual); ``mean`` (of the shifted
    row; 0 for RMS) and ``rstd`` per row. ``w``/``b`` are ones/zeros where the norm has none
    (``h * 1 + 0`` is ``h`` exactly). Serial: :func:`~normkit.ops.numba._engine.split_run`
    spreads row ranges over threads (each row's result is the same in any range)."""
    L = x.shape[1]
    has_res, store_r = res.shape[0] > 0, rout.shape[0] > 0
    # Every scalar in the statistics dtype (an int or a Python float would widen float32 to float64).
    zero, one, n, eps_ = w.dtype.type(0.0), w.dtype.type(1.0), w.dtype.type(L), w.dtype.type(eps)
    xbuf = np.empty(L, w.dtype)
    rbuf = np.empty(L, w.dtype)
    ybuf = np.empty(L, w.dtype)
    for i in range(lo, hi):
        v = decode(x[i], xbuf)
        if store_r:
            s = staging(rout[i], rbuf)
            if has_res:
                r = decode(res[i], ybuf)
                for j in range(L):
                    s[j] = v[j] + r[j]
            else:
                for j in range(L):
                    s[j] = v[j]
            encode(s, rout[i])
            v = decode(rout[i], rbuf)  # the rounded sum is what is normalized
        shift = zero if is_rms else v[0]
        mu = zero if is_rms else _row_sum(v, shift) / n
        var = _row_sumsq(v, shift, mu) / n
        r_std = zero if var + eps_ == zero else one / np.sqrt(var + eps_)
        if not np.isfinite(var) or var + eps_ == zero:
            mu, r_std = _scaled_stats(v, shift, is_rms, eps_)
        mean[i] = mu
        rstd[i] = r_std
        out = staging(y[i], ybuf)
        _affine(v, shift, mu, r_std, w, b, out)
        encode(out, y[i])


@jit
def row_bwd(dy, x, w, mean, rstd, is_rms, dres, dx, dwp, dbp, block, lo, hi):
    """``dx`` of :func:`row_fwd` (plus ``dres``, the gradient reaching the stored residual,
    when it has rows) for the rows of blocks ``lo..hi-1`` (``block`` rows each, a size fixed by
    the shape), from ``x`` (what was normalized) and the saved ``mean``/``rstd`` (``w``: ones
    where the norm has none); each block's partial sums of ``dy * x_hat`` and ``dy`` into rows
    ``dwp[blk]`` and ``dbp[blk]``, in row order (RMS: ``dbp`` untouched)."""
    M, L = x.shape
    has_dres = dres.shape[0] > 0
    zero, n = w.dtype.type(0.0), w.dtype.type(L)
    xbuf = np.empty(L, w.dtype)
    gbuf = np.empty(L, w.dtype)
    obuf = np.empty(L, w.dtype)
    for blk in range(lo, hi):
        dw = dwp[blk]
        db = dbp[blk]
        for j in range(L):
            dw[j] = zero
            db[j] = zero
        for i in range(blk * block, min(M, (blk + 1) * block)):
            v = decode(x[i], xbuf)
            g = decode(dy[i], gbuf)
            shift = zero if is_rms else v[0]
            mu, r_std = mean[i], rstd[i]
            sum_g, sum_gx = _row_dots(v, g, w, shift, mu, r_std)
            c_g = zero if is_rms else sum_g / n
            c_gx = sum_gx / n
            out = staging(dx[i], obuf)
            _accumulate(v, g, shift, mu, r_std, dw)
            if not is_rms:
                _add(g, db)
            _input_grad(v, g, w, shift, mu, r_std, c_g, c_gx, out)
            if has_dres:
                r = decode(dres[i], gbuf)
                for j in range(L):
                    out[j] = out[j] + r[j]
            encode(out, dx[i])


@jit
def sum_blocks(dwp, dbp, dw, db, lo, hi):
    """``dw[j] = sum over blocks of dwp[blk, j]`` (and ``db`` from ``dbp``) for columns
    ``lo..hi-1``, each column's blocks added in block order (the inner loop runs along the
    columns: vectorized, and the order of additions per column is still block 0, 1, 2, ...)."""
    nb = dwp.shape[0]
    for j in range(lo, hi):
        dw[j] = dwp[0, j]
        db[j] = dbp[0, j]
    for blk in range(1, nb):
        for j in range(lo, hi):
            dw[j] += dwp[blk, j]
            db[j] += dbp[blk, j]
