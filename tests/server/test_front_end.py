"""postsim's front end: clients that cancel, time out or hang up cannot take tritonserver down.

Triton 2.51 crashes (SIGSEGV in ``TRITONBACKEND_ResponseSend``) when a client's deadline
expires or it cancels while its request runs: 10 ms deadlines one after another killed it
within a hundred requests. The front end stands between clients and tritonserver, so
Triton never sees any of that. The integration tests here run against both ensembles of a
real server with a published index; the rest check the front end's own rules without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from support import ExportedRepository, publish_random_index, server_settings
from tritonclient.utils import InferenceServerException

from postsim.client.api import PostSimClient, build_inputs
from postsim.client.posts import Post
from postsim.core.errors import ServeError
from postsim.model_repository import contract
from postsim.model_repository.in_flight import InFlightCount, create_in_flight_file
from postsim.model_repository.protocol import GRPC_INTERNAL_HEADER, GRPC_RESTRICTED_HEADER
from postsim.server.front_end import (
    _ADMIN_PATHS,
    FrontEnd,
    FrontEndSettings,
    FrontEndState,
    _forwarded_metadata,
    _Gate,
    _model_states,
    _Overloaded,
)
from postsim.server.launcher import TritonServer
from postsim.server.ports import free_ports

ENSEMBLES = (contract.POST_EMBEDDING, contract.SIMILAR_POSTS)


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize((320, 240)).save(buffer, format="JPEG")
    return buffer.getvalue()


POST = Post(text="Golden retriever puppy learns to fetch #dogs", image=_jpeg(0))


@pytest.fixture(scope="module")
def server(exported_repository: ExportedRepository, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """A server of its own with an index published: these tests try to crash it."""
    repository = tmp_path_factory.mktemp("front-end") / "repository"
    shutil.copytree(exported_repository.path, repository)
    with TritonServer(
        server_settings(repository, exit_timeout_s=10), log_path=repository.parent / "triton.log"
    ) as triton:
        publish_random_index(repository, triton.endpoints.grpc)
        yield triton


def _inputs(ensemble: str) -> list[grpcclient.InferInput]:
    return build_inputs([POST], k=3 if ensemble == contract.SIMILAR_POSTS else None)


def _answers_normally(server: TritonServer, ensemble: str) -> None:
    with PostSimClient(server.endpoints.grpc, timeout_s=60) as client:
        if ensemble == contract.SIMILAR_POSTS:
            assert len(client.similar(POST, k=3)) == 3
        else:
            (result,) = client.embed([POST])
            assert result.embedding.shape == (256,)


def _assert_tritonserver_never_died(server: TritonServer, pid: int) -> None:
    assert server.process is not None and server.process.pid == pid, "tritonserver was restarted"
    assert server.restarts == 0
    assert "Signal (11)" not in server.log_text()


@pytest.mark.integration
@pytest.mark.parametrize("ensemble", ENSEMBLES)
def test_a_storm_of_10_ms_deadlines_leaves_tritonserver_running(server: TritonServer, ensemble: str) -> None:
    """300 requests, each with a 10 ms deadline: 200 one after another, then 4 clients at once."""
    assert server.process is not None
    pid = server.process.pid
    inputs = _inputs(ensemble)
    outcomes: list[str] = []

    def send(count: int) -> None:
        with grpcclient.InferenceServerClient(server.endpoints.grpc) as client:
            for _ in range(count):
                try:
                    client.infer(ensemble, inputs, client_timeout=0.01)
                    outcomes.append("answered")
                except InferenceServerException as error:
                    outcomes.append(str(error.status()))

    send(200)
    threads = [threading.Thread(target=send, args=(25,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(outcomes) == 300
    # How many expire depends on the machine's load (a tiny model can answer within 10 ms); 50 are a storm.
    assert outcomes.count("StatusCode.DEADLINE_EXCEEDED") >= 50, "the storm did not happen: requests were too fast"
    assert set(outcomes) <= {"answered", "StatusCode.DEADLINE_EXCEEDED"}, set(outcomes)
    _answers_normally(server, ensemble)
    _assert_tritonserver_never_died(server, pid)


@pytest.mark.integration
@pytest.mark.parametrize("ensemble", ENSEMBLES)
def test_clients_that_hang_up_mid_request_leave_tritonserver_running(server: TritonServer, ensemble: str) -> None:
    assert server.process is not None
    pid = server.process.pid
    inputs = _inputs(ensemble)
    for attempt in range(40):
        client = grpcclient.InferenceServerClient(server.endpoints.grpc)
        client.async_infer(ensemble, inputs, callback=lambda result, error: None)
        time.sleep(0.002 * (attempt % 5))
        client.close()  # the channel closes with the request in flight
    _answers_normally(server, ensemble)
    _assert_tritonserver_never_died(server, pid)


@pytest.mark.integration
def test_streaming_inference_is_refused_with_a_clear_status(server: TritonServer) -> None:
    errors: list[InferenceServerException] = []
    with grpcclient.InferenceServerClient(server.endpoints.grpc) as client:
        client.start_stream(callback=lambda result, error: errors.append(error))
        try:
            client.async_stream_infer(contract.POST_EMBEDDING, _inputs(contract.POST_EMBEDDING))
        except InferenceServerException as raised:  # refused as the stream opened: the callback has the status
            assert "no longer in valid state" in str(raised), raised
        deadline = time.monotonic() + 30
        while not errors and time.monotonic() < deadline:
            time.sleep(0.05)
        client.stop_stream()
    assert errors and errors[0] is not None
    assert errors[0].status() == "StatusCode.UNIMPLEMENTED"
    assert "ModelStreamInfer" in str(errors[0].message()) and "call ModelInfer" in str(errors[0].message())


@pytest.mark.integration
def test_http_inference_goes_through_the_front_end(server: TritonServer) -> None:
    body = {
        "inputs": [
            {"name": "IMAGE", "shape": [1, 1], "datatype": "BYTES", "data": [""]},
            {"name": "TEXT", "shape": [1, 1], "datatype": "BYTES", "data": ["sunset over the bay"]},
        ]
    }
    request = urllib.request.Request(
        f"{server.endpoints.http}/v2/models/{contract.POST_EMBEDDING}/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.loads(response.read())
    outputs = {output["name"]: output for output in answer["outputs"]}
    assert outputs[contract.EMBEDDING.name]["shape"] == [1, 256]
    with urllib.request.urlopen(f"{server.endpoints.metrics}", timeout=30) as response:
        assert b"nv_inference_request_success" in response.read()


@pytest.mark.integration
def test_tritonserver_listens_on_no_public_address(server: TritonServer) -> None:
    assert server.process is not None
    args = Path(f"/proc/{server.process.pid}/cmdline").read_bytes().decode().split("\0")
    options = dict(arg.split("=", 1) for arg in args if arg.startswith("--") and "=" in arg)
    assert options["--grpc-address"].startswith("unix:")
    assert options["--http-address"] == "127.0.0.1" and options["--metrics-address"] == "127.0.0.1"
    socket_dir = Path(options["--grpc-address"].removeprefix("unix:")).parent
    assert socket_dir.stat().st_mode & 0o777 == 0o700
    # Its loopback port wants the key only the launcher and the front end hold.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://127.0.0.1:{server.internal.http_port}/v2/models/fuser", timeout=10)
    assert refused.value.code == 403


# --------------------------------------------------------------------------- the front end's own rules


@contextlib.contextmanager
def _listening(port: int) -> Iterator[None]:
    """Another program listening on ``port``."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        yield


def test_a_taken_port_is_named_with_the_option_to_change() -> None:
    grpc_port, http_port, metrics_port = free_ports(3)
    with _listening(http_port):
        front_end = FrontEnd(
            FrontEndSettings(address="127.0.0.1", grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port)
        )
        with pytest.raises(ServeError, match=rf"port {http_port} .*cannot be used.*--http-port"):
            front_end.start()
    assert not front_end.is_running()


def test_calls_beyond_max_in_flight_are_refused_and_stopping_reports_when_drained() -> None:
    events: list[dict[str, Any]] = []
    gate = _Gate(FrontEndSettings(max_in_flight=2), events.append)
    gate.set_state(FrontEndState.SERVING, "", None)

    async def run() -> None:
        release = asyncio.Event()
        answers = [gate.shielded(release.wait) for _ in range(2)]
        with pytest.raises(_Overloaded):
            gate.shielded(release.wait)
        assert "overloaded" in gate.overloaded_message() and "2 requests" in gate.overloaded_message()
        answers[0].cancel()  # a client that goes away: the call to Triton runs on, and still counts
        await asyncio.sleep(0)
        assert gate.in_flight == 2
        gate.set_state(FrontEndState.STOPPING, "", None)
        assert events == []
        release.set()
        await answers[1]
        await asyncio.sleep(0)
        assert gate.in_flight == 0
        assert events == [{"event": "drained"}]

    asyncio.run(run())
    assert gate.refusal() is not None and gate.refusal().startswith("the server is shutting down")  # type: ignore[union-attr]


def test_the_models_read_how_many_inference_calls_run_in_triton_abandoned_ones_included(tmp_path: Path) -> None:
    path = tmp_path / "in-flight"
    create_in_flight_file(path)
    gate = _Gate(FrontEndSettings(in_flight_file=str(path)), lambda event: None)
    gate.set_state(FrontEndState.SERVING, "", None)
    model_side = InFlightCount(path, writable=False)  # what a model maps in its own process
    seen: list[int] = []

    async def run() -> None:
        release = asyncio.Event()
        answers = [gate.shielded(release.wait) for _ in range(3)]
        metadata = gate.shielded(release.wait, inference=False)  # health, metadata: not work for the models
        seen.append(model_side.read())
        answers[0].cancel()  # its client went away; the call still runs in Triton
        await asyncio.sleep(0)
        seen.append(model_side.read())
        release.set()
        await asyncio.gather(*answers[1:], metadata)
        await asyncio.sleep(0)
        seen.append(model_side.read())

    asyncio.run(run())
    assert seen == [3, 3, 0]
    model_side.close()


def test_requests_that_cannot_make_their_deadline_are_not_started_while_the_server_is_congested() -> None:
    gate = _Gate(FrontEndSettings(max_in_flight=4), lambda event: None)
    gate.set_state(FrontEndState.SERVING, "", None)
    gate.latency_s = 0.2

    async def run() -> None:
        release = asyncio.Event()
        running = [gate.shielded(release.wait) for _ in range(2)]
        assert gate.too_late(0.01) is not None  # 2 of 4 running: congested
        assert "about 200 ms now, more than the 10 ms left" in str(gate.too_late(0.01))
        assert gate.too_late(0.5) is None and gate.too_late(None) is None
        release.set()
        await asyncio.gather(*running)
        assert gate.too_late(0.01) is None  # nothing running: every request is started

    asyncio.run(run())


@pytest.mark.parametrize(
    ("path", "admin"),
    [
        ("/v2/repository/index", True),
        ("/v2/repository/models/retrieval/load", True),
        ("/v2/systemsharedmemory/region/x/register", True),
        ("/v2/cudasharedmemory/status", True),
        ("/v2/logging", True),
        ("/v2/trace/setting", True),
        ("/v2/models/fuser/trace/setting", True),
        ("/v2/models/fuser/versions/1/trace/setting", True),
        ("/v2/models/fuser/infer", False),
        ("/v2/models/fuser/stats", False),
        ("/v2/health/ready", False),
        ("/v2", False),
    ],
)
def test_admin_paths_are_model_control_shared_memory_log_and_trace_settings(path: str, admin: bool) -> None:
    assert bool(_ADMIN_PATHS.match(path)) is admin


def test_forwarded_metadata_keeps_neither_the_admin_key_nor_a_forged_internal_key() -> None:
    metadata = [
        (GRPC_RESTRICTED_HEADER, "admin"),
        (GRPC_INTERNAL_HEADER, "forged"),
        ("user-agent", "grpc-python"),
        ("grpc-accept-encoding", "gzip"),
        ("traceparent", "00-abc-def-01"),
    ]
    assert _forwarded_metadata(metadata) == [("traceparent", "00-abc-def-01")]


def test_a_model_is_ready_while_any_version_serves_whatever_happened_to_the_others() -> None:
    index = [
        {"name": "retrieval", "version": "1", "state": "READY"},
        {"name": "retrieval", "version": "2", "state": "UNAVAILABLE", "reason": "checksum mismatch"},
        {"name": "similar_posts", "version": "1", "state": "LOADING"},
        {"name": "fuser", "version": "2", "state": "UNAVAILABLE"},
        {"name": "fuser", "version": "3", "state": "UNLOADING"},
        {"name": "post_embedding", "state": ""},
    ]
    assert _model_states(index) == {
        "retrieval": "READY",
        "similar_posts": "LOADING",
        "fuser": "UNLOADING",
        "post_embedding": "",
    }
