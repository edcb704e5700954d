"""``postsim bench serve | video | preprocess | engines | index | soak | stress | front-end | training``: measurements against same-run baselines."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from postsim.cli.backbones import SizeOption, TextModelOption
from postsim.cli.common import RepositoryOption, UrlOption, choice, reports_errors, run_dir_option, stdout
from postsim.client.settings import DEFAULT_URL
from postsim.core.errors import SettingsError
from postsim.core.paths import default_repository
from postsim.model_repository import contract

logger = logging.getLogger("postsim")

WorkloadOption = Annotated[
    str,
    typer.Option(
        help="photos: 1080 px JPEGs, 12 MP phone photos with EXIF orientation and PNG screenshots, as posts carry "
        "them; legacy: the first benchmark's 640×480 images."
    ),
]

app = typer.Typer(help="Measure latency, throughput and recall.", no_args_is_help=True)


@app.command("serve")
@reports_errors
def bench_serve(
    out: Annotated[Path, run_dir_option("bench", "Folder for serving-bench.json and serving-bench.png.")],
    repository: Annotated[
        Path | None,
        typer.Option(
            help="Repository to serve (on a scratch copy) and to run the baselines from.",
            show_default="$POSTSIM_REPOSITORY, else $POSTSIM_HOME/model_repository",
        ),
    ] = None,
    url: Annotated[str | None, typer.Option(help="Measure this running server instead (no baselines).")] = None,
    concurrency: Annotated[
        list[int] | None, typer.Option(help="Concurrency levels (repeat); default 1 2 4 8 16.")
    ] = None,
    requests: Annotated[int, typer.Option(min=1, help="Measured requests per level.")] = 64,
    posts: Annotated[int, typer.Option(min=1, help="Bench corpus size (20–60 word captions).")] = 64,
    workload: WorkloadOption = "photos",
    video_posts: Annotated[
        int,
        typer.Option(
            min=0,
            help="Distinct 30 s 720p H.264 video posts of the video workload (about a minute each to encode); 0: none.",
        ),
    ] = 1,
    video_requests: Annotated[int, typer.Option(min=1, help="Measured video posts per level (c=1 and c=4).")] = 8,
    thread_policy: Annotated[
        list[str] | None,
        typer.Option(
            help="Compare ONNX Runtime thread policies on post_embedding in the same run, one server each, levels "
            "interleaved (repeat; 'all' for every one): one (one thread per session), image-two (two for "
            "image_encoder), encoders-two (two for both encoders), lone-post (two for image_encoder while one post "
            "is in the server). Default: the repository's own settings."
        ),
    ] = None,
) -> None:
    """Latency and throughput of post_embedding and similar_posts through Triton, against in-process
    ONNX Runtime and PyTorch eager on the same posts, and of video posts against image posts: a table, a JSON
    file and a plot."""
    from postsim.bench.report import format_report, write_outputs
    from postsim.bench.serving import ServingBenchSettings, SweepSettings, VideoWorkloadSettings, run_serving_benchmark
    from postsim.bench.workload import Workload
    from postsim.export.triton_config import ThreadPolicy

    policies = (
        tuple(ThreadPolicy)
        if "all" in (thread_policy or [])
        else tuple(choice(ThreadPolicy, name, "--thread-policy") for name in thread_policy or [])
    )
    sweep = (
        SweepSettings(concurrency=tuple(concurrency), requests=requests)
        if concurrency
        else SweepSettings(requests=requests)
    )
    if url is not None and repository is not None:
        raise SettingsError(
            f"--repository would be ignored: --url measures the server at {url} as it runs, and no repository is "
            "served or read for baselines then; drop --repository, or drop --url to bench that repository"
        )
    settings = ServingBenchSettings(
        repository=None if url else (repository or default_repository()),
        url=url,
        posts=posts,
        workload=choice(Workload, workload, "--workload"),
        sweep=sweep,
        video=VideoWorkloadSettings(clips=video_posts, requests=video_requests),
        thread_policies=policies,
    )
    report = run_serving_benchmark(settings)
    stdout.print(format_report(report))
    outputs = write_outputs(report, out)
    stdout.print(f"wrote {outputs.json} and {outputs.plot}")


@app.command("video")
@reports_errors
def bench_video(
    repeats: Annotated[int, typer.Option(min=1, help="Timed samplings of each video (the median is shown).")] = 5,
) -> None:
    """What sampling a video post's frames costs, decoding and pixels apart: a 10 s against a 30 min video of the
    same size (sampling seeks, so the long one costs a few times the short one at most), and a 30 s 720p clip."""
    from postsim.bench.video_bench import default_cases, format_table, measure_video_sampling

    timings = measure_video_sampling(default_cases(), repeats=repeats, progress=logger.info)
    stdout.print(format_table(timings))
    short, long = timings[0], timings[1]
    stdout.print(
        f"{long.name} / {short.name}: {long.decode_ms / short.decode_ms:.2f}× the decoding time, "
        f"{long.total_cpu_ms / short.total_cpu_ms:.2f}× the CPU"
    )


@app.command("preprocess")
@reports_errors
def bench_preprocess(
    repeats: Annotated[int, typer.Option(min=1, help="Timed preprocessings of each image each way (the median).")] = 15,
    repository: Annotated[
        Path | None,
        typer.Option(
            help="Exported repository whose image encoder measures the fidelity of decoding at scale.",
            show_default="$POSTSIM_REPOSITORY, else $POSTSIM_HOME/model_repository; skipped when absent",
        ),
    ] = None,
    photos: Annotated[
        int,
        typer.Option(
            min=1, help="Sample photos of each kind for the fidelity; phone photos (and a 5 MB one) to shrink."
        ),
    ] = 4,
) -> None:
    """What preprocessing one image costs per photo size, decoding every pixel against decoding at scale (DCT
    scaling, early reduction), and the cosine between the image embeddings of the two."""
    from postsim.bench.preprocess_bench import (
        decode_fidelity,
        default_cases,
        fidelity_photos,
        format_preprocessing,
        measure_preprocessing,
        shrink_effect,
        shrink_photos,
    )
    from postsim.model_repository.layout import version_dirs

    timings = measure_preprocessing(default_cases(), repeats=repeats, progress=logger.info)
    chosen = repository or default_repository()
    fidelity = None
    encoder = chosen if repository is not None or version_dirs(chosen / contract.IMAGE_ENCODER) else None
    if encoder is not None:
        fidelity = decode_fidelity(encoder, fidelity_photos(photos))
    else:
        logger.warning(
            "no exported repository at %s: the fidelity is not measured (export one, or --repository)", chosen
        )
    shrink = shrink_effect(shrink_photos(photos), encoder)
    stdout.print(format_preprocessing(timings, fidelity, shrink), highlight=False, markup=False, soft_wrap=True)
    if fidelity is not None:
        stdout.print(f"(image encoder of {chosen})", highlight=False, markup=False, soft_wrap=True)


@app.command("engines")
@reports_errors
def bench_engines(
    repository: RepositoryOption,
    repeats: Annotated[int, typer.Option(min=1, help="Timed calls of each configuration (the median).")] = 10,
    threads: Annotated[
        list[int] | None, typer.Option(min=1, help="Intra-op thread counts (repeat); default 1 2.")
    ] = None,
    batch_size: Annotated[list[int] | None, typer.Option(min=1, help="Batch sizes (repeat); default 1 4.")] = None,
) -> None:
    """The exported image and text encoders in ONNX Runtime (what the server runs) against OpenVINO, on the same
    photo posts, calls interleaved: milliseconds per post and the cosine of each engine's outputs."""
    from postsim.bench.engines import engine_versions, format_engines, measure_engines

    report = measure_engines(
        repository,
        threads=tuple(threads or (1, 2)),
        batch_sizes=tuple(batch_size or (1, 4)),
        repeats=repeats,
        progress=logger.info,
    )
    versions = ", ".join(f"{engine} {version}" for engine, version in engine_versions().items())
    stdout.print(f"encoders of {repository} ({versions}), {report.posts} photo posts", highlight=False, markup=False)
    stdout.print(format_engines(report), highlight=False, markup=False, soft_wrap=True)


@app.command("index")
@reports_errors
def bench_index(
    count: Annotated[int, typer.Option(min=1, help="Unit vectors in the index.")] = 1_000_000,
    dim: Annotated[int, typer.Option(min=1, help="Their dimension.")] = contract.DEFAULT_DIM,
    queries: Annotated[int, typer.Option(min=1, help="Queries for latency and recall.")] = 1000,
    index_type: Annotated[list[str] | None, typer.Option(help="flat, hnsw, ivfpq (repeat); default all.")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="FAISS threads (default: all cores).")] = None,
    data: Annotated[
        str, typer.Option(help="random (no structure, the worst case) or clustered (like post embeddings).")
    ] = "random",
) -> None:
    """Build time, p50 latency and recall@10 against exact search for each index type (CPU, and GPU if present)."""
    from postsim.bench.index_bench import DEFAULT_INDEX_TYPES, BenchData, format_table, run_index_benchmark
    from postsim.model_repository.search_index import IndexType

    types = [choice(IndexType, value, "--index-type") for value in index_type] if index_type else DEFAULT_INDEX_TYPES
    results = run_index_benchmark(
        count=count,
        dim=dim,
        queries=queries,
        index_types=types,
        threads=threads,
        data=choice(BenchData, data, "--data"),
    )
    stdout.print(format_table(results), highlight=False, markup=False, soft_wrap=True)


@app.command("live")
@reports_errors
def bench_live(
    url: UrlOption = DEFAULT_URL,
    duration: Annotated[float, typer.Option(min=1, help="Seconds of query load without writes, and with them.")] = 10.0,
    concurrency: Annotated[int, typer.Option(min=1, help="similar_posts clients sending back to back.")] = 2,
    batch: Annotated[int, typer.Option(min=1, max=contract.MAX_BATCH_SIZE, help="Posts per change call.")] = 8,
    posts: Annotated[int, typer.Option(min=1000, help="Posts of the in-process recall part.")] = 50_000,
) -> None:
    """Changes under load on a running server (upserts/s, deletes/s, similar_posts p50/p99 without and with writes),
    then recall@10 after 10% of the posts changed, before and after compaction (in process, clustered vectors)."""
    import tempfile
    from pathlib import Path

    from postsim.bench.live_index_bench import format_change_recall, run_change_recall
    from postsim.bench.live_serving import format_live_serving, run_live_serving

    served = run_live_serving(url, duration_s=duration, concurrency=concurrency, batch=batch)
    stdout.print(format_live_serving(served), highlight=False, markup=False, soft_wrap=True)
    with tempfile.TemporaryDirectory(prefix="postsim-bench-live-") as scratch:
        recall = run_change_recall(Path(scratch), posts=posts, queries=500)
    stdout.print(format_change_recall(recall), highlight=False, markup=False, soft_wrap=True)


@app.command("soak")
@reports_errors
def bench_soak(
    url: UrlOption = DEFAULT_URL,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests held in flight.")] = 16,
    duration: Annotated[float, typer.Option(min=1, help="Seconds to hold the load, after the warm-up.")] = 600.0,
    interval: Annotated[float, typer.Option(min=1, help="Seconds per reported interval.")] = 30.0,
    warmup: Annotated[float, typer.Option(min=0, help="Seconds of load before measuring.")] = 30.0,
    server_pid: Annotated[
        int | None, typer.Option(help="tritonserver's pid, to report its and its stubs' memory.")
    ] = None,
    workload: WorkloadOption = "photos",
) -> None:
    """Hold a concurrency of requests for a while; report latency over time, errors and memory. Exit 1 on any error."""
    from postsim.bench.soak import format_soak, run_soak
    from postsim.bench.workload import Workload
    from postsim.client.settings import ClientSettings

    def show(interval_stats: Any) -> None:
        logger.info("%s", interval_stats)

    report = run_soak(
        ClientSettings(url=url),
        concurrency=concurrency,
        duration_s=duration,
        interval_s=interval,
        warmup_s=warmup,
        server_pid=server_pid,
        workload=choice(Workload, workload, "--workload"),
        on_interval=show,
    )
    stdout.print(format_soak(report), highlight=False, markup=False, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(1)


@app.command("stress")
@reports_errors
def bench_stress(
    repository: RepositoryOption,
    duration: Annotated[float, typer.Option(min=1, help="Seconds to run the load.")] = 300.0,
    busy: Annotated[int, typer.Option(min=0, help="Processes spinning on the CPU meanwhile.")] = 4,
    storm_clients: Annotated[int, typer.Option(min=0, help="Clients sending requests with a 10 ms deadline.")] = 2,
    storm_rate: Annotated[float, typer.Option(min=0.1, help="Requests a second from each storm client.")] = 20.0,
) -> None:
    """Index builds, publish/rollback cycles and 10 ms-deadline storms at once on a busy CPU, against a server
    started on a scratch copy of the repository. Exit 1 on a crash or a readiness stuck false."""
    from postsim.bench.stress import StressSettings, format_stress, run_stress

    report = run_stress(
        StressSettings(
            repository=repository,
            duration_s=duration,
            busy_processes=busy,
            storm_clients=storm_clients,
            storm_rate=storm_rate,
        )
    )
    stdout.print(format_stress(report), highlight=False, markup=False, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(1)


@app.command("front-end")
@reports_errors
def bench_front_end(
    repository: RepositoryOption,
    requests: Annotated[int, typer.Option(min=1, help="Measured requests on each path.")] = 300,
) -> None:
    """The latency the front end adds: post_embedding at concurrency 1 through it and straight to tritonserver."""
    from postsim.bench.front_end import format_front_end, measure_front_end

    stdout.print(format_front_end(measure_front_end(repository, requests=requests)), highlight=False, markup=False)


@app.command("training")
@reports_errors
def bench_training(
    posts: Annotated[
        int, typer.Option(min=1, help="Sample posts whose features are extracted (640×480, 20–60 words).")
    ] = 64,
    epoch_posts: Annotated[int, typer.Option(min=1, help="Posts of cached features per training epoch.")] = 10_000,
    epochs: Annotated[int, typer.Option(min=1, help="Epochs timed.")] = 3,
    threads: Annotated[int, typer.Option(min=1, help="CPU threads torch may use.")] = 2,
    text_model: TextModelOption = None,
    size: SizeOption = None,
) -> None:
    """What `postsim train` costs: feature extraction posts/s through the backbones (full size, random weights
    unless --text-model), and seconds per epoch over cached features."""
    from postsim.bench.training_bench import TrainingBenchSettings, format_training_bench, run_training_benchmark
    from postsim.models.settings import ModelSize

    settings = TrainingBenchSettings(
        posts=posts,
        epoch_posts=epoch_posts,
        epochs=epochs,
        threads=threads,
        text_model=text_model,
        size=ModelSize.FULL if size is None else choice(ModelSize, size, "--size"),
    )
    stdout.print(format_training_bench(run_training_benchmark(settings)), highlight=False, markup=False)
