"""The cache folder and atomic binary writes (postsim.training.storage)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from postsim.training import storage
from postsim.training.storage import cache_root, write_bytes_atomic


def test_the_cache_lives_in_the_user_cache_unless_overridden(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(storage.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "postsim"
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    target = tmp_path / "head.pt"
    write_bytes_atomic(target, b"old")

    def interrupted(source: str, destination: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert [path.name for path in tmp_path.iterdir()] == ["head.pt"]
