"""The video-sampling benchmark runs end to end on small videos (its figures are printed, never asserted)."""

from __future__ import annotations

import numpy as np

from postsim.bench.video_bench import (
    VideoCase,
    default_cases,
    format_table,
    measure_video_sampling,
    moving_disc,
    panning_scene,
    small_video,
)
from postsim.corpus.sample_videos import VideoSpec


def test_each_case_is_encoded_sampled_and_tabled() -> None:
    cases = [
        VideoCase(name="3 s", spec=small_video(frames=3), draw=moving_disc),
        VideoCase(name="20 s", spec=small_video(frames=20), draw=moving_disc),
    ]
    lines: list[str] = []
    timings = measure_video_sampling(cases, repeats=1, progress=lines.append)
    assert [(timing.name, timing.frames_sampled) for timing in timings] == [("3 s", 3), ("20 s", 8)]
    assert all(timing.decode_ms > 0 and timing.pixels_cpu_ms >= 0 for timing in timings)
    table = format_table(timings).splitlines()
    assert len(table) == 4 and table[2].startswith("| 3 s | ")
    assert lines[0] == "encoding 3 s"


def test_the_default_cases_compare_equal_sizes_and_a_phone_clip() -> None:
    short, long, clip = (case.spec for case in default_cases())
    assert short.size == long.size and (short.duration_s, long.duration_s) == (10, 1800)
    assert (clip.size, clip.duration_s, clip.keyframe_interval / clip.frame_rate) == ((1280, 720), 30, 2)


def test_the_panning_scene_moves_a_pixel_a_frame_and_is_the_same_each_time() -> None:
    spec = VideoSpec(size=(32, 16), frames=4)
    draw = panning_scene(spec)
    first, second = (np.asarray(draw(index), dtype=np.int16) for index in (0, 1))
    assert np.abs(first[:, 1:] - second[:, :-1]).max() <= 2 * 8  # the same scene one pixel on, fresh grain
    np.testing.assert_array_equal(np.asarray(panning_scene(spec)(1)), second)
