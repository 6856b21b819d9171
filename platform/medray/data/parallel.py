"""A thread pool with a progress bar for people at a terminal and silence in CI.

Import reads and decodes files: I/O and PIL/zlib release the GIL, so threads are enough
and no Ray cluster is needed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from medray.raycluster import is_interactive

T = TypeVar("T")
R = TypeVar("R")


@contextlib.contextmanager
def progress(total: int, description: str) -> Iterator[Callable[[int], None]]:
    """Yields `advance(n=1)`; draws a rich bar only when stderr is a terminal outside CI."""
    if total <= 0 or not is_interactive():
        yield lambda n=1: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


def thread_map(
    fn: Callable[[T], R], items: Sequence[T] | Iterable[T], workers: int, description: str
) -> list[R]:
    """`[fn(x) for x in items]` on `workers` threads, in order, with a progress bar."""
    items = list(items)
    with progress(len(items), description) as advance:
        if workers <= 1 or len(items) <= 1:
            out = []
            for item in items:
                out.append(fn(item))
                advance(1)
            return out
        with ThreadPoolExecutor(max_workers=workers) as pool:
            out = []
            for result in pool.map(fn, items):
                out.append(result)
                advance(1)
            return out
