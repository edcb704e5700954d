"""ONNX export of the three models and its validation against PyTorch."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the export extra")

import onnxruntime as ort  # noqa: E402

from postsim.core.errors import ExportError, ExportMismatchError  # noqa: E402
from postsim.export.onnx_export import (  # noqa: E402
    EXPORT_BATCH,
    EXPORT_SEQUENCE,
    ValidationReport,
    export_onnx_models,
    onnx_spec,
    sample_inputs,
    validate_onnx_model,
)
from postsim.model_repository.contract import (  # noqa: E402
    FUSER,
    IMAGE_ENCODER,
    ONNX_MODELS,
    TEXT_ENCODER,
    model_specs,
)
from postsim.models.modules import ImageEncoder  # noqa: E402
from postsim.models.settings import ModelSettings, ModelSize  # noqa: E402
from postsim.models.torch_runtime import TorchRuntime  # noqa: E402
from postsim.models.weights import PostSimModels, build_models  # noqa: E402

SPECS = model_specs()


@pytest.fixture(scope="module")
def tiny_models() -> PostSimModels:
    return build_models(ModelSettings(weights="random", size=ModelSize.TINY))


@pytest.fixture(scope="module")
def exported(
    tiny_models: PostSimModels, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Path], dict[str, ValidationReport]]:
    directory = tmp_path_factory.mktemp("onnx")
    paths = {name: directory / name / "1" / "model.onnx" for name in ONNX_MODELS}
    return paths, export_onnx_models(tiny_models, paths)


def test_every_model_is_exported_and_validated(
    exported: tuple[dict[str, Path], dict[str, ValidationReport]],
) -> None:
    paths, reports = exported
    assert list(reports) == list(ONNX_MODELS)
    for name, report in reports.items():
        assert paths[name].is_file() and report.path == paths[name]
        assert report.passed and report.batch_size != EXPORT_BATCH
        assert [output.name for output in report.outputs] == SPECS[name].output_names
    assert reports[TEXT_ENCODER].sequence_length not in (None, EXPORT_SEQUENCE)
    assert reports[IMAGE_ENCODER].sequence_length is None
    assert str(reports[FUSER]).startswith("ok, batch 4: EMBEDDING max abs diff")
    weights = reports[FUSER].output("MODALITY_WEIGHTS")
    assert weights.max_abs_diff <= onnx_spec(SPECS[FUSER]).atol


def test_exported_files_declare_the_contract_signature(
    exported: tuple[dict[str, Path], dict[str, ValidationReport]],
) -> None:
    paths, _ = exported
    session = ort.InferenceSession(str(paths[TEXT_ENCODER]), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in session.get_inputs()] == [
        ("INPUT_IDS", ["batch", "sequence"]),
        ("ATTENTION_MASK", ["batch", "sequence"]),
    ]
    assert [(o.name, o.shape) for o in session.get_outputs()] == [("TEXT_PROJECTION", ["batch", 256])]
    fuser = ort.InferenceSession(str(paths[FUSER]), providers=["CPUExecutionProvider"])
    assert [(o.name, o.shape) for o in fuser.get_outputs()] == [
        ("EMBEDDING", ["batch", 256]),
        ("MODALITY_WEIGHTS", ["batch", 2]),
        ("QUERY_EMBEDDING", ["batch", 256]),
        ("IMAGE_EMBEDDING", ["batch", 256]),
        ("TEXT_EMBEDDING", ["batch", 256]),
        ("QUERY_IMAGE_EMBEDDING", ["batch", 256]),
        ("QUERY_TEXT_EMBEDDING", ["batch", 256]),
        ("QUERY_MODALITY_WEIGHTS", ["batch", 2]),
    ]


@pytest.mark.parametrize(("batch", "sequence"), [(1, 3), (7, 40)])
def test_onnx_runtime_matches_pytorch_at_other_sizes(
    tiny_models: PostSimModels,
    exported: tuple[dict[str, Path], dict[str, ValidationReport]],
    batch: int,
    sequence: int,
) -> None:
    paths, _ = exported
    modules = tiny_models.modules()
    for name in ONNX_MODELS:
        spec = SPECS[name]
        inputs = sample_inputs(spec, batch=batch, sequence=sequence, vocab_size=30522, seed=7)
        session = ort.InferenceSession(str(paths[name]), providers=["CPUExecutionProvider"])
        actual = dict(zip(spec.output_names, session.run(spec.output_names, inputs), strict=True))
        with torch.inference_mode():
            expected = modules[name](*(torch.from_numpy(inputs[n]) for n in spec.input_names))
        expected = expected if isinstance(expected, tuple) else (expected,)
        computed = [tensor.name for tensor in spec.outputs if tensor.copy_of is None]
        for output, want in zip(computed, expected, strict=True):
            assert actual[output].shape[0] == batch
            np.testing.assert_allclose(actual[output], want.numpy(), atol=onnx_spec(spec).atol, rtol=0)
        for repeated in (tensor for tensor in spec.outputs if tensor.copy_of is not None):
            np.testing.assert_array_equal(actual[repeated.name], actual[repeated.copy_of])


def test_chained_onnx_models_reproduce_the_torch_pipeline(
    tiny_models: PostSimModels,
    exported: tuple[dict[str, Path], dict[str, ValidationReport]],
) -> None:
    paths, _ = exported
    sessions = {name: ort.InferenceSession(str(paths[name]), providers=["CPUExecutionProvider"]) for name in paths}
    rng = np.random.default_rng(3)
    pixels = rng.standard_normal((3, 3, 224, 224)).astype(np.float32)
    ids = rng.integers(1000, 30522, size=(3, 9)).astype(np.int64)
    mask = np.ones_like(ids)
    image_mask = np.array([[1], [0], [1]], np.float32)
    text_mask = np.array([[1], [1], [0]], np.float32)

    (image,) = sessions[IMAGE_ENCODER].run(None, {"PIXEL_VALUES": pixels})
    (text,) = sessions[TEXT_ENCODER].run(None, {"INPUT_IDS": ids, "ATTENTION_MASK": mask})
    fuser_inputs = {
        "IMAGE_PROJECTION": image,
        "TEXT_PROJECTION": text,
        "IMAGE_MASK": image_mask,
        "TEXT_MASK": text_mask,
    }
    fused = dict(zip(SPECS[FUSER].output_names, sessions[FUSER].run(None, fuser_inputs), strict=True))
    embedding, weights = fused["EMBEDDING"], fused["MODALITY_WEIGHTS"]
    for repeated, source in (
        ("QUERY_EMBEDDING", "EMBEDDING"),
        ("QUERY_IMAGE_EMBEDDING", "IMAGE_EMBEDDING"),
        ("QUERY_TEXT_EMBEDDING", "TEXT_EMBEDDING"),
        ("QUERY_MODALITY_WEIGHTS", "MODALITY_WEIGHTS"),
    ):
        np.testing.assert_array_equal(fused[repeated], fused[source])
    np.testing.assert_allclose(np.linalg.norm(fused["IMAGE_EMBEDDING"], axis=1), [1.0, 0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(fused["TEXT_EMBEDDING"], axis=1), [1.0, 1.0, 0.0], atol=1e-6)

    expected_embedding, expected_weights = TorchRuntime(tiny_models).embed(pixels, ids, mask, image_mask, text_mask)
    np.testing.assert_allclose(embedding, expected_embedding, atol=1e-4)
    np.testing.assert_allclose(weights, expected_weights, atol=1e-5)
    assert weights[1, 0] == 0.0 and weights[2, 1] == 0.0


def test_export_that_does_not_match_pytorch_names_the_output(
    tiny_models: PostSimModels,
    exported: tuple[dict[str, Path], dict[str, ValidationReport]],
) -> None:
    paths, _ = exported
    perturbed = copy.deepcopy(tiny_models.image_encoder)
    with torch.no_grad():
        perturbed.projection.weight.add_(0.05)
    with pytest.raises(
        ExportMismatchError, match=r"image_encoder.*output IMAGE_PROJECTION: max abs difference"
    ) as raised:
        validate_onnx_model(perturbed, SPECS[IMAGE_ENCODER], paths[IMAGE_ENCODER])
    assert "(tolerance 0.001)" in str(raised.value)


def test_output_shape_mismatch_is_an_error(
    tiny_models: PostSimModels,
    exported: tuple[dict[str, Path], dict[str, ValidationReport]],
) -> None:
    paths, _ = exported
    narrower = ImageEncoder(tiny_models.image_encoder.backbone, dim=128).eval()
    with pytest.raises(ExportMismatchError, match=r"IMAGE_PROJECTION has shape \(4, 256\).*PyTorch gives \(4, 128\)"):
        validate_onnx_model(narrower, SPECS[IMAGE_ENCODER], paths[IMAGE_ENCODER])


def test_file_with_another_signature_is_an_error(
    tiny_models: PostSimModels,
    exported: tuple[dict[str, Path], dict[str, ValidationReport]],
) -> None:
    paths, _ = exported
    with pytest.raises(ExportMismatchError, match=r"text_encoder: ONNX inputs are \['PIXEL_VALUES'\]"):
        validate_onnx_model(tiny_models.text_encoder, SPECS[TEXT_ENCODER], paths[IMAGE_ENCODER])


def test_every_model_needs_a_path(tiny_models: PostSimModels, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no output path for \\['fuser'\\]"):
        export_onnx_models(tiny_models, {IMAGE_ENCODER: tmp_path / "a.onnx", TEXT_ENCODER: tmp_path / "b.onnx"})


@pytest.mark.slow
def test_full_size_models_export_and_validate(tmp_path: Path) -> None:
    """ResNet-101 and DistilBERT-base with random weights: one file each, within tolerance."""
    started = time.perf_counter()
    models = build_models(ModelSettings(weights="random", size=ModelSize.FULL))
    assert sum(p.numel() for p in models.image_encoder.backbone.parameters()) > 42_000_000
    assert models.text_encoder.backbone.config.n_layers == 6
    paths = {name: tmp_path / name / "model.onnx" for name in ONNX_MODELS}
    reports = export_onnx_models(models, paths)
    assert all(report.passed for report in reports.values())
    for path in paths.values():
        assert [file.name for file in path.parent.iterdir()] == ["model.onnx"], "weights stay inside the file"
    assert paths[IMAGE_ENCODER].stat().st_size > 150e6 and paths[TEXT_ENCODER].stat().st_size > 250e6
    assert time.perf_counter() - started < 180
