"""The Python-backend models of the repository.

Each ``<model>/1/model.py`` in the repository is one import of a class from here, so the
code that runs inside Triton is an ordinary module of the package: typed, linted and
imported by the tests. This module imports ``triton_python_backend_utils`` and so runs
only inside Triton's Python-backend stub.

Every model answers each request on its own: a bad post fails its own request with
INVALID_ARG and a message naming the input, and the requests batched with it succeed.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import triton_python_backend_utils as pb_utils

from postsim.core.errors import (
    IndexNotLoadedError,
    IndexSealedError,
    InvalidPostError,
    JournalWrittenElsewhereError,
    NoIndexPublishedError,
    PostSimError,
    RepositoryError,
    SearchIndexError,
)
from postsim.model_repository import contract
from postsim.model_repository.in_flight import InFlightCount
from postsim.model_repository.layout import JOURNAL_NAME, read_base_sequence, version_dirs
from postsim.model_repository.manifest import WeightsManifest, log_weights

if TYPE_CHECKING:
    from postsim.model_repository.live_index.metadata import PostMetadata
    from postsim.model_repository.live_index.milvus_index import MilvusLiveIndex
    from postsim.model_repository.live_index.mutable_index import MutableIndex
    from postsim.model_repository.visuals import PreparedVisuals, VisualSettings

logger = logging.getLogger("postsim")


class _TritonLogHandler(logging.Handler):
    """Sends the ``postsim`` logger's records to Triton's log, so they appear in the server's output."""

    def emit(self, record: logging.LogRecord) -> None:
        message = self.format(record)
        if record.levelno >= logging.ERROR:
            pb_utils.Logger.log_error(message)
        elif record.levelno >= logging.WARNING:
            pb_utils.Logger.log_warn(message)
        else:
            pb_utils.Logger.log_info(message)


if not any(isinstance(handler, _TritonLogHandler) for handler in logger.handlers):
    logger.addHandler(_TritonLogHandler())
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _error_response(error: Exception) -> Any:
    """INVALID_ARG for bad input; INTERNAL (with a generic message) for anything else."""
    if isinstance(error, InvalidPostError):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG))
    if isinstance(error, NoIndexPublishedError | IndexNotLoadedError | IndexSealedError | JournalWrittenElsewhereError):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error), pb_utils.TritonError.UNAVAILABLE))
    logger.exception("request failed", exc_info=error)
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError("internal error; the server log has the details", pb_utils.TritonError.INTERNAL)
    )


def _input(request: Any, name: str) -> np.ndarray:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise InvalidPostError(f"{name}: input missing from the request")
    return tensor.as_numpy()


def _strings(request: Any, name: str) -> list[bytes]:
    """A [B, 1] BYTES input as B byte strings."""
    array = _input(request, name)
    if array.ndim != 2 or array.shape[1] != 1:
        raise InvalidPostError(f"{name}: expected shape [batch, 1], got {list(array.shape)}")
    return [_bytes(value) for value in array[:, 0]]


def _bytes(value: object) -> bytes:
    """One element of a BYTES tensor as bytes (numpy may hand it over as str)."""
    return value if isinstance(value, bytes) else str(value).encode()


def _first_error(errors: Sequence[Exception | None], what: str) -> None:
    """Raise the first per-post error of a request, naming the post's position when it has several."""
    for position, error in enumerate(errors):
        if error is not None:
            prefix = f"post {position} of the request: " if len(errors) > 1 else ""
            raise InvalidPostError(f"{prefix}{error}") from None


def _parameters(args: dict[str, Any]) -> dict[str, str]:
    """The model's config parameters, read back with ``contract.*_PARAMETER.read``."""
    return contract.config_parameters(json.loads(args["model_config"]))


def _check_contract(args: dict[str, Any]) -> None:
    """Refuse to load under a config whose tensors are not this postsim's contract for the model.

    A repository exported by another version of postsim would otherwise load and fail its
    requests one by one (a step reading a tensor its ensemble no longer passes it).
    """
    config = json.loads(args["model_config"])
    spec = contract.model_specs()[args["model_name"]]
    declared = ([t["name"] for t in config["input"]], [t["name"] for t in config["output"]])
    if declared != (spec.input_names, spec.output_names):
        raise RepositoryError(
            f"{spec.name}: config.pbtxt declares inputs {declared[0]} and outputs {declared[1]}, this postsim "
            f"expects {spec.input_names} and {spec.output_names}: the repository was exported by another version "
            "of postsim; export it again (`postsim export`)"
        )


def _version_dir(args: dict[str, Any]) -> Path:
    return Path(args["model_repository"]) / str(args["model_version"])


def _repository_dir(args: dict[str, Any]) -> Path:
    return Path(args["model_repository"]).parent


class _PerRequestModel:
    """A model that turns each request into outputs independently."""

    def _run(self, request: Any) -> list[Any]:
        raise NotImplementedError

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse(output_tensors=self._run(request)))
            except Exception as error:  # one request's failure must not fail its batch
                responses.append(_error_response(error))
        return responses


class PreprocessImageModel(_PerRequestModel):
    """Checks every post, then turns encoded image or video bytes into normalised frames and presence masks.

    Every per-post check of the ensembles happens here, in their first step (posts with
    neither modality, images, texts that are not UTF-8), before any other step is
    scheduled: Triton 2.51 mishandles an ensemble request that fails in one step while a
    parallel step of it is still queued. The checked text goes on as CHECKED_TEXT, which
    ``tokenize`` reads, so it starts only after the checks.
    """

    def initialize(self, args: dict[str, Any]) -> None:
        _check_contract(args)
        self.checks = _PostChecks.from_parameters(_parameters(args))

    def _run(self, request: Any) -> list[Any]:
        texts = _strings(request, contract.TEXT.name)
        pixels, frame_mask, image_mask, frames, _ = self.checks.prepare(_strings(request, contract.IMAGE.name), texts)
        return [
            pb_utils.Tensor(contract.PIXEL_VALUES.name, pixels),
            pb_utils.Tensor(contract.FRAME_MASK.name, frame_mask),
            pb_utils.Tensor(contract.IMAGE_MASK.name, image_mask),
            pb_utils.Tensor(contract.CHECKED_TEXT.name, np.array(texts, dtype=np.object_).reshape(-1, 1)),
            pb_utils.Tensor(contract.FRAMES.name, frames),
        ]


class _PostChecks:
    """Every per-post check of the ensembles (``preprocess_image``'s), with the limits of its config."""

    def __init__(self, visuals: VisualSettings, max_text_chars: int) -> None:
        self.visuals = visuals
        self.max_text_chars = max_text_chars

    @classmethod
    def from_parameters(cls, parameters: dict[str, str]) -> _PostChecks:
        from postsim.model_repository.visuals import VisualSettings

        return cls(VisualSettings.from_parameters(parameters), contract.MAX_TEXT_CHARS_PARAMETER.read(parameters))

    def prepare(self, images: list[bytes], texts: list[bytes]) -> PreparedVisuals:
        """The posts' frames and masks (``PreparedVisuals``); InvalidPostError naming the first post refused."""
        from postsim.model_repository.visuals import preprocess_visuals

        if len(images) != len(texts):
            raise InvalidPostError(f"IMAGE and TEXT must hold one entry per post: got {len(images)} and {len(texts)}")
        empty_posts = [
            i for i, (image, text) in enumerate(zip(images, texts, strict=True)) if not image and not text.strip()
        ]
        if empty_posts:
            raise InvalidPostError(
                f"post {empty_posts[0]} of the request has neither an image nor a text: send IMAGE, TEXT or both"
            )
        _first_error([_text_error(text, self.max_text_chars) for text in texts], contract.TEXT.name)
        prepared = preprocess_visuals(images, self.visuals)
        _first_error(prepared.errors, contract.IMAGE.name)
        return prepared


def _text_error(raw: bytes, max_chars: int) -> InvalidPostError | None:
    """Why ``tokenize`` would refuse this text (the same decoding), or None."""
    from postsim.model_repository.tokenization import decode_text

    try:
        decode_text(raw, max_chars=max_chars)
    except InvalidPostError as error:
        return error
    return None


class TokenizeModel(_PerRequestModel):
    """UTF-8 text → token ids padded to the longest text of the request, and a presence mask."""

    def initialize(self, args: dict[str, Any]) -> None:
        _check_contract(args)
        from postsim.model_repository.tokenization import TOKENIZER_FILE, TextTokenizer

        max_chars = contract.MAX_TEXT_CHARS_PARAMETER.read(_parameters(args))
        self.tokenizer = TextTokenizer.from_file(_version_dir(args) / TOKENIZER_FILE, max_chars=max_chars)

    def _run(self, request: Any) -> list[Any]:
        texts = _strings(request, contract.CHECKED_TEXT.name)
        input_ids, attention_mask, text_mask, errors = self.tokenizer.encode(texts)
        _first_error(errors, contract.TEXT.name)
        return [
            pb_utils.Tensor(contract.INPUT_IDS.name, input_ids),
            pb_utils.Tensor(contract.ATTENTION_MASK.name, attention_mask),
            pb_utils.Tensor(contract.TEXT_MASK.name, text_mask),
        ]


def _pad_to(array: np.ndarray, length: int) -> np.ndarray:
    """Right-pad axis 1 with zeros: a zero token id is [PAD], a zero attention or frame mask hides it."""
    if array.ndim < 2 or array.shape[1] == length:
        return array
    padding = [(0, 0), (0, length - array.shape[1])] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, padding)


class OnnxRuntimeModel:
    """An exported ONNX model run by ONNX Runtime inside the stub (the embedded target).

    Requests batched together by Triton run as one ONNX Runtime call: variable-length inputs
    (token sequences, a post's frames) are padded to the longest, which the attention or frame
    mask makes harmless (the image encoder runs its backbone on masked frames only).
    Triton has checked each request's dtypes and shapes against the config; what it cannot
    check (inputs whose variable dims must agree, values ONNX Runtime refuses, as token ids
    past the vocabulary in a request sent straight to ``text_encoder``) fails only the
    request that carries it: a batch ONNX Runtime refuses is run again one request at a time.

    With ``lone_post_threads`` above ``intra_op_threads`` the model keeps a second, wider
    session over the same file and runs a request on it while that request is the only
    inference call the server runs (:mod:`postsim.model_repository.in_flight`): then the
    other core is idle but for this post's other encoder, and under load every call stays
    on the narrow session, where one thread per process keeps the cores busy without fights.
    """

    def initialize(self, args: dict[str, Any]) -> None:
        _check_contract(args)
        import onnxruntime as ort

        from postsim.model_repository.onnx_sessions import session_options

        parameters = _parameters(args)
        config = json.loads(args["model_config"])
        self.model_name: str = args["model_name"]
        self.input_names = [tensor["name"] for tensor in config["input"]]
        self.output_names = [tensor["name"] for tensor in config["output"]]
        threads = contract.INTRA_OP_THREADS_PARAMETER.read(parameters)
        # Idle pool threads that sleep instead of spinning leave the cores to the other models' processes.
        spinning = contract.INTRA_OP_SPINNING_PARAMETER.read(parameters)
        providers = _execution_providers(ort.get_available_providers(), args)
        path = _version_dir(args) / contract.ONNX_FILE_PARAMETER.read(parameters)

        def load(thread_count: int) -> Any:
            options = session_options(threads=thread_count, spinning=spinning)
            try:
                return ort.InferenceSession(str(path), options, providers=providers)
            except Exception as error:  # ONNX Runtime raises its own bare exception types
                raise RepositoryError(
                    f"{self.model_name} version {args['model_version']}: {path} does not load in ONNX Runtime "
                    f"({_onnxruntime_reason(error)}): export it again, or remove this version folder"
                ) from None

        self.session = load(threads)
        lone_post_threads = contract.LONE_POST_THREADS_PARAMETER.read(parameters)
        self.in_flight: InFlightCount | None = None
        self.lone_post_session: Any = None
        self.lone_post_calls = 0
        """ONNX Runtime calls run on the wider session (told when the model unloads)."""
        self.calls = 0
        if threads > 0 and lone_post_threads > threads and providers == ["CPUExecutionProvider"]:
            self.in_flight = InFlightCount.from_environment()
            if self.in_flight is None:
                logger.warning(
                    "%s: %s is %d but this server does not count its calls (not started by `postsim serve`): "
                    "every request runs on %d thread(s)",
                    self.model_name,
                    contract.LONE_POST_THREADS_PARAMETER.key,
                    lone_post_threads,
                    threads,
                )
            else:
                self.lone_post_session = load(lone_post_threads)
        self.shared_dims = _shared_dims(self.session.get_inputs())
        masks = (contract.IMAGE_MASK.name, contract.TEXT_MASK.name)
        self.modality_masks = masks if all(name in self.input_names for name in masks) else ()
        logger.info(
            "%s: ONNX Runtime on %s, %s intra-op threads%s",
            self.model_name,
            self.session.get_providers()[0],
            threads or "default",
            f", {lone_post_threads} while it runs the server's only call" if self.lone_post_session else "",
        )
        log_weights(WeightsManifest.read(_repository_dir(args)))

    def _inputs(self, request: Any) -> list[np.ndarray]:
        """One request's inputs in the session's order; named dims shared by inputs must agree."""
        arrays = [_input(request, name) for name in self.input_names]
        by_name = dict(zip(self.input_names, arrays, strict=True))
        for dim_name, uses in self.shared_dims.items():
            sizes = {f"{name}[{axis}]": by_name[name].shape[axis] for name, axis in uses if name in by_name}
            if len(set(sizes.values())) > 1:
                got = ", ".join(f"{where} = {size}" for where, size in sizes.items())
                raise InvalidPostError(f"the '{dim_name}' dimension must be the same size in every input: got {got}")
        if self.modality_masks:
            _require_a_modality(*(by_name[name] for name in self.modality_masks))
        return arrays

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        runnable: list[tuple[int, list[np.ndarray]]] = []
        for position, request in enumerate(requests):
            try:
                runnable.append((position, self._inputs(request)))
            except Exception as error:
                responses[position] = _error_response(error)
        if len(runnable) > 1:
            try:
                outputs = self._run([inputs for _, inputs in runnable])
            except Exception as error:  # some request of the batch is bad: find out which, alone
                logger.warning(
                    "%s: a batch of %d requests failed (%s); running them one by one",
                    self.model_name,
                    len(runnable),
                    _onnxruntime_reason(error),
                )
            else:
                for (position, _), response in zip(runnable, self._split(runnable, outputs), strict=True):
                    responses[position] = response
                return responses
        for position, inputs in runnable:
            try:
                responses[position] = self._split([(position, inputs)], self._run([inputs]))[0]
            except Exception as error:
                responses[position] = self._run_error(error)
        return responses

    def _run(self, batch: list[list[np.ndarray]]) -> list[np.ndarray]:
        feed = {}
        for position, name in enumerate(self.input_names):
            arrays = [request_inputs[position] for request_inputs in batch]
            longest = max(array.shape[1] if array.ndim > 1 else 0 for array in arrays)
            feed[name] = np.concatenate([_pad_to(array, longest) for array in arrays])
        session = self.session
        self.calls += 1
        if self.in_flight is not None and len(batch) == 1 and self.in_flight.read() <= 1:
            session = self.lone_post_session
            self.lone_post_calls += 1
            if self.lone_post_calls == 1:
                logger.info("%s: the server's only call ran on the wider session", self.model_name)
        outputs: list[np.ndarray] = session.run(self.output_names, feed)
        return outputs

    def finalize(self) -> None:
        if self.in_flight is not None:
            self.in_flight.close()
            logger.info(
                "%s: %d of %d calls ran on the wider session (the server's only call)",
                self.model_name,
                self.lone_post_calls,
                self.calls,
            )

    def _split(self, runnable: list[tuple[int, list[np.ndarray]]], outputs: list[np.ndarray]) -> list[Any]:
        responses = []
        start = 0
        for _, inputs in runnable:
            size = inputs[0].shape[0]
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(output[start : start + size]))
                for name, output in zip(self.output_names, outputs, strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

    def _run_error(self, error: Exception) -> Any:
        """ONNX Runtime's INVALID_ARGUMENT for one request's values is the caller's; anything else is ours."""
        if type(error).__name__ == "InvalidArgument":
            return _error_response(
                InvalidPostError(f"{self.model_name} cannot run this request: {_onnxruntime_reason(error)}")
            )
        return _error_response(error)


def _require_a_modality(image_mask: np.ndarray, text_mask: np.ndarray) -> None:
    """A post must keep an image or a text token: the fuser's output for neither is no embedding at all.

    ``preprocess_image`` refuses posts whose IMAGE and TEXT are both empty; a text of only
    spaces, control, zero-width or lone accent characters gets past it and tokenises to
    nothing, which shows only here, where both masks arrive.
    """
    empty = np.flatnonzero(
        (image_mask.reshape(len(image_mask), -1).max(axis=1) <= 0)
        & (text_mask.reshape(len(text_mask), -1).max(axis=1) <= 0)
    )
    if empty.size:
        raise InvalidPostError(
            f"{contract.TEXT.name}: post {int(empty[0])} of the request has no image and its text has no word "
            "left after normalisation (only spaces, control, zero-width or accent characters): "
            "send an image or a text with words"
        )


def _shared_dims(session_inputs: Sequence[Any]) -> dict[str, list[tuple[str, int]]]:
    """Symbolic dims (other than the batch) used by more than one input: name -> [(input, axis)]."""
    uses: dict[str, list[tuple[str, int]]] = {}
    for tensor in session_inputs:
        for axis, dim in enumerate(tensor.shape):
            if axis > 0 and isinstance(dim, str):
                uses.setdefault(dim, []).append((tensor.name, axis))
    return {name: found for name, found in uses.items() if len(found) > 1}


_ORT_STATUS_MESSAGE = re.compile(r"Status Message: (.*)", re.DOTALL)
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")


def _onnxruntime_reason(error: Exception) -> str:
    """The useful part of an ONNX Runtime error: its status message, without node names or source paths."""
    text = str(error).strip()
    found = _ORT_STATUS_MESSAGE.search(text)
    reason = found.group(1) if found else _ORT_PREFIX.sub("", text)
    first = reason.strip().splitlines()[0] if reason.strip() else type(error).__name__
    return first[:300]


def _execution_providers(available: Sequence[str], args: dict[str, Any]) -> list[Any]:
    """CUDA where onnxruntime-gpu sees a GPU, else CPU."""
    if "CUDAExecutionProvider" in available and os.environ.get("CUDA_VISIBLE_DEVICES", "0") != "":
        device_id = int(args.get("model_instance_device_id", 0))
        return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


_BLS_CODES = {"[invalid argument] ": "INVALID_ARG", "[unavailable] ": "UNAVAILABLE"}
"""Open the message of an error ``retrieval`` answers with that code: a caller reached by BLS gets every
error code as INTERNAL (Triton 2.51, triton-inference-server/server#7804), so it reads the code from this."""


class RetrievalModel(_PerRequestModel):
    """The live index of this version (one instance holds it): searches, and changes from post_changes.

    With the faiss backend (``contract.RETRIEVAL_BACKEND_PARAMETER``) it opens the version's
    verified FAISS index and replays ``changes.journal`` beside it
    (:class:`~postsim.model_repository.live_index.mutable_index.MutableIndex`), so a restarted
    server or stub serves every acknowledged change; with the milvus backend it serves the
    collection the encoders' Milvus alias points to
    (:class:`~postsim.model_repository.live_index.milvus_index.MilvusLiveIndex`). A request is a
    search (``EMBEDDING`` with the query's ``RETRIEVAL_QUERY_PARTS``, or ``QUERY_ID``, with
    ``TOP_K`` and optionally ``FILTER`` and ``COLLAPSE_ABOVE``) or a change (``CHANGES``),
    answered once the change is durable and applied. Each hit's score is split in four
    (``CONTRIBUTIONS``) from the posts' stored parts (FAISS: the version's ``unimodal.npz`` and
    the journalled changes; Milvus: the collection's ``parts`` field); NaN where unknown.
    """

    index: MutableIndex | MilvusLiveIndex

    def initialize(self, args: dict[str, Any]) -> None:
        _check_contract(args)
        parameters = _parameters(args)
        instances = sum(int(group.get("count", 1)) for group in json.loads(args["model_config"])["instance_group"])
        if instances != 1:
            raise RepositoryError(
                f"retrieval runs as one instance (it holds the live index and appends to its journal); its "
                f"config.pbtxt asks for {instances}: export the repository again"
            )
        self.max_top_k = contract.MAX_TOP_K_PARAMETER.read(parameters)
        manifest = WeightsManifest.read(_repository_dir(args))
        try:
            retrieval = contract.RetrievalSettings.from_parameters(parameters)
            if retrieval.backend is contract.RetrievalBackend.MILVUS:
                self.index = _open_milvus(retrieval, manifest)
                serves = f"Milvus at {retrieval.milvus_uri}"
            else:
                self.index = _open_faiss(_version_dir(args), manifest)
                serves = str(_version_dir(args) / "index")
            self.sealed = False
        except PostSimError as error:
            logger.error("retrieval version %s refused: %s", args["model_version"], error)
            raise
        logger.info("retrieval version %s serves %s", args["model_version"], serves)

    def finalize(self) -> None:
        self.index.close()

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = super().execute(requests)
        for position, response in enumerate(responses):
            if not response.has_error():
                continue
            code = response.error().code()
            for marker, name in _BLS_CODES.items():
                if code == getattr(pb_utils.TritonError, name):
                    message = marker + response.error().message()
                    responses[position] = pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
        return responses

    def _run(self, request: Any) -> list[Any]:
        changes = _optional_input(request, contract.CHANGES.name)
        if changes is not None:
            return self._change(changes)
        from postsim.model_repository.live_index.filters import parse_filter

        k = _single_top_k(_input(request, contract.TOP_K.name).reshape(-1), self.max_top_k)
        filter_text = _single_value(request, contract.FILTER.name)
        where = parse_filter(filter_text) if filter_text else None
        collapse = _single_value(request, contract.COLLAPSE_ABOVE.name)
        collapse_above = float(collapse) if collapse else None
        query_ids = _optional_input(request, contract.QUERY_ID.name)
        if query_ids is not None:
            ids = [_text(value) for value in query_ids.reshape(-1)]
            results = self.index.search_by_id(ids, k, where=where, collapse_above=collapse_above)
        else:
            embeddings = _input(request, contract.EMBEDDING.name).astype(np.float32, copy=False)
            results = self.index.search(embeddings, k, where=where, collapse_above=collapse_above)
        width = min(len(hits) for hits in results)  # rows of one response share a width
        rows = [row[:width] for row in results]
        shape = (len(results), width)
        duplicates = [[json.dumps([[d.id, d.score] for d in hit.duplicates]).encode() for hit in row] for row in rows]
        return [
            pb_utils.Tensor(contract.IDS.name, _objects([[hit.id.encode() for hit in row] for row in rows], shape)),
            pb_utils.Tensor(
                contract.SCORES.name, np.array([[hit.score for hit in row] for row in rows], np.float32).reshape(shape)
            ),
            pb_utils.Tensor(
                contract.CAPTIONS.name, _objects([[hit.caption.encode() for hit in row] for row in rows], shape)
            ),
            pb_utils.Tensor(contract.CONTRIBUTIONS.name, self._contributions(request, query_ids, rows, shape)),
            pb_utils.Tensor(contract.DUPLICATES.name, _objects(duplicates, shape)),
        ]

    def _contributions(
        self, request: Any, query_ids: np.ndarray | None, hits: list[list[Any]], shape: tuple[int, int]
    ) -> np.ndarray:
        """Each hit's score split in four (``contract.CONTRIBUTIONS``), from the query parts sent or, by id, stored.

        NaN where a part is unknown: a query without its parts, a post upserted through a journal
        record without parts (written before they were journalled), a version without unimodal vectors.
        """
        parts = [_optional_input(request, tensor.name) for tensor in contract.RETRIEVAL_QUERY_PARTS]
        if query_ids is not None:
            image, text, weights = self.index.stored_parts([_text(value) for value in query_ids.reshape(-1)])
        elif all(part is not None for part in parts):
            image, text, weights = (np.asarray(part, dtype=np.float32) for part in parts)
        else:
            image = text = np.full((shape[0], self.index.dimension), np.nan, dtype=np.float32)
            weights = np.full((shape[0], len(contract.MODALITIES)), np.nan, dtype=np.float32)
        return self.index.split_hits(image, text, weights, hits)

    def _change(self, changes: np.ndarray) -> list[Any]:
        from postsim.model_repository.live_index.protocol import ChangeReceipt
        from postsim.model_repository.live_index.wire import ChangeRequest, Control, receipt_to_json

        if changes.size != 1:
            raise InvalidPostError(f"{contract.CHANGES.name}: one change request per call, got {changes.size}")
        request = ChangeRequest.from_json(changes.reshape(-1)[0])
        if request.control is not None:
            self.sealed = request.control is Control.SEAL
            logger.info(
                "retrieval %s at change %d", "sealed" if self.sealed else "unsealed", self.index.state().sequence
            )
            receipt = ChangeReceipt(sequence=self.index.state().sequence)
        elif self.sealed:
            raise IndexSealedError()
        elif request.upserts:
            receipt = self.index.upsert(request.upserts, weights_fingerprint=request.weights_fingerprint)
        else:
            receipt = self.index.delete(request.deletes)
        return [pb_utils.Tensor(contract.CHANGE_RECEIPT.name, _objects([[receipt_to_json(receipt)]], (1, 1)))]


def _open_faiss(version_dir: Path, manifest: WeightsManifest) -> MutableIndex:
    from postsim.model_repository.live_index.mutable_index import MutableIndex
    from postsim.model_repository.search_index import load_index_dir

    base = load_index_dir(version_dir / "index", expected_fingerprint=manifest.fingerprint, use_gpu=False)
    return MutableIndex.open(
        base, version_dir / JOURNAL_NAME, metadata=base.metadata, base_sequence=read_base_sequence(version_dir)
    )


def _open_milvus(retrieval: contract.RetrievalSettings, manifest: WeightsManifest) -> MilvusLiveIndex:
    from postsim.model_repository.live_index.milvus_index import MilvusLiveIndex
    from postsim.model_repository.milvus_store import MilvusSettings

    settings = MilvusSettings(uri=retrieval.milvus_uri)
    return MilvusLiveIndex.open(settings, weights_fingerprint=manifest.fingerprint, dimension=manifest.dim)


def _objects(rows: list[list[bytes]], shape: tuple[int, int]) -> np.ndarray:
    return np.array(rows, dtype=np.object_).reshape(shape)


def _optional_input(request: Any, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _text(value: object) -> str:
    try:
        return value.decode() if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError:
        raise InvalidPostError("a string input is not valid UTF-8") from None


def _single_value(request: Any, name: str) -> str | None:
    """An optional input that must hold one value for the whole request, as text; None when absent or empty."""
    array = _optional_input(request, name)
    if array is None:
        return None
    values = {_text(value) for value in array.reshape(-1)}
    if len(values) != 1:
        raise InvalidPostError(f"{name}: every post of a request must carry the same value, got {len(values)}")
    (value,) = values
    return value if value not in ("", "0", "0.0") else None


class _RetrievalCaller:
    """A model that calls ``retrieval`` (BLS): refuses its input errors itself and explains a missing index."""

    retrieval_dir: Path

    def _start(self, args: dict[str, Any]) -> None:
        _check_contract(args)
        self.retrieval_dir = _repository_dir(args) / contract.RETRIEVAL
        self._post_checks: _PostChecks | None = None

    async def _call(self, model: str, inputs: list[Any], outputs: list[str]) -> tuple[Any, Any]:
        """(answer, None), or (None, the error response to send): errors of the model come back unchanged."""
        call = pb_utils.InferenceRequest(model_name=model, requested_output_names=outputs, inputs=inputs)
        answer = await call.async_exec()
        if not answer.has_error():
            return answer, None
        reason = answer.error().message().lower()
        if model == contract.RETRIEVAL and ("unknown model" in reason or "is not ready" in reason):
            return None, _error_response(self._unserved_index())  # retrieval loads with the first index
        if model == contract.POST_EMBEDDING and (refused := self._refused_post(inputs)) is not None:
            return None, _error_response(refused)
        failure = answer.error()
        message, code = failure.message(), failure.code()
        for marker, name in _BLS_CODES.items():
            if marker in message:  # retrieval's code, lost on the way
                message, code = message.split(marker, 1)[1], getattr(pb_utils.TritonError, name)
        return None, pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))

    def _refused_post(self, inputs: list[Any]) -> InvalidPostError | None:
        """After post_embedding failed: the error of the post its checks refuse, if one is refused.

        Triton 2.51 hands a BLS caller every error of post_embedding as INTERNAL
        (triton-inference-server/server#7804), a refused post included; ``preprocess_image``'s
        checks run here again, with its configured limits, on the failure path only, to tell a
        bad post from a failing server.
        """
        if self._post_checks is None:
            from postsim.model_repository.configs import read_config

            preprocess = read_config(self.retrieval_dir.parent, contract.PREPROCESS_IMAGE)
            self._post_checks = _PostChecks.from_parameters(contract.config_parameters(preprocess))
        posts = {tensor.name(): tensor.as_numpy().reshape(-1) for tensor in inputs}
        images, texts = ([_bytes(value) for value in posts[t.name]] for t in (contract.IMAGE, contract.TEXT))
        try:
            self._post_checks.prepare(images, texts)
        except InvalidPostError as error:
            return error
        return None

    def _unserved_index(self) -> SearchIndexError:
        """Why retrieval does not answer: no index on disk, or one the server does not serve."""
        published = version_dirs(self.retrieval_dir)
        return IndexNotLoadedError(int(published[-1].name)) if published else NoIndexPublishedError()


class RetrievalGatewayModel(_RetrievalCaller):
    """The last step of ``similar_posts``: forwards each request to ``retrieval`` (a BLS call).

    ``retrieval`` is loaded once the first index is published; until then this answers
    UNAVAILABLE with a message that says to publish one, and when ``retrieval`` has a version
    on disk but is not loaded (an admin unloaded it, or it failed to load) UNAVAILABLE with
    one that says so. The ensemble names this model,
    not ``retrieval``, so a new index version loads by
    swapping ``retrieval`` alone, the way Triton swaps versions of any model: requests in
    flight finish on the old version, new ones reach the new one. (Triton 2.51 re-creates an
    ensemble that names a model whenever a version of that model loads, and crashes when a
    query reaches the ensemble it is retiring.) Errors of ``retrieval`` come back unchanged.
    """

    def initialize(self, args: dict[str, Any]) -> None:
        self._start(args)
        self.output_names = [tensor.name for tensor in contract.NEIGHBOR_OUTPUTS]
        self.max_top_k = contract.MAX_TOP_K_PARAMETER.read(_parameters(args))

    async def execute(self, requests: list[Any]) -> list[Any]:
        import asyncio

        return list(await asyncio.gather(*(self._forward(request) for request in requests)))

    async def _forward(self, request: Any) -> Any:
        try:  # bad input is refused here: an error raised inside the call would reach the client as INTERNAL
            top_k = _input(request, contract.TOP_K.name)
            _single_top_k(top_k.reshape(-1), self.max_top_k)
            inputs = [
                pb_utils.Tensor(contract.EMBEDDING.name, _input(request, contract.QUERY_EMBEDDING.name)),
                pb_utils.Tensor(contract.TOP_K.name, top_k),
                *(
                    pb_utils.Tensor(part.name, _input(request, copy.name))
                    for part, copy in zip(contract.RETRIEVAL_QUERY_PARTS, contract.QUERY_PARTS, strict=True)
                ),
            ]
        except InvalidPostError as error:
            return _error_response(error)
        answer, failed = await self._call(contract.RETRIEVAL, inputs, self.output_names)
        if failed is not None:
            return failed
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.get_output_tensor_by_name(answer, name) for name in self.output_names]
        )


class SimilarPostsFilteredModel(_RetrievalCaller):
    """``similar_posts`` with a filter, by an indexed post's id, or with near-duplicates collapsed.

    A model of its own, not an ensemble (Triton 2.51 crashes re-creating an ensemble with
    optional inputs): it embeds ``IMAGE`` and ``TEXT`` through ``post_embedding`` (or takes
    ``QUERY_ID`` instead), then asks ``retrieval`` with the optional inputs it was given.
    """

    def initialize(self, args: dict[str, Any]) -> None:
        self._start(args)
        self.max_top_k = contract.MAX_TOP_K_PARAMETER.read(_parameters(args))
        self.output_names = [tensor.name for tensor in contract.LIVE_QUERY_OUTPUTS]

    async def execute(self, requests: list[Any]) -> list[Any]:
        import asyncio

        return list(await asyncio.gather(*(self._query(request) for request in requests)))

    async def _query(self, request: Any) -> Any:
        try:
            top_k = _input(request, contract.TOP_K.name)
            _single_top_k(top_k.reshape(-1), self.max_top_k)
            content = [_optional_input(request, tensor.name) for tensor in (contract.IMAGE, contract.TEXT)]
            query_id = _optional_input(request, contract.QUERY_ID.name)
            if (query_id is None) == (content[0] is None and content[1] is None):
                raise InvalidPostError(
                    f"give either {contract.QUERY_ID.name} (an indexed post's id) or the post's "
                    f"{contract.IMAGE.name} and {contract.TEXT.name}, not both and not neither"
                )
            if query_id is None and (content[0] is None or content[1] is None):
                raise InvalidPostError(f"a post is {contract.IMAGE.name} and {contract.TEXT.name}; give both")
            options = [
                pb_utils.Tensor(tensor.name, value)
                for tensor in (contract.FILTER, contract.COLLAPSE_ABOVE)
                if (value := _optional_input(request, tensor.name)) is not None
            ]
        except InvalidPostError as error:
            return _error_response(error)
        if query_id is not None:
            query = [pb_utils.Tensor(contract.QUERY_ID.name, query_id)]  # retrieval takes its parts from the index
        else:
            post = [
                pb_utils.Tensor(tensor.name, value)
                for tensor, value in zip((contract.IMAGE, contract.TEXT), content, strict=True)
            ]
            wanted = [tensor.name for tensor in (contract.EMBEDDING, *contract.RETRIEVAL_QUERY_PARTS)]
            embedded, failed = await self._call(contract.POST_EMBEDDING, post, wanted)
            if failed is not None:
                return failed
            query = [pb_utils.get_output_tensor_by_name(embedded, name) for name in wanted]
        inputs = [*query, pb_utils.Tensor(contract.TOP_K.name, top_k), *options]
        answer, failed = await self._call(contract.RETRIEVAL, inputs, self.output_names)
        if failed is not None:
            return failed
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.get_output_tensor_by_name(answer, name) for name in self.output_names]
        )


class PostChangesModel(_RetrievalCaller):
    """Upserts (rows with ``IMAGE`` and ``TEXT``) or deletes (rows with ``POST_ID`` only) into the live index.

    An upsert embeds its posts through ``post_embedding`` and sends them, with their score parts
    (unit modality vectors and weights, which split their scores later), and the encoders'
    fingerprint; ``retrieval`` journals (fsync) and applies the call's changes as one, and the
    answer comes back after that: a deleted post is in no result of a search that starts later.
    """

    def initialize(self, args: dict[str, Any]) -> None:
        self._start(args)
        self.fingerprint = contract.FINGERPRINT_PARAMETER.read(_parameters(args))

    async def execute(self, requests: list[Any]) -> list[Any]:
        return [await self._change(request) for request in requests]  # in order: changes apply as they arrive

    async def _change(self, request: Any) -> Any:
        from postsim.model_repository.live_index.metadata import PostMetadata
        from postsim.model_repository.live_index.protocol import PostUpsert, check_post_id
        from postsim.model_repository.live_index.wire import ChangeRequest, change_statuses, receipt_from_json
        from postsim.model_repository.score_parts import PostParts

        try:
            ids = [
                check_post_id(_text(value), contract.POST_ID.name) for value in _strings(request, contract.POST_ID.name)
            ]
            image, text = (_optional_input(request, tensor.name) for tensor in (contract.IMAGE, contract.TEXT))
            upsert = image is not None or text is not None
            if upsert and (image is None or text is None):
                raise InvalidPostError(f"an upsert gives each post's {contract.IMAGE.name} and {contract.TEXT.name}")
            metadata = [PostMetadata()] * len(ids)
            if _optional_input(request, contract.POST_METADATA.name) is not None:
                metadata = [
                    _metadata(raw, post_id)
                    for raw, post_id in zip(_strings(request, contract.POST_METADATA.name), ids, strict=True)
                ]
        except InvalidPostError as error:
            return _error_response(error)
        if image is not None and text is not None:
            post = [pb_utils.Tensor(contract.IMAGE.name, image), pb_utils.Tensor(contract.TEXT.name, text)]
            wanted = [contract.EMBEDDING, *contract.RETRIEVAL_QUERY_PARTS]
            embedded, failed = await self._call(contract.POST_EMBEDDING, post, [tensor.name for tensor in wanted])
            if failed is not None:
                return failed
            vectors, images, texts, weights = (
                pb_utils.get_output_tensor_by_name(embedded, tensor.name).as_numpy() for tensor in wanted
            )
            captions = [contract.post_caption(_text(value)) for value in text.reshape(-1)]
            try:
                changes = ChangeRequest(
                    weights_fingerprint=self.fingerprint,
                    upserts=tuple(
                        PostUpsert(
                            id=post_id,
                            vector=vector,
                            metadata=meta,
                            caption=caption,
                            parts=PostParts(image=image_part, text=text_part, weights=weight),
                        )
                        for post_id, vector, meta, caption, image_part, text_part, weight in zip(
                            ids, vectors, metadata, captions, images, texts, weights, strict=True
                        )
                    ),
                )
            except InvalidPostError as error:
                return _error_response(error)
        else:
            changes = ChangeRequest(deletes=tuple(ids))
        wire = pb_utils.Tensor(contract.CHANGES.name, np.array([[changes.to_json()]], dtype=np.object_))
        answer, failed = await self._call(contract.RETRIEVAL, [wire], [contract.CHANGE_RECEIPT.name])
        if failed is not None:
            return failed
        raw = pb_utils.get_output_tensor_by_name(answer, contract.CHANGE_RECEIPT.name).as_numpy().reshape(-1)[0]
        receipt = receipt_from_json(raw)
        statuses = change_statuses(receipt, ids, upsert=upsert)
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor(contract.CHANGE_STATUS.name, np.array([[s.encode()] for s in statuses], np.object_)),
                pb_utils.Tensor(contract.SEQUENCE.name, np.full((len(ids), 1), receipt.sequence, dtype=np.int64)),
            ]
        )


def _metadata(raw: bytes, post_id: str) -> PostMetadata:
    """One row of POST_METADATA: the post's metadata, or an InvalidPostError naming the post."""
    from postsim.model_repository.live_index.metadata import PostMetadata

    if not raw:
        return PostMetadata()
    try:
        fields = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidPostError(f"post {post_id!r}: {contract.POST_METADATA.name} is not JSON ({error})") from None
    if not isinstance(fields, dict):
        raise InvalidPostError(f"post {post_id!r}: {contract.POST_METADATA.name} must be a JSON object")
    try:
        return PostMetadata.from_fields(fields)
    except InvalidPostError as error:
        raise InvalidPostError(f"post {post_id!r}: {error}") from None


def _single_top_k(top_k: np.ndarray, limit: int) -> int:
    values = {int(value) for value in top_k}
    if len(values) != 1:
        raise InvalidPostError(f"TOP_K: every post of a request must ask for the same k, got {sorted(values)}")
    (k,) = values
    if not 1 <= k <= limit:
        raise InvalidPostError(f"TOP_K: must be between 1 and {limit}, got {k}")
    return k
