"""A post's visual, an image or a video, as the frames the image encoder pools.

``preprocess_image`` (and the in-process pipeline, ``postsim.models.pipeline``) turn each
post's ``IMAGE`` bytes into frames here: a video (:func:`~postsim.model_repository.video.sniff_video`
tells one from its bytes) gives its F sampled frames (:func:`~postsim.model_repository.video.sample_video`),
a still image one frame (:func:`~postsim.model_repository.preprocessing.image_pixels`). A batch
is padded to its longest post: ``PIXEL_VALUES`` ``[B, F, 3, 224, 224]`` with ``FRAME_MASK``
``[B, F]`` saying which frames are real, so the image encoder's mean over the masked frames
is the post's image embedding. A batch of still images has F = 1: it costs what it cost
before videos.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from postsim.core.errors import InvalidPostError
from postsim.model_repository.contract import FRAME_MASK, FRAMES, IMAGE_MASK, PIXEL_VALUES
from postsim.model_repository.preprocessing import ImageLimits, image_pixels
from postsim.model_repository.video import VideoLimits, VideoSampling, sample_video, sniff_video

logger = logging.getLogger("postsim")


@dataclass(frozen=True, kw_only=True)
class VisualSettings:
    """What ``preprocess_image`` accepts and how it samples: its image limits, video limits and F."""

    image: ImageLimits = field(default_factory=ImageLimits)
    video: VideoLimits = field(default_factory=VideoLimits)
    sampling: VideoSampling = field(default_factory=VideoSampling)

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> VisualSettings:
        """The settings a ``preprocess_image`` config carries (``contract.config_parameters`` of it)."""
        return cls(
            image=ImageLimits.from_parameters(parameters),
            video=VideoLimits.from_parameters(parameters),
            sampling=VideoSampling.from_parameters(parameters),
        )


DEFAULT_VISUAL_SETTINGS = VisualSettings()


class PreparedVisuals(NamedTuple):
    """A batch ready for the image encoder; unpacks as ``pixels, frame_mask, image_mask, frames, errors``."""

    pixel_values: np.ndarray
    """float32 [B, F, 3, 224, 224], F the most frames of a post of the batch (1 without videos)."""
    frame_mask: np.ndarray
    """float32 [B, F]: 1 for each frame the encoder pools. A post without a usable visual keeps its one
    zero frame (the encoder's output for it is ignored: IMAGE_MASK is 0), so a batch is never empty."""
    image_mask: np.ndarray
    """float32 [B, 1]: 1 where the post has a decoded image or video, else 0."""
    frames: np.ndarray
    """int32 [B, 1]: the frames pooled into the post's image embedding; 0 without a usable visual."""
    errors: list[InvalidPostError | None]
    """Per post: why its visual was refused, or None (also None for 'no visual')."""


def preprocess_visuals(images: Sequence[bytes], settings: VisualSettings = DEFAULT_VISUAL_SETTINGS) -> PreparedVisuals:
    """Decode and normalise each post's image or video.

    Empty bytes mean the post has no visual: one zero frame, image mask 0, no error. A bad
    image or video fails only itself: its error is returned in its slot, not raised,
    because the Triton model answers each request of a batch separately.
    """
    per_post: list[np.ndarray | None] = []
    errors: list[InvalidPostError | None] = []
    for index, data in enumerate(images):
        try:
            per_post.append(visual_frames(data, settings) if data else None)
            errors.append(None)
        except InvalidPostError as error:
            logger.debug("visual %d of a batch of %d refused: %s", index, len(images), error)
            per_post.append(None)
            errors.append(error)
    return stack_frames(per_post)._replace(errors=errors)


def visual_frames(data: bytes, settings: VisualSettings = DEFAULT_VISUAL_SETTINGS) -> np.ndarray:
    """One post's frames ``[n, 3, 224, 224]``: F sampled ones of a video (fewer if it has fewer), 1 of an image.

    Raises InvalidPostError naming ``IMAGE`` when the visual is refused.
    """
    if sniff_video(data) is None:
        return image_pixels(data, settings.image)[np.newaxis]
    pixels, used = sample_video(data, settings.sampling, settings.video)
    return pixels[:used]


def stack_frames(per_post: Sequence[np.ndarray | None]) -> PreparedVisuals:
    """The contract's tensors of posts given as their frames ``[n, 3, 224, 224]`` (None: no visual)."""
    batch = len(per_post)
    longest = max((len(frames) for frames in per_post if frames is not None), default=1)
    pixels = np.zeros((batch, longest, *PIXEL_VALUES.dims[1:]), dtype=PIXEL_VALUES.dtype.numpy)
    frame_mask = np.zeros((batch, longest), dtype=FRAME_MASK.dtype.numpy)
    frame_mask[:, 0] = 1.0
    image_mask = np.zeros((batch, 1), dtype=IMAGE_MASK.dtype.numpy)
    frames = np.zeros((batch, 1), dtype=FRAMES.dtype.numpy)
    for row, post_frames in enumerate(per_post):
        if post_frames is None:
            continue
        count = len(post_frames)
        pixels[row, :count] = post_frames
        frame_mask[row, :count] = 1.0
        image_mask[row] = 1.0
        frames[row] = count
    return PreparedVisuals(pixels, frame_mask, image_mask, frames, [None] * batch)
