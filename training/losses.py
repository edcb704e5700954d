"""The two losses the head learns from, each a small module with one job.

* :class:`LabelContrastiveLoss`: posts with the same label pull together, the others push
  apart, on the fused embeddings (pytorch-metric-learning's ``SupConLoss``).
* :class:`ImageTextContrastiveLoss`: a post's image and its own text pull together against
  the other posts' (CLIP's symmetric InfoNCE), so both modalities land in one space.
"""

from __future__ import annotations

import math

from postsim.core.errors import OptionalDependencyError, SettingsError
from postsim.models.modules import l2_normalize, torch_required

with torch_required():
    import torch
    import torch.nn.functional as F
    from torch import nn

try:
    from pytorch_metric_learning.losses import SupConLoss
except ImportError:
    raise OptionalDependencyError("pytorch-metric-learning", "train", "Training the head") from None

DEFAULT_LABEL_TEMPERATURE = 0.1
DEFAULT_ALIGNMENT_TEMPERATURE = 0.07
MAX_LOGIT_SCALE = 100.0
"""CLIP caps the learned logit scale (1 / temperature) at 100 so training stays stable."""
UNLABELLED = -1
"""Label index of a post without label."""


class LabelContrastiveLoss(nn.Module):
    """Multi-positive supervised contrastive loss over labels (Khosla et al., 2020, "Supervised
    Contrastive Learning"), as pytorch-metric-learning's ``SupConLoss`` computes it.

    Every other post of the batch with the anchor's label is a positive, every post with
    another label a negative. Unlabelled posts (label :data:`UNLABELLED`) take no part; an
    anchor without a positive in the batch contributes nothing.
    """

    def __init__(self, temperature: float = DEFAULT_LABEL_TEMPERATURE) -> None:
        super().__init__()
        if temperature <= 0:
            raise SettingsError(f"the label loss temperature must be positive, got {temperature}")
        self.loss = SupConLoss(temperature=temperature)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``[B, dim]`` embeddings and ``[B]`` int64 label indices → scalar loss."""
        labelled = labels != UNLABELLED
        if int(labelled.sum()) < 2:
            return embeddings.sum() * 0.0  # nothing to contrast, but part of the graph
        return self.loss(embeddings[labelled], labels[labelled])


class ImageTextContrastiveLoss(nn.Module):
    """Symmetric image↔text InfoNCE with a learnable temperature, as CLIP trains it (Radford
    et al., 2021; open_clip's ``ClipLoss``): each post's image must pick its own text among
    the batch's texts, and its text its own image.

    The temperature is learned as a log logit scale, initialised at ``1 / temperature`` and
    capped at :data:`MAX_LOGIT_SCALE`. Only posts with both modalities are given to it.
    """

    def __init__(self, temperature: float = DEFAULT_ALIGNMENT_TEMPERATURE) -> None:
        super().__init__()
        if not temperature >= 1 / MAX_LOGIT_SCALE:
            raise SettingsError(f"the alignment temperature must be at least {1 / MAX_LOGIT_SCALE}, got {temperature}")
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``[P, dim]`` image and text embeddings of the same P posts, row for row → scalar loss."""
        if len(image) < 2:
            return (image.sum() + text.sum()) * 0.0
        image, text = l2_normalize(image), l2_normalize(text)
        logits = self.logit_scale * image @ text.T
        targets = torch.arange(len(image), device=image.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
