"""``postsim index build``: embeds a JSONL corpus through the running server and writes a FAISS index.

Posts go to ``post_embedding`` in batches, several batches in flight at once per server;
with several servers the batches are spread over them, and a server that fails has its
batches sent to the others (:mod:`postsim.indexing.spread`). A batch the server refuses
as invalid is retried post by post on that server, so one bad post is reported by its id
and the others are indexed. Nothing is written until every post has been tried; the index
directory is then written atomically, so an interrupted build leaves the output as it was.
Ctrl-C stops sending and lets the requests in flight finish before the build stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from postsim.client.api import AsyncPostSimClient
from postsim.client.posts import EmbeddingResult
from postsim.client.settings import DEFAULT_URL
from postsim.core.errors import InvalidPostError, SearchIndexError
from postsim.corpus.posts import CorpusPost, read_posts
from postsim.indexing.build import build_index_dir, post_caption
from postsim.indexing.spread import ProgressCallback as ProgressCallback  # the commands import it from here
from postsim.indexing.spread import ServersCallback, SpreadReport, open_servers, spread
from postsim.model_repository.live_index.metadata import MetadataColumns
from postsim.model_repository.score_parts import UnimodalVectors
from postsim.model_repository.search_index import IndexManifest, IndexType

logger = logging.getLogger("postsim")


@dataclass(frozen=True, kw_only=True)
class CorpusIndexSettings:
    corpus: Path
    out_dir: Path
    url: str | tuple[str, ...] = DEFAULT_URL
    """The server, or several (the same encoders each) that the batches are spread over."""
    index_type: IndexType = IndexType.AUTO
    batch_size: int = 8
    concurrency: int = 4
    """Batches in flight at once, per server."""
    unimodal: bool = True
    """Keep each post's unimodal vectors and modality weights, which split its scores (``CONTRIBUTIONS``)."""
    shrink_images: bool = False
    """Send the images at the encoder's scale (the client's ``shrink_images``)."""

    @property
    def urls(self) -> tuple[str, ...]:
        return (self.url,) if isinstance(self.url, str) else self.url


@dataclass(frozen=True)
class FailedPost:
    id: str
    reason: str


@dataclass(frozen=True)
class CorpusIndexReport:
    index_dir: Path
    manifest: IndexManifest
    indexed: int
    failures: list[FailedPost]
    seconds: float
    spread: SpreadReport
    """What each server embedded, its posts/s, and the batches moved after a failure."""

    @property
    def posts_per_second(self) -> float:
        return (self.indexed + len(self.failures)) / self.seconds if self.seconds > 0 else 0.0


Embedded = list[tuple[str, EmbeddingResult]]
"""(post id, what the server answered for it), in corpus order."""


async def _embed_batch(client: AsyncPostSimClient, batch: list[CorpusPost]) -> tuple[Embedded, list[FailedPost]]:
    """Embed a batch; when the server refuses it, retry post by post to find the bad ones."""
    try:
        results = await client.embed([post.to_post() for post in batch])
        return [(post.id, result) for post, result in zip(batch, results, strict=True)], []
    except InvalidPostError:
        if len(batch) == 1:
            raise
    embedded: Embedded = []
    failed: list[FailedPost] = []
    for post in batch:
        try:
            (result,) = await client.embed([post.to_post()])
            embedded.append((post.id, result))
        except InvalidPostError as error:
            failed.append(FailedPost(post.id, str(error)))
    return embedded, failed


async def embed_corpus(
    posts: list[CorpusPost],
    client: AsyncPostSimClient | Sequence[AsyncPostSimClient],
    *,
    batch_size: int,
    concurrency: int,
    on_progress: ProgressCallback | None = None,
    stop: asyncio.Event | None = None,
) -> tuple[Embedded, list[FailedPost]]:
    """Every post's embedding and modality weights, in corpus order, and the posts the server refused.

    Once ``stop`` is set, no further batch is sent and the batches in flight finish.
    """
    embedded, failed, _ = await embed_spread(
        posts, client, batch_size=batch_size, concurrency=concurrency, on_progress=on_progress, stop=stop
    )
    return embedded, failed


async def embed_spread(
    posts: list[CorpusPost],
    clients: AsyncPostSimClient | Sequence[AsyncPostSimClient],
    *,
    batch_size: int,
    concurrency: int,
    on_progress: ProgressCallback | None = None,
    on_servers: ServersCallback | None = None,
    stop: asyncio.Event | None = None,
) -> tuple[Embedded, list[FailedPost], SpreadReport]:
    """:func:`embed_corpus` over one client per server, ``concurrency`` batches in flight on each, and what each did.

    A server that fails has its unfinished batches sent to the others; each post is embedded once.
    """
    if isinstance(clients, AsyncPostSimClient):
        clients = [clients]
    batches = [posts[start : start + batch_size] for start in range(0, len(posts), batch_size)]

    def sender(
        client: AsyncPostSimClient,
    ) -> Callable[[Sequence[CorpusPost]], Awaitable[tuple[Embedded, list[FailedPost]]]]:
        async def send(batch: Sequence[CorpusPost]) -> tuple[Embedded, list[FailedPost]]:
            try:
                return await _embed_batch(client, list(batch))
            except InvalidPostError as error:  # a batch of one post, refused
                return [], [FailedPost(batch[0].id, str(error))]

        return send

    outcomes, report = await spread(
        batches,
        [(client.url, sender(client)) for client in clients],
        concurrency=concurrency,
        on_progress=on_progress,
        on_servers=on_servers,
        stop=stop,
        done_word="embedded",
    )
    embedded = [item for outcome in outcomes if outcome is not None for item in outcome[0]]
    failures = [failure for outcome in outcomes if outcome is not None for failure in outcome[1]]
    return embedded, failures, report


@contextlib.contextmanager
def stop_on_interrupt() -> Iterator[asyncio.Event]:
    """Ctrl-C (SIGINT) sets the event instead of cancelling the requests in flight; a second one cancels.

    A request cancelled inside a Triton 2.51 ensemble can crash the server, so a build
    the user interrupts stops sending, lets what is in flight finish, and then stops.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def interrupted() -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        logger.warning("interrupted: finishing the requests in flight (Ctrl-C again to cancel them)")
        stop.set()

    try:
        loop.add_signal_handler(signal.SIGINT, interrupted)
    except (RuntimeError, ValueError, NotImplementedError):  # not the main thread: no handler to install
        yield stop
        return
    try:
        yield stop
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def build_corpus_index(
    settings: CorpusIndexSettings,
    *,
    on_progress: ProgressCallback | None = None,
    on_servers: ServersCallback | None = None,
) -> CorpusIndexReport:
    """Embed the corpus through the server(s) and write the index directory; failures are reported, not fatal.

    ``on_servers`` is called with what each server has done as batches complete (posts/s per server).
    """
    if settings.batch_size < 1 or settings.concurrency < 1:
        raise SearchIndexError(
            f"batch size and concurrency must be at least 1, got {settings.batch_size} and {settings.concurrency}"
        )
    posts = list(read_posts(settings.corpus))
    if not posts:
        raise SearchIndexError(f"{settings.corpus} holds no posts: nothing to index")
    started = time.monotonic()

    async def embed_all() -> tuple[str, Embedded, list[FailedPost], SpreadReport]:
        async with open_servers(settings.urls, shrink_images=settings.shrink_images) as (clients, fingerprint):
            with stop_on_interrupt() as stop:
                embedded, failures, report = await embed_spread(
                    posts,
                    clients,
                    batch_size=settings.batch_size,
                    concurrency=settings.concurrency,
                    on_progress=on_progress,
                    on_servers=on_servers,
                    stop=stop,
                )
            if stop.is_set():
                raise KeyboardInterrupt
            return fingerprint, embedded, failures, report

    fingerprint, embedded, failures, spread_report = asyncio.run(embed_all())
    for failure in failures:
        logger.warning("post %s not indexed: %s", failure.id, failure.reason)
    if not embedded:
        raise SearchIndexError(f"no post of {settings.corpus} could be embedded ({len(failures)} failed)")
    ids = [post_id for post_id, _ in embedded]
    results = [result for _, result in embedded]
    vectors = np.stack([result.embedding for result in results]).astype(np.float32)
    texts = {post.id: post.text for post in posts}
    metadata = {post.id: post.metadata for post in posts}
    unimodal = unimodal_vectors(results) if settings.unimodal else None
    manifest = build_index_dir(
        settings.out_dir,
        ids,
        vectors,
        weights_fingerprint=fingerprint,
        index_type=settings.index_type,
        captions=[post_caption(texts[post_id]) for post_id in ids],
        metadata=MetadataColumns.of(metadata[post_id] for post_id in ids),
        unimodal=unimodal,
    )
    return CorpusIndexReport(
        index_dir=settings.out_dir,
        manifest=manifest,
        indexed=len(ids),
        failures=failures,
        seconds=time.monotonic() - started,
        spread=spread_report,
    )


def unimodal_vectors(results: list[EmbeddingResult]) -> UnimodalVectors:
    """The parts of the posts' embeddings, as an index keeps them."""
    return UnimodalVectors.from_float32(
        np.stack([result.image_embedding for result in results]),
        np.stack([result.text_embedding for result in results]),
        np.array([[result.image_weight, result.text_weight] for result in results]),
    )
