"""benchmarks/bench_triton_host.py measures host time with the kernel launches mocked: check that the
mock holds (no kernel runs in the interpreter, so the timings cannot be the interpreter's) and that
every route of a call launches the kernels it should, once each."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="the benchmark mocks the launches of Triton's CPU interpreter"
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench = pytest.importorskip("bench_triton_host")

RMS = "rms_norm (8, 64)"
EXPECTED = {"fwd": ["row_norm_fwd_kernel"], "fwd+bwd": ["row_norm_fwd_kernel", "row_norm_bwd_kernel"]}


@pytest.mark.parametrize("direction", bench.DIRECTIONS)
@pytest.mark.parametrize("provider", list(bench.ROUTES))
def test_mocked_call_launches_the_kernels_once_and_runs_none(provider: str, direction: str) -> None:
    mocked = bench.count_launches(RMS, provider, direction)
    assert mocked.launches == EXPECTED[direction]
    assert mocked.executed == 0


def test_measure_runs_no_kernel_and_times_every_provider() -> None:
    samples = bench.measure(RMS, "fwd+bwd", rounds=2, number=3)
    assert set(samples) == set(bench.PROVIDERS)
    assert all(len(v) == 2 and min(v) > 0 for v in samples.values())


def test_the_mock_is_what_stops_the_kernels() -> None:
    """Without the mock the same call runs the interpreter (the counter sees it), so a mock that
    stopped intercepting would show here, not as a fast benchmark."""
    from triton.runtime import interpreter

    ran = []
    saved = interpreter.GridExecutor.__call__

    def counting(self, *args, **kwargs):
        ran.append(1)
        return saved(self, *args, **kwargs)

    interpreter.GridExecutor.__call__ = counting
    try:
        bench._step(RMS, "direct", "fwd")()
        with bench.MockedLaunches() as mocked:
            bench._step(RMS, "direct", "fwd")()
    finally:
        interpreter.GridExecutor.__call__ = saved
    assert ran == [1] and mocked.launches == EXPECTED["fwd"] and mocked.executed == 0


def test_routes_are_restored() -> None:
    from normkit.ops.triton import _launch

    with bench.route("custom op"):
        assert _launch.torch is not torch
    assert _launch.torch is torch


def test_aten_ops_leave_out_custom_ops_and_views() -> None:
    ops = bench.aten_ops(RMS, "direct", "fwd")
    assert not any("row_norm" in name for name in ops)
    assert "view" not in ops


class _Ops(bench.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(f"{func.namespace}::{func.overloadpacket.__name__}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("provider", list(bench.ROUTES))
def test_only_the_op_routes_go_through_the_dispatcher(provider: str) -> None:
    step = bench._step(RMS, provider, "fwd+bwd")
    with bench.route(provider), bench.MockedLaunches(), _Ops() as seen:
        step()
    through_op = {"normkit::row_norm_fwd", "normkit::row_norm_bwd"} <= seen.names
    assert through_op == (provider != "direct")
