"""Launchers, ``torch.library`` custom ops and the public Triton ``qk_rms_norm`` and
``sandwich_rms_norm``, one launch each way (kernels: :mod:`normkit.ops.triton.qk_sandwich_kernels`):

* ``normkit::qk_rms_norm_fwd(q, k, q_weight, k_weight, eps) -> (q_out, k_out, q_rstd, k_rstd)``
* ``normkit::qk_rms_norm_bwd(dq_out, dk_out, q, k, q_weight, k_weight, q_rstd, k_rstd, ...)
  -> (dq, dk, dq_weight, dk_weight)``
* ``normkit::sandwich_rms_norm_fwd(hidden, residual, post_weight, next_weight, eps, offset)
  -> (y, residual_out, rstd1, rstd2)``
* ``normkit::sandwich_rms_norm_bwd(dy, dresidual_out, hidden, residual_out, ...)
  -> (dhidden, dresidual, dpost_weight, dnext_weight)``

with fake (meta) implementations, so ``torch.compile(fullgraph=True)`` traces through without a
graph break, called through :func:`~normkit.ops.triton._launch.eager_and_compiled` as the row
norms are (forward mode refused, ``torch.func`` reverse mode and ``vmap`` supported: one call
per batch element).

Rows: a tensor's rows are read in place when one row stride describes them (contiguous, a
padded or sliced batch) or when the tensor is dense in another order (q or k transposed to
``(B, H, L, D)``: its rows are then walked in memory order, and the outputs get its strides);
anything else is copied once. Tensors read together (dy with x, residual with hidden) are
brought into the same row order.

Tiles: ``BLOCK_D`` covers the row when it is at most :data:`SINGLE_TILE` elements (per
kernel) and a tile takes as many rows as fit :data:`ROWS_TILE` elements; a wider row streams
through 4096-wide tiles. ``block_n=`` or
``NORMKIT_TRITON_BLOCK_N`` caps the tile (how the tests reach the chunked path).
"""

from __future__ import annotations

import torch
from torch import Tensor

from normkit.numerics import rms_eps
from normkit.ops._autograd import without_graph
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
from normkit.ops.triton.occupancy import resident_programs
from normkit.ops.triton.qk_sandwich_kernels import (
    qk_rms_norm_bwd_kernel,
    qk_rms_norm_fwd_kernel,
    sandwich_rms_norm_bwd_kernel,
    sandwich_rms_norm_fwd_kernel,
)

__all__ = ["ROWS_TILE", "SINGLE_TILE", "qk_rms_norm", "sandwich_rms_norm"]

# Widest row held in registers whole, in elements, per kernel (halved again for a backward of
# fp32 input). The sandwich backward keeps twice the live tiles of an RMSNorm backward (hidden,
# residual_out, dy, dr_out, dr and two weight-gradient sums): compiled for sm_90 with 16 warps,
# its 8192-wide bf16 tile spills (128 registers, 340 bytes), its 4096-wide one does not (116);
# the QK kernels take the row norms' widths without spilling. Not yet timed on a GPU.
SINGLE_TILE = {"fwd": 16384, "bwd": 8192, "sandwich_bwd": 4096}
# Elements of a tile of several short rows (head dims): 16 rows of 128.
ROWS_TILE = 2048


def _blocks(D: int, M: int, direction: str, element_size: int, block_n: int | None) -> tuple[int, int, bool, int]:
    """``(BLOCK_M, BLOCK_D, SINGLE_BLOCK, num_warps)`` for rows of ``D`` elements, ``M`` rows at most."""
    block_n = block_override(block_n)
    single = SINGLE_TILE[direction] // (2 if direction != "fwd" and element_size > 2 else 1)
    block_d = min(next_power_of_2(D), block_n or single)
    if block_n is None and block_d < D:
        block_d = min(4096, single)  # the chunk of a row too wide for one tile
    block_m = max(1, min((block_n or ROWS_TILE) // block_d, next_power_of_2(max(M, 1))))
    num_warps = min(max(block_m * block_d // 256, 1), 16)
    return block_m, block_d, block_d >= D, num_warps


def _programs(M: int, block_m: int, num_warps: int, device: torch.device, share: int = 1) -> int:
    """Programs of a backward over ``M`` rows: ``1 / share`` of one wave of resident programs
    (:mod:`~normkit.ops.triton.occupancy`; each writes a D-wide row of weight-gradient partials),
    a handful on the CPU interpreter, and no more than the tiles of ``block_m`` rows (the kernels
    share the tiles out evenly)."""
    resident = resident_programs(device, num_warps)
    target = 4 if resident is None else max(1, resident // share)
    return min(cdiv(M, block_m), target)


# ---------------------------------------------------------------------------------------------
# Rows of a tensor as an (M, D) view with unit element stride.


def _dense(t: Tensor) -> bool:
    """``t``'s elements fill a block of memory, each once, in some order of its dims."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride(), strict=True) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _in_memory_order(t: Tensor) -> bool:
    """``t``'s rows are walked in memory order: no single row stride describes them in their
    logical order, but ``t`` is dense with the last dim innermost (a transposed q or k)."""
    if t.stride(-1) == 1 or t.shape[-1] == 1:
        try:
            t.view(-1, t.shape[-1])
            return False
        except RuntimeError:
            pass
    return _dense(t) and t.stride(-1) == 1


def _rows(t: Tensor) -> Tensor:
    """The ``(M, D)`` rows of ``t``, in place where possible (see the module docstring)."""
    D = t.shape[-1]
    if _in_memory_order(t):
        return t.as_strided((t.numel() // D, D), (D, 1))
    if t.stride(-1) == 1 or D == 1:
        try:
            return t.view(-1, D)
        except RuntimeError:
            pass
    return t.contiguous().view(-1, D)


def _out_like(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An output whose rows :func:`_rows` walks in ``t``'s row order, in place: ``t``'s strides
    when it is dense with a unit-stride last dim, else contiguous (an output with another last-dim
    stride would be walked through a copy, and the kernel's writes would land in the copy)."""
    if _dense(t) and (t.stride(-1) == 1 or t.shape[-1] == 1):
        return torch.empty_like(t, dtype=dtype)
    return t.new_empty(t.shape, dtype=dtype)


def _matching(t: Tensor, x: Tensor) -> Tensor:
    """``t`` (x's shape) in a layout whose rows :func:`_rows` walks in ``x``'s order."""
    if t.stride() == x.stride() or not (_in_memory_order(t) or _in_memory_order(x)):
        return t
    return _out_like(x, t.dtype).copy_(t)


def _partials(rows: int, D: int, dtype: torch.dtype | None, device: torch.device) -> Tensor:
    return torch.empty((rows, D) if dtype is not None else (0,), dtype=torch.float32, device=device)


def _reduce(part: Tensor, dtype: torch.dtype | None, D: int) -> Tensor:
    """A weight gradient from its per-program partials, summed in a fixed order (bit-reproducible)."""
    if dtype is None:
        return part
    return part.sum(0).to(dtype) if part.shape[0] else part.new_zeros((D,), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# QK-norm.


def qk_rms_norm_fwd(q: Tensor, k: Tensor, q_weight: Tensor | None, k_weight: Tensor | None, *, eps: float,
                    block_n: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(q_out, k_out, q_rstd, k_rstd)``: the rows of q then of k in one launch; rstd fp32 ``(M,)``."""
    D = q.shape[-1]
    q_weight, k_weight = dense(q_weight), dense(k_weight)
    q_out, k_out = _out_like(q), _out_like(k)
    q_rows, k_rows, qy_rows, ky_rows = _rows(q), _rows(k), _rows(q_out), _rows(k_out)
    MQ, MK = q_rows.shape[0], k_rows.shape[0]
    q_rstd = torch.empty((MQ,), dtype=torch.float32, device=q.device)
    k_rstd = torch.empty((MK,), dtype=torch.float32, device=q.device)
    block_m, block_d, single, num_warps = _blocks(D, max(MQ, MK), "fwd", max(q.element_size(), k.element_size()),
                                                  block_n)
    q_programs, k_programs = cdiv(MQ, block_m), cdiv(MK, block_m)
    with device_of(q):
        qk_rms_norm_fwd_kernel[(q_programs + k_programs,)](
            q_rows, k_rows, qy_rows, ky_rows, q_weight, k_weight, q_rstd, k_rstd,
            q_rows.stride(0), k_rows.stride(0), qy_rows.stride(0), ky_rows.stride(0),
            MQ, MK, D, q_programs, eps,
            Q_HAS_WEIGHT=q_weight is not None, K_HAS_WEIGHT=k_weight is not None,
            BLOCK_M=block_m, BLOCK_D=block_d, SINGLE_BLOCK=single, RNE_BY_HAND=interpreted(),
            num_warps=num_warps, enable_fp_fusion=FP_FUSION,
        )
    return q_out, k_out, q_rstd, k_rstd


def qk_rms_norm_bwd(dq_out: Tensor, dk_out: Tensor, q: Tensor, k: Tensor, q_weight: Tensor | None,
                    k_weight: Tensor | None, q_rstd: Tensor, k_rstd: Tensor, *, dqw_dtype: torch.dtype | None,
                    dkw_dtype: torch.dtype | None, block_n: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dq_weight, dk_weight)`` in one launch; a weight gradient whose dtype is None
    comes back empty."""
    D = q.shape[-1]
    dev = q.device
    q_weight, k_weight = dense(q_weight), dense(k_weight)
    dq, dk = _out_like(q), _out_like(k)
    q_rows, k_rows = _rows(q), _rows(k)
    dqy_rows, dky_rows = _rows(_matching(dq_out, q)), _rows(_matching(dk_out, k))
    dq_rows, dk_rows = _rows(dq), _rows(dk)
    MQ, MK = q_rows.shape[0], k_rows.shape[0]
    block_m, block_d, single, num_warps = _blocks(D, max(MQ, MK), "bwd", max(q.element_size(), k.element_size()),
                                                  block_n)
    # q's and k's programs run in one launch: each gets half the wave.
    q_programs = _programs(MQ, block_m, num_warps, dev, share=2)
    k_programs = _programs(MK, block_m, num_warps, dev, share=2)
    dqw_part, dkw_part = _partials(q_programs, D, dqw_dtype, dev), _partials(k_programs, D, dkw_dtype, dev)
    row_dots = torch.empty((0 if single else MQ + MK,), dtype=torch.float32, device=dev)
    with device_of(q):
        qk_rms_norm_bwd_kernel[(q_programs + k_programs,)](
            q_rows, k_rows, dqy_rows, dky_rows, dq_rows, dk_rows, q_weight, k_weight, q_rstd, k_rstd,
            dqw_part, dkw_part, row_dots,
            q_rows.stride(0), k_rows.stride(0), dqy_rows.stride(0), dky_rows.stride(0), dq_rows.stride(0),
            dk_rows.stride(0),
            MQ, MK, D, q_programs, k_programs,
            Q_HAS_WEIGHT=q_weight is not None, K_HAS_WEIGHT=k_weight is not None,
            COMPUTE_DQW=dqw_dtype is not None, COMPUTE_DKW=dkw_dtype is not None,
            BLOCK_M=block_m, BLOCK_D=block_d, SINGLE_BLOCK=single, RNE_BY_HAND=interpreted(),
            num_warps=num_warps, enable_fp_fusion=FP_FUSION,
        )
    return dq, dk, _reduce(dqw_part, dqw_dtype, D), _reduce(dkw_part, dkw_dtype, D)


@torch.library.custom_op("normkit::qk_rms_norm_fwd", mutates_args=())
def _qk_fwd_op(q: Tensor, k: Tensor, q_weight: Tensor | None, k_weight: Tensor | None,
               eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return qk_rms_norm_fwd(q, k, q_weight, k_weight, eps=eps)


@_qk_fwd_op.register_fake
def _(q, k, q_weight, k_weight, eps):
    D = q.shape[-1]
    rstd = (t.new_empty((t.numel() // D,), dtype=torch.float32) for t in (q, k))
    return _out_like(q), _out_like(k), *rstd


@torch.library.custom_op("normkit::qk_rms_norm_bwd", mutates_args=())
def _qk_bwd_op(dq_out: Tensor, dk_out: Tensor, q: Tensor, k: Tensor, q_weight: Tensor | None,
               k_weight: Tensor | None, q_rstd: Tensor, k_rstd: Tensor, dqw_dtype: torch.dtype | None,
               dkw_dtype: torch.dtype | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return qk_rms_norm_bwd(dq_out, dk_out, q, k, q_weight, k_weight, q_rstd, k_rstd, dqw_dtype=dqw_dtype,
                           dkw_dtype=dkw_dtype)


@_qk_bwd_op.register_fake
def _(dq_out, dk_out, q, k, q_weight, k_weight, q_rstd, k_rstd, dqw_dtype, dkw_dtype):
    D = q.shape[-1]
    return _out_like(q), _out_like(k), *(q.new_empty((D,) if dt else (0,), dtype=dt or torch.float32)
                                         for dt in (dqw_dtype, dkw_dtype))


def _qk_setup_context(ctx, inputs, output) -> None:
    q, k, q_weight, k_weight, eps = inputs
    ctx.set_materialize_grads(False)  # the rstd outputs are never differentiated
    ctx.save_for_backward(q, k, q_weight, k_weight, output[2], output[3])
    ctx.eps = eps


def _qk_backward(ctx, dq_out, dk_out, _dq_rstd, _dk_rstd):
    q, k, q_weight, k_weight, q_rstd, k_rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    if dq_out is None and dk_out is None:
        return (None,) * 5
    dq_out = torch.zeros_like(q) if dq_out is None else dq_out
    dk_out = torch.zeros_like(k) if dk_out is None else dk_out
    dqw_dtype = q_weight.dtype if q_weight is not None and need[2] else None
    dkw_dtype = k_weight.dtype if k_weight is not None and need[3] else None
    dq, dk, dqw, dkw = _qk_backward_call(dq_out, dk_out, q, k, q_weight, k_weight, q_rstd, k_rstd,
                                         dqw_dtype, dkw_dtype)
    return (dq if need[0] else None, dk if need[1] else None, dqw if dqw_dtype else None,
            dkw if dkw_dtype else None, None)


torch.library.register_autograd("normkit::qk_rms_norm_fwd", _qk_backward, setup_context=_qk_setup_context)
vmap_by_loop(_qk_fwd_op)
vmap_by_loop(_qk_bwd_op)
_qk_forward, _qk_backward_call = eager_and_compiled(_qk_fwd_op, _qk_setup_context, _qk_backward, _qk_bwd_op,
                                                    graph_backward=_graph_backward.qk)


def qk_rms_norm(q: Tensor, k: Tensor, q_weight: Tensor | None, k_weight: Tensor | None,
                eps: float | None = None) -> tuple[Tensor, Tensor]:
    """``(rms_norm(q, q_weight), rms_norm(k, k_weight))`` over the last dim, one launch each way
    (``eps=None``: machine epsilon of q's statistics dtype, float32)."""
    q_out, k_out, _, _ = _qk_forward(q, k, q_weight, k_weight, rms_eps(eps, q.dtype))
    return without_graph(q_out, q, q_weight), without_graph(k_out, k, k_weight)


# ---------------------------------------------------------------------------------------------
# Sandwich norm.


def sandwich_rms_norm_fwd(hidden: Tensor, residual: Tensor, post_weight: Tensor | None,
                          next_weight: Tensor | None, *, eps: float, offset: float,
                          block_n: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, residual_out, rstd1, rstd2)``; ``residual_out`` is in residual's dtype and in
    hidden's row order (the backward reads it back with hidden)."""
    D = hidden.shape[-1]
    post_weight, next_weight = dense(post_weight), dense(next_weight)
    y, residual_out = _out_like(hidden), _out_like(hidden, residual.dtype)
    h_rows, res_rows = _rows(hidden), _rows(_matching(residual, hidden))
    y_rows, rout_rows = _rows(y), _rows(residual_out)
    M = h_rows.shape[0]
    rstd1 = torch.empty((M,), dtype=torch.float32, device=hidden.device)
    rstd2 = torch.empty_like(rstd1)
    block_m, block_d, single, num_warps = _blocks(D, M, "fwd", max(hidden.element_size(), residual.element_size()),
                                                  block_n)
    with device_of(hidden):
        sandwich_rms_norm_fwd_kernel[(cdiv(M, block_m),)](
            h_rows, res_rows, y_rows, rout_rows, post_weight, next_weight, rstd1, rstd2,
            h_rows.stride(0), res_rows.stride(0), y_rows.stride(0), rout_rows.stride(0),
            M, D, eps, offset,
            HAS_W1=post_weight is not None, HAS_W2=next_weight is not None,
            BLOCK_M=block_m, BLOCK_D=block_d, SINGLE_BLOCK=single, RNE_BY_HAND=interpreted(),
            num_warps=num_warps, enable_fp_fusion=FP_FUSION,
        )
    return y, residual_out, rstd1, rstd2


def sandwich_rms_norm_bwd(dy: Tensor, dresidual_out: Tensor, hidden: Tensor, residual_out: Tensor,
                          post_weight: Tensor | None, next_weight: Tensor | None, rstd1: Tensor, rstd2: Tensor, *,
                          offset: float, dw1_dtype: torch.dtype | None, dw2_dtype: torch.dtype | None,
                          block_n: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dhidden, dresidual, dpost_weight, dnext_weight)`` in one launch (dresidual in
    residual_out's dtype); a weight gradient whose dtype is None comes back empty."""
    D = hidden.shape[-1]
    dev = hidden.device
    post_weight, next_weight = dense(post_weight), dense(next_weight)
    dh, dres = _out_like(hidden), _out_like(hidden, residual_out.dtype)
    h_rows, rout_rows = _rows(hidden), _rows(residual_out)
    dy_rows, drout_rows = _rows(_matching(dy, hidden)), _rows(_matching(dresidual_out, hidden))
    dh_rows, dres_rows = _rows(dh), _rows(dres)
    M = h_rows.shape[0]
    block_m, block_d, single, num_warps = _blocks(D, M, "sandwich_bwd", max(hidden.element_size(), dres.element_size()),
                                                  block_n)
    programs = _programs(M, block_m, num_warps, dev)
    dw1_part, dw2_part = _partials(programs, D, dw1_dtype, dev), _partials(programs, D, dw2_dtype, dev)
    row_dots = torch.empty((0 if single else 2 * M,), dtype=torch.float32, device=dev)
    with device_of(hidden):
        sandwich_rms_norm_bwd_kernel[(programs,)](
            h_rows, rout_rows, dy_rows, drout_rows, dh_rows, dres_rows, post_weight, next_weight, rstd1, rstd2,
            dw1_part, dw2_part, row_dots,
            h_rows.stride(0), rout_rows.stride(0), dy_rows.stride(0), drout_rows.stride(0), dh_rows.stride(0),
            dres_rows.stride(0),
            M, D, programs, offset,
            HAS_W1=post_weight is not None, HAS_W2=next_weight is not None,
            COMPUTE_DW1=dw1_dtype is not None, COMPUTE_DW2=dw2_dtype is not None,
            BLOCK_M=block_m, BLOCK_D=block_d, SINGLE_BLOCK=single, RNE_BY_HAND=interpreted(),
            num_warps=num_warps, enable_fp_fusion=FP_FUSION,
        )
    return dh, dres, _reduce(dw1_part, dw1_dtype, D), _reduce(dw2_part, dw2_dtype, D)


@torch.library.custom_op("normkit::sandwich_rms_norm_fwd", mutates_args=())
def _sandwich_fwd_op(hidden: Tensor, residual: Tensor, post_weight: Tensor | None, next_weight: Tensor | None,
                     eps: float, offset: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return sandwich_rms_norm_fwd(hidden, residual, post_weight, next_weight, eps=eps, offset=offset)


@_sandwich_fwd_op.register_fake
def _(hidden, residual, post_weight, next_weight, eps, offset):
    M = hidden.numel() // hidden.shape[-1]
    rstd = (hidden.new_empty((M,), dtype=torch.float32) for _ in range(2))
    return _out_like(hidden), _out_like(hidden, residual.dtype), *rstd


@torch.library.custom_op("normkit::sandwich_rms_norm_bwd", mutates_args=())
def _sandwich_bwd_op(dy: Tensor, dresidual_out: Tensor, hidden: Tensor, residual_out: Tensor,
                     post_weight: Tensor | None, next_weight: Tensor | None, rstd1: Tensor, rstd2: Tensor,
                     offset: float, dw1_dtype: torch.dtype | None,
                     dw2_dtype: torch.dtype | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return sandwich_rms_norm_bwd(dy, dresidual_out, hidden, residual_out, post_weight, next_weight, rstd1, rstd2,
                                 offset=offset, dw1_dtype=dw1_dtype, dw2_dtype=dw2_dtype)


@_sandwich_bwd_op.register_fake
def _(dy, dresidual_out, hidden, residual_out, post_weight, next_weight, rstd1, rstd2, offset, dw1_dtype,
      dw2_dtype):
    D = hidden.shape[-1]
    return _out_like(hidden), _out_like(hidden, residual_out.dtype), *(
        hidden.new_empty((D,) if dt else (0,), dtype=dt or torch.float32) for dt in (dw1_dtype, dw2_dtype))


def _sandwich_setup_context(ctx, inputs, output) -> None:
    hidden, residual, post_weight, next_weight, eps, offset = inputs
    ctx.set_materialize_grads(False)  # the rstd outputs are never differentiated
    # The backward reads what was normalized: hidden, and residual_out as stored.
    ctx.save_for_backward(hidden, output[1], post_weight, next_weight, output[2], output[3])
    ctx.offset, ctx.eps = offset, eps


def _sandwich_backward(ctx, dy, dresidual_out, _drstd1, _drstd2):
    hidden, residual_out, post_weight, next_weight, rstd1, rstd2 = ctx.saved_tensors
    need = ctx.needs_input_grad
    if dy is None and dresidual_out is None:
        return (None,) * 6
    dy = torch.zeros_like(hidden) if dy is None else dy
    dresidual_out = torch.zeros_like(residual_out) if dresidual_out is None else dresidual_out
    dw1_dtype = post_weight.dtype if post_weight is not None and need[2] else None
    dw2_dtype = next_weight.dtype if next_weight is not None and need[3] else None
    dh, dres, dw1, dw2 = _sandwich_backward_call(dy, dresidual_out, hidden, residual_out, post_weight, next_weight,
                                                 rstd1, rstd2, ctx.offset, dw1_dtype, dw2_dtype)
    return (dh if need[0] else None, dres if need[1] else None, dw1 if dw1_dtype else None,
            dw2 if dw2_dtype else None, None, None)


torch.library.register_autograd("normkit::sandwich_rms_norm_fwd", _sandwich_backward,
                                setup_context=_sandwich_setup_context)
vmap_by_loop(_sandwich_fwd_op)
vmap_by_loop(_sandwich_bwd_op)
_sandwich_forward, _sandwich_backward_call = eager_and_compiled(_sandwich_fwd_op, _sandwich_setup_context,
                                                                _sandwich_backward, _sandwich_bwd_op,
                                                                graph_backward=_graph_backward.sandwich)


def sandwich_rms_norm(hidden: Tensor, residual: Tensor, post_weight: Tensor | None, next_weight: Tensor | None,
                      eps: float | None = None, weight_offset: float = 0.0) -> tuple[Tensor, Tensor]:
    """``(y, residual_out)`` of the Gemma sandwich step, one launch each way: ``residual_out =
    residual + rms_norm(hidden, post_weight + weight_offset)`` (in residual's dtype), ``y =
    rms_norm(residual_out, next_weight + weight_offset)`` (in hidden's)."""
    y, residual_out, _, _ = _sandwich_forward(hidden, residual, post_weight, next_weight,
                                              rms_eps(eps, hidden.dtype), float(weight_offset))
    return y, without_graph(residual_out, hidden, residual, post_weight)
