"""The norms of today's blocks (adaLN, gated, QK, sandwich, DyT/Derf) against the code users write
for them today, eager and torch.compile: a thin script over normkit's benchmark engine
(:mod:`normkit.tools.bench`: the problems, the bytes-moved model, the interleaved timing).

    python benchmarks/bench_blocks.py                    # CUDA: every provider (triton too); CPU: one thread
    python benchmarks/bench_blocks.py --ops gated_rms_norm dyt --dtypes bf16
    python benchmarks/bench_blocks.py --providers torch torch.compile normkit-triton

``torch`` is the composition users write (diffusers' ``norm(x) * (1 + scale) + shift``, HF's
``MambaRMSNormGated`` and ``Qwen3RMSNorm``, the papers' DyT/Derf; ``normkit.tools.bench.TORCH``),
``torch.compile`` the same compiled, ``normkit-<backend>`` normkit's op on that backend. Writes
``<out>/blocks_<device>.md`` (the machine, a table per op) and ``.json`` (every row).
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
    parser.add_argument("--ops", nargs="+", default=list(bench.BLOCK_OPS), choices=bench.BLOCK_OPS)
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    parser.add_argument("--providers", nargs="+", help=f"default: all that run here, of {bench.provider_names()}")
    parser.add_argument("--directions", nargs="+", default=list(bench.DIRECTIONS), choices=bench.DIRECTIONS)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved samples per measurement")
    parser.add_argument("--budget", type=float, metavar="S",
                        help="seconds of timing per provider and direction, over its repeats (default 0.2 on "
                             "the CPU, 0.05 on CUDA)")
    parser.add_argument("--compile-budget", type=float, default=600.0, metavar="S",
                        help="seconds torch.compile may spend compiling, over all ops (default 600: one "
                             "function per op and shape; past it torch.compile's rows say so)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    problems = bench.problems(args.ops, {"blocks": bench.BLOCK_SHAPES[device]}, [DTYPES[d] for d in args.dtypes])
    # CPU: one thread; on a shared machine, OpenMP workers waiting on busy cores turn microseconds
    # into scheduler quanta, which says nothing about the op.
    threads = [1] if device == "cpu" else [None]
    with bench.threads(threads[0]):
        copy_gbps = bench.copy_bandwidth(device, bench.largest_input_bytes(problems))
    print(f"copy bandwidth: {copy_gbps:.0f} GB/s")
    rows = bench.run(problems, args.providers or bench.providers(device), device=device, directions=args.directions,
                     thread_counts=threads, repeats=args.repeats, copy_gbps=copy_gbps, log=print,
                     budget_s=args.budget or (0.05 if device == "cuda" else 0.2),
                     compile_budget_s=args.compile_budget)
    bench.add_speedups(rows)
    meta = {**bench_report.machine(device), "copy_GBps": copy_gbps, "repeats": args.repeats,
            "command": "python benchmarks/bench_blocks.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    md, js = bench_report.write_report(rows, meta, args.out, title="normkit: the norms of today's blocks",
                                       stem=f"blocks_{device}")
    print(f"wrote {md} and {js}")


if __name__ == "__main__":
    main()
