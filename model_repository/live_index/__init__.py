"""Live indexes: a served index version that takes upserts and deletes, filters inside the search,
finds posts like one of its own, and folds near-duplicates.

- :mod:`.protocol`: ``LiveIndex``, what every engine offers, and the values it takes and returns;
- :mod:`.mutable_index`: ``MutableIndex``, the FAISS implementation over a published version;
- :mod:`.milvus_index`: ``MilvusLiveIndex``, the Milvus implementation over the collection an alias serves;
- :mod:`.journal`: the append-only, fsynced change journal beside a published version;
- :mod:`.metadata`: post metadata and its columnar store; :mod:`.filters`: query-time filters;
- :mod:`.collapse`: near-duplicate collapse; :mod:`.locking`: the readers-writer lock;
- :mod:`.wire`: one call's changes as ``post_changes`` sends them to ``retrieval``.

Import from the modules: this package imports none of them, so that the client and the
corpus reader, which need the metadata and the wire format, do not load FAISS.
"""
