"""``postsim bench soak``: a steady load on a running server for a long time, watched as it goes.

``concurrency`` workers each keep one request in flight (one post per request) against the
server at ``url`` for ``duration_s``: ``post_embedding``, and every ``similar_every``-th
request ``similar_posts`` when an index is published. A healthy server answers every one
(:attr:`SoakReport.failed` is 0) at a latency that does not drift, and its memory does not
grow: the report has p50/p99 latency per interval (every ``interval_s``), the errors by
message, and the memory of the server at the start and the end (given ``server_pid``):
tritonserver's resident memory, each Python-backend stub's, its shared-memory region's,
and how full ``/dev/shm`` is. A warm-up (``warmup_s``, under the same load) comes first, so
the start is measured once the server has allocated what it needs to run at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from postsim.bench.workload import Workload, load_bench_posts, write_workload_corpus
from postsim.client.api import AsyncPostSimClient, PostSimClient
from postsim.client.posts import Post
from postsim.client.settings import ClientSettings
from postsim.core.errors import BenchError, PostSimError
from postsim.model_repository import contract
from postsim.server.processes import process_rss_bytes, stub_processes
from postsim.server.shared_memory import SHM_DIR

logger = logging.getLogger("postsim")

DEFAULT_SOAK_POSTS = 64
_MIB = 1 << 20


# --------------------------------------------------------------------------- memory


@dataclass(frozen=True, kw_only=True)
class StubMemory:
    """One Python-backend stub (one model instance) of the server."""

    model: str
    version: str
    pid: int
    rss_bytes: int | None
    shm_bytes: int | None
    """Bytes its shared-memory region holds in /dev/shm (None: region not found)."""


@dataclass(frozen=True, kw_only=True)
class MemorySnapshot:
    at_s: float
    """Seconds since the soak started."""
    server_rss_bytes: int | None
    """tritonserver's resident memory; None without a server pid or when it is gone."""
    stubs: tuple[StubMemory, ...]
    dev_shm_used_bytes: int | None
    """Used bytes of the /dev/shm file system (every process's, not only this server's)."""

    @property
    def total_rss_bytes(self) -> int | None:
        """tritonserver's and its stubs' resident memory together."""
        if self.server_rss_bytes is None:
            return None
        return self.server_rss_bytes + sum(stub.rss_bytes or 0 for stub in self.stubs)

    @property
    def stub_shm_bytes(self) -> int:
        return sum(stub.shm_bytes or 0 for stub in self.stubs)


def _region_bytes(region: str) -> int | None:
    try:
        return (SHM_DIR / region).stat().st_blocks * 512
    except OSError:
        return None


def _dev_shm_used_bytes() -> int | None:
    try:
        stats = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return (stats.f_blocks - stats.f_bfree) * stats.f_frsize


def memory_snapshot(server_pid: int | None, at_s: float = 0.0) -> MemorySnapshot:
    """The memory of tritonserver ``server_pid`` and its stubs now (only /dev/shm without a pid)."""
    stubs: tuple[StubMemory, ...] = ()
    server_rss = None
    if server_pid is not None:
        server_rss = process_rss_bytes(server_pid)
        stubs = tuple(
            StubMemory(
                model=stub.model,
                version=stub.version,
                pid=stub.pid,
                rss_bytes=process_rss_bytes(stub.pid),
                shm_bytes=_region_bytes(stub.shm_region),
            )
            for stub in sorted(stub_processes(server_pid), key=lambda stub: (stub.model, stub.version, stub.pid))
        )
    return MemorySnapshot(at_s=at_s, server_rss_bytes=server_rss, stubs=stubs, dev_shm_used_bytes=_dev_shm_used_bytes())


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, kw_only=True)
class IntervalStats:
    """The requests that finished in one interval of the soak."""

    start_s: float
    end_s: float
    requests: int
    failed: int
    p50_ms: float
    p99_ms: float
    """Latency percentiles of the requests that succeeded (NaN when none did)."""
    total_rss_bytes: int | None = None
    """tritonserver and its stubs at the end of the interval (None without a server pid)."""

    @property
    def requests_per_s(self) -> float:
        return self.requests / max(self.end_s - self.start_s, 1e-9)


@dataclass(frozen=True, kw_only=True)
class SoakReport:
    url: str
    concurrency: int
    duration_s: float
    """How long the load was held (the last requests may end a little later)."""
    interval_s: float
    models: tuple[str, ...]
    """The ensembles the load went to."""
    requests: int
    failed: int
    """Requests and failures after the warm-up."""
    warmup_s: float
    warmup_requests: int
    warmup_failed: int
    intervals: tuple[IntervalStats, ...]
    errors: tuple[tuple[str, int], ...]
    """Each distinct error message and how often it came, most frequent first."""
    start_memory: MemorySnapshot
    end_memory: MemorySnapshot
    posts: str = ""
    """What was sent: a ``Workload.label``, or "given posts"."""

    @property
    def ok(self) -> bool:
        """Every request answered, warm-up included."""
        return self.failed == 0 and self.warmup_failed == 0 and self.requests > 0


@dataclass(frozen=True)
class _Call:
    end_s: float
    latency_s: float
    error: str | None


def _percentile_ms(latencies: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(latencies) * 1e3, q)) if latencies else float("nan")


def _interval(calls: Sequence[_Call], start_s: float, end_s: float, total_rss: int | None) -> IntervalStats:
    inside = [call for call in calls if start_s <= call.end_s < end_s]
    latencies = [call.latency_s for call in inside if call.error is None]
    return IntervalStats(
        start_s=start_s,
        end_s=end_s,
        requests=len(inside),
        failed=sum(call.error is not None for call in inside),
        p50_ms=_percentile_ms(latencies, 50),
        p99_ms=_percentile_ms(latencies, 99),
        total_rss_bytes=total_rss,
    )


# --------------------------------------------------------------------------- the soak


def default_soak_posts(n: int = DEFAULT_SOAK_POSTS, workload: Workload = Workload.PHOTOS) -> list[Post]:
    """``n`` posts of ``workload`` (by default photos as posts carry them, with captions), held in memory."""
    with tempfile.TemporaryDirectory(prefix="postsim-soak-") as directory:
        corpus = write_workload_corpus(workload, n, Path(directory))
        return [post.to_post() for post in load_bench_posts(corpus)]


def _similar_posts_ready(connection: ClientSettings) -> bool:
    with PostSimClient.from_settings(connection) as client:
        try:
            return client.is_model_ready(contract.SIMILAR_POSTS)
        except PostSimError:
            return False


def _checked(concurrency: int, duration_s: float, interval_s: float, similar_every: int, posts: Sequence[Post]) -> None:
    if concurrency < 1:
        raise BenchError(f"concurrency must be at least 1, got {concurrency}")
    if not duration_s > 0 or not interval_s > 0:
        raise BenchError(f"duration_s and interval_s must be positive, got {duration_s} and {interval_s}")
    if similar_every < 0:
        raise BenchError(f"similar_every must be 0 (never) or positive, got {similar_every}")
    if not posts:
        raise BenchError("the soak needs at least one post")


def run_soak(
    connection: ClientSettings,
    *,
    concurrency: int = 16,
    duration_s: float = 600.0,
    interval_s: float = 30.0,
    warmup_s: float = 30.0,
    server_pid: int | None = None,
    posts: Sequence[Post] | None = None,
    workload: Workload = Workload.PHOTOS,
    similar_every: int = 10,
    k: int = 10,
    on_interval: Callable[[IntervalStats], None] | None = None,
) -> SoakReport:
    """Hold ``concurrency`` requests in flight against the server of ``connection`` for ``warmup_s`` + ``duration_s`` seconds.

    ``server_pid`` is tritonserver's process id (``TritonServer.process.pid``), for its
    memory; None measures only /dev/shm. ``posts`` default to :func:`default_soak_posts` of ``workload``;
    they are sent one per request, in turn. Every ``similar_every``-th request goes to
    ``similar_posts`` (for ``k`` neighbours) when the server has it ready (0: never).
    ``on_interval`` is called with each interval as it ends (for a progress display).
    """
    chosen = list(posts) if posts is not None else default_soak_posts(workload=workload)
    _checked(concurrency, duration_s, interval_s, similar_every, chosen)
    if warmup_s < 0:
        raise BenchError(f"warmup_s must be 0 or more, got {warmup_s}")
    url = connection.url
    similar = similar_every > 0 and _similar_posts_ready(connection)
    models = (contract.POST_EMBEDDING, contract.SIMILAR_POSTS) if similar else (contract.POST_EMBEDDING,)
    sent = "given posts" if posts is not None else workload.label
    logger.info(
        "soak: %d in flight for %.0f s (after %.0f s of warm-up) against %s (%s), %d posts (%s)",
        concurrency,
        duration_s,
        warmup_s,
        url,
        ", ".join(models),
        len(chosen),
        sent,
    )
    load = _Load(
        connection,
        chosen,
        concurrency=concurrency,
        warmup_s=warmup_s,
        duration_s=duration_s,
        interval_s=interval_s,
        similar_every=similar_every if similar else 0,
        k=k,
        server_pid=server_pid,
        on_interval=on_interval,
    )
    asyncio.run(load.run())
    measured = [call for call in load.calls if call.end_s >= 0]
    warmup = [call for call in load.calls if call.end_s < 0]
    assert load.start_memory is not None
    return SoakReport(
        url=url,
        concurrency=concurrency,
        duration_s=duration_s,
        interval_s=interval_s,
        models=models,
        requests=len(measured),
        failed=sum(call.error is not None for call in measured),
        warmup_s=warmup_s,
        warmup_requests=len(warmup),
        warmup_failed=sum(call.error is not None for call in warmup),
        intervals=tuple(load.intervals),
        errors=tuple(Counter(call.error for call in load.calls if call.error is not None).most_common()),
        start_memory=load.start_memory,
        end_memory=memory_snapshot(server_pid, at_s=max((call.end_s for call in measured), default=duration_s)),
        posts=sent,
    )


class _Load:
    """The workers and the interval clock of one soak; times are seconds since the warm-up ended."""

    def __init__(
        self,
        connection: ClientSettings,
        posts: list[Post],
        *,
        concurrency: int,
        warmup_s: float,
        duration_s: float,
        interval_s: float,
        similar_every: int,
        k: int,
        server_pid: int | None,
        on_interval: Callable[[IntervalStats], None] | None,
    ) -> None:
        self.connection = connection
        self.posts = posts
        self.concurrency = concurrency
        self.warmup_s = warmup_s
        self.duration_s = duration_s
        self.interval_s = interval_s
        self.similar_every = similar_every
        self.k = k
        self.server_pid = server_pid
        self.on_interval = on_interval
        self.calls: list[_Call] = []
        self.intervals: list[IntervalStats] = []
        self.start_memory: MemorySnapshot | None = None
        self._sent = 0
        self._zero = 0.0

    def _now(self) -> float:
        return time.monotonic() - self._zero

    async def run(self) -> None:
        self._zero = time.monotonic() + self.warmup_s
        if self.warmup_s == 0:
            self.start_memory = memory_snapshot(self.server_pid)
        async with AsyncPostSimClient.from_settings(self.connection) as client:
            clock = asyncio.ensure_future(self._clock())
            try:
                await asyncio.gather(*(self._worker(client) for _ in range(self.concurrency)))
            finally:
                clock.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await clock
        if self.start_memory is None:  # the load ended within the warm-up
            self.start_memory = memory_snapshot(self.server_pid, at_s=self._now())
        last_start = len(self.intervals) * self.interval_s
        self._close_interval(last_start, max(self._now(), last_start) + 1e-6)

    async def _worker(self, client: AsyncPostSimClient) -> None:
        while self._now() < self.duration_s:
            index, self._sent = self._sent, self._sent + 1
            post = self.posts[index % len(self.posts)]
            sent = self._now()
            error = None
            try:
                if self.similar_every and index % self.similar_every == self.similar_every - 1:
                    await client.similar_many([post], self.k)
                else:
                    await client.embed([post])
            except PostSimError as exc:
                error = str(exc)
            now = self._now()
            self.calls.append(_Call(end_s=now, latency_s=now - sent, error=error))
            if error is not None:
                await asyncio.sleep(0.05)  # a failing server is not hammered in a tight loop

    async def _clock(self) -> None:
        """Takes the start snapshot when the warm-up ends, then closes each interval as it ends."""
        if self.warmup_s > 0:
            await asyncio.sleep(max(0.0, -self._now()))
            self.start_memory = memory_snapshot(self.server_pid)
        boundary = self.interval_s
        while boundary < self.duration_s:
            await asyncio.sleep(max(0.0, boundary - self._now()))
            self._close_interval(boundary - self.interval_s, boundary)
            boundary += self.interval_s

    def _close_interval(self, start_s: float, end_s: float) -> None:
        total = memory_snapshot(self.server_pid, at_s=end_s).total_rss_bytes if self.server_pid is not None else None
        stats = _interval(self.calls, start_s, end_s, total)
        self.intervals.append(stats)
        if self.on_interval is not None:
            self.on_interval(stats)


# --------------------------------------------------------------------------- formatting


def _mib(value: int | None) -> str:
    return "—" if value is None else f"{value / _MIB:,.1f}"


def _ms(value: float) -> str:
    return "—" if np.isnan(value) else f"{value:,.1f}"


def format_soak(report: SoakReport) -> str:
    """The report as Markdown: a verdict line, latency per interval, memory at start and end, errors."""
    if report.ok:
        verdict = "no failed request"
    else:
        verdict = f"{report.failed} of {report.requests} requests FAILED"
        if report.warmup_failed:
            verdict += f" (and {report.warmup_failed} of {report.warmup_requests} in the warm-up)"
    lines = [
        f"Soak of {report.url}: {report.concurrency} requests in flight for {report.duration_s:.0f} s "
        f"after {report.warmup_s:.0f} s of warm-up ({', '.join(report.models)}): {report.requests} requests, "
        f"{verdict}." + (f" Posts: {report.posts}." if report.posts else ""),
        "",
        "| interval | requests | req/s | failed | p50 ms | p99 ms | server+stubs RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for interval in report.intervals:
        lines.append(
            f"| {interval.start_s:.0f}–{interval.end_s:.0f} s | {interval.requests} | {interval.requests_per_s:.1f} "
            f"| {interval.failed} | {_ms(interval.p50_ms)} | {_ms(interval.p99_ms)} "
            f"| {_mib(interval.total_rss_bytes)} |"
        )
    lines += ["", "| memory | start MiB | end MiB | change MiB |", "|---|---:|---:|---:|"]
    for label, start, end in _memory_rows(report.start_memory, report.end_memory):
        change = "—" if start is None or end is None else f"{(end - start) / _MIB:+,.1f}"
        lines.append(f"| {label} | {_mib(start)} | {_mib(end)} | {change} |")
    if report.errors:
        lines += ["", "| error | count |", "|---|---:|"]
        lines += [f"| {message.replace('|', '/')} | {count} |" for message, count in report.errors]
    return "\n".join(lines)


def _memory_rows(start: MemorySnapshot, end: MemorySnapshot) -> list[tuple[str, int | None, int | None]]:
    rows: list[tuple[str, int | None, int | None]] = [
        ("tritonserver RSS", start.server_rss_bytes, end.server_rss_bytes)
    ]
    ends = {(stub.model, stub.version, index): stub for index, stub in _numbered(end.stubs)}
    for index, stub in _numbered(start.stubs):
        later = ends.pop((stub.model, stub.version, index), None)
        label = f"stub {stub.model}/{stub.version}" + (f" #{index + 1}" if index else "")
        rows.append((f"{label} RSS", stub.rss_bytes, later.rss_bytes if later else None))
        rows.append((f"{label} shm region", stub.shm_bytes, later.shm_bytes if later else None))
    for (model, version, index), stub in ends.items():  # stubs started during the soak (a reload)
        rows.append((f"stub {model}/{version} #{index + 1} RSS (new)", None, stub.rss_bytes))
    rows.append(("server + stubs RSS", start.total_rss_bytes, end.total_rss_bytes))
    rows.append(("/dev/shm used (whole machine)", start.dev_shm_used_bytes, end.dev_shm_used_bytes))
    return rows


def _numbered(stubs: Sequence[StubMemory]) -> list[tuple[int, StubMemory]]:
    """Each stub with its position among the stubs of the same model version (instances)."""
    seen: Counter[tuple[str, str]] = Counter()
    numbered = []
    for stub in stubs:
        numbered.append((seen[(stub.model, stub.version)], stub))
        seen[(stub.model, stub.version)] += 1
    return numbered
