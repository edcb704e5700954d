"""Where training keeps its files, and how it writes binary ones so no reader sees half of one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

CACHE_ENV = "POSTSIM_CACHE_DIR"
"""Overrides the cache root (default: ``$XDG_CACHE_HOME/postsim``, else ``~/.cache/postsim``)."""


def cache_root() -> Path:
    """postsim's per-user cache folder: ``$POSTSIM_CACHE_DIR``, else the XDG cache's ``postsim``.

    Never inside the source tree: caches are generated and large.
    """
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "postsim"


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write through a temporary sibling, fsync it, then rename it over ``path``.

    The binary twin of :func:`postsim.model_repository.files.write_text_atomic`: on any
    failure, interrupts included, ``path`` is left as it was and the temporary file is removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
