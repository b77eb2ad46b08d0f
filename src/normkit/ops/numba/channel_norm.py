"""The channel norms on numba kernels: BatchNorm, GroupNorm, InstanceNorm, with an activation.

Every norm is two ``torch.library`` custom ops over the input's ``(N, C, S)`` view, read in
place (contiguous NC*, channels_last(_3d), ``(N, C)`` and ``(N, C, L)``; any other strides are
made contiguous first) and written in the input's memory format:

* ``normkit_numba::channel_fwd(x, weight, bias, running_mean, running_var, groups, training,
  eps, act) -> (y, pivot, mean, var, rstd)``: ``groups=0`` is BatchNorm (one statistic per
  channel over ``(N, S)``; with ``training=False`` the running statistics normalize), else
  one statistic per (sample, group). ``pivot`` is the element each statistic is shifted by,
  ``mean`` the mean of ``x - pivot``, ``var`` the biased variance (float64, one per statistic).
* ``normkit_numba::channel_bwd(dy, x, weight, bias, pivot, mean, rstd, groups, batch_stats,
  act, want_dx, want_dw, want_db) -> (dx, dw, db)``.

The running statistics are updated outside the ops, by :func:`normkit.numerics.update_running_stats`
(all or none, in their own dtype), from the forward op's statistics. Both ops have fake
implementations, so ``torch.compile(fullgraph=True)`` traces a norm without a graph break.
torch.func transforms and ``torch.jit.trace`` go through the ops too; eager calls on plain
tensors run the ops' implementations without the custom-op dispatch, under one autograd
Function where autograd records (tens of microseconds less a call at small shapes).

Parallelism and numerics are the kernels' (:mod:`normkit.ops.numba.channel_kernels`): tasks
are (sample, channel) segments (BatchNorm, NC*; its backward one task per block of channels
where a channel fits in a core's cache: :data:`CHANNEL_CACHE_BYTES`, :data:`CHANNEL_BLOCK_BYTES`),
(sample, group) rows (GroupNorm, InstanceNorm, NC*) or fixed blocks of channels_last rows
(GroupNorm and InstanceNorm with enough samples for the threads: one task per sample, the same
blocks inside), cut into one range of tasks per thread of ``torch.get_num_threads()`` (one range on the calling thread
below ``_engine.PARALLEL_MIN_ELEMENTS``: :func:`~normkit.ops.numba._engine.split_run`);
partial sums (statistics, weight and bias gradients) are kept per task and added in a fixed
order, so results are bit-identical at any thread count, and a GroupNorm or InstanceNorm
sample's result does not depend on the other samples.

Numerics: statistics from float64 sums of ``x - pivot`` (one element of the statistic's own)
and its square; the output and input gradient in float32 (float64 for float64 input; bf16
rounded once, to nearest even); the weight and bias gradients summed in float64. Declined:
float16, ``instance_norm(use_input_stats=False)``, empty GroupNorm/InstanceNorm input
(:data:`UNSUPPORTED`). The activations silu and gelu call libm's exp/erf per element (numba
has no vector math library here), so their fused forms are several times slower than
without an activation or with relu.

The functions take ``torch.nn.functional``'s arguments and trust them: ``normkit.functional``
has checked them and :data:`UNSUPPORTED` has accepted the call.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from normkit import reference
from normkit.numerics import acc_dtype, unbiased, update_running_stats
from normkit.ops._autograd import (
    batched_by_autograd,
    check_saveable,
    eager_plain,
    recording,
    refuse_forward_ad_early,
    vmap_by_loop,
)
from normkit.ops.numba import _graph_backward, _pages
from normkit.ops.numba import channel_kernels as k
from normkit.ops.numba._engine import acc_np_dtype, as_array, split_run
from normkit.ops.numba._functions import autograd_pair, eager_function, refuse_forward_ad
from normkit.ops.numba.backend import _CHANNEL_OPS

__all__ = [
    "UNSUPPORTED",
    "batch_norm",
    "batch_norm_act",
    "group_norm",
    "group_norm_act",
    "instance_norm",
]

ACT_CODES = k.ACT_CODES

# Rows of a channels_last block: about this many elements (a shape-only size, so the partial
# sums and their order do not depend on the thread count).
BLOCK_ELEMENTS = 16384


# BatchNorm NC*'s training forward and its backward walk the channels in blocks, a block's
# sums then its output while its segments are still in cache (x and dy read once from memory,
# not twice: kernels.bn_seg_fwd, kernels.bn_seg_bwd), where each segment is at least
# SEGMENT_MIN_BYTES (shorter ones, read out of memory order, stall on memory; the forward's
# blocks read a run of segments: _fwd_by_block) and the channel's x and dy over all samples
# fit in CHANNEL_CACHE_BYTES (1 MiB: an AMD Zen 4 core's L2). Both ways give the same bits.
SEGMENT_MIN_BYTES = 4096
CHANNEL_CACHE_BYTES = 1 << 20
# x and dy (x alone in the forward) of one block of channels: as many channels as fit in this
# (at least one). A block's segments of one sample are contiguous, so its first pass reads
# runs of that many segments in memory order; its second pass finds them in L2 and the shared
# L3 (32 MiB on the machine measured). 32x64x56x56 float32, kernels alone at one thread:
# backward 5.4 -> 4.0 ms (5 channels a block against one; 2 MiB gave 4.9, 8 MiB the same as
# 4), forward 3.7 -> 2.9 ms (10 channels a block against two passes). Any block size gives
# the same bits.
CHANNEL_BLOCK_BYTES = 4 << 20


def _by_channel(N: int, C: int, S: int, itemsize: int, inputs: int) -> bool:
    """Whether BatchNorm NC* takes one task per channel for ``inputs`` tensors of
    ``itemsize`` bytes (see :data:`CHANNEL_CACHE_BYTES`)."""
    seg = S * itemsize
    return (seg >= SEGMENT_MIN_BYTES and inputs * N * seg <= CHANNEL_CACHE_BYTES
            and C >= torch.get_num_threads())


def _fwd_by_block(N: int, C: int, S: int, itemsize: int) -> bool:
    """Whether BatchNorm NC*'s training forward takes blocks of channels (kernels.bn_seg_fwd):
    where a channel's x and dy fit in :data:`CHANNEL_CACHE_BYTES` (as the backward), with
    segments shorter than SEGMENT_MIN_BYTES too where a block's run of them (a thread's share
    of the channels at most) is not. The blocks' time against the two passes' (launcher and
    kernels, medians of paired calls at 1 and 2 threads, loaded 2-core box): 8x64x8x8
    0.58-0.59x (85 against 144 us), 32x512x7x7 0.65-0.66x, 32x256x14x14 0.57-0.59x,
    32x128x28x28 0.73-0.86x, 32x64x56x56 0.83-0.84x; with 800 KB of x a channel (64x64x56x56)
    1.01-1.09x, hence the x-and-dy bound. (The backward keeps its two passes for short
    segments: its blocks measured 0.84-1.05x there.)"""
    threads = torch.get_num_threads()
    seg = S * itemsize
    if N * seg == 0 or C < threads or 2 * N * seg > CHANNEL_CACHE_BYTES:
        return False
    return min(_channel_block(N, S, itemsize, 1), C // threads) * seg >= SEGMENT_MIN_BYTES


def _channel_block(N: int, S: int, itemsize: int, inputs: int) -> int:
    """Channels per block of BatchNorm NC*'s one-pass kernels (see :data:`CHANNEL_BLOCK_BYTES`)."""
    return max(1, CHANNEL_BLOCK_BYTES // (inputs * N * S * itemsize))


# ---- layouts --------------------------------------------------------------------------------


def _dense(x: Tensor) -> Tensor:
    """``x`` itself when its storage is dense in NC* or channels_last(_3d) order, else a
    contiguous copy (the kernels read the flat storage)."""
    if x.is_contiguous():
        return x
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if fmt is not None and x.is_contiguous(memory_format=fmt):
        return x
    return x.contiguous()


def _flat(t: Tensor) -> np.ndarray:
    """The dense storage of ``t`` (same strides as x) as a 1-D array, no copy."""
    return as_array(torch.as_strided(t.detach(), (t.numel(),), (1,), t.storage_offset()))


def _like(t: Tensor, x: Tensor) -> Tensor:
    """``t`` (dy) in x's dtype and strides."""
    t = t.to(x.dtype)
    return t if t.stride() == x.stride() else _pages.empty_like(x).copy_(t)


def _shape(x: Tensor) -> tuple[int, int, int, bool]:
    """``(N, C, S, columns)``: columns when channels are the unit-stride axis (channels_last,
    or no spatial axes), else segments of S contiguous elements."""
    N, C = x.shape[:2]
    S = math.prod(x.shape[2:])
    columns = S == 1 or (C > 1 and x.stride(1) == 1)
    return N, C, S, columns


def _param(t: Tensor | None, dtype: type, n: int, fill: float) -> np.ndarray:
    """A parameter as a contiguous array of the statistics dtype; ``n`` copies of ``fill`` for
    None (``h * 1 + 0`` is ``h`` exactly: no branch for a missing parameter)."""
    if t is None:
        return np.full(n, fill, dtype)
    return t.detach().reshape(-1).to(torch.float64 if dtype is np.float64 else torch.float32).numpy()


def _seg_geometry(N: int, C: int, S: int, groups: int) -> tuple[int, ...]:
    """The row geometry of :func:`channel_kernels.seg_fwd` (``nb, stride_a, stride_b, nseg,
    seg_stride, S, cpr, cps``): BatchNorm's rows are the (sample, channel) segments,
    GroupNorm's the (sample, group) runs of C/G segments."""
    if groups == 0:
        return (C, C * S, S, 1, S, S, 1, 0)
    cg = C // groups
    return (groups, C * S, cg * S, cg, S, S, cg, 1)


def _per_sample(N: int) -> bool:
    """Whether GroupNorm's channels_last kernels take one task per sample (each sample's
    statistics and output while it is in cache) rather than blocks of rows over all samples
    (two passes over memory; enough tasks for every thread at small N). Both give the same
    bits, so the choice may follow the thread count."""
    n = torch.get_num_threads()
    return N % n == 0 or N >= 4 * n


def _tile(stat: np.ndarray, N: int) -> np.ndarray:
    """A per-channel vector repeated for each sample: one value per (sample, channel) row (a
    broadcast copy: np.tile costs several microseconds more a call)."""
    out = np.empty((N, stat.shape[0]), stat.dtype)
    out[:] = stat
    return out.reshape(-1)


def _col_geometry(N: int, C: int, S: int, groups: int) -> tuple[int, int, int, int]:
    """``(matrices, rows, sample_stride, block)`` of the column kernels (rows of C channels):
    BatchNorm is one matrix of all N * S positions, GroupNorm one per sample."""
    block = max(1, BLOCK_ELEMENTS // C)
    if groups == 0:
        return 1, N * S, 0, block
    return N, S, S * C, block


# ---- forward ----------------------------------------------------------------------------------


def _fwd_impl(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
              running_var: Tensor | None, groups: int, training: bool, eps: float,
              act: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    N, C, S, columns = _shape(x)
    acc = acc_np_dtype(x.dtype)
    rows = C if groups == 0 else N * groups
    y = _pages.empty_like(x)
    stats = [torch.empty(rows, dtype=torch.float64) for _ in range(4)]
    pivot, mean, var, rstd = (s.numpy() for s in stats)
    given = groups == 0 and not training
    if given:
        pivot[:] = running_mean.detach().to(acc_dtype(x.dtype)).double().numpy()
        mean[:] = 0.0
        var[:] = running_var.detach().double().numpy()
        rstd[:] = torch.rsqrt(running_var.detach().to(acc_dtype(x.dtype)) + eps).double().numpy()
    w, b = _param(weight, acc, C, 1.0), _param(bias, acc, C, 0.0)
    xa, ya = _flat(x), _flat(y)
    if not columns and groups:
        split_run(k.seg_fwd, rows, x.numel(), xa, ya, *_seg_geometry(N, C, S, groups), w, b, k.FULL,
                  float(eps), act, pivot, mean, var, rstd)
        return y, *stats
    if not columns and not given and _fwd_by_block(N, C, S, xa.itemsize):
        split_run(k.bn_seg_fwd, C, x.numel(), xa, ya, N, C, S, w, b, float(eps), act, pivot, mean,
                  var, rstd, _channel_block(N, S, xa.itemsize, 1))
        return y, *stats
    if not columns:
        geometry = _seg_geometry(N, C, S, 0)
        if not given:
            # Partial sums per (sample, channel) segment, in memory order, merged per channel.
            if x.dtype == torch.bfloat16:
                pivot[:] = x.detach()[0].reshape(C, S)[:, 0].double().numpy()
            else:  # (the first element of each channel's first segment, read in place)
                pivot[:] = xa[:C * S:S]
            s1p, s2p = np.empty(N * C), np.empty(N * C)
            split_run(k.seg_fwd, N * C, x.numel(), xa, ya, *geometry, w, b, k.SUMS, 0.0, act,
                      _tile(pivot, N), s1p, s2p, s2p)
            _moments(s1p.reshape(1, N, C), s2p.reshape(1, N, C), C, N * S, float(eps), mean, var,
                     rstd)
        mt = _tile(mean, N)  # (also in var's place, which APPLY does not read)
        split_run(k.seg_fwd, N * C, x.numel(), xa, ya, *geometry, w, b, k.APPLY, 0.0, act,
                  _tile(pivot, N), mt, mt, _tile(rstd, N))
        return y, *stats
    N2, R, sample_stride, block = _col_geometry(N, C, S, groups)
    if groups and _per_sample(N):
        split_run(k.col_group_fwd, N, x.numel(), xa, ya, R, sample_stride, block, w, b, float(eps),
                  act, *(s.reshape(N, groups) for s in (pivot, mean, var, rstd)))
        return y, *stats
    cg = 1 if groups == 0 else C // groups  # channels per statistic
    x3 = x.detach().reshape(N, C, S)
    if not given:
        # The pivot of each statistic: the first element of its channel (BatchNorm) or group.
        piv = (x3[:1, :, 0] if groups == 0 else x3[:, ::cg, 0]).to(torch.float64)
        pc = piv.repeat_interleave(cg, 1).numpy().astype(acc)
        s1p, s2p = (np.empty((N2, -(-R // block), C)) for _ in range(2))
        split_run(k.col_sums, N2 * s1p.shape[1], x.numel(), xa, xa, R, sample_stride, block, pc,
                  pc, pc, pc, pc, 0, False, s1p, s2p)
        pivot[:] = piv.reshape(-1).numpy()
        _moments(s1p, s2p, C // cg, R * cg, float(eps), mean, var, rstd)
    piv, mu, _, wc, bc = _coefficients(N2, cg, pivot, mean, rstd, w, b, acc)
    scale = (_per_channel(rstd, N2, cg) * w.astype(np.float64)).astype(acc)
    one = np.ones_like(scale)
    split_run(k.col_out, N2 * -(-R // block), x.numel(), xa, xa, ya, R, sample_stride, block, piv,
              mu, scale, one, bc, one, one, one, act, False)
    return y, *stats


def _moments(s1p: np.ndarray, s2p: np.ndarray, groups: int, n: int, eps: float, mean: np.ndarray,
             var: np.ndarray, rstd: np.ndarray) -> None:
    """The statistics from partial sums ``(N2, blocks, C)`` of ``d = x - pivot`` and ``d^2``,
    merged per (matrix, group) in a fixed order (float64): ``mean`` of d, the biased ``var``
    and ``rstd`` (0 where ``var + eps == 0``), written in place."""
    s1, s2 = (np.empty((s1p.shape[0], groups)) for _ in range(2))
    none = np.empty(0)
    k.merge(s1p, groups, none, s1)
    k.merge(s2p, groups, none, s2)
    # (an inf or nan in the input gives nan statistics, as torch's, without NumPy's warnings)
    with np.errstate(invalid="ignore", over="ignore"):
        mean[:] = s1.reshape(-1) / n
        var[:] = np.maximum(s2.reshape(-1) / n - mean * mean, 0.0)
        v = var + eps
        np.divide(1.0, np.sqrt(v), out=rstd, where=v != 0)
    rstd[v == 0] = 0.0


def _per_channel(stat: np.ndarray, N2: int, cg: int) -> np.ndarray:
    """A per-statistic float64 vector as an ``(N2, C)`` array (each group's value repeated
    over its channels)."""
    return np.ascontiguousarray(np.repeat(stat.reshape(N2, -1), cg, axis=1))


def _coefficients(N2: int, cg: int, pivot: np.ndarray, mean: np.ndarray, rstd: np.ndarray,
                  w: np.ndarray, b: np.ndarray, acc: type) -> tuple[np.ndarray, ...]:
    """``(pivot, mean, rstd, w, b)`` per (matrix, channel), rounded once to ``acc``."""
    per = [_per_channel(s, N2, cg).astype(acc) for s in (pivot, mean, rstd)]
    # (np.tile: a fresh writable array; a read-only one would be another numba specialisation)
    return (*per, np.tile(w, (N2, 1)), np.tile(b, (N2, 1)))


# ---- backward ---------------------------------------------------------------------------------


def _bwd_impl(dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, pivot: Tensor,
              mean: Tensor, rstd: Tensor, groups: int, batch_stats: bool, act: int, want_dx: bool,
              want_dw: bool, want_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    # (x and the statistics as saved; a saved-tensor hook may unpack them in any layout)
    x = _dense(x)
    N, C, S, columns = _shape(x)
    acc = acc_np_dtype(x.dtype)
    dy = _like(dy, x)
    dx = _pages.empty_like(x) if want_dx else x.new_empty(0)
    w, b = _param(weight, acc, C, 1.0), _param(bias, acc, C, 0.0)
    xa, ga, dxa = _flat(x), _flat(dy), _flat(dx)
    p, m, r = (t.detach().contiguous().numpy() for t in (pivot, mean, rstd))
    sums = np.empty((2, 1, C))  # sum(dz), sum(dz * x_hat) per channel
    if not columns:
        _seg_bwd(ga, xa, dxa, N, C, S, groups, w, b, batch_stats, act, p, m, r, acc, sums,
                 want_dx)
    else:
        _col_bwd(ga, xa, dxa, N, C, S, groups, w, b, batch_stats, act, p, m, r, acc, sums,
                 want_dx, want_dw or want_db)
    dw = torch.from_numpy(sums[1, 0].copy()) if want_dw else x.new_empty(0, dtype=torch.float64)
    db = torch.from_numpy(sums[0, 0].copy()) if want_db else x.new_empty(0, dtype=torch.float64)
    return dx, dw, db


def _seg_bwd(ga: np.ndarray, xa: np.ndarray, dxa: np.ndarray, N: int, C: int, S: int, groups: int,
             w: np.ndarray, b: np.ndarray, batch_stats: bool, act: int, p: np.ndarray,
             m: np.ndarray, r: np.ndarray, acc: type, sums: np.ndarray, want_dx: bool) -> None:
    """The NC* backward. GroupNorm: one pass of partial sums per segment and ``dx`` per row.
    BatchNorm: one task per block of channels where a channel fits in cache
    (:func:`_by_channel`), else partial sums per (sample, channel) segment (and ``dx`` with
    given statistics), merged per channel; with batch statistics a second pass for ``dx`` from
    the per-channel coefficients."""
    if groups == 0 and _by_channel(N, C, S, xa.itemsize, 2):
        split_run(k.bn_seg_bwd, C, N * C * S, ga, xa, dxa, N, C, S, w, b, batch_stats, act, p, m,
                  r, sums[0, 0], sums[1, 0], _channel_block(N, S, xa.itemsize, 2))
        return
    geometry = _seg_geometry(N, C, S, groups)
    nseg = geometry[3]
    rows = N * (C if groups == 0 else groups)
    s1p, s2p = np.empty((rows, nseg)), np.empty((rows, nseg))
    none = np.empty(0)
    if groups:
        split_run(k.seg_bwd, rows, rows * nseg * S, ga, xa, dxa, *geometry, w, b, batch_stats, act,
                  p, m, r, np.empty((0, 3)), s1p, s2p)
    else:
        p, m, r = _tile(p, N), _tile(m, N), _tile(r, N)
        first = dxa if not batch_stats else dxa[:0]
        split_run(k.seg_bwd, rows, rows * S, ga, xa, first, *geometry, w, b, False, act, p, m, r,
                  np.empty((0, 3)), s1p, s2p)
    # (N * G, C / G) is (N, C); BatchNorm's (N * C, 1) too: summed over the samples.
    k.merge(s1p.reshape(1, N, C), C, none, sums[0])
    k.merge(s2p.reshape(1, N, C), C, none, sums[1])
    if groups == 0 and batch_stats and want_dx:
        w64, n = w.astype(np.float64), N * S
        rs = r[:C]
        coef = np.stack([rs * w64, -rs * w64 * sums[1, 0] / n, -rs * w64 * sums[0, 0] / n], 1)
        split_run(k.seg_bwd, rows, rows * S, ga, xa, dxa, *geometry, w, b, True, act, p, m, r,
                  np.tile(coef, (N, 1)), s1p, s2p)


def _col_bwd(ga: np.ndarray, xa: np.ndarray, dxa: np.ndarray, N: int, C: int, S: int, groups: int,
             w: np.ndarray, b: np.ndarray, batch_stats: bool, act: int, p: np.ndarray,
             m: np.ndarray, r: np.ndarray, acc: type, sums: np.ndarray, want_dx: bool,
             want_params: bool) -> None:
    """The channels_last backward: partial sums per block, merged per (matrix, channel), then
    the per-channel coefficients of ``dx`` and one more pass for it."""
    N2, R, sample_stride, block = _col_geometry(N, C, S, groups)
    none = np.empty(0)
    if groups and _per_sample(N):
        s1, s2 = np.empty((N, C)), np.empty((N, C))
        split_run(k.col_group_bwd, N, N * C * S, ga, xa, dxa, R, sample_stride, block, w, b,
                  batch_stats, act, *(s.reshape(N, groups) for s in (p, m, r)), s1, s2)
        k.merge(s1.reshape(1, N, C), C, none, sums[0])
        k.merge(s2.reshape(1, N, C), C, none, sums[1])
        return
    cg = 1 if groups == 0 else C // groups
    piv, mu, rs, wc, bc = _coefficients(N2, cg, p, m, r, w, b, acc)
    geometry = (R, sample_stride, block, piv, mu, rs, wc, bc)
    s1 = s2 = np.zeros((N2, C))
    if batch_stats and want_dx or want_params:
        nblk = -(-R // block)
        s1p, s2p = np.empty((N2, nblk, C)), np.empty((N2, nblk, C))
        split_run(k.col_sums, N2 * nblk, N * C * S, ga, xa, *geometry, act, True, s1p, s2p)
        s1, s2 = np.empty((N2, C)), np.empty((N2, C))
        k.merge(s1p, C, none, s1)
        k.merge(s2p, C, none, s2)
        k.merge(s1.reshape(1, N2, C), C, none, sums[0])
        k.merge(s2.reshape(1, N2, C), C, none, sums[1])
    if not want_dx:
        return
    w64 = w.astype(np.float64)
    rstd_c = _per_channel(r, N2, cg)
    k1 = rstd_c * w64
    if batch_stats:
        # The row sums of w * dz and w * dz * x_hat: one per channel (BatchNorm) or group.
        g1, g2 = np.empty((N2, C // cg)), np.empty((N2, C // cg))
        k.merge(s1.reshape(N2, 1, C), C // cg, w64, g1)
        k.merge(s2.reshape(N2, 1, C), C // cg, w64, g2)
        n = R * cg
        k2 = -rstd_c * _per_channel(g2.reshape(-1), N2, cg) / n
        k3 = -rstd_c * _per_channel(g1.reshape(-1), N2, cg) / n
    else:
        k2 = k3 = np.zeros((N2, C))
    split_run(k.col_out, N2 * -(-R // block), N * C * S, ga, xa, dxa, *geometry, k1.astype(acc),
              k2.astype(acc), k3.astype(acc), act, True)


# ---- custom ops: what torch.compile sees -------------------------------------------------------


def _rows(x: Tensor, groups: int) -> int:
    return x.shape[1] if groups == 0 else x.shape[0] * groups


@torch.library.custom_op("normkit_numba::channel_fwd", mutates_args=(), device_types="cpu")
def _fwd_op(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
            running_var: Tensor | None, groups: int, training: bool, eps: float,
            act: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _fwd_impl(x, weight, bias, running_mean, running_var, groups, training, eps, act)


@_fwd_op.register_fake
def _(x, weight, bias, running_mean, running_var, groups, training, eps, act):
    n = _rows(x, groups)
    return (torch.empty_like(x), *(x.new_empty(n, dtype=torch.float64) for _ in range(4)))


@torch.library.custom_op("normkit_numba::channel_bwd", mutates_args=(), device_types="cpu")
def _bwd_op(dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, pivot: Tensor,
            mean: Tensor, rstd: Tensor, groups: int, batch_stats: bool, act: int, want_dx: bool,
            want_dw: bool, want_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _bwd_impl(dy, x, weight, bias, pivot, mean, rstd, groups, batch_stats, act, want_dx,
                     want_dw, want_db)


@_bwd_op.register_fake
def _(dy, x, weight, bias, pivot, mean, rstd, groups, batch_stats, act, want_dx, want_dw, want_db):
    C = x.shape[1]
    return (torch.empty_like(x) if want_dx else x.new_empty(0),
            x.new_empty(C if want_dw else 0, dtype=torch.float64),
            x.new_empty(C if want_db else 0, dtype=torch.float64))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, running_mean, running_var, groups, training, eps, act = inputs
    _, pivot, mean, _, rstd = output
    ctx.save_for_backward(x, weight, bias, pivot, mean, rstd)
    ctx.groups, ctx.batch_stats, ctx.act, ctx.eps = groups, groups != 0 or training, act, eps
    ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)


def _grads(ctx, dy: Tensor, bwd: Callable[..., tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor | None, ...]:
    """The gradients of ``channel_fwd``'s inputs from ``bwd`` (the backward op, or its
    implementation for the eager Function), the parameters' in their own dtypes."""
    x, weight, bias, pivot, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    w_dtype, b_dtype = ctx.dtypes
    dx, dw, db = bwd(dy, x, weight, bias, pivot, mean, rstd, ctx.groups, ctx.batch_stats, ctx.act,
                     bool(need[0]), bool(need[1]), bool(need[2]))
    return (dx if need[0] else None, dw.to(w_dtype) if need[1] else None,
            db.to(b_dtype) if need[2] else None, None, None, None, None, None, None)


def _backward(ctx, dy, *_stats):
    return _grads(ctx, dy, _bwd)


vmap_by_loop(_fwd_op)
vmap_by_loop(_bwd_op)
_fwd, _bwd = autograd_pair(_fwd_op, _setup_context, _backward, _bwd_op, _fwd_impl, _bwd_impl,
                           graph_backward=_graph_backward.channel)


# ---- eager calls: one autograd Function, no custom op ------------------------------------------


def _eager_forward(ctx, *inputs):
    """Forward of the channel norms' eager Function (``channel_fwd``'s inputs and results): the
    op's implementation and ``setup_context``, the statistics without a gradient."""
    out = _fwd_impl(*inputs)
    _setup_context(ctx, inputs, out)
    ctx.mark_non_differentiable(*out[1:])
    ctx.set_materialize_grads(False)
    return out


def _eager_backward(ctx, dy, *_stats):
    if dy is None:  # (only the statistics, which have no gradient, reached the loss)
        return (None,) * 9
    return _grads(ctx, dy, _bwd_impl)


def _eager_graph_backward(ctx, dy, *stats):
    """The eager Function's backward where its kernel cannot run: upstream gradients without
    storage (autograd's vmap of ``is_grads_batched`` and ``jacobian(vectorize=True)``) go to
    the backward op, whose vmap rule runs the kernel per gradient, unless the backward builds a
    graph (double backward, batched or not): that goes to the torch composition."""
    if batched_by_autograd((dy,)) and not torch.is_grad_enabled():
        return _grads(ctx, dy, _bwd_op)
    return _graph_backward.channel(ctx, dy, *stats)


# ``channel_fwd`` for eager calls on plain tensors that autograd records: the kernels under one
# autograd Function, without the custom-op dispatch. torch.func needs the custom ops' Function
# (their vmap rules), and torch.compile and torch.jit.trace record the ops themselves.
_apply_channel_norm = eager_function("ChannelNorm", _eager_forward, _eager_backward, _eager_graph_backward)


def _channel(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
             running_var: Tensor | None, groups: int, training: bool, eps: float,
             act: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``channel_fwd``'s results ``(y, pivot, mean, var, rstd)``: eager calls on plain tensors
    run the kernels directly (under :data:`_apply_channel_norm` where autograd records),
    others go through the custom ops."""
    args = (x, weight, bias, running_mean, running_var, groups, training, eps, act)
    if not eager_plain(x, weight, bias, running_mean, running_var):
        return _fwd(*args)
    if recording(x, weight, bias):
        return _apply_channel_norm(*args)
    return _fwd_impl(*args)


# ---- the norms, with torch.nn.functional's signatures ------------------------------------------


def batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
               weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, act: str | None = None) -> Tensor:
    """``torch.nn.functional.batch_norm``: one statistic per channel over ``(N, *spatial)``.

    Numerics: sums of ``x - pivot`` and its square in float64 per channel, the output in
    float32 (float64 for float64 input; bf16 rounded once); the biased variance normalizes and
    the unbiased one (``n / (n - 1)``) enters ``running_var``, ``running = (1 - momentum) *
    running + momentum * batch`` in the running statistics' accumulation dtype, both or
    neither written (:func:`normkit.numerics.update_running_stats`). ``momentum`` is a float
    (the modules turn ``momentum=None`` into the cumulative factor). ``act`` (``"relu"``,
    ``"silu"``, ``"gelu"``, None) is applied before the store; the backward recomputes it.
    """
    if input.numel() == 0:
        # Nothing to compute: the reference's empty output (connected to the parameters, whose
        # gradients are zeros), the running statistics untouched, as ATen.
        return reference.batch_norm(input, running_mean, running_var, weight, bias, training,
                                    momentum, eps)
    check_saveable((input, weight, bias), (input, weight, running_mean, running_var))
    x = _dense(input)
    if training:
        refuse_forward_ad_early(refuse_forward_ad, input, weight, bias)
    y, pivot, mean, var, _ = _channel(x, weight, bias, running_mean, running_var, 0, bool(training),
                                      float(eps), ACT_CODES[act])
    if training and (running_mean is not None or running_var is not None):
        n = input.numel() // input.shape[1]
        dtype = acc_dtype(input.dtype)
        update_running_stats(running_mean, running_var, (pivot + mean).to(dtype),
                             unbiased(var, n).to(dtype), float(momentum))
    return y


def batch_norm_act(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                   weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
                   momentum: float = 0.1, eps: float = 1e-5, act: str | None = "relu") -> Tensor:
    """``act(batch_norm(...))`` in one pass each way (see :func:`batch_norm`)."""
    return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, act)


def group_norm(input: Tensor, num_groups: int, weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5, act: str | None = None) -> Tensor:
    """``torch.nn.functional.group_norm``: one statistic per (sample, group), over the group's
    channels and the spatial axes. Numerics as :func:`batch_norm`; a sample's output and input
    gradient do not depend on the other samples (its sums run in an order fixed by C, G and
    the spatial size)."""
    return _channel(_dense(input), weight, bias, None, None, int(num_groups), True, float(eps),
                    ACT_CODES[act])[0]


def group_norm_act(input: Tensor, num_groups: int, weight: Tensor | None = None,
                   bias: Tensor | None = None, eps: float = 1e-5, act: str | None = "silu") -> Tensor:
    """``act(group_norm(...))`` in one pass each way."""
    return group_norm(input, num_groups, weight, bias, eps, act)


def instance_norm(input: Tensor, running_mean: Tensor | None = None, running_var: Tensor | None = None,
                  weight: Tensor | None = None, bias: Tensor | None = None, use_input_stats: bool = True,
                  momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """``torch.nn.functional.instance_norm`` with ``use_input_stats=True``: GroupNorm with one
    channel per group. Running statistics, when given, move towards the batch average of the
    per-instance mean and unbiased variance (as torch), both or neither written."""
    N, C = input.shape[:2]
    x = _dense(input)
    if running_mean is not None or running_var is not None:
        refuse_forward_ad_early(refuse_forward_ad, input, weight, bias)
    y, pivot, mean, var, _ = _channel(x, weight, bias, None, None, C, True, float(eps), 0)
    if running_mean is not None or running_var is not None:
        n = input[0, 0].numel()
        dtype = acc_dtype(input.dtype)
        # (torch ops, not NumPy: torch.jit.trace records them and torch.func's wrappers take them)
        with torch.no_grad():
            batch_mean = (pivot + mean).reshape(N, C).mean(0)
            batch_var = unbiased(var, n).reshape(N, C).mean(0)
        update_running_stats(running_mean, running_var, batch_mean.to(dtype), batch_var.to(dtype),
                             float(momentum), inference_ok=False)
    return y


# ---- what the kernels decline -----------------------------------------------------------------

# CPU tensors of float32, float64 or bfloat16 (float16 declined), empty input only for
# BatchNorm, no use_input_stats=False: the backend entry's checks, which say so without numba.
UNSUPPORTED: dict[str, Callable[..., str | None]] = dict(_CHANNEL_OPS)
