"""normkit.SyncBatchNorm: 2 and 3 CPU processes on gloo against BatchNorm on the whole batch.

Every distributed test spawns its ranks once and runs a list of scenarios in them (spawning costs
seconds, a scenario milliseconds). Each rank checks its own slice against torch.nn BatchNorm run
on the concatenated batch; a failed assertion in a rank fails the test with its traceback. The
process group has a 60 s timeout and the test joins with a deadline, so a bug cannot hang CI.
"""

from __future__ import annotations

import datetime
import os
import runpy
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import normkit

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 90

# float64 runs agree with the single-process BatchNorm to rounding. float32 ones: the inputs sit
# at 100 +- 3, where one float32 ulp (7.6e-6) is 2.5e-6 after dividing by the std and up to ~1e-5
# after the weight; either side may round the other way, so a few ulps of the output apart.
TOLERANCES = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=5e-5)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, scenarios: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for name in scenarios:
            SCENARIOS[name](rank, world)
    finally:
        dist.destroy_process_group()


def _spawn(world: int, scenarios: list[str]) -> None:
    ctx = mp.start_processes(_worker, args=(world, _free_port(), scenarios), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=1):  # raises, with the rank's traceback, if a rank failed
            if time.monotonic() > deadline:
                pytest.fail(f"ranks still running after {DEADLINE_S} s: a collective is hanging")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


# --- scenarios: run in every rank ----------------------------------------------------------------

def _compare_with_full_batch(rank: int, sizes: list[int], *, shape: tuple[int, ...] = (5, 4, 3),
                             dtype: torch.dtype = torch.float64, backend: str = "torch",
                             momentum: float | None = 0.1, group=None, members: list[int] | None = None,
                             steps: int = 2, **options) -> None:
    """The ranks in ``members`` (default: all) hold ``sizes[i]`` samples each of one batch. The
    whole batch runs through torch.nn's BatchNorm, or normkit's when there are ``options``."""
    members = members if members is not None else list(range(len(sizes)))
    if rank not in members:
        return
    slot = members.index(rank)
    channels = shape[0]
    tol = TOLERANCES[dtype]
    gen = torch.Generator().manual_seed(0)  # the same batch on every rank
    weight = torch.randn(channels, generator=gen, dtype=dtype)
    bias = torch.randn(channels, generator=gen, dtype=dtype)
    bn_cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm1d, 3: nn.BatchNorm2d, 4: nn.BatchNorm3d}[len(shape)]
    full = (getattr(normkit, bn_cls.__name__)(channels, momentum=momentum, dtype=dtype, backend=backend, **options)
            if options else bn_cls(channels, momentum=momentum, dtype=dtype))
    sync = normkit.SyncBatchNorm(channels, momentum=momentum, process_group=group, dtype=dtype, backend=backend,
                                 **options)
    with torch.no_grad():
        for m in (full, sync):
            m.weight.copy_(weight)
            m.bias.copy_(bias)
    start = sum(sizes[:slot])
    for _ in range(steps):
        x = torch.randn(sum(sizes), *shape, generator=gen, dtype=dtype) * 3 + 100  # an offset: stability
        dy = torch.randn(x.shape, generator=gen, dtype=dtype)
        x_full = x.clone().requires_grad_()
        y_full = full(x_full)
        y_full.backward(dy)
        x_local = x[start:start + sizes[slot]].clone().requires_grad_()
        y_local = sync(x_local)
        y_local.backward(dy[start:start + sizes[slot]])
        torch.testing.assert_close(y_local, y_full[start:start + sizes[slot]], **tol)
        torch.testing.assert_close(x_local.grad, x_full.grad[start:start + sizes[slot]], **tol)
        # weight/bias gradients are local, as torch's: their sum over the ranks is the full one.
        for local, whole in ((sync.weight.grad, full.weight.grad), (sync.bias.grad, full.bias.grad)):
            total = local.clone()
            dist.all_reduce(total, group=group)
            torch.testing.assert_close(total, whole, **tol)
        for p in (*full.parameters(), *sync.parameters()):
            p.grad = None
    torch.testing.assert_close(sync.running_mean, full.running_mean, **tol)
    torch.testing.assert_close(sync.running_var, full.running_var, **tol)
    assert sync.num_batches_tracked.item() == full.num_batches_tracked.item() == steps
    sync.eval()  # eval: the running statistics, no communication
    full.eval()
    x = torch.randn(3, *shape, generator=gen, dtype=dtype)
    torch.testing.assert_close(sync(x), full(x), **tol)


def _uneven_and_empty(rank: int, world: int) -> None:
    sizes = [3, 0, 5][:world] if world == 3 else [1, 4]
    for backend in ("torch", "reference"):
        _compare_with_full_batch(rank, sizes, backend=backend)
    _compare_with_full_batch(rank, sizes, backend="reference", momentum=None, steps=3)
    _compare_with_full_batch(rank, sizes, dtype=torch.float32)
    _compare_with_full_batch(rank, sizes, dtype=torch.float32, backend="reference", stats_dtype=torch.float64)


def _shapes(rank: int, world: int) -> None:
    # (N, C) with one sample on a rank: legal, the global count is what must exceed 1.
    _compare_with_full_batch(rank, [1, 2, 0][:world], shape=(6,))
    _compare_with_full_batch(rank, [2, 1, 3][:world], shape=(3, 2, 2, 3), backend="reference")


def _global_count_one(rank: int, world: int) -> None:
    sync = normkit.SyncBatchNorm(4)
    before = {k: v.clone() for k, v in sync.state_dict().items()}
    x = torch.randn(1 if rank == 0 else 0, 4)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training, got input size 1"):
        sync(x)
    for k, v in sync.state_dict().items():
        assert torch.equal(v, before[k]), k


def _subgroups(rank: int, world: int) -> None:
    # new_group is collective: every rank creates every group, in the same order.
    pair = dist.new_group([0, 2])
    singles = [dist.new_group([r]) for r in range(world)]
    _compare_with_full_batch(rank, [2, 3], members=[0, 2], group=pair)
    _compare_with_full_batch(rank, [3], members=[rank], group=singles[rank])  # a group of one: BatchNorm


def _channel_mismatch(rank: int, world: int) -> None:
    sync = normkit.SyncBatchNorm(3 + rank)
    with pytest.raises(RuntimeError, match="Detected mismatch between collectives"):
        sync(torch.randn(4, 3 + rank))


SCENARIOS = {f.__name__.lstrip("_"): f for f in (_uneven_and_empty, _shapes, _global_count_one, _subgroups,
                                                   _channel_mismatch)}


# --- tests ----------------------------------------------------------------------------------------

def test_two_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Mismatched channel counts: gloo aborts the process on mismatched shapes (NCCL waits for the
    # timeout). torch's debug mode, read at process start, checks every collective's shapes first
    # and raises on every rank; it changes no result, so the other scenarios run under it too.
    monkeypatch.setenv("TORCH_DISTRIBUTED_DEBUG", "DETAIL")
    _spawn(2, ["uneven_and_empty", "shapes", "global_count_one", "channel_mismatch"])


def test_three_ranks() -> None:
    _spawn(3, ["uneven_and_empty", "shapes", "global_count_one", "subgroups"])


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_without_process_group_is_batch_norm(backend: str, momentum: float | None) -> None:
    assert not dist.is_initialized()
    torch.manual_seed(0)
    sync = normkit.SyncBatchNorm(4, momentum=momentum, backend=backend)
    bn = normkit.BatchNorm2d(4, momentum=momentum, backend=backend)
    with torch.no_grad():
        sync.weight.normal_()
        sync.bias.normal_()
    bn.load_state_dict(sync.state_dict())
    for _ in range(2):
        x = torch.randn(3, 4, 5, 2)
        dy = torch.randn_like(x)
        grads = []
        for m in (sync, bn):
            xi = x.clone().requires_grad_()
            m(xi).backward(dy)
            grads.append((xi.grad, m.weight.grad, m.bias.grad))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b)
    for k, v in bn.state_dict().items():
        torch.testing.assert_close(sync.state_dict()[k], v)


def test_errors_are_torch_s() -> None:
    with pytest.raises(ValueError, match=r"expected at least 2D input \(got 1D input\)"):
        normkit.SyncBatchNorm(3)(torch.randn(3))
    with pytest.raises(ValueError, match="number of input channels should be non-zero"):
        normkit.SyncBatchNorm(0)(torch.randn(2, 0))


def test_convert_sync_batchnorm() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4).double(),
        normkit.BatchNorm1d(4, backend="reference", stats_dtype=torch.float64),
        nn.BatchNorm3d(2, affine=False),
        normkit.BatchRenorm2d(4),  # its own forward: left alone
        normkit.LazyBatchNorm2d(),  # not initialized: left alone
        nn.LayerNorm(4),
    )
    model[1].weight.requires_grad_(False)
    model[2].eval()
    params = [model[1].weight, model[1].bias, model[2].weight, model[1].running_mean]
    group = object()  # any value: stored, not used outside training in a process group
    assert normkit.convert_sync_batchnorm(model, process_group=group) is model
    for i in (1, 2, 3):
        assert type(model[i]) is normkit.SyncBatchNorm and model[i].process_group is group
    assert [model[1].weight, model[1].bias, model[2].weight, model[1].running_mean] == params
    assert model[1].weight.dtype == torch.float64 and not model[1].weight.requires_grad
    assert not model[2].training and model[1].training
    assert (model[2].backend, model[2].stats_dtype) == ("reference", torch.float64)
    assert model[1].backend is None and model[3].weight is None
    assert type(model[4]) is normkit.BatchRenorm2d and type(model[5]) is normkit.LazyBatchNorm2d
    bn = nn.BatchNorm1d(3)
    assert normkit.convert_sync_batchnorm(bn) is bn and isinstance(bn, nn.SyncBatchNorm)


def test_ddp_example_matches_single_process(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    script = str(ROOT / "examples" / "ddp_syncbn.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    ddp = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                            "--master_addr=127.0.0.1", f"--master_port={_free_port()}", script],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        monkeypatch.setattr(sys, "argv", [script, "--single"])
        with torch.random.fork_rng():  # the example seeds the global generator
            runpy.run_path(script, run_name="__main__")  # meanwhile, in this process
        single = capsys.readouterr().out
        stdout, stderr = ddp.communicate(timeout=DEADLINE_S)
    finally:
        if ddp.poll() is None:
            ddp.kill()
    assert ddp.returncode == 0, stderr[-3000:]

    def losses(out: str) -> list[float]:
        return [float(line.split()[-1]) for line in out.splitlines() if line.startswith("step")]

    expected, got = losses(single), losses(stdout)
    assert len(expected) == len(got) > 0
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-7)
