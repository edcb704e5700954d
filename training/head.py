"""The head training learns: the two projections and the fuser, over pooled backbone features.

The modules are the export path's own: the ``projection`` of :class:`ImageEncoder` and of
:class:`TextEncoder` (``nn.Linear``) and :class:`AttentionFuser`. :meth:`TrainableHead.from_models`
starts from the head of built models (the seeded initialisation, or a checkpoint), and
:func:`write_head` writes the checkpoint ``build_models(ModelSettings(head=...))`` loads:
the format of :func:`postsim.models.weights.save_head`, plus a ``metadata`` section
(where it came from, how it was trained, what it scored) that the loader ignores.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any, NamedTuple

from postsim.core.errors import SettingsError
from postsim.core.files import write_bytes_atomic
from postsim.model_repository.contract import DEFAULT_DIM
from postsim.models.modules import AttentionFuser, torch_required
from postsim.models.weights import HEAD_FORMAT, HEAD_METADATA_KEY, PostSimModels

with torch_required():
    import torch
    from torch import nn

METADATA_KEY = HEAD_METADATA_KEY


class HeadOutput(NamedTuple):
    """The fused embedding and weights the server would output, and each modality's projection."""

    embedding: torch.Tensor
    weights: torch.Tensor
    image: torch.Tensor
    text: torch.Tensor


class TrainableHead(nn.Module):
    """``Linear(image features → dim)``, ``Linear(text features → dim)`` and the fuser."""

    def __init__(self, image_projection: nn.Linear, text_projection: nn.Linear, fuser: AttentionFuser) -> None:
        super().__init__()
        dims = {image_projection.out_features, text_projection.out_features, fuser.dim}
        if len(dims) != 1:
            raise SettingsError(f"the projections and the fuser must share one dim, got {sorted(dims)}")
        self.image_projection = image_projection
        self.text_projection = text_projection
        self.fuser = fuser

    @classmethod
    def from_models(cls, models: PostSimModels) -> TrainableHead:
        """A trainable copy of the head of ``models`` (which stay as they are)."""
        head = cls(
            copy.deepcopy(models.image_encoder.projection),
            copy.deepcopy(models.text_encoder.projection),
            copy.deepcopy(models.fuser),
        )
        return head.requires_grad_(True).train()

    @classmethod
    def seeded(cls, image_features: int, text_features: int, *, dim: int = DEFAULT_DIM, seed: int = 0) -> TrainableHead:
        """A freshly initialised head for features of the given widths (no backbone needed)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(nn.Linear(image_features, dim), nn.Linear(text_features, dim), AttentionFuser(dim))

    @property
    def dim(self) -> int:
        return self.fuser.dim

    def forward(
        self, image: torch.Tensor, text: torch.Tensor, image_mask: torch.Tensor, text_mask: torch.Tensor
    ) -> HeadOutput:
        """Pooled features ``[B, F_image]``, ``[B, F_text]`` and presence masks ``[B, 1]`` → :class:`HeadOutput`."""
        image_embedding = self.image_projection(image)
        text_embedding = self.text_projection(text)
        embedding, weights, *_ = self.fuser(image_embedding, text_embedding, image_mask, text_mask)
        return HeadOutput(embedding, weights, image_embedding, text_embedding)

    def checkpoint(self, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """The head as :func:`postsim.models.weights.save_head` writes it, with ``metadata`` beside it.

        ``metadata`` must hold only what ``torch.load(weights_only=True)`` reads back:
        dicts, lists, strings, numbers, booleans and None.
        """
        state: dict[str, Any] = {
            "format": HEAD_FORMAT,
            "dim": self.dim,
            "image_projection": _cpu_state(self.image_projection),
            "text_projection": _cpu_state(self.text_projection),
            "fuser": _cpu_state(self.fuser),
        }
        if metadata is not None:
            state[METADATA_KEY] = metadata
        return state


def write_head(head: TrainableHead, path: Path, metadata: dict[str, Any] | None = None) -> Path:
    """Writes the checkpoint atomically: an interrupted write leaves ``path`` as it was."""
    buffer = io.BytesIO()
    torch.save(head.checkpoint(metadata), buffer)
    write_bytes_atomic(Path(path), buffer.getvalue())
    return Path(path)


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu().clone() for name, tensor in module.state_dict().items()}
