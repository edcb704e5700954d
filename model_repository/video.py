"""Server-side video preprocessing: encoded video bytes in, F sampled frames as normalised pixels out.

A post's visual may be a video. :func:`sniff_video` tells one from a still image by its
bytes: MP4/MOV (ISO base media), WebM/Matroska (EBML), and GIF or WebP that hold more than
one frame. :func:`sample_video` then refuses, from the container's metadata and before any
frame is decoded, a video over the :class:`VideoLimits` (bytes, duration, frame size,
frame rate), in a format or codec postsim does not decode, or without a video stream; it
takes F frames spread evenly over the duration and turns each into pixels exactly as an
image is (:func:`~postsim.model_repository.preprocessing.image_to_pixels`). Every refusal
is an :class:`~postsim.core.errors.InvalidPostError` that names the ``IMAGE``
input, like the image path's.

How frames are found: the frame shown at each of the F timestamps ``(k + ½) · duration / F``
is decoded by seeking to the keyframe at or before it and decoding forward to it, or, when
the previous sample left the decoder in the same group of pictures, by decoding on from
there. The cost depends on F, the frame size and the keyframe spacing, never on the
video's length. Files are demuxed by FFmpeg (PyAV) from memory, with the demuxer fixed to
the sniffed container and no other file or URL opened; FFmpeg's stream probing is told to
decode nothing (``skip_frame=all``), and the decoder refuses any frame over the pixel
limit (``max_pixels``), so a stream that grows past its header is stopped too.

Animated GIF and WebP go through this path as well, decoded by Pillow (FFmpeg does not
decode animated WebP): their frames are composited one after the other, so sampling visits
every frame up to the last one taken, and their limit is the pixels that costs (frames ×
canvas), which the header tells. A GIF or WebP of one frame stays an image.

Time: every call has a wall-clock budget (``VideoLimits.max_decode_seconds``), checked
between packets and between frames. One FFmpeg call (opening the file, seeking, decoding
one frame) cannot be interrupted: PyAV's open and read timeouts work through FFmpeg's
interrupt callback, which FFmpeg does not consult while it reads a file from memory. What
one call may cost is bounded by what is checked before it instead: an MP4's header by the
sample count its boxes list (read without FFmpeg, :mod:`.iso_media`), a frame by the pixel
limit, everything by the byte limit. A caller that must bound a single call by the clock
too runs this in a process it can kill.
"""

from __future__ import annotations

import bisect
import enum
import io
import logging
import math
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import NamedTuple, NoReturn

import av
import numpy as np
from av.container import InputContainer
from av.video.frame import VideoFrame
from av.video.stream import VideoStream
from PIL import Image, UnidentifiedImageError

from postsim.core.errors import InvalidPostError, SettingsError
from postsim.model_repository import contract
from postsim.model_repository.contract import IMAGE, IMAGE_SIZE
from postsim.model_repository.iso_media import iso_tracks
from postsim.model_repository.preprocessing import (
    PILLOW_ERRORS,
    ImageLimits,
    decompression_bombs_refused,
    image_to_pixels,
    require_truncated_images_refused,
)

logger = logging.getLogger("postsim")


SUPPORTED_CODECS = {"h264": "H.264", "hevc": "H.265", "vp8": "VP8", "vp9": "VP9", "av1": "AV1"}
"""FFmpeg decoder names postsim decodes video streams with, and their names in messages."""
_SUPPORTED_NAMES = "MP4, MOV or WebM (H.264, H.265, VP8, VP9 or AV1), or an animated GIF or WebP"


class VideoFormat(enum.Enum):
    """A container of moving pictures, recognised from its bytes; the value is its name in messages."""

    MP4 = "MP4/MOV"
    WEBM = "WebM/Matroska"
    GIF = "animated GIF"
    WEBP = "animated WebP"

    @property
    def demuxer(self) -> str | None:
        """FFmpeg's demuxer for the format; None for the animations, which Pillow decodes."""
        return {VideoFormat.MP4: "mov", VideoFormat.WEBM: "matroska"}.get(self)


@dataclass(frozen=True, kw_only=True)
class VideoLimits:
    """What one video may cost the server; all but the clock are checked before a frame is decoded."""

    max_bytes: int = contract.MAX_VIDEO_BYTES
    """Largest encoded video accepted."""
    max_duration_seconds: float = contract.MAX_VIDEO_SECONDS
    """Longest duration accepted, from the container's header."""
    max_pixels: int = contract.MAX_VIDEO_PIXELS
    """Largest frame (width × height) accepted: 4K UHD, in either orientation."""
    max_frame_rate: float = contract.MAX_VIDEO_FRAME_RATE
    """Highest average frame rate accepted (frames per second)."""
    max_animation_pixels: int = contract.MAX_ANIMATION_PIXELS
    """Largest frames × canvas pixels of an animated GIF or WebP (all of which sampling may decode)."""
    max_decode_seconds: float = contract.VIDEO_DECODE_SECONDS
    """Wall-clock budget of one video, from opening it to its last sampled frame."""

    def __post_init__(self) -> None:
        for name in (
            "max_bytes",
            "max_duration_seconds",
            "max_pixels",
            "max_frame_rate",
            "max_animation_pixels",
            "max_decode_seconds",
        ):
            if not getattr(self, name) > 0:
                raise SettingsError(f"VideoLimits.{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> VideoLimits:
        """The limits a ``preprocess_image`` config carries (``contract.config_parameters`` of it)."""
        return cls(
            max_bytes=contract.MAX_VIDEO_BYTES_PARAMETER.read(parameters),
            max_duration_seconds=contract.MAX_VIDEO_SECONDS_PARAMETER.read(parameters),
            max_pixels=contract.MAX_VIDEO_PIXELS_PARAMETER.read(parameters),
            max_frame_rate=contract.MAX_VIDEO_FRAME_RATE_PARAMETER.read(parameters),
            max_animation_pixels=contract.MAX_ANIMATION_PIXELS_PARAMETER.read(parameters),
            max_decode_seconds=contract.VIDEO_DECODE_SECONDS_PARAMETER.read(parameters),
        )


DEFAULT_VIDEO_LIMITS = VideoLimits()


@dataclass(frozen=True, kw_only=True)
class VideoSampling:
    """How a video becomes frames."""

    frames: int = contract.VIDEO_FRAMES
    """Frames sampled, F: the frames shown at the centres of F equal slices of the duration."""
    decoder_threads: int = 1
    """FFmpeg decoder threads per video (slice threading above 1; 0 is one per core).

    One is the cheapest per post: the server decodes posts in parallel in its model
    instances, and extra threads per video trade CPU for latency (not yet measured here).
    """

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise SettingsError(f"VideoSampling.frames must be at least 1, got {self.frames}")
        if self.decoder_threads < 0:
            raise SettingsError(
                f"VideoSampling.decoder_threads must be 0 (one per core) or more, got {self.decoder_threads}"
            )

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> VideoSampling:
        """The sampling a ``preprocess_image`` config sets (its ``video_frames``)."""
        return cls(frames=contract.VIDEO_FRAMES_PARAMETER.read(parameters))


DEFAULT_VIDEO_SAMPLING = VideoSampling()


class SampledFrames(NamedTuple):
    """A video's frames ready for the image encoder; unpacks as ``pixels, used``."""

    pixel_values: np.ndarray
    """float32 [F, 3, 224, 224]: the sampled frames in time order; rows from ``used`` on are zeros."""
    used: int
    """Distinct frames sampled, 1 to F: fewer than F when the video has fewer frames than F."""


@dataclass(frozen=True, kw_only=True)
class VideoInfo:
    """What a video's header says, as checked against the limits."""

    format: VideoFormat
    codec: str
    width: int
    height: int
    duration_seconds: float | None
    """None when the header does not say (animations: Pillow knows it only by visiting every frame)."""
    frame_rate: float | None
    """Average frames per second; None when the header does not say (animations)."""
    frame_count: int | None
    start_seconds: float = 0.0
    """Presentation time of the first frame."""


# --- Recognising a video ------------------------------------------------------------------

_EBML_MAGIC = b"\x1a\x45\xdf\xa3"
_QUICKTIME_FIRST_BOXES = frozenset({b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"})
"""Top-level boxes a QuickTime file may start with when it has no ``ftyp``."""
_IMAGE_BRANDS = frozenset({b"mif1", b"msf1", b"miaf", b"heic", b"heix", b"heim", b"heis", b"hevc", b"avif", b"avis"})
"""Major brands of ISO media images and image sequences (HEIF, AVIF): not videos postsim decodes."""
_WEBP_ANIMATION_FLAG = 0x02
_UNREADABLE_IMAGE: tuple[type[Exception], ...] = (UnidentifiedImageError, *PILLOW_ERRORS)
"""What Pillow raises on a file it cannot identify or read."""
_UNOPENABLE_IMAGE: tuple[type[Exception], ...] = (*_UNREADABLE_IMAGE, Image.DecompressionBombError)


def sniff_video(data: bytes) -> VideoFormat | None:
    """The video format of ``data`` from its first bytes, or None for anything else (a still image).

    HEIF and AVIF share MP4's box structure but are images: their major brand says so and
    they are left to the image path (which refuses them by name). A GIF counts as a video when it holds a second frame, a
    WebP when its header has the animation flag.
    """
    if data[4:8] == b"ftyp":
        return None if data[8:12] in _IMAGE_BRANDS else VideoFormat.MP4
    if data[4:8] in _QUICKTIME_FIRST_BOXES:
        return VideoFormat.MP4
    if data[:4] == _EBML_MAGIC:
        return VideoFormat.WEBM
    if data[:4] == b"RIFF" and data[8:16] == b"WEBPVP8X" and len(data) > 20:
        return VideoFormat.WEBP if data[20] & _WEBP_ANIMATION_FLAG else None
    if data[:4] == b"GIF8":
        return VideoFormat.GIF if _gif_is_animated(data) else None
    return None


def _gif_is_animated(data: bytes) -> bool:
    """Whether a GIF holds a second frame; a GIF Pillow cannot read is left to the image path, which says why."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=("GIF",)) as image:
                return bool(getattr(image, "is_animated", False))
    except _UNOPENABLE_IMAGE:
        return False


# --- Sampling ---------------------------------------------------------------------------


def sample_video(
    data: bytes, sampling: VideoSampling = DEFAULT_VIDEO_SAMPLING, limits: VideoLimits = DEFAULT_VIDEO_LIMITS
) -> SampledFrames:
    """``sampling.frames`` frames spread evenly over a video, as normalised pixels for the image encoder.

    Raises InvalidPostError naming ``IMAGE`` for data that is not a video postsim decodes,
    a video over a limit, a truncated or corrupt one, one without a video stream, and one
    that takes longer than ``limits.max_decode_seconds``.
    """
    pictures = decode_video_frames(data, sampling, limits)
    pixels = np.zeros((sampling.frames, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for row, picture in enumerate(pictures):
        pixels[row] = image_to_pixels(picture)
    return SampledFrames(pixels, len(pictures))


def decode_video_frames(
    data: bytes, sampling: VideoSampling = DEFAULT_VIDEO_SAMPLING, limits: VideoLimits = DEFAULT_VIDEO_LIMITS
) -> list[Image.Image]:
    """The distinct frames shown at ``sampling.frames`` evenly spread times, upright, in time order.

    :func:`sample_video` without the pixel preparation; it raises the same errors.
    """
    if len(data) > limits.max_bytes:
        raise InvalidPostError(
            f"{IMAGE.name}: video of {len(data):,} bytes is over the limit of {limits.max_bytes:,} bytes"
        )
    video_format = sniff_video(data)
    if video_format is None:
        raise InvalidPostError(f"{IMAGE.name}: not a video postsim decodes; send {_SUPPORTED_NAMES}")
    sampler = _AnimationSampler if video_format.demuxer is None else _ContainerSampler
    return sampler(data, video_format, limits, _Deadline(limits.max_decode_seconds)).sample(sampling)


def sample_times(start: float, duration: float, frames: int) -> list[float]:
    """The centres of ``frames`` equal slices of ``[start, start + duration)``."""
    return [start + (index + 0.5) * duration / frames for index in range(frames)]


def check_limits(info: VideoInfo, limits: VideoLimits) -> None:
    """Raise InvalidPostError naming the first limit the header says ``info``'s video is over."""
    if info.width <= 0 or info.height <= 0:
        raise InvalidPostError(
            f"{IMAGE.name}: {info.format.value} header gives no frame size ({info.width}×{info.height})"
        )
    _check_pixels(info.width, info.height, limits, f"{info.format.value} frames are")
    if info.duration_seconds is not None:
        _check_duration(info.duration_seconds, limits)
    if info.frame_rate is not None and info.frame_rate > limits.max_frame_rate:
        raise InvalidPostError(
            f"{IMAGE.name}: video has {info.frame_rate:,.4g} frames/s, over the limit of "
            f"{limits.max_frame_rate:,.4g} frames/s"
        )


def _check_pixels(width: int, height: int, limits: VideoLimits, claim: str) -> None:
    if width * height > limits.max_pixels:
        raise InvalidPostError(
            f"{IMAGE.name}: {claim} {width}×{height} = {width * height:,} pixels, over the limit of "
            f"{limits.max_pixels:,} pixels"
        )


def _check_duration(seconds: float, limits: VideoLimits) -> None:
    if seconds > limits.max_duration_seconds:
        raise InvalidPostError(
            f"{IMAGE.name}: video is {_seconds(seconds)} long, over the limit of "
            f"{_seconds(limits.max_duration_seconds)}"
        )


def _seconds(value: float) -> str:
    """2,400 s, 9.5 s, 0.04 s: whole seconds from 100 s up, three significant digits below."""
    return f"{value:,.0f} s" if value >= 100 else f"{value:.3g} s"


class _Deadline:
    """The wall-clock budget of one video."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def elapsed(self) -> float:
        return time.monotonic() - (self.end - self.seconds)

    def check(self) -> None:
        if time.monotonic() > self.end:
            raise self.error()

    def error(self) -> InvalidPostError:
        return InvalidPostError(
            f"{IMAGE.name}: decoding the video took longer than the limit of {self.seconds:g} s; "
            "send a shorter, smaller or less heavily encoded video"
        )


# --- Containers FFmpeg demuxes (MP4/MOV, WebM/Matroska) -----------------------------------

_PROBE_OPTIONS = {"skip_frame": "all"}
"""Codec options while FFmpeg probes the streams: read the headers, decode no frame."""


def _refuse_other_files(url: str, flags: int, options: dict[str, str]) -> NoReturn:
    """PyAV's io_open hook: a video posted as bytes may not make FFmpeg open any file or URL."""
    raise PermissionError(f"a posted video may not open other files ({url})")


@dataclass(frozen=True)
class _Sampler:
    """Samples one video of a known format within its limits and time budget."""

    data: bytes
    format: VideoFormat
    limits: VideoLimits
    deadline: _Deadline

    def sample(self, sampling: VideoSampling) -> list[Image.Image]:
        raise NotImplementedError


class _ContainerSampler(_Sampler):
    def sample(self, sampling: VideoSampling) -> list[Image.Image]:
        self._check_track_headers()
        try:
            container = self._open()
        except av.error.FFmpegError as error:
            raise self._translate(error) from None
        try:
            with container:
                stream = self._video_stream(container)
                info = self._info(container, stream)
                check_limits(info, self.limits)
                walker = _FrameWalker(
                    container,
                    stream,
                    info,
                    self._time_base(stream),
                    self.limits,
                    self.deadline,
                    sampling.decoder_threads,
                )
                assert info.duration_seconds is not None  # _info refuses a header without one
                pictures = walker.frames_at(sample_times(info.start_seconds, info.duration_seconds, sampling.frames))
                logger.debug(
                    "%s: %d frames of %s %s %d×%d, %.3g s: %d decoded, %.3g s",
                    IMAGE.name,
                    len(pictures),
                    info.format.value,
                    info.codec,
                    info.width,
                    info.height,
                    info.duration_seconds,
                    walker.decoded,
                    self.deadline.elapsed(),
                )
                return pictures
        except av.error.FFmpegError as error:
            raise self._translate(error) from None

    def _open(self) -> InputContainer:
        # No timeout: FFmpeg's interrupt callback, which PyAV's timeout sets, is not consulted
        # while it reads a file from memory (measured: a 1 ns timeout interrupts nothing).
        return av.open(
            io.BytesIO(self.data), "r", format=self.format.demuxer, options=_PROBE_OPTIONS, io_open=_refuse_other_files
        )

    def _check_track_headers(self) -> None:
        """Refuse, before FFmpeg parses it, an MP4 whose video track headers are over a limit.

        FFmpeg indexes every sample of an MP4 while opening it, and reports the frame size
        of the stream's own header, not the size a track header may claim.
        """
        if self.format is not VideoFormat.MP4:
            return
        most_frames = int(self.limits.max_duration_seconds * self.limits.max_frame_rate)
        for track in iso_tracks(self.data):
            if not track.is_video:
                continue
            _check_pixels(track.width, track.height, self.limits, f"{self.format.value} track header says")
            if track.duration_seconds is not None:
                _check_duration(track.duration_seconds, self.limits)
            if track.sample_count is not None and track.sample_count > most_frames:
                raise InvalidPostError(
                    f"{IMAGE.name}: {self.format.value} track header lists {track.sample_count:,} frames, over the "
                    f"{most_frames:,} that the limits allow ({_seconds(self.limits.max_duration_seconds)} at "
                    f"{self.limits.max_frame_rate:g} frames/s)"
                )

    def _video_stream(self, container: InputContainer) -> VideoStream:
        streams = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
        if not streams:
            kinds = ", ".join(sorted({str(s.type) for s in container.streams})) or "no streams"
            raise InvalidPostError(
                f"{IMAGE.name}: {self.format.value} has no video stream (it has {kinds}); send a video or an image"
            )
        stream = streams[0]
        codec = stream.codec_context.name if stream.codec_context is not None else None
        if codec not in SUPPORTED_CODECS:
            raise InvalidPostError(
                f"{IMAGE.name}: {self.format.value} video codec {codec or 'unknown'} is not supported; "
                f"send {_SUPPORTED_NAMES}"
            )
        return stream

    def _time_base(self, stream: VideoStream) -> Fraction:
        if not stream.time_base:
            raise InvalidPostError(f"{IMAGE.name}: corrupt {self.format.value}: its video stream has no time base")
        return stream.time_base

    def _info(self, container: InputContainer, stream: VideoStream) -> VideoInfo:
        time_base = self._time_base(stream)
        if stream.duration is not None:
            duration = float(stream.duration * time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = math.nan
        if not math.isfinite(duration) or duration <= 0:
            raise InvalidPostError(
                f"{IMAGE.name}: {self.format.value} header gives no duration; send a video whose header has one"
            )
        rate = stream.average_rate or stream.guessed_rate
        return VideoInfo(
            format=self.format,
            codec=stream.codec_context.name,
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            duration_seconds=duration,
            frame_rate=float(rate) if rate else None,
            frame_count=stream.frames or None,
            start_seconds=float(stream.start_time * time_base) if stream.start_time is not None else 0.0,
        )

    def _translate(self, error: Exception) -> InvalidPostError:
        reason = getattr(error, "strerror", None) or str(error)
        return InvalidPostError(f"{IMAGE.name}: truncated or corrupt {self.format.value}: {reason}")


class _FrameWalker:
    """Decodes the frames shown at increasing timestamps, seeking only when that saves decoding.

    Between a keyframe and the frame wanted, frames that no other frame refers to and that
    end before the wanted time are not decoded at all (FFmpeg's ``skip_frame=NONREF``).
    """

    def __init__(
        self,
        container: InputContainer,
        stream: VideoStream,
        info: VideoInfo,
        time_base: Fraction,
        limits: VideoLimits,
        deadline: _Deadline,
        threads: int,
    ) -> None:
        self.container = container
        self.stream = stream
        self.info = info
        self.time_base = time_base
        self.limits = limits
        self.deadline = deadline
        # Slice threads share the work of each frame (of a stream encoded in several slices);
        # frame threads would hold frames in flight, which each seek throws away.
        stream.thread_type = "SLICE" if threads != 1 else "NONE"
        stream.thread_count = threads
        stream.codec_context.options = {"max_pixels": str(limits.max_pixels)}
        self.frames: Iterator[VideoFrame] | None = None
        self.target = 0
        self.shown: VideoFrame | None = None
        """The last frame decoded at or before the current target, since the last seek."""
        self.pending: VideoFrame | None = None
        """A frame decoded past the previous target, not yet looked at for the next."""
        self.decoded = 0

    def frames_at(self, seconds: list[float]) -> list[Image.Image]:
        """The distinct frames shown at ``seconds`` (increasing), as upright pictures."""
        pictures: list[Image.Image] = []
        last_pts: int | None = None
        frame_span = 1 / self.info.frame_rate if self.info.frame_rate else 0.0
        for second in seconds:
            frame = self._frame_at(int(second / self.time_base))
            if frame is None:
                raise self._truncated("it holds no frame")
            shown_until = float((_pts(frame) + (frame.duration or 0)) * self.time_base)
            # The last frame lasts to the end; one that ends over a frame before the time is not the last.
            if shown_until + 2 * frame_span < second:
                raise self._truncated(f"its frames end at {_seconds(shown_until)}")
            if frame.pts == last_pts:
                continue  # a video with fewer frames than samples: each frame counts once
            last_pts = frame.pts
            pictures.append(self._picture(frame))
        return pictures

    def _truncated(self, what: str) -> InvalidPostError:
        return InvalidPostError(
            f"{IMAGE.name}: truncated {self.info.format.value}: its header says "
            f"{_seconds(self.info.duration_seconds or 0)} and {what}"
        )

    def _frame_at(self, target: int) -> VideoFrame | None:
        """The frame shown at ``target`` (stream time base); None when the stream ends first."""
        if self._must_seek(target):
            try:
                self.container.seek(target, stream=self.stream, backward=True)
            except av.error.FFmpegError:  # FFmpeg says only "-1" (EPERM) when it finds no place
                raise InvalidPostError(
                    f"{IMAGE.name}: truncated or corrupt {self.info.format.value}: cannot seek to "
                    f"{_seconds(float(target * self.time_base))} in it"
                ) from None
            self.frames = self._decode()
            self.shown = self.pending = None
        assert self.frames is not None
        self.target = target
        while True:
            self.deadline.check()
            frame, self.pending = (self.pending, None) if self.pending is not None else (next(self.frames, None), None)
            if frame is None:
                return self.shown
            if frame.pts is None:
                continue
            if frame.pts > target:
                if self.shown is None:
                    self.shown = frame  # the first frame after the seek is already past the time
                    return frame
                self.pending = frame
                return self.shown
            self.shown = frame
            if frame.duration and frame.pts + frame.duration > target:
                return frame

    def _decode(self) -> Iterator[VideoFrame]:
        """Frames from the current position, not decoding those that cannot be shown at the target."""
        context = self.stream.codec_context
        for packet in self.container.demux(self.stream):
            self.deadline.check()
            ends_before = packet.pts is not None and packet.duration and packet.pts + packet.duration <= self.target
            context.skip_frame = "NONREF" if ends_before else "DEFAULT"
            for frame in packet.decode():
                self.decoded += 1
                self._check_size(frame)
                yield frame

    def _must_seek(self, target: int) -> bool:
        """Seek unless the index shows no keyframe between the decoder's position and ``target``.

        The index must hold every frame (MP4's does) or reach ``target``: it may hold only
        part of the stream (Matroska's cues hold keyframes only, read at the first seek).
        Index timestamps are decoding times, a few frames off the presentation times with
        B-frames, which makes this a cost estimate, not a matter of which frame is found.
        """
        position = self.pending.pts if self.pending is not None else self.shown.pts if self.shown is not None else None
        if self.frames is None or position is None or target < position:
            return True
        entries = self.stream.index_entries
        complete = bool(self.stream.frames) and len(entries) >= self.stream.frames
        if not len(entries) or not (complete or entries[len(entries) - 1].timestamp >= target):
            return True
        keyframes = [entry.timestamp for entry in entries if entry.is_keyframe]
        after = bisect.bisect_right(keyframes, position)
        return after < len(keyframes) and keyframes[after] <= target

    def _check_size(self, frame: VideoFrame) -> None:
        if frame.width * frame.height > self.limits.max_pixels:
            raise InvalidPostError(
                f"{IMAGE.name}: a frame of the video is {frame.width}×{frame.height}, over the limit of "
                f"{self.limits.max_pixels:,} pixels"
            )

    def _picture(self, frame: VideoFrame) -> Image.Image:
        picture: Image.Image = frame.to_image()
        turn = _ROTATIONS.get(frame.rotation % 360)
        return picture.transpose(turn) if turn is not None else picture


def _pts(frame: VideoFrame) -> int:
    """A decoded frame's presentation time; the walker drops frames without one."""
    assert frame.pts is not None
    return frame.pts


_ROTATIONS = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}
"""Pillow's turn for a frame's display-matrix rotation (degrees counter-clockwise, as PyAV reports it)."""


# --- Animations Pillow decodes (GIF, WebP) ----------------------------------------------


class _AnimationSampler(_Sampler):
    def sample(self, sampling: VideoSampling) -> list[Image.Image]:
        require_truncated_images_refused()
        pillow_format = "GIF" if self.format is VideoFormat.GIF else "WEBP"
        with decompression_bombs_refused(
            ImageLimits(max_bytes=self.limits.max_bytes, max_pixels=self.limits.max_pixels)
        ):
            try:
                with Image.open(io.BytesIO(self.data), formats=(pillow_format,)) as image:
                    return self._sample(image, sampling.frames)
            except InvalidPostError:
                raise
            except _UNREADABLE_IMAGE as error:
                raise InvalidPostError(f"{IMAGE.name}: truncated or corrupt {self.format.value}: {error}") from None

    def _sample(self, image: Image.Image, frames: int) -> list[Image.Image]:
        count = int(getattr(image, "n_frames", 1))
        width, height = image.size
        check_limits(
            VideoInfo(
                format=self.format,
                codec=self.format.name.lower(),
                width=width,
                height=height,
                duration_seconds=None,  # the pixel budget below bounds the cost instead
                frame_rate=None,
                frame_count=count,
            ),
            self.limits,
        )
        if count * width * height > self.limits.max_animation_pixels:
            raise InvalidPostError(
                f"{IMAGE.name}: {self.format.value} of {count:,} frames of {width}×{height} is "
                f"{count * width * height:,} pixels, over the limit of {self.limits.max_animation_pixels:,}"
            )
        # By frame number: the frame durations are known only by visiting every frame.
        wanted = sorted({min(int((index + 0.5) * count / frames), count - 1) for index in range(frames)})
        pictures = []
        for index in wanted:
            while image.tell() < index:  # one frame at a time: each is composited on the one before
                self.deadline.check()
                image.seek(image.tell() + 1)
            self.deadline.check()
            image.load()
            pictures.append(image.copy())
        return pictures
