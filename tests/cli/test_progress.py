"""The CLI's progress reporter: a bar on a terminal, periodic log lines otherwise."""

from __future__ import annotations

import io
import logging

import pytest
from rich.console import Console

from postsim.cli.progress import ProgressReporter, format_duration


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "postsim"]


def test_without_a_terminal_it_logs_every_interval_and_at_the_end(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    console = Console(file=io.StringIO(), force_terminal=False)
    reporter = ProgressReporter("embedding", console=console, unit="posts", interval_s=10, clock=clock)
    with caplog.at_level(logging.INFO, logger="postsim"), reporter as progress:
        clock.now += 600  # other work first: the rate counts from the first update
        progress.update(0, 200)
        for done in range(8, 201, 8):  # 25 updates, one every 2 s: 50 s in all
            clock.now += 2
            progress.update(done, 200)
    lines = _lines(caplog)
    assert len(lines) == 5, lines  # at 10, 20, 30, 40 s, and the end
    assert lines[0] == "embedding: 40/200 posts (20%), 4.0 posts/s, about 40 s left"
    assert lines[-1] == "embedding: 200/200 posts (100%), 4.0 posts/s, done in 50 s"
    assert console.file.getvalue() == ""  # type: ignore[attr-defined]


def test_on_a_terminal_it_draws_a_bar_and_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    reporter = ProgressReporter("embedding", console=console, unit="posts")
    with caplog.at_level(logging.INFO, logger="postsim"), reporter as progress:
        progress.update(3, 10)
        progress.update(10, 10)
    assert _lines(caplog) == []
    assert "embedding" in console.file.getvalue()  # type: ignore[attr-defined]


def test_a_note_ends_each_later_line_and_follows_the_bar(caplog: pytest.LogCaptureFixture) -> None:
    """What several servers' rates look like: the note set before an update is on that update's line."""
    clock = FakeClock()
    console = Console(file=io.StringIO(), force_terminal=False)
    reporter = ProgressReporter("embedding", console=console, unit="posts", interval_s=10, clock=clock)
    with caplog.at_level(logging.INFO, logger="postsim"), reporter as progress:
        progress.update(0, 20)
        clock.now += 10
        progress.note("a:8001 1.0/s, b:8001 failed; 2 batches moved")
        progress.update(10, 20)
        clock.now += 10
        progress.note("a:8001 1.0/s, b:8001 failed; 3 batches moved")
        progress.update(20, 20)
    assert _lines(caplog) == [
        "embedding: 10/20 posts (50%), 1.0 posts/s, about 10 s left; a:8001 1.0/s, b:8001 failed; 2 batches moved",
        "embedding: 20/20 posts (100%), 1.0 posts/s, done in 20 s; a:8001 1.0/s, b:8001 failed; 3 batches moved",
    ]

    terminal = Console(file=io.StringIO(), force_terminal=True, width=200)
    with ProgressReporter("embedding", console=terminal, unit="posts") as progress:
        progress.note("a:8001 12.5/s")
        progress.update(3, 10)
    assert "a:8001 12.5/s" in terminal.file.getvalue()  # type: ignore[attr-defined]  # drawn when the bar stops


def test_durations_read_as_a_person_would_say_them() -> None:
    assert [format_duration(s) for s in (0.4, 42, 185, 7620)] == ["0 s", "42 s", "3 min 05 s", "2 h 07 min"]
