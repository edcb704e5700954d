"""The four-part split of a score, in-process: the algebra, the index file that carries it, its checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from postsim.core.errors import InvalidPostError, SearchIndexError
from postsim.indexing.build import build_index_dir
from postsim.model_repository.live_index.journal import ChangeJournal, JournalHeader
from postsim.model_repository.live_index.mutable_index import MutableIndex
from postsim.model_repository.live_index.protocol import Hit, PostUpsert
from postsim.model_repository.score_parts import UNIMODAL_FILE, PostParts, UnimodalVectors, split_scores
from postsim.model_repository.search_index import IndexType, load_index_dir

DIM = 32
COUNT = 400
FINGERPRINT = "sha256:encoders-under-test"


def _unit(vectors: np.ndarray) -> np.ndarray:
    return (vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)).astype(np.float32)


def _posts(count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unit image and text vectors, weights (a tenth without an image, a tenth without a text), fused vectors."""
    rng = np.random.default_rng(seed)
    image, text = _unit(rng.standard_normal((count, DIM))), _unit(rng.standard_normal((count, DIM)))
    image_weight = rng.uniform(0.2, 0.8, count).astype(np.float32)
    image_weight[::10], image[::10] = 0.0, 0.0
    image_weight[5::10], text[5::10] = 1.0, 0.0
    weights = np.stack([image_weight, 1 - image_weight], axis=1)
    fused = _unit(weights[:, :1] * image + weights[:, 1:] * text)
    return image, text, weights, fused


@pytest.mark.parametrize("index_type", [IndexType.FLAT, IndexType.IVFPQ])
def test_the_parts_sum_to_the_searched_scores(tmp_path: Path, index_type: IndexType) -> None:
    image, text, weights, fused = _posts(COUNT, seed=0)
    ids = [f"post-{i}" for i in range(COUNT)]
    unimodal = UnimodalVectors.from_float32(image, text, weights)
    build_index_dir(tmp_path, ids, fused, weights_fingerprint=FINGERPRINT, index_type=index_type, unimodal=unimodal)
    loaded = load_index_dir(tmp_path, FINGERPRINT, use_gpu=False)
    assert loaded.unimodal is not None
    query_image, query_text, query_weights, query = _posts(8, seed=1)
    hits = loaded.search(query, 10)
    rows = np.array([[hit.row for hit in row] for row in hits])
    parts = split_scores(query_image, query_text, query_weights, loaded.unimodal, rows)
    scores = np.array([[hit.score for hit in row] for row in hits])
    np.testing.assert_allclose(parts.sum(axis=-1), scores, atol=1e-3)
    assert (parts[0, :, [0, 2]] == 0).all(), "query 0 has no image: its image parts are exactly 0"
    assert (parts[5, :, [1, 3]] == 0).all(), "query 5 has no text: its text parts are exactly 0"


def test_a_replaced_or_malformed_unimodal_file_is_refused(tmp_path: Path) -> None:
    image, text, weights, fused = _posts(40, seed=0)
    ids = [f"post-{i}" for i in range(40)]
    build_index_dir(
        tmp_path,
        ids,
        fused,
        weights_fingerprint=FINGERPRINT,
        unimodal=UnimodalVectors.from_float32(image, text, weights),
    )
    UnimodalVectors.from_float32(text, image, weights).save(tmp_path / UNIMODAL_FILE)
    with pytest.raises(SearchIndexError, match=f"sha256 checksum mismatch for .*{UNIMODAL_FILE}"):
        load_index_dir(tmp_path, FINGERPRINT, use_gpu=False)
    with pytest.raises(SearchIndexError, match=r"text has shape \(40, 16\), expected \(40, 32\)"):
        UnimodalVectors.from_float32(image, text[:, :16], weights)


def test_an_index_without_unimodal_vectors_loads_without_them(tmp_path: Path) -> None:
    _, _, _, fused = _posts(40, seed=0)
    build_index_dir(tmp_path, [f"post-{i}" for i in range(40)], fused, weights_fingerprint=FINGERPRINT)
    assert load_index_dir(tmp_path, FINGERPRINT, use_gpu=False).unimodal is None
    assert not (tmp_path / UNIMODAL_FILE).exists()


def _upsert(post_id: str, row: int, posts: tuple[np.ndarray, ...], *, with_parts: bool = True) -> PostUpsert:
    image, text, weights, fused = posts
    parts = PostParts(image=image[row], text=text[row], weights=weights[row]) if with_parts else None
    return PostUpsert(id=post_id, vector=fused[row], parts=parts)


def _split_sums(live: MutableIndex, query: tuple[np.ndarray, ...], hits: list[list[Hit]]) -> tuple[np.ndarray, ...]:
    rows = np.array([[hit.row for hit in row] for row in hits])
    parts = live.split_scores(*query[:3], rows)
    return rows, parts, np.array([[hit.score for hit in row] for row in hits])


def _published_with_parts(index_dir: Path) -> UnimodalVectors:
    """An index of COUNT posts with their unimodal vectors, built in ``index_dir``; its parts."""
    image, text, weights, fused = _posts(COUNT, seed=0)
    unimodal = UnimodalVectors.from_float32(image, text, weights)
    ids = [f"post-{i}" for i in range(COUNT)]
    build_index_dir(index_dir, ids, fused, weights_fingerprint=FINGERPRINT, unimodal=unimodal)
    return unimodal


def test_a_live_index_splits_its_published_and_upserted_rows_and_compaction_keeps_them(tmp_path: Path) -> None:
    unimodal = _published_with_parts(tmp_path / "index")
    base = load_index_dir(tmp_path / "index", FINGERPRINT, use_gpu=False)
    query = _posts(4, seed=1)
    new = _posts(4, seed=2)
    with MutableIndex.open(base, tmp_path / "changes.journal") as live:
        live.delete(["post-3"])
        live.upsert([_upsert("new", 0, query), _upsert("other", 1, new)], weights_fingerprint=FINGERPRINT)
        rows, parts, scores = _split_sums(live, query, live.search(query[3], 10))
        assert live.search(query[3], 1)[0][0].id == "new" and rows[0, 0] >= COUNT
        np.testing.assert_allclose(parts.sum(axis=-1), scores, atol=1e-3)

        by_id = live.search_by_id(["post-7", "new"], 10)
        rows = np.array([[hit.row for hit in row] for row in by_id])
        parts = live.split_scores(*live.stored_parts(["post-7", "new"]), rows)
        np.testing.assert_allclose(parts.sum(axis=-1), [[hit.score for hit in row] for row in by_id], atol=1e-3)

        compacted = live.compact()
        assert compacted.unimodal is not None and compacted.unimodal.count == COUNT + 1
        kept = [i for i in range(COUNT) if i != 3]
        np.testing.assert_array_equal(compacted.unimodal.image[: COUNT - 1], unimodal.image[kept])
        upserted = UnimodalVectors.from_float32(
            np.stack([query[0][0], new[0][1]]), np.stack([query[1][0], new[1][1]]), np.stack([query[2][0], new[2][1]])
        )
        np.testing.assert_array_equal(compacted.unimodal.text[COUNT - 1 :], upserted.text)
    base = load_index_dir(tmp_path / "index", FINGERPRINT, use_gpu=False)
    with MutableIndex.open(base, tmp_path / "changes.journal") as replayed:  # the journal gives the parts back
        rows, parts, scores = _split_sums(replayed, query, replayed.search(query[3], 10))
        assert rows[0, 0] >= COUNT
        np.testing.assert_allclose(parts.sum(axis=-1), scores, atol=1e-3)


def test_an_old_journal_record_without_parts_replays_and_its_row_alone_answers_nan(tmp_path: Path) -> None:
    unimodal = _published_with_parts(tmp_path / "index")
    base = load_index_dir(tmp_path / "index", FINGERPRINT, use_gpu=False)
    query = _posts(4, seed=1)
    header = JournalHeader(
        weights_fingerprint=FINGERPRINT, base_version=base.manifest.index_sha256, dimension=DIM, base_sequence=0
    )
    with ChangeJournal.create(tmp_path / "changes.journal", header) as journal:
        journal.append([_upsert("old", 0, query, with_parts=False)])  # kind 1: a record as journals held before parts
    assert (tmp_path / "changes.journal").read_bytes().count(b"\x01\x03\x00old") == 1
    with MutableIndex.open(base, tmp_path / "changes.journal") as live:
        assert live.state().upserted == 1
        rows, parts, scores = _split_sums(live, query, live.search(query[3], 10))
        old = rows >= COUNT
        assert old[0, 0], "the old record's post is found"
        assert np.isnan(parts[old]).all(), "its parts are unknown: NaN"
        np.testing.assert_allclose(parts[~old].sum(axis=-1), scores[~old], atol=1e-3)
        assert np.isnan(live.stored_parts(["old"])[2]).all()

        compacted = live.compact()
        assert compacted.unimodal is not None, "the published posts keep their parts"
        assert np.isnan(compacted.unimodal.weights[-1]).all(), "the old record's row: NaN throughout"
        np.testing.assert_array_equal(compacted.unimodal.image[:-1], unimodal.image)
    built = tmp_path / "compacted"
    build_index_dir(
        built, compacted.ids, compacted.vectors, weights_fingerprint=FINGERPRINT, unimodal=compacted.unimodal
    )
    reloaded = load_index_dir(built, FINGERPRINT, use_gpu=False).unimodal
    assert reloaded is not None and np.isnan(reloaded.text[-1]).all(), "the NaN row survives the file"


def test_a_unimodal_row_nan_in_part_only_is_refused() -> None:
    image, text, weights, _ = _posts(4, seed=0)
    image[2, 0] = np.nan
    with pytest.raises(SearchIndexError, match="image holds NaN or infinite values outside unknown rows"):
        UnimodalVectors.from_float32(image, text, weights)


def test_an_upsert_with_parts_of_the_wrong_shape_is_refused_before_it_is_journalled(tmp_path: Path) -> None:
    _, _, _, fused = _posts(40, seed=0)
    build_index_dir(tmp_path / "index", [f"post-{i}" for i in range(40)], fused, weights_fingerprint=FINGERPRINT)
    base = load_index_dir(tmp_path / "index", FINGERPRINT, use_gpu=False)
    image, text, weights, vectors = _posts(1, seed=1)
    parts = PostParts(image=image[0, :16], text=text[0], weights=weights[0])
    with MutableIndex.open(base, tmp_path / "changes.journal") as live:
        with pytest.raises(InvalidPostError, match=r"post 'bad': score parts of shapes \[\[16\], \[32\], \[2\]\]"):
            live.upsert([PostUpsert(id="bad", vector=vectors[0], parts=parts)], weights_fingerprint=FINGERPRINT)
        assert live.state().sequence == 0 and live.state().upserted == 0
