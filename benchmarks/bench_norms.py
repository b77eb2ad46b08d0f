"""Benchmark engine for normkit's norms: every provider on the same problems, in one run.

    python benchmarks/bench_norms.py                 # CUDA: the full table; CPU: --quick
    python benchmarks/bench_norms.py --quick --ops layer_norm rms_norm --dtypes bf16
    python benchmarks/bench_norms.py --ops batch_norm batch_norm_act --dtypes bf16 fp32

or from Python: ``rows = run(ops, shapes, dtypes, providers)``. See benchmarks/README.md for the
bytes-moved model, the timing method and how to read the results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
try:
    import normkit  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent / "src"))

# One problem description and bytes-moved model for both engines (normkit.bench is the CPU one).
from normkit.bench import Problem  # noqa: E402

__all__ = ["FULL_SHAPES", "QUICK_SHAPES", "Problem", "copy_bandwidth", "main", "providers", "run",
           "write_report"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EPS = 1e-6
ROW_OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
BATCH_OPS = ("batch_norm", "batch_norm_act")  # training mode; batch_norm_act: + relu

# (M, N) rows for the trailing-axis norms; (N, C, H, W, groups) for group_norm; (N, C,
# *spatial) for the BatchNorms, each timed contiguous and channels_last(_3d).
FULL_SHAPES = {
    "rows": [(140, 4096), (4096, 1024), (8192, 4096), (32768, 4096), (4096, 16384),
             (1024, 65536), (256, 262144)],
    "images": [(8, 320, 64, 64, 32), (16, 512, 32, 32, 32)],
    "batches": [(32, 64, 112, 112), (32, 256, 56, 56), (32, 2048, 7, 7), (2, 32, 64, 64, 64)],
}
QUICK_SHAPES = {"rows": [(64, 256), (512, 1024)], "images": [(2, 32, 16, 16, 8)],
                "batches": [(4, 16, 8, 8), (2, 4, 4, 4, 4)]}


# ---- providers: name -> (problem -> callable(tensors) -> outputs, or None if not applicable)


def _call(p: Problem, norms: SimpleNamespace | ModuleType) -> Callable | None:
    """``p``'s call through ``norms``, any namespace with torch.nn.functional's signatures
    (``add_*``: ``(x, residual, shape, ...) -> (y, residual_out)``; ``batch_norm_act``: the
    activation last); None where ``norms`` lacks the op."""
    if not hasattr(norms, p.op):
        return None
    n = [p.shape[-1]]
    return {
        "layer_norm": lambda t: norms.layer_norm(t["x"], n, t["weight"], t["bias"], EPS),
        "rms_norm": lambda t: norms.rms_norm(t["x"], n, t["weight"], EPS),
        "add_layer_norm": lambda t: tuple(norms.add_layer_norm(t["x"], t["residual"], n, t["weight"],
                                                               t["bias"], EPS)),
        "add_rms_norm": lambda t: tuple(norms.add_rms_norm(t["x"], t["residual"], n, t["weight"],
                                                           EPS)),
        "group_norm": lambda t: norms.group_norm(t["x"], p.groups, t["weight"], t["bias"], EPS),
        # Training mode without running statistics: repeated calls have no side effect.
        "batch_norm": lambda t: norms.batch_norm(t["x"], None, None, t["weight"], t["bias"], True,
                                                 0.1, EPS),
        "batch_norm_act": lambda t: norms.batch_norm_act(t["x"], None, None, t["weight"],
                                                         t["bias"], True, 0.1, EPS, "relu"),
    }[p.op]


def _add_then(norm: Callable) -> Callable:
    """torch's spelling of a residual-add norm: ``(norm(x + residual), x + residual)``."""

    def add_norm(x, residual, *args):
        residual_out = x + residual
        return norm(residual_out, *args), residual_out

    return add_norm


# torch eager: F itself, the add-norms and the norm + activation composed.
TORCH = SimpleNamespace(
    layer_norm=F.layer_norm, rms_norm=F.rms_norm, group_norm=F.group_norm, batch_norm=F.batch_norm,
    add_layer_norm=_add_then(F.layer_norm), add_rms_norm=_add_then(F.rms_norm),
    batch_norm_act=lambda *args: F.relu(F.batch_norm(*args[:-1])),
)


def _torch_op(p: Problem) -> Callable | None:
    return _call(p, TORCH)


def _compiled_torch_op(p: Problem) -> Callable | None:
    fn = _torch_op(p)
    if fn is None:
        return None
    torch._dynamo.reset()  # one specialization per problem, never the recompile limit's fallback
    return torch.compile(fn, dynamic=False)


def _normkit_triton(p: Problem) -> Callable | None:
    if not torch.cuda.is_available():
        return None  # the CPU interpreter is a test tool, not a provider
    from normkit.ops.triton import batch_norm as B
    from normkit.ops.triton import row_norm as T

    return _call(p, SimpleNamespace(
        layer_norm=T.layer_norm, rms_norm=T.rms_norm, add_layer_norm=T.add_layer_norm,
        add_rms_norm=T.add_rms_norm, group_norm=T.group_norm, batch_norm=B.batch_norm,
        batch_norm_act=B.batch_norm_act))


def _normkit_reference(p: Problem) -> Callable | None:
    from normkit import reference as R

    return _call(p, SimpleNamespace(
        layer_norm=R.layer_norm, rms_norm=R.rms_norm, add_layer_norm=R.add_layer_norm,
        add_rms_norm=R.add_rms_norm, group_norm=R.group_norm, batch_norm=R.batch_norm))


def _liger(p: Problem) -> Callable | None:
    if not torch.cuda.is_available():
        return None
    try:
        from liger_kernel.ops.group_norm import LigerGroupNormFunction
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    except ImportError:
        return None
    return {
        "layer_norm": lambda t: LigerLayerNormFunction.apply(t["x"], t["weight"], t["bias"], EPS),
        "rms_norm": lambda t: LigerRMSNormFunction.apply(t["x"], t["weight"], EPS),
        "group_norm": lambda t: LigerGroupNormFunction.apply(
            t["x"], t["weight"], t["bias"], p.shape[1], p.groups, EPS),
    }.get(p.op)


def _flash_attn(p: Problem) -> Callable | None:
    if not torch.cuda.is_available():
        return None
    try:
        from flash_attn.ops.triton.layer_norm import layer_norm_fn
    except ImportError:
        return None
    return {
        "layer_norm": lambda t: layer_norm_fn(t["x"], t["weight"], t["bias"], eps=EPS),
        "rms_norm": lambda t: layer_norm_fn(t["x"], t["weight"], None, eps=EPS, is_rms_norm=True),
        "add_layer_norm": lambda t: tuple(layer_norm_fn(
            t["x"], t["weight"], t["bias"], residual=t["residual"], eps=EPS, prenorm=True)),
        "add_rms_norm": lambda t: tuple(layer_norm_fn(
            t["x"], t["weight"], None, residual=t["residual"], eps=EPS, prenorm=True,
            is_rms_norm=True)),
    }.get(p.op)


PROVIDERS: dict[str, Callable[[Problem], Callable | None]] = {
    "torch": _torch_op,
    "torch.compile": _compiled_torch_op,
    "normkit-triton": _normkit_triton,
    "liger": _liger,
    "flash-attn": _flash_attn,
    "reference": _normkit_reference,
}


def providers(device: str) -> list[str]:
    """The default providers: all of them on CUDA (each skips itself when not importable); on
    CPU, torch eager and normkit's reference (compiling and the interpreter are too slow)."""
    return list(PROVIDERS) if device == "cuda" else ["torch", "reference"]


# ---- timing


def _time_ms(fn: Callable[[], object], leaves: Sequence[torch.Tensor], device: str) -> float:
    """Median milliseconds of ``fn``. CUDA: triton's do_bench (flushes L2 between runs); CPU:
    a perf_counter loop of at least 5 runs and 0.2 s."""
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, grad_to_none=list(leaves), return_mode="median")
    times: list[float] = []
    start = time.perf_counter()
    fn()  # warm-up
    while len(times) < 5 or time.perf_counter() - start < 0.2:
        for leaf in leaves:
            leaf.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: str, nbytes: int) -> float:
    """Device copy bandwidth in GB/s: ``y.copy_(x)`` moves 2 * nbytes."""
    x = torch.empty(nbytes // 4, device=device)
    y = torch.empty_like(x)
    return 2 * nbytes / (_time_ms(lambda: y.copy_(x), [], device) * 1e-3) / 1e9


def _as_tuple(out: torch.Tensor | tuple) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _measure(problem: Problem, fn: Callable, device: str, reference: tuple | None) -> dict:
    t = problem.make(device)
    leaves = list(t.values())
    outs = _as_tuple(fn(t))
    gen = torch.Generator(device=device).manual_seed(1)
    grads = [torch.randn(o.shape, generator=gen, device=device, dtype=o.dtype) for o in outs]
    row: dict = {}
    if reference is not None:
        row["max_err_vs_torch"] = max((a.float() - b.float()).abs().max().item()
                                      for a, b in zip(outs, reference, strict=True))
    row["fwd_ms"] = _time_ms(lambda: fn(t), leaves, device)
    row["bwd_ms"] = _time_ms(lambda: torch.autograd.backward(outs, grads, retain_graph=True),
                             leaves, device)
    row["fwd+bwd_ms"] = _time_ms(lambda: torch.autograd.backward(_as_tuple(fn(t)), grads),
                                 leaves, device)
    return row


def run(ops: Sequence[str], shapes: dict[str, list[tuple[int, ...]]], dtypes: Sequence[torch.dtype],
        providers: Sequence[str], device: str | None = None, copy_gbps: float | None = None,
        log: Callable[[str], None] = print) -> list[dict]:
    """Time every (op, shape, dtype, provider); one dict per measurement.

    ``shapes`` has ``"rows"`` ((M, N), for the trailing-axis norms), ``"images"``
    ((N, C, H, W, groups), for group_norm) and ``"batches"`` ((N, C, *spatial), for the
    BatchNorms, each run contiguous and channels_last). Each row carries ms and GB/s of fwd, bwd and
    fwd+bwd, the fraction of the device's copy bandwidth, and the forward's max abs difference
    from torch eager; a provider that fails records its error instead.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if copy_gbps is None:
        copy_gbps = copy_bandwidth(device, 1 << (30 if device == "cuda" else 26))
    rows = []
    for op in ops:
        for problem_of_dtype in _problems(op, shapes):
            for dtype in dtypes:
                problem = problem_of_dtype(dtype)
                reference = None
                for name in providers:
                    fn = PROVIDERS[name](problem)
                    if fn is None:
                        continue
                    row = {"op": op, "shape": problem.label, "groups": problem.groups, "dtype": str(dtype).removeprefix("torch."),
                           "provider": name}
                    try:
                        row.update(_measure(problem, fn, device, reference))
                        if name == "torch":
                            reference = _as_tuple(fn(problem.make(device)))
                    except Exception as e:  # a provider's limit (dtype, width): report, go on
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                    for direction in ("fwd", "bwd", "fwd+bwd"):
                        if f"{direction}_ms" in row:
                            gbps = problem.bytes_moved(direction) / (row[f"{direction}_ms"] * 1e-3) / 1e9
                            row[f"{direction}_GBps"] = gbps
                            row[f"{direction}_of_copy"] = gbps / copy_gbps
                    log(_format_row(row))
                    rows.append(row)
                    if device == "cuda":
                        torch.cuda.empty_cache()
    return rows


def _problems(op: str, shapes: dict[str, list[tuple[int, ...]]]) -> list[Callable[[torch.dtype], Problem]]:
    """The problems of ``op``, each awaiting its dtype."""
    if op == "group_norm":
        return [lambda d, s=s: Problem(op, tuple(s[:4]), d, s[4]) for s in shapes["images"]]
    if op in BATCH_OPS:
        return [lambda d, s=s, layout=layout: Problem(op, tuple(s), d, layout=layout)
                for s in shapes["batches"]
                for layout in ("contiguous", "channels_last" if len(s) == 4 else "channels_last_3d")]
    return [lambda d, s=s: Problem(op, tuple(s), d) for s in shapes["rows"]]


def _format_row(row: dict) -> str:
    head = f"{row['op']:15s} {row['shape']:>30s} {row['dtype']:9s} {row['provider']:15s}"
    if "error" in row:
        return f"{head} error: {row['error']}"
    return head + "".join(f" {d} {row[d + '_ms']:8.3f} ms {row[d + '_of_copy']:5.0%}"
                          for d in ("fwd", "bwd", "fwd+bwd"))


# ---- report


def _metadata(device: str, copy_gbps: float) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=HERE, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    return {"device": name, "torch": torch.__version__, "triton": triton_version,
            "commit": commit, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "copy_GBps": copy_gbps}


def write_report(rows: list[dict], meta: dict, out_dir: Path) -> tuple[Path, Path]:
    """``<device>-<date>.md`` (a table per op) and ``.json`` (metadata and rows) in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in meta["device"]).strip("-") or "device"
    stem = out_dir / f"{slug}-{meta['date'][:10]}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# normkit norm benchmarks: {meta['device']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}, "
             f"{meta['date']}. Copy bandwidth {meta['copy_GBps']:.0f} GB/s; each GB/s figure is "
             "followed by its fraction of it. Bytes: see benchmarks/README.md.", ""]
    for op in dict.fromkeys(r["op"] for r in rows):
        lines += [f"## {op}", "",
                  "| shape | dtype | provider | fwd ms | fwd GB/s | bwd ms | bwd GB/s "
                  "| fwd+bwd ms | fwd+bwd GB/s | max err vs torch |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in (r for r in rows if r["op"] == op):
            shape = r["shape"] + (f" G={r['groups']}" if r["groups"] else "")
            if "error" in r:
                lines.append(f"| {shape} | {r['dtype']} | {r['provider']} | {r['error']} |||||||")
                continue
            cells = [f"{r[d + '_ms']:.3f} | {r[d + '_GBps']:.0f} ({r[d + '_of_copy']:.0%})"
                     for d in ("fwd", "bwd", "fwd+bwd")]
            err = f"{r['max_err_vs_torch']:.2g}" if "max_err_vs_torch" in r else "-"
            lines.append(f"| {shape} | {r['dtype']} | {r['provider']} | {' | '.join(cells)} | {err} |")
        lines.append("")
    stem.with_suffix(".md").write_text("\n".join(lines))
    return stem.with_suffix(".md"), stem.with_suffix(".json")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (always on CPU)")
    parser.add_argument("--ops", nargs="+", default=[*ROW_OPS, "group_norm", *BATCH_OPS])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    parser.add_argument("--providers", nargs="+", choices=list(PROVIDERS))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        # One thread: on a shared machine, OpenMP workers waiting on busy cores turn
        # microseconds into scheduler quanta (8 ms steps), which says nothing about the op.
        torch.set_num_threads(1)
        if not args.quick:
            print("no CUDA device: running the --quick shapes, one thread, perf_counter timer")
    shapes = QUICK_SHAPES if args.quick or device == "cpu" else FULL_SHAPES
    copy_gbps = copy_bandwidth(device, 1 << (30 if device == "cuda" else 26))
    print(f"copy bandwidth: {copy_gbps:.0f} GB/s")
    rows = run(args.ops, shapes, [DTYPES[d] for d in args.dtypes],
               args.providers or providers(device), device, copy_gbps)
    md, js = write_report(rows, _metadata(device, copy_gbps), args.out)
    print(f"wrote {md} and {js}")


if __name__ == "__main__":
    main()
