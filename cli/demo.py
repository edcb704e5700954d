"""``postsim demo``: export, serve, index sample posts and answer one query (the flow: :mod:`postsim.cli.demo_flow`)."""

from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from postsim.cli.common import RepositoryOption, reports_errors, run_dir_option, stderr, stdout
from postsim.cli.query import print_neighbors


@reports_errors
def demo(
    repository: RepositoryOption,
    work_dir: Annotated[Path, run_dir_option("demo", "Where the sample corpus, the index and the server log go.")],
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
    from postsim.cli.demo_flow import DemoSettings, run_demo
    from postsim.cli.progress import ProgressReporter
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
    print_neighbors(result.neighbors, result.captions)
