"""Runs the ``tritonserver`` binary shipped in the nvidia-pytriton wheel on a model repository.

The wheel carries Triton 2.51 with its Python backend, but not laid out to run as is: the
Python-backend stub for this interpreter's version must sit in ``backends/python/`` and
the wheel's bundled libraries must be on the library path. :func:`prepare_triton` builds
that layout once in a cache folder.

Triton runs in explicit model-control mode: the launcher loads each complete model of the
repository by name, and ``postsim index publish`` loads new retrieval versions through the
model-control API. A start that fails says why in words a user can act on: a port taken,
a repository not exported, a model's own error from the server log.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from postsim.model_repository.errors import RepositoryError, ServeError
from postsim.model_repository.layout import loadable_models
from postsim.model_repository.manifest import WeightsManifest, log_weights

LOGGER = logging.getLogger("postsim")

RESTRICTED_HEADER = "postsim-admin-key"
"""The request header that carries the admin key of Triton's restricted protocols."""


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
    """Shared memory each Python-backend stub starts with (it grows as needed)."""
    log_verbose: int = 0
    extra_args: tuple[str, ...] = field(default_factory=tuple)


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


def free_port() -> int:
    """A port free right now on this machine (for tests and benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


_LOAD_FAILURE = re.compile(r"(?:failed to load|load failed for model) '([^']+)'[^:]*: (.*)")


def explain_failure(log_text: str) -> str:
    """The lines of a Triton log that say why models failed, or its last lines."""
    reasons = [f"model '{m.group(1)}': {m.group(2).strip()}" for m in _LOAD_FAILURE.finditer(log_text)]
    if reasons:
        return "\n".join(dict.fromkeys(reasons))
    tail = [line for line in log_text.strip().splitlines() if line.strip()][-15:]
    return "\n".join(tail) or "(the server printed nothing)"


def _answers_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


class TritonServer:
    """A tritonserver process on a model repository: a context manager that always stops it."""

    def __init__(self, settings: ServerSettings, *, log_path: Path | None = None) -> None:
        self.settings = settings
        self.repository = settings.repository.resolve()
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="postsim-tritonserver-", suffix=".log")[1])
        self.process: subprocess.Popen[bytes] | None = None
        self.models: list[str] = []

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
        return self.endpoints

    def _wait_until_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.settings.startup_timeout_s
        url = f"http://127.0.0.1:{self.settings.http_port}/v2/health/ready"
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
        """SIGTERM (in-flight requests finish, new ones are refused), then SIGKILL after the timeout."""
        if self.process is None:
            return None
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
        LOGGER.info("tritonserver stopped (exit code %s)", code)
        return code

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
