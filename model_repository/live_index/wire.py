"""How one call's changes travel from ``post_changes`` to ``retrieval``, and its receipt back (the CHANGES tensor).

A change request is one JSON object, so that a call's upserts and deletes reach the live
index as one atomic change whatever their number (a tensor with a row per post would be cut
at the model's batch size):

``{"weights_fingerprint": "...", "upserts": [{"id", "caption", "metadata", "vector", "parts"}], "deletes": [ids]}``

``vector`` is the post's float32 embedding, little-endian, base64-encoded; ``parts``
(optional) its score parts, ``{"image", "text", "weights"}`` encoded the same way (the unit
modality vectors and weights that split its scores, ``contract.CONTRIBUTIONS``); ``metadata`` the
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
from postsim.model_repository.score_parts import PostParts


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
        upserts: list[dict[str, object]] = []
        for post in self.upserts:
            entry: dict[str, object] = {
                "id": post.id,
                "caption": post.caption,
                "metadata": post.metadata.to_fields(),
                "vector": _encoded(post.vector),
            }
            if post.parts is not None:
                entry["parts"] = {name: _encoded(getattr(post.parts, name)) for name in _PARTS}
            upserts.append(entry)
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


_PARTS = ("image", "text", "weights")


def _encoded(array: np.ndarray) -> str:
    return base64.b64encode(np.asarray(array, dtype="<f4").tobytes()).decode("ascii")


def _decoded(value: object, post_id: str, name: str) -> np.ndarray:
    try:
        return np.frombuffer(base64.b64decode(str(value), validate=True), dtype="<f4").astype(np.float32)
    except (binascii.Error, ValueError) as error:
        raise InvalidPostError(f"post {post_id!r}: {name} is not base64 float32 ({error})") from None


def _upsert(entry: dict[str, object]) -> PostUpsert:
    post_id = check_post_id(entry["id"], "upsert")
    vector = _decoded(entry["vector"], post_id, "vector")
    parts = entry.get("parts")
    if parts is not None and not isinstance(parts, dict):
        raise InvalidPostError(f"post {post_id!r}: parts must be a JSON object, got {type(parts).__name__}")
    metadata = entry.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise InvalidPostError(f"post {post_id!r}: metadata must be a JSON object, got {type(metadata).__name__}")
    caption = entry.get("caption", "")
    return PostUpsert(
        id=post_id,
        vector=vector,
        metadata=PostMetadata.from_fields(metadata),
        caption=caption if isinstance(caption, str) else str(caption),
        parts=None if parts is None else PostParts(**{name: _decoded(parts[name], post_id, name) for name in _PARTS}),
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
