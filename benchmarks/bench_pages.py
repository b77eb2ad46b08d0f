"""Huge pages for the numba backend's large outputs (:mod:`normkit.ops.numba._pages`): what the
page faults of a fresh output cost, and what advising huge pages saves, from the allocation alone
up to whole LayerNorm / RMSNorm calls.

    python benchmarks/bench_pages.py [--quick] [--rounds 15]

Writes ``benchmarks/results/pages_cpu.md``. Every table alternates its variants call by call in
one process (one round = one call of each) and gives the median and the min..max spread over the
rounds, with the minor page faults (``ru_minflt``) of a median call. Variants:

* allocation: ``torch.empty`` (glibc), design (a) ``_pages.advise`` on torch's block (what the
  backend uses), design (b) an anonymous mmap aligned to 2 MiB, advised and wrapped with
  ``torch.frombuffer`` (evaluated, not used: its storage cannot grow, see the results);
* norms: numba without and with huge pages, torch eager, torch.compile; forward (no autograd),
  backward alone (``autograd.grad`` of a kept graph), forward+backward, at 1 and 2 threads.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import platform
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
def huge_pages(on: bool) -> Iterator[None]:
    """Huge pages for the numba outputs on or off (``MIN_BYTES`` out of reach turns them off)."""
    saved = _pages.MIN_BYTES
    _pages.MIN_BYTES = saved if on else 1 << 62
    try:
        yield
    finally:
        _pages.MIN_BYTES = saved


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


def _timed(fn: Callable[[], object]) -> tuple[float, int]:
    f0 = _faults()
    t0 = time.perf_counter()
    out = fn()
    t1 = time.perf_counter()
    f1 = _faults()
    del out
    return t1 - t0, f1 - f0


def _row(label: str, runs: dict[str, list[tuple[float, int]]], scale: float = 1e3) -> list[str]:
    cells = []
    for r in runs.values():
        ts = sorted(t for t, _ in r)
        med = statistics.median(ts)
        flt = int(statistics.median(f for _, f in r))
        cells.append(f"{med * scale:.3g} ({ts[0] * scale:.3g}..{ts[-1] * scale:.3g}), {flt} flt")
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
    for shape in ((8, 4096), (4096, 4096)):
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
    """op -> (input shape, normkit call(x, backend), torch call(x), parameters)."""
    N, C = 4096, 320
    w, b = torch.randn(N, requires_grad=True), torch.randn(N, requires_grad=True)
    gw, gb = torch.randn(C, requires_grad=True), torch.randn(C, requires_grad=True)
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
    }


def bench_norms(rounds: int, M: int) -> list[str]:
    providers = ("numba", "numba+huge", "torch", "torch.compile")
    lines = ["| op, phase, threads | " + " | ".join(providers) + " |", "|---" * (len(providers) + 1) + "|"]
    for op, (shape, norm, eager, params) in _cases(M).items():
        x = torch.randn(shape)
        xg = x.clone().requires_grad_()
        dy = torch.randn(shape)
        calls = {
            "numba": lambda t: norm(t, backend="numba"),  # noqa: B023
            "numba+huge": lambda t: norm(t, backend="numba"),  # noqa: B023
            "torch": eager,
            "torch.compile": torch.compile(eager, dynamic=False),
        }
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for phase in ("fwd", "bwd", "fwd+bwd"):
                runs: dict[str, list[tuple[float, int]]] = {p: [] for p in providers}
                for r in range(rounds + 2):
                    for p in providers:
                        with huge_pages(p == "numba+huge"):
                            fn = calls[p]
                            if phase == "fwd":
                                with torch.no_grad():
                                    res = _timed(lambda: fn(x))  # noqa: B023
                            elif phase == "bwd":
                                y = fn(xg)
                                res = _timed(lambda: torch.autograd.grad(y, (xg, *params), dy, retain_graph=True))  # noqa: B023
                                del y
                            else:
                                res = _timed(lambda: torch.autograd.grad(fn(xg), (xg, *params), dy))  # noqa: B023
                        if r >= 2:
                            runs[p].append(res)
                lines += _row(f"{op} {phase}, {threads} thr", runs)
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
    ap.add_argument("--quick", action="store_true", help="3 rounds, 1024x4096 norms: checks that it runs")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "pages_cpu.md")
    a = ap.parse_args()
    rounds = 3 if a.quick else a.rounds
    M = 1024 if a.quick else 4096
    if _pages.huge_page_size() == 0:
        sys.exit("huge pages are not offered here (not Linux, or THP 'never'): nothing to measure")
    wiring = _wire_launchers()
    load0 = os.getloadavg()
    sections = [
        "# Huge pages for the numba backend's outputs (CPU)",
        "",
        "Written by `python benchmarks/bench_pages.py`. Times in ms: median (min..max) over "
        f"{rounds} interleaved rounds, and the minor page faults of the median call.",
        "",
        *_machine(),
        f"- {wiring}",
        "",
        "What to read: the fault counts are exact, the times are as loaded as the load average says. "
        "Design (a) advises torch's own block; (b) maps its own, aligned, so it also saves the ~540 "
        "faults of (a)'s unaligned head and tail, but its storage cannot grow (below). Below 32 MiB "
        "glibc hands back heap blocks with their pages present (0 faults in the steady state), so "
        "`_pages` advises nothing there (`MIN_BYTES`).",
        "",
        "## Allocate + first write (`fill_`), steady state",
        "",
        *bench_alloc(rounds, [8 * MiB, 16 * MiB, 32 * MiB, 42_000_000, 64 * MiB]),
        "",
        "## Cost per call of the helper (data not touched), us",
        "",
        *bench_small(rounds),
        "",
        "## Resident memory",
        "",
        *bench_rss(),
        "",
        "## Mappings and memory over 1000 allocations",
        "",
        *bench_heap(),
        "",
        "## Design (b) differs",
        "",
        *(f"- {s}" for s in check_b()),
        "",
        "## Norms, float32",
        "",
        *bench_norms(rounds, M),
        "",
    ]
    load1 = os.getloadavg()
    sections.insert(6, f"- load average (1 min) {load0[0]:.2f} before, {load1[0]:.2f} after")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(sections))
    print("\n".join(sections))


if __name__ == "__main__":
    main()
