"""MilvusStore against a real Milvus engine: Milvus Lite, in-process, on a temporary database file.

Each test opens the store for encoders of its own (a fresh weights fingerprint), so the tests
share one database file and still never see each other's collections.
"""

from __future__ import annotations

import builtins
import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from postsim.core.errors import InvalidPostError, OptionalDependencyError, SearchIndexError
from postsim.model_repository.live_index.filters import PostFilter
from postsim.model_repository.live_index.metadata import PostMetadata
from postsim.model_repository.milvus_store import (
    MAX_TEXT_BYTES,
    MilvusIndexSpec,
    MilvusIndexType,
    MilvusSettings,
    MilvusStore,
    filter_expression,
    milvus_string,
)

pytest.importorskip("pymilvus", reason="the milvus extra (pymilvus, milvus-lite) runs these tests")
pytest.importorskip("milvus_lite", reason="the milvus extra (pymilvus, milvus-lite) runs these tests")

DIM = 16
FLAT = MilvusIndexSpec(index_type=MilvusIndexType.FLAT)
HOSTILE = ['o"x', "back\\slash", '" or id != "', "it's", '\\"', "naïve ünïcode"]
"""Metadata values that would break out of a badly quoted filter expression."""


def unit_rows(count: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(count, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("milvus") / "milvus.db"


@pytest.fixture
def open_store(database: Path) -> Iterator[Callable[..., MilvusStore]]:
    opened: list[MilvusStore] = []

    def make(fingerprint: str | None = None, **settings: Any) -> MilvusStore:
        store = MilvusStore(
            MilvusSettings(uri=str(database), **settings),
            weights_fingerprint=fingerprint or secrets.token_hex(8),
            dimension=DIM,
        )
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def corpus(count: int, seed: int = 0) -> tuple[list[str], np.ndarray, list[PostMetadata], list[str]]:
    """Posts p0..p{count-1} with every kind of metadata, some of it missing, some of it hostile, and captions."""
    ids = [f"p{i}" for i in range(count)]
    metadata = [
        PostMetadata(
            author=None if i % 5 == 0 else HOSTILE[i % len(HOSTILE)],
            created_at=None if i % 7 == 0 else 1_700_000_000 + 3600 * i,
            label=None if i % 4 == 0 else f"label{i % 3}",
            tags=tuple(HOSTILE[j] for j in range(i % 3)),
        )
        for i in range(count)
    ]
    return ids, unit_rows(count, seed), metadata, [f"post number {i}" for i in range(count)]


@pytest.fixture
def served(open_store: Callable[..., MilvusStore]) -> tuple[MilvusStore, list[str], np.ndarray, list[PostMetadata]]:
    store = open_store()
    ids, vectors, metadata, captions = corpus(300)
    store.publish(store.create_version(ids, vectors, metadata, FLAT, captions=captions))
    return store, ids, vectors, metadata


def exact(vectors: np.ndarray, query: np.ndarray, keep: list[bool], k: int) -> list[int]:
    scores = vectors @ query
    rows = [row for row in np.argsort(-scores, kind="stable") if keep[row]]
    return rows[:k]


# ---------------------------------------------------------------------------------------
# Names, versions, the alias


def test_collections_are_named_from_the_encoders_and_the_version(open_store: Callable[..., MilvusStore]) -> None:
    store = open_store("0cfa483df1e45a25", collection_prefix="social")
    assert store.alias == "social_0cfa483df1e45a25"
    assert store.collection_name(3) == "social_0cfa483df1e45a25_v3"
    with pytest.raises(SearchIndexError, match="fingerprint"):
        open_store("not-a-fingerprint")
    with pytest.raises(SearchIndexError, match="collection_prefix"):
        MilvusSettings(uri="x.db", collection_prefix="bad-name")


def test_a_version_serves_only_once_published_and_publish_switches_the_alias(
    open_store: Callable[..., MilvusStore],
) -> None:
    store = open_store()
    ids, vectors, metadata, _ = corpus(50)
    first = store.create_version(ids, vectors, metadata, FLAT)
    assert store.versions() == [first] and store.serving_version() is None
    with pytest.raises(SearchIndexError, match="no index version is published"):
        store.search(vectors[:1], 5)
    store.publish(first)
    assert store.search(vectors[:1], 1)[0][0].id == "p0"
    moved = vectors[::-1].copy()  # version 2: the same ids on other vectors
    second = store.create_version(ids, moved, metadata, FLAT)
    assert store.search(vectors[:1], 1)[0][0].id == "p0", "an unpublished version serves nothing"
    store.publish(second)
    assert store.serving_version() == second == first + 1
    assert store.search(vectors[:1], 1)[0][0].id == "p49"


def test_rollback_serves_the_previous_version_and_retires_the_newest(open_store: Callable[..., MilvusStore]) -> None:
    store = open_store()
    ids, vectors, metadata, _ = corpus(30)
    with pytest.raises(SearchIndexError, match="nothing to roll back"):
        store.rollback()
    for _ in range(2):
        store.publish(store.create_version(ids, vectors, metadata, FLAT))
    assert store.rollback() == 1
    assert store.serving_version() == 1 and store.versions() == [1]
    retired = [name for name in store._client.list_collections() if name.startswith(f"{store.alias}_retired_v2_")]
    assert len(retired) == 1, "the retired version is kept, under another name"
    with pytest.raises(SearchIndexError, match="oldest"):
        store.rollback()


def test_other_encoders_never_see_a_collection(open_store: Callable[..., MilvusStore]) -> None:
    store = open_store()
    ids, vectors, metadata, _ = corpus(20)
    store.publish(store.create_version(ids, vectors, metadata, FLAT))
    other = open_store()
    assert other.versions() == [] and other.serving_version() is None
    with pytest.raises(SearchIndexError, match="no index version is published"):
        other.search(vectors[:1], 3)


def test_a_failed_build_leaves_no_version(
    open_store: Callable[..., MilvusStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(insert_batch=10)
    ids, vectors, metadata, _ = corpus(40)
    calls = {"n": 0}
    insert = store._client.insert

    def failing_insert(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return insert(*args, **kwargs)

    monkeypatch.setattr(store._client, "insert", failing_insert)
    with pytest.raises(KeyboardInterrupt):
        store.create_version(ids, vectors, metadata, FLAT)
    assert store.versions() == []


# ---------------------------------------------------------------------------------------
# Search


def test_each_post_finds_itself_first_with_its_caption(served: tuple[Any, ...]) -> None:
    store, ids, vectors, _ = served
    results = store.search(vectors[:20], 5)
    for row, found in enumerate(results):
        assert found[0].id == ids[row] and found[0].score >= 0.99
        assert found[0].caption == f"post number {row}"
        scores = [n.score for n in found]
        assert scores == sorted(scores, reverse=True)


def test_k_beyond_the_collection_returns_every_post_once(served: tuple[Any, ...]) -> None:
    store, ids, vectors, _ = served
    (found,) = store.search(vectors[:1], 1000)
    assert sorted(n.id for n in found) == sorted(ids)


@pytest.mark.parametrize(
    ("name", "post_filter", "keep"),
    [
        ("exclude ids", PostFilter(exclude_ids=frozenset({"p0", "p1"})), lambda i, m: i not in (0, 1)),
        ("exclude author", PostFilter(exclude_author=HOSTILE[2]), lambda i, m: m.author != HOSTILE[2]),
        (
            "window",
            PostFilter(created_after=1_700_000_000 + 3600 * 100, created_before=1_700_000_000 + 3600 * 200),
            lambda i, m: m.created_at is not None and 100 <= i < 200,
        ),
        ("labels", PostFilter(labels=frozenset({"label1"})), lambda i, m: m.label == "label1"),
        ("any tag", PostFilter(tags=frozenset({HOSTILE[1]})), lambda i, m: HOSTILE[1] in m.tags),
        (
            "all at once",
            PostFilter(exclude_author=HOSTILE[0], labels=frozenset({"label2", "label0"}), tags=frozenset(HOSTILE)),
            lambda i, m: m.author != HOSTILE[0] and m.label in ("label2", "label0") and bool(m.tags),
        ),
    ],
)
def test_filters_return_what_exact_search_over_the_passing_posts_returns(
    served: tuple[Any, ...], name: str, post_filter: PostFilter, keep: Callable[[int, PostMetadata], bool]
) -> None:
    store, ids, vectors, metadata = served
    passing = [keep(i, m) for i, m in enumerate(metadata)]
    assert 0 < sum(passing) < len(ids), name
    for query in vectors[200:205]:
        (found,) = store.search(query[None, :], 10, post_filter=post_filter)
        expected = exact(vectors, query, passing, 10)
        assert [n.id for n in found] == [ids[row] for row in expected], name
        assert np.allclose([n.score for n in found], vectors[expected] @ query, atol=1e-5)


def test_a_filter_that_keeps_3_percent_still_returns_k(served: tuple[Any, ...]) -> None:
    store, ids, vectors, _ = served
    kept = frozenset(ids[::33])  # 10 of 300
    post_filter = PostFilter(exclude_ids=frozenset(ids) - kept)
    (found,) = store.search(vectors[5:6], 8, post_filter=post_filter)
    assert len(found) == 8 and {n.id for n in found} <= kept
    (everything,) = store.search(vectors[5:6], 50, post_filter=post_filter)
    assert {n.id for n in everything} == kept


def test_hostile_metadata_values_match_only_themselves(served: tuple[Any, ...]) -> None:
    store, ids, vectors, metadata = served
    for value in HOSTILE:
        (found,) = store.search(vectors[:1], 300, post_filter=PostFilter(tags=frozenset({value})))
        assert {n.id for n in found} == {ids[i] for i, m in enumerate(metadata) if value in m.tags}, value
    assert milvus_string('a"b\\c') == '"a\\"b\\\\c"'


def test_the_expression_is_the_live_filter_in_milvus_syntax() -> None:
    assert filter_expression(PostFilter()) == ""
    assert filter_expression(PostFilter(exclude_ids=frozenset({"b"})), also_exclude=("a",)) == 'id not in ["a", "b"]'
    assert filter_expression(
        PostFilter(exclude_author='o"x', created_after=10, created_before=20, labels=frozenset({"l"}))
    ) == ('(author is null or author != "o\\"x") and created_at >= 10 and created_at < 20 and label in ["l"]')


# ---------------------------------------------------------------------------------------
# Changes


def test_an_upsert_is_visible_when_the_call_returns_and_replaces_by_id(served: tuple[Any, ...]) -> None:
    store, _, vectors, _ = served
    fresh = unit_rows(2, seed=99)
    assert store.upsert(["new-1", "p3"], fresh, [PostMetadata(), PostMetadata(label="moved")], ["new", ""]) == 2
    (found,) = store.search(fresh[:1], 1)
    assert found[0].id == "new-1" and found[0].score >= 0.99 and found[0].caption == "new"
    (old_place,) = store.search(vectors[3:4], 1)
    assert old_place[0].id != "p3", "p3's old vector is gone"
    stored = store.get(["p3"])["p3"]
    assert np.allclose(stored.vector, fresh[1], atol=1e-6) and stored.metadata.label == "moved"


def test_a_delete_is_effective_when_the_call_returns_even_under_concurrent_queries(
    served: tuple[Any, ...], open_store: Callable[..., MilvusStore]
) -> None:
    store, ids, vectors, _ = served
    reader = open_store(store.fingerprint)  # another client, as another replica would be
    deleted_at: dict[str, int] = {}
    seen_after: list[str] = []
    stop = threading.Event()

    def query_loop() -> None:
        searches = 0
        while not stop.is_set() and searches < 2000:
            before = dict(deleted_at)
            (found,) = reader.search(vectors[:1], 20)
            seen_after.extend(n.id for n in found if n.id in before)
            searches += 1

    thread = threading.Thread(target=query_loop)
    thread.start()
    try:
        for post_id in ids[:10]:
            report = store.delete([post_id])
            assert report.deleted == (post_id,) and report.unknown == ()
            deleted_at[post_id] = 1
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not seen_after, f"deleted posts returned after their delete returned: {sorted(set(seen_after))}"
    (found,) = reader.search(vectors[:1], 300)
    assert not {n.id for n in found} & set(ids[:10])


def test_a_delete_of_an_unknown_id_is_reported(served: tuple[Any, ...]) -> None:
    store, *_ = served
    report = store.delete(["p7", "never-indexed"])
    assert report.deleted == ("p7",) and report.unknown == ("never-indexed",)


def test_bad_changes_are_refused_before_anything_is_written(served: tuple[Any, ...]) -> None:
    store, _, vectors, _ = served
    with pytest.raises(InvalidPostError, match=r"ids\[1\]"):
        store.upsert(["ok", "not ok"], vectors[:2], [PostMetadata(), PostMetadata()])
    with pytest.raises(InvalidPostError, match="vectors"):
        store.upsert(["a"], np.zeros((1, DIM), dtype=np.float32), [PostMetadata()])
    wide = "ü" * (MAX_TEXT_BYTES // 2 + 1)  # within the shared 256 characters, beyond the schema's 256 bytes
    with pytest.raises(InvalidPostError, match=r"post 1 \('b'\): author takes 258 bytes"):
        store.upsert(["a", "b"], vectors[:2], [PostMetadata(), PostMetadata(author=wide)])
    with pytest.raises(InvalidPostError, match="caption takes 1,025 bytes"):
        store.upsert(["a"], vectors[:1], [PostMetadata()], ["x" * 1025])
    with pytest.raises(InvalidPostError, match="captions must be one string per id"):
        store.upsert(["a"], vectors[:1], [PostMetadata()], ["one", "two"])
    with pytest.raises(InvalidPostError, match="unique"):
        store.delete(["p1", "p1"])
    assert not store.get(["ok", "a", "b"])


# ---------------------------------------------------------------------------------------
# Query by id


def test_search_by_id_uses_the_stored_vector_and_leaves_the_post_out(served: tuple[Any, ...]) -> None:
    store, ids, vectors, _ = served
    found = store.search_by_id("p12", 5, post_filter=PostFilter(exclude_ids=frozenset({"p13"})))
    keep = [i not in (12, 13) for i in range(len(ids))]
    assert [n.id for n in found] == [ids[row] for row in exact(vectors, vectors[12], keep, 5)]
    with pytest.raises(InvalidPostError, match="'unknown-post'"):
        store.search_by_id("unknown-post", 5)


def test_get_returns_the_stored_unit_vector_and_metadata(served: tuple[Any, ...]) -> None:
    store, _, vectors, metadata = served
    found = store.get(["p6", "absent"])
    assert list(found) == ["p6"]
    assert np.allclose(found["p6"].vector, vectors[6], atol=1e-6)
    assert found["p6"].metadata == metadata[6] and found["p6"].caption == "post number 6"


# ---------------------------------------------------------------------------------------
# Without the extra


def test_without_pymilvus_the_backend_says_which_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_pymilvus(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "pymilvus" or name.startswith("pymilvus."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pymilvus)
    with pytest.raises(OptionalDependencyError, match=r"postsim\[milvus\]"):
        MilvusStore(MilvusSettings(uri="unused.db"), weights_fingerprint="0cfa483df1e45a25", dimension=DIM)
