"""``postsim index compact``: fold the served version's changes into a new, retrained index version.

The live posts of the newest ``retrieval`` version (its index with its journal replayed, read
from a copy of the journal so the server's file is never touched) are built into a new index
directory by the same path as ``postsim index build`` (index type chosen for their number,
trained and tuned on them) while the server keeps taking changes. Then the sealed handoff:
the served version is sealed (it refuses changes, UNAVAILABLE "retry", until the swap), the
journal's tail since the snapshot is read and becomes the start of the new version's journal,
and the new version is published with the zero-failure swap of ``postsim index publish``.
A failed publish unseals the old version, which keeps serving every change. Rollback serves
the older version again with its own journal (changes made after the compaction are not in it).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from postsim.client.api import PostSimClient
from postsim.core.errors import PostSimError, SearchIndexError
from postsim.core.files import write_text_atomic
from postsim.indexing.build import build_index_dir
from postsim.indexing.publish import check_served, install_version, load_and_check, set_aside
from postsim.model_repository import contract
from postsim.model_repository.configs import retrieval_settings
from postsim.model_repository.layout import BASE_SEQUENCE_NAME, JOURNAL_NAME, read_base_sequence, version_dirs
from postsim.model_repository.live_index.journal import ChangeJournal, JournalHeader, read_journal
from postsim.model_repository.live_index.mutable_index import MutableIndex
from postsim.model_repository.live_index.wire import Control
from postsim.model_repository.manifest import WeightsManifest
from postsim.model_repository.search_index import IndexType, load_index_dir, version_index_dir

logger = logging.getLogger("postsim")


@dataclass(frozen=True, kw_only=True)
class CompactReport:
    version: int
    """The new retrieval version."""
    live_posts: int
    folded: int
    """The last change folded into the new index."""
    carried: int
    """Change batches made while it was built, handed over in its journal."""


def compact_index(repository: Path, client: PostSimClient, *, index_type: IndexType = IndexType.AUTO) -> CompactReport:
    """Write the newest retrieval version's live posts as a new version and make the server serve it."""
    check_served(repository, client.served_repository(), client.url)
    if retrieval_settings(repository).backend is contract.RetrievalBackend.MILVUS:
        raise SearchIndexError(
            f"{repository} serves its posts from Milvus, which keeps no change journal to compact (Milvus compacts "
            "its segments itself): `postsim index build` and `postsim index publish` write and serve a new version"
        )
    weights = WeightsManifest.read(repository)
    versions = version_dirs(repository / contract.RETRIEVAL)
    if not versions:
        raise SearchIndexError(f"{repository} has no published index to compact: publish one first")
    current = versions[-1]
    base = load_index_dir(version_index_dir(current), weights.fingerprint, use_gpu=False)
    base_sequence = read_base_sequence(current)
    journal = current / JOURNAL_NAME
    with tempfile.TemporaryDirectory(prefix=".compact-", dir=repository.parent) as scratch:
        snapshot = Path(scratch) / JOURNAL_NAME
        if journal.exists():
            shutil.copy2(journal, snapshot)
        with MutableIndex.open(base, snapshot, metadata=base.metadata, base_sequence=base_sequence) as live:
            before = live.state()
            state = live.compact()
        if not state.ids:
            raise SearchIndexError(f"retrieval version {current.name} has no live posts: nothing to compact into")
        index_dir = Path(scratch) / "index"
        manifest = build_index_dir(
            index_dir,
            state.ids,
            state.vectors,
            weights_fingerprint=state.weights_fingerprint,
            index_type=index_type,
            captions=state.captions,
            metadata=state.metadata,
            unimodal=state.unimodal,
        )
        sealed_at = client.control_changes(Control.SEAL)
        try:
            old_header = JournalHeader(
                weights_fingerprint=before.weights_fingerprint,
                base_version=before.base_version,
                dimension=before.dimension,
                base_sequence=base_sequence,
            )
            written = read_journal(journal, old_header) if journal.exists() else []
            tail = [batch for batch in written if batch.sequence > state.sequence]
            if tail and tail[-1].sequence != sealed_at:
                raise SearchIndexError(
                    f"the journal of retrieval version {current.name} ends at change {tail[-1].sequence}, the server "
                    f"sealed it at {sealed_at}: another process writes to it; compact again"
                )
            new_header = JournalHeader(
                weights_fingerprint=state.weights_fingerprint,
                base_version=manifest.index_sha256,
                dimension=before.dimension,
                base_sequence=state.sequence,
            )

            def hand_over(staging: Path) -> None:
                ChangeJournal.create(staging / JOURNAL_NAME, new_header, carried=tail).close()
                write_text_atomic(staging / BASE_SEQUENCE_NAME, json.dumps({"base_sequence": state.sequence}))

            version_dir = install_version(index_dir, repository, prepare=hand_over)
            try:
                load_and_check(client, int(version_dir.name))
            except PostSimError as error:
                aside = set_aside(version_dir, "refused")
                raise SearchIndexError(
                    f"the server refused compacted retrieval version {version_dir.name} and keeps serving version "
                    f"{current.name} ({error}); the refused version is kept in {aside}, the server log says why"
                ) from None
        except BaseException:
            client.control_changes(Control.UNSEAL)
            raise
    logger.info(
        "compacted retrieval version %s into %s: %d live posts, changes up to %d folded in, %d batches carried",
        current.name,
        version_dir.name,
        len(state.ids),
        state.sequence,
        len(tail),
    )
    return CompactReport(
        version=int(version_dir.name), live_posts=len(state.ids), folded=state.sequence, carried=len(tail)
    )


class AutoCompactor:
    """Compacts the index a server serves whenever its journal passes ``threshold_bytes`` (``postsim serve``).

    A thread looks every ``interval_s``; a compaction that fails is logged and tried again at
    the next look (the served version keeps serving every change meanwhile).
    """

    def __init__(
        self,
        repository: Path,
        url: str,
        *,
        threshold_bytes: int,
        interval_s: float = 30.0,
        admin_key: str | None = None,
    ) -> None:
        if threshold_bytes < 1 or interval_s <= 0:
            raise SearchIndexError(
                f"compaction threshold and interval must be positive, got {threshold_bytes} and {interval_s}"
            )
        self.repository, self.url, self.admin_key = repository, url, admin_key
        self.threshold_bytes, self.interval_s = threshold_bytes, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="postsim-auto-compact", daemon=True)

    def journal_bytes(self) -> int:
        """The size of the newest version's journal (0 when there is none)."""
        versions = version_dirs(self.repository / contract.RETRIEVAL)
        journal = versions[-1] / JOURNAL_NAME if versions else None
        return journal.stat().st_size if journal is not None and journal.exists() else 0

    def check_once(self) -> CompactReport | None:
        """Compact now if the journal is past the threshold; the report, or None when it was not."""
        size = self.journal_bytes()
        if size <= self.threshold_bytes:
            return None
        logger.info("the change journal holds %d bytes (threshold %d): compacting", size, self.threshold_bytes)
        with PostSimClient(self.url, admin_key=self.admin_key) as client:
            return compact_index(self.repository, client)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check_once()
            except PostSimError as error:
                logger.warning("automatic compaction failed, retrying in %g s: %s", self.interval_s, error)
