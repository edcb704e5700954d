"""Faults on a real tritonserver, each on its own server: what postsim does when things break.

- a model's Python-backend process killed: Triton 2.51 neither restarts it nor marks the
  model unready; postsim's launcher reloads it, and the client says what happened;
- a Python-backend process starved of CPU past Triton's one-second health check: Triton gives
  up on it and, once it answers, crashes; the launcher ends it first;
- tritonserver killed: the launcher restarts it, and the front end answers UNAVAILABLE meanwhile;
  a server restarts on its ports right after a clean stop;
- SIGTERM under load: requests in flight finish, new ones are refused, the process exits;
- a bad new model version: the server refuses it and keeps serving the old one;
- shared memory exhausted: an error that names the setting, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pytest
from PIL import Image
from support import ExportedRepository, publish_random_index, server_settings
from tritonclient.utils import InferenceServerException

from postsim.client.api import AsyncPostSimClient, PostSimClient, map_server_error
from postsim.client.posts import Post
from postsim.client.settings import DEFAULT_URL
from postsim.core.errors import PostSimError, ServeError, ServerError, ServerUnavailableError
from postsim.model_repository import contract
from postsim.server.launcher import ServerSettings, TritonServer
from postsim.server.shared_memory import python_instance_count, shared_memory_warning
from postsim.server.watchdog import StubWatchdog

pytestmark = pytest.mark.integration

TEXT_POST = Post(text="Golden retriever puppy learns to fetch")


def _jpeg(seed: int, size: tuple[int, int] = (320, 240)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize(size).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def repository(exported_repository: ExportedRepository, tmp_path: Path) -> Path:
    """A private copy of the exported repository: these tests add versions and touch files."""
    copy = tmp_path / "repository"
    shutil.copytree(exported_repository.path, copy)
    return copy


class StartServer(Protocol):
    def __call__(self, settings: ServerSettings, server_type: type[TritonServer] = ...) -> TritonServer: ...


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    """Starts TritonServers for the test and always stops them."""
    started: list[TritonServer] = []

    def start(settings: ServerSettings, server_type: type[TritonServer] = TritonServer) -> TritonServer:
        server = server_type(settings, log_path=tmp_path / f"tritonserver-{len(started)}.log")
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


# --------------------------------------------------------------------------- (a) a stub killed


UNHEALTHY = "Triton judged the process of model 'tokenize' unhealthy"


def test_a_stub_triton_judged_unhealthy_is_reported_without_claiming_it_died() -> None:
    """Triton says "not healthy" of a dead process and of a live one that missed its health check alike."""
    exc = InferenceServerException(
        msg="in ensemble 'post_embedding', Stub process 'tokenize_0_0' is not healthy.", status="StatusCode.INTERNAL"
    )
    error = map_server_error(exc, url=DEFAULT_URL, model=contract.POST_EMBEDDING, what="post 0")
    assert type(error) is ServerError and error.status == "INTERNAL"
    message = str(error)
    assert UNHEALTHY in message and "(it died, or did not answer Triton's health check in time)" in message
    assert "`postsim serve` replaces such a process within seconds, so retry" in message
    assert "lost its process" not in message and "crashed or was killed" not in message


def test_a_killed_stub_fails_its_model_until_reloaded_and_the_watchdog_reloads_it(
    repository: Path, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    exit_timeout_s = 20
    server = start_server(server_settings(repository, stub_watch_interval_s=None, exit_timeout_s=exit_timeout_s))
    with PostSimClient(server.endpoints.grpc) as client:
        (before,) = client.embed([TEXT_POST])

        # Without the watchdog: Triton 2.51 keeps the model READY while every request fails.
        (stub,) = [stub for stub in server.stubs() if stub.model == contract.TOKENIZE]
        os.kill(stub.pid, signal.SIGKILL)
        for _ in range(2):
            with pytest.raises(ServerError, match=rf"{UNHEALTHY} .* replaces such a process"):
                client.embed([TEXT_POST])
        assert client.is_model_ready(contract.TOKENIZE)  # Triton's view, which is wrong
        server.reload_model(contract.TOKENIZE)
        assert np.allclose(client.embed([TEXT_POST])[0].embedding, before.embedding, atol=1e-6)

        # With it: found within a second and reloaded.
        watchdog = StubWatchdog(server, interval_s=0.5)
        watchdog.start()
        try:
            (stub,) = [stub for stub in server.stubs() if stub.model == contract.TOKENIZE]
            with caplog.at_level(logging.INFO, logger="postsim"):
                os.kill(stub.pid, signal.SIGKILL)
                errors = []
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    try:
                        (after,) = client.embed([TEXT_POST])
                        break
                    except ServerError as error:
                        errors.append(str(error))
                        time.sleep(0.2)
                else:
                    pytest.fail(f"tokenize did not come back within 60 s: {errors[-3:]}")
        finally:
            watchdog.stop()
    assert np.allclose(after.embedding, before.embedding, atol=1e-6)
    assert all(UNHEALTHY in error for error in errors), errors
    assert (
        f"model 'tokenize' (version 1): its Python-backend process (pid {stub.pid}) killed by signal 9" in caplog.text
    )
    assert "model 'tokenize' reloaded after its process died" in caplog.text
    (new_stub,) = [live for live in server.stubs() if live.model == contract.TOKENIZE]
    assert new_stub.pid != stub.pid
    assert server.dead_stub_models == [contract.TOKENIZE]  # the earlier death was before the watchdog

    # The requests that failed on the dead stubs pin its old versions inside Triton 2.51, which would
    # wait out its whole exit timeout for them and exit 1: stopping must not.
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="postsim"):
        assert server.stop() == 0
    took = time.monotonic() - started
    assert took < exit_timeout_s, f"stop() took {took:.1f} s: it waited out Triton's exit timeout"
    assert "live models that nothing will release (Triton 2.51): ending it" in caplog.text


def test_a_stub_starved_past_its_health_check_is_ended_before_it_can_crash_the_server(
    repository: Path, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A stopped process is a process starved of CPU, for as long as the test says.

    Triton 2.51 judges a stub that does not answer its health check within a second
    unhealthy and fails its batch, but the stub lives on; Triton then sends it the next batch
    and reads the answer to the failed one as the answer to it: wrong outputs, then SIGSEGV in
    TRITONBACKEND_ModelInstanceExecute and a boost::interprocess::lock_exception.
    """
    server = start_server(server_settings(repository, exit_timeout_s=10))
    assert server.process is not None
    pid = server.process.pid
    posts = [Post(text=f"post {i} at the beach", image=_jpeg(i)) for i in range(16)]
    with PostSimClient(server.endpoints.grpc) as client:
        before = client.embed(posts[:1])[0]
    failures: list[str] = []
    done = threading.Event()

    def load() -> None:
        with PostSimClient(server.endpoints.grpc) as client:
            while not done.is_set():
                try:
                    client.embed(posts)
                except PostSimError as error:
                    failures.append(str(error))
                    time.sleep(0.1)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        time.sleep(1)
        starved = [stub for stub in server.stubs() if stub.model == contract.FUSER]
        with caplog.at_level(logging.INFO, logger="postsim"):
            for stub in starved:
                os.kill(stub.pid, signal.SIGSTOP)
            time.sleep(4)
            for stub in starved:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(stub.pid, signal.SIGCONT)
            time.sleep(3)
    finally:
        done.set()
        worker.join()
    with PostSimClient(server.endpoints.grpc) as client:
        deadline = time.monotonic() + 60
        while True:
            try:
                after = client.embed(posts[:1])[0]
                break
            except ServerError:
                assert time.monotonic() < deadline, "fuser did not come back"
                time.sleep(0.5)
    assert server.process is not None and server.process.pid == pid, "tritonserver crashed and was restarted"
    assert "Signal (11)" not in server.log_text() and "lock_exception" not in server.log_text()
    assert np.allclose(after.embedding, before.embedding, atol=1e-6)
    assert failures, "Triton never judged the starved process unhealthy"
    assert all("Triton judged the process of model 'fuser' unhealthy" in failure for failure in failures), failures
    assert "unhealthy although its process is alive" in caplog.text
    assert "model 'fuser' reloaded after its process died" in caplog.text
    assert not any(_alive(stub.pid) for stub in starved)


def _alive(pid: int) -> bool:
    """Whether a process runs (a zombie has died: only its exit status is left)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


# --------------------------------------------------------------------------- (b) SIGTERM under load


@dataclass(frozen=True)
class Call:
    start: float
    end: float
    error: PostSimError | None


def test_sigterm_under_load_finishes_requests_in_flight_and_refuses_new_ones(
    repository: Path, start_server: StartServer
) -> None:
    exit_timeout_s = 10
    server = start_server(server_settings(repository, exit_timeout_s=exit_timeout_s))
    posts = [Post(text=f"post {i} at the beach", image=_jpeg(i)) for i in range(8)]
    calls: list[Call] = []
    stopped: dict[str, object] = {}

    async def load() -> None:
        done = asyncio.Event()

        async def worker(client: AsyncPostSimClient) -> None:
            while not done.is_set():
                start = time.monotonic()
                try:
                    await client.embed(posts)
                    calls.append(Call(start, time.monotonic(), None))
                except PostSimError as error:
                    calls.append(Call(start, time.monotonic(), error))
                    await asyncio.sleep(0.05)

        def stop() -> None:
            start = time.monotonic()
            stopped.update(at=start, code=server.stop(), took=time.monotonic() - start)

        async with AsyncPostSimClient(server.endpoints.grpc, timeout_s=30) as client:
            workers = [asyncio.ensure_future(worker(client)) for _ in range(12)]
            await asyncio.sleep(3)
            await asyncio.to_thread(stop)
            await asyncio.sleep(0.5)
            done.set()
            await asyncio.gather(*workers)

    watchdog = server.watchdog
    assert watchdog is not None and watchdog.running
    asyncio.run(load())
    assert server.watchdog is None and not watchdog.running
    stop_at, took = stopped["at"], stopped["took"]
    assert isinstance(stop_at, float) and isinstance(took, float)
    assert stopped["code"] == 0
    assert took < exit_timeout_s, f"stop() took {took:.1f} s"
    # Sent before the stop, answered after it, and answered with embeddings: it was let finish.
    finished_in_flight = [call for call in calls if call.start < stop_at < call.end and call.error is None]
    assert finished_in_flight, "no request in flight when the server was told to stop was let finish"
    failed_in_flight = [
        (round(call.start - stop_at, 2), round(call.end - stop_at, 2), str(call.error))
        for call in calls
        if call.start < stop_at - 0.2 and call.error
    ]
    assert failed_in_flight == [], f"requests sent before the stop failed; stop() took {took:.1f} s"
    refused = [call.error for call in calls if call.start > stop_at and call.error]
    assert refused, "no request was refused while the server stopped"
    for error in refused:
        assert isinstance(error, ServerError)
        assert any(hint in str(error) for hint in ("stopping", "shutting down", "cannot reach")), str(error)
    # UNAVAILABLE, which clients retry (Triton alone answered NOT_FOUND: "unknown model").
    assert {error.status for error in refused if isinstance(error, ServerError)} == {"UNAVAILABLE"}
    assert "Signal (11)" not in server.log_text()


# --------------------------------------------------------------------------- (c) a bad model version


def test_a_bad_new_model_version_is_refused_and_the_old_one_keeps_serving(
    repository: Path, start_server: StartServer
) -> None:
    server = start_server(server_settings(repository, exit_timeout_s=5))
    post = Post(text="Sunset over the bay", image=_jpeg(1))
    with PostSimClient(server.endpoints.grpc) as client:
        (before,) = client.embed([post])
        version_2 = repository / contract.FUSER / "2"
        version_2.mkdir()
        shutil.copy(repository / contract.FUSER / "1" / "model.py", version_2 / "model.py")
        (version_2 / "model.onnx").write_bytes(b"\x08\x07 this is not an ONNX model " * 100)
        with pytest.raises(ServerError) as raised:
            client.load_model(contract.FUSER)
        message = str(raised.value)
        assert "did not load model 'fuser'" in message and "keeps serving the version it had" in message
        assert "fuser version 2" in message and "does not load in ONNX Runtime" in message
        assert "At:" not in message and "Traceback" not in message and ".py(" not in message
        assert client.is_model_ready(contract.FUSER, "1") and not client.is_model_ready(contract.FUSER, "2")
        assert client.is_model_ready(contract.POST_EMBEDDING)
        (after,) = client.embed([post])
    assert np.array_equal(after.embedding, before.embedding)


# --------------------------------------------------------------------------- (d) shared memory


def test_shm_default_bytes_under_the_backend_minimum_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ServeError, match=r"ServerSettings\.shm_default_bytes .*4 MiB.*--shm-default-bytes"):
        ServerSettings(repository=tmp_path, shm_default_bytes=1 << 20)


def test_too_little_dev_shm_for_the_stubs_is_a_warning_naming_the_settings(repository: Path) -> None:
    models = ["preprocess_image", "tokenize", "image_encoder", "text_encoder", "fuser", "post_embedding"]
    instances = python_instance_count(repository, models)
    assert instances == 6  # preprocess_image runs 2 instances; the ensemble runs none
    mib = 1 << 20
    assert shared_memory_warning(instances=instances, shm_default_bytes=16 * mib, free_bytes=2048 * mib) is None
    warning = shared_memory_warning(instances=instances, shm_default_bytes=16 * mib, free_bytes=64 * mib)
    assert warning is not None
    assert "64 MiB free" in warning and "96 MiB" in warning
    assert "ServerSettings.shm_default_bytes" in warning and "--shm-size" in warning


class _SharedMemoryCappedServer(TritonServer):
    """tritonserver whose files, /dev/shm regions included, cannot grow past a size: a full /dev/shm."""

    cap_bytes = 6 << 20

    def command(self, binary_dir: Path) -> list[str]:
        cap = (
            "import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({self.cap_bytes}, {self.cap_bytes})); "
            "os.execv(sys.argv[1], sys.argv[1:])"
        )
        return [sys.executable, "-c", cap, *super().command(binary_dir)]


def test_exhausted_shared_memory_is_an_error_naming_the_setting(repository: Path, start_server: StartServer) -> None:
    settings = server_settings(repository, shm_default_bytes=4 << 20, exit_timeout_s=5)
    server = start_server(settings, _SharedMemoryCappedServer)
    post = Post(text="Sunset over the bay", image=_jpeg(2))
    with PostSimClient(server.endpoints.grpc) as client:
        client.embed([post])  # one post's pixels fit in the 4 MiB the stubs start with
        with pytest.raises(ServerError) as raised:
            client.embed([post] * contract.MAX_BATCH_SIZE)  # 16 × 602 kB of pixels do not
        message = str(raised.value)
        assert not isinstance(raised.value, ServerUnavailableError)
        assert "ran out of shared memory" in message
        assert "ServerSettings.shm_default_bytes" in message and "--shm-size" in message
        assert len(client.embed([post])) == 1  # and it keeps serving what fits


# --------------------------------------------------------------------------- (e) tritonserver itself


def test_a_killed_tritonserver_is_restarted_with_its_published_index(
    repository: Path, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = start_server(server_settings(repository, exit_timeout_s=5, restart_backoff_s=0.5))
    publish_random_index(repository, server.endpoints.grpc)
    query = Post(text="Sunset over the bay")
    errors: list[ServerError] = []
    with PostSimClient(server.endpoints.grpc, timeout_s=30) as client:
        before = [neighbor.id for neighbor in client.similar(query, k=5)]
        assert server.process is not None
        first = server.process.pid
        with caplog.at_level(logging.INFO, logger="postsim"):
            os.kill(first, signal.SIGKILL)
            deadline = time.monotonic() + 300
            while True:
                try:
                    after = [neighbor.id for neighbor in client.similar(query, k=5)]
                    break
                except ServerError as error:
                    errors.append(error)
                    assert time.monotonic() < deadline, f"not back within 300 s: {errors[-1]}"
                    time.sleep(0.2)
        assert client.is_ready()
    assert server.process is not None and server.process.pid != first and server.restarts == 1
    assert after == before  # the published index came back
    assert errors, "no request was sent while tritonserver was down"
    assert all(isinstance(error, ServerUnavailableError) and error.status == "UNAVAILABLE" for error in errors), [
        (type(error).__name__, error.status, str(error)) for error in errors
    ]
    assert any("restarting tritonserver" in str(error) for error in errors)
    # The stubs may print what they saw of the parent's death (Triton 2.51's lock_exception), quoted after the signal.
    assert re.search(
        r"tritonserver died \(killed by signal 9 \(SIGKILL\)[^\n]*\): restarting it in 0\.5 s \(restart 1\)",
        caplog.text,
    )
    assert "tritonserver is back (restart 1)" in caplog.text


def _time_wait_ports() -> set[int]:
    """Local ports of IPv4 TCP connections in TIME_WAIT."""
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "06":
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_a_server_restarts_on_its_ports_right_after_a_clean_stop(repository: Path, start_server: StartServer) -> None:
    settings = server_settings(repository, exit_timeout_s=5)
    first = start_server(settings)
    # A health probe, as Docker's HEALTHCHECK sends: the server closes the connection, and its
    # side of it lingers in TIME_WAIT for a minute on the HTTP port. Reading to the end of the
    # stream before closing makes the server's close come first, so the TIME_WAIT is its own.
    with socket.create_connection(("127.0.0.1", settings.http_port), timeout=10) as probe:
        probe.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        answer = b"".join(iter(lambda: probe.recv(4096), b""))
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert first.stop() == 0
    assert settings.http_port in _time_wait_ports(), "no connection in TIME_WAIT: the test proves nothing"
    second = start_server(settings)
    with PostSimClient(second.endpoints.grpc) as client:
        assert len(client.embed([TEXT_POST])) == 1


_LAUNCHER = """
import sys, time
from pathlib import Path
from postsim.server.launcher import ServerSettings, TritonServer
from postsim.server.ports import free_ports
grpc_port, http_port, metrics_port = free_ports(3)
settings = ServerSettings(repository=Path(sys.argv[1]), address="127.0.0.1", grpc_port=grpc_port,
                          http_port=http_port, metrics_port=metrics_port, exit_timeout_s=5)
server = TritonServer(settings, log_path=Path(sys.argv[2]))
server.start()
print(server.process.pid, flush=True)
time.sleep(600)
"""


def test_tritonserver_does_not_outlive_a_launcher_that_was_killed(repository: Path, tmp_path: Path) -> None:
    """tritonserver runs in a session of its own: nothing else would ever stop it (nor free its ports and memory)."""
    launcher = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER, str(repository), str(tmp_path / "tritonserver.log")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert launcher.stdout is not None
        triton_pid = int(launcher.stdout.readline())
        assert _alive(triton_pid)
    finally:
        launcher.kill()
        launcher.wait()
    deadline = time.monotonic() + 60
    while _alive(triton_pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(triton_pid), "tritonserver still runs after its launcher was killed"
