"""The posts every configuration of the serving benchmark (and the soak) is measured on.

One corpus is read into memory once, so no configuration pays for file reads and all of
them see the same bytes in the same order. Which corpus is a :class:`Workload`: by default
the posts of a social network (:mod:`postsim.bench.photos`: 1080-pixel feed photos, 12 MP
phone originals, PNG screenshots, 20–60 word captions); ``legacy`` is the first benchmark's
(:func:`postsim.corpus.samples.write_sample_posts` at 640×480, 20–60 words), kept so old
figures can be compared.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from postsim.bench.video_bench import panning_scene
from postsim.client.posts import Post
from postsim.core.errors import BenchError
from postsim.corpus.posts import read_posts
from postsim.corpus.sample_videos import VideoSpec, encode_video
from postsim.corpus.samples import write_sample_posts

BENCH_IMAGE_SIZE = (640, 480)
BENCH_WORDS = (20, 60)
BENCH_VIDEO = VideoSpec(size=(1280, 720), frame_rate=30, frames=900, keyframe_interval=60)
"""The video posts of the serving benchmark: 30 s of 720p H.264 at 30 frames/s, a keyframe every 2 s, as phones
record (the server samples 8 frames of it)."""


class Workload(enum.Enum):
    """Which posts a benchmark sends."""

    PHOTOS = "photos"
    """Posts as a social network gets them: :mod:`postsim.bench.photos`'s default mix."""
    LEGACY = "legacy"
    """The first benchmark's posts: 640×480 images of the sample corpus."""

    @property
    def label(self) -> str:
        """How reports name the workload."""
        if self is Workload.PHOTOS:
            return "photo workload (1080 px JPEGs, 12 MP phone photos, PNG screenshots)"
        width, height = BENCH_IMAGE_SIZE
        return f"legacy workload ({width}×{height} images)"


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
    videos: int = 0,
) -> Path:
    """A corpus of ``n`` realistic sample posts in ``out_dir`` (no generic captions or images); returns its
    ``posts.jsonl``.

    Images only unless ``videos`` says otherwise: the image workload measures image posts.
    """
    if n < 1:
        raise BenchError(f"the benchmark needs at least one post, got {n}")
    return write_sample_posts(
        n, out_dir, seed, image_size=image_size, words=words, videos=videos, generic_captions=0, generic_images=0
    )


def write_workload_corpus(workload: Workload, n: int, out_dir: Path, *, seed: int = 0) -> Path:
    """A corpus of ``n`` posts of ``workload`` in ``out_dir``; returns its ``posts.jsonl``."""
    if workload is Workload.LEGACY:
        return write_bench_corpus(n, out_dir, seed=seed)
    # photos imports BenchPost from here: imported when needed, not at the top.
    from postsim.bench.photos import PhotoWorkload, write_photo_corpus

    if n < 1:
        raise BenchError(f"the benchmark needs at least one post, got {n}")
    return write_photo_corpus(n, out_dir, PhotoWorkload(seed=seed))


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


def video_bench_posts(captions: Sequence[BenchPost], count: int, spec: VideoSpec = BENCH_VIDEO) -> list[BenchPost]:
    """``count`` video posts: a camera panning over a different scene each, captioned like the image posts.

    Encoding takes about a minute a clip at 720p on a laptop core (the encoder is single-threaded
    so the bytes are the same on every run).
    """
    texts = [post.text for post in captions if post.text] or [""]
    return [
        BenchPost(
            id=f"video-{index}",
            image=encode_video(panning_scene(spec, seed=index), spec),
            text=texts[index % len(texts)],
        )
        for index in range(count)
    ]
