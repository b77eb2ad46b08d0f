"""Every provider of every norm on the same problems, in one run: a thin script over normkit's
benchmark engine (:mod:`normkit.tools.bench`; bytes-moved model, timing and providers there).

    python benchmarks/bench_norms.py                 # CUDA: the full table; CPU: --quick
    python benchmarks/bench_norms.py --quick --ops layer_norm rms_norm --dtypes bf16
    python benchmarks/bench_norms.py --ops batch_norm batch_norm_act --dtypes bf16 fp32

Writes ``<out>/<device>-<date>.md`` (the machine, a table per op) and ``.json`` (every row).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from normkit.tools import bench, bench_report

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HERE = Path(__file__).resolve().parent


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (always on the CPU)")
    parser.add_argument("--ops", nargs="+", default=list(bench.OPS), choices=bench.OPS)
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    parser.add_argument("--providers", nargs="+", help=f"default: all that run here, of {bench.provider_names()}")
    parser.add_argument("--directions", nargs="+", default=list(bench.DIRECTIONS), choices=bench.DIRECTIONS)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved samples per measurement")
    parser.add_argument("--budget", type=float, metavar="S",
                        help="seconds of timing per provider and direction, over its repeats (default 0.2 on "
                             "the CPU, 0.05 on CUDA: the full table then fits make gpu-check's time limit)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.quick:
        print("no CUDA device: running the --quick shapes on one thread")
    shapes = bench.QUICK_SHAPES if args.quick or device == "cpu" else bench.SHAPES["cuda"]
    problems = bench.problems(args.ops, shapes, [DTYPES[d] for d in args.dtypes])
    # CPU: one thread; on a shared machine, OpenMP workers waiting on busy cores turn microseconds
    # into scheduler quanta, which says nothing about the op.
    threads = [1] if device == "cpu" else [None]
    with bench.threads(threads[0]):
        copy_gbps = bench.copy_bandwidth(device, 1 << (30 if device == "cuda" else 26))
    print(f"copy bandwidth: {copy_gbps:.0f} GB/s")
    rows = bench.run(problems, args.providers or bench.providers(device), device=device, directions=args.directions,
                     thread_counts=threads, repeats=args.repeats, copy_gbps=copy_gbps, log=print,
                     budget_s=args.budget or (0.05 if device == "cuda" else 0.2))
    bench.add_speedups(rows)
    meta = {**bench_report.machine(device), "copy_GBps": copy_gbps, "repeats": args.repeats,
            "command": "python benchmarks/bench_norms.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    md, js = bench_report.write_report(rows, meta, args.out)
    print(f"wrote {md} and {js}")


if __name__ == "__main__":
    main()
