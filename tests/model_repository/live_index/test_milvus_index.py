"""MilvusLiveIndex on Milvus Lite (in-process, a temporary database): what the served suites do not reach.

The similar-posts and live-change suites run it through a real tritonserver; here: an
approximate version searched wider when a filter leaves it short, score parts kept per post,
and the protocol's refusals.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from postsim.core.errors import InvalidPostError, SearchIndexError
from postsim.model_repository.live_index.filters import PostFilter
from postsim.model_repository.live_index.metadata import PostMetadata
from postsim.model_repository.live_index.milvus_index import MilvusLiveIndex
from postsim.model_repository.live_index.protocol import PostUpsert
from postsim.model_repository.milvus_store import MilvusIndexSpec, MilvusIndexType, MilvusSettings, MilvusStore
from postsim.model_repository.score_parts import PostParts

pytest.importorskip("pymilvus", reason="the milvus extra (pymilvus, milvus-lite) runs these tests")
pytest.importorskip("milvus_lite", reason="the milvus extra (pymilvus, milvus-lite) runs these tests")

DIM = 16
COUNT = 2_000
RARE_EVERY = 200
"""10 of 2,000 posts carry the label ``rare``."""


def _unit(vectors: np.ndarray) -> np.ndarray:
    return (vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MilvusLiveIndex, np.ndarray]]:
    """An IVF_FLAT version probing one list of 32: a filter keeping 10 posts finds few of them at that setting."""
    settings = MilvusSettings(uri=str(Path(tmp_path_factory.mktemp("milvus-index")) / "milvus.db"))
    fingerprint = secrets.token_hex(8)
    vectors = _unit(np.random.default_rng(3).standard_normal((COUNT, DIM)))
    metadata = [PostMetadata(label="rare" if row % RARE_EVERY == 0 else "common") for row in range(COUNT)]
    spec = MilvusIndexSpec(index_type=MilvusIndexType.IVF_FLAT, build_params={"nlist": 32}, search_params={"nprobe": 1})
    with MilvusStore(settings, weights_fingerprint=fingerprint, dimension=DIM) as store:
        with pytest.raises(SearchIndexError, match="no index version is published"):
            MilvusLiveIndex.open(settings, weights_fingerprint=fingerprint, dimension=DIM)
        ids = [f"p{row}" for row in range(COUNT)]
        store.publish(store.create_version(ids, vectors, metadata, spec))
    with MilvusLiveIndex.open(settings, weights_fingerprint=fingerprint, dimension=DIM) as index:
        yield index, vectors


def test_a_short_approximate_search_is_searched_wider_until_k_pass(live: tuple[MilvusLiveIndex, np.ndarray]) -> None:
    index, vectors = live
    rare = PostFilter(labels=frozenset({"rare"}))
    expected = {f"p{row}" for row in range(0, COUNT, RARE_EVERY)}
    (narrow,) = index.store.search(vectors[1:2], 10, post_filter=rare)
    assert len(narrow) < 10, "one list of 32 should hold few of the 10 rare posts: the test would prove nothing"
    (hits,) = index.search(vectors[1:2], 10, where=rare)
    assert {hit.id for hit in hits} == expected
    scores = [hit.score for hit in hits]
    assert scores == sorted(scores, reverse=True)
    exact = sorted((float(vectors[1] @ vectors[row]) for row in range(0, COUNT, RARE_EVERY)), reverse=True)
    np.testing.assert_allclose(scores, exact, atol=1e-5)


def test_upserted_parts_split_scores_and_unknown_parts_are_nan(live: tuple[MilvusLiveIndex, np.ndarray]) -> None:
    index, _ = live
    rng = np.random.default_rng(9)
    image, text = _unit(rng.standard_normal(DIM)), _unit(rng.standard_normal(DIM))
    weights = np.array([0.3, 0.7], dtype=np.float32)
    fused = _unit(weights[0] * image + weights[1] * text)
    parts = PostParts(image=image, text=text, weights=weights)
    receipt = index.upsert(
        [PostUpsert(id="with-parts", vector=fused, parts=parts)], weights_fingerprint=index.store.fingerprint
    )
    assert receipt.upserted == 1 and receipt.replaced == 0 and receipt.sequence > 0
    (hits,) = index.search(fused[None], 1)
    assert hits[0].id == "with-parts" and hits[0].row == -1
    split = index.split_hits(image[None], text[None], weights[None], [hits])
    assert split.shape == (1, 1, 4)
    assert float(split.sum()) == pytest.approx(hits[0].score, abs=2e-3)
    assert np.isnan(index.stored_parts(["p5"])[2]).all()  # published without parts
    second = index.upsert([PostUpsert(id="with-parts", vector=fused)], weights_fingerprint=index.store.fingerprint)
    assert second.replaced_ids == ("with-parts",) and second.sequence > receipt.sequence
    assert np.isnan(index.stored_parts(["with-parts"])[0]).all()  # replaced by a post without parts


def test_changes_and_queries_are_refused_as_the_protocol_says(live: tuple[MilvusLiveIndex, np.ndarray]) -> None:
    index, vectors = live
    post = PostUpsert(id="x", vector=vectors[0])
    with pytest.raises(InvalidPostError, match="weights fingerprint"):
        index.upsert([post], weights_fingerprint="0" * 16)
    with pytest.raises(InvalidPostError, match="repeated"):
        index.upsert([post, post], weights_fingerprint=index.store.fingerprint)
    before = index.state().live_count
    index.upsert([PostUpsert(id="gone", vector=vectors[3])], weights_fingerprint=index.store.fingerprint)
    assert index.state().live_count == before + 1
    receipt = index.delete(["gone", "never-there"])
    assert receipt.deleted == 1 and receipt.unknown_ids == ("never-there",)
    assert index.state().live_count == before
    with pytest.raises(InvalidPostError, match="'gone': no indexed post has this id"):
        index.search_by_id(["gone"], 3)
    (by_id,) = index.search_by_id(["p7"], 3)
    assert "p7" not in {hit.id for hit in by_id} and len(by_id) == 3
    with pytest.raises(SearchIndexError, match="no change journal to compact"):
        index.compact()
