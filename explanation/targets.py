"""An indexed post as an explanation's target: its stored fused vector, unimodal parts and caption.

The client compares the query with the post exactly as ``similar_posts`` scored it: with
the vectors the index holds, read from the index folder ``postsim index build`` wrote
(checksums verified, as the server verifies them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from postsim.client.posts import EmbeddingResult
from postsim.core.errors import SearchIndexError
from postsim.model_repository.contract import MODALITIES
from postsim.model_repository.search_index import LoadedIndex, exact_storage, load_index_dir

_IMAGE, _TEXT = MODALITIES.index("image"), MODALITIES.index("text")


@dataclass(frozen=True, kw_only=True, eq=False)
class IndexedPost:
    """One post of an index as the index keeps it."""

    id: str
    caption: str | None
    """The start of its text as the index keeps it; None when it has none."""
    embedding: EmbeddingResult


@dataclass(frozen=True, eq=False)
class ExplainableIndex:
    """An index folder loaded once, to look up many of its posts (``postsim ui``)."""

    directory: Path
    loaded: LoadedIndex

    @classmethod
    def open(cls, directory: Path) -> ExplainableIndex:
        """Load and verify ``directory``, as the server loads an index."""
        return cls(directory, load_index_dir(directory, expected_fingerprint=None, use_gpu=False))

    @property
    def fingerprint(self) -> str:
        return self.loaded.manifest.weights_fingerprint

    def post(self, post_id: str) -> IndexedPost:
        """The post ``post_id``; SearchIndexError naming the index when it holds no such post."""
        try:
            row = self.loaded.ids.index(post_id)
        except ValueError:
            raise SearchIndexError(
                f"post id {post_id!r} is not in the index at {self.directory} ({len(self.loaded.ids):,} posts)"
            ) from None
        unimodal = self.loaded.unimodal
        if unimodal is None:
            raise SearchIndexError(
                f"the index at {self.directory} was built without unimodal vectors (`postsim index build "
                "--no-unimodal`), so its scores cannot be split by modality: build it again without --no-unimodal "
                f"to explain against its posts such as {post_id!r}, or explain against a second post"
            )
        storage = exact_storage(self.loaded.cpu_index)
        if storage is None:
            raise SearchIndexError(f"the index at {self.directory} keeps no full vectors to compare with")
        weights = unimodal.weights[row].astype("float32")
        embedding = EmbeddingResult(
            embedding=np.asarray(storage.reconstruct(row), dtype=np.float32),
            image_weight=float(weights[_IMAGE]),
            text_weight=float(weights[_TEXT]),
            image_embedding=unimodal.image[row].astype("float32"),
            text_embedding=unimodal.text[row].astype("float32"),
        )
        return IndexedPost(id=post_id, caption=self.loaded.captions[row] or None, embedding=embedding)


def indexed_post(index_dir: Path, post_id: str) -> IndexedPost:
    """The post ``post_id`` of the index at ``index_dir``."""
    return ExplainableIndex.open(index_dir).post(post_id)
