"""BatchNorm in Triton: launchers, ``torch.library`` custom ops, autograd and the public
:func:`batch_norm` / :func:`batch_norm_act`.

The kernels and the ``(N*S, C)`` matrix view they read both layouts through are in
:mod:`normkit.ops.triton.batch_norm_kernels`. A training step is six launches and nothing
between them: the statistics (a reducing kernel, then one finalize kernel that merges its
per-program partials, forms the normalization's per-channel coefficients and updates the
running statistics), the normalization, and in the backward a reducing kernel, its finalize
kernel and an applying one. Eval mode forms its coefficients from the running statistics
with a few torch ops.

Determinism: no atomics. Partials are merged by the finalize kernels in a fixed order over
the ``[P, C]`` buffers (P depends only on the shape and the device), so a call gives the same
bits on every run. The P partial (count, mean, M2) are merged in one step with the k-way form
of Chan's formula, ``M2 = sum(M2_p) + sum(n_p * (mean_p - mean)^2)``: deviations are of
partial means from the global mean, never ``E[x^2] - E[x]^2``. The merge runs in units of the
largest partial scale; the variance is scaled back in float64, since at ``|x| ~ 1e20`` it
exceeds fp32 while rstd does not.

Running statistics: the policy is :mod:`normkit.numerics`' (the momentum factor, Bessel's
correction, fp32 arithmetic rounded once to the statistics' dtype, all or none); the finalize
kernel does its arithmetic in the same order, so fp32 running statistics get the bits
:func:`normkit.numerics.update_running_stats` would give. Statistics that share memory are
written by that function itself, in ATen's loop order (:func:`batch_norm_stats`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from normkit._checks import VMAP_SHARED_RUNNING_STATS
from normkit.numerics import _shares_memory, update_running_stats
from normkit.ops.triton import _graph_backward
from normkit.ops.triton._launch import (
    BLOCK_ENV_VAR,
    FP_FUSION,
    block_override,
    cdiv,
    check_saveable,
    device_of,
    eager_and_compiled,
    eager_direct,
    interpreted,
    next_power_of_2,
    refuse_forward_ad_early,
    strides,
    vmap_by_loop,
)
from normkit.ops.triton.batch_norm_kernels import (
    batch_norm_apply_kernel,
    batch_norm_bwd_apply_kernel,
    batch_norm_bwd_finalize_kernel,
    batch_norm_bwd_reduce_kernel,
    batch_norm_finalize_kernel,
    batch_norm_stats_kernel,
)
from normkit.ops.triton.jit_helpers import ACT_CODES
from normkit.ops.triton.occupancy import resident_programs

__all__ = [
    "BLOCK_ENV_VAR",
    "batch_norm",
    "batch_norm_act",
    "batch_norm_bwd",
    "batch_norm_fwd",
    "batch_norm_stats",
]

# The tile is BLOCK_M * BLOCK_C elements; BLOCK_ENV_VAR caps it, as for the row norms.
TILE = 4096
# Channels per tile: a channels-last row of 64 channels is 128-256 contiguous bytes; an NC*
# channel is contiguous along the rows, so few channels and long row runs.
BLOCK_C_MAX = {"columns": 64, "segments": 4}
# The finalize kernel's tile: partials x channels (P is a few per SM, C up to thousands).
FINALIZE_BLOCK_P, FINALIZE_BLOCK_C = 16, 64


# ---------------------------------------------------------------------------------------------
# Launchers


class _Blocks(NamedTuple):
    BLOCK_M: int
    BLOCK_C: int
    num_warps: int
    SPATIAL: bool  # tiles are (sample, spatial block): see batch_norm_kernels._tile
    ALIGN: int = 1  # elements of a 16-byte vector where runs start unaligned, else 1
    FLAT: bool = False  # the elementwise kernels' flat blocks (batch_norm_kernels._flat)


# Triton specializes an integer argument on divisibility by 16 only: a channel's run (stride S)
# is provably 16-byte aligned when S is a multiple of 16 elements, whatever the dtype.
PROVABLE = 16
# A flat block, on 8 warps: 8 elements a thread, one 16-byte vector of bf16. Each element gathers
# up to six per-channel coefficients, held in registers beside it: 16 elements a thread took 128
# registers in the backward (sm_90), 8 take 74 (make kernel-report).
FLAT_TILE = 2048
# fp32 holds integers exactly up to here: the flat kernels' channel arithmetic stays below it.
FLAT_LIMIT = 2**24


def _channel_view(t: Tensor) -> Tensor:
    """``t`` as ``(N, C, S)``: a view for NC*, channels_last(_3d) and sliced inputs alike."""
    return t.reshape(t.shape[0], t.shape[1], -1)


def _empty_out(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An output in x's memory format (channels_last stays channels_last), or contiguous when
    that format's spatial axes do not merge into one stride."""
    out = torch.empty_like(x, dtype=dtype)
    try:
        out.view(x.shape[0], x.shape[1], -1)
    except RuntimeError:
        out = torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device)
    return out


def _blocks(x3: Tensor, block_n: int | None) -> _Blocks:
    N, C, S = x3.shape
    tile = block_override(block_n) or TILE
    columns = S == 1 or x3.stride(1) < x3.stride(2)  # channels are the fast axis
    if not columns and x3.stride(2) == 1:
        # NC*: a tile is a run of one sample's spatial positions (as long as fits, so
        # 56x56 keeps 1024-long runs) times as many channels as fill the tile (7x7: 64).
        # An aligned window (runs of S elements starting unaligned) is up to ALIGN - 1 longer,
        # and its per-lane masks and per-channel counts take registers: half the tile, 8
        # elements a thread (16 took 135-165 registers in the statistics kernel at 14x14, sm_90).
        align = 16 // x3.element_size() if S % PROVABLE and _aligned(x3) else 1
        per_warp = 512 if align == 1 else 256
        if align > 1:
            tile = max(1, tile // 2)
        block_m = min(next_power_of_2(S + align - 1), max(1, tile // BLOCK_C_MAX["segments"]))
        block_c = min(next_power_of_2(C), max(1, tile // block_m), BLOCK_C_MAX["columns"])
        return _Blocks(block_m, block_c, min(max(block_m * block_c // per_warp, 1), 8), True, align)
    block_c = min(next_power_of_2(C), BLOCK_C_MAX["columns" if columns else "segments"],
                  tile)
    block_m = min(next_power_of_2(N * S), max(1, tile // block_c))
    return _Blocks(block_m, block_c, min(max(block_m * block_c // 512, 1), 8), False)


def _tiles(x3: Tensor, blocks: _Blocks) -> tuple[int, int]:
    """(tiles along the rows, spatial blocks per sample): the kernels' row-tile index space (an
    aligned window is up to ALIGN - 1 elements longer than the run)."""
    N, C, S = x3.shape
    if blocks.FLAT:
        return cdiv(N * C * S, blocks.BLOCK_M), 1
    if blocks.SPATIAL:
        s_blocks = cdiv(S + blocks.ALIGN - 1, blocks.BLOCK_M)
        return N * s_blocks, s_blocks
    return cdiv(N * S, blocks.BLOCK_M), 1


def _aligned(t: Tensor) -> bool:
    """``t`` starts on a 16-byte boundary: then an aligned window's vectors lie in the 16-byte
    chunks that hold ``t``'s own elements (an allocation is never smaller than its chunks), so
    reading them never leaves the allocation."""
    return t.data_ptr() % 16 == 0


def _aligned_for(blocks: _Blocks, x3: Tensor, *others: Tensor) -> _Blocks:
    """``blocks`` for a reducing kernel reading ``others`` beside ``x3``: the aligned window
    only where they share x's strides and element size (one window serves all)."""
    if all(t.stride() == x3.stride() and t.element_size() == x3.element_size() and _aligned(t)
           for t in others):
        return blocks
    return blocks._replace(ALIGN=1)


def _flat_for(blocks: _Blocks, block_n: int | None, *tensors: Tensor) -> _Blocks:
    """``blocks`` for an elementwise kernel over ``tensors``: flat blocks (whole vectors at any
    S) where the runs start unaligned and every tensor is contiguous NC*, else ``blocks``' tiles
    (the elementwise kernels have no aligned window: their stores must not touch a neighbour)."""
    N, C, S = tensors[0].shape
    block = min(block_override(block_n) or FLAT_TILE, next_power_of_2(N * C * S))
    if (blocks.ALIGN == 1 or not all(t.is_contiguous() for t in tensors)
            or max(S, C) + block > FLAT_LIMIT):
        return blocks._replace(ALIGN=1)
    return _Blocks(block, 1, min(max(block // 256, 1), 8), True, 1, True)


def _row_split(tiles: int, c_blocks: int, num_warps: int, device: torch.device) -> tuple[int, int]:
    """(programs along the rows, tiles per program) of the reducing kernels: one wave of
    resident programs in all (:mod:`~normkit.ops.triton.occupancy`), each walking whole tiles;
    on the CPU interpreter, a handful."""
    resident = resident_programs(device, num_warps)
    target = 4 if resident is None else max(1, resident // c_blocks)
    tiles_per_program = cdiv(tiles, min(tiles, target))
    return cdiv(tiles, tiles_per_program), tiles_per_program


def _apply(x3: Tensor, y3: Tensor, centre: Tensor, scale: Tensor, shift: Tensor,
           blocks: _Blocks, act: int, block_n: int | None) -> None:
    N, C, S = x3.shape
    blocks = _flat_for(blocks, block_n, x3, y3)
    tiles, s_blocks = _tiles(x3, blocks)
    grid = (tiles, 1 if blocks.FLAT else cdiv(C, blocks.BLOCK_C))
    batch_norm_apply_kernel[grid](
        x3, y3, centre, scale, shift, N * S, C, S, *strides(x3), *strides(y3), s_blocks, N * C * S,
        ACT=act, SPATIAL=blocks.SPATIAL, FLAT=blocks.FLAT, BLOCK_M=blocks.BLOCK_M,
        BLOCK_C=blocks.BLOCK_C, RNE_BY_HAND=interpreted(),
        num_warps=blocks.num_warps, enable_fp_fusion=FP_FUSION,
    )


class BatchStats(NamedTuple):
    """What a training call's statistics give its normalization and backward, per channel,
    fp32: ``centre = [pivot; mean]`` of shape ``(2, C)`` (a pivot element of each channel and
    the mean of ``x - pivot``), ``rstd``, and the affine coefficients ``scale = w * rstd`` and
    ``shift = b`` of ``y = ((x - pivot) - mean) * scale + shift``."""

    centre: Tensor
    rstd: Tensor
    scale: Tensor
    shift: Tensor


def _running_arg(running: Tensor | None, C: int) -> tuple[Tensor | None, int]:
    """A running statistic as the finalize kernel writes it: a 1-D view and its stride (a
    buffer of another shape with C elements is viewed flat, as ATen's kernel does). The size
    is checked here, before any launch, so that a bad call writes nothing."""
    if running is None:
        return None, 0
    if running.numel() != C:
        raise RuntimeError(f"running statistics should contain {C} elements not {running.numel()}")
    flat = running if running.dim() == 1 else running.view(-1)
    return flat, flat.stride(0)


def batch_norm_stats(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
    running_var: Tensor | None, momentum: float, eps: float, block_n: int | None = None,
) -> BatchStats:
    """The batch's statistics and the normalization's coefficients (:class:`BatchStats`); the
    running statistics, when given, are updated in place by the same launch that finishes
    the statistics (``momentum`` is the factor: the modules turn ``momentum=None`` into
    :func:`normkit.numerics.momentum_factor`). Two launches in all."""
    x3 = _channel_view(x)
    N, C, S = x3.shape
    M = N * S
    dev = x.device
    # Every check before the first launch: a failed call writes nothing.
    rm, stride_rm = _running_arg(running_mean, C)
    rv, stride_rv = _running_arg(running_var, C)
    blocks = _blocks(x3, block_n)
    c_blocks = cdiv(C, blocks.BLOCK_C)
    tiles, s_blocks = _tiles(x3, blocks)
    programs, tiles_per_program = _row_split(tiles, c_blocks, blocks.num_warps, dev)
    mean_part = torch.empty((programs, C), dtype=torch.float32, device=dev)
    m2_part = torch.empty_like(mean_part)
    scale_part = torch.empty_like(mean_part)
    counts = torch.empty_like(mean_part)
    with device_of(x):
        batch_norm_stats_kernel[(programs, c_blocks)](
            x3, mean_part, m2_part, scale_part, counts, M, C, S, *strides(x3), tiles,
            s_blocks, tiles_per_program, SPATIAL=blocks.SPATIAL, ALIGN=blocks.ALIGN,
            BLOCK_M=blocks.BLOCK_M, BLOCK_C=blocks.BLOCK_C, num_warps=blocks.num_warps,
            enable_fp_fusion=FP_FUSION,
        )
    centre = torch.empty((2, C), dtype=torch.float32, device=dev)
    rstd, scale, shift = (torch.empty((C,), dtype=torch.float32, device=dev) for _ in range(3))
    block_c = min(next_power_of_2(C), FINALIZE_BLOCK_C)
    momentum = float(momentum)
    keep = 1.0 - momentum  # (both rounded to fp32 by the launch, as ATen's scalars)
    # Statistics that share memory (one tensor as both, an expand-ed one) are updated in ATen's
    # loop order, which parallel programs cannot keep: the kernel then writes the batch's values
    # (momentum 1; keep -0.0 so that 0 * keep adds nothing, not even to a -0.0) to a scratch
    # buffer, and numerics writes them channel by channel with the kernel's arithmetic.
    shared = _shares_memory([t for t in (rm, rv) if t is not None])
    if shared:
        batch = torch.zeros((2, C), dtype=torch.float32, device=dev)
        k_rm, k_rv, k_stride_rm, k_stride_rv, k_momentum, k_keep = batch[0], batch[1], 1, 1, 1.0, -0.0
    else:
        k_rm, k_rv, k_stride_rm, k_stride_rv, k_momentum, k_keep = rm, rv, stride_rm, stride_rv, momentum, keep
    with device_of(x):
        batch_norm_finalize_kernel[(cdiv(C, block_c),)](
            mean_part, m2_part, scale_part, counts, x3, weight, bias, centre, rstd, scale, shift,
            k_rm, k_rv, programs, C, M, x3.stride(1), _stride0(weight), _stride0(bias), k_stride_rm,
            k_stride_rv, eps, k_momentum, k_keep,
            HAS_W=weight is not None, HAS_B=bias is not None, UPDATE_MEAN=rm is not None,
            UPDATE_VAR=rv is not None,
            BLOCK_P=min(next_power_of_2(programs), FINALIZE_BLOCK_P), BLOCK_C=block_c,
            RNE_BY_HAND=interpreted(), enable_fp_fusion=FP_FUSION,
        )
    if shared:
        update_running_stats(rm, rv, batch[0], batch[1], momentum)
    return BatchStats(centre, rstd, scale, shift)


def _stride0(t: Tensor | None) -> int:
    return 0 if t is None else t.stride(0)


def _scale_shift(weight: Tensor | None, bias: Tensor | None,
                 rstd: Tensor) -> tuple[Tensor, Tensor]:
    """Eval mode's per-channel fp32 ``(w * rstd, b)`` (training's come from the finalize
    kernel), dense: the kernels read them at unit stride; a parameter may be a strided or
    expanded view."""
    scale = rstd if weight is None else rstd * weight.float()
    shift = torch.zeros_like(rstd) if bias is None else bias.float()
    return scale.contiguous(), shift.contiguous()


def batch_norm_fwd(
    x: Tensor, centre: Tensor, scale: Tensor, shift: Tensor, act: int = 0,
    block_n: int | None = None,
) -> Tensor:
    """``y = act((x - mean) * scale + shift)`` in x's memory format, with ``x - mean`` formed
    as ``(x - centre[0]) - centre[1]`` (see :class:`BatchStats`)."""
    x3 = _channel_view(x)
    y = _empty_out(x)
    with device_of(x):
        _apply(x3, _channel_view(y), centre, scale, shift, _blocks(x3, block_n), act, block_n)
    return y


def batch_norm_bwd(
    dy: Tensor, x: Tensor, centre: Tensor, rstd: Tensor, scale: Tensor, shift: Tensor,
    batch_stats: bool, need_dx: bool, dw_dtype: torch.dtype | None,
    db_dtype: torch.dtype | None, act: int = 0, block_n: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dw, db)``; one not asked for (``need_dx`` False, dtype None) comes back empty.
    ``scale`` and ``shift`` are the forward's (:class:`BatchStats`); ``shift`` is read only
    with an activation ``act``, whose input the kernels recompute."""
    x3, dy3 = _channel_view(x), _channel_view(dy)
    N, C, S = x3.shape
    M = N * S
    dev = x.device
    blocks = _blocks(x3, block_n)
    c_blocks = cdiv(C, blocks.BLOCK_C)

    def empty(dtype: torch.dtype = torch.float32) -> Tensor:  # fresh: outputs may not alias
        return torch.empty((0,), dtype=dtype, device=dev)

    mean_dy = mean_dy_xhat = empty()
    dw = empty() if dw_dtype is None else torch.empty((C,), dtype=dw_dtype, device=dev)
    db = empty() if db_dtype is None else torch.empty((C,), dtype=db_dtype, device=dev)
    if batch_stats and need_dx or dw_dtype is not None or db_dtype is not None:
        reduce_blocks = _aligned_for(blocks, x3, dy3)
        tiles, s_blocks = _tiles(x3, reduce_blocks)
        programs, tiles_per_program = _row_split(tiles, c_blocks, blocks.num_warps, dev)
        sum_dy_part = torch.empty((programs, C), dtype=torch.float32, device=dev)
        sum_dy_xhat_part = torch.empty_like(sum_dy_part)
        with device_of(x):
            batch_norm_bwd_reduce_kernel[(programs, c_blocks)](
                x3, dy3, centre, rstd, scale, shift, sum_dy_part, sum_dy_xhat_part, M, C, S,
                *strides(x3), *strides(dy3), tiles, s_blocks, tiles_per_program,
                ACT=act, SPATIAL=blocks.SPATIAL, ALIGN=reduce_blocks.ALIGN, BLOCK_M=blocks.BLOCK_M,
                BLOCK_C=blocks.BLOCK_C, num_warps=blocks.num_warps, enable_fp_fusion=FP_FUSION,
            )
        # The partials summed in a fixed order (the same partials give the same bits on every
        # run): the means for dx, dw and db, in one launch.
        means = batch_stats and need_dx
        if means:
            mean_dy, mean_dy_xhat = (torch.empty((C,), dtype=torch.float32, device=dev) for _ in range(2))
        block_c = min(next_power_of_2(C), FINALIZE_BLOCK_C)
        with device_of(x):
            batch_norm_bwd_finalize_kernel[(cdiv(C, block_c),)](
                sum_dy_part, sum_dy_xhat_part, mean_dy, mean_dy_xhat, dw, db, programs, C, M,
                MEANS=means, COMPUTE_DW=dw_dtype is not None, COMPUTE_DB=db_dtype is not None,
                BLOCK_P=min(next_power_of_2(programs), FINALIZE_BLOCK_P), BLOCK_C=block_c,
                RNE_BY_HAND=interpreted(), enable_fp_fusion=FP_FUSION,
            )
    dx = empty(x.dtype)
    if need_dx:
        dx = _empty_out(x)
        dx3 = _channel_view(dx)
        apply_blocks = _flat_for(blocks, block_n, x3, dy3, dx3)
        tiles, s_blocks = _tiles(x3, apply_blocks)
        grid = (tiles, 1 if apply_blocks.FLAT else c_blocks)
        with device_of(x):
            batch_norm_bwd_apply_kernel[grid](
                x3, dy3, dx3, centre, rstd, scale, shift, mean_dy, mean_dy_xhat, M, C, S,
                *strides(x3), *strides(dy3), *strides(dx3), s_blocks, N * C * S,
                BATCH_STATS=batch_stats, ACT=act, SPATIAL=blocks.SPATIAL, FLAT=apply_blocks.FLAT,
                BLOCK_M=apply_blocks.BLOCK_M, BLOCK_C=apply_blocks.BLOCK_C, RNE_BY_HAND=interpreted(),
                num_warps=apply_blocks.num_warps, enable_fp_fusion=FP_FUSION,
            )
    return dx, dw, db


# ---------------------------------------------------------------------------------------------
# Custom ops: what torch.compile sees. Two forward ops, because a custom op that mutates its
# inputs cannot carry an autograd formula: ``batch_norm_stats`` (the batch statistics, and the
# in-place running-statistics update; it sees a detached input) and ``batch_norm_fwd`` (the
# normalization, differentiable; its backward accounts for the statistics' dependence on x).


@torch.library.custom_op("normkit::batch_norm_stats", mutates_args=("running_mean", "running_var"))
def _batch_norm_stats_op(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
    running_var: Tensor | None, momentum: float, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(batch_norm_stats(x, weight, bias, running_mean, running_var, momentum, eps))


@_batch_norm_stats_op.register_fake
def _(x, weight, bias, running_mean, running_var, momentum, eps):
    C = x.shape[1]
    return x.new_empty((2, C), dtype=torch.float32), *(x.new_empty((C,), dtype=torch.float32)
                                                       for _ in range(3))


@torch.library.custom_op("normkit::batch_norm_fwd", mutates_args=())
def _batch_norm_fwd_op(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, centre: Tensor, rstd: Tensor,
    scale: Tensor, shift: Tensor, batch_stats: bool, act: int,
) -> Tensor:
    # weight and bias enter through scale and shift; they are inputs for their gradients.
    return batch_norm_fwd(x, centre, scale, shift, act)


@_batch_norm_fwd_op.register_fake
def _(x, weight, bias, centre, rstd, scale, shift, batch_stats, act):
    return _empty_out(x)


@torch.library.custom_op("normkit::batch_norm_bwd", mutates_args=())
def _batch_norm_bwd_op(
    dy: Tensor, x: Tensor, centre: Tensor, rstd: Tensor, scale: Tensor, shift: Tensor,
    batch_stats: bool, need_dx: bool, dw_dtype: torch.dtype | None,
    db_dtype: torch.dtype | None, act: int,
) -> tuple[Tensor, Tensor, Tensor]:
    return batch_norm_bwd(dy, x, centre, rstd, scale, shift, batch_stats, need_dx, dw_dtype,
                          db_dtype, act)


@_batch_norm_bwd_op.register_fake
def _(dy, x, centre, rstd, scale, shift, batch_stats, need_dx, dw_dtype, db_dtype, act):
    C = x.shape[1]
    dx = _empty_out(x) if need_dx else x.new_empty((0,))

    def grad(dtype: torch.dtype | None) -> Tensor:
        return x.new_empty((C,) if dtype is not None else (0,), dtype=dtype or torch.float32)

    return dx, grad(dw_dtype), grad(db_dtype)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, centre, rstd, scale, shift, batch_stats, act = inputs
    # weight (and bias, read with an activation) for the graph-building backward; the kernels
    # read scale and shift.
    ctx.save_for_backward(x, weight, bias if act else None, centre, rstd, scale, shift)
    ctx.batch_stats, ctx.act = batch_stats, act
    ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)


def _backward(ctx, dy):
    x, _, _, centre, rstd, scale, shift = ctx.saved_tensors
    w_dtype, b_dtype = ctx.dtypes
    need = ctx.needs_input_grad
    dx, dw, db = _batch_norm_backward(dy, x, centre, rstd, scale, shift, ctx.batch_stats,
                                      need[0], w_dtype if need[1] else None,
                                      b_dtype if need[2] else None, ctx.act)
    return (dx if need[0] else None, dw if need[1] else None, db if need[2] else None,
            None, None, None, None, None, None)


torch.library.register_autograd("normkit::batch_norm_fwd", _backward, setup_context=_setup_context)
vmap_by_loop(_batch_norm_fwd_op)
vmap_by_loop(_batch_norm_bwd_op)
_batch_norm, _batch_norm_backward = eager_and_compiled(_batch_norm_fwd_op, _setup_context, _backward,
                                                       _batch_norm_bwd_op, graph_backward=_graph_backward.batch)


def _batch_norm_stats_vmap(info, in_dims, x, weight, bias, running_mean, running_var, momentum,
                           eps):
    """vmap of the statistics: each batch element's own, as torch; running statistics are
    updated per element only when they are batched too (torch's rule and message)."""
    x_dim, mean_dim, var_dim = in_dims[0], in_dims[3], in_dims[4]
    if x_dim is not None and any(r is not None and d is None for r, d in
                                 ((running_mean, mean_dim), (running_var, var_dim))):
        raise RuntimeError(VMAP_SHARED_RUNNING_STATS)
    def pick(t: Tensor | None, d: int | None, i: int) -> Tensor | None:
        return t if t is None or d is None else t.select(d, i)

    tensors = (x, weight, bias, running_mean, running_var)
    out = [_batch_norm_stats_op(*(pick(t, d, i) for t, d in zip(tensors, in_dims[:5], strict=True)),
                                momentum, eps)
           for i in range(info.batch_size)]
    return tuple(torch.stack(o) for o in zip(*out, strict=True)), (0, 0, 0, 0)


torch.library.register_vmap(_batch_norm_stats_op, _batch_norm_stats_vmap)


def batch_norm(
    input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
    weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
    momentum: float = 0.1, eps: float = 1e-5, act: str | None = None,
) -> Tensor:
    """``torch.nn.functional.batch_norm`` in Triton: statistics per channel over ``(N, *spatial)``.

    Numerics: statistics in fp32 whatever the input dtype (partial Welford of ``x - pivot`` in
    power-of-two scaled units, merged with Chan's formula); the biased variance normalizes, the
    unbiased one (``M2 / (n - 1)``) enters ``running_var``; ``running = momentum * batch +
    (1 - momentum) * running``, computed in fp32 and stored in the running statistics' dtype
    (inf where the variance exceeds fp32, as ATen; never NaN for finite input). ``rstd = 0``
    where ``var + eps == 0``. Nothing is written unless the whole call can succeed: the
    running statistics are written last, all or none, and an inference tensor that autograd
    would have to save raises autograd's error first (inference-tensor running statistics are
    otherwise updated, as ATen's kernel does). ``momentum`` is a float (the modules turn
    ``momentum=None`` into ``1 / (batches + 1)``). Arguments are trusted: validated by
    :mod:`normkit.functional` and accepted by the backend's ``unsupported`` check.

    ``act`` (``"relu"``, ``"silu"``, ``"gelu"`` or None) applies an activation in the same pass:
    ``act(batch_norm(...))`` without storing the normalized tensor (:func:`batch_norm_act`).
    """
    if input.numel() == 0:
        return _empty_batch(input, weight, bias)
    # What ATen's batch_norm saves for its backward, checked before the running update.
    check_saveable((input, weight, bias), (input, weight, running_mean, running_var))
    if training:
        refuse_forward_ad_early(input, weight, bias)
        # Eager calls skip the dispatcher: its inputs are detached, so the op adds nothing
        # but its cost there (about 60 us with the launches mocked).
        stats = batch_norm_stats if eager_direct() else _batch_norm_stats_op
        centre, rstd, scale, shift = stats(
            input.detach(), _detached(weight), _detached(bias), running_mean, running_var,
            float(momentum), float(eps))
    else:
        mean = running_mean.detach().float()
        centre = torch.stack([mean, torch.zeros_like(mean)])
        rstd = torch.rsqrt(running_var.detach().float() + eps)
        scale, shift = _scale_shift(_detached(weight), _detached(bias), rstd)
    return _batch_norm(input, weight, bias, centre, rstd, scale, shift, bool(training),
                       ACT_CODES[act])


def _detached(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def batch_norm_act(
    input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
    weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
    momentum: float = 0.1, eps: float = 1e-5, act: str | None = "relu",
) -> Tensor:
    """``act(batch_norm(...))`` in one pass each way (see :func:`batch_norm`)."""
    return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, act)


def _empty_batch(input: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """What ATen gives for an input with no elements: an empty output still connected to the
    parameters (their gradients are zeros), and no running-statistics update. Like ATen it
    reads one element of each parameter only (so it checks no shape)."""
    out = input.clone()
    if weight is not None:
        out = out * weight[0]
    if bias is not None:
        out = out + bias[0]
    return out
