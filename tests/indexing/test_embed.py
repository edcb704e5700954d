"""`postsim index build` through a real tritonserver: what it needs from the server, and what it shows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from postsim.cli.main import app
from postsim.corpus.samples import write_sample_posts
from postsim.model_repository.search_index import read_manifest
from postsim.server.launcher import TritonServer

pytestmark = pytest.mark.integration


def test_index_build_needs_no_admin_key(admin_server: TritonServer, tmp_path: Path) -> None:
    """Building only embeds posts and reads which weights embed them: nothing the admin key restricts."""
    corpus = write_sample_posts(6, tmp_path / "corpus")
    result = CliRunner().invoke(
        app, ["index", "build", str(corpus), "--out", str(tmp_path / "index"), "--url", admin_server.endpoints.grpc]
    )
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp_path / "index").count == 6


def test_index_build_prints_progress_lines_when_its_output_is_not_a_terminal(grpc_url: str, tmp_path: Path) -> None:
    corpus = write_sample_posts(12, tmp_path / "corpus")
    command = [
        sys.executable, "-m", "postsim.cli", "index", "build", str(corpus),
        "--out", str(tmp_path / "index"), "--url", grpc_url, "--batch-size", "2",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "300"})
    assert result.returncode == 0, result.stdout + result.stderr
    progress = [line for line in result.stderr.splitlines() if "embedding: " in line]
    assert progress, result.stderr
    assert "embedding: 12/12 posts (100%)" in progress[-1] and "posts/s, done in" in progress[-1]
