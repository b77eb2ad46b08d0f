"""What a benchmark run is reported with: the machine it ran on (:func:`machine`), a markdown
table of :func:`normkit.tools.bench.run`'s rows (:func:`markdown_table`), and a report on disk
(:func:`write_report`: ``<device>-<date>.md`` and ``.json``)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .bench import DIRECTIONS

__all__ = ["machine", "markdown_table", "write_report"]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine(device: str = "cpu") -> dict[str, Any]:
    """The machine a run is measured on: device and CPU name, core count, the versions of
    torch, Triton and Python, the git commit (when run from a checkout) and the date."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    cuda = device.startswith("cuda")
    return {
        "device": torch.cuda.get_device_name() if cuda else _cpu_name(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "triton": triton_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": _commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _cell(r: dict[str, Any], d: str) -> str:
    if f"{d}_ms" not in r:
        return "-"
    spread = f" ({r[f'{d}_ms_min']:.3f}-{r[f'{d}_ms_max']:.3f})"
    return f"{r[f'{d}_ms']:.3f}{spread} | {r[f'{d}_GBps']:.1f} ({r[f'{d}_of_copy']:.0%})"


def _speedup(r: dict[str, Any], d: str) -> str:
    if f"{d}_speedup_vs_torch" not in r or r["provider"] == "torch":
        return "-"
    verdict = r[f"{d}_verdict_vs_torch"]
    return f"{r[f'{d}_speedup_vs_torch']:.2f}x" + ("" if verdict != "within spread" else " (within spread)")


def markdown_table(rows: Sequence[dict[str, Any]], directions: Sequence[str] | None = None) -> str:
    """One markdown table of ``rows``: per direction the median ms with its min-max over the
    repeats, GB/s with the fraction of the copy bandwidth, and the speedup against torch eager
    (marked "within spread" where the trimmed ranges overlap: no speedup can be claimed; see
    :func:`normkit.tools.bench.trimmed_range`)."""
    directions = directions or [d for d in DIRECTIONS if any(f"{d}_ms" in r for r in rows)]
    head = ["op", "shape", "dtype", "threads", "provider"]
    for d in directions:
        head += [f"{d} ms (min-max)", f"{d} GB/s (of copy)", f"{d} vs torch"]
    head.append("max err vs torch")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 5 + "---:|---:|---:|" * len(directions) + "---:|"]
    for r in rows:
        shape = r["shape"] + (f" G={r['groups']}" if r.get("groups") else "")
        cells = [r["op"], shape, r["dtype"], str(r.get("threads") or "-"), r["provider"]]
        if "error" in r:
            cells += [r["error"].replace("|", "/")] + [""] * (3 * len(directions))
        else:
            for d in directions:
                cells += [*_cell(r, d).split(" | ", 1), _speedup(r, d)] if f"{d}_ms" in r else ["-", "-", "-"]
            cells.append(f"{r['max_err_vs_torch']:.2g}" if "max_err_vs_torch" in r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(rows: Sequence[dict[str, Any]], meta: dict[str, Any], out_dir: Path | str,
                 *, title: str = "normkit norm benchmarks", stem: str | None = None) -> tuple[Path, Path]:
    """``<stem>.md`` (the machine, then a table per op) and ``<stem>.json`` (``meta`` and every
    row) in ``out_dir``; ``stem`` defaults to ``<device>-<date>``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if stem is None:
        slug = "".join(c if c.isalnum() else "-" for c in str(meta.get("device", "device"))).strip("-")
        stem = f"{slug or 'device'}-{str(meta.get('date', ''))[:10]}"
    md, js = out / f"{stem}.md", out / f"{stem}.json"
    js.write_text(json.dumps({"meta": meta, "rows": list(rows)}, indent=1))
    about = ", ".join(f"{k} {meta[k]}" for k in ("device", "cpu_count", "torch", "triton", "python", "commit", "date")
                      if meta.get(k) is not None)
    lines = [f"# {title}", "", about + ".", ""]
    if "copy_GBps" in meta:
        lines += [f"Copy bandwidth (y.copy_(x), read + write) {meta['copy_GBps']:.1f} GB/s; each GB/s figure is "
                  "followed by its fraction of it. Times: median over the repeats (min-max in brackets), "
                  "providers interleaved; a speedup is marked \"(within spread)\" where the trimmed ranges "
                  "(from five samples on, the samples less the fastest and the slowest of each seven) overlap. "
                  "Bytes moved: "
                  "normkit.tools.bench.", ""]
    for op in dict.fromkeys(r["op"] for r in rows):
        lines += [f"## {op}", "", markdown_table([r for r in rows if r["op"] == op])]
    md.write_text("\n".join(lines))
    return md, js
