"""Launchers, ``torch.library`` custom ops and the public Triton norms.

Every norm here is one call of the two custom ops over an ``(N, C, S)`` strided view whose
rows are (sample, group) pairs of ``R = C / groups`` channels (see
:mod:`normkit.ops.triton.row_norm_kernels`): ``(M, 1, L)`` for LayerNorm and RMSNorm, ``(N, C,
prod(spatial))`` for GroupNorm and InstanceNorm, contiguous or channels_last alike:

* ``normkit::row_norm_fwd(x, residual, weight, bias, ...) -> (y, residual_out, mean, rstd, var)``
* ``normkit::row_norm_bwd(dy, x, weight, bias, mean, rstd, dresidual_out, ...) -> (dx, dresidual, dw, db)``

Both ops have fake (meta) implementations, so ``torch.compile(fullgraph=True)`` traces through
a norm without a graph break; the kernels stay opaque to the compiler. The norms call the
forward through an ``autograd.Function`` (``_launch.eager_and_compiled``) whose backward is the second op:
unlike ``torch.library.register_autograd`` alone, it works under ``torch.func`` (``grad``,
``vjp``, ``jacrev``; ``vmap`` through the ops' batching rules) and refuses forward-mode AD
with an error where a bare custom op would return zero tangents.

The public functions (:func:`layer_norm`, :func:`rms_norm`, :func:`group_norm`,
:func:`instance_norm`, :func:`add_layer_norm`, :func:`add_rms_norm`, and
:func:`group_norm_act`, GroupNorm followed by an activation in the same pass) take
``torch.nn.functional``'s arguments and trust them: :mod:`normkit.functional` validates them
and the backend's ``unsupported`` check (:mod:`normkit.ops.triton.backend`) has accepted the call.

GroupNorm and InstanceNorm on channels_last input go to :mod:`normkit.ops.triton.channels_last`
instead (a block of whole groups per program, channels the tile's fast axis); the ops and their
outputs are the same.

Tile size: a row of up to :data:`SINGLE_TILE` elements is one tile; a wider row takes the
chunked two-pass path in tiles of :data:`CHUNK_TILE`. ``block_n=`` on the launchers, or the
``NORMKIT_TRITON_BLOCK_N`` environment variable read at each launch, sets both (a power of two),
which is how the tests reach the chunked path with small rows.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from normkit._checks import VMAP_SHARED_RUNNING_STATS
from normkit.numerics import rms_eps, unbiased, update_running_stats
from normkit.ops.triton import _graph_backward, channels_last
from normkit.ops.triton._launch import (
    BLOCK_ENV_VAR,
    FP_FUSION,
    block_override,
    cdiv,
    dense,
    device_of,
    eager_and_compiled,
    interpreted,
    next_power_of_2,
    strides,
    vmap_by_loop,
)
from normkit.ops.triton.jit_helpers import ACT_CODES
from normkit.ops.triton.occupancy import resident_programs
from normkit.ops.triton.row_norm_kernels import row_norm_bwd_kernel, row_norm_fwd_kernel

__all__ = [
    "BLOCK_ENV_VAR",
    "CHUNK_TILE",
    "SINGLE_TILE",
    "AddNormOutput",
    "add_layer_norm",
    "add_rms_norm",
    "group_norm",
    "group_norm_act",
    "instance_norm",
    "layer_norm",
    "rms_norm",
    "row_norm_bwd",
    "row_norm_fwd",
]


# Tile sizes in elements. A row of up to SINGLE_TILE elements is held in registers whole and
# read once; a wider row streams through CHUNK_TILE-sized tiles and is read twice. The backward
# keeps five fp32 tiles live (x_hat, dy, w and the dw/db column sums), so it gets half the
# forward's width, and half again for fp32 inputs. Compiled for sm_90 with Triton's bundled
# ptxas and its own flags, no tile spills (make kernel-report: benchmarks/results/
# sm90_static.md); the cost of the widest tiles is occupancy, one 16-warp CTA per SM. Whether
# that beats reading the row twice is for benchmarks/bench_norms.py on a GPU to say.
SINGLE_TILE = {"fwd": 16384, "bwd": 8192}
CHUNK_TILE = 4096


class AddNormOutput(NamedTuple):
    y: Tensor  # norm(residual_out), in x's dtype
    residual_out: Tensor  # x + residual, in residual_dtype


class _Blocks(NamedTuple):
    BLOCK_R: int
    BLOCK_S: int
    SINGLE_BLOCK: bool
    num_warps: int


def _blocks(R: int, S: int, direction: str, element_size: int, block_n: int | None,
            channels_fast: bool = False) -> _Blocks:
    """Tile shape for rows of R segments of S elements: as much of a segment as fits, then as
    many segments as fit (GroupNorm with 1x1 spatial gets a tile of channels). With
    ``channels_fast`` (channels_last: the R channels of a group are the unit-stride axis) the
    channels come first, so lanes read neighbouring channels instead of one scalar each at
    stride C (issue 15 item 5; full vectors where R is a multiple of 16, so that a group's
    first channel is aligned). ``block_n`` (else ``$NORMKIT_TRITON_BLOCK_N``) caps both the
    single-tile and the chunk size."""
    return _tile_shape(R, S, direction, element_size, block_override(block_n), channels_fast)


@functools.lru_cache(maxsize=1024)
def _tile_shape(R: int, S: int, direction: str, element_size: int, block_n: int | None, channels_fast: bool) -> _Blocks:
    # A pure function of its ints, called on every launch: memoized (issue 15 item 9).
    single_tile = SINGLE_TILE[direction] // (2 if direction == "bwd" and element_size > 2 else 1)
    for block in (block_n,) if block_n else (single_tile, CHUNK_TILE):
        if channels_fast:
            block_r = min(next_power_of_2(R), block)
            block_s = min(next_power_of_2(S), max(1, block // block_r))
        else:
            block_s = min(next_power_of_2(S), block)
            block_r = min(next_power_of_2(R), max(1, block // block_s))
        single = block_r >= R and block_s >= S
        if single:
            break
    num_warps = min(max(block_r * block_s // 256, 1), 16)
    return _Blocks(block_r, block_s, single, num_warps)


# A GroupNorm/InstanceNorm row that takes more than one tile is split across programs of about
# this many tiles each (issue 15 item 4: SD's UNet GroupNorm at N=2, G=32 is 64 rows of 40,960
# elements for 132 SMs). Such a row is read twice anyway (statistics, then normalization), so
# the split costs one more launch each way and no extra traffic. The split depends on the row's
# shape alone, never on the number of rows: a sample's result does not depend on the batch.
# Rows that fit one tile are read once and never split (splitting would read them twice).
SPLIT_TILES = 4


class _Split(NamedTuple):
    """A row of ``R x S`` split into blocks of ``split_r x split_s`` (multiples of the tile, so no
    tile crosses two programs), ``splits_s`` along s, ``splits`` in all."""

    splits: int
    split_r: int
    split_s: int
    splits_s: int


def _split(R: int, S: int, blocks: _Blocks, per_channel: bool) -> _Split:
    """How a GroupNorm/InstanceNorm row is split across programs: blocks of about
    :data:`SPLIT_TILES` tiles, along s first (a block of whole tile columns), then along r
    (contiguous GroupNorm's tile is one channel's spatial run). One block for an unsplit row."""
    whole = _Split(1, R, S, 1)
    if not per_channel or blocks.SINGLE_BLOCK:
        return whole
    s_tiles = min(cdiv(S, blocks.BLOCK_S), SPLIT_TILES)
    split_s = blocks.BLOCK_S * s_tiles
    split_r = blocks.BLOCK_R * max(1, SPLIT_TILES // s_tiles)
    splits_s = cdiv(S, split_s)
    splits = splits_s * cdiv(R, split_r)
    return _Split(splits, min(split_r, R), min(split_s, S), splits_s) if splits > 1 else whole


def _channels_fast(x3: Tensor, R: int) -> bool:
    """A group's channels are the unit-stride axis of the ``(N, C, S)`` view (channels_last),
    and there is more than one of them."""
    return R > 1 and x3.stride(1) == 1 and x3.shape[2] > 1


def _inner_contiguous(t: Tensor | None) -> Tensor | None:
    """Rows may be strided (the kernels take a row stride); a row norm's elements within a row
    may not (the residual and its gradient share x's unit element stride)."""
    if t is not None and t.stride(-1) != 1:
        t = t.contiguous()
    return t


def _empty_like(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An output for the ``(N, C, S)`` view ``t``: with t's strides when t is dense (so a
    channels_last input gives a channels_last output), else contiguous (a row-padded input
    gives packed rows). That is ``empty_like``'s ``preserve_format`` rule for a 3-D tensor."""
    return torch.empty_like(t, dtype=dtype)


def _channel_blocked(x3: Tensor, groups: int, per_channel: bool, plain: bool) -> bool:
    """A GroupNorm/InstanceNorm call (``plain``: no residual, centred) on channels_last input
    goes to :mod:`normkit.ops.triton.channels_last`'s kernels: a block of whole groups per
    program, channels the fast axis (issue 15 item 5)."""
    return per_channel and plain and channels_last.takes(x3, x3.shape[1] // groups)


def _out_like(x3: Tensor, blocked: bool, dtype: torch.dtype | None = None) -> Tensor:
    """y or dx for ``x3``: the channels_last kernels' layout when they run, else
    :func:`_empty_like`'s (the fake implementations allocate through here too)."""
    return channels_last.empty_channels_fast(x3, dtype) if blocked else _empty_like(x3, dtype)


# Short rows (a tile of at most SHORT_ROW elements) are normalized several to a program in the
# forward (issue 15 item 8): 16384 rows of 768 were 16384 programs of 4 warps, living a few
# hundred cycles each. The grid is FWD_WAVES waves of the programs an SM holds at occupancy's
# register budget (normkit.ops.triton.occupancy), so that a kernel using a quarter of that budget
# (the short-row forward compiles to about 32 registers) still fills its SMs in one wave: 2112
# programs of 7-8 rows at 16384x768. Whether fewer, longer programs beat many short ones (launch
# cost against the latency a serial row loop does not hide) is for a GPU to say.
SHORT_ROW = 2048
FWD_WAVES = 4


def _program_count(M: int, device: torch.device, num_warps: int, waves: int = 1) -> int:
    """Programs for M rows dealt evenly among them: ``waves`` waves of the programs the SMs
    hold at once (:func:`~normkit.ops.triton.occupancy.resident_programs`), at most one a row;
    on the CPU interpreter, a handful. The backward takes one wave (each program writes an
    S-wide row of dw/db partials, so more programs is more partial traffic, fewer leaves SMs
    idle): 132 programs of 16 warps on an H100, 528 of 4."""
    resident = resident_programs(device, num_warps)
    return min(M, 4 if resident is None else waves * resident)


def row_norm_fwd(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    groups: int,
    per_channel: bool,
    eps: float,
    is_rms: bool,
    residual_dtype: torch.dtype | None,
    act: int = 0,
    block_n: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Normalize the rows of ``x``, an ``(N, C, S)`` view (any strides): row ``m`` is the
    ``R = C / groups`` channels of group ``m % groups`` of sample ``m // groups``.

    ``weight``/``bias`` are per column (shape ``(S,)``, with C = 1) or, with ``per_channel``,
    per channel (shape ``(C,)``). With ``residual_dtype`` set, ``x (+ residual)`` (residual:
    x's shape, unit element stride) is stored in that dtype as ``residual_out`` and
    normalized; otherwise ``residual_out`` is empty. ``y`` and ``residual_out`` have x's
    strides when x is dense, else are contiguous.
    ``act`` (a :data:`~normkit.ops.triton.row_norm_kernels.ACT_CODES` value) applies an activation to y.

    Returns ``(y, residual_out, mean, rstd, var)``, the statistics fp32 of shape ``(M,)``:
    ``mean`` is that of ``x - pivot`` with pivot the row's first element (0 for RMSNorm), and
    ``var`` the biased variance (see :mod:`normkit.ops.triton.row_norm_kernels`, "Numerics").
    """
    N, C, S = x.shape
    M, R = N * groups, C // groups
    weight, bias = dense(weight), dense(bias)
    if _channel_blocked(x, groups, per_channel, residual is None and not is_rms):
        y, mean, rstd, var = channels_last.channels_last_fwd(x, weight, bias, groups=groups, eps=eps, act=act,
                                                             block_n=block_n)
        return y, x.new_empty((0,)), mean, rstd, var
    y = _empty_like(x)
    store_residual = residual_dtype is not None
    residual_out = _empty_like(x, residual_dtype) if store_residual else x.new_empty((0,))
    mean = torch.empty((M,), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    var = torch.empty_like(mean)
    blocks = _blocks(R, S, "fwd", x.element_size(), block_n, _channels_fast(x, R))
    split = _split(R, S, blocks, per_channel)
    splits = split.splits
    part = torch.empty((M * splits * 4 if splits > 1 else 0,), dtype=torch.float32, device=x.device)
    short = blocks.SINGLE_BLOCK and blocks.BLOCK_R * blocks.BLOCK_S <= SHORT_ROW
    programs = _program_count(M, x.device, blocks.num_warps, FWD_WAVES) if short else M
    with device_of(x):
        # A split row: its partial moments, then their merge and the normalization.
        for phase in (1, 2) if splits > 1 else (0,):
            row_norm_fwd_kernel[(programs, splits)](
                x, residual, y, residual_out, weight, bias, mean, rstd, var, part,
                *strides(x), *strides(y), residual.stride(0) if residual is not None else 0,
                M, R, S, groups, eps, split.split_r, split.split_s, split.splits_s, splits,
                IS_RMS=is_rms, HAS_RESIDUAL=residual is not None, STORE_RESIDUAL_OUT=store_residual,
                HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, PER_SEGMENT=per_channel,
                ACT=act, BLOCK_R=blocks.BLOCK_R, BLOCK_S=blocks.BLOCK_S, SINGLE_BLOCK=blocks.SINGLE_BLOCK,
                SPLIT=phase, RNE_BY_HAND=interpreted(), ROW_LOOP=programs < M, num_warps=blocks.num_warps,
                enable_fp_fusion=FP_FUSION,
            )
    return y, residual_out, mean, rstd, var


def row_norm_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    dresidual_out: Tensor | None,
    *,
    groups: int,
    per_channel: bool,
    is_rms: bool,
    dx_dtype: torch.dtype,
    dresidual_dtype: torch.dtype | None,
    dw_dtype: torch.dtype | None,
    db_dtype: torch.dtype | None,
    act: int = 0,
    block_n: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`row_norm_fwd`; ``x`` is what was normalized (``residual_out`` for
    the add-norms) and ``dresidual_out`` the gradient arriving at ``residual_out``. ``bias``
    is read only with an activation ``act``, whose input the kernel recomputes.

    Returns ``(dx, dresidual, dw, db)``; a gradient whose dtype is None comes back empty.
    dw/db are summed from fp32 per-program partials in a fixed order: bit-reproducible.
    """
    N, C, S = x.shape
    M, R = N * groups, C // groups
    weight, bias = dense(weight), dense(bias)
    if _channel_blocked(x, groups, per_channel, dresidual_out is None and not dresidual_dtype and not is_rms):
        dx, dw, db = channels_last.channels_last_bwd(dy, x, weight, bias, mean, rstd, groups=groups,
                                                     dx_dtype=dx_dtype, dw_dtype=dw_dtype, db_dtype=db_dtype,
                                                     act=act, block_n=block_n)
        return dx, dx.new_empty((0,)), dw, db
    dresidual_out = _inner_contiguous(dresidual_out)
    dev = x.device
    dx = _empty_like(x, dx_dtype)
    dresidual = _empty_like(x, dresidual_dtype) if dresidual_dtype else dx.new_empty((0,))
    blocks = _blocks(R, S, "bwd", x.element_size(), block_n, _channels_fast(x, R))
    split = _split(R, S, blocks, per_channel)
    splits = split.splits
    programs = M if splits > 1 else _program_count(M, dev, blocks.num_warps)  # a split row: one row per program
    if per_channel:
        part_shape = (N, C, cdiv(S, blocks.BLOCK_S))
    else:
        part_shape = (programs, S)
    dw_part = torch.empty(part_shape if dw_dtype else (0,), dtype=torch.float32, device=dev)
    db_part = torch.empty(part_shape if db_dtype else (0,), dtype=torch.float32, device=dev)
    row_dots = torch.empty((0 if blocks.SINGLE_BLOCK else 2 * M * splits,), dtype=torch.float32, device=dev)
    with device_of(x):
        # A split row: its partial (c1, c2) sums, then the gradients.
        for phase in (1, 2) if splits > 1 else (0,):
            row_norm_bwd_kernel[(programs, splits)](
                x, weight, bias, mean, rstd, dy, dx, dresidual_out, dresidual, dw_part, db_part, row_dots,
                *strides(x), *strides(dy), *strides(dx),
                dresidual_out.stride(0) if dresidual_out is not None else 0,
                M, R, S, groups, split.split_r, split.split_s, split.splits_s, splits,
                IS_RMS=is_rms, HAS_WEIGHT=weight is not None, COMPUTE_DW=dw_dtype is not None,
                COMPUTE_DB=db_dtype is not None, HAS_DRESIDUAL_OUT=dresidual_out is not None,
                STORE_DRESIDUAL=dresidual_dtype is not None, PER_SEGMENT=per_channel,
                HAS_BIAS=act != 0 and bias is not None, ACT=act,
                BLOCK_R=blocks.BLOCK_R, BLOCK_S=blocks.BLOCK_S, SINGLE_BLOCK=blocks.SINGLE_BLOCK,
                SPLIT=phase, RNE_BY_HAND=interpreted(), num_warps=blocks.num_warps, enable_fp_fusion=FP_FUSION,
            )
    # A fixed-shape torch sum: the same partials give the same bits on every run.
    reduce_dims = (0, 2) if per_channel else (0,)
    dw = dw_part.sum(reduce_dims).to(dw_dtype) if dw_dtype else dw_part
    db = db_part.sum(reduce_dims).to(db_dtype) if db_dtype else db_part
    return dx, dresidual, dw, db


# ---------------------------------------------------------------------------------------------
# Custom ops: what torch.compile sees.


@torch.library.custom_op("normkit::row_norm_fwd", mutates_args=())
def _row_norm_fwd_op(
    x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None,
    groups: int, per_channel: bool, eps: float, is_rms: bool,
    residual_dtype: torch.dtype | None, act: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return row_norm_fwd(x, residual, weight, bias, groups=groups, per_channel=per_channel,
                        eps=eps, is_rms=is_rms, residual_dtype=residual_dtype, act=act)


@_row_norm_fwd_op.register_fake
def _(x, residual, weight, bias, groups, per_channel, eps, is_rms, residual_dtype, act):
    M = x.shape[0] * groups
    residual_out = _empty_like(x, residual_dtype) if residual_dtype is not None else x.new_empty((0,))
    stats = [x.new_empty((M,), dtype=torch.float32) for _ in range(3)]
    blocked = _channel_blocked(x, groups, per_channel, residual is None and not is_rms)
    return _out_like(x, blocked), residual_out, *stats


@torch.library.custom_op("normkit::row_norm_bwd", mutates_args=())
def _row_norm_bwd_op(
    dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
    rstd: Tensor, dresidual_out: Tensor | None, groups: int, per_channel: bool,
    is_rms: bool, dx_dtype: torch.dtype, dresidual_dtype: torch.dtype | None,
    dw_dtype: torch.dtype | None, db_dtype: torch.dtype | None, act: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return row_norm_bwd(dy, x, weight, bias, mean, rstd, dresidual_out,
                        groups=groups, per_channel=per_channel, is_rms=is_rms, dx_dtype=dx_dtype,
                        dresidual_dtype=dresidual_dtype, dw_dtype=dw_dtype, db_dtype=db_dtype,
                        act=act)


@_row_norm_bwd_op.register_fake
def _(dy, x, weight, bias, mean, rstd, dresidual_out, groups, per_channel, is_rms,
      dx_dtype, dresidual_dtype, dw_dtype, db_dtype, act):
    n_params = x.shape[1] if per_channel else x.shape[2]

    def grad(dtype: torch.dtype | None) -> Tensor:
        return x.new_empty((n_params,) if dtype is not None else (0,), dtype=dtype or torch.float32)

    dresidual = _empty_like(x, dresidual_dtype) if dresidual_dtype else x.new_empty((0,), dtype=dx_dtype)
    blocked = _channel_blocked(x, groups, per_channel, dresidual_out is None and not dresidual_dtype and not is_rms)
    return _out_like(x, blocked, dx_dtype), dresidual, grad(dw_dtype), grad(db_dtype)


def _setup_context(ctx, inputs, output) -> None:
    x, residual, weight, bias, groups, per_channel, eps, is_rms, residual_dtype, act = inputs
    _, residual_out, mean, rstd, _ = output
    # The statistics are outputs nobody differentiates: no zeros launched for their gradients.
    ctx.set_materialize_grads(False)
    # The backward re-reads what was normalized: x, or the stored x + residual (and the bias,
    # to recompute an activation's input).
    ctx.save_for_backward(residual_out if residual_dtype is not None else x, weight,
                          bias if act else None, mean, rstd)
    ctx.meta = (groups, per_channel, is_rms, residual_dtype is not None, act)
    ctx.eps = eps
    ctx.dtypes = (x.dtype, None if residual is None else residual.dtype,
                  None if weight is None else weight.dtype, None if bias is None else bias.dtype)


def _backward(ctx, dy, dresidual_out, dmean, drstd, dvar):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    groups, per_channel, is_rms, has_residual_out, act = ctx.meta
    x_dtype, residual_dtype, w_dtype, b_dtype = ctx.dtypes
    need = ctx.needs_input_grad
    if not has_residual_out or dresidual_out is None or dresidual_out.numel() == 0:
        dresidual_out = None
    if dy is None:  # y unused (grads are not materialized): a zero gradient through it
        if dresidual_out is None:
            return (None,) * 10
        dy = torch.zeros_like(x, dtype=x_dtype)
    dx, dresidual, dw, db = _row_norm_backward(
        dy, x, weight, bias, mean, rstd, dresidual_out, groups, per_channel, is_rms,
        x_dtype, residual_dtype if need[1] else None, w_dtype if need[2] else None,
        b_dtype if need[3] else None, act,
    )
    return (dx, dresidual if need[1] else None, dw if need[2] else None,
            db if need[3] else None, None, None, None, None, None, None)


torch.library.register_autograd("normkit::row_norm_fwd", _backward, setup_context=_setup_context)
vmap_by_loop(_row_norm_bwd_op)


def _row_norm_fwd_vmap(info, in_dims, x, residual, weight, bias, *flags):
    """vmap of the forward: rows are independent, so a batch of inputs sharing the weight and
    bias is one launch over ``B * N`` samples (exact, as one call each); batched parameters
    take one call per element."""
    if in_dims[2] is not None or in_dims[3] is not None:
        outs = [_row_norm_fwd_op(*(a if d is None else a.select(d, i)
                                   for a, d in zip((x, residual, weight, bias), in_dims, strict=False)),
                                 *flags) for i in range(info.batch_size)]
        return tuple(torch.stack(o) for o in zip(*outs, strict=True)), (0,) * 5
    B = info.batch_size

    def fold(t: Tensor | None, d: int | None) -> Tensor | None:
        if t is None:
            return None
        t = t.expand(B, *t.shape) if d is None else t.movedim(d, 0)
        return _inner_contiguous(t.reshape(B * t.shape[1], *t.shape[2:]))

    y, residual_out, mean, rstd, var = _row_norm_fwd_op(fold(x, in_dims[0]), fold(residual, in_dims[1]),
                                                        weight, bias, *flags)
    residual_dtype = flags[4]
    if residual_dtype is None:  # empty, not batched
        out_dims = (0, None, 0, 0, 0)
    else:
        residual_out = residual_out.view(B, -1, *residual_out.shape[1:])
        out_dims = (0,) * 5
    stats = (t.view(B, -1) for t in (mean, rstd, var))
    return (y.view(B, -1, *y.shape[1:]), residual_out, *stats), out_dims


torch.library.register_vmap(_row_norm_fwd_op, _row_norm_fwd_vmap)
_row_norm, _row_norm_backward = eager_and_compiled(_row_norm_fwd_op, _setup_context, _backward, _row_norm_bwd_op,
                                                   graph_backward=_graph_backward.row)


@torch.library.custom_op("normkit::update_running_stats", mutates_args=("running_mean", "running_var"))
def _update_running_op(running_mean: Tensor | None, running_var: Tensor | None, batch_mean: Tensor,
                       batch_var: Tensor, momentum: float) -> None:
    """InstanceNorm's running update, as an op: below torch.func's transforms, like ATen's
    kernel write (``copy_`` of a grad-tracked value into a captured tensor is refused)."""
    update_running_stats(running_mean, running_var, batch_mean, batch_var, momentum, inference_ok=False)


@_update_running_op.register_fake
def _(running_mean, running_var, batch_mean, batch_var, momentum):
    return None


def _update_running_vmap(info, in_dims, running_mean, running_var, batch_mean, batch_var, momentum):
    """Per batch element when the running statistics are batched too; torch's error when not."""
    shared = any(r is not None and d is None for r, d in zip((running_mean, running_var), in_dims))
    if shared and (in_dims[2] is not None or in_dims[3] is not None):
        raise RuntimeError(VMAP_SHARED_RUNNING_STATS)

    def pick(t: Tensor | None, d: int | None, i: int) -> Tensor | None:
        return t if t is None or d is None else t.select(d, i)

    for i in range(info.batch_size):
        args = (running_mean, running_var, batch_mean, batch_var)
        _update_running_op(*(pick(t, d, i) for t, d in zip(args, in_dims, strict=False)), momentum)
    return None, None


torch.library.register_vmap(_update_running_op, _update_running_vmap)


# ---------------------------------------------------------------------------------------------
# The norms, with torch.nn.functional's signatures.


def _flat(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.reshape(-1)


def _trailing_norm(
    x: Tensor, residual: Tensor | None, normalized_shape: int | Sequence[int],
    weight: Tensor | None, bias: Tensor | None, eps: float, is_rms: bool,
    residual_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor]:
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    L = math.prod(normalized_shape)
    # reshape is a view whenever the rows are evenly strided (a padded or sliced batch); it
    # copies only when no single row stride describes the input.
    rows = _inner_contiguous(x.reshape(-1, 1, L))
    res_rows = None if residual is None else _inner_contiguous(residual.reshape(-1, 1, L))
    y, residual_out, *_ = _row_norm(rows, res_rows, _flat(weight), _flat(bias), 1, False,
                                         eps, is_rms, residual_dtype, 0)
    if residual_dtype is not None:
        residual_out = residual_out.view(x.shape)
    return y.view(x.shape), residual_out


def layer_norm(
    input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None = None,
    bias: Tensor | None = None, eps: float = 1e-5,
) -> Tensor:
    """``torch.nn.functional.layer_norm`` in one Triton kernel per direction."""
    return _trailing_norm(input, None, normalized_shape, weight, bias, eps, False, None)[0]


def rms_norm(
    input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    """``torch.nn.functional.rms_norm``; ``eps=None`` is, as in torch, the machine epsilon of
    the dtype statistics are computed in (float32, also for bf16/fp16 input)."""
    eps = rms_eps(eps, input.dtype)
    return _trailing_norm(input, None, normalized_shape, weight, None, eps, True, None)[0]


def add_layer_norm(
    x: Tensor, residual: Tensor | None, normalized_shape: Sequence[int],
    weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5,
    residual_dtype: torch.dtype | None = None,
) -> AddNormOutput:
    """``residual_out = x + residual`` (in ``residual_dtype``, default ``x.dtype``) and
    ``y = layer_norm(residual_out)`` (in ``x.dtype``), reading x and residual once.

    ``residual=None`` stores x itself. The gradient arriving at ``residual_out`` is added to
    the one through ``y`` and flows into both x and residual."""
    return AddNormOutput(*_trailing_norm(x, residual, normalized_shape, weight, bias, eps, False,
                                         residual_dtype or x.dtype))


def add_rms_norm(
    x: Tensor, residual: Tensor | None, normalized_shape: Sequence[int],
    weight: Tensor | None = None, eps: float | None = None,
    residual_dtype: torch.dtype | None = None,
) -> AddNormOutput:
    """As :func:`add_layer_norm` with RMSNorm (``eps=None`` as in :func:`rms_norm`)."""
    eps = rms_eps(eps, x.dtype)
    return AddNormOutput(*_trailing_norm(x, residual, normalized_shape, weight, None, eps, True,
                                         residual_dtype or x.dtype))


def _channel_norm(input: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None,
                  eps: float, act: str | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rows (sample, group) of an ``(N, C, *)`` input, read through its ``(N, C, S)`` view:
    contiguous, channels_last(_3d) and sliced inputs without a copy (only a layout whose
    spatial axes do not merge into one stride is copied); the output keeps the layout.
    Returns ``(y, x3, mean, var)``: the ``(N, C, S)`` view and the kernel's statistics (mean of
    ``x - pivot``, biased variance)."""
    x3 = input.reshape(input.shape[0], input.shape[1], -1)
    y, _, mean, _, var = _row_norm(x3, None, weight, bias, groups, True, eps, False, None,
                                        ACT_CODES[act])
    return y.view(input.shape), x3, mean, var


def group_norm(
    input: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """``torch.nn.functional.group_norm``: one row per (sample, group)."""
    return _channel_norm(input, num_groups, weight, bias, eps)[0]


def group_norm_act(
    input: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None,
    eps: float = 1e-5, act: str | None = "silu",
) -> Tensor:
    """``act(group_norm(input))`` in one pass each way: the activation is applied before the
    output is stored, and the backward recomputes its input (``act``: ``"relu"``, ``"silu"``,
    ``"gelu"`` (erf form) or None)."""
    return _channel_norm(input, num_groups, weight, bias, eps, act)[0]


def instance_norm(
    input: Tensor, running_mean: Tensor | None = None, running_var: Tensor | None = None,
    weight: Tensor | None = None, bias: Tensor | None = None, use_input_stats: bool = True,
    momentum: float = 0.1, eps: float = 1e-5,
) -> Tensor:
    """``torch.nn.functional.instance_norm`` with ``use_input_stats=True``: one row per
    (sample, channel), i.e. GroupNorm with one channel per group.

    Running statistics, when given, are updated as torch does: ``running = (1 - momentum) *
    running + momentum * stat``, with stat the mean over the batch of the per-instance mean and
    of the per-instance *unbiased* variance (the kernel's fp32 variance itself, so a constant
    instance adds exactly 0), computed in fp32; nothing is written unless both can be."""
    N, C = input.shape[:2]
    y, x3, mean, var = _channel_norm(input, C, weight, bias, eps)
    if running_mean is not None or running_var is not None:
        n = x3.shape[2]
        with torch.no_grad():
            pivot = x3[:, :, 0].float()  # the kernel's mean is of x - pivot
            batch_mean = (mean.view(N, C) + pivot).mean(0)
            batch_var = unbiased(var.view(N, C), n).mean(0)
            _update_running_op(running_mean, running_var, batch_mean, batch_var, float(momentum))
    return y
