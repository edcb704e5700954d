"""Post metadata: checked values, ISO-8601 times, and the columnar store an index version keeps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from live_index_fixtures import random_metadata

from postsim.core.errors import InvalidPostError, SearchIndexError
from postsim.model_repository.live_index.metadata import (
    MAX_TAGS,
    NO_CODE,
    NO_TIME,
    MetadataColumns,
    PostMetadata,
    format_time,
    parse_time,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("2024-05-01T12:00:00Z", 1_714_564_800),
        ("2024-05-01T14:00:00+02:00", 1_714_564_800),
        ("2024-05-01T12:00:00", 1_714_564_800),  # no offset: UTC
        ("2024-05-01", 1_714_521_600),  # a date alone: its midnight UTC
        ("2024-05-01T12:00:00.900Z", 1_714_564_800),  # whole seconds, rounded down
        ("1969-12-31T23:59:59Z", -1),
    ],
)
def test_times_are_read_as_epoch_seconds(text: str, seconds: int) -> None:
    assert parse_time(text, "created_at") == seconds


def test_times_read_back_what_they_format() -> None:
    assert parse_time(format_time(1_714_564_800), "t") == 1_714_564_800
    assert format_time(1_714_564_800) == "2024-05-01T12:00:00Z"


@pytest.mark.parametrize("value", ["yesterday", "2024-13-01", "2024-05-01 noon", "", 1_714_564_800, None])
def test_a_malformed_time_names_its_field(value: object) -> None:
    with pytest.raises(InvalidPostError, match=r"^created_at: .*(ISO-8601|2024-05-01T12:00:00Z)"):
        parse_time(value, "created_at")


def test_metadata_from_a_corpus_line_and_back() -> None:
    line = {
        "id": "p1",
        "text": "hi",
        "author": "ana",
        "created_at": "2024-05-01T12:00:00Z",
        "label": "cat",
        "tags": ["a", "b", "a"],
    }
    metadata = PostMetadata.from_fields(line)
    assert metadata == PostMetadata(author="ana", created_at=1_714_564_800, label="cat", tags=("a", "b"))
    assert PostMetadata.from_fields(metadata.to_fields()) == metadata
    assert PostMetadata.from_fields({"id": "p2", "author": None}) == PostMetadata()
    assert PostMetadata().to_fields() == {}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"author": ""}, r"^author: must be 1 to 256 characters, got 0"),
        ({"author": "x" * 257}, r"^author: must be 1 to 256 characters"),
        ({"label": 3}, r"^label: expected a string, got int"),
        ({"author": "ana\u202e"}, r"^author: .*U\+202E"),
        ({"tags": "a,b"}, r"^tags: expected a list of strings, got str"),
        ({"tags": ["ok", ""]}, r"^tags\[1\]: must be 1 to 100 characters"),
        ({"tags": [f"t{n}" for n in range(MAX_TAGS + 1)]}, rf"^tags: a post keeps at most {MAX_TAGS} tags"),
        ({"created_at": "soon"}, r"^created_at: 'soon' is not an ISO-8601 time"),
    ],
)
def test_bad_metadata_is_refused_naming_the_field(fields: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidPostError, match=message):
        PostMetadata.from_fields(fields)


def test_created_at_must_be_whole_seconds() -> None:
    with pytest.raises(InvalidPostError, match="created_at: expected whole epoch seconds"):
        PostMetadata(created_at=True)
    with pytest.raises(InvalidPostError, match="created_at"):
        PostMetadata(created_at=int(NO_TIME))


def test_columns_give_back_every_row() -> None:
    rows = random_metadata(300, seed=1)
    columns = MetadataColumns.of(rows[:100])
    columns.append(rows[100:])  # appended later, as upserts are
    assert len(columns) == 300
    assert [columns.row(row) for row in range(300)] == rows
    with pytest.raises(IndexError):
        columns.row(300)


def test_blank_columns_are_rows_without_metadata() -> None:
    columns = MetadataColumns.blank(5)
    assert [columns.row(row) for row in range(5)] == [PostMetadata()] * 5
    assert (columns.author == NO_CODE).all() and (columns.created_at == NO_TIME).all()


def test_take_keeps_the_rows_asked_for_and_only_the_strings_they_use() -> None:
    rows = [
        PostMetadata(author="ana", label="cat", tags=("a",)),
        PostMetadata(author="bo", label="dog", tags=("b", "c")),
        PostMetadata(author="cy", tags=("c",)),
        PostMetadata(label="cat"),
    ]
    taken = MetadataColumns.of(rows).take(np.array([1, 3]))
    assert [taken.row(row) for row in range(2)] == [rows[1], rows[3]]
    assert taken.authors.values == ["bo"] and sorted(taken.labels.values) == ["cat", "dog"]
    assert sorted(taken.tag_names.values) == ["b", "c"]
    with pytest.raises(SearchIndexError, match="strictly ascending"):
        MetadataColumns.of(rows).take(np.array([3, 1]))


def test_columns_survive_a_save_and_load(tmp_path: Path) -> None:
    rows = random_metadata(500, seed=2)
    path = tmp_path / "metadata.npz"
    MetadataColumns.of(rows).save(path)
    loaded = MetadataColumns.load(path, 500)
    assert [loaded.row(row) for row in range(500)] == rows
    loaded.append([PostMetadata(author="new author", tags=("new",))])  # a loaded store still takes upserts
    assert loaded.row(500) == PostMetadata(author="new author", tags=("new",))


def test_a_metadata_file_of_another_index_or_with_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "metadata.npz"
    MetadataColumns.of(random_metadata(10)).save(path)
    with pytest.raises(SearchIndexError, match="'author' holds 10 rows, the index 11; rebuild the index"):
        MetadataColumns.load(path, 11)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, author=np.array([object()], dtype=object))
    with pytest.raises(SearchIndexError, match="is not a postsim metadata file"):
        MetadataColumns.load(pickled, 1)
    damaged = tmp_path / "damaged.npz"
    with np.load(path) as stored:
        arrays = {name: stored[name] for name in stored.files}
    np.savez(damaged, **{**arrays, "author": np.full(10, 99, dtype=np.int32)})
    with pytest.raises(SearchIndexError, match="'author' holds codes outside its pool"):
        MetadataColumns.load(damaged, 10)
