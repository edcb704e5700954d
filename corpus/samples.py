"""Sample posts to try postsim on: a deterministic synthetic corpus in the corpus format.

:func:`write_sample_posts` draws a deterministic corpus: captions from a handful of
topics, and images drawn with Pillow whose shapes and colours follow the topic, so posts
on the same topic look alike and their embeddings should be neighbours. The images come
in the formats and modes the server must handle (JPEG, PNG, WebP, RGBA PNG, greyscale
JPEG) and, by default, in varied sizes; ``image_size`` and ``words`` make photo-sized
images and longer captions for benchmarks.

Each post's topic is its ``label``, so the corpus trains and evaluates a head
(``postsim train``, ``postsim evaluate``). To make that worth doing, a share of the posts
with both modalities gets a generic caption ("check this out ✨ #nofilter") and another
share a generic image (a plain or noisy picture): neither modality alone then tells every
post's topic, and only both do. The record's ``generic`` key says which one (``caption``,
``image`` or null), for tests and reports; the corpus reader ignores it.

The corpus it writes is read back with :func:`postsim.corpus.posts.read_posts`, like any other.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from postsim.core.errors import SettingsError
from postsim.core.files import write_text_atomic
from postsim.corpus.posts import POSTS_FILE

logger = logging.getLogger("postsim")

IMAGES_DIR = "images"
DEFAULT_WORDS = (6, 18)
"""Words in a caption's description, drawn between the bounds (title and tags aside; whole sentences)."""
SIDE_RANGE = (160, 900)
"""Pixel range of each image side when no fixed ``image_size`` is asked for."""
MIN_SIDE = 32
"""Smallest side a fixed ``image_size`` may have: the drawings need some room."""
NOISE_LEVEL = 8
"""Grain added to every pixel (± this), so the images compress like photos rather than drawings."""
DEFAULT_GENERIC_CAPTIONS = 0.25
"""Share of the posts with both modalities whose caption says nothing of the topic."""
DEFAULT_GENERIC_IMAGES = 0.25
"""Share of them whose image shows nothing of the topic (never the same post as a generic caption)."""
GENERIC_CAPTION = "caption"
GENERIC_IMAGE = "image"

RGB = tuple[int, int, int]
Box = tuple[int, int, int, int]
"""Left, top, right, bottom, in pixels."""
Drawer = Callable[[ImageDraw.ImageDraw, int, int, random.Random], Box]
"""Draws the topic's scene and returns the box of its object (sun, moon, dog, plate, peaks, ball)."""


def write_sample_posts(
    n: int,
    out_dir: Path,
    seed: int = 0,
    *,
    image_size: tuple[int, int] | None = None,
    words: tuple[int, int] = DEFAULT_WORDS,
    generic_captions: float = DEFAULT_GENERIC_CAPTIONS,
    generic_images: float = DEFAULT_GENERIC_IMAGES,
) -> Path:
    """Write ``n`` sample posts as ``out_dir/posts.jsonl`` and ``out_dir/images/``; return the JSONL path.

    Deterministic from ``seed`` (and post ``i`` does not depend on ``n``). Most posts have
    both an image and a text, one in ten only a text and one in ten only an image.
    ``image_size`` (width, height) fixes every image's size, e.g. ``(640, 480)`` for
    benchmarks; by default each side is drawn from 160 to 900 px. ``words`` bounds the
    length of each caption's description, e.g. ``(20, 60)`` for realistic captions.
    ``generic_captions`` and ``generic_images`` are the shares of the posts with both
    modalities whose caption, or else whose image, is generic (see the module docstring);
    0 and 0 give every post a topical image and caption.

    Any old ``posts.jsonl`` is removed first and the new one appears, renamed into place,
    only after every image is written: a crashed run leaves no corpus, never a half one.
    """
    if n < 0:
        raise SettingsError(f"n must be 0 or more, got {n}")
    if not 0 < words[0] <= words[1]:
        raise SettingsError(f"words must be (min, max) with 0 < min <= max, got {words}")
    if image_size is not None and min(image_size) < MIN_SIDE:
        raise SettingsError(f"image_size sides must be at least {MIN_SIDE} px, got {image_size}")
    if generic_captions < 0 or generic_images < 0 or generic_captions + generic_images > 1:
        raise SettingsError(
            "generic_captions and generic_images are shares of the posts: each 0 or more and together at most 1, "
            f"got {generic_captions} and {generic_images}"
        )
    out_dir = Path(out_dir)
    (out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    posts_path = out_dir / POSTS_FILE
    posts_path.unlink(missing_ok=True)
    records = []
    image_count = 0
    for index in range(n):
        sample = _SamplePost.draw(
            index, seed, image_size=image_size, words=words, generic=(generic_captions, generic_images)
        )
        image_name = None
        if sample.image is not None:
            image_format = _FORMAT_CYCLE[image_count % len(_FORMAT_CYCLE)]
            image_count += 1
            image_name = f"{IMAGES_DIR}/{sample.id}.{image_format.extension}"
            image_format.save(sample.image, out_dir / image_name)
        record: dict[str, Any] = {
            "id": sample.id,
            "text": sample.text,
            "image": image_name,
            "label": sample.topic,
            "generic": sample.generic,
        }
        if sample.object_box is not None:
            record["object_box"] = list(sample.object_box)  # where the image's object is: explanations test on it
        records.append(record)
    _write_jsonl(posts_path, records)
    logger.info("wrote %d sample posts (%d images) to %s", n, image_count, posts_path)
    return posts_path


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


# --- One sample post ---------------------------------------------------------------------


@dataclass(frozen=True)
class _SamplePost:
    id: str
    topic: str
    text: str | None
    image: Image.Image | None = field(repr=False)
    object_box: Box | None = None
    """Where the topic's object is drawn; None without an image or with a generic one."""
    generic: str | None = None
    """GENERIC_CAPTION or GENERIC_IMAGE when that modality says nothing of the topic."""

    @classmethod
    def draw(
        cls,
        index: int,
        seed: int,
        *,
        image_size: tuple[int, int] | None,
        words: tuple[int, int],
        generic: tuple[float, float],
    ) -> _SamplePost:
        # A generator per post, seeded from (seed, index): post i is the same whatever n is.
        rng = random.Random(f"postsim-samples:{seed}:{index}")
        topic = rng.choice(_TOPICS)
        kind = index % 10
        text = None if kind == 7 else _caption(topic, rng, words)
        image, box = (None, None) if kind == 3 else _picture(topic, rng, image_size)
        # Its own generator: the shares change which posts are generic, not the others' captions and pictures.
        generic_rng = random.Random(f"postsim-samples-generic:{seed}:{index}")
        draw, which = generic_rng.random(), None
        if text is not None and image is not None:
            if draw < generic[0]:
                which, text = GENERIC_CAPTION, generic_rng.choice(_GENERIC_CAPTIONS)
            elif draw < generic[0] + generic[1]:
                which, image, box = GENERIC_IMAGE, _generic_picture(generic_rng, image.size), None
        return cls(id=f"post-{index:05d}", topic=topic.name, text=text, image=image, object_box=box, generic=which)


@dataclass(frozen=True)
class _ImageFormat:
    extension: str
    pillow_format: str
    mode: str
    options: dict[str, Any] = field(default_factory=dict)

    def save(self, image: Image.Image, path: Path) -> None:
        if self.mode == "RGBA":
            image = _as_sticker(image)
        elif self.mode != image.mode:
            image = image.convert(self.mode)
        image.save(path, self.pillow_format, **self.options)


_JPEG = _ImageFormat("jpg", "JPEG", "RGB", {"quality": 85})
_FAST_PNG = {"compress_level": 1}  # grainy images barely compress: twice as fast as 6, ~10% bigger
_FORMAT_CYCLE = (
    _JPEG,
    _ImageFormat("png", "PNG", "RGB", _FAST_PNG),
    _JPEG,
    _ImageFormat("webp", "WEBP", "RGB", {"quality": 80}),
    _JPEG,
    _ImageFormat("png", "PNG", "RGBA", _FAST_PNG),
    _JPEG,
    _ImageFormat("jpg", "JPEG", "L", {"quality": 85}),
)
"""The format of each image post in turn: mostly JPEG, and every other kind within eight."""


def _as_sticker(image: Image.Image) -> Image.Image:
    """RGBA with a transparent border around a rounded rectangle, like a cut-out sticker."""
    alpha = Image.new("L", image.size, 0)
    inset = min(image.size) // 10
    ImageDraw.Draw(alpha).rounded_rectangle(
        (inset, inset, image.width - inset, image.height - inset), radius=inset, fill=255
    )
    sticker = image.convert("RGBA")
    sticker.putalpha(alpha)
    return sticker


# --- Captions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Topic:
    name: str
    titles: tuple[str, ...]
    phrases: tuple[str, ...]
    tags: tuple[str, ...]
    sky: tuple[RGB, RGB]
    """Background gradient, top colour then bottom colour."""
    draw: Drawer


_FILLER = (
    "had such a great time",
    "can not wait to come back",
    "sharing this one with you all",
    "one of my favourite moments this year",
    "what a day it was",
)


def _caption(topic: _Topic, rng: random.Random, words: tuple[int, int]) -> str:
    """A title, a description and a few hashtags, on three lines.

    The description is whole sentences, the topic's phrases then generic ones, until it has
    at least a number of words drawn from ``words`` (so it may pass the maximum by a phrase).
    """
    wanted = rng.randint(*words)
    phrases = list(topic.phrases)
    rng.shuffle(phrases)
    sentences: list[str] = []
    count = 0
    while count < wanted:
        phrase = phrases.pop() if phrases else rng.choice(_FILLER)
        sentences.append(f"{phrase[0].upper()}{phrase[1:]}.")
        count += len(phrase.split())
    tags = " ".join(f"#{tag}" for tag in rng.sample(topic.tags, k=rng.randint(2, 4)))
    return f"{rng.choice(topic.titles)}\n{' '.join(sentences)}\n{tags}"


_GENERIC_CAPTIONS = (
    "check this out ✨ #nofilter",
    "what a day 🙌 #photooftheday",
    "no words needed #instagood",
    "mood. #vibes #weekend",
    "just posting this here 🤷",
    "throwback #tbt",
    "can't stop looking at this 😍 #love",
    "another one for the feed #instadaily",
)
"""Captions that fit any topic."""


# --- Pictures ------------------------------------------------------------------------------


def _picture(topic: _Topic, rng: random.Random, size: tuple[int, int] | None) -> tuple[Image.Image, Box]:
    width, height = size or (rng.randint(*SIDE_RANGE), rng.randint(*SIDE_RANGE))
    top, bottom = (_jitter(colour, rng) for colour in topic.sky)
    image = _vertical_gradient(width, height, top, bottom)
    box = topic.draw(ImageDraw.Draw(image), width, height, rng)
    return _with_grain(image, rng), _clipped(box, width, height)


def _clipped(box: tuple[float, float, float, float], width: int, height: int) -> Box:
    left, top, right, bottom = box
    return (max(0, int(left)), max(0, int(top)), min(width, round(right)), min(height, round(bottom)))


def _generic_picture(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """A picture that fits any topic: one plain colour with grain, or coloured noise."""
    width, height = size
    if rng.random() < 0.5:
        colour = (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255))
        return _with_grain(Image.new("RGB", (width, height), colour), rng)
    noise_rng = np.random.default_rng(rng.getrandbits(64))
    return Image.fromarray(noise_rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def _vertical_gradient(width: int, height: int, top: RGB, bottom: RGB) -> Image.Image:
    weights = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    rows = (1 - weights) * np.array(top, np.float32) + weights * np.array(bottom, np.float32)
    return Image.fromarray(np.broadcast_to(rows, (height, width, 3)).astype(np.uint8))


def _with_grain(image: Image.Image, rng: random.Random) -> Image.Image:
    noise_rng = np.random.default_rng(rng.getrandbits(64))
    pixels = np.asarray(image, dtype=np.int16)
    grain = noise_rng.integers(-NOISE_LEVEL, NOISE_LEVEL + 1, size=pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels + grain, 0, 255).astype(np.uint8))


def _jitter(colour: RGB, rng: random.Random, spread: int = 20) -> RGB:
    red, green, blue = (min(255, max(0, channel + rng.randint(-spread, spread))) for channel in colour)
    return red, green, blue


def _draw_sunset_beach(draw: ImageDraw.ImageDraw, w: int, h: int, rng: random.Random) -> Box:
    horizon = int(h * rng.uniform(0.5, 0.62))
    shore = int(h * rng.uniform(0.78, 0.86))
    radius = min(w, h) * rng.uniform(0.08, 0.16)
    centre = w * rng.uniform(0.3, 0.7)
    draw.ellipse((centre - radius, horizon - radius, centre + radius, horizon + radius), fill=(255, 196, 70))
    draw.rectangle((0, horizon, w, shore), fill=_jitter((44, 64, 120), rng))
    for _ in range(rng.randint(3, 6)):
        y = rng.randint(horizon + 2, shore - 2)
        half = radius * rng.uniform(0.4, 1.2)
        draw.line((centre - half, y, centre + half, y), fill=(250, 150, 70), width=max(1, h // 120))
    draw.rectangle((0, shore, w, h), fill=_jitter((226, 196, 146), rng))
    return (int(centre - radius), int(horizon - radius), round(centre + radius), horizon)  # the sun above the sea


def _draw_city_night(draw: ImageDraw.ImageDraw, w: int, h: int, rng: random.Random) -> Box:
    moon = min(w, h) * 0.06
    mx, my = w * rng.uniform(0.6, 0.9), h * rng.uniform(0.08, 0.2)
    draw.ellipse((mx - moon, my - moon, mx + moon, my + moon), fill=(235, 235, 210))
    x = 0
    while x < w:
        width = rng.randint(max(8, w // 12), max(9, w // 5))
        top = int(h * rng.uniform(0.25, 0.65))
        draw.rectangle((x, top, x + width, h), fill=_jitter((35, 38, 52), rng, 10))
        window = max(2, width // 8)
        for wy in range(top + window, h - window, window * 2):
            for wx in range(x + window, x + width - window, window * 2):
                if rng.random() < 0.4:
                    draw.rectangle((wx, wy, wx + window - 1, wy + window - 1), fill=(255, 214, 110))
        x += width + rng.randint(0, max(1, w // 40))
    return (int(mx - moon), int(my - moon), round(mx + moon), round(my + moon))


def _draw_dog(draw: ImageDraw.ImageDraw, w: int, h: int, rng: random.Random) -> Box:
    draw.rectangle((0, int(h * 0.65), w, h), fill=_jitter((84, 150, 62), rng))
    fur = _jitter(rng.choice(((150, 100, 50), (205, 170, 110), (60, 45, 35))), rng, 15)
    unit = min(w, h) / 10
    cx, cy = w * rng.uniform(0.35, 0.6), h * 0.6
    for leg in (-2.2, -1.2, 1.0, 2.0):
        draw.rectangle((cx + leg * unit, cy, cx + (leg + 0.6) * unit, cy + 2.6 * unit), fill=fur)
    draw.ellipse((cx - 3 * unit, cy - 1.5 * unit, cx + 3 * unit, cy + 1.5 * unit), fill=fur)
    draw.line((cx - 3 * unit, cy - 0.5 * unit, cx - 4.2 * unit, cy - 2 * unit), fill=fur, width=int(unit / 2) + 1)
    hx, hy = cx + 3.2 * unit, cy - 2 * unit
    draw.ellipse((hx - 1.5 * unit, hy - 1.5 * unit, hx + 1.5 * unit, hy + 1.5 * unit), fill=fur)
    draw.ellipse((hx - 1.6 * unit, hy - 1.2 * unit, hx - 0.7 * unit, hy + 1.2 * unit), fill=(40, 30, 25))
    draw.ellipse((hx + 0.3 * unit, hy - 0.5 * unit, hx + 0.6 * unit, hy - 0.2 * unit), fill=(10, 10, 10))
    draw.ellipse((hx + 1.2 * unit, hy, hx + 1.7 * unit, hy + 0.4 * unit), fill=(10, 10, 10))
    return (int(cx - 4.2 * unit), int(hy - 1.5 * unit), round(hx + 1.7 * unit), round(cy + 2.6 * unit))


def _draw_food(draw: ImageDraw.ImageDraw, w: int, h: int, rng: random.Random) -> Box:
    cx, cy = w / 2, h / 2
    plate = min(w, h) * rng.uniform(0.36, 0.44)
    draw.ellipse((cx - plate, cy - plate, cx + plate, cy + plate), fill=(246, 246, 240), outline=(200, 200, 195))
    colours = ((210, 40, 30), (70, 160, 60), (245, 200, 60), (235, 130, 40), (150, 60, 30))
    for _ in range(rng.randint(6, 12)):
        radius = plate * rng.uniform(0.1, 0.25)
        x = cx + rng.uniform(-0.55, 0.55) * plate
        y = cy + rng.uniform(-0.55, 0.55) * plate
        draw.ellipse(
            (x - radius, y - radius * 0.8, x + radius, y + radius * 0.8), fill=_jitter(rng.choice(colours), rng)
        )
    fork_x = cx + plate * 1.15
    draw.rectangle((fork_x, cy - plate * 0.8, fork_x + plate * 0.08, cy + plate * 0.8), fill=(180, 180, 185))
    return (int(cx - plate), int(cy - plate), round(fork_x + plate * 0.08), round(cy + plate))


def _draw_mountains(draw: ImageDraw.ImageDraw, w: int, h: int, rng: random.Random) -> Box:
    left, top, right = float(w), float(h), 0.0
    for _ in range(rng.randint(2, 4)):
        peak_x, peak_y = w * rng.uniform(0.1, 0.9), h * rng.uniform(0.15, 0.45)
        half = w * rng.uniform(0.25, 0.5)
        base = h * 0.8
        left, top, right = min(left, peak_x - half), min(top, peak_y), max(right, peak_x + half)
        draw.polygon(
            [(peak_x - half, base), (peak_x, peak_y), (peak_x + half, base)], fill=_jitter((100, 110, 130), rng)
        )
        cap = 0.25
        draw.polygon(
            [
                (peak_x - half * cap, peak_y + (base - peak_y) * cap),
                (peak_x, peak_y),
                (peak_x + half * cap, peak_y + (base - peak_y) * cap),
            ],
            fill=(245, 245, 250),
        )
    draw.rectangle((0, int(h * 0.8), w, h), fill=_jitter((60, 110, 60), rng))
    return (int(left), int(top), round(right), int(h * 0.8))  # the peaks


def _draw_football(draw: ImageDraw.ImageDraw, w: int, h: int, rng: random.Random) -> Box:
    stripes = rng.randint(6, 10)
    for stripe in range(stripes):
        shade = (60, 150, 60) if stripe % 2 else (50, 130, 50)
        draw.rectangle((stripe * w / stripes, 0, (stripe + 1) * w / stripes, h), fill=shade)
    line = max(2, min(w, h) // 80)
    draw.line((w / 2, 0, w / 2, h), fill=(240, 240, 240), width=line)
    circle = min(w, h) * 0.22
    draw.ellipse((w / 2 - circle, h / 2 - circle, w / 2 + circle, h / 2 + circle), outline=(240, 240, 240), width=line)
    ball = min(w, h) * rng.uniform(0.06, 0.1)
    bx, by = w * rng.uniform(0.2, 0.8), h * rng.uniform(0.3, 0.8)
    draw.ellipse((bx - ball, by - ball, bx + ball, by + ball), fill=(250, 250, 250), outline=(20, 20, 20))
    draw.regular_polygon((bx, by, ball * 0.45), n_sides=5, fill=(20, 20, 20))
    return (int(bx - ball), int(by - ball), round(bx + ball), round(by + ball))


_TOPICS: tuple[_Topic, ...] = (
    _Topic(
        name="sunset_beach",
        titles=("Golden hour at the beach 🌅", "Sunset by the sea", "Last light on the shore", "Beach evenings"),
        phrases=(
            "the sun sank slowly into the ocean",
            "warm orange light over the waves",
            "barefoot on the sand after a long day",
            "the sky turned pink and purple",
            "quiet waves and a gentle breeze",
        ),
        tags=("sunset", "beach", "goldenhour", "ocean", "summer", "travel"),
        sky=((250, 140, 60), (120, 60, 130)),
        draw=_draw_sunset_beach,
    ),
    _Topic(
        name="city_night",
        titles=("City lights 🌃", "Downtown after dark", "Night skyline", "The city never sleeps"),
        phrases=(
            "neon signs reflecting on wet streets",
            "the skyline glowing after midnight",
            "traffic trails along the avenue",
            "rooftop view over the city at night",
            "late train home through the lights",
        ),
        tags=("citylights", "nightphotography", "skyline", "urban", "streetphotography"),
        sky=((10, 12, 40), (45, 40, 90)),
        draw=_draw_city_night,
    ),
    _Topic(
        name="dogs",
        titles=("Good boy 🐶", "Walk in the park with my dog", "Puppy love", "Meet our new puppy"),
        phrases=(
            "chasing the ball all afternoon",
            "wagging tail and muddy paws",
            "the happiest dog in the park",
            "nap time after a long walk",
            "learned to sit in just one day",
        ),
        tags=("dog", "dogsofinstagram", "puppy", "goodboy", "pets"),
        sky=((150, 200, 240), (200, 230, 250)),
        draw=_draw_dog,
    ),
    _Topic(
        name="food",
        titles=("Homemade pasta 🍝", "Brunch time", "Dinner is served", "Fresh salad bowl"),
        phrases=(
            "tomatoes fresh from the market",
            "homemade sauce with basil and garlic",
            "a colourful plate full of vegetables",
            "cooked it all from scratch tonight",
            "tastes even better than it looks",
        ),
        tags=("food", "foodie", "homecooking", "recipe", "yummy", "dinner"),
        sky=((150, 100, 60), (110, 70, 40)),
        draw=_draw_food,
    ),
    _Topic(
        name="mountains",
        titles=("Above the clouds ⛰️", "Summit day", "Alpine views", "Morning hike"),
        phrases=(
            "snow on the peaks in early autumn",
            "hiked up to the ridge before sunrise",
            "fresh air and endless views",
            "the trail climbed through the pine forest",
            "worth every step to the top",
        ),
        tags=("mountains", "hiking", "alps", "nature", "outdoors", "adventure"),
        sky=((110, 170, 230), (210, 230, 245)),
        draw=_draw_mountains,
    ),
    _Topic(
        name="football",
        titles=("Match day ⚽", "What a goal", "Sunday league", "Under the floodlights"),
        phrases=(
            "a last minute goal to win the match",
            "the crowd went wild in the stadium",
            "training on the pitch in the rain",
            "clean sheet for the keeper today",
            "derby day with the whole team",
        ),
        tags=("football", "soccer", "matchday", "goal", "sports", "team"),
        sky=((60, 150, 60), (50, 130, 50)),
        draw=_draw_football,
    ),
)


def topic_words(topic: str) -> frozenset[str]:
    """The words a sample caption draws from ``topic`` (its titles, phrases and tags), lower case, no ``#``."""
    (found,) = [candidate for candidate in _TOPICS if candidate.name == topic]
    text = " ".join((*found.titles, *found.phrases, *found.tags))
    return frozenset(word.strip(".,!#").lower() for word in text.split())
