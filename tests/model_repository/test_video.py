"""Video preprocessing: recognising videos, refusing them from their headers, sampling frames."""

from __future__ import annotations

import io
import logging
import re
import struct
from collections.abc import Callable

import av
import numpy as np
import pytest
from PIL import Image
from support import PALETTE, VIDEO_SIZE, audio_only_mp4, picture, tkhd_payload, with_track_header_size

from postsim.core.errors import InvalidPostError, SettingsError
from postsim.corpus.sample_videos import VideoEncoding, VideoSpec, encode_video
from postsim.model_repository.preprocessing import decode_image, image_to_pixels
from postsim.model_repository.video import (
    DEFAULT_VIDEO_LIMITS,
    VideoFormat,
    VideoLimits,
    VideoSampling,
    decode_video_frames,
    sample_times,
    sample_video,
    sniff_video,
)

SIZE = VIDEO_SIZE
LONG_VIDEO = VideoSpec(size=SIZE, frame_rate=1, frames=30 * 60, keyframe_interval=60)
"""30 minutes at 1 frame/s, a keyframe a minute: 175 kB."""
SHORT_VIDEO = VideoSpec(size=SIZE, frame_rate=1, frames=10, keyframe_interval=60)


def numbered(index: int) -> Image.Image:
    """Frame ``index`` of a video whose frames tell their number by their colour."""
    return picture(PALETTE[index % len(PALETTE)])


def frame_number(image: Image.Image) -> int:
    """Which ``numbered`` frame a decoded picture is, by the colour of its top-right corner."""
    corner = np.asarray(image.convert("RGB"), dtype=np.float32)[2:6, -6:-2].reshape(-1, 3).mean(axis=0)
    return int(np.argmin([np.abs(corner - np.array(colour)).sum() for colour in PALETTE]))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b)))


def encoded(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def animation(image_format: str, frames: int = 10, size: tuple[int, int] = SIZE) -> bytes:
    pictures = [picture(PALETTE[index % len(PALETTE)], size) for index in range(frames)]
    return encoded(pictures[0], image_format, save_all=True, append_images=pictures[1:], duration=100, loop=0)


def mpeg4_part2_mp4() -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=1)
        stream.width, stream.height = SIZE
        for index in range(3):
            frame = av.VideoFrame.from_image(numbered(index))
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def with_rotation_90_clockwise(data: bytes) -> bytes:
    """The MP4 with its track matrix saying 'turn 90° clockwise to display', as phones record portrait video."""
    edited = bytearray(data)
    offset = tkhd_payload(edited) + 40
    edited[offset : offset + 36] = struct.pack(">9i", 0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000)
    return bytes(edited)


@pytest.fixture(scope="module")
def long_video() -> bytes:
    return encode_video(numbered, LONG_VIDEO)


@pytest.fixture(scope="module")
def short_video() -> bytes:
    return encode_video(numbered, SHORT_VIDEO)


def decoded_count(caplog: pytest.LogCaptureFixture) -> int:
    """Frames decoded by the last sampling, from its debug line."""
    counts = [int(found) for found in re.findall(r": (\d+) decoded,", caplog.text)]
    assert counts, caplog.text
    return counts[-1]


# --- Recognising videos ---------------------------------------------------------------------


@pytest.mark.parametrize("encoding", list(VideoEncoding))
def test_containers_are_recognised_from_their_bytes(encoding: VideoEncoding) -> None:
    data = encode_video(numbered, VideoSpec(frames=2, encoding=encoding))
    expected = {VideoEncoding.H264_MP4: VideoFormat.MP4, VideoEncoding.VP9_WEBM: VideoFormat.WEBM}[encoding]
    assert sniff_video(data) is expected


def test_animations_are_videos_and_single_frames_are_images() -> None:
    assert sniff_video(animation("GIF")) is VideoFormat.GIF
    assert sniff_video(animation("WEBP")) is VideoFormat.WEBP
    assert sniff_video(animation("GIF", frames=1)) is None
    assert sniff_video(encoded(picture(PALETTE[0]), "WEBP", exif=b"Exif\0\0")) is None  # extended header, still
    assert sniff_video(encoded(picture(PALETTE[0]), "WEBP")) is None


def test_images_and_other_data_are_not_videos() -> None:
    assert sniff_video(encoded(picture(PALETTE[0]), "JPEG")) is None
    assert sniff_video(encoded(picture(PALETTE[0]), "PNG")) is None
    heic = b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(64)
    assert sniff_video(heic) is None
    assert sniff_video(b"") is None
    assert sniff_video(b"<html><body>not a video</body></html>") is None


def test_a_gif_pillow_will_not_open_is_left_to_the_image_path() -> None:
    huge = b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\x00\x00\x00" + b"\x2c" + bytes(9) + b"\x02\x00\x3b"
    assert sniff_video(huge) is None
    assert sniff_video(b"GIF89a") is None


def test_quicktime_without_a_file_type_box_is_recognised() -> None:
    assert sniff_video(b"\0\0\0\x08wide\0\0\x10\0mdat" + bytes(32)) is VideoFormat.MP4


# --- Frames ---------------------------------------------------------------------------------


def test_sample_times_are_the_centres_of_equal_slices() -> None:
    assert sample_times(0.0, 8.0, 4) == [1.0, 3.0, 5.0, 7.0]
    assert sample_times(2.0, 1.0, 1) == [2.5]


@pytest.mark.parametrize("encoding", list(VideoEncoding))
def test_the_frames_shown_at_the_sample_times_are_taken(encoding: VideoEncoding) -> None:
    data = encode_video(numbered, VideoSpec(frames=10, encoding=encoding))
    pictures = decode_video_frames(data)
    # 8 samples of 10 one-second frames, at 0.625 s, 1.875 s, ... 9.375 s.
    assert [frame_number(image) for image in pictures] == [0, 1, 3, 4, 5, 6, 8, 9]
    assert all(image.size == SIZE for image in pictures)


def test_a_video_of_one_picture_gives_that_picture_as_an_image_does() -> None:
    still = picture(PALETTE[3], (96, 64))
    pixels, used = sample_video(encode_video(lambda _: still, VideoSpec(size=(96, 64), frames=10)))
    assert used == 8
    expected = image_to_pixels(still)
    assert min(cosine(frame, expected) for frame in pixels) >= 0.99


def test_a_video_of_two_pictures_gives_each_for_its_half() -> None:
    first, second = picture(PALETTE[0]), picture(PALETTE[3])
    pixels, used = sample_video(encode_video(lambda index: first if index < 6 else second, VideoSpec(frames=12)))
    assert used == 8
    closer_to_first = [
        cosine(frame, image_to_pixels(first)) > cosine(frame, image_to_pixels(second)) for frame in pixels
    ]
    assert closer_to_first == [True] * 4 + [False] * 4


def test_a_one_frame_video_is_its_frame() -> None:
    pixels, used = sample_video(encode_video(numbered, VideoSpec(frames=1)), VideoSampling(frames=8))
    assert used == 1
    assert cosine(pixels[0], image_to_pixels(numbered(0))) >= 0.99
    assert not pixels[1:].any()


def test_a_video_shorter_than_the_samples_gives_each_frame_once() -> None:
    pictures = decode_video_frames(encode_video(numbered, VideoSpec(frames=3)), VideoSampling(frames=8))
    assert [frame_number(image) for image in pictures] == [0, 1, 2]


def test_frames_of_one_group_of_pictures_are_decoded_once(short_video: bytes, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="postsim")
    decode_video_frames(short_video)
    # One keyframe, ten frames: sampling decodes on from one sample to the next instead of seeking back.
    assert decoded_count(caplog) <= SHORT_VIDEO.frames


def test_a_long_video_is_sampled_by_seeking_not_decoded_whole(
    long_video: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="postsim")
    pictures = decode_video_frames(long_video, limits=VideoLimits(max_duration_seconds=3600))
    assert len(pictures) == 8
    # Each sample decodes at most from the keyframe before it: F groups of pictures, not 1800 frames.
    assert decoded_count(caplog) <= 8 * LONG_VIDEO.keyframe_interval
    expected = [int(second) % len(PALETTE) for second in sample_times(0.0, LONG_VIDEO.duration_s, 8)]
    assert [frame_number(image) for image in pictures] == expected


def test_a_rotated_video_is_turned_upright() -> None:
    data = with_rotation_90_clockwise(encode_video(numbered, VideoSpec(frames=2)))
    (upright, *_) = decode_video_frames(data)
    assert upright.size == (SIZE[1], SIZE[0])
    # The dark bar at the stored bottom-left is displayed top-left once turned clockwise.
    assert np.asarray(upright)[2, 2].max() < 60


@pytest.mark.parametrize("image_format", ["GIF", "WEBP"])
def test_animation_frames_are_spread_over_its_frames(image_format: str) -> None:
    pictures = decode_video_frames(animation(image_format, frames=10))
    assert [frame_number(image) for image in pictures] == [0, 1, 3, 4, 5, 6, 8, 9]


@pytest.mark.parametrize("image_format", ["GIF", "WEBP"])
def test_the_first_frame_of_an_animation_is_preprocessed_as_the_image_path_takes_it(image_format: str) -> None:
    data = animation(image_format, frames=2)
    pixels, used = sample_video(data, VideoSampling(frames=2))
    assert used == 2
    np.testing.assert_array_equal(pixels[0], image_to_pixels(decode_image(data)))


def test_decoder_threads_do_not_change_the_frames(short_video: bytes) -> None:
    one, sliced = (sample_video(short_video, VideoSampling(decoder_threads=threads)) for threads in (1, 2))
    np.testing.assert_array_equal(one.pixel_values, sliced.pixel_values)


# --- Limits and bad input ------------------------------------------------------------------------


def refusal(data: bytes, limits: VideoLimits = DEFAULT_VIDEO_LIMITS) -> str:
    with pytest.raises(InvalidPostError) as refused:
        sample_video(data, limits=limits)
    message = str(refused.value)
    assert message.startswith("IMAGE: "), message
    return message


def test_a_video_over_the_duration_limit_is_refused(long_video: bytes) -> None:
    assert refusal(long_video) == "IMAGE: video is 1,800 s long, over the limit of 600 s"


def test_a_track_header_claiming_16k_by_16k_is_refused(short_video: bytes) -> None:
    message = refusal(with_track_header_size(short_video, 16384, 16384))
    assert "16384×16384" in message and "over the limit of 8,294,400 pixels" in message


def test_an_mp4_listing_more_frames_than_the_limits_allow_is_refused_before_ffmpeg_reads_it(short_video: bytes) -> None:
    edited = bytearray(short_video)
    count = edited.index(b"stsz") + 4 + 8  # version and flags, sample size, then the count
    edited[count : count + 4] = struct.pack(">I", 50_000_000)
    assert refusal(bytes(edited)) == (
        "IMAGE: MP4/MOV track header lists 50,000,000 frames, over the 72,000 that the limits allow "
        "(600 s at 120 frames/s)"
    )


def test_frames_over_the_pixel_limit_are_refused_from_the_stream_header() -> None:
    data = encode_video(numbered, VideoSpec(frames=2, encoding=VideoEncoding.VP9_WEBM))
    message = refusal(data, VideoLimits(max_pixels=32 * 32))
    assert message == "IMAGE: WebM/Matroska frames are 64×48 = 3,072 pixels, over the limit of 1,024 pixels"


def test_a_frame_rate_over_the_limit_is_refused() -> None:
    data = encode_video(numbered, VideoSpec(frame_rate=30, frames=30))
    assert (
        refusal(data, VideoLimits(max_frame_rate=24)) == "IMAGE: video has 30 frames/s, over the limit of 24 frames/s"
    )


def test_a_video_over_the_byte_limit_is_refused(short_video: bytes) -> None:
    assert "over the limit of 1,000 bytes" in refusal(short_video, VideoLimits(max_bytes=1000))


def test_a_truncated_mp4_is_refused(short_video: bytes) -> None:
    # The index (moov) is written last: cut, the file has none.
    assert "truncated or corrupt MP4/MOV" in refusal(short_video[: len(short_video) // 2])


def test_an_mp4_cut_after_its_index_is_refused() -> None:
    data = encode_video(numbered, VideoSpec(frames=10, index_first=True))
    assert "truncated or corrupt MP4/MOV" in refusal(data[: len(data) * 2 // 3])


def test_a_webm_cut_between_frames_is_refused_as_truncated() -> None:
    data = encode_video(numbered, VideoSpec(frames=10, keyframe_interval=2, encoding=VideoEncoding.VP9_WEBM))
    # Cut after the first half of its clusters: what is left demuxes cleanly, and ends early.
    assert refusal(data[: len(data) // 2]) == (
        "IMAGE: truncated WebM/Matroska: its header says 10 s and its frames end at 4 s"
    )


def test_an_audio_only_mp4_is_refused() -> None:
    assert refusal(audio_only_mp4()) == ("IMAGE: MP4/MOV has no video stream (it has audio); send a video or an image")


@pytest.mark.parametrize("signature", [b"\0\0\0\x18ftypisom\0\0\x02\0isomiso2", b"\x1a\x45\xdf\xa3"])
def test_random_bytes_behind_a_video_signature_are_refused(signature: bytes) -> None:
    data = signature + np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert "truncated or corrupt" in refusal(data)


def test_an_unsupported_codec_is_refused() -> None:
    assert "video codec mpeg4 is not supported" in refusal(mpeg4_part2_mp4())


def test_an_image_is_not_a_video() -> None:
    assert "not a video postsim decodes" in refusal(encoded(picture(PALETTE[0]), "JPEG"))


def test_an_animation_over_its_pixel_budget_is_refused() -> None:
    message = refusal(animation("GIF", frames=10), VideoLimits(max_animation_pixels=5 * 64 * 48))
    assert message == ("IMAGE: animated GIF of 10 frames of 64×48 is 30,720 pixels, over the limit of 15,360")


def test_a_truncated_animation_is_refused() -> None:
    data = animation("WEBP", frames=10)
    assert "truncated or corrupt animated WebP" in refusal(data[: len(data) // 2])


def test_a_video_past_its_time_budget_is_refused(long_video: bytes) -> None:
    message = refusal(long_video, VideoLimits(max_duration_seconds=3600, max_decode_seconds=1e-6))
    assert "took longer than the limit of 1e-06 s" in message


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda: VideoLimits(max_bytes=0), "VideoLimits.max_bytes must be positive"),
        (lambda: VideoLimits(max_decode_seconds=-1), "VideoLimits.max_decode_seconds must be positive"),
        (lambda: VideoSampling(frames=0), "VideoSampling.frames must be at least 1"),
        (lambda: VideoSampling(decoder_threads=-1), "VideoSampling.decoder_threads must be 0"),
    ],
)
def test_settings_out_of_range_are_refused(make: Callable[[], object], problem: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(problem)):
        make()
