"""The benchmark engine's page-fault count (normkit.tools.bench.minor_faults, the rows'
``<direction>_faults``) and make bench-cpu's table of it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from normkit.tools import bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_cpu  # noqa: E402

pytestmark = pytest.mark.skipif(bench.minor_faults() is None, reason="no page-fault count on this platform")

MIB_32 = 8 << 20  # float32 elements


def test_a_call_writing_fresh_memory_counts_its_faults() -> None:
    kept = torch.empty(MIB_32)

    def fresh() -> None:  # 32 MiB allocated and written each call (freed: above glibc's mmap threshold)
        torch.empty(MIB_32).fill_(1.0)

    def reused() -> None:
        kept.fill_(1.0)

    timers = {"fresh": bench._Timer(fresh, "cpu", 0.01), "reused": bench._Timer(reused, "cpu", 0.01)}
    bench._interleaved(timers, 3)
    fresh_faults, reused_faults = (min(t.faults) for t in timers.values())
    assert len(timers["fresh"].faults) == 3
    assert fresh_faults >= 16  # at least one per 2 MiB huge page; 8,192 per call in 4 KiB pages
    assert reused_faults < fresh_faults / 4


def test_rows_carry_the_median_faults_per_call() -> None:
    problems = bench.problems(["layer_norm"], {"rows": [(64, 256)]}, [torch.float32])
    rows = bench.run(problems, ["torch"], device="cpu", directions=["fwd"], thread_counts=[1], repeats=3, budget_s=0.03)
    assert rows and all(isinstance(r["fwd_faults"], float) and r["fwd_faults"] >= 0 for r in rows)


def test_the_faults_table_lists_problems_where_a_provider_faults() -> None:
    def row(shape: str, provider: str, faults: float) -> dict:
        return {"op": "rms_norm", "shape": shape, "threads": 1, "provider": provider, "fwd+bwd_faults": faults}

    rows = [row("8x4096", p, 0.0) for p in bench_cpu.PROVIDERS]
    rows += [row("4096x4096", "torch", 4096.4), row("4096x4096", "normkit-numba", 0.2)]
    lines = bench_cpu.faults_table(rows)
    assert len(lines) == 3 and "8x4096" not in lines[2]
    assert lines[2] == "| rms_norm | 4096x4096 | 1 | 4,096 | - | 0 | - |"
    assert bench_cpu.faults_table(rows[:4]) == []
