"""FAISS index directories: their manifest, verified loading and search.

This is the server side of retrieval: the ``retrieval`` Python-backend model loads its
index with :func:`load_index_dir` and answers queries with :meth:`LoadedIndex.search`. It
needs numpy and FAISS only. Building and writing index directories lives in
``postsim.indexing.build``.

An index directory holds three to five files::

    index.faiss     the FAISS index (``faiss.write_index``); row i is the post ids[i]
    ids.json        the post ids, strings, in index order
    captions.json   a short caption of each post, in index order ("" when it has no text);
                    indexes built before captions were kept have none
    metadata.npz    each post's author, created_at, label and tags, column by column
                    (``postsim.model_repository.live_index.metadata``), when the corpus had any
    unimodal.npz    each post's unit image and text vectors and modality weights (fp16), which
                    split its score into four parts (``postsim.model_repository.score_parts``);
                    an index built with ``--no-unimodal`` has none
    manifest.json   what the index is, which encoders it belongs to, and the sha256 of
                    the files above

Inside a ``retrieval`` version folder the directory is ``<version>/index/``, next to the
version's ``model.py``.

Vectors are L2-normalised, and every index uses the inner-product metric, so a score is
the cosine similarity of the query and the post.
"""

from __future__ import annotations

import enum
import json
import logging
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import faiss
import numpy as np

from postsim.core.errors import SearchIndexError
from postsim.model_repository.manifest import sha256_file
from postsim.model_repository.score_parts import UNIMODAL_FILE, UnimodalVectors

if TYPE_CHECKING:
    from postsim.model_repository.live_index.metadata import MetadataColumns

logger = logging.getLogger("postsim")

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.json"
CAPTIONS_FILE = "captions.json"
METADATA_FILE = "metadata.npz"
MANIFEST_FILE = "manifest.json"
INDEX_DIRNAME = "index"
"""Name of the index directory inside a ``retrieval`` version folder."""
GPU_MAX_K = 2048
"""The largest k FAISS GPU indexes select; larger searches run on the CPU copy."""
METRIC = "inner_product"
"""The only metric postsim indexes use: cosine similarity on unit vectors."""

_REBUILD_HINT = "rebuild it with `postsim index build` against this model repository"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class IndexType(enum.Enum):
    """The kinds of FAISS index postsim builds. ``AUTO`` is a build-time choice only."""

    AUTO = "auto"
    FLAT = "flat"
    """Exact search (``IndexFlatIP``)."""
    HNSW = "hnsw"
    """Graph search (``IndexHNSWFlat``): parameters ``M``, ``efConstruction``, ``efSearch``."""
    IVFPQ = "ivfpq"
    """Inverted lists of 4-bit PQ codes, reranked exactly (``IndexRefineFlat`` over
    ``IndexIVFPQFastScan``): parameters ``nlist``, ``nprobe``, ``pq_m``, ``pq_nbits``,
    ``k_factor``."""


SEARCH_PARAMS: dict[IndexType, tuple[str, ...]] = {
    IndexType.FLAT: (),
    IndexType.HNSW: ("efSearch",),
    IndexType.IVFPQ: ("nprobe", "k_factor"),
}
"""The manifest parameters applied at load time, per index type."""


@dataclass(frozen=True, kw_only=True)
class IndexManifest:
    """What an index directory holds, written as ``manifest.json``."""

    dimension: int
    count: int
    index_type: IndexType
    params: dict[str, int] = field(default_factory=dict)
    """The index type's parameters (build and search), e.g. ``{"M": 32, "efSearch": 128}``."""
    metric: str = METRIC
    weights_fingerprint: str
    """Fingerprint of the encoders whose embeddings the index holds."""
    created_at: str
    """UTC, ISO 8601."""
    index_sha256: str
    ids_sha256: str
    postsim_version: str
    captions_sha256: str = ""
    """sha256 of ``captions.json``; empty for an index without captions (built before they were kept)."""
    metadata_sha256: str = ""
    """sha256 of ``metadata.npz``; empty for an index without post metadata."""
    unimodal_sha256: str = ""
    """sha256 of ``unimodal.npz``; empty for an index without unimodal vectors (its scores do not split)."""

    def to_json(self) -> str:
        data = asdict(self)
        data["index_type"] = self.index_type.value
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> IndexManifest:
        """Parse a manifest; a missing, unknown or mistyped field is a :class:`SearchIndexError`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise SearchIndexError(f"{MANIFEST_FILE} is not valid JSON ({error}); {_REBUILD_HINT}") from None
        if not isinstance(data, dict):
            raise SearchIndexError(f"{MANIFEST_FILE} must hold a JSON object, got {type(data).__name__}")
        _check_field_names(data)
        _check_field_types(data)
        try:
            index_type = IndexType(data["index_type"])
        except ValueError:
            index_type = IndexType.AUTO
        if index_type is IndexType.AUTO:
            known = [t.value for t in IndexType if t is not IndexType.AUTO]
            raise SearchIndexError(
                f"{MANIFEST_FILE}: unknown index_type {data['index_type']!r}, expected one of {known}"
            )
        manifest = cls(**{**data, "index_type": index_type})
        manifest._check_values()
        return manifest

    def _check_values(self) -> None:
        if self.dimension <= 0 or self.count <= 0:
            raise SearchIndexError(
                f"{MANIFEST_FILE}: dimension and count must be positive, "
                f"got dimension={self.dimension} count={self.count}"
            )
        if self.metric != METRIC:
            raise SearchIndexError(f"{MANIFEST_FILE}: metric must be {METRIC!r}, got {self.metric!r}")
        for name in ("index_sha256", "ids_sha256"):
            if not _SHA256.fullmatch(getattr(self, name)):
                raise SearchIndexError(f"{MANIFEST_FILE}: {name} must be 64 lowercase hex digits")
        for name in ("captions_sha256", "metadata_sha256", "unimodal_sha256"):
            value = getattr(self, name)
            if value and not _SHA256.fullmatch(value):
                raise SearchIndexError(f"{MANIFEST_FILE}: {name} must be 64 lowercase hex digits or empty")
        missing = [name for name in SEARCH_PARAMS[self.index_type] if name not in self.params]
        if missing:
            raise SearchIndexError(
                f"{MANIFEST_FILE}: a {self.index_type.value} index needs the parameters {missing} "
                f"(got {sorted(self.params)}); {_REBUILD_HINT}"
            )


_FIELD_TYPES: dict[str, type] = {
    "dimension": int,
    "count": int,
    "index_type": str,
    "params": dict,
    "metric": str,
    "weights_fingerprint": str,
    "created_at": str,
    "index_sha256": str,
    "ids_sha256": str,
    "postsim_version": str,
    "captions_sha256": str,
    "metadata_sha256": str,
    "unimodal_sha256": str,
}
_OPTIONAL_FIELDS = frozenset({"captions_sha256", "metadata_sha256", "unimodal_sha256"})
"""Fields an older postsim did not write; the manifest's default stands in for them."""


def _check_field_names(data: dict[str, Any]) -> None:
    expected = {f.name for f in fields(IndexManifest)}
    missing = sorted(expected - data.keys() - _OPTIONAL_FIELDS)
    unknown = sorted(data.keys() - expected)
    if missing or unknown:
        raise SearchIndexError(
            f"{MANIFEST_FILE}: missing fields {missing}, unknown fields {unknown}; it was written by "
            f"another postsim version or edited by hand: {_REBUILD_HINT}"
        )


def _check_field_types(data: dict[str, Any]) -> None:
    for name, expected in _FIELD_TYPES.items():
        if name not in data:  # an optional field
            continue
        value = data[name]
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise SearchIndexError(
                f"{MANIFEST_FILE}: field {name!r} must be {expected.__name__}, got {type(value).__name__}"
            )
    for key, value in data["params"].items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise SearchIndexError(f"{MANIFEST_FILE}: parameter {key!r} must be an integer, got {type(value).__name__}")


def configure_search(index: faiss.Index, index_type: IndexType, params: dict[str, int]) -> None:
    """Apply the search-time parameters (``efSearch``, ``nprobe``, ``k_factor``) to a CPU index."""
    index = faiss.downcast_index(index)
    if index_type is IndexType.HNSW and isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = params["efSearch"]
    elif index_type is IndexType.IVFPQ and isinstance(index, faiss.IndexRefine):
        index.k_factor = float(params["k_factor"])
        faiss.extract_index_ivf(index.base_index).nprobe = params["nprobe"]
    elif index_type is not IndexType.FLAT or not isinstance(index, faiss.IndexFlat):
        raise SearchIndexError(
            f"the manifest says {index_type.value}, but the file holds a FAISS {type(index).__name__}; " + _REBUILD_HINT
        )


class SearchHit(NamedTuple):
    """One indexed post found for a query (what ``retrieval`` turns into IDS, SCORES and CAPTIONS)."""

    id: str
    score: float
    """Cosine similarity to the query."""
    caption: str = ""
    """The post's caption as the index keeps it; empty when it has none."""
    row: int = -1
    """The post's row in the index (its position in ``ids.json``)."""


@dataclass(eq=False)
class LoadedIndex:
    """A verified index, ready to search. Build it with :func:`load_index_dir`."""

    index: faiss.Index
    """The index searched: on the CPU, or its GPU copy."""
    ids: list[str]
    captions: list[str]
    """One per id, in the same order; all empty for an index without captions."""
    manifest: IndexManifest
    unimodal: UnimodalVectors | None
    """Each post's parts, to split its scores; None for an index built without them."""
    cpu_index: faiss.Index
    """The index as loaded; searched when ``k`` is beyond what FAISS GPU can select."""
    device: str = "cpu"
    """``cpu`` or ``gpu``."""
    _gpu_resources: Any = None
    """Kept alive as long as a GPU index uses it."""
    metadata: MetadataColumns | None = None
    """The posts' metadata, row by row; None for an index without any."""

    @property
    def dimension(self) -> int:
        return self.manifest.dimension

    def search(self, queries: np.ndarray, k: int) -> list[list[SearchHit]]:
        """The ``k`` posts most similar to each query, best first.

        ``queries`` is ``[batch, dimension]`` float32; each row is L2-normalised before the
        search. A ``k`` above the index size returns the whole index. An approximate index
        may return fewer than ``k`` neighbours; it never returns padding.
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k <= 0:
            raise SearchIndexError(f"k must be a positive integer, got {k!r}")
        normalised = check_queries(queries, self.dimension)
        if normalised.shape[0] == 0:
            return []
        k = min(int(k), len(self.ids))
        index = self.index if self.device == "cpu" or k <= GPU_MAX_K else self.cpu_index
        scores, rows = index.search(normalised, k)
        return [self._hits(row_scores, row_ids) for row_scores, row_ids in zip(scores, rows, strict=True)]

    def _hits(self, scores: np.ndarray, rows: np.ndarray) -> list[SearchHit]:
        found = rows >= 0
        scores, rows = scores[found], rows[found]
        order = np.argsort(-scores, kind="stable")
        return [
            SearchHit(self.ids[row], float(score), self.captions[row], int(row))
            for row, score in zip(rows[order], scores[order], strict=True)
        ]


def check_queries(queries: np.ndarray, dimension: int) -> np.ndarray:
    if not isinstance(queries, np.ndarray) or queries.ndim != 2 or queries.shape[1] != dimension:
        got = f"shape {queries.shape}" if isinstance(queries, np.ndarray) else type(queries).__name__
        raise SearchIndexError(f"queries must be a [batch, {dimension}] array, got {got}")
    if queries.dtype != np.float32:
        raise SearchIndexError(f"queries must be float32, got {queries.dtype}")
    if not np.isfinite(queries).all():
        raise SearchIndexError("queries contain NaN or infinite values")
    norms = np.linalg.norm(queries, axis=1, keepdims=True)
    if (norms == 0).any():
        raise SearchIndexError("a query is the zero vector; it has no direction to search for")
    return np.ascontiguousarray(queries / norms, dtype=np.float32)


def load_index_dir(path: str | Path, expected_fingerprint: str | None, *, use_gpu: bool | None = None) -> LoadedIndex:
    """Load an index directory after checking it is the one its manifest describes.

    Checks, in order: the manifest parses; its weights fingerprint equals
    ``expected_fingerprint`` (the encoders of this model repository; ``None`` skips the
    check); the sha256 of ``index.faiss``, ``ids.json`` and ``captions.json`` (when the
    manifest names one) match the manifest, before FAISS reads a byte; the ids are unique
    strings, the captions one string per id; the index's dimension, size and metric match
    the manifest; the unimodal vectors (when the manifest names them) are fp16 numbers of the
    manifest's count and dimension. Every failure is a :class:`SearchIndexError` that says what to do.

    Security: ``faiss.read_index`` is not safe on untrusted input; a crafted file can
    crash the process or worse. The checksums catch corruption and mismatched files, not
    an attacker who can rewrite the manifest too: load only index directories you built
    or trust, from storage that only you can write.

    ``use_gpu``: ``None`` moves the index to the GPU when FAISS sees one, ``False`` keeps
    it on the CPU, ``True`` requires a GPU.
    """
    directory = Path(path)
    manifest = read_manifest(directory)
    if expected_fingerprint is not None and manifest.weights_fingerprint != expected_fingerprint:
        raise SearchIndexError(
            f"index {directory} was built from encoders with weights fingerprint "
            f"{manifest.weights_fingerprint!r}, but this model repository's is {expected_fingerprint!r}: "
            f"its vectors are not comparable with this repository's queries; {_REBUILD_HINT}"
        )
    _verify_checksum(directory / INDEX_FILE, manifest.index_sha256)
    _verify_checksum(directory / IDS_FILE, manifest.ids_sha256)
    ids = _read_strings(directory / IDS_FILE, manifest.count)
    if len(set(ids)) != len(ids):
        raise SearchIndexError(f"{directory / IDS_FILE} holds duplicate ids; {_REBUILD_HINT}")
    captions = [""] * manifest.count
    if manifest.captions_sha256:
        _verify_checksum(directory / CAPTIONS_FILE, manifest.captions_sha256)
        captions = _read_strings(directory / CAPTIONS_FILE, manifest.count)
    metadata = None
    if manifest.metadata_sha256:
        from postsim.model_repository.live_index.metadata import MetadataColumns

        _verify_checksum(directory / METADATA_FILE, manifest.metadata_sha256)
        metadata = MetadataColumns.load(directory / METADATA_FILE, manifest.count)
    unimodal = read_unimodal(directory, manifest)
    index = _read_index(directory / INDEX_FILE)
    _check_index_matches(index, manifest, directory)
    configure_search(index, manifest.index_type, manifest.params)
    loaded = LoadedIndex(
        index=index,
        ids=ids,
        captions=captions,
        manifest=manifest,
        unimodal=unimodal,
        cpu_index=index,
        metadata=metadata,
    )
    if use_gpu or (use_gpu is None and gpu_available()):
        loaded.index, loaded._gpu_resources = index_to_gpu(index)
        loaded.device = "gpu"
    logger.info(
        "loaded %s index of %d vectors (dim %d, %s) from %s on %s",
        manifest.index_type.value,
        manifest.count,
        manifest.dimension,
        manifest.params,
        directory,
        loaded.device,
    )
    return loaded


def read_manifest(directory: Path) -> IndexManifest:
    """The manifest of an index directory, parsed and checked."""
    if not directory.is_dir():
        raise SearchIndexError(f"index directory {directory} does not exist; build one with `postsim index build`")
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise SearchIndexError(
            f"{directory} has no {MANIFEST_FILE}, so it is not a complete postsim index; {_REBUILD_HINT}"
        )
    try:
        return IndexManifest.from_json(path.read_text(encoding="utf-8"))
    except SearchIndexError as error:
        raise SearchIndexError(f"{directory}: {error}") from None


def read_unimodal(directory: Path, manifest: IndexManifest) -> UnimodalVectors | None:
    """The index's unimodal vectors after their checksum matches; None when it was built without them."""
    if not manifest.unimodal_sha256:
        return None
    _verify_checksum(directory / UNIMODAL_FILE, manifest.unimodal_sha256)
    try:
        return UnimodalVectors.load(directory / UNIMODAL_FILE, count=manifest.count, dimension=manifest.dimension)
    except SearchIndexError as error:
        raise SearchIndexError(f"{error}; {_REBUILD_HINT}") from None


def _verify_checksum(path: Path, expected: str) -> None:
    if not path.is_file():
        raise SearchIndexError(f"{path} is missing; {_REBUILD_HINT}")
    actual = sha256_file(path)
    if actual != expected:
        raise SearchIndexError(
            f"sha256 checksum mismatch for {path}: the manifest says {expected}, the file has {actual}; "
            f"the file is corrupt or was replaced, so it is not loaded: {_REBUILD_HINT}"
        )


def _read_strings(path: Path, count: int) -> list[str]:
    """The JSON list of ``count`` strings in ``path`` (the ids, the captions)."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SearchIndexError(f"{path} is not valid JSON ({error}); {_REBUILD_HINT}") from None
    if not isinstance(values, list) or not all(isinstance(value, str) for value in values):
        raise SearchIndexError(f"{path} must hold a JSON list of strings; {_REBUILD_HINT}")
    if len(values) != count:
        raise SearchIndexError(f"{path} holds {len(values)} entries, the manifest expects {count}; {_REBUILD_HINT}")
    return values


def _read_index(path: Path) -> faiss.Index:
    try:
        return faiss.read_index(str(path))
    except RuntimeError as error:
        raise SearchIndexError(f"FAISS cannot read {path} ({error}); {_REBUILD_HINT}") from None


def _check_index_matches(index: faiss.Index, manifest: IndexManifest, directory: Path) -> None:
    problems = []
    if index.d != manifest.dimension:
        problems.append(f"dimension {index.d}, the manifest says {manifest.dimension}")
    if index.ntotal != manifest.count:
        problems.append(f"{index.ntotal} vectors, the manifest says {manifest.count}")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        problems.append("a metric other than inner product")
    if problems:
        raise SearchIndexError(f"the index in {directory} has {'; '.join(problems)}; {_REBUILD_HINT}")


def gpu_available() -> bool:
    """Whether this FAISS build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "index_cpu_to_gpu") and faiss.get_num_gpus() > 0


def exact_storage(index: faiss.Index) -> faiss.Index | None:
    """The flat index of full vectors inside ``index`` (row i = vector i), if it has one.

    ``IndexHNSWFlat`` keeps its vectors in ``storage``, ``IndexRefineFlat`` in
    ``refine_index``; searching that flat index is exact search over the same rows.
    """
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexFlat):
        return index
    for attribute in ("refine_index", "storage"):
        inner = getattr(index, attribute, None)
        if inner is not None and isinstance(faiss.downcast_index(inner), faiss.IndexFlat):
            return faiss.downcast_index(inner)
    return None


def index_to_gpu(index: faiss.Index) -> tuple[faiss.Index, Any]:
    """A copy of ``index`` on GPU 0, and the GPU resources it needs kept alive.

    FAISS GPU implements flat and IVF indexes but not HNSW, fast-scan PQ or refinement; for
    those the copy is a ``GpuIndexFlat`` of the full vectors they store (same rows, exact
    search, and faster on a GPU than the approximate search is on the CPU).
    """
    if not gpu_available():
        raise SearchIndexError("a GPU was requested, but FAISS sees none: install faiss-gpu (`postsim[gpu]`)")
    resources = faiss.StandardGpuResources()
    try:
        gpu_index = faiss.index_cpu_to_gpu(resources, 0, index)
        logger.info("index moved to GPU 0 as %s", type(gpu_index).__name__)
    except RuntimeError:
        storage = exact_storage(index)
        if storage is None:
            raise SearchIndexError(
                f"FAISS has no GPU version of {type(faiss.downcast_index(index)).__name__} and it stores "
                "no full vectors to search exactly; load it with use_gpu=False"
            ) from None
        gpu_index = faiss.index_cpu_to_gpu(resources, 0, storage)
        logger.info(
            "FAISS has no GPU version of %s; searching its %d vectors exactly on GPU 0",
            type(faiss.downcast_index(index)).__name__,
            index.ntotal,
        )
    return gpu_index, resources


def version_index_dir(version_dir: str | Path) -> Path:
    """The index directory of a ``retrieval`` version folder: ``<version>/index``."""
    return Path(version_dir) / INDEX_DIRNAME
