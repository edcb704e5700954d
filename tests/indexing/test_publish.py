"""`postsim index publish` and `rollback` write only into the repository the server serves."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from support import ExportedRepository, server_settings
from typer.testing import CliRunner

from postsim.cli.main import app
from postsim.client.api import PostSimClient, ServedRepository
from postsim.client.posts import Post
from postsim.core.errors import RepositoryError, SearchIndexError, ServerError
from postsim.corpus.samples import write_sample_posts
from postsim.export.repository import ExportOptions, export_repository
from postsim.export.triton_config import apply_retrieval
from postsim.indexing.build import build_index_dir
from postsim.indexing.embed import CorpusIndexSettings, build_corpus_index
from postsim.indexing.publish import check_served, publish_index, rollback_index
from postsim.model_repository import contract
from postsim.model_repository.configs import parse_pbtxt
from postsim.model_repository.contract import REPOSITORY_ID_PARAMETER, RetrievalBackend, RetrievalSettings
from postsim.model_repository.layout import CONFIG_NAME, version_dirs
from postsim.model_repository.manifest import WeightsManifest
from postsim.models.settings import ModelSettings, ModelSize
from postsim.server.launcher import TritonServer
from postsim.server.ports import free_ports


@pytest.fixture(scope="module")
def other_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second export, with the same settings as the served one: only the repository tells them apart."""
    path = tmp_path_factory.mktemp("other") / "repository"
    export_repository(ExportOptions(repository=path, models=ModelSettings(weights="random", size=ModelSize.TINY)))
    return path


def _output(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, " ".join(result.output.split())


def test_every_config_names_the_repository_and_a_new_export_keeps_its_id(
    other_repository: Path, tmp_path: Path
) -> None:
    manifest = WeightsManifest.read(other_repository)
    assert len(manifest.repository_id) == 16
    configs = sorted(other_repository.glob(f"*/{CONFIG_NAME}"))
    assert len(configs) == len(contract.model_specs(manifest.dim))
    for config_path in configs:
        config = parse_pbtxt(config_path.read_text())
        assert config.parameters[REPOSITORY_ID_PARAMETER].string_value == manifest.repository_id, config_path

    copy = tmp_path / "copy"
    shutil.copytree(other_repository, copy)
    export_repository(ExportOptions(repository=copy, models=ModelSettings(weights="random", size=ModelSize.TINY)))
    assert WeightsManifest.read(copy).repository_id == manifest.repository_id


@pytest.mark.integration
def test_publish_and_rollback_refuse_a_repository_the_server_does_not_serve(
    admin_server: TritonServer, other_repository: Path, tmp_path: Path
) -> None:
    """Against the admin-key server (whose repository no other test publishes into), with its key."""
    corpus = write_sample_posts(4, tmp_path / "corpus")
    index_dir = tmp_path / "index"
    url = admin_server.endpoints.grpc
    build_corpus_index(CorpusIndexSettings(corpus=corpus, out_dir=index_dir, url=url))
    key = ["--url", url, "--admin-key", str(admin_server.settings.admin_key)]
    retrieval = other_repository / contract.RETRIEVAL
    before = sorted(path.name for path in retrieval.iterdir())

    code, output = _output("index", "publish", str(index_dir), "--repository", str(other_repository), *key)
    assert code == 1, output
    assert f"the server at {url} serves another model repository than {other_repository}" in output
    assert "`--repository DIR`" in output
    code, output = _output("index", "rollback", "--repository", str(other_repository), *key)
    assert code == 1, output
    assert "serves another model repository" in output
    assert sorted(path.name for path in retrieval.iterdir()) == before, "nothing may be installed or retired"

    code, output = _output("index", "publish", str(index_dir), "--repository", str(admin_server.repository), *key)
    assert code == 0, output
    assert f"{url} serves it now" in output


def test_a_replica_that_does_not_answer_the_check_stops_the_publish_before_anything_is_installed(
    other_repository: Path, tmp_path: Path
) -> None:
    (port,) = free_ports(1)  # nothing listens there
    retrieval = other_repository / contract.RETRIEVAL
    before = sorted(path.name for path in retrieval.iterdir())
    where = ["--repository", str(other_repository), "--url", f"127.0.0.1:{port}"]
    code, output = _output("index", "publish", str(tmp_path), *where)
    assert code == 1, output
    assert f"cannot ask 127.0.0.1:{port} which repository it serves, so nothing was installed or retired" in output
    code, output = _output("index", "rollback", *where)
    assert code == 1 and "nothing was installed or retired" in output, output
    assert sorted(path.name for path in retrieval.iterdir()) == before


def test_a_repository_exported_again_since_the_server_started_is_named(other_repository: Path) -> None:
    manifest = WeightsManifest.read(other_repository)
    served = ServedRepository(repository_id=manifest.repository_id, fingerprint="0000000000000000")
    with pytest.raises(RepositoryError, match="exported again after the server at localhost:1 started"):
        check_served(other_repository, served, "localhost:1")
    check_served(other_repository, replace(served, fingerprint=manifest.fingerprint), "localhost:1")
    with pytest.raises(RepositoryError, match="server's repository was exported by an older postsim"):
        check_served(other_repository, ServedRepository(fingerprint=manifest.fingerprint), "localhost:1")


# --------------------------------------------------------------------------- replicas on one repository


@contextlib.contextmanager
def _replicas(
    exported: ExportedRepository,
    folder: Path,
    admin_keys: Sequence[str | None] = (None, None),
    *,
    milvus_uri: str | None = None,
) -> Iterator[list[TritonServer]]:
    """A tritonserver per admin key (None: no key) on ONE copy of the exported repository, as replicas on a
    shared volume.

    ``milvus_uri``: the repository's retrieval is on the Milvus there (the milvus backend).

    The repository holds version 1 (``first-*`` posts) when they start, as a volume a publish wrote to
    before; they start at once (twice as fast as one after the other on two cores).
    """
    repository = folder / "repository"
    shutil.copytree(exported.path, repository)
    if milvus_uri is not None:
        apply_retrieval(repository, RetrievalSettings(backend=RetrievalBackend.MILVUS, milvus_uri=milvus_uri))
    publish_index(_random_index(repository, folder / "first", "first", 1), repository)
    count = len(admin_keys)
    servers = [
        TritonServer(server_settings(repository, admin_key=key), log_path=folder / f"tritonserver-{n}.log")
        for n, key in enumerate(admin_keys)
    ]
    with contextlib.ExitStack() as stack:
        for server in servers:
            stack.callback(server.stop)
        with ThreadPoolExecutor(count) as pool:
            list(pool.map(TritonServer.start, servers))
        urls = [server.endpoints.grpc for server in servers]
        assert [_serves(url) for url in urls] == [(1, "first")] * count
        yield servers


def _random_index(repository: Path, index_dir: Path, prefix: str, seed: int) -> Path:
    """40 random unit vectors with ids ``PREFIX-N``: which index a server searches shows in its answers' ids."""
    manifest = WeightsManifest.read(repository)
    vectors = np.random.default_rng(seed).standard_normal((40, manifest.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    build_index_dir(
        index_dir, [f"{prefix}-{row}" for row in range(40)], vectors, weights_fingerprint=manifest.fingerprint
    )
    return index_dir


def _serves(url: str) -> tuple[int, str]:
    """The retrieval version the server at ``url`` has ready, and the id prefix of its nearest post."""
    with PostSimClient(url) as client:
        ready = [version for version in range(1, 6) if client.is_model_ready(contract.RETRIEVAL, str(version))]
        (hit,) = client.similar(Post(text="a sunset over the bay"), k=1)
    assert len(ready) == 1, f"{url} has retrieval versions {ready} ready"
    return ready[0], hit.id.split("-")[0]


@pytest.mark.integration
def test_publish_and_rollback_switch_every_replica_of_a_shared_repository(
    exported_repository: ExportedRepository, tmp_path: Path
) -> None:
    """Two servers on one repository folder: a publish over both makes both serve the new version, a rollback
    the previous one; each is named in the summary."""
    with _replicas(exported_repository, tmp_path) as servers:
        repository, urls = servers[0].repository, [server.endpoints.grpc for server in servers]
        second = _random_index(repository, tmp_path / "second", "second", 2)
        where = ["--repository", str(repository), "--url", urls[0], "--url", urls[1]]

        code, output = _output("index", "publish", str(second), *where)
        assert code == 0, output
        assert f"published {second} as retrieval version 2; 2 servers serve it now" in output
        assert f"{urls[0]}: retrieval version 2" in output and f"{urls[1]}: retrieval version 2" in output
        assert [_serves(url) for url in urls] == [(2, "second"), (2, "second")]

        # The first replica loaded version 2 first, so it writes the version's journal; the other refuses changes.
        with PostSimClient(urls[1]) as client, pytest.raises(ServerError, match="another server writes the changes"):
            client.delete(["second-0"])
        with PostSimClient(urls[0]) as client:
            assert client.delete(["second-0"]).deleted == ("second-0",)

        code, output = _output("index", "rollback", *where)
        assert code == 0, output
        assert "retrieval version 1 is current again" in output
        assert f"{urls[0]}: retrieval version 1" in output and f"{urls[1]}: retrieval version 1" in output
        assert [_serves(url) for url in urls] == [(1, "first"), (1, "first")]

        code, output = _output("index", "publish", str(second), *where, "--url", urls[0])
        assert code == 1 and f"--url names {urls[0]} more than once" in output, output


@pytest.mark.integration
@pytest.mark.slow
def test_replicas_on_milvus_switch_the_alias_once_and_each_reports_the_version(
    exported_repository: ExportedRepository, milvus_uri: str, tmp_path: Path
) -> None:
    """The milvus backend through the same commands: one alias switch, then each replica loads the version folder
    naming it, and both search the new collection."""
    with _replicas(exported_repository, tmp_path, milvus_uri=milvus_uri) as servers:
        repository, urls = servers[0].repository, [server.endpoints.grpc for server in servers]
        second = _random_index(repository, tmp_path / "second", "second", 2)
        where = ["--repository", str(repository), "--url", urls[0], "--url", urls[1]]
        code, output = _output("index", "publish", str(second), *where)
        assert code == 0, output
        assert [_serves(url) for url in urls] == [(2, "second"), (2, "second")]
        code, output = _output("index", "rollback", *where)
        assert code == 0, output
        assert [_serves(url) for url in urls] == [(1, "first"), (1, "first")]


@pytest.mark.integration
@pytest.mark.slow
def test_a_replica_that_stops_mid_publish_sends_the_others_back_and_is_named(
    exported_repository: ExportedRepository, tmp_path: Path
) -> None:
    """The second replica stops once the first serves the new version: the version is retired, the first goes back
    to the previous one, and the error names the stopped replica."""
    with _replicas(exported_repository, tmp_path) as servers:
        repository, urls = servers[0].repository, [server.endpoints.grpc for server in servers]
        second = _random_index(repository, tmp_path / "second", "second", 2)

        def stop_the_other(url: str, version: int) -> None:
            assert (url, version) == (urls[0], 2)
            servers[1].stop()

        with contextlib.ExitStack() as stack:
            clients = [stack.enter_context(PostSimClient(url)) for url in urls]
            with pytest.raises(SearchIndexError) as raised:
                publish_index(second, repository, client=clients, on_served=stop_the_other)
        message = " ".join(str(raised.value).split())
        assert f"{urls[1]} did not bring retrieval version 2 up" in message
        assert f"{urls[0]} serve(s) version 1 again" in message
        assert _serves(urls[0]) == (1, "first")
        retrieval = repository / contract.RETRIEVAL
        assert [path.name for path in version_dirs(retrieval)] == ["1"]
        assert [path.name.split("-")[1] for path in retrieval.glob(".refused-*")] == ["2"]


@pytest.mark.integration
@pytest.mark.slow
def test_a_replica_that_refuses_the_load_is_named_and_the_others_go_back(
    exported_repository: ExportedRepository, tmp_path: Path
) -> None:
    """The second of three replicas has an admin key the command does not send, so it refuses model control (it
    still says which repository it serves): the CLI names it with its answer, the first serves version 1 again,
    and the third was never asked."""
    with _replicas(exported_repository, tmp_path, (None, "replica-key", None)) as servers:
        repository, urls = servers[0].repository, [server.endpoints.grpc for server in servers]
        second = _random_index(repository, tmp_path / "second", "second", 2)
        where = ["--repository", str(repository), *(option for url in urls for option in ("--url", url))]
        code, output = _output("index", "publish", str(second), *where)
        assert code == 1, output
        assert f"{urls[0]} serves retrieval version 2 (1 of 3)" in output
        assert f"{urls[1]} did not bring retrieval version 2 up (" in output and "admin key" in output
        assert f"{urls[0]} serve(s) version 1 again; {urls[2]} were not asked" in output
        assert [_serves(url) for url in urls] == [(1, "first")] * 3


@pytest.mark.integration
@pytest.mark.slow
def test_a_rollback_a_replica_cannot_follow_leaves_every_replica_on_the_newest(
    exported_repository: ExportedRepository, tmp_path: Path
) -> None:
    """Rollback over two replicas, the second stopped once the first went back: the newest version is current
    again on disk and on the first, and the error names the second."""
    with _replicas(exported_repository, tmp_path) as servers:
        repository, urls = servers[0].repository, [server.endpoints.grpc for server in servers]
        code, output = _output(
            "index", "publish", str(_random_index(repository, tmp_path / "second", "second", 2)),
            "--repository", str(repository), "--url", urls[0], "--url", urls[1],
        )  # fmt: skip
        assert code == 0, output

        def stop_the_other(url: str, version: int) -> None:
            assert (url, version) == (urls[0], 1)
            servers[1].stop()

        with contextlib.ExitStack() as stack:
            clients = [stack.enter_context(PostSimClient(url)) for url in urls]
            with pytest.raises(SearchIndexError) as raised:
                rollback_index(repository, client=clients, on_served=stop_the_other)
        message = " ".join(str(raised.value).split())
        assert f"{urls[1]} (" in message and "did not bring retrieval version 1 up" in message
        assert f"version 2 is current again; {urls[0]} serve(s) version 2 again" in message
        assert _serves(urls[0]) == (2, "second")
        assert [path.name for path in version_dirs(repository / contract.RETRIEVAL)] == ["1", "2"]
