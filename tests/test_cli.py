"""The postsim command: exit codes and messages of failed starts, clean shutdown of `serve`."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from postsim.client.api import PostSimClient
from postsim.client.cli import app
from postsim.export.triton_config import parse_pbtxt, to_pbtxt
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


def _serve_with_fuser_config(source: Path, tmp_path: Path, edit: Callable[[str], str]) -> tuple[int, str]:
    """`postsim serve` on a copy of the repository at ``source`` whose fuser config ``edit`` rewrote."""
    repository = tmp_path / "repository"
    shutil.copytree(source, repository)
    config = repository / "fuser" / "config.pbtxt"
    config.write_text(edit(config.read_text()))
    ports = [str(port) for port in free_ports(3)]
    return _postsim(
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


@pytest.mark.integration
def test_serve_reports_the_failing_models_own_error(exported_repository, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    code, output = _serve_with_fuser_config(
        exported_repository.path,
        tmp_path,
        lambda text: text.replace('string_value: "model.onnx"', 'string_value: "missing.onnx"'),
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


def test_index_build_refuses_a_post_id_by_its_line_before_embedding_anything(tmp_path: Path) -> None:
    corpus = tmp_path / "posts.jsonl"
    corpus.write_text('{"id": "post-1", "text": "fine"}\n{"id": "post-2\\nERROR: forged log line", "text": "x"}\n')
    url = f"localhost:{free_ports(1)[0]}"  # nothing listens there: the corpus is read first
    code, output = _postsim("index", "build", str(corpus), "--out", str(tmp_path / "index"), "--url", url)
    assert code == 1
    assert f"{corpus}:2: post id 'post-2\\nERROR: forged log line' has the character '\\n'" in output.replace("\n", "")
    assert not (tmp_path / "index").exists()


@pytest.mark.integration
def test_serve_refuses_a_repository_exported_by_another_postsim(exported_repository, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The fuser's config as an export from before QUERY_EMBEDDING wrote it: the model says to export again."""

    def without_query_embedding(text: str) -> str:
        config = parse_pbtxt(text)
        del config.output[-1]
        return to_pbtxt(config)

    code, output = _serve_with_fuser_config(exported_repository.path, tmp_path, without_query_embedding)
    assert code == 1
    assert "model 'fuser'" in output and "exported by another version of postsim" in output
    assert "postsim export" in output
