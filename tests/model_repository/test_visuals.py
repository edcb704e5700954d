"""A batch of posts' images and videos as frames for the image encoder: padding, masks, counts, refusals."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from postsim.core.errors import InvalidPostError
from postsim.corpus.sample_videos import VideoSpec, encode_video
from postsim.model_repository import contract
from postsim.model_repository.preprocessing import decode_image, image_to_pixels
from postsim.model_repository.video import VideoSampling
from postsim.model_repository.visuals import VisualSettings, preprocess_visuals

GREY = (128, 128, 128)


def png(size: tuple[int, int] = (50, 30), colour: tuple[int, int, int] = GREY) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def video(frames: int) -> bytes:
    """Two frames a second, a colour a second."""
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    spec = VideoSpec(size=(64, 48), frame_rate=2, frames=frames, keyframe_interval=2)
    return encode_video(lambda index: Image.new("RGB", (64, 48), colours[index // 2 % len(colours)]), spec)


def test_a_bad_item_fails_only_itself() -> None:
    good = png()
    pixels, frame_mask, image_mask, frames, errors = preprocess_visuals([good, b"<html>", b"", good])
    assert pixels.shape == (4, 1, 3, 224, 224)
    assert pixels.dtype == frame_mask.dtype == image_mask.dtype == np.float32
    assert image_mask.tolist() == [[1.0], [0.0], [0.0], [1.0]]
    assert frames.dtype == np.int32 and frames.tolist() == [[1], [0], [0], [1]]
    assert errors[0] is None and errors[2] is None and errors[3] is None
    assert isinstance(errors[1], InvalidPostError)
    assert str(errors[1]).startswith("IMAGE: ")
    assert not pixels[1].any() and not pixels[2].any()
    np.testing.assert_array_equal(pixels[0], pixels[3])


def test_a_batch_of_images_has_one_frame_each_as_the_image_path_makes_it() -> None:
    data = png((80, 60), (10, 120, 240))
    pixels, frame_mask, *_ = preprocess_visuals([data])
    assert frame_mask.tolist() == [[1.0]]
    np.testing.assert_array_equal(pixels[0, 0], image_to_pixels(decode_image(data)))


def test_images_are_padded_to_the_frames_of_a_video_and_masked() -> None:
    settings = VisualSettings(sampling=VideoSampling(frames=4))
    pixels, frame_mask, image_mask, frames, errors = preprocess_visuals([png(), video(8), b""], settings)
    assert errors == [None, None, None]
    assert pixels.shape == (3, 4, 3, 224, 224)
    assert frame_mask.tolist() == [[1, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert image_mask.tolist() == [[1.0], [1.0], [0.0]]
    assert frames.tolist() == [[1], [4], [0]]
    assert not pixels[0, 1:].any() and not pixels[2].any()
    assert len({pixels[1, index].tobytes() for index in range(4)}) == 4  # four different colours


def test_a_video_with_fewer_frames_than_f_uses_each_frame_once() -> None:
    _, frame_mask, _, frames, _ = preprocess_visuals([video(2)], VisualSettings(sampling=VideoSampling(frames=8)))
    assert frames.tolist() == [[2]] and frame_mask.tolist() == [[1.0, 1.0]]


def test_a_refused_video_names_the_input_and_fails_only_its_post() -> None:
    truncated = video(8)[:-300]
    _, _, image_mask, frames, errors = preprocess_visuals([truncated, png()])
    assert isinstance(errors[0], InvalidPostError) and "IMAGE: truncated" in str(errors[0])
    assert errors[1] is None and image_mask.tolist() == [[0.0], [1.0]] and frames.tolist() == [[0], [1]]


def test_settings_come_from_the_config_parameters() -> None:
    parameters = {contract.VIDEO_FRAMES_PARAMETER.key: "3", contract.MAX_VIDEO_SECONDS_PARAMETER.key: "5"}
    settings = VisualSettings.from_parameters(parameters)
    assert settings.sampling.frames == 3 and settings.video.max_duration_seconds == 5
    assert settings.image.max_bytes == contract.MAX_IMAGE_BYTES
    assert VisualSettings.from_parameters({}) == VisualSettings()


def test_an_empty_batch() -> None:
    pixels, frame_mask, image_mask, frames, errors = preprocess_visuals([])
    assert pixels.shape == (0, 1, 3, 224, 224) and frame_mask.shape == (0, 1) and image_mask.shape == (0, 1)
    assert frames.shape == (0, 1) and errors == []
