"""Console progress: the line a piped run prints, and when it prints it."""

from __future__ import annotations

import io

from medray.progress import Progress, eta_text, progress_line


def test_progress_line_and_eta():
    assert eta_text(42) == "42s" and eta_text(185) == "3m05s" and eta_text(3720) == "1h02m"
    line = progress_line("embed", 1024, 5030, 20.0, "images")
    assert line == "embed: 1,024/5,030 images (20%), 51.2 images/s, ETA 1m18s"
    slow = progress_line("heads label", 1, 8, 42.0, "settings")
    assert slow == "heads label: 1/8 settings (12%), 42s each, ETA 4m54s"
    assert progress_line("embed", 0, 10, 0.0, "images").endswith("ETA ?")


def test_piped_progress_prints_a_line_per_interval():
    out = io.StringIO()  # not a TTY: lines, no live bar
    with Progress("embed", 10, "images", every_s=0.0, stream=out) as p:
        p.advance(4)
        p.advance(6)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[-1].startswith("embed: 10/10 images (100%)")
    quiet = io.StringIO()
    with Progress("embed", 10, "images", every_s=3600, stream=quiet) as p:
        p.advance(10)
    assert quiet.getvalue() == ""  # nothing before the first interval has passed
