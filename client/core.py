"""What the blocking and the asyncio client share: everything but the I/O.

Each public method of the clients is written once here, as an *operation*: a generator that
checks its arguments, yields the gRPC calls it needs (:class:`Call`, or :class:`Gather` for
the chunks of a batch) and a :class:`Pause` between readiness polls, gets each call's
answer back, and returns the method's result. :class:`~postsim.client.api.PostSimClient`
runs an operation with blocking calls, :class:`~postsim.client.api.AsyncPostSimClient` with
awaited ones (the chunks of a batch a few at a time); neither knows what any method does.

A call that fails comes back into the operation as the postsim exception
:func:`~postsim.client.errors.map_server_error` makes of it, already raised ``from None``;
an operation that does not catch it lets it reach the caller.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
import tritonclient.grpc as grpcclient

from postsim.client.errors import load_error, map_server_error
from postsim.client.explain import DEFAULT_GRID, Explanation, explain_operation
from postsim.client.posts import (
    ChangeReport,
    EmbeddingResult,
    ModelStatus,
    Neighbor,
    Post,
    ScoreParts,
    ServedRepository,
    ServerInfo,
    SimilarResult,
)
from postsim.client.settings import ClientSettings, checked_timeout
from postsim.client.shrink import shrink_image
from postsim.core.errors import InvalidPostError, PostSimError, ServerError, ServerUnavailableError
from postsim.model_repository import contract
from postsim.model_repository.live_index.wire import ChangeRequest, Control, receipt_from_json

_T = TypeVar("_T")

EMBED_OUTPUTS = tuple(tensor.name for tensor in contract.POST_OUTPUTS)
SIMILAR_OUTPUTS = (*(tensor.name for tensor in contract.NEIGHBOR_OUTPUTS), *EMBED_OUTPUTS)
FILTERED_OUTPUTS = tuple(tensor.name for tensor in contract.LIVE_QUERY_OUTPUTS)
CHANGE_OUTPUTS = (contract.CHANGE_STATUS.name, contract.SEQUENCE.name)
MAX_CHUNKS_IN_FLIGHT = 4
"""How many chunks of a batch the asyncio client sends at once."""
POLL_S = 0.5
"""Between two readiness polls of ``wait_until_ready``."""
_IMAGE_COLUMN = contract.MODALITIES.index("image")
_TEXT_COLUMN = contract.MODALITIES.index("text")
_INT32_MAX = int(np.iinfo(np.int32).max)


# --------------------------------------------------------------------------- what an operation yields


@dataclass(frozen=True, kw_only=True)
class Call(Generic[_T]):
    """One call of tritonclient's ``InferenceServerClient``: the same method, by name, in its blocking and aio forms.

    ``arguments`` is called when the call is sent (an inference reads its posts' image files
    then, chunk by chunk); ``parse`` turns the answer into what the operation gets back.
    ``model`` and ``what`` word the error when the call fails.
    """

    method: str
    arguments: Callable[[], dict[str, Any]]
    parse: Callable[[Any], _T]
    model: str | None = None
    what: str = ""


@dataclass(frozen=True)
class Gather(Generic[_T]):
    """Calls whose answers the operation gets back together, in order; the first failure fails them all.

    The blocking client sends them one after the other, the asyncio client a few at a time.
    """

    calls: tuple[Call[_T], ...]


@dataclass(frozen=True)
class Pause:
    """Wait ``seconds`` before the next call (``time.sleep``, or ``asyncio.sleep``)."""

    seconds: float


Step = Call[Any] | Gather[Any] | Pause
Operation = Generator[Step, Any, _T]
"""A client method without its I/O: yields steps, receives each one's result, returns the method's."""


def _same(answer: _T) -> _T:
    return answer


# --------------------------------------------------------------------------- the operations


@dataclass(frozen=True)
class ClientCore:
    """The client's methods as operations over checked settings."""

    settings: ClientSettings = field(default_factory=ClientSettings)

    def error(self, exc: Exception, call: Call[Any]) -> PostSimError:
        """The postsim exception for a failed call, ready to be thrown into its operation (``from None``)."""
        settings = self.settings
        error = map_server_error(
            exc,
            url=settings.url,
            model=call.model,
            what=call.what,
            timeout_s=settings.timeout_s,
            ssl=settings.ssl,
            client_certificate=settings.client_certificate,
            admin_key=settings.sends_admin_key,
        )
        error.__cause__, error.__suppress_context__ = None, True
        return error

    def call(
        self,
        method: str,
        *,
        model: str | None = None,
        what: str = "",
        parse: Callable[[Any], _T] = _same,
        client_timeout: float | None = None,
        **arguments: Any,
    ) -> Call[_T]:
        """A call with the settings' headers and timeout (``client_timeout`` instead, when given)."""
        timeout = self.settings.timeout_s if client_timeout is None else client_timeout
        headers = self.settings.grpc_headers
        return Call(
            method=method,
            arguments=lambda: {**arguments, "headers": headers, "client_timeout": timeout},
            parse=parse,
            model=model,
            what=what,
        )

    def _infer(
        self,
        model: str,
        posts: list[Post],
        start: int,
        outputs: Sequence[str],
        k: int | None,
        parse: Callable[[Any], _T],
    ) -> Call[_T]:
        def arguments() -> dict[str, Any]:
            return {
                "model_name": model,
                "inputs": build_inputs(posts, k=k, first=start, shrink=self.settings.shrink_images),
                "outputs": [grpcclient.InferRequestedOutput(name) for name in outputs],
                "headers": self.settings.grpc_headers,
                "client_timeout": self.settings.timeout_s,
            }

        return Call(method="infer", arguments=arguments, parse=parse, model=model, what=_span(start, len(posts)))

    def embed(self, posts: Sequence[Post]) -> Operation[list[EmbeddingResult]]:
        """The fused embedding of each post, in order (chunks of at most ``max_batch_size``)."""
        batch = checked_posts(posts, "embed")
        model = contract.POST_EMBEDDING
        calls = tuple(
            self._infer(model, chunk, start, EMBED_OUTPUTS, None, _parser(embedding_results, model, len(chunk)))
            for start, chunk in chunks(batch)
        )
        parts: list[list[EmbeddingResult]] = yield Gather(calls)
        return [result for part in parts for result in part]

    def similar_many(self, posts: Sequence[Post], k: int = 10) -> Operation[list[SimilarResult]]:
        """For each post, in order: its ``k`` nearest indexed posts (best first) and its embedding."""
        top_k = checked_k(k)
        batch = checked_posts(posts, "similar_many")
        model = contract.SIMILAR_POSTS
        calls = tuple(
            self._infer(model, chunk, start, SIMILAR_OUTPUTS, top_k, _parser(similar_results, model, len(chunk)))
            for start, chunk in chunks(batch)
        )
        parts: list[list[SimilarResult]] = yield Gather(calls)
        return [result for part in parts for result in part]

    def similar(self, post: Post, k: int = 10) -> Operation[list[Neighbor]]:
        """The ``k`` indexed posts nearest to ``post``, best first."""
        if not isinstance(post, Post):
            raise InvalidPostError(f"similar() takes one Post; got {type(post).__name__}")
        results = yield from self.similar_many([post], k)
        return results[0].neighbors

    def similar_filtered(
        self,
        post: Post | None,
        k: int,
        *,
        query_id: str | None = None,
        where: Mapping[str, object] | None = None,
        collapse_above: float | None = None,
    ) -> Operation[list[Neighbor]]:
        """The ``k`` posts nearest to ``post`` (or to the indexed post ``query_id``) that pass ``where``.

        Served by ``similar_posts_filtered``. ``where``: the filter fields (``exclude_ids``,
        ``exclude_author``, ``created_after``, ``created_before``, ``labels``, ``tags``);
        ``collapse_above``: fold results more similar than this to a better one into it.
        """
        top_k = checked_k(k)
        if (post is None) == (query_id is None):
            raise InvalidPostError("give a post or a query_id (an indexed post's id), not both and not neither")
        if collapse_above is not None and not 0.0 < collapse_above < 1.0:
            raise InvalidPostError(f"collapse_above must be within 0 and 1 (a cosine), got {collapse_above}")
        if post is not None and not isinstance(post, Post):
            raise InvalidPostError(f"similar() takes one Post; got {type(post).__name__}")
        model = contract.SIMILAR_POSTS_FILTERED

        def arguments() -> dict[str, Any]:
            inputs = (
                build_inputs([post], k=top_k, shrink=self.settings.shrink_images)
                if post is not None
                else [_top_k_input(top_k, 1)]
            )
            if query_id is not None:
                inputs.append(_bytes_input(contract.QUERY_ID, [query_id.encode()]))
            if where:
                inputs.append(_bytes_input(contract.FILTER, [json.dumps(dict(where)).encode()]))
            if collapse_above is not None:
                threshold = np.full((1, 1), collapse_above, dtype=contract.COLLAPSE_ABOVE.dtype.numpy)
                inputs.append(_numpy_input(contract.COLLAPSE_ABOVE, threshold))
            return {
                "model_name": model,
                "inputs": inputs,
                "outputs": [grpcclient.InferRequestedOutput(name) for name in FILTERED_OUTPUTS],
                "headers": self.settings.grpc_headers,
                "client_timeout": self.settings.timeout_s,
            }

        what = f"query id {query_id!r}" if query_id is not None else "post 0"
        neighbors: list[Neighbor] = yield Call(
            method="infer",
            arguments=arguments,
            parse=lambda result: filtered_results(result, model),
            model=model,
            what=what,
        )
        return neighbors

    def upsert(
        self, posts: Sequence[Post], metadata: Sequence[Mapping[str, object] | None] | None = None
    ) -> Operation[ChangeReport]:
        """Add each post (``Post.id`` required) or replace the indexed post with its id; ``metadata``: one per post.

        Sent in calls of at most ``max_batch_size`` posts, each applied atomically and
        acknowledged once the server has it on stable storage and serves it.
        """
        batch = checked_posts(posts, "upsert")
        ids = _change_ids([post.id for post in batch], "upsert")
        if metadata is not None and len(metadata) != len(batch):
            raise InvalidPostError(f"upsert: metadata must be one per post, got {len(metadata)} for {len(batch)}")
        texts = [json.dumps(dict(fields)).encode() if fields else b"" for fields in (metadata or [None] * len(batch))]

        def call(start: int, chunk: list[Post]) -> Call[list[tuple[str, str, int]]]:
            def arguments() -> dict[str, Any]:
                inputs = [
                    _bytes_input(contract.POST_ID, [post_id.encode() for post_id in ids[start : start + len(chunk)]]),
                    *build_inputs(chunk, first=start, shrink=self.settings.shrink_images),
                    _bytes_input(contract.POST_METADATA, texts[start : start + len(chunk)]),
                ]
                return self._change_arguments(inputs)

            chunk_ids = ids[start : start + len(chunk)]
            return Call(
                method="infer",
                arguments=arguments,
                parse=lambda result: change_results(result, chunk_ids),
                model=contract.POST_CHANGES,
                what=_span(start, len(chunk)),
            )

        parts: list[list[tuple[str, str, int]]] = yield Gather(
            tuple(call(start, chunk) for start, chunk in chunks(batch))
        )
        return change_report(parts)

    def delete(self, ids: Sequence[str]) -> Operation[ChangeReport]:
        """Delete the indexed posts with these ids: none is in any result of a query sent after this returns.

        Ids no indexed post has are reported in ``ChangeReport.unknown``, nothing done for them.
        """
        wanted = _change_ids(list(ids), "delete")

        def call(start: int, chunk: list[str]) -> Call[list[tuple[str, str, int]]]:
            inputs = lambda: self._change_arguments(  # noqa: E731
                [_bytes_input(contract.POST_ID, [post_id.encode() for post_id in chunk])]
            )
            return Call(
                method="infer",
                arguments=inputs,
                parse=lambda result: change_results(result, chunk),
                model=contract.POST_CHANGES,
                what=f"ids {start}..{start + len(chunk) - 1}",
            )

        size = contract.MAX_BATCH_SIZE
        calls = tuple(call(start, wanted[start : start + size]) for start in range(0, len(wanted), size))
        parts: list[list[tuple[str, str, int]]] = yield Gather(calls)
        return change_report(parts)

    def control_changes(self, control: Control) -> Operation[int]:
        """Seal (or unseal) the live index ``retrieval`` serves; returns the sequence number of its last change.

        Compaction seals the version it replaces, so that the journal tail it hands over is complete.
        """
        request = ChangeRequest(control=control).to_json()
        model = contract.RETRIEVAL

        def arguments() -> dict[str, Any]:
            return {
                "model_name": model,
                "inputs": [_bytes_input(contract.CHANGES, [request])],
                "outputs": [grpcclient.InferRequestedOutput(contract.CHANGE_RECEIPT.name)],
                "headers": self.settings.grpc_headers,
                "client_timeout": self.settings.timeout_s,
            }

        def parse(result: Any) -> int:
            raw = _output(result, contract.CHANGE_RECEIPT.name, model, 1, 1)[0, 0]
            return receipt_from_json(raw).sequence

        sequence: int = yield Call(method="infer", arguments=arguments, parse=parse, model=model, what=control.value)
        return sequence

    def _change_arguments(self, inputs: list[grpcclient.InferInput]) -> dict[str, Any]:
        return {
            "model_name": contract.POST_CHANGES,
            "inputs": inputs,
            "outputs": [grpcclient.InferRequestedOutput(name) for name in CHANGE_OUTPUTS],
            "headers": self.settings.grpc_headers,
            "client_timeout": self.settings.timeout_s,
        }

    def explain(self, query: Post, target: Post | EmbeddingResult, grid: int = DEFAULT_GRID) -> Operation[Explanation]:
        """Which words and image regions of ``query`` drive its similarity to ``target``, and the score's four parts.

        ``target`` is a second post (embedded first) or an embedding already known, such as
        an indexed post's (``postsim.explanation.indexed_target``). See :mod:`postsim.client.explain`.
        """
        if isinstance(target, Post):
            (target,) = yield from self.embed([target])
        elif not isinstance(target, EmbeddingResult):
            raise InvalidPostError(f"explain() compares with a Post or an EmbeddingResult; got {type(target).__name__}")
        return (yield from explain_operation(self.embed, query, target, grid))

    def not_ready_reason(self, client_timeout: float | None = None) -> Operation[str | None]:
        """None when the server is live and ``post_embedding`` is ready, else why not; never raises for that."""
        model = contract.POST_EMBEDDING
        try:
            if not (yield self.call("is_server_live", model=model, client_timeout=client_timeout)):
                return "the server is not live"
            if not (yield self.call("is_model_ready", model_name=model, model=model, client_timeout=client_timeout)):
                return f"model '{model}' is not ready"
        except PostSimError as error:
            return str(error)
        return None

    def wait_until_ready(self, timeout_s: float = 60.0) -> Operation[None]:
        """Poll readiness until the server is ready; ServerUnavailableError after ``timeout_s``."""
        limit = checked_timeout(timeout_s, "wait_until_ready timeout_s")
        if limit is None:
            raise PostSimError("wait_until_ready timeout_s must be a positive number of seconds; got None")
        deadline = time.monotonic() + limit
        while True:
            remaining = deadline - time.monotonic()
            reason = yield from self.not_ready_reason(self.settings.poll_timeout(remaining))
            if reason is None:
                return
            if time.monotonic() + POLL_S > deadline:
                raise ServerUnavailableError(
                    f"the server at {self.settings.url} was not ready within {limit:g} s ({reason}): "
                    "start it with `postsim serve` or check `--url`",
                    status="UNAVAILABLE",
                )
            yield Pause(POLL_S)

    def server_info(self) -> Operation[ServerInfo]:
        """The server's version, its models and their states, and how ``post_embedding`` was built."""
        metadata = yield self.call("get_server_metadata")
        index = yield self.call("get_model_repository_index")
        ready = any(entry.name == contract.POST_EMBEDDING and entry.state == "READY" for entry in index.models)
        served = (yield from self.served_repository()) if ready else ServedRepository()
        models = tuple(
            ModelStatus(name=entry.name, version=entry.version, state=entry.state, reason=entry.reason)
            for entry in index.models
        )
        url = self.settings.url
        return ServerInfo(url=url, server=metadata.name, version=metadata.version, models=models, served=served)

    def served_repository(self) -> Operation[ServedRepository]:
        """Which export ``post_embedding`` comes from (weights, fingerprint, repository id); needs no admin key."""
        model = contract.POST_EMBEDDING
        response = yield self.call("get_model_config", model_name=model, model=model)
        return served_repository(response.config)

    def served_retrieval(self) -> Operation[contract.RetrievalSettings]:
        """Where ``retrieval`` keeps the posts (its config): in the server's own FAISS index, or in a Milvus.

        ``retrieval`` loads with the first published index; before that this raises ServerError.
        """
        model = contract.RETRIEVAL
        response = yield self.call("get_model_config", model_name=model, model=model)
        return contract.RetrievalSettings.from_parameters(contract.config_parameters(response.config))

    def load_model(self, model: str) -> Operation[None]:
        """(Re)load a model through Triton's model-control API: new versions load while the old one serves.

        Triton loads a model again only if its files changed on disk. A server started with
        an admin key needs it (``admin_key=``). A version the server refuses raises
        ServerError with its reason; the version it had keeps serving.
        """
        try:
            yield self.call("load_model", model_name=model, model=model)
        except PostSimError as error:
            raise load_error(error, model) from None

    def is_model_ready(self, model: str, version: str = "") -> Operation[bool]:
        ready = yield self.call("is_model_ready", model_name=model, model_version=version, model=model)
        return bool(ready)


# --------------------------------------------------------------------------- requests


def checked_posts(posts: Sequence[Post], caller: str) -> list[Post]:
    """The posts as a list, each checked to be a Post whose image file (if any) exists."""
    if isinstance(posts, Post):
        raise InvalidPostError(f"{caller}() takes a sequence of posts; got a single Post: pass [post]")
    if isinstance(posts, str | bytes | bytearray) or not isinstance(posts, Sequence):
        raise InvalidPostError(f"{caller}() takes a sequence of Post; got {type(posts).__name__}")
    checked = list(posts)
    for index, post in enumerate(checked):
        if not isinstance(post, Post):
            raise InvalidPostError(f"{caller}(): posts[{index}] must be a Post; got {type(post).__name__}")
        post.check_image_file()
    return checked


def checked_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise InvalidPostError(f"k must be a positive int; got {type(k).__name__} {k!r}")
    if not 1 <= k <= _INT32_MAX:
        raise InvalidPostError(f"k must be a positive int (at most {_INT32_MAX}); got {k}")
    return int(k)


def chunks(posts: list[Post], size: int = contract.MAX_BATCH_SIZE) -> list[tuple[int, list[Post]]]:
    """``(index of the first post, posts)`` for consecutive chunks of at most ``size`` posts."""
    return [(start, posts[start : start + size]) for start in range(0, len(posts), size)]


def _span(start: int, count: int) -> str:
    return f"post {start}" if count == 1 else f"posts {start}..{start + count - 1}"


def _bytes_input(spec: contract.TensorSpec, values: list[bytes]) -> grpcclient.InferInput:
    array = np.empty((len(values), 1), dtype=np.object_)
    for row, value in enumerate(values):
        array[row, 0] = value
    tensor = grpcclient.InferInput(spec.name, list(array.shape), spec.dtype.wire)
    tensor.set_data_from_numpy(array)
    return tensor


def _numpy_input(spec: contract.TensorSpec, array: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(spec.name, list(array.shape), spec.dtype.wire)
    tensor.set_data_from_numpy(array)
    return tensor


def _top_k_input(k: int, rows: int) -> grpcclient.InferInput:
    return _numpy_input(contract.TOP_K, np.full((rows, 1), k, dtype=contract.TOP_K.dtype.numpy))


def _change_ids(ids: list[str | None], caller: str) -> list[str]:
    """The ids of a change, each a valid post id, each once."""
    if not ids:
        raise InvalidPostError(f"{caller}: no posts given")
    checked = []
    for position, post_id in enumerate(ids):
        problem = "it has none" if post_id is None else contract.post_id_problem(post_id)
        if problem:
            raise InvalidPostError(f"{caller}: post {position}: {problem}")
        checked.append(str(post_id))
    repeated = sorted({post_id for post_id in checked if checked.count(post_id) > 1})
    if repeated:
        raise InvalidPostError(f"{caller}: each id at most once per call; repeated: {repeated[:5]}")
    return checked


def build_inputs(
    posts: Sequence[Post], *, k: int | None = None, first: int = 0, shrink: bool = False
) -> list[grpcclient.InferInput]:
    """The request tensors for one chunk: IMAGE and TEXT as ``[B, 1]`` BYTES, TOP_K if ``k``.

    Reads image files now. ``first`` is the index of ``posts[0]`` in the caller's batch,
    for error messages. An absent image or text is sent as an empty element. ``shrink``
    sends each image at the encoder's scale (:func:`~postsim.client.shrink.shrink_image`).
    """
    images: list[bytes] = []
    texts: list[bytes] = []
    for offset, post in enumerate(posts):
        images.append(shrink_image(post.image_bytes()) if shrink else post.image_bytes())
        try:
            texts.append((post.text or "").encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise InvalidPostError(
                f"the text of post {first + offset} cannot be encoded as UTF-8: {exc.reason} at character {exc.start}"
            ) from None
    inputs = [_bytes_input(contract.IMAGE, images), _bytes_input(contract.TEXT, texts)]
    if k is not None:
        inputs.append(_top_k_input(k, len(posts)))
    return inputs


# --------------------------------------------------------------------------- responses


def _parser(parse: Callable[[Any, str, int], _T], model: str, rows: int) -> Callable[[Any], _T]:
    return lambda result: parse(result, model, rows)


def _output(result: Any, name: str, model: str, rows: int, columns: int | None = None) -> np.ndarray:
    array = result.as_numpy(name)
    if array is None:
        raise ServerError(f"model '{model}' returned no {name} output")
    if array.ndim != 2 or array.shape[0] != rows or (columns is not None and array.shape[1] != columns):
        expected = f"({rows}, {columns if columns is not None else 'n'})"
        raise ServerError(
            f"model '{model}' returned {name} of shape {tuple(array.shape)} for {rows} posts; expected {expected}"
        )
    return np.asarray(array)


def embedding_results(result: Any, model: str, rows: int) -> list[EmbeddingResult]:
    embeddings = _output(result, contract.EMBEDDING.name, model, rows).astype(np.float32, copy=True)
    weights = _output(result, contract.MODALITY_WEIGHTS.name, model, rows, len(contract.MODALITIES))
    dim = embeddings.shape[1]
    images = _output(result, contract.IMAGE_EMBEDDING.name, model, rows, dim).astype(np.float32, copy=True)
    texts = _output(result, contract.TEXT_EMBEDDING.name, model, rows, dim).astype(np.float32, copy=True)
    frames = _output(result, contract.FRAMES.name, model, rows, 1)
    return [
        EmbeddingResult(
            embedding=embeddings[row],
            image_weight=float(weights[row, _IMAGE_COLUMN]),
            text_weight=float(weights[row, _TEXT_COLUMN]),
            image_embedding=images[row],
            text_embedding=texts[row],
            frames=int(frames[row, 0]),
        )
        for row in range(rows)
    ]


def similar_results(result: Any, model: str, rows: int) -> list[SimilarResult]:
    ids = _output(result, contract.IDS.name, model, rows)
    scores = _output(result, contract.SCORES.name, model, rows, ids.shape[1])
    captions = _output(result, contract.CAPTIONS.name, model, rows, ids.shape[1])
    contributions = _contributions(result, model, rows, ids.shape[1])
    embedded = embedding_results(result, model, rows)
    similar = []
    for row, query in enumerate(embedded):
        neighbors = [
            Neighbor(id=_decode(raw), score=float(score), text=_decode(caption) or None, parts=score_parts(split))
            for raw, score, caption, split in zip(ids[row], scores[row], captions[row], contributions[row], strict=True)
            # An index smaller than k pads its answer with empty ids: no neighbor there.
            if raw
        ]
        similar.append(
            SimilarResult(
                neighbors=neighbors,
                embedding=query.embedding,
                image_weight=query.image_weight,
                text_weight=query.text_weight,
                image_embedding=query.image_embedding,
                text_embedding=query.text_embedding,
                frames=query.frames,
            )
        )
    return similar


def _contributions(result: Any, model: str, rows: int, width: int) -> np.ndarray:
    """The ``CONTRIBUTIONS`` output, checked against the neighbours' shape."""
    contributions = result.as_numpy(contract.CONTRIBUTIONS.name)
    expected = (rows, width, len(contract.SCORE_PARTS))
    if contributions is None or contributions.shape != expected:
        got = "none" if contributions is None else f"shape {tuple(contributions.shape)}"
        raise ServerError(f"model '{model}' returned {contract.CONTRIBUTIONS.name} of {got}; expected {expected}")
    return contributions


def filtered_results(result: Any, model: str) -> list[Neighbor]:
    """The neighbours of one similar_posts_filtered query, each with the near-duplicates folded into it."""
    ids = _output(result, contract.IDS.name, model, 1)
    scores = _output(result, contract.SCORES.name, model, 1, ids.shape[1])
    captions = _output(result, contract.CAPTIONS.name, model, 1, ids.shape[1])
    duplicates = _output(result, contract.DUPLICATES.name, model, 1, ids.shape[1])
    contributions = _contributions(result, model, 1, ids.shape[1])
    return [
        Neighbor(
            id=_decode(raw),
            score=float(score),
            text=_decode(caption) or None,
            parts=score_parts(split),
            duplicates=tuple(Neighbor(id=str(dup), score=float(dup_score)) for dup, dup_score in json.loads(folded)),
        )
        for raw, score, caption, split, folded in zip(
            ids[0], scores[0], captions[0], contributions[0], duplicates[0], strict=True
        )
        if raw
    ]


def change_results(result: Any, ids: Sequence[str]) -> list[tuple[str, str, int]]:
    """``(id, status, sequence)`` for each row of a post_changes call."""
    statuses = _output(result, contract.CHANGE_STATUS.name, contract.POST_CHANGES, len(ids), 1)
    sequences = _output(result, contract.SEQUENCE.name, contract.POST_CHANGES, len(ids), 1)
    return [(post_id, _decode(statuses[row, 0]), int(sequences[row, 0])) for row, post_id in enumerate(ids)]


def change_report(parts: Sequence[Sequence[tuple[str, str, int]]]) -> ChangeReport:
    rows = [row for part in parts for row in part]
    by_status: dict[str, tuple[str, ...]] = {}
    for status in ("added", "replaced", "deleted", "unknown"):
        by_status[status] = tuple(post_id for post_id, found, _ in rows if found == status)
    return ChangeReport(sequence=max((sequence for _, _, sequence in rows), default=0), **by_status)


def score_parts(split: np.ndarray) -> ScoreParts | None:
    """One neighbour's ``CONTRIBUTIONS`` row as ScoreParts; None for NaN (an index without unimodal vectors)."""
    if not np.isfinite(split).all():
        return None
    return ScoreParts(**{name: float(value) for name, value in zip(contract.SCORE_PARTS, split, strict=True)})


def _decode(raw: Any) -> str:
    """A BYTES element (an id, a caption) as text."""
    return raw.decode("utf-8", errors="replace") if isinstance(raw, bytes | np.bytes_) else str(raw)


def served_repository(config: Any) -> ServedRepository:
    """What a ``post_embedding`` config says about its export."""
    parameters = contract.config_parameters(config)
    dims = [int(output.dims[-1]) for output in config.output if output.name == contract.EMBEDDING.name and output.dims]
    return ServedRepository(
        weights=contract.WEIGHTS_PARAMETER.read(parameters) or None,
        fingerprint=contract.FINGERPRINT_PARAMETER.read(parameters) or None,
        repository_id=contract.REPOSITORY_ID_PARAMETER.read(parameters) or None,
        dim=dims[0] if dims else None,
    )
