"""The training loop of the head, over cached features: the backbones never run here.

The loop (:class:`HeadTrainer`), the data (:class:`~postsim.training.data.HeadTrainingData`),
the loss (:class:`HeadObjective`) and the evaluator
(:class:`~postsim.training.evaluator.HeldOutEvaluator`) are separate objects, as in
open_clip's ``train.py`` and sentence-transformers' trainer. Every epoch logs its losses and
scores the held-out posts; the epoch with the best held-out figure is the one kept, and
epoch 0 (the head as it started) competes too, so training never hands back a head worse
than the one it was given, on the held-out posts.

Deterministic given the seed on the CPU: the shuffling and the modality dropout draw from
one seeded generator, and the head starts from the given weights.
"""

from __future__ import annotations

import copy
import enum
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from postsim.core.errors import InvalidPostError, SettingsError
from postsim.corpus.split import DEFAULT_HELD_OUT
from postsim.evaluation.metrics import Metric
from postsim.evaluation.result import EvaluationResult
from postsim.evaluation.slices import POST
from postsim.models.modules import torch_required
from postsim.training.data import Batch, HeadTrainingData, ModalityDropout, TrainingMode
from postsim.training.evaluator import HeldOutEvaluator, selection_value
from postsim.training.head import HeadOutput, TrainableHead
from postsim.training.losses import (
    DEFAULT_ALIGNMENT_TEMPERATURE,
    DEFAULT_LABEL_TEMPERATURE,
    ImageTextContrastiveLoss,
    LabelContrastiveLoss,
)

with torch_required():
    import torch
    from torch import nn

logger = logging.getLogger("postsim")


class SelectionMetric(enum.Enum):
    """The held-out figure of the fused embeddings that picks the best epoch."""

    PRECISION_AT_10 = "p@10"
    NDCG_AT_10 = "ndcg@10"

    @property
    def metric(self) -> Metric:
        return Metric.PRECISION if self is SelectionMetric.PRECISION_AT_10 else Metric.NDCG

    @property
    def k(self) -> int:
        return 10


@dataclass(frozen=True, kw_only=True)
class TrainingSettings:
    """How the head is trained; the defaults were chosen by held-out retrieval on sample
    corpora and synthetic features (the measurements belong in README's training section)."""

    epochs: int = 50
    batch_size: int = 256
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    label_temperature: float = DEFAULT_LABEL_TEMPERATURE
    """Temperature of the label (supervised contrastive) loss."""
    alignment_temperature: float = DEFAULT_ALIGNMENT_TEMPERATURE
    """Initial temperature of the image↔text loss (it is learned)."""
    label_weight: float = 1.0
    alignment_weight: float = 0.5
    drop_image: float = 0.1
    """Share of the training posts with both modalities whose image is hidden in a step."""
    drop_text: float = 0.1
    """Share of them whose text is hidden (never both)."""
    held_out: float = DEFAULT_HELD_OUT
    select_by: SelectionMetric = SelectionMetric.PRECISION_AT_10
    seed: int = 0
    device: str | None = None
    """``cuda``, ``cpu`` ...; None: the GPU when there is one."""

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "learning_rate", "label_temperature", "alignment_temperature")
        for name in positive:
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("weight_decay", "label_weight", "alignment_weight"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.label_weight == 0 and self.alignment_weight == 0:
            raise SettingsError("label_weight and alignment_weight are both 0: nothing to learn from")
        ModalityDropout(self.drop_image, self.drop_text)  # checks the rates
        self.torch_device()  # checks the device before any work

    def torch_device(self) -> torch.device:
        """The device asked for, or the GPU when there is one; SettingsError for one torch cannot use here."""
        if self.device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise SettingsError(f"--device {self.device}: not a torch device; pass cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SettingsError(f"--device {self.device}: torch sees no CUDA GPU here; pass cpu, or leave --device out")
        return device

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "select_by": self.select_by.value}


class HeadObjective(nn.Module):
    """The weighted sum of the label loss on the fused embeddings and the image↔text loss.

    The label loss sees the embeddings after modality dropout; the alignment loss sees each
    modality's projection of the posts that have both, whatever was dropped.
    """

    def __init__(self, settings: TrainingSettings, mode: TrainingMode) -> None:
        super().__init__()
        self.label_weight = settings.label_weight if mode is TrainingMode.SUPERVISED else 0.0
        self.alignment_weight = settings.alignment_weight
        if self.label_weight == 0 and self.alignment_weight == 0:
            raise SettingsError(
                "without labels the head learns from the alignment loss alone: alignment_weight must be > 0"
            )
        self.label_loss = LabelContrastiveLoss(settings.label_temperature)
        self.alignment_loss = ImageTextContrastiveLoss(settings.alignment_temperature)

    def forward(self, output: HeadOutput, batch: Batch) -> dict[str, torch.Tensor]:
        """``{"label": ..., "alignment": ..., "total": ...}`` for one batch."""
        both = batch.image_present & batch.text_present
        label = self.label_loss(output.embedding, batch.labels) if self.label_weight else output.embedding.sum() * 0.0
        alignment = self.alignment_loss(output.image[both], output.text[both])
        total = self.label_weight * label + self.alignment_weight * alignment
        return {"label": label, "alignment": alignment, "total": total}


@dataclass(frozen=True, kw_only=True)
class EpochRecord:
    """One epoch: mean training losses, the learned logit scale, held-out scores; epoch 0 is the head before training."""

    epoch: int
    losses: dict[str, float]
    logit_scale: float
    held_out: EvaluationResult
    selection: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "losses": {name: round(value, 6) for name, value in self.losses.items()},
            "logit_scale": round(self.logit_scale, 4),
            "selection": None if math.isnan(self.selection) else round(self.selection, 6),
            "seconds": round(self.seconds, 3),
            "held_out": self.held_out.to_dict(per_label=False),
        }


@dataclass(frozen=True, kw_only=True)
class TrainingOutcome:
    """The best head (in eval mode, on the CPU), which epoch it is, and every epoch's record."""

    head: TrainableHead
    mode: TrainingMode
    best_epoch: int
    epochs: tuple[EpochRecord, ...]
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def initial(self) -> EpochRecord:
        return self.epochs[0]

    @property
    def best(self) -> EpochRecord:
        return self.epochs[self.best_epoch]


class HeadTrainer:
    """Trains a :class:`TrainableHead` on :class:`HeadTrainingData` with AdamW, keeping the best epoch."""

    def __init__(self, head: TrainableHead, data: HeadTrainingData, settings: TrainingSettings) -> None:
        self.settings = settings
        self.device = settings.torch_device()
        self.mode = data.mode
        _check_trainable(data)
        self.data = data.to(self.device)
        self.head = head.to(self.device).train()
        self.objective = HeadObjective(settings, self.mode).to(self.device)
        self.dropout = ModalityDropout(settings.drop_image, settings.drop_text)
        self.evaluator = HeldOutEvaluator(self.data)
        self.optimizer = torch.optim.AdamW(
            [
                {"params": list(self.head.parameters()), "weight_decay": settings.weight_decay},
                {"params": list(self.objective.parameters()), "weight_decay": 0.0},
            ],
            lr=settings.learning_rate,
        )
        self.generator = torch.Generator().manual_seed(settings.seed)

    def fit(self, on_epoch: Callable[[EpochRecord], None] | None = None) -> TrainingOutcome:
        """Every epoch, then the best head; ``on_epoch`` sees each record as it is made (epoch 0 first)."""
        warnings = []
        if self.mode is TrainingMode.ALIGNMENT_ONLY:
            warnings.append(
                "the corpus has no labels: the head learns the in-post image-text alignment only, and the best "
                "epoch is the one whose held-out texts find their own images best (pair nDCG@10)"
            )
            logger.warning(warnings[-1])
        records = [self._record(0, {}, 0.0)]
        best_state, best_epoch = copy.deepcopy(self.head.state_dict()), 0
        for epoch in range(1, self.settings.epochs + 1):
            started = time.perf_counter()
            losses = self._train_epoch()
            record = self._record(epoch, losses, time.perf_counter() - started)
            records.append(record)
            if on_epoch is not None:
                on_epoch(record)
            if record.selection > records[best_epoch].selection:
                best_state, best_epoch = copy.deepcopy(self.head.state_dict()), epoch
        if best_epoch == 0:
            warnings.append("no epoch beat the head as it started on the held-out posts: the initial head is kept")
            logger.warning(warnings[-1])
        elif (early := early_peak_warning(best_epoch, self.settings.epochs, self.settings.learning_rate)) is not None:
            warnings.append(early)
            logger.warning(warnings[-1])
        self.head.load_state_dict(best_state)
        logger.info(
            "best epoch %d of %d: held-out %.4f", best_epoch, self.settings.epochs, records[best_epoch].selection
        )
        return TrainingOutcome(
            head=self.head.cpu().eval(),
            mode=self.mode,
            best_epoch=best_epoch,
            epochs=tuple(records),
            warnings=tuple(warnings),
        )

    def _train_epoch(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        seen = 0
        for batch in self.data.batches(self.settings.batch_size, self.generator):
            image_mask, text_mask = self.dropout.masks(batch.image_present, batch.text_present, self.generator)
            output = self.head(batch.image, batch.text, image_mask, text_mask)
            losses = self.objective(output, batch)
            self.optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            self.optimizer.step()
            seen += len(batch)
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + float(value.detach()) * len(batch)
        return {name: total / max(seen, 1) for name, total in totals.items()}

    def _record(self, epoch: int, losses: dict[str, float], seconds: float) -> EpochRecord:
        held_out = self.evaluator(self.head)
        selection = selection_value(held_out, self.mode, self.settings.select_by.metric, self.settings.select_by.k)
        record = EpochRecord(
            epoch=epoch,
            losses=losses,
            logit_scale=float(self.objective.alignment_loss.logit_scale.detach()),
            held_out=held_out,
            selection=selection,
            seconds=seconds,
        )
        fused = held_out.slice(POST).scores
        logger.info(
            "epoch %d: loss %s, held-out %s %.4f (P@10 %.4f over %d queries), %.2f s",
            epoch,
            {name: round(value, 4) for name, value in losses.items()},
            self.settings.select_by.value,
            selection,
            fused.value(Metric.PRECISION, 10),
            fused.queries,
            seconds,
        )
        return record


def _check_trainable(data: HeadTrainingData) -> None:
    """Refuses, with what to change, data that cannot train a head or cannot measure one."""
    if len(data.train_rows) < 2:
        raise InvalidPostError(
            f"only {len(data.train_rows)} post(s) on the training side of the split: a corpus needs more posts, "
            'or more posts with "split": "train"'
        )
    if len(data.test_rows) == 0:
        raise InvalidPostError(
            'no held-out post: raise the held-out share, or mark some posts "split": "test", so that every '
            "epoch can be measured"
        )
    if data.mode is TrainingMode.SUPERVISED:
        test_labels = data.labels[data.test_rows]
        counts = torch.bincount(test_labels[test_labels >= 0], minlength=len(data.label_names))
        if int((counts >= 2).sum()) == 0:
            raise InvalidPostError(
                f"no label has two posts among the {len(data.test_rows)} held-out posts, so held-out retrieval "
                "cannot be measured: add posts, or raise the held-out share"
            )
    else:
        both = data.image_present[data.test_rows] & data.text_present[data.test_rows]
        if int(both.sum()) < 2:
            raise InvalidPostError(
                "without labels the head is measured by held-out posts finding their own image from their text, "
                "and fewer than 2 held-out posts have both: add posts with an image and a text"
            )


EARLY_PEAK_FRACTION = 0.1
"""A best epoch within this share of the run, on a run of at least :data:`EARLY_PEAK_MIN_EPOCHS`, is an early peak."""
EARLY_PEAK_MIN_EPOCHS = 20


def early_peak_warning(best_epoch: int, epochs: int, learning_rate: float) -> str | None:
    """What to do when the held-out figure peaked early and fell after: the head over-fitted.

    Seen with full-size random ResNet-101 features at the default learning rate (README,
    "Training and evaluation"): the kept epoch 5 of 100 scored below the text alone.
    """
    if epochs < EARLY_PEAK_MIN_EPOCHS or best_epoch == 0 or best_epoch > epochs * EARLY_PEAK_FRACTION:
        return None
    return (
        f"the held-out figure peaked at epoch {best_epoch} of {epochs} and fell after: the head over-fits its "
        f"features early; a lower learning rate usually trains a better head (try --learning-rate "
        f"{learning_rate / 10:g})"
    )
