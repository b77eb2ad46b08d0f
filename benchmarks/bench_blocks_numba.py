"""The numba kernels of today's block norms against the torch composition users write (eager and
torch.compile), at LLM / DiT / Mamba2 shapes, float32: forward (no autograd), backward alone,
forward+backward, at 1 and 2 threads, the three providers interleaved round by round.

    python benchmarks/bench_blocks_numba.py [--quick] [--rounds 7] [--ops gated_rms_norm ...]

Writes ``benchmarks/results/blocks_numba_cpu.md`` (and ``.json``): per case the median time and
the spread (min..max over the rounds) of each provider, and numba's speed-up over each. An op
"pays" where numba's slowest round beats the other provider's fastest, at every shape and both
thread counts (the rule behind the backend's MEASURED_FASTER).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

import normkit.functional as NF
from normkit.blocks import gated, modulated, norm_free, qk_sandwich

HERE = Path(__file__).resolve().parent
Inputs = dict[str, torch.Tensor]

COMPOSITION = {**modulated.COMPOSITION, **gated.COMPOSITION, **qk_sandwich.COMPOSITION, **norm_free.COMPOSITION}


def _r(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, requires_grad=True)


# op -> [(label, make inputs, positional args builder)]; args(t) gives the backend arguments.
def _modulated(op: str) -> list[tuple[str, Callable[[], Inputs], Callable[[Inputs], tuple]]]:
    def args(t: Inputs) -> tuple:
        extra = (t["b"],) if op == "modulated_layer_norm" else ()
        return (t["x"], t["shift"], t["scale"], t["w"], *extra, 1e-6)

    def dit() -> Inputs:  # DiT-XL/2 at 256px: 8 x 1024 tokens x 1152, per-sample adaLN
        return {"x": _r(8, 1024, 1152), "shift": _r(8, 1, 1152), "scale": _r(8, 1, 1152), "w": _r(1152),
                "b": _r(1152)}

    def tokens() -> Inputs:  # per-token modulation, 4096 rows of 1024
        return {"x": _r(4, 1024, 1024), "shift": _r(4, 1024, 1024), "scale": _r(4, 1024, 1024), "w": _r(1024),
                "b": _r(1024)}

    return [("DiT (8,1024,1152) per-sample", dit, args), ("(4,1024,1024) per-token", tokens, args)]


def _gated_cases():
    def mamba2() -> Inputs:
        return {"x": _r(8, 1024, 2048), "gate": _r(8, 1024, 2048), "w": _r(2048), "group": 1024}

    def rows(m: int, d: int) -> Callable[[], Inputs]:
        return lambda: {"x": _r(m, d), "gate": _r(m, d), "w": _r(d), "group": d}

    def args(t: Inputs) -> tuple:
        return (t["x"], t["gate"], t["w"], 1e-6, t["group"], False)

    return [("Mamba2 (8,1024,2048) group 1024", mamba2, args), ("4096x1024", rows(4096, 1024), args),
            ("8x4096", rows(8, 4096), args)]


def _sandwich_cases():
    def rows(m: int, d: int) -> Callable[[], Inputs]:
        return lambda: {"h": _r(m, d), "res": _r(m, d), "w1": _r(d), "w2": _r(d)}

    def args(t: Inputs) -> tuple:
        return (t["h"], t["res"], t["w1"], t["w2"], None, 1.0)

    return [("4096x1024", rows(4096, 1024), args), ("8x4096", rows(8, 4096), args)]


def _qk_cases():
    def qwen3() -> Inputs:  # Qwen3-style GQA: 16 query heads, 8 key heads of 128, 2048 tokens
        return {"q": _r(1, 2048, 16, 128), "k": _r(1, 2048, 8, 128), "wq": _r(128), "wk": _r(128)}

    def args(t: Inputs) -> tuple:
        return (t["q"], t["k"], t["wq"], t["wk"], None)

    return [("q (1,2048,16,128) k (1,2048,8,128)", qwen3, args)]


def _free_cases(op: str):
    """DyT (ViT/LLM drop-in for LayerNorm) and Derf: 4096 rows of 1024 and a DiT-sized (8,1024,1152)."""
    def make(*shape: int) -> Callable[[], Inputs]:
        return lambda: {"x": _r(*shape), "alpha": _r(1), "shift": _r(1), "w": _r(shape[-1]), "b": _r(shape[-1])}

    def args(t: Inputs) -> tuple:
        scalars = (t["alpha"], t["shift"]) if op == "derf" else (t["alpha"],)
        return (t["x"], *scalars, t["w"], t["b"])

    return [("4096x1024", make(4096, 1024), args), ("(8,1024,1152)", make(8, 1024, 1152), args)]


CASES = {
    "modulated_layer_norm": _modulated("modulated_layer_norm"),
    "modulated_rms_norm": _modulated("modulated_rms_norm"),
    "gated_rms_norm": _gated_cases(),
    "sandwich_rms_norm": _sandwich_cases(),
    "qk_rms_norm": _qk_cases(),
    "dyt": _free_cases("dyt"),
    "derf": _free_cases("derf"),
}
PROVIDERS = ("torch", "torch.compile", "numba")
SMALL_ROUNDS = 41
DIRECTIONS = ("fwd", "bwd", "fwd+bwd")


def _fn(op: str, provider: str) -> Callable[..., object]:
    if provider == "numba":
        public = getattr(NF, op)

        def call(*args):
            if op == "gated_rms_norm":
                x, gate, w, eps, group, nbg = args
                return public(x, gate, w, eps, group_size=group, norm_before_gate=nbg, backend="numba")
            if op == "sandwich_rms_norm":
                *head, off = args
                return public(*head, weight_offset=off, backend="numba")
            return public(*args, backend="numba")

        return call
    if provider == "torch":
        return COMPOSITION[op]
    return torch.compile(COMPOSITION[op], dynamic=False)


def _outs(y) -> tuple[torch.Tensor, ...]:
    return y if isinstance(y, tuple) else (y,)


def _timer(fn, args: tuple, leaves: list[torch.Tensor], direction: str) -> Callable[[], float]:
    """A callable that runs one sample of ``direction`` and returns its seconds."""
    if direction == "fwd":
        def run() -> float:
            with torch.no_grad():
                t0 = time.perf_counter()
                fn(*args)
                return time.perf_counter() - t0
        return run
    grads: list[torch.Tensor] = []

    def run_fb() -> float:
        for p in leaves:
            p.grad = None
        t0 = time.perf_counter()
        outs = _outs(fn(*args))
        if not grads:
            grads.extend(torch.randn_like(o) for o in outs)
        t1 = time.perf_counter()
        torch.autograd.backward(outs, grads)
        t2 = time.perf_counter()
        return t2 - t1 if direction == "bwd" else t2 - t0

    return run_fb


def measure(ops: list[str], rounds: int, quick: bool) -> list[dict]:
    rows = []
    for op in ops:
        for label, make, args_of in CASES[op][: 1 if quick else None]:
            torch.manual_seed(0)
            t = make()
            args = args_of(t)
            leaves = [v for v in t.values() if isinstance(v, torch.Tensor)]
            fns = {p: _fn(op, p) for p in PROVIDERS}
            for threads in (1, 2):
                torch.set_num_threads(threads)
                for direction in DIRECTIONS:
                    timers = {p: _timer(fns[p], args, leaves, direction) for p in PROVIDERS}
                    warm = max(max(run(), run()) for run in timers.values())  # warm-up: compile, caches
                    # Small cells (under 10 ms a call) get SMALL_ROUNDS: a load spike of another
                    # process then moves the median less.
                    n_rounds = rounds if warm > 0.01 else max(rounds, SMALL_ROUNDS)
                    samples: dict[str, list[float]] = {p: [] for p in PROVIDERS}
                    for r in range(n_rounds):
                        order = PROVIDERS if r % 2 == 0 else PROVIDERS[::-1]
                        for p in order:
                            samples[p].append(timers[p]())
                    row = {"op": op, "shape": label, "threads": threads, "direction": direction, "rounds": n_rounds}
                    for p in PROVIDERS:
                        s = samples[p]
                        row[p] = {"median_ms": 1e3 * statistics.median(s), "min_ms": 1e3 * min(s),
                                  "max_ms": 1e3 * max(s)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            torch._dynamo.reset()
    return rows


def _cell(c: dict) -> str:
    return f"{c['median_ms']:.2f} ({c['min_ms']:.2f}..{c['max_ms']:.2f})"


def _speedup(row: dict, other: str) -> str:
    n, o = row["numba"], row[other]
    mark = " *" if n["max_ms"] < o["min_ms"] else (" -" if n["min_ms"] > o["max_ms"] else "")
    return f"{o['median_ms'] / n['median_ms']:.2f}x{mark}"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        cpu = model
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, commit {commit}; load average at the end "
            f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")


def write(rows: list[dict], path: Path, rounds: int) -> None:
    lines = [
        "# normkit numba kernels of today's block norms vs the torch composition (CPU, float32)",
        "",
        f"Machine: {machine()}. **Shared and loaded**: a 2-core box running several other sessions'",
        "tests and benchmarks at the same time; absolute times are noisy, and only differences",
        "whose ranges do not overlap are claimed.",
        "",
        f"`python benchmarks/bench_blocks_numba.py` ({rounds} rounds per cell, {SMALL_ROUNDS} for cells under 10 ms;",
        "providers interleaved, order alternating per round, 2 warm-up calls each). Times in ms: median (min..max).",
        "`fwd`: forward under no_grad; `bwd`: backward alone (random upstream gradients);",
        "`fwd+bwd`: both. torch = the composition users write (normkit.blocks COMPOSITION, fp32);",
        "torch.compile = the same compiled (inductor, dynamic=False). Speed-up = other / numba",
        "(median); `*`: numba's slowest round faster than the other's fastest, `-`: the reverse.",
        "",
        "| op | shape | threads | dir | torch | torch.compile | numba | vs torch | vs compile |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['op']} | {r['shape']} | {r['threads']} | {r['direction']} | {_cell(r['torch'])} | "
                     f"{_cell(r['torch.compile'])} | {_cell(r['numba'])} | {_speedup(r, 'torch')} | "
                     f"{_speedup(r, 'torch.compile')} |")
    lines += ["", "## Where numba pays", "",
              "Per op and direction: `yes` where numba's slowest round beats the other's fastest in every",
              "large cell (the 8x4096 cells are under the backend's small-call threshold and are not",
              "claimed either way) at both thread counts; `no` otherwise, with the median speed-ups.", "",
              "| op | dir | vs torch | vs torch.compile |", "|---|---|---|---|"]
    for op in dict.fromkeys(r["op"] for r in rows):
        for direction in DIRECTIONS:
            cells = [r for r in rows if r["op"] == op and r["direction"] == direction
                     and not r["shape"].startswith("8x")]
            if not cells:
                continue
            verdict = []
            for other in ("torch", "torch.compile"):
                wins = all(r["numba"]["max_ms"] < r[other]["min_ms"] for r in cells)
                ratios = [r[other]["median_ms"] / r["numba"]["median_ms"] for r in cells]
                verdict.append(f"{'yes' if wins else 'no'} ({min(ratios):.2f}-{max(ratios):.2f}x)")
            lines.append(f"| {op} | {direction} | {verdict[0]} | {verdict[1]} |")
    path.write_text("\n".join(lines) + "\n")
    path.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", nargs="*", default=list(CASES))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "blocks_numba_cpu.md")
    ap.add_argument("--keep", type=Path, default=None,
                    help="a .json of an earlier run: its rows of the ops not measured now are kept")
    a = ap.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    rows = measure(a.ops, a.rounds, a.quick)
    if a.keep is not None:
        kept = [r for r in json.loads(a.keep.read_text()) if r["op"] not in a.ops]
        rows = sorted(kept + rows, key=lambda r: list(CASES).index(r["op"]))
    write(rows, a.out, a.rounds)


if __name__ == "__main__":
    main()
