"""Retrieval benchmark: build time, latency, throughput, recall and size of each index type.

Two kinds of data (:class:`BenchData`). ``random``: unit vectors with every direction
equally likely, the hardest case for approximate search (no structure to exploit).
``clustered``: unit vectors drawn the way post embeddings fall, around subjects grouped
under broad topics (:class:`ClusteredVectors`); the queries are new posts on the same
subjects, never in the index. Each index is built as ``postsim index build`` builds it:
the parameters :func:`postsim.indexing.build.choose_index` picks for the corpus size,
then the search tuned on the corpus by :func:`postsim.indexing.build.tune_search`. It is
measured on the CPU and, when FAISS sees a GPU, again after moving it there the way the
``retrieval`` model does. ``postsim bench index`` calls :func:`run_index_benchmark` and
prints :func:`format_table`.
"""

from __future__ import annotations

import enum
import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import faiss
import numpy as np

from postsim.core.errors import SearchIndexError
from postsim.indexing.build import (
    IndexPlan,
    IndexType,
    choose_index,
    new_index,
    recall_of,
    train_index,
    tune_search,
)
from postsim.model_repository.search_index import gpu_available, index_to_gpu

logger = logging.getLogger("postsim")

DEFAULT_INDEX_TYPES = (IndexType.FLAT, IndexType.HNSW, IndexType.IVFPQ)
LATENCY_BUDGET_S = 30.0
"""Single-query latency is measured on at most this much time per index (at least 20 queries)."""
MIN_LATENCY_QUERIES = 20


class BenchData(enum.Enum):
    RANDOM = "random"
    """Uniformly random unit vectors: no structure, the worst case for approximate search."""
    CLUSTERED = "clustered"
    """Unit vectors around subjects grouped under topics, as post embeddings fall: :class:`ClusteredVectors`."""


@dataclass(frozen=True, kw_only=True)
class ClusteredVectors:
    """Synthetic post embeddings: ``subjects`` subjects under ``topics`` broad topics.

    Each topic is a random direction; each subject is its topic's direction plus noise
    (``subject_spread``); each post is its subject's direction plus noise (``post_spread``),
    normalised. Subject sizes follow a Zipf law (a few subjects hold many posts, as on a
    social network). With the defaults a post's cosine to its subject's other posts is
    about 0.5, to its topic's other posts about 0.25, to anything else about 0: the nearest
    neighbours of a post are posts on the same subject, some of them from neighbouring
    subjects of its topic. Noise is isotropic, so the spreads are in units of the direction
    they perturb: cosine to it ≈ 1 / sqrt(1 + spread²).
    """

    dim: int
    topics: int = 200
    subjects: int = 20_000
    subject_spread: float = 1.0
    post_spread: float = 1.0
    zipf_exponent: float = 1.0
    seed: int = 0

    @functools.cached_property
    def centres(self) -> tuple[np.ndarray, np.ndarray]:
        """The subjects' directions (unit rows) and each subject's share of the posts (drawn once)."""
        rng = np.random.default_rng(self.seed)
        topics = random_unit_vectors(rng, self.topics, self.dim)
        topic_of_subject = rng.integers(0, self.topics, size=self.subjects)
        subjects = topics[topic_of_subject] + _noise(rng, self.subjects, self.dim, self.subject_spread)
        faiss.normalize_L2(subjects)
        weights = 1.0 / np.arange(1, self.subjects + 1) ** self.zipf_exponent
        return subjects, rng.permutation(weights / weights.sum())

    def sample(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """``count`` posts (unit rows, float32) on subjects drawn by their share."""
        subjects, shares = self.centres
        subject_of_post = rng.choice(self.subjects, size=count, p=shares)
        vectors = np.empty((count, self.dim), dtype=np.float32)
        for start in range(0, count, _CHUNK):  # the noise in chunks: a second 1M × 256 array is 1 GB
            rows = slice(start, min(start + _CHUNK, count))
            chunk = subjects[subject_of_post[rows]] + _noise(rng, rows.stop - rows.start, self.dim, self.post_spread)
            faiss.normalize_L2(chunk)
            vectors[rows] = chunk
        return vectors


_CHUNK = 65_536


def _noise(rng: np.random.Generator, count: int, dim: int, spread: float) -> np.ndarray:
    """Isotropic Gaussian noise whose expected norm is ``spread``."""
    noise = rng.standard_normal((count, dim), dtype=np.float32)
    noise *= np.float32(spread / np.sqrt(dim))
    return noise


@dataclass(frozen=True, kw_only=True)
class IndexBenchResult:
    index_type: IndexType
    device: str
    """``cpu`` or ``gpu``."""
    searched_as: str
    """The FAISS class that answered the queries (GPU runs may search the exact vectors)."""
    count: int
    dim: int
    data: BenchData
    params: dict[str, int] = field(default_factory=dict)
    """As the index was searched: the search parameter as :func:`tune_search` chose it."""
    tuned_recall: float
    """Recall@10 :func:`tune_search` measured on posts of the index itself, for ``params``."""
    tune_s: float
    """Tuning the search on the corpus (0 for exact search)."""
    train_s: float
    """Training (IVF centroids, PQ codebooks); 0 for indexes without training. On the CPU."""
    add_s: float
    """Adding the vectors (for HNSW: building the graph). On the CPU."""
    p50_ms: float
    p95_ms: float
    """Single-query latency percentiles."""
    latency_queries: int
    """How many single queries the percentiles come from."""
    batch_qps: float
    """Queries per second when all queries are sent as one batch."""
    recall: float
    """Recall@k against exact search."""
    k: int
    memory_bytes: int
    """Size of the serialised CPU index (what ``index.faiss`` takes on disk and in memory)."""
    threads: int
    """FAISS's OpenMP threads during the CPU measurements."""


def run_index_benchmark(
    count: int = 1_000_000,
    dim: int = 256,
    queries: int = 1000,
    index_types: Sequence[IndexType] = DEFAULT_INDEX_TYPES,
    k: int = 10,
    seed: int = 0,
    *,
    data: BenchData = BenchData.RANDOM,
    use_gpu: bool | None = None,
    threads: int | None = None,
) -> list[IndexBenchResult]:
    """Benchmark each index type on ``count`` vectors of ``data`` and ``queries`` other queries.

    ``use_gpu``: ``None`` adds GPU rows when FAISS sees a GPU, ``False`` skips them,
    ``True`` requires a GPU. ``threads`` sets FAISS's OpenMP threads for the run (default:
    FAISS's own, one per core). At 1M vectors on 2 cores the HNSW build alone takes 10 to
    15 minutes; pass ``index_types`` without it for a quick run.
    """
    if count <= 0 or dim <= 0 or queries <= 0 or k <= 0:
        raise SearchIndexError(f"count, dim, queries and k must be positive, got {count=} {dim=} {queries=} {k=}")
    if use_gpu and not gpu_available():
        raise SearchIndexError("use_gpu=True, but FAISS sees no GPU: install faiss-gpu (`postsim[gpu]`)")
    with_gpu = gpu_available() if use_gpu is None else use_gpu
    previous_threads = faiss.omp_get_max_threads()
    if threads is not None:
        faiss.omp_set_num_threads(threads)
    try:
        return _run(count, dim, queries, index_types, k, seed, data=data, with_gpu=with_gpu)
    finally:
        faiss.omp_set_num_threads(previous_threads)


def _run(
    count: int,
    dim: int,
    queries: int,
    index_types: Sequence[IndexType],
    k: int,
    seed: int,
    *,
    data: BenchData,
    with_gpu: bool,
) -> list[IndexBenchResult]:
    base, probes = bench_vectors(data, count, queries, dim, seed)
    logger.info("exact search for the ground truth of %d queries over %d vectors", queries, count)
    _, truth = faiss.knn(probes, base, min(k, count), metric=faiss.METRIC_INNER_PRODUCT)

    results = []
    for index_type in index_types:
        plan = choose_index(count, dim, index_type)
        index, built = _build(plan, base, seed, data)
        results.append(_measure(index, "cpu", probes, truth, k, built))
        if with_gpu:
            gpu_index, resources = index_to_gpu(index)
            results.append(_measure(gpu_index, "gpu", probes, truth, k, built))
            del gpu_index, resources
        del index
    return results


def bench_vectors(data: BenchData, count: int, queries: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The indexed vectors and the queries (drawn alike, never the same vectors), unit rows."""
    rng = np.random.default_rng(seed)
    if data is BenchData.RANDOM:
        return random_unit_vectors(rng, count, dim), random_unit_vectors(rng, queries, dim)
    clustered = ClusteredVectors(dim=dim, seed=seed)
    return clustered.sample(count, rng), clustered.sample(queries, rng)


def random_unit_vectors(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((count, dim), dtype=np.float32)
    faiss.normalize_L2(vectors)
    return vectors


@dataclass(frozen=True)
class _Built:
    plan: IndexPlan
    data: BenchData
    train_s: float
    add_s: float
    tune_s: float
    tuned_recall: float
    memory_bytes: int


def _build(plan: IndexPlan, base: np.ndarray, seed: int, data: BenchData) -> tuple[faiss.Index, _Built]:
    logger.info("building %s (%s) over %d vectors", plan.index_type.value, plan.factory_string, len(base))
    index = new_index(plan)
    started = time.perf_counter()
    train_index(index, base, seed=seed)
    trained = time.perf_counter()
    index.add(base)
    added = time.perf_counter()
    tuning = tune_search(index, plan, base, seed=seed)
    tuned = time.perf_counter()
    memory = int(faiss.serialize_index(index).nbytes)
    return index, _Built(tuning.plan, data, trained - started, added - trained, tuned - added, tuning.recall, memory)


def _measure(
    index: faiss.Index, device: str, probes: np.ndarray, truth: np.ndarray, k: int, built: _Built
) -> IndexBenchResult:
    plan = built.plan
    logger.info("measuring %s on %s", plan.index_type.value, device)
    k = min(k, index.ntotal)
    latencies = _single_query_latencies(index, probes, k)
    started = time.perf_counter()
    _, found = index.search(probes, k)
    batch_s = time.perf_counter() - started
    result = IndexBenchResult(
        index_type=plan.index_type,
        device=device,
        searched_as=type(faiss.downcast_index(index)).__name__,
        count=index.ntotal,
        dim=plan.dimension,
        data=built.data,
        params=dict(plan.params),
        tuned_recall=built.tuned_recall,
        tune_s=built.tune_s,
        train_s=built.train_s,
        add_s=built.add_s,
        p50_ms=float(np.percentile(latencies, 50) * 1e3),
        p95_ms=float(np.percentile(latencies, 95) * 1e3),
        latency_queries=len(latencies),
        batch_qps=len(probes) / batch_s,
        recall=recall_of(truth, found),
        k=k,
        memory_bytes=built.memory_bytes,
        threads=faiss.omp_get_max_threads(),
    )
    logger.info("%s", result)
    return result


def _single_query_latencies(index: faiss.Index, probes: np.ndarray, k: int) -> list[float]:
    index.search(probes[:1], k)  # warm-up: first-call allocations, GPU kernels
    latencies: list[float] = []
    deadline = time.perf_counter() + LATENCY_BUDGET_S
    for probe in probes:
        started = time.perf_counter()
        index.search(probe[None, :], k)
        latencies.append(time.perf_counter() - started)
        if len(latencies) >= MIN_LATENCY_QUERIES and time.perf_counter() > deadline:
            break
    return latencies


def format_table(results: Sequence[IndexBenchResult]) -> str:
    """The results as a fixed-width text table, one row per index and device."""
    header = (
        "index",
        "device",
        "searched as",
        "params",
        "train s",
        "add s",
        "tune s",
        "p50 ms",
        "p95 ms",
        "batch q/s",
        "recall@k",
        "size MiB",
        "threads",
    )
    rows = [header]
    for r in results:
        params = " ".join(f"{name}={value}" for name, value in r.params.items()) or "-"
        rows.append(
            (
                r.index_type.value,
                r.device,
                r.searched_as,
                params,
                f"{r.train_s:.1f}",
                f"{r.add_s:.1f}",
                f"{r.tune_s:.1f}",
                f"{r.p50_ms:.2f}",
                f"{r.p95_ms:.2f}",
                f"{r.batch_qps:,.0f}",
                f"{r.recall:.3f}@{r.k}",
                f"{r.memory_bytes / 2**20:,.0f}",
                str(r.threads) if r.device == "cpu" else "-",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    if results:
        first = results[0]
        lines.append(f"{first.count:,} {first.data.value} unit vectors of {first.dim} floats")
    return "\n".join(lines)
