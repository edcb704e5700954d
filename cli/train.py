"""``postsim train``: the head (projections and fuser) learned on a labelled corpus (the train extra, imported on use)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from postsim.cli.backbones import (
    DimOption,
    ImageModelOption,
    SizeOption,
    TextModelOption,
    WeightsOption,
    model_settings,
)
from postsim.cli.common import reports_errors, stderr, stdout
from postsim.corpus.split import DEFAULT_HELD_OUT
from postsim.model_repository import contract

if TYPE_CHECKING:
    from postsim.training.report import TrainingReport


@reports_errors
def train(
    corpus: Annotated[Path, typer.Argument(help="JSONL corpus; posts with the same 'label' are similar.")],
    out: Annotated[Path, typer.Option(help="Folder for head.pt, training.json and training.png.")],
    weights: WeightsOption = "pretrained",
    dim: DimOption = contract.DEFAULT_DIM,
    text_model: TextModelOption = None,
    image_model: ImageModelOption = None,
    size: SizeOption = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of random backbones, the initial head and training.", show_default="0")
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Passes over the training posts (default: 50).")] = None,
    learning_rate: Annotated[
        float | None,
        typer.Option(min=0, help="AdamW's learning rate (default: 3e-3; 3e-4 for full-size random backbones)."),
    ] = None,
    held_out: Annotated[
        float, typer.Option(min=0, max=0.95, help="Share held out when the corpus has no 'split'.")
    ] = DEFAULT_HELD_OUT,
    device: Annotated[str | None, typer.Option(help="cpu, cuda ...", show_default="the GPU when there is one")] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(help="Feature cache folder.", show_default="$XDG_CACHE_HOME/postsim/features"),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a head.pt already in --out.")] = False,
) -> None:
    """Train the projections and the fuser on CORPUS (backbones frozen, chosen as for export) and write the head
    that `postsim export --head OUT/head.pt` serves."""
    from postsim.cli.progress import ProgressReporter
    from postsim.training.run import TrainHeadSettings, train_head
    from postsim.training.trainer import TrainingSettings

    chosen: dict[str, Any] = {
        "epochs": epochs,
        "learning_rate": learning_rate,
        "held_out": held_out,
        "device": device,
        "seed": seed,
    }
    training = TrainingSettings(**{name: value for name, value in chosen.items() if value is not None})
    settings = TrainHeadSettings(
        corpus=corpus,
        out_dir=out,
        models=model_settings(weights, dim, text_model, image_model, size, seed),
        training=training,
        cache_dir=cache_dir,
        overwrite=overwrite,
    )
    with (
        ProgressReporter("features", console=stderr, unit="posts") as extraction,
        ProgressReporter("training", console=stderr, unit="epochs") as epochs_done,
    ):
        report = train_head(
            settings,
            progress=extraction.update,
            on_epoch=lambda record: epochs_done.update(record.epoch, training.epochs),
        )
    stdout.print(format_training(report), highlight=False, markup=False, soft_wrap=True)


def format_training(report: TrainingReport) -> str:
    """The summary of a training run: what it learned from, skipped, scored and wrote, and how to serve it."""
    from postsim.evaluation.metrics import Metric
    from postsim.evaluation.slices import POST

    outcome, posts = report.outcome, report.posts
    lines = [
        f"trained on {posts['train']} posts, {posts['held_out']} held out, {posts['labels']} labels "
        f"({outcome.mode.value}); features computed {report.extraction.computed}, cached {report.extraction.cached}",
        *(f"warning: {warning}" for warning in outcome.warnings),
    ]
    if report.extraction.skipped:
        lines.append(f"{len(report.extraction.skipped)} input(s) skipped:")
        lines += [f"  {item.post_id} ({item.modality}): {item.reason}" for item in report.extraction.skipped]
    before, after = (record.held_out.slice(POST).scores for record in (outcome.initial, outcome.best))
    lines.append(
        f"held-out fused P@10: {before.value(Metric.PRECISION, 10):.3f} untrained, "
        f"{after.value(Metric.PRECISION, 10):.3f} at the kept epoch {outcome.best_epoch} "
        f"(chance {after.chance_precision[10]:.3f})"
    )
    outputs = report.outputs
    lines.append(f"wrote {outputs.head}, {outputs.json} and {outputs.plot}")
    lines.append(f"serve it: postsim export --head {outputs.head} {' '.join(report.model_options)}".rstrip())
    return "\n".join(lines)
