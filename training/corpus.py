"""A posts corpus with what training needs besides the posts: each post's label and split.

Two optional keys of a ``posts.jsonl`` line, next to those :func:`~postsim.client.samples.read_posts`
reads::

    {"id": "post-00001", "text": "...", "image": "...", "label": "dogs", "split": "test"}

``label`` (a string) makes posts relevant to each other; ``split`` (``train`` or ``test``)
fixes the post's side of the held-out split. Everything else about a line (the id, text
and image, duplicate ids, line numbers in errors) is ``read_posts``'s, which this module
runs alongside.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from postsim.client.samples import CorpusPost, read_posts
from postsim.core.errors import InvalidPostError
from postsim.training.split import Split

LABEL_KEY = "label"
SPLIT_KEY = "split"


@dataclass(frozen=True)
class LabelledPost:
    """A corpus post with its label (None: unlabelled) and its assigned split (None: by id)."""

    post: CorpusPost
    label: str | None
    split: Split | None

    @property
    def id(self) -> str:
        return self.post.id


def read_labelled_posts(path: Path | str) -> list[LabelledPost]:
    """Every post of the corpus, with label and split; InvalidPostError names the file and line of a bad one."""
    path = Path(path)
    return [
        LabelledPost(post=post, label=label, split=split)
        for post, (label, split) in zip(read_posts(path), _extra_fields(path), strict=True)
    ]


def label_counts(posts: list[LabelledPost]) -> Counter[str]:
    """How many posts carry each label."""
    return Counter(post.label for post in posts if post.label is not None)


def _extra_fields(path: Path) -> Iterator[tuple[str | None, Split | None]]:
    """(label, split) of each non-blank line, in the order read_posts yields its posts.

    read_posts checks each line before this sees it (zip pulls read_posts first), so a
    line reaching here is a JSON object.
    """
    with path.open("rb") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            record = json.loads(line.decode("utf-8"))
            where = f"{path}:{line_number}"
            yield _label(record.get(LABEL_KEY), where), _split(record.get(SPLIT_KEY), where)


def _label(value: object, where: str) -> str | None:
    """The label, or None for null, absent or blank (a blank label would make unrelated posts relevant)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidPostError(f"{where}: '{LABEL_KEY}' must be a string or null, got {type(value).__name__}")
    return value.strip() or None


def _split(value: object, where: str) -> Split | None:
    if value is None:
        return None
    allowed = ", ".join(repr(split.value) for split in Split)
    if not isinstance(value, str):
        raise InvalidPostError(f"{where}: '{SPLIT_KEY}' must be {allowed} or null, got {type(value).__name__}")
    try:
        return Split(value)
    except ValueError:
        raise InvalidPostError(f"{where}: '{SPLIT_KEY}' must be {allowed} or null, got {value!r}") from None
