"""`postsim index publish` and `rollback` write only into the repository the server serves."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from postsim.cli.main import app
from postsim.client.api import ServedRepository
from postsim.core.errors import RepositoryError
from postsim.corpus.samples import write_sample_posts
from postsim.export.repository import ExportOptions, export_repository
from postsim.indexing.embed import CorpusIndexSettings, build_corpus_index
from postsim.indexing.publish import check_served
from postsim.model_repository import contract
from postsim.model_repository.configs import parse_pbtxt
from postsim.model_repository.contract import REPOSITORY_ID_PARAMETER
from postsim.model_repository.layout import CONFIG_NAME
from postsim.model_repository.manifest import WeightsManifest
from postsim.models.settings import ModelSettings, ModelSize
from postsim.server.launcher import TritonServer


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


def test_a_repository_exported_again_since_the_server_started_is_named(other_repository: Path) -> None:
    manifest = WeightsManifest.read(other_repository)
    served = ServedRepository(repository_id=manifest.repository_id, fingerprint="0000000000000000")
    with pytest.raises(RepositoryError, match="exported again after the server at localhost:1 started"):
        check_served(other_repository, served, "localhost:1")
    check_served(other_repository, replace(served, fingerprint=manifest.fingerprint), "localhost:1")
    with pytest.raises(RepositoryError, match="server's repository was exported by an older postsim"):
        check_served(other_repository, ServedRepository(fingerprint=manifest.fingerprint), "localhost:1")
