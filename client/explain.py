"""Why two posts are similar: word and image-region attributions, and the four-part score split.

For a query post and a target (a second post, or an indexed post's stored embedding), the
similarity is the cosine of their fused embeddings. Its attributions are measured through
the served ``post_embedding``, in as few requests as the batch limit allows:

- **words**: the query's text is embedded again with each word left out (the first
  :data:`MAX_WORDS` words); a word's effect is how much the similarity drops without it;
- **image regions**: the query's image is cut into a ``grid × grid`` grid and embedded again
  with each cell greyed out (occlusion); a cell's effect is how much the similarity drops.

Positive effects support the similarity, negative ones work against it. The image is
first scaled so its shorter side is the server's resize target (what the encoder sees
anyway), so each variant is a small PNG. The four-part split of the score
(``contract.SCORE_PARTS``) comes from the two posts' unit modality vectors and weights.

Occlusion is defined on one picture: a query whose image is a video (MP4/MOV, WebM, an
animated GIF or WebP) is refused before any request, as greying out its first frame would
explain another post than the one embedded (whose image embedding pools F frames). The
target may be a video: it is embedded whole, never occluded.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from postsim.client.posts import EmbeddingResult, Post, ScoreParts
from postsim.client.shrink import encoder_scale_image
from postsim.core.errors import InvalidPostError
from postsim.model_repository import contract
from postsim.model_repository.preprocessing import decode_image
from postsim.model_repository.score_parts import UnimodalVectors, split_scores
from postsim.model_repository.video import sniff_video

DEFAULT_GRID = 7
MAX_GRID = 16
MAX_WORDS = 64
"""Words of the query's text that get an attribution; the others are kept in every variant."""
OCCLUSION_GREY = (128, 128, 128)


@dataclass(frozen=True, kw_only=True)
class WordEffect:
    word: str
    effect: float
    """Similarity with the whole text minus similarity without this word."""


@dataclass(frozen=True, kw_only=True)
class RegionEffect:
    row: int
    column: int
    box: tuple[int, int, int, int]
    """The cell in the query image's pixels: left, top, right, bottom (right and bottom excluded)."""
    effect: float
    """Similarity with the whole image minus similarity with this cell greyed out."""


@dataclass(frozen=True, kw_only=True)
class Explanation:
    """What drives the similarity of a query post to a target."""

    score: float
    """Cosine of the two fused embeddings."""
    parts: ScoreParts
    """The score split by modality pair; the four sum to ``score`` (within fp rounding)."""
    query_weights: tuple[float, float]
    target_weights: tuple[float, float]
    """The modality weights (image, text) of each side."""
    words: list[WordEffect]
    """One per attributed word of the query's text, in text order; empty without a text."""
    regions: list[RegionEffect]
    """``grid × grid`` cells of the query's image, row by row; empty without an image."""
    grid: int
    image_size: tuple[int, int] | None
    """The query image's width and height (the regions' coordinates), None without one."""
    posts_embedded: int
    requests: int
    """post_embedding requests sent: ``ceil(posts_embedded / MAX_BATCH_SIZE)``."""
    seconds: float

    def strongest_region(self) -> RegionEffect | None:
        return max(self.regions, key=lambda region: region.effect, default=None)

    def strongest_words(self, count: int = 3) -> list[WordEffect]:
        return sorted(self.words, key=lambda word: word.effect, reverse=True)[:count]

    def heatmap(self) -> np.ndarray:
        """The region effects as a ``[grid, grid]`` array (zeros without an image)."""
        grid = np.zeros((self.grid, self.grid), dtype=np.float32)
        for region in self.regions:
            grid[region.row, region.column] = region.effect
        return grid


@dataclass(frozen=True)
class _Variants:
    posts: list[Post]
    words: list[str]
    cells: list[tuple[int, int, tuple[int, int, int, int]]]
    image_size: tuple[int, int] | None


def checked_grid(grid: int) -> int:
    if isinstance(grid, bool) or not isinstance(grid, int) or not 1 <= grid <= MAX_GRID:
        raise InvalidPostError(f"the occlusion grid must be an int from 1 to {MAX_GRID} cells a side; got {grid!r}")
    return grid


def _variants(query: Post, grid: int) -> _Variants:
    image_bytes = query.image_bytes()
    video = sniff_video(image_bytes) if image_bytes else None
    if video is not None:
        raise InvalidPostError(
            f"{contract.IMAGE.name}: the query is a video ({video.value}); explain greys out regions of one picture, "
            "and a video's embedding pools several frames, so it explains image posts only: send one frame of it "
            "as the query's image, or its text alone (the other post may be a video)"
        )
    image = encoder_scale_image(image_bytes) if image_bytes else None
    base_image = _png(image) if image is not None else b""
    text = query.text or ""
    spans = _word_spans(text)[:MAX_WORDS]
    posts = [Post(image=base_image or None, text=text or None)]
    words = []
    for start, end in spans:
        rest = (text[:start] + text[end:]).strip()
        if not rest and not base_image:
            continue  # the only word of a text-only post: without it there is no post to embed
        words.append(text[start:end])
        posts.append(Post(image=base_image or None, text=rest or None))
    cells = []
    size = None
    if image is not None:
        original = decode_image(image_bytes)
        size = original.size
        for row in range(grid):
            for column in range(grid):
                scaled_box = _cell(image.size, grid, row, column)
                cells.append((row, column, _cell(original.size, grid, row, column)))
                posts.append(Post(image=_png(_occluded(image, scaled_box)), text=text or None))
    return _Variants(posts=posts, words=words, cells=cells, image_size=size)


def explain_operation(
    embed: Callable[[list[Post]], Generator[Any, Any, list[EmbeddingResult]]],
    query: Post,
    target: EmbeddingResult,
    grid: int = DEFAULT_GRID,
) -> Generator[Any, Any, Explanation]:
    """The explanation as a client operation: ``embed`` is ``ClientCore.embed``, whose calls it yields."""
    if not isinstance(query, Post):
        raise InvalidPostError(f"explain() takes a Post as the query; got {type(query).__name__}")
    started = time.perf_counter()
    variants = _variants(query, checked_grid(grid))
    embedded: list[EmbeddingResult] = yield from embed(variants.posts)
    base, rest = embedded[0], embedded[1:]
    target_vector = _unit(target.embedding)
    score = float(np.dot(_unit(base.embedding), target_vector))
    effects = [score - float(np.dot(_unit(result.embedding), target_vector)) for result in rest]
    word_effects = effects[: len(variants.words)]
    region_effects = effects[len(variants.words) :]
    return Explanation(
        score=score,
        parts=pair_parts(base, target),
        query_weights=(base.image_weight, base.text_weight),
        target_weights=(target.image_weight, target.text_weight),
        words=[WordEffect(word=word, effect=e) for word, e in zip(variants.words, word_effects, strict=True)],
        regions=[
            RegionEffect(row=row, column=column, box=box, effect=e)
            for (row, column, box), e in zip(variants.cells, region_effects, strict=True)
        ],
        grid=grid,
        image_size=variants.image_size,
        posts_embedded=len(variants.posts),
        requests=math.ceil(len(variants.posts) / contract.MAX_BATCH_SIZE),
        seconds=time.perf_counter() - started,
    )


def pair_parts(query: EmbeddingResult, target: EmbeddingResult) -> ScoreParts:
    """The four-part split of two posts' similarity, as ``similar_posts`` splits a neighbour's score."""
    stored = UnimodalVectors.from_float32(
        target.image_embedding[None], target.text_embedding[None], np.array([[target.image_weight, target.text_weight]])
    )
    (split,) = split_scores(
        query.image_embedding[None],
        query.text_embedding[None],
        np.array([[query.image_weight, query.text_weight]], dtype=np.float32),
        stored,
        np.zeros((1, 1), dtype=np.int64),
    )[0]
    return ScoreParts(**{name: float(value) for name, value in zip(contract.SCORE_PARTS, split, strict=True)})


def _unit(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


def _word_spans(text: str) -> list[tuple[int, int]]:
    spans = []
    start = None
    for position, character in enumerate(text):
        if character.isspace():
            if start is not None:
                spans.append((start, position))
                start = None
        elif start is None:
            start = position
    if start is not None:
        spans.append((start, len(text)))
    return spans


def _cell(size: tuple[int, int], grid: int, row: int, column: int) -> tuple[int, int, int, int]:
    width, height = size
    return (
        column * width // grid,
        row * height // grid,
        (column + 1) * width // grid,
        (row + 1) * height // grid,
    )


def _occluded(image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    copy = image.copy()
    copy.paste(OCCLUSION_GREY, box)
    return copy


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


__all__ = [
    "DEFAULT_GRID",
    "MAX_WORDS",
    "Explanation",
    "RegionEffect",
    "WordEffect",
    "explain_operation",
    "pair_parts",
]
