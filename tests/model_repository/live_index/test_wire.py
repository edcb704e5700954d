"""The CHANGES request post_changes sends retrieval, and the receipt it gets back."""

from __future__ import annotations

import numpy as np
import pytest

from postsim.core.errors import InvalidPostError
from postsim.model_repository.live_index.metadata import PostMetadata
from postsim.model_repository.live_index.protocol import ChangeReceipt, PostUpsert
from postsim.model_repository.live_index.wire import (
    ChangeRequest,
    change_statuses,
    receipt_from_json,
    receipt_to_json,
)
from postsim.model_repository.score_parts import PostParts


def test_an_upsert_request_round_trips_vectors_and_parts_bit_for_bit_and_metadata() -> None:
    rng = np.random.default_rng(0)
    vector, image, text = (rng.standard_normal(8).astype(np.float32) for _ in range(3))
    parts = PostParts(image=image, text=text, weights=np.array([0.25, 0.75], np.float32))
    metadata = PostMetadata(author="ann", created_at=1_714_564_800, label="dogs", tags=("a", "b"))
    request = ChangeRequest(
        weights_fingerprint="f" * 16,
        upserts=(
            PostUpsert(id="p-1", vector=vector, metadata=metadata, caption="hi", parts=parts),
            PostUpsert(id="p-2", vector=vector),
        ),
    )
    back = ChangeRequest.from_json(request.to_json())
    post, without_parts = back.upserts
    assert back.weights_fingerprint == "f" * 16 and not back.deletes
    assert post.id == "p-1" and post.caption == "hi" and post.metadata == metadata
    assert np.array_equal(post.vector, vector)
    assert post.parts is not None and without_parts.parts is None, "parts are optional"
    for name in ("image", "text", "weights"):
        assert np.array_equal(getattr(post.parts, name), getattr(parts, name)), name


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not json", "CHANGES: not a change request"),
        (b'{"deletes": ["bad id"]}', "delete: post id 'bad id' has the character ' '"),
        (b'{"upserts": [{"id": "p", "vector": "***"}]}', "post 'p': vector is not base64"),
        (b"{}", "upserts or deletes"),
        (b'{"upserts": [{"id": "p", "vector": "", "parts": [1]}]}', "post 'p': parts must be a JSON object"),
        (b'{"upserts": [{"id": "p", "vector": "", "parts": {"image": "*"}}]}', "post 'p': image is not base64"),
    ],
)
def test_a_malformed_request_is_an_invalid_post_error_saying_what(data: bytes, message: str) -> None:
    with pytest.raises(InvalidPostError, match=message):
        ChangeRequest.from_json(data)


def test_receipts_round_trip_and_give_each_row_its_status() -> None:
    receipt = ChangeReceipt(sequence=7, upserted=2, replaced_ids=("b",), deleted=0)
    assert receipt_from_json(receipt_to_json(receipt)) == receipt
    assert change_statuses(receipt, ["a", "b"], upsert=True) == ["added", "replaced"]
    deleted = ChangeReceipt(sequence=8, deleted=1, unknown_ids=("y",))
    assert change_statuses(deleted, ["x", "y"], upsert=False) == ["deleted", "unknown"]
