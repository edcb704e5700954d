"""Writing files so that no reader (Triton, a restarted server, a user) ever sees half of one.

Every write goes to a temporary sibling, which is fsynced and then renamed over the target:
on any failure, interrupts included, the target is left as it was and the temporary file is
removed. :func:`write_text_atomic` and :func:`write_bytes_atomic` write what is in memory;
:func:`atomic_path` lends a temporary path to a library that writes files itself (FAISS,
matplotlib) and puts the result in place; :func:`move_atomic` puts an existing file in place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) at ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` at ``path`` atomically."""
    with atomic_path(path) as temporary, temporary.open("wb") as file:
        file.write(data)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write into; renamed over ``path`` (after an fsync) when the block ends.

    The temporary file keeps ``path``'s suffix, for writers that choose the format by it.
    When the block raises, ``path`` is left as it was and the temporary file is removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(descriptor)
    temporary = Path(name)
    try:
        yield temporary
        fsync_path(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def move_atomic(source: Path, destination: Path) -> None:
    """Move the file ``source`` over ``destination`` atomically (a copy when they are on different file systems)."""
    with atomic_path(destination) as temporary:
        shutil.move(source, temporary)


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (so that a rename in the folder is durable)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
