"""What a post carries besides its vector: author, creation time, label and tags.

:class:`PostMetadata` is one post's, validated when it is built (a corpus line, an upsert,
a journal record). :class:`MetadataColumns` holds every row of an index column by column,
the way the filters read it: authors and labels as codes into a pool of the distinct
strings, creation times as epoch seconds, tags as (row, code) pairs in row order. Rows are
only ever appended (an upsert appends a new row and the live index retires the old one);
:meth:`MetadataColumns.take` keeps the live rows when an index is compacted.

An index version stores its columns in ``metadata.npz`` (numpy arrays, no pickled
objects), row i describing the post ``ids[i]``.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from postsim.core.errors import InvalidPostError, SearchIndexError
from postsim.core.files import atomic_path

METADATA_FILE = "metadata.npz"
MAX_NAME_CHARS = 256
"""Longest author or label."""
MAX_TAG_CHARS = 100
MAX_TAGS = 64
"""Most tags one post keeps."""
METADATA_FIELDS = ("author", "created_at", "label", "tags")
"""The metadata keys of a corpus line or an upsert."""
NO_CODE = -1
"""The code of a row without an author or a label."""
NO_TIME = np.iinfo(np.int64).min
"""The creation time of a row without one."""
_TIME_EXAMPLE = "2024-05-01T12:00:00Z"
_FORMAT_VERSION = 1


def parse_time(value: object, field: str) -> int:
    """An ISO-8601 time as whole seconds since 1970-01-01 UTC.

    ``Z`` or an offset (``+02:00``) says the time zone; a time without one is UTC, and a
    date alone is its midnight UTC. Anything else is an :class:`InvalidPostError` naming
    ``field``.
    """
    if not isinstance(value, str):
        raise InvalidPostError(
            f"{field}: expected an ISO-8601 time such as {_TIME_EXAMPLE}, got {type(value).__name__}"
        )
    text = value.strip()
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidPostError(
            f"{field}: {value!r} is not an ISO-8601 time; write it as {_TIME_EXAMPLE} (or with an offset, +02:00)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return math.floor(moment.timestamp())


def format_time(seconds: int) -> str:
    """Epoch seconds as ISO-8601 UTC (``2024-05-01T12:00:00Z``): what :func:`parse_time` reads back."""
    return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def check_name(value: object, field: str, *, max_chars: int = MAX_NAME_CHARS) -> str:
    """``value`` if it is a usable author, label or tag: a string of 1 to ``max_chars`` printable characters."""
    if not isinstance(value, str):
        raise InvalidPostError(f"{field}: expected a string, got {type(value).__name__}")
    if not value or len(value) > max_chars:
        raise InvalidPostError(f"{field}: must be 1 to {max_chars} characters, got {len(value):,}")
    control = next((character for character in value if unicodedata.category(character)[0] == "C"), None)
    if control is not None:
        raise InvalidPostError(
            f"{field}: {value[:40]!r} holds the control or format character U+{ord(control):04X}; remove it"
        )
    return value


def check_epoch_seconds(value: object, field: str) -> int:
    """``value`` if it is a usable creation time: whole seconds since 1970-01-01 UTC, within int64."""
    if isinstance(value, bool) or not isinstance(value, int) or not NO_TIME < value <= np.iinfo(np.int64).max:
        raise InvalidPostError(f"{field}: expected whole epoch seconds, got {value!r}")
    return value


@dataclass(frozen=True, kw_only=True)
class PostMetadata:
    """One post's metadata; every field may be absent. Built values are checked: a bad one is an InvalidPostError."""

    author: str | None = None
    created_at: int | None = None
    """Whole seconds since 1970-01-01 UTC (:func:`parse_time` reads ISO-8601)."""
    label: str | None = None
    tags: tuple[str, ...] = ()
    """Distinct, in the order given."""

    def __post_init__(self) -> None:
        if self.author is not None:
            check_name(self.author, "author")
        if self.label is not None:
            check_name(self.label, "label")
        if self.created_at is not None:
            check_epoch_seconds(self.created_at, "created_at")
        if not isinstance(self.tags, tuple):
            raise InvalidPostError(f"tags: expected a tuple of strings, got {type(self.tags).__name__}")
        for position, tag in enumerate(self.tags):
            check_name(tag, f"tags[{position}]", max_chars=MAX_TAG_CHARS)
        distinct = tuple(dict.fromkeys(self.tags))
        if len(distinct) > MAX_TAGS:
            raise InvalidPostError(f"tags: a post keeps at most {MAX_TAGS} tags, got {len(distinct)}")
        object.__setattr__(self, "tags", distinct)

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> PostMetadata:
        """The metadata of a corpus line or an upsert: ``author``, ``created_at`` (ISO-8601), ``label``, ``tags``.

        Other keys (``id``, ``text``, ``image``) are not metadata and are left alone; a key
        whose value is ``null`` counts as absent.
        """
        created_at = fields.get("created_at")
        tags = fields.get("tags")
        if tags is not None and (not isinstance(tags, list | tuple)):
            raise InvalidPostError(f"tags: expected a list of strings, got {type(tags).__name__}")
        return cls(
            author=_optional_str(fields.get("author"), "author"),
            created_at=None if created_at is None else parse_time(created_at, "created_at"),
            label=_optional_str(fields.get("label"), "label"),
            tags=tuple(tags or ()),
        )

    def to_fields(self) -> dict[str, object]:
        """The JSON-ready fields, absent ones left out, ``created_at`` as ISO-8601: what :meth:`from_fields` reads."""
        fields: dict[str, object] = {}
        if self.author is not None:
            fields["author"] = self.author
        if self.created_at is not None:
            fields["created_at"] = format_time(self.created_at)
        if self.label is not None:
            fields["label"] = self.label
        if self.tags:
            fields["tags"] = list(self.tags)
        return fields


def _optional_str(value: object, field: str) -> str | None:
    return None if value is None else check_name(value, field)


class AppendableArray:
    """A 1-D numpy array that grows at the end, for columns that rows are appended to.

    Capacity grows by an eighth (at least what is needed): appends stay amortised O(1), and
    a column of a million published rows is not doubled by its first upsert.
    """

    def __init__(self, dtype: type[np.generic], initial: np.ndarray | None = None) -> None:
        values = np.zeros(0, dtype=dtype) if initial is None else np.asarray(initial, dtype=dtype)
        self._data = values.copy()
        self._size = len(values)

    def __len__(self) -> int:
        return self._size

    @property
    def values(self) -> np.ndarray:
        """The array (a view: valid until the next append)."""
        return self._data[: self._size]

    def extend(self, values: np.ndarray | Sequence[object]) -> None:
        values = np.asarray(values, dtype=self._data.dtype)
        needed = self._size + len(values)
        if needed > len(self._data):
            grown = np.zeros(max(needed, len(self._data) + len(self._data) // 8, 16), dtype=self._data.dtype)
            grown[: self._size] = self._data[: self._size]
            self._data = grown
        self._data[self._size : needed] = values
        self._size = needed

    @property
    def nbytes(self) -> int:
        """Memory held, spare capacity included."""
        return int(self._data.nbytes)


class StringPool:
    """Distinct strings and their codes, 0, 1, 2 … in order of first use."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        self.values: list[str] = []
        self._codes: dict[str, int] = {}
        for value in values:
            self.code(value)

    def __len__(self) -> int:
        return len(self.values)

    def code(self, value: str) -> int:
        """The code of ``value``, added when new."""
        code = self._codes.get(value)
        if code is None:
            code = self._codes[value] = len(self.values)
            self.values.append(value)
        return code

    def find(self, values: Iterable[str]) -> np.ndarray:
        """The codes of those ``values`` the pool holds (int32); the others have no row to match."""
        return np.array([self._codes[value] for value in values if value in self._codes], dtype=np.int32)


class MetadataColumns:
    """The metadata of every row of an index, column by column; rows are appended, never changed."""

    def __init__(self) -> None:
        self.authors = StringPool()
        self.labels = StringPool()
        self.tag_names = StringPool()
        self._author = AppendableArray(np.int32)
        self._created_at = AppendableArray(np.int64)
        self._label = AppendableArray(np.int32)
        self._tag_rows = AppendableArray(np.int64)
        self._tag_codes = AppendableArray(np.int32)

    @classmethod
    def blank(cls, count: int) -> MetadataColumns:
        """``count`` rows without metadata: an index built before metadata was kept."""
        columns = cls()
        columns._author.extend(np.full(count, NO_CODE, dtype=np.int32))
        columns._created_at.extend(np.full(count, NO_TIME, dtype=np.int64))
        columns._label.extend(np.full(count, NO_CODE, dtype=np.int32))
        return columns

    @classmethod
    def of(cls, rows: Iterable[PostMetadata]) -> MetadataColumns:
        columns = cls()
        columns.append(list(rows))
        return columns

    def __len__(self) -> int:
        return len(self._author)

    @property
    def author(self) -> np.ndarray:
        """Per row, the author's code in :attr:`authors` or :data:`NO_CODE`."""
        return self._author.values

    @property
    def created_at(self) -> np.ndarray:
        """Per row, epoch seconds or :data:`NO_TIME`."""
        return self._created_at.values

    @property
    def label(self) -> np.ndarray:
        """Per row, the label's code in :attr:`labels` or :data:`NO_CODE`."""
        return self._label.values

    @property
    def tag_rows(self) -> np.ndarray:
        """One entry per (row, tag), rows ascending; :attr:`tag_codes` holds the tag of each."""
        return self._tag_rows.values

    @property
    def tag_codes(self) -> np.ndarray:
        return self._tag_codes.values

    def append(self, rows: Sequence[PostMetadata]) -> None:
        """Append one row per metadata, in order."""
        first = len(self)
        self._author.extend([NO_CODE if m.author is None else self.authors.code(m.author) for m in rows])
        self._created_at.extend([NO_TIME if m.created_at is None else m.created_at for m in rows])
        self._label.extend([NO_CODE if m.label is None else self.labels.code(m.label) for m in rows])
        self._tag_rows.extend([first + offset for offset, m in enumerate(rows) for _ in m.tags])
        self._tag_codes.extend([self.tag_names.code(tag) for m in rows for tag in m.tags])

    def row(self, row: int) -> PostMetadata:
        """The metadata of one row."""
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} of {len(self)}")
        author, label, created_at = int(self.author[row]), int(self.label[row]), int(self.created_at[row])
        start, stop = np.searchsorted(self.tag_rows, [row, row + 1])
        return PostMetadata(
            author=None if author == NO_CODE else self.authors.values[author],
            created_at=None if created_at == NO_TIME else created_at,
            label=None if label == NO_CODE else self.labels.values[label],
            tags=tuple(self.tag_names.values[code] for code in self.tag_codes[start:stop]),
        )

    def take(self, rows: np.ndarray) -> MetadataColumns:
        """The columns of ``rows`` (strictly ascending), renumbered 0, 1, 2 …; pools keep only the strings still used."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows[0] < 0 or rows[-1] >= len(self) or (np.diff(rows) <= 0).any()):
            raise SearchIndexError(f"rows to keep must be strictly ascending within 0..{len(self) - 1}")
        taken = MetadataColumns()
        taken.authors, author = _recoded(self.authors, self.author[rows])
        taken.labels, label = _recoded(self.labels, self.label[rows])
        kept = np.isin(self.tag_rows, rows)
        taken.tag_names, tag_codes = _recoded(self.tag_names, self.tag_codes[kept])
        taken._author.extend(author)
        taken._created_at.extend(self.created_at[rows])
        taken._label.extend(label)
        taken._tag_rows.extend(np.searchsorted(rows, self.tag_rows[kept]))
        taken._tag_codes.extend(tag_codes)
        return taken

    @property
    def nbytes(self) -> int:
        """Memory held by the columns (the string pools not counted: they hold distinct values only)."""
        columns = (self._author, self._created_at, self._label, self._tag_rows, self._tag_codes)
        return sum(column.nbytes for column in columns)

    def save(self, path: Path) -> None:
        """Write the columns as a ``.npz`` file, atomically (``postsim.core.files.atomic_path``)."""
        with atomic_path(path) as temporary, temporary.open("wb") as file:
            np.savez(
                file,
                format_version=np.array(_FORMAT_VERSION),
                author=self.author,
                created_at=self.created_at,
                label=self.label,
                tag_rows=self.tag_rows,
                tag_codes=self.tag_codes,
                authors=np.array(self.authors.values, dtype=np.str_),
                labels=np.array(self.labels.values, dtype=np.str_),
                tag_names=np.array(self.tag_names.values, dtype=np.str_),
            )

    @classmethod
    def load(cls, path: Path, count: int) -> MetadataColumns:
        """Read what :meth:`save` wrote, for an index of ``count`` rows; anything else is a SearchIndexError."""
        try:
            with np.load(path, allow_pickle=False) as stored:
                arrays = {name: stored[name] for name in stored.files}
        except (OSError, ValueError, KeyError) as error:
            raise SearchIndexError(f"{path} is not a postsim metadata file ({error}); rebuild the index") from None
        columns = cls()
        try:
            _check_stored(arrays, count)
        except SearchIndexError as error:
            raise SearchIndexError(f"{path}: {error}; rebuild the index") from None
        columns.authors = StringPool(arrays["authors"].tolist())
        columns.labels = StringPool(arrays["labels"].tolist())
        columns.tag_names = StringPool(arrays["tag_names"].tolist())
        columns._author.extend(arrays["author"])
        columns._created_at.extend(arrays["created_at"])
        columns._label.extend(arrays["label"])
        columns._tag_rows.extend(arrays["tag_rows"])
        columns._tag_codes.extend(arrays["tag_codes"])
        return columns


def _recoded(pool: StringPool, codes: np.ndarray) -> tuple[StringPool, np.ndarray]:
    """A pool of only the strings ``codes`` use, and the codes renumbered into it (:data:`NO_CODE` kept)."""
    used, recoded = np.unique(codes[codes != NO_CODE], return_inverse=True)
    renumbered = codes.copy()
    renumbered[codes != NO_CODE] = recoded
    return StringPool(pool.values[code] for code in used), renumbered


_STORED = {
    "format_version": np.integer,
    "author": np.int32,
    "created_at": np.int64,
    "label": np.int32,
    "tag_rows": np.int64,
    "tag_codes": np.int32,
    "authors": np.str_,
    "labels": np.str_,
    "tag_names": np.str_,
}


def _check_stored(arrays: dict[str, np.ndarray], count: int) -> None:
    missing = sorted(_STORED.keys() - arrays.keys())
    if missing:
        raise SearchIndexError(f"arrays {missing} are missing")
    for name, dtype in _STORED.items():
        if not np.issubdtype(arrays[name].dtype, dtype) or arrays[name].ndim != (0 if name == "format_version" else 1):
            raise SearchIndexError(f"array {name!r} has dtype {arrays[name].dtype} and {arrays[name].ndim} dimensions")
    if int(arrays["format_version"]) != _FORMAT_VERSION:
        raise SearchIndexError(f"format version {int(arrays['format_version'])}, this postsim reads {_FORMAT_VERSION}")
    for name in ("author", "created_at", "label"):
        if len(arrays[name]) != count:
            raise SearchIndexError(f"{name!r} holds {len(arrays[name])} rows, the index {count}")
    for name, pool in (("author", "authors"), ("label", "labels"), ("tag_codes", "tag_names")):
        codes = arrays[name]
        if len(codes) and (codes.min() < NO_CODE or codes.max() >= len(arrays[pool])):
            raise SearchIndexError(f"{name!r} holds codes outside its pool of {len(arrays[pool])} strings")
    rows = arrays["tag_rows"]
    if len(rows) != len(arrays["tag_codes"]) or (
        len(rows) and (rows[0] < 0 or rows[-1] >= count or (np.diff(rows) < 0).any() or (arrays["tag_codes"] < 0).any())
    ):
        raise SearchIndexError("the tag columns are not one ascending row and one code per tag")
