"""Query-time filters: parsing with errors that name the field, and their compilation over metadata columns."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from live_index_fixtures import AUTHORS, LABELS, TAGS, Reference, clustered, random_metadata

from postsim.core.errors import InvalidPostError
from postsim.model_repository.live_index.filters import (
    FILTER_FIELDS,
    MAX_FILTER_VALUES,
    PostFilter,
    RowBitmap,
    filter_mask,
    parse_filter,
)
from postsim.model_repository.live_index.metadata import MetadataColumns


def test_a_filter_parses_from_json_and_from_fields() -> None:
    text = (
        '{"exclude_ids": ["p1", "p2"], "exclude_author": "ana", "created_after": "2024-05-01T00:00:00Z",'
        ' "created_before": "2024-06-01", "labels": ["cat"], "tags": ["beach", "summer"]}'
    )
    expected = PostFilter(
        exclude_ids=frozenset({"p1", "p2"}),
        exclude_author="ana",
        created_after=1_714_521_600,
        created_before=1_717_200_000,
        labels=frozenset({"cat"}),
        tags=frozenset({"beach", "summer"}),
    )
    assert parse_filter(text) == expected
    assert parse_filter(text.encode()) == expected
    assert parse_filter({"labels": ["cat"], "tags": None}) == PostFilter(labels=frozenset({"cat"}))
    assert parse_filter("{}").is_empty and not expected.is_empty


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('{"label": ["cat"]}', r"^filter: unknown field 'label'; the fields are exclude_ids, exclude_author"),
        ('{"created_after": "last tuesday"}', r"^filter field 'created_after': 'last tuesday' is not an ISO-8601 time"),
        ('{"created_before": 1714521600}', r"^filter field 'created_before': expected an ISO-8601 time"),
        ('{"labels": "cat"}', r"^filter field 'labels': expected a list of strings, got str"),
        ('{"tags": ["a", 3]}', r"^filter field 'tags': expected a list of strings, got a list holding int, str"),
        ('{"labels": []}', r"^filter field 'labels': an empty set would keep no post"),
        ('{"exclude_ids": ["has space"]}', r"^filter field 'exclude_ids': post id 'has space' has the character ' '"),
        ('{"exclude_author": ["ana"]}', r"^filter field 'exclude_author': expected a string, got a list"),
        (
            '{"created_after": "2024-06-01", "created_before": "2024-05-01"}',
            r"'created_after' \(2024-06-01T00:00:00Z\) must be before filter field 'created_before'",
        ),
        ("[1, 2]", r"^filter: expected a JSON object of fields"),
        ("{not json", r"^filter: not valid JSON"),
    ],
)
def test_a_bad_filter_is_refused_naming_the_field(value: str, message: str) -> None:
    with pytest.raises(InvalidPostError, match=message):
        parse_filter(value)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"created_after": "2024-01-01"}, r"^filter field 'created_after': expected whole epoch seconds, got '2024"),
        ({"created_before": True}, r"^filter field 'created_before': expected whole epoch seconds"),
        ({"tags": frozenset()}, r"^filter field 'tags': an empty set would keep no post"),
        ({"exclude_author": "line\nbreak"}, r"^filter field 'exclude_author': .*U\+000A"),
    ],
)
def test_a_filter_built_in_code_is_checked_as_a_parsed_one(fields: dict[str, object], message: str) -> None:
    """Callers that build a PostFilter directly (the Milvus store writes its times into an expression) get the same checks."""
    with pytest.raises(InvalidPostError, match=message):
        PostFilter(**fields)  # type: ignore[arg-type]


def test_a_filter_lists_a_bounded_number_of_values() -> None:
    with pytest.raises(InvalidPostError, match=f"at most {MAX_FILTER_VALUES} values"):
        parse_filter({"tags": [f"t{n}" for n in range(MAX_FILTER_VALUES + 1)]})


FILTERS = [
    PostFilter(),
    PostFilter(exclude_ids=frozenset({"p3", "p10", "not-indexed"})),
    PostFilter(exclude_author="ana"),
    PostFilter(exclude_author="nobody"),
    PostFilter(created_after=1_700_000_000 + 200 * 3600),
    PostFilter(created_before=1_700_000_000 + 500 * 3600),
    PostFilter(created_after=1_700_000_000 + 100 * 3600, created_before=1_700_000_000 + 150 * 3600),
    PostFilter(labels=frozenset({"cat", "news"})),
    PostFilter(labels=frozenset({"unused"})),
    PostFilter(tags=frozenset({"beach", "art"})),
    PostFilter(tags=frozenset({"rare"})),
    PostFilter(exclude_author="bo", labels=frozenset({"dog"}), tags=frozenset({"city"}), created_after=1_700_000_000),
]


@pytest.mark.parametrize("where", FILTERS, ids=[str(n) for n in range(len(FILTERS))])
def test_the_mask_keeps_exactly_the_posts_that_pass(where: PostFilter) -> None:
    metadata = random_metadata(400, seed=3, rare_share=0.03)
    ids = [f"p{row}" for row in range(400)]
    reference = Reference(ids, clustered(400), metadata)
    mask = filter_mask(where, MetadataColumns.of(metadata), {post_id: row for row, post_id in enumerate(ids)})
    assert mask.tolist() == [reference.passes(post_id, where) for post_id in ids]


def test_the_fixture_metadata_covers_every_value() -> None:
    """The mask test above means something only if the metadata uses every author, label and tag."""
    metadata = random_metadata(400, seed=3, rare_share=0.03)
    assert {m.author for m in metadata} >= set(AUTHORS) and {m.label for m in metadata} >= set(LABELS)
    assert {tag for m in metadata for tag in m.tags} == set(TAGS)


def test_a_row_bitmap_selects_rows_inside_a_faiss_search() -> None:
    vectors = clustered(1000)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    mask = np.zeros(1000, dtype=bool)
    mask[np.random.default_rng(0).choice(1000, 37, replace=False)] = True
    bitmap = RowBitmap(mask)
    params = faiss.SearchParameters()
    params.sel = bitmap.selector
    _, rows = index.search(vectors[:5], 50, params=params)
    for found in rows:
        assert set(found[found >= 0]) == set(np.flatnonzero(mask))  # all 37, and nothing else


def test_filter_fields_are_the_dataclass_fields() -> None:
    assert FILTER_FIELDS == ("exclude_ids", "exclude_author", "created_after", "created_before", "labels", "tags")
