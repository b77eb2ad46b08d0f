"""The Triton gated RMSNorm (Mamba2, Bamba, Falcon-H1): launchers, custom ops, public function.

Two ``torch.library`` custom ops with fake (meta) implementations, so
``torch.compile(fullgraph=True)`` traces through without a graph break:

* ``normkit::gated_rms_norm_fwd(x, gate, weight, eps, group_size, norm_before_gate) -> (y, rstd)``
* ``normkit::gated_rms_norm_bwd(dy, x, gate, weight, rstd, ...) -> (dx, dgate, dweight)``

on ``(M, D)`` views (any row stride, unit element stride); ``rstd`` is fp32, one per group of
``group_size`` channels of a row. Eager code calls them through the ``autograd.Function`` of
:func:`~normkit.ops.triton._launch.eager_and_compiled` (``torch.func`` transforms work, forward
mode is refused with an error, a double backward runs the torch composition); ``vmap`` runs one
call per batch element.

:func:`gated_rms_norm` takes the backend arguments of :func:`normkit.functional.gated_rms_norm`
(``group_size`` already resolved to a divisor of ``D``) and trusts them. Tiles: a group of up
to :data:`SINGLE_TILE` elements is one tile; a wider one is walked in :data:`CHUNK_TILE`
tiles; ``block_n=`` or ``$NORMKIT_TRITON_BLOCK_N`` caps both (how the tests reach the chunked
path with small groups).
"""

from __future__ import annotations

import torch
from torch import Tensor

from normkit.ops.triton import _graph_backward
from normkit.ops.triton._launch import (
    FP_FUSION,
    block_override,
    cdiv,
    dense,
    device_of,
    eager_and_compiled,
    interpreted,
    next_power_of_2,
    vmap_by_loop,
)
from normkit.ops.triton.gated_kernels import gated_rms_norm_bwd_kernel, gated_rms_norm_fwd_kernel
from normkit.ops.triton.occupancy import resident_programs

__all__ = ["CHUNK_TILE", "SINGLE_TILE", "gated_rms_norm", "gated_rms_norm_bwd", "gated_rms_norm_fwd"]

# As the row norms' (row_norm.SINGLE_TILE): a group held whole in registers up to these widths,
# the backward at half the forward's (it keeps x, the gate, dy, the weight and the dw columns
# live) and half again for fp32 inputs. Compiled for sm_90 with Triton's ptxas (static_report's
# compile_variant on recorded launches: bf16 groups of 1024 and 4096, fp32 8192, bf16 32768),
# every variant uses at most 118 registers, spills nothing and loads 16 bytes per lane; the
# speed against the composition is not yet measured on a GPU.
SINGLE_TILE = {"fwd": 16384, "bwd": 8192}
CHUNK_TILE = 4096


def _tile(n: int, direction: str, element_size: int, block_n: int | None) -> tuple[int, bool, int]:
    """``(BLOCK_N, SINGLE_BLOCK, num_warps)`` for groups of ``n`` elements."""
    block_n = block_override(block_n)
    single = SINGLE_TILE[direction] // (2 if direction == "bwd" and element_size > 2 else 1)
    width = next_power_of_2(n)
    if block_n:
        block = min(width, block_n)
    else:
        block = width if width <= single else CHUNK_TILE
    return block, block >= n, min(max(block // 256, 1), 16)


def _program_blocks(M: int, groups: int, num_warps: int, device: torch.device) -> int:
    """Row blocks of the backward (each program owns one group of one block of rows): one wave
    of resident programs in all (:mod:`~normkit.ops.triton.occupancy`), each writing a
    ``D``-wide row of weight-gradient partials; on the CPU interpreter a handful."""
    resident = resident_programs(device, num_warps)
    target = max(1, (4 if resident is None else resident) // groups)
    return cdiv(M, cdiv(M, min(M, target)))


def gated_rms_norm_fwd(x: Tensor, gate: Tensor | None, weight: Tensor | None, eps: float, group_size: int,
                       norm_before_gate: bool, *, block_n: int | None = None) -> tuple[Tensor, Tensor]:
    """``(y, rstd)`` of the ``(M, D)`` views ``x`` and ``gate``: ``y`` contiguous in x's dtype,
    ``rstd`` fp32 of shape ``(M * D / group_size,)``."""
    M, D = x.shape
    groups = D // group_size
    weight = dense(weight)
    y = torch.empty((M, D), dtype=x.dtype, device=x.device)
    rstd = torch.empty((M * groups,), dtype=torch.float32, device=x.device)
    block, single, num_warps = _tile(group_size, "fwd", x.element_size(), block_n)
    with device_of(x):
        gated_rms_norm_fwd_kernel[(M * groups,)](
            x, x if gate is None else gate, x if weight is None else weight, y, rstd,
            x.stride(0), 0 if gate is None else gate.stride(0), y.stride(0),
            group_size, groups, eps,
            HAS_GATE=gate is not None, GATE_FIRST=not norm_before_gate, HAS_WEIGHT=weight is not None,
            BLOCK_N=block, SINGLE_BLOCK=single, RNE_BY_HAND=interpreted(), num_warps=num_warps,
            enable_fp_fusion=FP_FUSION,
        )
    return y, rstd


def gated_rms_norm_bwd(dy: Tensor, x: Tensor, gate: Tensor | None, weight: Tensor | None, rstd: Tensor,
                       group_size: int, norm_before_gate: bool, dgate_dtype: torch.dtype | None,
                       dweight_dtype: torch.dtype | None, *, block_n: int | None = None,
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dgate, dweight)`` of :func:`gated_rms_norm_fwd`; a gradient whose dtype is None
    comes back empty. dweight is summed from fp32 per-program partials in a fixed order:
    bit-reproducible."""
    M, D = x.shape
    groups = D // group_size
    weight = dense(weight)
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    dev = x.device
    dx = torch.empty((M, D), dtype=x.dtype, device=dev)
    dgate = torch.empty((M, D) if dgate_dtype else (0,), dtype=dgate_dtype or x.dtype, device=dev)
    block, single, num_warps = _tile(group_size, "bwd", x.element_size(), block_n)
    blocks = _program_blocks(M, groups, num_warps, dev)
    dw_part = torch.empty((blocks, D) if dweight_dtype else (0,), dtype=torch.float32, device=dev)
    row_dots = torch.empty((0 if single else M * groups,), dtype=torch.float32, device=dev)
    with device_of(x):
        gated_rms_norm_bwd_kernel[(blocks * groups,)](
            x, x if gate is None else gate, x if weight is None else weight, rstd, dy, dx, dgate, dw_part,
            row_dots,
            x.stride(0), 0 if gate is None else gate.stride(0), dy.stride(0), dx.stride(0),
            dgate.stride(0) if dgate_dtype else 0,
            M, group_size, groups, cdiv(M, blocks),
            HAS_GATE=gate is not None, GATE_FIRST=not norm_before_gate, HAS_WEIGHT=weight is not None,
            COMPUTE_DZ=dgate_dtype is not None, COMPUTE_DW=dweight_dtype is not None,
            BLOCK_N=block, SINGLE_BLOCK=single, RNE_BY_HAND=interpreted(), num_warps=num_warps,
            enable_fp_fusion=FP_FUSION,
        )
    # A fixed-shape torch sum: the same partials give the same bits on every run.
    dweight = dw_part.sum(0).to(dweight_dtype) if dweight_dtype else dw_part
    return dx, dgate, dweight


# ---------------------------------------------------------------------------------------------
# Custom ops: what torch.compile sees.


@torch.library.custom_op("normkit::gated_rms_norm_fwd", mutates_args=())
def _fwd_op(x: Tensor, gate: Tensor | None, weight: Tensor | None, eps: float, group_size: int,
            norm_before_gate: bool) -> tuple[Tensor, Tensor]:
    return gated_rms_norm_fwd(x, gate, weight, eps, group_size, norm_before_gate)


@_fwd_op.register_fake
def _(x, gate, weight, eps, group_size, norm_before_gate):
    M, D = x.shape
    return x.new_empty((M, D)), x.new_empty((M * (D // group_size),), dtype=torch.float32)


@torch.library.custom_op("normkit::gated_rms_norm_bwd", mutates_args=())
def _bwd_op(dy: Tensor, x: Tensor, gate: Tensor | None, weight: Tensor | None, rstd: Tensor, group_size: int,
            norm_before_gate: bool, dgate_dtype: torch.dtype | None,
            dweight_dtype: torch.dtype | None) -> tuple[Tensor, Tensor, Tensor]:
    return gated_rms_norm_bwd(dy, x, gate, weight, rstd, group_size, norm_before_gate, dgate_dtype, dweight_dtype)


@_bwd_op.register_fake
def _(dy, x, gate, weight, rstd, group_size, norm_before_gate, dgate_dtype, dweight_dtype):
    M, D = x.shape
    dgate = x.new_empty((M, D) if dgate_dtype else (0,), dtype=dgate_dtype or x.dtype)
    dweight = x.new_empty((D,) if dweight_dtype else (0,), dtype=dweight_dtype or torch.float32)
    return x.new_empty((M, D)), dgate, dweight


def _setup_context(ctx, inputs, output) -> None:
    x, gate, weight, eps, group_size, norm_before_gate = inputs
    ctx.set_materialize_grads(False)  # rstd is an output nobody differentiates
    ctx.save_for_backward(x, gate, weight, output[1])
    ctx.meta = (group_size, norm_before_gate)
    ctx.eps = eps


def _backward(ctx, dy, _drstd):
    x, gate, weight, rstd = ctx.saved_tensors
    group_size, norm_before_gate = ctx.meta
    need = ctx.needs_input_grad
    if dy is None:  # y unused
        return (None,) * 6
    dgate_dtype = gate.dtype if gate is not None and need[1] else None
    dweight_dtype = weight.dtype if weight is not None and need[2] else None
    dx, dgate, dweight = _backward_call(dy, x, gate, weight, rstd, group_size, norm_before_gate, dgate_dtype,
                                        dweight_dtype)
    return (dx if need[0] else None, dgate if dgate_dtype else None, dweight if dweight_dtype else None,
            None, None, None)


torch.library.register_autograd("normkit::gated_rms_norm_fwd", _backward, setup_context=_setup_context)
vmap_by_loop(_fwd_op)
vmap_by_loop(_bwd_op)
_forward_call, _backward_call = eager_and_compiled(_fwd_op, _setup_context, _backward, _bwd_op,
                                                   graph_backward=_graph_backward.gated)


def _rows(t: Tensor) -> Tensor:
    """``(*, D)`` as ``(M, D)`` rows: a view when the rows are evenly strided, unit element stride."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def gated_rms_norm(input: Tensor, gate: Tensor | None, weight: Tensor | None, eps: float, group_size: int,
                   norm_before_gate: bool) -> Tensor:
    """:func:`normkit.functional.gated_rms_norm` in one kernel each way (input, gate and
    weight gradients)."""
    y, _ = _forward_call(_rows(input), None if gate is None else _rows(gate), weight, eps, group_size,
                         norm_before_gate)
    return y.view(input.shape)
