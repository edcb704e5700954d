"""How one call's changes travel from ``post_changes`` to ``retrieval``, and its receipt back (the CHANGES tensor).

A change request is one JSON object, so that a call's upserts and deletes reach the live
index as one atomic change whatever their number (a tensor with a row per post would be cut
at the model's batch size):

``{"weights_fingerprint": "...", "upserts": [{"id", "caption", "metadata", "vector"}], "deletes": [ids]}``

``vector`` is the post's float32 embedding, little-endian, base64-encoded; ``metadata`` the
fields :meth:`~postsim.model_repository.live_index.metadata.PostMetadata.from_fields` reads.
A request carries upserts or deletes, not both; or it is a control, ``{"control": "seal"}``
(take no more changes: compaction hands the journal's tail to the next version) or ``"unseal"``. The receipt is a
:class:`~postsim.model_repository.live_index.protocol.ChangeReceipt` as a JSON object.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from postsim.core.errors import InvalidPostError
from postsim.model_repository import contract
from postsim.model_repository.live_index.metadata import PostMetadata
from postsim.model_repository.live_index.protocol import ChangeReceipt, PostUpsert, check_post_id


class Control(enum.Enum):
    """What a control request asks of the live index."""

    SEAL = "seal"
    """Take no more changes (until unsealed, or until the next version replaces this one)."""
    UNSEAL = "unseal"


@dataclass(frozen=True, kw_only=True, eq=False)
class ChangeRequest:
    """One call's changes: upserts (embedded by the encoders of ``weights_fingerprint``) or deletes."""

    weights_fingerprint: str = ""
    upserts: tuple[PostUpsert, ...] = ()
    deletes: tuple[str, ...] = ()
    control: Control | None = None

    def __post_init__(self) -> None:
        if self.control is not None and (self.upserts or self.deletes):
            raise InvalidPostError(f"a {self.control.value} request carries no changes")
        if self.control is None and bool(self.upserts) == bool(self.deletes):
            raise InvalidPostError("a change request carries upserts or deletes (one of them, not both)")

    def to_json(self) -> bytes:
        upserts = [
            {
                "id": post.id,
                "caption": post.caption,
                "metadata": post.metadata.to_fields(),
                "vector": base64.b64encode(np.asarray(post.vector, dtype="<f4").tobytes()).decode("ascii"),
            }
            for post in self.upserts
        ]
        document: dict[str, object] = {
            "weights_fingerprint": self.weights_fingerprint,
            "upserts": upserts,
            "deletes": list(self.deletes),
        }
        if self.control is not None:
            document["control"] = self.control.value
        return json.dumps(document).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ChangeRequest:
        """The request in ``data``; anything malformed is an InvalidPostError saying what."""
        try:
            document = json.loads(data)
            upserts = tuple(_upsert(entry) for entry in document.get("upserts", []))
            deletes = tuple(check_post_id(post_id, "delete") for post_id in document.get("deletes", []))
            fingerprint = str(document.get("weights_fingerprint", ""))
            control = _control(document.get("control"))
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError, KeyError) as error:
            raise InvalidPostError(f"{contract.CHANGES.name}: not a change request ({error})") from None
        return cls(weights_fingerprint=fingerprint, upserts=upserts, deletes=deletes, control=control)


def _control(value: object) -> Control | None:
    if value is None:
        return None
    try:
        return Control(value)
    except ValueError:
        known = ", ".join(control.value for control in Control)
        raise InvalidPostError(f"{contract.CHANGES.name}: control {value!r} is none of {known}") from None


def _upsert(entry: dict[str, object]) -> PostUpsert:
    post_id = check_post_id(entry["id"], "upsert")
    try:
        vector = np.frombuffer(base64.b64decode(str(entry["vector"]), validate=True), dtype="<f4")
    except (binascii.Error, ValueError) as error:
        raise InvalidPostError(f"post {post_id!r}: vector is not base64 float32 ({error})") from None
    metadata = entry.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise InvalidPostError(f"post {post_id!r}: metadata must be a JSON object, got {type(metadata).__name__}")
    caption = entry.get("caption", "")
    return PostUpsert(
        id=post_id,
        vector=vector.astype(np.float32),
        metadata=PostMetadata.from_fields(metadata),
        caption=caption if isinstance(caption, str) else str(caption),
    )


def receipt_to_json(receipt: ChangeReceipt) -> bytes:
    return json.dumps(asdict(receipt)).encode()


def receipt_from_json(data: bytes) -> ChangeReceipt:
    fields = json.loads(data)
    return ChangeReceipt(
        sequence=int(fields["sequence"]),
        upserted=int(fields["upserted"]),
        replaced_ids=tuple(fields["replaced_ids"]),
        deleted=int(fields["deleted"]),
        unknown_ids=tuple(fields["unknown_ids"]),
    )


def change_statuses(receipt: ChangeReceipt, ids: Sequence[str], *, upsert: bool) -> list[str]:
    """What became of each of ``ids`` (the rows of a post_changes call): added, replaced, deleted or unknown."""
    if upsert:
        replaced = set(receipt.replaced_ids)
        return ["replaced" if post_id in replaced else "added" for post_id in ids]
    unknown = set(receipt.unknown_ids)
    return ["unknown" if post_id in unknown else "deleted" for post_id in ids]
