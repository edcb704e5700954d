"""``postsim bench serve``: latency and throughput of the Triton ensembles against in-process baselines.

The sweep is a closed-loop asyncio load generator: ``C`` workers each keep one request
(one post) in flight, for each concurrency ``C``. Per level the first requests warm up
(at least ``C`` of them, so the measured ones start in steady state) and are not counted;
then ``requests`` are measured, and the workers keep the load on until the last measured
one has answered, so the tail of a level runs at the same concurrency as its middle.

Unless pointed at a running server (``url``), the benchmark starts its own tritonserver
on a scratch copy of the repository (hard links, so the copy is instant and the original
is never written), publishes an index of the bench corpus there so ``similar_posts`` is
loaded, and can rewrite that copy's scheduling (:class:`ServingSettings`) to compare
configurations. The in-process baselines (:mod:`postsim.bench.baselines`) run first,
on the same posts, while no server competes for the CPUs.

Thread policies (:class:`ThreadPolicy`) are compared in one run: one server per policy,
each on its own scratch copy, all started before the sweep; ``post_embedding`` then runs
level by level, every policy at a level before the next level, in an order that rotates
from level to level, so that a change in the machine's other load falls on all of them.
The first policy's server also serves ``similar_posts`` and the video workload.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from postsim.bench.baselines import BaselineSettings, max_abs_diff, mean_cosine, run_baselines
from postsim.bench.cpu import CpuClock, cpu_ms_per_post, process_group_cpu
from postsim.bench.results import (
    TRITON_POST_EMBEDDING,
    TRITON_SIMILAR_POSTS,
    TRITON_VIDEO_POSTS,
    BenchPoint,
    ConfigurationKind,
    ConfigurationResult,
    LatencyStats,
    MachineInfo,
    ServingBenchReport,
    thread_policy_configuration,
)
from postsim.bench.workload import (
    BENCH_VIDEO,
    BenchPost,
    Workload,
    load_bench_posts,
    post_at,
    video_bench_posts,
    write_workload_corpus,
)
from postsim.client.api import AsyncPostSimClient, PostSimClient
from postsim.core.errors import BenchError, PostSimError
from postsim.corpus.sample_videos import VideoSpec
from postsim.export.triton_config import ServingSettings, ThreadPolicy, apply_serving_settings
from postsim.indexing.embed import CorpusIndexSettings, build_corpus_index
from postsim.indexing.publish import publish_index
from postsim.model_repository import contract
from postsim.model_repository.configs import parse_pbtxt
from postsim.model_repository.layout import CONFIG_NAME
from postsim.model_repository.manifest import WeightsManifest
from postsim.server.launcher import ServerSettings, TritonServer
from postsim.server.ports import free_ports

if TYPE_CHECKING:
    from postsim.models.weights import PostSimModels

logger = logging.getLogger("postsim")

Sender = Callable[[BenchPost], Awaitable[np.ndarray]]
"""Sends one post and returns its fused embedding."""

_CONFIGURATION_NAMES = {
    contract.POST_EMBEDDING: TRITON_POST_EMBEDDING,
    contract.SIMILAR_POSTS: TRITON_SIMILAR_POSTS,
}


@dataclass(frozen=True, kw_only=True)
class SweepSettings:
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16)
    requests: int = 64
    """Measured requests per concurrency level (one post each)."""
    warmup: int = 8
    """Requests sent before measuring each level; at least the level's concurrency."""
    k: int = 10
    """Neighbours asked of ``similar_posts``."""
    timeout_s: float = 120.0
    """Per request; a request that takes longer counts as an error."""

    def __post_init__(self) -> None:
        if not self.concurrency or min(self.concurrency) < 1:
            raise BenchError(f"concurrency levels must be at least 1, got {self.concurrency}")
        if self.requests < 1 or self.warmup < 0 or self.k < 1:
            raise BenchError(f"requests and k must be positive and warmup not negative, got {self}")


@dataclass(frozen=True, kw_only=True)
class VideoWorkloadSettings:
    """Video posts through ``post_embedding`` in the same run as the image posts (``workload.BENCH_VIDEO`` clips)."""

    clips: int = 1
    """Distinct video posts the requests cycle through; 0 leaves the video workload out."""
    requests: int = 8
    """Measured requests per concurrency level."""
    concurrency: tuple[int, ...] = (1, 4)
    spec: VideoSpec = BENCH_VIDEO
    """Each clip's size, rate, length and keyframe spacing (what the README's figures use by default)."""

    def __post_init__(self) -> None:
        if self.clips < 0 or self.requests < 1 or not self.concurrency or min(self.concurrency) < 1:
            raise BenchError(
                f"video workload: clips must be 0 or more, requests and concurrency at least 1, got {self}"
            )

    def sweep(self, images: SweepSettings) -> SweepSettings:
        """The image sweep's settings with this workload's levels and counts (warm-up: one request per worker)."""
        return replace(images, concurrency=self.concurrency, requests=self.requests, warmup=0)


@dataclass(frozen=True, kw_only=True)
class ServingBenchSettings:
    """What to benchmark. Give ``repository`` (a server is started on a copy of it), ``url``, or both.

    With only ``url`` the running server is measured as it is (``similar_posts`` only if an
    index is published there) and the in-process baselines are skipped: they need the
    repository's model files.
    """

    repository: Path | None = None
    url: str | None = None
    work_dir: Path | None = None
    """Scratch folder for the corpus, the repository copy, the index and the server log; a temporary one if None."""
    posts: int = 64
    """Size of the bench corpus (the request sequence cycles through it)."""
    workload: Workload = Workload.PHOTOS
    """Which posts: the photo workload, or the first benchmark's 640×480 one."""
    seed: int = 0
    ensembles: tuple[str, ...] = (contract.POST_EMBEDDING, contract.SIMILAR_POSTS)
    sweep: SweepSettings = field(default_factory=SweepSettings)
    baselines: BaselineSettings = field(default_factory=BaselineSettings)
    serving: ServingSettings | None = None
    """Scheduling written into the scratch copy before serving it; None keeps the repository's own."""
    video: VideoWorkloadSettings = field(default_factory=VideoWorkloadSettings)
    """Video posts through ``post_embedding`` after the image sweeps (when it is among ``ensembles``)."""
    thread_policies: tuple[ThreadPolicy, ...] = ()
    """Compare these thread policies (each applied over ``serving``, or over the defaults) on
    ``post_embedding``, one server each, in the same run; empty: one server, ``serving`` as given."""

    def __post_init__(self) -> None:
        if self.repository is None and self.url is None:
            raise BenchError("give a model repository to serve, or the URL of a running server, or both")
        if self.url is not None and (self.serving is not None or self.thread_policies):
            raise BenchError(
                "serving settings and thread policies apply to servers the benchmark starts: leave out the URL"
            )
        if len(set(self.thread_policies)) != len(self.thread_policies):
            raise BenchError(f"thread policies repeat: {[policy.value for policy in self.thread_policies]}")
        unknown = set(self.ensembles) - set(_CONFIGURATION_NAMES)
        if unknown:
            raise BenchError(f"cannot benchmark {sorted(unknown)}: choose from {sorted(_CONFIGURATION_NAMES)}")


# --------------------------------------------------------------------------- load generator


async def run_level(
    send: Sender,
    posts: Sequence[BenchPost],
    *,
    concurrency: int,
    requests: int,
    warmup: int,
    server_cpu: CpuClock | None = None,
) -> tuple[BenchPoint, dict[str, np.ndarray]]:
    """Hold ``concurrency`` requests in flight; measure ``requests`` after ``max(warmup, concurrency)``.

    Returns the point and the embedding of each post that was answered in the measured window.
    CPU per post (the server's, from ``server_cpu``, and this process's) is taken over the
    whole level, warm-up and cool-down included, divided by every request it sent.
    """
    warmup = max(warmup, concurrency)
    end = warmup + requests
    issued = 0
    unfinished = requests
    all_measured_done = asyncio.Event()
    latencies: list[float] = []
    starts: list[float] = []
    ends: list[float] = []
    errors: list[str] = []
    embeddings: dict[str, np.ndarray] = {}

    async def worker() -> None:
        nonlocal issued, unfinished
        while not all_measured_done.is_set():
            index, issued = issued, issued + 1
            post = post_at(posts, index)
            begin = time.perf_counter()
            try:
                embedding: np.ndarray | None = await send(post)
                error = None
            except PostSimError as exc:
                embedding, error = None, str(exc)
            finish = time.perf_counter()
            if not warmup <= index < end:
                continue
            starts.append(begin)
            ends.append(finish)
            if error is None and embedding is not None:
                latencies.append(finish - begin)
                embeddings.setdefault(post.id, embedding)
            else:
                errors.append(error or "no embedding")
            unfinished -= 1
            if unfinished == 0:
                all_measured_done.set()

    server_cpu_started = server_cpu() if server_cpu is not None else None
    client_cpu_started = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    client_cpu = time.process_time() - client_cpu_started
    by_model: dict[str, float] = {}
    if server_cpu is not None and server_cpu_started is not None:
        by_model = cpu_ms_per_post(server_cpu_started, server_cpu(), issued)
    point = BenchPoint(
        concurrency=concurrency,
        batch_size=1,
        requests=requests,
        errors=len(errors),
        seconds=max(ends) - min(starts),
        latency=LatencyStats.of(latencies),
        first_error=errors[0] if errors else None,
        cpu_ms_per_post=sum(by_model.values()) if by_model else None,
        cpu_ms_per_post_by_model=by_model,
        client_cpu_ms_per_post=client_cpu * 1e3 / issued,
    )
    return point, embeddings


def _sender(client: AsyncPostSimClient, ensemble: str, k: int) -> Sender:
    if ensemble == contract.SIMILAR_POSTS:

        async def similar(post: BenchPost) -> np.ndarray:
            (result,) = await client.similar_many([post.to_post()], k)
            return result.embedding

        return similar

    async def embed(post: BenchPost) -> np.ndarray:
        (result,) = await client.embed([post.to_post()])
        return result.embedding

    return embed


async def sweep_ensemble(
    url: str,
    ensemble: str,
    posts: Sequence[BenchPost],
    settings: SweepSettings,
    *,
    server_cpu: CpuClock | None = None,
) -> tuple[list[BenchPoint], dict[str, np.ndarray]]:
    """Every concurrency level of one ensemble, lowest first."""
    points: list[BenchPoint] = []
    embeddings: dict[str, np.ndarray] = {}
    async with AsyncPostSimClient(url, timeout_s=settings.timeout_s) as client:
        send = _sender(client, ensemble, settings.k)
        for concurrency in sorted(settings.concurrency):
            point, seen = await run_level(
                send,
                posts,
                concurrency=concurrency,
                requests=settings.requests,
                warmup=settings.warmup,
                server_cpu=server_cpu,
            )
            logger.info(
                "%s c=%d: p50 %.1f ms, p99 %.1f ms, %.2f posts/s, %d errors",
                ensemble,
                concurrency,
                point.latency.p50_ms,
                point.latency.p99_ms,
                point.posts_per_s,
                point.errors,
            )
            if point.first_error:
                logger.warning("%s c=%d: first error: %s", ensemble, concurrency, point.first_error)
            points.append(point)
            for post_id, row in seen.items():
                embeddings.setdefault(post_id, row)
    return points, embeddings


async def sweep_thread_policies(
    urls: Mapping[ThreadPolicy, str],
    posts: Sequence[BenchPost],
    settings: SweepSettings,
    *,
    server_cpus: Mapping[ThreadPolicy, CpuClock | None],
) -> dict[ThreadPolicy, tuple[list[BenchPoint], dict[str, np.ndarray]]]:
    """``post_embedding`` on each policy's server, interleaved: every policy at a level, then the next level.

    The policies' order rotates by one from level to level, so none always runs first (or last).
    """
    policies = list(urls)
    results: dict[ThreadPolicy, tuple[list[BenchPoint], dict[str, np.ndarray]]] = {p: ([], {}) for p in policies}
    async with contextlib.AsyncExitStack() as stack:
        senders = {
            policy: _sender(
                await stack.enter_async_context(AsyncPostSimClient(url, timeout_s=settings.timeout_s)),
                contract.POST_EMBEDDING,
                settings.k,
            )
            for policy, url in urls.items()
        }
        for level, concurrency in enumerate(sorted(settings.concurrency)):
            shift = level % len(policies)
            for policy in policies[shift:] + policies[:shift]:
                point, seen = await run_level(
                    senders[policy],
                    posts,
                    concurrency=concurrency,
                    requests=settings.requests,
                    warmup=settings.warmup,
                    server_cpu=server_cpus.get(policy),
                )
                logger.info(
                    "%s, threads %s, c=%d: p50 %.1f ms, p99 %.1f ms, %.2f posts/s, %d errors",
                    contract.POST_EMBEDDING,
                    policy.value,
                    concurrency,
                    point.latency.p50_ms,
                    point.latency.p99_ms,
                    point.posts_per_s,
                    point.errors,
                )
                points, embeddings = results[policy]
                points.append(point)
                for post_id, row in seen.items():
                    embeddings.setdefault(post_id, row)
    return results


# --------------------------------------------------------------------------- repository and server


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def scratch_repository(repository: Path, target: Path) -> Path:
    """A copy of ``repository`` at ``target`` made of hard links (copies across file systems).

    Safe because nothing rewrites a repository file in place: configs are replaced through a
    rename, index versions are new folders.
    """
    WeightsManifest.read(repository)  # a repository that is not exported fails here, with what to do
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(repository, target, copy_function=_link_or_copy, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def loopback_settings(repository: Path) -> ServerSettings:
    """A benchmark's own server: on free ports, listening on loopback only."""
    grpc_port, http_port, metrics_port = free_ports(3)
    return ServerSettings(
        repository=repository, address="127.0.0.1", grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port
    )


def serving_summary(repository: Path) -> dict[str, dict[str, Any]]:
    """Each non-ensemble model's scheduling, as its config says."""
    summary: dict[str, dict[str, Any]] = {}
    for config_path in sorted(repository.glob(f"*/{CONFIG_NAME}")):
        config = parse_pbtxt(config_path.read_text())
        if config.platform == "ensemble":
            continue
        entry: dict[str, Any] = {"instances": sum(group.count for group in config.instance_group) or 1}
        if config.HasField("dynamic_batching"):
            entry["max_queue_delay_us"] = config.dynamic_batching.max_queue_delay_microseconds
            entry["preferred_batch_sizes"] = list(config.dynamic_batching.preferred_batch_size)
        parameters = contract.config_parameters(config)
        for parameter in (
            contract.INTRA_OP_THREADS_PARAMETER,
            contract.INTRA_OP_SPINNING_PARAMETER,
            contract.LONE_POST_THREADS_PARAMETER,
        ):
            if parameter.key in parameters:
                entry[parameter.key] = parameter.read(parameters)
        summary[config.name] = entry
    return summary


@dataclass(frozen=True)
class _Served:
    repository: Path
    url: str
    cpu: CpuClock | None


def _serve(
    stack: contextlib.ExitStack, repository: Path, work_dir: Path, serving: ServingSettings | None, *, name: str
) -> _Served:
    """A server on a scratch copy of ``repository`` (``serving`` written into it), stopped when ``stack`` closes."""
    suffix = f"-{name}" if name else ""
    served = scratch_repository(repository, work_dir / f"repository{suffix}")
    if serving is not None:
        apply_serving_settings(served, serving)
    server = stack.enter_context(
        TritonServer(loopback_settings(served), log_path=work_dir / f"tritonserver{suffix}.log")
    )
    cpu = process_group_cpu(server.process.pid) if server.process is not None else None
    return _Served(repository=served, url=server.endpoints.grpc, cpu=cpu)


def _thread_policy_results(
    servers: Mapping[ThreadPolicy, _Served],
    posts: Sequence[BenchPost],
    sweep: SweepSettings,
    reference: dict[str, np.ndarray],
    torch_fp32: dict[str, np.ndarray],
) -> list[ConfigurationResult]:
    urls = {policy: server.url for policy, server in servers.items()}
    for url in urls.values():
        _ready_ensembles(url, [contract.POST_EMBEDDING])
    swept = asyncio.run(
        sweep_thread_policies(urls, posts, sweep, server_cpus={p: server.cpu for p, server in servers.items()})
    )
    return [
        ConfigurationResult(
            name=thread_policy_configuration(policy.value),
            kind=ConfigurationKind.TRITON,
            description=(
                f"{contract.POST_EMBEDDING} over gRPC at {servers[policy].url}, one post per request, ONNX Runtime "
                f"threads per session {policy.intra_op_threads} (idle threads sleep)"
                + (f", while it runs the only call {policy.lone_post_threads}" if policy.lone_post_threads else "")
            ),
            points=points,
            max_abs_diff=max_abs_diff(embeddings, reference),
            mean_cosine_to_torch_fp32=mean_cosine(embeddings, torch_fp32),
        )
        for policy, (points, embeddings) in swept.items()
    ]


def _publish_bench_index(corpus: Path, work_dir: Path, repository: Path, url: str) -> None:
    """Index the bench corpus through the server and make it serve that index (loads ``similar_posts``)."""
    index_dir = work_dir / "index"
    report = build_corpus_index(CorpusIndexSettings(corpus=corpus, out_dir=index_dir, url=url))
    logger.info("indexed %d bench posts in %.1f s", report.indexed, report.seconds)
    with PostSimClient(url) as client:
        publish_index(index_dir, repository, client=client)


def _ready_ensembles(url: str, wanted: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    with PostSimClient(url) as client:
        client.wait_until_ready(timeout_s=30)
        info = client.server_info()
    ready = [ensemble for ensemble in wanted if info.is_ready(ensemble)]
    skipped = {
        _CONFIGURATION_NAMES[ensemble]: f"'{ensemble}' is not loaded on {url} (publish an index first)"
        for ensemble in wanted
        if ensemble not in ready
    }
    return ready, skipped


def _models_label(manifest: WeightsManifest) -> str:
    if manifest.random_weights:
        return f"random weights, {manifest.provenance.get('size', 'full')} size"
    return "trained weights"


# --------------------------------------------------------------------------- the benchmark


def run_serving_benchmark(
    settings: ServingBenchSettings, *, torch_models: PostSimModels | None = None
) -> ServingBenchReport:
    """Baselines, then the sweep of each ensemble; everything on the same bench corpus.

    ``torch_models`` are the PyTorch models of the repository for the eager baseline; when
    None they are rebuilt from the repository's weights manifest.
    """
    machine = MachineInfo.current()
    started = time.monotonic()
    started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    with contextlib.ExitStack() as stack:
        work_dir = settings.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="postsim-bench-")))
        work_dir.mkdir(parents=True, exist_ok=True)
        logger.info("drawing %d posts of the %s", settings.posts, settings.workload.label)
        corpus = write_workload_corpus(settings.workload, settings.posts, work_dir / "corpus", seed=settings.seed)
        posts = load_bench_posts(corpus)
        video_posts: list[BenchPost] = []
        if settings.video.clips and contract.POST_EMBEDDING in settings.ensembles:
            logger.info("encoding %d video post(s) for the video workload", settings.video.clips)
            video_posts = video_bench_posts(posts, settings.video.clips, settings.video.spec)

        configurations: list[ConfigurationResult] = []
        skipped: dict[str, str] = {}
        reference: dict[str, np.ndarray] = {}
        torch_fp32: dict[str, np.ndarray] = {}
        repository = settings.repository.resolve() if settings.repository is not None else None
        if repository is not None:
            baselines = run_baselines(repository, posts, settings.baselines, torch_models=torch_models)
            configurations += baselines.configurations
            skipped.update(baselines.skipped)
            reference, torch_fp32 = baselines.reference, baselines.torch_fp32
        else:
            skipped["baselines"] = "no repository given: the in-process baselines need its model files"

        url = settings.url
        served = repository
        server_cpu: CpuClock | None = None
        policy_servers: dict[ThreadPolicy, _Served] = {}
        if url is None:
            assert repository is not None  # checked by the settings
            for policy in settings.thread_policies:
                policy_serving = (settings.serving or ServingSettings()).with_thread_policy(policy)
                policy_servers[policy] = _serve(stack, repository, work_dir, policy_serving, name=policy.value)
            if policy_servers:
                first = next(iter(policy_servers.values()))
            else:
                first = _serve(stack, repository, work_dir, settings.serving, name="")
            served, url, server_cpu = first.repository, first.url, first.cpu
            if contract.SIMILAR_POSTS in settings.ensembles:
                _publish_bench_index(corpus, work_dir, served, url)
        ensembles, not_ready = _ready_ensembles(url, settings.ensembles)
        skipped.update(not_ready)

        for ensemble in ensembles:
            if ensemble == contract.POST_EMBEDDING and policy_servers:
                configurations += _thread_policy_results(policy_servers, posts, settings.sweep, reference, torch_fp32)
                continue
            points, embeddings = asyncio.run(
                sweep_ensemble(url, ensemble, posts, settings.sweep, server_cpu=server_cpu)
            )
            configurations.append(
                ConfigurationResult(
                    name=_CONFIGURATION_NAMES[ensemble],
                    kind=ConfigurationKind.TRITON,
                    description=f"{ensemble} over gRPC at {url}, one post per request",
                    points=points,
                    max_abs_diff=max_abs_diff(embeddings, reference),
                    mean_cosine_to_torch_fp32=mean_cosine(embeddings, torch_fp32),
                )
            )
        if video_posts and contract.POST_EMBEDDING in ensembles:
            spec = settings.video.spec
            points, _ = asyncio.run(
                sweep_ensemble(
                    url,
                    contract.POST_EMBEDDING,
                    video_posts,
                    settings.video.sweep(settings.sweep),
                    server_cpu=server_cpu,
                )
            )
            configurations.append(
                ConfigurationResult(
                    name=TRITON_VIDEO_POSTS,
                    kind=ConfigurationKind.TRITON,
                    description=(
                        f"{contract.POST_EMBEDDING} over gRPC at {url}, one video post per request "
                        f"({len(video_posts)} clip(s) of {spec.duration_s:g} s {spec.size[0]}×{spec.size[1]} "
                        f"H.264, {contract.VIDEO_FRAMES} frames sampled unless the repository's video_frames says "
                        "otherwise); server CPU: preprocess_image decodes, image_encoder encodes"
                    ),
                    points=points,
                )
            )
        manifest = WeightsManifest.read(served) if served is not None else None
        serving = serving_summary(served) if served is not None else {}
        policies = {policy.value: serving_summary(server.repository) for policy, server in policy_servers.items()}

    return ServingBenchReport(
        machine=replace(machine, load_average_after=os.getloadavg()),
        repository=str(settings.repository or settings.url),
        precision=manifest.precision if manifest is not None else "unknown",
        models=_models_label(manifest) if manifest is not None else "unknown",
        serving=serving,
        corpus_posts=len(posts),
        workload=settings.workload.label,
        configurations=configurations,
        skipped=skipped,
        thread_policies=policies,
        started=started_at,
        seconds=time.monotonic() - started,
    )
