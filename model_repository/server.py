"""Runs the ``tritonserver`` binary shipped in the nvidia-pytriton wheel on a model repository.

The wheel carries Triton 2.51 with its Python backend, but not laid out to run as is: the
Python-backend stub for this interpreter's version must sit in ``backends/python/`` and
the wheel's bundled libraries must be on the library path. :func:`prepare_triton` builds
that layout once in a cache folder.

Triton runs in explicit model-control mode: the launcher loads each complete model of the
repository by name, and ``postsim index publish`` loads new retrieval versions through the
model-control API. A start that fails says why in words a user can act on: a port taken,
a repository not exported, a model's own error from the server log.

Two things Triton 2.51 gets wrong, and the launcher makes up for:

- A Python-backend stub process that dies (killed, out of memory, a crash in native code)
  is never restarted, and the model still reports READY while every request to it fails
  with "Stub process '<model>_0_0' is not healthy". The launcher watches the stubs and
  reloads the model whose stub died (:class:`StubWatchdog`).
- On SIGTERM, Triton stops the schedulers of every model at once, so ensemble requests in
  flight fail at their next step, and a request that arrives while it stops can crash it.
  :meth:`TritonServer.stop` first unloads the ensembles (new requests are refused, those in
  flight run to the end), then sends SIGTERM.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from postsim.model_repository import contract
from postsim.model_repository.errors import PostSimError, RepositoryError, ServeError
from postsim.model_repository.layout import CONFIG_NAME, loadable_models, version_dirs
from postsim.model_repository.manifest import WeightsManifest, log_weights

LOGGER = logging.getLogger("postsim")

RESTRICTED_HEADER = "postsim-admin-key"
"""The HTTP request header that carries the admin key of Triton's restricted APIs."""
GRPC_RESTRICTED_HEADER = f"triton-grpc-protocol-{RESTRICTED_HEADER}"
"""The same over gRPC: Triton's gRPC server prefixes the name given to ``--grpc-restricted-protocol``."""

MIN_SHM_DEFAULT_BYTES = 4 << 20
"""Triton's Python backend refuses a smaller ``shm-default-byte-size``."""
SHM_DIR = Path("/dev/shm")
STUB_BINARY = "triton_python_backend_stub"
ENTRY_MODELS = (contract.POST_EMBEDDING, contract.SIMILAR_POSTS)
"""The ensembles clients call: unloaded first when the server stops, so their requests drain."""


@dataclass(frozen=True, kw_only=True)
class TlsSettings:
    """gRPC over TLS; mutual TLS when a CA is given (clients must then present a certificate it signed)."""

    certificate: Path
    private_key: Path
    client_ca: Path | None = None


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    repository: Path
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    address: str = "0.0.0.0"
    startup_timeout_s: float = 600.0
    exit_timeout_s: int = 30
    """How long a stopping server lets in-flight requests finish."""
    tls: TlsSettings | None = None
    admin_key: str | None = None
    """When set, model control and shared memory need the RESTRICTED_HEADER header with this value."""
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
        if self.stub_watch_interval_s is not None and not self.stub_watch_interval_s > 0:
            raise ServeError(
                f"ServerSettings.stub_watch_interval_s must be a positive number of seconds or None, "
                f"got {self.stub_watch_interval_s!r}"
            )


@dataclass(frozen=True)
class Endpoints:
    grpc: str
    http: str
    metrics: str


def _pytriton_dist() -> tuple[Path, Path, str]:
    """The wheel's tritonserver folder, its bundled libraries and the wheel's version."""
    try:
        from importlib.metadata import version

        import pytriton
    except ImportError:
        raise ServeError(
            "`postsim serve` runs the tritonserver binary of the nvidia-pytriton wheel: "
            "install it with `pip install nvidia-pytriton`, or run Triton's NGC container (see docker/README.md)"
        ) from None
    package_dir = Path(pytriton.__file__).resolve().parent
    return package_dir / "tritonserver", package_dir.parent / "nvidia_pytriton.libs", version("nvidia-pytriton")


def prepare_triton(cache_dir: Path | None = None) -> tuple[Path, Path]:
    """A runnable copy of the wheel's tritonserver (with this Python's stub) and the library folder."""
    source, libraries, wheel_version = _pytriton_dist()
    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = source / "python_backend_stubs" / python_version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServeError(f"nvidia-pytriton {wheel_version} ships no Python-backend stub for Python {python_version}")
    cache_root = cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "postsim"
    target = cache_root / f"tritonserver-{wheel_version}-py{python_version}"
    if (target / "backends" / "python" / "triton_python_backend_stub").is_file():
        return target, libraries
    cache_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tritonserver-", dir=cache_root))
    shutil.copytree(source, staging / "t", ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__"))
    shutil.copy2(stub, staging / "t" / "backends" / "python" / "triton_python_backend_stub")
    with contextlib.suppress(FileExistsError, OSError):
        (staging / "t").rename(target)  # another process may have won the race: theirs is as good
    shutil.rmtree(staging, ignore_errors=True)
    LOGGER.info("prepared tritonserver %s in %s", wheel_version, target)
    return target, libraries


def check_port_free(port: int, option: str, address: str = "0.0.0.0") -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((address, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise ServeError(
                    f"port {port} is already taken (is another server running?): choose a free one with {option}"
                ) from None
            raise ServeError(f"cannot use port {port} ({error.strerror}): choose another with {option}") from None


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free right now on this machine (for tests and benchmarks).

    All probes stay bound until every port is picked: picked one at a time, the kernel may hand
    out the same port twice, and tritonserver refuses to serve gRPC and HTTP on one port.
    """
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [int(probe.getsockname()[1]) for probe in probes]


_LOAD_FAILURE = re.compile(r"(?:failed to load|load failed for model) '([^']+)'[^:]*: (.*)")


SHARED_MEMORY_HINT = (
    "Triton's Python backend passes every tensor through shared memory in /dev/shm and could not get "
    "enough: give the server more (`docker run --shm-size=2g`, `shm_size: 2gb` in compose; `df -h /dev/shm` "
    "shows what there is), or lower what each model process starts with, ServerSettings.shm_default_bytes "
    "(`postsim serve --shm-default-bytes`, at least 4 MiB)"
)
_SHARED_MEMORY_ERRORS = ("shared memory pool size", "Unable to initialize shared memory", "shm-default-byte-size")


def is_shared_memory_error(message: str) -> bool:
    """Whether a Triton error or log line is the Python backend running out of /dev/shm."""
    return any(pattern in message for pattern in _SHARED_MEMORY_ERRORS)


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


def python_instance_count(repository: Path, models: list[str]) -> int:
    """How many Python-backend processes (stubs) serving ``models`` starts: one per model instance."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    count = 0
    for model in models:
        try:
            config = text_format.Parse((repository / model / CONFIG_NAME).read_text(), model_config_pb2.ModelConfig())
        except (OSError, text_format.ParseError):
            continue  # Triton reports a broken config itself, by name
        if config.backend == "python":
            count += sum(max(group.count, 1) for group in config.instance_group) or 1
    return count


def shared_memory_warning(*, instances: int, shm_default_bytes: int, free_bytes: int) -> str | None:
    """Why ``free_bytes`` of /dev/shm may be too little for ``instances`` stubs, or None."""
    needed = instances * shm_default_bytes
    if free_bytes >= needed:
        return None
    mib = 1 << 20
    return (
        f"/dev/shm has {free_bytes / mib:.0f} MiB free, less than the {needed / mib:.0f} MiB the "
        f"{instances} Python-backend model processes start with ({shm_default_bytes / mib:.0f} MiB each, "
        f"ServerSettings.shm_default_bytes), before any batch: requests will fail with shared-memory errors. "
        f"{SHARED_MEMORY_HINT}"
    )


def free_shared_memory_bytes(shm_dir: Path = SHM_DIR) -> int | None:
    try:
        stats = os.statvfs(shm_dir)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True, kw_only=True)
class StubProcess:
    """A Python-backend stub of a running tritonserver: one per model instance."""

    pid: int
    model: str
    version: str
    model_file: Path
    """The ``model.py`` of the version it serves (the stub's first argument)."""
    shm_region: str
    """Its shared-memory region, a file in /dev/shm."""


def _proc_stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state first), or None when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (zombies included)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _proc_stat_fields(int(entry.name))
        if fields is not None and len(fields) > 1 and fields[1] == str(pid):
            children.append(int(entry.name))
    return sorted(children)


def process_rss_bytes(pid: int) -> int | None:
    """Resident memory of a process (VmRSS), or None when it is gone or a zombie."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def stub_processes(server_pid: int) -> list[StubProcess]:
    """The live Python-backend stubs of the tritonserver ``server_pid``, by pid."""
    stubs = []
    for pid in child_pids(server_pid):
        args = _cmdline(pid)
        if len(args) < 3 or not args[0].endswith(STUB_BINARY):
            continue
        model_file = Path(args[1])  # <repository>/<model>/<version>/model.py
        stubs.append(
            StubProcess(
                pid=pid,
                model=model_file.parent.parent.name,
                version=model_file.parent.name,
                model_file=model_file,
                shm_region=args[2],
            )
        )
    return stubs


def dead_children(server_pid: int) -> dict[int, int]:
    """Children of ``server_pid`` that exited and were not reaped (zombies): pid -> wait status."""
    dead = {}
    for pid in child_pids(server_pid):
        fields = _proc_stat_fields(pid)
        if fields and fields[0] == "Z":
            dead[pid] = int(fields[-1]) if fields[-1].lstrip("-").isdigit() else 0
    return dead


def describe_wait_status(status: int) -> str:
    if status & 0x7F:
        number = status & 0x7F
        with contextlib.suppress(ValueError):
            return f"killed by signal {number} ({signal.Signals(number).name})"
        return f"killed by signal {number}"
    return f"exited with code {(status >> 8) & 0xFF}"


class StubWatchdog:
    """Reloads a model whose Python-backend stub died: Triton 2.51 neither restarts it nor reports it.

    A stub that exits because Triton unloads its model is reaped by Triton; one that dies
    otherwise stays a zombie child of tritonserver, which is what this looks for. Its
    command line is gone by then, so the model each live stub serves is noted on every look.
    """

    def __init__(self, server: TritonServer, interval_s: float) -> None:
        self.server = server
        self.interval_s = interval_s
        self._known: dict[int, StubProcess] = {}
        self._handled: set[int] = set()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="postsim-stub-watchdog", daemon=True)

    def start(self) -> None:
        process = self.server.process
        if process is not None:
            earlier = dead_children(process.pid)
            if earlier:
                LOGGER.warning(
                    "tritonserver has %d dead Python-backend process(es) from before the watchdog started; the models "
                    "they served fail until reloaded (TritonServer.reload_model)",
                    len(earlier),
                )
                self._handled.update(earlier)
        self.check()  # note the stubs of the models loaded at start
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.server.settings.startup_timeout_s)

    def _watch(self) -> None:
        while not self._stopping.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # the watchdog must outlive whatever one look ran into
                LOGGER.exception("the stub watchdog failed to check tritonserver's processes")

    def check(self) -> list[str]:
        """One look: reload the models whose stubs died since the last; returns their names."""
        process = self.server.process
        if process is None or process.poll() is not None:
            return []
        for live in self.server.stubs():
            self._known[live.pid] = live
        reloaded = []
        for pid, status in dead_children(process.pid).items():
            if pid in self._handled or self._stopping.is_set():
                continue
            self._handled.add(pid)
            stub = self._known.pop(pid, None)
            if stub is not None:
                self.server.dead_stub_models.append(stub.model)
            if self._recover(pid, status, stub):
                assert stub is not None
                reloaded.append(stub.model)
        return reloaded

    def _recover(self, pid: int, status: int, stub: StubProcess | None) -> bool:
        how = describe_wait_status(status)
        if stub is None:
            LOGGER.error(
                "a Python-backend process of tritonserver (pid %d) %s before postsim saw which model it served; "
                'requests to that model fail with "Stub process ... is not healthy" until it is reloaded: '
                "restart `postsim serve`",
                pid,
                how,
            )
            return False
        LOGGER.error(
            "model '%s' (version %s): its Python-backend process (pid %d) %s. Triton does not restart it and "
            'keeps reporting the model ready while every request to it fails ("Stub process is not healthy"): '
            "reloading '%s'",
            stub.model,
            stub.version,
            pid,
            how,
            stub.model,
        )
        try:
            self.server.reload_model(stub.model, changed_file=stub.model_file)
        except PostSimError as error:
            LOGGER.error("model '%s' could not be reloaded (%s): restart `postsim serve`", stub.model, error)
            return False
        LOGGER.info("model '%s' reloaded after its process died: serving again", stub.model)
        return True


def _answers_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


_STAT_PARTS = ("queue", "compute_input", "compute_infer", "compute_output")
_LOST_REQUESTS = re.compile(r"has [1-9]\d* in-flight inferences")


@dataclass(frozen=True)
class _Activity:
    counts: tuple[tuple[str, str, int], ...]
    """(model, version, executions so far) of every non-ensemble model."""
    pending: bool
    """Whether some request is queued and not yet executed."""
    quiet_s: float
    """How long without a finished execution means idle: a few times the slowest model's usual batch."""


class TritonServer:
    """A tritonserver process on a model repository: a context manager that always stops it."""

    def __init__(self, settings: ServerSettings, *, log_path: Path | None = None) -> None:
        self.settings = settings
        self.repository = settings.repository.resolve()
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="postsim-tritonserver-", suffix=".log")[1])
        self.process: subprocess.Popen[bytes] | None = None
        self.models: list[str] = []
        self.watchdog: StubWatchdog | None = None
        self.dead_stub_models: list[str] = []
        """Models whose stub died while this server ran (what the watchdog found)."""
        self._shm_regions: set[str] = set()
        """Shared-memory regions of every stub seen: removed at stop, as Triton leaves a dead stub's behind."""

    @property
    def endpoints(self) -> Endpoints:
        host = "localhost"
        return Endpoints(
            grpc=f"{host}:{self.settings.grpc_port}",
            http=f"http://{host}:{self.settings.http_port}",
            metrics=f"http://{host}:{self.settings.metrics_port}/metrics",
        )

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
        settings = self.settings
        args = [
            str(binary_dir / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={binary_dir / 'backends'}",
            f"--cache-directory={binary_dir / 'caches'}",
            "--model-control-mode=explicit",
            *(f"--load-model={model}" for model in self.models),
            f"--grpc-port={settings.grpc_port}",
            f"--http-port={settings.http_port}",
            f"--metrics-port={settings.metrics_port}",
            f"--grpc-address={settings.address}",
            f"--http-address={settings.address}",
            f"--exit-timeout-secs={settings.exit_timeout_s}",
            f"--backend-config=python,shm-default-byte-size={settings.shm_default_bytes}",
            "--strict-readiness=true",
            f"--log-verbose={settings.log_verbose}",
        ]
        if settings.tls is not None:
            args += [
                "--grpc-use-ssl=true",
                f"--grpc-server-cert={settings.tls.certificate}",
                f"--grpc-server-key={settings.tls.private_key}",
            ]
            if settings.tls.client_ca is not None:
                args += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={settings.tls.client_ca}"]
        if settings.admin_key:
            restricted = f"model-repository,shared-memory:{RESTRICTED_HEADER}={settings.admin_key}"
            args += [f"--grpc-restricted-protocol={restricted}", f"--http-restricted-api={restricted}"]
        return args + list(settings.extra_args)

    def _environment(self, libraries: Path) -> dict[str, str]:
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(libraries), env.get("LD_LIBRARY_PATH")]))
        # The stub embeds the Python found first on PATH: make it this interpreter's environment.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    def start(self) -> Endpoints:
        manifest = self._check_repository()
        for port, option in (
            (self.settings.grpc_port, "--grpc-port"),
            (self.settings.http_port, "--http-port"),
            (self.settings.metrics_port, "--metrics-port"),
        ):
            check_port_free(port, option)
        log_weights(manifest)
        self._warn_if_shared_memory_is_short()
        binary_dir, libraries = prepare_triton()
        log_file = self.log_path.open("wb")
        LOGGER.info("starting tritonserver with %s (log: %s)", ", ".join(self.models), self.log_path)
        self.process = subprocess.Popen(
            self.command(binary_dir),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=self._environment(libraries),
            start_new_session=True,  # its own process group: stopping it reaches the stubs too
        )
        log_file.close()
        self._wait_until_ready()
        if self.settings.stub_watch_interval_s is not None:
            self.watchdog = StubWatchdog(self, self.settings.stub_watch_interval_s)
            self.watchdog.start()
        return self.endpoints

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
            LOGGER.warning("%s", warning)

    @property
    def _local_host(self) -> str:
        """Where this machine reaches the server's HTTP endpoint (for readiness and model control)."""
        address = self.settings.address
        return "127.0.0.1" if address in ("0.0.0.0", "", "localhost") else address

    def _http(self, method: str, path: str, *, timeout_s: float) -> bytes:
        """One call to the server's HTTP API, with the admin key; ServeError with Triton's message."""
        headers = {"Content-Type": "application/json"}
        if self.settings.admin_key:
            headers[RESTRICTED_HEADER] = self.settings.admin_key
        request = urllib.request.Request(
            f"http://{self._local_host}:{self.settings.http_port}{path}",
            data=b"{}" if method == "POST" else None,
            headers=headers,
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
        try:
            if target is None:
                raise FileNotFoundError(f"no model.py for {model}")
            os.utime(target)
        except OSError as error:
            LOGGER.warning("cannot touch %s (%s): unloading '%s' to load it again", target, error, model)
            self._http("POST", f"/v2/repository/models/{quoted}/unload", timeout_s=self.settings.startup_timeout_s)
        self._http("POST", f"/v2/repository/models/{quoted}/load", timeout_s=self.settings.startup_timeout_s)

    def _newest_model_file(self, model: str) -> Path | None:
        files = [version / "model.py" for version in version_dirs(self.repository / model)]
        return next((path for path in reversed(files) if path.is_file()), None)

    def stubs(self) -> list[StubProcess]:
        """The server's live Python-backend stub processes (empty when it is not running)."""
        if self.process is None or self.process.poll() is not None:
            return []
        found = stub_processes(self.process.pid)
        self._shm_regions.update(stub.shm_region for stub in found)
        return found

    def _exit_reason(self, tail_bytes: int = 20_000) -> str:
        """Why a stopping tritonserver exited non-zero, when its log says (Triton 2.51's known ways)."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(max(0, self.log_path.stat().st_size - tail_bytes))
                tail = log.read().decode(errors="replace")
        except OSError:
            return ""
        if "Exit timeout expired" not in tail:
            return ""
        if _LOST_REQUESTS.search(tail):
            return (
                " after waiting out its exit timeout for ensemble requests it lost count of (Triton 2.51 does after a "
                "request fails in one step while another step of it is queued)"
            )
        if self.dead_stub_models:
            return (
                f" after waiting out its exit timeout for {', '.join(sorted(set(self.dead_stub_models)))}, whose "
                "process had died (Triton 2.51 cannot unload what is left of it)"
            )
        return (
            f" because its models were still unloading when its exit timeout ({self.settings.exit_timeout_s} s) ran "
            "out: raise ServerSettings.exit_timeout_s"
        )

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
            LOGGER.info("removed %d shared-memory region(s) tritonserver left in %s", removed, SHM_DIR)
        self._shm_regions.clear()

    def _wait_until_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.settings.startup_timeout_s
        url = f"http://{self._local_host}:{self.settings.http_port}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                reason = explain_failure(self.log_text())
                self.process = None
                raise ServeError(f"tritonserver failed to start:\n{reason}\n(full log: {self.log_path})")
            if _answers_ready(url):
                LOGGER.info("tritonserver ready: gRPC %s", self.endpoints.grpc)
                return
            time.sleep(0.25)
        self.stop()
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
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float | None = None) -> int | None:
        """Stop gracefully: requests already accepted finish, new ones are refused.

        The ensembles are unloaded first (Triton refuses new requests for them and lets
        those in flight finish, every step included) for at most ``exit_timeout_s``; then
        SIGTERM, and SIGKILL if the process is still there ``timeout_s`` later (default:
        ``exit_timeout_s`` + 10 s). Returns the exit code (None if it was not running).
        """
        if self.process is None:
            return None
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
        if self.process.poll() is None:
            self.stubs()  # note their shared-memory regions
            self._drain(time.monotonic() + self.settings.exit_timeout_s)
        process, self.process = self.process, None
        timeout = timeout_s if timeout_s is not None else self.settings.exit_timeout_s + 10
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            LOGGER.warning("tritonserver did not stop within %.0f s: killing it", timeout)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            code = process.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # stub processes left behind, if any
        self._remove_leaked_shm_regions()
        if code not in (0, None):
            LOGGER.warning("tritonserver exited with code %s%s; its log: %s", code, self._exit_reason(), self.log_path)
        else:
            LOGGER.info("tritonserver stopped (exit code %s)", code)
        return code

    def _drain(self, deadline: float) -> None:
        """Unload the ensembles, then wait until nothing they started is still running (or the deadline).

        Done when the ensembles are unloaded, or when the models they call have been idle
        (nothing queued, no execution finished) for a few times their usual execution time:
        Triton 2.51 loses count of an ensemble request whose step failed while another
        step still ran (a rejected post can do that), and such an ensemble never unloads.
        """
        try:
            states = self.model_states()
            draining = [model for model in ENTRY_MODELS if states.get(model) == "READY"]
            for model in draining:
                self._http("POST", f"/v2/repository/models/{model}/unload", timeout_s=10)
            LOGGER.info("stopping: %s refuse new requests; waiting for those in flight", ", ".join(draining) or "none")
            last = self._activity()
            quiet_since = time.monotonic()
            while time.monotonic() < deadline:
                states = self.model_states()
                if not any(states.get(model) in ("READY", "UNLOADING") for model in draining):
                    return
                activity = self._activity()
                if activity.counts != last.counts or activity.pending:
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since >= activity.quiet_s:
                    LOGGER.info(
                        "stopping: no request has been running for %.1f s; Triton may still wait out its exit "
                        "timeout (%d s) for ensemble requests it lost count of (Triton 2.51 does, after a step fails)",
                        activity.quiet_s,
                        self.settings.exit_timeout_s,
                    )
                    return
                last = activity
                time.sleep(0.1)
            LOGGER.warning("requests still in flight after %d s: stopping anyway", self.settings.exit_timeout_s)
        except ServeError as error:
            LOGGER.warning("could not drain the server before stopping it (%s): stopping anyway", error)

    def _activity(self) -> _Activity:
        """How much the non-ensemble models have done so far, from the statistics API."""
        stats = json.loads(self._http("GET", "/v2/models/stats", timeout_s=10)).get("model_stats", [])
        counts = []
        longest_s = 0.0
        for model in stats:
            if model.get("name") in ENTRY_MODELS:
                continue
            executions = int(model.get("execution_count", 0))
            counts.append((model.get("name", ""), model.get("version", ""), executions))
            inference = model.get("inference_stats", {})
            spent_ns = sum(int(inference.get(part, {}).get("ns", 0)) for part in _STAT_PARTS)
            if executions:
                longest_s = max(longest_s, spent_ns / executions / 1e9)
        return _Activity(
            counts=tuple(sorted(counts)), pending=self._pending_requests() > 0, quiet_s=max(1.0, 3 * longest_s)
        )

    def _pending_requests(self) -> int:
        """Requests queued and not yet executing, from the metrics endpoint (0 if it does not answer)."""
        url = f"http://{self._local_host}:{self.settings.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode(errors="replace")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return 0
        return sum(
            int(float(line.rsplit(" ", 1)[-1]))
            for line in text.splitlines()
            if line.startswith("nv_inference_pending_request_count{")
        )

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
