"""The contract of the model repository, written once: its tensors, its models and their config parameters.

Every part of postsim that names a tensor, a model or a config parameter reads it here: the
ONNX exporter (input and output names, dynamic axes, tolerances), the ``config.pbtxt``
generator (``postsim.export.triton_config``), the Python-backend models that run inside
Triton (``postsim.model_repository.backend_models``), the in-process pipeline
(``postsim.models.pipeline``), the client and the benchmarks. To find every producer and
consumer of a tensor, start from its constant below (``PIXEL_VALUES``, ``EMBEDDING`` ...) and
search for it.

- **Tensors** (:class:`TensorSpec`): name, dtype and per-item shape. Shapes leave out the
  batch dimension (Triton adds it with ``max_batch_size > 0``, ONNX gets it as dynamic axis
  0); ``-1`` marks a variable dimension (the token sequence, the neighbour list). The
  embeddings (``IMAGE_PROJECTION``, ``IMAGE_EMBEDDING``, ``EMBEDDING``, ``QUERY_EMBEDDING`` ...)
  are ``dim`` floats, K in prose: the constants hold :data:`DEFAULT_DIM`, and
  :func:`model_specs` gives every model at the ``dim`` of an export.
- **Models** (:class:`ModelSpec`): inputs and outputs, the class that serves a
  Python-backend model, the steps of an ensemble, the config parameters it reads, whether
  it loads only once an index is published, and how an ONNX model is exported.
- **Config parameters** (:class:`ConfigParameter`): key, type and default of each
  ``parameters`` entry of a ``config.pbtxt``. The generator writes them with
  :meth:`ConfigParameter.as_text`; everything that reads a config reads them with
  :meth:`ConfigParameter.read`, so a key is spelled, and a default chosen, once.

Post ids (what ``IDS`` carries) are defined here too: :func:`post_id_problem`.
"""

from __future__ import annotations

import enum
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

import numpy as np

from postsim.core.errors import ExportError, RepositoryError, SettingsError

DEFAULT_DIM = 256
"""The embedding dimension K of an export that does not choose one (``postsim export --dim``)."""
MAX_BATCH_SIZE = 16
IMAGE_SIZE = 224
IMAGE_RESIZE_SHORTER_SIDE = 256
MAX_TEXT_TOKENS = 128
MODALITIES = ("image", "text")
"""The order of the modalities wherever they are side by side (``MODALITY_WEIGHTS``: image, then text)."""
MiB = 1024 * 1024

# Model names: identical in the embedded and the production target.
PREPROCESS_IMAGE = "preprocess_image"
TOKENIZE = "tokenize"
IMAGE_ENCODER = "image_encoder"
TEXT_ENCODER = "text_encoder"
FUSER = "fuser"
POST_EMBEDDING = "post_embedding"
RETRIEVAL = "retrieval"
RETRIEVAL_GATEWAY = "retrieval_gateway"
SIMILAR_POSTS = "similar_posts"
POST_CHANGES = "post_changes"
SIMILAR_POSTS_FILTERED = "similar_posts_filtered"


# --------------------------------------------------------------------------- config parameters

MAX_IMAGE_BYTES = 20 * MiB
"""Largest encoded image accepted, by default (``preprocess_image``)."""
MAX_IMAGE_PIXELS = 40_000_000
"""Largest width × height accepted by default, read from the image header before decoding."""
MAX_TEXT_CHARS = 10_000
"""Characters of a text kept before tokenising, by default; far more than MAX_TEXT_TOKENS tokens need."""
MAX_TOP_K = 1000
"""Largest ``TOP_K`` a similar_posts request may ask for, by default (``retrieval``)."""
VIDEO_FRAMES = 8
"""Frames F sampled from a video post, by default: the frames shown at the centres of F equal slices."""
MAX_VIDEO_BYTES = 100 * MiB
"""Largest encoded video accepted, by default."""
MAX_VIDEO_SECONDS = 600
"""Longest video accepted, by default, from its container's header."""
MAX_VIDEO_PIXELS = 3840 * 2160
"""Largest video frame (width × height) accepted by default: 4K UHD, in either orientation."""
MAX_VIDEO_FRAME_RATE = 120
"""Highest average frame rate (frames per second) accepted by default."""
MAX_ANIMATION_PIXELS = 200_000_000
"""Largest frames × canvas pixels of an animated GIF or WebP accepted by default (sampling may decode them all)."""
VIDEO_DECODE_SECONDS = 10
"""Wall-clock budget of one video, from opening it to its last sampled frame, by default."""

_Value = TypeVar("_Value", int, str, bool)


class ConfigParameter(str, Generic[_Value]):
    """One ``parameters`` entry of a model's ``config.pbtxt``; the object is its key, a string.

    Triton keeps every value as a string: :meth:`as_text` writes one, :meth:`read` reads one
    back as ``kind``. ``default`` is what a reader takes when a config does not carry the
    key, and what the generator writes unless told otherwise.
    """

    kind: type[_Value]
    default: _Value
    doc: str

    def __new__(cls, key: str, kind: type[_Value], default: _Value, doc: str = "") -> ConfigParameter[_Value]:
        parameter = super().__new__(cls, key)
        parameter.kind, parameter.default, parameter.doc = kind, default, doc
        return parameter

    @property
    def key(self) -> str:
        return str.__str__(self)

    def as_text(self, value: _Value) -> str:
        """The value as the config holds it (``bool``: ``"1"`` or ``"0"``)."""
        if self.kind is bool:
            return "1" if value else "0"
        return str(value)

    def from_text(self, text: str) -> _Value:
        if self.kind is bool:
            return self.kind(text not in ("0", "false", "False"))
        return self.kind(text)

    def read(self, parameters: Mapping[str, str]) -> _Value:
        """The value in ``parameters`` (from :func:`config_parameters`), or the default when absent or empty."""
        text = parameters.get(self.key, "")
        return self.from_text(text) if text != "" else self.default


def config_parameters(config: Any) -> dict[str, str]:
    """A config's parameters as ``{key: value}``, from any of the forms postsim meets one in.

    ``config`` is a tritonclient ``ModelConfig`` (parsed from ``config.pbtxt`` or answered by
    the server's model-config API), or the JSON a Python-backend model gets in its
    ``initialize`` arguments (``json.loads(args["model_config"])``).
    """
    parameters = config.get("parameters", {}) if isinstance(config, Mapping) else config.parameters
    return {
        str(key): value["string_value"] if isinstance(value, Mapping) else value.string_value
        for key, value in parameters.items()
    }


MAX_IMAGE_BYTES_PARAMETER = ConfigParameter("max_image_bytes", int, MAX_IMAGE_BYTES, "largest encoded image accepted")
MAX_IMAGE_PIXELS_PARAMETER = ConfigParameter(
    "max_image_pixels", int, MAX_IMAGE_PIXELS, "largest width × height accepted, read from the header"
)
MAX_TEXT_CHARS_PARAMETER = ConfigParameter(
    "max_text_chars", int, MAX_TEXT_CHARS, "characters of a text kept before tokenising"
)
MAX_TOP_K_PARAMETER = ConfigParameter("max_top_k", int, MAX_TOP_K, "largest TOP_K a request may ask for")
VIDEO_FRAMES_PARAMETER = ConfigParameter("video_frames", int, VIDEO_FRAMES, "frames F sampled from a video post")
MAX_VIDEO_BYTES_PARAMETER = ConfigParameter("max_video_bytes", int, MAX_VIDEO_BYTES, "largest encoded video accepted")
MAX_VIDEO_SECONDS_PARAMETER = ConfigParameter(
    "max_video_seconds", int, MAX_VIDEO_SECONDS, "longest video accepted, from the container's header"
)
MAX_VIDEO_PIXELS_PARAMETER = ConfigParameter(
    "max_video_pixels", int, MAX_VIDEO_PIXELS, "largest video frame (width × height) accepted, from the header"
)
MAX_VIDEO_FRAME_RATE_PARAMETER = ConfigParameter(
    "max_video_frame_rate", int, MAX_VIDEO_FRAME_RATE, "highest average frame rate accepted (frames/s)"
)
MAX_ANIMATION_PIXELS_PARAMETER = ConfigParameter(
    "max_animation_pixels", int, MAX_ANIMATION_PIXELS, "largest frames × canvas pixels of an animated GIF or WebP"
)
VIDEO_DECODE_SECONDS_PARAMETER = ConfigParameter(
    "video_decode_seconds", int, VIDEO_DECODE_SECONDS, "wall-clock budget of decoding one video"
)
ONNX_FILE_PARAMETER = ConfigParameter("onnx_file", str, "model.onnx", "the ONNX file of the version folder it runs")
INTRA_OP_THREADS_PARAMETER = ConfigParameter(
    "intra_op_threads", int, 0, "ONNX Runtime intra-op threads of its session; 0: ONNX Runtime's choice"
)
INTRA_OP_SPINNING_PARAMETER = ConfigParameter(
    "intra_op_spinning", bool, False, "whether idle ONNX Runtime pool threads spin instead of sleeping"
)
LONE_POST_THREADS_PARAMETER = ConfigParameter(
    "lone_post_threads",
    int,
    0,
    "intra-op threads for a request the server runs alone (postsim serve counts them); 0: always intra_op_threads",
)
WEIGHTS_PARAMETER = ConfigParameter("postsim_weights", str, "", "where the weights came from (random, pretrained)")
FINGERPRINT_PARAMETER = ConfigParameter("postsim_fingerprint", str, "", "the weights fingerprint of the export")
REPOSITORY_ID_PARAMETER = ConfigParameter(
    "postsim_repository_id", str, "", "the id of the repository folder the export wrote (kept when exported again)"
)


class RetrievalBackend(str, enum.Enum):
    """Where ``retrieval`` keeps the posts it searches."""

    FAISS = "faiss"
    """An in-process FAISS index per replica: a version folder of ``retrieval`` and its change journal."""
    MILVUS = "milvus"
    """A Milvus collection that every replica searches and changes (``postsim[milvus]``)."""


RETRIEVAL_BACKEND_PARAMETER = ConfigParameter(
    "retrieval_backend", str, RetrievalBackend.FAISS.value, "faiss (in-process index) or milvus (a Milvus collection)"
)
MILVUS_URI_PARAMETER = ConfigParameter(
    "milvus_uri", str, "", "the Milvus that holds the posts (http://HOST:19530), with the milvus backend"
)
RETRIEVAL_PARAMETERS: tuple[ConfigParameter[str], ...] = (RETRIEVAL_BACKEND_PARAMETER, MILVUS_URI_PARAMETER)
"""Which engine ``retrieval`` searches, chosen at export (``postsim export --retrieval``)."""


@dataclass(frozen=True, kw_only=True)
class RetrievalSettings:
    """The engine ``retrieval`` searches, as the export writes it into ``RETRIEVAL_PARAMETERS`` and the model reads it."""

    backend: RetrievalBackend = RetrievalBackend.FAISS
    milvus_uri: str = ""
    """``http://HOST:19530`` (a Milvus server or cluster); with the milvus backend only."""

    def __post_init__(self) -> None:
        if self.backend is RetrievalBackend.MILVUS and not self.milvus_uri:
            raise SettingsError(
                "--retrieval milvus needs the Milvus that holds the posts: give --milvus-uri http://HOST:19530"
            )
        if self.backend is RetrievalBackend.FAISS and self.milvus_uri:
            raise SettingsError(
                f"--milvus-uri {self.milvus_uri} would be ignored: the faiss retrieval backend keeps its index in the "
                "server's process; add --retrieval milvus, or leave the URI out"
            )

    def parameters(self) -> dict[str, str]:
        return {RETRIEVAL_BACKEND_PARAMETER.key: self.backend.value, MILVUS_URI_PARAMETER.key: self.milvus_uri}

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> RetrievalSettings:
        """The settings in a config's parameters; a repository exported before the choice existed is faiss."""
        text = RETRIEVAL_BACKEND_PARAMETER.read(parameters)
        try:
            backend = RetrievalBackend(text)
        except ValueError:
            choices = ", ".join(backend.value for backend in RetrievalBackend)
            raise RepositoryError(
                f"retrieval_backend {text!r} in the retrieval config is none of {choices}: export the repository again"
            ) from None
        return cls(backend=backend, milvus_uri=MILVUS_URI_PARAMETER.read(parameters))


VIDEO_PARAMETERS: tuple[ConfigParameter[int], ...] = (
    VIDEO_FRAMES_PARAMETER,
    MAX_VIDEO_BYTES_PARAMETER,
    MAX_VIDEO_SECONDS_PARAMETER,
    MAX_VIDEO_PIXELS_PARAMETER,
    MAX_VIDEO_FRAME_RATE_PARAMETER,
    MAX_ANIMATION_PIXELS_PARAMETER,
    VIDEO_DECODE_SECONDS_PARAMETER,
)
"""How ``preprocess_image`` samples a video post (F) and what one may cost."""
INPUT_LIMIT_PARAMETERS: tuple[ConfigParameter[int], ...] = (
    MAX_IMAGE_BYTES_PARAMETER,
    MAX_IMAGE_PIXELS_PARAMETER,
    MAX_TEXT_CHARS_PARAMETER,
    MAX_TOP_K_PARAMETER,
    *VIDEO_PARAMETERS,
)
"""What one post may cost the server; each model enforces those among its ``ModelSpec.parameters``."""
SESSION_PARAMETERS: tuple[ConfigParameter[Any], ...] = (
    ONNX_FILE_PARAMETER,
    INTRA_OP_THREADS_PARAMETER,
    INTRA_OP_SPINNING_PARAMETER,
    LONE_POST_THREADS_PARAMETER,
)
"""How an ONNX model of the embedded target sets up its ONNX Runtime session."""
PROVENANCE_PARAMETERS: tuple[ConfigParameter[str], ...] = (
    WEIGHTS_PARAMETER,
    FINGERPRINT_PARAMETER,
    REPOSITORY_ID_PARAMETER,
)
"""Carried by every model's config, so a client can tell which export a server serves."""


# --------------------------------------------------------------------------- tensors


class DataType(enum.Enum):
    """A tensor's element type, with its spelling in each system that names it."""

    FP32 = ("TYPE_FP32", "FP32", np.float32)
    INT64 = ("TYPE_INT64", "INT64", np.int64)
    INT32 = ("TYPE_INT32", "INT32", np.int32)
    STRING = ("TYPE_STRING", "BYTES", np.object_)

    @property
    def triton_config(self) -> str:
        """Spelling in ``config.pbtxt`` (``TYPE_FP32``)."""
        return str(self.value[0])

    @property
    def wire(self) -> str:
        """Spelling in KServe-v2 requests (``FP32``, ``BYTES``)."""
        return str(self.value[1])

    @property
    def numpy(self) -> type[np.generic]:
        numpy_type: type[np.generic] = self.value[2]
        return numpy_type


@dataclass(frozen=True, kw_only=True)
class TensorSpec:
    name: str
    dtype: DataType
    dims: tuple[int, ...]
    """Per-item shape, without the batch dimension; -1 is variable."""
    dim_names: tuple[str, ...] = ()
    """Names of the variable dims, for ONNX dynamic axes (same length as the -1 entries)."""
    copy_of: str | None = None
    """For an output: the name of another output of the same model whose values it repeats."""
    is_embedding: bool = False
    """Its one dimension is the embedding dimension ``dim`` (K), which each export chooses."""
    optional: bool = False
    """An input a request may leave out (never an ensemble's: Triton 2.51 crashes re-creating one that has them)."""

    def dynamic_axes(self) -> dict[int, str]:
        """ONNX dynamic axes of the batched tensor: axis 0 is the batch."""
        axes = {0: "batch"}
        variable = [axis for axis, size in enumerate(self.dims, start=1) if size == -1]
        if len(variable) != len(self.dim_names):
            raise ExportError(f"{self.name}: name each variable dim (got {self.dim_names} for {self.dims})")
        axes.update(dict(zip(variable, self.dim_names, strict=True)))
        return axes

    def at_dim(self, dim: int) -> TensorSpec:
        """This tensor in an export of embeddings of ``dim`` floats (itself unless it is an embedding)."""
        return replace(self, dims=(dim,)) if self.is_embedding else self


def _tensor(
    name: str,
    dtype: DataType,
    *dims: int,
    dim_names: tuple[str, ...] = (),
    copy_of: str | None = None,
    optional: bool = False,
) -> TensorSpec:
    return TensorSpec(name=name, dtype=dtype, dims=dims, dim_names=dim_names, copy_of=copy_of, optional=optional)


def _optional(tensor: TensorSpec) -> TensorSpec:
    """``tensor`` as an input a request may leave out."""
    return replace(tensor, optional=True)


def _embedding(name: str, *, copy_of: str | None = None) -> TensorSpec:
    return TensorSpec(name=name, dtype=DataType.FP32, dims=(DEFAULT_DIM,), copy_of=copy_of, is_embedding=True)


# Raw post, as a client sends it: one encoded image or video and one UTF-8 text per post.
IMAGE = _tensor("IMAGE", DataType.STRING, 1)
"""The post's visual, encoded: an image (JPEG, PNG, WebP, BMP, GIF) or a video (MP4/MOV, WebM, animated GIF/WebP)."""
TEXT = _tensor("TEXT", DataType.STRING, 1)
TOP_K = _tensor("TOP_K", DataType.INT32, 1)
# Between the models.
PIXEL_VALUES = _tensor("PIXEL_VALUES", DataType.FP32, -1, 3, IMAGE_SIZE, IMAGE_SIZE, dim_names=("frames",))
"""A post's frames, normalised: one for an image, up to ``video_frames`` for a video, zeros past FRAME_MASK."""
FRAME_MASK = _tensor("FRAME_MASK", DataType.FP32, -1, dim_names=("frames",))
"""1 for each frame of PIXEL_VALUES the image encoder pools (their mean), 0 for padding."""
FRAMES = _tensor("FRAMES", DataType.INT32, 1)
"""Frames the post's image embedding pools: 1 for an image, 1 to ``video_frames`` for a video, 0 without a visual."""
IMAGE_MASK = _tensor("IMAGE_MASK", DataType.FP32, 1)
INPUT_IDS = _tensor("INPUT_IDS", DataType.INT64, -1, dim_names=("sequence",))
ATTENTION_MASK = _tensor("ATTENTION_MASK", DataType.INT64, -1, dim_names=("sequence",))
TEXT_MASK = _tensor("TEXT_MASK", DataType.FP32, 1)
CHECKED_TEXT = _tensor("CHECKED_TEXT", DataType.STRING, 1)
"""The post's TEXT, passed on by preprocess_image once the whole post is checked; tokenize reads it."""
IMAGE_PROJECTION = _embedding("IMAGE_PROJECTION")
"""The image encoder's projection of the pooled backbone features: ``dim`` floats, not normalised."""
TEXT_PROJECTION = _embedding("TEXT_PROJECTION")
"""The text encoder's projection of the mean-pooled token features: ``dim`` floats, not normalised."""
IMAGE_EMBEDDING = _embedding("IMAGE_EMBEDDING")
"""The post's image alone: ``IMAGE_PROJECTION`` L2-normalised, as the fuser weighs it; zeros without an image.

With ``TEXT_EMBEDDING`` and ``MODALITY_WEIGHTS`` it is what ``EMBEDDING`` is made of:
``EMBEDDING = normalise(w_image · IMAGE_EMBEDDING + w_text · TEXT_EMBEDDING)``. A client can
search one modality alone with it, or compare two posts modality by modality.
"""
TEXT_EMBEDDING = _embedding("TEXT_EMBEDDING")
"""The post's text alone: ``TEXT_PROJECTION`` L2-normalised; zeros without a text."""
EMBEDDING = _embedding("EMBEDDING")
"""The fused embedding of a post, L2-normalised."""
QUERY_EMBEDDING = _embedding("QUERY_EMBEDDING", copy_of=EMBEDDING.name)
"""The fused embedding again, as the fuser's third output: the query ``retrieval_gateway`` reads.

No ensemble output may feed a later step: asked for some of its outputs only (the KServe
``outputs`` field), Triton's ensemble scheduler prunes the step behind each output not asked
for, even when a later step reads that output, and the request then deadlocks
("at least one output is not set while no more ensemble steps can be made"). With its own
tensor, the query is pruned only when no retrieval output is asked for.
"""
MODALITY_WEIGHTS = _tensor("MODALITY_WEIGHTS", DataType.FP32, len(MODALITIES))
QUERY_IMAGE_EMBEDDING = _embedding("QUERY_IMAGE_EMBEDDING", copy_of=IMAGE_EMBEDDING.name)
QUERY_TEXT_EMBEDDING = _embedding("QUERY_TEXT_EMBEDDING", copy_of=TEXT_EMBEDDING.name)
QUERY_MODALITY_WEIGHTS = _tensor(
    "QUERY_MODALITY_WEIGHTS", DataType.FP32, len(MODALITIES), copy_of=MODALITY_WEIGHTS.name
)
QUERY_PARTS = (QUERY_IMAGE_EMBEDDING, QUERY_TEXT_EMBEDDING, QUERY_MODALITY_WEIGHTS)
"""The query's parts again, for ``retrieval_gateway`` to split each neighbour's score (see ``QUERY_EMBEDDING``)."""
IDS = _tensor("IDS", DataType.STRING, -1, dim_names=("neighbors",))
SCORES = _tensor("SCORES", DataType.FP32, -1, dim_names=("neighbors",))
CAPTIONS = _tensor("CAPTIONS", DataType.STRING, -1, dim_names=("neighbors",))
"""Each neighbor's caption as its index keeps it (:func:`post_caption`); "" if none."""
SCORE_PARTS = ("image_image", "text_text", "image_text", "text_image")
"""The four parts of a neighbour's score, in ``CONTRIBUTIONS`` order: query image ↔ neighbour image,
query text ↔ neighbour text, query image ↔ neighbour text, query text ↔ neighbour image."""
CONTRIBUTIONS = _tensor("CONTRIBUTIONS", DataType.FP32, -1, len(SCORE_PARTS), dim_names=("neighbors",))
"""Each neighbour's score split into the four ``SCORE_PARTS``; they sum to its ``SCORES`` entry.

The fused embeddings are normalised weighted sums of the unit modality vectors, so their
cosine splits exactly: ``score = Σ w_q,a · w_n,b · <a_q, b_n> / (|e_q| · |e_n|)`` over the
query's modality a and the neighbour's modality b (``|e|``: the norm of the weighted sum).
The neighbour's parts come from the index's unimodal-vector file, stored in fp16, so the
four parts sum to the score within 1e-3. A part of a modality the query or the neighbour
lacks is exactly 0. An index built without unimodal vectors (``postsim index build
--no-unimodal``) answers NaN in every part of its published posts: it cannot split their scores.
A post upserted into the live index keeps its parts (``post_changes`` journals them with its
fused vector, and compaction writes them into the next version's unimodal-vector file), as a
neighbour or as a ``QUERY_ID``; only one upserted through a journal record written before
parts were journalled answers NaN.
"""
NEIGHBOR_OUTPUTS = (IDS, SCORES, CAPTIONS, CONTRIBUTIONS)
"""What retrieval answers for each query, and retrieval_gateway passes on."""

# The live index (issue 12): changes while serving, filters, queries by id, near-duplicate collapse.
POST_ID = _tensor("POST_ID", DataType.STRING, 1)
"""post_changes: the id of the post each row upserts (with IMAGE and TEXT) or deletes (without them)."""
POST_METADATA = _tensor("POST_METADATA", DataType.STRING, 1)
"""post_changes: each upserted post's metadata as a JSON object (author, created_at, label, tags); "" for none."""
CHANGE_STATUS = _tensor("CHANGE_STATUS", DataType.STRING, 1)
"""post_changes: what became of each row: ``added``, ``replaced``, ``deleted``, or ``unknown`` (a delete of an
id no live post has: nothing was done for it)."""
SEQUENCE = _tensor("SEQUENCE", DataType.INT64, 1)
"""post_changes: the journal sequence number of the call's change (0 when it changed nothing), on every row."""
CHANGES = _tensor("CHANGES", DataType.STRING, 1)
"""retrieval: one call's changes as JSON (``postsim.model_repository.live_index.wire``), from post_changes."""
CHANGE_RECEIPT = _tensor("CHANGE_RECEIPT", DataType.STRING, 1)
"""retrieval: what a CHANGES request did, as JSON, once it is fsynced and applied."""
QUERY_ID = _tensor("QUERY_ID", DataType.STRING, 1)
"""An indexed post's id, queried by its stored vector instead of content (the post itself excluded)."""
FILTER = _tensor("FILTER", DataType.STRING, 1)
"""A JSON object of filter fields (``postsim.model_repository.live_index.filters.parse_filter``); "" for none."""
COLLAPSE_ABOVE = _tensor("COLLAPSE_ABOVE", DataType.FP32, 1)
"""Fold a result whose cosine to a higher-ranked one exceeds this into it; 0 or absent: no collapse."""
DUPLICATES = _tensor("DUPLICATES", DataType.STRING, -1, dim_names=("neighbors",))
"""Per result, a JSON list of the ``[id, score]`` near-duplicates folded into it (``[]`` without collapse)."""
LIVE_QUERY_OUTPUTS = (*NEIGHBOR_OUTPUTS, DUPLICATES)
"""What similar_posts_filtered answers, and retrieval for a filtered, by-id or collapsed query."""


# --------------------------------------------------------------------------- post ids

MAX_POST_ID_CHARS = 128
POST_ID_CHARACTERS = "letters A-Z and a-z, digits and - _ . : / @ + = ~"
_POST_ID = re.compile(rf"[A-Za-z0-9_.:/@+=~-]{{1,{MAX_POST_ID_CHARS}}}")
_SHOWN_ID_CHARS = 40


def post_id_problem(post_id: str) -> str | None:
    """Why ``post_id`` cannot be a post id (what ``IDS`` carries), or None when it can.

    A post id is 1 to 128 characters, each a letter, a digit or one of ``- _ . : / @ + = ~``.
    That takes numeric ids, UUIDs, slugs, namespaced ids (``reddit:t3_abc``) and URL paths
    (``instagram.com/p/Cx1``), and keeps every id safe to print in a terminal table or a
    log line, to put in a JSON file, a shell argument or a URL: no spaces, quotes, control
    characters or look-alike letters from other scripts.
    """
    if _POST_ID.fullmatch(post_id):
        return None
    shown = repr(post_id if len(post_id) <= _SHOWN_ID_CHARS else post_id[:_SHOWN_ID_CHARS] + "...")
    rule = f"a post id is 1 to {MAX_POST_ID_CHARS} characters: {POST_ID_CHARACTERS}"
    if not post_id:
        return f"a post id cannot be empty; {rule}"
    if len(post_id) > MAX_POST_ID_CHARS:
        return f"post id {shown} has {len(post_id):,} characters; {rule}"
    bad = next(character for character in post_id if not _POST_ID.fullmatch(character))
    return f"post id {shown} has the character {bad!r} (U+{ord(bad):04X}); {rule}"


CAPTION_CHARS = 200
"""Characters of a post's text that an index keeps to show with it."""


def post_caption(text: str | None) -> str:
    """What an index keeps of a post's text: its first 200 characters, on one line.

    Runs of white space (line breaks included) become one space, and control and format
    characters (bidirectional overrides, zero-width ones) are dropped, so a caption prints
    as one safe line in a table or a log. A post without text gets ``""``.
    """
    if not text:
        return ""
    words = " ".join(text.split())
    printable = "".join(character for character in words if unicodedata.category(character)[0] != "C")
    return printable[:CAPTION_CHARS]


# --------------------------------------------------------------------------- models


@dataclass(frozen=True, kw_only=True)
class OnnxExportSpec:
    """How a PyTorch module becomes ONNX and how closely it must agree with PyTorch."""

    opset: int = 17
    atol: float = 1e-4
    """Largest absolute difference allowed between ONNX Runtime and PyTorch outputs."""
    min_cosine: float = 0.9999
    """Smallest cosine similarity allowed between the two, per output row."""


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = MAX_BATCH_SIZE
    backend_class: str | None = None
    """The class of ``postsim.model_repository.backend_models`` that serves it in the Python backend
    (every model of the embedded target but the ensembles)."""
    steps: tuple[str, ...] = ()
    """For an ensemble: the models it chains, in order; tensors flow between them by name."""
    parameters: tuple[ConfigParameter[Any], ...] = ()
    """The config parameters it reads (besides PROVENANCE_PARAMETERS, which every model carries)."""
    loaded_with_index: bool = False
    """Loaded once an index is published (``retrieval`` has a version), never ready before."""
    onnx: OnnxExportSpec | None = None
    """Set for the models exported from PyTorch to ONNX."""

    def input(self, name: str) -> TensorSpec:
        return _by_name(self.inputs, name, self.name)

    def output(self, name: str) -> TensorSpec:
        return _by_name(self.outputs, name, self.name)

    @property
    def input_names(self) -> list[str]:
        return [tensor.name for tensor in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [tensor.name for tensor in self.outputs]

    @property
    def is_ensemble(self) -> bool:
        return bool(self.steps)

    def at_dim(self, dim: int) -> ModelSpec:
        """This model in an export of embeddings of ``dim`` floats."""
        return replace(
            self,
            inputs=tuple(tensor.at_dim(dim) for tensor in self.inputs),
            outputs=tuple(tensor.at_dim(dim) for tensor in self.outputs),
        )


def _by_name(tensors: tuple[TensorSpec, ...], name: str, model: str) -> TensorSpec:
    for tensor in tensors:
        if tensor.name == name:
            return tensor
    raise KeyError(f"model '{model}' has no tensor '{name}'; it has {[t.name for t in tensors]}")


_ENCODERS = (PREPROCESS_IMAGE, TOKENIZE, IMAGE_ENCODER, TEXT_ENCODER, FUSER)
POST_OUTPUTS = (EMBEDDING, MODALITY_WEIGHTS, IMAGE_EMBEDDING, TEXT_EMBEDDING, FRAMES)
"""What the ensembles answer about each query post itself (``FRAMES``: how many frames its image embedding pools)."""
RETRIEVAL_QUERY_PARTS = (IMAGE_EMBEDDING, TEXT_EMBEDDING, MODALITY_WEIGHTS)
"""The query's parts, which ``retrieval`` reads to split each neighbour's score (``CONTRIBUTIONS``)."""

MODELS: tuple[ModelSpec, ...] = (
    # preprocess_image checks the whole post first, and tokenize starts only on its CHECKED_TEXT:
    # Triton 2.51 mishandles an ensemble request that fails in one step while a parallel step of
    # it is still queued (the orphaned step runs later on freed buffers and breaks other requests).
    ModelSpec(
        name=PREPROCESS_IMAGE,
        inputs=(IMAGE, TEXT),
        outputs=(PIXEL_VALUES, FRAME_MASK, IMAGE_MASK, CHECKED_TEXT, FRAMES),
        backend_class="PreprocessImageModel",
        parameters=(
            MAX_IMAGE_BYTES_PARAMETER,
            MAX_IMAGE_PIXELS_PARAMETER,
            MAX_TEXT_CHARS_PARAMETER,  # it checks the text tokenize will decode
            *VIDEO_PARAMETERS,
        ),
    ),
    ModelSpec(
        name=TOKENIZE,
        inputs=(CHECKED_TEXT,),
        outputs=(INPUT_IDS, ATTENTION_MASK, TEXT_MASK),
        backend_class="TokenizeModel",
        parameters=(MAX_TEXT_CHARS_PARAMETER,),
    ),
    ModelSpec(
        name=IMAGE_ENCODER,
        inputs=(PIXEL_VALUES, FRAME_MASK),
        outputs=(IMAGE_PROJECTION,),
        backend_class="OnnxRuntimeModel",
        parameters=SESSION_PARAMETERS,
        onnx=OnnxExportSpec(atol=1e-3, min_cosine=0.9999),
    ),
    ModelSpec(
        name=TEXT_ENCODER,
        inputs=(INPUT_IDS, ATTENTION_MASK),
        outputs=(TEXT_PROJECTION,),
        backend_class="OnnxRuntimeModel",
        parameters=SESSION_PARAMETERS,
        onnx=OnnxExportSpec(atol=1e-3, min_cosine=0.9999),
    ),
    ModelSpec(
        name=FUSER,
        inputs=(IMAGE_PROJECTION, TEXT_PROJECTION, IMAGE_MASK, TEXT_MASK),
        outputs=(EMBEDDING, MODALITY_WEIGHTS, QUERY_EMBEDDING, IMAGE_EMBEDDING, TEXT_EMBEDDING, *QUERY_PARTS),
        backend_class="OnnxRuntimeModel",
        parameters=SESSION_PARAMETERS,
        onnx=OnnxExportSpec(atol=1e-5, min_cosine=0.99999),
    ),
    ModelSpec(name=POST_EMBEDDING, inputs=(IMAGE, TEXT), outputs=POST_OUTPUTS, steps=_ENCODERS),
    # retrieval holds the live index (one instance): queries come from retrieval_gateway and
    # similar_posts_filtered, changes from post_changes, all as BLS calls with the inputs they need.
    ModelSpec(
        name=RETRIEVAL,
        inputs=tuple(
            _optional(tensor)
            for tensor in (EMBEDDING, TOP_K, *RETRIEVAL_QUERY_PARTS, QUERY_ID, FILTER, COLLAPSE_ABOVE, CHANGES)
        ),
        outputs=(*LIVE_QUERY_OUTPUTS, CHANGE_RECEIPT),
        backend_class="RetrievalModel",
        parameters=(MAX_TOP_K_PARAMETER, *RETRIEVAL_PARAMETERS),
        loaded_with_index=True,
    ),
    # similar_posts reaches retrieval through this step (a call, not an ensemble edge): Triton 2.51
    # re-creates every ensemble that names a model when a new version of it loads, and crashes
    # when a query reaches the ensemble being retired. So publishing an index swaps retrieval alone.
    ModelSpec(
        name=RETRIEVAL_GATEWAY,
        inputs=(QUERY_EMBEDDING, TOP_K, *QUERY_PARTS),
        outputs=NEIGHBOR_OUTPUTS,
        backend_class="RetrievalGatewayModel",
        parameters=(MAX_TOP_K_PARAMETER,),  # checked before calling retrieval
        loaded_with_index=True,
    ),
    ModelSpec(
        name=SIMILAR_POSTS,
        inputs=(IMAGE, TEXT, TOP_K),
        outputs=(*NEIGHBOR_OUTPUTS, *POST_OUTPUTS),
        steps=(*_ENCODERS, RETRIEVAL_GATEWAY),
        loaded_with_index=True,
    ),
    # Not an ensemble: the ensembles must not gain optional inputs (Triton 2.51 crashes re-creating
    # one that has them). It embeds the content through post_embedding, then asks retrieval.
    ModelSpec(
        name=SIMILAR_POSTS_FILTERED,
        inputs=(
            _optional(IMAGE),
            _optional(TEXT),
            _optional(QUERY_ID),
            TOP_K,
            _optional(FILTER),
            _optional(COLLAPSE_ABOVE),
        ),
        outputs=LIVE_QUERY_OUTPUTS,
        backend_class="SimilarPostsFilteredModel",
        parameters=(MAX_TOP_K_PARAMETER,),
        loaded_with_index=True,
    ),
    # Upserts (rows with IMAGE and TEXT: embedded through post_embedding) or deletes (rows without):
    # answered once retrieval has journalled (fsynced) and applied the change.
    ModelSpec(
        name=POST_CHANGES,
        inputs=(POST_ID, _optional(IMAGE), _optional(TEXT), _optional(POST_METADATA)),
        outputs=(CHANGE_STATUS, SEQUENCE),
        backend_class="PostChangesModel",
        loaded_with_index=True,
    ),
)
"""Every model of the repository, in the order they load (each after the models it needs)."""


def model_specs(dim: int = DEFAULT_DIM) -> dict[str, ModelSpec]:
    """Every model of the repository for embeddings of ``dim`` floats, by name, in load order."""
    return {spec.name: spec.at_dim(dim) for spec in MODELS}


MODEL_NAMES = tuple(spec.name for spec in MODELS)
"""The models' names in load order."""
ONNX_MODELS = tuple(spec.name for spec in MODELS if spec.onnx is not None)
"""The models exported from PyTorch, in the order they are exported."""
ENSEMBLES = tuple(spec.name for spec in MODELS if spec.is_ensemble)
"""The models clients call: the ensembles."""
INDEX_MODELS = tuple(spec.name for spec in MODELS if spec.loaded_with_index)
"""The models loaded once an index is published."""
