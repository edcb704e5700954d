"""Labels and splits in the corpus (postsim.corpus.posts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from postsim.core.errors import InvalidPostError
from postsim.corpus.posts import read_posts
from postsim.corpus.split import Split


def _corpus(tmp_path: Path, *records: dict[str, object]) -> Path:
    path = tmp_path / "posts.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def test_labels_and_splits_are_read_with_the_posts(tmp_path: Path) -> None:
    path = _corpus(
        tmp_path,
        {"id": "a", "text": "one", "label": "dogs", "split": "test"},
        {"id": "b", "text": "two", "label": " "},
        {"id": "c", "text": "three", "label": None, "topic": "ignored"},
    )
    posts = list(read_posts(path))
    assert [(post.id, post.label, post.split) for post in posts] == [
        ("a", "dogs", Split.TEST),
        ("b", None, None),
        ("c", None, None),
    ]
    assert posts[0].text == "one"


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"id": "a", "text": "x", "label": 3}, "posts.jsonl:2: 'label' must be a string or null, got int"),
        ({"id": "a", "text": "x", "split": "validation"}, "posts.jsonl:2: 'split' must be 'train', 'test' or null"),
        ({"id": "first", "text": "x"}, "posts.jsonl:2: duplicate id 'first'"),
    ],
)
def test_bad_labels_splits_and_duplicate_ids_name_the_line(
    tmp_path: Path, record: dict[str, object], message: str
) -> None:
    path = _corpus(tmp_path, {"id": "first", "text": "fine"}, record)
    with pytest.raises(InvalidPostError, match=message):
        list(read_posts(path))


def test_a_video_may_be_named_under_image_or_video(tmp_path: Path) -> None:
    path = _corpus(
        tmp_path,
        {"id": "a", "image": "clips/a.mp4"},
        {"id": "b", "text": "two", "video": "clips/b.webm"},
    )
    assert [post.image_path for post in read_posts(path)] == [tmp_path / "clips/a.mp4", tmp_path / "clips/b.webm"]


def test_a_line_with_both_image_and_video_is_refused(tmp_path: Path) -> None:
    path = _corpus(tmp_path, {"id": "a", "image": "a.jpg", "video": "a.mp4"})
    with pytest.raises(InvalidPostError, match=r"posts.jsonl:1: post 'a' has both 'image' and 'video'"):
        list(read_posts(path))


def test_author_created_at_label_and_tags_are_the_posts_metadata(tmp_path: Path) -> None:
    from postsim.model_repository.live_index.metadata import PostMetadata

    path = _corpus(
        tmp_path,
        {"id": "a", "text": "x", "author": "ann", "created_at": "2024-05-01T00:00:00Z", "label": "dogs", "tags": ["t"]},
        {"id": "b", "text": "y"},
    )
    first, second = read_posts(path)
    assert first.metadata == PostMetadata(author="ann", created_at=1_714_521_600, label="dogs", tags=("t",))
    assert second.metadata == PostMetadata()


def test_bad_metadata_names_the_line(tmp_path: Path) -> None:
    path = _corpus(tmp_path, {"id": "a", "text": "x"}, {"id": "b", "text": "y", "tags": "not-a-list"})
    with pytest.raises(InvalidPostError, match=r"posts\.jsonl:2: tags: expected a list of strings"):
        list(read_posts(path))
