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
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from postsim.core.errors import (
    IndexNotLoadedError,
    InvalidPostError,
    NoIndexPublishedError,
    PostSimError,
    RepositoryError,
    SearchIndexError,
)
from postsim.model_repository import contract
from postsim.model_repository.layout import version_dirs
from postsim.model_repository.manifest import WeightsManifest, log_weights

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
    if isinstance(error, NoIndexPublishedError | IndexNotLoadedError):
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
    return [value if isinstance(value, bytes) else str(value).encode() for value in array[:, 0]]


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
        from postsim.model_repository.visuals import VisualSettings

        parameters = _parameters(args)
        self.visuals = VisualSettings.from_parameters(parameters)
        self.max_text_chars = contract.MAX_TEXT_CHARS_PARAMETER.read(parameters)

    def _run(self, request: Any) -> list[Any]:
        from postsim.model_repository.visuals import preprocess_visuals

        images = _strings(request, contract.IMAGE.name)
        texts = _strings(request, contract.TEXT.name)
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
        pixels, frame_mask, image_mask, frames, errors = preprocess_visuals(images, self.visuals)
        _first_error(errors, contract.IMAGE.name)
        return [
            pb_utils.Tensor(contract.PIXEL_VALUES.name, pixels),
            pb_utils.Tensor(contract.FRAME_MASK.name, frame_mask),
            pb_utils.Tensor(contract.IMAGE_MASK.name, image_mask),
            pb_utils.Tensor(contract.CHECKED_TEXT.name, np.array(texts, dtype=np.object_).reshape(-1, 1)),
            pb_utils.Tensor(contract.FRAMES.name, frames),
        ]


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
        options = session_options(threads=threads, spinning=spinning)
        providers = _execution_providers(ort.get_available_providers(), args)
        path = _version_dir(args) / contract.ONNX_FILE_PARAMETER.read(parameters)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as error:  # ONNX Runtime raises its own bare exception types
            raise RepositoryError(
                f"{self.model_name} version {args['model_version']}: {path} does not load in ONNX Runtime "
                f"({_onnxruntime_reason(error)}): export it again, or remove this version folder"
            ) from None
        self.shared_dims = _shared_dims(self.session.get_inputs())
        masks = (contract.IMAGE_MASK.name, contract.TEXT_MASK.name)
        self.modality_masks = masks if all(name in self.input_names for name in masks) else ()
        logger.info(
            "%s: ONNX Runtime on %s, %s intra-op threads",
            self.model_name,
            self.session.get_providers()[0],
            threads or "default",
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
        outputs: list[np.ndarray] = self.session.run(self.output_names, feed)
        return outputs

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


class RetrievalModel(_PerRequestModel):
    """Nearest indexed posts of a fused embedding, from this version's verified FAISS index."""

    def initialize(self, args: dict[str, Any]) -> None:
        _check_contract(args)
        from postsim.model_repository.search_index import load_index_dir

        parameters = _parameters(args)
        self.max_top_k = contract.MAX_TOP_K_PARAMETER.read(parameters)
        manifest = WeightsManifest.read(_repository_dir(args))
        index_dir = _version_dir(args) / "index"
        try:
            self.index = load_index_dir(index_dir, expected_fingerprint=manifest.fingerprint)
        except PostSimError as error:
            logger.error("retrieval version %s refused: %s", args["model_version"], error)
            raise
        logger.info("retrieval version %s serves %s", args["model_version"], index_dir)

    def _run(self, request: Any) -> list[Any]:
        embeddings = _input(request, contract.EMBEDDING.name).astype(np.float32, copy=False)
        top_k = _input(request, contract.TOP_K.name).reshape(-1)
        k = _single_top_k(top_k, self.max_top_k)
        results = self.index.search(embeddings, k)
        width = min(len(neighbours) for neighbours in results)  # rows of one response share a width
        rows = [row[:width] for row in results]
        ids = np.array([[n.id.encode() for n in row] for row in rows], dtype=np.object_)
        scores = np.array([[n.score for n in row] for row in rows], dtype=np.float32)
        captions = np.array([[n.caption.encode() for n in row] for row in rows], dtype=np.object_)
        shape = (len(results), width)
        return [
            pb_utils.Tensor(contract.IDS.name, ids.reshape(shape)),
            pb_utils.Tensor(contract.SCORES.name, scores.reshape(shape)),
            pb_utils.Tensor(contract.CAPTIONS.name, captions.reshape(shape)),
            pb_utils.Tensor(contract.CONTRIBUTIONS.name, self._contributions(request, rows, shape)),
        ]

    def _contributions(self, request: Any, hits: list[list[Any]], shape: tuple[int, int]) -> np.ndarray:
        """Each neighbour's score split in four (``contract.CONTRIBUTIONS``); NaN from an index without the parts."""
        from postsim.model_repository.score_parts import split_scores, unsplit_scores

        if self.index.unimodal is None:
            return unsplit_scores(*shape)
        image, text, weights = (_input(request, tensor.name) for tensor in contract.RETRIEVAL_QUERY_PARTS)
        rows = np.array([[hit.row for hit in row] for row in hits], dtype=np.int64).reshape(shape)
        return split_scores(image, text, weights, self.index.unimodal, rows)


class RetrievalGatewayModel:
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
        _check_contract(args)
        self.output_names = [tensor.name for tensor in contract.NEIGHBOR_OUTPUTS]
        self.max_top_k = contract.MAX_TOP_K_PARAMETER.read(_parameters(args))
        self.retrieval_dir = _repository_dir(args) / contract.RETRIEVAL

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
        call = pb_utils.InferenceRequest(
            model_name=contract.RETRIEVAL, requested_output_names=self.output_names, inputs=inputs
        )
        answer = await call.async_exec()
        if answer.has_error():
            reason = answer.error().message().lower()
            if "unknown model" in reason or "is not ready" in reason:  # retrieval loads with the first index
                return _error_response(self._unserved_index())
            failure = answer.error()
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(failure.message(), failure.code()))
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.get_output_tensor_by_name(answer, name) for name in self.output_names]
        )

    def _unserved_index(self) -> SearchIndexError:
        """Why retrieval does not answer: no index on disk, or one the server does not serve."""
        published = version_dirs(self.retrieval_dir)
        return IndexNotLoadedError(int(published[-1].name)) if published else NoIndexPublishedError()


def _single_top_k(top_k: np.ndarray, limit: int) -> int:
    values = {int(value) for value in top_k}
    if len(values) != 1:
        raise InvalidPostError(f"TOP_K: every post of a request must ask for the same k, got {sorted(values)}")
    (k,) = values
    if not 1 <= k <= limit:
        raise InvalidPostError(f"TOP_K: must be between 1 and {limit}, got {k}")
    return k
