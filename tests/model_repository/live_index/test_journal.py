"""The change journal: framing, fsync before acknowledgement, torn and damaged records, header pinning."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from postsim.core.errors import InvalidPostError, JournalWrittenElsewhereError, SearchIndexError
from postsim.model_repository.live_index.journal import (
    MAGIC,
    ChangeBatch,
    ChangeJournal,
    Delete,
    JournalHeader,
    read_journal,
)
from postsim.model_repository.live_index.metadata import PostMetadata
from postsim.model_repository.live_index.protocol import PostUpsert

DIM = 8
HEADER = JournalHeader(weights_fingerprint="a" * 64, base_version="b" * 64, dimension=DIM)


def upsert(post_id: str, seed: int, **metadata: object) -> PostUpsert:
    vector = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return PostUpsert(id=post_id, vector=vector, metadata=PostMetadata(**metadata), caption=f"about {post_id} ✓")


def batches_of(journal_path: Path) -> list[ChangeBatch]:
    return read_journal(journal_path, HEADER)


def same_changes(left: list[ChangeBatch], right: list[ChangeBatch]) -> bool:
    """Equal sequence numbers and changes (vectors compared by value)."""

    def key(batch: ChangeBatch) -> list[object]:
        return [batch.sequence] + [
            (type(c).__name__, c.id)
            + ((c.vector.tobytes(), c.metadata, c.caption) if isinstance(c, PostUpsert) else ())
            for c in batch.changes
        ]

    return [key(batch) for batch in left] == [key(batch) for batch in right]


def write_three(path: Path) -> tuple[list[ChangeBatch], int]:
    """Three acknowledged batches; returns them and where the last one starts."""
    journal, replayed = ChangeJournal.open(path, HEADER)
    assert replayed == []
    written = [
        journal.append([upsert("a", 1, author="ana", label="cat", created_at=1_700_000_000, tags=("x", "y"))]),
        journal.append([Delete("gone"), upsert("b", 2)]),
    ]
    last_start = journal.size_bytes
    written.append(journal.append([upsert("c", 3, tags=("z",)), Delete("a")]))
    journal.close()
    return written, last_start


def test_changes_round_trip_with_their_sequence_numbers(tmp_path: Path) -> None:
    path = tmp_path / "changes.journal"
    written, _ = write_three(path)
    journal, replayed = ChangeJournal.open(path, HEADER)
    assert same_changes(replayed, written)
    assert [batch.sequence for batch in replayed] == [1, 2, 3]
    assert journal.sequence == 3 and journal.size_bytes == path.stat().st_size
    assert path.read_bytes().startswith(MAGIC)
    assert journal.append([Delete("b")]).sequence == 4
    journal.close()


def test_a_torn_last_record_is_dropped_at_every_byte_it_could_be_cut_at(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "changes.journal"
    written, last_start = write_three(path)
    whole = path.read_bytes()
    assert len(whole) - last_start > 100  # a record with a vector, metadata and a delete
    for cut in range(last_start, len(whole) + 1):
        torn = tmp_path / f"cut-{cut}.journal"
        torn.write_bytes(whole[:cut])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="postsim"):
            journal, replayed = ChangeJournal.open(torn, HEADER)
        if cut == len(whole):
            assert same_changes(replayed, written) and not caplog.records
        else:
            assert same_changes(replayed, written[:2]), f"cut at byte {cut}"
            if cut > last_start:
                assert "torn last record" in caplog.text and f"at byte {last_start}" in caplog.text
            assert torn.stat().st_size == last_start  # cut back before anything is appended
            assert journal.append([Delete("b")]).sequence == 3
            assert [batch.sequence for batch in batches_of(torn)] == [1, 2, 3]
        journal.close()
        torn.unlink()


def test_a_zero_filled_tail_left_by_a_crash_is_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "changes.journal"
    written, _ = write_three(path)
    with path.open("ab") as file:
        file.write(bytes(4096))
    with caplog.at_level(logging.WARNING, logger="postsim"):
        journal, replayed = ChangeJournal.open(path, HEADER)
    journal.close()
    assert same_changes(replayed, written)
    assert "torn last record (4096 bytes" in caplog.text


def test_damage_before_the_last_record_is_refused_saying_where(tmp_path: Path) -> None:
    path = tmp_path / "changes.journal"
    write_three(path)
    data = bytearray(path.read_bytes())
    header_end = len(MAGIC) + 8 + len(HEADER.to_bytes())
    data[header_end + 20] ^= 0xFF  # inside the first frame's payload
    path.write_bytes(bytes(data))
    with pytest.raises(
        SearchIndexError, match=rf"damaged at byte {header_end}: its checksum.*0 change batches.*truncate -s"
    ):
        ChangeJournal.open(path, HEADER)
    assert path.read_bytes() == bytes(data)  # left as it was for the operator


def test_a_repeated_record_is_damage(tmp_path: Path) -> None:
    path = tmp_path / "changes.journal"
    write_three(path)
    data = path.read_bytes()
    header_end = len(MAGIC) + 8 + len(HEADER.to_bytes())
    first_frame_end = header_end + 8 + int.from_bytes(data[header_end : header_end + 4], "little")
    path.write_bytes(data[:first_frame_end] + data[header_end:])
    with pytest.raises(SearchIndexError, match="its sequence number is 1, expected 2"):
        ChangeJournal.open(path, HEADER)


@pytest.mark.parametrize(
    ("field", "value"),
    [("weights_fingerprint", "c" * 64), ("base_version", "d" * 64), ("dimension", 16), ("base_sequence", 7)],
)
def test_a_journal_of_other_encoders_or_another_base_is_refused(tmp_path: Path, field: str, value: object) -> None:
    path = tmp_path / "changes.journal"
    write_three(path)
    other = JournalHeader(**{**HEADER.__dict__, field: value})
    with pytest.raises(SearchIndexError, match=rf"records changes to another index: {field}"):
        ChangeJournal.open(path, other)


def test_a_file_that_is_not_a_journal_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "changes.journal"
    path.write_bytes(b'{"not": "a journal"}')
    with pytest.raises(SearchIndexError, match="is not a postsim change journal"):
        ChangeJournal.open(path, HEADER)


def test_each_batch_is_fsynced_once_before_append_returns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "changes.journal"
    journal, _ = ChangeJournal.open(path, HEADER)
    synced_sizes: list[int] = []
    real_fsync = os.fsync

    def recording_fsync(descriptor: int) -> None:
        synced_sizes.append(os.fstat(descriptor).st_size)
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    journal.append([upsert(f"p{n}", n) for n in range(50)])  # one call: one group commit
    assert synced_sizes == [path.stat().st_size]
    journal.append([Delete("p1")])
    assert synced_sizes == [synced_sizes[0], path.stat().st_size]
    journal.close()


def test_a_failed_write_leaves_no_half_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "changes.journal"
    write_three(path)
    journal, _ = ChangeJournal.open(path, HEADER)
    size = journal.size_bytes
    real_write = os.write

    def disk_fills(descriptor: int, data: bytes) -> int:
        real_write(descriptor, bytes(data)[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", disk_fills)
    with pytest.raises(SearchIndexError, match="not acknowledged: free disk space"):
        journal.append([Delete("b")])
    monkeypatch.setattr(os, "write", real_write)
    assert path.stat().st_size == size
    assert journal.append([Delete("c")]).sequence == 4
    journal.close()
    assert [batch.sequence for batch in batches_of(path)] == [1, 2, 3, 4]


def test_after_a_failed_fsync_the_journal_takes_no_more_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "changes.journal"
    journal, _ = ChangeJournal.open(path, HEADER)

    def failing_fsync(descriptor: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(SearchIndexError, match=r"fsync failed.*not acknowledged"):
        journal.append([Delete("a")])
    monkeypatch.undo()
    with pytest.raises(SearchIndexError, match="takes no more changes: fsync failed"):
        journal.append([Delete("b")])
    journal.close()


def test_a_new_journal_carries_the_changes_after_a_compaction(tmp_path: Path) -> None:
    old = tmp_path / "old.journal"
    written, _ = write_three(old)
    compacted_header = JournalHeader(
        weights_fingerprint="a" * 64, base_version="e" * 64, dimension=DIM, base_sequence=1
    )
    new = tmp_path / "new.journal"
    journal = ChangeJournal.create(new, compacted_header, carried=written[1:])
    assert journal.sequence == 3
    assert journal.append([Delete("c")]).sequence == 4
    journal.close()
    replayed = read_journal(new, compacted_header)
    assert same_changes(replayed[:2], written[1:]) and replayed[2].sequence == 4
    with pytest.raises(SearchIndexError, match="already exists"):
        ChangeJournal.create(new, compacted_header)
    with pytest.raises(SearchIndexError, match="must run on from 1, got 3"):
        ChangeJournal.create(tmp_path / "gap.journal", compacted_header, carried=written[2:])
    assert not (tmp_path / "gap.journal").exists()


def test_reading_leaves_a_torn_tail_in_place(tmp_path: Path) -> None:
    path = tmp_path / "changes.journal"
    written, _ = write_three(path)
    shutil.copy(path, tmp_path / "copy")
    with path.open("ab") as file:
        file.write(b"\x05\x00")
    assert same_changes(batches_of(path), written)
    assert path.stat().st_size == (tmp_path / "copy").stat().st_size + 2


def test_an_empty_batch_is_refused(tmp_path: Path) -> None:
    journal, _ = ChangeJournal.open(tmp_path / "changes.journal", HEADER)
    with pytest.raises(InvalidPostError, match="at least one change"):
        journal.append([])
    journal.close()


def test_a_second_server_on_a_shared_journal_reads_it_and_refuses_to_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two replicas on one repository: the first to open a version's journal writes it, the other only replays it.

    (flock locks belong to an open file, so a second opening in this process stands for another server.)
    """
    path = tmp_path / "changes.journal"
    writer, _ = ChangeJournal.open(path, HEADER)
    first = writer.append([upsert("a", 1)])
    with caplog.at_level(logging.WARNING, logger="postsim"):
        reader, replayed = ChangeJournal.open(path, HEADER)
    assert same_changes(replayed, [first]) and writer.writes and not reader.writes
    assert "written by another server" in caplog.text
    with pytest.raises(JournalWrittenElsewhereError, match="another server writes the changes"):
        reader.append([Delete("a")])
    assert writer.append([Delete("a")]).sequence == 2
    reader.close()
    writer.close()
    successor, replayed = ChangeJournal.open(path, HEADER)  # the writer gone, the next server to open it writes
    assert successor.writes and [batch.sequence for batch in replayed] == [1, 2]
    successor.close()


def test_a_reader_leaves_the_record_the_writer_is_writing(tmp_path: Path) -> None:
    """What looks torn to a reader may be a record the writer has not finished: only the writer cuts a torn tail."""
    path = tmp_path / "changes.journal"
    written, last_start = write_three(path)
    whole = path.read_bytes()
    path.write_bytes(whole[: last_start + 10])  # the writer is in the middle of its third record
    writer, _ = ChangeJournal.open(path, HEADER)  # (cuts it: as the writer, a torn tail is its own crash's)
    writer.close()
    path.write_bytes(whole[: last_start + 10])
    holder = os.open(path, os.O_WRONLY | os.O_APPEND)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another server holds the writer's lock
    try:
        reader, replayed = ChangeJournal.open(path, HEADER)
        assert same_changes(replayed, written[:2]) and not reader.writes
        assert path.stat().st_size == last_start + 10, "a reader cut the writer's record"
        reader.close()
    finally:
        os.close(holder)
