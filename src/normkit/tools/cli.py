"""The ``normkit`` command line: ``check`` (every module against its oracle), ``explain`` (what
each norm reduces and computes, and the tutorials' worked examples), ``bench`` (timings on this
machine), ``compare`` (a small CNN trained with each norm at each batch size) and ``support``
(what each backend runs, :func:`normkit.support_matrix`).

Every subcommand prints a table (rich on a terminal, plain text when piped), can save its
results as JSON and, where it has one, its picture as PNG. A user mistake is one line and exit
status 2, with the subcommand's usage; an unexpected error is one line and exit status 1; the
traceback only with ``--debug``. The subcommands import what they need when they run
(:mod:`normkit.tools.commands`), so ``normkit --help`` starts fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ._terminal import UsageError

__all__ = ["build_parser", "main"]


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
        modules = ", ".join(spec.module for spec in NORMS.values())
        raise argparse.ArgumentTypeError(
            f"no norm {text!r}; choose from {', '.join(NORMS)} (or a module name: {modules}; or its initials: "
            "bn, ln, ...)")
    return text


def _outputs(parser: argparse.ArgumentParser, what: str, png: str | None = None) -> None:
    parser.add_argument("--json", metavar="FILE", help=f"also write {what} as JSON")
    if png:
        parser.add_argument("--png", metavar="FILE", help=png)


def _command(sub: Any, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    """Subcommand ``name``, run by ``commands.run_<name>``, taking ``--debug`` too."""
    parser = sub.add_parser(name, help=help, description=description or help)
    # SUPPRESS: absent here, the top level's value stands (``normkit --debug check`` works too)
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error")
    parser.set_defaults(run=name, subparser=parser)
    return parser


def _version() -> str:
    import platform

    import torch

    from .. import __version__

    return f"normkit {__version__} (torch {torch.__version__}, Python {platform.python_version()})"


class _VersionAction(argparse.Action):
    """``--version``, with torch's version read only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        print(_version())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normkit", description="normkit: normalization layers for PyTorch")
    parser.add_argument("--version", action=_VersionAction, help="print normkit's, torch's and Python's versions")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{check,explain,bench,compare,support}")
    check = _command(sub, "check", "check every module and backend against its oracle (torch.nn, or the float64 "
                                   "reference where torch has no twin)")
    check.add_argument("--op", action="append",
                       help="only cases whose name contains this, ignoring case, spaces, _ and - (so a norm's "
                            "name, scale_norm, selects ScaleNorm), or whose functional op it is (repeatable)")
    check.add_argument("--backend", action="append", help="only this backend (repeatable)")
    check.add_argument("--dtype", action="append", choices=["float64", "float32", "bfloat16", "float16"],
                       help="only this dtype (repeatable)")
    check.add_argument("--compile", action="store_true",
                       help="also run every module under torch.compile and compare it with eager (outputs, "
                            "gradients, running statistics)")
    check.add_argument("--compile-backend", default="inductor", metavar="NAME",
                       help="torch.compile's backend for --compile (default inductor; aot_eager is quicker)")
    _outputs(check, "the results")

    explain = _command(
        sub, "explain", "what each norm reduces, keeps and computes; --seed replays the tutorials' examples",
        "For each norm of normkit.norms.NORMS: the axes reduced and kept, the number of statistics for --shape "
        "and the elements each covers, the formula, parameters, train vs eval; all computed by running the norm. "
        "--seed replays the worked examples of the five tutorials, each step next to torch's numbers.")
    explain.add_argument("name", nargs="?", type=_norm_name,
                         help="only this norm: batch_norm, BatchNorm, bn, layer_norm, ln, group_norm, gn, "
                              "modulated_layer_norm, gated_rms_norm, dyt, ...")
    explain.add_argument("--shape", type=_explain_shape, default=(4, 6, 3, 3), metavar="N,C,H,W",
                         help="input shape (N, C, *spatial), 1 to 3 spatial axes (default 4,6,3,3)")
    explain.add_argument("--groups", type=int, metavar="G",
                         help="GroupNorm's number of groups (default: smallest divisor of C above 1); for a norm "
                              "grouping the last dim (gated_rms_norm) its groups there (default: smallest divisor "
                              "of the last dim above 1)")
    explain.add_argument("--normalized-ndim", type=int, metavar="K",
                         help="the trailing-axis norms normalize the last K axes where their row does not fix "
                              "it (default: all but N, as in Wu & He)")
    explain.add_argument("--seed", action="store_true",
                         help="replay the tutorials' worked examples step by step, next to torch's numbers")
    explain.add_argument("--lang", choices=["en", "zh"], default="en",
                         help="en (default), or zh: the tutorials' own Chinese terms beside the English ones")
    _outputs(explain, "the numbers", "draw the N x C x (H, W) cube of each norm, reduced set shaded")

    bench = _command(sub, "bench", "time each norm per provider, interleaved: ms (median and spread), GB/s, speedups "
                                   "only outside the spread; table, JSON, PNG")
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
    bench.add_argument("--direction", action="append", choices=["infer", "fwd", "bwd", "fwd+bwd"],
                       help="(repeatable; default fwd on the CPU, all four on a GPU)")
    bench.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    bench.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    bench.add_argument("--threads", type=_int_list, metavar="T[,T...]",
                       help="CPU thread counts, each a run of its own "
                            "(default 1: steadier timings on a shared machine)")
    bench.add_argument("--repeats", type=int, default=5, metavar="K",
                       help="interleaved samples per measurement: the median and the spread (min-max) come from them")
    bench.add_argument("--budget", type=float, default=0.2, metavar="S",
                       help="seconds of timing per measurement, over all its repeats")
    bench.add_argument("--compile-budget", type=float, default=60.0, metavar="S",
                       help="stop compiling once torch.compile has taken this long in all; the rest is an error row")
    _outputs(bench, "the results", "plot GB/s against width per provider")

    compare = _command(
        sub, "compare", "train a small CNN per norm and batch size (Wu & He 2018, Fig. 1)",
        "Train a small CNN on scikit-learn's 8x8 digits (or --data) once per norm, batch size and seed, the same "
        "number of samples each with the learning rate scaled with the batch; report validation accuracy and "
        "whether BatchNorm degrades at small batches while GroupNorm does not (Wu & He 2018, Fig. 1).")
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

    support = _command(
        sub, "support", "what each backend runs: ops x calls x dtypes x devices",
        "The support matrix (normkit.support_matrix()): for each op and representative call, "
        "the dtypes each backend runs, from the backends' own checks, without computing anything. "
        "The cells are the same on every machine; the last lines say which backends this one has.")
    support.add_argument("--markdown", action="store_true", help="print the README's markdown table instead")
    _outputs(support, "every cell")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns the exit status
    (argparse's own errors, ``--help`` and ``--version`` exit through SystemExit)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # what was asked for, recorded with results
    from . import commands

    run: Callable[[argparse.Namespace], int] = getattr(commands, f"run_{args.run}")
    try:
        return run(args)
    except UsageError as exc:
        if args.debug:
            raise
        args.subparser.error(str(exc))  # the subcommand's usage and the message; exits with 2
        raise  # unreachable: for type checkers
    except KeyboardInterrupt:
        print(f"normkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (normkit explain | head): not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    except Exception as exc:
        if args.debug:
            raise
        text = str(exc).splitlines()[0] if str(exc) else ""
        print(f"normkit {args.command}: error: {type(exc).__name__}: {text} "
              "(run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
