"""Why a neighbour scored what it did: the index's unimodal vectors and the four-part split of a score.

A fused embedding is the normalised weighted sum of its post's unit modality vectors
(``contract.IMAGE_EMBEDDING``, ``contract.TEXT_EMBEDDING``, weighted by
``contract.MODALITY_WEIGHTS``). The cosine of two of them therefore splits exactly into four
terms, one per pair of modalities (``contract.SCORE_PARTS``)::

    score = Σ_{a, b ∈ {image, text}}  w_q,a · w_n,b · <a_q, b_n>  /  (|e_q| · |e_n|)

where ``e = w_image · image + w_text · text`` before normalisation. :func:`split_scores`
computes them for the neighbours a search found, from the query's parts and the neighbours'
parts that the index keeps in ``unimodal.npz`` (:class:`UnimodalVectors`).

The file holds three fp16 arrays, ``image`` and ``text`` ``[count, dim]`` and ``weights``
``[count, 2]``: ``4 · dim + 4`` bytes a post (1,028 at dim 256), read with
``allow_pickle=False`` after its sha256 matches the index manifest. It is optional: an
index built without it answers NaN parts. A row whose parts are
unknown (a post upserted through a journal record older than its parts, compacted in) is
NaN in all three arrays, and its parts come out NaN.

A post upserted into a live index carries its parts too (:class:`PostParts`): through the
change request and the journal, into the live index's rows, and into ``unimodal.npz`` when
the index is compacted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from postsim.core.errors import InvalidPostError, SearchIndexError
from postsim.model_repository.contract import MODALITIES, SCORE_PARTS

UNIMODAL_FILE = "unimodal.npz"
STORED_DTYPE = np.float16
_ARRAYS = ("image", "text", "weights")


@dataclass(frozen=True, kw_only=True, eq=False)
class PostParts:
    """One post's unit image and text vectors and modality weights (float32), as ``post_embedding`` answers them."""

    image: np.ndarray
    text: np.ndarray
    weights: np.ndarray

    def check(self, dimension: int, post_id: str) -> PostParts:
        """These parts as float32, once their shapes fit ``dimension`` and they are finite; else an InvalidPostError."""
        arrays = [np.asarray(array, dtype=np.float32) for array in (self.image, self.text, self.weights)]
        expected = [(dimension,), (dimension,), (len(MODALITIES),)]
        if [array.shape for array in arrays] != expected or not all(np.isfinite(array).all() for array in arrays):
            raise InvalidPostError(
                f"post {post_id!r}: score parts of shapes {[list(array.shape) for array in arrays]}, expected "
                f"{[list(shape) for shape in expected]} finite floats"
            )
        return PostParts(image=arrays[0], text=arrays[1], weights=arrays[2])


@dataclass(frozen=True, eq=False)
class UnimodalVectors:
    """Each indexed post's unit image and text vectors and modality weights, in index order (fp16)."""

    image: np.ndarray
    text: np.ndarray
    weights: np.ndarray

    def __post_init__(self) -> None:
        count, dim = self.image.shape if self.image.ndim == 2 else (-1, -1)
        expected = {"image": (count, dim), "text": (count, dim), "weights": (count, len(MODALITIES))}
        for name, shape in expected.items():
            array = getattr(self, name)
            if count < 0 or array.shape != shape:
                raise SearchIndexError(f"{UNIMODAL_FILE}: {name} has shape {array.shape}, expected {shape}")
        unknown = np.isnan(self.weights).all(axis=1)  # a row of unknown parts is NaN throughout
        for name in _ARRAYS:
            array = getattr(self, name)
            if not (np.isfinite(array) | unknown[:, None]).all() or not np.isnan(array[unknown]).all():
                raise SearchIndexError(f"{UNIMODAL_FILE}: {name} holds NaN or infinite values outside unknown rows")

    @classmethod
    def from_float32(cls, image: np.ndarray, text: np.ndarray, weights: np.ndarray) -> UnimodalVectors:
        """The parts as the fuser answers them (float32), stored at fp16."""
        return cls(*(np.ascontiguousarray(array, dtype=STORED_DTYPE) for array in (image, text, weights)))

    @property
    def count(self) -> int:
        return int(self.image.shape[0])

    @property
    def dimension(self) -> int:
        return int(self.image.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.image.nbytes + self.text.nbytes + self.weights.nbytes)

    def save(self, path: Path) -> None:
        """Write the three arrays to ``path`` (an uncompressed ``.npz``); the caller fsyncs and checksums it."""
        with path.open("wb") as file:
            np.savez(file, image=self.image, text=self.text, weights=self.weights)

    @classmethod
    def load(cls, path: Path, *, count: int, dimension: int) -> UnimodalVectors:
        """Read ``path``: numbers only (no pickles), ``count`` rows of ``dimension`` as the manifest says."""
        try:
            with np.load(path, allow_pickle=False) as arrays:
                missing = [name for name in _ARRAYS if name not in arrays.files]
                if missing:
                    raise SearchIndexError(f"{path} lacks the arrays {missing}")
                loaded = {name: np.ascontiguousarray(arrays[name]) for name in _ARRAYS}
        except (OSError, ValueError) as error:
            raise SearchIndexError(f"{path} is not a readable unimodal-vector file ({error})") from None
        vectors = cls(**loaded)
        if vectors.image.dtype != STORED_DTYPE or (vectors.count, vectors.dimension) != (count, dimension):
            raise SearchIndexError(
                f"{path} holds {vectors.count} {vectors.image.dtype} vectors of {vectors.dimension}, "
                f"the manifest expects {count} fp16 vectors of {dimension}"
            )
        return vectors


def split_scores(
    query_image: np.ndarray,
    query_text: np.ndarray,
    query_weights: np.ndarray,
    neighbours: UnimodalVectors,
    rows: np.ndarray,
) -> np.ndarray:
    """The four parts of each neighbour's score: ``[batch, k, 4]`` float32, ``contract.SCORE_PARTS`` order.

    ``query_image``/``query_text`` are ``[batch, dim]`` unit vectors (zero for a missing
    modality), ``query_weights`` ``[batch, 2]``; ``rows`` ``[batch, k]`` are the neighbours'
    index rows. Each row of parts sums to the cosine of the query's and the neighbour's fused
    embeddings, up to the fp16 rounding of the stored parts.
    """
    gathered = (array[rows].astype(np.float32) for array in (neighbours.image, neighbours.text, neighbours.weights))
    return split_gathered(query_image, query_text, query_weights, *gathered)


def split_gathered(
    query_image: np.ndarray,
    query_text: np.ndarray,
    query_weights: np.ndarray,
    image: np.ndarray,
    text: np.ndarray,
    weights: np.ndarray,
) -> np.ndarray:
    """:func:`split_scores` from the neighbours' parts already gathered: ``image``/``text`` ``[batch, k, dim]``,
    ``weights`` ``[batch, k, 2]`` (NaN for a neighbour whose parts are unknown: its parts come out NaN)."""
    query_image = np.asarray(query_image, dtype=np.float32)
    query_text = np.asarray(query_text, dtype=np.float32)
    query_weights = np.asarray(query_weights, dtype=np.float32)
    query_fused = query_weights[:, 0:1] * query_image + query_weights[:, 1:2] * query_text
    query_norm = np.linalg.norm(query_fused, axis=1)[:, None]  # [batch, 1]
    fused = weights[..., 0:1] * image + weights[..., 1:2] * text
    norm = np.linalg.norm(fused, axis=2)  # [batch, k]
    scale = query_norm * norm
    scale = np.where(scale > 0, scale, 1.0)

    def cosines(query: np.ndarray, neighbour: np.ndarray) -> np.ndarray:
        return np.einsum("bd,bkd->bk", query, neighbour)

    qi, qt = query_weights[:, 0:1], query_weights[:, 1:2]  # [batch, 1]
    ni, nt = weights[..., 0], weights[..., 1]  # [batch, k]
    parts = {
        "image_image": qi * ni * cosines(query_image, image),
        "text_text": qt * nt * cosines(query_text, text),
        "image_text": qi * nt * cosines(query_image, text),
        "text_image": qt * ni * cosines(query_text, image),
    }
    return (np.stack([parts[name] for name in SCORE_PARTS], axis=-1) / scale[..., None]).astype(np.float32)
