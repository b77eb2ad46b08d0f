"""How many programs of a reducing kernel a GPU runs at once: the grids of the launchers that
choose one (issue 15 item 8).

A reducing kernel (BatchNorm's statistics and backward sums, the block norms' backwards) walks
a run of rows or tiles per program and writes one row of partial sums, which the launcher then
adds in a fixed order. Its launcher picks the number of programs: one wave of resident programs
is the fewest partials (the least extra traffic) that still keeps every SM busy. An sm_90 SM holds
at most :data:`WARPS` warps, :data:`CTAS` programs and :data:`REGISTERS` registers, allocated
per warp in units of 256 (8 a thread), so it runs

    min(WARPS // warps, REGISTERS // (warps * 32 * registers rounded up to 8), CTAS)

programs of ``warps`` warps at once: 2 of 8 warps at 128 registers a thread, 1 of 16.

A kernel's registers are known only once ptxas has compiled it, after the grid is needed. The
launchers plan for :data:`REGISTER_BUDGET` a thread, and the static report
(``make kernel-report``, checked by ``tests/test_kernel_report.py``) fails any kernel of
:data:`PLANNED` compiled above it, so a plan never counts on programs that cannot be resident.

What only a GPU can decide: whether a second wave, or a budget lower than the registers allow,
hides more memory latency than its extra partials cost; the shared memory of the reductions
(Triton's scratch for a sum across warps, a few KB a program against 228 KB), which this count
leaves out; and whether these kernels should pipeline their row loops (``tl.range`` stages),
which changes both registers and shared memory.
"""

from __future__ import annotations

import torch

from normkit.ops.triton._launch import sm_count

__all__ = ["CTAS", "PLANNED", "REGISTERS", "REGISTER_BUDGET", "WARPS", "ctas_per_sm", "resident_programs"]

WARPS = 64  # per SM, sm_90
CTAS = 32
REGISTERS = 65536
REGISTER_BUDGET = 128  # a thread, what the launchers plan for

# The kernels whose grid is sized here (the report checks their registers against the budget).
PLANNED = frozenset(
    {
        "batch_norm_stats_kernel",
        "batch_norm_bwd_reduce_kernel",
        "modulated_norm_bwd_kernel",
        "gated_rms_norm_bwd_kernel",
        "qk_rms_norm_bwd_kernel",
        "sandwich_rms_norm_bwd_kernel",
        "norm_free_bwd_kernel",
    }
)


def ctas_per_sm(num_warps: int, registers: int = REGISTER_BUDGET) -> int:
    """Programs of ``num_warps`` warps and ``registers`` a thread one SM holds at once."""
    per_warp = -(-registers // 8) * 8 * 32
    return max(1, min(WARPS // num_warps, REGISTERS // (num_warps * per_warp), CTAS))


def resident_programs(device: torch.device, num_warps: int) -> int | None:
    """One wave of programs of ``num_warps`` warps on ``device``'s SMs (the planned SM count
    under :func:`~normkit.ops.triton._launch.planned_for`); None without a GPU (the CPU
    interpreter, where the launchers take a handful)."""
    sms = sm_count(device)
    return None if sms is None else sms * ctas_per_sm(num_warps)
