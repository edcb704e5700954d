"""The four-part split of a score, in-process: the algebra, the index file that carries it, its checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from postsim.core.errors import SearchIndexError
from postsim.indexing.build import build_index_dir
from postsim.model_repository.live_index.mutable_index import MutableIndex
from postsim.model_repository.live_index.protocol import PostUpsert
from postsim.model_repository.score_parts import UNIMODAL_FILE, UnimodalVectors, split_scores
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


def test_a_live_index_splits_its_published_rows_and_answers_nan_for_upserted_ones(tmp_path: Path) -> None:
    image, text, weights, fused = _posts(COUNT, seed=0)
    ids = [f"post-{i}" for i in range(COUNT)]
    unimodal = UnimodalVectors.from_float32(image, text, weights)
    build_index_dir(tmp_path / "index", ids, fused, weights_fingerprint=FINGERPRINT, unimodal=unimodal)
    base = load_index_dir(tmp_path / "index", FINGERPRINT, use_gpu=False)
    with MutableIndex.open(base, tmp_path / "changes.journal") as live:
        live.delete(["post-3"])
        compacted = live.compact()
        assert compacted.unimodal is not None, "only deletes: every live row keeps its parts"
        np.testing.assert_array_equal(compacted.unimodal.image, unimodal.image[[i for i in range(COUNT) if i != 3]])

        query_image, query_text, query_weights, query = _posts(4, seed=1)
        live.upsert([PostUpsert(id="new", vector=query[0])], weights_fingerprint=FINGERPRINT)
        hits = live.search(query, 10)
        rows = np.array([[hit.row for hit in row] for row in hits])
        parts = live.split_scores(query_image, query_text, query_weights, rows)
        scores = np.array([[hit.score for hit in row] for row in hits])
        published = rows < COUNT
        assert hits[0][0].id == "new" and not published[0, 0]
        assert np.isnan(parts[~published]).all(), "an upserted post's parts are not journalled: NaN"
        np.testing.assert_allclose(parts[published].sum(axis=-1), scores[published], atol=1e-3)

        by_id = live.search_by_id(["post-7", "new"], 10)
        stored = live.stored_parts(["post-7", "new"])
        rows = np.array([[hit.row for hit in row] for row in by_id])
        parts = live.split_scores(*stored, rows)
        # a published post queried by id splits with its stored parts
        np.testing.assert_allclose(parts[0].sum(axis=-1), [hit.score for hit in by_id[0]], atol=1e-3)
        assert np.isnan(parts[1]).all(), "an upserted post queried by id has no stored parts"

        assert live.compact().unimodal is None, "an upserted live post has no parts: the new version keeps none"
