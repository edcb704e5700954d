"""What ``postsim evaluate`` leaves behind: ``evaluation.json`` and ``evaluation.png``.

The plot has two panels: P@k of every slice beside its chance level, and the fuser's mean
image and text weight per label over the posts where it weighed both (where the fused
embedding leans on the image, and where on the text). Each file is written atomically.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from postsim.core.files import write_text_atomic
from postsim.evaluation.figures import save_figure
from postsim.evaluation.metrics import Metric
from postsim.evaluation.result import EVALUATION_FILE
from postsim.evaluation.served import ServedEvaluation

PLOT_FILE = "evaluation.png"


@dataclass(frozen=True, kw_only=True)
class EvaluationOutputs:
    json: Path
    plot: Path


def write_outputs(evaluation: ServedEvaluation, out_dir: Path) -> EvaluationOutputs:
    """``out_dir/evaluation.json`` (everything measured) and ``out_dir/evaluation.png``."""
    outputs = EvaluationOutputs(json=out_dir / EVALUATION_FILE, plot=out_dir / PLOT_FILE)
    write_text_atomic(outputs.json, json.dumps(evaluation.to_dict(), indent=2, ensure_ascii=False) + "\n")
    write_plot(evaluation, outputs.plot)
    return outputs


def write_plot(evaluation: ServedEvaluation, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    result, k = evaluation.result, evaluation.k
    figure, (scores, weights) = plt.subplots(1, 2, figsize=(12, 4.8))
    slices = [item for item in result.slices if item.scores.queries]
    positions = np.arange(len(slices))
    scores.bar(positions, [item.scores.value(Metric.PRECISION, k) for item in slices], label=Metric.PRECISION.at(k))
    scores.scatter(
        positions,
        [item.scores.chance_precision[k] for item in slices],
        color="black",
        marker="_",
        s=400,
        label="chance",
    )
    scores.set_xticks(positions, [item.name for item in slices], rotation=30, ha="right")
    scores.set_ylim(0, 1)
    scores.set_ylabel(f"held-out {Metric.PRECISION.at(k)}")
    scores.legend(fontsize=8)
    fused = next((summary for summary in result.modality_weights if summary.view == "post"), None)
    if fused is not None and fused.per_label:
        labels = [label for label, value in fused.per_label.items() if not math.isnan(value.image)]
        image = [fused.per_label[label].image for label in labels]
        text = [fused.per_label[label].text for label in labels]
        rows = np.arange(len(labels))
        weights.barh(rows, image, label="image")
        weights.barh(rows, text, left=image, label="text")
        weights.set_yticks(rows, labels)
        weights.axvline(0.5, color="grey", linestyle=":", linewidth=1)
        weights.set_xlim(0, 1)
        weights.set_xlabel(f"mean modality weight (posts with both; overall image {fused.overall.image:.2f})")
        weights.legend(fontsize=8)
    for axes in (scores, weights):
        axes.grid(True, alpha=0.3)
    figure.suptitle(
        f"postsim evaluate: {evaluation.corpus.name}, {evaluation.posts['held_out']} held-out posts, "
        f"weights {evaluation.served.fingerprint}",
        fontsize=10,
    )
    return save_figure(figure, path)
