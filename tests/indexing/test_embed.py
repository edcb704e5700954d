"""`postsim index build` through real tritonservers: what it needs from them, what it shows, and several at once."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from support import ExportedRepository, serve_a_copy
from typer.testing import CliRunner

from postsim.cli.main import app
from postsim.client.api import PostSimClient
from postsim.client.posts import Post
from postsim.core.errors import PostSimError, ServerUnavailableError
from postsim.corpus.posts import read_posts
from postsim.corpus.samples import write_sample_posts
from postsim.indexing.embed import CorpusIndexSettings, build_corpus_index
from postsim.indexing.spread import ServerLoad, ServersCallback
from postsim.model_repository.search_index import IndexType, exact_storage, load_index_dir, read_manifest
from postsim.server.launcher import TritonServer

pytestmark = pytest.mark.integration


def test_index_build_needs_no_admin_key(admin_server: TritonServer, tmp_path: Path) -> None:
    """Building only embeds posts and reads which weights embed them: nothing the admin key restricts."""
    corpus = write_sample_posts(6, tmp_path / "corpus")
    result = CliRunner().invoke(
        app, ["index", "build", str(corpus), "--out", str(tmp_path / "index"), "--url", admin_server.endpoints.grpc]
    )
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp_path / "index").count == 6


def test_index_build_prints_progress_lines_when_its_output_is_not_a_terminal(grpc_url: str, tmp_path: Path) -> None:
    corpus = write_sample_posts(12, tmp_path / "corpus")
    command = [
        sys.executable, "-m", "postsim.cli", "index", "build", str(corpus),
        "--out", str(tmp_path / "index"), "--url", grpc_url, "--batch-size", "2",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "300"})
    assert result.returncode == 0, result.stdout + result.stderr
    progress = [line for line in result.stderr.splitlines() if "embedding: " in line]
    assert progress, result.stderr
    assert "embedding: 12/12 posts (100%)" in progress[-1] and "posts/s, done in" in progress[-1]


# --------------------------------------------------------------------------- several servers


def _vectors(index_dir: Path, fingerprint: str) -> tuple[list[str], np.ndarray]:
    loaded = load_index_dir(index_dir, fingerprint, use_gpu=False)
    storage = exact_storage(loaded.cpu_index)
    assert storage is not None
    return loaded.ids, storage.reconstruct_n(0, len(loaded.ids))


def _stop_when(target: str, batches: int, stop: Callable[[], object]) -> tuple[ServersCallback, list[int]]:
    """A servers callback that calls ``stop`` once the server at ``target`` has answered ``batches`` batches.

    ``stop`` runs in the build's event loop and holds it up until the server refuses new requests,
    so the other servers cannot finish the corpus first.
    """
    stopped: list[int] = []

    def watch(servers: Sequence[ServerLoad]) -> None:
        (load,) = [server for server in servers if server.url == target]
        if load.batches >= batches and not stopped:
            stopped.append(load.batches)
            stop()

    return watch, stopped


def _stop_gracefully(server: TritonServer) -> None:
    """`server.stop()` in a thread (it drains, then ends tritonserver); returns once the server refuses a post."""
    threading.Thread(target=server.stop, daemon=True).start()
    deadline = time.monotonic() + 60
    with PostSimClient(server.endpoints.grpc, timeout_s=10) as client:
        while time.monotonic() < deadline:
            try:
                client.embed([Post(text="are you still there")])
            except PostSimError:
                return
            time.sleep(0.05)
    raise AssertionError(f"{server.endpoints.grpc} still answers 60 s after it was asked to stop")


def _build_over_three_servers_with_one_stopped(
    staying: tuple[TritonServer, TritonServer],
    exported_repository: ExportedRepository,
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
    stop: Callable[[TritonServer], object],
) -> None:
    """Three servers of one export, the third stopped once it has answered a batch: each post once, as one server has it.

    ``staying`` are two servers of the session (the admin key of one restricts nothing a build needs);
    the third is started for the test.
    """
    corpus = write_sample_posts(60, tmp_path / "corpus")
    grpc_url = staying[0].endpoints.grpc
    with contextlib.contextmanager(serve_a_copy)(exported_repository, tmp_path_factory, "spread-third") as third:
        third_url = third.endpoints.grpc
        watch, stopped = _stop_when(third_url, 1, lambda: stop(third))
        urls = (grpc_url, staying[1].endpoints.grpc, third_url)
        for url in urls:  # warm: a server's first answers are slow, and the others could take every batch meanwhile
            with PostSimClient(url) as client:
                client.embed([Post(text="warm up")])
        spread = CorpusIndexSettings(
            corpus=corpus, out_dir=tmp_path / "spread", url=urls, index_type=IndexType.FLAT, batch_size=2, concurrency=2
        )
        report = build_corpus_index(spread, on_servers=watch)
    print("\n".join(report.spread.lines()))  # what `postsim index build` prints (pytest -s shows it)
    assert stopped, "the third server never answered a batch"
    assert report.indexed == 60 and not report.failures
    loads = {load.url: load for load in report.spread.servers}
    assert loads[third_url].error is not None and loads[third_url].moved >= 1
    assert report.spread.moved == loads[third_url].moved
    assert sum(load.posts for load in loads.values()) == 60
    assert all(load.batches > 0 for load in loads.values())

    single = CorpusIndexSettings(corpus=corpus, out_dir=tmp_path / "single", url=grpc_url, index_type=IndexType.FLAT)
    build_corpus_index(single)
    fingerprint = read_manifest(tmp_path / "single").weights_fingerprint
    spread_ids, spread_vectors = _vectors(tmp_path / "spread", fingerprint)
    single_ids, single_vectors = _vectors(tmp_path / "single", fingerprint)
    assert spread_ids == single_ids == [post.id for post in read_posts(corpus)]
    cosines = np.sum(spread_vectors * single_vectors, axis=1)
    assert cosines.min() >= 0.9999, cosines.min()


def test_a_build_over_three_servers_keeps_every_post_once_when_one_is_stopped_halfway(
    server: TritonServer,
    admin_server: TritonServer,
    exported_repository: ExportedRepository,
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
) -> None:
    """Stopped as `postsim serve` stops on SIGTERM: new requests refused (UNAVAILABLE), then the process ends."""
    staying = (server, admin_server)
    _build_over_three_servers_with_one_stopped(
        staying, exported_repository, tmp_path_factory, tmp_path, _stop_gracefully
    )


@pytest.mark.slow
def test_a_build_over_three_servers_keeps_every_post_once_when_one_is_killed_halfway(
    server: TritonServer,
    admin_server: TritonServer,
    exported_repository: ExportedRepository,
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
) -> None:
    """SIGKILL to the whole server (front end and tritonserver): its requests in flight fail, the port refuses."""

    def kill(server: TritonServer) -> None:
        assert server.process is not None and server.front_end is not None and server.front_end.process is not None
        os.kill(server.front_end.process.pid, signal.SIGKILL)
        os.killpg(server.process.pid, signal.SIGKILL)
        threading.Thread(target=server.stop, daemon=True).start()  # clean up after them

    staying = (server, admin_server)
    _build_over_three_servers_with_one_stopped(staying, exported_repository, tmp_path_factory, tmp_path, kill)


@pytest.mark.slow
def test_a_build_whose_every_server_is_gone_says_how_many_posts_were_embedded(
    exported_repository: ExportedRepository, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    corpus = write_sample_posts(24, tmp_path / "corpus")
    with contextlib.contextmanager(serve_a_copy)(exported_repository, tmp_path_factory, "spread-only") as only:
        url = only.endpoints.grpc
        watch, _ = _stop_when(url, 2, lambda: _stop_gracefully(only))
        settings = CorpusIndexSettings(corpus=corpus, out_dir=tmp_path / "index", url=(url,), batch_size=2)
        with pytest.raises(ServerUnavailableError, match=r"the server failed .* after \d+ of 24 posts were embedded"):
            build_corpus_index(settings, on_servers=watch)
    assert not (tmp_path / "index").exists()


def test_index_build_spreads_over_every_url_and_shows_each_server(
    grpc_url: str, admin_server: TritonServer, tmp_path: Path
) -> None:
    """Two servers of one export (the admin key restricts nothing a build needs): both embed, the summary says so."""
    corpus = write_sample_posts(16, tmp_path / "corpus")
    other = admin_server.endpoints.grpc
    command = [
        sys.executable, "-m", "postsim.cli", "index", "build", str(corpus), "--out", str(tmp_path / "index"),
        "--url", grpc_url, "--url", other, "--batch-size", "2", "--concurrency", "1",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "300"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert read_manifest(tmp_path / "index").count == 16
    lines = result.stdout.splitlines()
    for url in (grpc_url, other):
        (line,) = [line for line in lines if line.strip().startswith(f"{url}: ")]
        assert "posts in" in line and "posts/s" in line
    assert "0 batch(es) moved to another server after a failure" in result.stdout
    progress = [line for line in result.stderr.splitlines() if "embedding: " in line]
    assert f"{grpc_url} " in progress[-1] and f"{other} " in progress[-1] and "/s" in progress[-1]


def test_index_build_refuses_a_url_given_twice(grpc_url: str, tmp_path: Path) -> None:
    corpus = write_sample_posts(2, tmp_path / "corpus")
    out = str(tmp_path / "index")
    result = CliRunner().invoke(
        app, ["index", "build", str(corpus), "--out", out, "--url", grpc_url, "--url", grpc_url]
    )
    assert result.exit_code == 1 and "more than once" in result.output


@pytest.mark.slow
def test_index_build_refuses_servers_of_different_encoders_by_name(
    grpc_url: str, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """A server of another export (other random weights) beside the session's: refused before any post is sent."""
    from postsim.export.repository import ExportOptions, export_repository
    from postsim.models.settings import ModelSettings, ModelSize

    other = tmp_path_factory.mktemp("other-encoders") / "repository"
    settings = ModelSettings(weights="random", size=ModelSize.TINY, seed=1)
    report = export_repository(ExportOptions(repository=other, models=settings))
    exported = ExportedRepository(path=other, models=report.models)
    corpus = write_sample_posts(4, tmp_path / "corpus")
    with contextlib.contextmanager(serve_a_copy)(exported, tmp_path_factory, "other-encoders-served") as server:
        out = tmp_path / "index"
        command = ["index", "build", str(corpus), "--out", str(out), "--url", grpc_url, "--url", server.endpoints.grpc]
        result = CliRunner().invoke(app, command)
    message = " ".join(result.output.split())
    assert result.exit_code == 1, message
    assert "do not serve the same encoders" in message
    assert f"{grpc_url} serve(s) weights" in message and f"{server.endpoints.grpc} serve(s) weights" in message
    assert not out.exists()
