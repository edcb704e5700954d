"""``postsim serve``: tritonserver behind postsim's front end until SIGINT or SIGTERM."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from postsim.cli.common import RepositoryOption, reports_errors, stderr, stdout
from postsim.model_repository.protocol import ADMIN_KEY_VARIABLE


@reports_errors
def serve(
    repository: RepositoryOption,
    grpc_port: Annotated[int, typer.Option(help="gRPC port.")] = 8001,
    http_port: Annotated[int, typer.Option(help="HTTP port (the KServe v2 HTTP API: health, metadata, infer).")] = 8000,
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics port.")] = 8002,
    address: Annotated[
        str, typer.Option(help="Address the gRPC, HTTP and metrics ports listen on (0.0.0.0: every interface).")
    ] = "0.0.0.0",
    health_address: Annotated[
        str | None,
        typer.Option(help="HOST:PORT of a plaintext port answering /v2/health/live and /ready only (default: none)."),
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(help="Server certificate (PEM): serve gRPC, HTTP and metrics over TLS only.")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Server private key (PEM).")] = None,
    tls_ca: Annotated[Path | None, typer.Option(help="CA (PEM) that signs client certificates: mutual TLS.")] = None,
    admin_key: Annotated[
        str | None,
        typer.Option(
            envvar=ADMIN_KEY_VARIABLE,
            help="Key required for model control, shared memory, log and trace settings. Given on the command line "
            "it is readable by every local user (ps, /proc/PID/cmdline): prefer POSTSIM_ADMIN_KEY or --admin-key-file.",
        ),
    ] = None,
    admin_key_file: Annotated[
        Path | None, typer.Option(help="File whose first line is the admin key (instead of --admin-key).")
    ] = None,
    max_in_flight: Annotated[
        int, typer.Option(min=1, help="Requests running in Triton at once; past it clients get UNAVAILABLE.")
    ] = 64,
    triton_dir: Annotated[
        Path | None,
        typer.Option(
            help="A Triton install to run (bin/tritonserver, backends/), e.g. /opt/tritonserver in NGC's image."
        ),
    ] = None,
    log_file: Annotated[
        Path | None, typer.Option(help="Where tritonserver's log goes (default: a temporary file).")
    ] = None,
    shm_default_bytes: Annotated[
        int, typer.Option(min=4 << 20, help="Shared memory each Python-backend model instance starts with.")
    ] = 16 << 20,
    compact_above_mb: Annotated[
        int,
        typer.Option(min=0, help="Compact the served index when its change journal passes this many MiB; 0: never."),
    ] = 256,
) -> None:
    """Serve the repository until SIGINT or SIGTERM: tritonserver behind postsim's front end, restarted if it dies."""
    from postsim.server.front_end import TlsSettings
    from postsim.server.launcher import ServerSettings, TritonServer

    if (tls_cert is None) != (tls_key is None):
        raise typer.BadParameter("give both --tls-cert and --tls-key, or neither", param_hint="--tls-cert/--tls-key")
    if tls_ca is not None and tls_cert is None:
        raise typer.BadParameter("--tls-ca needs --tls-cert and --tls-key", param_hint="--tls-ca")
    tls = TlsSettings(certificate=tls_cert, private_key=tls_key, client_ca=tls_ca) if tls_cert and tls_key else None
    settings = ServerSettings(
        repository=repository,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        address=address,
        health_address=health_address,
        tls=tls,
        admin_key=_admin_key(admin_key, admin_key_file),
        max_in_flight=max_in_flight,
        triton_dir=triton_dir,
        shm_default_bytes=shm_default_bytes,
    )
    if compact_above_mb and tls is not None:
        stderr.print("[yellow]warning:[/] no automatic compaction with TLS: run `postsim index compact` yourself")
    server = TritonServer(settings, log_path=log_file)
    stop_requested = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop_requested.set())
    compactor: Any = None
    endpoints = server.start()
    try:
        secure = " (TLS)" if tls else ""
        stdout.print(f"postsim serving {', '.join(server.models)}")
        stdout.print(f"  gRPC     {endpoints.grpc}{secure}")
        stdout.print(f"  HTTP     {endpoints.http}")
        stdout.print(f"  metrics  {endpoints.metrics}")
        if health_address:
            stdout.print(f"  health   http://{health_address}/v2/health/ready (plaintext)")
        stdout.print(f"  log      {server.log_path}")
        if compact_above_mb and tls is None:
            from postsim.indexing.compact import AutoCompactor

            compactor = AutoCompactor(
                repository, endpoints.grpc, threshold_bytes=compact_above_mb << 20, admin_key=settings.admin_key
            )
            compactor.start()
            stdout.print(f"  compacts the index past {compact_above_mb} MiB of changes")
        while not stop_requested.wait(1.0):
            if not server.is_serving():
                stderr.print(
                    f"[bold red]error:[/] the server stopped unexpectedly; tritonserver's log: {server.log_path}"
                )
                raise typer.Exit(1)
        stdout.print("stopping: in-flight requests finish, new ones are refused")
    finally:
        if compactor is not None:
            compactor.stop()
        server.stop()


def _admin_key(value: str | None, path: Path | None) -> str | None:
    """The admin key from --admin-key / POSTSIM_ADMIN_KEY, or from the first line of --admin-key-file."""
    if path is None:
        return value
    if value is not None:
        raise typer.BadParameter(
            "give the admin key one way: --admin-key-file, or --admin-key / POSTSIM_ADMIN_KEY",
            param_hint="--admin-key-file",
        )
    try:
        key = next(iter(path.read_text().splitlines()), "").strip()
    except OSError as error:
        raise typer.BadParameter(f"cannot read {path}: {error.strerror}", param_hint="--admin-key-file") from None
    if not key:
        raise typer.BadParameter(
            f"{path} is empty: write the admin key on its first line", param_hint="--admin-key-file"
        )
    return key
