"""What the tracks of an ISO base media file (MP4, MOV) declare, read from its boxes without FFmpeg.

FFmpeg's MP4 demuxer builds an index entry for every sample listed in the file before it
returns a single stream: a 100 MiB file may list tens of millions of samples. Reading the
few header boxes here first lets the video path refuse such a file, or one whose track
header claims a huge frame, before FFmpeg parses anything.

Only the boxes needed are read: ``moov/mvhd`` (the movie's time scale), and in each
``moov/trak``: ``tkhd`` (presentation duration and size), ``mdia/hdlr`` (track kind),
``mdia/minf/stbl/stsz`` or ``stz2`` (sample count). A box that is cut short or absent is not reported; FFmpeg still
reads the file afterwards and refuses what is broken.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

Span = tuple[int, int]
"""Where a box's payload lies in the file: (start, end)."""


@dataclass(frozen=True, kw_only=True)
class IsoTrack:
    """One ``trak`` box's declarations; None where the box that says it is missing or cut short."""

    kind: bytes | None
    """The handler type: ``b"vide"``, ``b"soun"``, ..."""
    width: int
    height: int
    """Presentation size from the track header, in whole pixels (0 for tracks without pictures)."""
    duration_seconds: float | None
    sample_count: int | None

    @property
    def is_video(self) -> bool:
        return self.kind == b"vide"


def iso_tracks(data: bytes) -> Iterator[IsoTrack]:
    """Every track of the file's ``moov`` box, in order."""
    for moov in boxes(data, (0, len(data)), b"moov"):
        mvhd = _path(data, moov, b"mvhd")
        # The movie's time scale, after the creation and modification times (32- or 64-bit).
        timescale = _ints(data, mvhd, 20 if data[mvhd[0]] == 1 else 12, ">I") if mvhd is not None else None
        for trak in boxes(data, moov, b"trak"):
            yield _track(data, trak, timescale[0] if timescale else 0)


def boxes(data: bytes, within: Span, kind: bytes) -> Iterator[Span]:
    """The payload of each box of type ``kind`` directly inside ``within``."""
    position, end = within
    while position + 8 <= end:
        size, box = struct.unpack(">I4s", data[position : position + 8])
        header = 8
        if size == 1 and position + 16 <= end:  # 64-bit size
            size, header = struct.unpack(">Q", data[position + 8 : position + 16])[0], 16
        elif size == 0:  # to the end of the enclosing box
            size = end - position
        if size < header:
            return
        if box == kind:
            yield position + header, min(position + size, end)
        position += size


def _track(data: bytes, trak: Span, timescale: int) -> IsoTrack:
    width = height = 0
    duration = None
    tkhd = _path(data, trak, b"tkhd")
    if tkhd is not None:
        version_1 = data[tkhd[0]] == 1  # 64-bit times and duration
        # After the times, track id and a reserved word: the duration as presented (edits applied).
        length = _ints(data, tkhd, 28 if version_1 else 20, ">Q" if version_1 else ">I")
        if length is not None and length[0] and timescale:
            duration = length[0] / timescale
        # After the duration, layer, volume and matrix: the size, 16.16 fixed point.
        fields = _ints(data, tkhd, 88 if version_1 else 76, ">II")
        if fields is not None:
            width, height = (value >> 16 for value in fields)
    hdlr = _path(data, trak, b"mdia", b"hdlr")
    kind = data[hdlr[0] + 8 : hdlr[0] + 12] if hdlr is not None and hdlr[0] + 12 <= hdlr[1] else None
    return IsoTrack(
        kind=kind,
        width=width,
        height=height,
        duration_seconds=duration,
        sample_count=_sample_count(data, trak),
    )


def _sample_count(data: bytes, trak: Span) -> int | None:
    stbl = _path(data, trak, b"mdia", b"minf", b"stbl")
    if stbl is None:
        return None
    for kind in (b"stsz", b"stz2"):  # both keep the count 8 bytes into the payload
        for table in boxes(data, stbl, kind):
            count = _ints(data, table, 8, ">I")
            return count[0] if count is not None else None
    return None


def _path(data: bytes, within: Span, *kinds: bytes) -> Span | None:
    """The first box found by following ``kinds`` down from ``within``."""
    span: Span | None = within
    for kind in kinds:
        assert span is not None
        span = next(boxes(data, span, kind), None)
        if span is None:
            return None
    return span


def _ints(data: bytes, span: Span, offset: int, layout: str) -> tuple[int, ...] | None:
    """Big-endian integers at ``offset`` into a box's payload; None when the box ends first."""
    start, end = span
    size = struct.calcsize(layout)
    if start + offset + size > end:
        return None
    return tuple(int(value) for value in struct.unpack(layout, data[start + offset : start + offset + size]))
