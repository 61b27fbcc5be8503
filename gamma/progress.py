"""Progress display shared by long steps (rich on a terminal, quiet lines otherwise)."""

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
