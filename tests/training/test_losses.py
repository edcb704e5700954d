"""The label and image↔text losses (postsim.training.losses)."""

from __future__ import annotations

import math

import pytest
import torch

from postsim.training.losses import UNLABELLED, ImageTextContrastiveLoss, LabelContrastiveLoss


def _clustered(labels: list[int], noise: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(max(labels) + 1, 16, generator=generator)
    return centres[torch.tensor(labels)] + noise * torch.randn(len(labels), 16, generator=generator)


def test_the_label_loss_is_lower_when_labels_cluster() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    loss = LabelContrastiveLoss()
    clustered = loss(_clustered(labels.tolist(), noise=0.1), labels)
    shuffled = loss(_clustered(labels.tolist(), noise=0.1), labels[torch.tensor([0, 3, 6, 1, 4, 7, 2, 5, 8])])
    assert clustered < shuffled


def test_unlabelled_posts_take_no_part_in_the_label_loss() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    embeddings = _clustered(labels.tolist(), noise=0.3)
    extra = torch.randn(3, 16)
    loss = LabelContrastiveLoss()
    with_unlabelled = loss(torch.cat([embeddings, extra]), torch.cat([labels, torch.full((3,), UNLABELLED)]))
    torch.testing.assert_close(with_unlabelled, loss(embeddings, labels))


def test_the_label_loss_without_two_labelled_posts_is_zero_and_differentiable() -> None:
    embeddings = torch.randn(3, 8, requires_grad=True)
    loss = LabelContrastiveLoss()(embeddings, torch.tensor([UNLABELLED, 2, UNLABELLED]))
    loss.backward()
    assert loss.item() == 0.0


def test_matched_image_text_pairs_score_lower_than_mismatched_and_both_directions_count() -> None:
    image = torch.randn(6, 8)
    loss = ImageTextContrastiveLoss(temperature=0.1)
    matched = loss(image, image + 0.01 * torch.randn(6, 8))
    mismatched = loss(image, image.roll(1, dims=0))
    assert matched < mismatched
    # Symmetric: swapping the modalities gives the same loss.
    text = torch.randn(6, 8)
    torch.testing.assert_close(loss(image, text), loss(text, image))


def test_the_alignment_temperature_is_learned_and_capped_like_clip() -> None:
    loss = ImageTextContrastiveLoss(temperature=0.07)
    assert loss.logit_scale.item() == pytest.approx(1 / 0.07)
    value = loss(torch.randn(4, 8), torch.randn(4, 8))
    value.backward()
    assert loss.log_logit_scale.grad is not None
    with torch.no_grad():
        loss.log_logit_scale.fill_(math.log(1000.0))
    assert loss.logit_scale.item() == pytest.approx(100.0)
    with pytest.raises(ValueError, match=r"at least 0\.01"):
        ImageTextContrastiveLoss(temperature=0.001)
