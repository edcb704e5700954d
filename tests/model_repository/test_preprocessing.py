"""Image preprocessing: decoding untrusted bytes, colour modes, geometry and limits."""

from __future__ import annotations

import dataclasses
import inspect
import io
import struct
import time
import warnings
import zlib
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile, JpegImagePlugin, PngImagePlugin

from postsim.core.errors import InvalidPostError, PostSimError
from postsim.model_repository.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageLimits,
    centre_crop_box,
    decode_image,
    image_pixels,
    image_to_pixels,
    resized_size,
    to_rgb,
)

RED = (255, 0, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


def encode(image: Image.Image, image_format: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def corner(image: Image.Image) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(image)[0, 0])


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_claiming(width: int, height: int) -> bytes:
    """A 60-byte PNG whose header claims width × height pixels; its pixel data is one empty row."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00"))
        + png_chunk(b"IEND", b"")
    )


def jpeg_photo(width: int = 64, height: int = 48) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "JPEG", quality=90)


# --- Orientation and colour modes -----------------------------------------------------------


def test_exif_orientation_6_is_turned_upright() -> None:
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(RED, (0, 0, 8, 8))  # marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    image = decode_image(encode(stored, "JPEG", quality=95, exif=exif.tobytes()))
    assert image.size == (20, 40)
    pixels = np.asarray(image).astype(int)
    # Turned clockwise, the stored top-left corner is displayed top-right.
    assert pixels[2, 17].tolist() == pytest.approx(RED, abs=40)
    assert pixels[2, 2].tolist() == pytest.approx(BLUE, abs=40)


def _palette_image(transparent: bool) -> bytes:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, *RED] + [0] * 762)
    return encode(image, "PNG", **({"transparency": 1} if transparent else {}))


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(encode(Image.new("RGBA", (4, 4), (255, 0, 0, 0)), "PNG"), WHITE, id="RGBA-transparent"),
        pytest.param(encode(Image.new("RGBA", (4, 4), (255, 0, 0, 128)), "PNG"), (255, 127, 127), id="RGBA-half"),
        pytest.param(encode(Image.new("LA", (4, 4), (0, 0)), "PNG"), WHITE, id="LA-transparent"),
        pytest.param(encode(Image.new("LA", (4, 4), (100, 255)), "PNG"), (100, 100, 100), id="LA-opaque"),
        pytest.param(_palette_image(transparent=True), WHITE, id="P-transparent"),
        pytest.param(_palette_image(transparent=False), RED, id="P"),
        pytest.param(encode(Image.new("L", (4, 4), 77), "PNG"), (77, 77, 77), id="L"),
        pytest.param(encode(Image.new("L", (4, 4), 77), "PNG", transparency=77), WHITE, id="L-tRNS"),
        pytest.param(encode(Image.new("RGB", (4, 4), (9, 8, 7)), "PNG", transparency=(9, 8, 7)), WHITE, id="RGB-tRNS"),
        pytest.param(encode(Image.new("1", (4, 4), 1), "PNG"), WHITE, id="1-bit"),
        pytest.param(encode(Image.new("RGB", (4, 4), (9, 80, 200)), "BMP"), (9, 80, 200), id="BMP"),
        pytest.param(encode(Image.new("RGB", (4, 4), (9, 80, 200)), "WEBP", lossless=True), (9, 80, 200), id="WebP"),
    ],
)
def test_every_mode_becomes_rgb_on_white(data: bytes, expected: tuple[int, int, int]) -> None:
    image = decode_image(data)
    assert image.mode == "RGB"
    assert corner(image) == pytest.approx(expected, abs=1)


def test_adobe_cmyk_jpeg_comes_out_in_the_right_colours() -> None:
    data = encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100)
    assert "adobe" in Image.open(io.BytesIO(data)).info  # Pillow writes inverted (Adobe) CMYK
    assert corner(decode_image(data)) == pytest.approx(RED, abs=4)


def test_16_bit_greyscale_png_is_scaled_not_clipped() -> None:
    values = np.array([[65535, 0], [32768, 257]], dtype=np.uint16)
    image = decode_image(encode(Image.fromarray(values), "PNG"))
    assert np.asarray(image)[:, :, 0].tolist() == [[255, 0], [128, 1]]


def test_32_bit_integer_and_float_greyscale() -> None:
    wide = Image.fromarray(np.array([[65535, 70000], [-1, 32767]], dtype=np.int32))
    assert wide.mode == "I"
    assert np.asarray(to_rgb(wide))[:, :, 1].tolist() == [[255, 255], [0, 127]]
    floats = Image.fromarray(np.array([[0.0, 127.6], [300.0, np.nan]], dtype=np.float32))
    assert floats.mode == "F"
    assert np.asarray(to_rgb(floats))[:, :, 2].tolist() == [[0, 128], [255, 0]]


def test_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in (RED, BLUE)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    assert getattr(Image.open(io.BytesIO(buffer.getvalue())), "n_frames", 1) == 2
    assert corner(decode_image(buffer.getvalue())) == RED


# --- Pixels and geometry --------------------------------------------------------------------


def test_constant_grey_normalises_to_the_imagenet_values() -> None:
    pixels = image_to_pixels(Image.new("RGB", (300, 200), (128, 128, 128)))
    assert pixels.shape == (3, 224, 224)
    assert pixels.dtype == np.float32
    assert pixels.flags.c_contiguous
    expected = (128 / 255 - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(pixels.reshape(3, -1), np.repeat(expected[:, None], 224 * 224, axis=1), atol=1e-6)


def test_a_single_pixel_image_fills_the_crop() -> None:
    pixels = image_to_pixels(decode_image(encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG")))
    assert pixels.shape == (3, 224, 224)
    assert np.ptp(pixels, axis=(1, 2)).max() == pytest.approx(0.0, abs=1e-6)


def test_resize_keeps_the_aspect_ratio_like_torchvision() -> None:
    assert resized_size(640, 480) == (341, 256)
    assert resized_size(480, 640) == (256, 341)
    assert resized_size(1, 1) == (256, 256)
    assert resized_size(1000, 37) == (6918, 256)


def test_centre_crop_keeps_only_the_middle() -> None:
    # 512×256 needs no resize; CenterCrop(224) keeps columns 144..367 and rows 16..239.
    image = Image.new("RGB", (512, 256), RED)
    image.paste((0, 255, 0), (144, 16, 368, 240))
    pixels = image_to_pixels(image)
    green = (np.array([0.0, 1.0, 0.0], dtype=np.float32) - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(pixels, np.broadcast_to(green[:, None, None], pixels.shape), atol=1e-5)


@pytest.mark.parametrize("size", [(640, 480), (481, 1000), (255, 257), (1000, 37), (3, 5)])
def test_cropped_resize_matches_resize_then_crop(size: tuple[int, int]) -> None:
    width, height = size
    random_pixels = np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(random_pixels)
    new_width, new_height = resized_size(width, height)
    left, top = round((new_width - 224) / 2), round((new_height - 224) / 2)
    reference = image.resize((new_width, new_height), Image.Resampling.BILINEAR).crop(
        (left, top, left + 224, top + 224)
    )
    cropped = image.resize((224, 224), Image.Resampling.BILINEAR, box=centre_crop_box(width, height))
    difference = np.abs(np.asarray(reference, dtype=int) - np.asarray(cropped, dtype=int))
    assert difference.max() <= 1  # float rounding only
    assert (difference > 0).mean() < 0.01


def test_an_extreme_strip_is_cheap() -> None:
    started = time.perf_counter()
    pixels = image_to_pixels(decode_image(encode(Image.new("RGB", (1, 30_000), RED), "PNG")))
    assert pixels.shape == (3, 224, 224)
    assert time.perf_counter() - started < 1.0


# --- Refusals -------------------------------------------------------------------------------


def refusal(data: bytes, limits: ImageLimits | None = None) -> str:
    with pytest.raises(InvalidPostError) as caught:
        decode_image(data, limits or ImageLimits())
    message = str(caught.value)
    assert message.startswith("IMAGE: ")
    return message


def test_limits_are_a_frozen_keyword_only_config() -> None:
    assert ImageLimits() == ImageLimits(max_bytes=20 * 1024 * 1024, max_pixels=40_000_000)
    parameters = inspect.signature(ImageLimits).parameters.values()
    assert all(parameter.kind is inspect.Parameter.KEYWORD_ONLY for parameter in parameters)
    for name in ("max_bytes", "max_pixels"):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(ImageLimits(), name, 1)
    with pytest.raises(ValueError, match="max_pixels"):
        ImageLimits(max_pixels=0)


def test_too_many_bytes_is_refused() -> None:
    data = jpeg_photo()
    message = refusal(data, ImageLimits(max_bytes=len(data) - 1))
    assert f"{len(data):,} bytes is over the limit of {len(data) - 1:,} bytes" in message


@pytest.mark.parametrize(
    ("width", "height"),
    [
        pytest.param(8000, 6000, id="our-limit"),
        pytest.param(10_000, 10_000, id="pillow-warning"),
        pytest.param(100_000, 100_000, id="pillow-error"),
    ],
)
def test_too_many_pixels_is_refused_from_the_header(width: int, height: int) -> None:
    filters_before = list(warnings.filters)
    pillow_limit = Image.MAX_IMAGE_PIXELS
    started = time.perf_counter()
    message = refusal(png_claiming(width, height))
    assert time.perf_counter() - started < 0.5  # nothing was allocated or decoded
    assert "pixels" in message
    assert f"{width * height}" in message.replace(",", "")
    assert "over the limit of 40,000,000 pixels" in message  # postsim's limit, not Pillow's
    assert pillow_limit == Image.MAX_IMAGE_PIXELS
    assert warnings.filters == filters_before


def test_pixel_limit_is_configurable() -> None:
    assert "64×48 = 3,072 pixels is over the limit of 3,000" in refusal(jpeg_photo(), ImageLimits(max_pixels=3000))


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\x00garbage" * 20, "not a decodable image (JPEG, PNG, WebP, BMP or GIF): cannot identify image file"),
        (b"  <!DOCTYPE html><html><body>Not found</body></html>", "got HTML, which is not a supported image format"),
        (b"II*\x00" + bytes(200), "got TIFF, which is not a supported image format"),
        (jpeg_photo()[:12], "truncated or corrupt JPEG"),
        (b"", "empty (0 bytes)"),
    ],
    ids=["garbage", "html", "tiff", "jpeg-header-cut", "empty"],
)
def test_what_is_not_an_image_is_refused_by_name(data: bytes, expected: str) -> None:
    assert expected in refusal(data)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_a_truncated_jpeg_is_refused_not_half_decoded(keep: float) -> None:
    data = jpeg_photo(320, 240)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert "truncated or corrupt JPEG: image file is truncated" in refusal(data[: int(len(data) * keep)])


def grey_png(pixels: np.ndarray, *, rows: int | None = None, interlaced: bool = False, iend: bool = True) -> bytes:
    """An 8-bit greyscale PNG of ``pixels``, written here so its data can stop short.

    ``rows`` keeps only that many rows of data (non-interlaced) or, interlaced, that many
    Adam7 passes, in a complete compressed stream; ``iend=False`` leaves out the closing chunk.
    """
    height, width = pixels.shape
    if interlaced:
        passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
        parts = [pixels[y0::dy, x0::dx] for x0, y0, dx, dy in passes[:rows]]
        raw = b"".join(b"\x00" + row.tobytes() for part in parts if part.size for row in part)
    else:
        raw = b"".join(b"\x00" + row.tobytes() for row in pixels[:rows])
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 1 if interlaced else 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + (png_chunk(b"IEND", b"") if iend else b"")
    )


def noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)


def test_a_png_whose_pixel_data_stops_short_is_refused_without_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reported file: a header of 6000×6000 and one row of pixel data, no IEND, 73 bytes."""
    data = grey_png(np.zeros((6000, 6000), np.uint8), rows=1, iend=False)
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: pytest.fail("the PNG was decoded"))
    message = refusal(data)
    assert (
        f"truncated PNG: its header says 6000×6000 pixels, which take at least 34,889 bytes, and it has {len(data)}"
        in message
    )


def test_a_jpeg_whose_scan_stops_at_an_early_end_marker_is_refused_without_decoding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    whole = encode(Image.new("RGB", (3000, 2000), (90, 120, 200)), "JPEG", quality=50)
    scan = whole.index(b"\xff\xda")
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", lambda self: pytest.fail("the JPEG was decoded"))
    assert "truncated JPEG: its header says 3000×2000 pixels, which take at least 11,718 bytes" in refusal(
        whole[: scan + 200] + b"\xff\xd9"
    )


@pytest.mark.parametrize("interlaced", [False, True], ids=["sequential", "interlaced"])
def test_a_png_whose_compressed_rows_end_early_is_refused(interlaced: bool) -> None:
    """Enough data to pass for whole, but the stream ends cleanly before the last row (the last Adam7 pass)."""
    pixels = noise(300, 200)
    assert decode_image(grey_png(pixels, interlaced=interlaced)).size == (300, 200)
    short = grey_png(pixels, rows=6 if interlaced else 150, interlaced=interlaced)
    assert "truncated PNG: its pixel data ends before the last row of its 300×200 pixels" in refusal(short)


@pytest.mark.parametrize("interlaced", [False, True], ids=["sequential", "interlaced"])
def test_a_whole_png_is_decoded_exactly_even_when_its_last_row_looks_unwritten(interlaced: bool) -> None:
    """A last row of the values the check marks it with is a real row: the image is decoded, unchanged."""
    for value in (1, 0):
        pixels = noise(64, 33)
        pixels[-1 if not interlaced else -2 :] = value
        decoded = decode_image(grey_png(pixels, interlaced=interlaced))
        np.testing.assert_array_equal(np.asarray(decoded)[:, :, 0], pixels)
    white = encode(Image.new("1", (40, 30), 1), "PNG")
    assert decode_image(white).getextrema() == ((255, 255),) * 3


@pytest.mark.parametrize(
    ("image_format", "options"),
    [("PNG", {"compress_level": 9}), ("JPEG", {"optimize": True}), ("JPEG", {"optimize": True, "progressive": True})],
    ids=["png", "jpeg", "progressive-jpeg"],
)
def test_the_most_compressible_whole_image_passes_the_size_bound(image_format: str, options: dict[str, Any]) -> None:
    """One flat colour, the best compression each format has: the bound refuses only what is short."""
    for mode in ("1", "L", "RGB") if image_format == "PNG" else ("L", "RGB"):
        data = encode(Image.new(mode, (3000, 2000), 0), image_format, **options)
        assert decode_image(data).size == (3000, 2000), (mode, len(data))


def _every_format() -> dict[str, bytes]:
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 256, (120, 160, 3), dtype=np.uint8))
    return {
        "JPEG": encode(photo, "JPEG", quality=90),
        "progressive JPEG": encode(photo, "JPEG", quality=90, progressive=True),
        "PNG": encode(photo, "PNG"),
        "WebP": encode(photo, "WEBP", quality=80),
        "lossless WebP": encode(photo, "WEBP", lossless=True),
        "BMP": encode(photo, "BMP"),
        "GIF": encode(photo.convert("P"), "GIF"),
    }


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.95])
@pytest.mark.parametrize("name", list(_every_format()))
def test_a_truncated_image_of_every_accepted_format_is_refused(name: str, keep: float) -> None:
    data = _every_format()[name]
    assert decode_image(data).size == (160, 120)
    assert "truncated" in refusal(data[: int(len(data) * keep)]) or "corrupt" in refusal(data[: int(len(data) * keep)])


def test_decoding_refuses_to_run_with_truncated_images_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(PostSimError, match="LOAD_TRUNCATED_IMAGES"):
        decode_image(jpeg_photo())


# --- Decoding no more pixels than the encoder needs ------------------------------------------


def flat_jpeg(size: tuple[int, int], **options: Any) -> bytes:
    return encode(Image.new("RGB", size, (90, 140, 200)), "JPEG", quality=90, **options)


@pytest.mark.parametrize(
    ("size", "decoded"),
    [
        ((4032, 3024), (504, 378)),  # 1/8: a phone original
        ((1080, 1350), (270, 338)),  # 1/4: a feed photo
        ((2048, 600), (1024, 300)),  # 1/2: the shorter side decides
        ((511, 700), (511, 700)),  # under twice 256: decoded whole
    ],
)
def test_a_jpeg_is_decoded_at_the_smallest_dct_scale_that_keeps_the_shorter_side_256(
    size: tuple[int, int], decoded: tuple[int, int]
) -> None:
    data = flat_jpeg(size)
    assert decode_image(data, shorter_side=256).size == decoded
    assert decode_image(data).size == size  # the full-decode path stays reachable


@pytest.mark.parametrize(("mode", "options"), [("CMYK", {}), ("L", {}), ("RGB", {"progressive": True})])
def test_cmyk_grey_and_progressive_jpegs_are_decoded_at_scale_too(mode: str, options: dict[str, Any]) -> None:
    image = decode_image(encode(Image.new(mode, (2000, 1200)), "JPEG", **options), shorter_side=256)
    assert (image.size, image.mode) == ((500, 300), "RGB")


def test_exif_orientation_is_honoured_at_scale() -> None:
    stored = Image.new("RGB", (4032, 3024), BLUE)
    stored.paste(RED, (0, 0, 800, 800))  # marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6
    image = decode_image(encode(stored, "JPEG", quality=90, exif=exif.tobytes()), shorter_side=256)
    assert image.size == (378, 504)
    pixels = np.asarray(image).astype(int)
    assert pixels[10, 370].tolist() == pytest.approx(RED, abs=40)  # displayed top-right
    assert pixels[10, 10].tolist() == pytest.approx(BLUE, abs=40)


def test_the_limits_hold_before_any_decode_at_scale() -> None:
    phone = flat_jpeg((4032, 3024))
    with pytest.raises(InvalidPostError, match="12,192,768 pixels is over the limit of 10,000,000"):
        image_pixels(phone, ImageLimits(max_pixels=10_000_000))
    with pytest.raises(InvalidPostError, match="over the limit of 1,000 bytes"):
        image_pixels(phone, ImageLimits(max_bytes=1000))
    # A 60-byte PNG claiming 10 billion pixels: refused from its header, nothing decoded.
    with pytest.raises(InvalidPostError, match="over the limit of 40,000,000 pixels"):
        image_pixels(png_claiming(100_000, 100_000))


@pytest.mark.parametrize("image_format", ["JPEG", "PNG"])
def test_pixels_at_scale_match_the_full_decode(image_format: str) -> None:
    from postsim.bench.photos import photo

    picture = photo((1600, 2000), ((40, 90, 160), (200, 170, 120)), np.random.default_rng(1))
    data = encode(picture, image_format, **({"quality": 90} if image_format == "JPEG" else {}))
    scaled, full = image_pixels(data), image_pixels(data, full_decode=True)
    assert scaled.shape == full.shape == (3, 224, 224)
    # Normalised units (one 8-bit level is about 0.017): the two differ by about a level on average.
    assert float(np.abs(scaled - full).mean()) < 0.02
    assert float(np.corrcoef(scaled.ravel(), full.ravel())[0, 1]) > 0.999
