"""The postsim client: embed posts and find similar ones over Triton's gRPC API.

:class:`PostSimClient` (blocking) and :class:`AsyncPostSimClient` (asyncio) have the same
methods under the same names; both are context managers. Everything that does not touch
the network (checking posts, building the request tensors, reading the answers, turning
tritonclient's exceptions into postsim's) lives in module-level functions used by both, so
the two cannot drift apart.

Posts are checked before anything is sent; a batch larger than the server's
``max_batch_size`` is split into chunks whose results come back in the caller's order.
Every :class:`~tritonclient.utils.InferenceServerException` becomes one of
:class:`~postsim.core.errors.ServerUnavailableError`,
:class:`~postsim.core.errors.InvalidPostError` or
:class:`~postsim.core.errors.ServerError`, raised ``from None``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
from tritonclient.utils import InferenceServerException

from postsim.core.errors import (
    INDEX_NOT_LOADED_MESSAGE,
    NO_INDEX_MESSAGE,
    InvalidPostError,
    PostSimError,
    ServerError,
    ServerUnavailableError,
)
from postsim.model_repository import contract
from postsim.model_repository.protocol import (
    GRPC_RESTRICTED_HEADER,
    OVERLOADED_MESSAGE,
    RESTRICTED_HEADER,
    RETRY_SOON_MESSAGES,
    SHARED_MEMORY_HINT,
    SHUTTING_DOWN_MESSAGE,
    is_shared_memory_error,
    unhealthy_stubs,
)
from postsim.model_repository.triton_errors import explain

from .posts import EmbeddingResult, Neighbor, Post, SimilarResult

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_URL",
    "AsyncPostSimClient",
    "ModelStatus",
    "PostSimClient",
    "ServedRepository",
    "ServerInfo",
    "map_server_error",
]

logger = logging.getLogger("postsim")

DEFAULT_URL = "localhost:8001"
DEFAULT_TIMEOUT_S = 60.0
"""End-to-end limit of one gRPC call (one chunk of at most ``max_batch_size`` posts)."""

_EMBEDDING = contract.EMBEDDING.name
_WEIGHTS = contract.MODALITY_WEIGHTS.name
_IMAGE_COLUMN = contract.MODALITIES.index("image")
_TEXT_COLUMN = contract.MODALITIES.index("text")
_EMBED_OUTPUTS = (_EMBEDDING, _WEIGHTS)
_SIMILAR_OUTPUTS = (*(tensor.name for tensor in contract.NEIGHBOR_OUTPUTS), _EMBEDDING, _WEIGHTS)
_INT32_MAX = int(np.iinfo(np.int32).max)
_MAX_CHUNKS_IN_FLIGHT = 4
"""How many chunks the async client sends at once."""
_POLL_S = 0.5
_MAX_MESSAGE_CHARS = 500

_T = TypeVar("_T")


# --------------------------------------------------------------------------- server info


@dataclass(frozen=True, kw_only=True)
class ModelStatus:
    """One model of the server's repository index."""

    name: str
    version: str
    state: str
    """Triton's state name: ``READY``, ``LOADING``, ``UNAVAILABLE`` ... (empty when never loaded)."""
    reason: str = ""

    @property
    def ready(self) -> bool:
        return self.state == "READY"


@dataclass(frozen=True, kw_only=True)
class ServedRepository:
    """Which export the server serves, from the parameters of ``post_embedding``'s config.

    Read through the model-config API, which a server's admin key does not restrict. Each
    field is None when the config does not say (not loaded, or exported by an older postsim).
    """

    weights: str | None = None
    """The ``postsim_weights`` parameter (e.g. ``random``)."""
    fingerprint: str | None = None
    """The ``postsim_fingerprint`` parameter: which exported weights the server holds."""
    repository_id: str | None = None
    """The ``postsim_repository_id`` parameter: which repository folder the server was started on."""
    embedding_dim: int | None = None
    """Length of ``EMBEDDING``."""


@dataclass(frozen=True, kw_only=True)
class ServerInfo:
    """What the server at ``url`` runs, from its metadata and repository index."""

    url: str
    server: str
    """The server's name (``triton``)."""
    version: str
    models: tuple[ModelStatus, ...]
    served: ServedRepository
    """What ``post_embedding``'s config says; all None when it is not loaded."""

    @property
    def weights(self) -> str | None:
        return self.served.weights

    @property
    def fingerprint(self) -> str | None:
        return self.served.fingerprint

    @property
    def repository_id(self) -> str | None:
        return self.served.repository_id

    @property
    def embedding_dim(self) -> int | None:
        return self.served.embedding_dim

    def is_ready(self, model: str) -> bool:
        return any(status.name == model and status.ready for status in self.models)


# --------------------------------------------------------------------------- error mapping


def _status_name(exc: InferenceServerException) -> str | None:
    """``StatusCode.UNAVAILABLE`` (as tritonclient's gRPC client sets it) -> ``UNAVAILABLE``."""
    status = exc.status()
    if not status:
        return None
    return str(status).removeprefix("StatusCode.")


def _short(message: str) -> str:
    first = message.strip().splitlines()[0] if message.strip() else ""
    return first if len(first) <= _MAX_MESSAGE_CHARS else first[:_MAX_MESSAGE_CHARS] + "..."


def _is_unknown_model(message: str) -> bool:
    # Triton prefixes every failed model look-up with "Request for unknown model: ", under
    # NOT_FOUND, UNAVAILABLE or INVALID_ARGUMENT depending on its version and the reason
    # (never loaded, no ready version, not at ready state); older ones say "Inference
    # request for unknown model".
    return "unknown model" in message.lower()


_TRACEBACK = re.compile(r"\n\s*(?:At:|Traceback \(most recent call last\):)\n.*", re.DOTALL)


def without_traceback(message: str) -> str:
    """A server message without the Python traceback Triton's Python backend appends to some ("At: ...")."""
    return _TRACEBACK.sub("", message).rstrip(" ;\n")


def _connection_hint(message: str, *, ssl: bool, client_certificate: bool) -> str:
    """What to change when the connection itself failed, from grpc's reason."""
    if "WRONG_VERSION_NUMBER" in message:
        return "the server does not speak TLS there: connect without ssl=True (without --tls-ca)"
    if "CERTIFICATE_VERIFY_FAILED" in message:
        return (
            "the server's TLS certificate is not signed by a CA you trust, or does not name this host: "
            "pass the CA that signed it as root_certificates"
        )
    if "Socket closed" in message and "failed to connect" in message:  # closed during the handshake
        if not ssl:
            return (
                "the server closed the connection: it may serve TLS only; connect with ssl=True and root_certificates"
            )
        if not client_certificate:
            return (
                "the server closed the TLS connection: it may require a client certificate (mutual TLS); "
                "pass private_key and certificate_chain"
            )
    return "start it with `postsim serve` or check `--url`"


def map_server_error(
    exc: InferenceServerException,
    *,
    url: str,
    model: str | None = None,
    what: str = "",
    timeout_s: float | None = None,
    ssl: bool = False,
    client_certificate: bool = False,
    admin_key: bool = False,
) -> PostSimError:
    """The postsim exception for a tritonclient one; the caller raises it ``from None``.

    ``model`` is the model the call addressed (None for server-wide calls), ``what`` says
    which part of the request it was (``posts 16..19``) and goes into the message. ``ssl``,
    ``client_certificate`` and ``admin_key`` say how the client connected, to word the hint.
    """
    status = _status_name(exc)
    message = without_traceback(str(exc.message() or ""))
    logger.debug("gRPC error from %s (model %s, status %s): %s", url, model, status, message)
    subject = f"model '{model}'" if model else "the server"
    part = f" for {what}" if what else ""

    if "protocol is restricted" in message or "API is restricted" in message:
        key = "the admin key given was refused" if admin_key else "no admin key was given"
        return ServerError(
            f"the server at {url} allows this call (model control, repository index) only with its admin key, "
            f"and {key}: pass admin_key=... (`--admin-key` or POSTSIM_ADMIN_KEY)",
            status=status,
        )
    if _is_unknown_model(message):
        if model in contract.INDEX_MODELS:
            # The client cannot see the server's disk: say what loads the model rather than that no index exists.
            hint = (
                "it is loaded once an index is published: publish one with `postsim index publish`, then retry "
                "(if one is published, the server log says why it is not loaded)"
            )
        elif model:
            hint = "the server may be stopping; otherwise check the log of `postsim serve` for why it did not load"
        else:
            hint = _short(message)
        return ServerError(f"model '{model}' is not loaded on the server at {url}: {hint}", status=status)
    if NO_INDEX_MESSAGE in message:
        return ServerError(f"{subject} cannot answer{part}: {NO_INDEX_MESSAGE}, then retry", status=status)
    if INDEX_NOT_LOADED_MESSAGE in message:
        return ServerError(f"{subject} cannot answer{part} on the server at {url}: {_short(message)}", status=status)
    unhealthy = unhealthy_stubs(message)
    if unhealthy:
        # Triton says this when a model's process did not answer its one-second health check:
        # the process died, or it is alive and starved of CPU. Which one, only the server knows.
        return ServerError(
            f"Triton judged the process of model '{unhealthy[0].model}' unhealthy on the server at {url} "
            f"(it died, or did not answer Triton's health check in time) and failed {subject}{part}: "
            "`postsim serve` replaces such a process within seconds, so retry; if this persists (or the server is "
            "a bare tritonserver, which never does), restart the server and read its log",
            status=status,
        )
    if is_shared_memory_error(message):
        return ServerError(
            f"{subject} failed{part} on the server at {url}: the server ran out of shared memory "
            f"({_short(message)}). {SHARED_MEMORY_HINT}",
            status=status,
        )
    if any(
        sign in message for sign in (SHUTTING_DOWN_MESSAGE, "Server is stopping", "stopped accepting new inference")
    ):
        return ServerUnavailableError(
            f"the server at {url} is shutting down and refused {subject}{part}: retry once it is back, "
            "or against another server",
            status=status,
        )
    if status == "CANCELLED":
        # postsim's clients never cancel a call, so the server ended it: a gRPC server cancels
        # what is still open when it shuts down.
        return ServerUnavailableError(
            f"the server at {url} ended {subject}{part} before answering: it is most likely shutting down; "
            "retry once it is back, or against another server",
            status=status,
        )
    if status == "UNAVAILABLE":
        if message.startswith(RETRY_SOON_MESSAGES):
            return ServerUnavailableError(f"the server at {url} cannot answer yet: {_short(message)}", status=status)
        if OVERLOADED_MESSAGE in message or "queue" in message.lower():
            return ServerUnavailableError(
                f"the server at {url} is overloaded ({_short(message)}): retry later", status=status
            )
        hint = _connection_hint(message, ssl=ssl, client_certificate=client_certificate)
        return ServerUnavailableError(
            f"cannot reach the postsim server at {url}: {hint} ({_short(message)})",
            status=status,
        )
    if status == "DEADLINE_EXCEEDED":
        limit = f"within {timeout_s:g} s" if timeout_s is not None else "in time"
        return ServerUnavailableError(
            f"the server at {url} did not answer {subject}{part} {limit}: start it with `postsim serve`, "
            "check `--url`, or raise the timeout",
            status=status,
        )
    if status == "INVALID_ARGUMENT":
        # Triton's message names the input it rejected: keep it whole (two misleading ones reworded).
        return InvalidPostError(f"{subject} rejected the request{part}: {explain(message)}")
    if status is None:
        # Raised by tritonclient itself while building the request, before sending it.
        return ServerError(f"could not build the request to {subject}{part}: {_short(message)}")
    return ServerError(f"{subject} failed{part} on the server at {url} ({status}): {_short(message)}", status=status)


def _load_error(error: PostSimError, model: str) -> PostSimError:
    """A refused load is the server's verdict on the repository, not a bad post: ServerError."""
    if not isinstance(error, InvalidPostError):
        return error
    reason = str(error).split(": ", 1)[-1]
    return ServerError(
        f"the server did not load model '{model}' and keeps serving the version it had, if any: {reason}",
        status="INVALID_ARGUMENT",
    )


# --------------------------------------------------------------------------- requests


def _checked_posts(posts: Sequence[Post], caller: str) -> list[Post]:
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


def _checked_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise InvalidPostError(f"k must be a positive int; got {type(k).__name__} {k!r}")
    if not 1 <= k <= _INT32_MAX:
        raise InvalidPostError(f"k must be a positive int (at most {_INT32_MAX}); got {k}")
    return int(k)


def _chunks(posts: list[Post], size: int = contract.MAX_BATCH_SIZE) -> list[tuple[int, list[Post]]]:
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


def build_inputs(posts: Sequence[Post], *, k: int | None = None, first: int = 0) -> list[grpcclient.InferInput]:
    """The request tensors for one chunk: IMAGE and TEXT as ``[B, 1]`` BYTES, TOP_K if ``k``.

    Reads image files now. ``first`` is the index of ``posts[0]`` in the caller's batch,
    for error messages. An absent image or text is sent as an empty element.
    """
    images: list[bytes] = []
    texts: list[bytes] = []
    for offset, post in enumerate(posts):
        images.append(post.image_bytes())
        try:
            texts.append((post.text or "").encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise InvalidPostError(
                f"the text of post {first + offset} cannot be encoded as UTF-8: {exc.reason} at character {exc.start}"
            ) from None
    inputs = [_bytes_input(contract.IMAGE, images), _bytes_input(contract.TEXT, texts)]
    if k is not None:
        top_k = np.full((len(posts), 1), k, dtype=contract.TOP_K.dtype.numpy)
        tensor = grpcclient.InferInput(contract.TOP_K.name, list(top_k.shape), contract.TOP_K.dtype.wire)
        tensor.set_data_from_numpy(top_k)
        inputs.append(tensor)
    return inputs


def _requested(names: Sequence[str]) -> list[grpcclient.InferRequestedOutput]:
    return [grpcclient.InferRequestedOutput(name) for name in names]


# --------------------------------------------------------------------------- responses


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


def _embedding_results(result: Any, model: str, rows: int) -> list[EmbeddingResult]:
    embeddings = _output(result, _EMBEDDING, model, rows).astype(np.float32, copy=True)
    weights = _output(result, _WEIGHTS, model, rows, len(contract.MODALITIES))
    return [
        EmbeddingResult(
            embedding=embeddings[row],
            image_weight=float(weights[row, _IMAGE_COLUMN]),
            text_weight=float(weights[row, _TEXT_COLUMN]),
        )
        for row in range(rows)
    ]


def _similar_results(result: Any, model: str, rows: int) -> list[SimilarResult]:
    ids = _output(result, contract.IDS.name, model, rows)
    scores = _output(result, contract.SCORES.name, model, rows, ids.shape[1])
    captions = _output(result, contract.CAPTIONS.name, model, rows, ids.shape[1])
    embedded = _embedding_results(result, model, rows)
    similar = []
    for row, query in enumerate(embedded):
        neighbors = [
            Neighbor(id=_decode(raw), score=float(score), text=_decode(caption) or None)
            for raw, score, caption in zip(ids[row], scores[row], captions[row], strict=True)
            # An index smaller than k pads its answer with empty ids: no neighbour there.
            if raw
        ]
        similar.append(
            SimilarResult(
                neighbors=neighbors,
                embedding=query.embedding,
                image_weight=query.image_weight,
                text_weight=query.text_weight,
            )
        )
    return similar


def _decode(raw: Any) -> str:
    """A BYTES element (an id, a caption) as text."""
    return raw.decode("utf-8", errors="replace") if isinstance(raw, bytes | np.bytes_) else str(raw)


def _served_repository(config: Any) -> ServedRepository:
    """What a ``post_embedding`` config says about its export."""

    parameters = contract.config_parameters(config)
    dims = [int(output.dims[-1]) for output in config.output if output.name == _EMBEDDING and len(output.dims) > 0]
    return ServedRepository(
        weights=contract.WEIGHTS_PARAMETER.read(parameters) or None,
        fingerprint=contract.FINGERPRINT_PARAMETER.read(parameters) or None,
        repository_id=contract.REPOSITORY_ID_PARAMETER.read(parameters) or None,
        embedding_dim=dims[0] if dims else None,
    )


def _embedding_ready(index: Any) -> bool:
    return any(entry.name == contract.POST_EMBEDDING and entry.state == "READY" for entry in index.models)


def _server_info(url: str, metadata: Any, index: Any, served: ServedRepository) -> ServerInfo:
    models = tuple(
        ModelStatus(name=entry.name, version=entry.version, state=entry.state, reason=entry.reason)
        for entry in index.models
    )
    return ServerInfo(url=url, server=metadata.name, version=metadata.version, models=models, served=served)


# --------------------------------------------------------------------------- settings


def _checked_timeout(timeout_s: float | None, name: str = "timeout_s") -> float | None:
    if timeout_s is None:
        return None
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or not timeout_s > 0:
        raise PostSimError(f"{name} must be a positive number of seconds or None; got {timeout_s!r}")
    return float(timeout_s)


def _wait_limit(timeout_s: float) -> float:
    limit = _checked_timeout(timeout_s, "wait_until_ready timeout_s")
    if limit is None:
        raise PostSimError("wait_until_ready timeout_s must be a positive number of seconds; got None")
    return limit


def _tls_file(path: str | Path | None, name: str, ssl: bool) -> str | None:
    if path is None:
        return None
    if not ssl:
        raise PostSimError(f"{name} is only used over TLS: pass ssl=True (got {name}={str(path)!r} with ssl=False)")
    if not Path(path).is_file():
        raise PostSimError(f"{name} file {str(path)!r} does not exist")
    return str(path)


def _grpc_headers(headers: dict[str, str] | None, admin_key: str | None) -> dict[str, str] | None:
    """The gRPC metadata to send: Triton's gRPC server expects the admin key under a prefixed name.

    ``RESTRICTED_HEADER`` given in ``headers`` (as the HTTP API takes it) is renamed too.
    """
    merged = dict(headers or {})
    if RESTRICTED_HEADER in merged:
        merged[GRPC_RESTRICTED_HEADER] = merged.pop(RESTRICTED_HEADER)
    if admin_key is not None:
        merged[GRPC_RESTRICTED_HEADER] = admin_key
    return merged or None


class _Settings:
    """Checked connection settings, shared by both clients."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float | None,
        ssl: bool,
        root_certificates: str | Path | None,
        private_key: str | Path | None,
        certificate_chain: str | Path | None,
        headers: dict[str, str] | None,
        admin_key: str | None = None,
    ) -> None:
        if not isinstance(url, str) or not url:
            raise PostSimError(f"url must be a non-empty 'host:port' string; got {url!r}")
        if url.startswith(("http://", "https://")):
            raise PostSimError(f"url is a gRPC target 'host:port' (e.g. {DEFAULT_URL}), not an HTTP URL; got {url!r}")
        if (private_key is None) != (certificate_chain is None):
            raise PostSimError("private_key and certificate_chain go together (mutual TLS): pass both or neither")
        if headers is not None:
            for key, value in headers.items():
                if not isinstance(key, str) or not isinstance(value, str) or key != key.lower():
                    raise PostSimError(
                        f"headers must map lower-case str names to str values (gRPC metadata); got {key!r}: {value!r}"
                    )
        if admin_key is not None and (not isinstance(admin_key, str) or not admin_key):
            raise PostSimError("admin_key must be a non-empty str or None")
        self.url = url
        self.timeout_s = _checked_timeout(timeout_s)
        self.headers = _grpc_headers(headers, admin_key)
        self.triton_kwargs: dict[str, Any] = {
            "ssl": bool(ssl),
            "root_certificates": _tls_file(root_certificates, "root_certificates", ssl),
            "private_key": _tls_file(private_key, "private_key", ssl),
            "certificate_chain": _tls_file(certificate_chain, "certificate_chain", ssl),
        }

    def error(self, exc: InferenceServerException, model: str | None = None, what: str = "") -> PostSimError:
        return map_server_error(
            exc,
            url=self.url,
            model=model,
            what=what,
            timeout_s=self.timeout_s,
            ssl=self.triton_kwargs["ssl"],
            client_certificate=self.triton_kwargs["certificate_chain"] is not None,
            admin_key=bool(self.headers and GRPC_RESTRICTED_HEADER in self.headers),
        )

    def poll_timeout(self, remaining: float) -> float:
        return max(0.01, min(remaining, self.timeout_s or remaining))


def _not_ready_error(url: str, timeout_s: float, reason: str) -> ServerUnavailableError:
    return ServerUnavailableError(
        f"the server at {url} was not ready within {timeout_s:g} s ({reason}): "
        "start it with `postsim serve` or check `--url`",
        status="UNAVAILABLE",
    )


# --------------------------------------------------------------------------- sync client


class PostSimClient:
    """Blocking client of a postsim server (Triton over gRPC at ``url``, ``host:port``).

    ``timeout_s`` bounds each gRPC call (None: no limit). The TLS files are paths, used
    only with ``ssl=True``: ``root_certificates`` is the CA that signed the server's
    certificate, ``private_key`` and ``certificate_chain`` the client's own for mutual TLS.
    ``headers`` go with every call as gRPC metadata; ``admin_key`` is the server's key for
    model control and the repository index (``postsim serve --admin-key``), inference
    needs none. Use it as a context manager, or call :meth:`close`.
    """

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
    ) -> None:
        self._settings = _Settings(
            url,
            timeout_s=timeout_s,
            ssl=ssl,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            headers=headers,
            admin_key=admin_key,
        )
        self._triton = grpcclient.InferenceServerClient(url, **self._settings.triton_kwargs)

    @property
    def url(self) -> str:
        return self._settings.url

    @property
    def timeout_s(self) -> float | None:
        return self._settings.timeout_s

    def __repr__(self) -> str:
        return f"PostSimClient({self.url!r}, timeout_s={self.timeout_s})"

    def __enter__(self) -> PostSimClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._triton.close()

    def _rpc(self, call: Callable[[], _T], *, model: str | None = None, what: str = "") -> _T:
        try:
            return call()
        except InferenceServerException as exc:
            raise self._settings.error(exc, model, what) from None

    def _infer(self, model: str, posts: list[Post], start: int, outputs: Sequence[str], k: int | None) -> Any:
        inputs = build_inputs(posts, k=k, first=start)
        what = _span(start, len(posts))
        logger.debug("%s: sending %s to %s", model, what, self.url)
        return self._rpc(
            lambda: self._triton.infer(
                model,
                inputs,
                outputs=_requested(outputs),
                client_timeout=self.timeout_s,
                headers=self._settings.headers,
            ),
            model=model,
            what=what,
        )

    def embed(self, posts: Sequence[Post]) -> list[EmbeddingResult]:
        """The fused embedding of each post, in order (chunks of at most ``max_batch_size``)."""
        batch = _checked_posts(posts, "embed")
        results: list[EmbeddingResult] = []
        for start, chunk in _chunks(batch):
            result = self._infer(contract.POST_EMBEDDING, chunk, start, _EMBED_OUTPUTS, None)
            results.extend(_embedding_results(result, contract.POST_EMBEDDING, len(chunk)))
        return results

    def similar_many(self, posts: Sequence[Post], k: int = 10) -> list[SimilarResult]:
        """For each post, in order: its ``k`` nearest indexed posts (best first) and its embedding."""
        top_k = _checked_k(k)
        batch = _checked_posts(posts, "similar_many")
        results: list[SimilarResult] = []
        for start, chunk in _chunks(batch):
            result = self._infer(contract.SIMILAR_POSTS, chunk, start, _SIMILAR_OUTPUTS, top_k)
            results.extend(_similar_results(result, contract.SIMILAR_POSTS, len(chunk)))
        return results

    def similar(self, post: Post, k: int = 10) -> list[Neighbor]:
        """The ``k`` indexed posts nearest to ``post``, best first."""
        if not isinstance(post, Post):
            raise InvalidPostError(f"similar() takes one Post; got {type(post).__name__}")
        return self.similar_many([post], k)[0].neighbors

    def _not_ready_reason(self, client_timeout: float | None) -> str | None:
        """None when the server is live and ``post_embedding`` is ready, else why not."""
        try:
            if not self._triton.is_server_live(headers=self._settings.headers, client_timeout=client_timeout):
                return "the server is not live"
            if not self._triton.is_model_ready(
                contract.POST_EMBEDDING, headers=self._settings.headers, client_timeout=client_timeout
            ):
                return f"model '{contract.POST_EMBEDDING}' is not ready"
        except InferenceServerException as exc:
            return str(self._settings.error(exc, contract.POST_EMBEDDING))
        return None

    def is_ready(self) -> bool:
        """True when the server answers and ``post_embedding`` is ready; never raises for that."""
        reason = self._not_ready_reason(self.timeout_s)
        if reason is not None:
            logger.debug("not ready: %s", reason)
        return reason is None

    def wait_until_ready(self, timeout_s: float = 60.0) -> None:
        """Poll :meth:`is_ready` until true; ServerUnavailableError after ``timeout_s``."""
        limit = _wait_limit(timeout_s)
        deadline = time.monotonic() + limit
        while True:
            remaining = deadline - time.monotonic()
            reason = self._not_ready_reason(self._settings.poll_timeout(remaining))
            if reason is None:
                return
            if time.monotonic() + _POLL_S > deadline:
                raise _not_ready_error(self.url, limit, reason)
            logger.debug("waiting for %s: %s", self.url, reason)
            time.sleep(_POLL_S)

    def server_info(self) -> ServerInfo:
        """The server's version, its models and their states, and how ``post_embedding`` was built."""
        headers, timeout = self._settings.headers, self.timeout_s
        metadata = self._rpc(lambda: self._triton.get_server_metadata(headers=headers, client_timeout=timeout))
        index = self._rpc(lambda: self._triton.get_model_repository_index(headers=headers, client_timeout=timeout))
        served = self.served_repository() if _embedding_ready(index) else ServedRepository()
        return _server_info(self.url, metadata, index, served)

    def served_repository(self) -> ServedRepository:
        """Which export ``post_embedding`` comes from (weights, fingerprint, repository id); needs no admin key."""
        headers, timeout = self._settings.headers, self.timeout_s
        response = self._rpc(
            lambda: self._triton.get_model_config(contract.POST_EMBEDDING, headers=headers, client_timeout=timeout),
            model=contract.POST_EMBEDDING,
        )
        return _served_repository(response.config)

    def load_model(self, model: str) -> None:
        """(Re)load a model through Triton's model-control API: new versions load while the old one serves.

        Triton loads a model again only if its files changed on disk. A server started with
        an admin key needs it (``admin_key=``). A version the server refuses raises
        ServerError with its reason; the version it had keeps serving.
        """
        headers, timeout = self._settings.headers, self.timeout_s
        try:
            self._triton.load_model(model, headers=headers, client_timeout=timeout)
        except InferenceServerException as exc:
            raise _load_error(self._settings.error(exc, model), model) from None

    def is_model_ready(self, model: str, version: str = "") -> bool:
        headers, timeout = self._settings.headers, self.timeout_s
        return bool(
            self._rpc(
                lambda: self._triton.is_model_ready(model, version, headers=headers, client_timeout=timeout),
                model=model,
            )
        )


# --------------------------------------------------------------------------- async client


class AsyncPostSimClient:
    """The asyncio form of :class:`PostSimClient`: same arguments, same methods, awaited.

    The gRPC channel is opened on first use, inside the running event loop. Chunks of a
    large batch are sent concurrently (a few at a time); results keep the caller's order.
    """

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
    ) -> None:
        self._settings = _Settings(
            url,
            timeout_s=timeout_s,
            ssl=ssl,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            headers=headers,
            admin_key=admin_key,
        )
        self._client: Any = None

    @property
    def url(self) -> str:
        return self._settings.url

    @property
    def timeout_s(self) -> float | None:
        return self._settings.timeout_s

    def __repr__(self) -> str:
        return f"AsyncPostSimClient({self.url!r}, timeout_s={self.timeout_s})"

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
            self._client = grpcclient_aio.InferenceServerClient(self.url, **self._settings.triton_kwargs)
        return self._client

    async def _rpc(self, call: Callable[[], Awaitable[_T]], *, model: str | None = None, what: str = "") -> _T:
        try:
            return await call()
        except InferenceServerException as exc:
            raise self._settings.error(exc, model, what) from None

    async def _infer(self, model: str, posts: list[Post], start: int, outputs: Sequence[str], k: int | None) -> Any:
        inputs = build_inputs(posts, k=k, first=start)
        what = _span(start, len(posts))
        logger.debug("%s: sending %s to %s", model, what, self.url)
        return await self._rpc(
            lambda: self._triton.infer(
                model,
                inputs,
                outputs=_requested(outputs),
                client_timeout=self.timeout_s,
                headers=self._settings.headers,
            ),
            model=model,
            what=what,
        )

    async def _in_order(self, jobs: list[Callable[[], Awaitable[list[_T]]]]) -> list[_T]:
        """Run the chunk jobs a few at a time; their results concatenated in job order."""
        gate = asyncio.Semaphore(_MAX_CHUNKS_IN_FLIGHT)
        failed = False

        async def gated(job: Callable[[], Awaitable[list[_T]]]) -> list[_T]:
            nonlocal failed
            async with gate:
                if failed:  # a chunk failed: send no more (the caller gets that chunk's error)
                    return []
                try:
                    return await job()
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

    async def embed(self, posts: Sequence[Post]) -> list[EmbeddingResult]:
        """The fused embedding of each post, in order (chunks of at most ``max_batch_size``)."""
        batch = _checked_posts(posts, "embed")

        def job(start: int, chunk: list[Post]) -> Callable[[], Awaitable[list[EmbeddingResult]]]:
            async def run() -> list[EmbeddingResult]:
                result = await self._infer(contract.POST_EMBEDDING, chunk, start, _EMBED_OUTPUTS, None)
                return _embedding_results(result, contract.POST_EMBEDDING, len(chunk))

            return run

        return await self._in_order([job(start, chunk) for start, chunk in _chunks(batch)])

    async def similar_many(self, posts: Sequence[Post], k: int = 10) -> list[SimilarResult]:
        """For each post, in order: its ``k`` nearest indexed posts (best first) and its embedding."""
        top_k = _checked_k(k)
        batch = _checked_posts(posts, "similar_many")

        def job(start: int, chunk: list[Post]) -> Callable[[], Awaitable[list[SimilarResult]]]:
            async def run() -> list[SimilarResult]:
                result = await self._infer(contract.SIMILAR_POSTS, chunk, start, _SIMILAR_OUTPUTS, top_k)
                return _similar_results(result, contract.SIMILAR_POSTS, len(chunk))

            return run

        return await self._in_order([job(start, chunk) for start, chunk in _chunks(batch)])

    async def similar(self, post: Post, k: int = 10) -> list[Neighbor]:
        """The ``k`` indexed posts nearest to ``post``, best first."""
        if not isinstance(post, Post):
            raise InvalidPostError(f"similar() takes one Post; got {type(post).__name__}")
        return (await self.similar_many([post], k))[0].neighbors

    async def _not_ready_reason(self, client_timeout: float | None) -> str | None:
        try:
            if not await self._triton.is_server_live(headers=self._settings.headers, client_timeout=client_timeout):
                return "the server is not live"
            if not await self._triton.is_model_ready(
                contract.POST_EMBEDDING, headers=self._settings.headers, client_timeout=client_timeout
            ):
                return f"model '{contract.POST_EMBEDDING}' is not ready"
        except InferenceServerException as exc:
            return str(self._settings.error(exc, contract.POST_EMBEDDING))
        return None

    async def is_ready(self) -> bool:
        """True when the server answers and ``post_embedding`` is ready; never raises for that."""
        reason = await self._not_ready_reason(self.timeout_s)
        if reason is not None:
            logger.debug("not ready: %s", reason)
        return reason is None

    async def wait_until_ready(self, timeout_s: float = 60.0) -> None:
        """Poll :meth:`is_ready` until true; ServerUnavailableError after ``timeout_s``."""
        limit = _wait_limit(timeout_s)
        deadline = time.monotonic() + limit
        while True:
            remaining = deadline - time.monotonic()
            reason = await self._not_ready_reason(self._settings.poll_timeout(remaining))
            if reason is None:
                return
            if time.monotonic() + _POLL_S > deadline:
                raise _not_ready_error(self.url, limit, reason)
            logger.debug("waiting for %s: %s", self.url, reason)
            await asyncio.sleep(_POLL_S)

    async def server_info(self) -> ServerInfo:
        """The server's version, its models and their states, and how ``post_embedding`` was built."""
        headers, timeout = self._settings.headers, self.timeout_s
        metadata = await self._rpc(lambda: self._triton.get_server_metadata(headers=headers, client_timeout=timeout))
        index = await self._rpc(
            lambda: self._triton.get_model_repository_index(headers=headers, client_timeout=timeout)
        )
        served = await self.served_repository() if _embedding_ready(index) else ServedRepository()
        return _server_info(self.url, metadata, index, served)

    async def served_repository(self) -> ServedRepository:
        """Which export ``post_embedding`` comes from (weights, fingerprint, repository id); needs no admin key."""
        headers, timeout = self._settings.headers, self.timeout_s
        response = await self._rpc(
            lambda: self._triton.get_model_config(contract.POST_EMBEDDING, headers=headers, client_timeout=timeout),
            model=contract.POST_EMBEDDING,
        )
        return _served_repository(response.config)
