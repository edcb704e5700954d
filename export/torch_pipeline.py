"""The whole post → embedding computation in PyTorch, in process.

It takes the same tensors the server's preprocessing produces (decoded pixels, token ids,
masks) and runs the three modules the server runs as ONNX, so it is both the reference the
integration tests compare the server with and the PyTorch-eager baseline of the benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from postsim.core.errors import InvalidPostError
from postsim.export.models import torch_required
from postsim.export.weights import PostSimModels
from postsim.model_repository.contract import (
    ATTENTION_MASK,
    IMAGE_MASK,
    INPUT_IDS,
    PIXEL_VALUES,
    TEXT_MASK,
    TensorSpec,
)

with torch_required():
    import torch

PixelValues = np.ndarray | Sequence[np.ndarray | None]
"""A batch ``[B, 3, 224, 224]``, or one ``[3, 224, 224]`` array per post (None: no image)."""


class TorchPostPipeline:
    """Image encoder, text encoder and fuser in PyTorch eager mode; numpy in, numpy out."""

    def __init__(self, models: PostSimModels) -> None:
        self.models = models
        for module in models.modules().values():
            module.eval()

    def embed(
        self,
        pixel_values: PixelValues,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        image_mask: np.ndarray,
        text_mask: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Embeds a batch of posts: (embeddings ``[B, dim]``, modality weights ``[B, 2]``).

        The arguments are the contract's tensors, batched: ``PIXEL_VALUES`` (or a list with
        None for posts without an image, which become zero pixels), ``INPUT_IDS``,
        ``ATTENTION_MASK``, ``IMAGE_MASK`` and ``TEXT_MASK``. Like the server, the encoders
        run on every row; the masks decide what the fuser uses.
        """
        pixels = stack_pixel_values(pixel_values)
        batch = len(pixels)
        image_input = _checked(PIXEL_VALUES, pixels, batch)
        ids = _checked(INPUT_IDS, input_ids, batch)
        tokens_mask = _checked(ATTENTION_MASK, attention_mask, batch)
        if ids.shape != tokens_mask.shape:
            raise InvalidPostError(
                f"{INPUT_IDS.name} and {ATTENTION_MASK.name} must have the same shape, "
                f"got {tuple(ids.shape)} and {tuple(tokens_mask.shape)}"
            )
        image_present = _checked(IMAGE_MASK, image_mask, batch)
        text_present = _checked(TEXT_MASK, text_mask, batch)
        with torch.inference_mode():
            image = self.models.image_encoder(image_input)
            text = self.models.text_encoder(ids, tokens_mask)
            embedding, weights = self.models.fuser(image, text, image_present, text_present)
        return embedding.numpy(), weights.numpy()


def stack_pixel_values(pixel_values: PixelValues) -> np.ndarray:
    """One ``[B, 3, H, W]`` float32 array; per-post None entries become zero images."""
    if isinstance(pixel_values, np.ndarray):
        return pixel_values
    images = list(pixel_values)
    if not images:
        raise InvalidPostError("no posts to embed: pixel_values is empty")
    zeros = np.zeros(PIXEL_VALUES.dims, PIXEL_VALUES.dtype.numpy)
    return np.stack([zeros if image is None else np.asarray(image) for image in images])


def _checked(spec: TensorSpec, array: Any, batch: int) -> torch.Tensor:
    """``array`` as a tensor, after checking it against the contract (got/expected on failure)."""
    array = np.asarray(array)
    if array.dtype != spec.dtype.numpy:
        raise InvalidPostError(f"{spec.name} must be {np.dtype(spec.dtype.numpy)}, got {array.dtype}")
    expected = (batch, *spec.dims)
    fits = len(array.shape) == len(expected) and all(
        want in (-1, got) for got, want in zip(array.shape, expected, strict=True)
    )
    if not fits:
        raise InvalidPostError(f"{spec.name} must have shape {expected} (-1: any), got {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array))
