"""Pooled feature extraction and its cache (postsim.training.features), on tiny random backbones."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from postsim.corpus.posts import CorpusPost, read_posts
from postsim.corpus.samples import write_sample_posts
from postsim.model_repository.preprocessing import preprocess_images
from postsim.model_repository.tokenization import TextTokenizer
from postsim.models.settings import ModelSettings, ModelSize
from postsim.models.torch_runtime import pool_images, pool_texts
from postsim.models.weights import PostSimModels, build_models
from postsim.training import features as features_module
from postsim.training.features import (
    IMAGE,
    TEXT,
    backbone_fingerprints,
    extract_features,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def models() -> PostSimModels:
    return build_models(ModelSettings(weights="random", size=ModelSize.TINY, seed=0))


@pytest.fixture(scope="module")
def posts(tmp_path_factory: pytest.TempPathFactory) -> list[CorpusPost]:
    return list(read_posts(write_sample_posts(12, tmp_path_factory.mktemp("corpus"), seed=3)))


def _shards(cache: Path) -> list[Path]:
    return sorted(cache.rglob("shard-*.npz"))


def test_pooled_features_through_the_projection_are_the_encoders_output(
    models: PostSimModels, posts: list[CorpusPost]
) -> None:
    images = [post.image_path.read_bytes() for post in posts if post.image_path is not None][:4]
    features, errors = pool_images(models.image_encoder, images, CPU)
    assert errors == [None] * 4
    with torch.no_grad():
        expected = models.image_encoder(torch.from_numpy(preprocess_images(images).pixel_values))
        projected = models.image_encoder.projection(torch.from_numpy(features))
    torch.testing.assert_close(projected, expected, rtol=1e-5, atol=1e-5)

    texts = [post.text for post in posts if post.text is not None][:4]
    tokenizer = TextTokenizer.from_json(models.tokenizer_json)
    pooled, reasons = pool_texts(models.text_encoder, tokenizer, texts, CPU)
    assert reasons == [None] * 4
    encoded = tokenizer.encode([text.encode() for text in texts])
    with torch.no_grad():
        expected = models.text_encoder(torch.from_numpy(encoded.input_ids), torch.from_numpy(encoded.attention_mask))
        projected = models.text_encoder.projection(torch.from_numpy(pooled))
    torch.testing.assert_close(projected, expected, rtol=1e-5, atol=1e-5)


def test_a_second_extraction_computes_nothing_and_gives_the_same_features(
    models: PostSimModels, posts: list[CorpusPost], tmp_path: Path
) -> None:
    progress: list[tuple[int, int]] = []
    first = extract_features(posts, models, cache_dir=tmp_path, batch_size=5, progress=lambda *p: progress.append(p))
    assert progress == [(5, 12), (10, 12), (12, 12)]
    with_image = sum(post.image_path is not None for post in posts)
    with_text = sum(post.text is not None for post in posts)
    distinct_texts = len({post.text for post in posts if post.text is not None})  # generic captions repeat
    assert first.summary.computed == {IMAGE: with_image, TEXT: distinct_texts}
    assert len(_shards(tmp_path)) == 2  # one per modality, not one per post

    second = extract_features(posts, models, cache_dir=tmp_path, batch_size=5)
    assert second.summary.computed == {IMAGE: 0, TEXT: 0}
    assert second.summary.cached == {IMAGE: with_image, TEXT: with_text}
    np.testing.assert_array_equal(second.image, first.image)
    np.testing.assert_array_equal(second.text, first.text)
    assert second.ids == first.ids == tuple(post.id for post in posts)
    assert len(_shards(tmp_path)) == 2


def test_a_new_caption_recomputes_only_its_text(models: PostSimModels, posts: list[CorpusPost], tmp_path: Path) -> None:
    extract_features(posts, models, cache_dir=tmp_path)
    changed = [dataclasses.replace(posts[0], text="A different caption #new"), *posts[1:]]
    again = extract_features(changed, models, cache_dir=tmp_path)
    assert again.summary.computed == {IMAGE: 0, TEXT: 1}


def test_another_backbone_does_not_reuse_the_features(
    models: PostSimModels, posts: list[CorpusPost], tmp_path: Path
) -> None:
    same = build_models(ModelSettings(weights="random", size=ModelSize.TINY, seed=0))
    other = build_models(ModelSettings(weights="random", size=ModelSize.TINY, seed=1))
    assert backbone_fingerprints(same) == backbone_fingerprints(models)
    assert backbone_fingerprints(other).image != backbone_fingerprints(models).image
    assert backbone_fingerprints(other).text != backbone_fingerprints(models).text
    extract_features(posts, models, cache_dir=tmp_path)
    assert extract_features(posts, other, cache_dir=tmp_path).summary.cached == {IMAGE: 0, TEXT: 0}


def test_unusable_images_are_skipped_and_listed_never_raised(models: PostSimModels, tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff" + b"not really a jpeg" * 10)
    bad = [
        CorpusPost("missing-with-text", "a caption", tmp_path / "nowhere.jpg"),
        CorpusPost("empty-with-text", "another caption", tmp_path / "empty.jpg"),
        CorpusPost("corrupt-alone", None, tmp_path / "corrupt.jpg"),
        CorpusPost("fine", "a third caption", None),
    ]
    features = extract_features(bad, models, cache_dir=tmp_path / "cache")
    assert features.ids == ("missing-with-text", "empty-with-text", "fine")
    assert not features.image_present.any()
    assert features.text_present.all()
    reasons = {(item.post_id, item.modality): item.reason for item in features.summary.skipped}
    assert "nowhere.jpg" in reasons[("missing-with-text", IMAGE)]
    assert "empty (0 bytes)" in reasons[("empty-with-text", IMAGE)]
    assert "JPEG" in reasons[("corrupt-alone", IMAGE)]
    assert features.summary.dropped == ("corrupt-alone",)
    assert features.summary.kept == 3


def test_a_text_without_tokens_is_skipped(models: PostSimModels, tmp_path: Path) -> None:
    features = extract_features([CorpusPost("blank", "\u200b\u200b", None)], models, cache_dir=tmp_path)
    assert features.ids == ()
    assert features.summary.skipped[0].modality == TEXT


def test_shards_past_the_limit_are_merged_into_one(
    models: PostSimModels, posts: list[CorpusPost], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(features_module, "MAX_SHARDS", 3)
    for count in range(1, 7):  # each run adds new posts, so each writes a new shard per modality
        extract_features(posts[: 2 * count], models, cache_dir=tmp_path)
    image_shards = [shard for shard in _shards(tmp_path) if shard.parent.parent.name == IMAGE]
    assert 1 <= len(image_shards) <= 3
    again = extract_features(posts, models, cache_dir=tmp_path)
    assert again.summary.computed == {IMAGE: 0, TEXT: 0}


def test_an_unreadable_cache_shard_is_ignored_and_its_features_computed_again(
    models: PostSimModels, posts: list[CorpusPost], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = extract_features(posts, models, cache_dir=tmp_path)
    image_shard = next(shard for shard in _shards(tmp_path) if shard.parent.parent.name == IMAGE)
    image_shard.write_bytes(image_shard.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="postsim"):
        again = extract_features(posts, models, cache_dir=tmp_path)
    assert "ignoring unreadable feature cache shard" in caplog.text
    assert again.summary.computed[IMAGE] == first.summary.computed[IMAGE]
    assert again.summary.computed[TEXT] == 0
    np.testing.assert_allclose(again.image, first.image, rtol=1e-5, atol=1e-6)
