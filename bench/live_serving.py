"""Changes under load: upserts and deletes per second while ``similar_posts`` runs at a steady load.

Against a running server with a published index: ``concurrency`` clients send
``similar_posts`` queries back to back, first alone for ``duration_s`` (latency without
writes), then for the same time while one writer upserts new text posts in calls of
``batch`` and then deletes them again in calls of ``batch`` (latency with writes, and the
writer's rates, each change journalled and fsynced before it is acknowledged). A failed
query is counted, never retried. The posts it upserts carry the ids ``bench-live-*`` and
are all deleted again before it returns.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from postsim.client.api import PostSimClient
from postsim.client.posts import Post
from postsim.core.errors import BenchError, PostSimError

WORDS = ("cat", "meme", "sunset", "bay", "dog", "pizza", "train", "rain", "city", "beach", "river", "snow")


@dataclass(frozen=True, kw_only=True)
class LatencyStats:
    queries: int
    failed: int
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True, kw_only=True)
class LiveServingResult:
    without_writes: LatencyStats
    with_writes: LatencyStats
    upserts_per_s: float
    deletes_per_s: float
    upserted: int
    deleted: int
    batch: int
    concurrency: int


def _text(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, 12))


def _query_load(url: str, concurrency: int, stop: threading.Event) -> tuple[list[float], int]:
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()

    def client_loop(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with PostSimClient(url) as client:
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    client.similar(Post(text=_text(rng)), k=10)
                except PostSimError:
                    with lock:
                        failures[0] += 1
                    continue
                with lock:
                    latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=client_loop, args=(seed,)) for seed in range(concurrency)]
    for thread in threads:
        thread.start()
    stop.wait()
    for thread in threads:
        thread.join()
    return latencies, failures[0]


def _stats(latencies: list[float], failed: int) -> LatencyStats:
    if not latencies:
        raise BenchError(f"no query succeeded ({failed} failed): is the server serving an index?")
    p50, p99 = np.percentile(np.array(latencies) * 1000, [50, 99])
    return LatencyStats(queries=len(latencies), failed=failed, p50_ms=float(p50), p99_ms=float(p99))


def run_live_serving(
    url: str, *, duration_s: float = 10.0, concurrency: int = 2, batch: int = 8, seed: int = 0
) -> LiveServingResult:
    """Measure query latency without and with writes, and the writer's upserts and deletes per second."""
    if duration_s <= 0 or concurrency < 1 or batch < 1:
        raise BenchError(f"duration, concurrency and batch must be positive, got {duration_s}, {concurrency}, {batch}")
    stop = threading.Event()
    timer = threading.Timer(duration_s, stop.set)
    timer.start()
    quiet, quiet_failed = _query_load(url, concurrency, stop)

    stop = threading.Event()
    loaded: dict[str, tuple[list[float], int]] = {}
    load = threading.Thread(target=lambda: loaded.setdefault("load", _query_load(url, concurrency, stop)))
    load.start()
    rng = np.random.default_rng(seed)
    ids: list[str] = []
    try:
        with PostSimClient(url) as writer:
            started = time.perf_counter()
            while time.perf_counter() - started < duration_s / 2:
                chunk = [f"bench-live-{len(ids) + n}" for n in range(batch)]
                writer.upsert([Post(id=post_id, text=_text(rng)) for post_id in chunk])
                ids += chunk
            upsert_s = time.perf_counter() - started
            started = time.perf_counter()
            for start in range(0, len(ids), batch):
                writer.delete(ids[start : start + batch])
            delete_s = time.perf_counter() - started
    finally:
        stop.set()
        load.join()
    busy, busy_failed = loaded["load"]
    return LiveServingResult(
        without_writes=_stats(quiet, quiet_failed),
        with_writes=_stats(busy, busy_failed),
        upserts_per_s=len(ids) / upsert_s,
        deletes_per_s=len(ids) / delete_s,
        upserted=len(ids),
        deleted=len(ids),
        batch=batch,
        concurrency=concurrency,
    )


def format_live_serving(result: LiveServingResult) -> str:
    rows = [
        "| similar_posts load | queries | failed | p50 ms | p99 ms |",
        "|---|---|---|---|---|",
    ]
    for name, stats in (("without writes", result.without_writes), ("with writes", result.with_writes)):
        rows.append(f"| {name} | {stats.queries} | {stats.failed} | {stats.p50_ms:.1f} | {stats.p99_ms:.1f} |")
    rows.append("")
    rows.append(
        f"writer, calls of {result.batch} posts, beside {result.concurrency} query clients: "
        f"{result.upserts_per_s:.1f} upserts/s ({result.upserted} posts, embedded by the server), "
        f"{result.deletes_per_s:.1f} deletes/s"
    )
    return "\n".join(rows)
