"""A rich progress bar for long loops: step counter, live metrics, elapsed time and ETA.

When stderr is not a terminal (CI, ``nohup``), rich draws nothing live; a plain line is printed
every ``log_every_s`` seconds instead so logs still show progress.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class _Bar:
    def __init__(self, progress: Any, task: Any, description: str, total: int, log_every_s: float) -> None:
        self._progress, self._task = progress, task
        self._description, self._total = description, total
        self._log_every_s = log_every_s
        self._last_line = time.monotonic()

    def update(self, completed: int, **metrics: float) -> None:
        shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        self._progress.update(self._task, completed=completed, metrics=shown)
        if not self._progress.console.is_terminal and time.monotonic() - self._last_line >= self._log_every_s:
            self._last_line = time.monotonic()
            print(f"{self._description}: {completed}/{self._total}  {shown}", file=sys.stderr, flush=True)


@contextmanager
def progress_bar(description: str, total: int, completed: int = 0, log_every_s: float = 30.0) -> Iterator[_Bar]:
    """``with progress_bar("grpo", total=100) as bar: bar.update(step, reward=0.5)``."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[metrics]}"),
        console=console,
        transient=False,
    )
    with progress:
        task = progress.add_task(description, total=total, completed=completed, metrics="")
        yield _Bar(progress, task, description, total, log_every_s)
