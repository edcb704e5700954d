"""The tensor contract of every model in the repository, written once.

The ONNX exporter (dynamic axes, input and output names), the ``config.pbtxt`` generator,
the Python-backend models and the client all read these specs, so a tensor's name, dtype
and shape are declared here and nowhere else.

Shapes are per item: Triton adds the batch dimension (``max_batch_size > 0``), ONNX gets
it as dynamic axis 0. ``-1`` marks a variable dimension (the token sequence, the
neighbour list).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import numpy as np

from postsim.core.errors import ExportError

DEFAULT_EMBEDDING_DIM = 256
MAX_BATCH_SIZE = 16
IMAGE_SIZE = 224
IMAGE_RESIZE_SHORTER_SIDE = 256
MAX_TEXT_TOKENS = 128
MODALITIES = ("image", "text")

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

    def dynamic_axes(self) -> dict[int, str]:
        """ONNX dynamic axes of the batched tensor: axis 0 is the batch."""
        axes = {0: "batch"}
        variable = [axis for axis, size in enumerate(self.dims, start=1) if size == -1]
        if len(variable) != len(self.dim_names):
            raise ExportError(f"{self.name}: name each variable dim (got {self.dim_names} for {self.dims})")
        axes.update(dict(zip(variable, self.dim_names, strict=True)))
        return axes


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


def _by_name(tensors: tuple[TensorSpec, ...], name: str, model: str) -> TensorSpec:
    for tensor in tensors:
        if tensor.name == name:
            return tensor
    raise KeyError(f"model '{model}' has no tensor '{name}'; it has {[t.name for t in tensors]}")


def _tensor(
    name: str, dtype: DataType, *dims: int, dim_names: tuple[str, ...] = (), copy_of: str | None = None
) -> TensorSpec:
    return TensorSpec(name=name, dtype=dtype, dims=dims, dim_names=dim_names, copy_of=copy_of)


# Raw post, as a client sends it: one encoded image and one UTF-8 text per post.
IMAGE = _tensor("IMAGE", DataType.STRING, 1)
TEXT = _tensor("TEXT", DataType.STRING, 1)
TOP_K = _tensor("TOP_K", DataType.INT32, 1)
# Between the models.
PIXEL_VALUES = _tensor("PIXEL_VALUES", DataType.FP32, 3, IMAGE_SIZE, IMAGE_SIZE)
IMAGE_MASK = _tensor("IMAGE_MASK", DataType.FP32, 1)
INPUT_IDS = _tensor("INPUT_IDS", DataType.INT64, -1, dim_names=("sequence",))
ATTENTION_MASK = _tensor("ATTENTION_MASK", DataType.INT64, -1, dim_names=("sequence",))
TEXT_MASK = _tensor("TEXT_MASK", DataType.FP32, 1)
CHECKED_TEXT = _tensor("CHECKED_TEXT", DataType.STRING, 1)
"""The post's TEXT, passed on by preprocess_image once the whole post is checked; tokenize reads it."""
MODALITY_WEIGHTS = _tensor("MODALITY_WEIGHTS", DataType.FP32, len(MODALITIES))
IDS = _tensor("IDS", DataType.STRING, -1, dim_names=("neighbours",))
SCORES = _tensor("SCORES", DataType.FP32, -1, dim_names=("neighbours",))
CAPTIONS = _tensor("CAPTIONS", DataType.STRING, -1, dim_names=("neighbours",))
"""Each neighbour's caption as its index keeps it (``postsim.client.indexing.post_caption``); "" if none."""
NEIGHBOUR_OUTPUTS = (IDS, SCORES, CAPTIONS)
"""What retrieval answers for each query, and retrieval_gateway passes on."""


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


EMBEDDING_NAME = "EMBEDDING"
QUERY_EMBEDDING_NAME = "QUERY_EMBEDDING"


def image_embedding(dim: int) -> TensorSpec:
    return _tensor("IMAGE_EMBEDDING", DataType.FP32, dim)


def text_embedding(dim: int) -> TensorSpec:
    return _tensor("TEXT_EMBEDDING", DataType.FP32, dim)


def embedding(dim: int) -> TensorSpec:
    return _tensor(EMBEDDING_NAME, DataType.FP32, dim)


def query_embedding(dim: int) -> TensorSpec:
    """The fused embedding again, as the fuser's third output: the query ``retrieval_gateway`` reads.

    No ensemble output may feed a later step: asked for some of its outputs only (the KServe
    ``outputs`` field), Triton's ensemble scheduler prunes the step behind each output not asked
    for, even when a later step reads that output, and the request then deadlocks
    ("at least one output is not set while no more ensemble steps can be made"). With its own
    tensor, the query is pruned only when no retrieval output is asked for.
    """
    return _tensor(QUERY_EMBEDDING_NAME, DataType.FP32, dim, copy_of=EMBEDDING_NAME)


def model_specs(dim: int = DEFAULT_EMBEDDING_DIM) -> dict[str, ModelSpec]:
    """Every model of the repository for embeddings of ``dim`` floats, by name."""
    specs = [
        # preprocess_image checks the whole post first, and tokenize starts only on its CHECKED_TEXT:
        # Triton 2.51 mishandles an ensemble request that fails in one step while a parallel step of
        # it is still queued (the orphaned step runs later on freed buffers and breaks other requests).
        ModelSpec(name=PREPROCESS_IMAGE, inputs=(IMAGE, TEXT), outputs=(PIXEL_VALUES, IMAGE_MASK, CHECKED_TEXT)),
        ModelSpec(name=TOKENIZE, inputs=(CHECKED_TEXT,), outputs=(INPUT_IDS, ATTENTION_MASK, TEXT_MASK)),
        ModelSpec(
            name=IMAGE_ENCODER,
            inputs=(PIXEL_VALUES,),
            outputs=(image_embedding(dim),),
            onnx=OnnxExportSpec(atol=1e-3, min_cosine=0.9999),
        ),
        ModelSpec(
            name=TEXT_ENCODER,
            inputs=(INPUT_IDS, ATTENTION_MASK),
            outputs=(text_embedding(dim),),
            onnx=OnnxExportSpec(atol=1e-3, min_cosine=0.9999),
        ),
        ModelSpec(
            name=FUSER,
            inputs=(image_embedding(dim), text_embedding(dim), IMAGE_MASK, TEXT_MASK),
            outputs=(embedding(dim), MODALITY_WEIGHTS, query_embedding(dim)),
            onnx=OnnxExportSpec(atol=1e-5, min_cosine=0.99999),
        ),
        ModelSpec(name=POST_EMBEDDING, inputs=(IMAGE, TEXT), outputs=(embedding(dim), MODALITY_WEIGHTS)),
        ModelSpec(name=RETRIEVAL, inputs=(embedding(dim), TOP_K), outputs=NEIGHBOUR_OUTPUTS),
        # similar_posts reaches retrieval through this step (a call, not an ensemble edge): Triton 2.51
        # re-creates every ensemble that names a model when a new version of it loads, and crashes
        # when a query reaches the ensemble being retired. So publishing an index swaps retrieval alone.
        ModelSpec(name=RETRIEVAL_GATEWAY, inputs=(query_embedding(dim), TOP_K), outputs=NEIGHBOUR_OUTPUTS),
        ModelSpec(
            name=SIMILAR_POSTS,
            inputs=(IMAGE, TEXT, TOP_K),
            outputs=(*NEIGHBOUR_OUTPUTS, embedding(dim), MODALITY_WEIGHTS),
        ),
    ]
    return {spec.name: spec for spec in specs}


ONNX_MODELS = (IMAGE_ENCODER, TEXT_ENCODER, FUSER)
"""The models exported from PyTorch, in the order they are exported."""
