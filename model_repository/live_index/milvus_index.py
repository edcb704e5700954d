"""A Milvus collection that takes changes while it serves: the Milvus :class:`LiveIndex`.

It keeps the protocol's guarantees over :class:`~postsim.model_repository.milvus_store.MilvusStore`
(posts, metadata, captions and score parts in the collection the store's alias serves):

- **Durable and visible on return.** An upsert or delete returns once Milvus acknowledged
  it; every read is ``Strong`` (``milvus_store.READ_CONSISTENCY``), so a search that starts
  later, on this replica or another, sees it.
- **Atomic per call.** One call's posts go to Milvus in one request when they fit
  ``MilvusSettings.insert_batch`` (every call ``post_changes`` sends does).
- **k when k pass.** Filters run inside Milvus's search; an approximate version that comes
  back short while more posts pass (counted with the same filter) is searched again with
  every list probed (``IVF_FLAT``, ``GPU_IVF_PQ``) or a graph search as wide as Milvus
  allows (``HNSW``, ``GPU_CAGRA``), and when that is still short, the passing posts (up to
  :data:`EXACT_MAX_POSTS`) are read back and ranked exactly.

What differs from the FAISS index: a hit has no row (``Hit.row`` is -1), so the score parts
come from the collection by id (:meth:`MilvusLiveIndex.split_hits`); a change's sequence
number is the time it was acknowledged, in microseconds (each replica's own changes in
increasing order, not a journal position); there is no journal to compact (Milvus compacts
its segments itself, and ``postsim index build`` and publish write a new version).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from types import TracebackType

import numpy as np

from postsim.core.errors import InvalidPostError, SearchIndexError
from postsim.model_repository.contract import MODALITIES
from postsim.model_repository.live_index.collapse import collapse_duplicates, optional_collapse_threshold
from postsim.model_repository.live_index.filters import PostFilter
from postsim.model_repository.live_index.mutable_index import LiveSearchSettings
from postsim.model_repository.live_index.protocol import (
    ChangeReceipt,
    CompactedState,
    Hit,
    LiveIndex,
    LiveIndexState,
    PostUpsert,
    check_k,
    check_post_id,
    checked_upserts,
    unknown_query_id,
)
from postsim.model_repository.milvus_store import MAX_TOP_K, MilvusIndexType, MilvusSettings, MilvusStore
from postsim.model_repository.score_parts import split_gathered
from postsim.model_repository.search_index import SearchHit, check_queries

logger = logging.getLogger("postsim")

EXACT_MAX_POSTS = 16_384
"""Most posts passing a filter that a search still short after widening ranks exactly (their vectors read back):
Milvus Lite, for one, builds its own list count whatever ``nlist`` says, so probing ``nlist`` lists may not be all."""


class MilvusLiveIndex(LiveIndex):
    """The :class:`~postsim.model_repository.live_index.protocol.LiveIndex` of the version a Milvus alias serves.

    It follows the alias: a publish or rollback by any replica (or the CLI) is what the
    next search reads, with no reload.
    """

    def __init__(self, store: MilvusStore, *, settings: LiveSearchSettings | None = None) -> None:
        self.store = store
        self.settings = settings or LiveSearchSettings()
        self._sequence = 0
        self._sequence_lock = threading.Lock()

    @classmethod
    def open(
        cls,
        settings: MilvusSettings,
        *,
        weights_fingerprint: str,
        dimension: int,
        search_settings: LiveSearchSettings | None = None,
    ) -> MilvusLiveIndex:
        """The index these encoders' alias serves at ``settings.uri``; SearchIndexError when none is published."""
        store = MilvusStore(settings, weights_fingerprint=weights_fingerprint, dimension=dimension)
        try:
            version = store.serving_version()
            if version is None:
                raise SearchIndexError(
                    f"no index version is published in Milvus at {settings.uri} for encoders {weights_fingerprint} "
                    f"(alias {store.alias}): `postsim index build` and `postsim index publish` one"
                )
            store.manifest(version)  # these encoders' posts, built by postsim
        except BaseException:
            store.close()
            raise
        logger.info("retrieval serves Milvus alias %s (version %d) at %s", store.alias, version, settings.uri)
        return cls(store, settings=search_settings)

    @property
    def dimension(self) -> int:
        return self.store.dimension

    @property
    def weights_fingerprint(self) -> str:
        return self.store.fingerprint

    # Changes

    def upsert(self, posts: Sequence[PostUpsert], *, weights_fingerprint: str) -> ChangeReceipt:
        if weights_fingerprint != self.weights_fingerprint:
            raise InvalidPostError(
                f"upsert: the posts were embedded by encoders with weights fingerprint {weights_fingerprint!r}, the "
                f"index holds embeddings of {self.weights_fingerprint!r}: embed them with the server that serves it"
            )
        checked = checked_upserts(posts, self.dimension)
        ids = [post.id for post in checked]
        existing = self.store.get(ids, with_vectors=False)
        self.store.upsert(
            ids,
            np.stack([post.vector for post in checked]),
            [post.metadata for post in checked],
            captions=[post.caption for post in checked],
            parts=[post.parts for post in checked],
        )
        replaced = tuple(post_id for post_id in ids if post_id in existing)
        return ChangeReceipt(sequence=self._next_sequence(), upserted=len(checked), replaced_ids=replaced)

    def delete(self, ids: Sequence[str]) -> ChangeReceipt:
        wanted = list(dict.fromkeys(check_post_id(post_id, "delete") for post_id in ids))
        if not wanted:
            raise InvalidPostError("delete: no ids given")
        report = self.store.delete(wanted)
        sequence = self._next_sequence() if report.deleted else 0
        return ChangeReceipt(sequence=sequence, deleted=len(report.deleted), unknown_ids=report.unknown)

    def _next_sequence(self) -> int:
        """The acknowledgement time in microseconds, above every sequence this object returned before."""
        with self._sequence_lock:
            self._sequence = max(self._sequence + 1, time.time_ns() // 1000)
            return self._sequence

    # Searches

    def search(
        self, queries: np.ndarray, k: int, *, where: PostFilter | None = None, collapse_above: float | None = None
    ) -> list[list[Hit]]:
        k = check_k(k)
        threshold = optional_collapse_threshold(collapse_above)
        normalised = check_queries(queries, self.dimension)
        return [self._query(query, k, where or PostFilter(), threshold) for query in normalised]

    def search_by_id(
        self, ids: Sequence[str], k: int, *, where: PostFilter | None = None, collapse_above: float | None = None
    ) -> list[list[Hit]]:
        k = check_k(k)
        threshold = optional_collapse_threshold(collapse_above)
        wanted = [check_post_id(post_id, "query id") for post_id in ids]
        stored = self.store.get(list(dict.fromkeys(wanted)))
        unknown = [post_id for post_id in wanted if post_id not in stored]
        if unknown:
            raise unknown_query_id(unknown[0])
        post_filter = where or PostFilter()
        return [
            self._query(
                stored[post_id].vector,
                k,
                dataclasses.replace(post_filter, exclude_ids=post_filter.exclude_ids | {post_id}),
                threshold,
            )
            for post_id in wanted
        ]

    def _query(self, query: np.ndarray, k: int, where: PostFilter, threshold: float | None) -> list[Hit]:
        if threshold is None:
            return [Hit(hit.id, hit.score, hit.caption) for hit in self._ranked(query, k, where)]
        fetch = min(k * self.settings.collapse_overfetch, self.settings.max_collapse_candidates, MAX_TOP_K)
        while True:
            ranked = self._ranked(query, fetch, where)
            stored = self.store.get([hit.id for hit in ranked]) if ranked else {}
            # A post deleted between the search and the read is left out.
            ranked = [hit for hit in ranked if hit.id in stored]
            vectors = np.stack([stored[hit.id].vector for hit in ranked]) if ranked else np.zeros((0, self.dimension))
            hits = collapse_duplicates(ranked, vectors, above=threshold, k=k)
            ceiling = min(self.settings.max_collapse_candidates, MAX_TOP_K)
            if len(hits) >= k or len(ranked) < fetch or fetch >= ceiling:
                return hits
            fetch = min(ceiling, fetch * self.settings.collapse_overfetch)

    def _ranked(self, query: np.ndarray, k: int, where: PostFilter) -> list[SearchHit]:
        """The ``k`` best posts passing ``where``; searched wider, then exactly, when an approximate search came back
        short while more posts pass."""
        k = min(k, MAX_TOP_K)
        (found,) = self.store.search(query[None, :], k, post_filter=where)
        if len(found) >= k:
            return found
        passing = self.store.count(where)
        if passing <= len(found):
            return found
        spec = self.store.serving_spec()
        widest = _widest_search(spec.index_type, spec.build_params)
        if widest is not None:
            (found,) = self.store.search(query[None, :], k, post_filter=where, search_params=widest)
        if len(found) >= min(k, passing) or passing > EXACT_MAX_POSTS:
            return found
        posts = self.store.passing(where, passing)
        scores = np.stack([post.vector for post in posts]) @ query
        order = np.argsort(-scores, kind="stable")[:k]
        return [SearchHit(posts[row].id, float(scores[row]), posts[row].caption) for row in order]

    # Score parts (contract.CONTRIBUTIONS)

    def stored_parts(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The unit image and text vectors and modality weights of posts queried by id (float32); NaN where unknown."""
        image, text, weights = self._parts([list(ids)])
        return image[0], text[0], weights[0]

    def split_hits(
        self, query_image: np.ndarray, query_text: np.ndarray, query_weights: np.ndarray, hits: list[list[Hit]]
    ) -> np.ndarray:
        """The four parts of each hit's score (``[batch, k, 4]``), the hits' parts read from the collection.

        Every row of ``hits`` holds the same number of hits. NaN where a hit's parts are unknown.
        """
        image, text, weights = self._parts([[hit.id for hit in row] for row in hits])
        return split_gathered(query_image, query_text, query_weights, image, text, weights)

    def _parts(self, ids: list[list[str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The parts of ``ids`` (rows of equal length) as ``[rows, n, dim]``, ``[rows, n, dim]``, ``[rows, n, 2]``."""
        width = len(ids[0]) if ids else 0
        dimension = self.dimension
        image = np.full((len(ids), width, dimension), np.nan, dtype=np.float32)
        text = np.full_like(image, np.nan)
        weights = np.full((len(ids), width, len(MODALITIES)), np.nan, dtype=np.float32)
        unique = list(dict.fromkeys(post_id for row in ids for post_id in row))
        stored = self.store.get(unique, with_vectors=False, with_parts=True) if unique else {}
        for position, row in enumerate(ids):
            for column, post_id in enumerate(row):
                post = stored.get(post_id)
                if post is not None and post.parts is not None:
                    image[position, column] = post.parts.image
                    text[position, column] = post.parts.text
                    weights[position, column] = post.parts.weights
        return image, text, weights

    # State

    def state(self) -> LiveIndexState:
        version, manifest = self.store.serving()
        live = self.store.count(PostFilter())
        return LiveIndexState(
            dimension=self.dimension,
            weights_fingerprint=self.weights_fingerprint,
            base_version=self.store.collection_name(version),
            base_count=manifest.count,
            live_count=live,
            upserted=0,
            deleted=0,
            dead_rows=0,
            sequence=self._sequence,
            journal_bytes=0,
        )

    def compact(self) -> CompactedState:
        raise SearchIndexError(
            "a Milvus collection has no change journal to compact (Milvus compacts its segments itself): "
            "`postsim index build` and `postsim index publish` write and serve a new version"
        )

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> MilvusLiveIndex:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def _widest_search(index_type: MilvusIndexType, build_params: dict[str, int]) -> dict[str, int] | None:
    """The search parameters that search an approximate index as widely as it can be; None for exact search."""
    if index_type in (MilvusIndexType.IVF_FLAT, MilvusIndexType.GPU_IVF_PQ):
        return {"nprobe": build_params["nlist"]}
    if index_type is MilvusIndexType.HNSW:
        return {"ef": MAX_TOP_K}
    if index_type is MilvusIndexType.GPU_CAGRA:
        return {"itopk_size": 1024, "search_width": 16}
    return None
