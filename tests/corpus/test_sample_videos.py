"""The sample-video writer: what it encodes, and that it encodes it the same way every time."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from postsim.corpus.sample_videos import VideoEncoding, VideoSpec, encode_video


def gradient(index: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    width, height = size
    ramp = np.broadcast_to(np.linspace(0, 255, width, dtype=np.float32), (height, width))
    pixels = np.stack([ramp, np.full((height, width), index * 8.0), 255 - ramp], -1)
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.mark.parametrize(
    ("encoding", "codec", "format_name"),
    [(VideoEncoding.H264_MP4, "h264", "mp4"), (VideoEncoding.VP9_WEBM, "vp9", "webm")],
)
def test_the_video_has_the_spec_s_codec_size_rate_and_frames(
    encoding: VideoEncoding, codec: str, format_name: str
) -> None:
    spec = VideoSpec(size=(64, 48), frame_rate=4, frames=20, keyframe_interval=8, encoding=encoding)
    with av.open(io.BytesIO(encode_video(gradient, spec))) as container:
        stream = container.streams.video[0]
        assert format_name in container.format.name.split(",")
        assert (stream.codec_context.name, stream.codec_context.width, stream.codec_context.height) == (codec, 64, 48)
        assert stream.average_rate == Fraction(4)
        assert container.duration == 5_000_000  # 20 frames at 4 frames/s, in microseconds
        packets = list(container.demux(stream))
        keyframes = [packet.pts for packet in packets if packet.is_keyframe]
        frames = [frame for packet in packets for frame in packet.decode()]
    assert len(frames) == 20
    assert len(keyframes) == 3  # frames 0, 8 and 16
    # Lossy, but each frame is the one drawn: its green level tells the index.
    assert [round(float(frame.to_ndarray(format="rgb24")[:, :, 1].mean()) / 8) for frame in frames] == list(range(20))


@pytest.mark.parametrize("encoding", list(VideoEncoding))
def test_the_same_drawing_and_spec_give_the_same_bytes(encoding: VideoEncoding) -> None:
    spec = VideoSpec(frames=12, encoding=encoding)
    assert encode_video(gradient, spec) == encode_video(gradient, spec)


def test_an_mp4_can_have_its_index_first() -> None:
    data = encode_video(gradient, VideoSpec(frames=4, index_first=True))
    assert data.index(b"moov") < data.index(b"mdat")
    data = encode_video(gradient, VideoSpec(frames=4))
    assert data.index(b"mdat") < data.index(b"moov")


def test_a_frame_of_another_size_is_refused() -> None:
    with pytest.raises(ValueError, match=r"frame 0 is 32×32, the video is \(64, 48\)"):
        encode_video(lambda index: Image.new("RGB", (32, 32)), VideoSpec(frames=2))


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"size": (63, 48)}, "VideoSpec.size must be even"),
        ({"frames": 0}, "VideoSpec.frames must be at least 1"),
        ({"frame_rate": 0}, "VideoSpec.frame_rate must be at least 1"),
        ({"index_first": True, "encoding": VideoEncoding.VP9_WEBM}, "VideoSpec.index_first is for MP4"),
    ],
)
def test_specs_that_cannot_be_encoded_are_refused(options: dict[str, object], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        VideoSpec(**options)  # type: ignore[arg-type]
