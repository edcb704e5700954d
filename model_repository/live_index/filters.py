"""Query-time filters: which posts a search may return.

A :class:`PostFilter` is what ``similar_posts`` receives (a JSON object, or the fields of
one), checked field by field: :func:`parse_filter`. :func:`filter_mask` compiles it over
an index's metadata columns into one boolean per row, and :class:`RowBitmap` turns such a
mask into a FAISS ``IDSelectorBitmap``, so the filter runs inside the search: FAISS only
ever ranks rows that pass, and a query asking for k results gets k whenever k rows pass.

Semantics, each condition ANDed with the others:

- ``exclude_ids``: never these posts (ids that no post has are allowed, and change nothing);
- ``exclude_author``: never posts by this author (posts without an author pass);
- ``created_after`` / ``created_before``: only posts created at or after / strictly before
  that time; a post without a creation time fails either;
- ``labels``: only posts whose label is one of these; a post without a label fails;
- ``tags``: only posts with at least one of these tags.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields

import faiss
import numpy as np

from postsim.core.errors import InvalidPostError
from postsim.model_repository.contract import post_id_problem
from postsim.model_repository.live_index.metadata import (
    MAX_NAME_CHARS,
    MAX_TAG_CHARS,
    NO_TIME,
    MetadataColumns,
    check_epoch_seconds,
    check_name,
    format_time,
    parse_time,
)

MAX_FILTER_VALUES = 1000
"""Most ids, labels or tags one filter lists."""


@dataclass(frozen=True, kw_only=True)
class PostFilter:
    """Conditions a post must meet to be returned; the default passes every post."""

    exclude_ids: frozenset[str] = frozenset()
    exclude_author: str | None = None
    created_after: int | None = None
    """Epoch seconds, inclusive."""
    created_before: int | None = None
    """Epoch seconds, exclusive."""
    labels: frozenset[str] | None = None
    """Keep posts whose label is one of these; ``None``: any post."""
    tags: frozenset[str] | None = None
    """Keep posts with at least one of these tags; ``None``: any post."""

    def __post_init__(self) -> None:
        for post_id in self.exclude_ids:
            problem = post_id_problem(post_id)
            if problem:
                raise InvalidPostError(f"{_field('exclude_ids')}: {problem}")
        if self.exclude_author is not None:
            check_name(self.exclude_author, _field("exclude_author"))
        for name, max_chars in (("labels", MAX_NAME_CHARS), ("tags", MAX_TAG_CHARS)):
            values = getattr(self, name)
            if values is not None and not values:
                raise InvalidPostError(f"{_field(name)}: an empty set would keep no post; leave the field out instead")
            for value in values or ():
                check_name(value, _field(name), max_chars=max_chars)
        for name in ("created_after", "created_before"):
            if getattr(self, name) is not None:
                check_epoch_seconds(getattr(self, name), _field(name))
        for name in ("exclude_ids", "labels", "tags"):
            if len(getattr(self, name) or ()) > MAX_FILTER_VALUES:
                raise InvalidPostError(
                    f"{_field(name)}: at most {MAX_FILTER_VALUES} values, got {len(getattr(self, name))}"
                )
        if (
            self.created_after is not None
            and self.created_before is not None
            and self.created_after >= self.created_before
        ):
            raise InvalidPostError(
                f"{_field('created_after')} ({format_time(self.created_after)}) must be before "
                f"{_field('created_before')} ({format_time(self.created_before)}): no post could pass"
            )

    @property
    def is_empty(self) -> bool:
        """Whether every post passes."""
        return self == PostFilter()


FILTER_FIELDS = tuple(field.name for field in fields(PostFilter))


def _field(name: str) -> str:
    return f"filter field {name!r}"


def parse_filter(value: Mapping[str, object] | str | bytes) -> PostFilter:
    """A filter from its JSON text or its decoded fields; any problem is an InvalidPostError naming the field.

    ``{"exclude_ids": [...], "exclude_author": "...", "created_after": "2024-05-01T00:00:00Z",
    "created_before": "...", "labels": [...], "tags": [...]}``, every field optional; times
    are ISO-8601 as :func:`~postsim.model_repository.live_index.metadata.parse_time` reads them.
    """
    if isinstance(value, bytes | str):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise InvalidPostError(f"filter: not valid JSON ({error})") from None
    if not isinstance(value, Mapping):
        raise InvalidPostError(
            f"filter: expected a JSON object of fields {list(FILTER_FIELDS)}, got {type(value).__name__}"
        )
    unknown = sorted(set(value) - set(FILTER_FIELDS))
    if unknown:
        raise InvalidPostError(f"filter: unknown field {unknown[0]!r}; the fields are {', '.join(FILTER_FIELDS)}")
    present = {name: field_value for name, field_value in value.items() if field_value is not None}
    return PostFilter(
        exclude_ids=frozenset(_strings(present, "exclude_ids") or ()),
        exclude_author=_string(present, "exclude_author"),
        created_after=_time(present, "created_after"),
        created_before=_time(present, "created_before"),
        labels=_set(_strings(present, "labels")),
        tags=_set(_strings(present, "tags")),
    )


def _strings(present: Mapping[str, object], name: str) -> list[str] | None:
    values = present.get(name)
    if values is None:
        return None
    if not isinstance(values, list) or not all(isinstance(item, str) for item in values):
        raise InvalidPostError(f"{_field(name)}: expected a list of strings, got {_json_type(values)}")
    return values


def _string(present: Mapping[str, object], name: str) -> str | None:
    value = present.get(name)
    if value is not None and not isinstance(value, str):
        raise InvalidPostError(f"{_field(name)}: expected a string, got {_json_type(value)}")
    return value


def _time(present: Mapping[str, object], name: str) -> int | None:
    value = present.get(name)
    return None if value is None else parse_time(value, _field(name))


def _set(values: list[str] | None) -> frozenset[str] | None:
    return None if values is None else frozenset(values)


def _json_type(value: object) -> str:
    if isinstance(value, list):
        return "a list holding " + ", ".join(sorted({type(item).__name__ for item in value}))
    return type(value).__name__


def filter_mask(where: PostFilter, columns: MetadataColumns, row_of: Mapping[str, int]) -> np.ndarray:
    """One boolean per row of ``columns``: whether the row meets every condition of ``where``.

    ``row_of`` maps the ids of the live posts to their rows (for ``exclude_ids``). Liveness
    is not this function's business: the caller ANDs the mask with its live rows.
    """
    mask = np.ones(len(columns), dtype=bool)
    excluded = [row_of[post_id] for post_id in where.exclude_ids if post_id in row_of]
    mask[excluded] = False
    if where.exclude_author is not None:
        code = columns.authors.find([where.exclude_author])
        if len(code):
            mask &= columns.author != code[0]
    if where.created_after is not None or where.created_before is not None:
        created = columns.created_at
        mask &= created != NO_TIME
        if where.created_after is not None:
            mask &= created >= where.created_after
        if where.created_before is not None:
            mask &= created < where.created_before
    if where.labels is not None:
        mask &= np.isin(columns.label, columns.labels.find(sorted(where.labels)))
    if where.tags is not None:
        tagged = np.zeros(len(columns), dtype=bool)
        tagged[columns.tag_rows[np.isin(columns.tag_codes, columns.tag_names.find(sorted(where.tags)))]] = True
        mask &= tagged
    return mask


class RowBitmap:
    """A FAISS ``IDSelectorBitmap`` of the rows a mask keeps; it holds the bits as long as it lives.

    Row i of the index is bit i of the bitmap (FAISS reads bit ``i & 7`` of byte ``i >> 3``).
    Keep this object referenced until the search that uses :attr:`selector` returns.
    """

    def __init__(self, mask: np.ndarray) -> None:
        self.bits = np.packbits(np.asarray(mask, dtype=bool), bitorder="little")
        self.selector = faiss.IDSelectorBitmap(len(self.bits), faiss.swig_ptr(self.bits))
