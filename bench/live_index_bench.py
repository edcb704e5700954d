"""Live-index benchmark: recall@k after a share of the posts changed, before and after compaction.

A version is built as ``postsim index build`` builds one (:func:`~postsim.client.indexing.build_index_dir`:
the index chosen for the corpus size, its search tuned on the corpus) over clustered
vectors (:class:`~postsim.bench.index_bench.ClusteredVectors`). Then a share of its posts
changes through a :class:`~postsim.model_repository.live_index.mutable_index.MutableIndex`,
in calls of ``batch`` changes, each journalled and fsynced: some deleted, some replaced by a
new vector, some new posts added. Recall@k is measured against exact search over the posts
live at that point, on queries drawn like the posts and never indexed: on the published
version before any change, on the live index after the changes (deleted rows excluded by
the selector, new vectors searched exactly beside the ANN index), and on the version
compacted from it (retrained and tuned on the current posts). A filter keeping about 3%
of the posts (one label of 33) is measured too, on the live index: it must be exact.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from postsim.bench.index_bench import ClusteredVectors
from postsim.core.errors import SearchIndexError
from postsim.indexing.build import build_index_dir, recall_of
from postsim.model_repository.live_index.filters import PostFilter
from postsim.model_repository.live_index.journal import ChangeJournal, JournalHeader
from postsim.model_repository.live_index.metadata import MetadataColumns, PostMetadata
from postsim.model_repository.live_index.mutable_index import MutableIndex
from postsim.model_repository.live_index.protocol import PostUpsert
from postsim.model_repository.search_index import IndexType, load_index_dir

logger = logging.getLogger("postsim")

BENCH_FINGERPRINT = "live-index-bench"
LABELS = 33
"""Labels drawn uniformly: one label keeps about 3% of the posts."""
LATENCY_QUERIES = 200


@dataclass(frozen=True, kw_only=True)
class ChangeRecallResult:
    """What :func:`run_change_recall` measured."""

    posts: int
    dim: int
    index_type: IndexType
    params: dict[str, int]
    """The published version's parameters, as tuned on the corpus."""
    deleted: int
    replaced: int
    added: int
    changes_per_s: float
    """Changes applied per second, journal fsync included, in calls of ``batch`` changes."""
    replay_s: float
    """Opening the published version's journal after the changes and replaying them (a restart)."""
    batch: int
    k: int
    queries: int
    recall_published: float
    """Recall@k of the published version before any change."""
    recall_live: float
    """Recall@k of the live index after the changes, against exact search over the live posts."""
    recall_compacted: float
    """Recall@k of the version compacted from the live index (retrained and tuned)."""
    recall_filtered: float
    """Recall@k of the live index with a filter keeping one label of :data:`LABELS` (about 3%)."""
    p50_ms_published: float
    p50_ms_live: float
    p50_ms_compacted: float
    p50_ms_filtered: float
    """Median CPU milliseconds of one query (FAISS on one thread) on each index; the last with the 3% filter."""
    compaction_s: float
    """Snapshot of the live posts plus build and tuning of the new version (written to disk)."""
    memory_bytes: dict[str, int] = field(default_factory=dict)
    """The live index's memory beyond the published index, per part, after the changes."""


def run_change_recall(
    work_dir: Path,
    *,
    posts: int = 200_000,
    dim: int = 256,
    changed_share: float = 0.10,
    queries: int = 1000,
    k: int = 10,
    batch: int = 100,
    index_type: IndexType = IndexType.IVFPQ,
    seed: int = 0,
) -> ChangeRecallResult:
    """Recall@k before and after compaction once ``changed_share`` of the posts changed.

    The change is split evenly between deletes, replacements and new posts. Index versions
    and journals go under ``work_dir``.
    """
    if posts <= 0 or dim <= 0 or queries <= 0 or k <= 0 or batch <= 0 or not 0 < changed_share < 1:
        raise SearchIndexError(
            f"posts, dim, queries, k and batch must be positive and changed_share within 0 and 1, got {posts=} "
            f"{dim=} {queries=} {k=} {batch=} {changed_share=}"
        )
    rng = np.random.default_rng(seed)
    each = max(1, round(posts * changed_share / 3))
    clustered = ClusteredVectors(dim=dim, seed=seed)
    corpus = _Corpus(clustered.sample(posts + 2 * each, rng), rng.integers(0, LABELS, size=posts + 2 * each), posts)
    probes = clustered.sample(queries, rng)
    metadata = [PostMetadata(label=f"l{label}") for label in corpus.labels]

    logger.info("building the published version over %d posts", posts)
    ids = [str(row) for row in range(posts)]
    build_index_dir(
        work_dir / "published",
        ids,
        corpus.vectors[:posts],
        weights_fingerprint=BENCH_FINGERPRINT,
        index_type=index_type,
    )
    published = load_index_dir(work_dir / "published", BENCH_FINGERPRINT, use_gpu=False)
    index = MutableIndex.open(published, work_dir / "published.journal", metadata=MetadataColumns.of(metadata[:posts]))
    recall_published = _recall(index, probes, corpus, k)
    p50_published = _p50_ms(index, probes, k)

    changes_per_s = _change(index, rng, corpus, metadata, each, batch)
    index.close()  # and start again from the published version and its journal, as a restarted server does
    published = load_index_dir(work_dir / "published", BENCH_FINGERPRINT, use_gpu=False)
    started = time.perf_counter()
    index = MutableIndex.open(published, work_dir / "published.journal", metadata=MetadataColumns.of(metadata[:posts]))
    replay_s = time.perf_counter() - started
    rare = PostFilter(labels=frozenset({"l0"}))
    recall_live = _recall(index, probes, corpus, k)
    recall_filtered = _recall(index, probes, corpus, k, where=rare, label=0)
    p50_live, p50_filtered = _p50_ms(index, probes, k), _p50_ms(index, probes, k, where=rare)
    memory = index.memory_bytes()

    started = time.perf_counter()
    compacted = index.compact()
    logger.info("building the compacted version over %d posts", len(compacted.ids))
    build_index_dir(
        work_dir / "compacted",
        compacted.ids,
        compacted.vectors,
        weights_fingerprint=compacted.weights_fingerprint,
        index_type=compacted.index_type,
    )
    compaction_s = time.perf_counter() - started
    index.close()
    new_version = load_index_dir(work_dir / "compacted", BENCH_FINGERPRINT, use_gpu=False)
    header = JournalHeader(
        weights_fingerprint=BENCH_FINGERPRINT,
        base_version=new_version.manifest.index_sha256,
        dimension=dim,
        base_sequence=compacted.sequence,
    )
    ChangeJournal.create(work_dir / "compacted.journal", header).close()
    with MutableIndex.open(
        new_version, work_dir / "compacted.journal", metadata=compacted.metadata, base_sequence=compacted.sequence
    ) as compacted_index:
        recall_compacted = _recall(compacted_index, probes, corpus, k)
        p50_compacted = _p50_ms(compacted_index, probes, k)
    return ChangeRecallResult(
        posts=posts,
        dim=dim,
        index_type=published.manifest.index_type,
        params=dict(published.manifest.params),
        deleted=each,
        replaced=each,
        added=each,
        changes_per_s=changes_per_s,
        replay_s=replay_s,
        batch=batch,
        k=k,
        queries=queries,
        recall_published=recall_published,
        recall_live=recall_live,
        recall_compacted=recall_compacted,
        recall_filtered=recall_filtered,
        p50_ms_published=p50_published,
        p50_ms_live=p50_live,
        p50_ms_compacted=p50_compacted,
        p50_ms_filtered=p50_filtered,
        compaction_s=compaction_s,
        memory_bytes=memory,
    )


class _Corpus:
    """The bench's posts: row i of ``vectors`` is a version of the post ``id_of_row[i]``, live or not."""

    def __init__(self, vectors: np.ndarray, labels: np.ndarray, posts: int) -> None:
        self.vectors = vectors
        self.labels = labels
        self.id_of_row = np.arange(len(vectors))
        self.live = np.arange(len(vectors)) < posts
        self.posts = posts


def _change(
    index: MutableIndex,
    rng: np.random.Generator,
    corpus: _Corpus,
    metadata: Sequence[PostMetadata],
    each: int,
    batch: int,
) -> float:
    """Delete ``each`` posts, replace ``each`` by the rows past ``posts + each``, add ``each``; return changes/s."""
    chosen = rng.choice(corpus.posts, size=2 * each, replace=False)
    deleted, replaced = chosen[:each], chosen[each:]
    added = np.arange(corpus.posts, corpus.posts + each)
    new_rows = np.arange(corpus.posts + each, corpus.posts + 2 * each)
    corpus.id_of_row[new_rows] = replaced
    upserts = [
        PostUpsert(id=str(corpus.id_of_row[row]), vector=corpus.vectors[row], metadata=metadata[row])
        for row in np.concatenate([added, new_rows])
    ]
    order = rng.permutation(len(upserts) + each)  # upserts and deletes interleaved
    calls = [order[start : start + batch] for start in range(0, len(order), batch)]
    started = time.perf_counter()
    for done, call in enumerate(calls, start=1):
        posted = [upserts[position] for position in call if position < len(upserts)]
        gone = [str(deleted[position - len(upserts)]) for position in call if position >= len(upserts)]
        if posted:
            index.upsert(posted, weights_fingerprint=BENCH_FINGERPRINT)
        if gone:
            index.delete(gone)
        if done % max(1, len(calls) // 10) == 0:
            logger.info("changes: %d of %d calls", done, len(calls))
    elapsed = time.perf_counter() - started
    corpus.live[deleted] = corpus.live[replaced] = False
    corpus.live[added] = corpus.live[new_rows] = True
    return 3 * each / elapsed


def _recall(
    index: MutableIndex,
    probes: np.ndarray,
    corpus: _Corpus,
    k: int,
    *,
    where: PostFilter | None = None,
    label: int | None = None,
) -> float:
    """Recall@k of ``index`` against exact search over the live rows (with ``label``, when given)."""
    rows = np.flatnonzero(corpus.live if label is None else corpus.live & (corpus.labels == label))
    _, found = faiss.knn(probes, corpus.vectors[rows], min(k, len(rows)), metric=faiss.METRIC_INNER_PRODUCT)
    truth = corpus.id_of_row[rows[found]]
    results = index.search(probes, k, where=where)
    return recall_of(truth, [[int(hit.id) for hit in hits] for hits in results])


def _p50_ms(index: MutableIndex, probes: np.ndarray, k: int, *, where: PostFilter | None = None) -> float:
    """Median CPU time of one query, FAISS on one thread: what a query costs, whatever else runs on the machine."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        latencies = []
        for probe in probes[:LATENCY_QUERIES]:
            started = time.process_time()
            index.search(probe[None], k, where=where)
            latencies.append(1000 * (time.process_time() - started))
    finally:
        faiss.omp_set_num_threads(threads)
    return statistics.median(latencies)


def format_change_recall(result: ChangeRecallResult) -> str:
    """A short markdown report of :func:`run_change_recall`."""
    changed = result.deleted + result.replaced + result.added
    lines = [
        f"{result.posts:,} posts of {result.dim} floats, {result.index_type.value} {result.params}; "
        f"{changed:,} changes ({result.deleted:,} deleted, {result.replaced:,} replaced, {result.added:,} added) "
        f"at {result.changes_per_s:,.0f}/s in calls of {result.batch}, replayed in {result.replay_s:.1f} s; "
        f"recall@{result.k} on {result.queries} queries",
        "",
        "| index | recall@k | CPU ms per query (median, 1 thread) |",
        "|---|---:|---:|",
        f"| published, before the changes | {result.recall_published:.3f} | {result.p50_ms_published:.2f} |",
        f"| live, after the changes | {result.recall_live:.3f} | {result.p50_ms_live:.2f} |",
        f"| live, 3% filter | {result.recall_filtered:.3f} | {result.p50_ms_filtered:.2f} |",
        f"| compacted ({result.compaction_s:.0f} s) | {result.recall_compacted:.3f} | {result.p50_ms_compacted:.2f} |",
        "",
        "| memory beyond the published index | bytes per post |",
        "|---|---:|",
    ]
    lines += [f"| {part} | {size / result.posts:.1f} |" for part, size in result.memory_bytes.items()]
    return "\n".join(lines)
