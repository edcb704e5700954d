"""The scheduler that spreads batches over servers, with fake servers: failover, each batch once, all servers gone."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

import pytest

from postsim.client.posts import ServedRepository
from postsim.core.errors import InvalidPostError, SearchIndexError, ServerError, ServerUnavailableError
from postsim.indexing.spread import ServerLoad, check_same_encoders, progress_note, spread

Send = Callable[[Sequence[int]], Awaitable[tuple[str, list[int]]]]


def fake_server(url: str, *, fails_after: int | None = None, error: Exception | None = None) -> tuple[str, Send]:
    """A server that answers (its url, the batch) and, after ``fails_after`` answers, raises ``error`` for good."""
    answered = 0

    async def send(batch: Sequence[int]) -> tuple[str, list[int]]:
        nonlocal answered
        await asyncio.sleep(0.001 * (1 + batch[0] % 3))  # interleave the servers and their workers
        if fails_after is not None and answered >= fails_after:
            raise error or ServerUnavailableError(f"cannot reach the postsim server at {url}", status="UNAVAILABLE")
        answered += 1
        return url, list(batch)

    return url, send


def batches_of(posts: int, size: int) -> list[list[int]]:
    return [list(range(start, min(start + size, posts))) for start in range(0, posts, size)]


def test_a_failing_server_s_batches_go_to_the_others_and_every_post_comes_back_once_in_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    batches = batches_of(100, 3)
    servers = [fake_server("a:1"), fake_server("b:1", fails_after=4), fake_server("c:1")]
    progress: list[tuple[int, int]] = []
    with caplog.at_level(logging.WARNING, logger="postsim"):
        answers, report = asyncio.run(
            spread(batches, servers, concurrency=3, on_progress=lambda done, total: progress.append((done, total)))
        )
    assert [answer[1] for answer in answers if answer is not None] == batches
    posts = [post for answer in answers if answer is not None for post in answer[1]]
    assert posts == list(range(100))  # none lost, none twice, corpus order
    loads = {load.url: load for load in report.servers}
    assert loads["b:1"].batches == 4 and loads["b:1"].error is not None
    assert loads["b:1"].moved >= 1 and report.moved == loads["b:1"].moved
    assert sum(load.posts for load in report.servers) == 100
    assert {answer[0] for answer in answers if answer is not None} == {"a:1", "b:1", "c:1"}
    assert progress[0] == (0, 100) and progress[-1] == (100, 100)
    assert any("b:1" in record.getMessage() and "dropped" in record.getMessage() for record in caplog.records)
    assert "b:1 failed" in progress_note(report.servers) and "batches moved" in progress_note(report.servers)
    assert report.lines()[-1] == f"{report.moved} batch(es) moved to another server after a failure"


def test_any_server_error_drops_the_server_but_an_invalid_post_stops_the_run_and_is_raised() -> None:
    batches = batches_of(30, 2)
    failing = fake_server("b:1", fails_after=1, error=ServerError("model 'post_embedding' is not loaded"))
    answers, report = asyncio.run(spread(batches, [fake_server("a:1"), failing], concurrency=2))
    assert [answer[1] for answer in answers if answer is not None] == batches
    assert report.servers[1].error == "model 'post_embedding' is not loaded"

    refusing = fake_server("b:1", fails_after=1, error=InvalidPostError("post 3 is bad"))
    with pytest.raises(InvalidPostError, match="post 3 is bad"):
        asyncio.run(spread(batches, [fake_server("a:1"), refusing], concurrency=2))


def test_when_every_server_is_gone_the_error_says_how_many_posts_were_done() -> None:
    batches = batches_of(40, 4)
    servers = [fake_server("a:1", fails_after=2), fake_server("b:1", fails_after=1)]
    with pytest.raises(ServerUnavailableError) as raised:
        asyncio.run(spread(batches, servers, concurrency=1, done_word="embedded"))
    message = str(raised.value)
    assert "every server failed" in message and "a:1: cannot reach" in message and "b:1: cannot reach" in message
    assert "after 12 of 40 posts were embedded" in message and "run the command again" in message


def test_a_stop_sends_nothing_more_and_leaves_the_rest_unanswered() -> None:
    batches = batches_of(50, 5)

    async def run() -> list[object]:
        stop = asyncio.Event()

        def on_progress(done: int, total: int) -> None:
            if done >= 10:
                stop.set()

        answers, _ = await spread(
            batches, [fake_server("a:1"), fake_server("b:1")], concurrency=1, on_progress=on_progress, stop=stop
        )
        return list(answers)

    answers = asyncio.run(run())
    assert answers[0] is not None and answers[-1] is None
    answered = [index for index, answer in enumerate(answers) if answer is not None]
    assert 2 <= len(answered) <= 4  # the two in flight when it was set finish; nothing is sent after


def test_servers_of_different_encoders_are_refused_by_name() -> None:
    same = ServedRepository(fingerprint="f1", repository_id="r")
    assert check_same_encoders([("a:1", same), ("b:1", same)]) == "f1"
    other = ServedRepository(fingerprint="f2", repository_id="r")
    with pytest.raises(SearchIndexError) as raised:
        check_same_encoders([("a:1", same), ("b:1", other), ("c:1", same)])
    assert "a:1, c:1 serve(s) weights f1" in str(raised.value) and "b:1 serve(s) weights f2" in str(raised.value)
    with pytest.raises(SearchIndexError, match="the server at b:1 does not say which weights"):
        check_same_encoders([("a:1", same), ("b:1", ServedRepository())])


def test_a_server_s_rate_is_its_posts_over_the_time_it_served() -> None:
    load = ServerLoad(url="a:1", started=10.0, posts=50, batches=5, ended=20.0)
    assert load.posts_per_second() == 5.0
    assert load.describe() == "a:1: 50 posts in 5 batch(es), 5.0 posts/s"
