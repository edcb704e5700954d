"""What a video post costs before the image encoder: sampling its frames, split into decoding and pixels.

:func:`measure_video_sampling` encodes each :class:`VideoCase` with the sample-video writer,
then samples it as the server does (:func:`~postsim.model_repository.video.sample_video`)
several times, and reports the median wall and CPU time of decoding (demuxing, seeking,
decoding, colour conversion: :func:`~postsim.model_repository.video.decode_video_frames`)
and of turning the frames into pixels
(:func:`~postsim.model_repository.preprocessing.image_to_pixels`). CPU time is the
process's, FFmpeg's threads included.

:func:`default_cases` are the figures the video work is judged by: a 10-second and a
30-minute video of the same small size (sampling seeks, so the long one should cost at most
3× the short one), and a 30-second 720p H.264 clip with a keyframe every 2 s, as phones
record.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from postsim.corpus.sample_videos import FrameDrawer, VideoSpec, encode_video
from postsim.model_repository.preprocessing import image_to_pixels
from postsim.model_repository.video import DEFAULT_VIDEO_SAMPLING, VideoLimits, VideoSampling, decode_video_frames

GRAIN = 8
"""Noise added to every pixel of the 720p clip (± this), so it compresses like camera footage."""


@dataclass(frozen=True, kw_only=True)
class VideoCase:
    name: str
    spec: VideoSpec
    draw: Callable[[VideoSpec], FrameDrawer]
    """Makes the frame drawer for the spec (drawing the backdrop once)."""


@dataclass(frozen=True, kw_only=True)
class VideoTiming:
    """Median cost of sampling one video, in milliseconds."""

    name: str
    spec: VideoSpec
    size_bytes: int
    frames_sampled: int
    decode_ms: float
    decode_cpu_ms: float
    pixels_ms: float
    pixels_cpu_ms: float

    @property
    def total_cpu_ms(self) -> float:
        return self.decode_cpu_ms + self.pixels_cpu_ms


def default_cases() -> list[VideoCase]:
    return [
        VideoCase(name="10 s, 64×48", spec=small_video(frames=10), draw=moving_disc),
        VideoCase(name="30 min, 64×48", spec=small_video(frames=1800), draw=moving_disc),
        VideoCase(
            name="30 s, 1280×720 H.264",
            spec=VideoSpec(size=(1280, 720), frame_rate=30, frames=900, keyframe_interval=60),
            draw=panning_scene,
        ),
    ]


def small_video(frames: int) -> VideoSpec:
    """64×48 at 1 frame/s with a keyframe a minute: 30 minutes of it take under 200 kB."""
    return VideoSpec(size=(64, 48), frame_rate=1, frames=frames, keyframe_interval=60)


def measure_video_sampling(
    cases: list[VideoCase],
    *,
    repeats: int = 5,
    sampling: VideoSampling = DEFAULT_VIDEO_SAMPLING,
    progress: Callable[[str], None] = lambda line: None,
) -> list[VideoTiming]:
    """Encode each case and time sampling it ``repeats`` times (after one untimed run)."""
    limits = VideoLimits(max_duration_seconds=max(case.spec.duration_s for case in cases) + 1)
    timings = []
    for case in cases:
        progress(f"encoding {case.name}")
        data = encode_video(case.draw(case.spec), case.spec)
        decode_video_frames(data, sampling, limits)  # warm: first-call imports and allocations
        runs = [_time_once(data, sampling, limits) for _ in range(repeats)]
        timing = VideoTiming(
            name=case.name,
            spec=case.spec,
            size_bytes=len(data),
            frames_sampled=len(decode_video_frames(data, sampling, limits)),
            decode_ms=statistics.median(run.decode_ms for run in runs),
            decode_cpu_ms=statistics.median(run.decode_cpu_ms for run in runs),
            pixels_ms=statistics.median(run.pixels_ms for run in runs),
            pixels_cpu_ms=statistics.median(run.pixels_cpu_ms for run in runs),
        )
        progress(f"{case.name}: {timing.decode_ms:.1f} ms decoding, {timing.pixels_ms:.1f} ms pixels")
        timings.append(timing)
    return timings


def format_table(timings: list[VideoTiming]) -> str:
    lines = [
        "| video | bytes | frames | decode ms | decode CPU ms | pixels ms | pixels CPU ms | CPU ms per post |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for timing in timings:
        lines.append(
            f"| {timing.name} | {timing.size_bytes:,} | {timing.frames_sampled} | {timing.decode_ms:.1f} | "
            f"{timing.decode_cpu_ms:.1f} | {timing.pixels_ms:.1f} | {timing.pixels_cpu_ms:.1f} | "
            f"{timing.total_cpu_ms:.1f} |"
        )
    return "\n".join(lines)


class _Run(NamedTuple):
    decode_ms: float
    decode_cpu_ms: float
    pixels_ms: float
    pixels_cpu_ms: float


def _time_once(data: bytes, sampling: VideoSampling, limits: VideoLimits) -> _Run:
    wall, cpu = time.perf_counter(), time.process_time()
    pictures = decode_video_frames(data, sampling, limits)
    decoded_wall, decoded_cpu = time.perf_counter(), time.process_time()
    for picture in pictures:
        image_to_pixels(picture)
    return _Run(
        decode_ms=(decoded_wall - wall) * 1000,
        decode_cpu_ms=(decoded_cpu - cpu) * 1000,
        pixels_ms=(time.perf_counter() - decoded_wall) * 1000,
        pixels_cpu_ms=(time.process_time() - decoded_cpu) * 1000,
    )


def moving_disc(spec: VideoSpec) -> FrameDrawer:
    """A disc circling over a flat backdrop: little changes from frame to frame."""
    width, height = spec.size

    def draw(index: int) -> Image.Image:
        picture = Image.new("RGB", spec.size, (40, 90, 160))
        angle = 2 * np.pi * index / 60
        x, y = width / 2 + width / 4 * np.cos(angle), height / 2 + height / 4 * np.sin(angle)
        radius = min(width, height) / 6
        ImageDraw.Draw(picture).ellipse((x - radius, y - radius, x + radius, y + radius), fill=(240, 200, 60))
        return picture

    return draw


def panning_scene(spec: VideoSpec, seed: int = 0) -> FrameDrawer:
    """A camera panning across a scene of shapes, a pixel a frame, with fresh grain on every frame."""
    width, height = spec.size
    rng = random.Random(seed)
    scene = Image.new("RGB", (width + spec.frames, height), (120, 170, 220))
    draw = ImageDraw.Draw(scene)
    for _ in range(60):
        x, y = rng.uniform(0, scene.width), rng.uniform(0, height)
        radius = rng.uniform(height / 30, height / 6)
        colour = (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255))
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
    backdrop = np.asarray(scene, dtype=np.int16)

    def frame(index: int) -> Image.Image:
        view = backdrop[:, index : index + width]
        grain = np.random.default_rng((seed, index)).integers(-GRAIN, GRAIN + 1, size=view.shape, dtype=np.int16)
        return Image.fromarray(np.clip(view + grain, 0, 255).astype(np.uint8))

    return frame
