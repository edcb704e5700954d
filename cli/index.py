"""``postsim index build | publish | rollback | upsert | delete``: FAISS indexes, their versions, and their posts."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from postsim.cli.common import (
    RepositoryOption,
    ShrinkImagesOption,
    UrlOption,
    choice,
    reports_errors,
    run_dir_option,
    stderr,
    stdout,
)
from postsim.client.settings import DEFAULT_URL
from postsim.model_repository import contract
from postsim.model_repository.protocol import ADMIN_KEY_VARIABLE

if TYPE_CHECKING:
    from postsim.cli.progress import ProgressReporter
    from postsim.client.api import PostSimClient
    from postsim.indexing.spread import ServersCallback, SpreadReport

app = typer.Typer(help="Build, publish and roll back FAISS indexes of posts.", no_args_is_help=True)

UrlsOption = Annotated[
    list[str] | None,
    typer.Option(
        "--url",
        metavar="HOST:PORT",
        show_default=DEFAULT_URL,
        help="gRPC endpoint of a running postsim server (HOST:PORT). Give it once per server (one per replica, say) "
        "to spread the posts over several: they must serve the same encoders, and a server that fails has its "
        "posts sent to the others.",
    ),
]


@app.command("build")
@reports_errors
def index_build(
    corpus: Annotated[Path, typer.Argument(help="JSONL corpus: one {id, text, image} object per line.")],
    out: Annotated[Path, run_dir_option("index", "Index folder to write (replaced atomically).")],
    index_type: Annotated[str, typer.Option(help="auto, flat, hnsw or ivfpq.")] = "auto",
    url: UrlsOption = None,
    batch_size: Annotated[int, typer.Option(min=1, max=contract.MAX_BATCH_SIZE, help="Posts per request.")] = 8,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight per server.")] = 4,
    max_failures: Annotated[int, typer.Option(min=0, help="Posts that may fail before the exit code says so.")] = 0,
    unimodal: Annotated[
        bool,
        typer.Option(
            help="Keep each post's image and text vectors and weights (fp16), which split scores into "
            "four parts (similar_posts CONTRIBUTIONS, postsim explain): ~1 GB per million posts at dim 256."
        ),
    ] = True,
    shrink_images: ShrinkImagesOption = False,
) -> None:
    """Embed every post of CORPUS through the server(s) and write a FAISS index, its ids and its manifest."""
    from postsim.cli.progress import ProgressReporter
    from postsim.indexing.embed import CorpusIndexSettings, build_corpus_index
    from postsim.model_repository.search_index import IndexType

    urls = tuple(url or [DEFAULT_URL])
    settings = CorpusIndexSettings(
        corpus=corpus,
        out_dir=out,
        url=urls,
        index_type=choice(IndexType, index_type, "--index-type"),
        batch_size=batch_size,
        concurrency=concurrency,
        unimodal=unimodal,
        shrink_images=shrink_images,
    )
    with ProgressReporter("embedding", console=stderr, unit="posts") as progress:
        report = build_corpus_index(settings, on_progress=progress.update, on_servers=_server_notes(progress, urls))
    manifest = report.manifest
    params = "".join(f" {name}={value}" for name, value in manifest.params.items())
    stdout.print(
        f"indexed {report.indexed} posts into {report.index_dir} ({manifest.index_type.value}{params}, dim "
        f"{manifest.dimension}) in {report.seconds:.1f} s, {report.posts_per_second:.1f} posts/s"
    )
    _print_servers(report.spread, urls)
    if report.failures:
        stderr.print(f"{len(report.failures)} post(s) not indexed:")
        for failure in report.failures:
            stderr.print(f"  {failure.id}: {failure.reason}", highlight=False, markup=False, soft_wrap=True)
    if len(report.failures) > max_failures:
        stderr.print(f"[bold red]error:[/] {len(report.failures)} failed posts exceed --max-failures {max_failures}")
        raise typer.Exit(1)


ReplicaUrlsOption = Annotated[
    list[str] | None,
    typer.Option(
        "--url",
        metavar="HOST:PORT",
        help="Running server to switch (HOST:PORT). Give it once per replica serving the repository: each is "
        "checked first, and if one cannot switch the others go back. None (and no --replicas): install only.",
    ),
]
ReplicasOption = Annotated[
    str | None,
    typer.Option(
        "--replicas",
        metavar="HOST:PORT",
        help="A name that resolves to every replica (a headless Service, e.g. postsim-replicas.postsim.svc:8001): "
        "each address it resolves to is used as a --url.",
    ),
]
AdminKeyOption = Annotated[
    str | None, typer.Option(envvar=ADMIN_KEY_VARIABLE, help="The server's admin key, if it has one.")
]


@app.command("publish")
@reports_errors
def index_publish(
    index_dir: Annotated[Path, typer.Argument(help="Index folder written by `postsim index build`.")],
    repository: RepositoryOption,
    url: ReplicaUrlsOption = None,
    replicas: ReplicasOption = None,
    admin_key: AdminKeyOption = None,
) -> None:
    """Install an index as the next version of `retrieval` and make the running server(s) serve it."""
    from postsim.indexing.publish import publish_index

    urls = _switched_urls(url, replicas)
    with _admin_clients(urls, admin_key) as clients:
        report = publish_index(index_dir, repository, client=clients, on_served=_served_note(len(urls)))
    if len(report.servers) == 1:
        where = f"; {report.servers[0]} serves it now"
    elif report.servers:
        where = f"; {len(report.servers)} servers serve it now"
    else:
        where = "; start `postsim serve` to serve it"
    stdout.print(f"published {index_dir} as retrieval version {report.version}{where}", soft_wrap=True)
    _print_served(report.servers, report.version)


@app.command("rollback")
@reports_errors
def index_rollback(
    repository: RepositoryOption,
    url: ReplicaUrlsOption = None,
    replicas: ReplicasOption = None,
    admin_key: AdminKeyOption = None,
) -> None:
    """Retire the newest index version and serve the previous one (on every server named)."""
    from postsim.indexing.publish import rollback_index

    urls = _switched_urls(url, replicas)
    with _admin_clients(urls, admin_key) as clients:
        version = rollback_index(repository, client=clients, on_served=_served_note(len(urls)))
    stdout.print(f"retrieval version {version} is current again", soft_wrap=True)
    _print_served(urls, version)


def _switched_urls(url: list[str] | None, replicas: str | None) -> tuple[str, ...]:
    """The servers a publish or rollback switches: each --url, then every address --replicas resolves to."""
    from postsim.client.settings import replica_urls

    return tuple(url or ()) + (replica_urls(replicas) if replicas is not None else ())


def _served_note(count: int) -> Callable[[str, int], None] | None:
    """With several servers, a line on stderr as each one serves the version (plain text when not a terminal)."""
    done = 0

    def note(url: str, version: int) -> None:
        nonlocal done
        done += 1
        stderr.print(f"{url} serves retrieval version {version} ({done} of {count})", highlight=False, soft_wrap=True)

    return note if count > 1 else None


def _print_served(urls: Sequence[str], version: int) -> None:
    """With several servers, the summary: each one and the version it serves."""
    if len(urls) < 2:
        return
    for served in urls:
        stdout.print(f"  {served}: retrieval version {version}", highlight=False, markup=False, soft_wrap=True)


@app.command("upsert")
@reports_errors
def index_upsert(
    corpus: Annotated[Path, typer.Argument(help="JSONL corpus of the posts to add or replace (same format as build).")],
    url: UrlsOption = None,
    batch_size: Annotated[
        int, typer.Option(min=1, max=contract.MAX_BATCH_SIZE, help="Posts per call, each call one atomic change.")
    ] = contract.MAX_BATCH_SIZE,
    shrink_images: ShrinkImagesOption = False,
) -> None:
    """Add the posts of CORPUS to the index the server serves, or replace the posts with their ids; no rebuild.

    Each call is on the server's disk (fsynced) and served when it returns. Several --url spread the calls
    (one in flight per server) over replicas that share one index (the Milvus backend).
    """
    from postsim.cli.progress import ProgressReporter
    from postsim.indexing.changes import upsert_corpus

    urls = tuple(url or [DEFAULT_URL])
    with ProgressReporter("upserting", console=stderr, unit="posts") as progress:
        summary = upsert_corpus(
            corpus,
            urls,
            batch_size=batch_size,
            on_progress=progress.update,
            on_servers=_server_notes(progress, urls),
            shrink_images=shrink_images,
        )
    stdout.print(
        f"upserted {len(summary.added) + len(summary.replaced)} posts ({len(summary.added)} new, "
        f"{len(summary.replaced)} replaced) up to change {summary.sequence}"
    )
    _print_servers(summary.spread, urls)


@app.command("delete")
@reports_errors
def index_delete(
    ids: Annotated[list[str] | None, typer.Argument(help="Ids of the posts to delete.")] = None,
    ids_file: Annotated[Path | None, typer.Option(help="A file of post ids to delete, one a line.")] = None,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Delete posts from the index the server serves: no result of a query sent after this returns holds them.

    Ids the index does not have are listed, and the exit code is 1.
    """
    from postsim.cli.progress import ProgressReporter
    from postsim.indexing.changes import delete_posts, read_ids_file

    if bool(ids) == (ids_file is not None):
        raise typer.BadParameter("give the ids as arguments or with --ids-file, one of the two", param_hint="IDS")
    wanted = list(ids) if ids else read_ids_file(ids_file) if ids_file is not None else []
    with ProgressReporter("deleting", console=stderr, unit="posts") as progress:
        summary = delete_posts(wanted, url, on_progress=progress.update)
    stdout.print(f"deleted {len(summary.deleted)} posts up to change {summary.sequence}")
    if summary.unknown:
        shown = ", ".join(summary.unknown[:20]) + (" ..." if len(summary.unknown) > 20 else "")
        stderr.print(
            f"[bold red]error:[/] {len(summary.unknown)} id(s) not in the index, nothing done for them: {shown}"
        )
        raise typer.Exit(1)


@app.command("compact")
@reports_errors
def index_compact(
    repository: RepositoryOption,
    url: UrlOption = DEFAULT_URL,
    index_type: Annotated[str, typer.Option(help="auto, flat, hnsw or ivfpq.")] = "auto",
    admin_key: AdminKeyOption = None,
) -> None:
    """Fold the served index's changes into a new version (retrained and tuned) and serve it; the journal restarts.

    Runs where the repository is (it reads the served version and its journal from disk).
    """
    from postsim.indexing.compact import compact_index
    from postsim.model_repository.search_index import IndexType

    with _admin_clients([url], admin_key) as (client,):
        report = compact_index(repository, client, index_type=choice(IndexType, index_type, "--index-type"))
    stdout.print(
        f"compacted {report.live_posts} posts (changes up to {report.folded}) into retrieval version "
        f"{report.version}, {report.carried} later change batch(es) handed over; {url} serves it now"
    )


def _server_notes(progress: ProgressReporter, urls: tuple[str, ...]) -> ServersCallback | None:
    """With several servers, each one's posts/s and the batches moved go on the progress bar and lines."""
    from postsim.indexing.spread import progress_note

    if len(urls) < 2:
        return None
    return lambda servers: progress.note(progress_note(servers))


def _print_servers(report: SpreadReport | None, urls: tuple[str, ...]) -> None:
    """With several servers, what each one did (posts, batches, posts/s, why it failed) and the batches moved."""
    if report is None or len(urls) < 2:
        return
    for line in report.lines():
        stdout.print(f"  {line}", highlight=False, markup=False, soft_wrap=True)


@contextlib.contextmanager
def _admin_clients(urls: Sequence[str], admin_key: str | None) -> Iterator[list[PostSimClient]]:
    """A client for model control per server named (none when none is)."""
    from postsim.client.api import PostSimClient

    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(PostSimClient(url, admin_key=admin_key)) for url in urls]
