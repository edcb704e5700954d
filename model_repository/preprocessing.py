"""Server-side image preprocessing: encoded image bytes in, normalised pixel tensors out.

The ``preprocess_image`` Python-backend model decodes each post's image through
:func:`~postsim.model_repository.visuals.preprocess_visuals`, which sends videos to
:mod:`.video` and images here. Every image arrives from an untrusted client, so decoding refuses, before any
pixel is decoded, what is too big in bytes or in pixels, refuses what is not a whole
image of a supported format, and turns every such refusal into an
:class:`~postsim.core.errors.InvalidPostError` that names the ``IMAGE`` input.

The geometry is torchvision's ``Resize(256)`` (bilinear, antialiased, which is what
Pillow's resize does) followed by ``CenterCrop(224)``, then ``ToTensor`` and the ImageNet
``Normalize``: the transforms the image encoder was trained with. Only numpy and Pillow.
:func:`image_pixels` gets there decoding no more pixels than that needs: a JPEG at a reduced
DCT scale, a large image of another format block-averaged before it is resampled.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
import struct
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from postsim.core.errors import InvalidPostError, PostSimError, SettingsError
from postsim.model_repository.contract import (
    IMAGE,
    IMAGE_RESIZE_SHORTER_SIDE,
    IMAGE_SIZE,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_BYTES_PARAMETER,
    MAX_IMAGE_PIXELS,
    MAX_IMAGE_PIXELS_PARAMETER,
)

logger = logging.getLogger("postsim")

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
"""Pillow format names that :func:`decode_image` opens; Pillow tries no other plugin."""
_SUPPORTED_NAMES = "JPEG, PNG, WebP, BMP or GIF"

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

PILLOW_ERRORS: tuple[type[Exception], ...] = (
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

    max_bytes: int = MAX_IMAGE_BYTES
    """Largest encoded image accepted."""
    max_pixels: int = MAX_IMAGE_PIXELS
    """Largest width × height accepted, read from the header before decoding.

    Pillow refuses to open an image of more than twice ``Image.MAX_IMAGE_PIXELS`` (about
    179 million pixels) whatever this says; that refusal quotes this limit too.
    """

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"ImageLimits.{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> ImageLimits:
        """The limits a ``preprocess_image`` config carries (``contract.config_parameters`` of it)."""
        return cls(
            max_bytes=MAX_IMAGE_BYTES_PARAMETER.read(parameters),
            max_pixels=MAX_IMAGE_PIXELS_PARAMETER.read(parameters),
        )


DEFAULT_IMAGE_LIMITS = ImageLimits()


REDUCING_GAP = 3.0
"""How much larger than the crop's output an image is still resampled in full: beyond it, Pillow first
averages blocks of pixels (``Image.reduce``) down to at least this many times the output, then
resamples (Pillow's ``reducing_gap``). At 2 a 1080-pixel screenshot was block-averaged and its
embedding moved measurably (``postsim bench preprocess``); at 3 it is resampled in full, and only
larger images are reduced."""


def image_pixels(data: bytes, limits: ImageLimits = DEFAULT_IMAGE_LIMITS, *, full_decode: bool = False) -> np.ndarray:
    """One encoded image as the encoder's float32 ``[3, 224, 224]``, decoding no more pixels than that needs.

    A JPEG is decoded at the smallest DCT scale that leaves its shorter side at least
    ``IMAGE_RESIZE_SHORTER_SIDE`` (:func:`decode_image`'s ``shorter_side``), any image is
    block-averaged down to ``REDUCING_GAP`` times the crop before it is resampled; then
    :func:`image_to_pixels` as ever. ``full_decode`` decodes and resamples every pixel (the
    reference the benchmark compares with). The limits hold before any decode either way.
    """
    if full_decode:
        return image_to_pixels(decode_image(data, limits))
    image = decode_image(data, limits, shorter_side=IMAGE_RESIZE_SHORTER_SIDE)
    return image_to_pixels(image, reducing_gap=REDUCING_GAP)


def decode_image(
    data: bytes, limits: ImageLimits = DEFAULT_IMAGE_LIMITS, *, shorter_side: int | None = None
) -> Image.Image:
    """Decode one JPEG, PNG, WebP, BMP or GIF (its first frame) into an upright RGB image.

    With ``shorter_side``, a JPEG is decoded at the smallest DCT scale (1/2, 1/4 or 1/8,
    Pillow's ``draft``) whose shorter side is still at least that many pixels: a 4032×3024
    photo comes out 504×378 for a 256-pixel target; other formats, and None, decode every
    pixel. The scale is applied after the limits are checked against the full header size.

    Raises InvalidPostError, before decoding any pixel, for data over
    ``limits.max_bytes``, a header over ``limits.max_pixels``, data Pillow cannot
    identify or too few bytes to hold the pixels the header announces (a truncated PNG or
    JPEG); and for a file that turns out truncated or corrupt while decoding, including a
    PNG whose pixel data ends cleanly before its last row.
    """
    if not data:
        raise InvalidPostError(f"{IMAGE.name}: empty (0 bytes); send an encoded image or no image at all")
    if len(data) > limits.max_bytes:
        raise InvalidPostError(f"{IMAGE.name}: {len(data):,} bytes is over the limit of {limits.max_bytes:,} bytes")
    require_truncated_images_refused()
    with decompression_bombs_refused(limits):
        image = _open_header(data)
        _check_pixel_count(image, limits)
        _check_encoded_size(image, data)
        if shorter_side is not None:
            _draft(image, shorter_side)
        image = _load_pixels(image, data)
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


def image_to_pixels(image: Image.Image, *, reducing_gap: float | None = None) -> np.ndarray:
    """float32 [3, 224, 224]: shorter side to 256, centre crop 224, ImageNet-normalised, CHW.

    Only the centre crop is resampled (Pillow's ``resize(box=...)``), with the scale of the
    full resize, so a 1 × 40,000 px strip costs a 224 × 224 output rather than a
    256 × 10 million intermediate. It matches resize-then-crop to within rounding.
    ``reducing_gap`` is Pillow's: a crop more than that many times the output is first
    block-averaged by an integer factor (None: resampled from every pixel).
    """
    rgb = to_rgb(image)
    box = centre_crop_box(rgb.width, rgb.height)
    cropped = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR, box=box, reducing_gap=reducing_gap)
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


def require_truncated_images_refused() -> None:
    # With this flag on, Pillow silently pads a truncated file with grey: the server would
    # embed half an image. It is Pillow-global, so someone else in the process set it.
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise PostSimError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on in this process; postsim will not decode "
            "images that way (truncated uploads would be embedded half grey): leave it off"
        )


_PILLOW_PIXEL_COUNT = re.compile(r"\((\d+) pixels\)")


@contextlib.contextmanager
def decompression_bombs_refused(limits: ImageLimits) -> Iterator[None]:
    """Pillow's decompression-bomb error, inside the block, as InvalidPostError quoting postsim's limit.

    ``limits.max_pixels`` is the limit (:func:`_check_pixel_count`): Pillow's warning, above
    ``Image.MAX_IMAGE_PIXELS``, is silenced; its error, above twice that, is refused with the
    pixel count it names. The warning filter is scoped with ``catch_warnings``, so the rest of
    the process keeps its own; ``catch_warnings`` is not thread-safe, which is fine in a
    Triton Python-backend model (one thread per model instance).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            yield
        except Image.DecompressionBombError as error:
            found = _PILLOW_PIXEL_COUNT.search(str(error))
            count = f"{int(found.group(1)):,} pixels" if found else "more pixels than Pillow opens"
            raise InvalidPostError(
                f"{IMAGE.name}: the header says {count}, which is over the limit of {limits.max_pixels:,} pixels"
            ) from error


def _open_header(data: bytes) -> ImageFile.ImageFile:
    """Identify the format and read the header; Pillow decodes nothing yet."""
    try:
        return Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError as error:
        raise InvalidPostError(f"{IMAGE.name}: {_describe_unidentified(data)}") from error
    except PILLOW_ERRORS as error:
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


_DEFLATE_MAX_RATIO = 1032
"""The most bytes one byte of deflate data can stand for (a 258-byte match in two 1-bit codes)."""
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
"""Samples per pixel of each PNG colour type (grey, RGB, palette, grey + alpha, RGBA)."""
_JPEG_BLOCK = 8
_JPEG_ARITHMETIC_FRAMES = frozenset({0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
"""Start-of-frame markers of arithmetic-coded JPEGs, whose data has no useful lower bound."""
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _check_encoded_size(image: ImageFile.ImageFile, data: bytes) -> None:
    """Refuse, before decoding, a PNG or JPEG too short to hold the pixels its header announces.

    Pillow decodes such a file as far as its data goes and leaves the rest black or grey
    (a PNG whose compressed stream ends early, a JPEG whose scan stops at an early EOI), at
    the cost of the whole image. The bounds are what the formats' best case needs: a
    deflate byte stands for at most 1032 bytes of PNG rows; a Huffman-coded JPEG spends at
    least one bit on each 8×8 block of its first component. GIF, BMP and WebP decoders
    refuse data that ends early themselves.
    """
    width, height = image.size
    if image.format == "PNG":
        bits_per_pixel = data[24] * _PNG_CHANNELS.get(data[25], 1)  # IHDR's bit depth and colour type
        needed = height * (1 + math.ceil(width * bits_per_pixel / 8)) // _DEFLATE_MAX_RATIO
    elif image.format == "JPEG" and _jpeg_frame(data) not in _JPEG_ARITHMETIC_FRAMES:
        needed = math.ceil(width / _JPEG_BLOCK) * math.ceil(height / _JPEG_BLOCK) // 8
    else:
        return
    if len(data) < needed:
        raise InvalidPostError(
            f"{IMAGE.name}: truncated {image.format}: its header says {width}×{height} pixels, which take at "
            f"least {needed:,} bytes, and it has {len(data):,}"
        )


def _draft(image: ImageFile.ImageFile, shorter_side: int) -> None:
    """Have a JPEG decode at the smallest DCT scale that keeps its shorter side at least ``shorter_side``."""
    width, height = image.size
    if image.format != "JPEG" or min(width, height) < 2 * shorter_side:
        return
    # Pillow picks the largest scale 1/2, 1/4 or 1/8 that leaves both sides at least the size asked.
    scale = shorter_side / min(width, height)
    image.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))


def _jpeg_frame(data: bytes) -> int | None:
    """The start-of-frame marker (0xC0..0xCF) of a JPEG, from its segments before the first scan."""
    position = 2
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _JPEG_FRAMES:
            return marker
        if marker == 0xDA:  # start of scan: no frame header before it
            return None
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    return None


_ROW_MARKS = (1, 0)
"""Two sample values, distinct in every mode a PNG opens as (``1`` stores them as 255 and 0): no
decoded row holds both in every sample."""


def _load_pixels(image: ImageFile.ImageFile, data: bytes) -> ImageFile.ImageFile:
    """Decode the (first frame's) pixels; a truncated or corrupt file raises.

    Pillow's PNG decoder stops without a word when the compressed stream ends at a row
    boundary before the last row, leaving the rows after it black: a PNG's last row is
    marked before decoding, and one still marked afterwards was never written (a file whose
    last row holds the mark's value itself is decoded again with the other mark).
    """
    try:
        if image.format != "PNG":
            image.load()
            return image
        row = _last_written_row(image)
        for attempt, mark in enumerate(_ROW_MARKS):
            candidate = image if attempt == 0 else _open_header(data)
            if not _row_still_marked(candidate, row, mark):
                return candidate
    except PILLOW_ERRORS as error:
        raise InvalidPostError(f"{IMAGE.name}: truncated or corrupt {image.format}: {error}") from error
    width, height = image.size
    raise InvalidPostError(
        f"{IMAGE.name}: truncated PNG: its pixel data ends before the last row of its {width}×{height} pixels"
    )


def _last_written_row(image: ImageFile.ImageFile) -> int:
    """The row a PNG decoder writes last: the last one, or with Adam7 interlacing the last odd one."""
    height = image.size[1]
    if image.info.get("interlace") and height > 1:
        return height - 1 if (height - 1) % 2 == 1 else height - 2
    return height - 1


def _row_still_marked(image: ImageFile.ImageFile, row: int, mark: int) -> bool:
    """Fill ``row`` with ``mark`` in every sample, decode into that, and say whether the row kept it."""
    width = image.size[0]
    canvas = Image.new(image.mode, image.size)
    marked = Image.new(image.mode, (width, 1), (mark,) * len(canvas.getbands()))
    canvas.paste(marked, (0, row))
    image.im = canvas.im  # Pillow decodes into an image it is given instead of a new one
    image.load()
    return image.crop((0, row, width, row + 1)).tobytes() == marked.tobytes()


def _apply_exif_orientation(image: Image.Image) -> None:
    """Turn the pixels upright as the EXIF orientation says; unreadable EXIF is ignored."""
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except PILLOW_ERRORS as error:
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
