"""Which posts train the head and which are held out to measure it.

One rule, used by training and by evaluation, so both see the same held-out posts: a post's
own ``split`` field when the corpus gives one, otherwise a stable hash of its id. The hash
is sha256, not Python's ``hash`` (salted per process), so the split does not depend on the
process, on the order of the corpus or on which other posts it holds: adding posts never
moves an old post from one side to the other.
"""

from __future__ import annotations

import enum
import hashlib

from postsim.core.errors import SettingsError

DEFAULT_HELD_OUT = 0.2
"""Share of the posts held out when the corpus does not say."""
_SALT = b"postsim-split\x00"
_HASH_RANGE = float(2**64)


class Split(enum.Enum):
    """The side of the split a post is on; the values are those of the corpus's ``split`` field."""

    TRAIN = "train"
    TEST = "test"


def split_of(post_id: str, assigned: Split | None = None, *, held_out: float = DEFAULT_HELD_OUT) -> Split:
    """``assigned`` when the post has a ``split`` field; else TEST for a ``held_out`` share of ids."""
    if not 0.0 <= held_out < 1.0:
        raise SettingsError(f"held_out must be at least 0 and below 1, got {held_out}")
    if assigned is not None:
        return assigned
    digest = hashlib.sha256(_SALT + post_id.encode("utf-8")).digest()
    position = int.from_bytes(digest[:8], "big") / _HASH_RANGE
    return Split.TEST if position < held_out else Split.TRAIN
