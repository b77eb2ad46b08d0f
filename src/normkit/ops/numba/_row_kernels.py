"""numba kernels of the row norms: LayerNorm, RMSNorm and their residual-add forms.

Every tensor is an ``(M, L)`` C-contiguous array: ``M`` rows normalized over their ``L``
elements. One forward and one backward kernel serve every norm; what differs is passed as
data: ``is_rms`` (not centred, no bias), a 0-row ``res``/``rout``/``dres`` array for "no
residual", a 0-length ``w``/``b`` for "no affine". ``w`` and ``b`` are always in the
statistics dtype (float32, float64 for float64 input), which also types the kernels' scratch
rows, so one specialisation is compiled per input dtype (float32, float64, bf16 bits).

Numerics (the same for every row, whatever the batch or the thread count):

* a centred row is shifted by its first element (``d = x - x[0]``: a large common offset
  cancels exactly, a constant row has variance exactly 0), then two passes: ``mean`` of ``d``,
  then the biased variance ``sum((d - mean)^2) / L``, never ``E[x^2] - E[x]^2``;
* every row sum goes through :func:`_lane_sums`: element ``j`` into lane ``j % LANES``, the
  lanes folded in a fixed tree, so the order of additions depends on ``L`` only;
* ``rstd = 1 / sqrt(var + eps)``, and 0 where ``var + eps == 0`` (``eps=0`` on a constant
  row: output the bias, input gradient 0);
* the backward recomputes ``x_hat`` from x and the saved (shifted) mean and rstd; the weight
  and bias gradients are summed per block of ``block`` rows (a size fixed by the shape) into a
  row of ``dwp``/``dbp`` each, in row order, and :func:`sum_blocks` adds the blocks in block
  order.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from normkit.ops.numba._engine import LANES, decode, encode, jit, pjit, staging

__all__ = ["row_bwd", "row_fwd", "sum_blocks"]


@jit(inline="always")
def _fold(lanes):
    half = LANES // 2
    while half > 0:
        for k in range(half):
            lanes[k] = lanes[k] + lanes[k + half]
        half //= 2
    return lanes[0]


@jit(inline="always")
def _lane_sums(v, shift, centre, lanes, sq):
    """``sum(v - shift - centre)`` (``sq`` False) or ``sum((v - shift - centre)^2)``, in
    :data:`LANES` interleaved partial sums folded in a fixed tree."""
    L = v.shape[0]
    for k in range(LANES):
        lanes[k] = 0.0
    full = L - L % LANES
    for j0 in range(0, full, LANES):
        for k in range(LANES):
            d = v[j0 + k] - shift - centre
            lanes[k] += d * d if sq else d
    for j in range(full, L):
        d = v[j] - shift - centre
        lanes[j - full] += d * d if sq else d
    return _fold(lanes)


@pjit
def row_fwd(x, res, rout, w, b, eps, is_rms, y, mean, rstd, block):
    """``y = x_hat * w + b`` of each row of ``x`` (or of ``rout = x + res``, stored, when
    ``rout`` has rows); ``mean`` (of the shifted row; 0 for RMS) and ``rstd`` per row."""
    M, L = x.shape
    has_res, store_r = res.shape[0] > 0, rout.shape[0] > 0
    has_w, has_b = w.shape[0] > 0, b.shape[0] > 0
    zero = w.dtype.type(0.0)
    for blk in prange((M + block - 1) // block):
        xbuf = np.empty(L, w.dtype)
        rbuf = np.empty(L, w.dtype)
        ybuf = np.empty(L, w.dtype)
        lanes = np.empty(LANES, w.dtype)
        for i in range(blk * block, min(M, (blk + 1) * block)):
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
            mu = zero if is_rms else _lane_sums(v, shift, zero, lanes, False) / L
            var = _lane_sums(v, shift, mu, lanes, True) / L
            r_std = zero if var + eps == 0 else 1 / np.sqrt(var + w.dtype.type(eps))
            mean[i] = mu
            rstd[i] = r_std
            out = staging(y[i], ybuf)
            for j in range(L):
                h = (v[j] - shift - mu) * r_std
                if has_w:
                    h = h * w[j]
                if has_b:
                    h = h + b[j]
                out[j] = h
            encode(out, y[i])


@pjit
def row_bwd(dy, x, w, mean, rstd, is_rms, dres, dx, dwp, dbp, block):
    """``dx`` of :func:`row_fwd` (plus ``dres``, the gradient reaching the stored residual,
    when it has rows) from ``x`` (what was normalized) and the saved ``mean``/``rstd``;
    per-block partial sums of ``dy * x_hat`` and ``dy`` into rows of ``dwp`` and ``dbp``
    (0-row arrays: not wanted)."""
    M, L = x.shape
    has_w, has_dres = w.shape[0] > 0, dres.shape[0] > 0
    want_dw, want_db = dwp.shape[0] > 0, dbp.shape[0] > 0
    zero = w.dtype.type(0.0)
    for blk in prange((M + block - 1) // block):
        xbuf = np.empty(L, w.dtype)
        gbuf = np.empty(L, w.dtype)
        obuf = np.empty(L, w.dtype)
        lanes_g = np.empty(LANES, w.dtype)
        lanes_gx = np.empty(LANES, w.dtype)
        if want_dw:
            dwp[blk, :] = 0
        if want_db:
            dbp[blk, :] = 0
        for i in range(blk * block, min(M, (blk + 1) * block)):
            v = decode(x[i], xbuf)
            g = decode(dy[i], gbuf)
            shift = zero if is_rms else v[0]
            mu, r_std = mean[i], rstd[i]
            for k in range(LANES):
                lanes_g[k] = 0.0
                lanes_gx[k] = 0.0
            for j in range(L):
                h = (v[j] - shift - mu) * r_std
                gj = g[j] * w[j] if has_w else g[j]
                lanes_g[j % LANES] += gj
                lanes_gx[j % LANES] += gj * h
                if want_dw:
                    dwp[blk, j] += g[j] * h
                if want_db:
                    dbp[blk, j] += g[j]
            c_g = zero if is_rms else _fold(lanes_g) / L
            c_gx = _fold(lanes_gx) / L
            out = staging(dx[i], obuf)
            for j in range(L):
                h = (v[j] - shift - mu) * r_std
                gj = g[j] * w[j] if has_w else g[j]
                out[j] = r_std * ((gj - c_g) - h * c_gx)
            if has_dres:
                r = decode(dres[i], gbuf)
                for j in range(L):
                    out[j] = out[j] + r[j]
            encode(out, dx[i])


@pjit
def sum_blocks(part, out):
    """``out[j] = sum over blocks of part[blk, j]``, added in block order."""
    nb, L = part.shape
    chunk = 1024
    for c in prange((L + chunk - 1) // chunk):
        for j in range(c * chunk, min(L, (c + 1) * chunk)):
            acc = part[0, j]
            for blk in range(1, nb):
                acc += part[blk, j]
            out[j] = acc
