"""Host time per call of normkit's Triton path, on the CPU, with every kernel launch mocked (issue 15 item 9).

What a GPU call costs before its kernels start is Python: normkit's checks and backend choice,
the autograd wrapper, the launcher's tile and grid planning, allocations and the few ATen ops
around the kernels. This measures that part alone. Triton's CPU interpreter
(``TRITON_INTERPRET=1``) lets the launchers take CPU tensors; every ``kernel[grid](...)`` is
then replaced by a no-op that only counts (:class:`MockedLaunches`), so no kernel runs and the
outputs hold whatever ``torch.empty`` gave. Each case is timed on three routes of the same call
and against torch eager on the CPU at the same tiny shape (real work, for scale):

* ``direct``: the eager route (an ``autograd.Function`` whose forward is the launcher itself);
* ``function+op``: the route under ``torch.func`` (the same Function around the custom op);
* ``custom op``: the route compiled code takes (the ``torch.library`` custom ops and their
  registered autograd), forced by making ``_launch`` see ``torch.compiler.is_compiling()`` true.

Left out by the mock: Triton's own launch path (``JITFunction.run``: argument binding,
specialization key, cache lookup) and the CUDA driver's launch, neither measured here.

    TRITON_INTERPRET=1 .venv/bin/python benchmarks/bench_triton_host.py [--rounds 30] [--number 200] [--out DIR]

Writes ``triton_host_cpu.md`` and ``triton_host_cpu.json`` under ``--out`` (default
``benchmarks/results``). Time is this thread's CPU time, one thread, providers interleaved.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: the launchers then take CPU tensors

import argparse
import contextlib
import json
import platform
import statistics
import subprocess
import time
import timeit
import types
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
import triton
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime import interpreter

import normkit.functional as NF
import normkit.functional_blocks as NB
from normkit.ops.triton import _launch

__all__ = ["CASES", "ROUTES", "MockedLaunches", "aten_ops", "count_launches", "measure", "route"]


class MockedLaunches:
    """Within the block, every Triton kernel launch (``kernel[grid](...)``) records the kernel's
    name and returns without running; ``executed`` counts any interpreter run that slipped past
    (it must stay 0, or the timings would be the interpreter's)."""

    def __init__(self) -> None:
        self.launches: list[str] = []
        self.executed = 0

    def __enter__(self) -> MockedLaunches:
        launches = self.launches

        def run(kernel, *args, grid, warmup, **kwargs):
            launches.append(kernel.__name__)

        def execute(grid_executor, *args, **kwargs):
            self.executed += 1

        self._saved = interpreter.InterpretedFunction.run, interpreter.GridExecutor.__call__
        interpreter.InterpretedFunction.run = run
        interpreter.GridExecutor.__call__ = execute
        return self

    def __exit__(self, *exc) -> None:
        interpreter.InterpretedFunction.run, interpreter.GridExecutor.__call__ = self._saved


class _SeenFrom(types.ModuleType):
    """``torch`` as ``_launch``'s routing sees it: compiling and/or under functorch, all else torch."""

    def __init__(self, compiling: bool, functorch: bool) -> None:
        super().__init__("torch")
        self.compiler = types.SimpleNamespace(is_compiling=lambda: compiling)
        self._C = types.SimpleNamespace(_are_functorch_transforms_active=lambda: functorch,
                                        _get_tracing_state=torch._C._get_tracing_state)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


# route -> (compiling, functorch transforms active) as eager_and_compiled's calls see them.
ROUTES: dict[str, tuple[bool, bool]] = {
    "direct": (False, False),
    "function+op": (False, True),
    "custom op": (True, False),
}


@contextlib.contextmanager
def route(name: str) -> Iterator[None]:
    """Take the eager_and_compiled route ``name`` (:data:`ROUTES`) inside the block."""
    saved = _launch.torch
    _launch.torch = _SeenFrom(*ROUTES[name])
    try:
        yield
    finally:
        _launch.torch = saved


def _randn(*shape: int, grad: bool = True) -> torch.Tensor:
    return torch.randn(shape, requires_grad=grad)


def _modulated(x, shift, scale, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-6) * (1 + scale) + shift


def _add_rms(x, r, w):
    s = x + r
    return F.rms_norm(s, (s.shape[-1],), w), s


# name -> (make the tensors, normkit's call on backend "triton", torch eager's call). Tiny shapes:
# the kernels would take a few microseconds on a GPU, so the host time is what a call costs.
CASES: dict[str, tuple[Callable[[], tuple], Callable[..., Any], Callable[..., Any]]] = {
    "rms_norm (8, 64)": (
        lambda: (_randn(8, 64), _randn(64)),
        lambda x, w: NF.rms_norm(x, (64,), w, backend="triton"),
        lambda x, w: F.rms_norm(x, (64,), w),
    ),
    "layer_norm (8, 64)": (
        lambda: (_randn(8, 64), _randn(64), _randn(64)),
        lambda x, w, b: NF.layer_norm(x, (64,), w, b, backend="triton"),
        lambda x, w, b: F.layer_norm(x, (64,), w, b),
    ),
    "add_rms_norm (8, 64)": (
        lambda: (_randn(8, 64), _randn(8, 64), _randn(64)),
        lambda x, r, w: NF.add_rms_norm(x, r, (64,), w, backend="triton"),
        _add_rms,
    ),
    "group_norm G=2 (2, 8, 4, 4)": (
        lambda: (_randn(2, 8, 4, 4), _randn(8), _randn(8)),
        lambda x, w, b: NF.group_norm(x, 2, w, b, backend="triton"),
        lambda x, w, b: F.group_norm(x, 2, w, b),
    ),
    "instance_norm (2, 8, 4, 4)": (
        lambda: (_randn(2, 8, 4, 4), _randn(8), _randn(8)),
        lambda x, w, b: NF.instance_norm(x, weight=w, bias=b, backend="triton"),
        lambda x, w, b: F.instance_norm(x, weight=w, bias=b),
    ),
    "batch_norm train (2, 8, 4, 4)": (
        lambda: (_randn(2, 8, 4, 4), torch.zeros(8), torch.ones(8), _randn(8), _randn(8)),
        lambda x, rm, rv, w, b: NF.batch_norm(x, rm, rv, w, b, True, backend="triton"),
        lambda x, rm, rv, w, b: F.batch_norm(x, rm, rv, w, b, True),
    ),
    "batch_norm eval (2, 8, 4, 4)": (
        lambda: (_randn(2, 8, 4, 4), torch.rand(8), torch.rand(8) + 0.5, _randn(8), _randn(8)),
        lambda x, rm, rv, w, b: NF.batch_norm(x, rm, rv, w, b, False, backend="triton"),
        lambda x, rm, rv, w, b: F.batch_norm(x, rm, rv, w, b, False),
    ),
    "modulated_layer_norm (2, 4, 64)": (
        lambda: (_randn(2, 4, 64), _randn(2, 1, 64), _randn(2, 1, 64), _randn(64), _randn(64)),
        lambda x, shift, scale, w, b: NB.modulated_layer_norm(x, shift, scale, w, b, backend="triton"),
        _modulated,
    ),
    "qk_rms_norm q,k (2, 4, 2, 16)": (
        lambda: (_randn(2, 4, 2, 16), _randn(2, 4, 2, 16), _randn(16), _randn(16)),
        lambda q, k, wq, wk: NB.qk_rms_norm(q, k, wq, wk, backend="triton"),
        lambda q, k, wq, wk: (F.rms_norm(q, (16,), wq), F.rms_norm(k, (16,), wk)),
    ),
}

PROVIDERS = ("torch eager", *ROUTES)
DIRECTIONS = ("fwd", "fwd+bwd")


def _outputs(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, tuple) else (out,)


def _step(case: str, provider: str, direction: str) -> Callable[[], None]:
    """One call of ``case`` by ``provider``: the forward, or the forward and a backward with
    random upstream gradients (fixed once, so the timed call allocates none)."""
    make, ours, theirs = CASES[case]
    tensors = make()
    fn = theirs if provider == "torch eager" else ours
    grads = tuple(torch.randn_like(t) for t in _outputs(theirs(*tensors)))
    if direction == "fwd":
        return lambda: fn(*tensors)
    # autograd.grad, not backward: no accumulation into .grad (an add_ per leaf from the second call on)
    leaves = tuple(t for t in tensors if t.requires_grad)
    return lambda: torch.autograd.grad(_outputs(fn(*tensors)), leaves, grads)


def _within(provider: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if provider == "torch eager" else route(provider)


def count_launches(case: str, provider: str, direction: str) -> MockedLaunches:
    """One mocked call (after a warm-up): the kernels it would launch, and the interpreter runs (0)."""
    step = _step(case, provider, direction)
    with _within(provider), MockedLaunches() as warm:
        step()
    with _within(provider), MockedLaunches() as mocked:
        step()
    mocked.executed += warm.executed
    return mocked


# ATen ops that launch no kernel on a GPU (allocations, views, metadata).
_NO_KERNEL = frozenset(
    {
        "empty",
        "empty_like",
        "empty_strided",
        "new_empty",
        "new_empty_strided",
        "view",
        "_unsafe_view",
        "reshape",
        "as_strided",
        "detach",
        "alias",
        "t",
        "transpose",
        "permute",
        "expand",
        "select",
        "slice",
        "unsqueeze",
        "squeeze",
        "movedim",
        "unbind",
        "split",
        "lift_fresh",
    }
)


class _AtenCount(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func.namespace == "aten" and name not in _NO_KERNEL:  # not normkit's custom ops
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def aten_ops(case: str, provider: str, direction: str) -> Counter[str]:
    """The ATen ops of one mocked call that would launch a kernel on a GPU (views and
    allocations left out, and normkit's custom ops, whose Triton launches are counted apart);
    the backward's run below autograd's engine and are counted too."""
    step = _step(case, provider, direction)
    with _within(provider), MockedLaunches():
        step()
        with _AtenCount() as counted:
            step()
    return counted.ops


def measure(
    case: str, direction: str, rounds: int, number: int, providers: tuple[str, ...] = PROVIDERS
) -> dict[str, list[float]]:
    """Microseconds of thread CPU time per call, one sample per round and provider; the
    providers interleaved (a rotating order each round), so a noisy moment hits them all."""
    steps = {p: _step(case, p, direction) for p in providers}
    samples: dict[str, list[float]] = {p: [] for p in providers}
    with MockedLaunches() as mocked:
        for p in providers:
            with _within(p):
                steps[p]()  # warm up (backend lookup, first allocations)
        for r in range(rounds):
            for p in providers[r % len(providers) :] + providers[: r % len(providers)]:
                with _within(p):
                    t = timeit.Timer(steps[p], timer=time.thread_time).timeit(number)
                samples[p].append(t / number * 1e6)
    if mocked.executed:
        raise RuntimeError(f"{mocked.executed} kernel(s) ran in the interpreter: the mock did not hold")
    return samples


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cell(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"


def table(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Host time per call of normkit's Triton path on the CPU, kernel launches mocked (issue 15 item 9)",
        "",
        f"Commit {meta['commit']}; torch {meta['torch']}, triton {meta['triton']}; {meta['machine']}, "
        f"{meta['cpus']} CPUs, 1 thread; load average {meta['load_before']:.1f} before, "
        f"{meta['load_after']:.1f} after (other processes share the cores). {meta['rounds']} rounds of "
        f"{meta['number']} calls, providers interleaved; microseconds per call of this thread's CPU time, "
        "median (min-max over rounds). Inputs and parameters require grad; fwd+bwd adds a backward with "
        "random upstream gradients.",
        "",
        '`direct`, `function+op` and `custom op` are normkit\'s `backend="triton"` call with every '
        "`kernel[grid](...)` a no-op: the eager route, the route under torch.func, and the custom-op "
        "(dispatcher) route compiled code takes, forced in `_launch`. `torch eager` runs ATen's CPU kernels "
        "for real at the same tiny shape (for scale). `launches`: Triton kernels per call; `ATen ops`: other "
        "ops per call that would launch a GPU kernel (views and allocations left out), on the direct route.",
        "",
        "Not in these numbers: Triton's own launch path (`JITFunction.run`: argument binding, specialization "
        "key, cache lookup; the interpreter replaces it) and the CUDA driver's launch, per kernel. Neither is "
        "measured here. Public figures for Triton's JIT dispatch of an already compiled kernel, launch included, "
        "are about 9-12 us per launch (12.5 us for a 19-argument no-op kernel in facebookexperimental/triton#1231, "
        "8.7 us on a GB200 in vllm-project/vllm#34838, ~11 us in meta-pytorch/tritonbench#1002): add that once "
        "per launch counted below.",
        "",
        "| case | dir | torch eager | direct | function+op | custom op | launches | ATen ops |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        cells = " | ".join(_cell(r["us"][p]) for p in PROVIDERS)
        aten = sum(r["aten_ops"].values())
        lines.append(f"| {r['case']} | {r['direction']} | {cells} | {len(r['launches'])} | {aten} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--number", type=int, default=200)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]
    records = []
    for case in CASES:
        for direction in DIRECTIONS:
            launches = count_launches(case, "direct", direction)
            if launches.executed:
                raise RuntimeError(f"{case}: a kernel ran in the interpreter")
            for p in ROUTES:  # every route launches the same kernels
                other = count_launches(case, p, direction).launches
                if other != launches.launches:
                    raise RuntimeError(f"{case} {direction}: route {p} launched {other}, direct {launches.launches}")
            records.append(
                {
                    "case": case,
                    "direction": direction,
                    "launches": launches.launches,
                    "aten_ops": dict(aten_ops(case, "direct", direction)),
                    "us": measure(case, direction, args.rounds, args.number),
                }
            )
            print(
                f"{case} {direction}: " + ", ".join(f"{p} {_cell(v)}" for p, v in records[-1]["us"].items()), flush=True
            )
    meta = {
        "commit": _commit(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "rounds": args.rounds,
        "number": args.number,
        "timer": "thread_time",
        "unit": "us per call",
    }
    text = table(records, meta)
    print(text, end="")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "triton_host_cpu.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "triton_host_cpu.json"), "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
