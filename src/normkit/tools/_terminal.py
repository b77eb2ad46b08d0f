"""What the command line prints with: tables (rich on a terminal, aligned plain text when
piped), progress, JSON files, text wrapped to the terminal, and the errors a user can fix
(:class:`UsageError`, exit status 2; :func:`require`, a missing extra named before any work)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
import sys
import textwrap
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = ["UsageError", "print_table", "progress", "require", "terminal_width", "width_of", "wrap", "write_json"]


class UsageError(Exception):
    """Arguments that parse but do not fit together: reported like argparse's errors (exit 2)."""


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], styles: Sequence[str | None]) -> None:
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
    widths = [max(width_of(h), *(width_of(r[i]) for r in rows)) if rows else width_of(h) for i, h in enumerate(headers)]
    # Wider than the terminal: narrow the widest column (its cells wrap) until it fits, but not
    # below its longest word (at most 10 columns of it), so that words break only if they must.
    room = terminal_width() - 2 * (len(widths) - 1)
    floors = [min(10, max(width_of(w) for cell in (h, *(r[i] for r in rows)) for w in cell.split() or [""]))
              for i, h in enumerate(headers)]
    while sum(widths) > room:
        narrowable = [i for i, w in enumerate(widths) if w > floors[i]]
        if not narrowable:
            break
        widest = max(narrowable, key=lambda i: widths[i])
        widths[widest] = max(floors[widest], widths[widest] - (sum(widths) - room))

    def lines(cells: Sequence[str]) -> list[str]:
        wrapped = [textwrap.wrap(c, w, break_long_words=True) or [""] if width_of(c) > w else [c]
                   for c, w in zip(cells, widths, strict=True)]
        return ["  ".join(col[k] + " " * (w - width_of(col[k])) if k < len(col) else " " * w
                          for col, w in zip(wrapped, widths)).rstrip()
                for k in range(max(len(col) for col in wrapped))]

    for row in (headers, *rows):
        print("\n".join(lines(row)))


def width_of(text: str) -> int:
    """Columns ``text`` takes in a terminal: CJK characters (explain's headers) take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


@contextlib.contextmanager
def progress(total: int, label: str, *, lines_when_piped: bool = True) -> Iterator[Callable[[str], None]]:
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


def write_json(path: str, payload: Any) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"wrote {path}")


def terminal_width() -> int:
    """Columns of the terminal (``COLUMNS`` when set), 100 when piped."""
    return max(40, shutil.get_terminal_size((100, 24)).columns)


def wrap(text: str, indent: str = "", *, width: int | None = None) -> str:
    """``text`` wrapped to the terminal width, continuation lines under ``indent``; a line that
    is only a token too long to break (a path, a formula) is left whole."""
    width = width or terminal_width()
    return "\n".join(textwrap.fill(line, width, initial_indent=indent if i else "", subsequent_indent=indent,
                                   break_long_words=False, break_on_hyphens=False) or line
                     for i, line in enumerate(text.splitlines() or [""]))


# Where each optional module comes from: the extra of normkit that installs it.
_EXTRAS = {"numpy": "cli", "matplotlib": "cli", "sklearn": "cli", "rich": "cli", "triton": "triton"}


def require(*modules: str, purpose: str) -> None:
    """Raise :class:`UsageError` naming the extra to install if any of ``modules`` is missing:
    called before the work that needs them, not after it."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        extras = sorted({_EXTRAS.get(m, "cli") for m in missing})
        raise UsageError(f"{purpose} needs {', '.join(missing)}, which is not installed: "
                         f"pip install \"normkit[{','.join(extras)}]\"")
