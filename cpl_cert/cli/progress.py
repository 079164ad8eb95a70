"""What a command is doing now, on stderr: a live Rich line on a terminal, plain lines at an interval otherwise.

On a terminal each line shows a spinner, what is being done, a bar, the count, the elapsed time and
the time left. When stderr is not a terminal (nohup, CI, a job scheduler) the same facts are written
as one plain line every ``$CPL_CERT_PROGRESS_SECONDS`` seconds (default 20), from a background
thread, so that a log shows life even while one long library call runs.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, Task, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Column
from rich.text import Text

DEFAULT_INTERVAL = 20.0


def plain_interval() -> float:
    """Seconds between two plain progress lines: ``$CPL_CERT_PROGRESS_SECONDS`` or 20."""
    try:
        return max(float(os.environ.get("CPL_CERT_PROGRESS_SECONDS", DEFAULT_INTERVAL)), 0.05)
    except ValueError:
        return DEFAULT_INTERVAL


def clock(seconds: float | None) -> str:
    """``H:MM:SS`` (``-:--:--`` when unknown)."""
    if seconds is None or seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "-:--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


@dataclass
class Line:
    """One line of progress: what, how far (``done`` of ``total``; no total: unknown length), since when."""

    description: str
    total: float | None = None
    done: float = 0.0
    started: float = field(default_factory=time.monotonic)
    count: str | None = None
    finish_at: float | None = None
    """A known finishing time (``time.monotonic``), when the caller estimates better than the average rate;
    ``inf`` when the caller knows that it cannot tell."""

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def remaining(self) -> float | None:
        """Seconds left: from ``finish_at``, else from the average rate since the line started."""
        if self.finish_at is not None:
            return None if math.isinf(self.finish_at) else max(self.finish_at - time.monotonic(), 0.0)
        if not self.total or self.done <= 0:
            return None
        return self.elapsed() * (self.total - self.done) / self.done

    def count_text(self) -> str:
        if self.count is not None:
            return self.count
        return f"{self.done:,.0f}/{self.total:,.0f}" if self.total else ""

    def plain(self) -> str:
        """The line as text for a log."""
        amount = f" {self.count_text()} ({100 * self.done / self.total:.0f} %)" if self.total else (f" {self.count}" if self.count else "")
        left = self.remaining()
        return f"{self.description}:{amount} {clock(self.elapsed())} elapsed" + (f", about {clock(left)} left" if left is not None else "")


class _CountColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        line: Line = task.fields["line"]
        return Text(line.count_text(), style="progress.download")


class _RemainingColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        left = task.fields["line"].remaining()
        return Text(f"{clock(left)} left" if left is not None else "", style="progress.remaining")


class Activity:
    """The progress lines of one command (a context manager); ``stage``/``update`` drive the main line."""

    def __init__(self, console: Console, out: Console | None = None, interval: float | None = None) -> None:
        self.console = console
        self.out = out or console
        self.interval = interval if interval is not None else plain_interval()
        self.lines: dict[str, Line] = {}
        self._lock = threading.Lock()
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Activity:
        if self.console.is_terminal:
            fixed = {"table_column": Column(no_wrap=True)}
            self._progress = Progress(
                SpinnerColumn(), TextColumn("{task.description}", table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis")),
                BarColumn(bar_width=20), _CountColumn(**fixed), TimeElapsedColumn(**fixed), _RemainingColumn(**fixed),
                console=self.console, transient=True, refresh_per_second=4, redirect_stdout=False, redirect_stderr=False,
            )
            self._progress.start()
        else:
            self._thread = threading.Thread(target=self._write_plain, name="cpl-cert-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._progress is not None:
            self._progress.stop()
        if self._thread is not None:
            self._thread.join(timeout=1.0)

    def stage(self, description: str, total: float | None = None, key: str = "stage") -> None:
        """Start a new stage on line ``key`` (its clock restarts); the line keeps its place among the others."""
        with self._lock:
            self.lines[key] = Line(description, total)
            if self._progress is None:
                return
            if key not in self._tasks:
                self._tasks[key] = self._progress.add_task(description, total=total, line=self.lines[key])
                return
            task_id = self._tasks[key]
            self._progress.reset(task_id, description=description, line=self.lines[key])
            next(task for task in self._progress.tasks if task.id == task_id).total = total  # reset keeps an old total

    def update(self, done: float, total: float | None = None, description: str | None = None, key: str = "stage", **extra: Any) -> None:
        """Move line ``key`` to ``done`` (and ``total``, ``description``, ``count`` text or ``finish_at`` when given)."""
        with self._lock:
            line = self.lines.get(key)
            if line is None:
                return
            line.done = done
            line.total = total if total is not None else line.total
            line.description = description or line.description
            for name, value in extra.items():
                setattr(line, name, value)
            if self._progress is not None:
                self._progress.update(self._tasks[key], completed=done, total=line.total, description=line.description)

    def remove(self, key: str) -> None:
        """Take line ``key`` away."""
        with self._lock:
            self.lines.pop(key, None)
            if self._progress is not None and key in self._tasks:
                self._progress.remove_task(self._tasks.pop(key))

    def reporter(self, labels: dict[str, str], key: str = "stage") -> Callable[[str, float, float], None]:
        """A library ``on_progress(stage, done, total)`` for line ``key``: a new stage starts a new count."""
        current: list[str] = []

        def on_progress(stage: str, done: float, total: float) -> None:
            if current != [stage]:
                current[:] = [stage]
                self.stage(labels.get(stage, stage), total or None, key=key)
            self.update(done, total or None, key=key)

        return on_progress

    def print(self, *objects: Any, **kwargs: Any) -> None:
        """Print results on ``out``; above the live lines when both are the terminal (so that neither garbles the other)."""
        if self._progress is not None and self.out.is_terminal:
            self._progress.console.print(*objects, **kwargs)
        else:
            self.out.print(*objects, **kwargs)

    def _write_plain(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                text = "\n".join(line.plain() for line in self.lines.values())
            if text:
                self.console.print(text, highlight=False, markup=False, soft_wrap=True)
