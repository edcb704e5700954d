"""Helpers the tests import (``from support import ...``): servers on free ports and what they serve.

They live here rather than in conftest.py so that a test in any folder imports them by a name
no other file shares (each folder may have a conftest.py of its own).
"""

from __future__ import annotations

import io
import itertools
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image, ImageDraw

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
    exported: ExportedRepository,
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    *,
    milvus_uri: str | None = None,
    **overrides: object,
) -> Iterator[TritonServer]:
    """A tritonserver on a private copy of the exported repository (tests may publish into it), stopped after.

    ``milvus_uri``: its retrieval searches the Milvus there (the milvus backend) instead of FAISS.
    """
    repository = tmp_path_factory.mktemp(name) / "repository"
    shutil.copytree(exported.path, repository)
    if milvus_uri is not None:
        from postsim.export.triton_config import apply_retrieval

        apply_retrieval(
            repository, contract.RetrievalSettings(backend=contract.RetrievalBackend.MILVUS, milvus_uri=milvus_uri)
        )
    with TritonServer(
        server_settings(repository, **overrides), log_path=repository.parent / "tritonserver.log"
    ) as triton:
        yield triton


BACKENDS = [backend.value for backend in contract.RetrievalBackend]
"""The retrieval backends a suite parametrised with ``backend`` runs against."""


def milvus_lite_server(data_dir: Path) -> Iterator[str]:
    """Milvus Lite as a local gRPC server on a free port (``milvus-lite server``), its URI, stopped after.

    One process holds the database; the test process and the server's retrieval stub both
    connect to it over the URI, as replicas connect to a Milvus cluster.
    """
    import subprocess
    import sys
    import time

    pymilvus = pytest.importorskip("pymilvus", reason="the milvus extra (pymilvus, milvus-lite) runs these tests")
    pytest.importorskip("milvus_lite", reason="the milvus extra (pymilvus, milvus-lite) runs these tests")
    (port,) = free_ports(1)
    command = [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data_dir), "--host", "127.0.0.1"]
    log = (data_dir.parent / "milvus-lite.log").open("wb")
    process = subprocess.Popen([*command, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"milvus-lite server exited with {process.returncode}; see {log.name}")
            try:
                pymilvus.MilvusClient(uri=uri, timeout=2).close()
                break
            except pymilvus.exceptions.MilvusException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield uri
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


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


# --------------------------------------------------------------------------- videos

VIDEO_SIZE = (64, 48)
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48)]
PALETTE += [(145, 30, 180), (70, 240, 240), (240, 50, 230), (128, 128, 0), (0, 0, 128)]
"""Ten colours far apart, one per frame of the numbered videos."""


def picture(colour: tuple[int, int, int], size: tuple[int, int] = VIDEO_SIZE) -> Image.Image:
    """A flat colour with a white disc and a dark bar, so that position and orientation show."""
    image = Image.new("RGB", size, colour)
    draw = ImageDraw.Draw(image)
    width, height = size
    draw.ellipse((width // 4, height // 4, width // 2, height // 2 + height // 4), fill=(250, 250, 250))
    draw.rectangle((0, height - height // 6, width // 3, height), fill=(20, 20, 20))
    return image


def audio_only_mp4() -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=8000)
        for index in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 8000, index * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def tkhd_payload(data: bytes | bytearray) -> int:
    return data.index(b"tkhd") + 4


def with_track_header_size(data: bytes, width: int, height: int) -> bytes:
    """The MP4 with its track header's size edited (16.16 fixed point, after 76 bytes of a version-0 tkhd)."""
    edited = bytearray(data)
    offset = tkhd_payload(edited) + 76
    edited[offset : offset + 8] = struct.pack(">II", width << 16, height << 16)
    return bytes(edited)


EXPLAINED_POSTS = 48
"""Sample posts the explanation and page tests index (``explained_corpus``)."""


@dataclass(frozen=True)
class ExplainedCorpus:
    """Sample posts (a few of them videos), where each picture's object was drawn, and three indexes of them."""

    path: Path
    posts: list[CorpusPost]
    boxes: dict[str, tuple[int, int, int, int]]
    flat: Path
    ivfpq: Path
    no_unimodal: Path

    def with_image_and_text(self) -> list[CorpusPost]:
        """The posts with a picture (not a video: its object has no one place) and a text."""
        return [post for post in self.posts if post.text and post.id in self.boxes]

    def videos(self) -> list[CorpusPost]:
        return [post for post in self.posts if post.image_path is not None and post.image_path.suffix == ".mp4"]


def publish_sample_index(server: TritonServer, index_dir: Path) -> None:
    from postsim.client.api import PostSimClient
    from postsim.indexing.publish import publish_index

    with PostSimClient(server.endpoints.grpc) as client:
        publish_index(index_dir, server.repository, client=client)
