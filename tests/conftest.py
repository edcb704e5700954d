"""Fixtures shared by the tests: an exported repository and a real tritonserver serving it.

The repository is exported once per test session with random weights; the server starts on
free ports, is waited for until ready, and is always stopped. ``POSTSIM_TEST_SIZE`` picks
the model size the server runs (``tiny`` by default; ``full`` serves ResNet-101 and
DistilBERT, which the export tests export in any case).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from postsim.model_repository.server import ServerSettings, TritonServer, free_ports

TEST_SIZE = os.environ.get("POSTSIM_TEST_SIZE", "tiny")


@dataclass(frozen=True)
class ExportedRepository:
    path: Path
    models: object
    """The PyTorch models the repository was exported from (postsim.export.weights.PostSimModels)."""


@pytest.fixture(scope="session")
def exported_repository(tmp_path_factory: pytest.TempPathFactory) -> ExportedRepository:
    from postsim.export.repository import ExportOptions, export_repository
    from postsim.export.weights import ModelSettings, ModelSize

    settings = ModelSettings(weights="random", size=ModelSize(TEST_SIZE), seed=0)
    path = tmp_path_factory.mktemp("repository")
    report = export_repository(ExportOptions(repository=path, models=settings))
    return ExportedRepository(path=path, models=report.models)


def server_settings(repository: Path, **overrides: object) -> ServerSettings:
    """Settings for a test server on free ports, listening on loopback only."""
    grpc_port, http_port, metrics_port = free_ports(3)
    ports = {"grpc_port": grpc_port, "http_port": http_port, "metrics_port": metrics_port}
    settings = {"repository": repository, "address": "127.0.0.1", **ports, **overrides}
    return ServerSettings(**settings)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def server(exported_repository: ExportedRepository, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """A tritonserver on a private copy of the exported repository (tests may publish into it)."""
    repository = tmp_path_factory.mktemp("served") / "repository"
    shutil.copytree(exported_repository.path, repository)
    triton = TritonServer(server_settings(repository), log_path=repository.parent / "tritonserver.log")
    with triton:
        yield triton


@pytest.fixture
def grpc_url(server: TritonServer) -> str:
    return server.endpoints.grpc


def publish_random_index(repository: Path, url: str, count: int = 60) -> None:
    """An index of random unit vectors: similar_posts needs one to load, its contents do not matter here."""
    import numpy as np

    from postsim.client.api import PostSimClient
    from postsim.client.indexing import build_index_dir
    from postsim.client.publish import publish_index
    from postsim.model_repository.manifest import WeightsManifest

    manifest = WeightsManifest.read(repository)
    vectors = np.random.default_rng(0).standard_normal((count, manifest.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index_dir = repository.parent / "index"
    build_index_dir(index_dir, [f"post-{i}" for i in range(count)], vectors, weights_fingerprint=manifest.fingerprint)
    with PostSimClient(url) as client:
        publish_index(index_dir, repository, client=client)
