"""The ``normkit`` command line: ``check`` (parity against torch.nn), ``explain`` (what each
norm reduces and computes, and the tutorials' worked examples), ``bench`` (timings on this
machine), ``compare`` (a small CNN trained with each norm at each batch size) and ``support``
(what each backend runs, :func:`normkit.support_matrix`).

Every subcommand prints a table (rich on a terminal, plain text when piped), can save its
results as JSON and, where it has one, its picture as PNG. The heavy modules are imported by
the subcommand that needs them, so ``normkit check`` starts as fast as before.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = ["build_parser", "main"]


class UsageError(Exception):
    """Arguments that parse but do not fit together: reported like argparse's errors (exit 2)."""


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], styles: Sequence[str | None]) -> None:
    """A rich table on a terminal, plain aligned text when piped (or without rich)."""
    if sys.stdout.isatty():
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            pass
        else:
            table = Table(*headers)
            for row, style in zip(rows, styles, strict=True):
                table.add_row(*row, style=style)
            Console().print(table)
            return
    widths = [max(_width(h), *(_width(r[i]) for r in rows)) if rows else _width(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c + " " * (w - _width(c)) for c, w in zip(cells, widths, strict=True)).rstrip()

    print(line(headers))
    for row in rows:
        print(line(row))


def _width(text: str) -> int:
    """Columns ``text`` takes in a terminal: CJK characters (explain's headers) take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


@contextlib.contextmanager
def _progress(total: int, label: str, *, lines_when_piped: bool = True) -> Iterator[Callable[[str], None]]:
    """Yields ``step(text)``, to call after each of ``total`` steps: a rich progress bar on a
    terminal (on stderr, gone when done), else one line per step on stderr (or nothing)."""
    if sys.stderr.isatty():
        try:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
        except ImportError:
            pass
        else:
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TimeRemainingColumn(), TextColumn("{task.fields[last]}"))
            with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
                task = bar.add_task(label, total=total, last="")
                yield lambda text: bar.update(task, advance=1, last=text)
            return
    done = 0

    def step(text: str) -> None:
        nonlocal done
        done += 1
        if lines_when_piped:
            print(f"[{done}/{total}] {label}: {text}", file=sys.stderr, flush=True)

    yield step


def _write_json(path: str, payload: Any) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"wrote {path}")


def _check(args: argparse.Namespace) -> int:
    import warnings

    import torch

    from ..backends import backends, get_backend
    from .check import CASES, DTYPES, run_check

    # torch's own note that a bf16 input with fp32 weight takes its unfused RMSNorm path
    warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")

    cases = [c for c in CASES if not args.op or any(o.lower() in c.name.lower() for o in args.op)]
    dtypes = [d for d in DTYPES if not args.dtype or str(d).removeprefix("torch.") in args.dtype]
    names = args.backend or backends()
    total = sum(len(dtypes) for c in cases for n in names if c.op in get_backend(n).ops)
    start = time.perf_counter()
    with _progress(total, "check", lines_when_piped=False) as step:
        results = run_check(cases, args.backend or None, dtypes,
                            progress=lambda r: step(f"{r.case} {r.backend} {r.dtype}"))
    elapsed = time.perf_counter() - start
    rows = [
        (r.case, r.backend, r.dtype, f"{r.max_error:.2e}", f"{r.tolerance:.2e}",
         r.worst if r.error is None else r.error[:60], "pass" if r.ok else "FAIL")
        for r in results
    ]
    _print_table(("op", "backend", "dtype", "max error", "tolerance", "worst quantity", "result"), rows,
                 [None if r.ok else "bold red" for r in results])
    failed = sum(not r.ok for r in results)
    print(f"{len(results) - failed} passed, {failed} failed in {elapsed:.1f} s "
          f"(torch {torch.__version__}; errors against torch in float64; "
          "tolerance = 2 x torch's own error in that dtype + atol)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "results": [r.as_dict() for r in results]}, f, indent=1)
    return 1 if failed else 0


# --- explain ---------------------------------------------------------------------------------


def _support(args: argparse.Namespace) -> int:
    from ..support import support_matrix

    matrix = support_matrix()
    if args.markdown:
        print(matrix.to_markdown(), end="")
        return 0
    header, rows, notes = matrix.table()
    styles = [None if all(c == "all" for c in row[2:]) else "yellow" for row in rows]
    _print_table(header, rows, styles)
    print()
    for i, note in enumerate(notes, 1):
        print(f"[{i}] {note}")
    print()
    print("\n".join(matrix.availability()))
    if args.json:
        with open(args.json, "w") as f:
            f.write(matrix.to_json())
        print(f"wrote {args.json}")
    return 0


def _statistics_sentence(e: Any) -> str:
    sizes = " x ".join(str(e.view[e.view_axes.index(a)]) for a in e.reduced_axes)
    what = (f"{e.num_statistics} means and {e.num_statistics} variances" if len(e.statistics) == 2
            else f"{e.num_statistics} mean squares (not centred: no mean is subtracted)")
    return f"{what}, each over {e.elements_per_statistic} elements ({' x '.join(e.reduced_axes)} = {sizes})"


def _shapes(named: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{n} {tuple(s)}" for n, s in named.items()) or "none"


def _explain(args: argparse.Namespace) -> int:
    from .explain import explain, find_norms, render_grid, replay_seeds

    if args.seed:
        return _replay(args, replay_seeds())
    shape = args.shape
    if args.groups is not None and shape[1] % args.groups:
        raise UsageError(f"--groups {args.groups} must divide the channels C = {shape[1]} of --shape")
    if args.normalized_ndim is not None and not 1 <= args.normalized_ndim <= len(shape) - 1:
        raise UsageError(f"--normalized-ndim must be between 1 and {len(shape) - 1} for --shape {shape}")
    explanations = [explain(name, shape, groups=args.groups, normalized_ndim=args.normalized_ndim)
                    for name in find_norms(args.name)]
    axes = ", ".join(explanations[0].axes)
    print(f"input ({axes}) = {tuple(shape)}: what each norm computes its statistics over")
    _print_table(
        ("norm", "module", "reduced (计算维度)", "kept (固定维度)", "statistics", "elements each", "parameters",
         "running stats"),
        [(e.module, e.constructor, ", ".join(e.reduced_axes), ", ".join(e.kept_axes),
          f"{e.num_statistics} x {' & '.join(e.statistics)}", str(e.elements_per_statistic), _shapes(e.parameters),
          "yes" if e.running_stats else "no") for e in explanations],
        [None] * len(explanations))
    # normkit's output must be normalized over exactly the sets the table names, and equal torch's
    bad = [e for e in explanations
           if e.max_diff_vs_torch > 1e-4 or e.normalized_mean > 1e-3 or e.normalized_var > 1e-3]
    for e in explanations:
        print(f"\n{e.module}: {e.constructor}")
        print(f"  reduced over {', '.join(e.reduced_axes)}; kept apart: {', '.join(e.kept_axes)}")
        print(f"  {_statistics_sentence(e)}")
        print(f"  formula: {e.formula}")
        print(f"  parameters: {_shapes(e.parameters)}; buffers: {_shapes(e.buffers)}")
        print(f"  {e.train_eval}")
        target = "mean 0 and variance 1" if len(e.statistics) == 2 else "mean square 1"
        print(f"  ran it: over each set the output has {target} (largest deviation "
              f"{max(e.normalized_mean, e.normalized_var):.1e}); normkit (reference) vs "
              f"torch.nn.{e.constructor.split('(')[0]}: max |diff| {e.max_diff_vs_torch:.1e}"
              f"{'' if e not in bad else '  <- DISAGREE'}")
        print(render_grid(e))
    if args.png:
        from .plots import explain_figure

        print(f"\nwrote {explain_figure(explanations, args.png)}")
    if args.json:
        _write_json(args.json, {"shape": list(shape), "norms": [e.as_dict() for e in explanations]})
    return 1 if bad else 0


def _replay(args: argparse.Namespace, replays: list[Any]) -> int:
    for r in replays:
        print(f"=== seed {r.source}: {r.title} ===")
        print("\n".join(r.lines))
        print()
    checks = [(r, c) for r in replays for c in r.checks]
    _print_table(("example", "quantity", "normkit vs", "max |diff|", "bound", "result"),
                 [(r.title, c.what, c.against, f"{c.max_diff:.2e}", f"{c.tolerance:.1e}", "agree" if c.ok else "DISAGREE")
                  for r, c in checks],
                 [None if c.ok else "bold red" for _, c in checks])
    failed = sum(not c.ok for _, c in checks)
    print(f"{len(checks) - failed} of {len(checks)} checks agree (normkit modules on the reference backend)")
    if args.json:
        _write_json(args.json, {"replays": [r.as_dict() for r in replays]})
    return 1 if failed else 0


# --- bench -----------------------------------------------------------------------------------


def _bench(args: argparse.Namespace) -> int:
    import torch

    threads = torch.get_num_threads()
    try:
        return _bench_run(args)
    finally:
        torch.set_num_threads(threads)  # main() may run in-process: leave the caller's setting


def _bench_run(args: argparse.Namespace) -> int:
    import torch

    from . import bench

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device here")
    ops = list(bench.OPS) if "all" in (args.op or []) else (args.op or ["layer_norm", "rms_norm"])
    unknown = sorted(set(ops) - set(bench.OPS))
    if unknown:
        raise UsageError(f"unknown --op {', '.join(unknown)}; choose from {', '.join(bench.OPS)} or all")
    shapes = {k: list(v) for k, v in bench.SHAPES[device].items()}
    if args.shapes:
        shapes["rows"] = args.shapes
    dtypes = [getattr(torch, d) for d in (args.dtype or ["float32"])]
    providers = args.provider or bench.providers(device)
    known = bench.provider_names()
    unknown = [p for p in providers if p not in known]
    if unknown:
        raise UsageError(f"unknown --provider {', '.join(unknown)}; choose from {', '.join(known)}")
    if args.no_compile:
        providers = [p for p in providers if p != "torch.compile"]
    directions = args.direction or (list(bench.DIRECTIONS) if device == "cuda" else ["fwd"])
    problems = bench.problems(ops, shapes, dtypes)
    # One thread by default on the CPU: with several, on a shared machine, an OpenMP worker
    # waiting for a busy core turns microseconds into a scheduler time slice.
    thread_counts = (args.threads or [1]) if device == "cpu" else [None]

    # The copy the norms are held against: on a GPU a 1 GiB one; on the CPU one of the largest
    # problem's size, since small problems run from cache and a memory-sized copy would put them
    # above 100%. The memory-sized figure is printed too.
    with bench.threads(thread_counts[0]):
        if device == "cuda":
            copy_bytes = 1 << 30
            copy_gbps = memory_gbps = bench.copy_bandwidth(device, copy_bytes)
        else:
            copy_bytes = bench.largest_input_bytes(problems)
            copy_gbps, memory_gbps = bench.copy_bandwidth(device, copy_bytes), bench.copy_bandwidth(device, 1 << 26)
    from .bench_report import machine

    meta = {**machine(device), "copy_GBps": copy_gbps, "copy_bytes": copy_bytes, "memory_copy_GBps": memory_gbps,
            "threads": thread_counts if device == "cpu" else None, "directions": directions, "repeats": args.repeats}
    threads = f", {'/'.join(map(str, thread_counts))} thread(s)" if device == "cpu" else ""
    print(f"{meta['device']} ({device}{threads}); torch {torch.__version__}; copy bandwidth (y.copy_(x), read + "
          f"write): {copy_gbps:.1f} GB/s at {copy_bytes / 2**20:.0f} MiB, the reference for 'of copy'"
          + (f"; {memory_gbps:.1f} GB/s at 64 MiB" if device == "cpu" else ""))
    with _progress(len(problems) * len(providers) * len(thread_counts), "bench") as step:
        rows = bench.run(problems, providers, device=device, directions=directions, thread_counts=thread_counts,
                         repeats=args.repeats, budget_s=args.budget, copy_gbps=copy_gbps,
                         compile_budget_s=args.compile_budget, log=step)
    bench.add_speedups(rows)

    table, styles, points = _bench_table(rows)
    _print_table(("op", "shape", "dtype", "threads", "provider", "pass", "ms (median)", "spread", "GB/s", "of copy",
                  "vs torch", "vs compile", "max err", "error"), table, styles)
    print(f"times: median of {args.repeats} interleaved samples, spread = min-max; GB/s = bytes an ideal kernel "
          "moves (fwd: read x, params, write y, stats; bwd: read x, dy, params, stats, write dx, grads) / median "
          "time; 'of copy' = that / the copy bandwidth; vs torch / vs compile = their median / this one, "
          "with '~' where the two spreads overlap (no speedup can be claimed)")
    if args.json:
        _write_json(args.json, {"meta": meta, "rows": rows})
    if args.png:
        from .plots import bench_figure

        print(f"wrote {bench_figure(points, args.png, copy_gbps)}")
    return 0


def _bench_table(rows: list[dict[str, Any]]) -> tuple[list[tuple[str, ...]], list[str | None], list[dict[str, Any]]]:
    """Table rows (one per measured direction, or one with the error), their styles, and the
    points of the GB/s plot."""
    from .bench import DIRECTIONS, width

    def num(value: float | None, fmt: str, unit: str = "") -> str:
        return "-" if value is None else format(value, fmt) + unit

    def speedup(r: dict[str, Any], d: str, base: str) -> str:
        value = r.get(f"{d}_speedup_vs_{base}")
        if value is None:
            return "-"
        return f"{value:.2f}x" + (" ~" if r[f"{d}_verdict_vs_{base}"] == "within spread" else "")

    table: list[tuple[str, ...]] = []
    styles: list[str | None] = []
    points: list[dict[str, Any]] = []
    for r in rows:
        threads = str(r["threads"] or "-")
        measured = [d for d in DIRECTIONS if f"{d}_ms" in r]
        if not measured:
            table.append((r["op"], r["shape"], r["dtype"], threads, r["provider"], *["-"] * 8,
                          r.get("error", "not run")[:60]))
            styles.append("yellow")
        for d in measured:
            table.append((r["op"], r["shape"], r["dtype"], threads, r["provider"], d, num(r[f"{d}_ms"], ".3f"),
                          f"{r[f'{d}_ms_min']:.3f}-{r[f'{d}_ms_max']:.3f}",
                          num(r[f"{d}_GBps"], ".1f"), num(100 * r[f"{d}_of_copy"], ".0f", "%"),
                          speedup(r, d, "torch"), speedup(r, d, "compile"),
                          num(r.get("max_err_vs_torch"), ".1e"), ""))
            styles.append(None)
            points.append({"op": r["op"], "dtype": r["dtype"], "direction": d, "provider": r["provider"],
                           "width": width(r), "gbps": r[f"{d}_GBps"]})
    return table, styles, points


# --- compare ---------------------------------------------------------------------------------


def _compare(args: argparse.Namespace) -> int:
    from .compare import BATCH_SIZES, NORMS, Setup, load_data, run_compare

    quick = args.quick
    data = load_data(args.data, limit=256 if quick else None)
    batch_sizes = args.batch_sizes or ([8, 32] if quick else list(BATCH_SIZES))
    seeds = list(range(args.seeds if args.seeds is not None else (1 if quick else 3)))
    # the digits get photographs' spread of contrast and brightness; the user's data keep theirs
    exposure = args.exposure if args.exposure is not None else args.data is None
    setup = Setup(epochs=args.epochs if args.epochs is not None else (3 if quick else Setup.epochs),
                  exposure=exposure)
    norms = args.norm or list(NORMS)
    workers = args.workers if args.workers is not None else (1 if quick else None)
    _, y_train, _, y_val = data.split(0)
    print(f"{data.name}: {len(y_train)} training, {len(y_val)} validation images of shape "
          f"{tuple(data.x.shape[1:])}, {data.num_classes} classes"
          f"{', random contrast and brightness per image' if exposure else ''}; {setup.epochs} epoch(s) per run, "
          f"AdamW, lr = {setup.base_lr} x sqrt(batch / {setup.base_batch}); seeds {seeds}")
    total = len(norms) * len(batch_sizes) * len(seeds)
    with _progress(total, "compare") as step:
        result = run_compare(norms, batch_sizes, seeds, data=data, setup=setup, workers=workers,
                             progress=lambda r: step(f"{r['norm']} batch {r['batch']} seed {r['seed']}: "
                                                     f"{100 * r['accuracy']:.1f}% ({r['seconds']:.1f} s)"))
    acc = result["accuracy"]
    _print_table(("norm", *(f"batch {b}" for b in batch_sizes)),
                 [(n, *(f"{100 * acc[n][str(b)]['mean']:.1f} ± {100 * acc[n][str(b)]['std']:.1f}"
                        for b in batch_sizes)) for n in norms],
                 [None] * len(norms))
    print(f"validation accuracy (%), mean ± std over {len(seeds)} seed(s); eval mode (BatchNorm: running "
          f"statistics); {result['elapsed_s']:.0f} s with {result['workers']} worker(s)")
    print(result["verdict"]["text"])
    if args.json:
        _write_json(args.json, result)
    if args.png:
        from .plots import compare_figure

        print(f"wrote {compare_figure(result, args.png)}")
    return 0


# --- arguments -------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _explain_shape(text: str) -> tuple[int, ...]:
    shape = tuple(_int_list(text))
    if not 3 <= len(shape) <= 5:
        raise argparse.ArgumentTypeError(f"expected N,C and 1 to 3 spatial sizes (e.g. 2,3,4,5), got {text!r}")
    return shape


def _bench_shapes(text: str) -> list[tuple[int, int]]:
    """``2048x256,512x1024``: rows x width."""
    shapes = []
    for item in text.split(","):
        parts = _int_list(item.replace("x", ","))
        if len(parts) != 2:
            raise argparse.ArgumentTypeError(f"expected MxN[,MxN...] (rows x width), got {text!r}")
        shapes.append((parts[0], parts[1]))
    return shapes


def _norm_name(text: str) -> str:
    from ..norms import NORMS
    from .explain import find_norms

    if not find_norms(text):
        raise argparse.ArgumentTypeError(
            f"no norm {text!r}; choose from {', '.join(NORMS)} (or BatchNorm, bn, LayerNorm, ln, GroupNorm, gn, "
            "InstanceNorm, in, RMSNorm, rms)")
    return text


def _outputs(parser: argparse.ArgumentParser, what: str, png: str | None = None) -> None:
    parser.add_argument("--json", metavar="FILE", help=f"also write {what} as JSON")
    if png:
        parser.add_argument("--png", metavar="FILE", help=png)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normkit", description="normkit: normalization layers for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="check every op and backend against torch.nn")
    check.add_argument("--op", action="append", help="only cases whose name contains this (repeatable)")
    check.add_argument("--backend", action="append", help="only this backend (repeatable)")
    check.add_argument("--dtype", action="append", help="only this dtype, e.g. float32 (repeatable)")
    _outputs(check, "the results")
    check.set_defaults(run=_check)

    explain = sub.add_parser(
        "explain", help="what each norm reduces, keeps and computes; --seed replays the tutorials' examples",
        description="For each norm of normkit.norms.NORMS: the axes reduced and kept, the number of statistics "
                    "for --shape and the elements each covers, the formula, parameters, train vs eval; all "
                    "computed by running the norm. --seed replays the worked examples of the tutorials.")
    explain.add_argument("name", nargs="?", type=_norm_name,
                         help="only this norm: batch_norm, BatchNorm, bn, layer_norm, ln, group_norm, gn, ...")
    explain.add_argument("--shape", type=_explain_shape, default=(4, 6, 3, 3), metavar="N,C,H,W",
                         help="input shape (N, C, *spatial), 1 to 3 spatial axes (default 4,6,3,3)")
    explain.add_argument("--groups", type=int, metavar="G",
                         help="GroupNorm's number of groups (default: smallest divisor of C above 1)")
    explain.add_argument("--normalized-ndim", type=int, metavar="K",
                         help="LayerNorm/RMSNorm normalize the last K axes (default: all but N, as in Wu & He)")
    explain.add_argument("--seed", action="store_true",
                         help="replay the seeds' worked examples (BatchNorm2d, LayerNorm) step by step")
    _outputs(explain, "the numbers", "draw the N x C x (H, W) cube of each norm, reduced set shaded")
    explain.set_defaults(run=_explain)

    bench = sub.add_parser("bench", help="time each norm per provider: ms, GB/s, speedups; table, JSON, PNG")
    bench.add_argument("--op", action="append", metavar="OP",
                       help="layer_norm, rms_norm, add_layer_norm, add_rms_norm, group_norm or all "
                            "(repeatable; default layer_norm and rms_norm)")
    bench.add_argument("--shapes", type=_bench_shapes, metavar="MxN[,MxN...]",
                       help="rows x width problems for the row norms, e.g. 2048x256,128x4096")
    bench.add_argument("--dtype", action="append", choices=["float32", "float64", "bfloat16", "float16"],
                       help="(repeatable; default float32)")
    bench.add_argument("--provider", action="append", metavar="NAME",
                       help="torch, torch.compile, normkit-<backend> (normkit-auto, normkit-torch, "
                            "normkit-reference, ...), liger, flash-attn (repeatable; default: all that run here)")
    bench.add_argument("--direction", action="append", choices=["fwd", "bwd", "fwd+bwd"],
                       help="(repeatable; default fwd on the CPU, all three on a GPU)")
    bench.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    bench.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    bench.add_argument("--threads", type=_int_list, metavar="T[,T...]",
                       help="CPU thread counts, each a run of its own (default 1: steadier timings on a shared machine)")
    bench.add_argument("--repeats", type=int, default=5, metavar="K",
                       help="interleaved samples per measurement: the median and the spread (min-max) come from them")
    bench.add_argument("--budget", type=float, default=0.2, metavar="S", help="seconds of timing per measurement, over all its repeats")
    bench.add_argument("--compile-budget", type=float, default=60.0, metavar="S",
                       help="stop compiling once torch.compile has taken this long in all; the rest is an error row")
    _outputs(bench, "the results", "plot GB/s against width per provider")
    bench.set_defaults(run=_bench)

    compare = sub.add_parser(
        "compare", help="train a small CNN per norm and batch size (Wu & He 2018, Fig. 1)",
        description="Train a small CNN on scikit-learn's 8x8 digits (or --data) once per norm, batch size and "
                    "seed, the same number of samples each with the learning rate scaled with the batch; "
                    "report validation accuracy and whether BatchNorm degrades at small batches while "
                    "GroupNorm does not (Wu & He 2018, Fig. 1).")
    compare.add_argument("--norm", action="append", choices=["BatchNorm", "GroupNorm", "LayerNorm2d", "InstanceNorm",
                                                            "RMSNorm2d", "none"], help="(repeatable; default all)")
    compare.add_argument("--batch-sizes", type=_int_list, metavar="B,B,...", help="default 2,4,8,16,32,64")
    compare.add_argument("--seeds", type=int, metavar="K", help="seeds per setting (default 3)")
    compare.add_argument("--epochs", type=int, help="epochs per run (default 3)")
    compare.add_argument("--data", metavar="FILE.npz", help="train on x (N,H,W) or (N,C,H,W) and integer labels y")
    compare.add_argument("--exposure", action=argparse.BooleanOptionalAction,
                         help="give each image a random contrast and brightness, as photographs have "
                              "(default: on for the digits, off for --data)")
    compare.add_argument("--workers", type=int, help="parallel processes (default min(2, CPUs)), one thread each")
    compare.add_argument("--quick", action="store_true",
                         help="seconds: 256 training images, batch sizes 8 and 32, one seed, three epochs, one process")
    _outputs(compare, "the results", "plot accuracy against batch size and the loss curves")
    compare.set_defaults(run=_compare)

    support = sub.add_parser(
        "support", help="what each backend runs: ops x calls x dtypes x devices",
        description="The support matrix (normkit.support_matrix()): for each op and representative call, "
                    "the dtypes each backend runs, from the backends' own checks, without computing anything. "
                    "The cells are the same on every machine; the last lines say which backends this one has.")
    support.add_argument("--markdown", action="store_true", help="print the README's markdown table instead")
    _outputs(support, "every cell")
    support.set_defaults(run=_support)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UsageError as exc:
        parser.error(str(exc))  # exits with 2, as argparse's own errors
        raise  # unreachable: for type checkers


if __name__ == "__main__":
    sys.exit(main())
