"""Fixtures shared by the tests: an exported repository and a real tritonserver serving it.

The repository is exported once per test session with random weights; the server starts on
free ports, is waited for until ready, and is always stopped. ``POSTSIM_TEST_SIZE`` picks
the model size the server runs (``tiny`` by default; ``full`` serves ResNet-101 and
DistilBERT, which the export tests export in any case).
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from postsim.core.paths import HOME_ENV, REPOSITORY_ENV
from postsim.model_repository import contract
from postsim.server.launcher import ServerSettings, TritonServer
from postsim.server.ports import free_ports

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


@dataclass(frozen=True)
class ExportedRepository:
    path: Path
    models: object
    """The PyTorch models the repository was exported from (postsim.models.weights.PostSimModels)."""


@pytest.fixture(scope="session")
def exported_repository(tmp_path_factory: pytest.TempPathFactory) -> ExportedRepository:
    from postsim.export.repository import ExportOptions, export_repository
    from postsim.models.settings import ModelSettings, ModelSize

    settings = ModelSettings(weights="random", size=ModelSize(TEST_SIZE), seed=0)
    path = tmp_path_factory.mktemp("repository")
    report = export_repository(ExportOptions(repository=path, models=settings))
    return ExportedRepository(path=path, models=report.models)


def output_subsets(model: str) -> list[tuple[str, ...]]:
    """Every non-empty subset of ``model``'s outputs, each one a client may ask for (KServe ``outputs``)."""
    names = contract.model_specs()[model].output_names
    return [subset for size in range(1, len(names) + 1) for subset in itertools.combinations(names, size)]


def server_settings(repository: Path, **overrides: object) -> ServerSettings:
    """Settings for a test server on free ports, listening on loopback only."""
    grpc_port, http_port, metrics_port = free_ports(3)
    ports = {"grpc_port": grpc_port, "http_port": http_port, "metrics_port": metrics_port}
    settings = {"repository": repository, "address": "127.0.0.1", **ports, **overrides}
    return ServerSettings(**settings)  # type: ignore[arg-type]


def serve_a_copy(
    exported: ExportedRepository, tmp_path_factory: pytest.TempPathFactory, name: str, **overrides: object
) -> Iterator[TritonServer]:
    """A tritonserver on a private copy of the exported repository (tests may publish into it), stopped after."""
    repository = tmp_path_factory.mktemp(name) / "repository"
    shutil.copytree(exported.path, repository)
    with TritonServer(
        server_settings(repository, **overrides), log_path=repository.parent / "tritonserver.log"
    ) as triton:
        yield triton


@pytest.fixture(scope="session")
def server(exported_repository: ExportedRepository, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """A tritonserver on a private copy of the exported repository (tests may publish into it)."""
    yield from serve_a_copy(exported_repository, tmp_path_factory, "served")


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


def publish_random_index(repository: Path, url: str, count: int = 60) -> None:
    """An index of random unit vectors: similar_posts needs one to load, its contents do not matter here."""
    import numpy as np

    from postsim.client.api import PostSimClient
    from postsim.indexing.build import build_index_dir
    from postsim.indexing.publish import publish_index
    from postsim.model_repository.manifest import WeightsManifest

    manifest = WeightsManifest.read(repository)
    vectors = np.random.default_rng(0).standard_normal((count, manifest.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index_dir = repository.parent / "index"
    build_index_dir(index_dir, [f"post-{i}" for i in range(count)], vectors, weights_fingerprint=manifest.fingerprint)
    with PostSimClient(url) as client:
        publish_index(index_dir, repository, client=client)
