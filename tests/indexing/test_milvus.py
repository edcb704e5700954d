"""Choosing and tuning a Milvus index as the FAISS build does, on a real Milvus Lite."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import pytest

from postsim.bench.index_bench import ClusteredVectors
from postsim.core.errors import SearchIndexError
from postsim.indexing import build as indexing
from postsim.indexing.milvus import build_milvus_version, choose_milvus_index
from postsim.model_repository.live_index.metadata import PostMetadata
from postsim.model_repository.milvus_store import MilvusIndexType, MilvusSettings, MilvusStore

pytest.importorskip("pymilvus", reason="the milvus extra (pymilvus, milvus-lite) runs these tests")
pytest.importorskip("milvus_lite", reason="the milvus extra (pymilvus, milvus-lite) runs these tests")

DIM = 64


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("milvus") / "milvus.db"


@pytest.fixture
def store(database: Path) -> Iterator[MilvusStore]:
    with MilvusStore(
        MilvusSettings(uri=str(database)), weights_fingerprint=secrets.token_hex(8), dimension=DIM
    ) as opened:
        yield opened


def clustered(count: int, seed: int) -> np.ndarray:
    return ClusteredVectors(dim=DIM, topics=20, subjects=400).sample(count, np.random.default_rng(seed))


def held_out_recall(store: MilvusStore, ids: list[str], base: np.ndarray, queries: np.ndarray, k: int = 10) -> float:
    """Recall@k of the published version for queries that are not in it, against exact search."""
    _, truth = faiss.knn(queries, base, k, metric=faiss.METRIC_INNER_PRODUCT)
    row_of = {post_id: row for row, post_id in enumerate(ids)}
    found = [[row_of[n.id] for n in row] for row in store.search(queries, k)]
    return indexing.recall_of(truth, found)


def test_automatic_choice_follows_the_faiss_build() -> None:
    assert choose_milvus_index(1_000, 256).index_type is MilvusIndexType.FLAT
    ivf = choose_milvus_index(1_000_000, 256)
    assert ivf.index_type is MilvusIndexType.IVF_FLAT
    assert ivf.build_params["nlist"] == indexing.choose_index(1_000_000, 256, indexing.IndexType.IVFPQ).params["nlist"]
    assert ivf.search_params["nprobe"] == ivf.build_params["nlist"], "untuned: every list"
    assert choose_milvus_index(1_000_000, 256, gpu=True).index_type is MilvusIndexType.GPU_CAGRA
    pq = choose_milvus_index(1_000_000, 256, MilvusIndexType.GPU_IVF_PQ, gpu=True)
    assert pq.build_params["m"] == 64 and pq.build_params["nbits"] == 8, "64 bytes a post"
    with pytest.raises(SearchIndexError, match="GPU build"):
        choose_milvus_index(1_000_000, 256, MilvusIndexType.GPU_CAGRA)


@pytest.mark.parametrize(("index_type", "param"), [(MilvusIndexType.IVF_FLAT, "nprobe"), (MilvusIndexType.HNSW, "ef")])
def test_tuning_lowers_the_search_until_the_target_on_the_corpus_and_records_it(
    store: MilvusStore, index_type: MilvusIndexType, param: str
) -> None:
    base = clustered(6_000, seed=0)
    ids = [f"p{i}" for i in range(len(base))]
    build = build_milvus_version(store, ids, base, [PostMetadata()] * len(ids), index_type=index_type)
    tuning = build.tuning
    assert tuning.reached and tuning.recall >= indexing.TUNING_RECALL and tuning.queries == indexing.TUNING_QUERIES
    untuned = choose_milvus_index(len(ids), DIM, index_type).search_params[param]
    assert tuning.spec.search_params[param] < untuned, "clustered posts need less than the widest search"
    manifest = store.manifest(build.version)
    assert manifest.spec == tuning.spec and manifest.recall == tuning.recall, "the serving side reads what was tuned"


def test_the_default_ann_index_keeps_recall_095_on_posts_it_has_not_seen(store: MilvusStore) -> None:
    base = clustered(6_000, seed=0)
    ids = [f"p{i}" for i in range(len(base))]
    build = build_milvus_version(store, ids, base, [PostMetadata()] * len(ids), index_type=MilvusIndexType.IVF_FLAT)
    store.publish(build.version)
    assert held_out_recall(store, ids, base, clustered(200, seed=1)) >= 0.95


def test_exact_search_needs_no_tuning(store: MilvusStore) -> None:
    base = clustered(500, seed=2)
    ids = [f"p{i}" for i in range(len(base))]
    build = build_milvus_version(store, ids, base, [PostMetadata()] * len(ids))
    assert build.tuning.spec.index_type is MilvusIndexType.FLAT and build.tuning.recall == 1.0
    store.publish(build.version)
    assert held_out_recall(store, ids, base, clustered(50, seed=3)) == 1.0
