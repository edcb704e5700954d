"""Training benchmark: what ``postsim train`` costs, in its two stages.

- Feature extraction: posts a second through the frozen backbones (decode, preprocess,
  encode, pool: training's stage of the in-process pipeline), on a fresh cache so every
  feature is computed, with torch limited to ``threads`` CPU threads. Full-size backbones
  by default (random ResNet-101 and DistilBERT: the same layers and cost as the pretrained
  ones); ``text_model`` takes ``bundled:all-MiniLM-L6-v2``.
- Epochs over cached features: seconds per training epoch, and per held-out evaluation,
  for ``epoch_posts`` posts of synthetic features of the full-size widths (2048 image,
  768 text) and 20 labels; the backbones never run there, so the features' values do not
  change the cost.

``postsim bench training`` calls :func:`run_training_benchmark` and prints
:func:`format_training_bench`. Numbers belong in README, measured by that command.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from postsim.bench.workload import write_bench_corpus
from postsim.core.errors import BenchError
from postsim.corpus.posts import read_posts
from postsim.corpus.split import Split, split_of
from postsim.models.fingerprints import BackboneFingerprints
from postsim.models.modules import torch_required
from postsim.models.settings import ModelSettings, ModelSize
from postsim.models.weights import build_models
from postsim.training.data import HeadTrainingData
from postsim.training.features import ExtractionSummary, PostFeatures, extract_features
from postsim.training.head import TrainableHead
from postsim.training.trainer import HeadTrainer, TrainingSettings

with torch_required():
    import torch

logger = logging.getLogger("postsim")

FULL_IMAGE_FEATURES = 2048
"""ResNet-101's pooled width."""
FULL_TEXT_FEATURES = 768
"""DistilBERT's hidden size."""
EPOCH_LABELS = 20


@dataclass(frozen=True, kw_only=True)
class TrainingBenchSettings:
    posts: int = 64
    """Sample posts (640×480 JPEG-sized images, 20–60 word captions) whose features are extracted."""
    epoch_posts: int = 10_000
    epochs: int = 3
    threads: int = 2
    text_model: str | None = None
    """None: a random DistilBERT (full size); else a model as ``--text-model`` takes it."""
    size: ModelSize = ModelSize.FULL

    def __post_init__(self) -> None:
        if min(self.posts, self.epoch_posts, self.epochs, self.threads) < 1:
            raise BenchError(
                f"posts, epoch posts, epochs and threads must be at least 1, got {self.posts}, {self.epoch_posts}, "
                f"{self.epochs} and {self.threads}"
            )

    def models(self) -> ModelSettings:
        if self.text_model is None:
            return ModelSettings(weights="random", size=self.size)
        return ModelSettings(image_model="random", text_model=self.text_model, size=self.size)


@dataclass(frozen=True, kw_only=True)
class TrainingBenchReport:
    settings: TrainingBenchSettings
    backbones: str
    extraction: ExtractionSummary
    epoch_seconds: tuple[float, ...]
    evaluation_seconds: float
    """One held-out evaluation (every standard slice) of the epoch posts' held-out share."""

    @property
    def posts_per_second(self) -> float:
        return self.extraction.posts / self.extraction.seconds if self.extraction.seconds > 0 else 0.0


def run_training_benchmark(settings: TrainingBenchSettings) -> TrainingBenchReport:
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        models = build_models(settings.models())
        backbones = (
            f"{models.provenance['image_encoder']['backbone']} + {models.provenance['text_encoder']['backbone']}"
        )
        with tempfile.TemporaryDirectory(prefix="postsim-bench-training-") as work_dir:
            corpus = list(read_posts(write_bench_corpus(settings.posts, Path(work_dir) / "corpus")))
            logger.info(
                "extracting the features of %d posts (%s, %d threads)", len(corpus), backbones, settings.threads
            )
            features = extract_features(corpus, models, cache_dir=Path(work_dir) / "cache")
        data = _synthetic_data(settings.epoch_posts)
        trainer = HeadTrainer(
            TrainableHead.seeded(FULL_IMAGE_FEATURES, FULL_TEXT_FEATURES),
            data,
            TrainingSettings(epochs=settings.epochs, device="cpu"),
        )
        started = time.perf_counter()
        trainer.evaluator(trainer.head)
        evaluation_seconds = time.perf_counter() - started
        outcome = trainer.fit()
    finally:
        torch.set_num_threads(previous_threads)
    return TrainingBenchReport(
        settings=settings,
        backbones=backbones,
        extraction=features.summary,
        epoch_seconds=tuple(record.seconds for record in outcome.epochs[1:]),
        evaluation_seconds=evaluation_seconds,
    )


def _synthetic_data(posts: int) -> HeadTrainingData:
    """``posts`` posts of random features of the full-size widths, one in ten without image or text."""
    rng = np.random.default_rng(0)
    ids = tuple(f"post-{index:06d}" for index in range(posts))
    kind = np.arange(posts) % 10
    summary = ExtractionSummary(posts=posts, kept=posts, computed={}, cached={})
    features = PostFeatures(
        ids=ids,
        image=rng.standard_normal((posts, FULL_IMAGE_FEATURES), dtype=np.float32),
        image_present=kind != 3,
        text=rng.standard_normal((posts, FULL_TEXT_FEATURES), dtype=np.float32),
        text_present=kind != 7,
        image_keys=tuple(None if k == 3 else post_id for k, post_id in zip(kind, ids, strict=True)),
        text_keys=tuple(None if k == 7 else post_id for k, post_id in zip(kind, ids, strict=True)),
        fingerprints=BackboneFingerprints(image="synthetic", text="synthetic"),
        summary=summary,
    )
    labels = {post_id: f"label-{index % EPOCH_LABELS}" for index, post_id in enumerate(ids)}
    splits: dict[str, Split] = {post_id: split_of(post_id) for post_id in ids}
    return HeadTrainingData.build(features, labels, splits)


def format_training_bench(report: TrainingBenchReport) -> str:
    settings, extraction = report.settings, report.extraction
    epochs = report.epoch_seconds
    return "\n".join(
        [
            f"feature extraction ({report.backbones}, {settings.threads} threads): {extraction.posts} posts in "
            f"{extraction.seconds:.1f} s, {report.posts_per_second:.2f} posts/s "
            f"({1000 * extraction.seconds / max(extraction.posts, 1):.0f} ms a post)",
            f"training over cached features ({settings.epoch_posts} posts, {FULL_IMAGE_FEATURES}+{FULL_TEXT_FEATURES} "
            f"wide, {settings.threads} threads): {np.mean(epochs):.2f} s an epoch (min {min(epochs):.2f}, "
            f"max {max(epochs):.2f}, {len(epochs)} epochs), plus {report.evaluation_seconds:.2f} s for each "
            "epoch's held-out evaluation",
        ]
    )
