"""Bad and odd inputs through a real tritonserver over gRPC.

Every bad input must be answered with INVALID_ARGUMENT and a message naming the input and
the problem, and leave the server serving: after each one a valid post is embedded and the
server is ready. Odd but valid inputs must succeed. One bad post among requests the
dynamic batcher puts together fails only its own request.

The module runs its own server on a copy of the exported repository: small input limits
(so the limits are shown to come from the config), a long batching delay on
``preprocess_image`` and ``text_encoder`` (so concurrent requests are batched), and an
index, so ``similar_posts`` is loaded.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
from PIL import Image
from support import ExportedRepository, publish_random_index, server_settings
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from postsim.client.api import AsyncPostSimClient, PostSimClient, map_server_error
from postsim.client.posts import Post
from postsim.core.errors import InvalidPostError
from postsim.export.triton_config import InputLimits, apply_input_limits
from postsim.model_repository import contract
from postsim.model_repository.configs import parse_pbtxt, to_pbtxt
from postsim.model_repository.layout import CONFIG_NAME
from postsim.server.launcher import TritonServer

pytestmark = pytest.mark.integration

LIMITS = InputLimits(max_image_bytes=1 << 20, max_image_pixels=4_000_000, max_text_chars=2_000, max_top_k=50)
BATCHING_DELAY_US = 200_000
"""Long enough that requests sent together from one event loop land in one batch."""
VALID = Post(text="Sunset over the bay #summer")


# --------------------------------------------------------------------------- the server


def _set_batching_delay(repository: Path, models: tuple[str, ...], delay_us: int) -> None:
    for model in models:
        path = repository / model / CONFIG_NAME
        config = parse_pbtxt(path.read_text())
        config.dynamic_batching.max_queue_delay_microseconds = delay_us
        del config.dynamic_batching.preferred_batch_size[:]
        path.write_text(to_pbtxt(config))


@pytest.fixture(scope="module")
def limited_server(
    exported_repository: ExportedRepository, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServer]:
    repository = tmp_path_factory.mktemp("bad-inputs") / "repository"
    shutil.copytree(exported_repository.path, repository)
    apply_input_limits(repository, LIMITS)
    _set_batching_delay(repository, (contract.PREPROCESS_IMAGE, contract.TEXT_ENCODER), BATCHING_DELAY_US)
    settings = server_settings(repository, exit_timeout_s=5)
    with TritonServer(settings, log_path=repository.parent / "tritonserver.log") as server:
        publish_random_index(repository, server.endpoints.grpc)
        yield server


@pytest.fixture(scope="module")
def url(limited_server: TritonServer) -> str:
    return limited_server.endpoints.grpc


# --------------------------------------------------------------------------- images


def _encoded(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _photo(width: int = 320, height: int = 240, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(max(1, height // 8), max(1, width // 8), 3), dtype=np.uint8)
    return Image.fromarray(pixels).resize((width, height), Image.Resampling.BILINEAR)


def _png_claiming(width: int, height: int, *, pixel_data: bytes = b"\x00" * 4096, iend: bool = True) -> bytes:
    """A few hundred bytes of PNG whose header says ``width`` × ``height`` (8-bit greyscale)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(pixel_data)
    end = chunk(b"IEND", b"") if iend else b""
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + end


def _animated_gif(colours: list[tuple[int, int, int]]) -> bytes:
    frames = [Image.new("RGB", (64, 48), colour) for colour in colours]
    return _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


JPEG = _encoded(_photo(), "JPEG", quality=90)


# --------------------------------------------------------------------------- raw requests


def _bytes_tensor(name: str, values: list[bytes]) -> grpcclient.InferInput:
    array = np.array([[value] for value in values], dtype=np.object_)
    tensor = grpcclient.InferInput(name, list(array.shape), "BYTES")
    tensor.set_data_from_numpy(array)
    return tensor


def _tensor(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _post_tensors(image: bytes, text: bytes) -> list[grpcclient.InferInput]:
    return [_bytes_tensor("IMAGE", [image]), _bytes_tensor("TEXT", [text])]


def _invalid_argument(url: str, model: str, inputs: list[grpcclient.InferInput]) -> str:
    """The message of the INVALID_ARGUMENT the server answers ``inputs`` with."""
    with grpcclient.InferenceServerClient(url) as client, pytest.raises(InferenceServerException) as raised:
        client.infer(model, inputs)
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT", raised.value.message()
    message = str(raised.value.message())
    assert "Traceback" not in message and "At:" not in message
    return message


def _still_serving(url: str) -> None:
    """A valid post is embedded and the server reports ready."""
    with PostSimClient(url) as client:
        (result,) = client.embed([VALID])
        assert np.linalg.norm(result.embedding) == pytest.approx(1.0, abs=1e-4)
    with grpcclient.InferenceServerClient(url) as raw:
        assert raw.is_server_ready()


# --------------------------------------------------------------------------- bad posts


BAD_POSTS = {
    "garbage bytes": (b"\x00\x13\x37garbage" * 20, b"caption", ["IMAGE", "not a decodable image"]),
    "zero-byte image, empty text": (b"", b"", ["neither an image nor a text", "IMAGE", "TEXT"]),
    "truncated JPEG": (JPEG[: len(JPEG) // 2], b"caption", ["IMAGE", "truncated"]),
    "HTML": (b"<!DOCTYPE html><html><body>not an image</body></html>", b"caption", ["IMAGE", "HTML"]),
    "decompression bomb": (
        _encoded(Image.new("L", (2500, 2000)), "PNG"),  # 5 MP of zeros in a few kB
        b"caption",
        ["IMAGE", "2500×2000", "over the limit of 4,000,000 pixels"],
    ),
    "header claims 20000×20000": (
        _png_claiming(20_000, 20_000),
        b"caption",
        ["IMAGE", "pixels", f"over the limit of {LIMITS.max_image_pixels:,} pixels"],
    ),
    "PNG whose pixel data stops short": (  # one whole row of 1900, no IEND: Pillow leaves the rest black
        _png_claiming(2000, 1900, pixel_data=b"\x00" * 2001, iend=False),
        b"caption",
        ["IMAGE", "truncated PNG", "2000×1900"],
    ),
    "over the byte limit": (
        JPEG + b"\x00" * (LIMITS.max_image_bytes + 1 - len(JPEG)),
        b"caption",
        ["IMAGE", "1,048,577 bytes is over the limit of 1,048,576 bytes"],
    ),
    "invalid UTF-8": (b"", b"caf\xe9 au lait", ["TEXT", "not valid UTF-8", "byte 3"]),
    "text cut to nothing by max_text_chars": (
        b"",
        b" " * LIMITS.max_text_chars + b"sunset over the sea",
        ["TEXT", "no word"],
    ),
    "only invisible characters": (b"", "\u3000\u200b\u00a0".encode(), ["TEXT", "no word"]),
}


@pytest.mark.parametrize("case", list(BAD_POSTS))
def test_a_bad_post_is_invalid_argument_naming_the_input(url: str, case: str) -> None:
    image, text, expected = BAD_POSTS[case]
    message = _invalid_argument(url, contract.POST_EMBEDDING, _post_tensors(image, text))
    for fragment in expected:
        assert fragment in message, f"{case}: {fragment!r} not in {message!r}"
    _still_serving(url)


def test_the_postsim_client_raises_invalid_post_error_with_the_server_message(url: str) -> None:
    with PostSimClient(url) as client, pytest.raises(InvalidPostError, match=r"IMAGE: .*truncated"):
        client.embed([Post(text="caption", image=JPEG[:200])])


# --------------------------------------------------------------------------- malformed requests


def _malformed_requests() -> dict[str, tuple[list[grpcclient.InferInput], list[str]]]:
    text = _bytes_tensor("TEXT", [b"caption"])
    return {
        "FP32 for IMAGE": (
            [_tensor("IMAGE", np.zeros((1, 1), np.float32), "FP32"), text],
            ["IMAGE", "FP32", "BYTES"],
        ),
        "IMAGE of shape [1, 2]": (
            [_tensor("IMAGE", np.array([[b"", b""]], dtype=np.object_), "BYTES"), text],
            ["IMAGE", "shape"],
        ),
        "batch sizes that differ": (
            [_bytes_tensor("IMAGE", [b"", b""]), text],
            ["IMAGE", "batch size"],
        ),
        "TEXT missing": ([_bytes_tensor("IMAGE", [JPEG])], ["TEXT", "missing"]),
        "17 posts": (
            [_bytes_tensor("IMAGE", [b""] * 17), _bytes_tensor("TEXT", [b"caption"] * 17)],
            ["batch-size", "16"],
        ),
    }


@pytest.mark.parametrize("case", list(_malformed_requests()))
def test_a_malformed_request_is_invalid_argument_naming_the_input(url: str, case: str) -> None:
    inputs, expected = _malformed_requests()[case]
    message = _invalid_argument(url, contract.POST_EMBEDDING, inputs)
    for fragment in expected:
        assert fragment in message, f"{case}: {fragment!r} not in {message!r}"
    _still_serving(url)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        (
            "an input too many",
            "takes the inputs ['IMAGE', 'TEXT'] and no others: it does not take ['EXTRA']",
        ),
        ("a batch of 0", "the request holds no post (a batch of 0)"),
    ],
)
def test_what_triton_refuses_itself_is_said_plainly_by_the_client(url: str, case: str, expected: str) -> None:
    """Triton refuses these before any postsim model runs; its own words were "missing required input(s) ]."
    and "expected 1 string elements ... got 0"."""
    inputs = {
        "an input too many": [*_post_tensors(b"", b"caption"), _bytes_tensor("EXTRA", [b"x"])],
        "a batch of 0": [_tensor(name, np.empty((0, 1), np.object_), "BYTES") for name in ("IMAGE", "TEXT")],
    }[case]
    with grpcclient.InferenceServerClient(url) as client, pytest.raises(InferenceServerException) as raised:
        client.infer(contract.POST_EMBEDDING, inputs)
    error = map_server_error(raised.value, url=url, model=contract.POST_EMBEDDING)
    assert isinstance(error, InvalidPostError)
    assert expected in str(error)
    assert "]." not in str(error) and "string elements" not in str(error)
    _still_serving(url)


def test_bytes_whose_length_prefix_overruns_the_tensor_are_invalid_argument(url: str) -> None:
    """What tritonclient never sends: a BYTES element claiming more bytes than the request holds."""
    request = service_pb2.ModelInferRequest(model_name=contract.POST_EMBEDDING)
    for name in ("IMAGE", "TEXT"):
        tensor = request.inputs.add(name=name, datatype="BYTES")
        tensor.shape.extend([1, 1])
    request.raw_input_contents.extend([struct.pack("<I", 5000) + b"short", struct.pack("<I", 2) + b"hi"])
    with grpc.insecure_channel(url) as channel, pytest.raises(grpc.RpcError) as raised:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "IMAGE" in raised.value.details() and "5000" in raised.value.details()
    _still_serving(url)


def test_text_encoder_called_directly_refuses_mismatched_lengths_and_unknown_token_ids(url: str) -> None:
    ids = np.array([[101, 7592, 102]], dtype=np.int64)
    mismatched = [
        _tensor("INPUT_IDS", ids, "INT64"),
        _tensor("ATTENTION_MASK", np.ones((1, 5), np.int64), "INT64"),
    ]
    message = _invalid_argument(url, contract.TEXT_ENCODER, mismatched)
    assert "'sequence'" in message and "INPUT_IDS[1] = 3" in message and "ATTENTION_MASK[1] = 5" in message
    unknown = [
        _tensor("INPUT_IDS", np.array([[101, 10**9, 102]], dtype=np.int64), "INT64"),
        _tensor("ATTENTION_MASK", np.ones((1, 3), np.int64), "INT64"),
    ]
    message = _invalid_argument(url, contract.TEXT_ENCODER, unknown)
    assert "text_encoder cannot run this request" in message and "out of" in message
    assert "Gather" not in message  # ONNX Runtime's node names stay in the server
    _still_serving(url)


# --------------------------------------------------------------------------- TOP_K


def _similar_inputs(k: int) -> list[grpcclient.InferInput]:
    return [*_post_tensors(b"", b"sunset"), _tensor("TOP_K", np.array([[k]], dtype=np.int32), "INT32")]


@pytest.mark.parametrize("k", [0, -1, LIMITS.max_top_k + 1])
def test_top_k_out_of_range_is_invalid_argument(url: str, k: int) -> None:
    message = _invalid_argument(url, contract.SIMILAR_POSTS, _similar_inputs(k))
    assert f"TOP_K: must be between 1 and {LIMITS.max_top_k}, got {k}" in message
    _still_serving(url)


def test_top_k_at_the_limit_is_served(url: str) -> None:
    with grpcclient.InferenceServerClient(url) as client:
        result = client.infer(contract.SIMILAR_POSTS, _similar_inputs(LIMITS.max_top_k))
    ids = result.as_numpy("IDS")
    assert ids is not None and ids.shape == (1, LIMITS.max_top_k)


# --------------------------------------------------------------------------- odd but valid


def _grey16_png() -> bytes:
    ramp = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    image = Image.fromarray(ramp)
    assert image.mode.startswith("I;16")
    return _encoded(image, "PNG")


def _rgba_png() -> bytes:
    image = Image.new("RGBA", (80, 60), (200, 30, 30, 0))
    image.paste((20, 20, 200, 255), (20, 15, 60, 45))
    return _encoded(image, "PNG")


ODD_IMAGES = {
    "1×1 PNG": _encoded(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"),
    "1×1 JPEG": _encoded(Image.new("RGB", (1, 1), (0, 255, 0)), "JPEG"),
    "16-bit greyscale PNG": _grey16_png(),
    "CMYK JPEG": _encoded(Image.new("CMYK", (64, 48), (0, 200, 100, 20)), "JPEG"),
    "RGBA PNG": _rgba_png(),
    "animated GIF": _animated_gif([(255, 0, 0), (0, 0, 255)]),
    "1 × 4000 strip": _encoded(Image.new("RGB", (1, 4000), (9, 99, 199)), "PNG"),
}


@pytest.mark.parametrize("case", list(ODD_IMAGES))
def test_odd_but_valid_images_are_embedded(url: str, case: str) -> None:
    with PostSimClient(url) as client:
        (result,) = client.embed([Post(image=ODD_IMAGES[case])])
    assert np.isfinite(result.embedding).all()
    assert np.linalg.norm(result.embedding) == pytest.approx(1.0, abs=1e-4)
    assert (result.image_weight, result.text_weight) == (1.0, 0.0)


def test_an_animated_gif_is_embedded_as_its_first_frame(url: str) -> None:
    with PostSimClient(url) as client:
        animated, first, second = client.embed(
            [
                Post(image=_animated_gif([(255, 0, 0), (0, 0, 255)])),
                Post(image=_animated_gif([(255, 0, 0)])),
                Post(image=_animated_gif([(0, 0, 255)])),
            ]
        )
    assert np.allclose(animated.embedding, first.embedding, atol=1e-5)
    assert not np.allclose(animated.embedding, second.embedding, atol=1e-3)


ODD_TEXTS = {
    "emoji": "🌅🌊 #summer 😎",
    "Hebrew (right to left)": "שקיעה מעל המפרץ",
    "Arabic (right to left)": "غروب الشمس فوق الخليج",
    "mixed directions": "sunset שקיעה غروب 🌅",
    "10 MB": "sunset over the bay " * 500_000,
}


@pytest.mark.parametrize("case", list(ODD_TEXTS))
def test_odd_but_valid_texts_are_embedded(url: str, case: str) -> None:
    with PostSimClient(url) as client:
        (result,) = client.embed([Post(text=ODD_TEXTS[case])])
    assert np.isfinite(result.embedding).all()
    assert np.linalg.norm(result.embedding) == pytest.approx(1.0, abs=1e-4)
    assert (result.image_weight, result.text_weight) == (0.0, 1.0)


def test_text_past_max_text_chars_is_never_read(url: str) -> None:
    """Only the first max_text_chars characters count: what follows changes nothing, even invalid UTF-8."""
    head = ("sunset over the bay " * 200)[: LIMITS.max_text_chars]
    with grpcclient.InferenceServerClient(url) as client:
        short = client.infer(contract.POST_EMBEDDING, _post_tensors(b"", head.encode()))
        long = client.infer(contract.POST_EMBEDDING, _post_tensors(b"", head.encode() + b" \xff\xfe tail " * 1000))
    assert np.array_equal(short.as_numpy("EMBEDDING"), long.as_numpy("EMBEDDING"))


# --------------------------------------------------------------------------- batching


def _batching(url: str, model: str) -> tuple[int, int]:
    """(inference_count, execution_count) of ``model`` so far."""
    with grpcclient.InferenceServerClient(url) as client:
        (stats,) = client.get_inference_statistics(model).model_stats
    return int(stats.inference_count), int(stats.execution_count)


def _since(before: tuple[int, int], after: tuple[int, int]) -> tuple[int, int]:
    return after[0] - before[0], after[1] - before[1]


def test_one_bad_post_among_batched_requests_fails_only_itself(url: str) -> None:
    posts = [Post(text=f"post {i} at the beach", image=_encoded(_photo(seed=i), "JPEG")) for i in range(16)]
    posts[7] = Post(text="the bad one", image=b"<html>not an image</html>")
    before = _batching(url, contract.PREPROCESS_IMAGE)

    async def send_all() -> list[Any]:
        async with AsyncPostSimClient(url) as client:
            return await asyncio.gather(*(client.embed([post]) for post in posts), return_exceptions=True)

    results = asyncio.run(send_all())
    inferences, executions = _since(before, _batching(url, contract.PREPROCESS_IMAGE))
    assert inferences == 16 and executions < inferences, "the requests were not batched together"
    failed = {i: result for i, result in enumerate(results) if isinstance(result, BaseException)}
    assert list(failed) == [7]
    assert isinstance(failed[7], InvalidPostError) and "IMAGE" in str(failed[7]) and "HTML" in str(failed[7])
    for result in results[:7] + results[8:]:
        assert isinstance(result, list) and np.linalg.norm(result[0].embedding) == pytest.approx(1.0, abs=1e-4)


def test_one_bad_request_in_an_onnx_batch_fails_only_itself(url: str, limited_server: TritonServer) -> None:
    """Token ids past the vocabulary, sent straight to text_encoder with 7 good requests it batches them with."""

    def request(ids: list[int]) -> list[grpcclient_aio.InferInput]:
        array = np.array([ids], dtype=np.int64)
        inputs = [grpcclient_aio.InferInput("INPUT_IDS", list(array.shape), "INT64")]
        inputs.append(grpcclient_aio.InferInput("ATTENTION_MASK", list(array.shape), "INT64"))
        inputs[0].set_data_from_numpy(array)
        inputs[1].set_data_from_numpy(np.ones_like(array))
        return inputs

    good = [[101, 7592 + i, 2088, 102] for i in range(7)]
    bad = [101, 10**9, 2088, 102]  # same length: Triton batches only requests of the same shape
    before = _batching(url, contract.TEXT_ENCODER)

    async def send_all() -> list[Any]:
        async with grpcclient_aio.InferenceServerClient(url) as client:
            calls = [client.infer(contract.TEXT_ENCODER, request(ids)) for ids in [*good[:3], bad, *good[3:]]]
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(send_all())
    inferences, executions = _since(before, _batching(url, contract.TEXT_ENCODER))
    assert executions < inferences, "the requests were not batched together"
    failed = [i for i, result in enumerate(results) if isinstance(result, BaseException)]
    assert failed == [3]
    error = results[3]
    assert isinstance(error, InferenceServerException) and error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "text_encoder cannot run this request" in str(error.message())
    assert "running them one by one" in limited_server.log_text()
    for result in results[:3] + results[4:]:
        embedding = result.as_numpy("TEXT_PROJECTION")
        assert embedding is not None and np.isfinite(embedding).all()
