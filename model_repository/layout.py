"""Where things live in a model repository, and which of its models can be loaded.

Triton needs ``<model>/config.pbtxt`` and numbered version folders; a Python-backend
model's version folder holds a ``model.py`` that names its class in
:mod:`postsim.model_repository.backend_models` (the class each model's spec names in the contract).
"""

from __future__ import annotations

import enum
import json
from pathlib import Path

from postsim.core.errors import RepositoryError, SearchIndexError
from postsim.model_repository import contract

CONFIG_NAME = "config.pbtxt"


class Target(enum.Enum):
    """Which Triton an exported repository is for (``postsim export --target``)."""

    EMBEDDED = "embedded"
    """Every model in the Python backend, ONNX Runtime inside: the tritonserver of the nvidia-pytriton wheel
    that ``postsim serve`` runs (CPU, or CUDA where there is a GPU)."""
    TRITON = "triton"
    """Triton's onnxruntime backend with TensorRT on a GPU: NGC's Triton container (docker/)."""


INDEX_SERVING_MODELS = tuple(model for model in contract.INDEX_MODELS if model != contract.RETRIEVAL)
"""Models that serve the index: loaded once ``retrieval`` has a version, so they are never ready without one."""


def model_py_source(model: str) -> str:
    """The ``model.py`` of a Python-backend model: one import of its class (``ModelSpec.backend_class``)."""
    backend_class = contract.model_specs()[model].backend_class
    if backend_class is None:
        raise RepositoryError(f"model '{model}' is not a Python-backend model: it has no model.py")
    return (
        f'"""Triton Python-backend entry point of `{model}`; the code is in postsim.model_repository."""\n\n'
        f"from postsim.model_repository.backend_models import {backend_class} as TritonPythonModel\n\n"
        '__all__ = ["TritonPythonModel"]\n'
    )


def version_dirs(model_dir: Path) -> list[Path]:
    """The numbered version folders of a model, oldest first."""
    if not model_dir.is_dir():
        return []
    return sorted((p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def newest_version_dir(repository: Path, model: str) -> Path:
    """The newest version folder of ``model``; RepositoryError when it has none."""
    versions = version_dirs(repository / model)
    if not versions:
        raise RepositoryError(f"{repository / model} has no version folder: run `postsim export` first")
    return versions[-1]


def loadable_models(repository: Path) -> list[str]:
    """Models with a config and at least one version folder, in dependency order.

    ``retrieval`` is loadable once an index is published, and so are the models that serve
    it (INDEX_SERVING_MODELS: ``similar_posts`` reaches ``retrieval`` through
    ``retrieval_gateway``); before that ``similar_posts`` is not loaded, and not ready.
    """
    found = []
    for model in contract.MODEL_NAMES:
        model_dir = repository / model
        if not (model_dir / CONFIG_NAME).is_file():
            continue
        if version_dirs(model_dir):
            found.append(model)
    if contract.RETRIEVAL not in found or contract.RETRIEVAL_GATEWAY not in found:
        found = [model for model in found if model not in INDEX_SERVING_MODELS]
    return found


JOURNAL_NAME = "changes.journal"
"""The change journal of a retrieval version, beside its ``index`` folder."""
BASE_SEQUENCE_NAME = "base_sequence.json"
"""Beside the journal of a version compacted from another: ``{"base_sequence": S}``, the last change folded in."""


def read_base_sequence(version_dir: Path) -> int:
    """The last change folded into a version's index: 0 for one built from a corpus."""
    path = version_dir / BASE_SEQUENCE_NAME
    if not path.is_file():
        return 0
    try:
        return int(json.loads(path.read_text())["base_sequence"])
    except (ValueError, KeyError, TypeError) as error:
        raise SearchIndexError(
            f"{path}: not a base sequence ({error}); the version was not written by postsim"
        ) from None
