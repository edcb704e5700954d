"""Sample videos: frames drawn by a callable, encoded with PyAV, byte for byte reproducible.

:func:`encode_video` is to videos what the sample generator's drawings are to images: a
frame-drawing callable (frame index in, a Pillow picture out) and a :class:`VideoSpec`
(size, frame rate, length, keyframe interval, :class:`VideoEncoding`) make the bytes of an
H.264 MP4 or a VP9 WebM. The encoders run single-threaded with fixed settings, so the same
drawing and spec give the same bytes on every run of the same PyAV build: tests and sample
corpora can rely on a video's content, and a long video stays small when its frames change
little and its keyframes are far apart.
"""

from __future__ import annotations

import enum
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
from PIL import Image

logger = logging.getLogger("postsim")

FrameDrawer = Callable[[int], Image.Image]
"""Draws frame ``i`` of a video: a picture of the video's size (any mode; it is converted to RGB)."""


class VideoEncoding(enum.Enum):
    """A codec in its usual container, as PyAV names them."""

    H264_MP4 = ("libx264", "mp4", {"preset": "veryfast", "tune": "stillimage", "x264-params": "scenecut=0"})
    VP9_WEBM = ("libvpx-vp9", "webm", {"deadline": "realtime", "cpu-used": "8", "row-mt": "0", "lag-in-frames": "0"})

    @property
    def encoder(self) -> str:
        return str(self.value[0])

    @property
    def container(self) -> str:
        """PyAV's output format name, which is also the file extension."""
        return str(self.value[1])

    @property
    def options(self) -> dict[str, str]:
        """Encoder options: fast, and nothing that depends on the machine (threads are set to 1 apart)."""
        options: dict[str, str] = self.value[2]
        return dict(options)


@dataclass(frozen=True, kw_only=True)
class VideoSpec:
    """What :func:`encode_video` makes: its size, frame rate, length and keyframe spacing."""

    size: tuple[int, int] = (64, 48)
    """Width and height in pixels; both even (4:2:0 chroma halves them)."""
    frame_rate: int = 1
    """Frames per second."""
    frames: int = 10
    """Number of frames; the video lasts ``frames / frame_rate`` seconds."""
    keyframe_interval: int = 60
    """Frames from one keyframe to the next, exactly (no extra keyframes at scene cuts): far apart keeps a
    long, still video small."""
    encoding: VideoEncoding = VideoEncoding.H264_MP4
    index_first: bool = False
    """MP4 only: the index (``moov``) before the frames, as in files made for streaming."""

    def __post_init__(self) -> None:
        if self.index_first and self.encoding is not VideoEncoding.H264_MP4:
            raise ValueError(
                f"VideoSpec.index_first is for MP4; {self.encoding.container} keeps its index after the frames"
            )
        width, height = self.size
        if width < 2 or height < 2 or width % 2 or height % 2:
            raise ValueError(f"VideoSpec.size must be even and at least 2×2, got {width}×{height}")
        for name in ("frame_rate", "frames", "keyframe_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"VideoSpec.{name} must be at least 1, got {getattr(self, name)}")

    @property
    def duration_s(self) -> float:
        return self.frames / self.frame_rate


def encode_video(draw: FrameDrawer, spec: VideoSpec = VideoSpec()) -> bytes:
    """The encoded video whose frame ``i`` is ``draw(i)``, for ``i`` in ``range(spec.frames)``.

    Raises ValueError when a drawn frame is not of ``spec.size``.
    """
    options = {"fflags": "+bitexact"} | ({"movflags": "+faststart"} if spec.index_first else {})
    # Through a file: moving the index to the front rewrites the file, which PyAV cannot do in memory.
    with tempfile.TemporaryDirectory(prefix="postsim-video-") as folder:
        path = Path(folder) / f"video.{spec.encoding.container}"
        _encode_into(path, draw, spec, options)
        data = path.read_bytes()
    logger.debug("encoded %d frames of %s as %s: %d bytes", spec.frames, spec.size, spec.encoding.name, len(data))
    return data


def _encode_into(path: Path, draw: FrameDrawer, spec: VideoSpec, options: dict[str, str]) -> None:
    with av.open(str(path), "w", format=spec.encoding.container, options=options) as container:
        stream = container.add_stream(spec.encoding.encoder, Fraction(spec.frame_rate), spec.encoding.options)
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height = spec.size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = spec.keyframe_interval
        stream.codec_context.thread_count = 1  # the same bytes whatever the machine's cores
        for index in range(spec.frames):
            picture = draw(index)
            if picture.size != spec.size:
                raise ValueError(f"frame {index} is {picture.width}×{picture.height}, the video is {spec.size}")
            frame = av.VideoFrame.from_image(picture.convert("RGB"))
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
