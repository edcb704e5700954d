"""Retrieval benchmark: build time, latency, throughput, recall and size of each index type.

Runs on random unit vectors, the hardest case for approximate search (no clusters, every
direction equally likely), with the parameters :func:`postsim.client.indexing.choose_index`
picks for the corpus size. Each index is measured on the CPU and, when FAISS sees a GPU,
again after moving it there the way the ``retrieval`` model does. ``postsim bench index``
calls :func:`run_index_benchmark` and prints :func:`format_table`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import faiss
import numpy as np

from postsim.client.indexing import IndexPlan, IndexType, choose_index, new_index, train_index
from postsim.model_repository.errors import SearchIndexError
from postsim.model_repository.search_index import gpu_available, index_to_gpu

logger = logging.getLogger("postsim")

DEFAULT_INDEX_TYPES = (IndexType.FLAT, IndexType.HNSW, IndexType.IVFPQ)
LATENCY_BUDGET_S = 30.0
"""Single-query latency is measured on at most this much time per index (at least 20 queries)."""
MIN_LATENCY_QUERIES = 20


@dataclass(frozen=True, kw_only=True)
class IndexBenchResult:
    index_type: IndexType
    device: str
    """``cpu`` or ``gpu``."""
    searched_as: str
    """The FAISS class that answered the queries (GPU runs may search the exact vectors)."""
    count: int
    dim: int
    params: dict[str, int] = field(default_factory=dict)
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
    use_gpu: bool | None = None,
    threads: int | None = None,
) -> list[IndexBenchResult]:
    """Benchmark each index type on ``count`` random unit vectors and ``queries`` queries.

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
        return _run(count, dim, queries, index_types, k, seed, with_gpu=with_gpu)
    finally:
        faiss.omp_set_num_threads(previous_threads)


def _run(
    count: int, dim: int, queries: int, index_types: Sequence[IndexType], k: int, seed: int, *, with_gpu: bool
) -> list[IndexBenchResult]:
    rng = np.random.default_rng(seed)
    base = random_unit_vectors(rng, count, dim)
    probes = random_unit_vectors(rng, queries, dim)
    logger.info("exact search for the ground truth of %d queries over %d vectors", queries, count)
    _, truth = faiss.knn(probes, base, min(k, count), metric=faiss.METRIC_INNER_PRODUCT)

    results = []
    for index_type in index_types:
        plan = choose_index(count, dim, index_type)
        index, built = _build(plan, base, seed)
        results.append(_measure(index, "cpu", probes, truth, k, built))
        if with_gpu:
            gpu_index, resources = index_to_gpu(index)
            results.append(_measure(gpu_index, "gpu", probes, truth, k, built))
            del gpu_index, resources
        del index
    return results


def random_unit_vectors(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((count, dim), dtype=np.float32)
    faiss.normalize_L2(vectors)
    return vectors


@dataclass(frozen=True)
class _Built:
    plan: IndexPlan
    train_s: float
    add_s: float
    memory_bytes: int


def _build(plan: IndexPlan, base: np.ndarray, seed: int) -> tuple[faiss.Index, _Built]:
    logger.info("building %s (%s) over %d vectors", plan.index_type.value, plan.factory_string, len(base))
    index = new_index(plan)
    started = time.perf_counter()
    train_index(index, base, seed=seed)
    trained = time.perf_counter()
    index.add(base)
    added = time.perf_counter()
    memory = int(faiss.serialize_index(index).nbytes)
    return index, _Built(plan, trained - started, added - trained, memory)


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
        params=dict(plan.params),
        train_s=built.train_s,
        add_s=built.add_s,
        p50_ms=float(np.percentile(latencies, 50) * 1e3),
        p95_ms=float(np.percentile(latencies, 95) * 1e3),
        latency_queries=len(latencies),
        batch_qps=len(probes) / batch_s,
        recall=_recall(found, truth),
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


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(expected) & set(row[row >= 0])) for expected, row in zip(truth, found, strict=True))
    return hits / truth.size


def format_table(results: Sequence[IndexBenchResult]) -> str:
    """The results as a fixed-width text table, one row per index and device."""
    header = (
        "index",
        "device",
        "searched as",
        "params",
        "train s",
        "add s",
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
        lines.append(f"{first.count:,} random unit vectors of {first.dim} floats")
    return "\n".join(lines)
