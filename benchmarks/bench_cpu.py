"""The CPU benchmark of issue 12: torch eager, torch.compile, normkit's numba kernels and
"auto", interleaved in one run, forward / backward / both, at 1 and 2 threads, at LLM row
shapes and ResNet / U-Net / style-transfer image shapes. A thin script over normkit's
benchmark engine (:mod:`normkit.tools.bench`: providers, interleaving, bytes-moved model).

    make bench-cpu                      # or: python benchmarks/bench_cpu.py [--quick]

Writes ``benchmarks/results/cpu.md`` (machine, first-call cost, the table per op, which
shape classes numba wins for "auto"), ``cpu.json`` (every row) and ``cpu.png`` (GB/s per
provider). InstanceNorm is measured as what it computes: GroupNorm with one channel per
group (the engine's ``group_norm`` problem with ``G = C``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch._functorch import config as functorch_config

from normkit.tools import bench, bench_report, plots

HERE = Path(__file__).resolve().parent
PROVIDERS = ["torch", "torch.compile", "normkit-numba", "normkit-auto"]
THREADS = [1, 2]
# The shapes: LLM rows; ResNet BatchNorm and GroupNorm (32, 64, 56, 56), NCHW and
# channels_last (the engine runs every batch shape in both); a U-Net GroupNorm; InstanceNorm
# at a style-transfer size (GroupNorm with G = C).
SHAPES = {
    "rows": [(8, 4096), (4096, 1024), (4096, 4096)],
    "images": [(32, 64, 56, 56, 32), (8, 320, 64, 64, 32), (1, 64, 256, 256, 64)],
    "batches": [(32, 64, 56, 56)],
}
QUICK = {"rows": [(8, 4096), (1024, 1024)], "images": [(4, 64, 32, 32, 32)], "batches": [(8, 64, 28, 28)]}
OPS = ["rms_norm", "layer_norm", "add_rms_norm", "group_norm", "batch_norm"]
# Problems whose input fits in this many bytes (the LLM decode rows, 8x4096) take SMALL_SAMPLES
# times the samples, each as long as a large problem's: their calls last tens of microseconds,
# where one scheduler tick moves a sample, and two quiet runs disagreed on their verdicts with
# seven samples. Their extra samples cost about a minute.
SMALL_BYTES = 1 << 20
SMALL_SAMPLES = 3

FIRST_CALL = """
import time, torch, normkit.functional as F
t0 = time.perf_counter()
for dtype in (torch.float32, torch.bfloat16):
    x = torch.randn(64, 256, dtype=dtype, requires_grad=True)
    w = torch.randn(256, dtype=dtype, requires_grad=True)
    F.rms_norm(x, (256,), w, backend="numba").sum().backward()
    F.layer_norm(x, (256,), w, w, backend="numba").sum().backward()
print(time.perf_counter() - t0)
"""


def first_call_s(cache_dir: str) -> float:
    """Seconds for the first LayerNorm and RMSNorm forward+backward, float32 and bfloat16, in a
    fresh process whose numba cache is ``cache_dir`` (empty: compiled; filled: loaded)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir}
    out = subprocess.run([sys.executable, "-c", FIRST_CALL], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def auto_classes(rows: Sequence[dict]) -> dict[str, list[str]]:
    """Per op, the (dtype/size/layout) problems where numba beat torch eager (the samples'
    trimmed ranges apart: :func:`normkit.tools.bench.trimmed_range`) at every thread count, for
    the inference forward (no autograd), the training forward and forward+backward."""
    wins: dict[tuple[str, str, str], list[bool]] = {}
    for r in rows:
        if r["provider"] != "normkit-numba" or "error" in r:
            continue
        for d in ("infer", "fwd", "fwd+bwd"):
            verdict = r.get(f"{d}_verdict_vs_torch")
            wins.setdefault((r["op"], r["shape"], d), []).append(verdict == "faster")
    out: dict[str, list[str]] = {}
    for (op, shape, d), won in wins.items():
        if all(won):
            out.setdefault(op, []).append(f"{shape} {d}")
    return out


def faults_table(rows: Sequence[dict], direction: str = "fwd+bwd") -> list[str]:
    """Markdown lines: the minor page faults per call (median over the samples) of each provider,
    one line per problem and thread count, for problems where some provider faults at all."""
    cells: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if f"{direction}_faults" in r:
            key = (r["op"], r["shape"], r["threads"])
            cells.setdefault(key, {})[r["provider"]] = r[f"{direction}_faults"]
    lines = ["| op | shape | threads | " + " | ".join(PROVIDERS) + " |", "|---" * (3 + len(PROVIDERS)) + "|"]
    for (op, shape, threads), by in cells.items():
        if max(by.values()) >= 1:
            lines.append(f"| {op} | {shape} | {threads} | "
                         + " | ".join(f"{by[p]:,.0f}" if p in by else "-" for p in PROVIDERS) + " |")
    return lines if len(lines) > 2 else []


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    shapes = QUICK if args.quick else SHAPES
    start = time.perf_counter()
    # The backward is timed alone with retain_graph=True, which a compiled backward that donates
    # its saved buffers refuses; the engine turns donation off only around the first compile.
    functorch_config.donated_buffer = False

    with tempfile.TemporaryDirectory() as cache:
        cold = first_call_s(cache)
        warm = first_call_s(cache)

    problems = bench.problems(OPS, shapes, [torch.float32])
    with bench.threads(1):
        copy_1 = bench.copy_bandwidth("cpu", bench.largest_input_bytes(problems))
    small = [p for p in problems if bench.largest_input_bytes([p]) <= SMALL_BYTES]
    large = [p for p in problems if p not in small]
    rows = []
    for group, k in ((small, SMALL_SAMPLES), (large, 1)):
        rows += bench.run(group, PROVIDERS, device="cpu", directions=bench.DIRECTIONS, thread_counts=THREADS,
                          repeats=args.repeats * k, budget_s=0.2 * k, copy_gbps=copy_1, compile_budget_s=400,
                          log=print)
    bench.add_speedups(rows)

    meta = {**bench_report.machine("cpu"), "copy_GBps": copy_1, "repeats": args.repeats,
            "repeats_small": args.repeats * SMALL_SAMPLES, "small_bytes": SMALL_BYTES,
            "numba_first_call_cold_s": cold, "numba_first_call_warm_s": warm,
            "wall_s": time.perf_counter() - start}
    md, js = bench_report.write_report(rows, meta, args.out, title="normkit on the CPU: torch, torch.compile, "
                                       "numba and auto", stem="cpu")
    wins = auto_classes(rows)
    extra = [
        "", "## First call (numba JIT)", "",
        f"LayerNorm and RMSNorm, forward+backward, float32 and bfloat16, in a fresh process: {cold:.1f} s "
        f"with an empty kernel cache (compiling), {warm:.1f} s with the on-disk cache filled "
        "(numba import, loading, custom-op registration).", "",
        "## Where numba beat torch eager at every thread count (samples' trimmed ranges apart)", "",
        *(f"- {op}: {', '.join(v)}" for op, v in sorted(wins.items())), "",
        "## Page faults per call (fwd+bwd, median over the samples)", "",
        "Minor page faults of the process per call: one per 4 KiB page written for the first time "
        "(a fresh allocation, or memory the allocator returned to the system and took back), one "
        "per 2 MiB huge page. Where a provider faults thousands of times a call, those faults are "
        "most of its time and of its spread.", "",
        *faults_table(rows), "",
        "Noise: a shared 2-core machine; each cell's min-max range is over interleaved samples "
        f"({args.repeats}; {args.repeats * SMALL_SAMPLES} of the same length for inputs up to "
        f"{SMALL_BYTES >> 20} MiB). A speedup is claimed only where the trimmed ranges (less the "
        f"fastest and slowest sample of each {bench.TRIM_PER}) do not overlap: a load spike on "
        "either side cannot make or break a claim.", "",
    ]
    md.write_text(md.read_text() + "\n".join(extra))
    points = [{"op": r["op"], "dtype": f"{r['dtype']}, {r['threads']} thr", "direction": d,
               "provider": r["provider"], "width": bench.width(r), "gbps": r[f"{d}_GBps"]}
              for r in rows if "error" not in r for d in ("fwd", "fwd+bwd") if f"{d}_GBps" in r
              and r["threads"] == 2]
    plots.bench_figure(points, args.out / "cpu.png", copy_1)
    json.loads(js.read_text())  # written whole
    print(f"wrote {md}, {js} and {args.out / 'cpu.png'} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
