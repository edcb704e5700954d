"""Synthetic pooled features with a known structure."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from postsim.models.fingerprints import BackboneFingerprints
from postsim.training.features import ExtractionSummary, PostFeatures

SIGNAL_DIMS = 8


def synthetic_features(
    posts: int = 600,
    labels: int = 6,
    *,
    image_width: int = 64,
    text_width: int = 48,
    generic_share: float = 0.25,
    seed: int = 0,
) -> tuple[PostFeatures, dict[str, str | None]]:
    """Features whose label lives in a few low-variance dimensions under high-variance noise.

    A random projection keeps mostly the noise; a trained one can find the signal. A share
    of the posts has an uninformative text (every such text near one generic point), another
    share an uninformative image, so each modality alone is ambiguous where the other is not;
    one post in ten has no image and one in ten no text.
    """
    rng = np.random.default_rng(seed)
    label_of = rng.integers(0, labels, posts)
    kind = rng.uniform(size=posts)

    def modality(width: int, generic_rows: np.ndarray) -> np.ndarray:
        scale = np.ones(width)
        scale[:SIGNAL_DIMS] = 0.3
        centres = np.zeros((labels, width))
        centres[:, :SIGNAL_DIMS] = rng.normal(size=(labels, SIGNAL_DIMS))
        generic = np.zeros(width)
        generic[:SIGNAL_DIMS] = rng.normal(size=SIGNAL_DIMS)
        rows = centres[label_of]
        rows[generic_rows] = generic
        return (rows + rng.normal(size=(posts, width)) * scale).astype(np.float32)

    image = modality(image_width, (kind >= generic_share) & (kind < 2 * generic_share))
    text = modality(text_width, kind < generic_share)
    present = rng.uniform(size=posts)
    image_present, text_present = present >= 0.1, present < 0.9
    image[~image_present] = 0.0
    text[~text_present] = 0.0
    ids = tuple(f"post-{index:05d}" for index in range(posts))
    features = PostFeatures(
        ids=ids,
        image=image,
        image_present=image_present,
        text=text,
        text_present=text_present,
        image_keys=tuple(post_id if present else None for post_id, present in zip(ids, image_present, strict=True)),
        text_keys=tuple(post_id if present else None for post_id, present in zip(ids, text_present, strict=True)),
        fingerprints=BackboneFingerprints(image="synthetic-image", text="synthetic-text"),
        summary=ExtractionSummary(posts=posts, kept=posts, computed={}, cached={}),
    )
    return features, {post_id: f"label-{label}" for post_id, label in zip(ids, label_of, strict=True)}


@pytest.fixture
def make_features() -> Callable[..., tuple[PostFeatures, dict[str, str | None]]]:
    return synthetic_features
