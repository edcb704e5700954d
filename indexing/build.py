"""Building FAISS indexes from post embeddings and writing them as index directories.

The directory format, its manifest and verified loading are in
``postsim.model_repository.search_index``; this module writes what that one reads.

Typical use, what ``postsim index build`` does::

    manifest = build_index_dir(out_dir, ids, embeddings, weights_fingerprint=fingerprint)

or step by step: :func:`choose_index`, :func:`build_index`, :func:`new_manifest`,
:func:`write_index_dir`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import faiss
import numpy as np

from postsim.core.errors import SearchIndexError
from postsim.core.files import fsync_path, write_text_atomic
from postsim.model_repository.contract import post_caption, post_id_problem
from postsim.model_repository.live_index.metadata import MetadataColumns
from postsim.model_repository.score_parts import UNIMODAL_FILE, UnimodalVectors
from postsim.model_repository.search_index import (
    CAPTIONS_FILE,
    IDS_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    METADATA_FILE,
    IndexManifest,
    IndexType,
    configure_search,
    sha256_file,
)

__all__ = [
    "EXACT_SEARCH_MAX_COUNT",
    "IndexPlan",
    "IndexType",
    "SearchTuning",
    "build_index",
    "build_index_dir",
    "choose_index",
    "measure_recall",
    "new_index",
    "new_manifest",
    "post_caption",
    "recall_of",
    "train_index",
    "tune_search",
    "write_index_dir",
]

logger = logging.getLogger("postsim")

EXACT_SEARCH_MAX_COUNT = 50_000
"""AUTO uses exact search below this many posts, an approximate index from here on."""

# Starting points measured on 1M random unit vectors of 256 floats (the hardest case for
# approximate search) on 2 shared CPU cores; `postsim bench index`, single-query p50:
#   Flat (exact)                                        recall@10 1.000  p50 45 ms (1 thread)
#   IVF1024,PQ128x4fs,RFlat nprobe 1024, k_factor 40:  recall@10 0.983  p50  8 ms (1 thread)
#   IVF1024,PQ256x4fs,RFlat nprobe  896, k_factor 10:  recall@10 0.985  p50 13 ms
#   IVF1024,PQ128x4fs,RFlat nprobe 1024, k_factor 20:  recall@10 0.959  p50 11 ms (too close)
#   HNSW32, efConstruction 40 (9 to 14 min to build):   recall@10 0.17 at efSearch 512,
#                                                       0.47 at 2048, 0.67 at 4096 (84 ms)
# No index reached recall 0.95 within 1 ms on this data: random vectors have no structure
# for an index to exploit. Real embeddings are far easier: build_index_dir() tunes nprobe
# (efSearch for HNSW) down on the corpus itself, see tune_search().
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
HNSW_EF_SEARCH = 512
IVF_LISTS_PER_SQRT_COUNT = 1
"""nlist = this × sqrt(count), rounded to a power of two."""
IVF_PROBE_FRACTION = 1.0
"""nprobe = this × nlist: on random vectors every probe skipped costs recall."""
PQ_DIMS_PER_SUBQUANTIZER = 2
PQ_NBITS = 4
"""4-bit codes: FAISS's fast-scan kernels."""
REFINE_K_FACTOR = 40
"""The PQ search keeps k × this candidates, reranked on the exact vectors."""
TRAINING_POINTS_PER_LIST = 64
TUNING_RECALL = 0.97
"""Recall@10 :func:`tune_search` asks of the search on posts of the corpus: the 0.95 postsim
promises plus a margin for estimating it from a sample."""
TUNING_QUERIES = 500
"""Posts of the corpus :func:`tune_search` uses as queries (500: recall known to about ±0.01)."""
TUNING_K = 10
HNSW_MAX_EF_SEARCH = 4096
_TUNED_PARAM = {IndexType.IVFPQ: "nprobe", IndexType.HNSW: "efSearch"}
"""The search parameter :func:`tune_search` lowers, per approximate index type."""


@dataclass(frozen=True, kw_only=True)
class IndexPlan:
    """Which FAISS index to build, with its build and search parameters.

    ``params`` goes into the manifest as is; the search parameters are applied when the
    index is loaded. Adjust one with ``dataclasses.replace(plan, params={...})``.
    """

    index_type: IndexType
    dimension: int
    params: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.index_type is IndexType.AUTO:
            raise SearchIndexError("an IndexPlan needs a concrete index type; choose_index() resolves AUTO")
        if self.dimension <= 0:
            raise SearchIndexError(f"dimension must be positive, got {self.dimension}")
        required = _REQUIRED_PARAMS[self.index_type]
        if set(self.params) != set(required):
            raise SearchIndexError(
                f"a {self.index_type.value} plan needs the parameters {sorted(required)}, got {sorted(self.params)}"
            )
        if self.index_type is IndexType.IVFPQ:
            if self.dimension % self.params["pq_m"]:
                raise SearchIndexError(f"pq_m={self.params['pq_m']} must divide the dimension {self.dimension}")
            if self.params["pq_nbits"] != PQ_NBITS:
                raise SearchIndexError(f"pq_nbits must be {PQ_NBITS} (fast-scan codes), got {self.params['pq_nbits']}")

    @property
    def factory_string(self) -> str:
        """The plan in FAISS's ``index_factory`` notation."""
        p = self.params
        if self.index_type is IndexType.HNSW:
            return f"HNSW{p['M']},Flat"
        if self.index_type is IndexType.IVFPQ:
            return f"IVF{p['nlist']},PQ{p['pq_m']}x{p['pq_nbits']}fs,RFlat"
        return "Flat"


_REQUIRED_PARAMS: dict[IndexType, tuple[str, ...]] = {
    IndexType.FLAT: (),
    IndexType.HNSW: ("M", "efConstruction", "efSearch"),
    IndexType.IVFPQ: ("nlist", "nprobe", "pq_m", "pq_nbits", "k_factor"),
}


def choose_index(count: int, dim: int, index_type: IndexType = IndexType.AUTO) -> IndexPlan:
    """The index for ``count`` vectors of ``dim`` floats, with postsim's measured defaults.

    AUTO picks exact search below :data:`EXACT_SEARCH_MAX_COUNT` posts and IVF-PQ with
    exact reranking above: on random unit vectors (the hardest case) it was the index that
    reached recall@10 ≥ 0.95 against exact search in the least time; see
    ``bench/index_bench.py``.
    """
    if count <= 0 or dim <= 0:
        raise SearchIndexError(f"count and dim must be positive, got count={count} dim={dim}")
    if index_type is IndexType.AUTO:
        index_type = IndexType.FLAT if count < EXACT_SEARCH_MAX_COUNT else IndexType.IVFPQ
    if index_type is IndexType.FLAT:
        return IndexPlan(index_type=index_type, dimension=dim)
    if index_type is IndexType.HNSW:
        params = {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": HNSW_EF_SEARCH}
        return IndexPlan(index_type=index_type, dimension=dim, params=params)
    return IndexPlan(index_type=index_type, dimension=dim, params=_ivfpq_params(count, dim))


def _ivfpq_params(count: int, dim: int) -> dict[str, int]:
    wanted = IVF_LISTS_PER_SQRT_COUNT * math.sqrt(count)
    nlist = 2 ** round(math.log2(wanted))
    nlist = max(1, min(nlist, count // TRAINING_POINTS_PER_LIST))
    return {
        "nlist": nlist,
        "nprobe": max(1, round(IVF_PROBE_FRACTION * nlist)),
        "pq_m": _pq_subquantizers(dim),
        "pq_nbits": PQ_NBITS,
        "k_factor": REFINE_K_FACTOR,
    }


def _pq_subquantizers(dim: int) -> int:
    """``dim / PQ_DIMS_PER_SUBQUANTIZER`` when that divides, else one subquantizer per dimension."""
    if dim % PQ_DIMS_PER_SUBQUANTIZER == 0:
        return dim // PQ_DIMS_PER_SUBQUANTIZER
    return dim


def build_index(ids: Sequence[str], embeddings: np.ndarray, plan: IndexPlan) -> faiss.Index:
    """Build the planned index over ``embeddings``; row i is the post ``ids[i]``.

    ``embeddings`` is ``[len(ids), plan.dimension]`` float32 with finite, non-zero rows; the
    rows are L2-normalised (on a copy) so inner product is cosine similarity. The search
    parameters are the plan's, untuned; :func:`build_index_dir` also tunes them.
    """
    return _build(_checked_unit_vectors(ids, embeddings, plan.dimension), plan)


def _build(vectors: np.ndarray, plan: IndexPlan) -> faiss.Index:
    index = new_index(plan)
    started = time.perf_counter()
    train_index(index, vectors)
    trained = time.perf_counter()
    index.add(vectors)
    logger.info(
        "built %s index (%s) of %d vectors: train %.1f s, add %.1f s",
        plan.index_type.value,
        plan.factory_string,
        len(vectors),
        trained - started,
        time.perf_counter() - trained,
    )
    return index


def new_index(plan: IndexPlan) -> faiss.Index:
    """An empty index as planned, with its search parameters set."""
    index = faiss.index_factory(plan.dimension, plan.factory_string, faiss.METRIC_INNER_PRODUCT)
    hnsw = faiss.downcast_index(index)
    if isinstance(hnsw, faiss.IndexHNSW):
        hnsw.hnsw.efConstruction = plan.params["efConstruction"]
    configure_search(index, plan.index_type, plan.params)
    return index


def train_index(index: faiss.Index, vectors: np.ndarray, *, seed: int = 0) -> None:
    """Train ``index`` (IVF centroids, PQ codebooks) on a random sample of ``vectors``."""
    if index.is_trained:
        return
    nlist = faiss.extract_index_ivf(index).nlist
    if len(vectors) < nlist:
        raise SearchIndexError(f"an IVF index of {nlist} lists needs at least {nlist} vectors, got {len(vectors)}")
    size = min(len(vectors), TRAINING_POINTS_PER_LIST * nlist)
    sample = np.random.default_rng(seed).choice(len(vectors), size=size, replace=False)
    index.train(vectors[np.sort(sample)])


def _checked_unit_vectors(ids: Sequence[str], embeddings: np.ndarray, dim: int) -> np.ndarray:
    if not isinstance(embeddings, np.ndarray) or embeddings.ndim != 2:
        got = f"shape {embeddings.shape}" if isinstance(embeddings, np.ndarray) else type(embeddings).__name__
        raise SearchIndexError(f"embeddings must be a 2-D [count, {dim}] array, got {got}")
    if embeddings.dtype != np.float32:
        raise SearchIndexError(f"embeddings must be float32, got {embeddings.dtype}")
    if embeddings.shape[1] != dim:
        raise SearchIndexError(f"embeddings have {embeddings.shape[1]} dimensions, the plan expects {dim}")
    if embeddings.shape[0] != len(ids):
        raise SearchIndexError(f"got {embeddings.shape[0]} embeddings for {len(ids)} ids; expected one per id")
    if embeddings.shape[0] == 0:
        raise SearchIndexError("got no embeddings; an index needs at least one post")
    _check_ids(ids)
    if not np.isfinite(embeddings).all():
        rows = np.flatnonzero(~np.isfinite(embeddings).all(axis=1))
        raise SearchIndexError(f"embeddings must be finite; rows {rows[:5].tolist()} hold NaN or infinity")
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    if (norms == 0).any():
        rows = np.flatnonzero(norms[:, 0] == 0)
        raise SearchIndexError(f"embeddings rows {rows[:5].tolist()} are zero vectors, which have no direction")
    return np.ascontiguousarray(embeddings / norms, dtype=np.float32)


def _check_ids(ids: Sequence[str]) -> None:
    not_strings = [post_id for post_id in ids if not isinstance(post_id, str)]
    if not_strings:
        raise SearchIndexError(f"ids must be strings, got {type(not_strings[0]).__name__} ({not_strings[0]!r})")
    for position, post_id in enumerate(ids):
        problem = post_id_problem(post_id)
        if problem:
            raise SearchIndexError(f"ids[{position}]: {problem}")
    if len(set(ids)) != len(ids):
        repeated = sorted(post_id for post_id, times in Counter(ids).items() if times > 1)
        raise SearchIndexError(f"ids must be unique; repeated: {repeated[:5]}")


def measure_recall(index: faiss.Index, embeddings: np.ndarray, queries: np.ndarray, k: int) -> float:
    """Recall@k of ``index`` against exact search over ``embeddings``: the mean share of each
    query's true k nearest neighbours that the index returns."""
    if k <= 0:
        raise SearchIndexError(f"k must be positive, got {k}")
    k = min(k, len(embeddings))
    base = np.ascontiguousarray(embeddings, dtype=np.float32).copy()
    probes = np.ascontiguousarray(queries, dtype=np.float32).copy()
    faiss.normalize_L2(base)
    faiss.normalize_L2(probes)
    _, exact = faiss.knn(probes, base, k, metric=faiss.METRIC_INNER_PRODUCT)
    _, found = index.search(probes, k)
    return recall_of(exact, found)


def recall_of(truth: Iterable[Iterable[int]], found: Iterable[Iterable[int]]) -> float:
    """The share of the true neighbours found, over all queries: one row of ids per query,
    FAISS's -1 padding ignored."""
    expected = hits = 0
    for true_rows, found_rows in zip(truth, found, strict=True):
        true_set = {int(row) for row in true_rows if row >= 0}
        expected += len(true_set)
        hits += len(true_set & {int(row) for row in found_rows})
    return hits / max(expected, 1)


@dataclass(frozen=True, kw_only=True)
class SearchTuning:
    """What :func:`tune_search` chose, and the recall it measured for it."""

    plan: IndexPlan
    """The plan with the chosen search parameter (the one to write into the manifest)."""
    recall: float
    """Recall@k of the chosen setting on the sampled posts; 1.0 for exact search."""
    queries: int
    """How many posts of the corpus it was measured on (0 for exact search)."""
    reached: bool
    """Whether ``recall`` reached the target asked for."""


def tune_search(
    index: faiss.Index,
    plan: IndexPlan,
    vectors: np.ndarray,
    *,
    recall_target: float = TUNING_RECALL,
    queries: int = TUNING_QUERIES,
    k: int = TUNING_K,
    seed: int = 0,
) -> SearchTuning:
    """The cheapest search setting of ``index`` whose recall@k reaches ``recall_target`` on this corpus.

    How far an approximate index must search depends on the data: random vectors need every
    IVF list probed, real embeddings cluster and need a few. So the search is tuned on the
    corpus itself: ``queries`` of its own (L2-normalised) ``vectors`` are searched, each
    without itself, against exact search, raising ``nprobe`` (``efSearch`` for HNSW) in
    powers of two until the recall reaches the target. ``index`` is left configured with the
    setting chosen; when none reaches the target, the largest one tried is kept and a
    warning says so. Exact indexes are returned as they are.
    """
    name = _TUNED_PARAM.get(plan.index_type)
    k = min(k, len(vectors) - 1)
    if name is None or k < 1:
        return SearchTuning(plan=plan, recall=1.0, queries=0, reached=True)
    sample = np.sort(np.random.default_rng(seed).choice(len(vectors), size=min(queries, len(vectors)), replace=False))
    probes = np.ascontiguousarray(vectors[sample])
    _, exact = faiss.knn(probes, vectors, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    truth = without_self(exact, sample, k)

    def recall_at(value: int) -> float:
        configure_search(index, plan.index_type, {**plan.params, name: value})
        _, found = index.search(probes, k + 1)
        return recall_of(truth, without_self(found, sample, k))

    if plan.index_type is IndexType.IVFPQ:
        ladder = doubling_ladder(1, plan.params["nlist"])
    else:
        ladder = doubling_ladder(TUNING_K, HNSW_MAX_EF_SEARCH)
    climbed = climb_until_recall(
        ladder,
        recall_at,
        recall_target=recall_target,
        setting=f"{plan.index_type.value} search: {name}",
        k=k,
        queries=len(sample),
        not_reached_hint="consider --index-type flat",
    )
    tuned = dataclasses.replace(plan, params={**plan.params, name: climbed.value})
    configure_search(index, tuned.index_type, tuned.params)
    return SearchTuning(plan=tuned, recall=climbed.recall, queries=len(sample), reached=climbed.reached)


def doubling_ladder(low: int, high: int) -> list[int]:
    """Search settings to try, cheapest first: the powers of two from ``low`` up to below ``high``, then ``high``."""
    return [*(2**power for power in range(math.ceil(math.log2(low)), math.ceil(math.log2(high)))), high]


class ClimbedSetting(NamedTuple):
    value: int
    """The first setting that reached the target, or the last one tried."""
    recall: float
    reached: bool


def climb_until_recall(
    ladder: Sequence[int],
    recall_at: Callable[[int], float],
    *,
    recall_target: float,
    setting: str,
    k: int,
    queries: int,
    not_reached_hint: str,
) -> ClimbedSetting:
    """Try the settings of ``ladder`` in order until ``recall_at(value)`` reaches ``recall_target``.

    Shared by every engine's tuning (FAISS here, Milvus in :mod:`postsim.indexing.milvus`): it
    logs each step, and the outcome (a warning with ``not_reached_hint`` when no setting reached
    the target, in which case the widest is kept). ``setting`` names what is tuned, for the log.
    """
    started = time.perf_counter()
    value, recall = ladder[0], 0.0
    for value in ladder:
        recall = recall_at(value)
        logger.debug("%s=%d: recall@%d %.3f on %d posts", setting, value, k, recall, queries)
        if recall >= recall_target:
            break
    reached = recall >= recall_target
    (logger.info if reached else logger.warning)(
        "tuned %s=%d reaches recall@%d %.3f on %d posts of the corpus (target %.2f%s; %.1f s)",
        setting,
        value,
        k,
        recall,
        queries,
        recall_target,
        "" if reached else f", NOT reached: {not_reached_hint}",
        time.perf_counter() - started,
    )
    return ClimbedSetting(value, recall, reached)


def without_self(neighbours: np.ndarray, query_rows: np.ndarray, k: int) -> list[np.ndarray]:
    """Each query's first ``k`` neighbours other than itself."""
    return [found[found != query_row][:k] for found, query_row in zip(neighbours, query_rows, strict=True)]


def postsim_version() -> str:
    try:
        return metadata.version("postsim")
    except metadata.PackageNotFoundError:
        return "unknown"


def new_manifest(plan: IndexPlan, count: int, weights_fingerprint: str) -> IndexManifest:
    """The manifest of a freshly built index; :func:`write_index_dir` fills in the checksums."""
    return IndexManifest(
        dimension=plan.dimension,
        count=count,
        index_type=plan.index_type,
        params=dict(plan.params),
        weights_fingerprint=weights_fingerprint,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        index_sha256="",
        ids_sha256="",
        postsim_version=postsim_version(),
    )


def write_index_dir(
    out_dir: str | Path,
    index: faiss.Index,
    ids: Sequence[str],
    manifest: IndexManifest,
    *,
    captions: Sequence[str] | None = None,
    metadata: MetadataColumns | None = None,
    unimodal: UnimodalVectors | None = None,
) -> IndexManifest:
    """Write an index directory atomically and return its manifest, checksums filled in.

    ``captions`` (one string per id, see :func:`post_caption`) go into ``captions.json``,
    and ``metadata`` (one row per id) into ``metadata.npz``, each checksummed like the other
    files; without them the index has none. ``unimodal`` (one row per id) goes into
    ``unimodal.npz`` the same way; without it the index's scores do not split. Everything is
    written into a temporary sibling directory and fsynced; the directory
    then takes ``out_dir``'s place by rename. An existing index at ``out_dir`` stays
    untouched until that last step; an error or KeyboardInterrupt before it leaves
    ``out_dir`` as it was, with no partial files. (Replacing an existing directory takes
    two renames; if the process is killed between them the old index is left next to
    ``out_dir`` as ``.<name>.old-*``.)
    """
    out_dir = Path(out_dir)
    _check_writable_target(out_dir, index, ids, manifest)
    if captions is not None and (
        len(captions) != len(ids) or not all(isinstance(caption, str) for caption in captions)
    ):
        raise SearchIndexError(f"captions must be one string per id: got {len(captions)} for {len(ids)} ids")
    if metadata is not None and len(metadata) != len(ids):
        raise SearchIndexError(f"metadata must be one row per id: got {len(metadata)} for {len(ids)} ids")
    if unimodal is not None and (unimodal.count, unimodal.dimension) != (len(ids), manifest.dimension):
        raise SearchIndexError(
            f"unimodal vectors must be one row of {manifest.dimension} per id: got {unimodal.count} rows "
            f"of {unimodal.dimension} for {len(ids)} ids"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it 0700; the server may run as another user
    try:
        written = _write_files(staging, index, ids, manifest, captions, metadata, unimodal)
        fsync_path(staging)
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_path(out_dir.parent)
    logger.info("wrote %s index of %d vectors to %s", manifest.index_type.value, manifest.count, out_dir)
    return written


def _check_writable_target(out_dir: Path, index: faiss.Index, ids: Sequence[str], manifest: IndexManifest) -> None:
    if index.ntotal != len(ids) or manifest.count != len(ids):
        raise SearchIndexError(
            f"index holds {index.ntotal} vectors, ids {len(ids)}, manifest count {manifest.count}; "
            "expected all three equal"
        )
    if index.d != manifest.dimension:
        raise SearchIndexError(f"index dimension {index.d} differs from the manifest's {manifest.dimension}")
    _check_ids(ids)
    if out_dir.exists() and not out_dir.is_dir():
        raise SearchIndexError(f"{out_dir} exists and is not a directory; choose another output path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_FILE).is_file():
        raise SearchIndexError(
            f"{out_dir} is a non-empty directory without {MANIFEST_FILE}, not an index to replace; "
            "choose an empty or new directory"
        )


def _write_files(
    staging: Path,
    index: faiss.Index,
    ids: Sequence[str],
    manifest: IndexManifest,
    captions: Sequence[str] | None,
    metadata: MetadataColumns | None,
    unimodal: UnimodalVectors | None,
) -> IndexManifest:
    faiss.write_index(index, str(staging / INDEX_FILE))
    fsync_path(staging / INDEX_FILE)
    write_text_atomic(staging / IDS_FILE, json.dumps(list(ids)))
    if captions is not None:
        write_text_atomic(staging / CAPTIONS_FILE, json.dumps(list(captions), ensure_ascii=False))
    if metadata is not None:
        metadata.save(staging / METADATA_FILE)
    if unimodal is not None:
        unimodal.save(staging / UNIMODAL_FILE)
        fsync_path(staging / UNIMODAL_FILE)
    written = dataclasses.replace(
        manifest,
        index_sha256=sha256_file(staging / INDEX_FILE),
        ids_sha256=sha256_file(staging / IDS_FILE),
        captions_sha256=sha256_file(staging / CAPTIONS_FILE) if captions is not None else "",
        metadata_sha256=sha256_file(staging / METADATA_FILE) if metadata is not None else "",
        unimodal_sha256=sha256_file(staging / UNIMODAL_FILE) if unimodal is not None else "",
    )
    write_text_atomic(staging / MANIFEST_FILE, written.to_json())
    return written


def _replace_dir(staging: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.rename(out_dir, backup / out_dir.name)
    try:
        os.rename(staging, out_dir)
    except BaseException:
        if not out_dir.exists():
            os.rename(backup / out_dir.name, out_dir)
            shutil.rmtree(backup, ignore_errors=True)
        raise
    with contextlib.suppress(OSError):
        shutil.rmtree(backup)


def build_index_dir(
    out_dir: str | Path,
    ids: Sequence[str],
    embeddings: np.ndarray,
    *,
    weights_fingerprint: str,
    index_type: IndexType = IndexType.AUTO,
    captions: Sequence[str] | None = None,
    metadata: MetadataColumns | None = None,
    unimodal: UnimodalVectors | None = None,
) -> IndexManifest:
    """Choose, build, tune (:func:`tune_search`) and atomically write an index directory; return its manifest.

    ``captions``, one per id (:func:`post_caption`), are kept to be shown with the neighbours;
    ``metadata``, one row per id, is what a live index filters on; ``unimodal``, one row per
    id, splits their scores.
    """
    if not isinstance(embeddings, np.ndarray) or embeddings.ndim != 2:
        shape = getattr(embeddings, "shape", type(embeddings).__name__)
        raise SearchIndexError(f"embeddings must be a 2-D [count, dim] array, got shape {shape}")
    plan = choose_index(len(ids), embeddings.shape[1], index_type)
    vectors = _checked_unit_vectors(ids, embeddings, plan.dimension)
    index = _build(vectors, plan)
    tuning = tune_search(index, plan, vectors)
    del vectors
    manifest = new_manifest(tuning.plan, len(ids), weights_fingerprint)
    return write_index_dir(out_dir, index, ids, manifest, captions=captions, metadata=metadata, unimodal=unimodal)
