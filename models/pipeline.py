"""The one in-process pipeline of a post: decode → preprocess → encode → fuse, as the server computes it.

Whatever computes an embedding outside the server goes through here, so nothing can drift
from what the server does (train/serve skew): the export's agreement check and int8
calibration (``postsim.export.quantize``), the benchmark's in-process baselines
(``postsim.bench.baselines``), training's feature extraction (``postsim.training.features``)
and the tests.

- :class:`Preprocessor` is the server's own preprocessing: ``preprocess_image``'s decoding
  of images and videos and its limits (:func:`~postsim.model_repository.visuals.preprocess_visuals`) and
  ``tokenize``'s tokenizer (:class:`~postsim.model_repository.tokenization.TextTokenizer`),
  giving the contract's tensors (:class:`PreparedPosts`).
- A :class:`Runtime` runs the three models on those tensors: :class:`OrtRuntime`, the
  exported ONNX files in ONNX Runtime (no torch needed), or
  :class:`~postsim.models.torch_runtime.TorchRuntime`, the PyTorch modules in eager mode.
- :class:`PostPipeline` chains one with the other: encoded images and UTF-8 texts in,
  fused embeddings and modality weights out.
- Training's stage, pooled backbone features, is
  :func:`~postsim.models.torch_runtime.pool_images` and ``pool_texts``: the encoders' own
  pooling, before their projection.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from postsim.core.errors import InvalidPostError, RepositoryError
from postsim.model_repository import contract
from postsim.model_repository.configs import read_config
from postsim.model_repository.layout import newest_version_dir
from postsim.model_repository.onnx_sessions import session_options
from postsim.model_repository.tokenization import TOKENIZER_FILE, TextTokenizer
from postsim.model_repository.visuals import VisualSettings, preprocess_visuals

logger = logging.getLogger("postsim")

PixelValues = np.ndarray | Sequence[np.ndarray | None]
"""A batch of frames ``[B, F, 3, 224, 224]`` (with a ``FRAME_MASK``) or of stills ``[B, 3, 224, 224]``,
or one ``[3, 224, 224]`` array per post (None: no image)."""


class Embedded(NamedTuple):
    """Fused embeddings ``[B, dim]`` and modality weights ``[B, 2]`` (image, text) of a batch of posts."""

    embedding: np.ndarray
    weights: np.ndarray


@dataclass(frozen=True, kw_only=True, eq=False)
class PreparedPosts:
    """A batch of posts as the server hands them to the encoders: the contract's tensors, and what was refused.

    A refused image or text is a zero row with mask 0, its error in its slot (None: accepted,
    or absent).
    """

    pixel_values: np.ndarray
    frame_mask: np.ndarray
    image_mask: np.ndarray
    frames: np.ndarray
    """``FRAMES``: the frames each post's image embedding pools (0 without an image)."""
    input_ids: np.ndarray
    attention_mask: np.ndarray
    text_mask: np.ndarray
    image_errors: tuple[InvalidPostError | None, ...] = ()
    text_errors: tuple[InvalidPostError | None, ...] = ()

    def __len__(self) -> int:
        return len(self.image_mask)

    def first_error(self, ids: Sequence[str] | None = None) -> InvalidPostError | None:
        """The first refusal, naming its post (by ``ids`` when given, else by position); None when all passed."""
        for position, (image, text) in enumerate(zip(self.image_errors, self.text_errors, strict=True)):
            error = image or text
            if error is not None:
                name = ids[position] if ids is not None else str(position)
                return InvalidPostError(f"post {name}: {error}")
        return None


class Preprocessor:
    """The server's preprocessing: images decoded as ``preprocess_image`` decodes them, texts tokenised as ``tokenize`` does."""

    def __init__(self, tokenizer: TextTokenizer, *, visuals: VisualSettings | None = None) -> None:
        self.tokenizer = tokenizer
        self.visuals = visuals or VisualSettings()

    @classmethod
    def from_tokenizer_json(cls, text: str, *, source: str = "the exported tokenizer") -> Preprocessor:
        """With the tokenizer of an export (``PostSimModels.tokenizer_json``) and the default limits."""
        return cls(TextTokenizer.from_json(text, source=source))

    @classmethod
    def from_repository(cls, repository: Path) -> Preprocessor:
        """Exactly what the repository's server runs: its tokenizer and the limits its configs carry."""
        image_parameters = contract.config_parameters(read_config(repository, contract.PREPROCESS_IMAGE))
        text_parameters = contract.config_parameters(read_config(repository, contract.TOKENIZE))
        tokenizer = TextTokenizer.from_file(
            newest_version_dir(repository, contract.TOKENIZE) / TOKENIZER_FILE,
            max_chars=contract.MAX_TEXT_CHARS_PARAMETER.read(text_parameters),
        )
        return cls(tokenizer, visuals=VisualSettings.from_parameters(image_parameters))

    def __call__(self, images: Sequence[bytes], texts: Sequence[bytes]) -> PreparedPosts:
        """Encoded images or videos (``b""``: none) and UTF-8 texts (``b""``: none), one of each per post."""
        if len(images) != len(texts):
            raise InvalidPostError(f"one image and one text per post: got {len(images)} and {len(texts)}")
        pixels = preprocess_visuals(images, self.visuals)
        tokens = self.tokenizer.encode(texts)
        return PreparedPosts(
            pixel_values=pixels.pixel_values,
            frame_mask=pixels.frame_mask,
            image_mask=pixels.image_mask,
            frames=pixels.frames,
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            text_mask=tokens.text_mask,
            image_errors=tuple(pixels.errors),
            text_errors=tuple(tokens.errors),
        )


class Runtime:
    """The three models of the contract (image encoder, text encoder, fuser) on numpy arrays."""

    def encode_image(self, pixel_values: np.ndarray, frame_mask: np.ndarray) -> np.ndarray:
        """``PIXEL_VALUES`` ``[B, F, 3, 224, 224]`` and ``FRAME_MASK`` ``[B, F]`` → ``IMAGE_PROJECTION`` ``[B, dim]``."""
        raise NotImplementedError

    def encode_text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """``INPUT_IDS`` and ``ATTENTION_MASK`` ``[B, L]`` → ``TEXT_PROJECTION`` ``[B, dim]``."""
        raise NotImplementedError

    def fuse(self, image: np.ndarray, text: np.ndarray, image_mask: np.ndarray, text_mask: np.ndarray) -> Embedded:
        """The two modality embeddings and masks → ``EMBEDDING`` and ``MODALITY_WEIGHTS``."""
        raise NotImplementedError

    def embed(
        self,
        pixel_values: PixelValues,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        image_mask: np.ndarray,
        text_mask: np.ndarray,
        *,
        frame_mask: np.ndarray | None = None,
    ) -> Embedded:
        """Embeds a batch of posts given as the contract's tensors, each checked against the contract.

        ``pixel_values`` may be stills ``[B, 3, 224, 224]`` (one frame each, without ``frame_mask``),
        or a list with None for posts without an image (zero pixels).
        Like the server, the encoders run on every row; the masks decide what the fuser uses.
        """
        pixels = stack_pixel_values(pixel_values)
        batch = len(pixels)
        if frame_mask is None and pixels.ndim == len(contract.PIXEL_VALUES.dims):
            pixels, frame_mask = pixels[:, np.newaxis], np.ones((batch, 1), contract.FRAME_MASK.dtype.numpy)
        image_input = checked(contract.PIXEL_VALUES, pixels, batch)
        frames_input = checked(contract.FRAME_MASK, frame_mask, batch)
        if frames_input.shape != image_input.shape[:2]:
            raise InvalidPostError(
                f"{contract.FRAME_MASK.name} must have one entry per frame of {contract.PIXEL_VALUES.name}: "
                f"got {tuple(frames_input.shape)} for {tuple(image_input.shape)}"
            )
        ids = checked(contract.INPUT_IDS, input_ids, batch)
        tokens_mask = checked(contract.ATTENTION_MASK, attention_mask, batch)
        if ids.shape != tokens_mask.shape:
            raise InvalidPostError(
                f"{contract.INPUT_IDS.name} and {contract.ATTENTION_MASK.name} must have the same shape, "
                f"got {tuple(ids.shape)} and {tuple(tokens_mask.shape)}"
            )
        image_present = checked(contract.IMAGE_MASK, image_mask, batch)
        text_present = checked(contract.TEXT_MASK, text_mask, batch)
        return self.fuse(
            self.encode_image(image_input, frames_input),
            self.encode_text(ids, tokens_mask),
            image_present,
            text_present,
        )

    def embed_prepared(self, posts: PreparedPosts) -> Embedded:
        return self.embed(
            posts.pixel_values,
            posts.input_ids,
            posts.attention_mask,
            posts.image_mask,
            posts.text_mask,
            frame_mask=posts.frame_mask,
        )


def stack_pixel_values(pixel_values: PixelValues) -> np.ndarray:
    """One float32 array of the batch; per-post ``[3, H, W]`` arrays are stacked, None entries become zero images."""
    if isinstance(pixel_values, np.ndarray):
        return pixel_values
    images = list(pixel_values)
    if not images:
        raise InvalidPostError("no posts to embed: pixel_values is empty")
    zeros = np.zeros(contract.PIXEL_VALUES.dims[1:], contract.PIXEL_VALUES.dtype.numpy)
    return np.stack([zeros if image is None else np.asarray(image) for image in images])


def checked(spec: contract.TensorSpec, array: Any, batch: int) -> np.ndarray:
    """``array`` as a contiguous array, after checking it against the contract (got/expected on failure)."""
    array = np.asarray(array)
    if array.dtype != spec.dtype.numpy:
        raise InvalidPostError(f"{spec.name} must be {np.dtype(spec.dtype.numpy)}, got {array.dtype}")
    expected = (batch, *spec.dims)
    fits = len(array.shape) == len(expected) and all(
        want in (-1, got) for got, want in zip(array.shape, expected, strict=True)
    )
    if not fits:
        raise InvalidPostError(f"{spec.name} must have shape {expected} (-1: any), got {array.shape}")
    return np.ascontiguousarray(array)


def served_onnx_file(repository: Path, model: str) -> Path:
    """The ONNX file the repository's server runs for ``model``: its ``onnx_file`` in its newest version folder."""
    onnx_file = contract.ONNX_FILE_PARAMETER.read(contract.config_parameters(read_config(repository, model)))
    path = newest_version_dir(repository, model) / onnx_file
    if not path.is_file():
        raise RepositoryError(f"{path} does not exist: run `postsim export` again")
    return path


class OrtRuntime(Runtime):
    """The exported ONNX files of the three models in ONNX Runtime (CPU), one session each, run one after the other.

    ``threads`` is each session's intra-op thread count (0: ONNX Runtime's choice); the
    sessions are set up as the server's (:func:`~postsim.model_repository.onnx_sessions.session_options`).
    """

    def __init__(self, paths: Mapping[str, Path], *, threads: int = 0) -> None:
        import onnxruntime as ort

        options = session_options(threads=threads, quiet=True)
        self.paths = {name: Path(paths[name]) for name in contract.ONNX_MODELS}
        self.sessions: dict[str, Any] = {}
        for name, path in self.paths.items():
            try:
                self.sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            except Exception as error:  # ONNX Runtime raises its own bare exception types
                raise RepositoryError(f"ONNX Runtime cannot load {path}: {error}") from error

    @classmethod
    def from_repository(cls, repository: Path, *, threads: int = 0) -> OrtRuntime:
        """The files a repository's server runs (:func:`served_onnx_file`)."""
        paths = {name: served_onnx_file(repository, name) for name in contract.ONNX_MODELS}
        return cls(paths, threads=threads)

    def _run(self, model: str, feed: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
        results: list[np.ndarray] = self.sessions[model].run(outputs, feed)
        return results

    def encode_image(self, pixel_values: np.ndarray, frame_mask: np.ndarray) -> np.ndarray:
        feed = {contract.PIXEL_VALUES.name: pixel_values, contract.FRAME_MASK.name: frame_mask}
        return self._run(contract.IMAGE_ENCODER, feed)[0]

    def encode_text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feed = {contract.INPUT_IDS.name: input_ids, contract.ATTENTION_MASK.name: attention_mask}
        return self._run(contract.TEXT_ENCODER, feed)[0]

    def fuse(self, image: np.ndarray, text: np.ndarray, image_mask: np.ndarray, text_mask: np.ndarray) -> Embedded:
        feed = {
            contract.IMAGE_PROJECTION.name: image,
            contract.TEXT_PROJECTION.name: text,
            contract.IMAGE_MASK.name: image_mask,
            contract.TEXT_MASK.name: text_mask,
        }
        embedding, weights = self._run(contract.FUSER, feed, [contract.EMBEDDING.name, contract.MODALITY_WEIGHTS.name])
        return Embedded(embedding, weights)


@dataclass(frozen=True)
class PostPipeline:
    """Posts in, embeddings out, as the server computes them: :class:`Preprocessor`, then a :class:`Runtime`."""

    preprocess: Preprocessor
    runtime: Runtime

    def prepare(
        self, images: Sequence[bytes], texts: Sequence[bytes], ids: Sequence[str] | None = None
    ) -> PreparedPosts:
        """The posts' tensors; InvalidPostError naming the first post whose image or text the server would refuse."""
        posts = self.preprocess(images, texts)
        error = posts.first_error(ids)
        if error is not None:
            raise error
        return posts

    def embed(self, images: Sequence[bytes], texts: Sequence[bytes], ids: Sequence[str] | None = None) -> Embedded:
        """Fused embeddings and modality weights of the posts (``b""``: no image, or no text)."""
        return self.runtime.embed_prepared(self.prepare(images, texts, ids))
