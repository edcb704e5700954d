"""Shared helpers of the live-index tests: real index versions over clustered vectors, and a reference model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from postsim.bench.index_bench import ClusteredVectors
from postsim.indexing.build import build_index_dir
from postsim.model_repository.live_index.filters import PostFilter
from postsim.model_repository.live_index.metadata import MetadataColumns, PostMetadata
from postsim.model_repository.live_index.mutable_index import MutableIndex
from postsim.model_repository.search_index import IndexType, LoadedIndex, load_index_dir

FINGERPRINT = "f" * 64
DIM = 32
AUTHORS = ("ana", "bo", "cy", "dee")
LABELS = ("cat", "dog", "meme", "news")
TAGS = ("summer", "beach", "city", "food", "art", "rare")


def clustered(count: int, seed: int = 0) -> np.ndarray:
    """``count`` unit vectors that cluster as post embeddings do."""
    return ClusteredVectors(dim=DIM, topics=20, subjects=300, seed=7).sample(count, np.random.default_rng(seed))


def random_metadata(count: int, seed: int = 0, *, rare_share: float = 0.0) -> list[PostMetadata]:
    """Varied metadata; a share ``rare_share`` of the posts carries the tag ``rare`` and no other post does."""
    rng = np.random.default_rng(seed)
    rare = rng.random(count) < rare_share
    return [
        PostMetadata(
            author=None if rng.random() < 0.1 else str(rng.choice(AUTHORS)),
            created_at=None if rng.random() < 0.1 else int(1_700_000_000 + rng.integers(0, 1000) * 3600),
            label=None if rng.random() < 0.1 else str(rng.choice(LABELS)),
            tags=("rare",) if rare[row] else tuple(str(tag) for tag in rng.choice(TAGS[:-1], rng.integers(0, 3))),
        )
        for row in range(count)
    ]


def build_base(
    directory: Path, count: int, index_type: IndexType, *, seed: int = 0, prefix: str = "p"
) -> tuple[LoadedIndex, np.ndarray]:
    """An index version built and loaded as postsim builds and serves one, and its (unit) vectors."""
    vectors = clustered(count, seed)
    ids = [f"{prefix}{row}" for row in range(count)]
    captions = [f"caption of {post_id}" for post_id in ids]
    build_index_dir(directory, ids, vectors, weights_fingerprint=FINGERPRINT, index_type=index_type, captions=captions)
    return load_index_dir(directory, FINGERPRINT, use_gpu=False), vectors


class Reference:
    """What a live index must hold: the acknowledged posts, kept in plain dicts, searched exactly."""

    def __init__(self, ids: Sequence[str], vectors: np.ndarray, metadata: Sequence[PostMetadata]) -> None:
        self.vectors = {post_id: vector for post_id, vector in zip(ids, vectors, strict=True)}
        self.metadata = dict(zip(ids, metadata, strict=True))
        self.captions = {post_id: f"caption of {post_id}" for post_id in ids}

    def upsert(self, post_id: str, vector: np.ndarray, metadata: PostMetadata, caption: str) -> None:
        self.vectors.pop(post_id, None)  # a replaced post moves to the end, as in the live index
        self.vectors[post_id] = vector / np.linalg.norm(vector)
        self.metadata[post_id] = metadata
        self.captions[post_id] = caption

    def delete(self, post_id: str) -> None:
        del self.vectors[post_id], self.metadata[post_id], self.captions[post_id]

    def passes(self, post_id: str, where: PostFilter) -> bool:
        metadata = self.metadata[post_id]
        if post_id in where.exclude_ids or (where.exclude_author and metadata.author == where.exclude_author):
            return False
        if where.created_after is not None or where.created_before is not None:
            if metadata.created_at is None:
                return False
            if where.created_after is not None and metadata.created_at < where.created_after:
                return False
            if where.created_before is not None and metadata.created_at >= where.created_before:
                return False
        if where.labels is not None and metadata.label not in where.labels:
            return False
        return where.tags is None or bool(where.tags & set(metadata.tags))

    def exact(self, query: np.ndarray, k: int, where: PostFilter | None = None) -> list[tuple[str, float]]:
        """The exact top ``k`` of the posts passing ``where``: (id, cosine), best first."""
        ids = [post_id for post_id in self.vectors if where is None or self.passes(post_id, where)]
        if not ids:
            return []
        scores = np.stack([self.vectors[post_id] for post_id in ids]) @ (query / np.linalg.norm(query))
        order = np.argsort(-scores, kind="stable")[:k]
        return [(ids[row], float(scores[row])) for row in order]


def assert_holds(index: MutableIndex, reference: Reference) -> None:
    """The live index holds exactly the reference's posts: ids in order, vectors, captions, metadata."""
    state = index.compact()
    assert state.ids == list(reference.vectors)
    np.testing.assert_allclose(state.vectors, np.stack(list(reference.vectors.values())), atol=1e-6)
    assert state.captions == [reference.captions[post_id] for post_id in state.ids]
    assert [state.metadata.row(row) for row in range(len(state.ids))] == [reference.metadata[i] for i in state.ids]


def columns_of(metadata: Sequence[PostMetadata]) -> MetadataColumns:
    return MetadataColumns.of(metadata)
