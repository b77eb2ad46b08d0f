"""Launchers of the channels_last GroupNorm/InstanceNorm kernels
(:mod:`normkit.ops.triton.channels_last_kernels`); :func:`normkit.ops.triton.row_norm.row_norm_fwd`
and ``row_norm_bwd`` call them for an ``(N, C, S)`` view whose channels are the unit-stride axis.

A program takes a block of whole groups of one sample (a block of channels for InstanceNorm) and
a run of pixels, so that each load is a 16-byte vector of neighbouring channels; everything here
is chosen from ``C``, ``R`` (channels per group), ``S`` and the element size, never from the
batch size, so a sample's result does not depend on the batch around it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from normkit.ops.triton._launch import FP_FUSION, block_override, cdiv, device_of, interpreted, next_power_of_2
from normkit.ops.triton.channels_last_kernels import channels_last_bwd_kernel, channels_last_fwd_kernel

__all__ = [
    "MAX_BLOCK_C",
    "ChannelBlocks",
    "channel_blocks",
    "channels_last_bwd",
    "channels_last_fwd",
    "empty_channels_fast",
    "takes",
]

# The widest channel block, in channels. A group wider than this (GroupNorm with few groups of
# many channels) stays on the row kernels, whose channels-fast tile walks a group in chunks.
MAX_BLOCK_C = 1024

# Bytes of a pixel's channels a block reads at least: two 32-byte sectors, so a warp's loads
# cover whole sectors even where the block is not a whole pixel.
MIN_BLOCK_BYTES = 64
VECTOR_BYTES = 16

# Tiles in elements, as the row kernels' (row_norm.SINGLE_TILE, CHUNK_TILE): the pixels of a
# block are held whole when they fit the single tile (read once), else streamed in chunks. The
# backward's chunk is half the forward's: its first pass keeps four per-channel sums and the
# activation's terms live, and at 16 elements a thread (4096 over 8 warps) ptxas spilled
# (GroupNorm 512/32 bf16 with silu, sm_90); at 8 it does not.
SINGLE_TILE = {"fwd": 16384, "bwd": 8192}
CHUNK_TILE = {"fwd": 4096, "bwd": 2048}

# Streamed pixels are split across programs in runs of this many tiles (the row kernels' split
# takes 4): a block here is many rows at once, so runs of 4 tiles would leave the style-transfer
# InstanceNorm 4x128x64x64 at 128 programs for 132 SMs. The split costs one launch each way and
# no extra traffic (a streamed block is read twice anyway).
SPLIT_TILES = 2
MAX_GRID_Y = 65535
# Warps per program (one per 256 tile elements), at most: compiled for sm_90, the style-transfer
# InstanceNorm's first forward pass spills at 16 warps (ptxas gives it 64 registers a thread) and
# not at 8 (74 registers).
MAX_WARPS = 8  # CUDA's limit on the second grid dimension


class ChannelBlocks(NamedTuple):
    """A program's block: ``GROUPS_PER_BLOCK`` groups in a tile of ``BLOCK_C`` channels (of which
    ``BLOCK_G`` is the power of two covering the groups) by ``BLOCK_S`` pixels; pixels split in
    runs of ``split_s``, ``splits`` per sample."""

    GROUPS_PER_BLOCK: int
    BLOCK_C: int
    BLOCK_G: int
    BLOCK_S: int
    SINGLE_BLOCK: bool
    num_warps: int
    split_s: int
    splits: int


def _groups_per_block(C: int, R: int, element_size: int) -> int:
    """Whole groups per block: the first channel of every block a multiple of a 16-byte vector
    (else the compiler cannot prove a load aligned and reads scalars), at least
    :data:`MIN_BLOCK_BYTES` of each pixel, and at least 3/4 of the tile's channels used. SD's
    GroupNorm (R = 10, bf16): 12 groups, 120 of 128 channels; InstanceNorm fp32: 16 channels."""
    groups = C // R
    vector = max(1, VECTOR_BYTES // element_size)
    block_c = max(next_power_of_2(R), MIN_BLOCK_BYTES // element_size)
    best, best_used = None, 0.0
    while block_c <= MAX_BLOCK_C:
        fit = min(block_c // R, groups)
        # A block of every group starts at channel 0: aligned as the pixel is.
        aligned = [g for g in range(fit, 0, -1) if (g * R) % vector == 0 or g == groups]
        if aligned:
            used = aligned[0] * R / next_power_of_2(aligned[0] * R)
            if used > best_used:
                best, best_used = aligned[0], used
            if used >= 0.75 or fit == groups:
                break
        block_c *= 2
    return best if best is not None else max(1, min(MAX_BLOCK_C // R, groups))


def channel_blocks(
    C: int, R: int, S: int, direction: str, element_size: int, block_n: int | None = None
) -> ChannelBlocks:
    """The block and tile for ``(N, C, S)`` channels_last input of ``C / R`` groups.
    ``block_n`` (else ``$NORMKIT_TRITON_BLOCK_N``) caps the tile's pixels times its channels
    (never below one pixel): how the tests reach the streamed and split paths."""
    return _channel_tiles(C, R, S, direction, element_size, block_override(block_n))


@functools.lru_cache(maxsize=1024)
def _channel_tiles(C: int, R: int, S: int, direction: str, element_size: int, block_n: int | None) -> ChannelBlocks:
    # A pure function of its ints, called on every launch: memoized (issue 15 item 9).
    gpb = _groups_per_block(C, R, element_size)
    block_c = next_power_of_2(gpb * R)
    block_g = next_power_of_2(gpb)
    single_tile = SINGLE_TILE[direction] // (2 if direction == "bwd" and element_size > 2 else 1)
    s_all = next_power_of_2(S)
    single = s_all * block_c <= (block_n or single_tile)
    block_s = s_all if single else max(1, (block_n or CHUNK_TILE[direction]) // block_c)
    splits = 1
    split_s = S
    if not single:
        tiles = max(SPLIT_TILES, cdiv(S, block_s * MAX_GRID_Y))
        split_s = block_s * tiles
        splits = cdiv(S, split_s)
        if splits == 1:
            split_s = S
    num_warps = min(max(block_c * block_s // 256, 1), MAX_WARPS)
    return ChannelBlocks(gpb, block_c, block_g, block_s, single, num_warps, split_s, splits)


def takes(x3: Tensor, R: int) -> bool:
    """Whether these kernels take the ``(N, C, S)`` view ``x3`` of ``C / R`` groups: its channels
    are the unit-stride axis (channels_last), there is more than one channel and one pixel, and
    a group fits a block."""
    _, C, S = x3.shape
    return C > 1 and S > 1 and x3.stride(1) == 1 and next_power_of_2(R) <= MAX_BLOCK_C


def empty_channels_fast(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An uninitialized ``(N, C, S)`` tensor like ``t`` laid out as ``(N, S, C)`` (unit channel
    stride): the outputs' layout whatever x's pixel stride, so they view back as channels_last."""
    N, C, S = t.shape
    return t.new_empty((N, S, C), dtype=dtype or t.dtype).transpose(1, 2)


def _grid(N: int, C: int, R: int, blocks: ChannelBlocks) -> tuple[int, int]:
    return N * cdiv(C // R, blocks.GROUPS_PER_BLOCK), blocks.splits


def _launch(kernel, x: Tensor, R: int, blocks: ChannelBlocks, *args, **flags) -> None:
    """One launch of ``kernel`` over ``x``'s blocks, or, for split pixels, two: the partial
    sums (``SPLIT=1``), then their merge (``SPLIT=2``)."""
    N, C, _ = x.shape
    with device_of(x):
        for phase in (1, 2) if blocks.splits > 1 else (0,):
            kernel[_grid(N, C, R, blocks)](
                *args, **flags, R=R, GROUPS_PER_BLOCK=blocks.GROUPS_PER_BLOCK, BLOCK_C=blocks.BLOCK_C,
                BLOCK_G=blocks.BLOCK_G, BLOCK_S=blocks.BLOCK_S, SINGLE_BLOCK=blocks.SINGLE_BLOCK, SPLIT=phase,
                RNE_BY_HAND=interpreted(), num_warps=blocks.num_warps, enable_fp_fusion=FP_FUSION,
            )


def channels_last_fwd(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    groups: int,
    eps: float,
    act: int,
    block_n: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean, rstd, var)`` of GroupNorm over ``x``, an ``(N, C, S)`` view that :func:`takes`;
    the statistics are fp32 ``(N * groups,)`` as :func:`~normkit.ops.triton.row_norm.row_norm_fwd`
    returns them. ``weight``/``bias``: dense ``(C,)`` or None."""
    N, C, S = x.shape
    R = C // groups
    blocks = channel_blocks(C, R, S, "fwd", x.element_size(), block_n)
    y = empty_channels_fast(x)
    mean, rstd, var = (torch.empty((N * groups,), dtype=torch.float32, device=x.device) for _ in range(3))
    part = torch.empty((N * blocks.splits * 4 * C if blocks.splits > 1 else 0,), dtype=torch.float32, device=x.device)
    # Split pixels: their per-channel partial moments, then the merge and the normalization.
    _launch(channels_last_fwd_kernel, x, R, blocks,
            x, y, weight, bias, mean, rstd, var, part, x.stride(0), x.stride(2), y.stride(0), y.stride(2),
            S, groups, eps, blocks.split_s, blocks.splits,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACT=act)
    return y, mean, rstd, var


def channels_last_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    *,
    groups: int,
    dx_dtype: torch.dtype,
    dw_dtype: torch.dtype | None,
    db_dtype: torch.dtype | None,
    act: int,
    block_n: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dw, db)`` of :func:`channels_last_fwd` (a gradient whose dtype is None comes back
    empty). dw/db are summed from fp32 per-(sample, split) partials in a fixed order."""
    N, C, S = x.shape
    R = C // groups
    dev = x.device
    blocks = channel_blocks(C, R, S, "bwd", x.element_size(), block_n)
    if dy.stride(1) != 1:  # the upstream gradient may come in another layout
        dy = empty_channels_fast(dy).copy_(dy)
    dx = empty_channels_fast(x, dx_dtype)
    part_shape = (N, blocks.splits, C)
    dw_part = torch.empty(part_shape if dw_dtype else (0,), dtype=torch.float32, device=dev)
    db_part = torch.empty(part_shape if db_dtype else (0,), dtype=torch.float32, device=dev)
    row_dots = torch.empty((N * blocks.splits * 2 * C if blocks.splits > 1 else 0,), dtype=torch.float32, device=dev)
    # Split pixels: their per-channel (c1, c2) sums and dw/db partials, then dx.
    _launch(channels_last_bwd_kernel, x, R, blocks,
            x, weight, bias, mean, rstd, dy, dx, dw_part, db_part, row_dots,
            x.stride(0), x.stride(2), dy.stride(0), dy.stride(2), dx.stride(0), dx.stride(2),
            S, groups, blocks.split_s, blocks.splits,
            HAS_WEIGHT=weight is not None, COMPUTE_DW=dw_dtype is not None, COMPUTE_DB=db_dtype is not None,
            HAS_BIAS=act != 0 and bias is not None, ACT=act)
    # A fixed-shape torch sum: the same partials give the same bits on every run.
    dw = dw_part.sum((0, 1)).to(dw_dtype) if dw_dtype else dw_part
    db = db_part.sum((0, 1)).to(db_dtype) if db_dtype else db_part
    return dx, dw, db
