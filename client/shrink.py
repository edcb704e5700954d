"""Optional client-side shrinking: send an image no larger than the server's preprocessing uses.

The server resizes every image's shorter side to ``IMAGE_RESIZE_SHORTER_SIDE`` before it
crops the centre (:mod:`postsim.model_repository.preprocessing`, the one definition of
preprocessing). A client built with ``shrink_images=True`` does that resize itself and sends
the result as a JPEG of high quality, so a 12 MP phone photo of several megabytes goes over
the wire as tens of kilobytes; the server then preprocesses the small image as any other.
The embedding moves a little (a second resampling and a JPEG re-encode): README gives the
measured cosine. Decoding and the limits are the server's own code (numpy and Pillow only).

What the server would refuse, or could not improve on, is sent as it is, so the answer
(and any error) is the server's: a video, data that is not a decodable image or is over the
default limits, an image whose shorter side is already at most the target, and an image
whose shrunk JPEG would be larger than the original.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from postsim.core.errors import InvalidPostError
from postsim.model_repository.contract import IMAGE_RESIZE_SHORTER_SIDE
from postsim.model_repository.preprocessing import (
    PILLOW_ERRORS,
    REDUCING_GAP,
    SUPPORTED_FORMATS,
    decode_image,
    resized_size,
)

_HEADER_ERRORS: tuple[type[Exception], ...] = (UnidentifiedImageError, Image.DecompressionBombError, *PILLOW_ERRORS)

SHRINK_JPEG_QUALITY = 95
"""Quality of the JPEG a shrunk image is sent as (with full-resolution colour, 4:4:4)."""


def encoder_scale_image(data: bytes) -> Image.Image:
    """The upright RGB image at the scale the encoder sees: shorter side ``IMAGE_RESIZE_SHORTER_SIDE``, never
    enlarged. A JPEG is decoded at reduced scale where that still leaves enough pixels.

    Raises InvalidPostError as :func:`~postsim.model_repository.preprocessing.decode_image` does.
    """
    image = decode_image(data, shorter_side=IMAGE_RESIZE_SHORTER_SIDE)
    if min(image.size) <= IMAGE_RESIZE_SHORTER_SIDE:
        return image
    return image.resize(resized_size(*image.size), Image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP)


def shrink_image(data: bytes) -> bytes:
    """``data`` resized to the encoder's scale and re-encoded as JPEG, or ``data`` itself when that would not help."""
    if not data or _shorter_side(data) <= IMAGE_RESIZE_SHORTER_SIDE:
        return data
    try:
        image = encoder_scale_image(data)
    except InvalidPostError:
        return data  # what the server refuses: let it answer
    out = io.BytesIO()
    image.save(out, "JPEG", quality=SHRINK_JPEG_QUALITY, subsampling=0)
    shrunk = out.getvalue()
    return shrunk if len(shrunk) < len(data) else data


def _shorter_side(data: bytes) -> int:
    """The shorter side the image's header announces; 0 for data Pillow opens as no image (a video, say)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS) as header:
                return min(header.size)
    except _HEADER_ERRORS:
        return 0
