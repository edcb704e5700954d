"""``postsim index upsert | delete``: posts into and out of the index a running server serves, without a rebuild.

Each call of at most ``batch_size`` posts is one atomic change that the server journals
(fsync) and applies before it answers (``post_changes``, see README "Posts come and go");
a change that failed leaves the earlier calls' changes in place, and says which posts it
concerned.

``upsert_corpus`` given several servers spreads the calls over them, one in flight per
server, and sends the calls of a server that fails to the others
(:mod:`postsim.indexing.spread`). That is for replicas that share one index (the Milvus
backend), and it is refused otherwise: with an in-process FAISS index each replica would
hold only the posts it was sent (:func:`~postsim.indexing.spread.check_shared_index`). An upsert replaces by id, so a call resent after its server failed without answering
changes nothing twice (such a post may then count as replaced rather than added).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from postsim.client.api import AsyncPostSimClient, PostSimClient
from postsim.client.posts import ChangeReport
from postsim.core.errors import InvalidPostError
from postsim.corpus.posts import CorpusPost, read_posts
from postsim.indexing.embed import ProgressCallback, stop_on_interrupt
from postsim.indexing.spread import ServersCallback, SpreadReport, check_shared_index, open_servers, spread
from postsim.model_repository import contract
from postsim.model_repository.contract import post_id_problem

_Upsert = Callable[[Sequence[CorpusPost]], Awaitable[ChangeReport]]


@dataclass(frozen=True, kw_only=True)
class ChangeSummary:
    """What a run of upserts or deletes did, over all its calls."""

    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    """Ids a delete named that no indexed post has: nothing was done for them."""
    sequence: int = 0
    """The journal sequence number of the last change."""
    spread: SpreadReport | None = None
    """What each server did, when the calls were spread over servers."""

    def add(self, report: ChangeReport) -> ChangeSummary:
        return ChangeSummary(
            added=self.added + list(report.added),
            replaced=self.replaced + list(report.replaced),
            deleted=self.deleted + list(report.deleted),
            unknown=self.unknown + list(report.unknown),
            sequence=max(self.sequence, report.sequence),
            spread=self.spread,
        )


def upsert_corpus(
    corpus: Path,
    url: str | Sequence[str],
    *,
    batch_size: int = contract.MAX_BATCH_SIZE,
    on_progress: ProgressCallback | None = None,
    on_servers: ServersCallback | None = None,
    shrink_images: bool = False,
) -> ChangeSummary:
    """Upsert every post of ``corpus`` (the corpus format, metadata included) into the index ``url`` serves.

    Given several URLs, the calls are spread over those servers, which must serve the same encoders.
    ``shrink_images`` sends the images at the encoder's scale (the client's ``shrink_images``).
    """
    posts = list(read_posts(corpus))  # the whole file is checked before the first change
    if not posts:
        raise InvalidPostError(f"{corpus} holds no posts: nothing to upsert")
    urls = (url,) if isinstance(url, str) else tuple(url)
    chunks = [posts[start : start + batch_size] for start in range(0, len(posts), batch_size)]

    def sender(client: AsyncPostSimClient) -> tuple[str, _Upsert]:
        async def send(chunk: Sequence[CorpusPost]) -> ChangeReport:
            return await client.upsert(
                [post.to_post() for post in chunk], [post.metadata.to_fields() for post in chunk]
            )

        return client.url, send

    async def upsert_all() -> ChangeSummary:
        async with open_servers(urls, shrink_images=shrink_images) as (clients, _):
            if len(clients) > 1:
                await check_shared_index(clients)
            with stop_on_interrupt() as stop:
                reports, spread_report = await spread(
                    chunks,
                    [sender(client) for client in clients],
                    concurrency=1,
                    on_progress=on_progress,
                    on_servers=on_servers,
                    stop=stop,
                    done_word="upserted (those changes stand)",
                )
            if stop.is_set():
                raise KeyboardInterrupt
        summary = ChangeSummary(spread=spread_report)
        for report in reports:
            if report is not None:
                summary = summary.add(report)
        return summary

    return asyncio.run(upsert_all())


def delete_posts(ids: Sequence[str], url: str, *, on_progress: ProgressCallback | None = None) -> ChangeSummary:
    """Delete the posts with ``ids`` from the index ``url`` serves; ids it does not have are reported."""
    for post_id in ids:
        problem = post_id_problem(post_id)
        if problem:
            raise InvalidPostError(problem)
    wanted = list(dict.fromkeys(ids))
    if not wanted:
        raise InvalidPostError("no ids given: name them, or give --ids-file")
    summary = ChangeSummary()
    size = contract.MAX_BATCH_SIZE
    with PostSimClient(url) as client:
        for start in range(0, len(wanted), size):
            summary = summary.add(client.delete(wanted[start : start + size]))
            if on_progress is not None:
                on_progress(min(start + size, len(wanted)), len(wanted))
    return summary


def read_ids_file(path: Path) -> list[str]:
    """Post ids, one a line (blank lines skipped), each checked, naming the line of a bad one."""
    ids = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        post_id = line.strip()
        if not post_id:
            continue
        problem = post_id_problem(post_id)
        if problem:
            raise InvalidPostError(f"{path}:{number}: {problem}")
        ids.append(post_id)
    return ids
