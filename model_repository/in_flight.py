"""How many inference calls the server runs now: counted by the front end, read by the models.

The front end of ``postsim serve`` sees every inference call it sends to tritonserver and
every answer (abandoned calls included, they still run). It keeps the number of calls
running in one 8-byte word of a small file in the server's private folder; the launcher
names that file to tritonserver's processes in :data:`IN_FLIGHT_FILE_ENV`, and a model maps
it and reads the word when it decides how many threads a request may take. A server
started otherwise (plain tritonserver on the repository) has no such file, and a model
that asks gets None: it knows nothing of the load and stays on its narrow settings.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

IN_FLIGHT_FILE_ENV = "POSTSIM_IN_FLIGHT_FILE"
_WORD = struct.Struct("=q")


def create_in_flight_file(path: Path) -> None:
    """An in-flight count of 0 at ``path`` (only this user may read it, like the folder it is in)."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(descriptor, _WORD.pack(0))
    finally:
        os.close(descriptor)


class InFlightCount:
    """The count, mapped: the front end writes it, the models read it. One aligned word, so no lock."""

    def __init__(self, path: Path, *, writable: bool) -> None:
        self.path = path
        descriptor = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        try:
            access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
            self._map = mmap.mmap(descriptor, _WORD.size, access=access)
        finally:
            os.close(descriptor)

    @classmethod
    def from_environment(cls) -> InFlightCount | None:
        """The count of the server this process runs in, or None when it was not started by ``postsim serve``."""
        path = os.environ.get(IN_FLIGHT_FILE_ENV)
        if not path or not Path(path).is_file():
            return None
        return cls(Path(path), writable=False)

    def read(self) -> int:
        value: int = _WORD.unpack_from(self._map)[0]
        return value

    def write(self, count: int) -> None:
        _WORD.pack_into(self._map, 0, count)

    def close(self) -> None:
        self._map.close()
