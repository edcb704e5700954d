"""Server-side image preprocessing: encoded image bytes in, normalised pixel tensors out.

The ``preprocess_image`` Python-backend model calls :func:`preprocess_images` on each
batch. Every image arrives from an untrusted client, so decoding refuses, before any
pixel is decoded, what is too big in bytes or in pixels, refuses what is not a whole
image of a supported format, and turns every such refusal into an
:class:`~postsim.model_repository.errors.InvalidPostError` that names the ``IMAGE`` input.

The geometry is torchvision's ``Resize(256)`` (bilinear, antialiased, which is what
Pillow's resize does) followed by ``CenterCrop(224)``, then ``ToTensor`` and the ImageNet
``Normalize``: the transforms the image encoder was trained with. Only numpy and Pillow.
"""

from __future__ import annotations

import contextlib
import io
import logging
import struct
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .contract import IMAGE, IMAGE_RESIZE_SHORTER_SIDE, IMAGE_SIZE
from .errors import InvalidPostError, PostSimError

logger = logging.getLogger("postsim")

MiB = 1024 * 1024
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
"""Pillow format names that :func:`decode_image` opens; Pillow tries no other plugin."""
_SUPPORTED_NAMES = "JPEG, PNG, WebP, BMP or GIF"

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

_PILLOW_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    IndexError,
    struct.error,
)
"""What Pillow's plugins raise on a malformed file (OSError covers 'image file is truncated')."""

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_WIDE_GREY_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
"""Greyscale modes whose values span 0..65535 (PNG 16-bit greyscale opens as one of these)."""

_BINARY_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\xff\xd8\xff", "JPEG"),
    (0, b"\x89PNG\r\n\x1a\n", "PNG"),
    (8, b"WEBP", "WEBP"),
    (0, b"GIF8", "GIF"),
    (0, b"BM", "BMP"),
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
    (4, b"ftyp", "ISO media (HEIC, AVIF or MP4)"),
    (0, b"%PDF", "PDF"),
)
_TEXT_PREFIXES: tuple[tuple[bytes, str], ...] = (
    (b"<!doctype html", "HTML"),
    (b"<html", "HTML"),
    (b"<svg", "SVG"),
    (b"<?xml", "XML"),
    (b"{", "JSON"),
)
"""Magic bytes and text openings, only to word the error for data Pillow could not identify."""


@dataclass(frozen=True, kw_only=True)
class ImageLimits:
    """What one image may cost the server before it is decoded."""

    max_bytes: int = 20 * MiB
    """Largest encoded image accepted."""
    max_pixels: int = 40_000_000
    """Largest width × height accepted, read from the header before decoding.

    Pillow's own decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``, about 89 million
    pixels) still applies above this and is reported the same way.
    """

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ImageLimits.{name} must be positive, got {getattr(self, name)}")


DEFAULT_IMAGE_LIMITS = ImageLimits()


class PreprocessedImages(NamedTuple):
    """A batch ready for the image encoder; unpacks as ``pixels, mask, errors``."""

    pixel_values: np.ndarray
    """float32 [B, 3, 224, 224]; zeros where there is no usable image."""
    image_mask: np.ndarray
    """float32 [B, 1]: 1 where the post has a decoded image, else 0."""
    errors: list[InvalidPostError | None]
    """Per item: why its image was refused, or None (also None for 'no image')."""


def preprocess_images(images: Sequence[bytes], limits: ImageLimits = DEFAULT_IMAGE_LIMITS) -> PreprocessedImages:
    """Decode and normalise a batch of encoded images.

    Empty bytes mean the post has no image: its row is zeros with mask 0 and no error. A
    bad image fails only itself: its error is returned in its slot, not raised, because
    the Triton model answers each request of a batch separately.
    """
    batch = len(images)
    pixels = np.zeros((batch, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    mask = np.zeros((batch, 1), dtype=np.float32)
    errors: list[InvalidPostError | None] = [None] * batch
    for index, data in enumerate(images):
        if not data:
            continue
        try:
            pixels[index] = image_to_pixels(decode_image(data, limits))
        except InvalidPostError as error:
            logger.debug("image %d of a batch of %d refused: %s", index, batch, error)
            errors[index] = error
            continue
        mask[index] = 1.0
    return PreprocessedImages(pixels, mask, errors)


def decode_image(data: bytes, limits: ImageLimits = DEFAULT_IMAGE_LIMITS) -> Image.Image:
    """Decode one JPEG, PNG, WebP, BMP or GIF (its first frame) into an upright RGB image.

    Raises InvalidPostError, before decoding any pixel, for data over
    ``limits.max_bytes``, a header over ``limits.max_pixels`` or data Pillow cannot
    identify; and for a file that turns out truncated or corrupt while decoding.
    """
    if not data:
        raise InvalidPostError(f"{IMAGE.name}: empty (0 bytes); send an encoded image or no image at all")
    if len(data) > limits.max_bytes:
        raise InvalidPostError(f"{IMAGE.name}: {len(data):,} bytes is over the limit of {limits.max_bytes:,} bytes")
    _require_truncated_images_refused()
    with _decompression_bombs_refused():
        image = _open_header(data)
        _check_pixel_count(image, limits)
        _load_pixels(image)
    _apply_exif_orientation(image)
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB; transparency is composited on white.

    16-bit greyscale (``I;16``, and ``I`` taken as 0..65535) is scaled to 0..255 rather than
    clipped as Pillow's ``convert`` would; ``F`` is taken as 0..255, Pillow's convention.
    """
    if image.mode in _WIDE_GREY_MODES:
        return _grey16_to_rgb(image)
    if image.mode == "F":
        return _float_to_rgb(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return _composite_on_white(image)
    if image.mode == "RGB":
        return image
    try:
        # L, 1, P, CMYK (Adobe's inverted CMYK JPEGs are already un-inverted by Pillow), YCbCr ...
        return image.convert("RGB")
    except ValueError as error:
        raise InvalidPostError(f"{IMAGE.name}: colour mode {image.mode} is not supported") from error


def image_to_pixels(image: Image.Image) -> np.ndarray:
    """float32 [3, 224, 224]: shorter side to 256, centre crop 224, ImageNet-normalised, CHW.

    Only the centre crop is resampled (Pillow's ``resize(box=...)``), with the scale of the
    full resize, so a 1 × 40,000 px strip costs a 224 × 224 output rather than a
    256 × 10 million intermediate. It matches resize-then-crop to within rounding.
    """
    rgb = to_rgb(image)
    box = centre_crop_box(rgb.width, rgb.height)
    cropped = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR, box=box)
    scaled = np.asarray(cropped, dtype=np.float32) / 255.0
    normalised = (scaled - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(normalised.transpose(2, 0, 1))


def resized_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) after torchvision's ``Resize(256)``: shorter side 256, the other truncated."""
    shorter = IMAGE_RESIZE_SHORTER_SIDE
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def centre_crop_box(width: int, height: int) -> tuple[float, float, float, float]:
    """The source region that ``Resize(256)`` then ``CenterCrop(224)`` keeps, in source pixels."""
    new_width, new_height = resized_size(width, height)
    # torchvision's CenterCrop rounds the offsets with Python's round().
    left = round((new_width - IMAGE_SIZE) / 2.0)
    top = round((new_height - IMAGE_SIZE) / 2.0)
    scale_x, scale_y = width / new_width, height / new_height
    return (
        left * scale_x,
        top * scale_y,
        (left + IMAGE_SIZE) * scale_x,
        (top + IMAGE_SIZE) * scale_y,
    )


def _require_truncated_images_refused() -> None:
    # With this flag on, Pillow silently pads a truncated file with grey: the server would
    # embed half an image. It is Pillow-global, so someone else in the process set it.
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise PostSimError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on in this process; postsim will not decode "
            "images that way (truncated uploads would be embedded half grey): leave it off"
        )


@contextlib.contextmanager
def _decompression_bombs_refused() -> Iterator[None]:
    """Pillow's decompression-bomb warning and error, inside the block, as InvalidPostError.

    The warning filter is scoped with ``catch_warnings``, so the rest of the process keeps
    its own; ``catch_warnings`` is not thread-safe, which is fine in a Triton Python-backend
    model (one thread per model instance).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise InvalidPostError(f"{IMAGE.name}: too many pixels: {error}") from error


def _open_header(data: bytes) -> ImageFile.ImageFile:
    """Identify the format and read the header; Pillow decodes nothing yet."""
    try:
        return Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError as error:
        raise InvalidPostError(f"{IMAGE.name}: {_describe_unidentified(data)}") from error
    except _PILLOW_ERRORS as error:
        kind = _sniff_format(data) or "image"
        raise InvalidPostError(f"{IMAGE.name}: truncated or corrupt {kind} header: {error}") from error


def _describe_unidentified(data: bytes) -> str:
    sniffed = _sniff_format(data)
    if sniffed in SUPPORTED_FORMATS:
        return f"corrupt or truncated {sniffed}: cannot read its header"
    if sniffed is not None:
        return f"got {sniffed}, which is not a supported image format; send {_SUPPORTED_NAMES}"
    return f"not a decodable image ({_SUPPORTED_NAMES}): cannot identify image file"


def _sniff_format(data: bytes) -> str | None:
    for offset, magic, name in _BINARY_SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            return name
    opening = data[:64].lstrip().lower()
    for prefix, name in _TEXT_PREFIXES:
        if opening.startswith(prefix):
            return name
    return None


def _check_pixel_count(image: Image.Image, limits: ImageLimits) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidPostError(f"{IMAGE.name}: the header says {width}×{height} pixels, which is empty")
    if width * height > limits.max_pixels:
        raise InvalidPostError(
            f"{IMAGE.name}: {width}×{height} = {width * height:,} pixels is over the limit of "
            f"{limits.max_pixels:,} pixels"
        )


def _load_pixels(image: ImageFile.ImageFile) -> None:
    """Decode the (first frame's) pixels; a truncated or corrupt file raises."""
    try:
        image.load()
    except _PILLOW_ERRORS as error:
        raise InvalidPostError(f"{IMAGE.name}: truncated or corrupt {image.format}: {error}") from error


def _apply_exif_orientation(image: Image.Image) -> None:
    """Turn the pixels upright as the EXIF orientation says; unreadable EXIF is ignored."""
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except _PILLOW_ERRORS as error:
        logger.debug("%s: ignoring unreadable EXIF data: %s", IMAGE.name, error)


def _grey16_to_rgb(image: Image.Image) -> Image.Image:
    values = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)
    return _grey_to_rgb((values * 255 + 32767) // 65535)


def _float_to_rgb(image: Image.Image) -> Image.Image:
    values = np.nan_to_num(np.asarray(image, dtype=np.float32))
    return _grey_to_rgb(np.rint(np.clip(values, 0, 255)))


def _grey_to_rgb(values: np.ndarray) -> Image.Image:
    """0..255 greyscale values (any numeric dtype) as an RGB image."""
    return Image.fromarray(values.astype(np.uint8)).convert("RGB")


def _composite_on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
