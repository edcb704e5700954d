"""The PyTorch modules behind the three ONNX models: image encoder, text encoder, fuser.

Each module's ``forward`` takes and returns exactly the tensors of its model in
:mod:`postsim.model_repository.contract`, in the contract's order, so the exporter can
pass the spec's names straight to ``torch.onnx.export``.

This module also holds :func:`torch_required`, the one place that turns a missing
``export`` extra into :class:`OptionalDependencyError`; every postsim module that needs
torch or transformers imports them under it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from postsim.core.errors import OptionalDependencyError
from postsim.model_repository.contract import DEFAULT_DIM
from postsim.models.settings import ModelSize

_EXPORT_PACKAGES = ("torch", "transformers")


@contextmanager
def torch_required() -> Iterator[None]:
    """Import torch/transformers inside this block; without them, fail with the install hint."""
    try:
        yield
    except ImportError as error:
        if error.name is not None and error.name.split(".")[0] in _EXPORT_PACKAGES:
            raise OptionalDependencyError("torch", "export", "Exporting models") from error
        raise


with torch_required():
    import torch
    from torch import nn
    from transformers import DistilBertConfig, PreTrainedModel, ResNetConfig, ResNetModel

MASKED_SCORE = -1.0e4
"""Score given to a missing modality before the softmax: exp() of it underflows to 0 in
float32, yet an all-missing row stays finite (softmax of equal scores), unlike -inf."""
NORM_EPS = 1e-12
SCORER_HIDDEN = 64


def resnet_config(size: ModelSize) -> ResNetConfig:
    """The image backbone's architecture: microsoft/resnet-101's config, or a tiny one."""
    if size is ModelSize.FULL:
        return ResNetConfig(
            num_channels=3,
            embedding_size=64,
            hidden_sizes=[256, 512, 1024, 2048],
            depths=[3, 4, 23, 3],
            layer_type="bottleneck",
            hidden_act="relu",
            downsample_in_first_stage=False,
        )
    return ResNetConfig(
        num_channels=3,
        embedding_size=16,
        hidden_sizes=[32, 64, 128, 256],
        depths=[1, 1, 1, 1],
        layer_type="bottleneck",
        hidden_act="relu",
        downsample_in_first_stage=False,
    )


def distilbert_config(size: ModelSize) -> DistilBertConfig:
    """The text backbone's architecture: distilbert-base-uncased's config, or a tiny one.

    The tiny one keeps the 30522-token vocabulary so it runs on the real tokenizer's ids.
    """
    if size is ModelSize.FULL:
        return DistilBertConfig()  # its defaults are distilbert-base-uncased
    return DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128)


class ImageEncoder(nn.Module):
    """ResNet backbone → global average pool → ``Linear(channels → dim)``."""

    def __init__(self, backbone: ResNetModel, dim: int = DEFAULT_DIM) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection = nn.Linear(backbone.config.hidden_sizes[-1], dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, 224, 224]`` float32 → ``[B, dim]``: the projection of the pooled features."""
        return self.projection(self.pool(pixel_values))

    def pool(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, 224, 224]`` float32 → the backbone's pooled features ``[B, C]``, before the projection."""
        pooled = self.backbone(pixel_values=pixel_values).pooler_output  # [B, C, 1, 1]
        return torch.flatten(pooled, start_dim=1)


class TextEncoder(nn.Module):
    """BERT-family backbone → mean of the non-padding tokens → ``Linear(hidden → dim)``."""

    def __init__(self, backbone: PreTrainedModel, dim: int = DEFAULT_DIM) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection = nn.Linear(backbone.config.hidden_size, dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` int64 ids and mask → ``[B, dim]``.

        Only ids and mask go to the backbone: DistilBERT has no ``token_type_ids`` and BERT
        defaults them to zeros. A row without any token (no text) pools to zeros.
        """
        return self.projection(self.pool(input_ids, attention_mask))

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` ids and mask → the mean of the backbone's last hidden state over the tokens ``[B, H]``."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return masked_mean(hidden, attention_mask)


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the sequence of ``hidden [B, L, H]``, counting only tokens where mask is 1."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    total = (hidden * mask).sum(dim=1)
    count = mask.sum(dim=1).clamp(min=1.0)
    return total / count


class AttentionFuser(nn.Module):
    """Fuses the two modality embeddings with softmax attention over the present ones.

    Each modality vector is L2-normalised and scored by its own small MLP; the scores go
    through a softmax in which a missing modality (mask 0) gets weight exactly 0. The
    embedding is the weighted sum, L2-normalised. Modality order is the contract's ``MODALITIES``: (image, text).
    """

    def __init__(self, dim: int = DEFAULT_DIM, hidden: int = SCORER_HIDDEN) -> None:
        super().__init__()
        self.dim = dim
        self.image_scorer = _scorer(dim, hidden)
        self.text_scorer = _scorer(dim, hidden)

    def forward(
        self,
        image_embedding: torch.Tensor,
        text_embedding: torch.Tensor,
        image_mask: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[B, dim]`` ×2 and ``[B, 1]`` masks ×2 → the contract's ``EMBEDDING`` ``[B, dim]``,
        ``MODALITY_WEIGHTS`` ``[B, 2]``, ``IMAGE_EMBEDDING`` and ``TEXT_EMBEDDING`` ``[B, dim]``.

        The last two are the unit modality vectors the embedding is the weighted sum of, zero
        for a missing modality, so ``embedding = normalise(w_image · image + w_text · text)`` holds exactly.
        """
        image = l2_normalize(image_embedding)
        text = l2_normalize(text_embedding)
        scores = torch.cat([self.image_scorer(image), self.text_scorer(text)], dim=-1)
        mask = torch.cat([image_mask, text_mask], dim=-1)
        present = mask > 0
        weights = torch.softmax(scores.masked_fill(~present, MASKED_SCORE), dim=-1) * present.to(scores.dtype)
        fused = weights[:, 0:1] * image + weights[:, 1:2] * text
        present_image = present[:, 0:1].to(image.dtype)
        present_text = present[:, 1:2].to(text.dtype)
        return l2_normalize(fused), weights, image * present_image, text * present_text


def l2_normalize(vectors: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm; an all-zero row stays zero.

    Same as ``F.normalize`` but divides by broadcasting instead of ``expand_as``, so the
    ONNX graph keeps the embedding width as a fixed dim rather than a symbolic one.
    """
    return vectors / torch.linalg.vector_norm(vectors, dim=-1, keepdim=True).clamp(min=NORM_EPS)


def _scorer(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))
