"""Progress of a long command: a bar on a terminal, periodic log lines when output goes elsewhere.

A command that works through many items (posts to embed, batches to train on, queries to
evaluate) wraps the work in :class:`ProgressReporter` and passes its :meth:`~ProgressReporter.update`
as the work's progress callback. On a terminal it draws a bar (done/total, rate, time left);
when the console is not a terminal (CI logs, ``nohup``, a pipe) a bar would print nothing
useful, so it logs one line every ``interval_s`` seconds and one at the end, through the
``postsim`` logger::

    embedding: 1200/5000 posts (24%), 41.3 posts/s, about 1 min 32 s left

Work that has more to say (the rate of each server a build is spread over) sets a
:meth:`~ProgressReporter.note`, shown after the bar and at the end of each line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

logger = logging.getLogger("postsim")

DEFAULT_INTERVAL_S = 10.0
"""Seconds between two progress lines when the console is not a terminal."""


def format_duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


class ProgressReporter:
    """Shows how far one long task is: call :meth:`update` with (done, total) as the work advances.

    Use it as a context manager: the terminal bar (drawn from the first update on) is removed
    when the task completes or the block ends. Rate and time left are measured from the first
    update, so work that starts late in the block (after an export, say) reports ``update(0, total)``
    when it begins. ``clock`` measures rate and intervals (tests give a fake one).
    """

    def __init__(
        self,
        description: str,
        *,
        console: Console,
        unit: str = "items",
        interval_s: float = DEFAULT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.description = description
        self.unit = unit
        self.interval_s = interval_s
        self._console = console
        self._clock = clock
        self._started: float | None = None
        self._last_line: float | None = None
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        self._note = ""

    @property
    def on_terminal(self) -> bool:
        return self._console.is_terminal

    def __enter__(self) -> ProgressReporter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def note(self, text: str) -> None:
        """Show ``text`` with the progress from the next update on (after the bar; at the end of each line)."""
        self._note = text

    def update(self, done: int, total: int) -> None:
        """``done`` of ``total`` items are finished."""
        now = self._clock()
        if self._started is None:
            self._started = now
        elapsed = now - self._started
        rate = done / elapsed if elapsed > 0 else 0.0
        if self.on_terminal:
            self._draw(done, total, rate)
            return
        finished = done >= total
        since = now - (self._last_line if self._last_line is not None else self._started)
        if finished or since >= self.interval_s:
            self._last_line = now
            logger.info("%s", self.line(done, total, rate=rate, elapsed_s=elapsed))

    def line(self, done: int, total: int, *, rate: float, elapsed_s: float) -> str:
        """The log line for this point: done/total, percentage, rate, and time left (or taken, at the end)."""
        percent = f" ({100 * done / total:.0f}%)" if total > 0 else ""
        text = f"{self.description}: {done}/{total} {self.unit}{percent}, {rate:.1f} {self.unit}/s"
        if done >= total:
            text = f"{text}, done in {format_duration(elapsed_s)}"
        elif rate > 0:
            text = f"{text}, about {format_duration((total - done) / rate)} left"
        return f"{text}; {self._note}" if self._note else text

    def _draw(self, done: int, total: int, rate: float) -> None:
        if self._bar is None:
            self._bar = Progress(
                TextColumn(self.description),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(f"{{task.fields[rate]:.1f}} {self.unit}/s"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[note]}"),
                console=self._console,
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=total, rate=0.0, note="")
        assert self._task is not None
        self._bar.update(self._task, completed=done, total=total, rate=rate, note=self._note)
        if done >= total:
            self.close()  # the work goes on to other steps: their output should not scroll under a full bar
