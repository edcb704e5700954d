"""The corpus format (``posts.jsonl``): one post a line, read and checked here for every command.

::

    {"id": "post-00001", "text": "Golden hour...", "image": "images/post-00001.jpg", "label": "dogs", "split": "test"}

One JSON object per line: ``id`` is a post id
(:func:`~postsim.model_repository.contract.post_id_problem`), unique in the file; ``text``
and ``image`` are strings or null (or absent) when the post has none, the image path
relative to the file's folder; at least one of them is set. The image file may be a video
(MP4/MOV, WebM, animated GIF or WebP; the server tells them from their bytes); a line may
name it under ``video`` instead, which is the same field (a line with both is refused). Two optional keys serve training
and evaluation: ``label`` (a string) makes posts relevant to each other, and ``split``
(``train`` or ``test``) fixes the post's side of the held-out split
(:mod:`postsim.corpus.split`). The label and three more optional keys are the post's metadata,
which an index keeps and a query may filter on: ``author`` (a string), ``created_at``
(ISO-8601) and ``tags`` (a list of strings). Other keys (``topic``) are ignored. :func:`read_posts` refuses a
bad line naming the file and the line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from postsim.client.posts import Post
from postsim.core.errors import InvalidPostError
from postsim.corpus.split import Split
from postsim.model_repository.contract import post_id_problem
from postsim.model_repository.live_index.metadata import PostMetadata

POSTS_FILE = "posts.jsonl"
"""The corpus file of a folder, as ``postsim sample-posts`` writes it."""
IMAGE_KEY = "image"
VIDEO_KEY = "video"
"""Another name of ``image`` for a post whose visual is a video."""
LABEL_KEY = "label"
SPLIT_KEY = "split"


@dataclass(frozen=True)
class CorpusPost:
    """One line of a ``posts.jsonl`` corpus; at least one of text and image is set."""

    id: str
    text: str | None
    image_path: Path | None
    """The post's image or video file, resolved against the JSONL file's folder; not checked to exist here."""
    label: str | None = None
    """Posts with the same label are relevant to each other; None: unlabelled."""
    split: Split | None = None
    """The post's side of the held-out split when the corpus fixes it; None: by id (:func:`~postsim.corpus.split.split_of`)."""
    metadata: PostMetadata = field(default_factory=PostMetadata)
    """Author, creation time, label and tags, as an index keeps them for filters."""

    def to_post(self) -> Post:
        """As a client :class:`~postsim.client.posts.Post`, the image read when the request is built."""
        return Post(id=self.id, text=self.text, image=self.image_path)


def read_posts(path: Path | str) -> Iterator[CorpusPost]:
    """Parse a ``posts.jsonl`` corpus lazily, one :class:`CorpusPost` per non-blank line.

    Raises InvalidPostError naming the file and line for a line that is not UTF-8 or not a
    JSON object, a missing or non-string id, an id that is not a post id
    (:func:`~postsim.model_repository.contract.post_id_problem`), a text, image or label that
    is neither a string nor null, a split other than ``train``, ``test`` or null, a post with
    neither text nor image, or an id seen on an earlier line. An empty text counts as no
    text, and a blank label as none (it would make unrelated posts relevant).
    """
    path = Path(path)
    first_line_of: dict[str, int] = {}
    with path.open("rb") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            post = _parse_line(line, path.parent, f"{path}:{line_number}")
            if post.id in first_line_of:
                raise InvalidPostError(
                    f"{path}:{line_number}: duplicate id {post.id!r} (first on line {first_line_of[post.id]})"
                )
            first_line_of[post.id] = line_number
            yield post


def _parse_line(line: bytes, folder: Path, where: str) -> CorpusPost:
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise InvalidPostError(f"{where}: not valid UTF-8 at byte {error.start} of the line") from None
    except json.JSONDecodeError as error:
        raise InvalidPostError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise InvalidPostError(f"{where}: expected a JSON object, got {type(record).__name__}")
    post_id = record.get("id")
    if not isinstance(post_id, str) or not post_id:
        raise InvalidPostError(f"{where}: 'id' must be a non-empty string, got {post_id!r}")
    problem = post_id_problem(post_id)
    if problem:
        raise InvalidPostError(f"{where}: {problem}")
    text = _optional_string(record, "text", where) or None
    image = _optional_string(record, IMAGE_KEY, where) or None
    video = _optional_string(record, VIDEO_KEY, where) or None
    if image is not None and video is not None:
        raise InvalidPostError(
            f"{where}: post {post_id!r} has both '{IMAGE_KEY}' and '{VIDEO_KEY}'; a post has one visual: keep one"
        )
    image = image or video
    if text is None and image is None:
        raise InvalidPostError(f"{where}: post {post_id!r} has neither 'text' nor '{IMAGE_KEY}' (or '{VIDEO_KEY}')")
    label = _label(record.get(LABEL_KEY), where)
    try:
        metadata = PostMetadata.from_fields({**record, LABEL_KEY: label})
    except InvalidPostError as error:
        raise InvalidPostError(f"{where}: {error}") from None
    return CorpusPost(
        id=post_id,
        text=text,
        image_path=folder / image if image else None,
        label=label,
        split=_split(record.get(SPLIT_KEY), where),
        metadata=metadata,
    )


def _optional_string(record: dict[str, Any], key: str, where: str) -> str | None:
    value = record.get(key)
    if value is not None and not isinstance(value, str):
        raise InvalidPostError(f"{where}: '{key}' must be a string or null, got {type(value).__name__}")
    return value


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
