"""Helpers the tests import (``from support import ...``): servers on free ports and what they serve.

They live here rather than in conftest.py so that a test in any folder imports them by a name
no other file shares (each folder may have a conftest.py of its own).
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from postsim.corpus.posts import CorpusPost
from postsim.model_repository import contract
from postsim.server.launcher import ServerSettings, TritonServer
from postsim.server.ports import free_ports


@dataclass(frozen=True)
class ExportedRepository:
    path: Path
    models: object
    """The PyTorch models the repository was exported from (postsim.models.weights.PostSimModels)."""


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


EXPLAINED_POSTS = 48
"""Sample posts the explanation and page tests index (``explained_corpus``)."""


@dataclass(frozen=True)
class ExplainedCorpus:
    """Sample posts, where each image's object was drawn, and three indexes of them."""

    path: Path
    posts: list[CorpusPost]
    boxes: dict[str, tuple[int, int, int, int]]
    flat: Path
    ivfpq: Path
    no_unimodal: Path

    def with_image_and_text(self) -> list[CorpusPost]:
        return [post for post in self.posts if post.text and post.image_path]


def publish_sample_index(server: TritonServer, index_dir: Path) -> None:
    from postsim.client.api import PostSimClient
    from postsim.indexing.publish import publish_index

    with PostSimClient(server.endpoints.grpc) as client:
        publish_index(index_dir, server.repository, client=client)
