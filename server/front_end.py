"""The front end of ``postsim serve``: what clients reach. tritonserver listens where they cannot.

Triton 2.51 crashes when a client cancels a request, lets its deadline expire or hangs up
while the request runs (a race in its gRPC front end and Python backend, fixed upstream
only in later releases; README, "Known issues of Triton 2.51"). So clients never talk to
Triton: they talk to this front end, and Triton never sees a client's cancellation,
deadline or disconnect.

- **gRPC**: every unary method of KServe-v2 ``inference.GRPCInferenceService`` is
  forwarded as raw bytes (no tensor is deserialised) to tritonserver, which listens on a
  unix socket in a private folder. The call to Triton is *shielded*: a client that
  cancels, lets its deadline pass or disconnects ends its own call; the call to Triton
  runs to its end and its answer is dropped. At most ``max_in_flight`` inference calls
  run in Triton at once, abandoned ones included, so a storm of abandoned requests cannot
  pile up: past that the front end answers UNAVAILABLE ("overloaded") at once; and while
  half of them run, a request whose deadline is nearer than Triton's recent latency is
  answered DEADLINE_EXCEEDED without being started. Streaming (``ModelStreamInfer``) is
  refused with UNIMPLEMENTED.
- **HTTP**: a reverse proxy of Triton's HTTP API (on loopback), shielded and bounded the
  same way; ``generate_stream`` is refused.
- **metrics**: Triton's Prometheus endpoint, proxied (``GET /metrics`` only).
- **TLS**: with a certificate, every public port above speaks TLS only (mutual TLS when a
  CA is given). The only plaintext port is the optional health port, which answers
  ``/v2/health/live`` and ``/v2/health/ready`` and nothing else.
- **Admin key**: model control and the repository index, shared memory, log settings and
  trace settings need it (gRPC header ``triton-grpc-protocol-postsim-admin-key``, HTTP
  header ``postsim-admin-key``); everything else is open. Triton itself requires, on every
  API but health, a random key made at each start that only the launcher and the front
  end hold (``Upstream.key``).
- **Health**: ``/v2/health/ready`` and gRPC ``ServerReady`` say whether the server answers:
  ``post_embedding`` is ready, and ``similar_posts`` too once an index is served.
  ``/v2/health/live`` and ``ServerLive`` say the front end runs.
- **States** (:class:`FrontEndState`): while tritonserver starts, restarts after dying,
  or stops, every call but health is answered UNAVAILABLE with what is happening, so
  clients that retry on UNAVAILABLE retry.

It runs as a child process of the launcher (``python -m postsim.server.front_end``),
so its event loop competes for no GIL with the launcher or with a benchmark's load
generator in that process. The launcher writes the settings as one JSON line on the
child's stdin (secrets reach neither argv nor the environment), then state changes; the
child reports on stdout, one JSON object a line: ``listening`` or ``failed``, log records,
``drained`` (nothing left in flight while stopping), and ``unhealthy_stub`` (Triton judged
a Python-backend process unhealthy: :meth:`TritonServer.on_unhealthy_stub
<postsim.server.launcher.TritonServer.on_unhealthy_stub>` says why that matters)
and ``model_load``. When its stdin closes, the child stops, and stops tritonserver too if
the launcher did not (it died).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import hmac
import json
import logging
import os
import queue
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from postsim.core.errors import ServeError
from postsim.model_repository import contract
from postsim.model_repository.in_flight import InFlightCount
from postsim.model_repository.layout import INDEX_SERVING_MODELS
from postsim.model_repository.protocol import (
    ADMIN_KEY_VARIABLE,
    GRPC_INTERNAL_HEADER,
    GRPC_RESTRICTED_HEADER,
    INTERNAL_HEADER,
    LOST_TRITON_MESSAGE,
    OVERLOADED_MESSAGE,
    RESTARTING_MESSAGE,
    RESTRICTED_HEADER,
    SHUTTING_DOWN_MESSAGE,
    STARTING_MESSAGE,
    unhealthy_stubs,
)

if TYPE_CHECKING:
    import aiohttp
    import grpc
    from aiohttp import web

logger = logging.getLogger("postsim")

TRITON_RESTRICTED_CATEGORIES = (
    "metadata",
    "inference",
    "shared-memory",
    "model-config",
    "model-repository",
    "statistics",
    "trace",
    "logging",
)
"""Triton's API categories that need the internal key: all but ``health``, which the launcher polls at start."""

SERVICE = "inference.GRPCInferenceService"
ADMIN_METHODS = frozenset(
    {
        "RepositoryIndex",
        "RepositoryModelLoad",
        "RepositoryModelUnload",
        "SystemSharedMemoryStatus",
        "SystemSharedMemoryRegister",
        "SystemSharedMemoryUnregister",
        "CudaSharedMemoryStatus",
        "CudaSharedMemoryRegister",
        "CudaSharedMemoryUnregister",
        "TraceSetting",
        "LogSettings",
    }
)
"""gRPC methods that need the admin key: model control, shared memory, trace and log settings."""
_ADMIN_PATHS = re.compile(
    r"^/v2/(?:repository(?:/.*)?|systemsharedmemory(?:/.*)?|cudasharedmemory(?:/.*)?|logging|trace/setting"
    r"|models/[^/]+(?:/versions/[^/]+)?/trace/setting)$"
)
"""HTTP paths that need the admin key: the same APIs as ADMIN_METHODS."""
_HTTP_LOAD_PATH = re.compile(r"^/v2/repository/models/([^/]+)/load$")
_STREAMING_PATH = re.compile(r"/generate_stream$")
_INFERENCE_PATH = re.compile(r"/(?:infer|generate)$")
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "server",
        "date",
    }
)

_TRANSPORT_FAILURE = re.compile(
    r"failed to connect|connections to all backends failing|Socket closed|Connection reset|Broken pipe"
    r"|Stream removed|recvmsg|No such file or directory|Connection refused"
)
"""How gRPC words a call that never reached tritonserver, or lost it midway (not Triton's own UNAVAILABLE)."""


class FrontEndState(str, enum.Enum):
    """What the front end does with a call (health calls are always answered)."""

    STARTING = "starting"
    SERVING = "serving"
    RESTARTING = "restarting"
    STOPPING = "stopping"

    def refusal(self, reason: str = "") -> str:
        """The UNAVAILABLE message of a call refused in this state."""
        why = f" ({reason})" if reason else ""
        return {
            FrontEndState.STARTING: f"{STARTING_MESSAGE}: retry in a few seconds",
            FrontEndState.SERVING: "",
            FrontEndState.RESTARTING: (
                f"{RESTARTING_MESSAGE} tritonserver, which stopped unexpectedly{why}: retry in a few seconds"
            ),
            FrontEndState.STOPPING: f"{SHUTTING_DOWN_MESSAGE}: retry once it is back, or against another server",
        }[self]


@dataclass(frozen=True, kw_only=True)
class TlsSettings:
    """TLS on every public port; mutual TLS when a CA is given (clients must then present a certificate it signed)."""

    certificate: Path
    private_key: Path
    client_ca: Path | None = None


@dataclass(frozen=True, kw_only=True)
class Upstream:
    """Where tritonserver listens (never a public address) and the key it requires."""

    grpc: str
    """gRPC target: ``unix:/<private folder>/grpc:0``."""
    http: str
    """Base URL of its HTTP API on loopback."""
    metrics: str
    """URL of its metrics on loopback."""
    key: str
    """The random per-start key of its restricted APIs (INTERNAL_HEADER)."""


@dataclass(frozen=True, kw_only=True)
class FrontEndSettings:
    address: str = "0.0.0.0"
    """Where the public ports listen."""
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    health_address: str | None = None
    """``HOST:PORT`` of a plaintext port answering ``/v2/health/*`` only; None: no such port."""
    tls: TlsSettings | None = None
    admin_key: str | None = None
    """None: admin calls are open to every client (as without the front end)."""
    max_in_flight: int = 64
    """Calls running in Triton at once, abandoned ones included; past it, UNAVAILABLE (overloaded)."""
    max_message_bytes: int = (1 << 31) - 1
    """Largest request or answer, gRPC and HTTP (Triton's own gRPC limit)."""
    in_flight_file: str | None = None
    """Where to keep the count of inference calls running in Triton, for the models to read
    (:mod:`postsim.model_repository.in_flight`); None: not kept."""

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ServeError(f"max_in_flight must be at least 1, got {self.max_in_flight}")
        if self.health_address is not None:
            health_endpoint(self.health_address)

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str)

    @classmethod
    def from_json(cls, text: str) -> FrontEndSettings:
        values = json.loads(text)
        tls = values.pop("tls")
        if tls is not None:
            tls = TlsSettings(
                certificate=Path(tls["certificate"]),
                private_key=Path(tls["private_key"]),
                client_ca=Path(tls["client_ca"]) if tls["client_ca"] else None,
            )
        return cls(tls=tls, **values)


def environment_without_secrets() -> dict[str, str]:
    """This process's environment for a child process, without the admin key: no child takes it from there."""
    return {name: value for name, value in os.environ.items() if name != ADMIN_KEY_VARIABLE}


def health_endpoint(address: str) -> tuple[str, int]:
    """``HOST:PORT`` as (host, port); ServeError when it is not one."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ServeError(f"the health address must be HOST:PORT (e.g. 127.0.0.1:8080), got {address!r}")
    return host.strip("[]"), int(port)


# --------------------------------------------------------------------------- the launcher's side


@dataclass(frozen=True)
class UnhealthyStub:
    """Triton failed a request because it judged this Python-backend process unhealthy."""

    instance: str
    """The model instance (``fuser_0_0``): the stub's name."""
    sent_at: float
    """When the front end sent the request Triton failed (``time.time()``)."""


class FrontEndListener(Protocol):
    """What the launcher hears from the front end, besides its log records."""

    def on_unhealthy_stub(self, report: UnhealthyStub) -> None: ...

    def on_model_load(self, model: str, *, done: bool) -> None:
        """A client's load of ``model`` went to Triton (``done``: it finished, loaded or not)."""


class FrontEnd:
    """The front-end child process, seen from the launcher: start it, tell it the state, stop it."""

    def __init__(self, settings: FrontEndSettings, *, listener: FrontEndListener | None = None) -> None:
        self.settings = settings
        self._listener = listener
        self.process: subprocess.Popen[str] | None = None
        self._write_lock = threading.Lock()
        self._first_event: queue.Queue[dict[str, Any]] = queue.Queue()
        self._drained = threading.Event()
        self._reader: threading.Thread | None = None

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the child and wait until its ports listen; ServeError with its reason when they cannot."""
        self.process = subprocess.Popen(
            [sys.executable, "-m", __name__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=environment_without_secrets(),  # it gets the admin key on stdin
            start_new_session=True,  # Ctrl-C reaches the launcher, which stops everything in order
        )
        self._reader = threading.Thread(target=self._read_events, name="postsim-front-end-events", daemon=True)
        self._reader.start()
        self._send({"settings": json.loads(self.settings.to_json())})
        try:
            event = self._first_event.get(timeout=timeout_s)
        except queue.Empty:
            self.stop()
            raise ServeError(f"the front end did not start listening within {timeout_s:.0f} s") from None
        if event.get("event") != "listening":
            self.stop()
            raise ServeError(str(event.get("message") or "the front end exited before it could listen"))

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def set_state(self, state: FrontEndState, *, upstream: Upstream | None = None, reason: str = "") -> None:
        if state is FrontEndState.STOPPING:
            self._drained.clear()
        message: dict[str, Any] = {"state": state.value, "reason": reason}
        if upstream is not None:
            message["upstream"] = asdict(upstream)
        self._send(message)

    def watch_triton(self, pid: int | None) -> None:
        """The tritonserver the front end stops if the launcher dies (its stdin closes before this says None)."""
        self._send({"triton_pid": pid})

    def wait_drained(self, timeout_s: float) -> bool:
        """After STOPPING: True once no call is running in Triton any more, False at the timeout."""
        return self._drained.wait(max(0.0, timeout_s))

    def stop(self, timeout_s: float = 10.0) -> None:
        """Close the child's stdin (it stops) and wait for it; kill it if it does not exit."""
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(OSError), self._write_lock:
            if process.stdin is not None:
                process.stdin.close()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("the front end did not stop within %.0f s: killing it", timeout_s)
            process.kill()
            process.wait()
        if self._reader is not None:
            self._reader.join(timeout=timeout_s)

    def _send(self, message: Mapping[str, Any]) -> None:
        process = self.process
        if process is None or process.stdin is None:
            return
        with contextlib.suppress(OSError, ValueError), self._write_lock:
            process.stdin.write(json.dumps(message) + "\n")
            process.stdin.flush()

    def _read_events(self) -> None:
        process = self.process
        assert process is not None and process.stdout is not None
        for line in process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                logger.warning("front end: %s", line.rstrip())
                continue
            kind = event.get("event")
            if kind in ("listening", "failed"):
                self._first_event.put(event)
            elif kind == "log":
                logger.log(int(event.get("level", logging.INFO)), "%s", event.get("message", ""))
            elif kind == "drained":
                self._drained.set()
            elif kind in ("unhealthy_stub", "model_load") and self._listener is not None:
                try:
                    if kind == "unhealthy_stub":
                        report = UnhealthyStub(instance=event["instance"], sent_at=float(event["sent_at"]))
                        self._listener.on_unhealthy_stub(report)
                    else:
                        self._listener.on_model_load(event["model"], done=bool(event["done"]))
                except Exception:  # the reader must outlive whatever one handler ran into
                    logger.exception("handling the front end's %s event failed", kind)
        self._first_event.put({"event": "failed", "message": f"the front end exited (code {process.wait()})"})
        self._drained.set()  # nothing runs through a front end that is gone


# --------------------------------------------------------------------------- the child: shared gate


class _Overloaded(Exception):
    pass


class _Gate:
    """What both protocols share: the state, the bound on calls in Triton, the admin key, readiness."""

    def __init__(self, settings: FrontEndSettings, emit: Callable[[dict[str, Any]], None]) -> None:
        self.settings = settings
        self.emit = emit
        self.state = FrontEndState.STARTING
        self.reason = ""
        self.upstream: Upstream | None = None
        self.in_flight = 0
        """Calls running in Triton (what a stop waits for)."""
        self.inferring = 0
        """Inference calls among them (what max_in_flight bounds, and what the models read)."""
        self.inferring_count = (
            InFlightCount(Path(settings.in_flight_file), writable=True) if settings.in_flight_file else None
        )
        self.latency_s: float | None = None
        """How long an inference call to Triton takes lately (a moving average)."""
        self._tasks: set[asyncio.Task[Any]] = set()
        self.session: aiohttp.ClientSession | None = None

    def refusal(self) -> str | None:
        """Why a call is refused now (UNAVAILABLE), or None."""
        if self.state is FrontEndState.SERVING and self.upstream is not None:
            return None
        return self.state.refusal(self.reason) or "the server is not connected to tritonserver yet: retry"

    def is_admin(self, key: str | None) -> bool:
        expected = self.settings.admin_key
        if expected is None:
            return True
        return key is not None and hmac.compare_digest(key.encode(), expected.encode())

    def shielded(self, work: Callable[[], Awaitable[Any]], *, inference: bool = True) -> Awaitable[Any]:
        """Run ``work()`` (a call to Triton) to its end even if the caller goes away.

        Inference calls count against ``max_in_flight`` (_Overloaded past it); the others
        (health, metadata, model control) are few and cheap, and must get through an
        overload: an operator publishing an index, a load balancer asking for readiness.
        """
        if inference and self.inferring >= self.settings.max_in_flight:
            raise _Overloaded
        self.in_flight += 1
        self._set_inferring(self.inferring + inference)
        task = asyncio.ensure_future(work())
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._finished, inference=inference, started=time.monotonic()))
        return asyncio.shield(task)

    def too_late(self, time_left_s: float | None) -> str | None:
        """Why an inference request with ``time_left_s`` before its deadline is not worth starting, or None.

        Only while the server is congested (half of ``max_in_flight`` running): a request that
        cannot be answered before its client gives up would run in Triton all the same, abandoned,
        taking the place of one whose client waits. Under that, every request is started.
        """
        congested = self.inferring >= max(1, self.settings.max_in_flight // 2)
        if not congested or time_left_s is None or self.latency_s is None or time_left_s >= self.latency_s:
            return None
        return (
            f"the server is busy: a request takes about {self.latency_s * 1000:.0f} ms now, more than the "
            f"{max(time_left_s, 0) * 1000:.0f} ms left before its deadline, so it was not started"
        )

    def overloaded_message(self) -> str:
        return (
            f"{OVERLOADED_MESSAGE}: {self.inferring} requests are running in tritonserver, the most this server "
            "takes at once (max_in_flight): retry later"
        )

    def _finished(self, task: asyncio.Task[Any], *, inference: bool, started: float) -> None:
        self.in_flight -= 1
        self._set_inferring(self.inferring - inference)
        if inference and not task.cancelled() and task.exception() is None:
            took = time.monotonic() - started
            self.latency_s = took if self.latency_s is None else 0.8 * self.latency_s + 0.2 * took
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: an abandoned call's error is nobody's to raise
        if self.state is FrontEndState.STOPPING and self.in_flight == 0:
            self.emit({"event": "drained"})

    def _set_inferring(self, count: int) -> None:
        self.inferring = count
        if self.inferring_count is not None:
            self.inferring_count.write(count)

    def set_state(self, state: FrontEndState, reason: str, upstream: Upstream | None) -> None:
        self.state, self.reason = state, reason
        if upstream is not None:
            self.upstream = upstream
        if state is FrontEndState.STOPPING and self.in_flight == 0:
            self.emit({"event": "drained"})

    def note_error(self, message: str, sent_at: float) -> None:
        """Tell the launcher when Triton failed a call because it judged a Python-backend process unhealthy."""
        for instance in dict.fromkeys(stub.instance for stub in unhealthy_stubs(message)):
            self.emit({"event": "unhealthy_stub", "instance": instance, "sent_at": sent_at})

    def note_load(self, model: str, *, done: bool) -> None:
        """Tell the launcher when a client's model load starts and ends (which requests reach which version)."""
        self.emit({"event": "model_load", "model": model, "done": done})

    def upstream_headers(self) -> dict[str, str]:
        assert self.upstream is not None
        return {INTERNAL_HEADER: self.upstream.key}

    async def triton_http(self, method: str, path: str) -> tuple[int, bytes]:
        """One call to Triton's HTTP API with the internal key (for readiness and model loads)."""
        assert self.session is not None and self.upstream is not None
        async with self.session.request(
            method, self.upstream.http + path, headers=self.upstream_headers(), data=b"{}" if method == "POST" else None
        ) as response:
            return response.status, await response.read()

    async def ready(self) -> bool:
        """Whether the server answers: serving, ``post_embedding`` ready, and ``similar_posts`` once an index serves.

        The question to Triton is shielded like any other call: a prober that hangs up does not end it.
        """
        if self.refusal() is not None:
            return False
        return await asyncio.shield(asyncio.ensure_future(self._ready()))

    async def _ready(self) -> bool:
        try:
            status, body = await self.triton_http("POST", "/v2/repository/index")
            if status != 200:
                return False
            index = json.loads(body)
        except (OSError, ValueError, asyncio.TimeoutError):
            return False
        except Exception as error:  # aiohttp's client errors
            logger.debug("readiness: tritonserver did not answer (%s)", error)
            return False
        states = _model_states(index)
        if states.get(contract.POST_EMBEDDING) != "READY":
            return False
        # Once an index serves, similar_posts must answer too: not ready if it failed or was unloaded
        # (still loading, with the first index, is not a failure: it never answered before).
        failed = states.get(contract.SIMILAR_POSTS, "") not in ("READY", "LOADING", "")
        return not (states.get(contract.RETRIEVAL) == "READY" and failed)

    async def after_load(self, model: str) -> str | None:
        """Once ``retrieval`` (the first index) loads, load the models that serve it; their error, or None.

        ``similar_posts`` is not loaded before an index exists, so that it is never ready
        without one (the launcher loads what the repository holds at start).
        """
        if model != contract.RETRIEVAL:
            return None
        status, body = await self.triton_http("POST", "/v2/repository/index")
        states = _model_states(json.loads(body)) if status == 200 else {}
        for dependent in INDEX_SERVING_MODELS:
            if states.get(dependent) == "READY":
                continue
            logger.info("front end: the first index is served: loading %s", dependent)
            status, body = await self.triton_http("POST", f"/v2/repository/models/{dependent}/load")
            if status != 200:
                return f"retrieval loaded, but {dependent} did not: {body.decode(errors='replace')[:500]}"
        return None


def _model_states(index: list[dict[str, Any]]) -> dict[str, str]:
    """Each model's state in Triton's repository index: READY if any version is, else LOADING if one loads.

    A version refused beside a serving one (a bad index) leaves the model READY.
    """
    rank = {"READY": 2, "LOADING": 1}
    states: dict[str, str] = {}
    for entry in sorted(index, key=lambda entry: int(entry.get("version") or 0)):  # oldest first: newest stands
        name, state = entry.get("name", ""), entry.get("state", "")
        if rank.get(state, 0) >= rank.get(states.get(name, ""), 0):
            states[name] = state
    return states


# --------------------------------------------------------------------------- the child: gRPC


def _grpc_method_kinds() -> dict[str, bool]:
    """Each method of the KServe-v2 service: True when it streams."""
    from tritonclient.grpc import service_pb2

    service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    return {method.name: method.client_streaming or method.server_streaming for method in service.methods}


_CLIENT_ONLY_METADATA = (GRPC_RESTRICTED_HEADER, GRPC_INTERNAL_HEADER, "user-agent", "te", "content-type")


def _forwarded_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> list[tuple[str, str | bytes]]:
    """The client's metadata that Triton may see: not gRPC's own, not the admin key, never an internal key."""
    return [
        (key, value)
        for key, value in metadata or ()
        if not key.startswith((":", "grpc-")) and key not in _CLIENT_ONLY_METADATA
    ]


class _GrpcProxy:
    """Generic handler: each unary method of the service, forwarded as bytes; streaming refused."""

    def __init__(self, gate: _Gate) -> None:
        import grpc

        self._grpc = grpc
        self.gate = gate
        self._kinds = _grpc_method_kinds()
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._channel: grpc.aio.Channel | None = None
        self._channel_target = ""

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method
        handler = self._handlers.get(method)
        if handler is None:
            service, _, name = method.lstrip("/").partition("/")
            if service != SERVICE or name not in self._kinds:
                return None  # gRPC answers UNIMPLEMENTED
            if self._kinds[name]:
                handler = self._grpc.stream_stream_rpc_method_handler(self._refuse_stream)
            else:
                handler = self._grpc.unary_unary_rpc_method_handler(self._unary_handler(name))
            self._handlers[method] = handler
        return handler

    def channel(self) -> grpc.aio.Channel:
        upstream = self.gate.upstream
        assert upstream is not None
        if self._channel is None or self._channel_target != upstream.grpc:
            size = self.gate.settings.max_message_bytes
            self._channel = self._grpc.aio.insecure_channel(
                upstream.grpc,
                options=[("grpc.max_send_message_length", size), ("grpc.max_receive_message_length", size)],
            )
            self._channel_target = upstream.grpc
        return self._channel

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def _refuse_stream(self, requests: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(
            self._grpc.StatusCode.UNIMPLEMENTED,
            "streaming inference (ModelStreamInfer) is not served by postsim: call ModelInfer",
        )

    def _unary_handler(self, name: str) -> Callable[[bytes, Any], Awaitable[bytes]]:
        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return await self._unary(name, request, context)

        return handle

    async def _unary(self, name: str, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        from tritonclient.grpc import service_pb2

        codes = self._grpc.StatusCode
        gate = self.gate
        if name == "ServerLive":
            return bytes(service_pb2.ServerLiveResponse(live=True).SerializeToString())
        if name == "ServerReady":
            return bytes(service_pb2.ServerReadyResponse(ready=await gate.ready()).SerializeToString())
        metadata = list(context.invocation_metadata() or ())
        if name in ADMIN_METHODS:
            key = next((str(value) for k, value in metadata if k == GRPC_RESTRICTED_HEADER), None)
            if not gate.is_admin(key):
                await context.abort(
                    codes.PERMISSION_DENIED,
                    f"This protocol is restricted to the server's admin key: send it in the "
                    f"'{GRPC_RESTRICTED_HEADER}' header",
                )
        refusal = gate.refusal()
        if refusal is not None:
            await context.abort(codes.UNAVAILABLE, refusal)
        if name == "ModelInfer" and (late := gate.too_late(context.time_remaining())) is not None:
            await context.abort(codes.DEADLINE_EXCEEDED, late)
        forwarded = [*_forwarded_metadata(metadata), (GRPC_INTERNAL_HEADER, gate.upstream_headers()[INTERNAL_HEADER])]
        try:
            answer = gate.shielded(lambda: self._call(name, request, forwarded), inference=name == "ModelInfer")
        except _Overloaded:
            await context.abort(codes.UNAVAILABLE, gate.overloaded_message())
        try:
            code, message, response = await answer
        except Exception as error:  # the connection to Triton broke (it died, or restarts)
            logger.debug("the call to tritonserver failed: %s", error)
            await context.abort(codes.UNAVAILABLE, gate.refusal() or LOST_TRITON_MESSAGE)
        if code is not None:
            if code == codes.UNAVAILABLE and _TRANSPORT_FAILURE.search(message):
                message = gate.refusal() or LOST_TRITON_MESSAGE  # never the private socket's path
            await context.abort(code, message)
        assert response is not None
        return response

    async def _call(
        self, name: str, request: bytes, metadata: list[tuple[str, str | bytes]]
    ) -> tuple[grpc.StatusCode | None, str, bytes | None]:
        """The call to Triton (shielded): (None, "", answer) or (status, message, None)."""
        call = self.channel().unary_unary(f"/{SERVICE}/{name}")
        loaded = _loaded_model(name, request)
        if loaded is not None:
            self.gate.note_load(loaded, done=False)
        sent_at = time.time()
        try:
            response = await call(request, metadata=tuple(metadata))
        except self._grpc.aio.AioRpcError as error:
            details = error.details() or ""
            self.gate.note_error(details, sent_at)
            return error.code(), details, None
        finally:
            if loaded is not None:
                self.gate.note_load(loaded, done=True)
        if loaded is not None:
            failure = await self.gate.after_load(loaded)
            if failure is not None:
                return self._grpc.StatusCode.INTERNAL, failure, None
        return None, "", bytes(response)


def _loaded_model(method: str, request: bytes) -> str | None:
    """The model a RepositoryModelLoad request loads; None for any other method."""
    if method != "RepositoryModelLoad":
        return None
    from tritonclient.grpc import service_pb2

    return str(service_pb2.RepositoryModelLoadRequest.FromString(request).model_name)


def _server_credentials(tls: TlsSettings) -> grpc.ServerCredentials:
    import grpc

    ca = tls.client_ca.read_bytes() if tls.client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(tls.private_key.read_bytes(), tls.certificate.read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


# --------------------------------------------------------------------------- the child: HTTP


def _ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.certificate, tls.private_key)
    if tls.client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(tls.client_ca)
    return context


def _json_error(status: int, message: str) -> web.Response:
    from aiohttp import web

    return web.json_response({"error": message}, status=status)


class _HttpProxy:
    """Reverse proxy of Triton's HTTP API (and of its metrics), shielded and bounded like gRPC."""

    def __init__(self, gate: _Gate) -> None:
        self.gate = gate

    def api(self) -> web.Application:
        from aiohttp import web

        app = web.Application(client_max_size=self.gate.settings.max_message_bytes)
        self._add_health(app)
        app.router.add_route("*", "/{path:.*}", self.forward)
        return app

    def metrics(self) -> web.Application:
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/metrics", self.forward_metrics)
        return app

    def health(self) -> web.Application:
        from aiohttp import web

        app = web.Application()
        self._add_health(app)
        return app

    def _add_health(self, app: web.Application) -> None:
        app.router.add_get("/v2/health/live", self.live)
        app.router.add_get("/v2/health/ready", self.ready)

    async def live(self, request: web.Request) -> web.Response:
        from aiohttp import web

        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        from aiohttp import web

        return web.Response(status=200 if await self.gate.ready() else 400)

    async def forward(self, request: web.Request) -> web.Response:
        from aiohttp import web

        gate = self.gate
        path = request.path
        if _ADMIN_PATHS.match(path) and not gate.is_admin(request.headers.get(RESTRICTED_HEADER)):
            return _json_error(
                403, f"This API is restricted to the server's admin key: send it in the '{RESTRICTED_HEADER}' header"
            )
        if _STREAMING_PATH.search(path):
            return _json_error(501, "streaming generation (generate_stream) is not served by postsim: call infer")
        refusal = gate.refusal()
        if refusal is not None:
            return _json_error(503, refusal)
        body = await request.read()
        headers = {
            key: value
            for key, value in request.headers.items()
            if key.lower() not in _HOP_BY_HOP and key.lower() not in (RESTRICTED_HEADER, INTERNAL_HEADER)
        }
        headers.update(gate.upstream_headers())
        load = _HTTP_LOAD_PATH.match(path)
        try:
            loaded = urllib.parse.unquote(load[1]) if load else None
            answer = gate.shielded(
                lambda: self._call(request.method, request.path_qs, headers, body, loaded),
                inference=bool(_INFERENCE_PATH.search(path)),
            )
        except _Overloaded:
            return _json_error(503, gate.overloaded_message())
        try:
            status, response_headers, response_body = await answer
        except Exception as error:  # the connection to Triton broke (it died, or restarts)
            logger.debug("the call to tritonserver failed: %s", error)
            return _json_error(503, gate.refusal() or LOST_TRITON_MESSAGE)
        return web.Response(status=status, body=response_body, headers=response_headers)

    async def _call(
        self, method: str, path_qs: str, headers: dict[str, str], body: bytes, loaded_model: str | None
    ) -> tuple[int, dict[str, str], bytes]:
        """The call to Triton (shielded); the answer's status, headers and body, as Triton gave them."""
        gate = self.gate
        assert gate.session is not None and gate.upstream is not None
        if loaded_model is not None:
            gate.note_load(loaded_model, done=False)
        sent_at = time.time()
        try:
            async with gate.session.request(
                method, gate.upstream.http + path_qs, headers=headers, data=body or None
            ) as response:
                payload = await response.read()
                answer_headers = {
                    key: value for key, value in response.headers.items() if key.lower() not in _HOP_BY_HOP
                }
                status = response.status
        finally:
            if loaded_model is not None:
                gate.note_load(loaded_model, done=True)
        if status >= 400:
            gate.note_error(payload.decode(errors="replace"), sent_at)
        elif loaded_model is not None:
            failure = await gate.after_load(loaded_model)
            if failure is not None:
                return 500, {"Content-Type": "application/json"}, json.dumps({"error": failure}).encode()
        return status, answer_headers, payload

    async def forward_metrics(self, request: web.Request) -> web.Response:
        from aiohttp import web

        gate = self.gate
        refusal = gate.refusal()
        if refusal is not None or gate.session is None or gate.upstream is None:
            return web.Response(status=503, text=refusal or "")
        try:
            async with gate.session.get(gate.upstream.metrics) as response:
                return web.Response(
                    status=response.status,
                    body=await response.read(),
                    headers={"Content-Type": response.headers.get("Content-Type", "text/plain")},
                )
        except Exception as error:  # aiohttp's client errors: Triton is gone
            logger.debug("the call to tritonserver's metrics failed: %s", error)
            return web.Response(status=503, text=gate.refusal() or LOST_TRITON_MESSAGE)


# --------------------------------------------------------------------------- the child: main


class _EventWriter:
    """The child's stdout: one JSON object a line, to the launcher."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __call__(self, event: dict[str, Any]) -> None:
        with self._lock, contextlib.suppress(OSError, ValueError):
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()


class _EventLogHandler(logging.Handler):
    def __init__(self, emit: Callable[[dict[str, Any]], None]) -> None:
        super().__init__()
        self._emit = emit

    def emit(self, record: logging.LogRecord) -> None:
        self._emit({"event": "log", "level": record.levelno, "message": self.format(record)})


def _read_commands(loop: asyncio.AbstractEventLoop, commands: asyncio.Queue[dict[str, Any] | None]) -> None:
    """stdin, line by line, onto the event loop; None when it closes (the launcher stopped us, or died)."""
    for line in sys.stdin:
        with contextlib.suppress(ValueError):
            loop.call_soon_threadsafe(commands.put_nowait, json.loads(line))
    loop.call_soon_threadsafe(commands.put_nowait, None)


async def _bind(settings: FrontEndSettings, gate: _Gate) -> tuple[grpc.aio.Server, _GrpcProxy, list[web.AppRunner]]:
    """Listen on every public port; ServeError naming the one that cannot be used."""
    import grpc
    from aiohttp import web

    proxy = _GrpcProxy(gate)
    size = settings.max_message_bytes
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", size),
            ("grpc.max_receive_message_length", size),
            ("grpc.so_reuseport", 0),  # a second server on the port must fail, not share it
        ]
    )
    server.add_generic_rpc_handlers([proxy])
    target = f"{settings.address}:{settings.grpc_port}"
    try:
        if settings.tls is not None:
            bound = server.add_secure_port(target, _server_credentials(settings.tls))
        else:
            bound = server.add_insecure_port(target)
    except (RuntimeError, OSError) as error:
        raise ServeError(f"the gRPC port {target} cannot be used ({error}): choose another with --grpc-port") from None
    if not bound:
        raise ServeError(f"the gRPC port {target} cannot be used: choose another with --grpc-port")
    await server.start()

    http = _HttpProxy(gate)
    context = _ssl_context(settings.tls) if settings.tls is not None else None
    sites = [
        (http.api(), settings.address, settings.http_port, context, "--http-port"),
        (http.metrics(), settings.address, settings.metrics_port, context, "--metrics-port"),
    ]
    if settings.health_address is not None:
        host, port = health_endpoint(settings.health_address)
        sites.append((http.health(), host, port, None, "--health-address"))
    runners = []
    for app, host, port, site_context, option in sites:
        runner = web.AppRunner(app, access_log=None, handler_cancellation=False)
        await runner.setup()
        runners.append(runner)
        try:
            await web.TCPSite(runner, host, port, ssl_context=site_context, reuse_address=True).start()
        except OSError as error:
            for started in runners:
                await started.cleanup()
            await server.stop(None)
            raise ServeError(
                f"port {port} on {host} cannot be used ({error.strerror or error}): choose another with {option}"
            ) from None
    return server, proxy, runners


def _quiet_tls_noise(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """A plaintext or certificate-less client failing the TLS handshake is the client's business, not a log line."""
    if isinstance(context.get("exception"), ssl.SSLError | ConnectionResetError):
        logger.debug("front end: %s", context.get("message"))
        return
    loop.default_exception_handler(context)


async def _serve(settings: FrontEndSettings, emit: Callable[[dict[str, Any]], None]) -> None:
    import aiohttp

    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_quiet_tls_noise)
    gate = _Gate(settings, emit)
    gate.session = aiohttp.ClientSession(
        auto_decompress=False,  # bodies pass through as Triton encoded them, with their Content-Encoding
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),  # never end a call Triton is running
        # No keep-alive: a stopping tritonserver waits its whole exit timeout for open HTTP connections.
        connector=aiohttp.TCPConnector(limit=settings.max_in_flight + 8, force_close=True),
    )
    commands: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    threading.Thread(target=_read_commands, args=(loop, commands), daemon=True).start()
    try:
        _grpc_server, proxy, runners = await _bind(settings, gate)  # referenced: it lives as long as we serve
    except ServeError as error:
        emit({"event": "failed", "message": str(error)})
        await gate.session.close()
        return
    emit({"event": "listening"})
    triton_pid: int | None = None
    while (command := await commands.get()) is not None:
        if "state" in command:
            upstream = Upstream(**command["upstream"]) if command.get("upstream") else None
            gate.set_state(FrontEndState(command["state"]), command.get("reason", ""), upstream)
        if "triton_pid" in command:
            triton_pid = command["triton_pid"]
    if triton_pid is not None:
        await _stop_orphaned_triton(triton_pid)
    for runner in runners:
        await runner.cleanup()
    await proxy.close()
    await gate.session.close()
    # No graceful gRPC shutdown: it answers calls that arrive meanwhile CANCELLED, which clients
    # do not retry. Nothing is running in Triton by now; a closed connection reads UNAVAILABLE.
    sys.stdout.flush()
    os._exit(0)


async def _stop_orphaned_triton(pid: int, timeout_s: float = 45.0) -> None:
    """The launcher died (stdin closed while tritonserver ran): stop tritonserver, or nothing ever will."""
    cmdline = Path(f"/proc/{pid}/cmdline")

    def running() -> bool:
        with contextlib.suppress(OSError):
            return b"tritonserver" in cmdline.read_bytes()
        return False

    if not running():
        return
    logger.error("the launcher is gone: stopping tritonserver (pid %d)", pid)
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while running() and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    if running():
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)


def main() -> None:
    """The front-end process: settings from the first line of stdin, then serve until stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher decides when we stop
    emit = _EventWriter()
    handler = _EventLogHandler(emit)
    handler.setFormatter(logging.Formatter("front end: %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    first = sys.stdin.readline()
    if not first:
        return
    settings = FrontEndSettings.from_json(json.dumps(json.loads(first)["settings"]))
    asyncio.run(_serve(settings, emit))


if __name__ == "__main__":
    main()
