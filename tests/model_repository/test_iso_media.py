"""Reading an MP4's track declarations from its boxes, without FFmpeg."""

from __future__ import annotations

import struct

import pytest
from PIL import Image

from postsim.corpus.sample_videos import VideoSpec, encode_video
from postsim.model_repository.iso_media import IsoTrack, boxes, iso_tracks


@pytest.fixture(scope="module")
def mp4() -> bytes:
    return encode_video(lambda index: Image.new("RGB", (64, 48), (index * 20, 90, 160)), VideoSpec(frames=12))


def test_a_video_track_declares_its_kind_size_duration_and_frames(mp4: bytes) -> None:
    assert list(iso_tracks(mp4)) == [
        IsoTrack(kind=b"vide", width=64, height=48, duration_seconds=12.0, sample_count=12)
    ]


def test_boxes_are_found_at_their_level_only(mp4: bytes) -> None:
    (moov,) = boxes(mp4, (0, len(mp4)), b"moov")
    assert list(boxes(mp4, (0, len(mp4)), b"trak")) == []  # a trak lies inside moov, not at the top
    assert len(list(boxes(mp4, moov, b"trak"))) == 1


def test_a_header_cut_short_declares_nothing_it_does_not_hold(mp4: bytes) -> None:
    cut = mp4[: mp4.index(b"tkhd") + 20]
    assert [track.width for track in iso_tracks(cut)] == [0]
    assert [track.sample_count for track in iso_tracks(cut)] == [None]


@pytest.mark.parametrize("data", [b"", b"\0\0\0\x01moov", b"\0\0\0\x04moov" + bytes(8), bytes(range(256)) * 4])
def test_malformed_boxes_end_the_walk(data: bytes) -> None:
    assert list(iso_tracks(data)) == []


def test_a_64_bit_box_size_is_read() -> None:
    payload = b"\0\0\0\x08free"
    data = struct.pack(">I4sQ", 1, b"moov", 16 + len(payload)) + payload
    assert list(boxes(data, (0, len(data)), b"moov")) == [(16, len(data))]
