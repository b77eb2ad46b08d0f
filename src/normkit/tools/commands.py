"""What each ``normkit`` subcommand does once its arguments are parsed: ``run_<command>(args)``
returns the exit status (0 fine, 1 a check failed); a user mistake raises :class:`UsageError`
(exit status 2) before any work, a missing extra is named before any work."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ._terminal import UsageError, print_table, progress, require, wrap, write_json

__all__ = ["run_bench", "run_check", "run_compare", "run_explain", "run_support"]


def backend_names(requested: list[str] | None) -> list[str] | None:
    """``--backend`` values checked: each registered and available here, or a UsageError saying
    why not (an unknown name, Triton not installed, no CUDA GPU)."""
    if not requested:
        return None
    import importlib.util

    import torch

    from ..backends import BackendError, backends, get_backend

    for name in requested:
        try:
            backend = get_backend(name)
            available = backend.is_available()
        except ValueError:
            raise UsageError(f"unknown --backend {name!r}; available here: {', '.join(backends())}") from None
        except BackendError:
            available = False
        if available:
            continue
        if name == "triton" and importlib.util.find_spec("triton") is None:
            why = 'Triton is not installed (pip install "normkit[triton]")'
        elif name == "triton" and not torch.cuda.is_available():
            why = ("its kernels run on CUDA GPUs and torch sees none here (torch.cuda.is_available() is False; "
                   "TRITON_INTERPRET=1 runs them on the CPU through Triton's interpreter, for tests)")
        else:
            why = "it is not available on this machine"
        raise UsageError(f"--backend {name}: {why}; available here: {', '.join(backends())}")
    return list(requested)


def run_check(args: argparse.Namespace) -> int:
    import warnings

    import torch

    from .check import CASES, DTYPES, run_check, select_cases

    # torch's own note that a bf16 input with fp32 weight takes its unfused RMSNorm path
    warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")

    cases = select_cases(args.op)
    if not cases:
        raise UsageError(f"no check case matches --op {', '.join(map(repr, args.op))}; cases: "
                         + ", ".join(c.name for c in CASES))
    dtypes = [d for d in DTYPES if not args.dtype or str(d).removeprefix("torch.") in args.dtype]
    names = backend_names(args.backend)
    from ..backends import backends

    total = len(cases) * len(names or backends()) * len(dtypes) * (2 if args.compile else 1)
    start = time.perf_counter()
    with progress(total, "check", lines_when_piped=False) as step:
        results = run_check(cases, names, dtypes, compile=args.compile, compile_backend=args.compile_backend,
                            progress=lambda r: step(f"{r.case} {r.backend} {r.dtype}"))
    elapsed = time.perf_counter() - start
    ran = [r for r in results if r.skipped is None]
    print_table(("case", "backend", "dtype", "oracle", "max error", "tolerance", "worst quantity", "result"),
                [(r.case, r.backend, r.dtype, r.oracle, f"{r.max_error:.2e}", f"{r.tolerance:.2e}",
                  r.worst if r.error is None else r.error[:60], "pass" if r.ok else "FAIL") for r in ran],
                [None if r.ok else "bold red" for r in ran])
    failed = sum(not r.ok for r in ran)
    skipped = [r for r in results if r.skipped is not None]
    print(wrap(f"{len(ran) - failed} passed, {failed} failed, {len(skipped)} skipped in {elapsed:.1f} s (torch "
               f"{torch.__version__}; errors against the oracle in float64; tolerance = 2 x torch's own error in "
               "that dtype + the floor of normkit.testing.TOLERANCES"
               + ("; [compiled]: torch.compile against eager" if args.compile else "") + ")"))
    by_reason: dict[str, list[str]] = {}
    for r in skipped:
        by_reason.setdefault(r.skipped, []).append(f"{r.case} {r.backend} {r.dtype}")
    for reason, which in by_reason.items():
        print(wrap(f"skipped {len(which)}: {reason}: " + ", ".join(which), "    "))
    if args.json:
        write_json(args.json, {"torch": torch.__version__, "results": [r.as_dict() for r in results]})
    return 1 if failed else 0


def run_support(args: argparse.Namespace) -> int:
    from ..support import support_matrix

    matrix = support_matrix()
    if args.markdown:
        print(matrix.to_markdown(), end="")
        return 0
    header, rows, notes = matrix.table()
    styles = [None if all(c == "all" for c in row[2:]) else "yellow" for row in rows]
    print_table(header, rows, styles)
    print()
    for i, note in enumerate(notes, 1):
        print(wrap(f"[{i}] {note}", "    "))
    print()
    print("\n".join(matrix.availability()))
    if args.json:
        with open(args.json, "w") as f:
            f.write(matrix.to_json())
        print(f"wrote {args.json}")
    return 0


# --- explain ---------------------------------------------------------------------------------


# The tutorials' own Chinese terms, shown beside the English ones with --lang zh.
_ZH = {"norm": "归一化方法", "reduced": "计算维度", "kept": "固定维度", "statistics": "统计量", "parameters": "参数",
       "running stats": "滑动统计量", "formula": "公式", "train vs eval": "训练与推理"}


def _term(english: str, lang: str) -> str:
    return f"{english} ({_ZH[english]})" if lang == "zh" and english in _ZH else english


def _statistics_sentence(e: Any) -> str:
    from .explain import STATISTICS

    what = STATISTICS[e.statistic].counted.format(n=e.num_statistics)
    if not e.reduced_axes:  # DyT, Derf: an elementwise squash
        return what
    sizes = " x ".join(str(e.view[e.view_axes.index(a)]) for a in e.reduced_axes)
    return f"{what}, each over {e.elements_per_statistic} elements ({' x '.join(e.reduced_axes)} = {sizes})"


def _shapes(named: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{n} {tuple(s)}" for n, s in named.items()) or "none"


def run_explain(args: argparse.Namespace) -> int:
    if args.png:
        require("matplotlib", purpose="--png")
    from .explain import explain, find_norms, fused_op, render_grid

    if args.seed:
        from .tutorials import replay_tutorials

        return _replay(args, replay_tutorials())
    shape, lang = args.shape, args.lang
    if args.groups is not None and shape[1] % args.groups:
        raise UsageError(f"--groups {args.groups} must divide the channels C = {shape[1]} of --shape")
    if args.normalized_ndim is not None and not 1 <= args.normalized_ndim <= len(shape) - 1:
        raise UsageError(f"--normalized-ndim must be between 1 and {len(shape) - 1} for --shape {shape}")
    explanations = [explain(name, shape, groups=args.groups, normalized_ndim=args.normalized_ndim)
                    for name in find_norms(args.name)]
    axes = ", ".join(explanations[0].axes)
    fused = fused_op(args.name)
    if fused is not None:
        print(wrap(f"{fused[0]}: {fused[1]}. The norm it computes:"))
    print(wrap(f"input ({axes}) = {tuple(shape)}: what each norm computes its statistics over"))
    print_table(
        tuple(_term(h, lang) for h in ("norm", "module", "reduced", "kept", "statistics", "elements each",
                                        "parameters", "running stats")),
        [(e.module, e.constructor, ", ".join(e.reduced_axes) or "nothing", ", ".join(e.kept_axes),
          f"{e.num_statistics} x {' & '.join(e.statistics)}" if e.statistics else "none",
          str(e.elements_per_statistic) if e.statistics else "-", _shapes(e.parameters),
          "yes" if e.running_stats else "no") for e in explanations],
        [None] * len(explanations))
    # normkit's output must be normalized over exactly the sets the table names, and equal torch's
    bad = [e for e in explanations
           if e.max_diff_vs_torch > 1e-4 or e.normalized_mean > 1e-3 or e.normalized_var > 1e-3]
    for e in explanations:
        print(f"\n{e.module}: {e.constructor}")
        for line in (f"{_term('reduced', lang)} over {', '.join(e.reduced_axes) or 'nothing'}; "
                     f"{_term('kept', lang)} apart: {', '.join(e.kept_axes)}",
                     _statistics_sentence(e),
                     f"{_term('formula', lang)}: {e.formula}",
                     f"{_term('parameters', lang)}: {_shapes(e.parameters)}; buffers: {_shapes(e.buffers)}",
                     f"{_term('train vs eval', lang)}: {e.train_eval}",
                     f"ran it: over each set {e.output_property} (largest deviation "
                     f"{max(e.normalized_mean, e.normalized_var):.1e}); normkit (reference) vs "
                     f"{e.oracle}: max |diff| {e.max_diff_vs_torch:.1e}"
                     f"{'' if e not in bad else '  <- DISAGREE'}"):
            print(wrap("  " + line, "    "))
        *grid, note = render_grid(e).splitlines()
        print("\n".join(grid))
        print(wrap(note, "    "))
    if args.png:
        from .plots import explain_figure

        print(f"\nwrote {explain_figure(explanations, args.png)}")
    if args.json:
        write_json(args.json, {"shape": list(shape), "norms": [e.as_dict() for e in explanations]})
    return 1 if bad else 0


def _replay(args: argparse.Namespace, replays: list[Any]) -> int:
    for r in replays:
        zh = f" ({r.title_zh})" if args.lang == "zh" and r.title_zh else ""
        print(wrap(f"=== {r.title}: {r.source}{zh} ==="))
        for line in r.lines:
            indent = " " * (len(line) - len(line.lstrip()))
            print(line if line.startswith(indent + "tensor(") or "[" in line[:len(indent) + 2]
                  else wrap(line, indent + "    "))
        print()
    checks = [(r, c) for r in replays for c in r.checks]
    print_table(("example", "quantity", "normkit vs", "max |diff|", "bound", "result"),
                [(r.title, c.what, c.against, f"{c.max_diff:.2e}", f"{c.tolerance:.1e}",
                  "agree" if c.ok else "DISAGREE")
                 for r, c in checks],
                [None if c.ok else "bold red" for _, c in checks])
    failed = sum(not c.ok for _, c in checks)
    print(f"{len(checks) - failed} of {len(checks)} checks agree (normkit modules on the reference backend)")
    if args.json:
        write_json(args.json, {"replays": [r.as_dict() for r in replays]})
    return 1 if failed else 0


# --- bench -----------------------------------------------------------------------------------


def run_bench(args: argparse.Namespace) -> int:
    import torch

    threads = torch.get_num_threads()
    try:
        return _bench_run(args)
    finally:
        torch.set_num_threads(threads)  # main() may run in-process: leave the caller's setting


def _bench_run(args: argparse.Namespace) -> int:
    import torch

    if args.png:
        require("matplotlib", purpose="--png")

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
    with progress(len(problems) * len(providers) * len(thread_counts), "bench") as step:
        rows = bench.run(problems, providers, device=device, directions=directions, thread_counts=thread_counts,
                         repeats=args.repeats, budget_s=args.budget, copy_gbps=copy_gbps,
                         compile_budget_s=args.compile_budget, log=step)
    bench.add_speedups(rows)

    table, styles, points = _bench_table(rows)
    print_table(("op", "shape", "dtype", "threads", "provider", "pass", "ms (median)", "spread", "GB/s", "of copy",
                  "vs torch", "vs compile", "max err", "error"), table, styles)
    print(f"times: median of {args.repeats} interleaved samples, spread = min-max; GB/s = bytes an ideal kernel "
          "moves (fwd: read x, params, write y, stats; bwd: read x, dy, params, stats, write dx, grads) / median "
          "time; 'of copy' = that / the copy bandwidth; vs torch / vs compile = their median / this one, "
          "with '~' where the two spreads overlap (no speedup can be claimed)")
    if args.json:
        write_json(args.json, {"meta": meta, "rows": rows})
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


def run_compare(args: argparse.Namespace) -> int:
    import os

    require("numpy", *(() if args.data else ("sklearn",)), purpose="normkit compare")
    if args.png:
        require("matplotlib", purpose="--png")
    if args.data is not None and not os.path.isfile(args.data):
        raise UsageError(f"--data {args.data}: no such file (expected an .npz with arrays x and y)")
    from .compare import BATCH_SIZES, NORMS, Setup, load_data, run_compare

    quick = args.quick
    try:
        data = load_data(args.data, limit=256 if quick else None)
    except (ValueError, OSError) as exc:  # not an npz, or the wrong arrays in it
        raise UsageError(f"--data {args.data}: {exc}") from None
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
    with progress(total, "compare") as step:
        result = run_compare(norms, batch_sizes, seeds, data=data, setup=setup, workers=workers,
                             progress=lambda r: step(f"{r['norm']} batch {r['batch']} seed {r['seed']}: "
                                                     f"{100 * r['accuracy']:.1f}% ({r['seconds']:.1f} s)"))
    acc = result["accuracy"]

    def cell(c: dict[str, Any]) -> str:  # one seed has no spread to show
        return f"{100 * c['mean']:.1f}" + (f" ± {100 * c['std']:.1f}" if len(seeds) > 1 else "")

    print_table(("norm", *(f"batch {b}" for b in batch_sizes)),
                [(n, *(cell(acc[n][str(b)]) for b in batch_sizes)) for n in norms], [None] * len(norms))
    spread = f"mean ± std over {len(seeds)} seeds" if len(seeds) > 1 else "one seed, no spread"
    print(wrap(f"validation accuracy (%), {spread}; eval mode (BatchNorm: running statistics); "
               f"{result['elapsed_s']:.0f} s with {result['workers']} worker(s)"))
    print(wrap(result["verdict"]["text"]))
    if args.json:
        from .bench_report import machine

        # what the run was: the command, the machine, the versions, the date (a README table is
        # regenerated from such a record)
        result["meta"] = {**machine("cpu"), "command": "normkit " + " ".join(args.argv)}
        write_json(args.json, result)
    if args.png:
        from .plots import compare_figure

        print(f"wrote {compare_figure(result, args.png)}")
    return 0


