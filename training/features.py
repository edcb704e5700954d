"""Pooled backbone features of a corpus, computed once and cached on disk.

Training the head never runs a backbone during its epochs: it learns on each post's pooled
image features (the ResNet pooler output, flattened) and pooled text features (the mean of
the last hidden state over the non-padding tokens), computed by the in-process pipeline's
pooled-features stage (:func:`~postsim.models.torch_runtime.pool_images`,
:func:`~postsim.models.torch_runtime.pool_texts`): the server's preprocessing and tokenizer,
then the encoders' own pooling, stopped before their projections.

The cache keeps each modality apart, keyed by the content (sha256 of the image file's
bytes, or of the text) under a folder named by the backbone's fingerprint (a hash of its
architecture and weights, and for text of the tokenizer too). A second run on the same
corpus computes nothing; a new caption with an old image recomputes only the text; another
text model reuses every image feature. Features live in a few ``.npz`` shards per folder,
each written atomically, so an interrupted extraction keeps what it finished.

A post whose image file is missing, empty or does not decode loses its image, one whose
text has no token left loses its text, and one with nothing left is dropped: each is listed
in :class:`ExtractionSummary`, never raised halfway through a corpus.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from postsim.core.errors import SettingsError, TrainingError
from postsim.core.files import write_bytes_atomic
from postsim.core.paths import cache_root
from postsim.corpus.posts import CorpusPost
from postsim.model_repository.tokenization import TextTokenizer
from postsim.models.fingerprints import IMAGE, TEXT, BackboneFingerprints, backbone_fingerprints
from postsim.models.modules import torch_required
from postsim.models.torch_runtime import pool_images, pool_texts
from postsim.models.weights import PostSimModels

with torch_required():
    import torch

logger = logging.getLogger("postsim")

DEFAULT_BATCH = 16
"""Posts per backbone batch: the server's largest batch."""
FLUSH_EVERY = 2048
"""New features kept in memory before they are written as a shard."""
MAX_SHARDS = 16
"""Shards in a folder before a flush merges them into one."""

_Content = TypeVar("_Content", bytes, str)
"""An image file's bytes or a text."""

Progress = Callable[[int, int], None]
"""Called with (posts done, posts in all) after each batch."""


@dataclass(frozen=True)
class SkippedInput:
    """A post's image or text (or the whole post, ``modality`` "post") left out, and why."""

    post_id: str
    modality: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class ExtractionSummary:
    """What :func:`extract_features` computed, found in the cache, and left out."""

    posts: int
    kept: int
    computed: dict[str, int]
    cached: dict[str, int]
    skipped: tuple[SkippedInput, ...] = ()
    seconds: float = 0.0

    @property
    def dropped(self) -> tuple[str, ...]:
        """Ids of the posts with nothing left to learn from."""
        return tuple(item.post_id for item in self.skipped if item.modality == "post")

    def to_dict(self) -> dict[str, object]:
        return {
            "posts": self.posts,
            "kept": self.kept,
            "computed": self.computed,
            "cached": self.cached,
            "seconds": round(self.seconds, 3),
            "skipped": [{"id": s.post_id, "modality": s.modality, "reason": s.reason} for s in self.skipped],
        }


@dataclass(frozen=True, kw_only=True, eq=False)
class PostFeatures:
    """Pooled features of the kept posts, in corpus order; rows of a missing modality are zeros."""

    ids: tuple[str, ...]
    image: np.ndarray
    """float32 ``[N, image feature width]`` (2048 for ResNet-101)."""
    image_present: np.ndarray
    """bool ``[N]``."""
    text: np.ndarray
    """float32 ``[N, hidden size]`` (768 for DistilBERT, 384 for MiniLM)."""
    text_present: np.ndarray
    image_keys: tuple[str | None, ...]
    """sha256 of each post's image bytes (None: no image), the content part of the cache key."""
    text_keys: tuple[str | None, ...]
    fingerprints: BackboneFingerprints
    summary: ExtractionSummary

    def __post_init__(self) -> None:
        count = len(self.ids)
        shapes = (len(self.image), len(self.image_present), len(self.text), len(self.text_present))
        if any(size != count for size in shapes) or len(self.image_keys) != count or len(self.text_keys) != count:
            raise TrainingError(f"PostFeatures: every field needs {count} rows, got {shapes}")
        if not (self.image_present | self.text_present).all():
            raise TrainingError("PostFeatures: every post needs an image or a text")


class FeatureStore:
    """Features of one backbone keyed by content hash, in ``.npz`` shards of one folder.

    A shard that cannot be read (truncated, foreign, of another width) is ignored with a
    warning: its features are computed again.
    """

    def __init__(self, directory: Path, width: int) -> None:
        self.directory = directory
        self.width = width
        self._rows: dict[str, np.ndarray] = {}
        self._pending: dict[str, np.ndarray] = {}
        for shard in sorted(directory.glob("shard-*.npz")):
            self._rows.update(self._read(shard))

    def __contains__(self, key: str) -> bool:
        return key in self._rows or key in self._pending

    def get(self, key: str) -> np.ndarray | None:
        row = self._rows.get(key)
        return self._pending.get(key) if row is None else row

    def put(self, key: str, row: np.ndarray) -> None:
        self._pending[key] = np.asarray(row, dtype=np.float32)
        if len(self._pending) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        """Writes the pending features as one new shard; past MAX_SHARDS, merges every shard into one."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        self._rows.update(pending)
        shards = sorted(self.directory.glob("shard-*.npz"))
        if len(shards) < MAX_SHARDS:
            self._write(pending)
            return
        self._write(self._rows)  # the merged shard is in place before the old ones go
        for shard in shards:
            shard.unlink(missing_ok=True)

    def _write(self, rows: dict[str, np.ndarray]) -> None:
        if not rows:
            return
        buffer = io.BytesIO()
        keys = sorted(rows)
        np.savez(buffer, keys=np.array(keys, dtype="U64"), features=np.stack([rows[key] for key in keys]))
        name = f"shard-{time.time_ns()}-{os.getpid()}.npz"
        write_bytes_atomic(self.directory / name, buffer.getvalue())

    def _read(self, shard: Path) -> dict[str, np.ndarray]:
        try:
            with np.load(shard, allow_pickle=False) as data:
                keys, features = data["keys"], data["features"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            logger.warning(
                "ignoring unreadable feature cache shard %s (%s): its features are computed again", shard, error
            )
            return {}
        if features.shape != (len(keys), self.width):
            logger.warning(
                "ignoring feature cache shard %s: features of shape %s, expected [%d, %d]",
                shard,
                features.shape,
                len(keys),
                self.width,
            )
            return {}
        return {str(key): features[row] for row, key in enumerate(keys)}


def extract_features(
    posts: Sequence[CorpusPost],
    models: PostSimModels,
    *,
    cache_dir: Path | None = None,
    batch_size: int = DEFAULT_BATCH,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> PostFeatures:
    """Pooled image and text features of every post, from the cache where it has them.

    ``cache_dir`` defaults to ``features/`` in postsim's per-user cache folder
    (:func:`~postsim.core.paths.cache_root`). Posts keep the corpus order; a post with
    nothing usable is left out and listed in the summary.
    """
    if batch_size < 1:
        raise SettingsError(f"batch_size must be at least 1, got {batch_size}")
    started = time.perf_counter()
    torch_device = torch.device(device)
    fingerprints = backbone_fingerprints(models)
    root = (cache_dir or cache_root() / "features").expanduser()
    image_store = FeatureStore(root / IMAGE / fingerprints.image, models.image_encoder.projection.in_features)
    text_store = FeatureStore(root / TEXT / fingerprints.text, models.text_encoder.projection.in_features)
    tokenizer = TextTokenizer.from_json(models.tokenizer_json, source="the text model's tokenizer")
    for module in (models.image_encoder, models.text_encoder):
        module.to(torch_device).eval()
    batcher = _Batcher(models, tokenizer, image_store, text_store, torch_device)
    try:
        for done, chunk in _chunks(posts, batch_size):
            batcher.add(chunk)
            if progress is not None:
                progress(done, len(posts))
    finally:
        image_store.flush()
        text_store.flush()
    summary = ExtractionSummary(
        posts=len(posts),
        kept=len(batcher.ids),
        computed=dict(batcher.computed),
        cached=dict(batcher.cached),
        skipped=tuple(batcher.skipped),
        seconds=time.perf_counter() - started,
    )
    logger.info(
        "features of %d posts (%d kept): computed %s, from the cache %s, %d inputs skipped, %.1f s",
        summary.posts,
        summary.kept,
        summary.computed,
        summary.cached,
        len(summary.skipped),
        summary.seconds,
    )
    return batcher.result(fingerprints, summary)


def _chunks(posts: Sequence[CorpusPost], size: int) -> Iterator[tuple[int, Sequence[CorpusPost]]]:
    for start in range(0, len(posts), size):
        chunk = posts[start : start + size]
        yield start + len(chunk), chunk


@dataclass
class _Batcher:
    """Accumulates the features of one extraction, batch by batch.

    ``computed`` counts the distinct images and texts whose features were computed,
    ``cached`` the posts whose image or text features came from the cache.
    """

    models: PostSimModels
    tokenizer: TextTokenizer
    image_store: FeatureStore
    text_store: FeatureStore
    device: torch.device
    computed: dict[str, int] = field(default_factory=lambda: {IMAGE: 0, TEXT: 0})
    cached: dict[str, int] = field(default_factory=lambda: {IMAGE: 0, TEXT: 0})
    skipped: list[SkippedInput] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    image_keys: list[str | None] = field(default_factory=list)
    text_keys: list[str | None] = field(default_factory=list)

    def add(self, posts: Sequence[CorpusPost]) -> None:
        images = {post.id: data for post in posts if (data := self._read_image(post)) is not None}
        texts = {post.id: post.text for post in posts if post.text is not None}
        image_keys = self._fill(IMAGE, images, self.image_store, self._pool_images)
        text_keys = self._fill(TEXT, texts, self.text_store, self._pool_texts)
        for post in posts:
            image_key, text_key = image_keys.get(post.id), text_keys.get(post.id)
            if image_key is None and text_key is None:
                self.skipped.append(SkippedInput(post.id, "post", "neither its image nor its text is usable"))
                continue
            self.ids.append(post.id)
            self.image_keys.append(image_key)
            self.text_keys.append(text_key)

    def _fill(
        self,
        modality: str,
        contents: Mapping[str, _Content],
        store: FeatureStore,
        pool: Callable[[list[_Content]], list[np.ndarray | str]],
    ) -> dict[str, str]:
        """Content key of each post whose features are now in ``store``; the others are skipped with the reason."""
        keys = {post_id: _content_key(content) for post_id, content in contents.items()}
        missing = {key: contents[post_id] for post_id, key in keys.items() if key not in store}
        self.cached[modality] += sum(key in store for key in keys.values())
        refused: dict[str, str] = {}
        if missing:
            for key, outcome in zip(missing, pool(list(missing.values())), strict=True):
                if isinstance(outcome, str):
                    refused[key] = outcome
                else:
                    store.put(key, outcome)
                    self.computed[modality] += 1
        for post_id, key in keys.items():
            if key in refused:
                self.skipped.append(SkippedInput(post_id, modality, refused[key]))
        return {post_id: key for post_id, key in keys.items() if key not in refused}

    def _pool_images(self, images: list[bytes]) -> list[np.ndarray | str]:
        features, errors = pool_images(self.models.image_encoder, images, self.device)
        return [row if error is None else str(error) for row, error in zip(features, errors, strict=True)]

    def _pool_texts(self, texts: list[str]) -> list[np.ndarray | str]:
        features, reasons = pool_texts(self.models.text_encoder, self.tokenizer, texts, self.device)
        return [row if reason is None else reason for row, reason in zip(features, reasons, strict=True)]

    def _read_image(self, post: CorpusPost) -> bytes | None:
        if post.image_path is None:
            return None
        try:
            data = post.image_path.read_bytes()
        except OSError as error:
            self.skipped.append(
                SkippedInput(post.id, IMAGE, f"cannot read {post.image_path}: {error.strerror or error}")
            )
            return None
        if not data:
            self.skipped.append(SkippedInput(post.id, IMAGE, f"{post.image_path} is empty (0 bytes)"))
            return None
        return data

    def result(self, fingerprints: BackboneFingerprints, summary: ExtractionSummary) -> PostFeatures:
        return PostFeatures(
            ids=tuple(self.ids),
            image=_rows(self.image_store, self.image_keys),
            image_present=np.array([key is not None for key in self.image_keys], dtype=bool),
            text=_rows(self.text_store, self.text_keys),
            text_present=np.array([key is not None for key in self.text_keys], dtype=bool),
            image_keys=tuple(self.image_keys),
            text_keys=tuple(self.text_keys),
            fingerprints=fingerprints,
            summary=summary,
        )


def _content_key(content: bytes | str) -> str:
    data = content if isinstance(content, bytes) else content.encode("utf-8", errors="surrogatepass")
    return hashlib.sha256(data).hexdigest()


def _rows(store: FeatureStore, keys: Sequence[str | None]) -> np.ndarray:
    rows = np.zeros((len(keys), store.width), dtype=np.float32)
    for index, key in enumerate(keys):
        row = None if key is None else store.get(key)
        if row is not None:
            rows[index] = row
    return rows
