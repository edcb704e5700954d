"""The postsim command: exit codes and messages of failed starts, clean shutdown of `serve`."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from postsim.client.api import PostSimClient
from postsim.client.cli import app
from postsim.model_repository.server import free_ports

runner = CliRunner()


def _postsim(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_bad_arguments_exit_2() -> None:
    code, output = _postsim("export", "--target", "kubernetes")
    assert code == 2
    assert "not one of embedded, triton" in output


def test_serve_without_a_repository_says_to_export(tmp_path: Path) -> None:
    code, output = _postsim("serve", "--repository", str(tmp_path / "nowhere"))
    assert code == 1
    assert "does not exist" in output and "postsim export" in output


def test_serve_on_a_repository_never_exported_says_to_export(tmp_path: Path) -> None:
    code, output = _postsim("serve", "--repository", str(tmp_path))
    assert code == 1
    assert "weights.json is missing" in output and "postsim export" in output


def _words(output: str) -> str:
    """Typer's boxed message as plain words: without the box, however it wrapped."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())


def test_serve_takes_the_admin_key_one_way_and_never_from_an_empty_file(tmp_path: Path) -> None:
    key_file = tmp_path / "admin-key"
    key_file.write_text("\n")
    code, output = _postsim("serve", "--repository", str(tmp_path), "--admin-key-file", str(key_file))
    assert code == 2 and "is empty: write the admin key on its first line" in _words(output)
    key_file.write_text("s3cret\n")
    code, output = _postsim("serve", "--admin-key", "other", "--admin-key-file", str(key_file))
    assert code == 2 and "give the admin key one way" in _words(output)
    code, output = _postsim("serve", "--help")
    assert "readable by every local user" in _words(output)


def test_embed_without_a_server_says_how_to_start_one() -> None:
    code, output = _postsim("embed", "--text", "hello", "--url", f"localhost:{free_ports(1)[0]}")
    assert code == 1
    assert "postsim serve" in output


@pytest.mark.integration
def test_serve_on_a_taken_port_names_the_port_and_the_option(exported_repository) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, output = _postsim("serve", "--repository", str(exported_repository.path), "--grpc-port", str(port))
    assert code == 1
    assert f"port {port} is already taken" in output and "--grpc-port" in output


@pytest.mark.integration
def test_serve_reports_the_failing_models_own_error(exported_repository, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    repository = tmp_path / "repository"
    shutil.copytree(exported_repository.path, repository)
    config = repository / "fuser" / "config.pbtxt"
    config.write_text(config.read_text().replace('string_value: "model.onnx"', 'string_value: "missing.onnx"'))
    ports = [str(port) for port in free_ports(3)]
    code, output = _postsim(
        "serve",
        "--repository",
        str(repository),
        "--grpc-port",
        ports[0],
        "--http-port",
        ports[1],
        "--metrics-port",
        ports[2],
    )
    assert code == 1
    assert "model 'fuser'" in output and "missing.onnx" in output


@pytest.mark.integration
def test_serve_stops_cleanly_on_sigterm(exported_repository, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    grpc_port, http_port, metrics_port = free_ports(3)
    command = [
        sys.executable, "-m", "postsim.client.cli", "serve",
        "--repository", str(exported_repository.path),
        "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", str(metrics_port),
        "--log-file", str(tmp_path / "triton.log"),
    ]  # fmt: skip
    serve = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with PostSimClient(f"localhost:{grpc_port}") as client:
            client.wait_until_ready(timeout_s=180)
        serve.send_signal(signal.SIGTERM)
        output, _ = serve.communicate(timeout=60)
    finally:
        serve.kill()
    assert serve.returncode == 0, output
    assert f"localhost:{grpc_port}" in output
    # Nothing is left listening, and no Python-backend stub outlives the server.
    time.sleep(0.5)
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", grpc_port))
    stubs = subprocess.run(["pgrep", "-f", f"triton_python_backend_stub.*{tmp_path.name}"], capture_output=True)
    assert stubs.stdout == b""
