"""A published FAISS index version that takes changes while it serves: the FAISS :class:`LiveIndex`.

**Rows.** The published version's posts are rows ``0 … n-1`` (its own order). Every
upserted post is added to the loaded index as the next row (IVF lists and PQ codes as
trained, the graph of HNSW, the full vectors every postsim index keeps); the row of a post
replaced or deleted is marked dead. Rows are never renumbered and what a row holds never
changes, only whether it is live, until :meth:`MutableIndex.compact` gathers the live rows
for a new version, retrained and tuned. The live index takes the loaded index over: it is
changed in memory only, and its file stays the one its checksums describe.

**Search.** Dead rows and rows a filter drops never reach FAISS's ranking: a bitmap of the
passing rows (:class:`~postsim.model_repository.live_index.filters.RowBitmap`) goes into the
search as an ID selector, for IVF-PQ into the IVF search under the exact rerank (FAISS 1.15
ignores a selector given to ``IndexRefine`` itself). When a filter lets few rows through
(:attr:`LiveSearchSettings.exact_fraction`) they are searched exactly, in the flat index of
full vectors the ANN index keeps; an ANN search that comes back with fewer than k results
while k rows pass is widened (``nprobe``, ``efSearch``) and then done exactly.

**Concurrency.** A :class:`~postsim.model_repository.live_index.locking.ReadWriteLock`:
searches share it; a change takes it alone, only to apply itself in memory, after its
journal record is written and fsynced (one writer at a time, in call order). So a search
sees the index as it was before or after each call, never half of one; a change waits for
the searches already running (milliseconds), and a search that starts after a change
returned sees it: a delete is effective when the call returns. Compaction copies the live
rows in chunks, each under the shared lock, from a snapshot of which rows were live, so
changes proceed while it copies and none of them is in its result.

**Memory** beyond the published index (measured figures in README): per row one byte of
liveness; per post the metadata columns (16 bytes, plus 12 per tag) and its id in a list
and a dict; per upserted post what the index keeps of it (its full vector, and for IVF-PQ
its code) and its score parts (``4 · dim + 4`` bytes at fp16, as ``unimodal.npz`` keeps
them), dead rows included until compaction; per search with a filter or dead rows, a
mask of one byte and a bitmap of one bit per row.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import faiss
import numpy as np

from postsim.core.errors import InvalidPostError, SearchIndexError
from postsim.model_repository.contract import MODALITIES
from postsim.model_repository.live_index.collapse import collapse_duplicates, optional_collapse_threshold
from postsim.model_repository.live_index.filters import PostFilter, RowBitmap, filter_mask
from postsim.model_repository.live_index.journal import ChangeBatch, ChangeJournal, Delete, JournalHeader
from postsim.model_repository.live_index.locking import ReadWriteLock
from postsim.model_repository.live_index.metadata import AppendableArray, MetadataColumns
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
from postsim.model_repository.score_parts import STORED_DTYPE, UnimodalVectors, split_gathered
from postsim.model_repository.search_index import (
    IndexType,
    LoadedIndex,
    SearchHit,
    check_queries,
    exact_storage,
)

logger = logging.getLogger("postsim")

Ranked = list[tuple[int, float]]
"""One query's results: (row, score), best first."""


@dataclass(frozen=True, kw_only=True)
class LiveSearchSettings:
    """How a live index searches; the defaults are postsim's."""

    exact_fraction: float = 0.05
    """A filter that lets at most this share of the published posts through is searched exactly:
    an ANN index probes its usual share of the data and finds too few of so few posts."""
    widen_factor: int = 4
    """How much an ANN search that came back short searches wider (``nprobe``, ``efSearch``), each step."""
    widen_steps: int = 3
    """Widening steps before the search is done exactly."""
    collapse_overfetch: int = 4
    """With near-duplicate collapse, candidates fetched per group asked for (then this many times more)."""
    max_collapse_candidates: int = 16_384
    compaction_chunk: int = 65_536
    """Rows copied per hold of the lock during compaction."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.exact_fraction <= 1.0:
            raise SearchIndexError(f"exact_fraction must be within 0 and 1, got {self.exact_fraction}")
        for name in ("widen_factor", "collapse_overfetch"):
            if getattr(self, name) < 2:
                raise SearchIndexError(f"{name} must be at least 2, got {getattr(self, name)}")
        for name in ("widen_steps", "max_collapse_candidates", "compaction_chunk"):
            if getattr(self, name) < 1:
                raise SearchIndexError(f"{name} must be positive, got {getattr(self, name)}")


class MutableIndex(LiveIndex):
    """A :class:`~postsim.model_repository.live_index.protocol.LiveIndex` over a loaded FAISS index version.

    Open it with :meth:`open`, which replays the version's journal. It takes the loaded
    index over: upserts are added to its CPU index (a GPU copy is not used), so search it
    through this object only.
    """

    def __init__(
        self,
        base: LoadedIndex,
        journal: ChangeJournal,
        *,
        metadata: MetadataColumns | None = None,
        settings: LiveSearchSettings | None = None,
    ) -> None:
        count = base.manifest.count
        storage = _full_vectors(base)
        if base.cpu_index.ntotal != count or storage.ntotal != count:
            raise SearchIndexError(
                f"the loaded index holds {base.cpu_index.ntotal} vectors, its manifest {count}: it was changed since it "
                "was loaded (a live index takes a loaded index over; load it again for another one)"
            )
        if metadata is not None and len(metadata) != count:
            raise SearchIndexError(f"metadata of {len(metadata)} rows for an index of {count} posts; rebuild the index")
        self.settings = settings or LiveSearchSettings()
        self._base = base
        self._index = base.cpu_index
        self._storage = storage
        self._count = count
        self._ids = list(base.ids)
        self._captions = list(base.captions)
        self._row_of = {post_id: row for row, post_id in enumerate(base.ids)}
        self._live = AppendableArray(np.bool_, np.ones(count, dtype=bool))
        self._metadata = metadata if metadata is not None else MetadataColumns.blank(count)
        self._upserted_parts = AppendableArray(STORED_DTYPE)
        """The score parts of rows ``count …``, one flat row of image, text and weights each (NaN: unknown)."""
        self._dead = 0
        self._dead_base = 0
        self._journal = journal
        self._sequence = journal.header.base_sequence
        self._unfiltered: _Selection | None = None
        self._lock = ReadWriteLock()
        self._write_mutex = threading.Lock()

    @classmethod
    def open(
        cls,
        base: LoadedIndex,
        journal_path: str | Path,
        *,
        metadata: MetadataColumns | None = None,
        base_sequence: int = 0,
        settings: LiveSearchSettings | None = None,
    ) -> MutableIndex:
        """``base`` with the changes of the journal at ``journal_path`` applied (a new, empty journal when there is none).

        ``metadata``: the base's rows (none: posts without metadata). ``base_sequence``: the
        last change already folded into ``base`` (0 for a version built from a corpus).
        """
        _full_vectors(base)  # before a journal is created for an index that cannot take changes
        header = JournalHeader(
            weights_fingerprint=base.manifest.weights_fingerprint,
            base_version=base.manifest.index_sha256,
            dimension=base.dimension,
            base_sequence=base_sequence,
        )
        journal, batches = ChangeJournal.open(journal_path, header)
        try:
            index = cls(base, journal, metadata=metadata, settings=settings)
            replayed: list[np.ndarray] = []
            for batch in batches:
                index._apply(batch, replayed)
            if replayed:  # one add: FAISS adds a batch far faster than many small ones
                index._index.add(np.concatenate(replayed))
        except BaseException:
            journal.close()
            raise
        if batches:
            state = index.state()
            logger.info(
                "replayed %d change batches onto %d posts: %d live (%d upserted, %d deleted or replaced)",
                len(batches),
                state.base_count,
                state.live_count,
                state.upserted,
                state.deleted,
            )
        return index

    @property
    def dimension(self) -> int:
        return self._base.dimension

    @property
    def weights_fingerprint(self) -> str:
        return self._base.manifest.weights_fingerprint

    # Changes

    def upsert(self, posts: Sequence[PostUpsert], *, weights_fingerprint: str) -> ChangeReceipt:
        if weights_fingerprint != self.weights_fingerprint:
            raise InvalidPostError(
                f"upsert: the posts were embedded by encoders with weights fingerprint {weights_fingerprint!r}, the "
                f"index holds embeddings of {self.weights_fingerprint!r}: embed them with the server that serves it"
            )
        checked = checked_upserts(posts, self.dimension)
        with self._write_mutex:
            replaced = tuple(post.id for post in checked if post.id in self._row_of)
            batch = self._journal.append(checked)
            with self._lock.write():
                self._apply(batch)
        return ChangeReceipt(sequence=batch.sequence, upserted=len(checked), replaced_ids=replaced)

    def delete(self, ids: Sequence[str]) -> ChangeReceipt:
        wanted = list(dict.fromkeys(check_post_id(post_id, "delete") for post_id in ids))
        if not wanted:
            raise InvalidPostError("delete: no ids given")
        with self._write_mutex:
            known = [post_id for post_id in wanted if post_id in self._row_of]
            unknown = tuple(post_id for post_id in wanted if post_id not in self._row_of)
            if not known:
                return ChangeReceipt(sequence=0, unknown_ids=unknown)
            batch = self._journal.append([Delete(post_id) for post_id in known])
            with self._lock.write():
                self._apply(batch)
        return ChangeReceipt(sequence=batch.sequence, deleted=len(known), unknown_ids=unknown)

    def _apply(self, batch: ChangeBatch, replayed: list[np.ndarray] | None = None) -> None:
        """Apply one journal batch in memory (the caller holds the write lock, or no one else has the index).

        With ``replayed``, the upserted vectors are appended to it instead of the index, for
        the caller to add them all at once, in order.
        """
        added: list[PostUpsert] = []
        for change in batch.changes:
            old = self._row_of.pop(change.id, None)
            if old is not None:
                self._live.values[old] = False
                self._dead += 1
                self._dead_base += old < self._count
            if isinstance(change, PostUpsert):
                self._row_of[change.id] = len(self._ids)
                self._ids.append(change.id)
                self._captions.append(change.caption)
                self._live.extend([True])
                added.append(change)
        if added:
            vectors = np.stack([post.vector for post in added])
            if replayed is None:
                self._index.add(vectors)
            else:
                replayed.append(vectors)
            self._metadata.append([post.metadata for post in added])
            self._upserted_parts.extend(np.concatenate([self._flat_parts(post) for post in added]))
        self._sequence = batch.sequence
        self._unfiltered = None

    # Searches

    def search(
        self, queries: np.ndarray, k: int, *, where: PostFilter | None = None, collapse_above: float | None = None
    ) -> list[list[Hit]]:
        k = check_k(k)
        threshold = optional_collapse_threshold(collapse_above)
        normalised = check_queries(queries, self.dimension)
        with self._lock.read():
            passing = self._passing(where)
            if threshold is not None:
                return [self._collapsed(query, k, passing, threshold) for query in normalised]
            return [self._hits(ranked) for ranked in self._ranked(normalised, k, passing)]

    def search_by_id(
        self, ids: Sequence[str], k: int, *, where: PostFilter | None = None, collapse_above: float | None = None
    ) -> list[list[Hit]]:
        k = check_k(k)
        threshold = optional_collapse_threshold(collapse_above)
        wanted = [check_post_id(post_id, "query id") for post_id in ids]
        with self._lock.read():
            unknown = [post_id for post_id in wanted if post_id not in self._row_of]
            if unknown:
                raise unknown_query_id(unknown[0])
            passing = self._passing(where)
            results = []
            for post_id in wanted:
                row = self._row_of[post_id]
                others = passing.without(row, self._live.values)
                query = self._vectors(np.array([row]))[0]
                if threshold is not None:
                    results.append(self._collapsed(query, k, others, threshold))
                else:
                    results.append(self._hits(self._ranked(query[None], k, others)[0]))
        return results

    def _passing(self, where: PostFilter | None) -> _Selection:
        """The rows a search with ``where`` may return; without a filter, the live rows, kept until the next change."""
        if where is not None and not where.is_empty:
            mask = filter_mask(where, self._metadata, self._row_of) & self._live.values
            return _Selection(mask, int(np.count_nonzero(mask)))
        unfiltered = self._unfiltered
        if unfiltered is None:  # two readers may both build it: the same value
            unfiltered = _Selection(self._live.values if self._dead else None, len(self._ids) - self._dead)
            self._unfiltered = unfiltered
        return unfiltered

    def _ranked(self, queries: np.ndarray, k: int, passing: _Selection) -> list[Ranked]:
        """Per query, the ``k`` best rows of those ``passing``."""
        if not passing.count:
            return [[] for _ in queries]
        k = min(k, passing.count)
        index_type = self._base.manifest.index_type
        if index_type is IndexType.FLAT or (
            passing.mask is not None and passing.count <= self.settings.exact_fraction * len(self._ids)
        ):
            return _search_flat(self._storage, queries, k, passing.bitmap)
        bitmap = passing.bitmap
        found = self._search_ann(queries, k, bitmap, widening=0)
        short = [position for position, ranked in enumerate(found) if len(ranked) < k]
        for widening in range(1, self.settings.widen_steps + 1):
            if not short or not self._can_widen(widening):
                break
            for position, ranked in zip(short, self._search_ann(queries[short], k, bitmap, widening), strict=True):
                found[position] = ranked
            short = [position for position in short if len(found[position]) < k]
        if short:
            for position, ranked in zip(short, _search_flat(self._storage, queries[short], k, bitmap), strict=True):
                found[position] = ranked
        return found

    def _search_ann(self, queries: np.ndarray, k: int, bitmap: RowBitmap | None, widening: int) -> list[Ranked]:
        """The ANN search of the published index, ``widening`` steps wider than its tuned parameters."""
        params = self._base.manifest.params
        wider = self.settings.widen_factor**widening
        selector = None if bitmap is None else bitmap.selector
        # FAISS keeps raw pointers to the selector and the IVF parameters: both stay referenced here until it returns.
        if self._base.manifest.index_type is IndexType.HNSW:
            hnsw_params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]  # missing from faiss-cpu's stubs
            hnsw_params.efSearch = max(k, params["efSearch"]) * wider
            hnsw_params.sel = selector
            search_params: faiss.SearchParameters = hnsw_params
        else:
            ivf_params = faiss.SearchParametersIVF()
            ivf_params.nprobe = min(self._nlist, params["nprobe"] * wider)
            ivf_params.sel = selector
            refine_params = faiss.IndexRefineSearchParameters()
            refine_params.k_factor = float(params["k_factor"])
            refine_params.base_index_params = ivf_params
            search_params = refine_params
        scores, rows = self._index.search(queries, k, params=search_params)
        return _ranked_lists(scores, rows)

    def _can_widen(self, widening: int) -> bool:
        """Whether ``widening`` steps search more than one step fewer did."""
        if self._base.manifest.index_type is not IndexType.IVFPQ:
            return True
        return self._base.manifest.params["nprobe"] * self.settings.widen_factor ** (widening - 1) < self._nlist

    @property
    def _bytes_per_row(self) -> int:
        """What the index keeps per row: the full vector, and for IVF-PQ its code and id in an inverted list."""
        params = self._base.manifest.params
        code = params["pq_m"] * params["pq_nbits"] // 8 + 8 if "pq_m" in params else 0
        links = 2 * params["M"] * 4 if "M" in params else 0  # HNSW's level-0 neighbour list
        return 4 * self.dimension + code + links

    @property
    def _nlist(self) -> int:
        refine = faiss.downcast_index(self._index)
        assert isinstance(refine, faiss.IndexRefine)
        return int(faiss.extract_index_ivf(refine.base_index).nlist)

    def _collapsed(self, query: np.ndarray, k: int, passing: _Selection, threshold: float) -> list[Hit]:
        """``k`` groups of near-duplicates, fetching more candidates until there are ``k`` or no more."""
        available = min(passing.count, self.settings.max_collapse_candidates)
        fetch = min(available, k * self.settings.collapse_overfetch)
        while True:
            ranked = self._ranked(query[None], max(fetch, 1), passing)[0]
            neighbours = [self._neighbour(row, score) for row, score in ranked]
            vectors = self._vectors(np.array([row for row, _ in ranked], dtype=np.int64))
            hits = collapse_duplicates(neighbours, vectors, above=threshold, k=k)
            if len(hits) >= k or fetch >= available:
                return hits
            fetch = min(available, fetch * self.settings.collapse_overfetch)

    def _neighbour(self, row: int, score: float) -> SearchHit:
        return SearchHit(self._ids[row], score, self._captions[row], row)

    def _hits(self, ranked: Ranked) -> list[Hit]:
        return [Hit(self._ids[row], score, self._captions[row], row=row) for row, score in ranked]

    # Score parts (contract.CONTRIBUTIONS)

    def stored_parts(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The unit image and text vectors and modality weights of posts queried by id, as float32.

        NaN for an id no live post has, for a post whose parts are unknown (upserted through a
        journal record without them), and for every published post of a version without unimodal vectors.
        """
        with self._lock.read():
            rows = np.array([self._row_of.get(post_id, -1) for post_id in ids], dtype=np.int64)
            return self._row_parts(rows)

    def split_scores(
        self, query_image: np.ndarray, query_text: np.ndarray, query_weights: np.ndarray, rows: np.ndarray
    ) -> np.ndarray:
        """The four parts of each hit's score (``[batch, k, 4]``) from the hits' ``rows``.

        The published rows' parts come from the version's ``unimodal.npz``, an upserted row's
        from its change; NaN where they are unknown (:meth:`stored_parts`).
        """
        with self._lock.read():
            image, text, weights = self._row_parts(rows)
        return split_gathered(query_image, query_text, query_weights, image, text, weights)

    def split_hits(
        self, query_image: np.ndarray, query_text: np.ndarray, query_weights: np.ndarray, hits: list[list[Hit]]
    ) -> np.ndarray:
        """:meth:`split_scores` of the rows of ``hits`` (every row of ``hits`` holds the same number of hits)."""
        rows = np.array([[hit.row for hit in row] for row in hits], dtype=np.int64).reshape(len(hits), -1)
        return self.split_scores(query_image, query_text, query_weights, rows)

    def _row_parts(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The parts of ``rows`` (any shape; -1: none) as float32 ``[..., dim]``, ``[..., dim]``, ``[..., 2]``,
        NaN where unknown. The caller holds the lock (appends move the upserted rows' array)."""
        dimension = self.dimension
        flat = np.full((*rows.shape, 2 * dimension + len(MODALITIES)), np.nan, dtype=np.float32)
        unimodal = self._base.unimodal
        published = (rows >= 0) & (rows < self._count)
        if unimodal is not None:
            stored = rows[published]
            flat[published] = np.concatenate(
                [unimodal.image[stored], unimodal.text[stored], unimodal.weights[stored]], 1
            )
        upserted = rows >= self._count
        flat[upserted] = self._upserted_parts.values.reshape(-1, flat.shape[-1])[rows[upserted] - self._count]
        return flat[..., :dimension], flat[..., dimension : 2 * dimension], flat[..., 2 * dimension :]

    def _flat_parts(self, post: PostUpsert) -> np.ndarray:
        """One upserted row of :attr:`_upserted_parts`: image, text and weights end to end, NaN when unknown."""
        if post.parts is None:
            return np.full(2 * self.dimension + len(MODALITIES), np.nan, dtype=np.float32)
        return np.concatenate([post.parts.image, post.parts.text, post.parts.weights])

    def _vectors(self, rows: np.ndarray) -> np.ndarray:
        """The stored unit vectors of ``rows``."""
        vectors: np.ndarray = self._storage.reconstruct_batch(rows)
        return vectors

    # State

    def state(self) -> LiveIndexState:
        with self._lock.read():
            return LiveIndexState(
                dimension=self.dimension,
                weights_fingerprint=self.weights_fingerprint,
                base_version=self._journal.header.base_version,
                base_count=self._count,
                live_count=len(self._ids) - self._dead,
                upserted=len(self._ids) - self._count - (self._dead - self._dead_base),
                deleted=self._dead_base,
                dead_rows=self._dead,
                sequence=self._sequence,
                journal_bytes=self._journal.size_bytes,
            )

    def compact(self) -> CompactedState:
        with self._lock.read():
            rows = np.flatnonzero(self._live.values)
            sequence = self._sequence
            ids = [self._ids[row] for row in rows]
            captions = [self._captions[row] for row in rows]
            metadata = self._metadata.take(rows)
        vectors = np.empty((len(rows), self.dimension), dtype=np.float32)
        image = np.empty((len(rows), self.dimension), dtype=STORED_DTYPE)
        text = np.empty_like(image)
        weights = np.empty((len(rows), len(MODALITIES)), dtype=STORED_DTYPE)
        chunk = self.settings.compaction_chunk
        for start in range(0, len(rows), chunk):
            with self._lock.read():  # rows never change, but the storage moves when it grows
                vectors[start : start + chunk] = self._vectors(rows[start : start + chunk])
                parts = self._row_parts(rows[start : start + chunk])
            for array, part in zip((image, text, weights), parts, strict=True):
                array[start : start + chunk] = part
        logger.info("compaction: %d live posts at change %d (%d dead rows left out)", len(rows), sequence, self._dead)
        unknown = int(np.count_nonzero(np.isnan(weights).all(axis=1)))
        kept = None
        if unknown < len(rows):
            kept = UnimodalVectors(image=image, text=text, weights=weights)
        if unknown:
            logger.warning(
                "compaction: the score parts of %d of %d live posts are unknown (published without unimodal "
                "vectors, or upserted through a journal record without parts): their CONTRIBUTIONS stay NaN; "
                "`postsim index build` and publish restore them",
                unknown,
                len(rows),
            )
        return CompactedState(
            ids=ids,
            vectors=vectors,
            captions=captions,
            metadata=metadata,
            sequence=sequence,
            weights_fingerprint=self.weights_fingerprint,
            index_type=self._base.manifest.index_type,
            unimodal=kept,
        )

    def changes_after(self, sequence: int) -> list[ChangeBatch]:
        """The journal's change batches after ``sequence``: what a version compacted at ``sequence`` lacks."""
        with self._write_mutex:
            return [batch for batch in self._journal.read() if batch.sequence > sequence]

    def memory_bytes(self) -> dict[str, int]:
        """Memory held beyond the published index, per part (the Python containers estimated with ``sys.getsizeof``)."""
        with self._lock.read():
            strings = sum(sys.getsizeof(post_id) for post_id in self._ids)
            return {
                "ids (list, dict, strings)": sys.getsizeof(self._ids) + sys.getsizeof(self._row_of) + strings,
                "captions (list)": sys.getsizeof(self._captions),
                "liveness": self._live.nbytes,
                "metadata columns": self._metadata.nbytes,
                "upserted rows in the index": (len(self._ids) - self._count) * self._bytes_per_row,
                "upserted rows' score parts": self._upserted_parts.nbytes,
                "per filtered search (mask and bitmap)": len(self._ids) + (len(self._ids) + 7) // 8,
            }

    def close(self) -> None:
        """Close the journal; the index takes no more changes."""
        with self._write_mutex:
            self._journal.close()

    def __enter__(self) -> MutableIndex:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def _full_vectors(base: LoadedIndex) -> faiss.Index:
    """The flat index of the base's full vectors, which a live index needs (exact search, by id, compaction)."""
    storage = exact_storage(base.cpu_index)
    if storage is None:
        raise SearchIndexError(
            f"a {type(faiss.downcast_index(base.cpu_index)).__name__} keeps no full vectors, which a live index "
            "needs (to search exactly, by id, and to compact): rebuild it with `postsim index build`"
        )
    return storage


def _search_flat(index: faiss.Index, queries: np.ndarray, k: int, bitmap: RowBitmap | None) -> list[Ranked]:
    """Exact search of a flat index over the rows ``bitmap`` keeps (every row when None)."""
    if bitmap is None:
        scores, rows = index.search(queries, k)
    else:
        params = faiss.SearchParameters()
        params.sel = bitmap.selector  # bitmap, referenced by the caller, keeps the bits FAISS reads
        scores, rows = index.search(queries, k, params=params)
    return _ranked_lists(scores, rows)


class _Selection:
    """The rows a search may return: a mask (None: every row), how many, and its FAISS bitmap, built when first used."""

    def __init__(self, mask: np.ndarray | None, count: int) -> None:
        self.mask = mask
        self.count = count
        self._bitmap: RowBitmap | None = None

    @property
    def bitmap(self) -> RowBitmap | None:
        if self.mask is not None and self._bitmap is None:
            self._bitmap = RowBitmap(self.mask)
        return self._bitmap

    def without(self, row: int, live: np.ndarray) -> _Selection:
        """These rows less ``row`` (the post a search by id starts from)."""
        mask = (live if self.mask is None else self.mask).copy()
        passed = bool(mask[row])
        mask[row] = False
        return _Selection(mask, self.count - passed)


def _ranked_lists(scores: np.ndarray, rows: np.ndarray) -> list[Ranked]:
    """FAISS's result arrays as (row, score) lists, its -1 padding left out."""
    return [
        [(int(row), float(score)) for row, score in zip(row_ids, row_scores, strict=True) if row >= 0]
        for row_ids, row_scores in zip(rows, scores, strict=True)
    ]
