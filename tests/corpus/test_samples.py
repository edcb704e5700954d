"""Sample posts: deterministic corpus, formats the server must handle, the JSONL reader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from postsim.client.posts import Post
from postsim.core.errors import InvalidPostError
from postsim.corpus import samples
from postsim.corpus.posts import CorpusPost, read_posts
from postsim.corpus.samples import write_sample_posts
from postsim.model_repository.preprocessing import decode_image

N = 20


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sample_posts(N, tmp_path_factory.mktemp("corpus"), seed=0)


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_same_seed_same_bytes_other_seed_other_posts(corpus: Path, tmp_path: Path) -> None:
    again = write_sample_posts(N, tmp_path / "again", seed=0)
    assert again.read_bytes() == corpus.read_bytes()
    for image in sorted((corpus.parent / "images").iterdir()):
        assert (again.parent / "images" / image.name).read_bytes() == image.read_bytes()
    other = write_sample_posts(5, tmp_path / "other", seed=1)
    assert records(other) != records(corpus)[:5]


def test_a_post_does_not_depend_on_how_many_are_written(corpus: Path, tmp_path: Path) -> None:
    fewer = write_sample_posts(5, tmp_path, seed=0)
    assert records(fewer) == records(corpus)[:5]


def test_the_jsonl_layout(corpus: Path) -> None:
    lines = records(corpus)
    assert len(lines) == N
    assert len({line["id"] for line in lines}) == N
    for line in lines:
        assert set(line) - {"object_box"} == {"id", "text", "image", "label", "generic"}
        has_object = line["image"] is not None and line["generic"] != samples.GENERIC_IMAGE
        assert ("object_box" in line) == has_object
        if line["image"] is not None:
            assert line["image"].startswith("images/")
            assert (corpus.parent / line["image"]).is_file()
        if has_object:
            left, top, right, bottom = line["object_box"]
            with Image.open(corpus.parent / line["image"]) as image:
                assert 0 <= left < right <= image.width and 0 <= top < bottom <= image.height
    text_only = [line for line in lines if line["image"] is None]
    image_only = [line for line in lines if line["text"] is None]
    assert text_only and image_only
    assert len(text_only) + len(image_only) <= N // 4  # most posts have both
    assert not list(corpus.parent.glob(".*.tmp"))


def test_captions_have_a_title_a_description_and_tags(corpus: Path) -> None:
    for line in records(corpus):
        if line["text"] is not None and line["generic"] != samples.GENERIC_CAPTION:
            title, description, tags = line["text"].split("\n")
            assert title and description.endswith(".")
            assert all(tag.startswith("#") for tag in tags.split())
    assert any(not line["text"].isascii() for line in records(corpus) if line["text"])  # emoji in titles


def test_images_come_in_every_format_and_shape_and_all_decode(corpus: Path) -> None:
    kinds = set()
    shapes = set()
    for post in read_posts(corpus):
        if post.image_path is None:
            continue
        with Image.open(post.image_path) as image:
            kinds.add((image.format, image.mode))
            assert all(160 <= side <= 900 for side in image.size)
            shapes.add("portrait" if image.height > image.width else "landscape")
        assert decode_image(post.image_path.read_bytes()).mode == "RGB"
    assert {("JPEG", "RGB"), ("PNG", "RGB"), ("WEBP", "RGB"), ("PNG", "RGBA"), ("JPEG", "L")} <= kinds
    assert shapes == {"portrait", "landscape"}


def test_labels_are_topics_and_a_share_of_captions_or_images_is_generic(tmp_path: Path) -> None:
    small = (64, 48)  # the shares do not depend on the pictures' size; small ones draw fast
    lines = records(write_sample_posts(400, tmp_path / "default", seed=0, image_size=small))
    assert {line["label"] for line in lines} == {topic.name for topic in samples._TOPICS}
    both = [line for line in lines if line["text"] is not None and line["image"] is not None]
    generic_captions = [line for line in both if line["generic"] == samples.GENERIC_CAPTION]
    generic_images = [line for line in both if line["generic"] == samples.GENERIC_IMAGE]
    assert 0.15 < len(generic_captions) / len(both) < 0.35 and 0.15 < len(generic_images) / len(both) < 0.35
    assert all(line["generic"] is None for line in lines if line not in both)  # a single modality stays topical
    assert {line["text"] for line in generic_captions} <= set(samples._GENERIC_CAPTIONS)
    label_words = {line["label"]: set() for line in lines}
    for line in both:
        if line["generic"] is None:
            label_words[line["label"]].update(line["text"].split("\n")[2].split())
    assert all(label_words.values())  # topical captions carry their topic's tags

    plain = records(
        write_sample_posts(40, tmp_path / "plain", seed=0, image_size=small, generic_captions=0, generic_images=0)
    )
    assert all(line["generic"] is None for line in plain)
    # The shares pick which posts are generic; the other posts are the same drawings and captions.
    same = [(a, b) for a, b in zip(plain, lines[:40], strict=True) if b["generic"] is None]
    assert same and all(a["text"] == b["text"] for a, b in same)


def test_benchmark_sizes_and_longer_captions(tmp_path: Path) -> None:
    path = write_sample_posts(
        6, tmp_path, seed=3, image_size=(640, 480), words=(20, 60), generic_captions=0, generic_images=0
    )
    for post in read_posts(path):
        if post.image_path is not None:
            assert Image.open(post.image_path).size == (640, 480)
        if post.text is not None:
            assert 20 <= len(post.text.split("\n")[1].split()) <= 60 + 10  # whole sentences


@pytest.mark.parametrize(
    "options",
    [
        {"n": -1},
        {"words": (0, 5)},
        {"words": (9, 5)},
        {"image_size": (16, 480)},
        {"generic_captions": -0.1},
        {"generic_captions": 0.6, "generic_images": 0.5},
    ],
    ids=["negative-n", "zero-words", "inverted-words", "tiny-image", "negative-share", "shares-over-1"],
)
def test_nonsense_arguments_are_refused(tmp_path: Path, options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        write_sample_posts(**{"n": 2, "out_dir": tmp_path, **options})


def test_a_crash_leaves_no_corpus_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    posts = write_sample_posts(3, tmp_path, seed=0)
    saved = 0

    def crash_on_the_third_image(self: object, image: Image.Image, path: Path) -> None:
        nonlocal saved
        saved += 1
        if saved == 3:
            raise OSError("disk full")
        image.save(path, "PNG")

    monkeypatch.setattr(samples._ImageFormat, "save", crash_on_the_third_image)
    with pytest.raises(OSError, match="disk full"):
        write_sample_posts(10, tmp_path, seed=1)
    assert not posts.exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_read_back(corpus: Path) -> None:
    posts = list(read_posts(corpus))
    assert len(posts) == N
    first = posts[0]
    assert isinstance(first, CorpusPost)
    assert first.id == "post-00000" and first.text and first.image_path == corpus.parent / "images/post-00000.jpg"
    post = first.to_post()
    assert isinstance(post, Post) and post.id == first.id and post.image_bytes()[:3] == b"\xff\xd8\xff"


def test_blank_lines_absent_keys_and_empty_text(tmp_path: Path) -> None:
    path = tmp_path / "posts.jsonl"
    path.write_text('{"id": "a", "text": "hi"}\n\n  \n{"id": "b", "text": "", "image": "x/b.png"}\n', encoding="utf-8")
    assert list(read_posts(path)) == [
        CorpusPost("a", "hi", None),
        CorpusPost("b", None, tmp_path / "x" / "b.png"),
    ]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b'{"text": "hi"}', "'id' must be a non-empty string, got None"),
        (b'{"id": 7, "text": "hi"}', "'id' must be a non-empty string, got 7"),
        (b'{"id": "b", "text": 5}', "'text' must be a string or null, got int"),
        (b'{"id": "b", "image": ["a.jpg"]}', "'image' must be a string or null, got list"),
        (b'{"id": "b", "text": null, "image": null}', "post 'b' has neither 'text' nor 'image'"),
        (b'{"id": "a", "text": "again"}', "duplicate id 'a' (first on line 1)"),
        (b'{"id": "a\\nERROR forged", "text": "hi"}', "post id 'a\\nERROR forged' has the character '\\n' (U+000A)"),
        (b'{"id": "' + b"x" * 10_000 + b'", "text": "hi"}', "post id '" + "x" * 40 + "...' has 10,000 characters"),
        (b'{"id": "post 1", "text": "hi"}', "post id 'post 1' has the character ' ' (U+0020); a post id is 1 to 128"),
        (b'{"id": "\xd0\xbf\xd0\xbe\xd1\x81\xd1\x82", "text": "hi"}', "post id 'пост' has the character 'п' (U+043F)"),
        (b'{"id": "b", "text": "caf\xe9"}', "not valid UTF-8 at byte 24 of the line"),
    ],
)
def test_a_malformed_line_is_named_by_its_number(tmp_path: Path, line: bytes, expected: str) -> None:
    path = tmp_path / "posts.jsonl"
    path.write_bytes(b'{"id": "a", "text": "fine"}\n\n' + line + b"\n")
    posts = read_posts(path)
    assert next(posts).id == "a"
    with pytest.raises(InvalidPostError) as caught:
        next(posts)
    assert str(caught.value).startswith(f"{path}:3: {expected}")
