"""Fixtures shared by the tests: an exported repository and a real tritonserver serving it.

The helpers tests import by name are in support.py.

The repository is exported once per test session with random weights; the server starts on
free ports, is waited for until ready, and is always stopped. ``POSTSIM_TEST_SIZE`` picks
the model size the server runs (``tiny`` by default; ``full`` serves ResNet-101 and
DistilBERT, which the export tests export in any case).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import (
    BACKENDS,
    EXPLAINED_POSTS,
    ExplainedCorpus,
    ExportedRepository,
    milvus_lite_server,
    publish_sample_index,
    serve_a_copy,
)

from postsim.core.paths import HOME_ENV, REPOSITORY_ENV
from postsim.server.launcher import TritonServer

TEST_SIZE = os.environ.get("POSTSIM_TEST_SIZE", "tiny")


@pytest.fixture(scope="session", autouse=True)
def postsim_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every command's default output folder, for the whole session: a temporary one, not the user's."""
    home = tmp_path_factory.mktemp("postsim-home")
    saved = {name: os.environ.pop(name, None) for name in (HOME_ENV, REPOSITORY_ENV)}
    os.environ[HOME_ENV] = str(home)
    try:
        yield home
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


@pytest.fixture(scope="session")
def exported_repository(tmp_path_factory: pytest.TempPathFactory) -> ExportedRepository:
    from postsim.export.repository import ExportOptions, export_repository
    from postsim.models.settings import ModelSettings, ModelSize

    settings = ModelSettings(weights="random", size=ModelSize(TEST_SIZE), seed=0)
    path = tmp_path_factory.mktemp("repository")
    report = export_repository(ExportOptions(repository=path, models=settings))
    return ExportedRepository(path=path, models=report.models)


@pytest.fixture(scope="session")
def server(exported_repository: ExportedRepository, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """A tritonserver on a private copy of the exported repository (tests may publish into it)."""
    yield from serve_a_copy(exported_repository, tmp_path_factory, "served")


@pytest.fixture(scope="module")
def milvus_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Milvus Lite server on a free port, one per test module (its servers export the same encoders, whose
    collections would otherwise be one alias)."""
    yield from milvus_lite_server(tmp_path_factory.mktemp("milvus") / "data")


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The retrieval backend a suite runs against; a module's servers parametrised with it run it on both.

    Tests marked ``in_process_only`` check what only the FAISS backend has (its files, journal,
    compaction) and are skipped on milvus; ``slow_on_remote_engine`` marks the expensive extras slow there.
    """
    return str(request.param)


def pytest_itemcollected(item: pytest.Item) -> None:
    """The milvus variant of a test marked ``in_process_only`` skipped, of one marked ``slow_on_remote_engine`` slow
    (marked as it is collected, before ``-m`` selects)."""
    callspec = getattr(item, "callspec", None)
    if callspec is None or callspec.params.get("backend") != "milvus":
        return
    if item.get_closest_marker("in_process_only"):
        item.add_marker(pytest.mark.skip(reason="checks what only the FAISS backend has"))
    if item.get_closest_marker("slow_on_remote_engine"):
        item.add_marker(pytest.mark.slow)


@pytest.fixture
def grpc_url(server: TritonServer) -> str:
    return server.endpoints.grpc


ADMIN_KEY = "test-admin-key"


@pytest.fixture(scope="session")
def admin_server(
    exported_repository: ExportedRepository, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServer]:
    """A tritonserver whose model control and repository index need ADMIN_KEY, on its own copy of the repository."""
    yield from serve_a_copy(exported_repository, tmp_path_factory, "admin-served", admin_key=ADMIN_KEY)


@pytest.fixture(scope="session")
def explained_server(
    exported_repository: ExportedRepository, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServer]:
    """A server of its own for the explanation and page tests: the indexes they publish reach no other test."""
    yield from serve_a_copy(exported_repository, tmp_path_factory, "explained")


@pytest.fixture(scope="session")
def explained_corpus(explained_server: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> ExplainedCorpus:
    """Sample posts indexed three ways through ``explained_server``, which serves the flat one."""
    from postsim.corpus.posts import read_posts
    from postsim.corpus.samples import write_sample_posts
    from postsim.indexing.embed import CorpusIndexSettings, build_corpus_index
    from postsim.model_repository.search_index import IndexType

    # Topical posts only: the explanation tests check regions against the drawn object, which generic images lack.
    path = write_sample_posts(
        EXPLAINED_POSTS, tmp_path_factory.mktemp("explained-corpus"), seed=11, generic_captions=0, generic_images=0
    )
    records = [json.loads(line) for line in path.read_text().splitlines()]
    indexes = tmp_path_factory.mktemp("explained-indexes")

    def build(name: str, **settings: Any) -> Path:
        out = indexes / name
        url = explained_server.endpoints.grpc
        report = build_corpus_index(CorpusIndexSettings(corpus=path, out_dir=out, url=url, **settings))
        assert report.indexed == EXPLAINED_POSTS and not report.failures
        return out

    corpus = ExplainedCorpus(
        path=path,
        posts=list(read_posts(path)),
        boxes={record["id"]: tuple(record["object_box"]) for record in records if "object_box" in record},
        flat=build("flat", index_type=IndexType.FLAT),
        ivfpq=build("ivfpq", index_type=IndexType.IVFPQ),
        no_unimodal=build("no-unimodal", index_type=IndexType.FLAT, unimodal=False),
    )
    publish_sample_index(explained_server, corpus.flat)
    return corpus
