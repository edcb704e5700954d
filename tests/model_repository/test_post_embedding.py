"""post_embedding through a real tritonserver over gRPC, against the in-process PyTorch pipeline."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from support import output_subsets
from tritonclient.utils import InferenceServerException

from postsim.client.api import PostSimClient
from postsim.client.posts import Post
from postsim.core.errors import InvalidPostError
from postsim.model_repository import contract
from postsim.models.pipeline import PostPipeline, Preprocessor

pytestmark = pytest.mark.integration


def _jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).resize((width, height), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _reference(exported_repository, posts: list[Post]) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """The same posts through the same preprocessing and the PyTorch models, in-process."""
    from postsim.models.torch_runtime import TorchRuntime

    images = [post.image_bytes() if post.image is not None else b"" for post in posts]
    texts = [(post.text or "").encode() for post in posts]
    preprocess = Preprocessor.from_repository(exported_repository.path)
    prepared = preprocess(images, texts)
    assert not any(prepared.image_errors) and not any(prepared.text_errors)
    return PostPipeline(preprocess, TorchRuntime(exported_repository.models)).embed(images, texts)


def _cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(1 - np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


POSTS = [
    Post(text="Sunset over the beach #summer #sea", image=_jpeg(640, 480, 1)),
    Post(text="Late-night ramen in Tokyo, best broth ever", image=_jpeg(300, 500, 2)),
    Post(text="Golden retriever puppy learns to fetch"),
    Post(image=_jpeg(800, 600, 3)),
]


def test_embedding_equals_the_pytorch_pipeline(grpc_url: str, exported_repository) -> None:  # type: ignore[no-untyped-def]
    with PostSimClient(grpc_url) as client:
        served = client.embed(POSTS)
    expected_embeddings, expected_weights = _reference(exported_repository, POSTS)
    for result, expected, weights in zip(served, expected_embeddings, expected_weights, strict=True):
        assert result.embedding.shape == expected.shape
        assert _cosine_distance(result.embedding, expected) < 1e-3
        assert np.linalg.norm(result.embedding) == pytest.approx(1.0, abs=1e-4)
        assert (result.image_weight, result.text_weight) == pytest.approx(tuple(weights), abs=1e-3)


def test_single_modality_posts_get_all_the_weight(grpc_url: str) -> None:
    with PostSimClient(grpc_url) as client:
        text_only, image_only = client.embed([POSTS[2], POSTS[3]])
    assert (text_only.image_weight, text_only.text_weight) == (0.0, 1.0)
    assert (image_only.image_weight, image_only.text_weight) == (1.0, 0.0)
    with PostSimClient(grpc_url) as client:
        (both,) = client.embed([POSTS[0]])
    assert 0.0 < both.image_weight < 1.0 and both.text_weight == pytest.approx(1 - both.image_weight, abs=1e-5)


def test_a_batch_equals_the_same_posts_one_by_one(grpc_url: str) -> None:
    with PostSimClient(grpc_url) as client:
        batched = client.embed(POSTS)
        single = [client.embed([post])[0] for post in POSTS]
    for together, alone in zip(batched, single, strict=True):
        assert _cosine_distance(together.embedding, alone.embedding) < 1e-5
        assert together.image_weight == pytest.approx(alone.image_weight, abs=1e-5)


def test_an_empty_post_is_invalid_argument(grpc_url: str) -> None:
    client = grpcclient.InferenceServerClient(grpc_url)
    inputs = []
    for name in ("IMAGE", "TEXT"):
        tensor = grpcclient.InferInput(name, [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[b""]], dtype=np.object_))
        inputs.append(tensor)
    with pytest.raises(InferenceServerException) as raised:
        client.infer("post_embedding", inputs)
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "neither an image nor a text" in raised.value.message()
    # The server stays up and answers the next request.
    with PostSimClient(grpc_url) as postsim:
        assert postsim.embed([POSTS[2]])[0].text_weight == 1.0


def test_an_undecodable_image_is_invalid_argument_naming_the_input(grpc_url: str) -> None:
    with PostSimClient(grpc_url) as client, pytest.raises(InvalidPostError, match="IMAGE"):
        client.embed([Post(text="caption", image=b"<html>not an image</html>")])


def _requesting(url: str, outputs: tuple[str, ...]) -> grpcclient.InferResult:
    """post_embedding asked, through the KServe ``outputs`` field, for ``outputs`` only."""
    inputs = []
    for name, value in (("IMAGE", POSTS[0].image_bytes()), ("TEXT", (POSTS[0].text or "").encode())):
        tensor = grpcclient.InferInput(name, [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[value]], dtype=np.object_))
        inputs.append(tensor)
    with grpcclient.InferenceServerClient(url) as client:
        return client.infer(
            contract.POST_EMBEDDING, inputs, outputs=[grpcclient.InferRequestedOutput(name) for name in outputs]
        )


@pytest.mark.parametrize("outputs", output_subsets(contract.POST_EMBEDDING), ids="+".join)
def test_every_subset_of_outputs_can_be_requested(grpc_url: str, outputs: tuple[str, ...]) -> None:
    result = _requesting(grpc_url, outputs)
    assert {output.name for output in result.get_response().outputs} == set(outputs)
    for name in outputs:
        array = result.as_numpy(name)
        assert array is not None and array.shape[0] == 1 and np.isfinite(array).all()
