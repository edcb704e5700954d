"""Posts the way they come to a social network: photo-sized JPEGs, phone originals, screenshots.

The serving benchmark's first corpus had 640×480 images; real posts carry 1080-pixel photos
and 12-megapixel phone originals, and decoding those costs more than the encoders do. This
module draws such posts, deterministically from a seed (post ``i`` does not depend on how
many are drawn), in the shares a :class:`PhotoMix` states:

- **portrait** and **square**: 1080×1350 and 1080×1080 JPEGs, quality 85, 4:2:0 chroma, the
  sizes networks re-encode uploads to;
- **phone**: 4032×3024 JPEGs, quality 90, as a phone camera writes them: the sensor's frame,
  with the EXIF orientation that turns it upright (most are portraits stored sideways);
- **screenshot**: 1080×2340 PNGs of an app screen: flat bars and cards, lines of text, a photo.

The pictures are built to compress like photographs rather than drawings, because the
bytes a decoder reads are what it costs: a smooth scene (a gradient in the post's topic
colours, noise at several scales, blurred shapes) drawn at low resolution and scaled up,
then fine texture that comes and goes across the frame, and sensor grain. The JPEGs land
at about 200–500 KB (1080 px) and 2–5 MB (12 MP), the ranges of real uploads.

Captions are the sample corpus's (:mod:`postsim.client.samples`), 20–60 words by default.
"""

from __future__ import annotations

import enum
import io
import json
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from postsim.bench.workload import BENCH_WORDS, BenchPost
from postsim.core.errors import BenchError
from postsim.core.files import write_text_atomic
from postsim.corpus.posts import POSTS_FILE
from postsim.corpus.samples import _TOPICS, IMAGES_DIR, _caption, _Topic

Progress = Callable[[int, int], None]
"""Called with (posts written, posts in all) as a corpus is written."""

EXIF_ORIENTATION_TAG = 0x0112


class PhotoKind(enum.Enum):
    """The kinds of image a post carries, each with its size (width, height as displayed) and format."""

    PORTRAIT = "portrait"
    SQUARE = "square"
    PHONE = "phone"
    SCREENSHOT = "screenshot"

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) as stored in the file; a phone original's EXIF orientation may turn it upright."""
        return _KIND_SIZES[self]

    @property
    def format(self) -> str:
        """Pillow's name of the file format."""
        return "PNG" if self is PhotoKind.SCREENSHOT else "JPEG"

    @property
    def extension(self) -> str:
        return "png" if self is PhotoKind.SCREENSHOT else "jpg"


_KIND_SIZES = {
    PhotoKind.PORTRAIT: (1080, 1350),
    PhotoKind.SQUARE: (1080, 1080),
    PhotoKind.PHONE: (4032, 3024),
    PhotoKind.SCREENSHOT: (1080, 2340),
}
JPEG_QUALITY = {PhotoKind.PORTRAIT: 85, PhotoKind.SQUARE: 85, PhotoKind.PHONE: 90}
"""What networks re-encode uploads at (85), and what phone cameras write (about 90)."""

PHONE_ORIENTATIONS = ((1, 0.3), (6, 0.55), (8, 0.1), (3, 0.05))
"""EXIF orientations of phone originals and their shares: 6 is a phone held upright (the sensor
reads it sideways), 1 held level, 8 and 3 held the other ways round."""


@dataclass(frozen=True, kw_only=True)
class PhotoMix:
    """What share of posts carries each kind of image, or none; the shares add up to 1.

    The defaults: most posts are feed photos (portrait or square), some carry a phone
    original as taken, a few a screenshot; one in twenty has no image and one in twenty no
    caption (``text_only`` counts the former; ``image_only`` is drawn among posts with an image).
    """

    portrait: float = 0.45
    square: float = 0.3
    phone: float = 0.1
    screenshot: float = 0.1
    text_only: float = 0.05
    image_only: float = 0.05
    """Share of all posts that have an image but no caption."""

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if not 0.0 <= value <= 1.0:
                raise BenchError(f"PhotoMix.{item.name} must be a share between 0 and 1, got {value}")
        total = sum(self._image_shares().values()) + self.text_only
        if not math.isclose(total, 1.0, abs_tol=1e-9):
            raise BenchError(f"PhotoMix shares of image kinds and text_only must add up to 1, got {total:g}")
        if self.image_only > 1.0 - self.text_only:
            raise BenchError(
                f"PhotoMix.image_only ({self.image_only}) is more than the share of posts with an image "
                f"({1.0 - self.text_only:g})"
            )

    def _image_shares(self) -> dict[PhotoKind, float]:
        return {kind: getattr(self, kind.value) for kind in PhotoKind}

    def kind_at(self, position: float) -> PhotoKind | None:
        """The image kind at ``position`` in [0, 1) of the cumulative shares; None: a text-only post."""
        edge = 0.0
        for kind, share in self._image_shares().items():
            edge += share
            if position < edge:
                return kind
        return None


@dataclass(frozen=True, kw_only=True)
class PhotoWorkload:
    """How a photo corpus is drawn."""

    mix: PhotoMix = field(default_factory=PhotoMix)
    words: tuple[int, int] = BENCH_WORDS
    """Bounds of the words in a caption's description (title and hashtags aside)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.words[0] <= self.words[1]:
            raise BenchError(f"words must be (min, max) with 0 < min <= max, got {self.words}")


@dataclass(frozen=True)
class PhotoPost:
    """One drawn post: its encoded image (``b""``: none) and caption (``""``: none)."""

    id: str
    kind: PhotoKind | None
    """The kind of image; None for a text-only post."""
    image: bytes = field(repr=False)
    text: str
    topic: str

    def to_bench_post(self) -> BenchPost:
        return BenchPost(id=self.id, image=self.image, text=self.text)


_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def kind_of(index: int, workload: PhotoWorkload = PhotoWorkload()) -> PhotoKind | None:
    """The kind of image post ``index`` carries (None: text only).

    Kinds follow a low-discrepancy sequence over the shares, so that any run of consecutive
    posts holds each kind in close to its share (a 20-post corpus has its two phone photos)
    while the kinds still interleave.
    """
    offset = random.Random(f"postsim-photos-offset:{workload.seed}").random()
    return workload.mix.kind_at(((index + 0.5) * _GOLDEN + offset) % 1.0)


def draw_photo_post(index: int, workload: PhotoWorkload = PhotoWorkload()) -> PhotoPost:
    """Post ``index`` of the corpus ``workload`` describes; the same bytes for the same index and workload."""
    rng = random.Random(f"postsim-photos:{workload.seed}:{index}")
    kind = kind_of(index, workload)
    topic = rng.choice(_TOPICS)
    captionless = kind is not None and rng.random() * (1.0 - workload.mix.text_only) < workload.mix.image_only
    text = "" if captionless else _caption(topic, rng, workload.words)
    image = b"" if kind is None else _encode(kind, topic, np.random.default_rng(rng.getrandbits(64)))
    return PhotoPost(id=f"photo-{index:05d}", kind=kind, image=image, text=text, topic=topic.name)


def photo_posts(n: int, workload: PhotoWorkload = PhotoWorkload()) -> Iterator[PhotoPost]:
    """Posts 0 .. n-1 of the corpus, drawn one at a time."""
    if n < 1:
        raise BenchError(f"the benchmark needs at least one post, got {n}")
    return (draw_photo_post(index, workload) for index in range(n))


def write_photo_corpus(
    n: int, out_dir: Path, workload: PhotoWorkload = PhotoWorkload(), *, progress: Progress | None = None
) -> Path:
    """Write ``n`` photo posts as ``out_dir/posts.jsonl`` and ``out_dir/images/``; return the JSONL path.

    The corpus format is :func:`postsim.client.samples.read_posts`'s, so ``postsim index
    build`` and :func:`postsim.bench.workload.load_bench_posts` read it; each line also
    names the post's ``kind``. An old ``posts.jsonl`` is removed first and the new one is
    renamed into place after every image is written.
    """
    posts = photo_posts(n, workload)
    out_dir = Path(out_dir)
    (out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    posts_path = out_dir / POSTS_FILE
    posts_path.unlink(missing_ok=True)
    lines = []
    for done, post in enumerate(posts, start=1):
        image_name = None
        if post.kind is not None:
            image_name = f"{IMAGES_DIR}/{post.id}.{post.kind.extension}"
            (out_dir / image_name).write_bytes(post.image)
        record = {
            "id": post.id,
            "text": post.text or None,
            "image": image_name,
            "kind": post.kind.value if post.kind else None,
            "topic": post.topic,
        }
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        if progress is not None:
            progress(done, n)
    write_text_atomic(posts_path, "".join(lines))
    return posts_path


# --- Pictures ------------------------------------------------------------------------------

SCENE_SIDE = 384
"""Shorter side at which a photo's smooth scene is drawn before it is scaled up: its structure
is coarse, so drawing it at full size would only cost time."""
DETAIL = (45, 80)
"""Range of the fine texture's strength (its peak, in 8-bit levels, where the frame is busiest)."""
GRAIN = (4, 9)
"""Range of the sensor grain (± 8-bit levels)."""
_TILE = 512
"""Side of the texture and grain tiles repeated over the frame (a JPEG codes each 8×8 block alone,
so a repeat 512 px away costs the same bytes as fresh noise)."""


def _encode(kind: PhotoKind, topic: _Topic, rng: np.random.Generator) -> bytes:
    out = io.BytesIO()
    if kind is PhotoKind.SCREENSHOT:
        _screenshot(topic, rng).save(out, "PNG")
        return out.getvalue()
    options: dict[str, object] = {"quality": JPEG_QUALITY[kind], "subsampling": "4:2:0"}
    if kind is not PhotoKind.PHONE:
        photo(kind.size, topic.sky, rng).save(out, "JPEG", **options)
        return out.getvalue()
    orientation = _draw_orientation(rng)
    width, height = kind.size
    upright = (height, width) if orientation in _QUARTER_TURNS else (width, height)
    picture = photo(upright, topic.sky, rng)
    if orientation in _STORED_AS:
        picture = picture.transpose(_STORED_AS[orientation])
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    picture.save(out, "JPEG", exif=exif.tobytes(), **options)
    return out.getvalue()


_QUARTER_TURNS = frozenset({6, 8})
_STORED_AS = {
    6: Image.Transpose.ROTATE_90,  # displayed after a quarter turn clockwise: stored a quarter turn back
    8: Image.Transpose.ROTATE_270,
    3: Image.Transpose.ROTATE_180,
}


def _draw_orientation(rng: np.random.Generator) -> int:
    values, shares = zip(*PHONE_ORIENTATIONS, strict=True)
    return int(rng.choice(values, p=np.asarray(shares) / sum(shares)))


def photo(size: tuple[int, int], colours: tuple[tuple[int, int, int], ...], rng: np.random.Generator) -> Image.Image:
    """An RGB picture of ``size`` that compresses like a photograph; its gradient runs between ``colours``."""
    width, height = size
    scale = SCENE_SIDE / min(width, height)
    scene = _scene(max(2, round(width * scale)), max(2, round(height * scale)), colours, rng)
    pixels = np.asarray(scene.resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
    busy = np.asarray(_noise(rng, size, min(size) / 3), dtype=np.int16)  # 0..255, where texture shows
    texture = _tiled(_texture_tile(rng), size)
    detail = np.clip(busy - 32, 0, 223) * texture // 223
    grain = _tiled(rng.integers(-GRAIN[1], GRAIN[1] + 1, (_TILE, _TILE, 3), dtype=np.int16), size)
    grain = grain * int(rng.integers(*GRAIN, endpoint=True)) // GRAIN[1]
    return Image.fromarray(np.clip(pixels + detail[..., None] + grain, 0, 255).astype(np.uint8))


def _scene(width: int, height: int, colours: tuple[tuple[int, int, int], ...], rng: np.random.Generator) -> Image.Image:
    """The smooth part of a photo: a gradient, noise at several scales, blurred shapes."""
    top, bottom = (np.clip(np.asarray(c, np.float32) + rng.uniform(-30, 30, 3), 0, 255) for c in colours[:2])
    weights = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    pixels: np.ndarray = np.broadcast_to((1 - weights) * top + weights * bottom, (height, width, 3)).astype(np.float32)
    shorter = min(width, height)
    for fraction, strength in ((0.5, 0.35), (0.2, 0.25), (0.07, 0.18), (0.025, 0.12)):
        octave = _noise(rng, (width, height), max(2.0, shorter * fraction), bands=3)
        pixels = pixels + strength * (np.asarray(octave, np.float32) - 127.5)
    shapes, alpha = Image.new("RGB", (width, height)), Image.new("L", (width, height))
    draw_shapes, draw_alpha = ImageDraw.Draw(shapes), ImageDraw.Draw(alpha)
    for _ in range(int(rng.integers(3, 9))):
        radius = shorter * rng.uniform(0.05, 0.3)
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        box = (x - radius, y - radius, x + radius, y + radius)
        draw_shapes.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw_alpha.ellipse(box, fill=int(rng.integers(150, 256)))
    blur = ImageFilter.GaussianBlur(shorter * rng.uniform(0.004, 0.02))
    shape_pixels = np.asarray(shapes.filter(blur), np.float32)
    weight = np.asarray(alpha.filter(blur), np.float32)[..., None] / 255.0
    pixels = pixels * (1.0 - weight) + shape_pixels * weight
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _noise(rng: np.random.Generator, size: tuple[int, int], cell: float, *, bands: int = 1) -> Image.Image:
    """Smooth random values (0..255) varying over about ``cell`` pixels: a random grid scaled up bicubically."""
    width, height = size
    grid_shape = (math.ceil(height / cell) + 1, math.ceil(width / cell) + 1)
    grid = rng.integers(0, 256, (*grid_shape, bands) if bands > 1 else grid_shape, dtype=np.uint8)
    source = Image.fromarray(grid, "RGB" if bands == 3 else "L")
    return source.resize(size, Image.Resampling.BICUBIC, box=(0, 0, width / cell, height / cell))


def _texture_tile(rng: np.random.Generator) -> np.ndarray:
    """int16 [tile, tile]: fine texture (foliage, fabric, gravel) of a strength drawn from ``DETAIL``."""
    cell = rng.uniform(1.5, 3.5)
    strength = int(rng.integers(*DETAIL, endpoint=True))
    values = np.asarray(_noise(rng, (_TILE, _TILE), cell), np.int16) - 128
    return values * strength // 128


def _tiled(tile: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    width, height = size
    repeats = (-(-height // tile.shape[0]), -(-width // tile.shape[1])) + (1,) * (tile.ndim - 2)
    return np.tile(tile, repeats)[:height, :width]


# --- Screenshots ---------------------------------------------------------------------------

_UI_THEMES = (
    ((255, 255, 255), (38, 38, 38), (240, 240, 242), (0, 149, 246)),  # light: page, text, card, accent
    ((0, 0, 0), (245, 245, 245), (28, 28, 30), (10, 132, 255)),  # dark
)


def _screenshot(topic: _Topic, rng: np.random.Generator) -> Image.Image:
    """An app screen: status and title bars, a post with its photo, cards of text lines, a tab bar."""
    width, height = PhotoKind.SCREENSHOT.size
    page, ink, card, accent = _UI_THEMES[int(rng.integers(len(_UI_THEMES)))]
    screen = Image.new("RGB", (width, height), page)
    draw = ImageDraw.Draw(screen)
    font = ImageFont.load_default(size=34)
    draw.rectangle((0, 0, width, 80), fill=card)
    draw.text((40, 20), f"{int(rng.integers(7, 23))}:{int(rng.integers(0, 60)):02d}", fill=ink, font=font)
    draw.text((40, 110), topic.name.replace("_", " "), fill=ink, font=ImageFont.load_default(size=52))
    top = 200
    photo_height = int(rng.integers(700, 1100))
    screen.paste(photo((width, photo_height), topic.sky, rng), (0, top))
    y = top + photo_height + 30
    words = " ".join(topic.phrases).split()
    while y < height - 260:
        card_height = int(rng.integers(160, 420))
        draw.rounded_rectangle((30, y, width - 30, y + card_height), radius=28, fill=card)
        draw.ellipse((60, y + 30, 140, y + 110), fill=accent)
        line_y = y + 40
        while line_y < y + card_height - 50:
            line = " ".join(str(w) for w in rng.choice(words, size=int(rng.integers(4, 9))))
            draw.text((170, line_y), line, fill=ink, font=font)
            line_y += 48
        y += card_height + 24
    draw.rectangle((0, height - 160, width, height), fill=card)
    for slot in range(5):
        x = width * (slot + 0.5) / 5
        draw.rounded_rectangle((x - 30, height - 110, x + 30, height - 50), radius=12, outline=ink, width=5)
    return screen
