"""The photo workload: the sizes, formats and byte sizes of real uploads, drawn deterministically."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageOps

from postsim.bench.photos import (
    EXIF_ORIENTATION_TAG,
    PhotoKind,
    PhotoMix,
    PhotoPost,
    PhotoWorkload,
    draw_photo_post,
    kind_of,
    photo_posts,
    write_photo_corpus,
)
from postsim.bench.soak import default_soak_posts
from postsim.bench.workload import Workload, load_bench_posts
from postsim.core.errors import BenchError
from postsim.model_repository.preprocessing import decode_image

KB, MB = 1024, 1024 * 1024
BYTE_RANGES = {
    PhotoKind.PORTRAIT: (200 * KB, 500 * KB),
    PhotoKind.SQUARE: (150 * KB, 500 * KB),
    PhotoKind.PHONE: (2 * MB, 5 * MB),
    PhotoKind.SCREENSHOT: (300 * KB, 4 * MB),
}
"""What real uploads of each kind weigh (a square photo is 80 % of a portrait one)."""


def only(kind: PhotoKind, **shares: float) -> PhotoWorkload:
    """A workload whose every post carries an image of ``kind``."""
    zero = {other.value: 0.0 for other in PhotoKind}
    mix = PhotoMix(**{**zero, kind.value: 1.0, "text_only": 0.0, "image_only": 0.0, **shares})
    return PhotoWorkload(mix=mix)


TEXT_ONLY = PhotoWorkload(
    mix=PhotoMix(portrait=0.0, square=0.0, phone=0.0, screenshot=0.0, text_only=1.0, image_only=0.0)
)


def first_of(kind: PhotoKind, count: int = 1) -> list[PhotoPost]:
    return [draw_photo_post(index, only(kind)) for index in range(count)]


@pytest.mark.parametrize("kind", [PhotoKind.PORTRAIT, PhotoKind.SQUARE, PhotoKind.SCREENSHOT])
def test_each_kind_has_its_size_format_and_weight(kind: PhotoKind) -> None:
    for post in first_of(kind, 3):
        image = Image.open(io.BytesIO(post.image))
        assert (image.format, image.size, image.mode) == (kind.format, kind.size, "RGB")
        low, high = BYTE_RANGES[kind]
        assert low <= len(post.image) <= high, f"{post.id}: {len(post.image):,} bytes"
        assert decode_image(post.image).size == kind.size  # the server takes it as it is


def test_jpegs_are_4_2_0_at_their_quality() -> None:
    image = Image.open(io.BytesIO(first_of(PhotoKind.PORTRAIT)[0].image))
    assert image.layer[1][1:3] == image.layer[2][1:3] == (1, 1)  # chroma: one sample per 2×2 luma
    assert image.layer[0][1:3] == (2, 2)


def test_phone_originals_are_12_mp_sensor_frames_turned_upright_by_exif() -> None:
    workload = only(PhotoKind.PHONE)
    orientations = Counter()
    for index in range(3):
        post = draw_photo_post(index, workload)
        low, high = BYTE_RANGES[PhotoKind.PHONE]
        assert low <= len(post.image) <= high, f"{post.id}: {len(post.image):,} bytes"
        stored = Image.open(io.BytesIO(post.image))
        assert (stored.format, stored.size) == ("JPEG", (4032, 3024))
        orientation = stored.getexif()[EXIF_ORIENTATION_TAG]
        orientations[orientation] += 1
        upright = ImageOps.exif_transpose(stored).size
        assert upright == ((3024, 4032) if orientation in (6, 8) else (4032, 3024))
        assert decode_image(post.image).size == upright
    assert orientations[6] >= 1  # a phone held upright: the commonest photo of all


def test_kinds_come_in_their_shares_and_interleave() -> None:
    workload = PhotoWorkload()
    kinds = [kind_of(index, workload) for index in range(1000)]
    counts = Counter(kinds)
    mix = workload.mix
    for kind in PhotoKind:
        assert counts[kind] == pytest.approx(1000 * getattr(mix, kind.value), abs=3)
    assert counts[None] == pytest.approx(1000 * mix.text_only, abs=3)
    first_twenty = Counter(kinds[:20])
    assert first_twenty[PhotoKind.PHONE] == 2 and first_twenty[PhotoKind.SCREENSHOT] == 2
    assert len(set(kinds[:5])) >= 3  # not all portraits first


def test_posts_without_image_or_caption_in_their_shares() -> None:
    workload = PhotoWorkload(mix=PhotoMix(portrait=0.5, square=0.0, phone=0.0, screenshot=0.0, text_only=0.5))
    posts = list(photo_posts(40, workload))
    assert sum(post.kind is None and post.image == b"" for post in posts) in (19, 20, 21)
    assert all(post.text for post in posts if post.kind is None)
    captionless = only(PhotoKind.SQUARE, square=0.5, portrait=0.5, image_only=1.0)
    assert all(post.text == "" and post.image for post in photo_posts(2, captionless))


def test_captions_have_20_to_60_words_of_description() -> None:
    for post in photo_posts(30, TEXT_ONLY):
        title, description, tags = post.text.split("\n")
        assert title and tags.startswith("#")
        assert 20 <= len(description.split()) <= 60 + 12  # whole sentences: the last may pass the maximum


def test_same_seed_same_bytes_other_seed_other_posts() -> None:
    workload = only(PhotoKind.SQUARE)
    first = [draw_photo_post(index, workload) for index in range(2)]
    assert [draw_photo_post(index, workload) for index in range(2)] == first
    assert first[0].image != first[1].image
    other = PhotoWorkload(mix=workload.mix, seed=1)
    assert draw_photo_post(0, other).image != first[0].image
    assert [kind_of(i, PhotoWorkload(seed=1)) for i in range(20)] != [kind_of(i, PhotoWorkload()) for i in range(20)]


def test_a_post_does_not_depend_on_how_many_are_drawn() -> None:
    assert list(photo_posts(3, TEXT_ONLY)) == list(photo_posts(5, TEXT_ONLY))[:3]


def test_the_corpus_is_read_by_the_benchmark(tmp_path: Path) -> None:
    workload = PhotoWorkload(mix=PhotoMix(portrait=0.5, square=0.25, phone=0.0, screenshot=0.0, text_only=0.25))
    seen: list[tuple[int, int]] = []
    path = write_photo_corpus(4, tmp_path, workload, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    records = [json.loads(line) for line in path.read_text().splitlines()]
    drawn = list(photo_posts(4, workload))
    assert [record["kind"] for record in records] == [post.kind.value if post.kind else None for post in drawn]
    assert [post.to_bench_post() for post in drawn] == load_bench_posts(path)
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(
    "shares",
    [
        {"portrait": 0.6},  # adds up to 1.15
        {"portrait": -0.1, "square": 0.85},
        {"text_only": 0.5, "image_only": 0.6},
    ],
)
def test_shares_that_make_no_sense_are_refused(shares: dict[str, Any]) -> None:
    with pytest.raises(BenchError, match="PhotoMix"):
        PhotoMix(**shares)


def test_no_posts_and_bad_word_bounds_are_refused(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="at least one post"):
        write_photo_corpus(0, tmp_path)
    with pytest.raises(BenchError, match="words"):
        PhotoWorkload(words=(30, 10))


@pytest.mark.parametrize("workload", list(Workload))
def test_the_benchmarks_draw_posts_of_the_workload_asked(workload: Workload) -> None:
    posts = default_soak_posts(4, workload)
    sizes = {Image.open(io.BytesIO(post.image_bytes())).size for post in posts if post.has_image}
    if workload is Workload.LEGACY:
        assert sizes == {(640, 480)}
    else:
        assert sizes and sizes <= {kind.size for kind in PhotoKind}
    assert all(len(post.text.split()) >= 20 for post in posts if post.text)
