"""The ``normkit`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

__all__ = ["main"]


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
            for row, style in zip(rows, styles):
                table.add_row(*row, style=style)
            Console().print(table)
            return
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def _check(args: argparse.Namespace) -> int:
    import warnings

    import torch

    from .check import CASES, DTYPES, run_check

    # torch's own note that a bf16 input with fp32 weight takes its unfused RMSNorm path
    warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")

    cases = [c for c in CASES if not args.op or any(o.lower() in c.name.lower() for o in args.op)]
    dtypes = [d for d in DTYPES if not args.dtype or str(d).removeprefix("torch.") in args.dtype]
    start = time.perf_counter()
    results = run_check(cases, args.backend or None, dtypes)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normkit", description="normkit: normalization layers for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="check every op and backend against torch.nn")
    check.add_argument("--op", action="append", help="only cases whose name contains this (repeatable)")
    check.add_argument("--backend", action="append", help="only this backend (repeatable)")
    check.add_argument("--dtype", action="append", help="only this dtype, e.g. float32 (repeatable)")
    check.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    check.set_defaults(run=_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
