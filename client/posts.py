"""Posts as the client sends them, and what it gets back: embeddings, neighbors, what the server runs.

A :class:`Post` is an image, a text, or both. The image is encoded bytes (JPEG, PNG ..., or a
video: MP4/MOV, WebM, animated GIF or WebP) or a path read only when the request is built. Empty values mean "absent", as on the wire:
``Post(text="", image=b"")`` has neither and is rejected. Nothing is stripped or
normalised here; the server's tokenizer and image preprocessing see what the caller gave.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from postsim.core.errors import InvalidPostError
from postsim.model_repository.contract import post_id_problem

__all__ = [
    "EmbeddingResult",
    "ModelStatus",
    "Neighbor",
    "Post",
    "ScoreParts",
    "ServedRepository",
    "ServerInfo",
    "SimilarResult",
]


@dataclass(frozen=True, kw_only=True)
class Post:
    """One social-media post: an encoded image, a UTF-8 text, or both.

    ``image`` is the encoded image as bytes, or a :class:`~pathlib.Path` to a file read
    lazily by :meth:`image_bytes`. ``id`` is the caller's identifier (used when indexing), a
    post id as :func:`~postsim.model_repository.contract.post_id_problem` defines it.
    """

    text: str | None = None
    image: bytes | Path | None = None
    id: str | None = None

    def __post_init__(self) -> None:
        if self.text is not None and not isinstance(self.text, str):
            raise InvalidPostError(f"Post.text must be a str or None; got {type(self.text).__name__}")
        if isinstance(self.image, str):
            raise InvalidPostError(
                f"Post.image must be bytes, a pathlib.Path or None; got str {self.image!r}: "
                "wrap a file path in Path(...)"
            )
        if self.image is not None and not isinstance(self.image, bytes | Path):
            raise InvalidPostError(f"Post.image must be bytes, a pathlib.Path or None; got {type(self.image).__name__}")
        if self.id is not None and not isinstance(self.id, str):
            raise InvalidPostError(f"Post.id must be a str or None; got {type(self.id).__name__}")
        problem = post_id_problem(self.id) if self.id is not None else None
        if problem:
            raise InvalidPostError(f"Post.id: {problem}")
        if not self.has_text and not self.has_image:
            raise InvalidPostError("a post needs an image, a text, or both")

    @property
    def has_text(self) -> bool:
        return bool(self.text)

    @property
    def has_image(self) -> bool:
        """True for non-empty bytes or any path (an empty file is caught when read)."""
        return isinstance(self.image, Path) or bool(self.image)

    def image_bytes(self) -> bytes:
        """The encoded image (``b""`` when the post has none); a path is read now.

        Raises :class:`InvalidPostError` naming the path when the file cannot be read or
        is empty.
        """
        if self.image is None:
            return b""
        if isinstance(self.image, bytes):
            return self.image
        try:
            data = self.image.read_bytes()
        except OSError as exc:
            raise InvalidPostError(
                f"cannot read the image of post {self._label()} from {self.image}: {exc.strerror or exc}"
            ) from None
        if not data:
            raise InvalidPostError(f"the image file {self.image} of post {self._label()} is empty")
        return data

    def check_image_file(self) -> None:
        """Check, without reading it, that a path image names an existing file."""
        if isinstance(self.image, Path) and not self.image.is_file():
            what = "is not a file" if self.image.exists() else "does not exist"
            raise InvalidPostError(f"the image file {self.image} of post {self._label()} {what}")

    def __repr__(self) -> str:
        image = f"<{len(self.image)} bytes>" if isinstance(self.image, bytes) else repr(self.image)
        return f"Post(text={self.text!r}, image={image}, id={self.id!r})"

    def _label(self) -> str:
        return repr(self.id) if self.id is not None else "(no id)"


@dataclass(frozen=True, kw_only=True, eq=False)
class EmbeddingResult:
    """The fused embedding of one post and how much each modality contributed to it."""

    embedding: np.ndarray
    """float32, shape ``(K,)``."""
    image_weight: float
    text_weight: float
    image_embedding: np.ndarray
    """The post's image alone: its unit vector, float32 ``(K,)``; zeros without an image."""
    text_embedding: np.ndarray
    """The post's text alone: its unit vector, float32 ``(K,)``; zeros without a text."""

    frames: int | None
    """Frames its image embedding pools (``FRAMES``): 1 for an image, up to F for a video, 0 without one; None for
    an indexed post's stored embedding (``postsim explain --id``), as an index keeps no frame count."""


@dataclass(frozen=True, kw_only=True)
class ScoreParts:
    """A neighbour's score split by modality pair (``contract.SCORE_PARTS``); the four sum to the score."""

    image_image: float
    """Query image ↔ neighbour image."""
    text_text: float
    """Query text ↔ neighbour text."""
    image_text: float
    """Query image ↔ neighbour text."""
    text_image: float
    """Query text ↔ neighbour image."""

    @property
    def total(self) -> float:
        return self.image_image + self.text_text + self.image_text + self.text_image


@dataclass(frozen=True, kw_only=True)
class Neighbor:
    """One indexed post similar to the query, with its similarity score (higher is closer)."""

    id: str
    score: float
    text: str | None = None
    """The start of the post's text as the index keeps it (:func:`~postsim.model_repository.contract.post_caption`);
    None when the index does not know it (the post had no text, or the index was built without captions)."""
    parts: ScoreParts | None = None
    """Where the score comes from; None when the index keeps no unimodal vectors (built with ``--no-unimodal``),
    and for a post upserted through a journal written before upserts carried their parts (or queried by its id)."""
    duplicates: tuple[Neighbor, ...] = ()
    """Near-duplicates folded into this result (a query with ``collapse_above``), best first; their ``text`` is None."""


@dataclass(frozen=True, kw_only=True)
class ChangeReport:
    """What one upsert or delete did, once the server has it on stable storage and serves it."""

    sequence: int
    """The journal sequence number of the last change it made (0 when it changed nothing)."""
    added: tuple[str, ...] = ()
    replaced: tuple[str, ...] = ()
    """Upserted ids that replaced an indexed post with the same id."""
    deleted: tuple[str, ...] = ()
    unknown: tuple[str, ...] = ()
    """Ids a delete named that no indexed post has: nothing was done for them."""


@dataclass(frozen=True, kw_only=True, eq=False)
class SimilarResult:
    """The neighbours of one query post (best first), with the query's own embedding."""

    neighbors: list[Neighbor]
    embedding: np.ndarray
    image_weight: float
    text_weight: float
    image_embedding: np.ndarray
    text_embedding: np.ndarray
    frames: int | None
    """Frames the query's image embedding pools (``FRAMES``): 1 for an image, up to F for a video, 0 without one
    (always a number from the server; the type is :class:`EmbeddingResult`'s)."""


@dataclass(frozen=True, kw_only=True)
class ModelStatus:
    """One model of the server's repository index."""

    name: str
    version: str
    state: str
    """Triton's state name: ``READY``, ``LOADING``, ``UNAVAILABLE`` ... (empty when never loaded)."""
    reason: str = ""

    @property
    def ready(self) -> bool:
        return self.state == "READY"


@dataclass(frozen=True, kw_only=True)
class ServedRepository:
    """Which export the server serves, from the parameters of ``post_embedding``'s config.

    Read through the model-config API, which a server's admin key does not restrict. Each
    field is None when the config does not say (not loaded, or exported by an older postsim).
    """

    weights: str | None = None
    """The ``postsim_weights`` parameter (e.g. ``random``)."""
    fingerprint: str | None = None
    """The ``postsim_fingerprint`` parameter: which exported weights the server holds."""
    repository_id: str | None = None
    """The ``postsim_repository_id`` parameter: which repository folder the server was started on."""
    dim: int | None = None
    """The embedding dimension K: the length of ``EMBEDDING``."""


@dataclass(frozen=True, kw_only=True)
class ServerInfo:
    """What the server at ``url`` runs, from its metadata and repository index."""

    url: str
    server: str
    """The server's name (``triton``)."""
    version: str
    models: tuple[ModelStatus, ...]
    served: ServedRepository
    """What ``post_embedding``'s config says; all None when it is not loaded."""

    @property
    def weights(self) -> str | None:
        return self.served.weights

    @property
    def fingerprint(self) -> str | None:
        return self.served.fingerprint

    @property
    def repository_id(self) -> str | None:
        return self.served.repository_id

    @property
    def dim(self) -> int | None:
        return self.served.dim

    def is_ready(self, model: str) -> bool:
        return any(status.name == model and status.ready for status in self.models)
