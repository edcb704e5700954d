"""The change journal: every upsert and delete of a live index, appended and fsynced before it is acknowledged.

A journal sits beside one published index version and records the changes made to it
since. Replayed onto that version it gives back exactly the acknowledged state: a change
is acknowledged only once its record is on stable storage (``fsync``), and a record that a
crash cut short is detected and dropped.

Layout (little-endian)::

    "postsim-journal\\n"                 16 bytes
    header length, CRC32 of header      2 × uint32
    header                              JSON: format, weights fingerprint, base version,
                                        dimension, base sequence
    frame*                              one per acknowledged call (a batch of changes)

    frame   = payload length (uint32), CRC32 of payload (uint32), payload
    payload = sequence (uint64), change count (uint32), change*
    change  = kind (uint8: 1 upsert, 2 delete, 3 upsert with parts), id length (uint16), id (UTF-8),
              for an upsert: vector (dimension × float32),
                  with parts: image, text (dimension × float32 each), weights (2 × float32),
              JSON length (uint32), JSON {author, created_at (epoch seconds), label, tags, caption}

An upsert whose score parts are known (:class:`~postsim.model_repository.score_parts.PostParts`,
what splits its scores) is written as kind 3; kind 1, without them, is what journals written
before parts were journalled hold, and still replays (its post's parts are unknown, NaN).

One frame holds one call's changes, so a call is replayed whole or not at all. The
header is written once, with the file (through a temporary file and a rename), so it is
never torn. Reading stops at the first frame that does not check out: when it is the
last thing in the file (its length runs past the end, or it ends the file and its CRC
fails) it is a write the crash interrupted, dropped with a warning, and the file is cut
back to the last good frame before anything is appended; anywhere else it is damage,
and the journal is refused, saying where. Sequence numbers run on from the header's base
sequence, one per frame, so a frame lost or repeated is damage too.

The header pins the journal to its base: a journal written for other encoders (weights
fingerprint), another index version or another dimension is refused.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

from postsim.core.errors import InvalidPostError, JournalWrittenElsewhereError, PostSimError, SearchIndexError
from postsim.core.files import fsync_path, write_bytes_atomic
from postsim.model_repository.contract import MODALITIES
from postsim.model_repository.live_index.metadata import PostMetadata
from postsim.model_repository.live_index.protocol import PostUpsert, check_post_id
from postsim.model_repository.score_parts import PostParts

logger = logging.getLogger("postsim")

MAGIC = b"postsim-journal\n"
FORMAT_VERSION = 1
MAX_FRAME_BYTES = 1 << 30
"""Largest record of one call (about a million upserts of 256 floats)."""
_PAIR = struct.Struct("<II")
"""Header or frame prefix: length, CRC32."""
_BATCH = struct.Struct("<QI")
_CHANGE = struct.Struct("<BH")
_U32 = struct.Struct("<I")
_UPSERT = 1
_DELETE = 2
_UPSERT_WITH_PARTS = 3


@dataclass(frozen=True, kw_only=True)
class JournalHeader:
    """What the changes of a journal apply to."""

    weights_fingerprint: str
    """The encoders every upserted vector comes from."""
    base_version: str
    """Identity of the published index version the changes apply to (its manifest's ``index_sha256``)."""
    dimension: int
    base_sequence: int = 0
    """The last change already folded into the base; the journal's first change has the next number."""

    def to_bytes(self) -> bytes:
        return json.dumps({"format": FORMAT_VERSION, **asdict(self)}, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> JournalHeader:
        fields = json.loads(data)
        if not isinstance(fields, dict) or fields.pop("format", None) != FORMAT_VERSION:
            raise ValueError(f"not a format {FORMAT_VERSION} header")
        return cls(**fields)


@dataclass(frozen=True)
class Delete:
    """The deletion of the post with this id."""

    id: str

    def __post_init__(self) -> None:
        check_post_id(self.id, "delete")


Change = PostUpsert | Delete


@dataclass(frozen=True, kw_only=True)
class ChangeBatch:
    """The changes of one acknowledged call, in order."""

    sequence: int
    changes: tuple[Change, ...]


class _Damaged(Exception):
    """A frame that does not decode, inside the scan."""


class ChangeJournal:
    """An open journal file, appended to by one writer. Open with :meth:`open` or :meth:`create`.

    The writer is the process that holds an exclusive lock (``flock``) on the file, from its
    opening to :meth:`close`: servers that share a repository (replicas on one volume) all read
    a version's journal, and the first to open it writes it. Another opens it as a reader: it
    replays what is there, leaves a last record being written alone (it is the writer's, not a
    crash's), and refuses to append (:class:`~postsim.core.errors.JournalWrittenElsewhereError`).
    """

    def __init__(
        self, path: Path, header: JournalHeader, *, size: int, sequence: int, descriptor: int, writes: bool
    ) -> None:
        self.path = path
        self.header = header
        self._size = size
        self._sequence = sequence
        self._descriptor: int | None = descriptor
        self._broken: str | None = None
        self.writes = writes
        """Whether this process writes the journal (holds its lock); False: another server does."""

    @property
    def sequence(self) -> int:
        """Sequence number of the last change batch written."""
        return self._sequence

    @property
    def size_bytes(self) -> int:
        return self._size

    @classmethod
    def open(cls, path: str | Path, header: JournalHeader) -> tuple[ChangeJournal, list[ChangeBatch]]:
        """The journal at ``path`` (created empty when there is none) and the change batches it holds.

        A torn last frame is dropped, logged, and cut from the file. A journal whose header
        is not ``header`` (other encoders, another base) or that is damaged before its end
        is a SearchIndexError that says what to do.
        """
        path = Path(path)
        if not path.exists():
            return cls.create(path, header), []
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND)
        writes = _lock(descriptor)
        try:
            scan = _scan(path, header)
            if scan.torn_at is not None and writes:
                _cut(path, scan)
        except BaseException:
            os.close(descriptor)
            raise
        journal = cls(
            path,
            header,
            size=scan.end,
            sequence=_last_sequence(header, scan.batches),
            descriptor=descriptor,
            writes=writes,
        )
        if not writes:
            logger.warning(
                "journal %s is written by another server sharing this repository: this one serves the %d change "
                "batches made before it opened the journal and refuses new changes (they go through the writer)",
                path,
                len(scan.batches),
            )
        if scan.batches:
            logger.info(
                "journal %s: %d change batches (sequence %d to %d) after base version %s",
                path,
                len(scan.batches),
                scan.batches[0].sequence,
                scan.batches[-1].sequence,
                header.base_version[:12],
            )
        return journal, scan.batches

    @classmethod
    def create(cls, path: str | Path, header: JournalHeader, carried: Sequence[ChangeBatch] = ()) -> ChangeJournal:
        """A new journal at ``path`` holding ``carried`` (changes made after the base, such as those made
        while a compacted version was being built), written whole through a temporary file and a rename.

        ``carried`` must run on from ``header.base_sequence``. An existing file is never replaced.
        """
        path = Path(path)
        if path.exists():
            raise SearchIndexError(f"a journal already exists at {path}; open it, or move it aside to start afresh")
        expected = header.base_sequence + 1
        for batch in carried:
            if batch.sequence != expected:
                raise SearchIndexError(f"carried change batches must run on from {expected - 1}, got {batch.sequence}")
            expected += 1
        header_bytes = header.to_bytes()
        content = b"".join(
            [MAGIC, _PAIR.pack(len(header_bytes), zlib.crc32(header_bytes)), header_bytes]
            + [_frame(_encode(batch, header.dimension)) for batch in carried]
        )
        write_bytes_atomic(path, content)
        fsync_path(path.parent)
        logger.info(
            "journal %s started after change %d of base version %s",
            path,
            header.base_sequence,
            header.base_version[:12],
        )
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND)
        sequence = _last_sequence(header, carried)
        return cls(path, header, size=len(content), sequence=sequence, descriptor=descriptor, writes=_lock(descriptor))

    def append(self, changes: Sequence[Change]) -> ChangeBatch:
        """Write ``changes`` as one frame and fsync it; return them with their sequence number.

        When this returns, the changes survive a crash. When it raises, they are not
        acknowledged: a failed write is cut back out of the file; after a failed fsync the
        record may or may not survive (the kernel may have dropped its pages), so the journal
        takes no further changes until it is opened again.
        """
        if self._descriptor is None:
            raise SearchIndexError(f"journal {self.path} is closed")
        if self._broken is not None:
            raise SearchIndexError(f"journal {self.path} takes no more changes: {self._broken}; restart the server")
        if not self.writes:
            raise JournalWrittenElsewhereError(self.path)
        if not changes:
            raise InvalidPostError("a change batch needs at least one change")
        batch = ChangeBatch(sequence=self._sequence + 1, changes=tuple(changes))
        frame = _frame(_encode(batch, self.header.dimension))
        self._write(frame)
        try:
            os.fsync(self._descriptor)
        except OSError as error:
            self._broken = f"fsync failed ({error})"
            raise SearchIndexError(
                f"journal {self.path}: fsync failed ({error}); the change is not acknowledged"
            ) from None
        self._size += len(frame)
        self._sequence = batch.sequence
        return batch

    def _write(self, frame: bytes) -> None:
        assert self._descriptor is not None
        written = 0
        try:
            while written < len(frame):
                written += os.write(self._descriptor, frame[written:])
        except OSError as error:
            try:
                os.ftruncate(self._descriptor, self._size)  # no half frame before the next one
            except OSError as cut_error:
                self._broken = f"a failed write could not be cut back ({cut_error})"
            raise SearchIndexError(
                f"journal {self.path}: writing a change failed ({error}); it is not acknowledged: free disk space "
                "and send it again"
            ) from None

    def read(self) -> list[ChangeBatch]:
        """Every change batch in the file, as :func:`read_journal` reads it."""
        return read_journal(self.path, self.header)

    def close(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None

    def __enter__(self) -> ChangeJournal:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def _lock(descriptor: int) -> bool:
    """Take the journal's writer lock if no other open file holds it (released when the descriptor closes)."""
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def read_journal(path: str | Path, header: JournalHeader) -> list[ChangeBatch]:
    """The change batches of the journal at ``path`` without changing the file (a torn last frame is left out)."""
    return _scan(Path(path), header).batches


@dataclass(frozen=True)
class _Scan:
    batches: list[ChangeBatch]
    end: int
    """Where the last good frame ends."""
    torn_at: int | None
    """Where a torn last frame starts, if the file has one."""
    size: int


def _scan(path: Path, header: JournalHeader) -> _Scan:
    data = memoryview(path.read_bytes())
    offset = _check_header(path, data, header)
    batches: list[ChangeBatch] = []
    while offset < len(data):
        try:
            end, batch = _frame_at(data, offset, header.dimension)
        except _Torn:
            return _Scan(batches, offset, offset, len(data))
        except _Damaged as why:
            if data[offset:].tobytes().count(0) == len(data) - offset:  # a crash can leave the file zero-filled
                return _Scan(batches, offset, offset, len(data))
            raise _damaged(path, offset, str(why), len(batches)) from None
        expected = _last_sequence(header, batches) + 1
        if batch.sequence != expected:
            raise _damaged(path, offset, f"its sequence number is {batch.sequence}, expected {expected}", len(batches))
        batches.append(batch)
        offset = end
    return _Scan(batches, offset, None, len(data))


class _Torn(Exception):
    """The file ends inside a frame, or with a frame whose pages were not all written."""


def _frame_at(data: memoryview, offset: int, dimension: int) -> tuple[int, ChangeBatch]:
    """The end of the frame at ``offset`` and its batch; _Torn or _Damaged when it does not check out."""
    if offset + _PAIR.size > len(data):
        raise _Torn
    length, crc = _PAIR.unpack_from(data, offset)
    end = offset + _PAIR.size + length
    if end > len(data):
        raise _Torn
    payload = data[offset + _PAIR.size : end]
    if zlib.crc32(payload) != crc:
        if end == len(data):
            raise _Torn
        raise _Damaged("its checksum does not match")
    return end, _decode(payload, dimension)


def _damaged(path: Path, offset: int, why: str, intact: int) -> SearchIndexError:
    return SearchIndexError(
        f"journal {path} is damaged at byte {offset}: {why}. The {intact} change batches before it are intact: "
        f"restore the file from a backup, or keep those by cutting it there (`truncate -s {offset} {path}`) "
        "and restart"
    )


def _check_header(path: Path, data: memoryview, expected: JournalHeader) -> int:
    """The offset of the first frame, once the stored header is ``expected``."""
    start = len(MAGIC) + _PAIR.size
    length, crc = _PAIR.unpack_from(data, len(MAGIC)) if len(data) >= start else (0, 0)
    header_bytes = bytes(data[start : start + length])
    try:
        if data[: len(MAGIC)] != MAGIC or len(data) < start + length or zlib.crc32(header_bytes) != crc:
            raise ValueError("no header")
        stored = JournalHeader.from_bytes(header_bytes)
    except (ValueError, TypeError):
        raise SearchIndexError(
            f"{path} is not a postsim change journal (its header is missing or damaged); move it aside to serve "
            "the published index version without its changes"
        ) from None
    problems = [
        f"{name} {getattr(stored, name)!r} (this index: {getattr(expected, name)!r})"
        for name in ("weights_fingerprint", "base_version", "dimension", "base_sequence")
        if getattr(stored, name) != getattr(expected, name)
    ]
    if problems:
        raise SearchIndexError(
            f"journal {path} records changes to another index: {'; '.join(problems)}. Its changes cannot apply "
            "here (other encoders' vectors are not comparable, another version's rows are not these); it belongs "
            "beside the index version it names: move it there or aside"
        )
    return start + length


def _cut(path: Path, scan: _Scan) -> None:
    assert scan.torn_at is not None
    logger.warning(
        "journal %s: dropped a torn last record (%d bytes at byte %d, a write cut short by a crash, never "
        "acknowledged); the %d change batches before it are kept",
        path,
        scan.size - scan.torn_at,
        scan.torn_at,
        len(scan.batches),
    )
    with path.open("r+b") as file:
        file.truncate(scan.torn_at)
        file.flush()
        os.fsync(file.fileno())


def _last_sequence(header: JournalHeader, batches: Sequence[ChangeBatch]) -> int:
    return batches[-1].sequence if batches else header.base_sequence


def _frame(payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME_BYTES:
        raise InvalidPostError(
            f"one change call takes at most {MAX_FRAME_BYTES >> 20} MiB of changes, got {len(payload) >> 20} MiB: "
            "send it in smaller batches"
        )
    return _PAIR.pack(len(payload), zlib.crc32(payload)) + payload


def _encode(batch: ChangeBatch, dimension: int) -> bytes:
    parts = [_BATCH.pack(batch.sequence, len(batch.changes))]
    for change in batch.changes:
        post_id = change.id.encode()
        if isinstance(change, Delete):
            parts.append(_CHANGE.pack(_DELETE, len(post_id)) + post_id)
            continue
        vector = np.ascontiguousarray(change.vector, dtype=np.float32)
        if vector.shape != (dimension,):
            raise SearchIndexError(
                f"post {change.id!r}: vector of shape {vector.shape}, the journal's is ({dimension},)"
            )
        metadata = change.metadata
        fields: dict[str, object] = {
            "author": metadata.author,
            "created_at": metadata.created_at,
            "label": metadata.label,
        }
        fields |= {"tags": list(metadata.tags), "caption": change.caption}
        extra = json.dumps(fields, ensure_ascii=False, sort_keys=True).encode()
        kind = _UPSERT if change.parts is None else _UPSERT_WITH_PARTS
        parts += [_CHANGE.pack(kind, len(post_id)), post_id, vector.tobytes()]
        if change.parts is not None:
            checked = change.parts.check(dimension, change.id)
            parts += [checked.image.tobytes(), checked.text.tobytes(), checked.weights.tobytes()]
        parts += [_U32.pack(len(extra)), extra]
    return b"".join(parts)


def _decode(payload: memoryview, dimension: int) -> ChangeBatch:
    try:
        sequence, count = _BATCH.unpack_from(payload, 0)
        offset = _BATCH.size
        changes: list[Change] = []
        for _ in range(count):
            kind, id_length = _CHANGE.unpack_from(payload, offset)
            offset += _CHANGE.size
            post_id = bytes(payload[offset : offset + id_length]).decode()
            offset += id_length
            if kind == _DELETE:
                changes.append(Delete(post_id))
                continue
            if kind not in (_UPSERT, _UPSERT_WITH_PARTS):
                raise _Damaged(f"a change of unknown kind {kind}")
            vector = np.frombuffer(payload, dtype=np.float32, count=dimension, offset=offset).copy()
            offset += 4 * dimension
            post_parts = None
            if kind == _UPSERT_WITH_PARTS:
                arrays = []
                for count_of in (dimension, dimension, len(MODALITIES)):
                    arrays.append(np.frombuffer(payload, dtype=np.float32, count=count_of, offset=offset).copy())
                    offset += 4 * count_of
                post_parts = PostParts(image=arrays[0], text=arrays[1], weights=arrays[2])
            (extra_length,) = _U32.unpack_from(payload, offset)
            offset += _U32.size
            fields = json.loads(bytes(payload[offset : offset + extra_length]))
            offset += extra_length
            caption = fields.pop("caption")
            metadata = PostMetadata(**{**fields, "tags": tuple(fields["tags"])})
            changes.append(PostUpsert(id=post_id, vector=vector, metadata=metadata, caption=caption, parts=post_parts))
    except (struct.error, ValueError, TypeError, KeyError, PostSimError) as error:
        raise _Damaged(f"a record that does not decode ({error})") from None
    if offset != len(payload):
        raise _Damaged(f"{len(payload) - offset} bytes after its last change")
    return ChangeBatch(sequence=sequence, changes=tuple(changes))
