"""numba kernels of the row norms: LayerNorm, RMSNorm and their residual-add forms.

Every tensor is an ``(M, L)`` C-contiguous array: ``M`` rows normalized over their ``L``
elements. One forward and one backward kernel source serve every norm, compiled once per value
of the flag ``is_rms`` (not centred, no bias: :data:`ROW_FWD`, :data:`ROW_BWD`); the rest is
passed as data: a 0-row ``res``/``rout``/``dres`` array for "no residual", ones/zeros for a
missing weight/bias. ``w`` and ``b`` are always in the statistics dtype (float32, float64 for
float64 input), which also types the kernels' scratch rows, so one specialisation is compiled
per input dtype (float32, float64, bf16 bits).

Speed: a row is a view without reference counting (:func:`~normkit.ops.numba._engine.row_of`);
where it pays on the machine (:data:`PREFETCH`) the next row is prefetched while the current
one is computed, what it reads and what it writes, each hint spread between the current row's
passes (:func:`_row_fwd`, :func:`_row_bwd`); the forward reads a row from memory once (its
moments in one pass, :func:`_centred_stats`; the normalizing pass hits the cache) and writes it
once; the backward reads x and dy once (:func:`_row_grads`: the row sums and the row's
weight/bias terms in one pass) and writes dx once.

Numerics (the same for every row, whatever the batch or the thread count):

* a centred row is shifted by its first element (``d = x - x[0]``: a large common offset
  cancels exactly, a constant row has variance exactly 0); one pass gives ``mean`` of ``d``
  and the biased variance ``E[d^2] - mean^2``, kept where ``mean^2 <= var`` (``x[0]`` within
  one standard deviation of the mean: the subtraction cancels at most about a bit), else a
  second pass gives ``sum((d - mean)^2) / L`` (:func:`_centred_stats`); never
  ``E[x^2] - E[x]^2`` of the unshifted row;
* the row sums (:func:`_row_sum` and its twins; chunks of :data:`CHUNK` elements, their sums
  added in float64 in chunk order) may be reassociated by the compiler, which
  vectorizes them: the order of additions is fixed in the compiled code and depends on ``L``
  only (not on the row's address, the batch or the threads); elementwise arithmetic rounds
  as written, in the statistics dtype;
* a row whose variance is not finite in its dtype (``|x| ~ 1e20`` in float32: the squares
  overflow, as torch's do) has its moments taken again of the row scaled by a power of two
  (:func:`_scaled_stats`): a finite, correct result where torch gives inf/NaN;
* ``rstd = 1 / sqrt(var + eps)``, and 0 where ``var + eps == 0`` on a constant row (``eps=0``:
  output the bias, input gradient 0); with ``eps=0`` a row whose variance underflows (float32
  below ``|x| ~ 1e-19``) is scaled as an overflowing one is, and normalizes as float64 does;
* LayerNorm ``y = (d - mean) * rstd * w + b``; RMSNorm ``y = x * rstd * w`` (the sign of a
  zero kept, as torch's);
* the backward recomputes ``x_hat`` from x and the saved (shifted) mean and rstd; the weight
  and bias gradients are summed per block of ``block`` rows (a size fixed by the shape) into a
  row of ``dwp``/``dbp`` each, in row order, and :func:`sum_blocks` adds the blocks in block
  order.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite.binding import get_host_cpu_name

from normkit.ops.numba._engine import (
    STREAM_MIN_BYTES,
    decode,
    encode,
    jit,
    prefetch_row,
    row_of,
    staging,
    store_fence,
    stream_row,
    streams,
    sum_jit,
)

# (STREAM_MIN_BYTES, where the kernels' outputs start to be streamed, is _engine's; named here too.)
__all__ = ["ROW_BWD", "ROW_FWD", "STREAM_MIN_BYTES", "row_bwd_ln", "row_bwd_rms", "row_fwd_ln", "row_fwd_rms",
           "sum_blocks"]


# Row sums in chunks of CHUNK elements: each chunk a vectorized sum in the statistics dtype,
# the chunks' sums added in float64 in chunk order. A row of at most CHUNK elements is one
# chunk; a longer one keeps float32's error of a 4096-element sum instead of one growing with
# the row (2^24 elements in one float32 sum: 1.5e-4 relative error, 300x ATen's). The order
# still depends on the row length alone.
CHUNK = 4096

# Whether the kernels hint the next row to the CPU while they work on the current one (see
# _row_fwd, _row_bwd). A hint never changes a result, only the time: on an Intel Xeon the hints
# made LayerNorm's kernels 1.3-1.4x faster (4096x1024 float32, one thread); on an AMD Zen 4
# (EPYC, "znver4"), whose own prefetchers follow the rows, every schedule of them tried
# (whole next row, first 256 or 1024 bytes, two rows ahead, one array only) was slower than
# none for float32: 1.1-1.4x at 4096x1024, 1.0-1.3x at 4096x4096, forward and backward. The
# bf16 backward there still gains from them (1.04-1.19x: its rows are first widened by a short
# loop that waits on each line), so it keeps them. Fixed per machine: numba compiles for, and
# caches per, the host CPU.
PREFETCH = not get_host_cpu_name().startswith("znver")

@sum_jit
def _chunk_sum(v, shift):
    """``sum(v - shift)`` over all of ``v`` (a row or a slice of one: indices from 0 keep the
    loads contiguous; a loop from a variable start was compiled to gathers)."""
    acc = shift - shift
    for j in range(v.shape[0]):
        acc += v[j] - shift
    return acc


@sum_jit
def _chunk_sumsq(v, shift, centre):
    """``sum((v - shift - centre)^2)``."""
    acc = shift - shift
    for j in range(v.shape[0]):
        d = v[j] - shift - centre
        acc += d * d
    return acc


@sum_jit
def _chunk_moments(v, shift):
    """``(sum(d), sum(d * d))`` of ``d = v - shift``, in one pass."""
    acc = shift - shift
    acc_sq = shift - shift
    for j in range(v.shape[0]):
        d = v[j] - shift
        acc += d
        acc_sq += d * d
    return acc, acc_sq


@sum_jit
def _chunk_dots(v, g, w, shift, mu, r_std):
    """``(sum(g * w), sum(g * w * x_hat))``."""
    acc_g = shift - shift
    acc_gx = shift - shift
    for j in range(v.shape[0]):
        gw = g[j] * w[j]
        acc_g += gw
        acc_gx += gw * ((v[j] - shift - mu) * r_std)
    return acc_g, acc_gx


@jit(inline="always")
def _row_sum(v, shift):
    """``sum(v - shift)``, in chunks."""
    n = v.shape[0]
    if n <= CHUNK:
        return _chunk_sum(v, shift)
    total = 0.0
    for lo in range(0, n, CHUNK):
        total += _chunk_sum(v[lo : lo + CHUNK], shift)
    return v.dtype.type(total)


@jit(inline="always")
def _row_sumsq(v, shift, centre):
    """``sum((v - shift - centre)^2)``, in chunks."""
    n = v.shape[0]
    if n <= CHUNK:
        return _chunk_sumsq(v, shift, centre)
    total = 0.0
    for lo in range(0, n, CHUNK):
        total += _chunk_sumsq(v[lo : lo + CHUNK], shift, centre)
    return v.dtype.type(total)


@jit(inline="always")
def _row_moments(v, shift):
    """``(sum(v - shift), sum((v - shift)^2))``, in chunks."""
    n = v.shape[0]
    if n <= CHUNK:
        return _chunk_moments(v, shift)
    total, total_sq = 0.0, 0.0
    for lo in range(0, n, CHUNK):
        a, q = _chunk_moments(v[lo : lo + CHUNK], shift)
        total += a
        total_sq += q
    return v.dtype.type(total), v.dtype.type(total_sq)


@jit(inline="always")
def _centred_stats(v, shift, n):
    """``(mean, var)`` of ``d = v - shift`` (``n`` its length, in the statistics dtype).

    One pass gives ``mean = sum(d) / n`` and ``var = sum(d^2) / n - mean^2``, kept where
    ``mean^2 <= var`` (the first element within one standard deviation of the mean: the
    subtraction then cancels at most about one bit, so the variance stays within a few
    rounding errors of the two-pass one). Elsewhere (a first element far from the mean, a
    large common offset with a small spread seen from an outlying first element, NaN, inf) the
    row, now in cache, is read a second time: ``var = sum((d - mean)^2) / n``."""
    total, total_sq = _row_moments(v, shift)
    mu = total / n
    var = total_sq / n - mu * mu
    if not mu * mu <= var:
        var = _row_sumsq(v, shift, mu) / n
    return mu, var


@jit(inline="always")
def _row_dots(v, g, w, shift, mu, r_std):
    """``(sum(g * w), sum(g * w * x_hat))``, in chunks."""
    n = v.shape[0]
    if n <= CHUNK:
        return _chunk_dots(v, g, w, shift, mu, r_std)
    total_g, total_gx = 0.0, 0.0
    for lo in range(0, n, CHUNK):
        hi = lo + CHUNK
        a, b = _chunk_dots(v[lo:hi], g[lo:hi], w[lo:hi], shift, mu, r_std)
        total_g += a
        total_gx += b
    return v.dtype.type(total_g), v.dtype.type(total_gx)


# The backward's first pass: the row sums of the input gradient and the row's terms of the
# weight and bias gradients, in one pass over x and dy (two passes each of a third of the work
# were 1.25x slower). The loop is strict, as the elementwise loops below, except for the
# additions into the two sums: ``_sum_add`` is compiled with reassociation allowed, and once
# inlined its addition keeps that permission alone, so LLVM vectorizes the sums (in an order
# fixed by the row length, as :func:`sum_jit`'s) while ``dw``, ``db`` and ``x_hat`` round as
# written.


@sum_jit
def _sum_add(total, term):
    """``total + term``, an addition LLVM may reorder within a sum (see above)."""
    return total + term


@jit
def _chunk_grads(v, g, w, shift, mu, r_std, dw, db):
    """``(sum(g * w), sum(g * w * x_hat))``; ``dw += g * x_hat``, ``db += g``."""
    acc_g = shift - shift
    acc_gx = shift - shift
    for j in range(v.shape[0]):
        x_hat = (v[j] - shift - mu) * r_std
        gw = g[j] * w[j]
        acc_g = _sum_add(acc_g, gw)
        acc_gx = _sum_add(acc_gx, gw * x_hat)
        dw[j] += g[j] * x_hat
        db[j] += g[j]
    return acc_g, acc_gx


@jit
def _chunk_grads_rms(v, g, w, r_std, dw):
    """``sum(g * w * x_hat)`` (``x_hat = v * r_std``); ``dw += g * x_hat``."""
    acc_gx = r_std - r_std
    for j in range(v.shape[0]):
        x_hat = v[j] * r_std
        acc_gx = _sum_add(acc_gx, g[j] * w[j] * x_hat)
        dw[j] += g[j] * x_hat
    return acc_gx


@jit(inline="always")
def _row_grads(v, g, w, shift, mu, r_std, dw, db, is_rms):
    """``(sum(g * w), sum(g * w * x_hat))`` of a row (``sum(g * w)`` is 0 for RMS, which does
    not use it) and its terms added to ``dw`` (and ``db`` unless RMS), in chunks."""
    n = v.shape[0]
    if n <= CHUNK:
        if is_rms:
            return shift - shift, _chunk_grads_rms(v, g, w, r_std, dw)
        return _chunk_grads(v, g, w, shift, mu, r_std, dw, db)
    total_g, total_gx = 0.0, 0.0
    for lo in range(0, n, CHUNK):
        hi = lo + CHUNK
        if is_rms:
            total_gx += _chunk_grads_rms(v[lo:hi], g[lo:hi], w[lo:hi], r_std, dw[lo:hi])
        else:
            a, b = _chunk_grads(v[lo:hi], g[lo:hi], w[lo:hi], shift, mu, r_std, dw[lo:hi], db[lo:hi])
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
def _accumulate_both(v, g, shift, mu, r_std, dw, db):
    """``dw += g * x_hat`` and ``db += g`` (one pass: four arrays stay within LLVM's alias checks)."""
    for j in range(v.shape[0]):
        dw[j] += g[j] * ((v[j] - shift - mu) * r_std)
        db[j] += g[j]


@jit
def _input_grad(v, g, w, shift, mu, r_std, c_g, c_gx, out):
    """``out = r_std * ((g * w - c_g) - x_hat * c_gx)``."""
    for j in range(v.shape[0]):
        out[j] = r_std * ((g[j] * w[j] - c_g) - ((v[j] - shift - mu) * r_std) * c_gx)


# RMSNorm's forms of _affine and _input_grad: the same results without the operations on
# zeros (x - 0 - 0 is x, g * w - 0 is g * w), except that y = x_hat * w keeps the sign of a
# zero that adding a zero bias turned positive (as torch's rms_norm does).


@jit
def _scale(v, r_std, w, out):
    """``out = v * r_std * w``."""
    for j in range(v.shape[0]):
        out[j] = v[j] * r_std * w[j]


@jit
def _input_grad_rms(v, g, w, r_std, c_gx, out):
    """``out = r_std * (g * w - x_hat * c_gx)``."""
    for j in range(v.shape[0]):
        out[j] = r_std * (g[j] * w[j] - (v[j] * r_std) * c_gx)


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


@jit(inline="always")
def _normalize_row(v, shift, mu, r_std, w, b, is_rms, y_row, ybuf, bits, stream):
    """Row ``y_row`` of :func:`_row_fwd` from its statistics: through ``ybuf`` for bf16 or
    when streamed (``stream``: :func:`~normkit.ops.numba._engine.stream_row`, via ``bits``)."""
    out = ybuf if stream else staging(y_row, ybuf)
    if is_rms:
        _scale(v, r_std, w, out)
    else:
        _affine(v, shift, mu, r_std, w, b, out)
    if stream:
        stream_row(out, bits, y_row)
    else:
        encode(out, y_row)


@jit(inline="always")
def _row_fwd(x, res, rout, w, b, eps, is_rms, y, mean, rstd, lo, hi):
    """``y = x_hat * w + b`` of rows ``lo..hi-1`` of ``x`` (or of ``rout = x + res``, stored,
    when ``rout`` has rows; ``res`` with no rows: a zero residual); ``mean`` (of the shifted
    row; 0 for RMS) and ``rstd`` per row. ``w``/``b`` are ones/zeros where the norm has none
    (``h * 1 + 0`` is ``h`` exactly); RMS (``is_rms``) has no bias and ignores ``b``. Serial:
    :func:`~normkit.ops.numba._engine.split_run` spreads row ranges over threads (each row's
    result is the same in any range).

    With :data:`PREFETCH`, the next row's ``x`` is prefetched before the current row's sums,
    and its ``y`` and ``rout`` (the lines the stores will need) before the current row is
    written: the output's lines arrive while the row is computed instead of stalling the stores
    (Intel Xeon, 4096x1024 float32, one thread: 1.3-1.4x faster than prefetching only ``x``;
    add_layer_norm 1.05-1.08x faster with ``rout``; every hint at once at the row's start was
    1.1x slower than spreading them).

    Rows whose variance is not finite or whose ``var + eps`` is 0 are finished after the
    others by :func:`_scaled_stats` (their ``rstd`` holds -1 in between): with that rare path
    inside the loop LLVM compiled the common one 1.8x slower."""
    L = x.shape[1]
    has_res, store_r = res.shape[0] > 0, rout.shape[0] > 0
    # Every scalar in the statistics dtype (an int or a Python float would widen float32 to float64).
    zero, one, n, eps_ = w.dtype.type(0.0), w.dtype.type(1.0), w.dtype.type(L), w.dtype.type(eps)
    xbuf = np.empty(L, w.dtype)
    rbuf = np.empty(L, w.dtype)
    ybuf = np.empty(L, w.dtype)
    bits = np.empty(L, y.dtype)
    stream = streams(y)
    unusual = 0
    for i in range(lo, hi):
        ahead = PREFETCH and i + 1 < hi
        if ahead:
            prefetch_row(row_of(x, i + 1))
            if has_res:
                prefetch_row(row_of(res, i + 1))
        v = decode(row_of(x, i), xbuf)
        if store_r:
            s = staging(row_of(rout, i), rbuf)
            if has_res:
                r = decode(row_of(res, i), ybuf)
                for j in range(L):
                    s[j] = v[j] + r[j]
            else:
                for j in range(L):
                    s[j] = v[j]
            encode(s, row_of(rout, i))
            v = decode(row_of(rout, i), rbuf)  # the rounded sum is what is normalized
        if is_rms:
            shift, mu = zero, zero
            var = _row_sumsq(v, zero, zero) / n
        else:
            shift = v[0]
            mu, var = _centred_stats(v, shift, n)
        if not np.isfinite(var) or var + eps_ == zero:
            rstd[i] = -one
            unusual += 1
            continue
        r_std = one / np.sqrt(var + eps_)
        mean[i] = mu
        rstd[i] = r_std
        if ahead:
            if not stream:
                prefetch_row(row_of(y, i + 1))
            if store_r:
                prefetch_row(row_of(rout, i + 1))
        _normalize_row(v, shift, mu, r_std, w, b, is_rms, row_of(y, i), ybuf, bits, stream)
    if stream:
        store_fence()
    if unusual == 0:
        return
    for i in range(lo, hi):
        if rstd[i] == -one:
            v = decode(row_of(rout, i), rbuf) if store_r else decode(row_of(x, i), xbuf)
            shift = zero if is_rms else v[0]
            mu, r_std = _scaled_stats(v, shift, is_rms, eps_)
            mean[i] = mu
            rstd[i] = r_std
            _normalize_row(v, shift, mu, r_std, w, b, is_rms, row_of(y, i), ybuf, bits, False)


@jit(inline="always")
def _row_bwd(dy, x, w, mean, rstd, is_rms, dres, dx, dwp, dbp, block, lo, hi):
    """``dx`` of :func:`_row_fwd` (plus ``dres``, the gradient reaching the stored residual,
    when it has rows) for the rows of blocks ``lo..hi-1`` (``block`` rows each, a size fixed by
    the shape), from ``x`` (what was normalized) and the saved ``mean``/``rstd`` (``w``: ones
    where the norm has none); each block's partial sums of ``dy * x_hat`` and ``dy`` into rows
    ``dwp[blk]`` and ``dbp[blk]``, in row order (RMS: ``dbp`` untouched).

    Prefetch hints for the next row (with :data:`PREFETCH`, and for bf16 rows), one array per
    pass of the current row: ``x`` before its sums, ``dy`` before its ``dx`` pass, ``dx`` (the
    lines the stores will need) after it
    (1.1x faster than ``x`` and ``dy`` together at the row's start: likely because a few
    hundred hints at once fill the core's queue of outstanding misses, and the current row's
    loads wait behind them)."""
    M, L = x.shape
    has_dres = dres.shape[0] > 0
    zero, n = w.dtype.type(0.0), w.dtype.type(L)
    xbuf = np.empty(L, w.dtype)
    gbuf = np.empty(L, w.dtype)
    obuf = np.empty(L, w.dtype)
    bits = np.empty(L, dx.dtype)
    stream = streams(dx)
    for blk in range(lo, hi):
        dw = row_of(dwp, blk)
        db = row_of(dbp, blk)
        for j in range(L):
            dw[j] = zero
        if not is_rms:
            for j in range(L):
                db[j] = zero
        last = min(M, (blk + 1) * block)
        for i in range(blk * block, last):
            ahead = (PREFETCH or x.itemsize < w.itemsize) and i + 1 < M
            if ahead:
                prefetch_row(row_of(x, i + 1))
                if has_dres:
                    prefetch_row(row_of(dres, i + 1))
            v = decode(row_of(x, i), xbuf)
            g = decode(row_of(dy, i), gbuf)
            shift = zero if is_rms else v[0]
            mu, r_std = mean[i], rstd[i]
            sum_g, sum_gx = _row_grads(v, g, w, shift, mu, r_std, dw, db, is_rms)
            c_gx = sum_gx / n
            if ahead:
                prefetch_row(row_of(dy, i + 1))
            out = obuf if stream else staging(row_of(dx, i), obuf)
            if is_rms:
                _input_grad_rms(v, g, w, r_std, c_gx, out)
            else:
                _input_grad(v, g, w, shift, mu, r_std, sum_g / n, c_gx, out)
            if has_dres:
                r = decode(row_of(dres, i), gbuf)
                for j in range(L):
                    out[j] = out[j] + r[j]
            if stream:
                stream_row(out, bits, row_of(dx, i))
            else:
                encode(out, row_of(dx, i))
                if ahead:
                    prefetch_row(row_of(dx, i + 1))
    if stream:
        store_fence()


# The kernels called from Python: ``is_rms`` a compile-time constant (a kernel per flag, from
# one source), so each compiled loop holds only its norm's elementwise pass (with both passes
# and a run-time branch between them, the RMS forward ran 1.3x slower on rows in cache).


@jit
def row_fwd_ln(x, res, rout, w, b, eps, y, mean, rstd, lo, hi):
    """:func:`_row_fwd` of LayerNorm."""
    _row_fwd(x, res, rout, w, b, eps, False, y, mean, rstd, lo, hi)


@jit
def row_fwd_rms(x, res, rout, w, b, eps, y, mean, rstd, lo, hi):
    """:func:`_row_fwd` of RMSNorm."""
    _row_fwd(x, res, rout, w, b, eps, True, y, mean, rstd, lo, hi)


@jit
def row_bwd_ln(dy, x, w, mean, rstd, dres, dx, dwp, dbp, block, lo, hi):
    """:func:`_row_bwd` of LayerNorm."""
    _row_bwd(dy, x, w, mean, rstd, False, dres, dx, dwp, dbp, block, lo, hi)


@jit
def row_bwd_rms(dy, x, w, mean, rstd, dres, dx, dwp, dbp, block, lo, hi):
    """:func:`_row_bwd` of RMSNorm."""
    _row_bwd(dy, x, w, mean, rstd, True, dres, dx, dwp, dbp, block, lo, hi)


# Forward and backward kernel by ``is_rms``.
ROW_FWD = {False: row_fwd_ln, True: row_fwd_rms}
ROW_BWD = {False: row_bwd_ln, True: row_bwd_rms}


@jit
def _sum_block_rows(parts, out, lo, hi):
    """``out[j] = sum over blocks of parts[blk, j]`` for columns ``lo..hi-1``, in block order."""
    for j in range(lo, hi):
        out[j] = parts[0, j]
    for blk in range(1, parts.shape[0]):
        row = row_of(parts, blk)
        for j in range(lo, hi):
            out[j] += row[j]


@jit
def sum_blocks(dwp, dbp, dw, db, lo, hi):
    """``dw[j] = sum over blocks of dwp[blk, j]`` (and ``db`` from ``dbp``, unless ``dbp`` has no
    columns) for columns ``lo..hi-1``, each column's blocks added in block order (the inner loop
    runs along the columns: vectorized, and the order of additions per column is still block 0,
    1, 2, ...)."""
    _sum_block_rows(dwp, dw, lo, hi)
    if dbp.shape[1] > 0:
        _sum_block_rows(dbp, db, lo, hi)
