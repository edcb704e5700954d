"""What a training run leaves behind: ``head.pt``, ``training.json`` and ``training.png``.

Library code writes and formats; the CLI prints. Each file is written atomically, so an
interrupted run leaves the folder's previous files (or none), never half of one.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from postsim.core.files import write_text_atomic
from postsim.evaluation.figures import save_figure
from postsim.evaluation.metrics import Metric
from postsim.evaluation.slices import PAIR, POST, STANDARD_SLICES
from postsim.models.fingerprints import BackboneFingerprints
from postsim.training.data import TrainingMode
from postsim.training.features import ExtractionSummary
from postsim.training.head import write_head
from postsim.training.trainer import TrainingOutcome, TrainingSettings

logger = logging.getLogger("postsim")

HEAD_FILE = "head.pt"
TRAINING_FILE = "training.json"
PLOT_FILE = "training.png"


@dataclass(frozen=True, kw_only=True)
class TrainingOutputs:
    head: Path
    json: Path
    plot: Path


@dataclass(frozen=True, kw_only=True)
class TrainingReport:
    """Everything about one training run: its input, its settings, every epoch, and where it wrote."""

    corpus: Path
    corpus_fingerprint: str
    posts: dict[str, int]
    """Counts: in the corpus, kept, training side, held out, labelled, labels."""
    extraction: ExtractionSummary
    fingerprints: BackboneFingerprints
    provenance: dict[str, Any]
    model_options: list[str]
    """The backbone options of ``postsim export`` that build the backbones this head was trained on."""
    settings: TrainingSettings
    outcome: TrainingOutcome
    outputs: TrainingOutputs

    def metadata(self) -> dict[str, Any]:
        """The head checkpoint's metadata: where it came from, how it was trained, what it scored held out."""
        best = self.outcome.best
        return {
            "trained_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "corpus_fingerprint": self.corpus_fingerprint,
            "backbone_fingerprints": self.fingerprints.to_dict(),
            "backbones": {key: self.provenance[key] for key in ("image_encoder", "text_encoder", "tokenizer")},
            "model_options": self.model_options,
            "mode": self.outcome.mode.value,
            "settings": self.settings.to_dict(),
            "posts": self.posts,
            "best_epoch": self.outcome.best_epoch,
            "held_out": best.held_out.to_dict(per_label=False),
            "held_out_untrained": self.outcome.initial.held_out.to_dict(per_label=False),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "corpus": str(self.corpus),
            **self.metadata(),
            "warnings": list(self.outcome.warnings),
            "held_out_per_label": self.outcome.best.held_out.to_dict(),
            "extraction": self.extraction.to_dict(),
            "provenance": self.provenance,
            "epochs": [record.to_dict() for record in self.outcome.epochs],
            "outputs": {"head": str(self.outputs.head), "json": str(self.outputs.json), "plot": str(self.outputs.plot)},
        }


def planned_outputs(out_dir: Path) -> TrainingOutputs:
    return TrainingOutputs(head=out_dir / HEAD_FILE, json=out_dir / TRAINING_FILE, plot=out_dir / PLOT_FILE)


def write_outputs(report: TrainingReport) -> TrainingOutputs:
    """The head checkpoint (with :meth:`TrainingReport.metadata`), ``training.json`` and the curves."""
    outputs = report.outputs
    write_head(report.outcome.head, outputs.head, report.metadata())
    write_text_atomic(outputs.json, json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")
    write_plot(report, outputs.plot)
    logger.info("wrote %s, %s and %s", outputs.head, outputs.json, outputs.plot)
    return outputs


def write_plot(report: TrainingReport, path: Path) -> Path:
    """Training losses and held-out P@10 of every slice, per epoch; the kept epoch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = report.outcome.epochs
    figure, (losses, scores) = plt.subplots(1, 2, figsize=(11, 4.5))
    trained = [record for record in records if record.losses]
    for name in trained[0].losses if trained else ():
        losses.plot([r.epoch for r in trained], [r.losses[name] for r in trained], marker=".", label=name)
    losses.set_xlabel("epoch")
    losses.set_ylabel("training loss")
    losses.legend()
    # Without labels only the pair slice has relevant posts, and one each: nDCG says more than P there.
    aligned_only = report.outcome.mode is TrainingMode.ALIGNMENT_ONLY
    metric, k = (Metric.NDCG, 10) if aligned_only else (Metric.PRECISION, 10)
    for spec in STANDARD_SLICES:
        if spec.name == PAIR and not aligned_only:
            continue  # one relevant post per query: its P@10 is at most 0.1, off the others' scale
        values = [record.held_out.slice(spec.name).scores.value(metric, k) for record in records]
        if not all(math.isnan(value) for value in values):
            scores.plot([r.epoch for r in records], values, marker=".", label=spec.name)
    chance = records[0].held_out.slice(POST).scores.chance_precision[k]
    if metric is Metric.PRECISION and not math.isnan(chance):
        scores.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance {metric.at(k)}")
    scores.axvline(report.outcome.best_epoch, color="black", linestyle=":", linewidth=1, label="kept epoch")
    scores.set_xlabel("epoch (0: before training)")
    scores.set_ylabel(f"held-out {metric.at(k)}")
    scores.legend(fontsize=8)
    for axes in (losses, scores):
        axes.grid(True, alpha=0.3)
    corpus = f"{report.corpus.parent.name}/{report.corpus.name}"
    figure.suptitle(
        f"postsim head training: {corpus}, {report.posts['kept']} posts, {report.outcome.mode.value}", fontsize=10
    )
    return save_figure(figure, path)
