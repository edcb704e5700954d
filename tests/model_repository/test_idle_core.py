"""The idle-core thread policy: a lone image_encoder request runs wider only while no other instance is busy."""

from __future__ import annotations

import io
import multiprocessing
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support import ExportedRepository, server_settings

from postsim.client.api import PostSimClient
from postsim.client.posts import Post
from postsim.export.triton_config import ServingSettings, ThreadPolicy, apply_serving_settings
from postsim.model_repository import contract
from postsim.model_repository.idle_core import IdleCore, idle_core_lock_path
from postsim.server.launcher import TritonServer

WIDER_SESSION_USED = "a lone request ran on the idle core"


def _hold_the_idle_core(
    path: Path, holding: multiprocessing.synchronize.Event, release: multiprocessing.synchronize.Event
) -> None:
    idle_core = IdleCore(path)
    with idle_core.claimed() as claimed:
        assert claimed
        holding.set()
        release.wait(timeout=30)
    idle_core.close()


def test_an_instance_finds_the_idle_core_taken_while_another_process_runs_on_it(tmp_path: Path) -> None:
    path = idle_core_lock_path(tmp_path / "image_encoder")
    context = multiprocessing.get_context("spawn")
    holding, release = context.Event(), context.Event()
    other_instance = context.Process(target=_hold_the_idle_core, args=(path, holding, release))
    other_instance.start()
    idle_core = IdleCore(path)
    try:
        assert holding.wait(timeout=30)
        with idle_core.claimed() as claimed:
            assert not claimed, "the core another instance runs on is not idle"
        release.set()
        other_instance.join(timeout=30)
        assert other_instance.exitcode == 0
        with idle_core.claimed() as claimed:
            assert claimed
        with idle_core.claimed() as claimed:
            assert claimed, "claiming it again after a release must succeed"
    finally:
        release.set()
        other_instance.join(timeout=30)
        idle_core.close()


def test_each_served_copy_of_a_model_has_its_own_lock_outside_the_repository(tmp_path: Path) -> None:
    first = idle_core_lock_path(tmp_path / "a" / "image_encoder")
    second = idle_core_lock_path(tmp_path / "b" / "image_encoder")
    assert first != second
    assert tmp_path not in first.parents
    assert first == idle_core_lock_path(tmp_path / "a" / ".." / "a" / "image_encoder")


@pytest.fixture(scope="module")
def idle_core_server(
    exported_repository: ExportedRepository, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServer]:
    repository = tmp_path_factory.mktemp("idle-core") / "repository"
    shutil.copytree(exported_repository.path, repository)
    apply_serving_settings(repository, ServingSettings().with_thread_policy(ThreadPolicy.IDLE_CORE))
    with TritonServer(server_settings(repository), log_path=repository.parent / "tritonserver.log") as triton:
        yield triton


def _post_embeddings(url: str, count: int) -> np.ndarray:
    """``count`` posts sent one at a time: each is a lone request for image_encoder."""
    rng = np.random.default_rng(0)
    posts = []
    for n in range(count):
        encoded = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(encoded, format="PNG")
        posts.append(Post(image=encoded.getvalue(), text=f"post {n}"))
    with PostSimClient(url) as client:
        return np.stack([client.embed([post])[0].embedding for post in posts])


@pytest.mark.integration
def test_a_lone_request_runs_on_the_wider_session_and_gets_the_same_embedding(
    idle_core_server: TritonServer, server: TritonServer
) -> None:
    wider = _post_embeddings(idle_core_server.endpoints.grpc, 4)
    narrow = _post_embeddings(server.endpoints.grpc, 4)

    np.testing.assert_allclose(wider, narrow, atol=1e-5)
    log = idle_core_server.log_path.read_text()
    assert f"{contract.IMAGE_ENCODER}: {WIDER_SESSION_USED}" in log
    assert "2 for a lone request on the idle core" in log
    assert WIDER_SESSION_USED not in server.log_path.read_text(), "the default policy keeps one session per model"
