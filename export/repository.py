"""``postsim export``: builds the models, exports them to ONNX and writes the Triton model repository.

Steps, each logged: build the PyTorch models (pretrained, random or from a directory),
export and validate each ONNX model against PyTorch, write the tokenizer, the model.py of
each Python-backend model, every ``config.pbtxt``, and last the weights manifest. The
manifest is written last, so a repository whose export broke off has none and the server
refuses it with a message that says to export again.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import tempfile
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

from postsim.export.triton_config import ENSEMBLE_STEPS, ServingSettings, Target, repository_configs, to_pbtxt
from postsim.export.weights import ModelSettings, PostSimModels, build_models
from postsim.model_repository import contract
from postsim.model_repository.layout import CONFIG_NAME, PYTHON_BACKEND_CLASSES, model_py_source
from postsim.model_repository.manifest import MANIFEST_NAME, WeightsManifest, fingerprint_of, sha256_file

LOGGER = logging.getLogger("postsim")
VERSION = "1"


@dataclass(frozen=True, kw_only=True)
class ExportOptions:
    repository: Path
    target: Target = Target.EMBEDDED
    models: ModelSettings = field(default_factory=ModelSettings)
    serving: ServingSettings = field(default_factory=ServingSettings)


@dataclass(frozen=True)
class ExportReport:
    repository: Path
    manifest: WeightsManifest
    validation: dict[str, object]
    """Each ONNX model's agreement with PyTorch, by model name."""
    models: PostSimModels
    """The PyTorch models the repository holds (the reference the tests compare the server with)."""


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temporary sibling and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def onnx_paths(repository: Path) -> dict[str, Path]:
    return {name: repository / name / VERSION / "model.onnx" for name in contract.ONNX_MODELS}


def export_repository(options: ExportOptions) -> ExportReport:
    """Build, export, validate and write everything; returns what was written and how well it agrees."""
    from postsim.export.onnx_export import export_onnx_models

    repository = options.repository.resolve()
    repository.mkdir(parents=True, exist_ok=True)
    (repository / MANIFEST_NAME).unlink(missing_ok=True)  # the repository is incomplete until the end

    LOGGER.info(
        "building models (%s weights, %s size, dim %d)",
        options.models.weights,
        options.models.size.value,
        options.models.dim,
    )
    models = build_models(options.models)
    paths = onnx_paths(repository)
    validation = export_onnx_models(models, paths)

    tokenizer_path = repository / contract.TOKENIZE / VERSION / "tokenizer.json"
    write_text_atomic(tokenizer_path, models.tokenizer_json)
    _write_model_py_files(repository, options.target)

    weight_files = [*paths.values(), tokenizer_path]
    file_hashes = {str(path.relative_to(repository)): sha256_file(path) for path in weight_files}
    random_weights = bool(models.provenance.get("random_weights", False))
    manifest = WeightsManifest(
        target=options.target.value,
        dim=options.models.dim,
        precision="fp32",
        random_weights=random_weights,
        provenance=models.provenance,
        files=file_hashes,
        fingerprint=fingerprint_of(file_hashes),
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        postsim_version=version("postsim"),
    )
    configs = repository_configs(
        target=options.target,
        dim=options.models.dim,
        settings=options.serving,
        weights_label=manifest.weights_label,
        fingerprint=manifest.fingerprint,
        include_retrieval=True,
    )
    for name, config in configs.items():
        write_text_atomic(repository / name / CONFIG_NAME, to_pbtxt(config))
    for ensemble in ENSEMBLE_STEPS:
        (repository / ensemble / VERSION).mkdir(exist_ok=True)  # Triton wants a version folder, even empty
    manifest.write(repository)
    LOGGER.info("wrote %s (%s target): %s", repository, options.target.value, manifest.describe())
    return ExportReport(repository=repository, manifest=manifest, validation=dict(validation), models=models)


def _write_model_py_files(repository: Path, target: Target) -> None:
    """The entry point of each Python-backend model (retrieval's comes with each index version)."""
    for model in PYTHON_BACKEND_CLASSES:
        if model == contract.RETRIEVAL or (target is Target.TRITON and model in contract.ONNX_MODELS):
            continue
        path = repository / model / VERSION / "model.py"
        source = model_py_source(model)
        if not path.is_file() or path.read_text() != source:
            write_text_atomic(path, source)
