"""CPU benchmark of normkit.SyncBatchNorm on torch.distributed (gloo, 127.0.0.1): step time and
the bytes its collectives move, for 1, 2 and 4 ranks.

    python benchmarks/bench_syncbn.py                                  # world sizes 1, 2, 4
    python benchmarks/bench_syncbn.py --steps 50 --warmup 10 --world-sizes 2 4 --out /tmp/r

What it measures. Every rank trains the same small CNN (Conv2d + SyncBatchNorm + ReLU blocks,
see ``CHANNELS``) on its own batch of ``BATCH`` images (weak scaling: the global batch is
``world x BATCH``): forward, cross-entropy, backward, one plain SGD step. There is no
DistributedDataParallel, so the only collectives are SyncBatchNorm's: one ``all_gather`` per
layer in the forward, one ``all_reduce`` per layer in the backward. Each rank runs on one thread,
so 4 ranks on a 2-core machine are oversubscribed on purpose: the times say what the
synchronization costs when ranks compete for cores, not what a 4-core machine would do. A step's
time is that of the slowest rank (every rank waits for it in the next collective); the tables
give its median and 90th percentile over ``--steps`` steps after ``--warmup`` untimed ones, and
the time spent inside SyncBatchNorm's collectives (waiting for the other ranks included; median
over steps of the mean over ranks). The 1-minute load average before and after the run is
recorded: other processes on the same cores slow every row.

World size 1 runs the same code in a process group of one rank, where SyncBatchNorm is plain
BatchNorm and sends nothing. The ``BatchNorm2d`` row is the same model with
``normkit.BatchNorm2d`` in one process without any process group: the reference.

How bytes are counted. Inside each rank the benchmark replaces ``torch.distributed.all_gather``,
``all_gather_into_tensor`` and ``all_reduce`` (the attributes SyncBatchNorm looks up at call time)
by wrappers that add up ``numel * element_size`` of the tensors passed, during the timed steps
only, and divides by the number of steps. Three figures per rank and step:

* gather sent: the tensor a rank hands to ``all_gather`` (its own ``(count, mean, M2)``),
* gather received: the output list it gets back (every rank's rows, its own included),
* all_reduce: the tensor passed to ``all_reduce`` (sent and overwritten with the sum).

"bytes/step/rank" is gather sent + all_reduce, the payload one rank contributes. These are
payload bytes, not bytes on the socket: gloo's algorithms (ring, tree, ...) send multiples of it
that depend on the world size. The model next to them, per SyncBatchNorm layer with C channels:
the forward gathers 3 x C float64 values per rank and receives world x 3 x C; the backward
all-reduces 2 x C float64 values. SyncBatchNorm exchanges float64 whatever its ``stats_dtype``.

Writes ``<out>/syncbn_gloo_cpu.md`` and ``<out>/syncbn_gloo_cpu.json``.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import functools
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

HERE = Path(__file__).resolve().parent
try:
    import normkit
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent / "src"))
    import normkit

CHANNELS = (32, 64, 128)  # one Conv2d + norm + ReLU block per entry
IN_CHANNELS, SIZE, BATCH, CLASSES = 3, 16, 8, 10  # input (BATCH, 3, 16, 16) per rank, float32
SEED = 0
WIRE_DTYPE = torch.float64  # what SyncBatchNorm's statistics and gradient sums travel as
PG_TIMEOUT_S = 60  # a hung collective fails the run instead of blocking it
DEADLINE_S = 150  # per launch; spawning 4 ranks on 2 cores takes seconds on its own
COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_reduce")


# ---- the model and one training step


def make_model(norm: Callable[[int], nn.Module]) -> nn.Module:
    layers: list[nn.Module] = []
    cin = IN_CHANNELS
    for cout in CHANNELS:
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), norm(cout), nn.ReLU()]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, CLASSES))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, target: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), target).backward()
    opt.step()


# ---- counting the bytes of the collectives


class ByteCounter:
    """Wraps the torch.distributed collectives SyncBatchNorm calls and adds up their payloads.

    Counts only while ``active`` (the benchmark's own barrier and result gather are not
    SyncBatchNorm's) and only the outermost call, in case one collective is built on another.
    """

    def __init__(self) -> None:
        self.active = False
        self.depth = 0
        self.comm_ms = 0.0  # time inside the counted collectives, waiting for peers included
        self.totals = {"gather_sent": 0, "gather_received": 0, "all_reduce": 0,
                       "all_gather_calls": 0, "all_reduce_calls": 0}
        self._originals: dict[str, Callable] = {}

    def install(self) -> None:
        for name in COLLECTIVES:
            original = getattr(dist, name)
            self._originals[name] = original
            setattr(dist, name, self._wrap(name, original))

    def uninstall(self) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)

    def _wrap(self, name: str, original: Callable) -> Callable:
        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            counted = self.active and self.depth == 0
            if counted:
                self._count(name, *args, **kwargs)
            self.depth += 1
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.depth -= 1
                if counted:
                    self.comm_ms += (time.perf_counter() - start) * 1e3
        return wrapper

    def _count(self, name: str, *args, **kwargs) -> None:
        if name == "all_reduce":
            self.totals["all_reduce"] += _nbytes(kwargs.get("tensor", args[0] if args else None))
            self.totals["all_reduce_calls"] += 1
            return
        if name == "all_gather":  # all_gather(tensor_list, tensor)
            out = kwargs.get("tensor_list", args[0] if args else [])
            sent = kwargs.get("tensor", args[1] if len(args) > 1 else None)
            received = sum(_nbytes(t) for t in out)
        else:  # all_gather_into_tensor(output_tensor, input_tensor)
            received = _nbytes(kwargs.get("output_tensor", args[0] if args else None))
            sent = kwargs.get("input_tensor", args[1] if len(args) > 1 else None)
        self.totals["gather_sent"] += _nbytes(sent)
        self.totals["gather_received"] += received
        self.totals["all_gather_calls"] += 1


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def bytes_model(world: int) -> dict[str, int]:
    """Payload per rank and step predicted from SyncBatchNorm's code; nothing at world size 1."""
    if world <= 1:
        return {"gather_sent": 0, "gather_received": 0, "all_reduce": 0}
    item = torch.empty((), dtype=WIRE_DTYPE).element_size()
    c = sum(CHANNELS)
    return {"gather_sent": 3 * c * item, "gather_received": world * 3 * c * item, "all_reduce": 2 * c * item}


# ---- one rank


def _worker(rank: int, world: int, port: int, norm: str, steps: int, warmup: int, result: str) -> None:
    # One thread per rank: the ranks share the machine's cores, and OpenMP workers spinning
    # against the other ranks would measure the scheduler, not SyncBatchNorm.
    torch.set_num_threads(1)
    faulthandler.enable()  # gloo aborts the process on some errors: show where Python was
    distributed = norm == "SyncBatchNorm"
    if distributed:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    counter = ByteCounter()
    counter.install()
    try:
        times, comm = _run_steps(rank, norm, steps, warmup, counter, distributed)
        counter.active = False
        per_rank = [(times, comm, counter.totals)]
        if distributed:
            per_rank = [None] * world
            dist.all_gather_object(per_rank, (times, comm, counter.totals))
        if rank == 0:
            Path(result).write_text(json.dumps(per_rank))
    finally:
        counter.uninstall()
        if distributed:
            dist.destroy_process_group()


def _run_steps(rank: int, norm: str, steps: int, warmup: int, counter: ByteCounter,
               distributed: bool) -> tuple[list[float], list[float]]:
    """Per timed step: wall time and time inside SyncBatchNorm's collectives, in ms."""
    torch.manual_seed(SEED)  # the same initial weights on every rank, as after a DDP broadcast
    model = make_model(normkit.SyncBatchNorm if norm == "SyncBatchNorm" else normkit.BatchNorm2d).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(SEED + rank)  # each rank its own slice of the batch
    x = torch.randn(BATCH, IN_CHANNELS, SIZE, SIZE, generator=gen)
    target = torch.randint(0, CLASSES, (BATCH,), generator=gen)
    for _ in range(warmup):
        train_step(model, opt, x, target)
    if distributed:
        dist.barrier()  # start the timed steps together, so no rank times another's warm-up
    counter.active = True
    times, comm = [], []
    for _ in range(steps):
        counter.comm_ms = 0.0
        start = time.perf_counter()
        train_step(model, opt, x, target)
        times.append((time.perf_counter() - start) * 1e3)
        comm.append(counter.comm_ms)
    return times, comm


# ---- launching and summarizing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(norm: str, world: int, steps: int, warmup: int) -> list:
    """Spawn ``world`` ranks; ``[(step ms, collective ms, byte totals)]``, one entry per rank."""
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        ctx = mp.start_processes(_worker, args=(world, _free_port(), norm, steps, warmup, result),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + DEADLINE_S
        try:
            while not ctx.join(timeout=1):  # raises, with the rank's traceback, if a rank failed
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{norm} x{world}: ranks still running after {DEADLINE_S} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        return json.loads(Path(result).read_text())


def summarize(norm: str, world: int, per_rank: list, steps: int) -> dict:
    # The job advances at the pace of its slowest rank: a step's time is the max over ranks.
    step_ms = [max(col) for col in zip(*(times for times, _, _ in per_rank))]
    # Time in the collectives: the mean over ranks (the fastest rank waits longest in them).
    comm_ms = [statistics.fmean(col) for col in zip(*(comm for _, comm, _ in per_rank))]
    totals = per_rank[0][2]
    if any(t != totals for _, _, t in per_rank):  # ranks of equal shapes must move equal payloads
        raise RuntimeError(f"{norm} x{world}: ranks counted different bytes: {[t for *_, t in per_rank]}")
    measured = {k: v / steps for k, v in totals.items()}
    model = bytes_model(world if norm == "SyncBatchNorm" else 1)
    return {
        "norm": norm, "world_size": world,
        "ms_median": statistics.median(step_ms),
        "ms_p90": statistics.quantiles(step_ms, n=10, method="inclusive")[-1],
        "ms_in_collectives_median": statistics.median(comm_ms),
        "bytes_per_step_per_rank": measured["gather_sent"] + measured["all_reduce"],
        "bytes_model": model["gather_sent"] + model["all_reduce"],
        "measured": measured, "model": model,
        "bytes_match_model": all(measured[k] == v for k, v in model.items()),
    }


# ---- report


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def metadata(load_before: tuple[float, float, float]) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=HERE, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "normkit_commit": commit,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": "gloo, 127.0.0.1, one thread per rank",
        # The cores may be shared: the 1-minute load before and after the run says how much.
        "loadavg_1min_before": load_before[0], "loadavg_1min_after": os.getloadavg()[0],
        "model": (f"{' -> '.join(f'Conv2d 3x3 + norm({c}) + ReLU' for c in CHANNELS)} -> avgpool -> "
                  f"Linear({CHANNELS[-1]}, {CLASSES}); cross-entropy, backward, SGD step"),
        "input_per_rank": f"({BATCH}, {IN_CHANNELS}, {SIZE}, {SIZE}) float32",
        "syncbn_layers_channels": list(CHANNELS), "wire_dtype": str(WIRE_DTYPE).removeprefix("torch."),
    }


def _fmt_bytes(d: dict) -> str:
    return f"{d['gather_sent']:.0f} / {d['gather_received']:.0f} / {d['all_reduce']:.0f}"


def table(rows: list[dict]) -> list[str]:
    lines = ["| norm | ranks | ms median | ms p90 | ms in collectives | bytes/step/rank measured | bytes model "
             "| measured: gather sent / received / all_reduce | model: same | calls/step (gather, reduce) |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        m = r["measured"]
        lines.append(f"| {r['norm']} | {r['world_size']} | {r['ms_median']:.2f} | {r['ms_p90']:.2f} "
                     f"| {r['ms_in_collectives_median']:.2f} "
                     f"| {r['bytes_per_step_per_rank']:.0f} | {r['bytes_model']} | {_fmt_bytes(m)} "
                     f"| {_fmt_bytes(r['model'])} | {m['all_gather_calls']:g}, {m['all_reduce_calls']:g} |")
    return lines


def write_report(rows: list[dict], meta: dict, config: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / "syncbn_gloo_cpu.json", out_dir / "syncbn_gloo_cpu.md"
    js.write_text(json.dumps({"meta": meta, "config": config, "rows": rows}, indent=1) + "\n")
    c = sum(CHANNELS)
    lines = [
        "# normkit.SyncBatchNorm on gloo, CPU", "",
        f"{meta['cpu']}, {meta['cores']} cores; torch {meta['torch']}; normkit {meta['normkit_commit']}; "
        f"{meta['date_utc']}. 1-minute load average {meta['loadavg_1min_before']:.2f} before the run, "
        f"{meta['loadavg_1min_after']:.2f} after (other processes on the same cores slow every row).", "",
        f"Model: {meta['model']}. Per rank: input {meta['input_per_rank']}; "
        f"{config['warmup']} warm-up steps, then {config['steps']} timed steps; a step's time is the "
        "slowest rank's; ms in collectives: median over steps of the mean over ranks of the time "
        "inside SyncBatchNorm's collectives, waiting for peers included. One thread per rank"
        f"{_oversubscribed(config['world_sizes'], meta['cores'])}. "
        "No DDP: the only collectives are SyncBatchNorm's.", "",
        "Bytes: payload per rank and step, counted by wrapping `torch.distributed.all_gather`, "
        "`all_gather_into_tensor` and `all_reduce` during the timed steps. bytes/step/rank = "
        "all_gather input + all_reduce tensor. Model, per SyncBatchNorm layer with C channels, float64 "
        f"(8 bytes): gather sends 3C and receives world x 3C, all_reduce 2C; here C sums to {c}, so "
        f"{3 * c * 8} + {2 * c * 8} = {5 * c * 8} bytes/step/rank for any world size > 1. "
        "Payload, not socket bytes: gloo's algorithms send a world-size-dependent multiple of it.", "",
        *table(rows), "",
    ]
    md.write_text("\n".join(lines))
    return md, js


def _oversubscribed(world_sizes: list[int], cores: int | None) -> str:
    over = [w for w in world_sizes if cores and w > cores]
    return f" ({', '.join(map(str, over))} ranks on {cores} cores: oversubscribed)" if over else ""


def _world_sizes(text: str) -> list[int]:
    sizes = [int(s) for s in text.replace(",", " ").split()]
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"world sizes must be positive integers, got {text!r}")
    return sizes


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run (at least 2)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    parser.add_argument("--world-sizes", type=_world_sizes, default=[1, 2, 4], help="e.g. 1,2,4")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (for a p90)")
    load_before = os.getloadavg()
    runs = [("BatchNorm2d", 1)] + [("SyncBatchNorm", w) for w in args.world_sizes]
    rows = []
    for norm, world in runs:
        started = time.monotonic()
        rows.append(summarize(norm, world, launch(norm, world, args.steps, args.warmup), args.steps))
        print(f"{norm} x{world}: {rows[-1]['ms_median']:.2f} ms median ({time.monotonic() - started:.0f} s)",
              flush=True)
    config = {"steps": args.steps, "warmup": args.warmup, "world_sizes": args.world_sizes}
    md, js = write_report(rows, metadata(load_before), config, args.out)
    print("\n".join(["", *table(rows), ""]))
    print(f"wrote {md} and {js}")


if __name__ == "__main__":
    main()
