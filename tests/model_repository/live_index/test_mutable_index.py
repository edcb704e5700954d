"""The FAISS live index over real index versions (flat, IVF-PQ with exact rerank, HNSW), checked against exact search."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import faiss
import numpy as np
import pytest
from live_index_fixtures import (
    DIM,
    FINGERPRINT,
    Reference,
    assert_holds,
    build_base,
    clustered,
    columns_of,
    random_metadata,
)

from postsim.core.errors import InvalidPostError, SearchIndexError
from postsim.indexing.build import build_index_dir
from postsim.model_repository.live_index.filters import PostFilter
from postsim.model_repository.live_index.journal import ChangeJournal, JournalHeader
from postsim.model_repository.live_index.metadata import MetadataColumns, PostMetadata
from postsim.model_repository.live_index.mutable_index import MutableIndex
from postsim.model_repository.live_index.protocol import PostUpsert
from postsim.model_repository.search_index import IndexManifest, IndexType, LoadedIndex, load_index_dir

COUNT = 3000
ALL_TYPES = [IndexType.FLAT, IndexType.IVFPQ, IndexType.HNSW]
ANN_TYPES = [IndexType.IVFPQ, IndexType.HNSW]
RARE = PostFilter(tags=frozenset({"rare"}))


Built = dict[IndexType, tuple[Path, np.ndarray]]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """One version of each index type over the same posts, on disk; each test loads its own (a live index takes it over)."""
    root = tmp_path_factory.mktemp("bases")
    return {
        index_type: (root / index_type.value, build_base(root / index_type.value, COUNT, index_type)[1])
        for index_type in ALL_TYPES
    }


METADATA = random_metadata(COUNT, seed=5, rare_share=0.03)


def load(built: Built, index_type: IndexType) -> LoadedIndex:
    return load_index_dir(built[index_type][0], FINGERPRINT, use_gpu=False)


def open_live(built: Built, index_type: IndexType, tmp_path: Path) -> tuple[MutableIndex, Reference]:
    base = load(built, index_type)
    index = MutableIndex.open(base, tmp_path / "changes.journal", metadata=columns_of(METADATA))
    return index, Reference(base.ids, built[index_type][1], METADATA)


def upsert(index: MutableIndex, reference: Reference, post_id: str, vector: np.ndarray, **metadata: object) -> None:
    post = PostUpsert(id=post_id, vector=vector, metadata=PostMetadata(**metadata), caption=f"new {post_id}")  # type: ignore[arg-type]
    index.upsert([post], weights_fingerprint=FINGERPRINT)
    reference.upsert(post_id, vector, post.metadata, post.caption)


def ids_of(hits: list) -> list[str]:
    return [hit.id for hit in hits]


QUERIES = clustered(20, seed=99)


@pytest.mark.parametrize("index_type", ALL_TYPES)
def test_an_upserted_post_is_found_and_a_deleted_one_never_again(
    built: Built, index_type: IndexType, tmp_path: Path
) -> None:
    index, reference = open_live(built, index_type, tmp_path)
    fresh = clustered(1, seed=123)[0]
    upsert(index, reference, "fresh", fresh * 3)  # any length: stored L2-normalised
    (hits,) = index.search(fresh[None], 5)
    assert hits[0].id == "fresh" and hits[0].score >= 0.99 and hits[0].caption == "new fresh"
    top = ids_of(index.search(QUERIES[:1], 10)[0])
    receipt = index.delete(top)  # the ten best results of the query: deleted rows must not take their places
    assert receipt.deleted == 10 and receipt.unknown_ids == ()
    for post_id in top:
        reference.delete(post_id)
    (after,) = index.search(QUERIES[:1], 10)
    assert len(after) == 10 and not set(ids_of(after)) & set(top)
    if index_type is IndexType.FLAT:
        assert ids_of(after) == [post_id for post_id, _ in reference.exact(QUERIES[0], 10)]
    state = index.state()
    assert (state.live_count, state.upserted, state.deleted, state.dead_rows) == (COUNT - 9, 1, 10, 10)
    assert state.sequence == 2 and state.base_count == COUNT


@pytest.mark.parametrize("index_type", ALL_TYPES)
def test_replaying_the_journal_gives_back_exactly_the_acknowledged_state(
    built: Built, index_type: IndexType, tmp_path: Path
) -> None:
    index, reference = open_live(built, index_type, tmp_path)
    rng = np.random.default_rng(1)
    new_vectors = clustered(60, seed=2)
    for step in range(60):
        choice = rng.random()
        if choice < 0.4:
            upsert(index, reference, f"new{step}", new_vectors[step], author="zed", tags=("fresh",))
        elif choice < 0.7:  # replace a post of the base or an earlier upsert
            victim = str(rng.choice(list(reference.vectors)))
            upsert(index, reference, victim, new_vectors[step], label="replaced", created_at=1_800_000_000)
        else:
            victims = [str(v) for v in rng.choice(list(reference.vectors), size=3, replace=False)]
            index.delete(victims)
            for victim in victims:
                reference.delete(victim)
    assert_holds(index, reference)
    before = index.search(QUERIES, 10, where=PostFilter(labels=frozenset({"replaced", "cat"})))
    index.close()
    reopened = MutableIndex.open(load(built, index_type), tmp_path / "changes.journal", metadata=columns_of(METADATA))
    assert_holds(reopened, reference)
    assert reopened.state() == index.state()
    assert reopened.search(QUERIES, 10, where=PostFilter(labels=frozenset({"replaced", "cat"}))) == before
    reopened.close()


@pytest.mark.parametrize("index_type", ALL_TYPES)
def test_a_filter_keeping_3_percent_returns_k_with_the_scores_of_exact_search(
    built: Built, index_type: IndexType, tmp_path: Path
) -> None:
    index, reference = open_live(built, index_type, tmp_path)
    passing = [post_id for post_id in reference.vectors if reference.passes(post_id, RARE)]
    assert 0.025 * COUNT < len(passing) < 0.035 * COUNT
    index.delete(passing[:5])  # dead rows must not count as passing
    for post_id in passing[:5]:
        reference.delete(post_id)
    upsert(index, reference, "rare-new", QUERIES[3], tags=("rare",))  # an upserted post passes too
    passing = [post_id for post_id in reference.vectors if reference.passes(post_id, RARE)]
    for k in (10, 50, len(passing), 500):
        results = index.search(QUERIES, k, where=RARE)
        for query, hits in zip(QUERIES, results, strict=True):
            expected = reference.exact(query, k, RARE)
            assert len(hits) == min(k, len(passing))
            assert ids_of(hits) == [post_id for post_id, _ in expected]
            np.testing.assert_allclose([hit.score for hit in hits], [score for _, score in expected], atol=1e-5)


def near_label(vectors: np.ndarray, share: float) -> tuple[list[PostMetadata], np.ndarray]:
    """Label ``near`` on the posts closest to one post: a filter that follows the clusters. And a query far from them."""
    similarity = vectors @ vectors[0]
    near = similarity >= np.quantile(similarity, 1 - share)
    metadata = [PostMetadata(label="near" if flag else "far") for flag in near]
    return metadata, vectors[int(np.argmin(similarity))][None]


@pytest.mark.parametrize("index_type", ANN_TYPES)
def test_a_broad_filter_goes_into_the_ann_search_and_a_short_search_is_widened(
    built: Built,
    index_type: IndexType,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    metadata, far_query = near_label(built[index_type][1], share=0.10)  # above exact_fraction: the ANN search runs
    index = MutableIndex.open(load(built, index_type), tmp_path / "changes.journal", metadata=columns_of(metadata))
    widenings: list[int] = []
    ann_search = MutableIndex._search_ann

    def spy(self: MutableIndex, queries: np.ndarray, k: int, bitmap: object, widening: int) -> object:
        widenings.append(widening)
        return ann_search(self, queries, k, bitmap, widening)  # type: ignore[arg-type]

    monkeypatch.setattr(MutableIndex, "_search_ann", spy)
    near = PostFilter(labels=frozenset({"near"}))
    (hits,) = index.search(far_query, 50, where=near)
    assert len(hits) == 50 and {metadata[int(hit.id[1:])].label for hit in hits} == {"near"}
    assert widenings[0] == 0
    if index_type is IndexType.IVFPQ:
        assert max(widenings) >= 1  # the tuned nprobe reaches too few lists holding a passing post
    broad = PostFilter(labels=frozenset({"far"}))
    results = index.search(QUERIES, 10, where=broad)
    assert all(len(hits) == 10 for hits in results)
    assert {metadata[int(hit.id[1:])].label for hits in results for hit in hits} == {"far"}


def test_the_ivf_search_parameters_reach_the_base_index_under_the_rerank(built: Built, tmp_path: Path) -> None:
    """With the tuned nprobe the filtered IVF-PQ search finds what the unfiltered one finds among the passing posts."""
    index, reference = open_live(built, IndexType.IVFPQ, tmp_path)
    cats = PostFilter(labels=frozenset({"cat"}))
    found = expected = 0
    for query, hits in zip(QUERIES, index.search(QUERIES, 10, where=cats), strict=True):
        truth = {post_id for post_id, _ in reference.exact(query, 10, cats)}
        expected += len(truth)
        found += len(truth & set(ids_of(hits)))
    assert found / expected >= 0.9


@pytest.mark.parametrize("index_type", ALL_TYPES)
def test_more_like_this_searches_with_the_stored_vector_without_the_post(
    built: Built, index_type: IndexType, tmp_path: Path
) -> None:
    index, reference = open_live(built, index_type, tmp_path)
    upsert(index, reference, "mine", clustered(1, seed=7)[0])
    results = index.search_by_id(["p17", "mine"], 10)
    for post_id, hits in zip(["p17", "mine"], results, strict=True):
        expected = [other for other, _ in reference.exact(reference.vectors[post_id], 11) if other != post_id][:10]
        assert post_id not in ids_of(hits) and len(hits) == 10
        if index_type is IndexType.FLAT:
            assert ids_of(hits) == expected
        else:
            assert len(set(ids_of(hits)) & set(expected)) >= 8
    (rare,) = index.search_by_id(["p17"], 5, where=RARE)
    assert all(reference.passes(hit.id, RARE) for hit in rare) and len(rare) == 5
    index.delete(["p17"])
    for unknown in ("p17", "never-indexed"):
        with pytest.raises(InvalidPostError, match=rf"query id '{unknown}': no indexed post has this id"):
            index.search_by_id([unknown], 5)
    with pytest.raises(InvalidPostError, match="query id: post id 'bad id' has the character ' '"):
        index.search_by_id(["bad id"], 5)


@pytest.mark.parametrize("index_type", [IndexType.FLAT, IndexType.IVFPQ])
def test_collapse_folds_reposts_and_still_returns_k_groups(built: Built, index_type: IndexType, tmp_path: Path) -> None:
    index, reference = open_live(built, index_type, tmp_path)
    query = QUERIES[5]
    rng = np.random.default_rng(3)
    reposts = [query + rng.normal(0, 0.02, DIM).astype(np.float32) for _ in range(25)]
    index.upsert(
        [PostUpsert(id=f"repost{n}", vector=vector) for n, vector in enumerate(reposts)],
        weights_fingerprint=FINGERPRINT,
    )
    (plain,) = index.search(query[None], 10)
    assert all(hit.id.startswith("repost") for hit in plain)  # without collapse the reposts fill the page
    (groups,) = index.search(query[None], 10, collapse_above=0.95)
    assert len(groups) == 10
    assert groups[0].id.startswith("repost") and len(groups[0].duplicates) == 24
    assert all(not hit.id.startswith("repost") for hit in groups[1:])
    heads = np.stack([reference.vectors[hit.id] for hit in groups[1:]])
    gram = heads @ heads.T
    assert (gram[~np.eye(len(heads), dtype=bool)] <= 0.95).all()
    (by_id,) = index.search_by_id(["repost0"], 3, collapse_above=0.95)
    assert len(by_id) == 3 and len(by_id[0].duplicates) == 23  # the post itself is not among them


def test_bad_changes_are_refused_and_nothing_is_written(built: Built, tmp_path: Path) -> None:
    index, _ = open_live(built, IndexType.FLAT, tmp_path)
    state = index.state()
    good = clustered(1)[0]
    cases = [
        ([PostUpsert(id="a", vector=good)], "0" * 64, "embedded by encoders with weights fingerprint '0000"),
        ([PostUpsert(id="a", vector=good[:5])], FINGERPRINT, r"post 'a': vector of shape \[5\]"),
        ([PostUpsert(id="a", vector=np.full(DIM, np.nan, dtype=np.float32))], FINGERPRINT, "finite and non-zero"),
        ([PostUpsert(id="a", vector=np.zeros(DIM, dtype=np.float32))], FINGERPRINT, "finite and non-zero"),
        ([PostUpsert(id="a", vector=good), PostUpsert(id="a", vector=good)], FINGERPRINT, r"repeated: \['a'\]"),
        ([PostUpsert(id="b", vector=good), PostUpsert(id="c", vector=good.astype(int))], FINGERPRINT, "'c': vector"),
        ([], FINGERPRINT, "no posts given"),
    ]
    for posts, fingerprint, message in cases:
        with pytest.raises(InvalidPostError, match=message):
            index.upsert(posts, weights_fingerprint=fingerprint)
    with pytest.raises(InvalidPostError, match="upsert: post id 'a b' has the character"):
        PostUpsert(id="a b", vector=good)
    with pytest.raises(InvalidPostError, match="delete: no ids given"):
        index.delete([])
    with pytest.raises(InvalidPostError, match="delete: a post id is a string, got int"):
        index.delete([7])  # type: ignore[list-item]
    with pytest.raises(InvalidPostError, match="k must be a positive integer"):
        index.search(QUERIES, 0)
    assert index.state() == state
    assert (tmp_path / "changes.journal").stat().st_size == state.journal_bytes


def test_a_delete_of_unknown_ids_is_reported(built: Built, tmp_path: Path) -> None:
    index, _ = open_live(built, IndexType.FLAT, tmp_path)
    receipt = index.delete(["p1", "nobody", "p1", "p2"])
    assert (receipt.deleted, receipt.unknown_ids, receipt.sequence) == (2, ("nobody",), 1)
    size = index.state().journal_bytes
    again = index.delete(["p1", "nobody"])  # p1 is gone now
    assert (again.deleted, again.unknown_ids, again.sequence) == (0, ("p1", "nobody"), 0)
    assert index.state().journal_bytes == size  # nothing to record


@pytest.mark.parametrize("index_type", [IndexType.FLAT, IndexType.IVFPQ])
def test_a_compacted_version_with_the_later_changes_carried_holds_the_same_posts(
    built: Built, index_type: IndexType, tmp_path: Path
) -> None:
    index, reference = open_live(built, index_type, tmp_path)
    vectors = clustered(40, seed=4)
    for n in range(20):
        upsert(index, reference, f"before{n}" if n % 2 else f"p{n}", vectors[n], author="ana")
    index.delete(["p100", "before1"])
    reference.delete("p100"), reference.delete("before1")
    compacted = index.compact()
    assert compacted.sequence == 21 and compacted.index_type is index_type and len(compacted.ids) == COUNT + 8
    for n in range(20, 30):  # changes while the new version is built
        upsert(index, reference, f"after{n}" if n % 2 else "before3", vectors[n], label="late")
    index.delete(["p200"])
    reference.delete("p200")

    directory = tmp_path / "compacted"
    build_index_dir(
        directory,
        compacted.ids,
        compacted.vectors,
        weights_fingerprint=compacted.weights_fingerprint,
        index_type=compacted.index_type,
        captions=compacted.captions,
    )
    compacted.metadata.save(directory / "metadata.npz")
    new_base = load_index_dir(directory, FINGERPRINT, use_gpu=False)
    header = JournalHeader(
        weights_fingerprint=FINGERPRINT,
        base_version=new_base.manifest.index_sha256,
        dimension=DIM,
        base_sequence=compacted.sequence,
    )
    ChangeJournal.create(tmp_path / "new.journal", header, carried=index.changes_after(compacted.sequence)).close()
    metadata = MetadataColumns.load(directory / "metadata.npz", len(compacted.ids))
    compacted_index = MutableIndex.open(
        new_base, tmp_path / "new.journal", metadata=metadata, base_sequence=compacted.sequence
    )
    assert_holds(compacted_index, reference)
    assert compacted_index.state().sequence == index.state().sequence == 32
    state = compacted_index.state()
    assert (state.deleted, state.dead_rows) == (2, 6)  # before3 (five times) and p200, after the snapshot


KILLED_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from postsim.model_repository.live_index.metadata import MetadataColumns
    from postsim.model_repository.live_index.mutable_index import MutableIndex
    from postsim.model_repository.live_index.protocol import PostUpsert
    from postsim.model_repository.search_index import load_index_dir

    base = load_index_dir(sys.argv[1], None, use_gpu=False)
    index = MutableIndex.open(base, sys.argv[2], metadata=MetadataColumns.blank(base.manifest.count))
    for step in range(int(sys.argv[3])):
        if step % 3 == 2:
            index.delete([f"p{step}"])
        else:
            vector = np.random.default_rng(step).standard_normal(int(sys.argv[4])).astype(np.float32)
            index.upsert([PostUpsert(id=f"k{step % 7}", vector=vector)], weights_fingerprint=base.manifest.weights_fingerprint)
        print(step + 1, flush=True)  # acknowledged
    print("done", flush=True)
    sys.stdin.read()  # waits to be killed
    """
)


def expected_after(steps: int, base: LoadedIndex, vectors: np.ndarray) -> Reference:
    reference = Reference(base.ids, vectors, [PostMetadata()] * COUNT)
    for step in range(steps):
        if step % 3 == 2:
            reference.delete(f"p{step}")
        else:
            vector = np.random.default_rng(step).standard_normal(DIM).astype(np.float32)
            reference.upsert(f"k{step % 7}", vector, PostMetadata(), "")
    return reference


def run_and_kill(directory: Path, journal: Path, steps: int, kill_after: int | None) -> int:
    """Run the writer, SIGKILL it after ``kill_after`` acknowledgements (or once done); return how many it acknowledged."""
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(directory), str(journal), str(steps), str(DIM)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    acknowledged = 0
    for line in process.stdout:
        if line.strip() == "done" or acknowledged == kill_after:
            break
        acknowledged = int(line)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    return acknowledged


def test_a_process_killed_with_sigkill_comes_back_with_every_acknowledged_change(tmp_path: Path) -> None:
    base, vectors = build_base(tmp_path / "base", COUNT, IndexType.FLAT)
    # Killed after N acknowledged changes, at rest: exactly those N.
    journal = tmp_path / "at-rest.journal"
    assert run_and_kill(tmp_path / "base", journal, 30, kill_after=None) == 30
    with MutableIndex.open(base, journal) as index:
        assert index.state().sequence == 30
        assert_holds(index, expected_after(30, base, vectors))
    # Killed while writing: every change it acknowledged, and the ones after exactly as they were made, or none.
    journal = tmp_path / "mid-write.journal"
    acknowledged = run_and_kill(tmp_path / "base", journal, 1_000_000, kill_after=200)
    with MutableIndex.open(load_index_dir(tmp_path / "base", FINGERPRINT, use_gpu=False), journal) as index:
        recovered = index.state().sequence
        assert recovered >= acknowledged
        assert_holds(index, expected_after(recovered, base, vectors))


def test_searches_running_beside_changes_never_return_a_post_deleted_before_they_started(
    built: Built, tmp_path: Path
) -> None:
    index, _ = open_live(built, IndexType.IVFPQ, tmp_path)
    deleted: set[str] = set()
    guard = threading.Lock()
    failures: list[str] = []
    done = threading.Event()

    def searcher(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not done.is_set():
            with guard:
                gone = set(deleted)
            where = PostFilter(labels=frozenset({"cat", "dog"})) if rng.random() < 0.5 else None
            try:
                for hits in index.search(QUERIES[rng.integers(0, 20, size=2)], 20, where=where):
                    failures.extend(f"{hit.id} returned after its delete" for hit in hits if hit.id in gone)
                    if len(hits) != 20:
                        failures.append(f"{len(hits)} results")
            except Exception as error:
                failures.append(repr(error))

    threads = [threading.Thread(target=searcher, args=(seed,)) for seed in range(2)]
    for thread in threads:
        thread.start()
    fresh = clustered(150, seed=8)
    try:
        for n in range(150):
            (top,) = index.search(QUERIES[n % 20][None], 1)
            index.delete([top[0].id])
            with guard:
                deleted.add(top[0].id)
            index.upsert([PostUpsert(id=f"fresh{n}", vector=fresh[n])], weights_fingerprint=FINGERPRINT)
    finally:
        done.set()
        for thread in threads:
            thread.join()
    assert failures == []
    state = index.state()
    assert (state.sequence, state.dead_rows, state.live_count) == (300, 150, COUNT)


def test_an_index_without_full_vectors_is_refused(tmp_path: Path) -> None:
    vectors = clustered(500)
    index = faiss.index_factory(DIM, "IVF4,PQ8x4", faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add(vectors)
    manifest = IndexManifest(
        dimension=DIM,
        count=500,
        index_type=IndexType.IVFPQ,
        params={"nprobe": 4, "k_factor": 1},
        weights_fingerprint=FINGERPRINT,
        created_at="2024-05-01T00:00:00+00:00",
        index_sha256="0" * 64,
        ids_sha256="0" * 64,
        postsim_version="test",
    )
    base = LoadedIndex(
        index=index,
        ids=[f"p{n}" for n in range(500)],
        captions=[""] * 500,
        manifest=manifest,
        unimodal=None,
        cpu_index=index,
    )
    with pytest.raises(SearchIndexError, match="IndexIVFPQ keeps no full vectors"):
        MutableIndex.open(base, tmp_path / "changes.journal")
    assert not (tmp_path / "changes.journal").exists()
