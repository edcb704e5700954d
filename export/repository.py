"""``postsim export``: builds the models, exports them to ONNX and writes the Triton model repository.

Steps, each logged: build the PyTorch models (pretrained, random or from a directory),
export and validate each ONNX model against PyTorch, convert the encoders to int8 or fp16
when asked and check the converted chain against the fp32 one on sample posts, write the
tokenizer, the model.py of each Python-backend model, every ``config.pbtxt``, and last the
weights manifest. The manifest is written last, so a repository whose export broke off (or
whose converted models were refused) has none, and the server refuses it with a message
that says to export again.
"""

from __future__ import annotations

import datetime as dt
import logging
import tempfile
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

from postsim.core.errors import ExportError, SettingsError
from postsim.core.files import write_text_atomic
from postsim.export.quantize import (
    AgreementReport,
    AttentionShape,
    Precision,
    PrecisionSettings,
    convert_models,
    install_converted,
    require_agreement,
)
from postsim.export.triton_config import ServingSettings, Target, repository_configs
from postsim.model_repository import contract
from postsim.model_repository.configs import to_pbtxt
from postsim.model_repository.layout import CONFIG_NAME, model_py_source
from postsim.model_repository.manifest import (
    MANIFEST_NAME,
    WeightsManifest,
    fingerprint_of,
    repository_id_of,
    sha256_file,
)
from postsim.model_repository.milvus_store import require_pymilvus
from postsim.model_repository.tokenization import TOKENIZER_FILE
from postsim.models.settings import ModelSettings
from postsim.models.weights import PostSimModels, build_models

logger = logging.getLogger("postsim")
VERSION = "1"


@dataclass(frozen=True, kw_only=True)
class ExportOptions:
    repository: Path
    target: Target = Target.EMBEDDED
    models: ModelSettings = field(default_factory=ModelSettings)
    serving: ServingSettings | None = None
    """Batching, instances and threads; None: the measured defaults of the target (ServingSettings.for_target)."""
    precision: Precision = Precision.FP32
    """Number format of the encoders; int8 is for CPU serving (embedded target), fp16 for GPU."""
    precision_settings: PrecisionSettings = field(default_factory=PrecisionSettings)
    """Calibration and agreement check of a precision other than fp32."""
    force_precision: bool = False
    """Write converted models even when they agree with fp32 below ``precision_settings.min_cosine``."""
    retrieval: contract.RetrievalSettings = field(default_factory=contract.RetrievalSettings)
    """The engine ``retrieval`` searches: an in-process FAISS index (default) or a Milvus collection."""


@dataclass(frozen=True)
class ExportReport:
    repository: Path
    manifest: WeightsManifest
    validation: dict[str, object]
    """Each ONNX model's agreement with PyTorch, by model name."""
    models: PostSimModels
    """The PyTorch models the repository holds (the reference the tests compare the server with)."""
    agreement: AgreementReport | None = None
    """How the converted encoders agree with fp32 on sample posts; None at fp32."""


def onnx_paths(repository: Path) -> dict[str, Path]:
    onnx_file = contract.ONNX_FILE_PARAMETER.default
    return {name: repository / name / VERSION / onnx_file for name in contract.ONNX_MODELS}


def export_repository(options: ExportOptions) -> ExportReport:
    """Build, export, validate and write everything; returns what was written and how well it agrees."""
    from postsim.export.onnx_export import export_onnx_models

    _check_precision(options)
    _check_retrieval(options.retrieval)
    # Weights that cannot be loaded (no hub, a wrong path) fail here, before the repository is touched.
    logger.info("building models (weights %s, dim %d)", options.models.weights, options.models.dim)
    models = build_models(options.models)
    repository = options.repository.resolve()
    repository.mkdir(parents=True, exist_ok=True)
    repository_id = repository_id_of(repository)
    (repository / MANIFEST_NAME).unlink(missing_ok=True)  # the repository is incomplete until the end

    paths = onnx_paths(repository)
    validation = export_onnx_models(models, paths)
    provenance = dict(models.provenance)
    agreement = None
    if options.precision is not Precision.FP32:
        agreement, provenance["precision"] = _convert_precision(options, models, paths)

    tokenizer_path = repository / contract.TOKENIZE / VERSION / TOKENIZER_FILE
    write_text_atomic(tokenizer_path, models.tokenizer_json)
    _write_model_py_files(repository, options.target)

    weight_files = [*paths.values(), tokenizer_path]
    file_hashes = {str(path.relative_to(repository)): sha256_file(path) for path in weight_files}
    random_weights = bool(models.provenance.get("random_weights", False))
    manifest = WeightsManifest(
        target=options.target.value,
        dim=options.models.dim,
        precision=options.precision.value,
        random_weights=random_weights,
        provenance=provenance,
        files=file_hashes,
        fingerprint=fingerprint_of(file_hashes),
        repository_id=repository_id,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        postsim_version=version("postsim"),
    )
    configs = repository_configs(
        target=options.target,
        dim=options.models.dim,
        settings=options.serving or ServingSettings.for_target(options.target),
        weights_label=manifest.weights_label,
        fingerprint=manifest.fingerprint,
        repository_id=manifest.repository_id,
        include_retrieval=True,
        retrieval=options.retrieval,
    )
    for name, config in configs.items():
        write_text_atomic(repository / name / CONFIG_NAME, to_pbtxt(config))
    for ensemble in contract.ENSEMBLES:
        (repository / ensemble / VERSION).mkdir(exist_ok=True)  # Triton wants a version folder, even empty
    manifest.write(repository)
    logger.info("wrote %s (%s target): %s", repository, options.target.value, manifest.describe())
    return ExportReport(
        repository=repository, manifest=manifest, validation=dict(validation), models=models, agreement=agreement
    )


def _check_retrieval(retrieval: contract.RetrievalSettings) -> None:
    """The milvus backend needs pymilvus where the repository is served: refuse it here, before anything is written."""
    if retrieval.backend is contract.RetrievalBackend.MILVUS:
        require_pymilvus()


def _check_precision(options: ExportOptions) -> None:
    if options.force_precision and options.precision is Precision.FP32:
        raise SettingsError(
            "--force-precision would be ignored: it keeps int8 or fp16 models that agree with fp32 below the "
            "threshold, and at fp32 nothing is converted; drop it, or pass `--precision int8` or `--precision fp16`"
        )
    if options.precision is Precision.INT8 and options.target is Target.TRITON:
        raise ExportError(
            "int8 models are for the embedded target (ONNX Runtime on CPU): the triton target runs TensorRT, "
            "which does not take their unsigned QDQ activations; export the triton target with "
            "`--precision fp16` or fp32 (TensorRT runs both in FP16)"
        )


def _convert_precision(
    options: ExportOptions, models: PostSimModels, paths: dict[str, Path]
) -> tuple[AgreementReport, str]:
    """Converts the exported encoders in place to ``options.precision``, once they agree with fp32.

    Returns the agreement and a description of the conversion for the provenance. Raises
    :class:`ExportError` when they agree below the threshold and the export is not forced;
    the repository then keeps the fp32 files and no manifest, so nothing serves it.
    """
    config = models.text_encoder.backbone.config
    # The transformer fusions suit ONNX Runtime's CUDA provider; TensorRT runs the graph as exported.
    attention = AttentionShape(config.num_attention_heads, config.hidden_size)
    if options.precision is Precision.FP16 and options.target is Target.EMBEDDED:
        logger.info("fp16 models are for GPU serving: on CPU, ONNX Runtime runs them in fp32 with extra casts")
    with tempfile.TemporaryDirectory(prefix="postsim-precision-") as work_dir:
        converted = convert_models(
            options.precision,
            paths,
            tokenizer_json=models.tokenizer_json,
            attention=attention if options.target is Target.EMBEDDED else None,
            work_dir=Path(work_dir),
            settings=options.precision_settings,
        )
        require_agreement(converted.agreement, force=options.force_precision)
        install_converted(converted, paths)
    return converted.agreement, converted.description


def _write_model_py_files(repository: Path, target: Target) -> None:
    """The entry point of each Python-backend model (retrieval's comes with each index version)."""
    for spec in contract.MODELS:
        if spec.backend_class is None or spec.name == contract.RETRIEVAL:
            continue
        if target is Target.TRITON and spec.onnx is not None:
            continue
        path = repository / spec.name / VERSION / "model.py"
        source = model_py_source(spec.name)
        if not path.is_file() or path.read_text() != source:
            write_text_atomic(path, source)
