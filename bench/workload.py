"""The posts every configuration of the serving benchmark is measured on.

One corpus (:func:`postsim.corpus.samples.write_sample_posts`: photo-sized images, 20–60
word captions, the formats and the text-only and image-only posts the server must handle)
is read into memory once, so no configuration pays for file reads and all of them see
the same bytes in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from postsim.client.posts import Post
from postsim.core.errors import BenchError
from postsim.corpus.posts import read_posts
from postsim.corpus.samples import write_sample_posts

BENCH_IMAGE_SIZE = (640, 480)
BENCH_WORDS = (20, 60)


@dataclass(frozen=True)
class BenchPost:
    """One post held in memory: the encoded image (``b""``: none) and the text (``""``: none)."""

    id: str
    image: bytes
    text: str

    def to_post(self) -> Post:
        return Post(id=self.id, text=self.text or None, image=self.image or None)

    @property
    def text_bytes(self) -> bytes:
        return self.text.encode("utf-8")


def write_bench_corpus(
    n: int,
    out_dir: Path,
    *,
    seed: int = 0,
    image_size: tuple[int, int] = BENCH_IMAGE_SIZE,
    words: tuple[int, int] = BENCH_WORDS,
) -> Path:
    """A corpus of ``n`` realistic sample posts in ``out_dir`` (no generic captions or images); returns its ``posts.jsonl``."""
    if n < 1:
        raise BenchError(f"the benchmark needs at least one post, got {n}")
    return write_sample_posts(
        n, out_dir, seed, image_size=image_size, words=words, generic_captions=0, generic_images=0
    )


def load_bench_posts(corpus: Path) -> list[BenchPost]:
    """Every post of a ``posts.jsonl`` corpus, images read into memory."""
    posts = [
        BenchPost(
            id=post.id,
            image=post.image_path.read_bytes() if post.image_path is not None else b"",
            text=post.text or "",
        )
        for post in read_posts(corpus)
    ]
    if not posts:
        raise BenchError(f"{corpus} holds no posts to benchmark with")
    return posts


def post_at(posts: Sequence[BenchPost], index: int) -> BenchPost:
    """The ``index``-th post of the request sequence every configuration replays (cycling the corpus)."""
    return posts[index % len(posts)]
