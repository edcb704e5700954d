"""Where generated files go by default: one per-user data folder, never the source tree."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from postsim.cli.main import app
from postsim.core.paths import (
    CACHE_ENV,
    HOME_ENV,
    REPOSITORY_ENV,
    cache_root,
    default_repository,
    default_run_dir,
    postsim_home,
)

ROOT = Path(__file__).resolve().parents[2]


def test_home_is_postsim_home_else_xdg_data_else_local_share(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.delenv(HOME_ENV, raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    assert postsim_home() == tmp_path / "user" / ".local" / "share" / "postsim"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/data")  # invalid by the XDG spec: ignored
    assert postsim_home() == tmp_path / "user" / ".local" / "share" / "postsim"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert postsim_home() == tmp_path / "data" / "postsim"
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "home"))
    assert postsim_home() == tmp_path / "home"


def test_default_repository_and_runs_live_under_the_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(HOME_ENV, str(tmp_path))
    monkeypatch.delenv(REPOSITORY_ENV, raising=False)
    assert default_repository() == tmp_path / "model_repository"
    assert default_run_dir("demo") == tmp_path / "runs" / "demo"
    monkeypatch.setenv(REPOSITORY_ENV, str(tmp_path / "models"))
    assert default_repository() == tmp_path / "models"


def test_defaults_never_point_into_the_source_tree(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in (HOME_ENV, REPOSITORY_ENV, "XDG_DATA_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(ROOT)
    for path in (default_repository(), default_run_dir("demo")):
        assert not path.resolve().is_relative_to(ROOT), path


def test_commands_write_to_the_home_by_default(
    postsim_home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Run from inside the clone, with no output option: everything lands in $POSTSIM_HOME."""
    monkeypatch.chdir(ROOT)
    before = _untracked_and_ignored(ROOT)
    runner = CliRunner()
    result = runner.invoke(app, ["sample-posts", "--n", "3"])
    assert result.exit_code == 0, result.output
    assert (postsim_home / "runs" / "sample-posts" / "posts.jsonl").is_file()
    result = runner.invoke(app, ["export", "--weights", "random", "--size", "tiny"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((postsim_home / "model_repository" / "weights.json").read_text())
    assert manifest["random_weights"] is True
    assert _untracked_and_ignored(ROOT) == before, "a command with default options wrote into the clone"


def _untracked_and_ignored(root: Path) -> set[str]:
    """Files git does not track under the clone, caches and the virtualenv aside."""
    listed = subprocess.run(
        ["git", "-C", str(root), "status", "--porcelain", "--ignored", "--untracked-files=all"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    skipped = (".venv/", "__pycache__/", ".pytest_cache/", ".mypy_cache/", ".ruff_cache/", ".egg-info/")
    return {line[3:] for line in listed if not any(part in line for part in skipped)}


def test_the_cache_lives_in_the_user_cache_unless_overridden(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "postsim"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
