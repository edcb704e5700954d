"""Posts in Milvus: versioned collections behind an alias, searched with metadata filters.

The Milvus retrieval backend keeps what a FAISS index folder keeps (a vector and a caption
per post id) plus each post's metadata (author, creation time, label, tags: the live index's
:class:`~postsim.model_repository.live_index.metadata.PostMetadata`), in a Milvus collection, so
that every postsim replica searches and updates the same posts. Searches take the live index's
:class:`~postsim.model_repository.live_index.filters.PostFilter`, as :func:`filter_expression`
writes it for Milvus.

Names. Each index version is a collection ``<prefix>_<fingerprint>_v<N>``; the version that
serves is the one the alias ``<prefix>_<fingerprint>`` points to. The fingerprint is the
encoders' weights fingerprint (``weights.json``), and a store is opened for one fingerprint
only, so it can neither see nor search a collection embedded by other encoders; each
collection's manifest (a collection property) records the fingerprint again and is checked.

Versions. :meth:`MilvusStore.create_version` writes a new collection that serves nothing yet;
:meth:`MilvusStore.publish` switches the alias to it, one atomic step for every reader (the
``postsim index publish`` of this backend); :meth:`MilvusStore.rollback` switches it back
to the previous version and retires the newest (renamed, kept). Changes (upsert, delete)
apply to the version that serves.

Consistency. Reads (search, query by id) ask for Milvus's ``Strong`` level: a read sees
every write acknowledged before it started, whichever client wrote it. That is what makes a
delete effective when :meth:`MilvusStore.delete` returns, for every postsim replica and not
only the one that deleted (``Session`` guarantees a client its own writes only; ``Bounded``,
Milvus's default, may serve a deleted post for a while). The price is latency: a query node
waits until it has consumed the writes up to the read's timestamp
(https://milvus.io/docs/consistency.md).

Milvus Lite (``pip install 'postsim[milvus]'``, a local ``.db`` path as the URI) runs the
same calls in-process, which is what the tests use. What it lacks compared with a cluster
(milvus-lite 3.2): no GPU index (it takes ``GPU_CAGRA`` and ``GPU_IVF_PQ`` at collection
creation but has no implementation of them, so the GPU types are untested here), no product
quantisation, one process per database file, no authentication or TLS, no distributed
consistency (reads see every acknowledged write at once, so what ``Strong`` costs cannot be
seen there), no true index progress (``describe_index`` says finished while the index is
still built in the background), and its own IVF list count (an ``IVF_FLAT`` of ``nlist`` 32 over
2,000 posts is clustered into 128 lists, so ``nprobe`` = ``nlist`` does not probe them all). Aliases, HNSW, IVF_FLAT, nullable fields, arrays and the filter expressions
postsim uses work as on a cluster.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import TracebackType
from typing import Any

import numpy as np

from postsim.core.errors import InvalidPostError, OptionalDependencyError, SearchIndexError
from postsim.model_repository.contract import MODALITIES, post_id_problem
from postsim.model_repository.live_index.filters import PostFilter
from postsim.model_repository.live_index.metadata import MAX_TAGS, PostMetadata
from postsim.model_repository.score_parts import STORED_DTYPE, PostParts
from postsim.model_repository.search_index import SearchHit, check_queries

__all__ = [
    "READ_CONSISTENCY",
    "DeleteReport",
    "MilvusIndexSpec",
    "MilvusIndexType",
    "MilvusSettings",
    "MilvusStore",
    "StoredPost",
    "VersionManifest",
    "filter_expression",
    "milvus_string",
]

logger = logging.getLogger("postsim")

READ_CONSISTENCY = "Strong"
"""Milvus consistency level of every read: see the module docstring for why."""
MANIFEST_PROPERTY = "postsim.manifest"
"""The collection property that holds a version's :class:`VersionManifest` (JSON)."""
UTF8_MAX_BYTES = 4
"""Most bytes one character takes in UTF-8."""
MAX_TEXT_BYTES = 256
"""Longest author or label the schema holds, in UTF-8 bytes (Milvus's VARCHAR ``max_length`` counts bytes).

The shared metadata check (``check_name``) bounds characters, not bytes: an author or label
of up to ``MAX_NAME_CHARS`` = 256 characters may take up to 256 x 4 = 1,024 bytes, beyond
this limit, so :meth:`MilvusStore._rows` checks the bytes too (collections already built
keep this schema, which is why the limit is not raised instead)."""
MAX_TAG_BYTES = 128
"""Longest tag the schema holds, in UTF-8 bytes: ``MAX_TAG_CHARS`` = 100 characters may take up to
400, so the store checks this limit too, as for authors and labels."""
MAX_CAPTION_BYTES = 1024
"""Longest caption the schema holds, in UTF-8 bytes. ``post_caption`` keeps at most 200 characters
(800 bytes at most), but the store is given captions by its callers and checks them itself."""
MAX_ID_BYTES = 128
MAX_TOP_K = 16_384
"""Milvus's largest ``limit``."""
INDEX_WAIT_S = 3600.0
"""How long :meth:`MilvusStore.create_version` waits for Milvus to finish building the index."""
SERVING_CACHE_S = 1.0
"""How long a store trusts which version the alias points to before asking again."""

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FINGERPRINT = re.compile(r"[0-9a-f]{8,64}")
_FIELDS = ("id", "vector", "author", "created_at", "label", "tags", "caption", "parts")


def _pymilvus() -> Any:
    try:
        import pymilvus
    except ImportError:
        raise OptionalDependencyError("pymilvus", "milvus", "the Milvus retrieval backend") from None
    return pymilvus


def require_pymilvus() -> None:
    """Raise OptionalDependencyError, with the install hint, unless pymilvus is installed."""
    _pymilvus()


class MilvusIndexType(str, enum.Enum):
    """Milvus index types postsim builds: exact, CPU approximate, and GPU approximate."""

    FLAT = "FLAT"
    """Exact search, for small collections."""
    IVF_FLAT = "IVF_FLAT"
    """Inverted lists of full vectors: exact distances within the lists probed (``nprobe``)."""
    HNSW = "HNSW"
    """Graph search (``ef``)."""
    GPU_CAGRA = "GPU_CAGRA"
    """Graph search on the GPU (``itopk_size``); needs Milvus's GPU build."""
    GPU_IVF_PQ = "GPU_IVF_PQ"
    """Inverted lists of product-quantised vectors on the GPU (``nprobe``); needs Milvus's GPU build."""

    @property
    def on_gpu(self) -> bool:
        return self.value.startswith("GPU_")

    @property
    def tuned_param(self) -> str | None:
        """The search parameter that trades recall for speed, which the build tunes; None for exact search."""
        return _TUNED_PARAM.get(self)

    @property
    def required_params(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The build and the search parameters a spec of this type must give."""
        return _REQUIRED_PARAMS[self]


_TUNED_PARAM = {
    MilvusIndexType.IVF_FLAT: "nprobe",
    MilvusIndexType.HNSW: "ef",
    MilvusIndexType.GPU_CAGRA: "itopk_size",
    MilvusIndexType.GPU_IVF_PQ: "nprobe",
}
_REQUIRED_PARAMS: dict[MilvusIndexType, tuple[tuple[str, ...], tuple[str, ...]]] = {
    MilvusIndexType.FLAT: ((), ()),
    MilvusIndexType.IVF_FLAT: (("nlist",), ("nprobe",)),
    MilvusIndexType.HNSW: (("M", "efConstruction"), ("ef",)),
    MilvusIndexType.GPU_CAGRA: (("intermediate_graph_degree", "graph_degree"), ("itopk_size", "search_width")),
    MilvusIndexType.GPU_IVF_PQ: (("nlist", "m", "nbits"), ("nprobe",)),
}
_AT_LEAST_K = ("ef", "itopk_size")
"""Search parameters Milvus refuses below the number of results asked for."""


@dataclass(frozen=True, kw_only=True)
class MilvusIndexSpec:
    """A Milvus vector index: its type, build parameters and (tuned) search parameters."""

    index_type: MilvusIndexType
    build_params: dict[str, int] = field(default_factory=dict)
    search_params: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        build, search = self.index_type.required_params
        if set(self.build_params) != set(build) or set(self.search_params) != set(search):
            raise SearchIndexError(
                f"a {self.index_type.value} index needs the build parameters {sorted(build)} and the search "
                f"parameters {sorted(search)}, got {sorted(self.build_params)} and {sorted(self.search_params)}"
            )
        for name, value in {**self.build_params, **self.search_params}.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise SearchIndexError(f"index parameter {name} must be a positive integer, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"index_type": self.index_type.value, "build": self.build_params, "search": self.search_params}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MilvusIndexSpec:
        return cls(
            index_type=MilvusIndexType(data["index_type"]),
            build_params=dict(data["build"]),
            search_params=dict(data["search"]),
        )


@dataclass(frozen=True, kw_only=True)
class MilvusSettings:
    """Where the Milvus that holds postsim's collections is, and how postsim names them there."""

    uri: str
    """``http://host:19530`` for a Milvus server or cluster; a local path ending in ``.db`` for Milvus Lite."""
    token: str = field(default="", repr=False)
    """``user:password`` (or an API key) where Milvus requires authentication."""
    db_name: str = ""
    """Milvus database; empty: the default one."""
    collection_prefix: str = "postsim"
    """First part of every collection and alias name, so that several deployments can share one Milvus."""
    timeout_s: float = 30.0
    """Deadline of each Milvus call."""
    insert_batch: int = 2_000
    """Posts per insert request (256 floats a post: about 2 MB a request, far below Milvus's 64 MB limit)."""

    def __post_init__(self) -> None:
        if not self.uri:
            raise SearchIndexError("MilvusSettings.uri is empty: give http://HOST:19530 or a local .db path")
        if not _NAME.fullmatch(self.collection_prefix) or len(self.collection_prefix) > 64:
            raise SearchIndexError(
                f"collection_prefix {self.collection_prefix!r} must be 1 to 64 letters, digits or underscores, "
                "not starting with a digit (Milvus's rule for collection names)"
            )
        if self.timeout_s <= 0 or self.insert_batch <= 0:
            raise SearchIndexError("MilvusSettings.timeout_s and insert_batch must be positive")


def milvus_string(value: str) -> str:
    """``value`` as a Milvus expression string literal: double-quoted, backslashes and quotes escaped.

    Only what the metadata rules let through reaches here (no control characters), so these
    two escapes are all a value needs to stay one literal, whatever quotes or operators it
    holds.
    """
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _string_list(values: Iterable[str]) -> str:
    return "[" + ", ".join(milvus_string(value) for value in sorted(values)) + "]"


def filter_expression(post_filter: PostFilter, *, also_exclude: Iterable[str] = ()) -> str:
    """``post_filter`` as a Milvus boolean expression; ``""`` when it keeps every post.

    The semantics are the live index's (``postsim.model_repository.live_index.filters``): a
    post without an author is never excluded by ``exclude_author``; a post without a creation
    time or a label never passes a window or a label set. ``also_exclude`` adds ids to leave
    out (the query's own post in :meth:`MilvusStore.search_by_id`).
    """
    excluded = post_filter.exclude_ids | frozenset(also_exclude)
    terms = []
    if excluded:
        terms.append(f"id not in {_string_list(excluded)}")
    if post_filter.exclude_author is not None:
        terms.append(f"(author is null or author != {milvus_string(post_filter.exclude_author)})")
    if post_filter.created_after is not None:
        terms.append(f"created_at >= {post_filter.created_after}")
    if post_filter.created_before is not None:
        terms.append(f"created_at < {post_filter.created_before}")
    if post_filter.labels is not None:
        terms.append(f"label in {_string_list(post_filter.labels)}")
    if post_filter.tags is not None:
        terms.append(f"array_contains_any(tags, {_string_list(post_filter.tags)})")
    return " and ".join(terms)


@dataclass(frozen=True)
class StoredPost:
    """A post as the store holds it: its unit vector, metadata and caption."""

    id: str
    vector: np.ndarray
    metadata: PostMetadata
    caption: str = ""
    """The post's text as an index keeps it (``post_caption``)."""
    parts: PostParts | None = None
    """Its unit image and text vectors and modality weights, which split its scores; None: unknown (or not read)."""


@dataclass(frozen=True)
class DeleteReport:
    deleted: tuple[str, ...]
    unknown: tuple[str, ...]
    """Ids asked for that the serving version does not hold."""


@dataclass(frozen=True, kw_only=True)
class VersionManifest:
    """What a collection version holds, kept as its ``postsim.manifest`` property."""

    version: int
    dimension: int
    count: int
    """Posts written when the version was built (upserts and deletes since then not counted)."""
    weights_fingerprint: str
    spec: MilvusIndexSpec
    recall: float | None = None
    """Recall@10 of the search parameters on the corpus, when they were tuned."""
    created_at: str
    postsim_version: str

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["spec"] = self.spec.to_dict()
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VersionManifest:
        data = json.loads(text)
        return cls(**{**data, "spec": MilvusIndexSpec.from_dict(data["spec"])})


def _postsim_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("postsim")
    except metadata.PackageNotFoundError:
        return "unknown"


class MilvusStore:
    """One Milvus connection, and the collection versions of one set of encoders.

    Use it as a context manager (or call :meth:`close`). Thread-safe as far as pymilvus's
    client is; every read uses :data:`READ_CONSISTENCY`.
    """

    def __init__(self, settings: MilvusSettings, *, weights_fingerprint: str, dimension: int) -> None:
        if not _FINGERPRINT.fullmatch(weights_fingerprint):
            raise SearchIndexError(
                f"weights fingerprint {weights_fingerprint!r} is not the hex digest weights.json holds"
            )
        if dimension <= 0:
            raise SearchIndexError(f"dimension must be positive, got {dimension}")
        self.settings = settings
        self.fingerprint = weights_fingerprint
        self.dimension = dimension
        self._milvus = _pymilvus()
        self._client = self._connect()
        self._serving: tuple[float, int | None, VersionManifest | None] = (-float("inf"), None, None)
        self._lock = threading.Lock()

    def _connect(self) -> Any:
        with self._errors(f"connecting to Milvus at {self.settings.uri}"):
            try:
                return self._milvus.MilvusClient(
                    uri=self.settings.uri,
                    token=self.settings.token,
                    db_name=self.settings.db_name,
                    timeout=self.settings.timeout_s,
                )
            except self._milvus.exceptions.ConnectionConfigException as error:
                if "milvus-lite" in str(error) or "milvus_lite" in str(error):
                    raise OptionalDependencyError("milvus-lite", "milvus", "a local Milvus Lite database") from None
                raise

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> MilvusStore:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """pymilvus's errors as SearchIndexError, with what postsim was doing and where."""
        try:
            yield
        except self._milvus.exceptions.MilvusException as error:
            message = getattr(error, "message", None) or str(error)
            raise SearchIndexError(f"Milvus at {self.settings.uri}: {doing} failed: {message}") from None

    # ------------------------------------------------------------------ names and versions

    @property
    def alias(self) -> str:
        """The alias of the serving version of these encoders' posts."""
        return f"{self.settings.collection_prefix}_{self.fingerprint}"

    def collection_name(self, version: int) -> str:
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise SearchIndexError(f"a version is a positive integer, got {version!r}")
        return f"{self.alias}_v{version}"

    def versions(self) -> list[int]:
        """The versions of these encoders' collections, oldest first (retired ones left out)."""
        pattern = re.compile(re.escape(self.alias) + r"_v([1-9][0-9]*)")
        with self._errors("listing collections"):
            names = self._client.list_collections()
        return sorted(int(match.group(1)) for name in names if (match := pattern.fullmatch(name)))

    def serving_version(self) -> int | None:
        """The version the alias points to; None before the first publish."""
        with self._errors(f"looking up alias {self.alias}"):
            if self.alias not in self._client.list_aliases().get("aliases", []):
                return None
            collection = self._client.describe_alias(self.alias)["collection_name"]
        match = re.fullmatch(re.escape(self.alias) + r"_v([1-9][0-9]*)", collection)
        if match is None:
            raise SearchIndexError(
                f"alias {self.alias} points to {collection}, which is not a postsim version of these encoders"
            )
        return int(match.group(1))

    def manifest(self, version: int) -> VersionManifest:
        name = self.collection_name(version)
        with self._errors(f"reading the manifest of {name}"):
            properties = self._client.describe_collection(name).get("properties") or {}
        if MANIFEST_PROPERTY not in properties:
            raise SearchIndexError(f"collection {name} has no {MANIFEST_PROPERTY} property: postsim did not build it")
        manifest = VersionManifest.from_json(properties[MANIFEST_PROPERTY])
        if manifest.weights_fingerprint != self.fingerprint or manifest.dimension != self.dimension:
            raise SearchIndexError(
                f"collection {name} holds posts of encoders {manifest.weights_fingerprint} (dimension "
                f"{manifest.dimension}), not {self.fingerprint} ({self.dimension}): it is not searched"
            )
        return manifest

    def _serving_manifest(self) -> tuple[int, VersionManifest]:
        with self._lock:
            checked_at, version, manifest = self._serving
            if time.monotonic() - checked_at > SERVING_CACHE_S or manifest is None:
                version = self.serving_version()
                manifest = self.manifest(version) if version is not None else None
                self._serving = (time.monotonic(), version, manifest)
        if version is None or manifest is None:
            raise SearchIndexError(
                f"no index version is published in Milvus for encoders {self.fingerprint} (alias {self.alias}): "
                "build one and publish it"
            )
        return version, manifest

    def serving(self) -> tuple[int, VersionManifest]:
        """The serving version and its manifest (cached for ``SERVING_CACHE_S``); SearchIndexError before a publish."""
        return self._serving_manifest()

    def serving_spec(self) -> MilvusIndexSpec:
        """The index (and its tuned search parameters) of the serving version."""
        return self._serving_manifest()[1].spec

    # ------------------------------------------------------------------ building and publishing

    def create_version(
        self,
        ids: Sequence[str],
        vectors: np.ndarray,
        metadata: Sequence[PostMetadata],
        spec: MilvusIndexSpec,
        *,
        captions: Sequence[str] | None = None,
        parts: Sequence[PostParts | None] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Write the posts into a new collection version, indexed as ``spec`` says; nothing serves it yet.

        Returns the version. The collection is complete (indexed and loaded) when this returns;
        an error on the way drops it, so a half-written version never exists.
        ``captions`` gives each post's caption (none given: every caption empty), ``parts`` its
        score parts (none given, or None for a post: unknown, its CONTRIBUTIONS NaN);
        ``progress(done, total)`` is called after each batch of posts written.
        """
        rows = self._rows(ids, vectors, metadata, captions, parts)
        version = max(self.versions(), default=0) + 1
        name = self.collection_name(version)
        manifest = VersionManifest(
            version=version,
            dimension=self.dimension,
            count=len(rows),
            weights_fingerprint=self.fingerprint,
            spec=spec,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            postsim_version=_postsim_version(),
        )
        with self._errors(f"creating collection {name}"):
            self._client.create_collection(
                name,
                schema=self._schema(),
                consistency_level=READ_CONSISTENCY,
                properties={MANIFEST_PROPERTY: manifest.to_json()},
            )
        try:
            batch = self.settings.insert_batch
            for start in range(0, len(rows), batch):
                with self._errors(f"writing posts into {name}"):
                    self._client.insert(name, rows[start : start + batch])
                if progress is not None:
                    progress(min(start + batch, len(rows)), len(rows))
            self._index_and_load(name, spec)
        except BaseException:
            with self._errors(f"dropping the incomplete collection {name}"):
                self._client.drop_collection(name)
            raise
        logger.info("wrote %d posts into %s (%s)", len(rows), name, spec.index_type.value)
        return version

    def _index_and_load(self, name: str, spec: MilvusIndexSpec) -> None:
        """Seal what was written, index all of it, wait until Milvus has, and load the collection.

        The index is created after the posts are in, not with the collection: Milvus Lite
        reports an index finished while it still builds it in the background, and builds it
        synchronously only when a collection with an index is loaded; a cluster reports its
        progress (``pending_index_rows``), which is waited for.
        """
        with self._errors(f"indexing {name}"):
            self._client.flush(name)
            self._client.create_index(name, self._index_params(spec))
            deadline = time.monotonic() + INDEX_WAIT_S
            while (pending := self._client.describe_index(name, "vector").get("pending_index_rows", 0)) > 0:
                if time.monotonic() > deadline:
                    raise SearchIndexError(
                        f"Milvus has not indexed {pending} posts of {name} after {INDEX_WAIT_S:.0f} s"
                    )
                time.sleep(1.0)
            self._client.load_collection(name)

    def set_search_params(self, version: int, spec: MilvusIndexSpec, *, recall: float | None) -> None:
        """Record the (tuned) search parameters of a version in its manifest."""
        manifest = self.manifest(version)
        if spec.index_type is not manifest.spec.index_type or spec.build_params != manifest.spec.build_params:
            raise SearchIndexError(
                f"version {version} is a {manifest.spec.index_type.value} index built with other parameters"
            )
        updated = dataclasses.replace(manifest, spec=spec, recall=recall)
        with self._errors(f"recording the search parameters of version {version}"):
            self._client.alter_collection_properties(
                self.collection_name(version), properties={MANIFEST_PROPERTY: updated.to_json()}
            )
        self._forget_serving()

    def publish(self, version: int) -> None:
        """Serve ``version``: the alias moves to it in one step, for every reader."""
        self.manifest(version)  # these encoders' posts, built by postsim
        name = self.collection_name(version)
        with self._errors(f"pointing alias {self.alias} at {name}"):
            if self.serving_version() is None:
                self._client.create_alias(name, self.alias)
            else:
                self._client.alter_alias(name, self.alias)
        self._forget_serving()
        logger.info("Milvus alias %s now serves %s", self.alias, name)

    def rollback(self) -> int:
        """Serve the version before the serving one again and retire the serving one; returns the version now serving.

        The retired collection is renamed (``..._retired_v<N>_<time>``), not dropped, and
        leaves the versions: a next build takes its number again, as with FAISS index folders.
        """
        current = self.serving_version()
        if current is None:
            raise SearchIndexError(f"nothing to roll back: no version is published for encoders {self.fingerprint}")
        older = [version for version in self.versions() if version < current]
        if not older:
            raise SearchIndexError(f"nothing to roll back to: version {current} is the oldest of {self.alias}")
        self.publish(older[-1])
        retired = f"{self.alias}_retired_v{current}_{datetime.now(timezone.utc):%Y%m%dT%H%M%S}"
        with self._errors(f"retiring {self.collection_name(current)}"):
            self._client.rename_collection(self.collection_name(current), retired)
        logger.info("retired %s as %s", self.collection_name(current), retired)
        return older[-1]

    def _forget_serving(self) -> None:
        with self._lock:
            self._serving = (-float("inf"), None, None)

    # ------------------------------------------------------------------ changes

    def upsert(
        self,
        ids: Sequence[str],
        vectors: np.ndarray,
        metadata: Sequence[PostMetadata],
        captions: Sequence[str] | None = None,
        parts: Sequence[PostParts | None] | None = None,
    ) -> int:
        """Add posts to the serving version, replacing those with the same ids; returns how many.

        ``captions`` and ``parts`` as in :meth:`create_version`. Visible to every read that
        starts after this returns.
        """
        rows = self._rows(ids, vectors, metadata, captions, parts)
        version, _ = self._serving_manifest()
        with self._errors(f"upserting {len(rows)} posts into version {version}"):
            for start in range(0, len(rows), self.settings.insert_batch):
                self._client.upsert(self.alias, rows[start : start + self.settings.insert_batch])
        return len(rows)

    def delete(self, ids: Sequence[str]) -> DeleteReport:
        """Delete posts from the serving version; effective for every read that starts after this returns.

        Ids the version does not hold are reported in ``unknown``, not silently accepted.
        """
        wanted = self._checked_ids(ids)
        version, _ = self._serving_manifest()
        found = set(self.get(wanted, with_vectors=False))
        deleted = [post_id for post_id in wanted if post_id in found]
        if deleted:
            with self._errors(f"deleting {len(deleted)} posts from version {version}"):
                self._client.delete(self.alias, ids=deleted)
        return DeleteReport(
            deleted=tuple(deleted), unknown=tuple(post_id for post_id in wanted if post_id not in found)
        )

    # ------------------------------------------------------------------ reads

    def get(self, ids: Sequence[str], *, with_vectors: bool = True, with_parts: bool = False) -> dict[str, StoredPost]:
        """The posts of the serving version with these ids; ids it does not hold are absent.

        Their vectors unless ``with_vectors`` is false (then empty), their score parts only
        when ``with_parts`` (else None).
        """
        wanted = self._checked_ids(ids)
        version, _ = self._serving_manifest()
        left_out = {"vector"} if not with_vectors else set()
        left_out |= {"parts"} if not with_parts else set()
        fields = [name for name in _FIELDS if name not in left_out]
        with self._errors(f"reading posts of version {version}"):
            rows = self._client.get(self.alias, ids=wanted, output_fields=fields, consistency_level=READ_CONSISTENCY)
        empty = np.zeros(0, dtype=np.float32)
        return {
            row["id"]: StoredPost(
                row["id"],
                np.asarray(row["vector"], dtype=np.float32) if with_vectors else empty,
                PostMetadata(
                    author=row.get("author"),
                    created_at=row.get("created_at"),
                    label=row.get("label"),
                    tags=tuple(row.get("tags") or ()),
                ),
                row.get("caption") or "",
                self._parts_of(row.get("parts") or "", row["id"]) if with_parts else None,
            )
            for row in rows
        }

    def count(self, post_filter: PostFilter | None = None) -> int:
        """How many posts of the serving version pass ``post_filter`` (every post when None)."""
        version, _ = self._serving_manifest()
        with self._errors(f"counting posts of version {version}"):
            rows = self._client.query(
                self.alias,
                filter=filter_expression(post_filter or PostFilter()),
                output_fields=["count(*)"],
                consistency_level=READ_CONSISTENCY,
            )
        return int(rows[0]["count(*)"])

    def passing(self, post_filter: PostFilter, limit: int) -> list[StoredPost]:
        """Up to ``limit`` posts of the serving version that pass ``post_filter``, with their vectors (no order)."""
        version, _ = self._serving_manifest()
        with self._errors(f"reading the posts of version {version} that pass a filter"):
            rows = self._client.query(
                self.alias,
                filter=filter_expression(post_filter) or 'id != ""',
                output_fields=["id", "vector", "caption"],
                limit=limit,
                consistency_level=READ_CONSISTENCY,
            )
        return [
            StoredPost(row["id"], np.asarray(row["vector"], dtype=np.float32), PostMetadata(), row.get("caption") or "")
            for row in rows
        ]

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        post_filter: PostFilter | None = None,
        version: int | None = None,
        search_params: Mapping[str, int] | None = None,
    ) -> list[list[SearchHit]]:
        """The ``k`` posts most similar to each query that pass ``post_filter``, best first.

        Filtering happens inside Milvus's search, so ``k`` come back whenever ``k`` posts pass.
        ``version`` searches a version that may not serve yet (the build's tuning), with
        ``search_params`` instead of its manifest's.
        """
        return self._search(queries, k, post_filter or PostFilter(), (), version, search_params)

    def search_by_id(self, post_id: str, k: int, *, post_filter: PostFilter | None = None) -> list[SearchHit]:
        """The ``k`` posts most similar to the stored post ``post_id``, itself left out."""
        stored = self.get([post_id]).get(post_id)
        if stored is None:
            raise InvalidPostError(f"QUERY_ID {post_id!r} is not an indexed post")
        (found,) = self._search(stored.vector[None, :], k, post_filter or PostFilter(), (post_id,), None, None)
        return found

    def _search(
        self,
        queries: np.ndarray,
        k: int,
        post_filter: PostFilter,
        also_exclude: tuple[str, ...],
        version: int | None,
        search_params: Mapping[str, int] | None,
    ) -> list[list[SearchHit]]:
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 0 < k <= MAX_TOP_K:
            raise SearchIndexError(f"k must be an integer from 1 to {MAX_TOP_K}, got {k!r}")
        normalised = check_queries(queries, self.dimension)
        if normalised.shape[0] == 0:
            return []
        if version is None:
            version, manifest = self._serving_manifest()
            target = self.alias
        else:
            manifest, target = self.manifest(version), self.collection_name(version)
        params = {**manifest.spec.search_params, **(search_params or {})}
        params.update({name: max(params[name], int(k)) for name in _AT_LEAST_K if name in params})
        with self._errors(f"searching version {version}"):
            hits = self._client.search(
                target,
                data=normalised.tolist(),
                limit=int(k),
                filter=filter_expression(post_filter, also_exclude=also_exclude),
                output_fields=["caption"],
                search_params={"metric_type": "IP", "params": params},
                consistency_level=READ_CONSISTENCY,
            )
        return [
            [SearchHit(hit["id"], float(hit["distance"]), hit["entity"].get("caption") or "") for hit in row]
            for row in hits
        ]

    # ------------------------------------------------------------------ schema and rows

    def _schema(self) -> Any:
        data_type = self._milvus.DataType
        schema = self._milvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", data_type.VARCHAR, is_primary=True, max_length=MAX_ID_BYTES)
        schema.add_field("vector", data_type.FLOAT_VECTOR, dim=self.dimension)
        schema.add_field("author", data_type.VARCHAR, max_length=MAX_TEXT_BYTES, nullable=True)
        schema.add_field("created_at", data_type.INT64, nullable=True)
        schema.add_field("label", data_type.VARCHAR, max_length=MAX_TEXT_BYTES, nullable=True)
        schema.add_field(
            "tags", data_type.ARRAY, element_type=data_type.VARCHAR, max_capacity=MAX_TAGS, max_length=MAX_TAG_BYTES
        )
        schema.add_field("caption", data_type.VARCHAR, max_length=MAX_CAPTION_BYTES)
        schema.add_field("parts", data_type.VARCHAR, max_length=max(1, len(self._encoded_parts(None, zeros=True))))
        return schema

    @property
    def _parts_length(self) -> int:
        """Numbers in one post's score parts: its image and text vectors and its modality weights."""
        return 2 * self.dimension + len(MODALITIES)

    def _encoded_parts(self, parts: PostParts | None, *, zeros: bool = False) -> str:
        """``parts`` as the ``parts`` field holds them: base64 of the fp16 image, text and weights, end to end
        (as ``unimodal.npz`` keeps them: ``4 · dim + 4`` bytes); empty for unknown parts."""
        if parts is None and not zeros:
            return ""
        flat = (
            np.zeros(self._parts_length, dtype=STORED_DTYPE)
            if parts is None
            else np.concatenate([parts.image, parts.text, parts.weights]).astype(STORED_DTYPE)
        )
        return base64.b64encode(flat.tobytes()).decode("ascii")

    def _parts_of(self, encoded: str, post_id: str) -> PostParts | None:
        if not encoded:
            return None
        try:
            flat = np.frombuffer(base64.b64decode(encoded, validate=True), dtype=STORED_DTYPE).astype(np.float32)
        except (binascii.Error, ValueError):
            flat = np.zeros(0, dtype=np.float32)
        if flat.shape != (self._parts_length,):
            raise SearchIndexError(
                f"post {post_id!r}: its stored score parts are not {self._parts_length} fp16 numbers"
            )
        dimension = self.dimension
        return PostParts(image=flat[:dimension], text=flat[dimension : 2 * dimension], weights=flat[2 * dimension :])

    def _index_params(self, spec: MilvusIndexSpec) -> Any:
        params = self._client.prepare_index_params()
        params.add_index(
            field_name="vector",
            index_name="vector",
            index_type=spec.index_type.value,
            metric_type="IP",
            params=dict(spec.build_params),
        )
        return params

    def _checked_ids(self, ids: Sequence[str]) -> list[str]:
        if isinstance(ids, str):
            raise InvalidPostError("ids must be a sequence of post ids, not one string")
        for position, post_id in enumerate(ids):
            problem = post_id_problem(post_id) if isinstance(post_id, str) else f"not a string: {post_id!r}"
            if problem:
                raise InvalidPostError(f"ids[{position}]: {problem}")
        if len(set(ids)) != len(ids):
            raise InvalidPostError("ids must be unique within one call")
        return list(ids)

    def _rows(
        self,
        ids: Sequence[str],
        vectors: np.ndarray,
        metadata: Sequence[PostMetadata],
        captions: Sequence[str] | None,
        parts: Sequence[PostParts | None] | None = None,
    ) -> list[dict[str, Any]]:
        checked = self._checked_ids(ids)
        if not checked:
            raise InvalidPostError("no post given")
        if not isinstance(vectors, np.ndarray) or vectors.shape != (len(checked), self.dimension):
            got = vectors.shape if isinstance(vectors, np.ndarray) else type(vectors).__name__
            raise InvalidPostError(f"vectors must be [{len(checked)}, {self.dimension}] (one per id), got {got}")
        if len(metadata) != len(checked) or not all(isinstance(m, PostMetadata) for m in metadata):
            raise InvalidPostError(
                f"metadata must be one PostMetadata per id: got {len(metadata)} for {len(checked)} ids"
            )
        if captions is None:
            captions = [""] * len(checked)
        elif isinstance(captions, str) or len(captions) != len(checked):
            raise InvalidPostError(f"captions must be one string per id: got {len(captions)} for {len(checked)} ids")
        if parts is None:
            parts = [None] * len(checked)
        elif len(parts) != len(checked):
            raise InvalidPostError(f"parts must be one PostParts (or None) per id: got {len(parts)} for {len(checked)}")
        checked_parts = [
            None if post_parts is None else post_parts.check(self.dimension, post_id)
            for post_id, post_parts in zip(checked, parts, strict=True)
        ]
        for position, (meta, caption) in enumerate(zip(metadata, captions, strict=True)):
            _check_fits_schema(meta, caption, f"post {position} ({checked[position]!r})")
        try:
            units = check_queries(np.ascontiguousarray(vectors, dtype=np.float32), self.dimension)
        except SearchIndexError as error:
            raise InvalidPostError(f"the vectors to store are not usable: {error}") from None
        return [
            {
                "id": post_id,
                "vector": vector.tolist(),
                "author": meta.author,
                "created_at": meta.created_at,
                "label": meta.label,
                "tags": list(meta.tags),
                "caption": caption,
                "parts": self._encoded_parts(post_parts),
            }
            for post_id, vector, meta, caption, post_parts in zip(
                checked, units, metadata, captions, checked_parts, strict=True
            )
        ]


def _check_fits_schema(metadata: PostMetadata, caption: str, post: str) -> None:
    """Refuse what the shared checks let through but the collection schema cannot hold.

    ``PostMetadata`` has checked every value's characters already; what is left is Milvus's
    VARCHAR ``max_length``, which counts UTF-8 bytes (see :data:`MAX_TEXT_BYTES`), and the
    caption, which only the store is given.
    """
    values = [("author", metadata.author, MAX_TEXT_BYTES), ("label", metadata.label, MAX_TEXT_BYTES)]
    values += [(f"tags[{n}]", tag, MAX_TAG_BYTES) for n, tag in enumerate(metadata.tags)]
    if not isinstance(caption, str):
        raise InvalidPostError(f"{post}: caption must be a string, got {type(caption).__name__}")
    values.append(("caption", caption, MAX_CAPTION_BYTES))
    for name, value, max_bytes in values:
        if value is not None and len(value.encode()) > max_bytes:
            raise InvalidPostError(
                f"{post}: {name} takes {len(value.encode()):,} bytes of UTF-8; Milvus holds at most {max_bytes}"
            )
