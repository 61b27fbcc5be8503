"""Console output: progress of long steps (rich on a terminal, quiet lines otherwise) and the
one formatter of result tables (printed, or as markdown for the tracking store)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
_QUIET = os.environ.get("GAMMA_QUIET") == "1"


def set_quiet(quiet: bool) -> None:
    """Silence progress output (e.g. in every data-parallel process but the main one)."""
    global _QUIET
    _QUIET = quiet


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar; falls back to start/end lines when stderr is not a terminal."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if _QUIET:
        yield from items
        return
    if not sys.stderr.isatty():  # a log, or a pipe a launcher streams: a line every tenth of the way
        t0 = time.perf_counter()
        console.print(f"{description} ...")
        every = max(1, (total or 0) // 10)
        for i, item in enumerate(items, 1):
            yield item
            if total and total >= 10 and i % every == 0 and i < total:
                console.print(f"{description}: {i}/{total} after {time.perf_counter() - t0:.1f}s")
        console.print(f"{description}: done in {time.perf_counter() - t0:.1f}s")
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner (or one line) around a step that has no natural count."""
    t0 = time.perf_counter()
    if _QUIET:
        yield
        return
    if sys.stderr.isatty():
        with console.status(message):
            yield
    else:
        console.print(f"{message} ...")
        yield
    console.print(f"{message}: done in {time.perf_counter() - t0:.1f}s")


RESULT_COLUMNS = ["method", "avg_bits", "effective_bits", "total_bytes", "checkpoint_bytes", "perplexity",
                  "perplexity_se", "kl_divergence", "zero_shot", "zero_shot_se", "quantize_seconds", "eval_seconds"]


def cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str("" if value is None else value)


def print_table(rows: list[dict], title: str, columns: list[str] | None = None) -> None:
    """Result rows as a table on the console (``columns``: default ``RESULT_COLUMNS``)."""
    from rich.table import Table

    columns = columns or RESULT_COLUMNS
    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(*[cell(r.get(c)) for c in columns])
    console.print(t)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
