"""``postsim bench preprocess``: what preprocessing one image costs, decoding every pixel against decoding at scale.

:func:`default_cases` are the photo sizes posts carry (:mod:`postsim.bench.photos`): the old
benchmark's 640×480 JPEG, a 1080×1350 feed photo, a 12 MP phone original with its EXIF
orientation and a 1080×2340 PNG screenshot. :func:`measure_preprocessing` times
:func:`~postsim.model_repository.preprocessing.image_pixels` on each, both ways in the same
run (the two interleaved, so a busy machine slows both alike), and reports the medians.

:func:`decode_fidelity` is the price of decoding at scale: the cosine between the image
encoder's embeddings of the same photos preprocessed both ways, through an exported
repository's ``image_encoder`` in ONNX Runtime. :func:`shrink_effect` is what the client's
``shrink_images`` does to phone photos: their bytes before and after, and the cosine between
the image embeddings the server computes from the shrunk and the original photo.
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from postsim.bench.photos import PhotoKind, PhotoMix, PhotoWorkload, draw_photo_post, photo
from postsim.bench.workload import BENCH_IMAGE_SIZE
from postsim.client.shrink import shrink_image
from postsim.core.errors import BenchError
from postsim.corpus.samples import _TOPICS
from postsim.model_repository.preprocessing import image_pixels
from postsim.model_repository.visuals import stack_frames
from postsim.models.pipeline import OrtRuntime


@dataclass(frozen=True)
class PreprocessCase:
    """One encoded image to preprocess."""

    name: str
    data: bytes


@dataclass(frozen=True, kw_only=True)
class PreprocessTiming:
    """Median milliseconds to preprocess one case: every pixel decoded, and at scale."""

    name: str
    size_bytes: int
    full_ms: float
    scaled_ms: float

    @property
    def speedup(self) -> float:
        return self.full_ms / self.scaled_ms


@dataclass(frozen=True, kw_only=True)
class Fidelity:
    """Cosines between the image embeddings of photos preprocessed two ways."""

    photos: int
    mean: float
    minimum: float
    centred: float | None
    """Mean cosine once the photos' mean reference embedding is subtracted from both sides (None for one
    photo). A random-weights encoder maps any two photos close together (``unrelated``), which makes the
    plain cosine near 1 whatever happens; centred, different photos are far apart and a change shows."""
    unrelated: float | None
    """Centred mean cosine between the reference embeddings of different photos (each and the next)."""


@dataclass(frozen=True, kw_only=True)
class ShrinkEffect:
    """What the client's ``shrink_images`` does to some photos: mean bytes sent, and the embeddings' cosines."""

    bytes_before: float
    bytes_after: float
    largest_before: int
    """The largest photo's bytes, and what they are sent as."""
    largest_after: int
    fidelity: Fidelity | None
    """Original against shrunk photo, both preprocessed as the server does; None without a repository."""


def only(kind: PhotoKind, seed: int = 0) -> PhotoWorkload:
    """A workload whose every post carries an image of ``kind`` (and a caption)."""
    shares = {other.value: 0.0 for other in PhotoKind}
    mix = PhotoMix(**{**shares, kind.value: 1.0, "text_only": 0.0, "image_only": 0.0})
    return PhotoWorkload(mix=mix, seed=seed)


def photo_images(kind: PhotoKind, count: int, seed: int = 0) -> list[bytes]:
    """The encoded images of the first ``count`` posts of a workload of ``kind`` only."""
    workload = only(kind, seed)
    return [draw_photo_post(index, workload).image for index in range(count)]


def legacy_jpeg(seed: int = 0) -> bytes:
    """A photo-like JPEG of the old benchmark's size (640×480), quality 85."""
    out = io.BytesIO()
    photo(BENCH_IMAGE_SIZE, _TOPICS[seed % len(_TOPICS)].sky, np.random.default_rng(seed)).save(out, "JPEG", quality=85)
    return out.getvalue()


def default_cases() -> list[PreprocessCase]:
    width, height = BENCH_IMAGE_SIZE
    cases = [PreprocessCase(f"{width}×{height} JPEG", legacy_jpeg())]
    for kind, label in (
        (PhotoKind.PORTRAIT, "1080×1350 JPEG"),
        (PhotoKind.PHONE, "4032×3024 JPEG (12 MP, EXIF)"),
        (PhotoKind.SCREENSHOT, "1080×2340 PNG screenshot"),
    ):
        cases.append(PreprocessCase(label, photo_images(kind, 1)[0]))
    return cases


def measure_preprocessing(
    cases: Sequence[PreprocessCase], *, repeats: int = 15, progress: Callable[[str], None] | None = None
) -> list[PreprocessTiming]:
    """Median wall time of :func:`image_pixels` on each case, full decode and at scale, interleaved."""
    if repeats < 1:
        raise BenchError(f"repeats must be at least 1, got {repeats}")
    timings = []
    for case in cases:
        image_pixels(case.data)  # warm-up: Pillow's plugins, the first allocation
        full: list[float] = []
        scaled: list[float] = []
        for _ in range(repeats):
            full.append(_time_ms(image_pixels, case.data, full_decode=True))
            scaled.append(_time_ms(image_pixels, case.data))
        timing = PreprocessTiming(
            name=case.name,
            size_bytes=len(case.data),
            full_ms=statistics.median(full),
            scaled_ms=statistics.median(scaled),
        )
        if progress is not None:
            progress(f"{case.name}: {timing.full_ms:.1f} ms in full, {timing.scaled_ms:.1f} ms at scale")
        timings.append(timing)
    return timings


def _time_ms(work: Callable[..., object], *args: object, **kwargs: object) -> float:
    start = time.perf_counter()
    work(*args, **kwargs)
    return (time.perf_counter() - start) * 1000


def finest_phone_photo(seed: int = 0) -> bytes:
    """The first phone photo as a camera's finest setting writes it (quality 95, full-resolution colour): ~5 MB."""
    original = Image.open(io.BytesIO(photo_images(PhotoKind.PHONE, 1, seed)[0]))
    out = io.BytesIO()
    original.save(out, "JPEG", quality=95, subsampling=0, exif=original.info.get("exif", b""))
    return out.getvalue()


def shrink_photos(count: int, seed: int = 0) -> list[bytes]:
    """The photos :func:`shrink_effect` is measured on: ``count`` phone photos and :func:`finest_phone_photo`."""
    return [*photo_images(PhotoKind.PHONE, count, seed), finest_phone_photo(seed)]


def fidelity_photos(per_kind: int = 2, seed: int = 0) -> list[bytes]:
    """The sample photos the fidelity is measured on: ``per_kind`` of each kind of the photo workload."""
    return [image for kind in PhotoKind for image in photo_images(kind, per_kind, seed)]


def decode_fidelity(repository: Path, images: Sequence[bytes], *, threads: int = 0) -> Fidelity:
    """Cosine between the repository's image embeddings of ``images`` decoded at scale and in full."""
    if not images:
        raise BenchError("decode_fidelity needs at least one image")
    runtime = OrtRuntime.from_repository(repository, threads=threads)
    scaled = [image_pixels(data) for data in images]
    full = [image_pixels(data, full_decode=True) for data in images]
    return _fidelity(runtime, scaled, full)


def shrink_effect(images: Sequence[bytes], repository: Path | None = None, *, threads: int = 0) -> ShrinkEffect:
    """Bytes of ``images`` before and after :func:`shrink_image`, and (with a repository) their embeddings' cosine."""
    if not images:
        raise BenchError("shrink_effect needs at least one image")
    shrunk = [shrink_image(data) for data in images]
    fidelity = None
    if repository is not None:
        runtime = OrtRuntime.from_repository(repository, threads=threads)
        fidelity = _fidelity(runtime, [image_pixels(data) for data in shrunk], [image_pixels(data) for data in images])
    largest = max(range(len(images)), key=lambda index: len(images[index]))
    return ShrinkEffect(
        bytes_before=float(np.mean([len(data) for data in images])),
        bytes_after=float(np.mean([len(data) for data in shrunk])),
        largest_before=len(images[largest]),
        largest_after=len(shrunk[largest]),
        fidelity=fidelity,
    )


def _fidelity(runtime: OrtRuntime, pixels: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> Fidelity:
    def embed(each: Sequence[np.ndarray]) -> np.ndarray:
        prepared = stack_frames([frame[np.newaxis] for frame in each])
        vectors = runtime.encode_image(prepared.pixel_values, prepared.frame_mask)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    vectors, references = embed(pixels), embed(reference)
    cosines = np.sum(vectors * references, axis=1)
    centred = unrelated = None
    if len(references) > 1:
        middle = references.mean(axis=0)
        centred = float(_cosines(vectors - middle, references - middle).mean())
        unrelated = float(_cosines(references - middle, np.roll(references, 1, axis=0) - middle).mean())
    return Fidelity(
        photos=len(pixels),
        mean=float(cosines.mean()),
        minimum=float(cosines.min()),
        centred=centred,
        unrelated=unrelated,
    )


def _cosines(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    return np.sum(first * second, axis=1) / (np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1))


def format_preprocessing(
    timings: Sequence[PreprocessTiming], fidelity: Fidelity | None = None, shrink: ShrinkEffect | None = None
) -> str:
    lines = [
        "| image | bytes | full decode ms | at scale ms | speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    for timing in timings:
        lines.append(
            f"| {timing.name} | {timing.size_bytes:,} | {timing.full_ms:.1f} | {timing.scaled_ms:.1f} | "
            f"{timing.speedup:.2f}× |"
        )
    if fidelity is not None:
        lines.append(
            f"\nimage embeddings at scale vs full decode, {fidelity.photos} sample photos: "
            f"mean cosine {fidelity.mean:.5f}, min {fidelity.minimum:.5f}{_against(fidelity)}"
        )
    if shrink is not None:
        line = (
            f"client shrink_images: mean {shrink.bytes_before / 1e6:.2f} MB sent as {shrink.bytes_after / 1e3:.1f} KB "
            f"(the largest, {shrink.largest_before / 1e6:.2f} MB, as {shrink.largest_after / 1e3:.1f} KB)"
        )
        if shrink.fidelity is not None:
            line += (
                f"; image embeddings shrunk vs original, {shrink.fidelity.photos} photos: mean cosine "
                f"{shrink.fidelity.mean:.5f}, min {shrink.fidelity.minimum:.5f}{_against(shrink.fidelity)}"
            )
        lines.append(line)
    return "\n".join(lines)


def _against(fidelity: Fidelity) -> str:
    if fidelity.centred is None or fidelity.unrelated is None:
        return ""
    return f"; centred {fidelity.centred:.4f} (different photos, centred: {fidelity.unrelated:.4f})"
