"""Progress bars for every wait of more than a few seconds, and the summary tables printed after the work.

Bars (tqdm) go to stderr and show only where someone watches: off when stderr is not a terminal (CI logs, pipes,
``2>file``), with an entry point's ``--quiet`` / ``quiet=true`` (:func:`set_quiet`), or with ``SIDNET_QUIET=1``.
Tables (rich) are for people; every entry point still writes its JSON report for machines, and ``--json`` puts
that JSON alone on stdout for a script.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

_QUIET = False


def set_quiet(quiet: bool) -> None:
    global _QUIET
    _QUIET = bool(quiet)


def is_quiet() -> bool:
    return _QUIET or os.environ.get("SIDNET_QUIET") == "1" or not sys.stderr.isatty()


def progress(iterable: Iterable | None = None, *, desc: str, total: int | None = None, unit: str = "it",
             leave: bool = False, enabled: bool = True, **kwargs: Any):  # fmt: skip
    """A tqdm bar on stderr, or a silent pass-through when :func:`is_quiet` or not ``enabled`` (e.g. a DDP rank
    other than 0)."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, dynamic_ncols=True,
                disable=is_quiet() or not enabled, **kwargs)  # fmt: skip


def fmt(value: Any) -> str:
    """Numbers as people read them: 4 significant digits, integers with thousands separators."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Render a table as text (rich when installed, aligned plain text otherwise)."""
    cells = [[fmt(c) for c in row] for row in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(c)) for c in col) for col in zip(columns, *cells, strict=True)]
        def line(r: Sequence[str]) -> str:
            cells = enumerate(zip(r, widths, strict=True))
            return "  ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in cells)

        return "\n".join([title, line(columns), *(line(r) for r in cells)])
    t = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    for r in cells:
        t.add_row(*r)
    console = Console(file=io.StringIO(), width=120, force_terminal=False, color_system=None)
    console.print(t)
    return console.file.getvalue().rstrip()


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, file=None) -> None:
    print(table(title, columns, rows), file=file or sys.stdout, flush=True)
