"""``postsim index build``: embeds a JSONL corpus through the running server and writes a FAISS index.

Posts go to ``post_embedding`` in batches, several batches in flight at once. A batch the
server refuses as invalid is retried post by post, so one bad post is reported by its id
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from postsim.client.api import AsyncPostSimClient
from postsim.client.posts import EmbeddingResult
from postsim.client.settings import DEFAULT_URL
from postsim.core.errors import InvalidPostError, SearchIndexError
from postsim.corpus.posts import CorpusPost, read_posts
from postsim.indexing.build import build_index_dir, post_caption
from postsim.model_repository.live_index.metadata import MetadataColumns
from postsim.model_repository.score_parts import UnimodalVectors
from postsim.model_repository.search_index import IndexManifest, IndexType

logger = logging.getLogger("postsim")

ProgressCallback = Callable[[int, int], None]
"""Called with (posts done, posts in all) as batches complete."""


@dataclass(frozen=True, kw_only=True)
class CorpusIndexSettings:
    corpus: Path
    out_dir: Path
    url: str = DEFAULT_URL
    index_type: IndexType = IndexType.AUTO
    batch_size: int = 8
    concurrency: int = 4
    """Batches in flight at once."""
    unimodal: bool = True
    """Keep each post's unimodal vectors and modality weights, which split its scores (``CONTRIBUTIONS``)."""
    shrink_images: bool = False
    """Send the images at the encoder's scale (the client's ``shrink_images``)."""


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
    client: AsyncPostSimClient,
    *,
    batch_size: int,
    concurrency: int,
    on_progress: ProgressCallback | None = None,
    stop: asyncio.Event | None = None,
) -> tuple[Embedded, list[FailedPost]]:
    """Every post's embedding and modality weights, in corpus order, and the posts the server refused.

    Once ``stop`` is set, no further batch is sent and the batches in flight finish.
    """
    batches = [posts[start : start + batch_size] for start in range(0, len(posts), batch_size)]
    gate = asyncio.Semaphore(concurrency)
    done = 0
    if on_progress is not None:
        on_progress(0, len(posts))  # starts the clock of whoever shows progress

    async def run(batch: list[CorpusPost]) -> tuple[Embedded, list[FailedPost]]:
        nonlocal done
        async with gate:
            if stop is not None and stop.is_set():
                return [], []
            try:
                outcome = await _embed_batch(client, batch)
            except InvalidPostError as error:
                outcome = ([], [FailedPost(batch[0].id, str(error))])
        done += len(batch)
        if on_progress is not None:
            on_progress(done, len(posts))
        return outcome

    outcomes = await asyncio.gather(*(run(batch) for batch in batches))
    embedded = [item for batch_embedded, _ in outcomes for item in batch_embedded]
    failures = [failure for _, batch_failures in outcomes for failure in batch_failures]
    return embedded, failures


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
    settings: CorpusIndexSettings, *, on_progress: ProgressCallback | None = None
) -> CorpusIndexReport:
    """Embed the corpus through the server and write the index directory; failures are reported, not fatal."""
    if settings.batch_size < 1 or settings.concurrency < 1:
        raise SearchIndexError(
            f"batch size and concurrency must be at least 1, got {settings.batch_size} and {settings.concurrency}"
        )
    posts = list(read_posts(settings.corpus))
    if not posts:
        raise SearchIndexError(f"{settings.corpus} holds no posts: nothing to index")
    started = time.monotonic()

    async def embed_all() -> tuple[str, Embedded, list[FailedPost]]:
        async with AsyncPostSimClient(settings.url, shrink_images=settings.shrink_images) as client:
            # post_embedding's config, not the repository index: a server's admin key restricts the index.
            info = await client.served_repository()
            if not info.fingerprint:
                raise SearchIndexError(
                    f"the server at {settings.url} does not say which weights it serves (no postsim_fingerprint "
                    "in post_embedding's config): export the repository again with this version of postsim"
                )
            with stop_on_interrupt() as stop:
                embedded, failures = await embed_corpus(
                    posts,
                    client,
                    batch_size=settings.batch_size,
                    concurrency=settings.concurrency,
                    on_progress=on_progress,
                    stop=stop,
                )
            if stop.is_set():
                raise KeyboardInterrupt
            return info.fingerprint, embedded, failures

    fingerprint, embedded, failures = asyncio.run(embed_all())
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
    )


def unimodal_vectors(results: list[EmbeddingResult]) -> UnimodalVectors:
    """The parts of the posts' embeddings, as an index keeps them."""
    return UnimodalVectors.from_float32(
        np.stack([result.image_embedding for result in results]),
        np.stack([result.text_embedding for result in results]),
        np.array([[result.image_weight, result.text_weight] for result in results]),
    )
