"""The backbone options ``postsim export`` and ``postsim train`` share: one definition of each.

A head is trained on the features of the backbones these options build, and export must
build the same ones to serve it, so both commands take them from here;
:func:`model_settings` turns them into :class:`~postsim.models.settings.ModelSettings`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from postsim.cli.common import choice

if TYPE_CHECKING:
    from postsim.models.settings import ModelSettings

WeightsOption = Annotated[
    str,
    typer.Option(
        help="pretrained (each backbone from --image-model and --text-model), random (both backbones random), "
        "or a directory with image/ and text/."
    ),
]
DimOption = Annotated[int, typer.Option(help="Embedding size K.")]
TextModelOption = Annotated[
    str | None,
    typer.Option(
        help="Hub id or directory of any BERT-family encoder, `random`, or `bundled:all-MiniLM-L6-v2` (real "
        "weights shipped with the export extra).",
        show_default="distilbert-base-uncased",
    ),
]
ImageModelOption = Annotated[
    str | None,
    typer.Option(help="Hub id or directory of a ResNet, or `random`.", show_default="microsoft/resnet-101"),
]
SizeOption = Annotated[
    str | None,
    typer.Option(
        help="Architecture of random backbones: full (ResNet-101, DistilBERT) or tiny (for tests).",
        show_default="full",
    ),
]
SeedOption = Annotated[
    int | None,
    typer.Option(help="Seed of random backbones and of the head when no checkpoint is given.", show_default="0"),
]


def model_settings(
    weights: str,
    dim: int,
    text_model: str | None,
    image_model: str | None,
    size: str | None,
    seed: int | None,
    *,
    head: Path | None = None,
) -> ModelSettings:
    """The backbone options as ModelSettings, which refuses a combination that would ignore one of them."""
    from postsim.models.settings import ModelSettings, ModelSize

    return ModelSettings(
        dim=dim,
        weights=weights,
        text_model=text_model,
        image_model=image_model,
        head=head,
        seed=seed,
        size=None if size is None else choice(ModelSize, size, "--size"),
    )
