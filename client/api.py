"""The postsim client: embed posts and find similar ones over Triton's gRPC API.

:class:`PostSimClient` (blocking) and :class:`AsyncPostSimClient` (asyncio) have the same
methods under the same names, the async ones awaited; both are context managers, built
from the fields of :class:`~postsim.client.settings.ClientSettings` (or from one, with
``from_settings``). Each method is written once, as an operation of
:class:`~postsim.client.core.ClientCore`; the two classes here only run its gRPC calls,
blocking or awaited.

Posts are checked before anything is sent; a batch larger than the server's
``max_batch_size`` is split into chunks whose results come back in the caller's order.
Every :class:`~tritonclient.utils.InferenceServerException` becomes one of
:class:`~postsim.core.errors.ServerUnavailableError`,
:class:`~postsim.core.errors.InvalidPostError` or
:class:`~postsim.core.errors.ServerError` (:mod:`postsim.client.errors`), raised ``from None``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
from tritonclient.utils import InferenceServerException

from postsim.client.core import MAX_CHUNKS_IN_FLIGHT, Call, ClientCore, Operation, Pause, Step, build_inputs
from postsim.client.errors import map_server_error
from postsim.client.explain import DEFAULT_GRID, Explanation
from postsim.client.posts import (
    ChangeReport,
    EmbeddingResult,
    ModelStatus,
    Neighbor,
    Post,
    ServedRepository,
    ServerInfo,
    SimilarResult,
)
from postsim.client.settings import DEFAULT_TIMEOUT_S, DEFAULT_URL, ClientSettings
from postsim.core.errors import PostSimError
from postsim.model_repository.contract import RetrievalSettings
from postsim.model_repository.live_index.wire import Control

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_URL",
    "AsyncPostSimClient",
    "ClientSettings",
    "ModelStatus",
    "PostSimClient",
    "ServedRepository",
    "ServerInfo",
    "build_inputs",
    "map_server_error",
]

logger = logging.getLogger("postsim")

_T = TypeVar("_T")
_Self = TypeVar("_Self", bound="_Client")


class _Client:
    """What both clients share besides the methods: the constructor, the settings, the description."""

    _core: ClientCore

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        ssl: bool = False,
        root_certificates: str | Path | None = None,
        private_key: str | Path | None = None,
        certificate_chain: str | Path | None = None,
        headers: dict[str, str] | None = None,
        admin_key: str | None = None,
        shrink_images: bool = False,
    ) -> None:
        settings = ClientSettings(
            url=url,
            timeout_s=timeout_s,
            ssl=ssl,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            headers=headers,
            admin_key=admin_key,
            shrink_images=shrink_images,
        )
        self._start(settings)

    @classmethod
    def from_settings(cls: type[_Self], settings: ClientSettings) -> _Self:
        """A client with these settings (the keyword arguments of the constructor, as one object)."""
        client = cls.__new__(cls)
        client._start(settings)
        return client

    def _start(self, settings: ClientSettings) -> None:
        self._core = ClientCore(settings)
        self._open()

    def _open(self) -> None:
        raise NotImplementedError

    @property
    def settings(self) -> ClientSettings:
        return self._core.settings

    @property
    def url(self) -> str:
        return self.settings.url

    @property
    def timeout_s(self) -> float | None:
        return self.settings.timeout_s

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, timeout_s={self.timeout_s})"


# --------------------------------------------------------------------------- blocking


class PostSimClient(_Client):
    """Blocking client of a postsim server (Triton over gRPC at ``url``, ``host:port``).

    The keyword arguments are :class:`~postsim.client.settings.ClientSettings`'s fields. Use
    it as a context manager, or call :meth:`close`.
    """

    def _open(self) -> None:
        self._triton = grpcclient.InferenceServerClient(self.url, **self.settings.channel_arguments())

    def __enter__(self) -> PostSimClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._triton.close()

    def _run(self, operation: Operation[_T]) -> _T:
        """Run ``operation``'s calls one after the other, each blocking."""
        answer: Any = None
        error: PostSimError | None = None
        while True:
            try:
                step = operation.send(answer) if error is None else operation.throw(error)
            except StopIteration as done:
                return done.value
            answer, error = self._perform(step)

    def _perform(self, step: Step) -> tuple[Any, PostSimError | None]:
        if isinstance(step, Pause):
            time.sleep(step.seconds)
            return None, None
        if isinstance(step, Call):
            return self._send(step)
        answers = []
        for call in step.calls:
            answer, error = self._send(call)
            if error is not None:
                return None, error
            answers.append(answer)
        return answers, None

    def _send(self, call: Call[Any]) -> tuple[Any, PostSimError | None]:
        arguments = call.arguments()
        logger.debug("%s %s: sending %s to %s", call.method, call.model or "", call.what, self.url)
        try:
            answer = getattr(self._triton, call.method)(**arguments)
        except InferenceServerException as exc:
            return None, self._core.error(exc, call)
        try:
            return call.parse(answer), None
        except PostSimError as error:
            return None, error

    def embed(self, posts: Sequence[Post]) -> list[EmbeddingResult]:
        """The fused embedding of each post, in order (chunks of at most ``max_batch_size``)."""
        return self._run(self._core.embed(posts))

    def similar_many(self, posts: Sequence[Post], k: int = 10) -> list[SimilarResult]:
        """For each post, in order: its ``k`` nearest indexed posts (best first) and its embedding."""
        return self._run(self._core.similar_many(posts, k))

    def similar(
        self,
        post: Post,
        k: int = 10,
        *,
        where: Mapping[str, object] | None = None,
        collapse_above: float | None = None,
    ) -> list[Neighbor]:
        """The ``k`` indexed posts nearest to ``post``, best first; with ``where`` only those that pass that filter,
        with ``collapse_above`` near-duplicates folded into the better result (``similar_posts_filtered``)."""
        if where is None and collapse_above is None:
            return self._run(self._core.similar(post, k))
        return self._run(self._core.similar_filtered(post, k, where=where, collapse_above=collapse_above))

    def similar_to_id(
        self,
        post_id: str,
        k: int = 10,
        *,
        where: Mapping[str, object] | None = None,
        collapse_above: float | None = None,
    ) -> list[Neighbor]:
        """The ``k`` posts nearest to the indexed post ``post_id`` (by its stored vector), itself excluded."""
        return self._run(
            self._core.similar_filtered(None, k, query_id=post_id, where=where, collapse_above=collapse_above)
        )

    def upsert(
        self, posts: Sequence[Post], metadata: Sequence[Mapping[str, object] | None] | None = None
    ) -> ChangeReport:
        """Add each post (``Post.id`` required), or replace the indexed post with its id; durable and served on return."""
        return self._run(self._core.upsert(posts, metadata))

    def delete(self, ids: Sequence[str]) -> ChangeReport:
        """Delete the indexed posts with these ids: in no result of a query sent after this returns."""
        return self._run(self._core.delete(ids))

    def control_changes(self, control: Control) -> int:
        """Seal or unseal the served live index (compaction); the sequence number of its last change."""
        return self._run(self._core.control_changes(control))

    def explain(self, query: Post, target: Post | EmbeddingResult, grid: int = DEFAULT_GRID) -> Explanation:
        """Which words and image regions of ``query`` drive its similarity to ``target`` (:mod:`postsim.client.explain`)."""
        return self._run(self._core.explain(query, target, grid))

    def is_ready(self) -> bool:
        """True when the server answers and ``post_embedding`` is ready; never raises for that."""
        reason = self._run(self._core.not_ready_reason())
        if reason is not None:
            logger.debug("not ready: %s", reason)
        return reason is None

    def wait_until_ready(self, timeout_s: float = 60.0) -> None:
        """Poll :meth:`is_ready` until true; ServerUnavailableError after ``timeout_s``."""
        self._run(self._core.wait_until_ready(timeout_s))

    def server_info(self) -> ServerInfo:
        """The server's version, its models and their states, and how ``post_embedding`` was built."""
        return self._run(self._core.server_info())

    def served_repository(self) -> ServedRepository:
        """Which export ``post_embedding`` comes from (weights, fingerprint, repository id); needs no admin key."""
        return self._run(self._core.served_repository())

    def served_retrieval(self) -> RetrievalSettings:
        """Where ``retrieval`` keeps the posts: the server's own FAISS index, or a Milvus (loaded with an index)."""
        return self._run(self._core.served_retrieval())

    def load_model(self, model: str) -> None:
        """(Re)load a model through Triton's model-control API: new versions load while the old one serves.

        Triton loads a model again only if its files changed on disk. A server started with
        an admin key needs it (``admin_key=``). A version the server refuses raises
        ServerError with its reason; the version it had keeps serving.
        """
        self._run(self._core.load_model(model))

    def is_model_ready(self, model: str, version: str = "") -> bool:
        """Whether the server reports ``model`` (``version``: that version; "": any) ready."""
        return self._run(self._core.is_model_ready(model, version))


# --------------------------------------------------------------------------- asyncio


class AsyncPostSimClient(_Client):
    """The asyncio form of :class:`PostSimClient`: same arguments, same methods, awaited.

    The gRPC channel is opened on first use, inside the running event loop. Chunks of a
    large batch are sent concurrently (a few at a time); results keep the caller's order.
    """

    def _open(self) -> None:
        self._client: Any = None

    async def __aenter__(self) -> AsyncPostSimClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    @property
    def _triton(self) -> Any:
        # Created lazily: a grpc.aio channel belongs to the event loop it is created in.
        if self._client is None:
            self._client = grpcclient_aio.InferenceServerClient(self.url, **self.settings.channel_arguments())
        return self._client

    async def _run(self, operation: Operation[_T]) -> _T:
        """Run ``operation``'s calls awaited, the calls of a Gather a few at a time."""
        answer: Any = None
        error: PostSimError | None = None
        while True:
            try:
                step = operation.send(answer) if error is None else operation.throw(error)
            except StopIteration as done:
                return done.value
            answer, error = await self._perform(step)

    async def _perform(self, step: Step) -> tuple[Any, PostSimError | None]:
        if isinstance(step, Pause):
            await asyncio.sleep(step.seconds)
            return None, None
        if isinstance(step, Call):
            return await self._send(step)
        try:
            return await _in_order([self._sender(call) for call in step.calls]), None
        except PostSimError as error:
            return None, error

    def _sender(self, call: Call[_T]) -> Callable[[], Awaitable[_T]]:
        async def send() -> _T:
            answer, error = await self._send(call)
            if error is not None:
                raise error
            return answer

        return send

    async def _send(self, call: Call[Any]) -> tuple[Any, PostSimError | None]:
        arguments = call.arguments()
        logger.debug("%s %s: sending %s to %s", call.method, call.model or "", call.what, self.url)
        try:
            answer = await getattr(self._triton, call.method)(**arguments)
        except InferenceServerException as exc:
            return None, self._core.error(exc, call)
        try:
            return call.parse(answer), None
        except PostSimError as error:
            return None, error

    async def embed(self, posts: Sequence[Post]) -> list[EmbeddingResult]:
        """The fused embedding of each post, in order (chunks of at most ``max_batch_size``)."""
        return await self._run(self._core.embed(posts))

    async def similar_many(self, posts: Sequence[Post], k: int = 10) -> list[SimilarResult]:
        """For each post, in order: its ``k`` nearest indexed posts (best first) and its embedding."""
        return await self._run(self._core.similar_many(posts, k))

    async def similar(
        self,
        post: Post,
        k: int = 10,
        *,
        where: Mapping[str, object] | None = None,
        collapse_above: float | None = None,
    ) -> list[Neighbor]:
        """The ``k`` indexed posts nearest to ``post``, best first; with ``where`` only those that pass that filter,
        with ``collapse_above`` near-duplicates folded into the better result (``similar_posts_filtered``)."""
        if where is None and collapse_above is None:
            return await self._run(self._core.similar(post, k))
        return await self._run(self._core.similar_filtered(post, k, where=where, collapse_above=collapse_above))

    async def similar_to_id(
        self,
        post_id: str,
        k: int = 10,
        *,
        where: Mapping[str, object] | None = None,
        collapse_above: float | None = None,
    ) -> list[Neighbor]:
        """The ``k`` posts nearest to the indexed post ``post_id`` (by its stored vector), itself excluded."""
        return await self._run(
            self._core.similar_filtered(None, k, query_id=post_id, where=where, collapse_above=collapse_above)
        )

    async def upsert(
        self, posts: Sequence[Post], metadata: Sequence[Mapping[str, object] | None] | None = None
    ) -> ChangeReport:
        """Add each post (``Post.id`` required), or replace the indexed post with its id; durable and served on return."""
        return await self._run(self._core.upsert(posts, metadata))

    async def delete(self, ids: Sequence[str]) -> ChangeReport:
        """Delete the indexed posts with these ids: in no result of a query sent after this returns."""
        return await self._run(self._core.delete(ids))

    async def control_changes(self, control: Control) -> int:
        """Seal or unseal the served live index (compaction); the sequence number of its last change."""
        return await self._run(self._core.control_changes(control))

    async def explain(self, query: Post, target: Post | EmbeddingResult, grid: int = DEFAULT_GRID) -> Explanation:
        """Which words and image regions of ``query`` drive its similarity to ``target`` (:mod:`postsim.client.explain`)."""
        return await self._run(self._core.explain(query, target, grid))

    async def is_ready(self) -> bool:
        """True when the server answers and ``post_embedding`` is ready; never raises for that."""
        reason = await self._run(self._core.not_ready_reason())
        if reason is not None:
            logger.debug("not ready: %s", reason)
        return reason is None

    async def wait_until_ready(self, timeout_s: float = 60.0) -> None:
        """Poll :meth:`is_ready` until true; ServerUnavailableError after ``timeout_s``."""
        await self._run(self._core.wait_until_ready(timeout_s))

    async def server_info(self) -> ServerInfo:
        """The server's version, its models and their states, and how ``post_embedding`` was built."""
        return await self._run(self._core.server_info())

    async def served_repository(self) -> ServedRepository:
        """Which export ``post_embedding`` comes from (weights, fingerprint, repository id); needs no admin key."""
        return await self._run(self._core.served_repository())

    async def served_retrieval(self) -> RetrievalSettings:
        """Where ``retrieval`` keeps the posts; see :meth:`PostSimClient.served_retrieval`."""
        return await self._run(self._core.served_retrieval())

    async def load_model(self, model: str) -> None:
        """(Re)load a model through Triton's model-control API; see :meth:`PostSimClient.load_model`."""
        await self._run(self._core.load_model(model))

    async def is_model_ready(self, model: str, version: str = "") -> bool:
        """Whether the server reports ``model`` (``version``: that version; "": any) ready."""
        return await self._run(self._core.is_model_ready(model, version))


async def _in_order(jobs: list[Callable[[], Awaitable[_T]]]) -> list[_T]:
    """Run the jobs a few at a time (MAX_CHUNKS_IN_FLIGHT); their results in job order.

    Once one fails, no further job starts, the others are cancelled, and its error is raised.
    """
    gate = asyncio.Semaphore(MAX_CHUNKS_IN_FLIGHT)
    failed = False

    async def gated(job: Callable[[], Awaitable[_T]]) -> list[_T]:
        nonlocal failed
        async with gate:
            if failed:  # a job failed: start no more (the caller gets that job's error)
                return []
            try:
                return [await job()]
            except BaseException:
                failed = True
                raise

    tasks = [asyncio.ensure_future(gated(job)) for job in jobs]
    try:
        parts = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        raise
    return [item for part in parts for item in part]
