"""``postsim export``: the models to ONNX and the Triton model repository (torch: the export extra, imported on use)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from postsim.cli.common import RepositoryOption, choice, reports_errors, stdout
from postsim.model_repository import contract


@reports_errors
def export(
    repository: RepositoryOption,
    target: Annotated[
        str, typer.Option(help="embedded (Python backend + ONNX Runtime) or triton (NGC, GPU, TensorRT).")
    ] = "embedded",
    weights: Annotated[
        str,
        typer.Option(
            help="pretrained (each backbone from --image-model and --text-model), random (both backbones random), "
            "or a directory with image/ and text/."
        ),
    ] = "pretrained",
    dim: Annotated[int, typer.Option(help="Embedding size K.")] = contract.DEFAULT_DIM,
    text_model: Annotated[
        str | None,
        typer.Option(
            help="Hub id or directory of any BERT-family encoder, `random`, or `bundled:all-MiniLM-L6-v2` (real "
            "weights shipped with the export extra).",
            show_default="distilbert-base-uncased",
        ),
    ] = None,
    image_model: Annotated[
        str | None,
        typer.Option(help="Hub id or directory of a ResNet, or `random`.", show_default="microsoft/resnet-101"),
    ] = None,
    head: Annotated[Path | None, typer.Option(help="Checkpoint of the projections and the fuser.")] = None,
    size: Annotated[
        str | None,
        typer.Option(
            help="Architecture of random backbones: full (ResNet-101, DistilBERT) or tiny (for tests).",
            show_default="full",
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(help="Seed of random backbones and of the head when no checkpoint is given.", show_default="0"),
    ] = None,
    precision: Annotated[str, typer.Option(help="fp32; int8 (quantised encoders, CPU); fp16 (GPU).")] = "fp32",
    force_precision: Annotated[
        bool, typer.Option(help="Write int8/fp16 models even when they agree with fp32 below 0.99 mean cosine.")
    ] = False,
) -> None:
    """Export the image encoder, text encoder and fuser to ONNX and write the Triton model repository."""
    from postsim.export.quantize import Precision
    from postsim.export.repository import ExportOptions, export_repository
    from postsim.export.triton_config import Target
    from postsim.models.settings import ModelSettings, ModelSize

    options = ExportOptions(
        repository=repository,
        target=choice(Target, target, "--target"),
        precision=choice(Precision, precision, "--precision"),
        force_precision=force_precision,
        models=ModelSettings(
            dim=dim,
            weights=weights,
            text_model=text_model,
            image_model=image_model,
            head=head,
            seed=seed,
            size=None if size is None else choice(ModelSize, size, "--size"),
        ),
    )
    report = export_repository(options)
    for name, check in report.validation.items():
        stdout.print(f"{name}: {check}")
    if report.agreement is not None:
        stdout.print(f"{precision} agreement with fp32: {report.agreement}")
    stdout.print(f"repository ready: {report.repository} (weights fingerprint {report.manifest.fingerprint})")
