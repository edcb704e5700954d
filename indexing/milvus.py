"""Building an index version in Milvus, chosen and tuned as ``postsim index build`` does for FAISS.

:func:`choose_milvus_index` maps the FAISS build's measured choice onto Milvus's index types:
exact search below ``EXACT_SEARCH_MAX_COUNT`` posts; above it IVF over full vectors
(``IVF_FLAT``: exact distances within the lists probed, as FAISS's IVF-PQ with exact rerank
gives) on CPU clusters, or ``GPU_CAGRA`` where the Milvus cluster has GPUs; HNSW and
``GPU_IVF_PQ`` on request. The build parameters are the FAISS build's (list count, graph
degree). :func:`tune_milvus_search` then searches 500 posts of the corpus against exact
search, raising the index's search parameter in powers of two until recall@10 reaches the
same target as the FAISS build, and :func:`build_milvus_version` records the result in the
version's manifest.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from postsim.core.errors import SearchIndexError
from postsim.indexing.build import (
    HNSW_MAX_EF_SEARCH,
    TUNING_K,
    TUNING_QUERIES,
    TUNING_RECALL,
    IndexType,
    choose_index,
    climb_until_recall,
    doubling_ladder,
    recall_of,
    without_self,
)
from postsim.indexing.publish import install_retrieval_version
from postsim.model_repository.configs import retrieval_settings
from postsim.model_repository.live_index.metadata import PostMetadata
from postsim.model_repository.manifest import WeightsManifest
from postsim.model_repository.milvus_store import MilvusIndexSpec, MilvusIndexType, MilvusSettings, MilvusStore
from postsim.model_repository.score_parts import PostParts
from postsim.model_repository.search_index import exact_storage, load_index_dir

__all__ = [
    "MILVUS_VERSION_FILE",
    "MilvusBuild",
    "MilvusTuning",
    "build_milvus_version",
    "choose_milvus_index",
    "install_milvus_version",
    "rollback_milvus",
    "tune_milvus_search",
]

logger = logging.getLogger("postsim")

MILVUS_VERSION_FILE = "milvus.json"
"""In a retrieval version folder of a milvus repository: the Milvus version its publish wrote (a record; the
retrieval model serves whatever the alias points to)."""
CAGRA_GRAPH_DEGREE = 32
"""GPU_CAGRA's graph degree, as HNSW's M: the FAISS build's measured graph size."""
CAGRA_MAX_ITOPK = 1024
PQ_BYTES_PER_VECTOR_DIVISOR = 4
"""GPU_IVF_PQ: one 8-bit code per 4 dimensions (64 bytes a post at 256 dimensions)."""


def choose_milvus_index(
    count: int, dim: int, index_type: MilvusIndexType | None = None, *, gpu: bool = False
) -> MilvusIndexSpec:
    """The Milvus index for ``count`` posts of ``dim`` floats, untuned; ``index_type`` None: automatic.

    The search parameters start at the widest setting (every list, the FAISS build's
    ``efSearch``); :func:`tune_milvus_search` lowers them.
    """
    if index_type is None:
        plan = choose_index(count, dim)
        if plan.index_type is IndexType.FLAT:
            index_type = MilvusIndexType.FLAT
        else:
            index_type = MilvusIndexType.GPU_CAGRA if gpu else MilvusIndexType.IVF_FLAT
    elif index_type.on_gpu and not gpu:
        raise SearchIndexError(f"{index_type.value} runs on Milvus's GPU build only: build it with gpu=True")
    if index_type is MilvusIndexType.FLAT:
        return MilvusIndexSpec(index_type=index_type)
    if index_type is MilvusIndexType.HNSW:
        hnsw = choose_index(count, dim, IndexType.HNSW).params
        return MilvusIndexSpec(
            index_type=index_type,
            build_params={"M": hnsw["M"], "efConstruction": hnsw["efConstruction"]},
            search_params={"ef": hnsw["efSearch"]},
        )
    if index_type is MilvusIndexType.GPU_CAGRA:
        return MilvusIndexSpec(
            index_type=index_type,
            build_params={"intermediate_graph_degree": 2 * CAGRA_GRAPH_DEGREE, "graph_degree": CAGRA_GRAPH_DEGREE},
            search_params={"itopk_size": CAGRA_MAX_ITOPK, "search_width": 4},
        )
    nlist = choose_index(count, dim, IndexType.IVFPQ).params["nlist"]
    if index_type is MilvusIndexType.IVF_FLAT:
        return MilvusIndexSpec(index_type=index_type, build_params={"nlist": nlist}, search_params={"nprobe": nlist})
    if dim % PQ_BYTES_PER_VECTOR_DIVISOR:
        raise SearchIndexError(f"GPU_IVF_PQ needs a dimension divisible by {PQ_BYTES_PER_VECTOR_DIVISOR}, got {dim}")
    return MilvusIndexSpec(
        index_type=index_type,
        build_params={"nlist": nlist, "m": dim // PQ_BYTES_PER_VECTOR_DIVISOR, "nbits": 8},
        search_params={"nprobe": nlist},
    )


def _search_ladder(spec: MilvusIndexSpec, name: str, k: int) -> list[int]:
    """Values of the tuned search parameter ``name`` to try, cheapest first: powers of two up to the widest."""
    if name == "nprobe":
        return doubling_ladder(1, spec.build_params["nlist"])
    return doubling_ladder(k, HNSW_MAX_EF_SEARCH if name == "ef" else CAGRA_MAX_ITOPK)


@dataclass(frozen=True, kw_only=True)
class MilvusTuning:
    spec: MilvusIndexSpec
    """The spec with the chosen search parameter."""
    recall: float
    queries: int
    reached: bool


def tune_milvus_search(
    store: MilvusStore,
    version: int,
    ids: Sequence[str],
    vectors: np.ndarray,
    *,
    recall_target: float = TUNING_RECALL,
    queries: int = TUNING_QUERIES,
    k: int = TUNING_K,
    seed: int = 0,
) -> MilvusTuning:
    """The cheapest search setting of ``version`` whose recall@k reaches ``recall_target`` on its own posts.

    As the FAISS build's ``tune_search``: ``queries`` posts of the corpus, each searched
    without itself, against exact search over the corpus. When no setting reaches the
    target the widest is kept and a warning says so. Exact indexes are returned as they are.
    """
    spec = store.manifest(version).spec
    name = spec.index_type.tuned_param
    k = min(k, len(ids) - 1)
    if name is None or k < 1:
        return MilvusTuning(spec=spec, recall=1.0, queries=0, reached=True)
    units = np.ascontiguousarray(vectors, dtype=np.float32).copy()
    faiss.normalize_L2(units)
    sample = np.sort(np.random.default_rng(seed).choice(len(units), size=min(queries, len(units)), replace=False))
    _, exact = faiss.knn(units[sample], units, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    truth = without_self(exact, sample, k)
    row_of = {post_id: row for row, post_id in enumerate(ids)}

    def recall_at(value: int) -> float:
        found = store.search(units[sample], k + 1, version=version, search_params={**spec.search_params, name: value})
        rows = np.array([[row_of[n.id] for n in row] + [-1] * (k + 1 - len(row)) for row in found])
        return recall_of(truth, without_self(rows, sample, k))

    climbed = climb_until_recall(
        _search_ladder(spec, name, k + 1),
        recall_at,
        recall_target=recall_target,
        setting=f"Milvus {spec.index_type.value} search: {name}",
        k=k,
        queries=len(sample),
        not_reached_hint="consider FLAT",
    )
    tuned = dataclasses.replace(spec, search_params={**spec.search_params, name: climbed.value})
    return MilvusTuning(spec=tuned, recall=climbed.recall, queries=len(sample), reached=climbed.reached)


@dataclass(frozen=True, kw_only=True)
class MilvusBuild:
    version: int
    tuning: MilvusTuning


def build_milvus_version(
    store: MilvusStore,
    ids: Sequence[str],
    vectors: np.ndarray,
    metadata: Sequence[PostMetadata],
    *,
    captions: Sequence[str] | None = None,
    parts: Sequence[PostParts | None] | None = None,
    index_type: MilvusIndexType | None = None,
    gpu: bool = False,
    recall_target: float = TUNING_RECALL,
    progress: Callable[[int, int], None] | None = None,
) -> MilvusBuild:
    """Write the posts as a new version, tune its search on them and record it; :meth:`MilvusStore.publish` serves it."""
    spec = choose_milvus_index(len(ids), store.dimension, index_type, gpu=gpu)
    version = store.create_version(ids, vectors, metadata, spec, captions=captions, parts=parts, progress=progress)
    tuning = tune_milvus_search(store, version, ids, vectors, recall_target=recall_target)
    store.set_search_params(version, tuning.spec, recall=tuning.recall)
    return MilvusBuild(version=version, tuning=tuning)


def _repository_store(repository: Path, fingerprint: str, dimension: int) -> MilvusStore:
    retrieval = retrieval_settings(repository)
    return MilvusStore(MilvusSettings(uri=retrieval.milvus_uri), weights_fingerprint=fingerprint, dimension=dimension)


def install_milvus_version(index_dir: Path, repository: Path) -> Path:
    """``postsim index publish`` for a milvus repository: the built index as a new Milvus version, served.

    The index folder (as ``postsim index build`` writes it, verified against the repository's
    weights) is written into a new collection version, tuned as :func:`build_milvus_version`
    does, and the encoders' alias switched to it: every replica serves it from its next
    search. A retrieval version folder recording it (:data:`MILVUS_VERSION_FILE`) is installed
    and returned, for the server to load retrieval when it has not yet.
    """
    weights = WeightsManifest.read(repository)
    loaded = load_index_dir(index_dir, expected_fingerprint=weights.fingerprint, use_gpu=False)
    storage = exact_storage(loaded.cpu_index)
    if storage is None:
        raise SearchIndexError(
            f"{index_dir} keeps no full vectors to write into Milvus: rebuild it with `postsim index build`"
        )
    count = len(loaded.ids)
    vectors = storage.reconstruct_n(0, count)
    columns = loaded.metadata
    metadata = [columns.row(row) if columns is not None else PostMetadata() for row in range(count)]
    parts: list[PostParts | None] = [None] * count
    if loaded.unimodal is not None:
        unimodal = loaded.unimodal
        known = ~np.isnan(unimodal.weights.astype(np.float32)).all(axis=1)
        parts = [
            PostParts(image=unimodal.image[row], text=unimodal.text[row], weights=unimodal.weights[row])
            if known[row]
            else None
            for row in range(count)
        ]
    with _repository_store(repository, weights.fingerprint, weights.dim) as store:
        build = build_milvus_version(store, loaded.ids, vectors, metadata, captions=loaded.captions, parts=parts)
        store.publish(build.version)
        record = {
            "milvus_uri": store.settings.uri,
            "alias": store.alias,
            "collection": store.collection_name(build.version),
        }
    record["index_dir"] = str(index_dir)
    text = json.dumps(record, indent=2) + "\n"

    def fill(staging: Path) -> None:
        (staging / MILVUS_VERSION_FILE).write_text(text)

    return install_retrieval_version(repository, fill)


def rollback_milvus(repository: Path) -> int:
    """``postsim index rollback`` for a milvus repository: the alias back to the previous Milvus version."""
    weights = WeightsManifest.read(repository)
    with _repository_store(repository, weights.fingerprint, weights.dim) as store:
        return store.rollback()
