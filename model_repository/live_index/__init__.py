"""Live indexes: a served index version that takes upserts and deletes, filters inside the search,
finds posts like one of its own, and folds near-duplicates.

- :mod:`.protocol`: :class:`LiveIndex`, what every engine offers, and the values it takes and returns;
- :mod:`.mutable_index`: :class:`MutableIndex`, the FAISS implementation over a published version;
- :mod:`.journal`: the append-only, fsynced change journal beside a published version;
- :mod:`.metadata`: post metadata and its columnar store; :mod:`.filters`: query-time filters;
- :mod:`.collapse`: near-duplicate collapse; :mod:`.locking`: the readers-writer lock.
"""

from postsim.model_repository.live_index.filters import PostFilter, parse_filter
from postsim.model_repository.live_index.journal import ChangeBatch, ChangeJournal, Delete, JournalHeader
from postsim.model_repository.live_index.metadata import MetadataColumns, PostMetadata
from postsim.model_repository.live_index.mutable_index import LiveSearchSettings, MutableIndex
from postsim.model_repository.live_index.protocol import (
    ChangeReceipt,
    CompactedState,
    Hit,
    LiveIndex,
    LiveIndexState,
    PostUpsert,
)

__all__ = [
    "ChangeBatch",
    "ChangeJournal",
    "ChangeReceipt",
    "CompactedState",
    "Delete",
    "Hit",
    "JournalHeader",
    "LiveIndex",
    "LiveIndexState",
    "LiveSearchSettings",
    "MetadataColumns",
    "MutableIndex",
    "PostFilter",
    "PostMetadata",
    "PostUpsert",
    "parse_filter",
]
