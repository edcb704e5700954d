"""Precision of the exported encoders: fp32 as exported, INT8 for CPU serving, FP16 for GPU serving.

``postsim export --precision`` exports and validates the fp32 models as usual, then
converts the two encoders here and measures how far the converted chain strays from the
fp32 one before anything is written to the repository. The fuser (a few hundred kB)
stays fp32 at every precision: its softmax and normalisation would gain nothing.

* **int8** (CPU): the image encoder is quantised statically, QDQ, per channel, with
  unsigned activations and signed weights (U8S8: ONNX Runtime runs it as QLinearConv,
  about 3 times faster than fp32 on AVX-512 VNNI; S8S8 measured no faster than fp32
  there), its activation ranges calibrated (MinMax) on sample-post images put through
  the server's preprocessing. The text encoder is quantised dynamically, per channel
  (DynamicQuantizeLinear + MatMulInteger), on the graph as exported; it needs no
  calibration.
* **fp16** (GPU): weights and activations in fp16, inputs and outputs kept fp32 so the
  contract does not change; for ONNX Runtime (the embedded target) the text encoder gets
  ONNX Runtime's transformer fusions first (Attention, SkipLayerNormalization, BiasGelu,
  ``onnxruntime.transformers.optimizer``). ONNX Runtime's CPU provider runs the fp16
  operators it lacks kernels for in fp32 between inserted casts, so the agreement
  measured on CPU covers fp16 storage of weights and activations, not fp16 arithmetic.

The agreement check runs sample posts (``postsim.corpus.samples``) through the in-process
pipeline (:mod:`postsim.models.pipeline`: the server's preprocessing and tokenizer, then each
chain in ONNX Runtime), and compares the
fused embeddings: cosine per post, and the overlap of each post's nearest neighbours in
the corpus. :func:`require_agreement` refuses a conversion whose mean cosine is below
:data:`MIN_AGREEMENT_COSINE` unless forced.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from postsim.core.errors import ExportError, RepositoryError
from postsim.core.files import move_atomic
from postsim.corpus.posts import read_posts
from postsim.corpus.samples import write_sample_posts
from postsim.model_repository.contract import (
    FUSER,
    IMAGE_ENCODER,
    MAX_BATCH_SIZE,
    PIXEL_VALUES,
    TEXT_ENCODER,
)
from postsim.models.pipeline import OrtRuntime, PreparedPosts, Preprocessor

logger = logging.getLogger("postsim")


class Precision(enum.Enum):
    """Number format of the exported encoders."""

    FP32 = "fp32"
    """The ONNX models as exported from PyTorch."""
    INT8 = "int8"
    """For CPU serving: static QDQ image encoder, dynamically quantised text encoder."""
    FP16 = "fp16"
    """For GPU serving: fp16 weights and activations, fp32 inputs and outputs."""


MIN_AGREEMENT_COSINE = 0.99
"""Smallest mean cosine between converted and fp32 fused embeddings that export accepts unforced."""
CONVERTED_MODELS = (IMAGE_ENCODER, TEXT_ENCODER)
"""The models a precision other than fp32 converts; the fuser stays fp32."""
_MB = 1e6
_CONVERSION_ERRORS: tuple[type[Exception], ...] = (
    RuntimeError,
    ValueError,
    onnx.checker.ValidationError,
    ort_state.Fail,
    ort_state.InvalidArgument,
    ort_state.InvalidGraph,
    ort_state.InvalidProtobuf,
    ort_state.NotImplemented,
)
"""What onnx, the quantiser and ONNX Runtime raise on a model they cannot handle (ONNX
Runtime's own exceptions derive from Exception, not RuntimeError)."""
_PRE_PROCESS_ERRORS: tuple[type[Exception], ...] = (*_CONVERSION_ERRORS, onnx.shape_inference.InferenceError)


@dataclass(frozen=True, kw_only=True)
class PrecisionSettings:
    """How a conversion is calibrated and checked."""

    calibration_images: int = 32
    """Sample-post images the image encoder's INT8 activation ranges are calibrated on."""
    calibration_batch: int = 8
    agreement_posts: int = 64
    """Sample posts the converted chain is compared with the fp32 chain on."""
    neighbours: int = 10
    """k of the neighbour overlap@k."""
    min_cosine: float = MIN_AGREEMENT_COSINE
    """Refusal threshold on the mean end-to-end cosine."""
    seed: int = 0
    """Seed of the calibration posts; the agreement posts use the next seed, so the two corpora differ."""

    def __post_init__(self) -> None:
        for name in ("calibration_images", "calibration_batch", "neighbours"):
            if getattr(self, name) < 1:
                raise ExportError(f"PrecisionSettings.{name} must be at least 1, got {getattr(self, name)}")
        if self.agreement_posts <= self.neighbours:
            raise ExportError(
                f"PrecisionSettings.agreement_posts ({self.agreement_posts}) must exceed neighbours "
                f"({self.neighbours}): each post needs that many other posts to be compared on"
            )
        if not -1.0 <= self.min_cosine <= 1.0:
            raise ExportError(f"PrecisionSettings.min_cosine must be within [-1, 1], got {self.min_cosine}")


@dataclass(frozen=True)
class AttentionShape:
    """Heads and hidden size of the text backbone, which the transformer fusions need."""

    num_heads: int
    hidden_size: int


# --- Agreement ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CosineStats:
    """Cosine similarity between reference and converted rows."""

    mean: float
    min: float
    count: int
    """Rows compared."""

    @classmethod
    def of(cls, reference: np.ndarray, candidate: np.ndarray, rows: np.ndarray | None = None) -> CosineStats:
        """Over ``rows`` (a boolean mask; all rows when None). Two all-zero rows count as 1."""
        cosines = row_cosines(reference, candidate)
        if rows is not None:
            cosines = cosines[rows]
        if not cosines.size:
            return cls(mean=1.0, min=1.0, count=0)
        return cls(mean=float(cosines.mean()), min=float(cosines.min()), count=int(cosines.size))

    def __str__(self) -> str:
        return f"cosine mean {self.mean:.6f} min {self.min:.6f}"


@dataclass(frozen=True, kw_only=True)
class ModelAgreement:
    """How much converting one encoder alone changes its output and the fused embedding."""

    model: str
    output: CosineStats
    """The encoder's own output against fp32's, over the posts that have its modality."""
    fused: CosineStats
    """The fused embedding with only this encoder converted, over the same posts."""


@dataclass(frozen=True, kw_only=True)
class AgreementReport:
    """How closely a converted chain reproduces the fp32 one on sample posts."""

    precision: Precision
    posts: int
    models: tuple[ModelAgreement, ...]
    end_to_end: CosineStats
    """Fused embeddings with every converted model, over all posts."""
    neighbour_overlap: float
    """Mean over posts of |fp32 top-k ∩ converted top-k| / k, neighbours among the corpus."""
    neighbour_overlap_min: float
    neighbours: int
    min_cosine: float
    """The threshold the mean end-to-end cosine is held to."""

    @property
    def passed(self) -> bool:
        return self.end_to_end.mean >= self.min_cosine  # NaN fails

    def model(self, name: str) -> ModelAgreement:
        return next(model for model in self.models if model.model == name)

    def __str__(self) -> str:
        """One line for the CLI."""
        models = "; ".join(f"{m.model} {m.output} (fused {m.fused.mean:.6f})" for m in self.models)
        verdict = "ok" if self.passed else "BELOW THRESHOLD"
        return (
            f"{self.precision.value} vs fp32 on {self.posts} sample posts: {verdict}, end to end "
            f"{self.end_to_end} (min {self.min_cosine:g}), neighbour overlap@{self.neighbours} "
            f"mean {self.neighbour_overlap:.3f} min {self.neighbour_overlap_min:.2f}; {models}"
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "precision": self.precision.value,
            "posts": self.posts,
            "end_to_end": _stats_dict(self.end_to_end),
            "models": {m.model: {"output": _stats_dict(m.output), "fused": _stats_dict(m.fused)} for m in self.models},
            f"neighbour_overlap@{self.neighbours}": {
                "mean": self.neighbour_overlap,
                "min": self.neighbour_overlap_min,
            },
            "min_cosine": self.min_cosine,
            "passed": self.passed,
        }


def _stats_dict(stats: CosineStats) -> dict[str, float | int]:
    return {"mean": stats.mean, "min": stats.min, "count": stats.count}


def row_cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row pair, in float64; two all-zero rows count as 1."""
    if reference.shape != candidate.shape:
        raise ExportError(f"cannot compare outputs of shapes {reference.shape} and {candidate.shape}")
    rows_reference = reference.reshape(len(reference), -1).astype(np.float64)
    rows_candidate = candidate.reshape(len(candidate), -1).astype(np.float64)
    norms = np.linalg.norm(rows_reference, axis=1) * np.linalg.norm(rows_candidate, axis=1)
    dots = (rows_reference * rows_candidate).sum(axis=1)
    both_zero = ~rows_reference.any(axis=1) & ~rows_candidate.any(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(both_zero, 1.0, dots / norms)


def neighbour_overlap(reference: np.ndarray, candidate: np.ndarray, k: int) -> np.ndarray:
    """Per row, the share of its k nearest rows (cosine, itself excluded) under ``reference``
    that are also among its k nearest under ``candidate``."""
    if not 0 < k < len(reference):
        raise ExportError(f"neighbour overlap@{k} needs more than {k} embeddings, got {len(reference)}")
    expected, actual = _nearest(reference, k), _nearest(candidate, k)
    return np.array([len(set(want) & set(got)) / k for want, got in zip(expected, actual, strict=True)])


def _nearest(embeddings: np.ndarray, k: int) -> np.ndarray:
    rows = embeddings.astype(np.float64)
    rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    similarity = rows @ rows.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argsort(-similarity, axis=1, kind="stable")[:, :k]


def sample_corpus(
    posts: int, *, seed: int, tokenizer_json: str, directory: Path, batch_size: int = MAX_BATCH_SIZE
) -> list[PreparedPosts]:
    """``posts`` sample posts, written to ``directory``, then preprocessed and tokenised as the server does.

    Photo-sized images (640×480) and realistic captions (20 to 60 words), in batches of
    ``batch_size``, each padded to its longest text like a batch the server runs.
    """
    corpus = list(
        read_posts(
            write_sample_posts(
                posts, directory, seed, image_size=(640, 480), words=(20, 60), generic_captions=0, generic_images=0
            )
        )
    )
    preprocess = Preprocessor.from_tokenizer_json(tokenizer_json)
    batches = []
    for start in range(0, len(corpus), batch_size):
        chunk = corpus[start : start + batch_size]
        batch = preprocess(
            [post.image_path.read_bytes() if post.image_path else b"" for post in chunk],
            [post.text.encode() if post.text else b"" for post in chunk],
        )
        failed = batch.first_error([post.id for post in chunk])
        if failed is not None:
            raise ExportError(f"a sample post failed preprocessing, which is a postsim bug: {failed}")
        batches.append(batch)
    return batches


def _runtime(paths: Mapping[str, Path]) -> OrtRuntime:
    try:
        return OrtRuntime(paths)
    except RepositoryError as error:
        raise ExportError(str(error)) from None


def _encode(runtime: OrtRuntime, batches: Sequence[PreparedPosts]) -> tuple[np.ndarray, np.ndarray]:
    """(image embeddings, text embeddings) of every post, in order, batch by batch as the server runs them."""
    image = [runtime.encode_image(batch.pixel_values) for batch in batches]
    text = [runtime.encode_text(batch.input_ids, batch.attention_mask) for batch in batches]
    return np.concatenate(image), np.concatenate(text)


def measure_agreement(
    reference: Mapping[str, Path],
    candidate: Mapping[str, Path],
    batches: Sequence[PreparedPosts],
    *,
    precision: Precision,
    neighbours: int = 10,
    min_cosine: float = MIN_AGREEMENT_COSINE,
) -> AgreementReport:
    """Compares the chain of ``candidate`` models with the ``reference`` (fp32) chain on ``batches``.

    Both map each of the contract's ONNX models to a file. Each encoder is compared on its
    own output and on the fused embedding with only it swapped in; the whole candidate
    chain on the fused embedding (cosine per post) and on each post's ``neighbours``
    nearest posts.
    """
    posts = sum(len(batch.image_mask) for batch in batches)
    if posts <= neighbours:
        raise ExportError(f"agreement needs more than {neighbours} posts (the neighbours compared), got {posts}")
    started = time.perf_counter()
    image_mask = np.concatenate([batch.image_mask for batch in batches])
    text_mask = np.concatenate([batch.text_mask for batch in batches])
    reference_runtime, candidate_runtime = _runtime(reference), _runtime(candidate)
    reference_image, reference_text = _encode(reference_runtime, batches)
    candidate_image, candidate_text = _encode(candidate_runtime, batches)
    expected = reference_runtime.fuse(reference_image, reference_text, image_mask, text_mask).embedding
    actual = candidate_runtime.fuse(candidate_image, candidate_text, image_mask, text_mask).embedding
    image_only = candidate_runtime.fuse(candidate_image, reference_text, image_mask, text_mask).embedding
    text_only = candidate_runtime.fuse(reference_image, candidate_text, image_mask, text_mask).embedding
    has_image, has_text = image_mask[:, 0] > 0, text_mask[:, 0] > 0
    overlap = neighbour_overlap(expected, actual, neighbours)
    report = AgreementReport(
        precision=precision,
        posts=len(expected),
        models=(
            ModelAgreement(
                model=IMAGE_ENCODER,
                output=CosineStats.of(reference_image, candidate_image, has_image),
                fused=CosineStats.of(expected, image_only, has_image),
            ),
            ModelAgreement(
                model=TEXT_ENCODER,
                output=CosineStats.of(reference_text, candidate_text, has_text),
                fused=CosineStats.of(expected, text_only, has_text),
            ),
        ),
        end_to_end=CosineStats.of(expected, actual),
        neighbour_overlap=float(overlap.mean()),
        neighbour_overlap_min=float(overlap.min()),
        neighbours=neighbours,
        min_cosine=min_cosine,
    )
    logger.info("agreement measured in %.1f s: %s", time.perf_counter() - started, report)
    return report


def require_agreement(report: AgreementReport, *, force: bool = False) -> None:
    """Raises :class:`ExportError` when the report is below its threshold, unless ``force``."""
    if report.passed:
        return
    summary = (
        f"{report.precision.value} models agree with fp32 at a mean end-to-end cosine of "
        f"{report.end_to_end.mean:.5f} (min {report.end_to_end.min:.5f}, neighbour overlap@{report.neighbours} "
        f"{report.neighbour_overlap:.3f}) over {report.posts} sample posts, below the required {report.min_cosine:g}"
    )
    if force:
        logger.warning("%s; writing them anyway, as forced", summary)
        return
    raise ExportError(
        f"{summary}: export with `--precision fp32`, or pass `--force-precision` "
        "(ExportOptions(force_precision=True)) to write them anyway"
    )


# --- Conversion ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ConvertedModels:
    """The converted ONNX files (in a work folder) and how well they agree with fp32."""

    precision: Precision
    paths: dict[str, Path]
    """Every ONNX model of the contract: converted files, and the fp32 fuser."""
    agreement: AgreementReport
    description: str
    """How each model was converted, for the repository's provenance."""


def convert_models(
    precision: Precision,
    fp32_paths: Mapping[str, Path],
    *,
    tokenizer_json: str,
    attention: AttentionShape | None,
    work_dir: Path,
    settings: PrecisionSettings | None = None,
) -> ConvertedModels:
    """Converts the encoders of ``fp32_paths`` to ``precision`` in ``work_dir`` and measures agreement.

    ``attention``, for fp16 only, applies ONNX Runtime's transformer fusions to the text
    encoder before the conversion (for ONNX Runtime's CUDA provider; TensorRT would not run
    the fused operators): None converts the graph as exported. The threshold is not
    checked here: see :func:`require_agreement`.
    """
    if precision is Precision.FP32:
        raise ExportError("fp32 models need no conversion: write the exported files as they are")
    settings = settings or PrecisionSettings()
    work_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: work_dir / f"{name}.{precision.value}.onnx" for name in CONVERTED_MODELS}
    paths[FUSER] = Path(fp32_paths[FUSER])
    if precision is Precision.INT8:
        calibration = calibration_batches(
            settings, tokenizer_json=tokenizer_json, directory=work_dir / "calibration-posts"
        )
        quantize_image_encoder(fp32_paths[IMAGE_ENCODER], paths[IMAGE_ENCODER], calibration, work_dir=work_dir)
        quantize_text_encoder(fp32_paths[TEXT_ENCODER], paths[TEXT_ENCODER], work_dir=work_dir)
        description = (
            f"int8: {IMAGE_ENCODER} static QDQ per-channel U8S8, calibrated (MinMax) on "
            f"{settings.calibration_images} sample images; {TEXT_ENCODER} dynamic per-channel S8 weights; "
            f"{FUSER} fp32"
        )
    else:
        for name in CONVERTED_MODELS:
            fusions = attention if name == TEXT_ENCODER else None
            convert_to_fp16(fp32_paths[name], paths[name], model=name, attention=fusions)
        fused = "transformer fusions, then " if attention else ""
        description = (
            f"fp16 with fp32 inputs and outputs: {IMAGE_ENCODER}; {TEXT_ENCODER} ({fused}fp16); {FUSER} stays fp32"
        )
    for name in CONVERTED_MODELS:
        check_io_unchanged(fp32_paths[name], paths[name])
    logger.info("%s: measuring agreement with fp32 on %d sample posts", precision.value, settings.agreement_posts)
    batches = sample_corpus(
        settings.agreement_posts,
        seed=settings.seed + 1,
        tokenizer_json=tokenizer_json,
        directory=work_dir / "agreement-posts",
    )
    agreement = measure_agreement(
        fp32_paths,
        paths,
        batches,
        precision=precision,
        neighbours=settings.neighbours,
        min_cosine=settings.min_cosine,
    )
    return ConvertedModels(precision=precision, paths=paths, agreement=agreement, description=description)


def calibration_batches(settings: PrecisionSettings, *, tokenizer_json: str, directory: Path) -> list[np.ndarray]:
    """``settings.calibration_images`` preprocessed sample-post images, in batches of ``calibration_batch``."""
    # One sample post in ten has no image: draw enough posts for the images wanted.
    posts = settings.calibration_images + settings.calibration_images // 9 + 1
    batches = sample_corpus(posts, seed=settings.seed, tokenizer_json=tokenizer_json, directory=directory)
    images = np.concatenate([batch.pixel_values[batch.image_mask[:, 0] > 0] for batch in batches])
    images = images[: settings.calibration_images]
    step = settings.calibration_batch
    return [images[start : start + step] for start in range(0, len(images), step)]


class _CalibrationReader:
    """Feeds the calibration batches to ONNX Runtime's calibrator, logging progress."""

    def __init__(self, batches: Sequence[np.ndarray]) -> None:
        self._batches = list(batches)
        self._position = 0
        self._started = time.perf_counter()

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._position >= len(self._batches):
            return None
        batch = self._batches[self._position]
        self._position += 1
        logger.info(
            "calibrating %s: batch %d/%d (%d images), %.0f s so far",
            IMAGE_ENCODER,
            self._position,
            len(self._batches),
            len(batch),
            time.perf_counter() - self._started,
        )
        return {PIXEL_VALUES.name: batch}

    def rewind(self) -> None:
        self._position = 0
        self._started = time.perf_counter()


def quantize_image_encoder(
    source: Path, destination: Path, calibration: Sequence[np.ndarray], *, work_dir: Path
) -> None:
    """Static INT8 QDQ: per-channel signed weights, unsigned activations calibrated (MinMax) on ``calibration``.

    MinMax over a few dozen images: Percentile agreed marginally better (cosine 0.99942
    against 0.99932 on random ResNet-101) at 2.5 times the calibration time.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not calibration:
        raise ExportError(f"no calibration images for {IMAGE_ENCODER}: calibration_images must be at least 1")
    prepared = work_dir / f"{IMAGE_ENCODER}.prepared.onnx"
    _pre_process(source, prepared)
    started = time.perf_counter()
    logger.info(
        "int8: calibrating and quantising %s on %d sample images",
        IMAGE_ENCODER,
        sum(len(batch) for batch in calibration),
    )
    try:
        quantize_static(
            prepared,
            destination,
            _CalibrationReader(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    except _CONVERSION_ERRORS as error:
        raise ExportError(f"quantising {IMAGE_ENCODER} to int8 failed: {error}") from error
    _log_written(IMAGE_ENCODER, "int8", source, destination, started)


def quantize_text_encoder(source: Path, destination: Path, *, work_dir: Path) -> None:
    """Dynamic INT8: per-channel signed 7-bit weights (MatMulInteger), activations quantised per call.

    The weights use 7 of their 8 bits (``reduce_range``): on x86 CPUs without VNNI (AVX2
    only), ONNX Runtime multiplies u8 activations by s8 weights with ``vpmaddubsw``, whose
    int16 pair sums saturate with full-range weights (bench/TUNING.md has the measurement).
    The export's agreement check runs on the exporting machine, so the model must hold on
    the CPUs it will be served on as well.

    On the graph as exported: ONNX Runtime's offline transformer fusions (QAttention after
    quantisation) measured 10 to 15 % slower on CPU than the unfused quantised graph, which
    ONNX Runtime fuses partly itself at load, at the same agreement.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    prepared = work_dir / f"{TEXT_ENCODER}.prepared.onnx"
    _pre_process(source, prepared)
    started = time.perf_counter()
    logger.info("int8: quantising %s (dynamic, per channel)", TEXT_ENCODER)
    try:
        quantize_dynamic(prepared, destination, per_channel=True, reduce_range=True, weight_type=QuantType.QInt8)
    except _CONVERSION_ERRORS as error:
        raise ExportError(f"quantising {TEXT_ENCODER} to int8 failed: {error}") from error
    _log_written(TEXT_ENCODER, "int8", source, destination, started)


def fuse_transformer(source: Path, attention: AttentionShape) -> Any:
    """The text encoder with ONNX Runtime's BERT fusions, as an ``OnnxModel``.

    Python fusions only (``opt_level=0``), so the graph stays portable across providers;
    their operators (Attention, SkipLayerNormalization, BiasGelu ...) run in ONNX
    Runtime's CPU and CUDA providers, not in TensorRT.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    started = time.perf_counter()
    optimized = optimize_model(
        str(source),
        model_type="bert",
        num_heads=attention.num_heads,
        hidden_size=attention.hidden_size,
        opt_level=0,
    )
    fused = {op: count for op, count in optimized.get_fused_operator_statistics().items() if count}
    logger.info(
        "%s: transformer fusions (%d heads, hidden %d) in %.1f s: %s",
        TEXT_ENCODER,
        attention.num_heads,
        attention.hidden_size,
        time.perf_counter() - started,
        ", ".join(f"{op} {count}" for op, count in fused.items()) or "none applied",
    )
    return optimized


def convert_to_fp16(source: Path, destination: Path, *, model: str, attention: AttentionShape | None = None) -> None:
    """fp16 weights and activations, fp32 inputs and outputs; the transformer fusions first when ``attention`` is given."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    started = time.perf_counter()
    try:
        if attention is not None:
            optimized = fuse_transformer(source, attention)
            optimized.convert_float_to_float16(keep_io_types=True)
            optimized.save_model_to_file(str(destination))
        else:
            onnx.save(convert_float_to_float16(onnx.load(str(source)), keep_io_types=True), str(destination))
    except _CONVERSION_ERRORS as error:
        raise ExportError(f"converting {model} to fp16 failed: {error}") from error
    _log_written(model, "fp16", source, destination, started)


def _pre_process(source: Path, destination: Path) -> None:
    """ONNX Runtime's quantisation pre-processing, reduced to ONNX shape inference.

    The quantiser reads every tensor's type from it. Its graph optimisation and symbolic
    shape inference changed neither speed nor agreement (the exporter already folds
    BatchNorm into the convolutions; DistilBERT's raw graph needs ``auto_merge`` for the
    symbolic pass) and cost seconds, so they are skipped.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(source), str(destination), skip_optimization=True, skip_symbolic_shape=True)
    except _PRE_PROCESS_ERRORS as error:
        raise ExportError(f"quantisation pre-processing of {source} failed: {error}") from error


def _log_written(model: str, precision: str, source: Path, destination: Path, started: float) -> None:
    logger.info(
        "%s: %s model written in %.1f s (%.1f MB, fp32 %.1f MB)",
        model,
        precision,
        time.perf_counter() - started,
        destination.stat().st_size / _MB,
        source.stat().st_size / _MB,
    )


def check_io_unchanged(reference: Path, converted: Path) -> None:
    """The converted file declares the same inputs and outputs (names, dtypes, dims) as the fp32 one."""
    expected, actual = _signature(reference), _signature(converted)
    if expected != actual:
        raise ExportError(
            f"{converted} changed the model's inputs/outputs during conversion: {actual}, expected {expected}"
        )


def _signature(path: Path) -> list[tuple[str, str, int, tuple[str | int, ...]]]:
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {initializer.name for initializer in graph.initializer}
    signature = []
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for value in values:
            if value.name in initializers:
                continue
            tensor = value.type.tensor_type
            dims = tuple(dim.dim_param if dim.HasField("dim_param") else dim.dim_value for dim in tensor.shape.dim)
            signature.append((kind, value.name, tensor.elem_type, dims))
    return signature


# --- Into the repository -------------------------------------------------------------------


def install_converted(converted: ConvertedModels, destinations: Mapping[str, Path]) -> None:
    """Moves each converted encoder over its fp32 file in the repository, atomically per file."""
    for name in CONVERTED_MODELS:
        move_atomic(converted.paths[name], Path(destinations[name]))
