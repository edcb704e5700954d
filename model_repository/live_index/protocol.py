"""What a live index is, whatever engine holds it: the :class:`LiveIndex` protocol and its values.

A live index is a published index version that takes changes while it serves: posts
upserted (added, or replaced by id) and deleted, searched with a filter inside the search,
by the stored vector of one of its posts, and with near-duplicates folded together. Its
guarantees, which every implementation keeps:

- **Durable on return.** :meth:`LiveIndex.upsert` and :meth:`LiveIndex.delete` return
  once the change is on stable storage; a process killed after that serves it on restart.
- **Visible on return.** A search that starts after a change returned sees it: a deleted
  post is never in its results, an upserted one is (as replaced).
- **Atomic per call.** A search sees all of one call's changes or none of them.
- **k when k pass.** A search for k results returns k whenever at least k posts pass its
  filter (an approximate index searches wider, or exactly, rather than return fewer).

``MutableIndex`` (``mutable_index.py``) implements it over a FAISS index version and its
change journal; ``MilvusLiveIndex`` (``milvus_index.py``) over the Milvus collection an
alias serves. ``retrieval`` opens the one its config's ``retrieval_backend`` names.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np

from postsim.core.errors import InvalidPostError
from postsim.model_repository.contract import post_id_problem
from postsim.model_repository.live_index.metadata import MetadataColumns, PostMetadata
from postsim.model_repository.score_parts import PostParts, UnimodalVectors

if TYPE_CHECKING:  # both load FAISS, which the client and the corpus reader do not need
    from postsim.model_repository.live_index.filters import PostFilter
    from postsim.model_repository.search_index import IndexType, SearchHit


def check_post_id(post_id: object, where: str) -> str:
    """``post_id`` if it is a valid post id (:func:`~postsim.model_repository.contract.post_id_problem`)."""
    if not isinstance(post_id, str):
        raise InvalidPostError(f"{where}: a post id is a string, got {type(post_id).__name__}")
    problem = post_id_problem(post_id)
    if problem:
        raise InvalidPostError(f"{where}: {problem}")
    return post_id


def check_k(k: object) -> int:
    """``k`` if it is a positive integer (how many results a search asks for)."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k <= 0:
        raise InvalidPostError(f"k must be a positive integer, got {k!r}")
    return int(k)


def unknown_query_id(post_id: str) -> InvalidPostError:
    """The error of a search by the id of a post no live post has."""
    return InvalidPostError(
        f"query id {post_id!r}: no indexed post has this id (it was never indexed, or it was deleted)"
    )


@dataclass(frozen=True, kw_only=True, eq=False)
class PostUpsert:
    """One post to add, or to replace when a post with its id is indexed."""

    id: str
    vector: np.ndarray
    """The post's embedding, ``[dimension]`` float32, by the encoders the index was built with."""
    metadata: PostMetadata = field(default_factory=PostMetadata)
    caption: str = ""
    """What the index shows with the post (``post_caption`` of its text); empty when it has none."""
    parts: PostParts | None = None
    """Its unit modality vectors and weights, which split its scores (``contract.CONTRIBUTIONS``); None: unknown."""

    def __post_init__(self) -> None:
        check_post_id(self.id, "upsert")
        if not isinstance(self.caption, str):
            raise InvalidPostError(f"post {self.id!r}: caption must be a string, got {type(self.caption).__name__}")
        if not isinstance(self.metadata, PostMetadata):
            raise InvalidPostError(f"post {self.id!r}: metadata must be a PostMetadata")

    def normalised(self, dimension: int) -> PostUpsert:
        """This post with its vector checked (``[dimension]`` finite floats, not zero) and L2-normalised, its parts checked."""
        vector = np.asarray(self.vector)
        if vector.shape != (dimension,) or not np.issubdtype(vector.dtype, np.floating):
            raise InvalidPostError(
                f"post {self.id!r}: vector of shape {list(vector.shape)} and type {vector.dtype}, "
                f"expected [{dimension}] floats"
            )
        vector = vector.astype(np.float32)
        norm = float(np.linalg.norm(vector))
        if not np.isfinite(vector).all() or norm == 0:
            raise InvalidPostError(f"post {self.id!r}: the vector must be finite and non-zero")
        parts = None if self.parts is None else self.parts.check(dimension, self.id)
        return replace(self, vector=vector / np.float32(norm), parts=parts)


def checked_upserts(posts: Sequence[PostUpsert], dimension: int) -> list[PostUpsert]:
    """``posts`` normalised (:meth:`PostUpsert.normalised`), once each id is there once: what an upsert call applies."""
    if not posts:
        raise InvalidPostError("upsert: no posts given")
    checked = []
    for post in posts:
        if not isinstance(post, PostUpsert):
            raise InvalidPostError(f"upsert: expected PostUpsert values, got {type(post).__name__}")
        checked.append(post.normalised(dimension))
    repeated = sorted(post_id for post_id, times in Counter(post.id for post in checked).items() if times > 1)
    if repeated:
        raise InvalidPostError(f"upsert: each id at most once per call; repeated: {repeated[:5]}")
    return checked


class Hit(NamedTuple):
    """One search result: a post, and the near-duplicates folded into it (best first)."""

    id: str
    score: float
    """Cosine similarity to the query."""
    caption: str = ""
    duplicates: tuple[SearchHit, ...] = ()
    """Lower-ranked results whose cosine to this one exceeded the collapse threshold; empty without collapse."""
    row: int = -1
    """The post's row in the engine's index, which splits its score (-1 where the engine has no rows)."""


@dataclass(frozen=True, kw_only=True)
class ChangeReceipt:
    """What one upsert or delete call did, once it is durable and visible."""

    sequence: int
    """The change's sequence number in the journal (Milvus: its acknowledgement time in microseconds); 0 when the
    call changed nothing."""
    upserted: int = 0
    replaced_ids: tuple[str, ...] = ()
    """Of the upserted posts, those that replaced a post with the same id."""
    deleted: int = 0
    unknown_ids: tuple[str, ...] = ()
    """Ids a delete named that no live post has: nothing was done for them."""

    @property
    def replaced(self) -> int:
        return len(self.replaced_ids)


@dataclass(frozen=True, kw_only=True)
class LiveIndexState:
    """Counts of a live index at one moment."""

    dimension: int
    weights_fingerprint: str
    base_version: str
    """Identity of the published version the changes apply to (a FAISS index: its ``index_sha256``)."""
    base_count: int
    """Posts of the published version."""
    live_count: int
    """Posts a search can return now."""
    upserted: int
    """Live posts written since the published version (new, or replacing one of it)."""
    deleted: int
    """Posts of the published version deleted or replaced since."""
    dead_rows: int
    """Stored vectors no search returns (deleted or replaced), until compaction drops them."""
    sequence: int
    """Sequence number of the last change applied."""
    journal_bytes: int


@dataclass(frozen=True, kw_only=True, eq=False)
class CompactedState:
    """The live posts at one sequence number: what a new index version is built from."""

    ids: list[str]
    vectors: np.ndarray
    """``[len(ids), dimension]`` float32, unit rows, row i the post ``ids[i]``."""
    captions: list[str]
    metadata: MetadataColumns
    sequence: int
    """The last change folded in: the new version's journal starts after it."""
    weights_fingerprint: str
    index_type: IndexType
    """The published version's index type (the new version is retrained and tuned on these vectors)."""
    unimodal: UnimodalVectors | None = None
    """Each post's unit image and text vectors and weights, row for row, when the engine has them for every
    live post; None otherwise (the new version then answers NaN score parts)."""


class LiveIndex(Protocol):
    """A served index that takes upserts and deletes, filters inside the search and finds posts like its own."""

    @property
    def dimension(self) -> int: ...

    def upsert(self, posts: Sequence[PostUpsert], *, weights_fingerprint: str) -> ChangeReceipt:
        """Add or replace ``posts`` as one atomic change; refused when ``weights_fingerprint`` is not the index's."""
        ...

    def delete(self, ids: Sequence[str]) -> ChangeReceipt:
        """Delete the posts with these ids as one atomic change; ids no post has are reported, not refused."""
        ...

    def search(
        self, queries: np.ndarray, k: int, *, where: PostFilter | None = None, collapse_above: float | None = None
    ) -> list[list[Hit]]:
        """The ``k`` posts most similar to each query (``[batch, dimension]`` float32) that pass ``where``.

        ``collapse_above``: fold each result whose cosine to a higher-ranked result exceeds it
        into that result, and still return ``k`` groups when there are that many.
        """
        ...

    def search_by_id(
        self, ids: Sequence[str], k: int, *, where: PostFilter | None = None, collapse_above: float | None = None
    ) -> list[list[Hit]]:
        """As :meth:`search`, each query being the stored vector of an indexed post, that post excluded.

        An id no live post has is an InvalidPostError naming it.
        """
        ...

    def compact(self) -> CompactedState:
        """The live posts, to build the next index version from."""
        ...

    def state(self) -> LiveIndexState: ...
