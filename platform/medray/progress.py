"""Progress of a long stage on the console: a live bar at a terminal, otherwise one line
every `every_s` seconds (done/total, rate, ETA), so a piped or logged run is never silent."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def eta_text(seconds: float) -> str:
    """`1h02m`, `3m05s`, `42s`."""
    s = int(max(0, seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def progress_line(label: str, done: int, total: int, elapsed: float, unit: str) -> str:
    """`embed: 1,024/5,030 images (20%), 45.2 images/s, ETA 1m28s`."""
    rate = done / elapsed if elapsed > 0 else 0.0
    pct = 100 * done / total if total else 100.0
    eta = eta_text((total - done) / rate) if rate > 0 else "?"
    # Slow units (a trial, an epoch) read better as time per unit than as 0.0 per second
    speed = f"{rate:.1f} {unit}/s" if rate >= 1 or not done else f"{eta_text(1 / rate)} each"
    return f"{label}: {done:,}/{total:,} {unit} ({pct:.0f}%), {speed}, ETA {eta}"


class Progress:
    """`with Progress("embed", total, "images") as p: ... p.advance(n)`."""

    def __init__(
        self, label: str, total: int, unit: str = "items", every_s: float = 10.0,
        stream: TextIO | None = None,
    ) -> None:  # fmt: skip
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.stream = stream or sys.stdout
        self.done, self.start, self.last = 0, time.perf_counter(), time.perf_counter()
        self.bar = None
        if self.stream.isatty() and total > 0:
            from rich.progress import Progress as Bar

            self.bar = Bar(*Bar.get_default_columns(), transient=True)
            self.task = self.bar.add_task(f"{label} ({unit})", total=total)

    def __enter__(self) -> Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)
            return
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        return progress_line(
            self.label, self.done, self.total, time.perf_counter() - self.start, self.unit
        )

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
