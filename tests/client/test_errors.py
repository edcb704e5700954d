"""Triton's refusals reworded: the messages are Triton 2.51's own, as a real server sends them."""

from __future__ import annotations

import pytest

from postsim.client.errors import explain

EXTRA_INPUT = (
    "[request id: <id_unknown>] expected 2 inputs but got 3 inputs for model 'post_embedding'. Got input(s) "
    "['EXTRA','TEXT','IMAGE'], but missing required input(s) ]. Please provide all required input(s)."
)
EXTRA_AND_MISSING = (
    "[request id: <id_unknown>] expected 3 inputs but got 3 inputs for model 'similar_posts'. Got input(s) "
    "['EXTRA','TEXT','IMAGE'], but missing required input(s) ['TOP_K']. Please provide all required input(s)."
)
EMPTY_BATCH = (
    "[request id: <id_unknown>] expected 1 string elements for inference input 'TEXT' for model 'post_embedding', got 0"
)


def test_an_input_too_many_is_named_with_the_inputs_the_model_takes() -> None:
    assert explain(EXTRA_INPUT) == (
        "model 'post_embedding' takes the inputs ['IMAGE', 'TEXT'] and no others: it does not take ['EXTRA']"
    )
    assert explain(EXTRA_AND_MISSING) == (
        "model 'similar_posts' takes the inputs ['IMAGE', 'TEXT', 'TOP_K'] and no others: "
        "it does not take ['EXTRA']; the request lacks ['TOP_K']"
    )


def test_an_empty_batch_is_called_one() -> None:
    message = explain(EMPTY_BATCH)
    assert "model 'post_embedding': input 'TEXT' holds no element: the request holds no post (a batch of 0)" in message
    assert "send at least one post" in message


@pytest.mark.parametrize(
    "message",
    [
        "unexpected inference input 'EXTRA' for model 'post_embedding'",
        EXTRA_INPUT.replace("post_embedding", "someone_elses_model"),
        "expected 2 string elements for inference input 'TEXT' for model 'post_embedding', got 1",
    ],
    ids=["already-clear", "unknown-model", "some-elements"],
)
def test_other_messages_are_left_as_they_are(message: str) -> None:
    assert explain(message) == message
