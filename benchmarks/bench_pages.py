"""Fresh pages under the numba backend's outputs (:mod:`normkit.ops.numba._pages`): what the
page faults of a fresh output cost, and what huge pages and prefaulting save, from the allocation
alone up to whole LayerNorm / RMSNorm / GroupNorm / BatchNorm calls.

    python benchmarks/bench_pages.py [--quick] [--rounds 15]
    python benchmarks/bench_pages.py --sections heap norms --ops "LayerNorm 4096x1024" BatchNorm \
        --out /tmp/mid.md     # the mid-size outputs (16-25 MiB) alone

Writes ``benchmarks/results/pages_cpu.md``. Every table alternates its variants call by call in
one process (one round = one call of each) and gives the median and the min..max spread over the
rounds, with the minor page faults (``ru_minflt``) of a median call. Variants:

* allocation: ``torch.empty`` (glibc), design (a) ``_pages.advise`` on torch's block (what the
  backend uses), design (b) an anonymous mmap aligned to 2 MiB, advised and wrapped with
  ``torch.frombuffer`` (evaluated, not used: its storage cannot grow, see the results);
* regrown heap: LayerNorm 4096x1024 with glibc's heap trimmed (``malloc_trim(0)``) before each
  call, so that its 16 MiB outputs land in fresh heap pages, as every other call of a training
  loop's finds one (the norms table shows how often): numba with and without the prefault, torch;
* norms: numba with 4 KiB faults (neither huge pages nor prefault), with the prefault only, as
  shipped (both), torch eager, torch.compile; forward (no autograd), backward alone
  (``autograd.grad`` of a kept graph), forward+backward, at 1 and 2 threads. The faults come in
  bursts (a regrown heap one call, none the next), so the mean is given beside the median.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import mmap
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

import normkit.functional as NF
from normkit.ops.numba import _pages, channel_norm, row_norm

HERE = Path(__file__).resolve().parent
MiB = 1 << 20


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * mmap.PAGESIZE


@contextlib.contextmanager
def pages(huge: bool, prefault: bool) -> Iterator[None]:
    """Huge pages and the prefault for the numba outputs on or off (a threshold out of reach turns
    one off)."""
    saved = _pages.MIN_BYTES, _pages.PREFAULT_MIN_BYTES
    _pages.MIN_BYTES = saved[0] if huge else 1 << 62
    _pages.PREFAULT_MIN_BYTES = saved[1] if prefault else 1 << 62
    try:
        yield
    finally:
        _pages.MIN_BYTES, _pages.PREFAULT_MIN_BYTES = saved


def _wire_launchers() -> str:
    """Until ``row_norm.py`` and ``channel_norm.py`` allocate through ``_pages`` (a change the lead
    applies), their ``torch.empty_like`` is routed there for this process only, and the results
    say so."""
    said = []
    for mod in (row_norm, channel_norm):
        name = mod.__name__.rsplit(".", 1)[1]
        if hasattr(mod, "_pages"):
            said.append(f"{name}.py allocates through _pages")
            continue
        shim = types.SimpleNamespace(**{n: getattr(torch, n) for n in dir(torch) if not n.startswith("__")})
        shim.empty_like = _pages.empty_like
        mod.torch = shim
        said.append(f"{name}.py not yet wired: its torch.empty_like routed to _pages.empty_like by this script")
    return "; ".join(said)


# ---- allocation ---------------------------------------------------------------------------


def _design_a(n: int) -> torch.Tensor:
    t = torch.empty(n, dtype=torch.uint8)
    _pages.advise(t)
    return t


def _design_b(n: int) -> torch.Tensor:
    huge = _pages.huge_page_size() or 2 * MiB
    m = mmap.mmap(-1, n + huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = np.frombuffer(m, np.uint8).ctypes.data  # the mapping's address (the array is dropped)
    m.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(m, dtype=torch.uint8, count=n, offset=-start % huge)


ALLOC = {
    "torch.empty": lambda n: torch.empty(n, dtype=torch.uint8),
    "(a) advise": _design_a,
    "(b) mmap+frombuffer": _design_b,
}


# The clock of the timed calls (--clock): wall time, or the process's CPU time (user + system, all
# threads: page faults included, other processes' load excluded, a spinning thread pool counted).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def _timed(fn: Callable[[], object]) -> tuple[float, int]:
    f0 = _faults()
    t0 = clock()
    out = fn()
    t1 = clock()
    f1 = _faults()
    del out
    return t1 - t0, f1 - f0


def _row(label: str, runs: dict[str, list[tuple[float, int]]], scale: float = 1e3) -> list[str]:
    """Median (min..max) and mean time, and the mean faults per call, of each variant."""
    cells = []
    for r in runs.values():
        ts = sorted(t for t, _ in r)
        med, mean = statistics.median(ts), statistics.fmean(ts)
        flt = round(statistics.fmean(f for _, f in r))
        cells.append(
            f"{med * scale:.3g} ({ts[0] * scale:.3g}..{ts[-1] * scale:.3g}) mean {mean * scale:.3g}, {flt} flt"
        )
    return [f"| {label} | " + " | ".join(cells) + " |"]


def bench_alloc(rounds: int, sizes: list[int]) -> list[str]:
    lines = ["| size | " + " | ".join(ALLOC) + " |", "|---" * (len(ALLOC) + 1) + "|"]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for n in sizes:
            runs: dict[str, list[tuple[float, int]]] = {k: [] for k in ALLOC}
            for r in range(rounds + 2):
                for name, alloc in ALLOC.items():
                    res = _timed(lambda: alloc(n).fill_(1))  # noqa: B023
                    if r >= 2:  # two warm-up rounds: glibc's threshold settles
                        runs[name].append(res)
            lines += _row(f"{n / MiB:.3g} MiB, {threads} thr", runs)
    return lines


def bench_small(rounds: int) -> list[str]:
    """Per-call cost of the helper below and above its threshold, the data never touched."""
    lines = ["| tensor | torch.empty_like us | _pages.empty_like us |", "|---|---|---|"]
    for shape in ((8, 4096), (4096, 1024), (4096, 4096)):
        x = torch.empty(shape)
        fns = {"torch": lambda: torch.empty_like(x), "pages": lambda: _pages.empty_like(x)}  # noqa: B023
        per = {k: [] for k in fns}
        for _ in range(rounds):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                for _ in range(200):
                    fn()
                per[k].append((time.perf_counter() - t0) / 200)
        cells = [f"{statistics.median(v) * 1e6:.2f} ({min(v) * 1e6:.2f}..{max(v) * 1e6:.2f})" for v in per.values()]
        lines.append(f"| {shape} float32 ({x.nbytes / MiB:.3g} MiB) | " + " | ".join(cells) + " |")
    return lines


def bench_rss(count: int = 5, n: int = 64 * MiB) -> list[str]:
    lines = ["| design | RSS added by 5 live, written 64 MiB tensors | RSS after del |", "|---|---|---|"]
    for name, alloc in ALLOC.items():
        base = _rss()
        live = [alloc(n).fill_(1) for _ in range(count)]
        held = _rss() - base
        del live
        lines.append(
            f"| {name} | {held / MiB:.1f} MiB ({(held - count * n) / count / MiB:+.2f} MiB each) | "
            f"{(_rss() - base) / MiB:+.1f} MiB |"
        )
    return lines


HEAP_PROBE = """
import ctypes, random, sys, torch
from normkit.ops.numba import _pages
if sys.argv[1] == "heap":
    ctypes.CDLL(None).mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: glibc serves even 100 MiB from its heap
maps = lambda: sum(1 for _ in open("/proc/self/maps"))
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
random.seed(0)
live, advised, m0, r0 = [], 0, maps(), rss()
for i in range(1000):
    t = torch.empty(random.choice([33, 40, 48, 64, 100]) * 2**20 + random.randrange(2**20), dtype=torch.uint8)
    advised += sys.argv[2] == "on" and _pages.advise(t)
    live.append(t.fill_(1))
    if len(live) > 6:
        live.pop(random.randrange(len(live)))
peak = maps()
del live, t
print(f"{advised}/1000 advised, mappings {m0} -> {peak} with 6 live -> {maps()} after del, RSS {r0} -> {rss()} MiB")
"""


def bench_heap() -> list[str]:
    """1000 advised allocations of 33-101 MiB, 6 kept alive at random: glibc mapping each one, and
    glibc told to serve them from its heap (``mallopt``), each in a fresh process."""
    out = []
    for how, advice in (("mmap", "on"), ("mmap", "off"), ("heap", "on"), ("heap", "off")):
        run = subprocess.run(
            [sys.executable, "-c", HEAP_PROBE, how, advice], capture_output=True, text=True, check=True
        )
        where = "maps each block (default)" if how == "mmap" else "heap (M_MMAP_THRESHOLD 1 GiB)"
        out.append(f"- glibc {where}, advice {advice}: {run.stdout.strip()}")
    return out


def check_b() -> list[str]:
    """What design (b)'s tensors do differently from torch.empty's."""
    out = []
    t = _design_b(4 * MiB)
    out.append(f"storage resizable: {t.untyped_storage().resizable()} (torch.empty: True)")
    try:
        t.resize_(8 * MiB)
        out.append("resize_ to a larger size: works")
    except RuntimeError as e:
        out.append(f"resize_ to a larger size: RuntimeError `{str(e).splitlines()[0]}`")
    return out


# ---- end to end ---------------------------------------------------------------------------


def _cases(M: int) -> dict[str, tuple[tuple[int, ...], Callable, Callable, tuple]]:
    """op -> (input shape, normkit call(x, backend), torch call(x), parameters): the large outputs
    (M x 4096, huge pages) and the mid-size ones (16-25 MiB: heap memory, the prefault)."""
    N, C = 4096, 320
    w, b = torch.randn(N, requires_grad=True), torch.randn(N, requires_grad=True)
    gw, gb = torch.randn(C, requires_grad=True), torch.randn(C, requires_grad=True)
    bw, bb = torch.randn(64, requires_grad=True), torch.randn(64, requires_grad=True)
    F = torch.nn.functional
    return {
        f"LayerNorm {M}x{N}": (
            (M, N),
            lambda x, backend: NF.layer_norm(x, (N,), w, b, 1e-5, backend=backend),
            lambda x: F.layer_norm(x, (N,), w, b, 1e-5),
            (w, b),
        ),
        f"RMSNorm {M}x{N}": (
            (M, N),
            lambda x, backend: NF.rms_norm(x, (N,), w, 1e-6, backend=backend),
            lambda x: F.rms_norm(x, (N,), w, 1e-6),
            (w,),
        ),
        f"GroupNorm(32) {M // 512}x{C}x64x64": (
            (M // 512, C, 64, 64),
            lambda x, backend: NF.group_norm(x, 32, gw, gb, 1e-5, backend=backend),
            lambda x: F.group_norm(x, 32, gw, gb, 1e-5),
            (gw, gb),
        ),
        f"LayerNorm {M}x1024": (
            (M, 1024),
            lambda x, backend: NF.layer_norm(x, (1024,), w[:1024], b[:1024], 1e-5, backend=backend),
            lambda x: F.layer_norm(x, (1024,), w[:1024], b[:1024], 1e-5),
            (w, b),
        ),
        f"BatchNorm2d train {M // 128}x64x56x56": (
            (M // 128, 64, 56, 56),
            lambda x, backend: NF.batch_norm(x, None, None, bw, bb, True, 0.1, 1e-5, backend=backend),
            lambda x: F.batch_norm(x, None, None, bw, bb, True, 0.1, 1e-5),
            (bw, bb),
        ),
    }


# numba variants: (huge pages, prefault)
NUMBA = {"numba 4K faults": (False, False), "numba prefault": (False, True), "numba": (True, True)}


def _phase(phase: str, fn: Callable, x: torch.Tensor, xg: torch.Tensor, dy: torch.Tensor, params: tuple):
    """One timed call of ``fn`` in ``phase``: (seconds, minor faults)."""
    if phase == "fwd":
        with torch.no_grad():
            return _timed(lambda: fn(x))
    if phase == "bwd":
        y = fn(xg)
        res = _timed(lambda: torch.autograd.grad(y, (xg, *params), dy, retain_graph=True))
        del y
        return res
    return _timed(lambda: torch.autograd.grad(fn(xg), (xg, *params), dy))


def bench_norms(rounds: int, M: int, ops: list[str] | None) -> list[str]:
    providers = (*NUMBA, "torch", "torch.compile")
    lines = ["| op, phase, threads | " + " | ".join(providers) + " |", "|---" * (len(providers) + 1) + "|"]
    rng = random.Random(0)
    for op, (shape, norm, eager, params) in _cases(M).items():
        if ops and not any(o in op for o in ops):
            continue
        x = torch.randn(shape)
        xg = x.clone().requires_grad_()
        dy = torch.randn(shape)
        numba = lambda t: norm(t, backend="numba")  # noqa: B023, E731
        calls = {**dict.fromkeys(NUMBA, numba), "torch": eager, "torch.compile": torch.compile(eager, dynamic=False)}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for phase in ("fwd", "bwd", "fwd+bwd"):
                runs: dict[str, list[tuple[float, int]]] = {p: [] for p in providers}
                for r in range(rounds + 2):
                    order = list(providers)
                    rng.shuffle(order)  # a call right after another's allocations meets its heap
                    for p in order:
                        with pages(*NUMBA.get(p, (True, True))):
                            res = _phase(phase, calls[p], x, xg, dy, params)
                        if r >= 2:
                            runs[p].append(res)
                lines += _row(f"{op} {phase}, {threads} thr", runs)
    return lines


def bench_regrown(rounds: int, M: int = 4096, N: int = 1024) -> list[str]:
    """LayerNorm MxN with glibc's heap trimmed before every call: the outputs in fresh heap pages."""
    trim = ctypes.CDLL(None).malloc_trim
    trim.argtypes = (ctypes.c_size_t,)
    w, b = torch.randn(N, requires_grad=True), torch.randn(N, requires_grad=True)
    x = torch.randn(M, N)
    xg = x.clone().requires_grad_()
    dy = torch.randn(M, N)
    numba = lambda t: NF.layer_norm(t, (N,), w, b, 1e-5, backend="numba")  # noqa: E731
    calls = {
        "numba 4K faults": numba,
        "numba prefault": numba,
        "torch": lambda t: torch.nn.functional.layer_norm(t, (N,), w, b, 1e-5),
    }
    lines = ["| phase, threads | " + " | ".join(calls) + " |", "|---" * (len(calls) + 1) + "|"]
    rng = random.Random(1)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for phase in ("fwd", "fwd+bwd"):
            runs: dict[str, list[tuple[float, int]]] = {p: [] for p in calls}
            for r in range(rounds + 2):
                order = list(calls)
                rng.shuffle(order)
                for p in order:
                    trim(0)
                    with pages(False, p == "numba prefault"):
                        res = _phase(phase, calls[p], x, xg, dy, (xg, w, b)[1:])
                    if r >= 2:
                        runs[p].append(res)
            lines += _row(f"LayerNorm {M}x{N} {phase}, {threads} thr", runs)
    return lines


# ---- report -------------------------------------------------------------------------------


def _sh(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent, check=False).stdout.strip()
    except OSError:
        return "?"


def _machine() -> list[str]:
    def sysfs(name: str) -> str:
        try:
            with open(f"{_pages.SYSFS}/{name}") as f:
                return f.read().strip()
        except OSError:
            return "absent"

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    with open("/proc/sys/vm/max_map_count") as f:
        max_map = f.read().strip()
    return [
        f"- machine: {cpu}, {os.cpu_count()} cores, Linux {platform.release()}, glibc "
        f"{platform.libc_ver()[1]}, Python {platform.python_version()}, torch {torch.__version__}",
        f"- THP enabled: `{sysfs('enabled')}`, defrag: `{sysfs('defrag')}`, hpage_pmd_size "
        f"{sysfs('hpage_pmd_size')}, vm.max_map_count {max_map}",
        f"- commit {_sh('git', 'rev-parse', '--short', 'HEAD')}"
        f"{' (working tree modified)' if _sh('git', 'status', '--porcelain', '--', 'src') else ''}",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="3 rounds, 1024-row norms: checks that it runs")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--ops", nargs="+", default=None, help="norms whose name contains one of these")
    ap.add_argument("--clock", choices=CLOCKS, default="wall", help="of the allocation, regrown and norms tables")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "pages_cpu.md")
    a = ap.parse_args()
    global clock
    clock = CLOCKS[a.clock]
    rounds = 3 if a.quick else a.rounds
    M = 1024 if a.quick else 4096
    if _pages.huge_page_size() == 0:
        sys.exit("huge pages are not offered here (not Linux, or THP 'never'): nothing to measure")
    wiring = _wire_launchers()
    load0 = os.getloadavg()
    run = {
        "alloc": lambda: bench_alloc(rounds, [8 * MiB, 16 * MiB, 32 * MiB, 42_000_000, 64 * MiB]),
        "small": lambda: bench_small(rounds),
        "rss": bench_rss,
        "heap": bench_heap,
        "b": lambda: [f"- {s}" for s in check_b()],
        "regrown": lambda: bench_regrown(rounds),
        "norms": lambda: bench_norms(rounds, M, a.ops),
    }
    sections = [
        "# Fresh pages under the numba backend's outputs (CPU)",
        "",
        "Written by `python benchmarks/bench_pages.py`. Times in ms: median (min..max) and mean over "
        f"{rounds} interleaved rounds ({a.clock} clock), and the mean minor page faults per call.",
        "",
        *_machine(),
        f"- {wiring}",
        "",
        "What to read: the fault counts are exact, the times are as loaded as the load average says. "
        "Design (a) advises torch's own block; (b) maps its own, aligned, so it also saves the ~540 "
        "faults of (a)'s unaligned head and tail, but its storage cannot grow (below). Below 32 MiB "
        "glibc hands back heap blocks, mostly with their pages present, so `_pages` advises nothing "
        "there (`MIN_BYTES`); it prefaults the pages a trimmed and regrown heap lacks "
        "(`PREFAULT_MIN_BYTES`, 4 MiB), which `ru_minflt` counts as faults too (taken in one call).",
        "",
    ]
    for name in a.sections:
        sections += [f"## {SECTIONS[name]}", "", *run[name](), ""]
    load1 = os.getloadavg()
    sections.insert(6, f"- load average (1 min) {load0[0]:.2f} before, {load1[0]:.2f} after")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(sections))
    print("\n".join(sections))


SECTIONS = {
    "alloc": "Allocate + first write (`fill_`), steady state",
    "small": "Cost per call of the helper (data not touched), us",
    "rss": "Resident memory",
    "heap": "Mappings and memory over 1000 allocations",
    "b": "Design (b) differs",
    "regrown": "Regrown heap: LayerNorm 4096x1024 float32 after `malloc_trim(0)`, ms",
    "norms": "Norms, float32",
}


if __name__ == "__main__":
    main()
