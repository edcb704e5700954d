"""The readers-writer lock: readers share it, a writer runs alone and goes before readers that come after it."""

from __future__ import annotations

import threading

from postsim.model_repository.live_index.locking import ReadWriteLock


def wait_until(condition: threading.Condition, predicate: object) -> None:
    with condition:
        condition.wait_for(predicate)  # type: ignore[arg-type]


def test_a_writer_waits_for_readers_and_readers_after_it_wait_for_the_writer() -> None:
    lock = ReadWriteLock()
    events: list[str] = []
    first_reader_in = threading.Event()
    release_first_reader = threading.Event()

    def first_reader() -> None:
        with lock.read():
            events.append("reader 1 in")
            first_reader_in.set()
            release_first_reader.wait()
            events.append("reader 1 out")

    def writer() -> None:
        with lock.write():
            events.append("writer")

    def second_reader() -> None:
        with lock.read():
            events.append("reader 2")

    threads = [threading.Thread(target=first_reader)]
    threads[0].start()
    first_reader_in.wait()
    threads.append(threading.Thread(target=writer))
    threads[1].start()
    wait_until(lock._condition, lambda: lock._writers_waiting == 1)  # the writer is queued behind reader 1
    threads.append(threading.Thread(target=second_reader))
    threads[2].start()
    release_first_reader.set()
    for thread in threads:
        thread.join()
    assert events == ["reader 1 in", "reader 1 out", "writer", "reader 2"]


def test_readers_share_the_lock() -> None:
    lock = ReadWriteLock()
    both_in = threading.Barrier(2)

    def reader() -> None:
        with lock.read():
            both_in.wait()  # returns only when both readers hold the lock at once

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not both_in.broken
