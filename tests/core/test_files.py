"""Atomic writes (postsim.core.files)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from postsim.core.files import write_bytes_atomic


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
