"""Batches of posts spread over several servers: bounded concurrency per server, failover, each batch once.

``postsim index build`` and ``index upsert`` take ``--url`` several times (one per replica,
say). :func:`open_servers` first asks every server which weights it serves and refuses a mix,
before anything is sent. :func:`spread` then hands the batches out from one queue, in corpus
order, to ``concurrency`` workers per server, so a faster server takes more of them. A server
that fails (unreachable, UNAVAILABLE, a deadline, any error that is not the post's fault) is
dropped for the rest of the run with a warning that names it, and each of its unfinished
batches goes back to the front of the queue for the others. A batch's answer is kept once,
under the batch's place in the corpus, whichever server gave it: no post is lost or
duplicated, and the results come back in corpus order. A post the server refuses as invalid
(``InvalidPostError``) is the caller's to report: the ``send`` functions handle it, and the
scheduler never sends it elsewhere.

When every server is gone before every batch is done, :func:`spread` raises
:class:`~postsim.core.errors.ServerUnavailableError` saying how many posts were done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from postsim.client.api import AsyncPostSimClient
from postsim.client.posts import ServedRepository
from postsim.core.errors import InvalidPostError, PostSimError, SearchIndexError, ServerUnavailableError
from postsim.model_repository.contract import RetrievalBackend

logger = logging.getLogger("postsim")

_T = TypeVar("_T")
_R = TypeVar("_R")

ProgressCallback = Callable[[int, int], None]
"""Called with (posts done, posts in all) as batches complete."""


@dataclass(kw_only=True)
class ServerLoad:
    """What one server did during a run; updated as it goes."""

    url: str
    started: float = field(default_factory=time.monotonic)
    posts: int = 0
    """Posts of the batches this server answered (refused posts included)."""
    batches: int = 0
    ended: float | None = None
    """When it was dropped, or when the run ended."""
    error: str | None = None
    """Why it was dropped; None while it serves."""
    moved: int = 0
    """Its batches that went to other servers after it failed."""

    def posts_per_second(self, now: float | None = None) -> float:
        end = self.ended if self.ended is not None else (now if now is not None else time.monotonic())
        elapsed = end - self.started
        return self.posts / elapsed if elapsed > 0 else 0.0

    def describe(self) -> str:
        """``host:8001: 120 posts in 15 batch(es), 8.1 posts/s`` (and why it was dropped)."""
        text = f"{self.url}: {self.posts} posts in {self.batches} batch(es), {self.posts_per_second():.1f} posts/s"
        if self.error is not None:
            text += f"; failed ({self.error}), {self.moved} of its batch(es) went to the other servers"
        return text


@dataclass(frozen=True)
class SpreadReport:
    servers: tuple[ServerLoad, ...]

    @property
    def moved(self) -> int:
        """Batches sent again to another server after the one they were sent to failed."""
        return sum(server.moved for server in self.servers)

    def lines(self) -> list[str]:
        """One line per server, then the batches moved: what the commands print after a run over several servers."""
        return [server.describe() for server in self.servers] + [
            f"{self.moved} batch(es) moved to another server after a failure"
        ]


def progress_note(servers: Sequence[ServerLoad]) -> str:
    """Per-server rates for a progress line: ``a:8001 12.0/s, b:8001 failed; 3 batches moved``."""
    now = time.monotonic()
    rates = ", ".join(
        f"{server.url} {'failed' if server.error is not None else f'{server.posts_per_second(now):.1f}/s'}"
        for server in servers
    )
    moved = sum(server.moved for server in servers)
    return f"{rates}; {moved} batches moved" if moved else rates


ServersCallback = Callable[[Sequence[ServerLoad]], None]
"""Called with every server's load each time a batch completes or a server is dropped, before the progress callback."""


async def spread(
    batches: Sequence[Sequence[_T]],
    senders: Sequence[tuple[str, Callable[[Sequence[_T]], Awaitable[_R]]]],
    *,
    concurrency: int,
    on_progress: ProgressCallback | None = None,
    on_servers: ServersCallback | None = None,
    stop: asyncio.Event | None = None,
    done_word: str = "done",
) -> tuple[list[_R | None], SpreadReport]:
    """Send every batch once through one of ``senders`` ((url, send) pairs), ``concurrency`` at a time per server.

    Returns each batch's answer in the order of ``batches`` (None for a batch not sent
    because ``stop`` was set: once it is, no batch is sent and those in flight finish) and
    what each server did. A send that raises a :class:`PostSimError` other than
    :class:`InvalidPostError` drops its server and puts the batch back for the others; one
    that raises :class:`InvalidPostError` stops the run as ``stop`` does, and the error is
    raised once the batches in flight are done.
    ``done_word`` words the error when every server is gone (``embedded``, ``upserted``).
    """
    if concurrency < 1:
        raise SearchIndexError(f"concurrency must be at least 1, got {concurrency}")
    if not senders:
        raise SearchIndexError("no server to send the posts to: name at least one with --url")
    total = sum(len(batch) for batch in batches)
    run: _Run[_T, _R] = _Run(batches, [ServerLoad(url=url) for url, _ in senders], on_progress, on_servers, stop)
    if on_progress is not None:
        on_progress(0, total)  # starts the clock of whoever shows progress
    watcher = asyncio.ensure_future(run.wake_on_stop())
    try:
        await asyncio.gather(
            *(
                run.work(load, send)
                for load, (_, send) in zip(run.servers, senders, strict=True)
                for _ in range(concurrency)
            )
        )
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    end = time.monotonic()
    for load in run.servers:
        if load.ended is None:
            load.ended = end
    if run.refused is not None:
        raise run.refused
    report = SpreadReport(tuple(run.servers))
    missing = [index for index, result in enumerate(run.results) if result is _MISSING]
    if missing and not run.stopped:
        done = total - sum(len(batches[index]) for index in missing)
        reasons = "; ".join(f"{load.url}: {load.error}" for load in run.servers)
        who, them = ("every server", "them") if len(run.servers) > 1 else ("the server", "it")
        raise ServerUnavailableError(
            f"{who} failed ({reasons}) after {done} of {total} posts were {done_word}: start {them} again, "
            "or name servers that answer with --url, and run the command again"
        )
    return [None if result is _MISSING else result for result in run.results], report  # type: ignore[misc]


_MISSING = object()


class _Run(Generic[_T, _R]):
    """The shared state of one :func:`spread`: the queue of batch numbers, the answers, the servers."""

    def __init__(
        self,
        batches: Sequence[Sequence[_T]],
        servers: list[ServerLoad],
        on_progress: ProgressCallback | None,
        on_servers: ServersCallback | None,
        stop: asyncio.Event | None,
    ) -> None:
        self.batches = batches
        self.servers = servers
        self.results: list[object] = [_MISSING] * len(batches)
        self.queue = deque(range(len(batches)))
        self.in_flight = 0
        self.done_posts = 0
        self.total = sum(len(batch) for batch in batches)
        self.changed = asyncio.Condition()
        self.on_progress = on_progress
        self.on_servers = on_servers
        self.stop = stop
        self.refused: InvalidPostError | None = None

    @property
    def stopped(self) -> bool:
        """Ctrl-C, or a batch refused as invalid: send nothing more, let what is in flight finish."""
        return self.refused is not None or (self.stop is not None and self.stop.is_set())

    async def wake_on_stop(self) -> None:
        if self.stop is None:
            return
        await self.stop.wait()
        async with self.changed:
            self.changed.notify_all()

    async def work(self, load: ServerLoad, send: Callable[[Sequence[_T]], Awaitable[_R]]) -> None:
        """One of a server's workers: take the next batch, send it, keep the answer; stop when its server fails."""
        while load.error is None and not self.stopped:
            if not self.queue:
                if self.in_flight == 0:
                    return  # every batch is answered (or no server is left to answer the rest)
                async with self.changed:
                    await self.changed.wait()  # a batch in flight elsewhere may come back
                continue
            index = self.queue.popleft()
            batch = self.batches[index]
            self.in_flight += 1
            try:
                answer = await send(batch)
            except InvalidPostError as error:  # the posts' fault, not the server's: no other server is tried
                self.in_flight -= 1
                self.refused = self.refused or error
                await self._notify()
                return
            except PostSimError as error:
                self.in_flight -= 1
                self.queue.appendleft(index)
                load.moved += 1
                if load.error is None:
                    self._drop(load, error)
                await self._notify()
                return
            self.in_flight -= 1
            self.results[index] = answer
            load.batches += 1
            load.posts += len(batch)
            self.done_posts += len(batch)
            self._report()
            await self._notify()

    def _drop(self, load: ServerLoad, error: PostSimError) -> None:
        load.error = str(error)
        load.ended = time.monotonic()
        left = sum(1 for server in self.servers if server.error is None)
        where = f"the {left} other server(s)" if left else "no other server: none is left"
        logger.warning("server %s failed and is dropped; its unfinished batches go to %s: %s", load.url, where, error)
        self._report()

    def _report(self) -> None:
        if self.on_servers is not None:
            self.on_servers(self.servers)
        if self.on_progress is not None:
            self.on_progress(self.done_posts, self.total)

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()


def check_same_encoders(served: Sequence[tuple[str, ServedRepository]]) -> str:
    """The weights fingerprint every server serves; SearchIndexError naming the servers unless they agree."""
    for url, info in served:
        if not info.fingerprint:
            raise SearchIndexError(
                f"the server at {url} does not say which weights it serves (no postsim_fingerprint "
                "in post_embedding's config): export the repository again with this version of postsim"
            )
    groups: dict[str, list[str]] = {}
    for url, info in served:
        groups.setdefault(str(info.fingerprint), []).append(url)
    if len(groups) > 1:
        described = "; ".join(
            f"{', '.join(urls)} serve(s) weights {fingerprint}" for fingerprint, urls in groups.items()
        )
        raise SearchIndexError(
            f"the servers do not serve the same encoders ({described}), and posts embedded by different encoders "
            "cannot share an index: name only servers started on the same export with --url"
        )
    (fingerprint,) = groups
    return fingerprint


SHARED_INDEX_NEEDED = (
    "an upsert spread over several servers needs them to share one index (exported with `--retrieval milvus` "
    "and the same --milvus-uri)"
)


async def check_shared_index(clients: Sequence[AsyncPostSimClient]) -> None:
    """SearchIndexError unless every server keeps its posts in the same Milvus: changes sent to one then reach all.

    A server with its own FAISS index would keep only the posts sent to it, so each post would be
    in one replica's index and missing from the others'.
    """
    answers = await asyncio.gather(*(client.served_retrieval() for client in clients), return_exceptions=True)
    milvus_uris: dict[str, list[str]] = {}
    for client, answer in zip(clients, answers, strict=True):
        if isinstance(answer, PostSimError):
            raise SearchIndexError(f"{SHARED_INDEX_NEEDED}; the server at {client.url} does not say: {answer}")
        if isinstance(answer, BaseException):
            raise answer
        if answer.backend is not RetrievalBackend.MILVUS:
            raise SearchIndexError(
                f"{SHARED_INDEX_NEEDED}; the server at {client.url} keeps its own FAISS index, which would get only "
                "the posts sent to it: upsert into each such server with its own --url, one command per server"
            )
        milvus_uris.setdefault(answer.milvus_uri, []).append(client.url)
    if len(milvus_uris) > 1:
        described = "; ".join(f"{', '.join(urls)} use(s) {uri}" for uri, urls in milvus_uris.items())
        raise SearchIndexError(f"{SHARED_INDEX_NEEDED}; these servers use different Milvus: {described}")


def check_distinct_urls(urls: Sequence[str], hint: str) -> None:
    """SearchIndexError naming the servers that ``urls`` (the --url options) name more than once; ``hint`` says why."""
    repeated = sorted({url for url in urls if urls.count(url) > 1})
    if repeated:
        raise SearchIndexError(f"--url names {', '.join(repeated)} more than once: name each server once ({hint})")


@contextlib.asynccontextmanager
async def open_servers(
    urls: Sequence[str], *, shrink_images: bool = False
) -> AsyncIterator[tuple[list[AsyncPostSimClient], str]]:
    """A client per URL (duplicates refused) and the weights fingerprint they all serve, checked before any post is sent.

    ``shrink_images``: the clients send images at the encoder's scale (the client's ``shrink_images``).

    Reads ``post_embedding``'s config, not the repository index: a server's admin key restricts the index.
    """
    if not urls:
        raise SearchIndexError("no server to send the posts to: name at least one with --url")
    check_distinct_urls(urls, "--concurrency sets the requests in flight per server")
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(AsyncPostSimClient(url, shrink_images=shrink_images)) for url in urls
        ]
        infos = await asyncio.gather(*(client.served_repository() for client in clients))
        fingerprint = check_same_encoders(list(zip(urls, infos, strict=True)))
        yield clients, fingerprint
