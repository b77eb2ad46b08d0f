"""make kernel-report: every Triton kernel variant the launchers choose at the reference shapes,
compiled for sm_90 without a GPU (normkit.ops.triton.static_report), written as
benchmarks/results/sm90_static.json (one record per kernel variant and shape) and
sm90_static.md (the same as a table, with the claims tests/test_kernel_report.py checks).

Each distinct variant is compiled once (Triton's own on-disk cache makes a rerun fast), in
--jobs processes."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiling needs Triton's JIT, not its interpreter

from normkit.ops.triton import static_report as S  # noqa: E402


def _markdown(records: list[dict], seconds: float) -> str:
    claims = [S.claims(r) for r in records]
    lines = [
        "# Triton kernels compiled for sm_90 (H100, 132 SMs), without a GPU",
        "",
        "Written by `make kernel-report` (`benchmarks/kernel_report.py`, engine "
        "`normkit.ops.triton.static_report`); checked by `tests/test_kernel_report.py`. "
        "Registers and spills from ptxas `-v` with Triton's flags; `load B` is the narrowest "
        "global load of a streamed tensor (x, dy, residual, gate, q/k, hidden) in bytes per lane "
        "(16: a 128-bit vector); `programs` is the grid; `launches` counts ATen kernels plus "
        "Triton launches of one training forward+backward. `planned_occupancy`: a grid sized as "
        "one wave of resident programs (`normkit.ops.triton.occupancy`) compiled within the "
        "128-register budget it was planned for. Timings need a GPU: `make gpu-check`.",
        "",
        "| shape class | norm | layout | dtype | shape | kernel | tile | warps | regs | spill B "
        "| load B | programs | launches | claims broken |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r, c in zip(records, claims, strict=True):
        tile = "x".join(str(v) for v in r["tile"].values())
        broken = ", ".join(k for k, ok in c.items() if not ok) or "-"
        lines.append(
            f"| {r['shape_class']} | {r['norm']} | {r['layout']} | {r['dtype']} | "
            f"{'x'.join(map(str, r['shape']))} | {r['kernel']} | {tile} | {r['num_warps']} | "
            f"{r['registers']} | {r['spill_bytes']} | {r['min_load_bytes']} | {r['programs']} | "
            f"{r['launches_per_step']} | {broken} |")
    totals = {k: sum(not c[k] for c in claims) for k in claims[0]}
    lines += ["", f"{len(records)} records; claims broken: "
              + ", ".join(f"{k} {n}" for k, n in totals.items()) + f". Compiled in {seconds:.0f} s.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results", type=Path)
    parser.add_argument("--jobs", default=min(2, os.cpu_count() or 1), type=int)
    args = parser.parse_args(argv)
    start = time.time()
    with ProcessPoolExecutor(args.jobs) as pool:
        records = S.records(compile_many=lambda vs: list(pool.map(S.compile_variant, vs)),
                            progress=lambda msg: print(msg, file=sys.stderr))
    seconds = time.time() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sm90_static.json").write_text(json.dumps(records, indent=1) + "\n")
    (args.out / "sm90_static.md").write_text(_markdown(records, seconds))
    print(f"{len(records)} records in {seconds:.0f} s -> {args.out}/sm90_static.{{json,md}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
