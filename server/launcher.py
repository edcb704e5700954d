"""Runs ``postsim serve``: tritonserver on a model repository, behind postsim's front end, supervised.

By default the ``tritonserver`` binary shipped in the nvidia-pytriton wheel (Triton 2.51
with its Python backend), laid out once to run (:func:`~postsim.server.install.prepare_triton`).
``ServerSettings.triton_dir`` runs another Triton install instead (NGC's
``/opt/tritonserver`` in the GPU image).

Clients never reach tritonserver: it listens on a unix socket in a private folder (gRPC)
and on loopback ports chosen at start (HTTP, metrics), and requires a random key made at
each start on every API but health. The public ports belong to the front end
(:mod:`postsim.server.front_end`), which shields Triton from cancellations,
deadlines and disconnects, serves TLS, enforces the admin key and answers UNAVAILABLE
while tritonserver starts, restarts or stops.

Triton runs in explicit model-control mode: the launcher loads each complete model of the
repository by name, and ``postsim index publish`` loads new retrieval versions through the
model-control API. A start that fails says why in words a user can act on: a port taken,
a repository not exported, a model's own error from the server log.

What Triton 2.51 gets wrong, and the launcher makes up for:

- tritonserver that dies (a crash) is restarted with exponential back-off; the front end
  keeps listening and answers UNAVAILABLE meanwhile, and published indexes come back.
- A Python-backend stub process that dies (killed, out of memory, a crash in native code)
  is never restarted, and the model still reports READY while every request to it fails
  with "Stub process '<model>_0_0' is not healthy". The launcher watches the stubs and
  reloads the model whose stub died (:class:`~postsim.server.watchdog.StubWatchdog`).
- Triton also gives up on a stub that is alive but did not answer its one-second health
  check (a machine starved of CPU), and would then read that stub's late answer as the
  answer to its next batch and crash. The launcher ends such a stub at once
  (:meth:`TritonServer.on_unhealthy_stub`); the watchdog then reloads its model.
- Requests that failed on a dead stub keep the old model version alive inside Triton, which
  would wait out its whole exit timeout for it. Once the front end has drained every
  request, :meth:`TritonServer.stop` ends tritonserver when nothing but such versions is
  left.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType

from postsim.core.errors import RepositoryError, ServeError
from postsim.model_repository import contract
from postsim.model_repository.in_flight import IN_FLIGHT_FILE_ENV, create_in_flight_file
from postsim.model_repository.layout import loadable_models, version_dirs
from postsim.model_repository.manifest import WeightsManifest, log_weights
from postsim.model_repository.protocol import INTERNAL_HEADER, SHARED_MEMORY_HINT, is_shared_memory_error
from postsim.server.front_end import (
    TRITON_RESTRICTED_CATEGORIES,
    FrontEnd,
    FrontEndSettings,
    FrontEndState,
    TlsSettings,
    UnhealthyStub,
    Upstream,
    environment_without_secrets,
    health_endpoint,
)
from postsim.server.install import prepare_triton
from postsim.server.ports import check_port_free, free_ports
from postsim.server.processes import StubProcess, describe_wait_status, process_start_time, stub_processes
from postsim.server.shared_memory import (
    MIN_SHM_DEFAULT_BYTES,
    SHM_DIR,
    free_shared_memory_bytes,
    python_instance_count,
    shared_memory_warning,
)
from postsim.server.watchdog import StubWatchdog

logger = logging.getLogger("postsim")

STOP_STALL_S = 5.0
"""A drained, stopping tritonserver that logs the same thing to wait for this long waits for what never ends."""
RESTART_BACKOFF_MAX_S = 60.0
"""The longest wait between two restarts of a tritonserver that keeps dying."""
STABLE_AFTER_S = 120.0
"""A restarted tritonserver that runs this long starts the back-off afresh at its next death."""


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    repository: Path
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    address: str = "0.0.0.0"
    """Where the public ports (the front end's gRPC, HTTP and metrics) listen; tritonserver itself never does."""
    health_address: str | None = None
    """``HOST:PORT`` of a plaintext port answering ``/v2/health/live`` and ``/ready`` only; None: none."""
    startup_timeout_s: float = 600.0
    exit_timeout_s: int = 30
    """How long a stopping server lets in-flight requests finish."""
    tls: TlsSettings | None = None
    """TLS on every public port (gRPC, HTTP, metrics); mutual when it has a CA."""
    admin_key: str | None = None
    """When set, model control, shared memory, log and trace settings need the admin-key header with this value."""
    max_in_flight: int = 64
    """Requests running in tritonserver at once, abandoned ones included; past it clients get UNAVAILABLE."""
    restart_backoff_s: float | None = 1.0
    """The first wait before restarting a tritonserver that died (doubling up to RESTART_BACKOFF_MAX_S); None: never."""
    triton_dir: Path | None = None
    """A Triton install to run (``bin/tritonserver``, ``backends/``), e.g. NGC's /opt/tritonserver; None: the wheel's."""
    shm_default_bytes: int = 16 << 20
    """Shared memory (in /dev/shm) each Python-backend stub starts with; it grows as needed. At least 4 MiB."""
    stub_watch_interval_s: float | None = 1.0
    """How often the launcher looks for dead Python-backend stubs to reload; None: never."""
    log_verbose: int = 0
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.shm_default_bytes < MIN_SHM_DEFAULT_BYTES:
            raise ServeError(
                f"ServerSettings.shm_default_bytes is {self.shm_default_bytes:,} bytes; Triton's Python backend "
                f"needs at least {MIN_SHM_DEFAULT_BYTES:,} (4 MiB): raise it (`postsim serve --shm-default-bytes`)"
            )
        for name in ("stub_watch_interval_s", "restart_backoff_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ServeError(f"ServerSettings.{name} must be a positive number of seconds or None, got {value!r}")
        self.front_end()  # its own checks (max_in_flight, health_address)

    def front_end(self) -> FrontEndSettings:
        """What the front end needs of these settings."""
        return FrontEndSettings(
            address=self.address,
            grpc_port=self.grpc_port,
            http_port=self.http_port,
            metrics_port=self.metrics_port,
            health_address=self.health_address,
            tls=self.tls,
            admin_key=self.admin_key,
            max_in_flight=self.max_in_flight,
        )


@dataclass(frozen=True)
class Endpoints:
    """The public endpoints (the front end's)."""

    grpc: str
    http: str
    metrics: str


_LOAD_FAILURE = re.compile(r"(?:failed to load|load failed for model) '([^']+)'[^:]*: (.*)")


def explain_failure(log_text: str) -> str:
    """The lines of a Triton log that say why models failed, or its last lines; a hint for shared memory."""
    reasons = [f"model '{m.group(1)}': {m.group(2).strip()}" for m in _LOAD_FAILURE.finditer(log_text)]
    if reasons:
        explained = "\n".join(dict.fromkeys(reasons))
    else:
        tail = [line for line in log_text.strip().splitlines() if line.strip()][-15:]
        explained = "\n".join(tail) or "(the server printed nothing)"
    if is_shared_memory_error(explained):
        explained += f"\n{SHARED_MEMORY_HINT}"
    return explained


def _answers_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


_STOP_PROGRESS = re.compile(r"Found (\d+) (live models|model versions that have in-flight inferences)")
"""What a stopping tritonserver still waits for, logged once a second."""
_CRASH_LINES = re.compile(r"^(?:Signal \(\d+\) received\.|terminate called .*|\s*what\(\):.*|.*\bSIG[A-Z]+\b.*)$", re.M)


class _StopProgress:
    """What a stopping tritonserver still waits for, from the lines it logs once a second.

    Called once the front end has drained, when nothing sent to Triton is running any more.
    Two waits never end then: for "in-flight inferences" (Triton 2.51 loses count of an
    ensemble request whose step failed while another step of it was queued), and for "live
    models" that requests failed on a dead or abandoned stub keep pinned (each such request
    leaves its response factory behind, which holds the model version).
    """

    def __init__(self, server: TritonServer, log_offset: int) -> None:
        self.server = server
        self.log_offset = log_offset
        self._last: tuple[str, str] | None = None
        self._since = time.monotonic()

    def stalled_on(self) -> str | None:
        """What it waits for in vain (for words in a log line), or None while it still gets somewhere."""
        found = _STOP_PROGRESS.findall(self.server._log_tail(self.log_offset))
        if not found:
            return None
        latest = (found[-1][0], found[-1][1])
        if latest != self._last:
            self._last, self._since = latest, time.monotonic()
            return None
        if time.monotonic() - self._since < STOP_STALL_S:
            return None
        count, what = latest
        if what == "live models" and not self.server.requests_failed_on_dead_stubs:
            return None  # models still unloading: slow, not stuck
        return f"{count} {what} that nothing will release (Triton 2.51)"


@dataclass(frozen=True)
class _Internal:
    """Where tritonserver listens (never a public address) and the key it requires."""

    socket_dir: Path
    """A private (0700) folder holding the gRPC unix socket."""
    http_port: int
    metrics_port: int
    key: str

    @property
    def grpc_address(self) -> str:
        return f"unix:{self.socket_dir / 'grpc'}"

    @property
    def in_flight_file(self) -> Path:
        """The front end's count of inference calls in Triton, which the models read."""
        return self.socket_dir / "in-flight"

    def upstream(self) -> Upstream:
        return Upstream(
            # Triton appends ":<port>" to the address; port 0 names the socket file grpc:0.
            grpc=f"{self.grpc_address}:0",
            http=f"http://127.0.0.1:{self.http_port}",
            metrics=f"http://127.0.0.1:{self.metrics_port}/metrics",
            key=self.key,
        )


class TritonServer:
    """``postsim serve``: tritonserver behind the front end, supervised; a context manager that always stops it."""

    def __init__(self, settings: ServerSettings, *, log_path: Path | None = None) -> None:
        self.settings = settings
        self.repository = settings.repository.resolve()
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="postsim-tritonserver-", suffix=".log")[1])
        self.process: subprocess.Popen[bytes] | None = None
        self.front_end: FrontEnd | None = None
        self.models: list[str] = []
        self.watchdog: StubWatchdog | None = None
        self.dead_stub_models: list[str] = []
        """Models whose stub died while this server ran (what the watchdog found)."""
        self._loading: dict[str, int] = {}
        """Models being (re)loaded now: requests reach their old version or their new one."""
        self._loaded_at: dict[str, float] = {}
        """When each model's current version finished loading (``time.time()``)."""
        self.dead_stubs_unseen = 0
        """Stubs found dead when a watchdog started, which it cannot tell the model of."""
        self.ended_stubs: list[str] = []
        """Instances of live stubs Triton had judged unhealthy, ended before they could answer (on_unhealthy_stub)."""
        self._failed_on_unhealthy: set[str] = set()
        """Model instances on which Triton failed requests as "not healthy": each pins its model version."""
        self.restarts = 0
        """How many times tritonserver was restarted after it died."""
        self._internal: _Internal | None = None
        self._shm_regions: set[str] = set()
        """Shared-memory regions of every stub seen: removed at stop, as Triton leaves a dead stub's behind."""
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._lifecycle = threading.Lock()
        """Held while tritonserver is started, restarted or stopped."""
        self._lifecycle_of_loads = threading.Lock()

    @property
    def endpoints(self) -> Endpoints:
        host = "localhost" if self.settings.address in ("0.0.0.0", "::", "") else self.settings.address
        host = f"[{host}]" if ":" in host else host
        scheme = "https" if self.settings.tls is not None else "http"
        return Endpoints(
            grpc=f"{host}:{self.settings.grpc_port}",
            http=f"{scheme}://{host}:{self.settings.http_port}",
            metrics=f"{scheme}://{host}:{self.settings.metrics_port}/metrics",
        )

    @property
    def internal(self) -> _Internal:
        """Where tritonserver listens: a private unix socket and loopback ports, chosen once per server."""
        if self._internal is None:
            socket_dir = Path(tempfile.mkdtemp(prefix="postsim-triton-"))  # mode 0700: only this user
            http_port, metrics_port = free_ports(2)
            self._internal = _Internal(
                socket_dir=socket_dir, http_port=http_port, metrics_port=metrics_port, key=secrets.token_urlsafe(32)
            )
        return self._internal

    def _check_repository(self) -> WeightsManifest:
        if not self.repository.is_dir():
            raise RepositoryError(
                f"model repository {self.repository} does not exist: run `postsim export --repository "
                f"{self.repository}` first"
            )
        manifest = WeightsManifest.read(self.repository)
        manifest.require_embedded_target(self.repository)
        manifest.verify_files(self.repository)
        self.models = loadable_models(self.repository)
        if "post_embedding" not in self.models:
            raise RepositoryError(
                f"{self.repository} is incomplete (loadable: {self.models or 'none'}): "
                f"run `postsim export --repository {self.repository}` again"
            )
        return manifest

    def command(self, binary_dir: Path) -> list[str]:
        settings, internal = self.settings, self.internal
        restricted = f"{','.join(TRITON_RESTRICTED_CATEGORIES)}:{INTERNAL_HEADER}={internal.key}"
        args = [
            str(binary_dir / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={binary_dir / 'backends'}",
            f"--cache-directory={binary_dir / 'caches'}",
            "--model-control-mode=explicit",
            *(f"--load-model={model}" for model in self.models),
            f"--grpc-address={internal.grpc_address}",
            "--grpc-port=0",
            "--http-address=127.0.0.1",
            f"--http-port={internal.http_port}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={internal.metrics_port}",
            f"--grpc-restricted-protocol={restricted}",
            f"--http-restricted-api={restricted}",
            f"--exit-timeout-secs={settings.exit_timeout_s}",
            f"--backend-config=python,shm-default-byte-size={settings.shm_default_bytes}",
            "--strict-readiness=true",
            f"--log-verbose={settings.log_verbose}",
        ]
        return args + list(settings.extra_args)

    def _binary(self) -> tuple[Path, dict[str, str]]:
        """The Triton install to run and the environment it runs in."""
        env = environment_without_secrets()
        # The stub embeds the Python found first on PATH: make it this interpreter's environment.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env[IN_FLIGHT_FILE_ENV] = str(self.internal.in_flight_file)
        if self.settings.triton_dir is not None:
            if not (self.settings.triton_dir / "bin" / "tritonserver").is_file():
                raise ServeError(f"{self.settings.triton_dir} has no bin/tritonserver: give the folder Triton is in")
            return self.settings.triton_dir, env
        binary_dir, libraries = prepare_triton()
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(libraries), env.get("LD_LIBRARY_PATH")]))
        return binary_dir, env

    def start(self) -> Endpoints:
        """Start the front end and tritonserver; returns the public endpoints once the server answers."""
        manifest = self._check_repository()
        settings = self.settings
        public = [(settings.grpc_port, "--grpc-port"), (settings.http_port, "--http-port")]
        public.append((settings.metrics_port, "--metrics-port"))
        for port, option in public:
            check_port_free(port, option, settings.address)
        if settings.health_address is not None:
            host, port = health_endpoint(settings.health_address)
            check_port_free(port, "--health-address", host)
        log_weights(manifest)
        self._warn_if_shared_memory_is_short()
        self._stopping.clear()
        create_in_flight_file(self.internal.in_flight_file)
        front_end = replace(settings.front_end(), in_flight_file=str(self.internal.in_flight_file))
        self.front_end = FrontEnd(front_end, listener=self)
        self.front_end.start()
        try:
            with self._lifecycle:
                self._launch(first=True)
        except BaseException:
            self.front_end.stop()
            self.front_end = None
            self._remove_socket_dir()
            raise
        self.front_end.set_state(FrontEndState.SERVING, upstream=self.internal.upstream())
        self._supervisor = threading.Thread(target=self._supervise, name="postsim-supervisor", daemon=True)
        self._supervisor.start()
        logger.info("serving: gRPC %s, HTTP %s, metrics %s", *(self.endpoints.__dict__.values()))
        return self.endpoints

    def _launch(self, *, first: bool) -> None:
        """Start tritonserver (models as the repository has them now) and wait until it is ready."""
        binary_dir, env = self._binary()
        if not first:
            self.models = loadable_models(self.repository)
            self._renew_internal_ports()
        with self.log_path.open("wb" if first else "ab") as log_file:
            if not first:
                log_file.write(f"\n---- postsim: restart {self.restarts} of tritonserver ----\n".encode())
                log_file.flush()
            logger.info("starting tritonserver with %s (log: %s)", ", ".join(self.models), self.log_path)
            self.process = subprocess.Popen(
                self.command(binary_dir),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: stopping it reaches the stubs too
            )
        if self.front_end is not None:
            self.front_end.watch_triton(self.process.pid)
        self._wait_until_ready()
        with self._lifecycle_of_loads:
            self._loading.clear()
            self._loaded_at = dict.fromkeys(self.models, time.time())
        if self.settings.stub_watch_interval_s is not None:
            self.watchdog = StubWatchdog(self, self.settings.stub_watch_interval_s)
            self.watchdog.start()

    def _renew_internal_ports(self) -> None:
        """Before a restart: new loopback ports if someone took the old ones meanwhile."""
        internal = self.internal
        try:
            for port in (internal.http_port, internal.metrics_port):
                check_port_free(port, "", "127.0.0.1")
        except ServeError:
            http_port, metrics_port = free_ports(2)
            self._internal = _Internal(
                socket_dir=internal.socket_dir, http_port=http_port, metrics_port=metrics_port, key=internal.key
            )

    def _warn_if_shared_memory_is_short(self) -> None:
        free = free_shared_memory_bytes()
        if free is None:
            return
        warning = shared_memory_warning(
            instances=python_instance_count(self.repository, self.models),
            shm_default_bytes=self.settings.shm_default_bytes,
            free_bytes=free,
        )
        if warning:
            logger.warning("%s", warning)

    def _http(self, method: str, path: str, *, timeout_s: float) -> bytes:
        """One call to tritonserver's own HTTP API (on loopback, with its key); ServeError with Triton's message."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.internal.http_port}{path}",
            data=b"{}" if method == "POST" else None,
            headers={"Content-Type": "application/json", INTERNAL_HEADER: self.internal.key},
            method=method,
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as error:
            body = error.read().decode(errors="replace")
            with contextlib.suppress(ValueError, AttributeError):
                body = str(json.loads(body).get("error", body))
            raise ServeError(f"{method} {path}: HTTP {error.code}: {body.strip()[:500]}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            raise ServeError(f"{method} {path}: the server did not answer ({error})") from None

    def model_states(self) -> dict[str, str]:
        """Each model's state in the server's repository index (``READY``, ``UNAVAILABLE`` ...), newest version."""
        index = json.loads(self._http("POST", "/v2/repository/index", timeout_s=30))
        states: dict[str, str] = {}
        for entry in sorted(index, key=lambda entry: int(entry.get("version") or 0)):
            states[entry["name"]] = entry.get("state", "")
        return states

    def reload_model(self, model: str, *, changed_file: Path | None = None) -> None:
        """Load a fresh copy of a loaded model (new stub processes); the old one serves meanwhile.

        Triton's load API reloads a model only if its files changed on disk, so the
        modification time of ``changed_file`` (default: the newest version's ``model.py``)
        is bumped first. Where that cannot be written, the model is unloaded and loaded
        again, and is unavailable for the seconds that takes.
        """
        quoted = urllib.parse.quote(model, safe="")
        target = changed_file or self._newest_model_file(model)
        self.on_model_load(model, done=False)
        try:
            try:
                if target is None:
                    raise FileNotFoundError(f"no model.py for {model}")
                os.utime(target)
            except OSError as error:
                logger.warning("cannot touch %s (%s): unloading '%s' to load it again", target, error, model)
                self._http("POST", f"/v2/repository/models/{quoted}/unload", timeout_s=self.settings.startup_timeout_s)
            self._http("POST", f"/v2/repository/models/{quoted}/load", timeout_s=self.settings.startup_timeout_s)
        finally:
            self.on_model_load(model, done=True)

    def on_model_load(self, model: str, *, done: bool) -> None:
        """Bookkeeping of loads (the launcher's and clients'): which version a request can have reached."""
        with self._lifecycle_of_loads:
            if not done:
                self._loading[model] = self._loading.get(model, 0) + 1
                return
            self._loading[model] = max(0, self._loading.get(model, 0) - 1)
            self._loaded_at[model] = time.time()

    def _newest_model_file(self, model: str) -> Path | None:
        files = [version / "model.py" for version in version_dirs(self.repository / model)]
        return next((path for path in reversed(files) if path.is_file()), None)

    def stubs(self) -> list[StubProcess]:
        """The server's live Python-backend stub processes (empty when it is not running)."""
        process = self.process
        if process is None or process.poll() is not None:
            return []
        found = stub_processes(process.pid)
        self._shm_regions.update(stub.shm_region for stub in found)
        return found

    def on_unhealthy_stub(self, report: UnhealthyStub) -> None:
        """Triton failed a request because it judged a stub unhealthy: if that stub is alive, end it now.

        Triton's Python backend expects each stub to answer a health check within one second
        while it runs a batch; a stub starved of CPU for longer (a saturated machine, a stopped
        process) is judged unhealthy although it is alive, and its batch fails. Triton then
        sends that stub its next batch and reads the answer to the failed one as the answer to
        it: wrong outputs, then a crash (SIGSEGV in TRITONBACKEND_ModelInstanceExecute, a
        boost::interprocess::lock_exception). Ending the stub before it answers turns that into
        a dead stub, which the watchdog reloads like any other.

        The report names an instance (``fuser_0_0``), and a reloaded model's new stub has the
        same name as the old one: so a stub is ended only when the failed request was sent
        after its model's current version finished loading, and no load of it is under way.
        """
        self._failed_on_unhealthy.add(report.instance)
        for stub in self.stubs():
            if stub.instance != report.instance:
                continue
            with self._lifecycle_of_loads:
                loading = self._loading.get(stub.model, 0) > 0
                current_since = self._loaded_at.get(stub.model, 0.0)
            started = process_start_time(stub.pid)
            if loading or report.sent_at <= current_since or started is None or started > report.sent_at:
                logger.debug(
                    "a request sent to %s before its current version served failed: not ending it", stub.instance
                )
                continue
            logger.warning(
                "Triton judged model '%s' (instance %s, pid %d) unhealthy although its process is alive: it did not "
                "answer Triton's one-second health check (is the machine short of CPU?). Triton would read its late "
                "answer as the answer to its next batch and crash, so postsim ends it; the model is reloaded next",
                stub.model,
                stub.instance,
                stub.pid,
            )
            with contextlib.suppress(ProcessLookupError):
                os.kill(stub.pid, signal.SIGKILL)
            self.ended_stubs.append(stub.instance)

    def _death_reason(self, code: int | None, log_offset: int = 0) -> str:
        """Why tritonserver exited: the exit status and the crash lines of its log."""
        how = describe_wait_status((-code & 0x7F) if code is not None and code < 0 else ((code or 0) << 8))
        lines = _CRASH_LINES.findall(self._log_tail(log_offset))
        return f"{how}; its log says: {' / '.join(dict.fromkeys(line.strip() for line in lines))}" if lines else how

    def _log_tail(self, offset: int = 0, tail_bytes: int = 20_000) -> str:
        try:
            with self.log_path.open("rb") as log:
                size = self.log_path.stat().st_size
                log.seek(max(offset, size - tail_bytes, 0))
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def _remove_leaked_shm_regions(self) -> None:
        """Delete the /dev/shm regions of this server's stubs that outlived it (killed stubs leave theirs)."""
        removed = 0
        for region in sorted(self._shm_regions):
            path = SHM_DIR / region
            if "/" in region or not path.is_file():
                continue
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
        if removed:
            logger.info("removed %d shared-memory region(s) tritonserver left in %s", removed, SHM_DIR)
        self._shm_regions.clear()

    def _remove_socket_dir(self) -> None:
        if self._internal is not None:
            shutil.rmtree(self._internal.socket_dir, ignore_errors=True)
            self._internal = None  # a next start picks a new folder, ports and key

    def _wait_until_ready(self) -> None:
        process = self.process
        assert process is not None
        deadline = time.monotonic() + self.settings.startup_timeout_s
        url = f"http://127.0.0.1:{self.internal.http_port}/v2/health/ready"
        while time.monotonic() < deadline:
            if process.poll() is not None:
                reason = explain_failure(self.log_text())
                self.process = None
                raise ServeError(f"tritonserver failed to start:\n{reason}\n(full log: {self.log_path})")
            if _answers_ready(url):
                logger.info("tritonserver ready")
                return
            if self._stopping.wait(0.25):
                raise ServeError("the server was stopped while tritonserver started")
        self._end(process, timeout_s=10)
        self.process = None
        raise ServeError(
            f"tritonserver was not ready within {self.settings.startup_timeout_s:.0f} s:\n"
            f"{explain_failure(self.log_text())}\n(full log: {self.log_path})"
        )

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def is_running(self) -> bool:
        """Whether tritonserver runs now (it may be down for a moment while it restarts)."""
        return self.process is not None and self.process.poll() is None

    def is_serving(self) -> bool:
        """Whether this server is up: its front end runs, and tritonserver runs or is being restarted."""
        front_end_up = self.front_end is not None and self.front_end.is_running()
        supervised = self._supervisor is not None and self._supervisor.is_alive()
        return front_end_up and (supervised or self.is_running())

    # ----------------------------------------------------------------------- supervision

    def _supervise(self) -> None:
        """Restart tritonserver (and the front end) when they die, until the server is stopped."""
        backoff = self.settings.restart_backoff_s
        up_since = time.monotonic()
        while not self._stopping.wait(0.5):
            front_end = self.front_end
            if front_end is not None and not front_end.is_running():
                self._restart_front_end()
            process = self.process
            if process is None or process.poll() is None:
                if backoff is not None and time.monotonic() - up_since > STABLE_AFTER_S:
                    backoff = self.settings.restart_backoff_s
                continue
            if backoff is None:
                logger.error(
                    "tritonserver died (%s) and restarting is off (ServerSettings.restart_backoff_s): clients get "
                    "UNAVAILABLE until `postsim serve` is restarted; its log: %s",
                    self._death_reason(process.returncode),
                    self.log_path,
                )
                if front_end is not None:
                    front_end.set_state(FrontEndState.RESTARTING, reason="restarting is off")
                self.process = None
                continue
            backoff = self._restart(process, backoff)
            up_since = time.monotonic()

    def _restart(self, died: subprocess.Popen[bytes], backoff: float) -> float:
        """Bring tritonserver back after it died; returns the next back-off."""
        reason = self._death_reason(died.returncode)
        with self._lifecycle:
            if self._stopping.is_set():
                return backoff
            self._clean_up_after(died)
            if self.front_end is not None:
                self.front_end.set_state(FrontEndState.RESTARTING, reason=reason.split(";")[0])
            self.restarts += 1
            logger.error(
                "tritonserver died (%s): restarting it in %.1f s (restart %d); clients get UNAVAILABLE meanwhile; "
                "its log: %s",
                reason,
                backoff,
                self.restarts,
                self.log_path,
            )
            while not self._stopping.wait(backoff):
                backoff = min(backoff * 2, RESTART_BACKOFF_MAX_S)
                try:
                    self._launch(first=False)
                except ServeError as error:
                    if self._stopping.is_set():
                        return backoff
                    logger.error("tritonserver did not restart (%s): trying again in %.0f s", error, backoff)
                    continue
                if self.front_end is not None:
                    self.front_end.set_state(FrontEndState.SERVING, upstream=self.internal.upstream())
                logger.info("tritonserver is back (restart %d), serving %s", self.restarts, ", ".join(self.models))
                break
        return backoff

    def _restart_front_end(self) -> None:
        logger.error("the front end exited unexpectedly: starting it again")
        with self._lifecycle:
            if self._stopping.is_set() or self.front_end is None:
                return
            self.front_end.stop(timeout_s=1)
            front_end = FrontEnd(self.settings.front_end(), listener=self)
            try:
                front_end.start()
            except ServeError as error:
                logger.error("the front end did not start again (%s): retrying", error)
                return
            self.front_end = front_end
            if self.process is not None:
                front_end.watch_triton(self.process.pid)
            if self.is_running():
                front_end.set_state(FrontEndState.SERVING, upstream=self.internal.upstream())
            else:
                front_end.set_state(FrontEndState.RESTARTING)

    def _clean_up_after(self, died: subprocess.Popen[bytes]) -> None:
        """What a tritonserver that died leaves: its watchdog, stub processes, shared-memory regions."""
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(died.pid, signal.SIGKILL)
        self.process = None
        self._remove_leaked_shm_regions()

    # ----------------------------------------------------------------------- stopping

    def stop(self, timeout_s: float | None = None) -> int | None:
        """Stop gracefully: requests already accepted finish, new ones are refused (UNAVAILABLE).

        The front end refuses new requests and waits, for at most ``exit_timeout_s``, until
        nothing it sent is running in tritonserver; then tritonserver gets SIGTERM, and
        SIGKILL if it is still there ``timeout_s`` later (default: ``exit_timeout_s`` + 10 s).
        Returns tritonserver's exit code (None if it was not running): 0 also when postsim
        ended it after the drain because all it still waited for was model versions pinned by
        requests that failed on a dead stub (Triton 2.51 waits out its whole exit timeout for
        those and exits 1). The front end stops last.
        """
        self._stopping.set()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(timeout=self.settings.startup_timeout_s)
        self._supervisor = None
        with self._lifecycle:
            code = self._stop_triton(timeout_s)
            if self.front_end is not None:
                self.front_end.stop()
                self.front_end = None
            self._remove_socket_dir()
        return code

    def _stop_triton(self, timeout_s: float | None) -> int | None:
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
        process = self.process
        if process is None:
            return None
        drained = True
        if process.poll() is None:
            self.stubs()  # note their shared-memory regions
            drained = self._drain(time.monotonic() + self.settings.exit_timeout_s)
        self.process = None
        code = self._end(process, timeout_s=timeout_s, drained=drained)
        if self.front_end is not None:
            self.front_end.watch_triton(None)
        self._remove_leaked_shm_regions()
        if code not in (0, None):
            logger.warning("tritonserver exited with code %s%s; its log: %s", code, self._exit_reason(), self.log_path)
        else:
            logger.info("tritonserver stopped (exit code %s)", code)
        return code

    def _drain(self, deadline: float) -> bool:
        """The front end refuses new requests; wait until none it sent runs in tritonserver (or the deadline)."""
        if self.front_end is None or not self.front_end.is_running():
            return False
        self.front_end.set_state(FrontEndState.STOPPING)
        logger.info(
            "stopping: %s refuse new requests (UNAVAILABLE); waiting for those in flight", ", ".join(contract.ENSEMBLES)
        )
        if self.front_end.wait_drained(deadline - time.monotonic()):
            return True
        logger.warning("requests still in flight after %d s: stopping anyway", self.settings.exit_timeout_s)
        return False

    def _end(self, process: subprocess.Popen[bytes], *, timeout_s: float | None, drained: bool = False) -> int:
        """SIGTERM, then SIGKILL after ``timeout_s``; after a drain, SIGKILL once it waits only for what never ends."""
        timeout = timeout_s if timeout_s is not None else self.settings.exit_timeout_s + 10
        progress = _StopProgress(self, self._log_size())
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        code: int | None = None
        while time.monotonic() < deadline:
            try:
                code = process.wait(timeout=0.25)
                break
            except subprocess.TimeoutExpired:
                pass
            waiting_for = progress.stalled_on() if drained else None
            if waiting_for is not None:
                logger.info(
                    "tritonserver waits for %s: ending it rather than waiting out its exit timeout", waiting_for
                )
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                code = 0
                break
        if code is None:
            logger.warning("tritonserver did not stop within %.0f s: killing it", timeout)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            code = process.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # stub processes left behind, if any
        return code

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    @property
    def requests_failed_on_dead_stubs(self) -> bool:
        """Whether Triton failed requests on a dead or abandoned stub: each pins the model version it reached."""
        return bool(self.dead_stub_models or self._failed_on_unhealthy or self.dead_stubs_unseen)

    def _exit_reason(self) -> str:
        """Why a stopping tritonserver exited non-zero, when its log says (Triton 2.51's known ways)."""
        tail = self._log_tail()
        if "Exit timeout expired" not in tail:
            return ""
        if re.search(r"Found [1-9]\d* model versions that have in-flight inferences", tail):
            return (
                " after waiting out its exit timeout for ensemble requests it lost count of (Triton 2.51 does after a "
                "request fails in one step while another step of it is queued)"
            )
        return (
            f" because its models were still unloading when its exit timeout ({self.settings.exit_timeout_s} s) ran "
            "out: raise ServerSettings.exit_timeout_s"
        )

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
