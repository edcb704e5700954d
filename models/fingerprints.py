"""What a backbone's pooled features depend on, as one hash per backbone.

Training keys its feature cache by these fingerprints, records them in the head checkpoint,
and ``build_models`` compares a checkpoint's with the backbones it builds: a head trained on
other backbones' features is refused rather than exported.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from postsim.model_repository.contract import IMAGE_RESIZE_SHORTER_SIDE, IMAGE_SIZE, MAX_TEXT_TOKENS
from postsim.model_repository.tokenization import MAX_TEXT_CHARS
from postsim.models.modules import torch_required

with torch_required():
    import torch
    from transformers import PreTrainedModel

if TYPE_CHECKING:
    from postsim.models.weights import PostSimModels

FEATURES_VERSION = 1
"""Part of every fingerprint: bump it when pooling or preprocessing changes, and old caches are not reused."""
IMAGE = "image"
TEXT = "text"


@dataclass(frozen=True, kw_only=True)
class BackboneFingerprints:
    """sha256 of each backbone (architecture and weights; for the text one, the tokenizer too)."""

    image: str
    text: str

    def to_dict(self) -> dict[str, str]:
        return {IMAGE: self.image, TEXT: self.text}


def backbone_fingerprints(models: PostSimModels) -> BackboneFingerprints:
    """Fingerprints of the two backbones of ``models``: what their features depend on, and nothing else.

    The config goes in without its private and version keys, so moving a model folder or
    upgrading transformers keeps the cache, while any weight, buffer or setting change does not.
    """
    return backbone_fingerprints_of(models.image_encoder.backbone, models.text_encoder.backbone, models.tokenizer_json)


def backbone_fingerprints_of(
    image_backbone: PreTrainedModel, text_backbone: PreTrainedModel, tokenizer_json: str
) -> BackboneFingerprints:
    """As :func:`backbone_fingerprints`, from the backbones and the tokenizer themselves."""
    image_settings = {"image_size": IMAGE_SIZE, "resize": IMAGE_RESIZE_SHORTER_SIDE}
    text_settings = {"max_tokens": MAX_TEXT_TOKENS, "max_chars": MAX_TEXT_CHARS}
    image = _module_digest(image_backbone, image_settings)
    text = _module_digest(text_backbone, text_settings)
    text.update(tokenizer_json.encode("utf-8"))
    return BackboneFingerprints(image=image.hexdigest(), text=text.hexdigest())


def _module_digest(backbone: PreTrainedModel, settings: dict[str, int]) -> hashlib._Hash:
    digest = hashlib.sha256()
    config = {
        key: value
        for key, value in backbone.config.to_dict().items()
        if not key.startswith("_") and key != "transformers_version"
    }
    header = {"version": FEATURES_VERSION, "class": type(backbone).__name__, "config": config, **settings}
    digest.update(json.dumps(header, sort_keys=True, default=str).encode("utf-8"))
    for name, tensor in backbone.state_dict().items():
        digest.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest
