"""INT8 and FP16 conversion of the encoders, its agreement check and the refusal below threshold."""

from __future__ import annotations

import collections
import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the export extra")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from postsim.core.errors import ExportError  # noqa: E402
from postsim.export.onnx_export import check_signature, export_onnx_models  # noqa: E402
from postsim.export.quantize import (  # noqa: E402
    AgreementReport,
    AttentionShape,
    ConvertedModels,
    CosineStats,
    Precision,
    PrecisionSettings,
    convert_models,
    measure_agreement,
    neighbour_overlap,
    require_agreement,
    sample_corpus,
)
from postsim.export.repository import ExportOptions, export_repository, onnx_paths  # noqa: E402
from postsim.export.triton_config import Target  # noqa: E402
from postsim.model_repository.contract import FUSER, IMAGE_ENCODER, ONNX_MODELS, TEXT_ENCODER, model_specs  # noqa: E402
from postsim.model_repository.manifest import WeightsManifest  # noqa: E402
from postsim.models.settings import ModelSettings, ModelSize  # noqa: E402
from postsim.models.weights import PostSimModels, build_models  # noqa: E402

TINY = ModelSettings(weights="random", size=ModelSize.TINY, seed=0)
# Fewer posts than the defaults keep the tests fast; still more than neighbours + 1.
FAST = PrecisionSettings(calibration_images=16, agreement_posts=32)
SMALL = PrecisionSettings(calibration_images=8, agreement_posts=16, neighbours=5)
SPECS = model_specs()


@pytest.fixture(scope="module")
def tiny_models() -> PostSimModels:
    return build_models(TINY)


@pytest.fixture(scope="module")
def fp32_paths(tiny_models: PostSimModels, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("fp32")
    paths = {name: directory / f"{name}.onnx" for name in ONNX_MODELS}
    export_onnx_models(tiny_models, paths)
    return paths


@pytest.fixture(scope="module")
def int8(
    tiny_models: PostSimModels, fp32_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> ConvertedModels:
    return convert_models(
        Precision.INT8,
        fp32_paths,
        tokenizer_json=tiny_models.tokenizer_json,
        attention=None,
        work_dir=tmp_path_factory.mktemp("int8"),
        settings=FAST,
    )


@pytest.fixture(scope="module")
def fp16(
    tiny_models: PostSimModels, fp32_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> ConvertedModels:
    config = tiny_models.text_encoder.backbone.config
    return convert_models(
        Precision.FP16,
        fp32_paths,
        tokenizer_json=tiny_models.tokenizer_json,
        attention=AttentionShape(config.num_attention_heads, config.hidden_size),
        work_dir=tmp_path_factory.mktemp("fp16"),
        settings=FAST,
    )


def _op_counts(path: Path) -> collections.Counter[str]:
    return collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def test_int8_image_encoder_is_static_qdq_per_channel(int8: ConvertedModels) -> None:
    path = int8.paths[IMAGE_ENCODER]
    ops = _op_counts(path)
    assert ops["QuantizeLinear"] >= 10 and ops["DequantizeLinear"] > ops["QuantizeLinear"]
    graph = onnx.load(str(path)).graph
    initializers = {initializer.name: initializer for initializer in graph.initializer}
    weight_dequantizers = [
        node for node in graph.node if node.op_type == "DequantizeLinear" and node.input[0] in initializers
    ]
    stored_types = collections.Counter(initializers[node.input[0]].data_type for node in weight_dequantizers)
    assert set(stored_types) == {onnx.TensorProto.INT8, onnx.TensorProto.INT32}, "int8 weights, int32 biases"
    per_channel = [node for node in weight_dequantizers if numpy_helper.to_array(initializers[node.input[1]]).size > 1]
    assert len(per_channel) >= 10, "convolution weights carry one scale per output channel"
    activation_zero_points = [initializers[node.input[2]] for node in graph.node if node.op_type == "QuantizeLinear"]
    assert {zero_point.data_type for zero_point in activation_zero_points} == {onnx.TensorProto.UINT8}


def test_int8_text_encoder_is_dynamically_quantised(int8: ConvertedModels) -> None:
    ops = _op_counts(int8.paths[TEXT_ENCODER])
    assert ops["DynamicQuantizeLinear"] >= 4 and ops["MatMulInteger"] >= 8


def test_converted_models_keep_the_contract_and_run_in_onnx_runtime(
    int8: ConvertedModels, fp16: ConvertedModels
) -> None:
    for converted in (int8, fp16):
        assert converted.paths[FUSER] == int8.paths[FUSER], "the fuser stays the fp32 file"
        for name in ONNX_MODELS:
            check_signature(SPECS[name], converted.paths[name])
            ort.InferenceSession(str(converted.paths[name]), providers=["CPUExecutionProvider"])


def test_fp16_models_hold_fp16_weights_behind_fp32_inputs_and_outputs(fp16: ConvertedModels) -> None:
    for name in (IMAGE_ENCODER, TEXT_ENCODER):
        graph = onnx.load(str(fp16.paths[name])).graph
        weight_types = collections.Counter(initializer.data_type for initializer in graph.initializer)
        assert weight_types[onnx.TensorProto.FLOAT16] > 0
        assert weight_types[onnx.TensorProto.FLOAT] == 0, f"{name} kept fp32 weights"
        io_types = {value.name: value.type.tensor_type.elem_type for value in (*graph.input, *graph.output)}
        spec = SPECS[name]
        for tensor in (*spec.inputs, *spec.outputs):
            assert onnx.helper.tensor_dtype_to_np_dtype(io_types[tensor.name]) == np.dtype(tensor.dtype.numpy)
    assert _op_counts(fp16.paths[TEXT_ENCODER])["Attention"] > 0, "the text encoder was fused first"


@pytest.mark.parametrize("precision", [Precision.INT8, Precision.FP16])
def test_agreement_is_measured_and_above_threshold(
    precision: Precision, int8: ConvertedModels, fp16: ConvertedModels
) -> None:
    report = {Precision.INT8: int8, Precision.FP16: fp16}[precision].agreement
    assert report.precision is precision and report.posts == FAST.agreement_posts
    assert report.passed and report.end_to_end.mean >= 0.99
    assert report.end_to_end.min <= report.end_to_end.mean < 1.0 or precision is Precision.FP16
    assert [model.model for model in report.models] == [IMAGE_ENCODER, TEXT_ENCODER]
    for model in report.models:
        assert 0.99 <= model.output.mean <= 1.0 + 1e-9 and 0 < model.output.count < report.posts
    assert 0.5 <= report.neighbour_overlap <= 1.0 and report.neighbour_overlap_min <= report.neighbour_overlap
    assert str(report).startswith(f"{precision.value} vs fp32 on {FAST.agreement_posts} sample posts: ok")
    assert report.as_dict()["passed"] is True


def test_a_broken_quantisation_is_refused_naming_the_cosine(
    tiny_models: PostSimModels, int8: ConvertedModels, fp32_paths: dict[str, Path], tmp_path: Path
) -> None:
    # Corrupt the weight scales of the image encoder's first convolution: its activations
    # come out ~10 times too large and with flipped signs.
    model = onnx.load(str(int8.paths[IMAGE_ENCODER]))
    initializers = {initializer.name: initializer for initializer in model.graph.initializer}
    first = next(
        node for node in model.graph.node if node.op_type == "DequantizeLinear" and node.input[0] in initializers
    )
    scale = initializers[first.input[1]]
    scale.CopyFrom(numpy_helper.from_array(-10 * numpy_helper.to_array(scale), scale.name))
    broken = {**int8.paths, IMAGE_ENCODER: tmp_path / "broken.onnx"}
    onnx.save(model, str(broken[IMAGE_ENCODER]))
    batches = sample_corpus(16, seed=5, tokenizer_json=tiny_models.tokenizer_json, directory=tmp_path / "posts")
    report = measure_agreement(fp32_paths, broken, batches, precision=Precision.INT8, neighbours=5)
    assert not report.passed and report.model(IMAGE_ENCODER).output.mean < 0.99
    with pytest.raises(
        ExportError, match=rf"mean end-to-end cosine of {report.end_to_end.mean:.5f}.*--force-precision"
    ):
        require_agreement(report)


def test_agreement_refuses_unloadable_models_and_too_few_posts(
    tiny_models: PostSimModels, fp32_paths: dict[str, Path], tmp_path: Path
) -> None:
    batches = sample_corpus(3, seed=0, tokenizer_json=tiny_models.tokenizer_json, directory=tmp_path / "posts")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    candidate = {**fp32_paths, TEXT_ENCODER: garbage}
    with pytest.raises(ExportError, match=r"ONNX Runtime cannot load .*garbage\.onnx"):
        measure_agreement(fp32_paths, candidate, batches, precision=Precision.INT8, neighbours=2)
    with pytest.raises(ExportError, match="more than 10 posts"):
        measure_agreement(fp32_paths, fp32_paths, batches, precision=Precision.INT8)


def test_forcing_writes_below_threshold_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    report = AgreementReport(
        precision=Precision.INT8,
        posts=20,
        models=(),
        end_to_end=CosineStats(mean=0.95, min=0.8, count=20),
        neighbour_overlap=0.5,
        neighbour_overlap_min=0.1,
        neighbours=10,
        min_cosine=0.99,
    )
    with caplog.at_level(logging.WARNING, logger="postsim"):
        require_agreement(report, force=True)
    assert "0.95000" in caplog.text and "anyway" in caplog.text


def test_export_writes_int8_models_and_records_the_precision(tmp_path: Path) -> None:
    report = export_repository(
        ExportOptions(repository=tmp_path, models=TINY, precision=Precision.INT8, precision_settings=SMALL)
    )
    manifest = WeightsManifest.read(tmp_path)
    assert manifest.precision == "int8" == report.manifest.precision
    assert "int8" in manifest.provenance["precision"] and "int8" in manifest.describe()
    manifest.verify_files(tmp_path)  # the hashes are the quantised files'
    paths = onnx_paths(tmp_path)
    assert _op_counts(paths[IMAGE_ENCODER])["QuantizeLinear"] > 0
    assert _op_counts(paths[TEXT_ENCODER])["MatMulInteger"] > 0
    assert "QuantizeLinear" not in _op_counts(paths[FUSER])
    assert report.agreement is not None and report.agreement.passed
    assert not list(tmp_path.rglob(".*.tmp")), "no temporary file is left behind"


def test_export_refuses_models_below_the_threshold(tmp_path: Path) -> None:
    strict = dataclasses.replace(SMALL, min_cosine=1.0)
    options = ExportOptions(repository=tmp_path, models=TINY, precision=Precision.INT8, precision_settings=strict)
    with pytest.raises(
        ExportError, match=r"mean end-to-end cosine of 0\.9\d{4}.*below the required 1.*--force-precision"
    ):
        export_repository(options)
    assert not (tmp_path / "weights.json").exists(), "a refused export leaves no manifest, so nothing serves it"
    assert "QuantizeLinear" not in _op_counts(onnx_paths(tmp_path)[IMAGE_ENCODER])


def test_int8_is_refused_for_the_triton_target(tmp_path: Path) -> None:
    options = ExportOptions(repository=tmp_path, target=Target.TRITON, models=TINY, precision=Precision.INT8)
    with pytest.raises(ExportError, match="--precision fp16"):
        export_repository(options)


def test_neighbour_overlap() -> None:
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((20, 8))
    assert neighbour_overlap(embeddings, embeddings * 3, 5).tolist() == [1.0] * 20
    overlap = neighbour_overlap(embeddings, rng.standard_normal((20, 8)), 5)
    assert overlap.shape == (20,) and 0 <= overlap.mean() < 0.9
    with pytest.raises(ExportError, match="needs more than 20 embeddings"):
        neighbour_overlap(embeddings, embeddings, 20)


def test_cosine_stats_count_zero_rows_as_agreeing() -> None:
    reference = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    stats = CosineStats.of(reference, np.array([[1.0, 0.0], [0.0, 0.0], [1.0, -1.0]]))
    assert (stats.mean, stats.min, stats.count) == (pytest.approx(2 / 3), pytest.approx(0.0), 3)
    assert CosineStats.of(reference, reference, np.array([False, False, False])).count == 0


def test_settings_are_checked() -> None:
    with pytest.raises(ExportError, match="agreement_posts"):
        PrecisionSettings(agreement_posts=10, neighbours=10)
    with pytest.raises(ExportError, match="calibration_images"):
        PrecisionSettings(calibration_images=0)


@pytest.mark.slow
def test_full_size_int8_export_agrees_with_fp32(tmp_path: Path) -> None:
    settings = ModelSettings(weights="random", size=ModelSize.FULL, seed=0)
    report = export_repository(ExportOptions(repository=tmp_path, models=settings, precision=Precision.INT8))
    assert report.agreement is not None and report.agreement.passed
    assert report.agreement.end_to_end.mean >= 0.999 and report.agreement.neighbour_overlap >= 0.9
    paths = onnx_paths(tmp_path)
    assert paths[IMAGE_ENCODER].stat().st_size < 60e6 and paths[TEXT_ENCODER].stat().st_size < 80e6
