"""From a corpus to a head export loads (postsim.training.run, .report, .head), on tiny random backbones."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from postsim.core import files
from postsim.core.errors import ExportError, InvalidPostError
from postsim.corpus.posts import read_posts
from postsim.corpus.samples import write_sample_posts
from postsim.models.pipeline import PostPipeline, Preprocessor
from postsim.models.settings import ModelSettings, ModelSize
from postsim.models.torch_runtime import TorchRuntime
from postsim.models.weights import build_models
from postsim.training.features import IMAGE, extract_features
from postsim.training.head import METADATA_KEY
from postsim.training.run import TrainHeadSettings, TrainingReport, train_head
from postsim.training.trainer import TrainingSettings

TINY = ModelSettings(weights="random", size=ModelSize.TINY, seed=0, dim=64)
QUICK = TrainingSettings(epochs=3, batch_size=64, learning_rate=1e-2, device="cpu")


@dataclass(frozen=True)
class Trained:
    corpus: Path
    cache: Path
    report: TrainingReport


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    folder = tmp_path_factory.mktemp("run")
    corpus = write_sample_posts(120, folder / "corpus", seed=0)
    (folder / "corpus" / "images" / "post-00001.png").unlink()  # a missing image: skipped, listed
    settings = TrainHeadSettings(
        corpus=corpus, out_dir=folder / "out", models=TINY, training=QUICK, cache_dir=folder / "cache"
    )
    return Trained(corpus=corpus, cache=folder / "cache", report=train_head(settings))


def test_the_trained_head_loads_into_export_and_embeds_posts_as_training_does(trained: Trained) -> None:
    report = trained.report
    models = build_models(ModelSettings(**{**TINY.__dict__, "head": report.outputs.head}))
    assert models.provenance["fuser"]["weights"] == f"checkpoint:{report.outputs.head.resolve()}"
    head = report.outcome.head
    torch.testing.assert_close(models.fuser.state_dict(), head.fuser.state_dict())
    torch.testing.assert_close(models.image_encoder.projection.state_dict(), head.image_projection.state_dict())

    # The served computation (preprocessing, backbones, head) in PyTorch gives what training computes from cached features.
    posts = [post for post in read_posts(trained.corpus) if post.id != "post-00001"][:16]
    pipeline = PostPipeline(Preprocessor.from_tokenizer_json(models.tokenizer_json), TorchRuntime(models))
    served, _ = pipeline.embed(
        [post.image_path.read_bytes() if post.image_path else b"" for post in posts],
        [(post.text or "").encode() for post in posts],
    )
    features = extract_features(posts, models, cache_dir=trained.cache)
    assert features.summary.computed == {IMAGE: 0, "text": 0}  # the run cached them all
    with torch.no_grad():
        output = head(
            torch.from_numpy(features.image),
            torch.from_numpy(features.text),
            torch.from_numpy(features.image_present).float()[:, None],
            torch.from_numpy(features.text_present).float()[:, None],
        )
    cosine = (output.embedding.numpy() * served).sum(axis=1)
    assert cosine.min() > 0.9999


def test_the_checkpoint_and_training_json_record_where_the_head_came_from(trained: Trained) -> None:
    report = trained.report
    checkpoint = torch.load(report.outputs.head, map_location="cpu", weights_only=True)
    metadata = checkpoint[METADATA_KEY]
    assert metadata["corpus_fingerprint"] == report.corpus_fingerprint
    assert metadata["backbone_fingerprints"] == report.fingerprints.to_dict()
    assert metadata["best_epoch"] == report.outcome.best_epoch
    assert metadata["settings"]["epochs"] == 3
    record = json.loads(report.outputs.json.read_text())
    assert [epoch["epoch"] for epoch in record["epochs"]] == [0, 1, 2, 3]
    assert set(record["epochs"][1]["losses"]) == {"label", "alignment", "total"}
    slices = {entry["name"] for entry in record["epochs"][1]["held_out"]["slices"]}
    assert {"post", "text", "image", "text->image", "image->text", "pair"} <= slices
    assert record["posts"]["labels"] == 6
    assert report.outputs.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_missing_image_is_skipped_and_listed_and_its_post_trains_on_its_text(trained: Trained) -> None:
    skipped = {(item.post_id, item.modality) for item in trained.report.extraction.skipped}
    assert skipped == {("post-00001", IMAGE)}
    assert trained.report.posts["kept"] == trained.report.posts["corpus"] == 120


def test_the_corpus_fingerprint_follows_content_not_order(trained: Trained, tmp_path: Path) -> None:
    lines = trained.corpus.read_text().splitlines(keepends=True)
    shuffled = tmp_path / "corpus" / "posts.jsonl"
    shuffled.parent.mkdir()
    (shuffled.parent / "images").symlink_to(trained.corpus.parent / "images")
    shuffled.write_text("".join(reversed(lines)))
    settings = TrainHeadSettings(
        corpus=shuffled,
        out_dir=tmp_path / "out",
        models=TINY,
        training=TrainingSettings(**{**QUICK.__dict__, "epochs": 1}),
        cache_dir=trained.cache,
    )
    again = train_head(settings)
    assert again.extraction.computed == {IMAGE: 0, "text": 0}
    assert again.corpus_fingerprint == trained.report.corpus_fingerprint


def test_an_existing_head_is_kept_unless_overwrite_is_asked(trained: Trained) -> None:
    before = trained.report.outputs.head.read_bytes()
    settings = TrainHeadSettings(corpus=trained.corpus, out_dir=trained.report.outputs.head.parent, models=TINY)
    with pytest.raises(InvalidPostError, match=r"head\.pt exists"):
        train_head(settings)
    assert trained.report.outputs.head.read_bytes() == before


def test_an_interrupted_write_leaves_no_head(trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(source: str, destination: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", interrupted)
    settings = TrainHeadSettings(
        corpus=trained.corpus,
        out_dir=tmp_path / "out",
        models=TINY,
        training=TrainingSettings(**{**QUICK.__dict__, "epochs": 1}),
        cache_dir=trained.cache,
    )
    with pytest.raises(KeyboardInterrupt):
        train_head(settings)
    assert os.listdir(tmp_path / "out") == []


def test_a_single_label_is_refused_before_any_model_is_built(tmp_path: Path) -> None:
    corpus = tmp_path / "posts.jsonl"
    corpus.write_text(
        "".join(json.dumps({"id": f"p{i}", "text": f"text {i}", "label": "same"}) + "\n" for i in range(5))
    )
    settings = TrainHeadSettings(corpus=corpus, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache")
    with pytest.raises(InvalidPostError, match="the label 'same'"):
        train_head(settings)  # the default pretrained weights are never reached: no hub here
    assert not (tmp_path / "cache").exists()


def test_a_head_of_another_dim_is_refused_by_export_with_what_to_pass(trained: Trained) -> None:
    with pytest.raises(ExportError, match=r"has dim 64 and these models dim 32: pass `--dim 64` and the options it"):
        build_models(ModelSettings(**{**TINY.__dict__, "dim": 32, "head": trained.report.outputs.head}))
    assert np.isfinite(trained.report.outcome.best.selection)


def test_a_head_trained_on_other_backbones_is_refused_with_the_options_it_was_trained_with(trained: Trained) -> None:
    # Seed 1 draws other random backbones of the same shapes: the head would load, and mean nothing.
    with pytest.raises(ExportError, match="trained on other image and text backbone weights") as caught:
        build_models(ModelSettings(**{**TINY.__dict__, "seed": 1, "head": trained.report.outputs.head}))
    assert "`--weights random --size tiny --seed 0 --dim 64`" in str(caught.value)


def test_the_exported_head_records_its_provenance(trained: Trained) -> None:
    head = trained.report.outputs.head
    models = build_models(ModelSettings(**{**TINY.__dict__, "head": head}))
    record = models.provenance["head"]
    assert record["sha256"] == hashlib.sha256(head.read_bytes()).hexdigest()
    assert record["corpus_fingerprint"] == trained.report.corpus_fingerprint
    assert record["best_epoch"] == trained.report.outcome.best_epoch
    assert {entry["name"] for entry in record["held_out"]["slices"]} >= {"post", "text->image"}
    assert build_models(TINY).provenance["head"] == {"seeded": 0}
