"""The gated RMSNorm kernels (Mamba2, Bamba, Falcon-H1): one pair, forward and backward.

A row of these kernels is one group: ``N`` consecutive channels of one row of the ``(M, D)``
input, ``GROUPS = D / N`` groups per input row. Group row ``row = m * GROUPS + k`` starts at
``m * stride + k * N`` (unit element stride; every tensor has its own row stride), and its
weight is ``W[k * N:(k + 1) * N]``. With ``a = silu(z)`` (``z`` the gate)::

    u = x * a   (GATE_FIRST: Mamba2's norm_before_gate=False)     u = x  (otherwise)
    y = u * rstd * w          * a   (norm_before_gate=True only: HAS_GATE and not GATE_FIRST)

The formulas of both directions are those of :mod:`normkit.blocks.gated`.

Numerics, as the row norms (:mod:`normkit.ops.triton.row_norm_kernels`): the gate and the
statistic in fp32 whatever the dtypes; the mean square of ``u / scale`` with ``scale`` a power of
two near ``max |u|`` (per tile, merged with Chan's formula at the larger scale), so squares
neither overflow nor underflow; ``rstd`` from :func:`~normkit.ops.triton.jit_helpers.rstd_of`
(IEEE square root and division, 0 where ``mean + eps == 0``); one rounding of each output. The
forward stores ``rstd`` per group row (fp32); the backward recomputes ``u`` from x and the gate,
bit for bit as the forward did. Offsets are int64. A group that fits one tile (``SINGLE_BLOCK``)
is read once; a wider one twice each way.

The backward is deterministic (no atomics): program ``pid`` owns group ``k = pid % GROUPS`` of
the rows ``[p * rows_per_program, ...)``, ``p = pid // GROUPS``, keeps the weight gradient of
its tile columns in registers across its rows and writes it to row ``p`` of a ``[P, D]`` fp32
buffer, which the launcher sums in a fixed order.
"""

from __future__ import annotations

import triton
import triton.language as tl

from normkit.ops.triton.jit_helpers import activate, activate_grad, cast_to, chan_merge, pow2_floor, rstd_of

__all__ = ["gated_rms_norm_bwd_kernel", "gated_rms_norm_fwd_kernel"]

SILU: tl.constexpr = tl.constexpr(2)  # jit_helpers.ACT_CODES["silu"]


@triton.jit
def _group_start(row, N, GROUPS, stride):
    """Offset of group row ``row`` (input row ``row // GROUPS``, group ``row % GROUPS``);
    GROUPS = 1 is specialized, so one group per row pays no division."""
    return (row // GROUPS) * stride + (row % GROUPS) * N


@triton.jit
def _cols(c0, N, BLOCK_N: tl.constexpr):
    cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
    return cols, cols < N


@triton.jit
def _load_u(X, Z, cols, mask, HAS_GATE: tl.constexpr, GATE_FIRST: tl.constexpr):
    """``(x, z, a, u)`` of one tile of a group, fp32 (z and a are 0.0 without a gate)."""
    x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
    z = 0.0
    a = 0.0
    u = x
    if HAS_GATE:
        z = tl.load(Z + cols, mask=mask, other=0.0).to(tl.float32)
        a = activate(z, SILU)
        if GATE_FIRST:
            u = x * a
    return x, z, a, u


@triton.jit
def _store_y(Y, W, u, a, rstd, cols, mask, HAS_GATE: tl.constexpr, GATE_FIRST: tl.constexpr,
             HAS_WEIGHT: tl.constexpr, RNE_BY_HAND: tl.constexpr):
    y = u * rstd
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE and not GATE_FIRST:
        y = y * a
    tl.store(Y + cols, cast_to(y, Y, RNE_BY_HAND), mask=mask)


@triton.jit
def gated_rms_norm_fwd_kernel(
    X, Z, W, Y, RSTD,
    stride_x, stride_z, stride_y,
    N, GROUPS, eps,
    HAS_GATE: tl.constexpr, GATE_FIRST: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr, SINGLE_BLOCK: tl.constexpr, RNE_BY_HAND: tl.constexpr,
):
    """One program per group row: its rstd, then ``y``; stores the rstd."""
    row = tl.program_id(0).to(tl.int64)
    X += _group_start(row, N, GROUPS, stride_x)
    Y += _group_start(row, N, GROUPS, stride_y)
    if HAS_GATE:
        Z += _group_start(row, N, GROUPS, stride_z)
    W += (row % GROUPS) * N
    n = N * 1.0  # (not .to(): Triton passes an int argument equal to 1 as a constant)
    if SINGLE_BLOCK:
        cols, mask = _cols(0, N, BLOCK_N)
        _, _, a, u = _load_u(X, Z, cols, mask, HAS_GATE, GATE_FIRST)
        scale = pow2_floor(tl.max(tl.abs(u)))
        u_s = u * (1.0 / scale)
        rstd = rstd_of(tl.sum(u_s * u_s) / n, scale, eps)
        _store_y(Y, W, u, a, rstd, cols, mask, HAS_GATE, GATE_FIRST, HAS_WEIGHT, RNE_BY_HAND)
    else:
        # Pass 1: per-tile sums of squares merged at the larger scale (the mean is 0: not centred).
        m2 = 0.0
        scale = 0.0
        count = 0.0
        for c0 in range(0, N, BLOCK_N):
            cols, mask = _cols(c0, N, BLOCK_N)
            _, _, _, u = _load_u(X, Z, cols, mask, HAS_GATE, GATE_FIRST)
            scale_b = pow2_floor(tl.max(tl.abs(u)))
            u_s = u * (1.0 / scale_b)
            n_b = tl.minimum(N - c0, BLOCK_N) * 1.0
            _, m2, scale, count = chan_merge(0.0, m2, scale, count, 0.0, tl.sum(u_s * u_s), scale_b, n_b)
        rstd = rstd_of(m2 / n, scale, eps)
        for c0 in range(0, N, BLOCK_N):
            cols, mask = _cols(c0, N, BLOCK_N)
            _, _, a, u = _load_u(X, Z, cols, mask, HAS_GATE, GATE_FIRST)
            _store_y(Y, W, u, a, rstd, cols, mask, HAS_GATE, GATE_FIRST, HAS_WEIGHT, RNE_BY_HAND)
    tl.store(RSTD + row, rstd)


@triton.jit
def _grad_terms(X, Z, DY, RSTD, w, row, cols, mask, HAS_GATE: tl.constexpr, GATE_FIRST: tl.constexpr,
                HAS_WEIGHT: tl.constexpr):
    """One tile of group row ``row`` (X, Z, DY at its start): ``(x, z, a, dy, u_hat, g, gh,
    rstd)`` with ``g = dy * w`` and ``gh`` the gradient at ``u_hat`` (``g * a`` when the gate
    comes after the norm)."""
    x, z, a, u = _load_u(X, Z, cols, mask, HAS_GATE, GATE_FIRST)
    dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + row)
    u_hat = u * rstd  # masked lanes: dy = 0 zeroes every product below
    g = dy
    if HAS_WEIGHT:
        g = dy * w
    gh = g
    if HAS_GATE and not GATE_FIRST:
        gh = g * a
    return x, z, a, dy, u_hat, g, gh, rstd


# M (the row count, which varies with the batch) only bounds the row loop: not specialized, so
# a new batch size does not recompile. rows_per_program stays specialized (1 drops the loop).
@triton.jit(do_not_specialize=["M"])
def gated_rms_norm_bwd_kernel(
    X, Z, W, RSTD, DY, DX, DZ, DW_PART, ROW_DOTS,
    stride_x, stride_z, stride_dy, stride_dx, stride_dz,
    M, N, GROUPS, rows_per_program,
    HAS_GATE: tl.constexpr, GATE_FIRST: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    COMPUTE_DZ: tl.constexpr, COMPUTE_DW: tl.constexpr,
    BLOCK_N: tl.constexpr, SINGLE_BLOCK: tl.constexpr, RNE_BY_HAND: tl.constexpr,
):
    """``du = rstd * (gh - u_hat * c)`` with ``c = mean(gh * u_hat)`` over the group, then
    ``dx``, ``dz`` and the weight-gradient partial (:mod:`normkit.blocks.gated`). A wide group
    first stores ``c`` in ``ROW_DOTS[row]``; the gradient pass then walks tile columns
    outermost so the weight-gradient columns stay in registers across the program's rows."""
    pid = tl.program_id(0)
    k = pid % GROUPS
    p = pid // GROUPS
    m_start = p.to(tl.int64) * rows_per_program  # int64: m * stride may pass 2**31
    m_end = tl.minimum(m_start + rows_per_program, M)
    W += k * N
    n = N * 1.0

    if not SINGLE_BLOCK:
        for m in range(m_start, m_end):
            row = m * GROUPS + k
            c = 0.0
            for c0 in range(0, N, BLOCK_N):
                cols, mask = _cols(c0, N, BLOCK_N)
                w = 1.0
                if HAS_WEIGHT:
                    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                _, _, _, _, u_hat, _, gh, _ = _grad_terms(
                    X + _group_start(row, N, GROUPS, stride_x), Z + _group_start(row, N, GROUPS, stride_z),
                    DY + _group_start(row, N, GROUPS, stride_dy), RSTD, w, row, cols, mask,
                    HAS_GATE, GATE_FIRST, HAS_WEIGHT)
                c += tl.sum(gh * u_hat)
            tl.store(ROW_DOTS + row, c / n)
        tl.debug_barrier()

    for c0 in range(0, N, BLOCK_N):
        cols, mask = _cols(c0, N, BLOCK_N)
        w = 1.0
        if HAS_WEIGHT:  # the same columns for every row of the program: load once
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for m in range(m_start, m_end):
            row = m * GROUPS + k
            x, z, a, dy, u_hat, g, gh, rstd = _grad_terms(
                X + _group_start(row, N, GROUPS, stride_x), Z + _group_start(row, N, GROUPS, stride_z),
                DY + _group_start(row, N, GROUPS, stride_dy), RSTD, w, row, cols, mask,
                HAS_GATE, GATE_FIRST, HAS_WEIGHT)
            if SINGLE_BLOCK:
                c = tl.sum(gh * u_hat) / n
            else:
                c = tl.load(ROW_DOTS + row)
            du = (gh - u_hat * c) * rstd
            dx = du
            if HAS_GATE and GATE_FIRST:
                dx = du * a
            tl.store(DX + _group_start(row, N, GROUPS, stride_dx) + cols, cast_to(dx, DX, RNE_BY_HAND), mask=mask)
            if COMPUTE_DZ:
                if GATE_FIRST:
                    dz = activate_grad(du * x, z, SILU)
                else:
                    dz = activate_grad(g * u_hat, z, SILU)
                tl.store(DZ + _group_start(row, N, GROUPS, stride_dz) + cols, cast_to(dz, DZ, RNE_BY_HAND),
                         mask=mask)
            if COMPUTE_DW:
                if HAS_GATE and not GATE_FIRST:
                    dw_acc += dy * u_hat * a
                else:
                    dw_acc += dy * u_hat
        if COMPUTE_DW:
            tl.store(DW_PART + p.to(tl.int64) * (GROUPS * N) + k * N + cols, dw_acc, mask=mask)
