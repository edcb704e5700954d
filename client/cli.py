"""The ``postsim`` command line: parses arguments and calls the typed functions that do the work.

Every command reports a :class:`PostSimError` as one readable line on stderr and exits 1;
bad arguments exit 2 (typer's usage errors). Library code logs through the ``postsim``
logger; this module decides what is shown.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from postsim.client.settings import DEFAULT_URL
from postsim.core.errors import PostSimError, SettingsError
from postsim.core.paths import default_repository, default_run_dir
from postsim.model_repository import contract
from postsim.model_repository.protocol import ADMIN_KEY_VARIABLE

LOGGER = logging.getLogger("postsim")
app = typer.Typer(
    name="postsim",
    help="Similar social-media posts from their image and text, served by NVIDIA Triton.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
index_app = typer.Typer(help="Build, publish and roll back FAISS indexes of posts.", no_args_is_help=True)
bench_app = typer.Typer(help="Measure latency, throughput and recall.", no_args_is_help=True)
app.add_typer(index_app, name="index")
app.add_typer(bench_app, name="bench")

stderr = Console(stderr=True)
stdout = Console()

F = TypeVar("F", bound=Callable[..., Any])

RepositoryOption = Annotated[
    Path,
    typer.Option(
        "--repository",
        default_factory=default_repository,
        show_default="$POSTSIM_REPOSITORY, else $POSTSIM_HOME/model_repository",
        help="Triton model repository folder. POSTSIM_HOME defaults to ~/.local/share/postsim.",
    ),
]
UrlOption = Annotated[str, typer.Option("--url", help="gRPC endpoint of a running postsim server (HOST:PORT).")]


def _run_dir(name: str, description: str) -> Any:
    """An output-folder option that defaults to ``$POSTSIM_HOME/runs/<name>``, outside the source tree."""
    return typer.Option(
        default_factory=lambda: default_run_dir(name), show_default=f"$POSTSIM_HOME/runs/{name}", help=description
    )


@app.callback()
def _configure(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show debug logs.")] = False) -> None:
    handler = RichHandler(console=stderr, show_path=False, show_time=False, markup=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    # huggingface_hub gives its logger a stderr handler of its own at import and lets records
    # propagate to the root's as well: each of its messages would show twice.
    logging.getLogger("huggingface_hub").propagate = False
    LOGGER.setLevel(logging.DEBUG if verbose else logging.INFO)


def reports_errors(command: F) -> F:
    """Turn a PostSimError into one line on stderr and exit code 1 (2 for settings that contradict), no traceback."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except PostSimError as error:
            stderr.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2 if isinstance(error, SettingsError) else 1) from None

    return wrapper  # type: ignore[return-value]


@app.command()
@reports_errors
def export(
    repository: RepositoryOption,
    target: Annotated[
        str, typer.Option(help="embedded (Python backend + ONNX Runtime) or triton (NGC, GPU, TensorRT).")
    ] = "embedded",
    weights: Annotated[
        str,
        typer.Option(
            help="pretrained (each backbone from --image-model and --text-model), random (both backbones random), "
            "or a directory with image/ and text/."
        ),
    ] = "pretrained",
    dim: Annotated[int, typer.Option(help="Embedding size K.")] = contract.DEFAULT_DIM,
    text_model: Annotated[
        str | None,
        typer.Option(
            help="Hub id or directory of any BERT-family encoder, `random`, or `bundled:all-MiniLM-L6-v2` (real "
            "weights shipped with the export extra).",
            show_default="distilbert-base-uncased",
        ),
    ] = None,
    image_model: Annotated[
        str | None,
        typer.Option(help="Hub id or directory of a ResNet, or `random`.", show_default="microsoft/resnet-101"),
    ] = None,
    head: Annotated[Path | None, typer.Option(help="Checkpoint of the projections and the fuser.")] = None,
    size: Annotated[
        str | None,
        typer.Option(
            help="Architecture of random backbones: full (ResNet-101, DistilBERT) or tiny (for tests).",
            show_default="full",
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(help="Seed of random backbones and of the head when no checkpoint is given.", show_default="0"),
    ] = None,
    precision: Annotated[str, typer.Option(help="fp32; int8 (quantised encoders, CPU); fp16 (GPU).")] = "fp32",
    force_precision: Annotated[
        bool, typer.Option(help="Write int8/fp16 models even when they agree with fp32 below 0.99 mean cosine.")
    ] = False,
) -> None:
    """Export the image encoder, text encoder and fuser to ONNX and write the Triton model repository."""
    from postsim.export.quantize import Precision
    from postsim.export.repository import ExportOptions, export_repository
    from postsim.export.triton_config import Target
    from postsim.models.settings import ModelSettings, ModelSize

    options = ExportOptions(
        repository=repository,
        target=_choice(Target, target, "--target"),
        precision=_choice(Precision, precision, "--precision"),
        force_precision=force_precision,
        models=ModelSettings(
            dim=dim,
            weights=weights,
            text_model=text_model,
            image_model=image_model,
            head=head,
            seed=seed,
            size=None if size is None else _choice(ModelSize, size, "--size"),
        ),
    )
    report = export_repository(options)
    for name, check in report.validation.items():
        stdout.print(f"{name}: {check}")
    if report.agreement is not None:
        stdout.print(f"{precision} agreement with fp32: {report.agreement}")
    stdout.print(f"repository ready: {report.repository} (weights fingerprint {report.manifest.fingerprint})")


E = TypeVar("E")


def _choice(enum_type: type[E], value: str, option: str) -> E:
    try:
        return enum_type(value)  # type: ignore[call-arg]
    except ValueError:
        choices = ", ".join(member.value for member in enum_type)  # type: ignore[attr-defined]
        raise typer.BadParameter(f"{value!r} is not one of {choices}", param_hint=option) from None


@app.command()
@reports_errors
def serve(
    repository: RepositoryOption,
    grpc_port: Annotated[int, typer.Option(help="gRPC port.")] = 8001,
    http_port: Annotated[int, typer.Option(help="HTTP port (the KServe v2 HTTP API: health, metadata, infer).")] = 8000,
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics port.")] = 8002,
    address: Annotated[
        str, typer.Option(help="Address the gRPC, HTTP and metrics ports listen on (0.0.0.0: every interface).")
    ] = "0.0.0.0",
    health_address: Annotated[
        str | None,
        typer.Option(help="HOST:PORT of a plaintext port answering /v2/health/live and /ready only (default: none)."),
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(help="Server certificate (PEM): serve gRPC, HTTP and metrics over TLS only.")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Server private key (PEM).")] = None,
    tls_ca: Annotated[Path | None, typer.Option(help="CA (PEM) that signs client certificates: mutual TLS.")] = None,
    admin_key: Annotated[
        str | None,
        typer.Option(
            envvar=ADMIN_KEY_VARIABLE,
            help="Key required for model control, shared memory, log and trace settings. Given on the command line "
            "it is readable by every local user (ps, /proc/PID/cmdline): prefer POSTSIM_ADMIN_KEY or --admin-key-file.",
        ),
    ] = None,
    admin_key_file: Annotated[
        Path | None, typer.Option(help="File whose first line is the admin key (instead of --admin-key).")
    ] = None,
    max_in_flight: Annotated[
        int, typer.Option(min=1, help="Requests running in Triton at once; past it clients get UNAVAILABLE.")
    ] = 64,
    triton_dir: Annotated[
        Path | None,
        typer.Option(
            help="A Triton install to run (bin/tritonserver, backends/), e.g. /opt/tritonserver in NGC's image."
        ),
    ] = None,
    log_file: Annotated[
        Path | None, typer.Option(help="Where tritonserver's log goes (default: a temporary file).")
    ] = None,
    shm_default_bytes: Annotated[
        int, typer.Option(min=4 << 20, help="Shared memory each Python-backend model instance starts with.")
    ] = 16 << 20,
) -> None:
    """Serve the repository until SIGINT or SIGTERM: tritonserver behind postsim's front end, restarted if it dies."""
    from postsim.server.front_end import TlsSettings
    from postsim.server.launcher import ServerSettings, TritonServer

    if (tls_cert is None) != (tls_key is None):
        raise typer.BadParameter("give both --tls-cert and --tls-key, or neither", param_hint="--tls-cert/--tls-key")
    if tls_ca is not None and tls_cert is None:
        raise typer.BadParameter("--tls-ca needs --tls-cert and --tls-key", param_hint="--tls-ca")
    tls = TlsSettings(certificate=tls_cert, private_key=tls_key, client_ca=tls_ca) if tls_cert and tls_key else None
    settings = ServerSettings(
        repository=repository,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        address=address,
        health_address=health_address,
        tls=tls,
        admin_key=_admin_key(admin_key, admin_key_file),
        max_in_flight=max_in_flight,
        triton_dir=triton_dir,
        shm_default_bytes=shm_default_bytes,
    )
    server = TritonServer(settings, log_path=log_file)
    stop_requested = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop_requested.set())
    endpoints = server.start()
    try:
        secure = " (TLS)" if tls else ""
        stdout.print(f"postsim serving {', '.join(server.models)}")
        stdout.print(f"  gRPC     {endpoints.grpc}{secure}")
        stdout.print(f"  HTTP     {endpoints.http}")
        stdout.print(f"  metrics  {endpoints.metrics}")
        if health_address:
            stdout.print(f"  health   http://{health_address}/v2/health/ready (plaintext)")
        stdout.print(f"  log      {server.log_path}")
        while not stop_requested.wait(1.0):
            if not server.is_serving():
                stderr.print(
                    f"[bold red]error:[/] the server stopped unexpectedly; tritonserver's log: {server.log_path}"
                )
                raise typer.Exit(1)
        stdout.print("stopping: in-flight requests finish, new ones are refused")
    finally:
        server.stop()


def _admin_key(value: str | None, path: Path | None) -> str | None:
    """The admin key from --admin-key / POSTSIM_ADMIN_KEY, or from the first line of --admin-key-file."""
    if path is None:
        return value
    if value is not None:
        raise typer.BadParameter(
            "give the admin key one way: --admin-key-file, or --admin-key / POSTSIM_ADMIN_KEY",
            param_hint="--admin-key-file",
        )
    try:
        key = next(iter(path.read_text().splitlines()), "").strip()
    except OSError as error:
        raise typer.BadParameter(f"cannot read {path}: {error.strerror}", param_hint="--admin-key-file") from None
    if not key:
        raise typer.BadParameter(
            f"{path} is empty: write the admin key on its first line", param_hint="--admin-key-file"
        )
    return key


@app.command()
@reports_errors
def embed(
    image: Annotated[Path | None, typer.Option(help="Image file of the post.")] = None,
    text: Annotated[str | None, typer.Option(help="Text of the post (title, description, tags).")] = None,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Embed one post through the server and print the result as JSON."""
    from postsim.client.api import PostSimClient
    from postsim.client.posts import Post

    post = Post(text=text, image=image)
    with PostSimClient(url) as client:
        (result,) = client.embed([post])
    json.dump(
        {
            "embedding": [round(float(x), 6) for x in result.embedding],
            "modality_weights": {"image": result.image_weight, "text": result.text_weight},
        },
        sys.stdout,
    )
    sys.stdout.write("\n")


@app.command()
@reports_errors
def similar(
    image: Annotated[Path | None, typer.Option(help="Image file of the query post.")] = None,
    text: Annotated[str | None, typer.Option(help="Text of the query post.")] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="How many similar posts.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Find the indexed posts most similar to a post, with the start of each one's text when the index keeps it."""
    from postsim.client.api import PostSimClient
    from postsim.client.posts import Post

    with PostSimClient(url) as client:
        neighbors = client.similar(Post(text=text, image=image), k=k)
    if as_json:
        json.dump([{"id": n.id, "score": round(n.score, 6), "text": n.text} for n in neighbors], sys.stdout)
        sys.stdout.write("\n")
        return
    _print_neighbors(neighbors)


TABLE_TEXT_CHARS = 80
"""Characters of a neighbour's text shown in the table (``--json`` has all the index keeps)."""


def _print_neighbors(neighbors: list[Any], captions: dict[str, str] | None = None) -> None:
    """A table of the neighbours, with their text: ``captions`` by id when given, else what the index sent."""
    from rich.table import Table
    from rich.text import Text

    texts = [(captions.get(n.id, "") if captions is not None else n.text) or "" for n in neighbors]
    table = Table("rank", "id", "score", *(["text"] if any(texts) else []))
    for rank, (neighbor, text) in enumerate(zip(neighbors, texts, strict=True), start=1):
        row: list[str | Text] = [str(rank), Text(neighbor.id), f"{neighbor.score:.4f}"]  # Text: no markup from data
        if any(texts):
            row.append(Text(" · ".join(text.splitlines())[:TABLE_TEXT_CHARS]))
        table.add_row(*row)
    stdout.print(table)


@app.command("sample-posts")
@reports_errors
def sample_posts(
    out: Annotated[Path, _run_dir("sample-posts", "Folder for posts.jsonl and images/.")],
    n: Annotated[int, typer.Option("--n", min=1, help="How many posts.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed of the generator.")] = 0,
) -> None:
    """Write N synthetic posts (procedurally drawn images, captions from a few topics) as a JSONL corpus."""
    from postsim.corpus.samples import write_sample_posts

    path = write_sample_posts(n, out, seed=seed)
    stdout.print(f"wrote {n} posts to {path}")


@index_app.command("build")
@reports_errors
def index_build(
    corpus: Annotated[Path, typer.Argument(help="JSONL corpus: one {id, text, image} object per line.")],
    out: Annotated[Path, _run_dir("index", "Index folder to write (replaced atomically).")],
    index_type: Annotated[str, typer.Option(help="auto, flat, hnsw or ivfpq.")] = "auto",
    url: UrlOption = DEFAULT_URL,
    batch_size: Annotated[int, typer.Option(min=1, max=contract.MAX_BATCH_SIZE, help="Posts per request.")] = 8,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight.")] = 4,
    max_failures: Annotated[int, typer.Option(min=0, help="Posts that may fail before the exit code says so.")] = 0,
) -> None:
    """Embed every post of CORPUS through the server and write a FAISS index, its ids and its manifest."""
    from postsim.client.progress import ProgressReporter
    from postsim.indexing.embed import CorpusIndexSettings, build_corpus_index
    from postsim.model_repository.search_index import IndexType

    settings = CorpusIndexSettings(
        corpus=corpus,
        out_dir=out,
        url=url,
        index_type=_choice(IndexType, index_type, "--index-type"),
        batch_size=batch_size,
        concurrency=concurrency,
    )
    with ProgressReporter("embedding", console=stderr, unit="posts") as progress:
        report = build_corpus_index(settings, on_progress=progress.update)
    manifest = report.manifest
    params = "".join(f" {name}={value}" for name, value in manifest.params.items())
    stdout.print(
        f"indexed {report.indexed} posts into {report.index_dir} ({manifest.index_type.value}{params}, dim "
        f"{manifest.dimension}) in {report.seconds:.1f} s, {report.posts_per_second:.1f} posts/s"
    )
    if report.failures:
        stderr.print(f"{len(report.failures)} post(s) not indexed:")
        for failure in report.failures:
            stderr.print(f"  {failure.id}: {failure.reason}", highlight=False, markup=False, soft_wrap=True)
    if len(report.failures) > max_failures:
        stderr.print(f"[bold red]error:[/] {len(report.failures)} failed posts exceed --max-failures {max_failures}")
        raise typer.Exit(1)


@index_app.command("publish")
@reports_errors
def index_publish(
    index_dir: Annotated[Path, typer.Argument(help="Index folder written by `postsim index build`.")],
    repository: RepositoryOption,
    url: Annotated[
        str | None, typer.Option(help="Running server to switch over (HOST:PORT); none: install only.")
    ] = None,
    admin_key: Annotated[
        str | None, typer.Option(envvar=ADMIN_KEY_VARIABLE, help="The server's admin key, if it has one.")
    ] = None,
) -> None:
    """Install an index as the next version of `retrieval` and make the running server serve it."""
    from postsim.indexing.publish import publish_index

    with _admin_client(url, admin_key) as client:
        report = publish_index(index_dir, repository, client=client)
    where = f"; {url} serves it now" if report.loaded else "; start `postsim serve` to serve it"
    stdout.print(f"published {index_dir} as retrieval version {report.version}{where}")


@index_app.command("rollback")
@reports_errors
def index_rollback(
    repository: RepositoryOption,
    url: Annotated[str | None, typer.Option(help="Running server to switch back (HOST:PORT).")] = None,
    admin_key: Annotated[
        str | None, typer.Option(envvar=ADMIN_KEY_VARIABLE, help="The server's admin key, if it has one.")
    ] = None,
) -> None:
    """Retire the newest index version and serve the previous one."""
    from postsim.indexing.publish import rollback_index

    with _admin_client(url, admin_key) as client:
        version = rollback_index(repository, client=client)
    stdout.print(f"retrieval version {version} is current again")


@app.command()
@reports_errors
def demo(
    repository: RepositoryOption,
    work_dir: Annotated[Path, _run_dir("demo", "Where the sample corpus, the index and the server log go.")],
    weights: Annotated[
        str, typer.Option(help="pretrained (needs the Hugging Face hub), random, or a directory.")
    ] = "pretrained",
    posts: Annotated[int, typer.Option(min=2, help="Sample posts to index.")] = 200,
    grpc_port: Annotated[int, typer.Option(help="gRPC port.")] = 8001,
    http_port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    metrics_port: Annotated[int, typer.Option(help="Metrics port.")] = 8002,
    keep_serving: Annotated[bool, typer.Option(help="Keep the server up after the query, until Ctrl-C.")] = False,
) -> None:
    """Export, serve, index sample posts and answer a similar-posts query, in one go."""
    from postsim.client.demo import DemoSettings, run_demo
    from postsim.client.progress import ProgressReporter
    from postsim.server.launcher import ServerSettings

    server = ServerSettings(repository=repository, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port)
    settings = DemoSettings(repository=repository, work_dir=work_dir, weights=weights, posts=posts, server=server)

    def serve_until_interrupted(running: Any) -> None:
        if not keep_serving:
            return
        stdout.print(f"serving on {running.endpoints.grpc}; Ctrl-C stops it")
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        with contextlib.suppress(KeyboardInterrupt):
            while running.is_running():
                time.sleep(1.0)

    with ProgressReporter("embedding the sample posts", console=stderr, unit="posts") as progress:
        result = run_demo(settings, while_serving=serve_until_interrupted, on_progress=progress.update)
    query = result.query
    caption = " · ".join((query.text or "").splitlines())
    stdout.print(f"\nquery post {query.id}: {caption} + {query.image_path}", soft_wrap=True)
    _print_neighbors(result.neighbors, result.captions)


@bench_app.command("serve")
@reports_errors
def bench_serve(
    out: Annotated[Path, _run_dir("bench", "Folder for serving-bench.json and serving-bench.png.")],
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
    posts: Annotated[int, typer.Option(min=1, help="Bench corpus size (JPEG ~640×480, 20–60 words).")] = 64,
) -> None:
    """Latency and throughput of post_embedding and similar_posts through Triton, against in-process
    ONNX Runtime and PyTorch eager on the same posts: a table, a JSON file and a plot."""
    from postsim.bench.report import format_report, write_outputs
    from postsim.bench.serving import ServingBenchSettings, SweepSettings, run_serving_benchmark

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
        repository=None if url else (repository or default_repository()), url=url, posts=posts, sweep=sweep
    )
    report = run_serving_benchmark(settings)
    stdout.print(format_report(report))
    outputs = write_outputs(report, out)
    stdout.print(f"wrote {outputs.json} and {outputs.plot}")


@bench_app.command("index")
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

    types = [_choice(IndexType, value, "--index-type") for value in index_type] if index_type else DEFAULT_INDEX_TYPES
    results = run_index_benchmark(
        count=count,
        dim=dim,
        queries=queries,
        index_types=types,
        threads=threads,
        data=_choice(BenchData, data, "--data"),
    )
    stdout.print(format_table(results), highlight=False, markup=False, soft_wrap=True)


@bench_app.command("soak")
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
) -> None:
    """Hold a concurrency of requests for a while; report latency over time, errors and memory. Exit 1 on any error."""
    from postsim.bench.soak import format_soak, run_soak
    from postsim.client.settings import ClientSettings

    def show(interval_stats: Any) -> None:
        LOGGER.info("%s", interval_stats)

    report = run_soak(
        ClientSettings(url=url),
        concurrency=concurrency,
        duration_s=duration,
        interval_s=interval,
        warmup_s=warmup,
        server_pid=server_pid,
        on_interval=show,
    )
    stdout.print(format_soak(report), highlight=False, markup=False, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(1)


@bench_app.command("stress")
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


@bench_app.command("front-end")
@reports_errors
def bench_front_end(
    repository: RepositoryOption,
    requests: Annotated[int, typer.Option(min=1, help="Measured requests on each path.")] = 300,
) -> None:
    """The latency the front end adds: post_embedding at concurrency 1 through it and straight to tritonserver."""
    from postsim.bench.front_end import format_front_end, measure_front_end

    stdout.print(format_front_end(measure_front_end(repository, requests=requests)), highlight=False, markup=False)


@contextlib.contextmanager
def _admin_client(url: str | None, admin_key: str | None) -> Iterator[Any]:
    """A client for model control, or None when no server is named."""
    if url is None:
        yield None
        return
    from postsim.client.api import PostSimClient

    with PostSimClient(url, admin_key=admin_key) as client:
        yield client


def main() -> None:
    app()


if __name__ == "__main__":
    main()
