"""How many programs the row norms launch (issue 15 item 8), and that a row's result does not
depend on how rows are dealt to programs.

The backward takes one wave of the programs an SM holds at occupancy's register budget
(normkit.ops.triton.occupancy); the forward of short rows takes several rows per program. The
grids are planned for an H100 (132 SMs) on the CPU with every launch recorded, not run."""

from __future__ import annotations

import os

import pytest
import torch

from normkit.ops.triton import backend as triton_backend

pytestmark = pytest.mark.skipif(not triton_backend.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton's interpreter is not on here")

if triton_backend.is_available():
    from normkit.ops.triton import occupancy, row_norm
    from normkit.ops.triton._launch import planned_for
    from normkit.ops.triton.static_report import recorded_launches

SMS = 132


def _grids(shape: tuple[int, ...], dtype: torch.dtype = torch.bfloat16) -> dict[str, tuple]:
    x = torch.empty(shape, dtype=dtype, requires_grad=True)
    w = torch.empty(shape[-1], dtype=dtype, requires_grad=True)
    with planned_for(SMS), recorded_launches() as launches:
        y = row_norm.rms_norm(x, (shape[-1],), w)
        y.backward(torch.empty_like(y))
    return {launch.name: (launch.grid, launch.kwargs["num_warps"]) for launch in launches}


@pytest.mark.parametrize("shape", [(16384, 768), (4096, 4096), (4096, 8192), (3, 4096)])
def test_backward_takes_one_wave_of_resident_programs(shape) -> None:
    grid, warps = _grids(shape)["row_norm_bwd_kernel"]
    assert grid[0] == min(shape[0], SMS * occupancy.ctas_per_sm(warps))
    assert grid[0] >= min(shape[0], SMS)  # every SM has a program when there are rows enough


def test_short_rows_take_several_rows_per_program_in_the_forward() -> None:
    """16384 rows of 768: 2112 programs (four waves at the register budget, one at the ~32
    registers the kernel compiles to) of 7-8 rows; rows wider than SHORT_ROW keep one program."""
    grid, warps = _grids((16384, 768))["row_norm_fwd_kernel"]
    assert grid[0] == row_norm.FWD_WAVES * SMS * occupancy.ctas_per_sm(warps) == 2112
    assert _grids((4096, 4096))["row_norm_fwd_kernel"][0][0] == 4096


@pytest.mark.parametrize("norm", ["layer_norm", "add_rms_norm", "group_norm"])
def test_a_rows_bits_do_not_depend_on_the_rows_of_its_program(norm, monkeypatch: pytest.MonkeyPatch) -> None:
    """13 rows dealt to 1, 4 (the interpreter's default: 3-4 rows each) or 13 programs: the same
    bits of the output and the input gradient (dw/db add per-program partials, so their order
    follows the programs)."""
    gen = torch.Generator().manual_seed(21)
    x, res, dy = (torch.randn(13, 6, 8, generator=gen) for _ in range(3))
    w, b = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    wg, bg = torch.randn(6, generator=gen), torch.randn(6, generator=gen)

    def step():
        xl = x.clone().requires_grad_()
        if norm == "layer_norm":
            out = row_norm.layer_norm(xl, (8,), w, b)
        elif norm == "add_rms_norm":
            out = row_norm.add_rms_norm(xl, res, (8,), w).y
        else:
            out = row_norm.group_norm(xl.view(13, 6, 2, 4), 3, wg, bg).view(13, 6, 8)
        return [out.detach(), *torch.autograd.grad(out, xl, dy)]

    default = step()
    for programs in (1, 13):
        monkeypatch.setattr(row_norm, "_program_count", lambda M, *a, p=programs, **k: min(M, p))
        assert all(torch.equal(a, b) for a, b in zip(default, step(), strict=True)), programs
