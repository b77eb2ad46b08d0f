"""Kernel time per row of the numba row kernels (LayerNorm / RMSNorm, forward / backward), the
working tree's kernels against those of a git revision, interleaved in one process, on
preallocated outputs (no allocation, no page zeroing, no autograd: the kernel alone).

    python benchmarks/bench_row_kernels.py                 # against HEAD
    python benchmarks/bench_row_kernels.py --base HEAD~3 --e2e
    python benchmarks/bench_row_kernels.py --base-blocks rows32 --rows 64 --widths 4096 --kernels "ln bwd"
    python benchmarks/bench_row_kernels.py --no-kernels --e2e --base-blocks rows32 --shapes 8x4096 64x4096
    python benchmarks/bench_row_kernels.py --base-stream-min 4194304 --widths 1024 --dtypes fp32 --flush

The backward kernels are timed with the launcher's second kernel (the weight/bias partials
summed over the blocks) where there is more than one block; ``--base-blocks`` picks the
revision's rows per block (``tree``: the tree's ``row_norm._bwd_block``; ``rows32``: the
policy before 16-row blocks, ``ceil(M / 32)`` rows, and all rows in one block up to 32 rows
on one thread). ``--e2e`` adds LayerNorm forward+backward end to end (torch eager,
torch.compile, normkit's numba backend with the base's block policy and with the tree's; the
tree's kernels in both), the same interleaving, on ``--shapes`` (default ``--rows`` by each
of ``--widths``). ``--aten`` adds ATen's fused CPU ops (``native_layer_norm``,
``_fused_rms_norm``, ``native_layer_norm_backward``; RMSNorm's backward is autograd's through
torch's composite, which has no fused CPU kernel) against numba's launchers (``row_norm._launch_fwd`` /
``_launch_bwd``), forward and backward apart, both allocating their outputs each call and
neither recording autograd: what each library does per call below its autograd layer. Prints ns
per row (kernels) or us per call (end to end, ATen): median over ``--repeats`` calls, min-max in
brackets, and the load; by default in CPU time (``--clock wall`` for wall-clock time).

    python benchmarks/bench_row_kernels.py --no-kernels --aten --shapes 8x4096 4096x1024 --dtypes fp32
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as TF

import normkit.functional as NF
from normkit.ops.numba import _row_kernels as tree
from normkit.ops.numba import row_norm
from normkit.ops.numba._engine import split_run, split_threads

KERNELS = ("ln fwd", "ln bwd", "rms fwd", "rms bwd")
ROOT = Path(__file__).resolve().parent.parent
KERNEL_PATH = "src/normkit/ops/numba/_row_kernels.py"


def rows32_block(M: int, L: int) -> int:
    """Rows per backward block before 16-row blocks: ``ceil(M / 32)``, and all rows in one block
    up to 32 rows where the call ran on one thread."""
    if M <= 32 and split_threads(M, M * L) == 1:
        return M
    return max(1, -(-M // 32))


_TREE_BLOCK = row_norm._bwd_block
# Rows per backward block, (M, L) -> rows, by --base-blocks.
BLOCKS = {"tree": lambda M, L: _TREE_BLOCK(M), "rows32": rows32_block}


def load_revision(rev: str, stream_min: int | None = None):
    """The row kernels module as it was at git revision ``rev`` (imported from a temporary file),
    its outputs streamed from ``stream_min`` bytes where given (``_engine.STREAM_MIN_BYTES``, a
    constant compiled into the kernels, otherwise)."""
    source = subprocess.run(
        ["git", "show", f"{rev}:{KERNEL_PATH}"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    if stream_min is not None:  # the kernels compile on first call: they find this streams()
        source += (
            "\n\n@jit(inline='always')\ndef streams(out):\n"
            f"    return out.size * out.itemsize >= {stream_min}\n"
        )
    folder = Path(tempfile.gettempdir()) / f"normkit_rows_{os.getuid()}"
    folder.mkdir(exist_ok=True)
    path = folder / "_row_kernels_base.py"
    if not path.exists() or path.read_text() != source:
        path.write_text(source)
    spec = importlib.util.spec_from_file_location("_row_kernels_base", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # numba's cache finds a kernel's module by name
    spec.loader.exec_module(module)
    return module


# The clock of every timing: "cpu" (the process's CPU time: on a machine shared with other
# jobs, time spent waiting for a core is not counted; at two threads it is both threads' sum)
# or "wall". Set by --clock.
CLOCK = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCK["cpu"]


# With --flush, each timed call starts with none of its arrays in the caches (a copy of
# FLUSH_BYTES through other memory first, untimed): no call inherits the lines the one before
# it left (a kernel storing y through the cache leaves y's lines there for the next one).
FLUSH_BYTES = 1 << 27
flush: Callable[[], object] | None = None


def timed(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each call, ``repeats`` times, the calls alternating (after one warm-up each),
    in a new (seeded) random order each round: no call always follows the same one (a numba
    call right after torch.compile's ran 15% slower at 8x4096 than the same call elsewhere)."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    order, rng = list(calls.items()), random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for name, call in order:
            if flush is not None:
                flush()
            t0 = clock()
            call()
            times[name].append(clock() - t0)
    return times


def summary(seconds: list[float], scale: float) -> str:
    s = sorted(t * scale for t in seconds)
    return f"{statistics.median(s):8.1f} ({s[0]:.1f}-{s[-1]:.1f})"


def as_bits(a: np.ndarray, bf16: bool) -> np.ndarray:
    return torch.from_numpy(a).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16) if bf16 else a


def kernel_calls(
    module, M: int, L: int, bf16: bool, threads: int, arrays: dict, bwd_block: int
) -> dict[str, Callable[[], object]]:
    """The four kernels of ``module`` on ``arrays`` (shared by every module: same inputs, outputs),
    the backward's in blocks of ``bwd_block`` rows, followed by the partials' sum where there is
    more than one block (as the launcher runs them)."""
    a = arrays
    none = a["none"]
    blocks = -(-M // bwd_block)

    def run(kernel, n_items, *args):
        if threads == 1:
            call = lambda: kernel(*args, 0, n_items)  # noqa: E731
        else:
            call = lambda: split_run(kernel, n_items, M * L, *args)  # noqa: E731
        if kernel not in (module.row_bwd_ln, module.row_bwd_rms) or blocks == 1:
            return call
        dbp = a["dbp"][:blocks] if kernel is module.row_bwd_ln else a["dbp"][:blocks, :0]

        def with_sum():
            call()
            split_run(tree.sum_blocks, L, blocks * L, a["dwp"][:blocks], dbp, a["dw"], a["db"])

        return with_sum

    return {
        "ln fwd": run(module.row_fwd_ln, M, a["x"], none, none, a["w"], a["b"], 1e-5, a["y"], a["mean"], a["rstd"]),
        "ln bwd": run(
            module.row_bwd_ln,
            blocks,
            a["dy"],
            a["x"],
            a["w"],
            a["mean"],
            a["rstd"],
            none,
            a["dx"],
            a["dwp"],
            a["dbp"],
            bwd_block,
        ),
        "rms fwd": run(
            module.row_fwd_rms, M, a["x"], none, none, a["w"], a["b"][:0], 1e-6, a["y"], a["mean2"], a["rstd2"]
        ),
        "rms bwd": run(
            module.row_bwd_rms,
            blocks,
            a["dy"],
            a["x"],
            a["w"],
            a["mean2"],
            a["rstd2"],
            none,
            a["dx"],
            a["dwp"],
            a["dbp"][:, :0],
            bwd_block,
        ),
    }


def kernels(
    base,
    M: int,
    widths: list[int],
    repeats: int,
    dtypes: list[str],
    names: list[str],
    thread_counts: list[int],
    base_blocks: str,
) -> None:
    g = np.random.default_rng(0)
    print(f"kernel ns/row, M={M}, median (min-max) over {repeats}; base ({base_blocks} blocks) vs tree, interleaved")
    for L in widths:
        for bf16 in [d == "bf16" for d in dtypes]:
            x = (g.standard_normal((M, L), np.float32) * 2 + 3).astype(np.float32)
            dy = g.standard_normal((M, L), np.float32)
            arrays = {
                "x": as_bits(x, bf16),
                "dy": as_bits(dy, bf16),
                "w": g.standard_normal(L, np.float32),
                "b": g.standard_normal(L, np.float32),
                "y": as_bits(np.empty_like(x), bf16),
                "dx": as_bits(np.empty_like(x), bf16),
                "mean": np.empty(M, np.float32),
                "rstd": np.empty(M, np.float32),
                "mean2": np.empty(M, np.float32),
                "rstd2": np.empty(M, np.float32),
                "dwp": np.empty((M, L), np.float32),  # room for any blocks (first rows used)
                "dbp": np.empty((M, L), np.float32),
                "dw": np.empty(L, np.float32),
                "db": np.empty(L, np.float32),
                "none": np.empty((0, L), np.uint16 if bf16 else np.float32),
            }
            for threads in thread_counts:
                torch.set_num_threads(threads)
                old_block, new_block = BLOCKS[base_blocks](M, L), BLOCKS["tree"](M, L)
                for name in names:
                    calls = {
                        "base": kernel_calls(base, M, L, bf16, threads, arrays, old_block)[name],
                        "tree": kernel_calls(tree, M, L, bf16, threads, arrays, new_block)[name],
                    }
                    # The backward reads the forward's statistics: run that first.
                    stats = "ln fwd" if name.startswith("ln") else "rms fwd"
                    kernel_calls(tree, M, L, bf16, threads, arrays, new_block)[stats]()
                    t = timed(calls, repeats)
                    ratio = statistics.median(t["base"]) / statistics.median(t["tree"])
                    print(
                        f"{name:8s} L={L:5d} {'bf16' if bf16 else 'fp32'} t={threads}: "
                        f"base {summary(t['base'], 1e9 / M)}  tree {summary(t['tree'], 1e9 / M)}  "
                        f"tree {ratio:.2f}x",
                        flush=True,
                    )


def end_to_end(
    shapes: list[tuple[int, int]], repeats: int, dtypes: list[torch.dtype], thread_counts: list[int], base_blocks: str
) -> None:
    """LayerNorm forward+backward, us: eager, torch.compile, numba with the base's block policy
    and with the tree's (the tree's kernels in both: the jitted launchers call them directly)."""
    compiled = torch.compile(TF.layer_norm)
    print(f"LayerNorm fwd+bwd us, median (min-max) over {repeats}; x/eager time in each entry")
    for M, L in shapes:
        for dtype in dtypes:
            x = torch.randn(M, L, dtype=dtype).requires_grad_()
            w = torch.randn(L, dtype=dtype).requires_grad_()
            b = torch.randn(L, dtype=dtype).requires_grad_()
            dy = torch.randn(M, L, dtype=dtype)

            def step(fn, x=x, w=w, b=b, dy=dy, L=L):
                def call():
                    y = fn(x, (L,), w, b, 1e-5)
                    y.backward(dy)
                    x.grad = w.grad = b.grad = None

                return call

            def numba_with(policy, L=L):
                def fn(*args):
                    row_norm._bwd_block = lambda rows: BLOCKS[policy](rows, L)
                    return NF.layer_norm(*args, backend="numba")

                return fn

            for threads in thread_counts:
                torch.set_num_threads(threads)
                calls = {
                    "eager": step(TF.layer_norm),
                    "compile": step(compiled),
                    f"numba {base_blocks}": step(numba_with(base_blocks)),
                    "numba tree": step(numba_with("tree")),
                }
                try:
                    t = timed(calls, repeats)
                finally:
                    row_norm._bwd_block = _TREE_BLOCK
                eager = statistics.median(t["eager"])
                parts = "  ".join(f"{n} {summary(s, 1e6)} {eager / statistics.median(s):.2f}x" for n, s in t.items())
                print(f"{M}x{L} {str(dtype)[6:]} t={threads}: {parts}", flush=True)


def aten_pairs(M: int, L: int, dtype: torch.dtype) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """``{name: (ATen's op, numba's launcher)}`` on the same random rows, weight, bias and ``dy``;
    each backward from its own forward's statistics."""
    aten = torch.ops.aten
    g = torch.Generator().manual_seed(0)
    x, dy = (torch.randn(M, L, generator=g).to(dtype) for _ in range(2))
    w, b = (torch.randn(L, generator=g).to(dtype) for _ in range(2))
    mean, rstd = aten.native_layer_norm(x, [L], w, b, 1e-5)[1:]
    # torch has no fused RMSNorm backward on the CPU: its rms_norm's gradient is autograd's
    # through the composite forward (recorded once, replayed each call).
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    rms_y = torch.nn.functional.rms_norm(xg, (L,), wg, 1e-6)
    stat = row_norm._TYPES[dtype].stat
    # The statistics' addresses are taken in each call (as the autograd Function does): the
    # tensors must live as long as the calls.
    stats, rms_stats = torch.empty(2 * M, dtype=stat), torch.empty(2 * M, dtype=stat)
    step = M * stats.element_size()

    def ln_fwd():
        at = stats.data_ptr()
        return row_norm._launch_fwd(x, None, w, b, 1e-5, False, False, L, at, at + step)

    def ln_bwd():
        at = stats.data_ptr()
        return row_norm._launch_bwd(dy, x, w, at, at + step, None, False, True, True, L, (L,))

    def rms_fwd():
        at = rms_stats.data_ptr()
        return row_norm._launch_fwd(x, None, w, None, 1e-6, True, False, L, at, at + step)

    def rms_bwd():
        at = rms_stats.data_ptr()
        return row_norm._launch_bwd(dy, x, w, at, at + step, None, True, True, False, L, (L,))

    ln_fwd()  # (statistics for the backwards)
    rms_fwd()
    return {
        "ln fwd": (lambda: aten.native_layer_norm(x, [L], w, b, 1e-5), ln_fwd),
        "ln bwd": (lambda: aten.native_layer_norm_backward(dy, x, [L], mean, rstd, w, b, [True, True, True]), ln_bwd),
        "rms fwd": (lambda: aten._fused_rms_norm(x, [L], w, 1e-6), rms_fwd),
        "rms bwd": (lambda: torch.autograd.grad(rms_y, (xg, wg), dy, retain_graph=True), rms_bwd),
    }


def aten_vs_launchers(shapes: list[tuple[int, int]], repeats: int, dtypes: list[torch.dtype],
                      thread_counts: list[int]) -> None:
    """ATen's fused row-norm ops against numba's launchers, us per call (see the module docstring)."""
    print(f"ATen op vs numba launcher, us per call, median (min-max) over {repeats}; numba's speedup")
    for M, L in shapes:
        for dtype in dtypes:
            pairs = aten_pairs(M, L, dtype)
            for threads in thread_counts:
                torch.set_num_threads(threads)
                for name, (ref, ours) in pairs.items():
                    t = timed({"aten": ref, "numba": ours}, repeats)
                    ratio = statistics.median(t["aten"]) / statistics.median(t["numba"])
                    print(f"{name:8s} {M}x{L} {str(dtype)[6:]} t={threads}: aten {summary(t['aten'], 1e6)}  "
                          f"numba {summary(t['numba'], 1e6)}  numba {ratio:.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD", help="git revision of the kernels to compare with")
    parser.add_argument("--base-blocks", choices=sorted(BLOCKS), default="tree", help="the base's rows per block")
    parser.add_argument(
        "--base-stream-min", type=int, default=None, help="bytes from which the base's kernels stream their outputs"
    )
    parser.add_argument("--shapes", nargs="+", default=None, help="MxL shapes of --e2e, --aten (default rows x widths)")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--widths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--e2e", action="store_true", help="also LayerNorm fwd+bwd end to end")
    parser.add_argument("--aten", action="store_true", help="also ATen's fused ops vs numba's launchers")
    parser.add_argument("--no-kernels", action="store_true")
    parser.add_argument("--clock", choices=sorted(CLOCK), default="cpu")
    parser.add_argument("--flush", action="store_true", help="start each timed call with cold caches")
    args = parser.parse_args()
    parser_flush = args.flush
    global clock, flush
    clock = CLOCK[args.clock]
    if parser_flush:
        src, dst = torch.empty(FLUSH_BYTES // 4), torch.empty(FLUSH_BYTES // 4)
        flush = lambda: dst.copy_(src)  # noqa: E731
    print(f"load {os.getloadavg()}, clock {args.clock}, torch {torch.__version__}, {sys.platform}")
    base = load_revision(args.base, args.base_stream_min)
    if not args.no_kernels:
        kernels(base, args.rows, args.widths, args.repeats, args.dtypes, args.kernels, args.threads, args.base_blocks)
    if args.shapes:
        shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes]
    else:
        shapes = [(args.rows, L) for L in args.widths]
    torch_dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if args.aten:
        aten_vs_launchers(shapes, args.repeats, [torch_dtypes[d] for d in args.dtypes], args.threads)
    if args.e2e:
        end_to_end(shapes, args.repeats, [torch_dtypes[d] for d in args.dtypes], args.threads, args.base_blocks)
    print(f"load {os.getloadavg()}")


if __name__ == "__main__":
    main()
