"""``postsim evaluate``: retrieval quality of the served models, measured through a running server.

The corpus's held-out posts (:func:`~postsim.corpus.split.split_of`, the posts training holds
out) go to ``post_embedding`` three ways, with the indexing path's corpus embedding
(:func:`~postsim.indexing.embed.embed_corpus`): as posted, text only (each post that
has a text) and image only (each post that has an image). Their embeddings are scored on
:data:`~postsim.evaluation.slices.STANDARD_SLICES`, relevance being the same label, so one
run gives the fused search, each single modality on the same posts, the cross-modal searches
and the fuser's modality weights by label.

Search is exact and computed here (:func:`~postsim.evaluation.metrics.exact_search`), not
through ``similar_posts``: the served index may be approximate (HNSW, IVF-PQ) and hold other
posts, and this measures the embeddings, not the index's recall on top of them; the
image-only and text-only galleries of the cross-modal slices are in no index anyway. The
gallery is the held-out posts, as in training's per-epoch measure, so the served figures
compare with ``training.json``'s, and a trained head is not flattered by the posts it
learned from.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from postsim.client.api import AsyncPostSimClient
from postsim.client.posts import ServedRepository
from postsim.client.settings import DEFAULT_URL
from postsim.core.errors import EvaluationError
from postsim.corpus.posts import CorpusPost, read_posts
from postsim.corpus.split import DEFAULT_HELD_OUT, Split, split_of
from postsim.evaluation.result import EvaluationResult
from postsim.evaluation.slices import (
    IMAGE,
    POST,
    STANDARD_SLICES,
    TEXT,
    EmbeddingView,
    evaluate_embeddings,
    standard_views,
    summarise_weights,
)
from postsim.indexing.embed import Embedded, FailedPost, embed_corpus, stop_on_interrupt

logger = logging.getLogger("postsim")

SEARCH = "exact, client-side (numpy), gallery: the held-out posts"
"""How the neighbours are found, as evaluation.json records it (see the module docstring for why)."""
NDCG_K = 10
"""nDCG is always reported at 10, beside the k asked for."""

Progress = Callable[[int, int], None]
"""Called with (requests' posts done, posts to send in all, over the three views)."""


@dataclass(frozen=True, kw_only=True)
class ServedEvaluationSettings:
    """What to evaluate: a labelled corpus, against the server at ``url``."""

    corpus: Path
    url: str = DEFAULT_URL
    k: int = 10
    held_out: float = DEFAULT_HELD_OUT
    """Share of the posts held out when the corpus has no ``split`` field; use the value training used."""
    batch_size: int = 8
    concurrency: int = 4
    weights_by: str | None = None
    """A key of the corpus lines (e.g. sample posts' ``generic``): the fuser's weights are also
    summarised per value of it, beside per label."""

    def __post_init__(self) -> None:
        if self.k < 1 or self.batch_size < 1 or self.concurrency < 1:
            raise EvaluationError(
                f"k, batch size and concurrency must be at least 1, got {self.k}, {self.batch_size} and "
                f"{self.concurrency}"
            )

    @property
    def ks(self) -> tuple[int, ...]:
        return tuple(sorted({1, self.k, NDCG_K}))


@dataclass(frozen=True)
class RefusedPost:
    """A post the server refused in one view (a missing or corrupt image, say): left out of that view."""

    view: str
    id: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class ServedEvaluation:
    """The scores of one evaluation, with what was measured and what was left out."""

    corpus: Path
    url: str
    served: ServedRepository
    k: int
    posts: dict[str, int]
    """Counts: in the corpus, held out, held out with a label, labels among them."""
    result: EvaluationResult
    refused: tuple[RefusedPost, ...] = ()
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "corpus": str(self.corpus),
            "url": self.url,
            "served": {
                "weights": self.served.weights,
                "fingerprint": self.served.fingerprint,
                "repository_id": self.served.repository_id,
                "dim": self.served.dim,
            },
            "k": self.k,
            "search": SEARCH,
            "posts": self.posts,
            "refused": [{"view": item.view, "id": item.id, "reason": item.reason} for item in self.refused],
            "seconds": round(self.seconds, 3),
            **self.result.to_dict(),
        }


def evaluate_served(settings: ServedEvaluationSettings, *, progress: Progress | None = None) -> ServedEvaluation:
    """Embeds the held-out posts through the server three ways and scores every standard slice.

    Raises EvaluationError, before sending anything, for a corpus without two labels or
    without held-out posts; posts the server refuses are left out of their view and listed.
    """
    started = time.monotonic()
    posts = list(read_posts(settings.corpus))
    held_out = [post for post in posts if split_of(post.id, post.split, held_out=settings.held_out) is Split.TEST]
    _check_corpus(settings.corpus, posts, held_out)
    views = {
        POST: held_out,
        TEXT: [replace(post, image_path=None) for post in held_out if post.text is not None],
        IMAGE: [replace(post, text=None) for post in held_out if post.image_path is not None],
    }
    served, embedded, refused = asyncio.run(_embed_views(settings, views, progress))
    scored = _standard_views(held_out, embedded)
    result = evaluate_embeddings(scored, STANDARD_SLICES, ks=settings.ks)
    if settings.weights_by is not None:
        result = _with_weights_by(result, scored, settings.corpus, settings.weights_by)
    labels = {post.label for post in held_out if post.label is not None}
    return ServedEvaluation(
        corpus=settings.corpus,
        url=settings.url,
        served=served,
        k=settings.k,
        posts={
            "corpus": len(posts),
            "held_out": len(held_out),
            "held_out_labelled": sum(post.label is not None for post in held_out),
            "labels": len(labels),
        },
        result=result,
        refused=tuple(refused),
        seconds=time.monotonic() - started,
    )


def _with_weights_by(result: EvaluationResult, views: list[EmbeddingView], corpus: Path, key: str) -> EvaluationResult:
    """``result`` with the fused view's modality weights summarised per value of ``key`` (absent or null: "none")."""
    values = _line_values(corpus, key)
    posted = next(view for view in views if view.name == POST)
    grouped = replace(posted, name=f"{POST} by {key}", labels=[values.get(post_id, "none") for post_id in posted.ids])
    summary = summarise_weights(grouped)
    return replace(result, modality_weights=(*result.modality_weights, *([summary] if summary else [])))


def _line_values(corpus: Path, key: str) -> dict[str, str]:
    """Each post's value of ``key`` in the corpus lines, as a string (read_posts has checked the lines)."""
    values: dict[str, str] = {}
    with corpus.open("rb") as lines:
        for line in lines:
            if line.strip():
                record = json.loads(line)
                if record.get(key) is not None:
                    values[record["id"]] = str(record[key])
    if not values:
        raise EvaluationError(f"no line of {corpus} has a {key!r} key to group the modality weights by")
    return values


def _check_corpus(path: Path, posts: Sequence[CorpusPost], held_out: Sequence[CorpusPost]) -> None:
    labels = {post.label for post in posts if post.label is not None}
    if len(labels) < 2:
        found = f"only the label {next(iter(labels))!r}" if labels else "no labels"
        raise EvaluationError(
            f"{path} has {found}: evaluate measures whether posts find others with the same label, which needs "
            "two labels or more; give each post a 'label' (its category, event, product or duplicate group)"
        )
    if not any(post.label is not None for post in held_out):
        raise EvaluationError(
            f"{path} has no labelled held-out post ({len(held_out)} held out of {len(posts)}): mark some posts "
            'with "split": "test", or give the corpus more posts'
        )


async def _embed_views(
    settings: ServedEvaluationSettings, views: dict[str, list[CorpusPost]], progress: Progress | None
) -> tuple[ServedRepository, dict[str, Embedded], list[RefusedPost]]:
    total = sum(len(posts) for posts in views.values())
    done_before = 0

    def view_progress(done: int, _: int) -> None:
        if progress is not None:
            progress(done_before + done, total)

    embedded: dict[str, Embedded] = {}
    refused: list[RefusedPost] = []
    async with AsyncPostSimClient(settings.url) as client:
        served = await client.served_repository()
        with stop_on_interrupt() as stop:
            for name, posts in views.items():
                embedded[name], failures = await embed_corpus(
                    posts,
                    client,
                    batch_size=settings.batch_size,
                    concurrency=settings.concurrency,
                    on_progress=view_progress,
                    stop=stop,
                )
                refused += [_refused(name, failure) for failure in failures]
                done_before += len(posts)
                if stop.is_set():
                    raise KeyboardInterrupt
    for item in refused:
        logger.warning("post %s left out of the %s view: %s", item.id, item.view, item.reason)
    return served, embedded, refused


def _refused(view: str, failure: FailedPost) -> RefusedPost:
    return RefusedPost(view=view, id=failure.id, reason=failure.reason)


def _standard_views(posts: Sequence[CorpusPost], embedded: dict[str, Embedded]) -> list[EmbeddingView]:
    """The standard views from what the server answered; a post it refused in a view is absent from that view."""
    ids = [post.id for post in posts]
    row_of = {post_id: row for row, post_id in enumerate(ids)}
    dim = next((len(result.embedding) for answers in embedded.values() for _, result in answers), 0)
    if not dim:
        raise EvaluationError("the server refused every held-out post: nothing to evaluate (see the warnings)")
    arrays = {name: np.zeros((len(ids), dim), np.float32) for name in embedded}
    present = {name: np.zeros(len(ids), bool) for name in embedded}
    weights = np.zeros((len(ids), 2), np.float32)
    for name, answers in embedded.items():
        for post_id, result in answers:
            row = row_of[post_id]
            arrays[name][row] = result.embedding
            present[name][row] = True
            if name == POST:
                weights[row] = (result.image_weight, result.text_weight)
    return standard_views(
        ids,
        [post.label for post in posts],
        posted=arrays[POST],
        posted_weights=weights,
        has_post=present[POST],
        text_only=arrays[TEXT],
        has_text=present[TEXT],
        image_only=arrays[IMAGE],
        has_image=present[IMAGE],
    )
