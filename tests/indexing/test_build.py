"""Index directories: building, atomic writing, verified loading and search."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import faiss
import numpy as np
import pytest

from postsim.bench.index_bench import BenchData, ClusteredVectors, format_table, run_index_benchmark
from postsim.core.errors import SearchIndexError
from postsim.indexing import build as indexing
from postsim.indexing.build import (
    EXACT_SEARCH_MAX_COUNT,
    IndexPlan,
    IndexType,
    build_index,
    build_index_dir,
    choose_index,
    measure_recall,
    new_manifest,
    post_caption,
    tune_search,
    write_index_dir,
)
from postsim.model_repository.layout import version_dirs
from postsim.model_repository.search_index import (
    CAPTIONS_FILE,
    IDS_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    IndexManifest,
    gpu_available,
    load_index_dir,
    sha256_file,
    version_index_dir,
)

DIM = 32
FINGERPRINT = "sha256:encoders-under-test"


def unit_vectors(count: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, dim), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def post_ids(count: int) -> list[str]:
    return [f"post-{i}" for i in range(count)]


def small_plan(index_type: IndexType, count: int) -> IndexPlan:
    """The default plan of ``index_type``, with IVF sized for a test corpus."""
    plan = choose_index(count, DIM, index_type)
    if index_type is IndexType.IVFPQ:
        plan = dataclasses.replace(plan, params={**plan.params, "nlist": 16, "nprobe": 16})
    return plan


def write_dir(path: Path, count: int = 200, index_type: IndexType = IndexType.FLAT, seed: int = 0) -> Path:
    vectors = unit_vectors(count, seed=seed)
    plan = small_plan(index_type, count)
    index = build_index(post_ids(count), vectors, plan)
    write_index_dir(path, index, post_ids(count), new_manifest(plan, count, FINGERPRINT))
    return path


def snapshot(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


# --- choosing and building -------------------------------------------------------------


def test_auto_chooses_exact_search_for_small_corpora() -> None:
    assert choose_index(10, 256).index_type is IndexType.FLAT
    assert choose_index(EXACT_SEARCH_MAX_COUNT - 1, 256).index_type is IndexType.FLAT
    assert choose_index(EXACT_SEARCH_MAX_COUNT, 256).index_type is not IndexType.FLAT


def test_explicit_index_type_is_kept() -> None:
    plan = choose_index(1000, 256, IndexType.HNSW)
    assert plan.index_type is IndexType.HNSW
    assert set(plan.params) == {"M", "efConstruction", "efSearch"}


@pytest.mark.parametrize(
    ("index_type", "params", "message"),
    [
        (IndexType.AUTO, {}, "choose_index() resolves AUTO"),
        (IndexType.HNSW, {"M": 32}, "needs the parameters ['M', 'efConstruction', 'efSearch'], got ['M']"),
        (IndexType.IVFPQ, {**choose_index(10**6, 256, IndexType.IVFPQ).params, "pq_m": 3}, "must divide"),
    ],
)
def test_plan_checks_its_parameters(index_type: IndexType, params: dict[str, int], message: str) -> None:
    with pytest.raises(SearchIndexError) as caught:
        IndexPlan(index_type=index_type, dimension=256, params=params)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("embeddings", "ids", "message"),
    [
        (np.zeros((3, DIM), dtype=np.float64), post_ids(3), "must be float32, got float64"),
        (np.ones(DIM, dtype=np.float32), post_ids(1), "2-D"),
        (unit_vectors(3, dim=DIM + 1), post_ids(3), f"have {DIM + 1} dimensions, the plan expects {DIM}"),
        (unit_vectors(3), post_ids(4), "got 3 embeddings for 4 ids"),
        (unit_vectors(3), ["a", "b", "a"], "ids must be unique; repeated: ['a']"),
        (unit_vectors(2), ["a", 7], "ids must be strings, got int"),
        (unit_vectors(2), ["a", "b\nWARNING forged"], "ids[1]: post id 'b\\nWARNING forged' has the character '\\n'"),
        (unit_vectors(2), ["a", "x" * 10_000], "ids[1]: post id 'xxxx"),
        (np.full((2, DIM), np.nan, dtype=np.float32), post_ids(2), "must be finite"),
        (np.zeros((2, DIM), dtype=np.float32), post_ids(2), "zero vectors"),
    ],
)
def test_build_validates_its_input(embeddings: np.ndarray, ids: list[str], message: str) -> None:
    with pytest.raises(SearchIndexError) as caught:
        build_index(ids, embeddings, choose_index(len(ids), DIM, IndexType.FLAT))
    assert message in str(caught.value)


def test_build_normalises_rows_without_touching_the_input() -> None:
    vectors = unit_vectors(50) * 3.0
    original = vectors.copy()
    scores, _ = build_index(post_ids(50), vectors, choose_index(50, DIM)).search(vectors[:1] / 3.0, 1)
    np.testing.assert_allclose(scores[0, 0], 1.0, rtol=1e-5)
    np.testing.assert_array_equal(vectors, original)


@pytest.mark.parametrize("index_type", [IndexType.FLAT, IndexType.HNSW, IndexType.IVFPQ])
def test_each_index_type_finds_the_exact_neighbours_of_a_small_corpus(index_type: IndexType) -> None:
    vectors = unit_vectors(2000)
    index = build_index(post_ids(2000), vectors, small_plan(index_type, 2000))
    assert measure_recall(index, vectors, unit_vectors(50, seed=1), 10) >= 0.95


@pytest.mark.slow
def test_default_ann_index_reaches_recall_095_on_100k_random_unit_vectors() -> None:
    count, dim = 100_000, 256
    plan = choose_index(count, dim)
    assert plan.index_type is not IndexType.FLAT
    vectors = unit_vectors(count, dim=dim)
    index = build_index(post_ids(count), vectors, plan)
    recall = measure_recall(index, vectors, unit_vectors(200, dim=dim, seed=1), 10)
    assert recall >= 0.95, f"recall@10 {recall:.3f} with {plan.params}"


# --- tuning the search on the corpus ------------------------------------------------------


def clustered(count: int, queries: int, dim: int = 64) -> tuple[np.ndarray, np.ndarray]:
    data = ClusteredVectors(dim=dim, topics=20, subjects=400)
    rng = np.random.default_rng(0)
    return data.sample(count, rng), data.sample(queries, rng)


def ivf_plan(count: int, dim: int, nlist: int) -> IndexPlan:
    plan = choose_index(count, dim, IndexType.IVFPQ)
    return dataclasses.replace(plan, params={**plan.params, "nlist": nlist, "nprobe": nlist})


def test_tuning_probes_fewer_lists_on_clustered_data_than_on_random_and_keeps_recall() -> None:
    count, dim = 20_000, 64
    base, queries = clustered(count, 200, dim)
    plan = ivf_plan(count, dim, 128)
    index = build_index(post_ids(count), base, plan)
    tuning = tune_search(index, plan, base)
    assert tuning.reached and tuning.recall >= indexing.TUNING_RECALL and tuning.queries == indexing.TUNING_QUERIES
    assert tuning.plan.params["nprobe"] < 128 / 4, tuning
    assert faiss.extract_index_ivf(faiss.downcast_index(index).base_index).nprobe == tuning.plan.params["nprobe"]
    # Held-out posts, never in the index, find their neighbours as well as the corpus's own did.
    assert measure_recall(index, base, queries, 10) >= 0.95

    random = unit_vectors(count, dim=dim)
    random_index = build_index(post_ids(count), random, plan)
    random_tuning = tune_search(random_index, plan, random)
    assert random_tuning.plan.params["nprobe"] > tuning.plan.params["nprobe"] * 2, (random_tuning, tuning)


def test_tuning_hnsw_raises_ef_search_until_the_target_and_leaves_exact_search_alone() -> None:
    base, _ = clustered(5000, 1, 32)
    plan = choose_index(5000, 32, IndexType.HNSW)
    tuning = tune_search(build_index(post_ids(5000), base, plan), plan, base, queries=200)
    assert tuning.reached and tuning.plan.params["efSearch"] in {16, 32, 64, 128, 256, 512, 1024, 2048, 4096}
    flat = choose_index(5000, 32, IndexType.FLAT)
    assert tune_search(build_index(post_ids(5000), base, flat), flat, base).plan == flat


def test_tuning_that_cannot_reach_the_target_keeps_the_widest_search_and_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    vectors = unit_vectors(4000)
    plan = ivf_plan(4000, DIM, 32)
    index = build_index(post_ids(4000), vectors, plan)
    tuning = tune_search(index, plan, vectors, recall_target=1.01, queries=100)
    assert not tuning.reached and tuning.plan.params["nprobe"] == 32
    assert "NOT reached" in caplog.text


def test_built_index_directory_serves_with_the_tuned_search(tmp_path: Path) -> None:
    count = EXACT_SEARCH_MAX_COUNT  # the smallest corpus AUTO gives an approximate index
    base, queries = clustered(count, 100, DIM)
    manifest = build_index_dir(tmp_path / "index", post_ids(count), base, weights_fingerprint=FINGERPRINT)
    assert manifest.index_type is IndexType.IVFPQ
    assert manifest.params["nprobe"] < manifest.params["nlist"]
    loaded = load_index_dir(tmp_path / "index", FINGERPRINT)
    assert faiss.extract_index_ivf(faiss.downcast_index(loaded.index).base_index).nprobe == manifest.params["nprobe"]
    assert measure_recall(loaded.index, base, queries, 10) >= 0.95


def test_clustered_vectors_are_unit_rows_whose_neighbours_share_a_subject() -> None:
    data = ClusteredVectors(dim=64, topics=10, subjects=100)
    subjects, shares = data.centres
    assert subjects.shape == (100, 64) and shares.sum() == pytest.approx(1.0)
    vectors = data.sample(2000, np.random.default_rng(1))
    assert vectors.dtype == np.float32 and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    scores, _ = faiss.knn(vectors[:50], vectors, 2, metric=faiss.METRIC_INNER_PRODUCT)
    assert 0.3 < float(np.median(scores[:, 1])) < 0.95  # a near neighbour, not a duplicate
    assert abs(float(np.mean(vectors[:500] @ vectors[500:1000].T))) < 0.1


# --- writing ---------------------------------------------------------------------------


def test_written_directory_has_the_three_files_and_a_complete_manifest(tmp_path: Path) -> None:
    directory = write_dir(tmp_path / "index")
    assert sorted(os.listdir(directory)) == sorted([INDEX_FILE, IDS_FILE, MANIFEST_FILE])
    manifest = IndexManifest.from_json((directory / MANIFEST_FILE).read_text())
    assert (manifest.dimension, manifest.count, manifest.index_type) == (DIM, 200, IndexType.FLAT)
    assert manifest.weights_fingerprint == FINGERPRINT
    assert manifest.metric == "inner_product"
    assert manifest.created_at.endswith("+00:00")
    assert json.loads((directory / IDS_FILE).read_text()) == post_ids(200)
    assert list(tmp_path.iterdir()) == [directory], "no temporary directories are left behind"
    assert directory.stat().st_mode & 0o755 == 0o755, "readable by the server's user"


def test_manifest_round_trips_through_json(tmp_path: Path) -> None:
    manifest = build_index_dir(tmp_path / "index", post_ids(3000), unit_vectors(3000), weights_fingerprint=FINGERPRINT)
    assert IndexManifest.from_json(manifest.to_json()) == manifest


@pytest.mark.parametrize("change", ["missing", "unknown"])
def test_manifest_with_a_missing_or_unknown_field_is_refused(tmp_path: Path, change: str) -> None:
    directory = write_dir(tmp_path / "index")
    data = json.loads((directory / MANIFEST_FILE).read_text())
    if change == "missing":
        del data["weights_fingerprint"]
    else:
        data["shards"] = 4
    (directory / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(SearchIndexError, match=f"{change} fields \\['(weights_fingerprint|shards)'\\]"):
        load_index_dir(directory, FINGERPRINT)


def test_replacing_an_index_swaps_the_whole_directory(tmp_path: Path) -> None:
    directory = write_dir(tmp_path / "index", count=200)
    write_dir(directory, count=300, seed=1)
    assert load_index_dir(directory, FINGERPRINT).manifest.count == 300
    assert list(tmp_path.iterdir()) == [directory]


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()])
@pytest.mark.parametrize("failing_step", ["write_text_atomic", "fsync_path", "rename"])
def test_failed_write_leaves_the_old_index_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: BaseException, failing_step: str
) -> None:
    directory = write_dir(tmp_path / "index", count=200)
    before = snapshot(directory)
    replacement = unit_vectors(300, seed=1)
    plan = choose_index(300, DIM)
    index = build_index(post_ids(300), replacement, plan)

    def fail(*args: object, **kwargs: object) -> None:
        raise failure

    if failing_step == "rename":
        real_rename = os.rename
        calls = []

        def rename_failing_on_the_swap(source: str, target: str) -> None:
            calls.append(target)
            if len(calls) == 2:  # the old index is already moved aside; the new one must not land
                raise failure
            real_rename(source, target)

        monkeypatch.setattr(indexing.os, "rename", rename_failing_on_the_swap)
    else:
        monkeypatch.setattr(indexing, failing_step, fail)
    with pytest.raises(type(failure)):
        write_index_dir(directory, index, post_ids(300), new_manifest(plan, 300, FINGERPRINT))
    monkeypatch.undo()
    assert snapshot(directory) == before
    assert list(tmp_path.iterdir()) == [directory], "no partial files are left behind"
    assert load_index_dir(directory, FINGERPRINT).manifest.count == 200


def test_failed_first_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(indexing.faiss, "write_index", fail)
    with pytest.raises(KeyboardInterrupt):
        write_dir(tmp_path / "index")
    assert list(tmp_path.iterdir()) == []


def test_write_refuses_to_replace_a_directory_that_is_not_an_index(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"jpeg")
    with pytest.raises(SearchIndexError, match=r"non-empty directory without manifest\.json"):
        write_dir(tmp_path / "photos")
    assert (tmp_path / "photos" / "holiday.jpg").read_bytes() == b"jpeg"


# --- loading ---------------------------------------------------------------------------


def test_corrupt_index_file_is_refused_before_faiss_reads_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = write_dir(tmp_path / "index")
    data = bytearray((directory / INDEX_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (directory / INDEX_FILE).write_bytes(bytes(data))

    def must_not_read(path: str) -> None:
        raise AssertionError("faiss.read_index called on an unverified file")

    monkeypatch.setattr(faiss, "read_index", must_not_read)
    with pytest.raises(SearchIndexError, match=f"sha256 checksum mismatch for .*{INDEX_FILE}"):
        load_index_dir(directory, FINGERPRINT)


def test_edited_ids_file_is_refused(tmp_path: Path) -> None:
    directory = write_dir(tmp_path / "index")
    (directory / IDS_FILE).write_text(json.dumps([*post_ids(199), "intruder"]))
    with pytest.raises(SearchIndexError, match=f"sha256 checksum mismatch for .*{IDS_FILE}"):
        load_index_dir(directory, FINGERPRINT)


def test_fingerprint_mismatch_is_refused(tmp_path: Path) -> None:
    directory = write_dir(tmp_path / "index")
    with pytest.raises(SearchIndexError, match=r"weights fingerprint .*`postsim index build`"):
        load_index_dir(directory, "sha256:other-encoders")
    assert load_index_dir(directory, None).manifest.weights_fingerprint == FINGERPRINT


def test_missing_manifest_is_refused(tmp_path: Path) -> None:
    directory = write_dir(tmp_path / "index")
    (directory / MANIFEST_FILE).unlink()
    with pytest.raises(SearchIndexError, match=r"has no manifest\.json"):
        load_index_dir(directory, FINGERPRINT)


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SearchIndexError, match="does not exist"):
        load_index_dir(tmp_path / "nowhere", FINGERPRINT)


def test_manifest_count_must_match_the_index(tmp_path: Path) -> None:
    directory = write_dir(tmp_path / "index", count=200)
    other = write_dir(tmp_path / "other", count=300, seed=1)
    manifest = IndexManifest.from_json((directory / MANIFEST_FILE).read_text())
    (directory / INDEX_FILE).write_bytes((other / INDEX_FILE).read_bytes())
    forged = dataclasses.replace(manifest, index_sha256=sha256_file(directory / INDEX_FILE))
    (directory / MANIFEST_FILE).write_text(forged.to_json())
    with pytest.raises(SearchIndexError, match="300 vectors, the manifest says 200"):
        load_index_dir(directory, FINGERPRINT)


# --- captions --------------------------------------------------------------------------


def test_captions_are_kept_checksummed_and_returned_with_the_neighbours(tmp_path: Path) -> None:
    vectors = unit_vectors(20)
    captions = [f"caption of post {i}" if i % 4 else "" for i in range(20)]
    manifest = build_index_dir(
        tmp_path / "index", post_ids(20), vectors, weights_fingerprint=FINGERPRINT, captions=captions
    )
    assert manifest.captions_sha256 == sha256_file(tmp_path / "index" / CAPTIONS_FILE)
    loaded = load_index_dir(tmp_path / "index", FINGERPRINT, use_gpu=False)
    (hits,) = loaded.search(vectors[5:6], 3)
    assert hits[0] == ("post-5", pytest.approx(1.0, abs=1e-5), "caption of post 5", 5)
    (hits,) = loaded.search(vectors[4:5], 1)
    assert hits[0].caption == ""
    (tmp_path / "index" / CAPTIONS_FILE).write_text(json.dumps(["forged"] * 20))
    with pytest.raises(SearchIndexError, match=f"sha256 checksum mismatch for .*{CAPTIONS_FILE}"):
        load_index_dir(tmp_path / "index", FINGERPRINT)


def test_captions_must_be_one_string_per_id(tmp_path: Path) -> None:
    with pytest.raises(SearchIndexError, match="captions must be one string per id: got 2 for 3 ids"):
        build_index_dir(
            tmp_path / "index", post_ids(3), unit_vectors(3), weights_fingerprint=FINGERPRINT, captions=["a", "b"]
        )


def test_an_index_from_before_captions_still_loads(tmp_path: Path) -> None:
    """An index whose manifest has no captions_sha256 field at all, as older postsim wrote it."""
    directory = write_dir(tmp_path / "index", count=30)
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    del manifest["captions_sha256"]
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert not (directory / CAPTIONS_FILE).exists()
    loaded = load_index_dir(directory, FINGERPRINT, use_gpu=False)
    assert loaded.manifest.captions_sha256 == ""
    assert [hit.caption for hit in loaded.search(unit_vectors(1, seed=3), 5)[0]] == [""] * 5


@pytest.mark.parametrize(
    ("text", "caption"),
    [
        (None, ""),
        ("", ""),
        ("Sunset over the bay\nWhat a day.\n#summer #sea", "Sunset over the bay What a day. #summer #sea"),
        ("tabs\tand  spaces\r\n", "tabs and spaces"),
        ("bidi \u202eevil\u202c zero\u200bwidth \x1b[31mred", "bidi evil zerowidth [31mred"),
        ("x" * 500, "x" * 200),
    ],
)
def test_a_caption_is_the_first_200_characters_of_the_text_on_one_safe_line(text: str | None, caption: str) -> None:
    assert post_caption(text) == caption


# --- search ----------------------------------------------------------------------------


@pytest.mark.parametrize("index_type", [IndexType.FLAT, IndexType.HNSW, IndexType.IVFPQ])
def test_k_beyond_the_index_returns_each_id_once(tmp_path: Path, index_type: IndexType) -> None:
    count = 500 if index_type is IndexType.IVFPQ else 40
    directory = write_dir(tmp_path / "index", count=count, index_type=index_type)
    loaded = load_index_dir(directory, FINGERPRINT, use_gpu=False)
    for hits in loaded.search(unit_vectors(3, seed=2), count + 25):
        ids = [hit.id for hit in hits]
        assert len(ids) == len(set(ids)) <= count
        assert set(ids) <= set(post_ids(count)), "no padding (-1) or empty ids"
        if index_type is IndexType.FLAT:
            assert len(ids) == count


@pytest.mark.parametrize("index_type", [IndexType.FLAT, IndexType.HNSW, IndexType.IVFPQ])
def test_scores_are_cosine_similarities_in_descending_order(tmp_path: Path, index_type: IndexType) -> None:
    vectors = unit_vectors(500)
    directory = write_dir(tmp_path / "index", count=500, index_type=index_type)
    loaded = load_index_dir(directory, FINGERPRINT, use_gpu=False)
    queries = unit_vectors(5, seed=3)
    for query, hits in zip(queries, loaded.search(queries, 20), strict=True):
        scores = [hit.score for hit in hits]
        assert scores == sorted(scores, reverse=True)
        expected = [float(vectors[int(hit.id.removeprefix("post-"))] @ query) for hit in hits]
        np.testing.assert_allclose(scores, expected, atol=1e-5)


def test_a_post_finds_itself_first(tmp_path: Path) -> None:
    vectors = unit_vectors(200)
    loaded = load_index_dir(write_dir(tmp_path / "index"), FINGERPRINT, use_gpu=False)
    hits = loaded.search(vectors[[7, 42]] * 5.0, 3)
    assert [h[0].id for h in hits] == ["post-7", "post-42"]
    assert hits[0][0].score == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("k", [0, -1])
def test_non_positive_k_is_refused(tmp_path: Path, k: int) -> None:
    loaded = load_index_dir(write_dir(tmp_path / "index"), FINGERPRINT, use_gpu=False)
    with pytest.raises(SearchIndexError, match=f"k must be a positive integer, got {k}"):
        loaded.search(unit_vectors(1), k)


@pytest.mark.parametrize(
    ("queries", "message"),
    [
        (np.ones((2, DIM + 1), dtype=np.float32), f"\\[batch, {DIM}\\] array, got shape \\(2, {DIM + 1}\\)"),
        (np.ones(DIM, dtype=np.float32), f"\\[batch, {DIM}\\] array, got shape \\({DIM},\\)"),
        (np.ones((1, DIM), dtype=np.float64), "must be float32, got float64"),
        (np.zeros((1, DIM), dtype=np.float32), "zero vector"),
    ],
)
def test_bad_queries_are_refused(tmp_path: Path, queries: np.ndarray, message: str) -> None:
    loaded = load_index_dir(write_dir(tmp_path / "index"), FINGERPRINT, use_gpu=False)
    with pytest.raises(SearchIndexError, match=message):
        loaded.search(queries, 5)


def test_empty_batch_returns_no_results(tmp_path: Path) -> None:
    loaded = load_index_dir(write_dir(tmp_path / "index"), FINGERPRINT, use_gpu=False)
    assert loaded.search(np.zeros((0, DIM), dtype=np.float32), 5) == []


def test_search_parameters_come_from_the_manifest(tmp_path: Path) -> None:
    plan = choose_index(300, DIM, IndexType.HNSW)
    plan = dataclasses.replace(plan, params={**plan.params, "efSearch": 77})
    vectors = unit_vectors(300)
    index = build_index(post_ids(300), vectors, plan)
    write_index_dir(tmp_path / "index", index, post_ids(300), new_manifest(plan, 300, FINGERPRINT))
    loaded = load_index_dir(tmp_path / "index", FINGERPRINT, use_gpu=False)
    hnsw = faiss.downcast_index(loaded.index)
    assert isinstance(hnsw, faiss.IndexHNSW)
    assert hnsw.hnsw.efSearch == 77


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="FAISS sees no GPU")
@pytest.mark.parametrize("index_type", [IndexType.FLAT, IndexType.HNSW, IndexType.IVFPQ])
def test_index_is_searched_on_the_gpu_when_present(tmp_path: Path, index_type: IndexType) -> None:
    directory = write_dir(tmp_path / "index", count=500, index_type=index_type)
    loaded = load_index_dir(directory, FINGERPRINT)
    assert loaded.device == "gpu"
    queries = unit_vectors(4, seed=5)
    cpu = load_index_dir(directory, FINGERPRINT, use_gpu=False)
    assert [h[0].id for h in loaded.search(queries, 5)] == [h[0].id for h in cpu.search(queries, 5)]


# --- version folders and the benchmark -------------------------------------------------


def test_version_folders_are_the_numbered_ones_in_numeric_order(tmp_path: Path) -> None:
    assert version_dirs(tmp_path / "retrieval") == []
    for name in ["1", "2", "10", "notes", "3a"]:
        (tmp_path / "retrieval" / name).mkdir(parents=True)
    (tmp_path / "retrieval" / "99").write_text("a file, not a version")
    versions = version_dirs(tmp_path / "retrieval")
    assert [path.name for path in versions] == ["1", "2", "10"]
    assert version_index_dir(versions[-1]) == versions[-1] / "index"


def test_benchmark_reports_every_index_type(caplog: pytest.LogCaptureFixture) -> None:
    results = run_index_benchmark(count=2000, dim=DIM, queries=20, use_gpu=False, threads=1)
    assert [r.index_type for r in results] == [IndexType.FLAT, IndexType.HNSW, IndexType.IVFPQ]
    flat = results[0]
    assert flat.recall == 1.0 and flat.device == "cpu" and flat.memory_bytes >= 2000 * DIM * 4
    assert all(r.p50_ms > 0 and r.batch_qps > 0 and r.threads == 1 for r in results)
    table = format_table(results)
    assert "ivfpq" in table and "recall@k" in table and "random unit vectors" in table
    ivfpq = results[2]
    assert ivfpq.data is BenchData.RANDOM and ivfpq.tune_s > 0 and 0 < ivfpq.tuned_recall <= 1


def test_benchmark_on_clustered_data_tunes_the_search_down() -> None:
    results = run_index_benchmark(
        count=20_000, dim=DIM, queries=50, index_types=[IndexType.IVFPQ], data=BenchData.CLUSTERED, use_gpu=False
    )
    assert results[0].params["nprobe"] < results[0].params["nlist"] and results[0].recall >= 0.9
    assert "clustered unit vectors" in format_table(results)


def test_metadata_is_written_checksummed_and_loaded_with_the_index(tmp_path: Path) -> None:
    from postsim.model_repository.live_index.metadata import MetadataColumns, PostMetadata
    from postsim.model_repository.search_index import METADATA_FILE

    ids = post_ids(20)
    metadata = MetadataColumns.of(PostMetadata(author=f"a{row % 3}", label="x" if row else None) for row in range(20))
    build_index_dir(tmp_path / "index", ids, unit_vectors(20), weights_fingerprint=FINGERPRINT, metadata=metadata)
    loaded = load_index_dir(tmp_path / "index", FINGERPRINT, use_gpu=False)
    assert loaded.metadata is not None
    assert [loaded.metadata.row(row) for row in range(20)] == [metadata.row(row) for row in range(20)]
    stored = tmp_path / "index" / METADATA_FILE
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    with pytest.raises(SearchIndexError, match=METADATA_FILE):
        load_index_dir(tmp_path / "index", FINGERPRINT, use_gpu=False)
