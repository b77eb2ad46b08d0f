"""The numba channel kernels against torch eager and torch.compile, forward, backward and both,
with the kernels' own time apart from the output's allocation.

    python benchmarks/bench_channel_kernels.py [--threads 1 2] [--compile] [--old DIR | --old-rev REV]
        [--repeats 15] [--small] [--faults] [--cpu-time]

Cases: BatchNorm 32x64x56x56 (NCHW and channels_last), GroupNorm 32x64x56x56 G=32, the U-Net
GroupNorm 8x320x64x64 G=32 and InstanceNorm 1x64x256x256 (GroupNorm with G = C), float32,
training, random weight, bias and upstream gradient. ``--small`` runs the per-call cases
instead (BatchNorm and GroupNorm G=32 at 8x64x8x8, NCHW and channels_last: what a call costs
besides its kernels; times in microseconds). Providers are interleaved call by call;
each figure is the median over the repeats with its min-max.

``kernel`` rows time the launcher (``_fwd_impl`` / ``_bwd_impl``) with its output buffers
allocated once and reused (``_pages.empty_like`` replaced): the kernels' time without the
page faults of a fresh 25-40 MB output, which eager torch and numba pay alike on every call. ``--old DIR`` adds the same
launcher from a copy of an earlier ``channel_norm.py`` (as ``old_channel_norm`` in DIR,
its custom ops renamed) for an A/B comparison in one process (rows ``numba/old`` and
``kernel/old``: the median and quartiles of the new/old ratio of calls made one after the
other); ``--old-rev REV`` writes that
copy from git revision REV, with REV's ``channel_kernels.py`` beside it (as
``old_channel_kernels``: the old kernels, not only the old launcher).

``--faults`` adds each cell's minor page faults per call (``getrusage``): where a provider's
fwd+bwd is slower than its fwd plus its bwd, these show whether its outputs landed in pages the
C library's heap had just returned to the system and grown into again (glibc trims the top of
its heap once twice its mmap threshold lies free there: at 32x64x56x56 the y and dx of one
fwd+bwd, 2 x 25.7 MB, just pass that line, so one call in two to four refaults both).
"""

from __future__ import annotations

import argparse
import importlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from normkit.ops.numba import channel_norm as cn

SMALL_CASES = {
    "bn 8x64x8x8": ((8, 64, 8, 8), 0, False),
    "bn 8x64x8x8 cl": ((8, 64, 8, 8), 0, True),
    "gn 8x64x8x8 G=32": ((8, 64, 8, 8), 32, False),
    "gn 8x64x8x8 G=32 cl": ((8, 64, 8, 8), 32, True),
}

CASES = {
    "bn 32x64x56x56": ((32, 64, 56, 56), 0, False),
    "bn 32x64x56x56 cl": ((32, 64, 56, 56), 0, True),
    "gn 32x64x56x56 G=32": ((32, 64, 56, 56), 32, False),
    "gn 8x320x64x64 G=32": ((8, 320, 64, 64), 32, False),
    "in 1x64x256x256": ((1, 64, 256, 256), 64, False),
}


class _Reuse:
    """``_pages`` for a launcher module, whose ``empty_like`` hands back one buffer per shape,
    allocated once (its pages already touched)."""

    def __init__(self) -> None:
        self._bufs: dict[Any, torch.Tensor] = {}

    def empty_like(self, t: torch.Tensor, **kw: Any) -> torch.Tensor:
        key = (tuple(t.shape), t.stride(), t.dtype)
        if key not in self._bufs:
            self._bufs[key] = torch.empty_like(t, **kw).zero_()
        return self._bufs[key]


def _torch_fn(groups: int) -> Callable[..., torch.Tensor]:
    if groups == 0:
        return lambda x, w, b: F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
    return lambda x, w, b: F.group_norm(x, groups, w, b, 1e-5)


def _numba_fn(mod: Any, groups: int) -> Callable[..., torch.Tensor]:
    if groups == 0:
        return lambda x, w, b: mod.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
    return lambda x, w, b: mod.group_norm(x, groups, w, b, 1e-5)


def _autograd_timers(fn: Callable[..., torch.Tensor], x, w, b, dy) -> dict[str, Callable[[], None]]:
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    graph: list[torch.Tensor] = []

    def fwd() -> None:
        with torch.no_grad():
            fn(*leaves)

    def bwd() -> None:
        if not graph:
            graph.append(fn(*leaves))
        torch.autograd.grad(graph[0], leaves, dy, retain_graph=True)

    def both() -> None:
        torch.autograd.grad(fn(*leaves), leaves, dy)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": both}


def _kernel_timers(mod: Any, groups: int, x, w, b, dy) -> dict[str, Callable[[], None]]:
    saved: list[Any] = []

    def fwd() -> None:
        out = mod._fwd_impl(x, w, b, None, None, groups, True, 1e-5, 0)
        if not saved:
            saved.append(tuple(t.clone() for t in out))

    def bwd() -> None:
        if not saved:
            fwd()
        _, pivot, mean, _, rstd = saved[0]
        mod._bwd_impl(dy, x, w, b, pivot, mean, rstd, groups, True, 0, True, True, True)

    def both() -> None:
        _, pivot, mean, _, rstd = mod._fwd_impl(x, w, b, None, None, groups, True, 1e-5, 0)
        mod._bwd_impl(dy, x, w, b, pivot, mean, rstd, groups, True, 0, True, True, True)

    def reusing(f: Callable[[], None]) -> Callable[[], None]:
        def call() -> None:
            real, mod._pages = mod._pages, _Reuse.shared
            try:
                f()
            finally:
                mod._pages = real

        return call

    return {"fwd": reusing(fwd), "bwd": reusing(bwd), "fwd+bwd": reusing(both)}


_Reuse.shared = _Reuse()


def run(
    threads: int,
    compile_: bool,
    old: Any,
    repeats: int,
    only: list[str] | None,
    clock: Callable[[], float] = time.perf_counter,
    small: bool = False,
    show_faults: bool = False,
) -> None:
    torch.set_num_threads(threads)
    torch._dynamo.config.recompile_limit = 64  # one compiled function per case, grad mode and thread count
    unit, scale = ("us", 1e6) if small else ("ms", 1e3)
    for name, (shape, groups, cl) in (SMALL_CASES if small else CASES).items():
        if only and not any(o in name for o in only):
            continue
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g) * 2 + 1
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        C = shape[1]
        w, b = torch.randn(C, generator=g), torch.randn(C, generator=g)
        dy = torch.randn(shape, generator=g)
        if cl:
            dy = dy.contiguous(memory_format=torch.channels_last)
        providers: dict[str, dict[str, Callable[[], None]]] = {
            "eager": _autograd_timers(_torch_fn(groups), x, w, b, dy),
        }
        if compile_:
            providers["compile"] = _autograd_timers(torch.compile(_torch_fn(groups), dynamic=False), x, w, b, dy)
        providers["numba"] = _autograd_timers(_numba_fn(cn, groups), x, w, b, dy)
        if old is not None:
            providers["numba-old"] = _autograd_timers(_numba_fn(old, groups), x, w, b, dy)
        providers["kernel"] = _kernel_timers(cn, groups, x, w, b, dy)
        if old is not None:
            providers["kernel-old"] = _kernel_timers(old, groups, x, w, b, dy)
        times: dict[tuple[str, str], list[float]] = {}
        faults: dict[tuple[str, str], int] = {}
        for _ in range(2):  # warm-up (compilation, first-touch of buffers)
            for p in providers.values():
                for f in p.values():
                    f()
        for rep in range(repeats):
            # Direction by direction, so that a provider and its old copy run one after the other,
            # in the reverse order every other repeat, so that neither always runs first (after
            # the other providers' calls, in the cache and heap state they leave).
            order = list(providers.items())[::-1 if rep % 2 else 1]
            for d in ("fwd", "bwd", "fwd+bwd"):
                for pname, p in order:
                    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    t0 = clock()
                    p[d]()
                    times.setdefault((pname, d), []).append(clock() - t0)
                    flt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
                    faults[(pname, d)] = faults.get((pname, d), 0) + flt
        print(f"\n{name}, {threads} thread(s), {unit} median (min-max)")
        for pname in providers:
            cells = []
            for d in ("fwd", "bwd", "fwd+bwd"):
                ts = [t * scale for t in times[(pname, d)]]
                cells.append(f"{d} {statistics.median(ts):7.2f} ({min(ts):.2f}-{max(ts):.2f})")
                if show_faults:
                    cells[-1] += f" flt {faults[(pname, d)] / repeats:6.0f}"
            print(f"  {pname:11s} " + "  ".join(cells))
        for pname in ("numba", "kernel"):
            if f"{pname}-old" in providers:
                cells = [_paired(times, pname, d) for d in ("fwd", "bwd", "fwd+bwd")]
                print(f"  {pname + '/old':11s} " + "  ".join(cells))
        sys.stdout.flush()


def _paired(times: dict[tuple[str, str], list[float]], pname: str, d: str) -> str:
    """The median and quartiles of new/old time ratios of calls made one after the other: on a
    box shared with other work, load that drifts over seconds moves both calls of a pair alike
    and cancels in the ratio, where the medians of each column apart may swap places."""
    ratios = sorted(a / b for a, b in zip(times[(pname, d)], times[(f"{pname}-old", d)]))
    q = len(ratios) // 4
    return f"{d} x{statistics.median(ratios):.3f} ({ratios[q]:.3f}-{ratios[-1 - q]:.3f})"


def _old_from_git(rev: str) -> str:
    """A directory holding revision ``rev``'s launcher and kernels as ``old_channel_norm`` and
    ``old_channel_kernels`` (the launcher's custom ops renamed, so that both register). One
    directory per commit, its files rewritten only when they differ: numba's cache there (keyed
    by the files' times) survives from run to run, so the old kernels compile once, not on
    every run (about a minute on 2 cores)."""
    root = Path(__file__).resolve().parents[1]
    src = "src/normkit/ops/numba/"

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout

    sha = git("rev-parse", "--verify", f"{rev}^{{commit}}").strip()
    out = Path(tempfile.gettempdir()) / f"bench_channel_old_{sha[:12]}"
    out.mkdir(exist_ok=True)
    launcher = git("show", f"{sha}:{src}channel_norm.py").replace(
        "from normkit.ops.numba import channel_kernels as k", "import old_channel_kernels as k")
    files = {
        "old_channel_kernels.py": git("show", f"{sha}:{src}channel_kernels.py"),
        "old_channel_norm.py": launcher.replace("normkit_numba::", "normkit_numba_old::"),
    }
    for name, text in files.items():
        path = out / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--old", help="directory holding old_channel_norm.py")
    ap.add_argument("--old-rev", help="git revision whose channel_norm.py and channel_kernels.py are the old ones")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--small", action="store_true", help="the per-call cases (8x64x8x8) instead")
    ap.add_argument("--faults", action="store_true", help="add minor page faults per call to each cell")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="time the process's CPU seconds instead of the wall clock (robust to other "
        "load at 1 thread; at 2, waiting threads that spin count too)",
    )
    args = ap.parse_args()
    old = None
    if args.old_rev:
        args.old = _old_from_git(args.old_rev)
    if args.old:
        sys.path.insert(0, args.old)
        old = importlib.import_module("old_channel_norm")
    for t in args.threads:
        clock = time.process_time if args.cpu_time else time.perf_counter
        run(t, args.compile, old, args.repeats, args.only, clock, args.small, args.faults)


if __name__ == "__main__":
    main()
