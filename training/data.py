"""What the head learns from: the posts' cached features, labels and split, as tensors, in batches.

:class:`HeadTrainingData` holds every kept post (train and held-out) on one device;
:meth:`HeadTrainingData.batches` shuffles the training posts with a seeded generator, and
:class:`ModalityDropout` hides one modality of some posts that have both, so the head also
learns to embed text-only and image-only posts.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from postsim.core.errors import InvalidPostError, SettingsError
from postsim.corpus.split import Split
from postsim.models.modules import torch_required
from postsim.training.features import PostFeatures
from postsim.training.losses import UNLABELLED

with torch_required():
    import torch


class TrainingMode(enum.Enum):
    """What the head can learn from the corpus."""

    SUPERVISED = "supervised"
    """Labels and the in-post image↔text alignment."""
    ALIGNMENT_ONLY = "alignment-only"
    """No labels: only the in-post alignment (a post's image and text pull together)."""


def training_mode(labels: Sequence[str | None]) -> TrainingMode:
    """SUPERVISED with two labels or more, ALIGNMENT_ONLY with none; a single label is refused.

    With one label every labelled post is relevant to every other: there is nothing to
    contrast, and the held-out P@k would be 1 for any head. That is almost always a
    mistake in the corpus, so it is an error rather than a silent fallback.
    """
    counts = Counter(label for label in labels if label is not None)
    if not counts:
        return TrainingMode.ALIGNMENT_ONLY
    if len(counts) == 1:
        ((label, count),) = counts.items()
        raise InvalidPostError(
            f"every labelled post ({count}) has the label {label!r}: with a single label there is nothing "
            "to contrast. Give posts that are not alike different labels, or remove the 'label' fields "
            "to train the in-post image-text alignment only"
        )
    return TrainingMode.SUPERVISED


@dataclass(frozen=True)
class ModalityDropout:
    """Hides the image (probability ``image``) or else the text (``text``) of posts that have both.

    Never both: a post keeps at least one modality. Posts with a single modality keep it.
    """

    image: float = 0.0
    text: float = 0.0

    def __post_init__(self) -> None:
        if self.image < 0 or self.text < 0 or self.image + self.text >= 1:
            raise SettingsError(
                f"modality dropout rates must be >= 0 and add up to less than 1 (some posts keep both), "
                f"got image {self.image} and text {self.text}"
            )

    def masks(
        self, image_present: torch.Tensor, text_present: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``[B, 1]`` image and text masks after dropout; draws from ``generator`` (on the CPU)."""
        draw = torch.rand(len(image_present), generator=generator).to(image_present.device)
        both = image_present & text_present
        image = image_present & ~(both & (draw < self.image))
        text = text_present & ~(both & (draw >= self.image) & (draw < self.image + self.text))
        return image.float().unsqueeze(1), text.float().unsqueeze(1)


@dataclass(frozen=True)
class Batch:
    """Rows of one training step: features, presence, label indices."""

    image: torch.Tensor
    text: torch.Tensor
    image_present: torch.Tensor
    text_present: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True, kw_only=True, eq=False)
class HeadTrainingData:
    """Every kept post's features, presence masks and label index; which rows train and which are held out."""

    ids: tuple[str, ...]
    image: torch.Tensor
    text: torch.Tensor
    image_present: torch.Tensor
    text_present: torch.Tensor
    labels: torch.Tensor
    """int64 ``[N]``: index into ``label_names``, or UNLABELLED."""
    label_names: tuple[str, ...]
    train_rows: torch.Tensor
    test_rows: torch.Tensor

    @classmethod
    def build(
        cls, features: PostFeatures, labels: Mapping[str, str | None], splits: Mapping[str, Split]
    ) -> HeadTrainingData:
        """Tensors (on the CPU) of ``features``' posts, with each post's label and split by id.

        Raises InvalidPostError when the kept posts carry a single label (:func:`training_mode`).
        """
        training_mode([labels.get(post_id) for post_id in features.ids])
        names = tuple(sorted({label for post_id in features.ids if (label := labels.get(post_id)) is not None}))
        index = {name: position for position, name in enumerate(names)}
        label_ids = [index.get(labels.get(post_id) or "", UNLABELLED) for post_id in features.ids]
        sides = [splits[post_id] for post_id in features.ids]
        return cls(
            ids=features.ids,
            image=torch.from_numpy(features.image),
            text=torch.from_numpy(features.text),
            image_present=torch.from_numpy(features.image_present),
            text_present=torch.from_numpy(features.text_present),
            labels=torch.tensor(label_ids, dtype=torch.int64),
            label_names=names,
            train_rows=torch.tensor([row for row, side in enumerate(sides) if side is Split.TRAIN], dtype=torch.int64),
            test_rows=torch.tensor([row for row, side in enumerate(sides) if side is Split.TEST], dtype=torch.int64),
        )

    @property
    def mode(self) -> TrainingMode:
        return TrainingMode.SUPERVISED if self.label_names else TrainingMode.ALIGNMENT_ONLY

    def to(self, device: torch.device) -> HeadTrainingData:
        tensors = {name: getattr(self, name).to(device) for name in _TENSORS}
        return HeadTrainingData(ids=self.ids, label_names=self.label_names, **tensors)

    def label_of(self, row: int) -> str | None:
        label = int(self.labels[row])
        return None if label == UNLABELLED else self.label_names[label]

    def rows(self, rows: torch.Tensor) -> Batch:
        return Batch(
            image=self.image[rows],
            text=self.text[rows],
            image_present=self.image_present[rows],
            text_present=self.text_present[rows],
            labels=self.labels[rows],
        )

    def batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        """The training rows in a seeded random order, ``batch_size`` at a time (a last batch of one is dropped)."""
        order = self.train_rows[torch.randperm(len(self.train_rows), generator=generator).to(self.train_rows.device)]
        for rows in order.split(batch_size):
            if len(rows) > 1:
                yield self.rows(rows)


_TENSORS = ("image", "text", "image_present", "text_present", "labels", "train_rows", "test_rows")
