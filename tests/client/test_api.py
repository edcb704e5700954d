"""The client library without a Triton server.

Posts and arguments are checked before anything is sent; tritonclient's exceptions (built
as its gRPC client builds them) become postsim's; requests are built and chunked as the
contract says; a port with nothing listening gives ServerUnavailableError through real
gRPC calls, sync and async. The tests against a real server live with the server fixtures.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import model_config_pb2, service_pb2
from tritonclient.grpc._utils import get_error_grpc
from tritonclient.utils import (
    InferenceServerException,
    deserialize_bytes_tensor,
    np_to_triton_dtype,
    serialize_byte_tensor,
)

from postsim.client.api import (
    AsyncPostSimClient,
    PostSimClient,
    ServerInfo,
    build_inputs,
    map_server_error,
)
from postsim.client.posts import EmbeddingResult, Neighbor, Post, SimilarResult
from postsim.core.errors import (
    InvalidPostError,
    PostSimError,
    ServerError,
    ServerUnavailableError,
)
from postsim.model_repository import contract
from postsim.server.ports import free_ports

URL = "triton.example:8001"
DIM = 8
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16


# --------------------------------------------------------------------------- fakes


def infer_result(outputs: dict[str, np.ndarray]) -> grpcclient.InferResult:
    """An InferResult over a real ModelInferResponse, as the gRPC client returns it."""
    response = service_pb2.ModelInferResponse()
    for name, array in outputs.items():
        tensor = response.outputs.add()
        tensor.name = name
        tensor.datatype = np_to_triton_dtype(array.dtype)
        tensor.shape.extend(array.shape)
        if array.dtype == np.object_:
            response.raw_output_contents.append(serialize_byte_tensor(array).item() if array.size else b"")
        else:
            response.raw_output_contents.append(array.tobytes())
    return grpcclient.InferResult(response)


def tensor_values(tensor: grpcclient.InferInput) -> np.ndarray:
    """The values an InferInput carries, decoded from its raw request content."""
    content = tensor._get_content()
    shape = list(tensor.shape())
    if tensor.datatype() == "BYTES":
        return deserialize_bytes_tensor(content).reshape(shape)
    return np.frombuffer(content, dtype=contract.TOP_K.dtype.numpy).reshape(shape)


def post_number(text: bytes) -> int:
    return int(text.decode().split()[-1])


class FakeTriton:
    """Stands in for tritonclient.grpc.InferenceServerClient: records calls, answers from the TEXT input.

    Post ``n`` (text ``"post n"``) gets an embedding whose first element is ``n`` and, from
    ``similar_posts``, neighbours ``n-a`` and ``n-b``.
    """

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.error: InferenceServerException | None = None
        self.closed = False
        self.models: list[tuple[str, str, str]] = [("post_embedding", "1", "READY"), ("fuser", "1", "READY")]

    def infer(
        self,
        model_name: str,
        inputs: list[grpcclient.InferInput],
        outputs: list[grpcclient.InferRequestedOutput] | None = None,
        client_timeout: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> grpcclient.InferResult:
        self.calls.append(
            {
                "model": model_name,
                "inputs": inputs,
                "outputs": [output.name() for output in outputs or []],
                "client_timeout": client_timeout,
                "headers": headers,
            }
        )
        if self.error is not None:
            raise self.error
        texts = tensor_values(next(t for t in inputs if t.name() == "TEXT"))[:, 0]
        numbers = [post_number(text) for text in texts]
        embedding = np.zeros((len(numbers), DIM), dtype=np.float32)
        embedding[:, 0] = numbers
        weights = np.tile(np.array([[0.25, 0.75]], dtype=np.float32), (len(numbers), 1))
        answer: dict[str, np.ndarray] = {
            contract.EMBEDDING.name: embedding,
            contract.MODALITY_WEIGHTS.name: weights,
            contract.IMAGE_EMBEDDING.name: np.eye(1, DIM, 1, dtype=np.float32).repeat(len(numbers), axis=0),
            contract.TEXT_EMBEDDING.name: np.eye(1, DIM, 2, dtype=np.float32).repeat(len(numbers), axis=0),
        }
        if model_name == contract.SIMILAR_POSTS:
            ids = np.array([[f"{n}-a".encode(), f"{n}-b".encode()] for n in numbers], dtype=np.object_)
            answer[contract.IDS.name] = ids.reshape(len(numbers), 2)
            answer[contract.SCORES.name] = np.tile(np.array([[0.9, 0.5]], dtype=np.float32), (len(numbers), 1))
            captions = np.array([[f"caption {n}".encode(), b""] for n in numbers], dtype=np.object_)
            answer[contract.CAPTIONS.name] = captions.reshape(len(numbers), 2)
            parts = np.array([[0.3, 0.4, 0.1, 0.1], [np.nan] * 4], dtype=np.float32)  # the second: not split
            answer[contract.CONTRIBUTIONS.name] = np.tile(parts, (len(numbers), 1, 1))
        return infer_result(answer)

    def get_server_metadata(self, headers: Any = None, client_timeout: Any = None) -> Any:
        if self.error is not None:
            raise self.error
        return service_pb2.ServerMetadataResponse(name="triton", version="2.51.0")

    def get_model_repository_index(self, headers: Any = None, client_timeout: Any = None) -> Any:
        response = service_pb2.RepositoryIndexResponse()
        for name, version, state in self.models:
            response.models.add(name=name, version=version, state=state)
        return response

    def get_model_config(self, model_name: str, headers: Any = None, client_timeout: Any = None) -> Any:
        config = model_config_pb2.ModelConfig(name=model_name, platform="ensemble", max_batch_size=16)
        config.output.add(name=contract.EMBEDDING.name, data_type=model_config_pb2.TYPE_FP32, dims=[DIM])
        config.parameters["postsim_weights"].string_value = "random"
        return service_pb2.ModelConfigResponse(config=config)

    def close(self) -> None:
        self.closed = True


class AsyncFakeTriton:
    """The asyncio form of FakeTriton, standing in for tritonclient.grpc.aio.InferenceServerClient."""

    def __init__(self) -> None:
        self.sync = FakeTriton()

    async def infer(self, *args: Any, **kwargs: Any) -> grpcclient.InferResult:
        await asyncio.sleep(0)
        return self.sync.infer(*args, **kwargs)

    async def get_server_metadata(self, **kwargs: Any) -> Any:
        return self.sync.get_server_metadata(**kwargs)

    async def get_model_repository_index(self, **kwargs: Any) -> Any:
        return self.sync.get_model_repository_index(**kwargs)

    async def get_model_config(self, model_name: str, **kwargs: Any) -> Any:
        return self.sync.get_model_config(model_name, **kwargs)

    async def close(self) -> None:
        self.sync.closed = True


@pytest.fixture
def fake() -> FakeTriton:
    return FakeTriton()


@pytest.fixture
def client(fake: FakeTriton) -> PostSimClient:
    client = PostSimClient(URL, timeout_s=5, headers={"x-tenant": "t1"})
    client._triton.close()
    client._triton = fake
    return client


def async_client(fake: AsyncFakeTriton) -> AsyncPostSimClient:
    client = AsyncPostSimClient(URL, timeout_s=5)
    client._client = fake
    return client


def numbered(count: int, start: int = 0) -> list[Post]:
    return [Post(text=f"post {n}", id=str(n)) for n in range(start, start + count)]


def grpc_exception(code: grpc.StatusCode, details: str) -> InferenceServerException:
    """The exception tritonclient's gRPC client raises for an RpcError with this code and details."""

    class RpcError(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return code

        def details(self) -> str:
            return details

        def debug_error_string(self) -> str:
            return f"debug: {details}"

    return get_error_grpc(RpcError())


# --------------------------------------------------------------------------- posts


@pytest.mark.parametrize(
    "fields",
    [{}, {"text": ""}, {"image": b""}, {"text": "", "image": b""}, {"id": "p1"}],
    ids=["nothing", "empty-text", "empty-image", "both-empty", "id-only"],
)
def test_post_needs_image_or_text(fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidPostError, match="a post needs an image, a text, or both"):
        Post(**fields)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"text": b"bytes"}, "Post.text must be a str or None; got bytes"),
        ({"image": "photo.jpg"}, r"got str 'photo.jpg': wrap a file path in Path"),
        ({"image": bytearray(b"x")}, "Post.image must be bytes, a pathlib.Path or None; got bytearray"),
        ({"text": "hi", "id": 7}, "Post.id must be a str or None; got int"),
        ({"text": "hi", "id": "a\nb"}, r"Post.id: post id 'a\\nb' has the character '\\n' \(U\+000A\)"),
        ({"text": "hi", "id": "x" * 129}, "Post.id: post id 'x{40}...' has 129 characters; a post id is 1 to 128"),
        ({"text": "hi", "id": ""}, "Post.id: a post id cannot be empty"),
    ],
)
def test_post_types_are_checked_with_got_and_expected(fields: dict[str, Any], expected: str) -> None:
    with pytest.raises(InvalidPostError, match=expected):
        Post(**fields)


def test_post_keeps_text_as_given() -> None:
    post = Post(text="  spaced  ", image=PNG)
    assert post.text == "  spaced  "
    assert post.image_bytes() == PNG
    assert Post(text="only text").image_bytes() == b""


def test_post_reads_an_image_path_lazily(tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    post = Post(image=path, id="p1")  # not there yet: nothing is read at construction
    path.write_bytes(PNG)
    assert post.image_bytes() == PNG
    assert "photo.png" in repr(post)
    assert "bytes>" in repr(Post(image=PNG))


def test_missing_empty_or_directory_image_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "missing.jpg"
    with pytest.raises(InvalidPostError, match=re.escape(str(missing))) as caught:
        Post(image=missing, id="p1").image_bytes()
    assert caught.value.__cause__ is None
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(InvalidPostError, match=f"{re.escape(str(empty))}.* is empty"):
        Post(image=empty).image_bytes()
    with pytest.raises(InvalidPostError, match=f"{re.escape(str(tmp_path))} .*is not a file"):
        Post(image=tmp_path).check_image_file()


# --------------------------------------------------------------------------- checks before sending


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        (0, "k must be a positive int .*got 0"),
        (-3, "got -3"),
        (1.5, "k must be a positive int; got float 1.5"),
        (True, "got bool True"),
        ("5", "got str '5'"),
        (2**31, "at most 2147483647"),
    ],
)
def test_bad_k_raises_before_any_request(client: PostSimClient, fake: FakeTriton, k: Any, expected: str) -> None:
    with pytest.raises(InvalidPostError, match=expected):
        client.similar(Post(text="post 1"), k=k)
    with pytest.raises(InvalidPostError, match=expected):
        client.similar_many(numbered(3), k=k)
    assert fake.calls == []


@pytest.mark.parametrize(
    ("posts", "expected"),
    [
        (Post(text="post 1"), r"takes a sequence of posts; got a single Post: pass \[post\]"),
        ("post 1", "takes a sequence of Post; got str"),
        ([Post(text="post 1"), {"text": "post 2"}], r"posts\[1\] must be a Post; got dict"),
        ({Post(text="post 1")}, "takes a sequence of Post; got set"),
    ],
)
def test_bad_posts_raise_before_any_request(client: PostSimClient, fake: FakeTriton, posts: Any, expected: str) -> None:
    with pytest.raises(InvalidPostError, match=expected):
        client.embed(posts)
    assert fake.calls == []


def test_similar_takes_one_post(client: PostSimClient, fake: FakeTriton) -> None:
    with pytest.raises(InvalidPostError, match="similar\\(\\) takes one Post; got list"):
        not_a_post: Any = [Post(text="post 1")]
        client.similar(not_a_post)
    assert fake.calls == []


def test_missing_image_in_a_later_chunk_raises_before_the_first_chunk_is_sent(
    client: PostSimClient, fake: FakeTriton, tmp_path: Path
) -> None:
    posts = numbered(20)
    posts[17] = Post(image=tmp_path / "gone.jpg", id="17")
    with pytest.raises(InvalidPostError, match=r"gone\.jpg"):
        client.embed(posts)
    assert fake.calls == []


def test_empty_batch_sends_nothing(client: PostSimClient, fake: FakeTriton) -> None:
    assert client.embed([]) == []
    assert client.similar_many([], k=3) == []
    assert fake.calls == []


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"url": "http://localhost:8001"}, "not an HTTP URL"),
        ({"url": ""}, "url must be a non-empty"),
        ({"timeout_s": 0}, "timeout_s must be a positive number"),
        ({"root_certificates": "ca.pem"}, "only used over TLS: pass ssl=True"),
        ({"ssl": True, "private_key": "key.pem"}, "private_key and certificate_chain go together"),
        ({"ssl": True, "root_certificates": "/nonexistent/ca.pem"}, "does not exist"),
        ({"headers": {"X-Tenant": "t1"}}, "lower-case"),
    ],
)
def test_bad_settings_are_refused_at_construction(kwargs: dict[str, Any], expected: str) -> None:
    for cls in (PostSimClient, AsyncPostSimClient):
        with pytest.raises(PostSimError, match=expected):
            cls(**kwargs)


# --------------------------------------------------------------------------- requests


def test_request_tensors_for_mixed_posts(tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    path.write_bytes(PNG + b"file")
    posts = [Post(text="only text"), Post(image=PNG), Post(text="both, ünïcode", image=path)]
    inputs = build_inputs(posts)
    assert [(t.name(), t.datatype(), list(t.shape())) for t in inputs] == [
        ("IMAGE", "BYTES", [3, 1]),
        ("TEXT", "BYTES", [3, 1]),
    ]
    images, texts = (tensor_values(t)[:, 0].tolist() for t in inputs)
    assert images == [b"", PNG, PNG + b"file"]
    assert texts == [b"only text", b"", "both, ünïcode".encode()]

    with_k = build_inputs(posts, k=7)
    top_k = with_k[2]
    assert (top_k.name(), top_k.datatype(), list(top_k.shape())) == ("TOP_K", "INT32", [3, 1])
    assert tensor_values(top_k)[:, 0].tolist() == [7, 7, 7]


def test_text_that_is_not_utf8_encodable_names_the_post() -> None:
    with pytest.raises(InvalidPostError, match="the text of post 4 cannot be encoded as UTF-8"):
        build_inputs([Post(text="bad \ud800 surrogate")], first=4)


def test_embed_splits_20_posts_into_16_and_4_in_order(client: PostSimClient, fake: FakeTriton) -> None:
    results = client.embed(numbered(20))
    assert [len(tensor_values(call["inputs"][0])) for call in fake.calls] == [16, 4]
    assert all(call["model"] == "post_embedding" for call in fake.calls)
    assert fake.calls[0]["outputs"] == ["EMBEDDING", "MODALITY_WEIGHTS", "IMAGE_EMBEDDING", "TEXT_EMBEDDING"]
    assert fake.calls[0]["client_timeout"] == 5.0
    assert fake.calls[0]["headers"] == {"x-tenant": "t1"}
    assert [int(result.embedding[0]) for result in results] == list(range(20))
    first = results[0]
    assert isinstance(first, EmbeddingResult)
    assert first.embedding.dtype == np.float32 and first.embedding.shape == (DIM,)
    assert first.embedding.flags.writeable
    assert (first.image_weight, first.text_weight) == (0.25, 0.75)
    assert first.image_embedding[1] == 1.0 and first.text_embedding[2] == 1.0


def test_similar_sends_top_k_and_returns_neighbours(client: PostSimClient, fake: FakeTriton) -> None:
    neighbors = client.similar(Post(text="post 3"), k=2)
    assert all(isinstance(n, Neighbor) for n in neighbors)
    assert [(n.id, round(n.score, 3)) for n in neighbors] == [("3-a", 0.9), ("3-b", 0.5)]
    assert [n.text for n in neighbors] == ["caption 3", None]  # "" on the wire: the index does not know it
    assert neighbors[0].parts is not None and neighbors[0].parts.text_text == pytest.approx(0.4)
    assert neighbors[0].parts.total == pytest.approx(0.9)
    assert neighbors[1].parts is None  # NaN on the wire: an index without unimodal vectors
    (call,) = fake.calls
    assert call["model"] == "similar_posts"
    assert [t.name() for t in call["inputs"]] == ["IMAGE", "TEXT", "TOP_K"]
    assert call["outputs"] == [
        "IDS",
        "SCORES",
        "CAPTIONS",
        "CONTRIBUTIONS",
        "EMBEDDING",
        "MODALITY_WEIGHTS",
        "IMAGE_EMBEDDING",
        "TEXT_EMBEDDING",
    ]

    many = client.similar_many(numbered(18), k=2)
    assert [len(tensor_values(call["inputs"][0])) for call in fake.calls[1:]] == [16, 2]
    assert isinstance(many[17], SimilarResult)
    assert [n.id for n in many[17].neighbors] == ["17-a", "17-b"]
    assert int(many[17].embedding[0]) == 17


def test_a_response_of_the_wrong_shape_is_a_server_error(client: PostSimClient, fake: FakeTriton) -> None:
    def short_answer(*args: Any, **kwargs: Any) -> grpcclient.InferResult:
        return infer_result(
            {"EMBEDDING": np.zeros((1, DIM), np.float32), "MODALITY_WEIGHTS": np.zeros((1, 2), np.float32)}
        )

    fake.infer = short_answer  # type: ignore[method-assign]
    with pytest.raises(ServerError, match=r"returned EMBEDDING of shape \(1, 8\) for 2 posts; expected \(2, n\)"):
        client.embed(numbered(2))


def test_server_info_reads_metadata_index_and_weights(client: PostSimClient, fake: FakeTriton) -> None:
    info = client.server_info()
    assert isinstance(info, ServerInfo)
    assert (info.url, info.server, info.version) == (URL, "triton", "2.51.0")
    assert info.weights == "random" and info.dim == DIM
    assert info.is_ready("post_embedding") and not info.is_ready("similar_posts")

    fake.models = [("post_embedding", "1", "UNAVAILABLE")]
    info = client.server_info()
    assert info.weights is None and info.dim is None
    assert not info.is_ready("post_embedding")


def test_client_is_a_context_manager(fake: FakeTriton) -> None:
    with PostSimClient(URL) as client:
        client._triton.close()
        client._triton = fake
    assert fake.closed


# --------------------------------------------------------------------------- error mapping


def test_tritonclient_status_is_the_grpc_code_as_a_string() -> None:
    exc = grpc_exception(grpc.StatusCode.INVALID_ARGUMENT, "bad")
    assert exc.status() == "StatusCode.INVALID_ARGUMENT"  # what the mapping parses


def test_unreachable_server_maps_to_server_unavailable() -> None:
    exc = grpc_exception(
        grpc.StatusCode.UNAVAILABLE,
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:8001: "
        "Failed to connect to remote host: Connection refused",
    )
    error = map_server_error(exc, url=URL, model="post_embedding")
    assert type(error) is ServerUnavailableError
    assert error.status == "UNAVAILABLE"
    assert URL in str(error) and "`postsim serve`" in str(error) and "`--url`" in str(error)
    assert "Connection refused" in str(error)


def test_deadline_exceeded_maps_to_server_unavailable_with_the_timeout() -> None:
    error = map_server_error(
        grpc_exception(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"),
        url=URL,
        model="post_embedding",
        what="posts 0..15",
        timeout_s=2.5,
    )
    assert type(error) is ServerUnavailableError
    assert error.status == "DEADLINE_EXCEEDED"
    assert "within 2.5 s" in str(error) and "posts 0..15" in str(error) and URL in str(error)


def test_cancelled_by_the_server_maps_to_server_unavailable_that_says_it_is_stopping() -> None:
    error = map_server_error(
        grpc_exception(grpc.StatusCode.CANCELLED, "CANCELLED"), url=URL, model="post_embedding", what="posts 0..7"
    )
    assert type(error) is ServerUnavailableError
    assert error.status == "CANCELLED"
    assert "shutting down" in str(error) and "posts 0..7" in str(error) and URL in str(error)


def test_invalid_argument_maps_to_invalid_post_and_keeps_the_server_message() -> None:
    message = "in ensemble 'post_embedding', IMAGE: post 2 is not a decodable image (cannot identify image file)"
    error = map_server_error(
        grpc_exception(grpc.StatusCode.INVALID_ARGUMENT, message), url=URL, model="post_embedding", what="posts 16..19"
    )
    assert type(error) is InvalidPostError
    assert message in str(error)
    assert "model 'post_embedding'" in str(error) and "posts 16..19" in str(error)


@pytest.mark.parametrize(
    ("code", "details"),
    [
        # Triton 2.51 (explicit model control, nothing loaded under that name).
        (grpc.StatusCode.NOT_FOUND, "Request for unknown model: 'similar_posts' is not found"),
        (grpc.StatusCode.NOT_FOUND, "Request for unknown model: 'similar_posts' has no available versions"),
        (grpc.StatusCode.UNAVAILABLE, "Request for unknown model: 'similar_posts' version 1 is not at ready state"),
        (grpc.StatusCode.INVALID_ARGUMENT, "Request for unknown model: 'similar_posts' is not found"),
    ],
)
def test_model_not_loaded_is_a_server_error_that_says_to_publish_an_index(code: grpc.StatusCode, details: str) -> None:
    error = map_server_error(grpc_exception(code, details), url=URL, model="similar_posts")
    assert type(error) is ServerError  # not "unreachable", not "bad post"
    assert error.status == code.name
    assert "model 'similar_posts' is not loaded" in str(error)
    assert "`postsim index publish`" in str(error) and URL in str(error)


def test_post_embedding_not_loaded_points_at_the_server_log() -> None:
    error = map_server_error(
        grpc_exception(grpc.StatusCode.NOT_FOUND, "Request for unknown model: 'post_embedding' is not found"),
        url=URL,
        model="post_embedding",
    )
    assert type(error) is ServerError
    assert "index publish" not in str(error) and "`postsim serve`" in str(error)


def test_other_statuses_map_to_server_error_with_model_and_status() -> None:
    error = map_server_error(
        grpc_exception(grpc.StatusCode.INTERNAL, "internal error; the server log has the details\nTraceback ..."),
        url=URL,
        model="post_embedding",
    )
    assert type(error) is ServerError
    assert error.status == "INTERNAL"
    assert "model 'post_embedding'" in str(error) and "internal error" in str(error)
    assert "Traceback" not in str(error)


def test_client_side_tritonclient_error_has_no_status() -> None:
    error = map_server_error(InferenceServerException(msg="input_tensor must be a numpy array"), url=URL)
    assert type(error) is ServerError and error.status is None
    assert "could not build the request" in str(error)


def test_client_raises_mapped_errors_from_none(client: PostSimClient, fake: FakeTriton) -> None:
    fake.error = grpc_exception(grpc.StatusCode.INVALID_ARGUMENT, "TEXT: post 3 is too long")
    with pytest.raises(InvalidPostError, match=r"for posts 0\.\.15: TEXT: post 3 is too long") as caught:
        client.embed(numbered(20))
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    fake.error = grpc_exception(grpc.StatusCode.UNAVAILABLE, "Socket closed")
    with pytest.raises(ServerUnavailableError) as unavailable:
        client.server_info()
    assert unavailable.value.__suppress_context__


# --------------------------------------------------------------------------- nothing listening


def test_sync_client_against_a_closed_port() -> None:
    url = f"127.0.0.1:{free_ports(1)[0]}"
    with PostSimClient(url, timeout_s=2) as client:
        started = time.monotonic()
        with pytest.raises(
            ServerUnavailableError, match=f"cannot reach the postsim server at {re.escape(url)}"
        ) as caught:
            client.embed([Post(text="hello")])
        assert caught.value.status == "UNAVAILABLE"
        assert caught.value.__cause__ is None and caught.value.__suppress_context__
        assert "`postsim serve`" in str(caught.value)
        with pytest.raises(ServerUnavailableError, match=re.escape(url)):
            client.server_info()
        assert client.is_ready() is False
        with pytest.raises(ServerUnavailableError, match=rf"{re.escape(url)} was not ready within 0\.2 s"):
            client.wait_until_ready(timeout_s=0.2)
        assert time.monotonic() - started < 5


def test_async_client_against_a_closed_port() -> None:
    url = f"127.0.0.1:{free_ports(1)[0]}"

    async def scenario() -> None:
        async with AsyncPostSimClient(url, timeout_s=2) as client:
            with pytest.raises(
                ServerUnavailableError, match=f"cannot reach the postsim server at {re.escape(url)}"
            ) as caught:
                await client.embed([Post(text="hello")])
            assert caught.value.__cause__ is None and caught.value.__suppress_context__
            with pytest.raises(ServerUnavailableError, match=re.escape(url)):
                await client.similar(Post(text="hello"), k=3)
            assert await client.is_ready() is False
            with pytest.raises(ServerUnavailableError, match=r"was not ready within 0\.2 s"):
                await client.wait_until_ready(timeout_s=0.2)

    started = time.monotonic()
    asyncio.run(scenario())
    assert time.monotonic() - started < 5


# --------------------------------------------------------------------------- async, same behaviour


def test_async_client_chunks_in_order_and_checks_before_sending(tmp_path: Path) -> None:
    fake = AsyncFakeTriton()

    async def scenario() -> None:
        async with async_client(fake) as client:
            results = await client.embed(numbered(40))
            assert [int(r.embedding[0]) for r in results] == list(range(40))
            assert sorted(len(tensor_values(c["inputs"][0])) for c in fake.sync.calls) == [8, 16, 16]

            similar = await client.similar_many(numbered(20), k=2)
            assert [s.neighbors[0].id for s in similar] == [f"{n}-a" for n in range(20)]
            assert (await client.similar(Post(text="post 5"), k=2))[1].id == "5-b"

            fake.sync.calls.clear()
            with pytest.raises(InvalidPostError, match="k must be a positive int"):
                await client.similar(Post(text="post 1"), k=0)
            with pytest.raises(InvalidPostError, match=r"gone\.jpg"):
                await client.embed([*numbered(16), Post(image=tmp_path / "gone.jpg")])
            assert fake.sync.calls == []

            info = await client.server_info()
            assert info.weights == "random" and info.dim == DIM

    asyncio.run(scenario())
    assert fake.sync.closed


def test_async_client_maps_errors_and_stops_the_other_chunks() -> None:
    fake = AsyncFakeTriton()
    fake.sync.error = grpc_exception(
        grpc.StatusCode.NOT_FOUND, "Request for unknown model: 'similar_posts' is not found"
    )

    async def scenario() -> None:
        async with async_client(fake) as client:
            with pytest.raises(ServerError, match="`postsim index publish`") as caught:
                await client.similar_many(numbered(100), k=2)
            assert caught.value.__suppress_context__
            await asyncio.sleep(0.01)

    asyncio.run(scenario())
    # At most the chunks already in flight (4) ran; the queued ones were cancelled.
    assert len(fake.sync.calls) <= 4


def _sequence(posts: Sequence[Post]) -> Sequence[Post]:
    return tuple(posts)


def test_any_sequence_of_posts_is_accepted(client: PostSimClient) -> None:
    assert len(client.embed(_sequence(numbered(3)))) == 3


def _public_methods(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_") and callable(getattr(cls, name))}


def test_the_async_client_has_every_method_of_the_blocking_one_awaited() -> None:
    assert _public_methods(AsyncPostSimClient) == _public_methods(PostSimClient)
    for name in _public_methods(PostSimClient) - {"from_settings"}:
        assert asyncio.iscoroutinefunction(getattr(AsyncPostSimClient, name)), name


def test_the_async_client_loads_models_and_reads_their_readiness_like_the_blocking_one() -> None:
    class ModelControl:
        def __init__(self) -> None:
            self.loaded: list[str] = []

        async def load_model(self, model_name: str, headers: Any = None, client_timeout: Any = None) -> None:
            if model_name == "broken":
                raise grpc_exception(grpc.StatusCode.INVALID_ARGUMENT, "failed to load 'broken': no version")
            self.loaded.append(model_name)

        async def is_model_ready(self, model_name: str, model_version: str = "", **kwargs: Any) -> bool:
            return model_name in self.loaded

        async def close(self) -> None:
            pass

    async def scenario() -> None:
        async with AsyncPostSimClient(URL) as client:
            client._client = ModelControl()
            assert not await client.is_model_ready("retrieval")
            await client.load_model("retrieval")
            assert await client.is_model_ready("retrieval", "1")
            with pytest.raises(ServerError, match="did not load model 'broken' and keeps serving") as caught:
                await client.load_model("broken")
            assert caught.value.__suppress_context__

    asyncio.run(scenario())
