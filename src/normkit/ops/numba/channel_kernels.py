"""numba kernels of the channel norms: BatchNorm, GroupNorm and InstanceNorm, with an activation.

An ``(N, C, *spatial)`` input is read through its ``(N, C, S)`` view (``S`` the product of the
spatial sizes) as a flat array of its dense storage, in one of two layouts, each at unit stride
and without a copy:

* **segments** (NC* contiguous, ``(N, C, L)``): each (sample, channel) is ``S`` contiguous
  elements, and a *row* is a run of them in memory order: a (sample, group)'s ``C/G``
  segments (GroupNorm; InstanceNorm is ``G = C``), whose statistics and output
  :func:`seg_fwd` computes in one task (the row still in cache for its second pass), or one
  (sample, channel) segment for BatchNorm, whose statistics span the batch: a first pass of
  partial sums per segment, merged per channel, then a second pass (a channel's segments are
  ``C * S`` apart: walking them channel by channel ran at half the speed of memory order).
  Where a channel's segments (x and dy) fit in a core's L2 cache, the training forward and,
  for long segments, the backward take one task per block of channels instead
  (:func:`bn_seg_fwd`, :func:`bn_seg_bwd`): the block's sums, then its output while its
  segments are still in cache (x and dy read once from memory, not twice; the same sums in
  the same order, so the same bits). A block's segments of one sample are one contiguous
  run, read in memory order: one channel per task had measured 3-10% slower than the two
  passes in the forward (its statistics pass, walking the channel's segments, lost more than
  the second read of x saved).
* **columns** (channels_last(_3d), ``(N, C)``): each (sample, position) is ``C`` contiguous
  channels. The rows of a matrix (all ``N * S`` positions for BatchNorm, one sample's ``S``
  for GroupNorm) are cut into blocks of ``block`` rows, a size fixed by the shape;
  :func:`col_sums` writes per-(block, channel) partial sums (statistics or gradients),
  :func:`merge` adds them in a fixed order, :func:`col_out` writes the output (or the
  input gradient) from per-channel coefficients. GroupNorm with enough samples for the
  threads takes one task per sample instead (:func:`col_group_fwd`, :func:`col_group_bwd`):
  the same blocks and sums in the same order, then the output while the sample is in cache
  (one pass over memory fewer; 10-20% less CPU time at the ResNet and U-Net shapes). Rows are
  read and written through 2-D views of the flat storage (:func:`_rows`), not per-row slices.

Every kernel is serial over a range of its tasks, ``[lo, hi)`` (its last two arguments), with
its scratch buffers allocated once per range: the launcher cuts the tasks into one range per
thread (:func:`normkit.ops.numba._engine.split_run`, a single range for small calls), and since
each task writes only its own results and partial sums, the ranges change no bit.

Numerics (the same bits at any thread count; for GroupNorm and InstanceNorm a sample's result
does not depend on the other samples):

* every statistic is shifted by one element of its own (``d = x - pivot``, the first element
  of the row): a large common offset cancels exactly, a constant row has variance exactly 0;
* the sums of ``d`` and ``d^2`` are accumulated in float64 (exact products of float32 values),
  a segment by :func:`_sums` (reassociated, vectorized, in an order fixed by its length: see
  ``sum_jit`` in the engine), a column sequentially over its rows; partial sums are added in
  segment or block order, never per thread. The variance is
  ``E[d^2] - E[d]^2`` in float64: its relative error is about ``2^-53 (1 + (mean - pivot)^2 /
  var)``, far below float32's rounding (for float64 input, below the last bits only while the
  pivot is not many standard deviations from the mean);
* the output and the input gradient are computed in the statistics dtype (float32, float64
  for float64 input) from per-channel coefficients rounded once: ``y = act(((x - pivot) -
  mean) * (w * rstd) + b)``; ``dx = k1 * dz + k2 * x_hat + k3`` with ``dz = dy * act'(z)``.
"""

from __future__ import annotations

import math
import platform

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from normkit.ops.numba._engine import decode, encode, jit, row_of, staging, sum_jit

__all__ = ["ACT_CODES", "APPLY", "FULL", "SUMS", "bn_seg_bwd", "bn_seg_fwd", "col_group_bwd", "col_group_fwd",
           "col_out", "col_sums", "merge", "seg_bwd", "seg_fwd"]

# Activation codes (normkit.functional.ACTIVATIONS by name): 0 none, 1 relu, 2 silu, 3 gelu (erf).
ACT_CODES: dict[str | None, int] = {None: 0, "relu": 1, "silu": 2, "gelu": 3}


@jit(inline="always")
def _act(z, act, zero):
    """``act(z)`` (``zero``: 0 in z's dtype); relu keeps a NaN (``z < 0`` is False for it), as
    torch's relu does."""
    if act == 1:
        return zero if z < 0 else z
    if act == 2:
        return z / (1 + math.exp(-z))
    if act == 3:
        return 0.5 * z * (1 + math.erf(z * 0.7071067811865476))
    return z


@jit(inline="always")
def _act_grad(dy, z, act):
    """``dy * act'(z)``; relu passes ``dy`` unless ``z <= 0`` (torch's threshold_backward)."""
    if act == 1:
        return dy * 0 if z <= 0 else dy
    if act == 2:
        s = 1 / (1 + math.exp(-z))
        return dy * (s * (1 + z * (1 - s)))
    if act == 3:
        cdf = 0.5 * (1 + math.erf(z * 0.7071067811865476))
        return dy * (cdf + z * 0.3989422804014327 * math.exp(-0.5 * z * z))
    return dy


@sum_jit
def _sums(v, p):
    """``(sum(d), sum(d^2))`` of ``d = v - p`` in float64 (``p`` a float64 pivot)."""
    s1 = p - p
    s2 = p - p
    for i in range(v.shape[0]):
        d = np.float64(v[i]) - p
        s1 += d
        s2 += d * d
    return s1, s2


@sum_jit
def _grad_sums(v, g, pt, mt, rt, wc, bc, act):
    """``(sum(dz), sum(dz * x_hat))`` in float64, ``x_hat = ((v - pt) - mt) * rt``,
    ``dz = g * act'(x_hat * wc + bc)`` (the loops without an activation and with relu written
    out apart, so that they vectorize)."""
    s1 = 0.0
    s2 = 0.0
    if act == 0:
        for i in range(v.shape[0]):
            s1 += g[i]
            s2 += np.float64(g[i]) * (((v[i] - pt) - mt) * rt)
        return s1, s2
    if act == 1:
        zero = rt - rt
        for i in range(v.shape[0]):
            h = ((v[i] - pt) - mt) * rt
            gi = g[i]  # loaded on both paths: a select, which vectorizes
            dz = zero if h * wc + bc <= zero else gi
            s1 += dz
            s2 += np.float64(dz) * h
        return s1, s2
    for i in range(v.shape[0]):
        h = ((v[i] - pt) - mt) * rt
        dz = _act_grad(g[i], h * wc + bc, act)
        s1 += dz
        s2 += np.float64(dz) * h
    return s1, s2


@jit(inline="always")
def _moments(s1, s2, n, eps):
    """``(mean of d, biased variance, rstd)`` in float64 from ``sum(d)`` and ``sum(d^2)``;
    rstd is 0 where ``var + eps == 0`` (ATen's rule: the output is then the bias)."""
    mu = s1 / n
    var = max(s2 / n - mu * mu, 0.0)
    return mu, var, 0.0 if var + eps == 0 else 1.0 / math.sqrt(var + eps)


@jit(inline="always")
def _row_start(r, nb, stride_a, stride_b):
    """Offset of row ``r = a * nb + bi``, and ``bi``: ``(sample, channel)`` for BatchNorm
    (``nb = C``), ``(sample, group)`` for GroupNorm (``nb = G``)."""
    a = r // nb
    return a * stride_a + (r - a * nb) * stride_b, r - a * nb


@jit(inline="always")
def _apply(v, out, pt, mt, k1, k0, act, zero):
    """``out = act(((v - pt) - mt) * k1 + k0)``; the loops without an activation or with relu
    are written out apart so that they vectorize."""
    if act == 0:
        for i in range(v.shape[0]):
            out[i] = ((v[i] - pt) - mt) * k1 + k0
    elif act == 1:
        for i in range(v.shape[0]):
            z = ((v[i] - pt) - mt) * k1 + k0
            out[i] = zero if z < zero else z
    else:
        for i in range(v.shape[0]):
            out[i] = _act(((v[i] - pt) - mt) * k1 + k0, act, zero)


@jit(inline="always")
def _dx(v, g, out, pt, mt, rt, wc, bc, k1, k2, k3, act):
    """``out = k1 * dz + k2 * x_hat + k3``, ``x_hat = ((v - pt) - mt) * rt``, ``dz = g *
    act'(x_hat * wc + bc)`` (the loops without an activation and with relu written out apart)."""
    if act == 0:
        for i in range(v.shape[0]):
            out[i] = k1 * g[i] + k2 * (((v[i] - pt) - mt) * rt) + k3
    elif act == 1:
        zero = rt - rt
        for i in range(v.shape[0]):
            h = ((v[i] - pt) - mt) * rt
            gi = g[i]
            out[i] = k1 * (zero if h * wc + bc <= zero else gi) + k2 * h + k3
    else:
        for i in range(v.shape[0]):
            h = ((v[i] - pt) - mt) * rt
            out[i] = k1 * _act_grad(g[i], h * wc + bc, act) + k2 * h + k3


# Outputs of at least this many bytes (y, dx) are written with non-temporal stores: they go to
# memory without first reading each cache line in (a plain store of a line not in cache reads
# it, so writing costs twice its bytes of memory traffic). Below that, an output may still be
# in the last-level cache when the next layer reads it, which a non-temporal store would give
# up. Measured on a 32 MiB-L3 EPYC, 2^23 float32 elements: 1.96 -> 1.48 ms (min) for an
# elementwise pass. x86-64 only (elsewhere plain stores).
STREAM_BYTES = 8 << 20
_X86 = platform.machine().lower() in ("x86_64", "amd64")
# Elements computed into a buffer in L1 before they are stored to memory in one burst.
STREAM_BLOCK = 512


@intrinsic
def _store_stream(typingctx, dst, offset, src):
    """``dst[offset:offset + len(src)] = src`` with 32-byte non-temporal vector stores:
    ``dst``'s address at ``offset`` 32-byte aligned, ``len(src)`` a multiple of 32 bytes."""

    def codegen(context, builder, sig, args):
        d = context.make_array(sig.args[0])(context, builder, args[0])
        s = context.make_array(sig.args[2])(context, builder, args[2])
        elt = context.get_data_type(sig.args[0].dtype)
        lanes = 32 // context.get_abi_sizeof(elt)
        vec = ir.VectorType(elt, lanes)
        n = cgutils.unpack_tuple(builder, s.shape, 1)[0]
        base = builder.gep(d.data, [args[1]])
        hint = builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)])
        with cgutils.for_range_slice(builder, ir.Constant(n.type, 0), n, ir.Constant(n.type, lanes)) as (i, _):
            v = builder.load(builder.bitcast(builder.gep(s.data, [i]), vec.as_pointer()), align=4)
            store = builder.store(v, builder.bitcast(builder.gep(base, [i]), vec.as_pointer()), align=32)
            store.set_metadata("nontemporal", hint)
        return context.get_dummy_value()

    return types.void(dst, types.intp, src), codegen


@intrinsic
def _store_fence(typingctx):
    """``sfence``: non-temporal stores are weakly ordered; a task fences them before the
    launch returns and another thread reads the output."""

    def codegen(context, builder, sig, args):
        if _X86:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                "llvm.x86.sse.sfence")
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


def streams(out):  # pragma: no cover - replaced by the overload inside kernels
    """Whether results bound for ``out`` (the whole flat output) are stored non-temporally."""


@overload(streams)
def _streams(out):
    if not _X86 or not isinstance(out.dtype, types.Float):
        return lambda out: False  # bf16 goes through a staging buffer that encode reads back
    return lambda out: out.shape[0] * out.itemsize >= STREAM_BYTES


@jit(inline="always")
def _stream_head(out):
    """Elements of ``out`` before its first 32-byte aligned one."""
    return min(out.shape[0], ((32 - out.ctypes.data % 32) % 32) // out.itemsize)


@jit(inline="always")
def _next_chunk(i, n, head, stream):
    """``(end, streamed)`` of the chunk of a segment's output starting at ``i`` (``n`` its
    length, ``head`` the elements before its first 32-byte aligned one): without ``stream``
    the whole segment; else the head and the tail stored plainly, the middle in STREAM_BLOCK
    chunks computed into a scratch buffer and stored non-temporally."""
    if not stream:
        return n, False
    if i < head:
        return head, False
    if i + STREAM_BLOCK <= n:
        return i + STREAM_BLOCK, True
    return n, False


# _apply_out and _dx_out cut a segment into chunks and inline their loops once, whatever the
# stores: with a copy of the loops per kind of chunk (head, streamed middle, tail, unstreamed)
# seg_fwd, seg_bwd and bn_seg_bwd held four copies each, 2.2x their compile time now (46 s
# against 21 s for their three dtypes), for the same loops. The loops stay inlined: called
# instead, the forwards ran 1.4-1.8x slower (32x64x56x56 NCHW, one thread).


@jit(inline="always")
def _apply_out(v, out, pt, mt, k1, k0, act, zero, stream, buf):
    """:func:`_apply`, the aligned middle of ``out`` stored non-temporally where ``stream``
    (``buf``: a STREAM_BLOCK-element scratch; the same values, only the stores differ)."""
    n = v.shape[0]
    head = _stream_head(out) if stream else 0
    i = 0
    while i < n:
        j, streamed = _next_chunk(i, n, head, stream)
        _apply(v[i:j], buf if streamed else out[i:j], pt, mt, k1, k0, act, zero)
        if streamed:
            _store_stream(out, i, buf)
        i = j


@jit(inline="always")
def _dx_out(v, g, out, pt, mt, rt, wc, bc, k1, k2, k3, act, stream, buf):
    """:func:`_dx`, the aligned middle of ``out`` stored non-temporally where ``stream`` (as
    :func:`_apply_out`)."""
    n = v.shape[0]
    head = _stream_head(out) if stream else 0
    i = 0
    while i < n:
        j, streamed = _next_chunk(i, n, head, stream)
        _dx(v[i:j], g[i:j], buf if streamed else out[i:j], pt, mt, rt, wc, bc, k1, k2, k3, act)
        if streamed:
            _store_stream(out, i, buf)
        i = j


@jit(inline="always")
def _seg_dx(dy, x, dx, start, S, pt, mt, rt, wc, bc, k1, k2, k3, act, stream, xbuf, gbuf, obuf, sbuf):
    """The input gradient of the segment at ``start``: :func:`_dx` (streamed where ``stream``),
    through the staging buffer for bf16."""
    out = staging(dx[start:start + S], obuf)
    v = decode(x[start:start + S], xbuf)
    g = decode(dy[start:start + S], gbuf)
    _dx_out(v, g, out, pt, mt, rt, wc, bc, k1, k2, k3, act, stream, sbuf)
    encode(out, dx[start:start + S])


@jit(inline="always")
def _seg_scratch(w, S, stream):
    """A segment's decode and staging buffers (bf16 widened or narrowed there) and the
    STREAM_BLOCK-element buffer of its streamed chunks (0-length without ``stream``)."""
    return (np.empty(S, w.dtype), np.empty(S, w.dtype),
            np.empty(STREAM_BLOCK if stream else 0, w.dtype))


@jit(inline="always")
def _seg_y(x, y, start, S, pt, mt, k1, k0, act, zero, stream, xbuf, ybuf, sbuf):
    """The output of the segment at ``start``: :func:`_apply` (streamed where ``stream``),
    through the staging buffer for bf16."""
    out = staging(y[start:start + S], ybuf)
    _apply_out(decode(x[start:start + S], xbuf), out, pt, mt, k1, k0, act, zero, stream, sbuf)
    encode(out, y[start:start + S])


# seg_fwd's modes: what a task does with its row.
FULL, SUMS, APPLY = 0, 1, 2


@jit
def seg_fwd(x, y, nb, stride_a, stride_b, nseg, seg_stride, S, cpr, cps, w, b, mode, eps, act,
            pivot, mean, var, rstd, lo, hi):
    """Rows ``[lo, hi)`` of ``pivot.shape[0]``, one task each; segment ``j`` of a row starts ``j *
    seg_stride`` after it and has channel ``bi * cpr + j * cps``. ``mode``:

    * FULL: the row's statistics (pivot its first element) into ``pivot``, ``mean`` (of
      ``x - pivot``), ``var`` (biased), ``rstd``, then ``y = act(((x - pivot) - mean) * w *
      rstd + b)`` while the row is in cache (GroupNorm, InstanceNorm);
    * SUMS: ``sum(x - pivot)`` into ``mean`` and ``sum((x - pivot)^2)`` into ``var``, with
      the given ``pivot`` (BatchNorm's first pass: its statistics span rows);
    * APPLY: ``y`` from the given ``pivot``, ``mean`` and ``rstd`` (BatchNorm's second pass,
      or eval BatchNorm with the running statistics)."""
    T = w.dtype.type
    zero = T(0.0)
    stream = streams(y)
    xbuf, ybuf, sbuf = _seg_scratch(w, S, stream)
    for r in range(lo, hi):
        base, bi = _row_start(r, nb, stride_a, stride_b)
        if mode != APPLY:
            if mode == FULL:
                pivot[r] = np.float64(decode(x[base:base + 1], xbuf[:1])[0])
            s1 = 0.0
            s2 = 0.0
            for j in range(nseg):
                start = base + j * seg_stride
                a1, a2 = _sums(decode(x[start:start + S], xbuf), pivot[r])
                s1 += a1
                s2 += a2
            if mode == SUMS:
                mean[r], var[r] = s1, s2
                continue
            mean[r], var[r], rstd[r] = _moments(s1, s2, nseg * S, eps)
        pt, mt = T(pivot[r]), T(mean[r])
        for j in range(nseg):
            c = bi * cpr + j * cps
            _seg_y(x, y, base + j * seg_stride, S, pt, mt, T(rstd[r] * w[c]), b[c], act, zero, stream,
                   xbuf, ybuf, sbuf)
    if stream:
        _store_fence()


@jit
def bn_seg_fwd(x, y, N, C, S, w, b, eps, act, pivot, mean, var, rstd, cb, lo, hi):
    """BatchNorm's NC* training forward, channels ``[lo, hi)`` in blocks of ``cb``, one task
    each: each channel's statistics (``pivot`` its first element, ``mean`` of ``x - pivot``,
    ``var`` biased, ``rstd``), then ``y = act(((x - pivot) - mean) * w * rstd + b)`` while the
    block's segments are still in cache: x read once from memory, not twice. The same segment
    sums added in sample order as :func:`seg_fwd`'s SUMS and :func:`merge`, the same moments as
    the launcher's and the same output as APPLY: the same bits as those two passes."""
    T = w.dtype.type
    zero = T(0.0)
    stream = streams(y)
    xbuf, ybuf, sbuf = _seg_scratch(w, S, stream)
    s1 = np.empty(cb)
    s2 = np.empty(cb)
    for c0 in range(lo, hi, cb):
        c1 = min(hi, c0 + cb)
        for c in range(c0, c1):
            pivot[c] = np.float64(decode(x[c * S:c * S + 1], xbuf[:1])[0])
        s1[:] = 0.0
        s2[:] = 0.0
        for n in range(N):
            for c in range(c0, c1):
                start = (n * C + c) * S
                a1, a2 = _sums(decode(x[start:start + S], xbuf), pivot[c])
                s1[c - c0] += a1
                s2[c - c0] += a2
        for c in range(c0, c1):
            mean[c], var[c], rstd[c] = _moments(s1[c - c0], s2[c - c0], N * S, eps)
        for n in range(N):
            for c in range(c0, c1):
                _seg_y(x, y, (n * C + c) * S, S, T(pivot[c]), T(mean[c]), T(rstd[c] * w[c]), b[c],
                       act, zero, stream, xbuf, ybuf, sbuf)
    if stream:
        _store_fence()


@jit
def seg_bwd(dy, x, dx, nb, stride_a, stride_b, nseg, seg_stride, S, cpr, cps, w, b, batch_stats,
            act, pivot, mean, rstd, coef, s1p, s2p, lo, hi):
    """The backward of :func:`seg_fwd`, rows ``[lo, hi)``, one task each. Without ``coef`` rows: ``s1p[r, j]``
    and ``s2p[r, j]`` get segment j's ``sum(dz)`` and ``sum(dz * x_hat)`` (``dz = dy *
    act'(z)``), then (unless ``dx`` is 0-length) ``dx = rstd * (w dz - mean(w dz) - x_hat *
    mean(w dz x_hat))`` over the row (``batch_stats``) or ``rstd * w * dz`` (given
    statistics). With ``coef`` rows (BatchNorm's second pass, the means over the batch known):
    ``dx = k1 * dz + k2 * x_hat + k3`` with ``(k1, k2, k3) = coef[r]``."""
    T = w.dtype.type
    want_dx, given = dx.shape[0] > 0, coef.shape[0] > 0
    stream = streams(dx)
    xbuf = np.empty(S, w.dtype)
    gbuf = np.empty(S, w.dtype)
    obuf = np.empty(S, w.dtype)
    sbuf = np.empty(STREAM_BLOCK if stream else 0, w.dtype)
    for r in range(lo, hi):
        base, bi = _row_start(r, nb, stride_a, stride_b)
        pt, mt, rt = T(pivot[r]), T(mean[r]), T(rstd[r])
        g1 = 0.0
        g2 = 0.0
        for j in range(nseg if not given else 0):
            c = bi * cpr + j * cps
            start = base + j * seg_stride
            v = decode(x[start:start + S], xbuf)
            g = decode(dy[start:start + S], gbuf)
            s1p[r, j], s2p[r, j] = _grad_sums(v, g, pt, mt, rt, w[c], b[c], act)
            g1 += s1p[r, j] * w[c]
            g2 += s2p[r, j] * w[c]
        if not want_dx:
            continue
        n = nseg * S
        for j in range(nseg):
            c = bi * cpr + j * cps
            if given:
                k1, k2, k3 = T(coef[r, 0]), T(coef[r, 1]), T(coef[r, 2])
            else:
                k1 = T(rstd[r] * w[c])
                k2 = T(-rstd[r] * g2 / n) if batch_stats else T(0.0)
                k3 = T(-rstd[r] * g1 / n) if batch_stats else T(0.0)
            _seg_dx(dy, x, dx, base + j * seg_stride, S, pt, mt, rt, w[c], b[c], k1, k2, k3, act,
                    stream, xbuf, gbuf, obuf, sbuf)
    if stream:
        _store_fence()


@jit
def bn_seg_bwd(dy, x, dx, N, C, S, w, b, batch_stats, act, pivot, mean, rstd, s1, s2, cb, lo, hi):
    """BatchNorm's NC* backward (training, or eval with ``batch_stats`` False), channels
    ``[lo, hi)`` in blocks of ``cb``, one task each: ``s1[c]`` and ``s2[c]`` get ``sum(dz)`` and
    ``sum(dz * x_hat)`` (segment sums added in sample order, as seg_bwd's partial sums and
    :func:`merge`), then (unless ``dx`` is 0-length) the block's ``dx`` while its segments are
    still in cache, with seg_bwd's coefficients computed as the launcher computes them (the
    same bits). Both passes walk the block sample by sample, its ``cb`` segments of a sample
    being one contiguous run: one channel at a time (``cb = 1``), 12.5 KB segments 800 KB
    apart at 32x64x56x56, the sums took 3.1 ms at one thread against 1.6 ms for the same sums
    in memory order."""
    T = w.dtype.type
    want_dx = dx.shape[0] > 0
    stream = streams(dx)
    xbuf, obuf, sbuf = _seg_scratch(w, S, stream)
    gbuf = np.empty(S, w.dtype)
    coef = np.empty((cb, 3), w.dtype)
    n_el = N * S
    for c0 in range(lo, hi, cb):
        c1 = min(hi, c0 + cb)
        s1[c0:c1] = 0.0
        s2[c0:c1] = 0.0
        for n in range(N):
            for c in range(c0, c1):
                start = (n * C + c) * S
                a1, a2 = _grad_sums(decode(x[start:start + S], xbuf), decode(dy[start:start + S], gbuf),
                                    T(pivot[c]), T(mean[c]), T(rstd[c]), w[c], b[c], act)
                s1[c] += a1
                s2[c] += a2
        if not want_dx:
            continue
        for c in range(c0, c1):
            w64 = np.float64(w[c])
            coef[c - c0, 0] = T(rstd[c] * w64)
            coef[c - c0, 1] = T(-rstd[c] * w64 * s2[c] / n_el) if batch_stats else T(0.0)
            coef[c - c0, 2] = T(-rstd[c] * w64 * s1[c] / n_el) if batch_stats else T(0.0)
        for n in range(N):
            for c in range(c0, c1):
                k1, k2, k3 = coef[c - c0, 0], coef[c - c0, 1], coef[c - c0, 2]
                _seg_dx(dy, x, dx, (n * C + c) * S, S, T(pivot[c]), T(mean[c]), T(rstd[c]), w[c],
                        b[c], k1, k2, k3, act, stream, xbuf, gbuf, obuf, sbuf)
    if stream:
        _store_fence()


@jit(inline="always")
def _block_rows(t, nblk, block, R):
    """Task ``t`` of the column kernels: its matrix and its rows ``[r0, r1)``."""
    n = t // nblk
    blk = t - n * nblk
    return n, blk, blk * block, min(R, (blk + 1) * block)


@jit(inline="always")
def _rows(a, C):
    """The flat array ``a`` as its rows of ``C`` channels, for :func:`row_of`: a row without a
    reference counted (a slice of ``a`` per row counts one, two atomic operations on a cache
    line that every thread of the call shares, for a row of as few as C elements)."""
    return a.reshape((a.shape[0] // C, C))


# The column helpers below are called, not inlined (each compiled once per signature; the
# kernel's time unchanged at the benchmark shapes), and statistics and gradients, output and
# input gradient, are apart: GroupNorm's one-task-per-sample kernels hold only the loops they
# run (the four column kernels compiled in 31 s for three dtypes, against 44 s inlined).


@jit
def _col_block_stats(x, base, r0, r1, p, a1, a2, scratch):
    """Adds rows ``[r0, r1)`` of the matrix at ``base`` into ``a1[c]`` and ``a2[c]``, each
    column in row order: ``sum(d)`` and ``sum(d^2)`` of ``d = x - p`` (see :func:`col_sums`);
    ``scratch``: :func:`_col_scratch`'s rows."""
    C = a1.shape[0]
    xbuf = row_of(scratch, 0)
    ubuf = row_of(scratch, 1)
    xs, row0 = _rows(x, C), base // C
    first = r0  # the first row left for the one-row loop below
    while first + 1 < r1:
        # Two rows per pass over the accumulators (1.4x faster; the additions in the same
        # order as one row at a time).
        i = row0 + first
        v = decode(row_of(xs, i), xbuf)
        u = decode(row_of(xs, i + 1), ubuf)
        for c in range(C):
            pc = np.float64(p[c])
            d = np.float64(v[c]) - pc
            e = np.float64(u[c]) - pc
            a1[c] = (a1[c] + d) + e
            a2[c] = (a2[c] + d * d) + e * e
        first += 2
    for r in range(first, r1):
        v = decode(row_of(xs, row0 + r), xbuf)
        for c in range(C):
            d = np.float64(v[c]) - np.float64(p[c])
            a1[c] += d
            a2[c] += d * d


@jit
def _col_block_grads(dy, x, base, r0, r1, p, m, rs, wc, bc, act, a1, a2, scratch):
    """Adds rows ``[r0, r1)`` of the matrix at ``base`` into ``a1[c]`` and ``a2[c]``, each
    column in row order: ``sum(dz)`` and ``sum(dz * x_hat)`` (see :func:`col_sums`)."""
    C = a1.shape[0]
    zero = p.dtype.type(0.0)
    xbuf = row_of(scratch, 0)
    gbuf = row_of(scratch, 1)
    ubuf = row_of(scratch, 3)
    qbuf = row_of(scratch, 4)
    xs, gs, row0 = _rows(x, C), _rows(dy, C), base // C
    first = r0  # the first row left for the one-row loop below
    while act == 0 and first + 1 < r1:
        # Two rows per pass, as the statistics (the same additions in the same order).
        i = row0 + first
        v = decode(row_of(xs, i), xbuf)
        g = decode(row_of(gs, i), gbuf)
        u = decode(row_of(xs, i + 1), ubuf)
        q = decode(row_of(gs, i + 1), qbuf)
        for c in range(C):
            a1[c] = (a1[c] + g[c]) + q[c]
            a2[c] = ((a2[c] + np.float64(g[c]) * (((v[c] - p[c]) - m[c]) * rs[c]))
                     + np.float64(q[c]) * (((u[c] - p[c]) - m[c]) * rs[c]))
        first += 2
    for r in range(first, r1):
        i = row0 + r
        v = decode(row_of(xs, i), xbuf)
        g = decode(row_of(gs, i), gbuf)
        if act == 0:
            for c in range(C):
                a1[c] += g[c]
                a2[c] += np.float64(g[c]) * (((v[c] - p[c]) - m[c]) * rs[c])
        elif act == 1:
            for c in range(C):
                h = ((v[c] - p[c]) - m[c]) * rs[c]
                gc = g[c]
                dz = zero if h * wc[c] + bc[c] <= zero else gc
                a1[c] += dz
                a2[c] += np.float64(dz) * h
        else:
            for c in range(C):
                h = ((v[c] - p[c]) - m[c]) * rs[c]
                dz = _act_grad(g[c], h * wc[c] + bc[c], act)
                a1[c] += dz
                a2[c] += np.float64(dz) * h


@jit
def _col_block_y(x, out, base, r0, r1, p, m, rs, bc, act, scratch):
    """Rows ``[r0, r1)`` of the matrix at ``base`` of the forward's output, ``out = act(((x -
    p) - m) * rs + bc)`` (see :func:`col_out`); ``scratch``: :func:`_col_scratch`'s rows (bf16
    rows widened or narrowed there)."""
    C = p.shape[0]
    zero = p.dtype.type(0.0)
    xbuf = row_of(scratch, 0)
    obuf = row_of(scratch, 2)
    ubuf = row_of(scratch, 3)
    qbuf = row_of(scratch, 4)
    xs, ys, row0 = _rows(x, C), _rows(out, C), base // C
    first = r0  # the first row left for the one-row loop below
    while act == 0 and first + 1 < r1:
        # Two rows per pass over the coefficients (elementwise: the same bits).
        i = row0 + first
        v = decode(row_of(xs, i), xbuf)
        u = decode(row_of(xs, i + 1), ubuf)
        o = staging(row_of(ys, i), obuf)
        q = staging(row_of(ys, i + 1), qbuf)
        for c in range(C):
            o[c] = ((v[c] - p[c]) - m[c]) * rs[c] + bc[c]
            q[c] = ((u[c] - p[c]) - m[c]) * rs[c] + bc[c]
        encode(o, row_of(ys, i))
        encode(q, row_of(ys, i + 1))
        first += 2
    for r in range(first, r1):
        i = row0 + r
        v = decode(row_of(xs, i), xbuf)
        o = staging(row_of(ys, i), obuf)
        if act == 0:
            for c in range(C):
                o[c] = ((v[c] - p[c]) - m[c]) * rs[c] + bc[c]
        elif act == 1:
            for c in range(C):
                z = ((v[c] - p[c]) - m[c]) * rs[c] + bc[c]
                o[c] = zero if z < zero else z
        else:
            for c in range(C):
                o[c] = _act(((v[c] - p[c]) - m[c]) * rs[c] + bc[c], act, zero)
        encode(o, row_of(ys, i))


@jit
def _col_block_dx(dy, x, out, base, r0, r1, p, m, rs, wc, bc, a, e, f, act, scratch):
    """Rows ``[r0, r1)`` of the matrix at ``base`` of the input gradient, ``out = a * dz + e *
    x_hat + f`` (see :func:`col_out`)."""
    C = p.shape[0]
    zero = p.dtype.type(0.0)
    xbuf = row_of(scratch, 0)
    gbuf = row_of(scratch, 1)
    obuf = row_of(scratch, 2)
    xs, gs, ys, row0 = _rows(x, C), _rows(dy, C), _rows(out, C), base // C
    for r in range(r0, r1):
        i = row0 + r
        v = decode(row_of(xs, i), xbuf)
        g = decode(row_of(gs, i), gbuf)
        o = staging(row_of(ys, i), obuf)
        if act == 0:
            for c in range(C):
                o[c] = a[c] * g[c] + e[c] * (((v[c] - p[c]) - m[c]) * rs[c]) + f[c]
        elif act == 1:
            for c in range(C):
                h = ((v[c] - p[c]) - m[c]) * rs[c]
                gc = g[c]
                o[c] = a[c] * (zero if h * wc[c] + bc[c] <= zero else gc) + e[c] * h + f[c]
        else:
            for c in range(C):
                h = ((v[c] - p[c]) - m[c]) * rs[c]
                o[c] = a[c] * _act_grad(g[c], h * wc[c] + bc[c], act) + e[c] * h + f[c]
        encode(o, row_of(ys, i))


@jit(inline="always")
def _col_scratch(p):
    """The five scratch rows of the column helpers above (bf16 rows widened or narrowed),
    allocated once per kernel call, not per block of rows."""
    return np.empty((5, p.shape[-1]), p.dtype)



@jit
def col_sums(dy, x, R, sample_stride, block, piv, mu, rstd, w, b, act, grads, s1p, s2p, lo, hi):
    """Tasks ``[lo, hi)`` of ``N2 * blocks``: per (matrix n, block of ``block`` rows, channel
    c), into ``s1p[n, blk, c]`` and ``s2p``, each column summed in row order: ``sum(d)`` and
    ``sum(d^2)`` of ``d = x - piv`` (the statistics), or with ``grads`` ``sum(dz)`` and
    ``sum(dz * x_hat)``, ``x_hat = ((x - piv) - mu) * rstd``, ``dz = dy * act'(x_hat * w + b)``.
    Matrix n has ``R`` rows of ``C`` channels, each row's channels contiguous, from ``n *
    sample_stride``; coefficients are per (matrix, channel)."""
    N2, nblk, C = s1p.shape
    a1 = np.empty(C, np.float64)
    a2 = np.empty(C, np.float64)
    scratch = _col_scratch(piv)
    for t in range(lo, hi):
        n, blk, r0, r1 = _block_rows(t, nblk, block, R)
        a1[:] = 0.0
        a2[:] = 0.0
        if grads:
            _col_block_grads(dy, x, n * sample_stride, r0, r1, piv[n], mu[n], rstd[n], w[n], b[n],
                             act, a1, a2, scratch)
        else:
            _col_block_stats(x, n * sample_stride, r0, r1, piv[n], a1, a2, scratch)
        s1p[n, blk, :] = a1
        s2p[n, blk, :] = a2


@jit
def col_out(dy, x, out, R, sample_stride, block, piv, mu, rstd, w, b, k1, k2, k3, act, grads, lo,
            hi):
    """Tasks ``[lo, hi)`` of ``N2 * blocks`` (as :func:`col_sums`). Per-(matrix, channel)
    coefficients, ``x_hat = ((x - piv) - mu) * rstd`` and ``z = x_hat * w + b``: ``out =
    act(((x - piv) - mu) * rstd + b)`` (the forward: ``rstd`` is then ``w * rstd``), or with
    ``grads`` ``out = k1 * dz + k2 * x_hat + k3``, ``dz = dy * act'(z)`` (dx)."""
    N2, C = piv.shape
    nblk = (R + block - 1) // block
    scratch = _col_scratch(piv)
    for t in range(lo, hi):
        n, blk, r0, r1 = _block_rows(t, nblk, block, R)
        if grads:
            _col_block_dx(dy, x, out, n * sample_stride, r0, r1, piv[n], mu[n], rstd[n], w[n], b[n],
                          k1[n], k2[n], k3[n], act, scratch)
        else:
            _col_block_y(x, out, n * sample_stride, r0, r1, piv[n], mu[n], rstd[n], b[n], act,
                         scratch)


@jit(inline="always")
def _add_block(a1, a2, cg, s1, s2):
    """Adds one block's column sums into ``s1[c // cg]`` and ``s2[c // cg]``, in channel order:
    a sample's blocks added in block then channel order, as :func:`merge` adds them."""
    for c in range(a1.shape[0]):
        s1[c // cg] += a1[c]
        s2[c // cg] += a2[c]


@jit
def col_group_fwd(x, y, R, sample_stride, block, w, b, eps, act, pivot, mean, var, rstd, lo, hi):
    """GroupNorm's channels_last forward, one task per sample (samples ``[lo, hi)``): its statistics, then its output
    while the sample is still in cache. The same bits as :func:`col_sums`, :func:`merge`, the
    launcher's moments and :func:`col_out` (the same sums in the same order), so the launcher
    may pick either (``pivot`` and the statistics: ``(N, G)``)."""
    N, G = pivot.shape
    C = w.shape[0]
    cg = C // G
    T = w.dtype.type
    scratch = _col_scratch(w)
    a1 = np.empty(C, np.float64)
    a2 = np.empty(C, np.float64)
    for n in range(lo, hi):
        base = n * sample_stride
        first = decode(x[base:base + C], np.empty(C, w.dtype))
        p = np.empty(C, w.dtype)
        for c in range(C):
            pivot[n, c // cg] = np.float64(first[c - c % cg])
            p[c] = T(pivot[n, c // cg])
        s1 = np.zeros(G, np.float64)
        s2 = np.zeros(G, np.float64)
        for r0 in range(0, R, block):  # the blocks of col_sums
            a1[:] = 0.0
            a2[:] = 0.0
            _col_block_stats(x, base, r0, min(R, r0 + block), p, a1, a2, scratch)
            _add_block(a1, a2, cg, s1, s2)
        m = np.empty(C, w.dtype)
        scale = np.empty(C, w.dtype)
        for g in range(G):
            mu = s1[g] / (R * cg)
            v = s2[g] / (R * cg) - mu * mu
            var[n, g] = 0.0 if v < 0.0 else v  # np.maximum(v, 0): NaN stays NaN
            rstd[n, g] = 0.0 if var[n, g] + eps == 0 else 1.0 / math.sqrt(var[n, g] + eps)
            mean[n, g] = mu
            for c in range(g * cg, (g + 1) * cg):
                m[c] = T(mu)
                scale[c] = T(rstd[n, g] * np.float64(w[c]))
        _col_block_y(x, y, base, 0, R, p, m, scale, b, act, scratch)


@jit
def col_group_bwd(dy, x, dx, R, sample_stride, block, w, b, batch_stats, act, pivot, mean, rstd,
                  s1, s2, lo, hi):
    """GroupNorm's channels_last backward, one task per sample (samples ``[lo, hi)``): ``s1[n, c]`` and ``s2[n, c]``
    (``sum(dz)``, ``sum(dz * x_hat)``) as :func:`col_sums` and :func:`merge` give them, then
    (unless ``dx`` is 0-length) the sample's ``dx`` while it is still in cache, with the
    coefficients the launcher of :func:`col_out` computes (the same bits)."""
    N, G = pivot.shape
    C = w.shape[0]
    cg = C // G
    T = w.dtype.type
    want_dx = dx.shape[0] > 0
    scratch = _col_scratch(w)
    a1 = np.empty(C, np.float64)
    a2 = np.empty(C, np.float64)
    for n in range(lo, hi):
        base = n * sample_stride
        p = np.empty(C, w.dtype)
        m = np.empty(C, w.dtype)
        r = np.empty(C, w.dtype)
        for c in range(C):
            p[c] = T(pivot[n, c // cg])
            m[c] = T(mean[n, c // cg])
            r[c] = T(rstd[n, c // cg])
        s1[n, :] = 0.0
        s2[n, :] = 0.0
        for r0 in range(0, R, block):  # the blocks of col_sums
            a1[:] = 0.0
            a2[:] = 0.0
            _col_block_grads(dy, x, base, r0, min(R, r0 + block), p, m, r, w, b, act, a1, a2, scratch)
            _add_block(a1, a2, 1, s1[n], s2[n])
        if not want_dx:
            continue
        k1 = np.empty(C, w.dtype)
        k2 = np.zeros(C, w.dtype)
        k3 = np.zeros(C, w.dtype)
        for g in range(G):
            g1 = 0.0
            g2 = 0.0
            for c in range(g * cg, (g + 1) * cg):
                g1 += s1[n, c] * np.float64(w[c])
                g2 += s2[n, c] * np.float64(w[c])
            rs = rstd[n, g]
            for c in range(g * cg, (g + 1) * cg):
                k1[c] = T(rs * np.float64(w[c]))
                if batch_stats:
                    k2[c] = T(-rs * g2 / (R * cg))
                    k3[c] = T(-rs * g1 / (R * cg))
        _col_block_dx(dy, x, dx, base, 0, R, p, m, r, w, b, k1, k2, k3, act, scratch)


@jit
def merge(part, groups, w, out):
    """``out[n, g] = sum over blocks and the group's channels of w[c] * part[n, blk, c]``, in
    block order then channel order (``w`` 0-length: no weights). ``part`` is
    ``(N2, blocks, C)``, ``out`` ``(N2, groups)``."""
    N2, nblk, C = part.shape
    cg = C // groups
    has_w = w.shape[0] > 0
    for n in range(N2):
        for g in range(groups):
            acc = 0.0
            for blk in range(nblk):
                for k in range(g * cg, (g + 1) * cg):
                    acc += part[n, blk, k] * w[k] if has_w else part[n, blk, k]
            out[n, g] = acc
