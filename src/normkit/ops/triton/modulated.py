"""Launchers, ``torch.library`` custom ops and the public Triton modulated (adaLN) norms.

Both norms are one call of two custom ops over the ``(M, N)`` rows of the input (the last dim
normalized) and ``(groups, N)`` tables of ``shift`` and ``scale`` rows, row ``m`` of the input
taking table row ``m // group`` (see :mod:`normkit.ops.triton.modulated_kernels`):

* ``normkit::modulated_norm_fwd(x, shift, scale, weight, bias, ...) -> (y, mean, rstd)``
* ``normkit::modulated_norm_bwd(dy, x, scale, weight, bias, mean, rstd, ...) -> (dx, dshift, dscale, dw, db)``

A modulation per sample (``(B, 1, N)`` against ``(B, L, N)``), per token (the input's shape) or
for the whole batch (``(N,)``, ``(1, 1, N)``) is read in place as such a table, and its
gradient reduced over the broadcast rows inside the backward kernel. Any other broadcast
(``(1, L, N)``, ``(B, L, 1)``) is expanded to a per-token float32 table first (a copy); autograd then
sums its gradient back to its shape.

The ops have fake (meta) implementations, so ``torch.compile(fullgraph=True)`` traces through
without a graph break; eager calls go through ``_launch.eager_and_compiled`` (``torch.func``
transforms work, forward-mode AD is refused, ``vmap`` by one call per batch element).

Tile size: as the row norms (:data:`~normkit.ops.triton.row_norm.SINGLE_TILE`, ``CHUNK_TILE``,
``block_n=`` / ``NORMKIT_TRITON_BLOCK_N``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from normkit.numerics import rms_eps
from normkit.ops.triton import _graph_backward
from normkit.ops.triton._launch import (
    FP_FUSION,
    block_override,
    cdiv,
    dense,
    device_of,
    eager_and_compiled,
    interpreted,
    vmap_by_loop,
)
from normkit.ops.triton.modulated_kernels import modulated_norm_bwd_kernel, modulated_norm_fwd_kernel
from normkit.ops.triton.occupancy import resident_programs
from normkit.ops.triton.row_norm import _blocks, _inner_contiguous

__all__ = ["BWD_TILE", "modulated_layer_norm", "modulated_norm_bwd", "modulated_norm_fwd", "modulated_rms_norm"]

# The backward's widest single tile, in elements, whatever the dtype: it keeps about twice the
# row norms' live fp32 tiles (z, dz and the dshift/dscale column sums besides x_hat, dy, w and
# the dw/db sums), so half their bf16/fp16 tile. Wider rows take the chunked path in tiles of
# this size. DiT, SD3 and Flux widths (1152 to 3072) are one tile. Not yet measured on a GPU.
BWD_TILE = 4096


def _table(t: Tensor, shape: torch.Size) -> tuple[Tensor, int]:
    """``t`` (which broadcasts to ``shape``) as a ``(groups, N)`` table with unit element stride,
    and the number of consecutive input rows per table row.

    In place when ``t``'s leading dims are those of ``shape`` up to some dim and 1 after it
    (per sample, per token, one for all): a view, or a copy of ``t`` alone when its last dim is
    strided. Otherwise ``t`` expanded to ``shape`` in float32, one table row per input row."""
    n = shape[-1]
    lead = (1,) * (len(shape) - t.dim()) + tuple(t.shape[:-1])
    k = len(lead)
    while k and lead[k - 1] == 1:
        k -= 1
    if t.dim() and t.shape[-1] == n and lead[:k] == tuple(shape[:k]):
        groups = math.prod(shape[:k])
        return _inner_contiguous(t.reshape(groups, n)), math.prod(shape[k:-1])
    # In float32: autograd sums the per-row gradient back to t's shape, which then rounds once.
    return _inner_contiguous(t.to(torch.float32).expand(shape).reshape(-1, n)), 1


def _programs(M: int, segment: int, num_warps: int, device: torch.device) -> tuple[int, int]:
    """``(programs per segment, rows per program)`` of the backward: one wave of resident
    programs in all (:mod:`~normkit.ops.triton.occupancy`; each writes an N-wide row of partial
    sums), none straddling a segment; on the CPU interpreter, a handful."""
    resident = resident_programs(device, num_warps)
    target = 4 if resident is None else resident
    per_segment = max(1, cdiv(target, M // segment))
    rows = cdiv(segment, per_segment)
    return cdiv(segment, rows), rows


def modulated_norm_fwd(
    x: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None, bias: Tensor | None, *,
    shift_group: int, scale_group: int, eps: float, is_rms: bool, block_n: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Normalize and modulate the rows of ``x`` ``(M, N)`` (any row stride, unit element
    stride); ``shift``/``scale`` are ``(M // group, N)`` tables (unit element stride).

    Returns ``(y, mean, rstd)``: y contiguous in x's dtype, the statistics fp32 ``(M,)``, mean
    that of ``x - pivot`` (the row's first element; 0 for RMSNorm)."""
    M, N = x.shape
    weight, bias = dense(weight), dense(bias)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    mean = torch.empty((M,), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    blocks = _blocks(1, N, "fwd", x.element_size(), block_n)
    with device_of(x):
        modulated_norm_fwd_kernel[(M,)](
            x, shift, scale, y, weight, bias, mean, rstd,
            x.stride(0), y.stride(0), shift.stride(0), scale.stride(0),
            N, shift_group, scale_group, eps,
            IS_RMS=is_rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            BLOCK_N=blocks.BLOCK_S, SINGLE_BLOCK=blocks.SINGLE_BLOCK, RNE_BY_HAND=interpreted(),
            num_warps=blocks.num_warps, enable_fp_fusion=FP_FUSION,
        )
    return y, mean, rstd


def modulated_norm_bwd(
    dy: Tensor, x: Tensor, scale: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
    rstd: Tensor, *, shift_group: int, scale_group: int, is_rms: bool, dx_dtype: torch.dtype,
    dshift_dtype: torch.dtype | None, dscale_dtype: torch.dtype | None, dw_dtype: torch.dtype | None,
    db_dtype: torch.dtype | None, block_n: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`modulated_norm_fwd`: ``(dx, dshift, dscale, dw, db)``, dshift/dscale
    as their ``(M // group, N)`` tables; a gradient whose dtype is None comes back empty.

    Per-token tables' gradients are written by the kernel; the others and dw/db are summed from
    fp32 per-program partials in a fixed order: bit-reproducible."""
    M, N = x.shape
    dev = x.device
    weight, bias = dense(weight), dense(bias)
    dy = _inner_contiguous(dy)
    dx = torch.empty((M, N), dtype=dx_dtype, device=dev)
    # A program's rows stay within one group of each table it reduces; the groups nest (each
    # is a product of trailing leading dims), so the smallest reduced one bounds them all.
    reduced = [g for g, dtype in ((shift_group, dshift_dtype), (scale_group, dscale_dtype))
               if dtype is not None and g > 1]
    segment = min(reduced, default=M)
    blocks = _blocks(1, N, "bwd", x.element_size(), block_override(block_n) or BWD_TILE)
    per_segment, rows = _programs(M, segment, blocks.num_warps, dev)
    programs = M // segment * per_segment

    def table_grad(group: int, dtype: torch.dtype | None) -> Tensor:
        if dtype is None:
            return torch.empty((0,), dtype=torch.float32, device=dev)
        if group == 1:
            return torch.empty((M, N), dtype=dtype, device=dev)
        return torch.empty((programs, N), dtype=torch.float32, device=dev)

    dshift = table_grad(shift_group, dshift_dtype)
    dscale = table_grad(scale_group, dscale_dtype)
    dw_part = torch.empty((programs, N) if dw_dtype else (0,), dtype=torch.float32, device=dev)
    db_part = torch.empty((programs, N) if db_dtype else (0,), dtype=torch.float32, device=dev)
    row_dots = torch.empty((0 if blocks.SINGLE_BLOCK else 2 * M,), dtype=torch.float32, device=dev)
    with device_of(x):
        modulated_norm_bwd_kernel[(programs,)](
            x, scale, weight, bias, mean, rstd, dy, dx, dshift, dscale, dw_part, db_part, row_dots,
            x.stride(0), scale.stride(0), dy.stride(0), dx.stride(0),
            dshift.stride(0) if shift_group == 1 else 0, dscale.stride(0) if scale_group == 1 else 0,
            M, N, scale_group, segment, per_segment, rows,
            IS_RMS=is_rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            COMPUTE_DSHIFT=dshift_dtype is not None, SHIFT_PER_ROW=shift_group == 1,
            COMPUTE_DSCALE=dscale_dtype is not None, SCALE_PER_ROW=scale_group == 1,
            COMPUTE_DW=dw_dtype is not None, COMPUTE_DB=db_dtype is not None,
            BLOCK_N=blocks.BLOCK_S, SINGLE_BLOCK=blocks.SINGLE_BLOCK, RNE_BY_HAND=interpreted(),
            num_warps=blocks.num_warps, enable_fp_fusion=FP_FUSION,
        )

    # Fixed-shape torch sums of the partials: the same partials give the same bits on every run.
    def table_sum(part: Tensor, group: int, dtype: torch.dtype | None) -> Tensor:
        if dtype is None or group == 1:
            return part
        return part.view(M // group, -1, N).sum(1).to(dtype)

    dw = dw_part.sum(0).to(dw_dtype) if dw_dtype else dw_part
    db = db_part.sum(0).to(db_dtype) if db_dtype else db_part
    return dx, table_sum(dshift, shift_group, dshift_dtype), table_sum(dscale, scale_group, dscale_dtype), dw, db


# ---------------------------------------------------------------------------------------------
# Custom ops: what torch.compile sees.


@torch.library.custom_op("normkit::modulated_norm_fwd", mutates_args=())
def _fwd_op(
    x: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None, bias: Tensor | None,
    shift_group: int, scale_group: int, eps: float, is_rms: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return modulated_norm_fwd(x, shift, scale, weight, bias, shift_group=shift_group,
                              scale_group=scale_group, eps=eps, is_rms=is_rms)


@_fwd_op.register_fake
def _(x, shift, scale, weight, bias, shift_group, scale_group, eps, is_rms):
    M = x.shape[0]
    return x.new_empty(x.shape), *(x.new_empty((M,), dtype=torch.float32) for _ in range(2))


@torch.library.custom_op("normkit::modulated_norm_bwd", mutates_args=())
def _bwd_op(
    dy: Tensor, x: Tensor, scale: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
    rstd: Tensor, shift_group: int, scale_group: int, is_rms: bool, dx_dtype: torch.dtype,
    dshift_dtype: torch.dtype | None, dscale_dtype: torch.dtype | None, dw_dtype: torch.dtype | None,
    db_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return modulated_norm_bwd(dy, x, scale, weight, bias, mean, rstd, shift_group=shift_group,
                              scale_group=scale_group, is_rms=is_rms, dx_dtype=dx_dtype,
                              dshift_dtype=dshift_dtype, dscale_dtype=dscale_dtype, dw_dtype=dw_dtype,
                              db_dtype=db_dtype)


@_bwd_op.register_fake
def _(dy, x, scale, weight, bias, mean, rstd, shift_group, scale_group, is_rms, dx_dtype, dshift_dtype,
      dscale_dtype, dw_dtype, db_dtype):
    M, N = x.shape

    def grad(rows: int, dtype: torch.dtype | None) -> Tensor:
        return x.new_empty((rows, N) if dtype is not None else (0,), dtype=dtype or torch.float32)

    dw, db = (x.new_empty((N,) if d is not None else (0,), dtype=d or torch.float32) for d in (dw_dtype, db_dtype))
    return (x.new_empty((M, N), dtype=dx_dtype), grad(M // shift_group, dshift_dtype),
            grad(M // scale_group, dscale_dtype), dw, db)


def _setup_context(ctx, inputs, output) -> None:
    x, shift, scale, weight, bias, shift_group, scale_group, eps, is_rms = inputs
    _, mean, rstd = output
    ctx.set_materialize_grads(False)  # the statistics are outputs nobody differentiates
    ctx.save_for_backward(x, scale, weight, bias, mean, rstd)
    ctx.meta = (shift_group, scale_group, is_rms)
    ctx.eps = eps
    ctx.dtypes = (x.dtype, shift.dtype, scale.dtype, None if weight is None else weight.dtype,
                  None if bias is None else bias.dtype)


def _backward(ctx, dy, dmean, drstd):
    if dy is None:
        return (None,) * 9
    x, scale, weight, bias, mean, rstd = ctx.saved_tensors
    shift_group, scale_group, is_rms = ctx.meta
    need = ctx.needs_input_grad
    dtypes = [dtype if wanted else None for dtype, wanted in zip(ctx.dtypes[1:], need[1:5], strict=True)]
    dx, dshift, dscale, dw, db = _modulated_backward(dy, x, scale, weight, bias, mean, rstd, shift_group,
                                                     scale_group, is_rms, ctx.dtypes[0], *dtypes)
    grads = [g if dtype is not None else None for g, dtype in zip((dshift, dscale, dw, db), dtypes, strict=True)]
    return dx, *grads, None, None, None, None


torch.library.register_autograd("normkit::modulated_norm_fwd", _backward, setup_context=_setup_context)
vmap_by_loop(_fwd_op)
vmap_by_loop(_bwd_op)
_modulated, _modulated_backward = eager_and_compiled(_fwd_op, _setup_context, _backward, _bwd_op,
                                                     graph_backward=_graph_backward.modulated)


# ---------------------------------------------------------------------------------------------
# The norms, with normkit.functional's signatures.


def _modulated_norm(input: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None, bias: Tensor | None,
                    eps: float, is_rms: bool) -> Tensor:
    n = input.shape[-1]
    # reshape is a view whenever the rows are evenly strided; it copies only when no single
    # row stride describes the input.
    x = _inner_contiguous(input.reshape(-1, n))
    shift_rows, shift_group = _table(shift, input.shape)
    scale_rows, scale_group = _table(scale, input.shape)
    y, _, _ = _modulated(x, shift_rows, scale_rows, weight, bias, shift_group, scale_group, eps, is_rms)
    return y.view(input.shape)


def modulated_layer_norm(input: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None = None,
                         bias: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """``layer_norm(input, weight, bias, eps) * (1 + scale) + shift`` over the last dim, in one
    Triton kernel per direction."""
    return _modulated_norm(input, shift, scale, weight, bias, eps, False)


def modulated_rms_norm(input: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None = None,
                       eps: float | None = None) -> Tensor:
    """``rms_norm(input, weight, eps) * (1 + scale) + shift`` over the last dim; ``eps=None`` is
    machine epsilon of the statistics' dtype (float32)."""
    return _modulated_norm(input, shift, scale, weight, None, rms_eps(eps, input.dtype), True)
