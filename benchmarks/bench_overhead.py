"""Per-call overhead of normkit's default path over torch.nn at small shapes (issue 12).

At these shapes the kernels take a few microseconds, so the difference between a normkit call
and its torch twin is the Python dispatch: argument checks, backend resolution, layout. Each
case runs normkit and torch interleaved (one timeit block of each per round, so a noisy moment
hits both), on ``--threads`` torch threads (default 1), and reports the minimum and the median
per call over the rounds. The add-norms run at one transformer row (8 x 4096) against the
composition users write without normkit (``h = x + r`` then torch's norm); the "no_grad" cases
are the benchmark's inference column (``make bench-cpu``: under ``torch.no_grad()``, every tensor
requiring grad, ``normalized_shape`` a list). Time is this
thread's CPU time by default (``--timer cpu``): on a shared machine the wall clock also counts
the time other processes hold the core; ``--timer wall`` reads the wall clock.

    .venv/bin/python benchmarks/bench_overhead.py [--rounds 60] [--number 2000] [--timer cpu] [--threads 1]
        [--cases add_] [--out FILE]

Writes a markdown table (stdout, and ``--out`` if given).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import timeit

import torch
import torch.nn.functional as F

import normkit
import normkit.functional as NF


def _cases():
    x2 = torch.randn(8, 64)
    x4 = torch.randn(2, 8, 4, 4)
    ln, tln = normkit.LayerNorm(64), torch.nn.LayerNorm(64)
    rms, trms = normkit.RMSNorm(64), torch.nn.RMSNorm(64)
    bn, tbn = normkit.BatchNorm2d(8), torch.nn.BatchNorm2d(8)
    bne, tbne = normkit.BatchNorm2d(8).eval(), torch.nn.BatchNorm2d(8).eval()
    bnc, tbnc = normkit.BatchNorm2d(8, momentum=None), torch.nn.BatchNorm2d(8, momentum=None)
    gn, tgn = normkit.GroupNorm(2, 8), torch.nn.GroupNorm(2, 8)
    inn, tinn = normkit.InstanceNorm2d(8), torch.nn.InstanceNorm2d(8)
    w, b = torch.randn(64), torch.randn(64)
    rm, rv = torch.zeros(8), torch.ones(8)
    w8, b8 = torch.randn(8), torch.randn(8)
    # the add-norms at a transformer row (8 tokens of 4096): against what users write without
    # normkit, `h = x + r` then torch's norm
    xa, ra, wa, ba = torch.randn(8, 4096), torch.randn(8, 4096), torch.randn(4096), torch.randn(4096)

    def add_rms(h):
        return F.rms_norm(h, (4096,), wa), h

    def add_ln(h):
        return F.layer_norm(h, (4096,), wa, ba), h

    # the inference column of benchmarks/bench_cpu.py: leaves that require grad, used under no_grad
    xg, rg, wg, bg = (t.clone().requires_grad_() for t in (xa, ra, wa, ba))

    def no_grad(call):
        def run():
            with torch.no_grad():
                return call()

        return run

    def add_then(norm):
        def run():
            h = xg + rg
            return norm(h), h

        return no_grad(run)

    return [
        ("LayerNorm(64) (8, 64)", lambda: ln(x2), lambda: tln(x2)),
        ("RMSNorm(64) (8, 64)", lambda: rms(x2), lambda: trms(x2)),
        ("BatchNorm2d(8) train (2, 8, 4, 4)", lambda: bn(x4), lambda: tbn(x4)),
        ("BatchNorm2d(8, momentum=None) train (2, 8, 4, 4)", lambda: bnc(x4), lambda: tbnc(x4)),
        ("BatchNorm2d(8) eval (2, 8, 4, 4)", lambda: bne(x4), lambda: tbne(x4)),
        ("GroupNorm(2, 8) (2, 8, 4, 4)", lambda: gn(x4), lambda: tgn(x4)),
        ("InstanceNorm2d(8) (2, 8, 4, 4)", lambda: inn(x4), lambda: tinn(x4)),
        ("layer_norm (8, 64)", lambda: NF.layer_norm(x2, (64,), w, b), lambda: F.layer_norm(x2, (64,), w, b)),
        ("rms_norm (8, 64)", lambda: NF.rms_norm(x2, (64,), w), lambda: F.rms_norm(x2, (64,), w)),
        (
            "batch_norm train (2, 8, 4, 4)",
            lambda: NF.batch_norm(x4, rm, rv, w8, b8, True),
            lambda: F.batch_norm(x4, rm, rv, w8, b8, True),
        ),
        (
            "batch_norm eval (2, 8, 4, 4)",
            lambda: NF.batch_norm(x4, rm, rv, w8, b8, False),
            lambda: F.batch_norm(x4, rm, rv, w8, b8, False),
        ),
        ("group_norm (2, 8, 4, 4)", lambda: NF.group_norm(x4, 2, w8, b8), lambda: F.group_norm(x4, 2, w8, b8)),
        ("instance_norm (2, 8, 4, 4)", lambda: NF.instance_norm(x4), lambda: F.instance_norm(x4)),
        ("add_rms_norm (8, 4096)", lambda: NF.add_rms_norm(xa, ra, (4096,), wa), lambda: add_rms(xa + ra)),
        ("add_layer_norm (8, 4096)", lambda: NF.add_layer_norm(xa, ra, (4096,), wa, ba), lambda: add_ln(xa + ra)),
        (
            "rms_norm (8, 4096) no_grad",
            no_grad(lambda: NF.rms_norm(xg, [4096], wg, 1e-6)),
            no_grad(lambda: F.rms_norm(xg, [4096], wg, 1e-6)),
        ),
        (
            "add_rms_norm (8, 4096) no_grad",
            no_grad(lambda: NF.add_rms_norm(xg, rg, [4096], wg, 1e-6)),
            add_then(lambda h: F.rms_norm(h, [4096], wg, 1e-6)),
        ),
        (
            "add_layer_norm (8, 4096) no_grad",
            no_grad(lambda: NF.add_layer_norm(xg, rg, [4096], wg, bg, 1e-6)),
            add_then(lambda h: F.layer_norm(h, [4096], wg, bg, 1e-6)),
        ),
    ]


TIMERS = {"cpu": time.thread_time, "wall": time.perf_counter}


def measure(
    rounds: int, number: int, timer: str = "cpu", only: str = ""
) -> list[tuple[str, float, float, float, float]]:
    """Per case (those whose name contains ``only``): normkit min, torch min, normkit median,
    torch median (microseconds per call)."""
    clock = TIMERS[timer]
    rows = []
    with torch.no_grad():
        cases = [case for case in _cases() if only in case[0]]
    for name, ours, theirs in cases:
        ours(), theirs()  # warm up (lazy backend lookup, first-call allocations)
        a, b = [], []
        for _ in range(rounds):
            a.append(timeit.Timer(ours, timer=clock).timeit(number) / number * 1e6)
            b.append(timeit.Timer(theirs, timer=clock).timeit(number) / number * 1e6)
        rows.append((name, min(a), min(b), statistics.median(a), statistics.median(b)))
    return rows


def table(rows, rounds: int, number: int, timer: str = "cpu", load: tuple[float, ...] = ()) -> str:
    clock = "thread CPU time" if timer == "cpu" else "wall clock"
    lines = [
        f"# Per-call overhead over torch.nn at small shapes (torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s))",
        "",
        f'normkit\'s default path (backend "auto", default precision) against its torch twin, '
        f"interleaved, {rounds} rounds of {number} calls; microseconds per call ({clock}), autograd on."
        + (f" Load average before/after: {load[0]:.1f} / {load[1]:.1f}." if load else ""),
        "",
        "| case | normkit min | torch min | overhead (min) | normkit median | torch median | overhead (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, a, b, am, bm in rows:
        lines.append(f"| {name} | {a:.2f} | {b:.2f} | {a - b:+.2f} | {am:.2f} | {bm:.2f} | {am - bm:+.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--number", type=int, default=2000)
    parser.add_argument("--timer", choices=sorted(TIMERS), default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cases", default="", help="only the cases whose name contains this")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    before = os.getloadavg()[0]
    rows = measure(args.rounds, args.number, args.timer, args.cases)
    text = table(rows, args.rounds, args.number, args.timer, (before, os.getloadavg()[0]))
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
