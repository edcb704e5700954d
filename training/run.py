"""One call from a corpus to a trained head: :func:`train_head`, the function under ``postsim train``.

Reads the corpus (labels and split included), builds the backbones as ``export`` does,
extracts (or finds in the cache) every post's pooled features, trains the head on the
training side of the split while measuring the held-out side, and writes ``head.pt``,
``training.json`` and ``training.png`` into the output folder.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from postsim.core.errors import InvalidPostError
from postsim.corpus.posts import CorpusPost, read_posts
from postsim.corpus.split import Split, split_of
from postsim.models.settings import ModelSettings
from postsim.models.weights import build_models
from postsim.training.data import HeadTrainingData, training_mode
from postsim.training.features import DEFAULT_BATCH, PostFeatures, Progress, extract_features
from postsim.training.head import TrainableHead
from postsim.training.report import TrainingReport, planned_outputs, write_outputs
from postsim.training.trainer import EpochRecord, HeadTrainer, TrainingSettings

logger = logging.getLogger("postsim")


@dataclass(frozen=True, kw_only=True)
class TrainHeadSettings:
    """A training run: the corpus, the output folder, the backbones (as for export) and the training."""

    corpus: Path
    out_dir: Path
    models: ModelSettings = field(default_factory=ModelSettings)
    """Backbones, dim and seed exactly as ``postsim export`` takes them; ``head`` (a checkpoint) is the starting point."""
    training: TrainingSettings = field(default_factory=TrainingSettings)
    cache_dir: Path | None = None
    """Feature cache root; None: ``features/`` in postsim's per-user cache folder."""
    extraction_batch: int = DEFAULT_BATCH
    overwrite: bool = False
    """Replace a head.pt already in ``out_dir``; otherwise that is refused before any work."""


def train_head(
    settings: TrainHeadSettings,
    *,
    progress: Progress | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> TrainingReport:
    """Trains a head on ``settings.corpus`` and writes it with its record; see the module docstring.

    Raises InvalidPostError for a corpus that cannot train a head (a bad line, duplicate
    ids, a single label, too few posts on a side of the split), before any feature is
    extracted where the corpus alone shows it; ExportError when a backbone cannot be loaded.
    """
    outputs = planned_outputs(settings.out_dir)
    if outputs.head.exists() and not settings.overwrite:
        raise InvalidPostError(
            f"{outputs.head} exists: pass another output folder, or overwrite=True to replace that head"
        )
    posts = list(read_posts(settings.corpus))
    if not posts:
        raise InvalidPostError(f"{settings.corpus} has no posts")
    training_mode([post.label for post in posts])  # a single label is refused before any extraction
    models = build_models(settings.models)
    features = extract_features(
        posts,
        models,
        cache_dir=settings.cache_dir,
        batch_size=settings.extraction_batch,
        device=settings.training.torch_device(),
        progress=progress,
    )
    labels = {post.id: post.label for post in posts}
    splits = {post.id: split_of(post.id, post.split, held_out=settings.training.held_out) for post in posts}
    data = HeadTrainingData.build(features, labels, splits)
    outcome = HeadTrainer(TrainableHead.from_models(models), data, settings.training).fit(on_epoch)
    report = TrainingReport(
        corpus=Path(settings.corpus),
        corpus_fingerprint=corpus_fingerprint(posts, features, splits),
        posts={
            "corpus": len(posts),
            "kept": len(features.ids),
            "train": len(data.train_rows),
            "held_out": len(data.test_rows),
            "labelled": int((data.labels >= 0).sum()),
            "labels": len(data.label_names),
        },
        extraction=features.summary,
        fingerprints=features.fingerprints,
        provenance=models.provenance,
        model_options=settings.models.options(),
        settings=settings.training,
        outcome=outcome,
        outputs=outputs,
    )
    write_outputs(report)
    return report


def corpus_fingerprint(posts: Sequence[CorpusPost], features: PostFeatures, splits: dict[str, Split]) -> str:
    """sha256 of what training saw: each kept post's id, label, side of the split and content hashes.

    Independent of the order of the lines and of where the image files are.
    """
    label_of = {post.id: post.label or "" for post in posts}
    lines = sorted(
        "\t".join((post_id, label_of[post_id], splits[post_id].value, image_key or "", text_key or ""))
        for post_id, image_key, text_key in zip(features.ids, features.image_keys, features.text_keys, strict=True)
    )
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()
