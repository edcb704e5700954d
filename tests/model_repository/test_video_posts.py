"""Video posts through a real tritonserver: F sampled frames pooled into the post's image embedding.

The videos are small (64×48 to 96×64, a few frames a second), so the module costs seconds; the
time a 30-minute video takes against a 10-second one is shown by ``postsim bench video``, not
asserted here.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from support import PALETTE, audio_only_mp4, picture, with_track_header_size
from tritonclient.utils import InferenceServerException

from postsim.client.api import PostSimClient
from postsim.client.posts import EmbeddingResult, Post
from postsim.core.errors import InvalidPostError
from postsim.corpus.sample_videos import VideoSpec, encode_video
from postsim.model_repository import contract
from postsim.model_repository.video import decode_video_frames

pytestmark = pytest.mark.integration

SIZE = (96, 64)
FRAMES = contract.VIDEO_FRAMES


def scene(seed: int) -> Image.Image:
    """A picture of coarse random blocks: pictures of different seeds embed apart even with random weights."""
    blocks = np.random.default_rng(seed).integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize(SIZE, Image.Resampling.NEAREST)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def video(draw: Callable[[int], Image.Image], frames: int) -> bytes:
    """An H.264 MP4 of ``frames`` frames at 4 frames/s, a keyframe a second."""
    return encode_video(draw, VideoSpec(size=SIZE, frame_rate=4, frames=frames, keyframe_interval=4))


def embed(url: str, *images: bytes) -> list[EmbeddingResult]:
    with PostSimClient(url) as client:
        return client.embed([Post(image=image) for image in images])


def cosine(a: EmbeddingResult, b: EmbeddingResult) -> float:
    return float(np.dot(a.embedding, b.embedding))  # both L2-normalised


def test_a_video_of_one_picture_embeds_like_that_picture(grpc_url: str) -> None:
    still, other = scene(1), scene(2)
    from_video, from_image, unrelated = embed(grpc_url, video(lambda _: still, 12), png(still), png(other))
    assert (from_video.frames, from_image.frames) == (FRAMES, 1)
    assert cosine(from_video, from_image) >= 0.99
    assert cosine(from_video, from_image) > cosine(from_video, unrelated)


def test_a_video_of_two_pictures_embeds_closer_to_each_than_to_unrelated_ones(grpc_url: str) -> None:
    """With random weights every embedding is near every other (cosines ≈ 0.98), so the mean of the two halves
    is compared with six unrelated pictures, not one: it must be closer to each half than to all of them."""
    first, second = scene(10), scene(11)
    halves = video(lambda index: first if index < 8 else second, 16)
    both, one, two, *others = embed(grpc_url, halves, png(first), png(second), *(png(scene(s)) for s in range(40, 46)))
    assert both.frames == FRAMES
    assert min(cosine(both, one), cosine(both, two)) > max(cosine(both, other) for other in others)


def test_a_one_frame_video_equals_its_frame_as_an_image(grpc_url: str) -> None:
    data = video(lambda _: scene(6), 1)
    (frame,) = decode_video_frames(data)
    from_video, from_image = embed(grpc_url, data, png(frame))
    assert (from_video.frames, from_image.frames) == (1, 1)
    np.testing.assert_allclose(from_video.embedding, from_image.embedding, atol=1e-5)


def test_a_video_and_a_text_are_fused_and_frames_are_reported_on_similar_posts_too(grpc_url: str) -> None:
    (result,) = embed(grpc_url, video(lambda index: picture(PALETTE[index % 10], SIZE), 3))
    assert result.frames == 3 and result.image_weight == 1.0  # fewer frames than F: each once
    with PostSimClient(grpc_url) as client:
        (text_only,) = client.embed([Post(text="a text without a picture")])
    assert text_only.frames == 0


def _truncated() -> bytes:
    data = video(lambda _: scene(7), 8)
    return data[: len(data) // 2]


def _claims_16k() -> bytes:
    return with_track_header_size(video(lambda _: scene(8), 4), 16384, 16384)


def _random_behind_signature() -> bytes:
    return b"\0\0\0\x18ftypisom\0\0\x02\0isomiso2" + np.random.default_rng(0).bytes(4096)


def _over_duration() -> bytes:
    # 11 minutes at one frame a second, a keyframe a minute: a few kB, over the 600 s default.
    return encode_video(lambda _: scene(9), VideoSpec(size=SIZE, frame_rate=1, frames=660, keyframe_interval=60))


BAD_VIDEOS: dict[str, tuple[Callable[[], bytes], str]] = {
    "truncated MP4": (_truncated, "truncated or corrupt MP4/MOV"),
    "16k × 16k header": (_claims_16k, "16384×16384 = 268,435,456 pixels, over the limit of 8,294,400 pixels"),
    "audio-only MP4": (audio_only_mp4, "MP4/MOV has no video stream (it has audio)"),
    "random bytes with an MP4 signature": (_random_behind_signature, "truncated or corrupt MP4/MOV"),
    "over the duration limit": (_over_duration, "video is 660 s long, over the limit of 600 s"),
}


@pytest.mark.parametrize("case", list(BAD_VIDEOS))
def test_a_bad_video_is_invalid_argument_naming_the_problem_and_the_server_serves_on(grpc_url: str, case: str) -> None:
    make, problem = BAD_VIDEOS[case]
    data = make()
    with grpcclient.InferenceServerClient(grpc_url) as raw:
        image = grpcclient.InferInput(contract.IMAGE.name, [1, 1], contract.IMAGE.dtype.wire)
        image.set_data_from_numpy(np.array([[data]], dtype=np.object_))
        text = grpcclient.InferInput(contract.TEXT.name, [1, 1], contract.TEXT.dtype.wire)
        text.set_data_from_numpy(np.array([[b""]], dtype=np.object_))
        with pytest.raises(InferenceServerException) as refused:
            raw.infer(contract.POST_EMBEDDING, [image, text])
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
        message = refused.value.message() or ""
        assert message.startswith("IMAGE: ") or "IMAGE: " in message, message
        assert problem in message, message
        assert raw.is_server_ready() and raw.is_model_ready(contract.POST_EMBEDDING)
    with PostSimClient(grpc_url) as client:
        with pytest.raises(InvalidPostError, match="IMAGE"):
            client.embed([Post(image=data)])
        (after,) = client.embed([Post(image=video(lambda _: scene(10), 4))])
    assert after.frames == 4 and np.linalg.norm(after.embedding) == pytest.approx(1.0, abs=1e-4)
