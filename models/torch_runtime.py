"""The PyTorch runtime of the in-process pipeline, and its pooled-features stage (needs the ``export`` extra).

:class:`TorchRuntime` runs the three modules the server runs as ONNX, in eager mode, on the
contract's tensors: the reference the export and the integration tests compare the server
with, and the PyTorch-eager baseline of the benchmark.

:func:`pool_images` and :func:`pool_texts` stop before the projections: each post's pooled
backbone features, computed by the encoders' own pooling
(:meth:`~postsim.models.modules.ImageEncoder.pool`, :meth:`~postsim.models.modules.TextEncoder.pool`)
after the server's preprocessing. Training learns the head on them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from postsim.core.errors import InvalidPostError
from postsim.model_repository.preprocessing import ImageLimits, preprocess_images
from postsim.model_repository.tokenization import TextTokenizer
from postsim.models.modules import ImageEncoder, TextEncoder, torch_required
from postsim.models.pipeline import Embedded, Runtime
from postsim.models.weights import PostSimModels

with torch_required():
    import torch


class TorchRuntime(Runtime):
    """Image encoder, text encoder and fuser in PyTorch eager mode; numpy in, numpy out.

    ``threads`` sets torch's intra-op threads for the whole process (None: leave them).
    """

    def __init__(self, models: PostSimModels, *, threads: int | None = None) -> None:
        self.models = models
        for module in models.modules().values():
            module.eval()
        if threads is not None:
            torch.set_num_threads(threads)

    def encode_image(self, pixel_values: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.models.image_encoder(torch.from_numpy(pixel_values)).numpy()

    def encode_text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.models.text_encoder(torch.from_numpy(input_ids), torch.from_numpy(attention_mask)).numpy()

    def fuse(self, image: np.ndarray, text: np.ndarray, image_mask: np.ndarray, text_mask: np.ndarray) -> Embedded:
        tensors = (torch.from_numpy(array) for array in (image, text, image_mask, text_mask))
        with torch.inference_mode():
            embedding, weights, *_ = self.models.fuser(*tensors)
        return Embedded(embedding.numpy(), weights.numpy())


def pool_images(
    encoder: ImageEncoder, images: Sequence[bytes], device: torch.device, *, limits: ImageLimits | None = None
) -> tuple[np.ndarray, list[InvalidPostError | None]]:
    """Pooled features ``[B, C]`` of encoded images, preprocessed as the server preprocesses them.

    An image that does not decode gets a zero row and its error in its slot.
    """
    pixels, mask, errors = preprocess_images(images, limits or ImageLimits())
    rows = np.flatnonzero(mask[:, 0] > 0)
    features = np.zeros((len(images), encoder.projection.in_features), dtype=np.float32)
    if rows.size:
        with torch.inference_mode():
            features[rows] = encoder.pool(torch.from_numpy(pixels[rows]).to(device)).cpu().numpy()
    return features, errors


def pool_texts(
    encoder: TextEncoder, tokenizer: TextTokenizer, texts: Sequence[str], device: torch.device
) -> tuple[np.ndarray, list[str | None]]:
    """Pooled features ``[B, H]`` of texts, tokenised as the server tokenises them.

    A text the tokenizer refuses, or with no token left after its normalisation, gets a zero
    row and the reason in its slot.
    """
    encoded = tokenizer.encode([text.encode("utf-8", errors="surrogatepass") for text in texts])
    with torch.inference_mode():
        ids = torch.from_numpy(encoded.input_ids).to(device)
        attention = torch.from_numpy(encoded.attention_mask).to(device)
        features = encoder.pool(ids, attention).cpu().numpy().astype(np.float32)
    reasons: list[str | None] = []
    for row, error in enumerate(encoded.errors):
        if error is not None:
            reasons.append(str(error))
        elif encoded.text_mask[row, 0] == 0:
            reasons.append("no token left after the tokenizer's normalisation")
        else:
            reasons.append(None)
    features[[row for row, reason in enumerate(reasons) if reason is not None]] = 0.0
    return features, reasons
