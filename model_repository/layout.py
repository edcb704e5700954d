"""Where things live in a model repository, and which of its models can be loaded.

Triton needs ``<model>/config.pbtxt`` and numbered version folders; a Python-backend
model's version folder holds a ``model.py`` that names its class in
:mod:`postsim.model_repository.backend_models`.
"""

from __future__ import annotations

import enum
from pathlib import Path

from postsim.model_repository import contract

CONFIG_NAME = "config.pbtxt"


class Target(enum.Enum):
    """Which Triton an exported repository is for (``postsim export --target``)."""

    EMBEDDED = "embedded"
    """Every model in the Python backend, ONNX Runtime inside: the tritonserver of the nvidia-pytriton wheel
    that ``postsim serve`` runs (CPU, or CUDA where there is a GPU)."""
    TRITON = "triton"
    """Triton's onnxruntime backend with TensorRT on a GPU: NGC's Triton container (docker/)."""


PYTHON_BACKEND_CLASSES = {
    contract.PREPROCESS_IMAGE: "PreprocessImageModel",
    contract.TOKENIZE: "TokenizeModel",
    contract.IMAGE_ENCODER: "OnnxRuntimeModel",
    contract.TEXT_ENCODER: "OnnxRuntimeModel",
    contract.FUSER: "OnnxRuntimeModel",
    contract.RETRIEVAL: "RetrievalModel",
    contract.RETRIEVAL_GATEWAY: "RetrievalGatewayModel",
}
"""The class serving each Python-backend model (every model of the embedded target but the ensembles)."""

LOAD_ORDER = (
    contract.PREPROCESS_IMAGE,
    contract.TOKENIZE,
    contract.IMAGE_ENCODER,
    contract.TEXT_ENCODER,
    contract.FUSER,
    contract.POST_EMBEDDING,
    contract.RETRIEVAL,
    contract.RETRIEVAL_GATEWAY,
    contract.SIMILAR_POSTS,
)
INDEX_SERVING_MODELS = (contract.RETRIEVAL_GATEWAY, contract.SIMILAR_POSTS)
"""Models that serve the index: loaded once ``retrieval`` has a version, so they are never ready without one."""


def model_py_source(model: str) -> str:
    """The ``model.py`` of a Python-backend model: one import of its class."""
    return (
        f'"""Triton Python-backend entry point of `{model}`; the code is in postsim.model_repository."""\n\n'
        f"from postsim.model_repository.backend_models import {PYTHON_BACKEND_CLASSES[model]} as TritonPythonModel\n\n"
        '__all__ = ["TritonPythonModel"]\n'
    )


def version_dirs(model_dir: Path) -> list[Path]:
    """The numbered version folders of a model, oldest first."""
    if not model_dir.is_dir():
        return []
    return sorted((p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def loadable_models(repository: Path) -> list[str]:
    """Models with a config and at least one version folder, in dependency order.

    ``retrieval`` is loadable once an index is published, and so are the models that serve
    it (INDEX_SERVING_MODELS: ``similar_posts`` reaches ``retrieval`` through
    ``retrieval_gateway``); before that ``similar_posts`` is not loaded, and not ready.
    """
    found = []
    for model in LOAD_ORDER:
        model_dir = repository / model
        if not (model_dir / CONFIG_NAME).is_file():
            continue
        if version_dirs(model_dir):
            found.append(model)
    if contract.RETRIEVAL not in found or contract.RETRIEVAL_GATEWAY not in found:
        found = [model for model in found if model not in INDEX_SERVING_MODELS]
    return found
