"""Whether a model instance may take the idle core for the request it runs now.

Each instance of a Python-backend model is its own stub process, so the instances of one
model agree through a lock file: an instance that runs a lone request takes the lock without
waiting and, while it holds it, runs the request on its wider session; an instance that finds
it taken runs on its one-thread session, as under load. At concurrency 1 the image path thus
gets both cores; when the server is busy, batches and the other instance keep every session
at one thread, where each process keeps one core busy without fighting the others.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def idle_core_lock_path(model_dir: Path) -> Path:
    """The lock file shared by the instances of the model in ``model_dir`` (outside the repository).

    Named from the folder's path, so every server on this machine that serves another copy of
    the repository has its own, and the repository stays read-only for the server.
    """
    digest = hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"postsim-idle-core-{model_dir.name}-{digest}.lock"


class IdleCore:
    """A lock file the instances of one model take, without waiting, to run a request wider."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    @contextlib.contextmanager
    def claimed(self) -> Iterator[bool]:
        """True while this instance holds the lock; False when another instance holds it."""
        try:
            fcntl.flock(self._descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(self._descriptor, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._descriptor)
