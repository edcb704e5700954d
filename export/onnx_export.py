"""Exports the three PyTorch modules to ONNX and checks each export against PyTorch.

Names, dtypes, dynamic axes, opset and tolerances all come from the contract's
:class:`ModelSpec`. Every exported file is then run in ONNX Runtime on fresh random inputs
of another batch size (and sequence length) than the export example, and compared with
the module: a signature or shape mismatch, or a difference outside the spec's tolerance,
raises :class:`ExportMismatchError`. An output the spec declares as a ``copy_of`` another
(the fuser's ``QUERY_EMBEDDING``) is not computed by the module: it is added to the
exported graph as an Identity of its source.

The exporter is TorchScript-based (``dynamo=False``): it exports ResNet-101 and the
BERT family with dynamic batch and sequence axes in seconds, and needs nothing beyond
torch, whereas the dynamo exporter needs the ``onnxscript`` package.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from postsim.core.errors import ExportError, ExportMismatchError
from postsim.export.quantize import row_cosines
from postsim.model_repository.contract import (
    ATTENTION_MASK,
    FRAME_MASK,
    IMAGE_MASK,
    INPUT_IDS,
    MODALITIES,
    ONNX_MODELS,
    TEXT_MASK,
    ModelSpec,
    OnnxExportSpec,
    TensorSpec,
    model_specs,
)
from postsim.models.modules import TextEncoder, torch_required
from postsim.models.weights import PostSimModels

with torch_required():
    import torch
    from torch import nn

logger = logging.getLogger("postsim")

MIN_OPSET = 17
EXPORT_BATCH, EXPORT_SEQUENCE, EXPORT_FRAMES = 2, 16, 2
"""Shape of the example traced by the exporter."""
VALIDATION_BATCH, VALIDATION_SEQUENCE, VALIDATION_FRAMES = 4, 11, 3
"""Shape of the validation inputs: different from the example, so fixed axes show up."""
_FRAME_AXIS = FRAME_MASK.dim_names[0]
_EXPORT_SEED, _VALIDATION_SEED = 0, 1


@dataclass(frozen=True, kw_only=True)
class OutputComparison:
    """How one output of ONNX Runtime compares with PyTorch's."""

    name: str
    shape: tuple[int, ...]
    max_abs_diff: float
    min_cosine: float
    """Smallest cosine similarity over the rows; two all-zero rows count as 1."""

    def within(self, tolerance: OnnxExportSpec) -> bool:
        # Written so that NaN fails both comparisons.
        return self.max_abs_diff <= tolerance.atol and self.min_cosine >= tolerance.min_cosine


@dataclass(frozen=True, kw_only=True)
class ValidationReport:
    """The check of one exported model against its PyTorch module."""

    model: str
    path: Path
    batch_size: int
    sequence_length: int | None
    """Sequence length of the validation inputs; None for a model without a sequence axis."""
    tolerance: OnnxExportSpec
    outputs: tuple[OutputComparison, ...]

    @property
    def passed(self) -> bool:
        return all(output.within(self.tolerance) for output in self.outputs)

    def output(self, name: str) -> OutputComparison:
        return next(output for output in self.outputs if output.name == name)

    def __str__(self) -> str:
        """One line per report, e.g. for the CLI: each output's difference against its tolerance."""
        outputs = ", ".join(
            f"{output.name} max abs diff {output.max_abs_diff:.2g} (atol {self.tolerance.atol:g}), "
            f"min cosine {output.min_cosine:.6f} (min {self.tolerance.min_cosine:g})"
            for output in self.outputs
        )
        verdict = "ok" if self.passed else "MISMATCH"
        return f"{verdict}, batch {self.batch_size}: {outputs}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form, for the repository's provenance file."""
        return {
            "model": self.model,
            "path": str(self.path),
            "batch_size": self.batch_size,
            "sequence_length": self.sequence_length,
            "atol": self.tolerance.atol,
            "min_cosine": self.tolerance.min_cosine,
            "outputs": {
                output.name: {"max_abs_diff": output.max_abs_diff, "min_cosine": output.min_cosine}
                for output in self.outputs
            },
        }


def export_onnx_models(models: PostSimModels, paths: Mapping[str, Path]) -> dict[str, ValidationReport]:
    """Exports each of the contract's ONNX models to ``paths[name]`` and validates it.

    Returns the validation report of each model, by name; raises
    :class:`ExportMismatchError` at the first model that does not reproduce PyTorch.
    """
    missing = [name for name in ONNX_MODELS if name not in paths]
    if missing:
        raise ExportError(f"no output path for {missing}; pass one path per model of {list(ONNX_MODELS)}")
    specs = model_specs(models.dim)
    modules = models.modules()
    reports = {}
    for name in ONNX_MODELS:
        path = Path(paths[name])
        export_onnx_model(modules[name], specs[name], path)
        reports[name] = validate_onnx_model(modules[name], specs[name], path)
    return reports


def export_onnx_model(module: nn.Module, spec: ModelSpec, path: Path) -> None:
    """Writes ``module`` (put in eval mode) as one ONNX file with the spec's signature."""
    tolerance = onnx_spec(spec)
    if tolerance.opset < MIN_OPSET:
        raise ExportError(f"{spec.name}: opset {tolerance.opset} is too old; use {MIN_OPSET} or newer")
    example = sample_inputs(
        spec, batch=EXPORT_BATCH, sequence=EXPORT_SEQUENCE, frames=EXPORT_FRAMES, vocab_size=_vocab_size(module)
    )
    exported = {*spec.input_names, *_computed(spec)}
    dynamic_axes = {
        tensor.name: tensor.dynamic_axes() for tensor in (*spec.inputs, *spec.outputs) if tensor.name in exported
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("exporting %s to %s (opset %d)", spec.name, path, tolerance.opset)
    module.eval()
    try:
        with torch.no_grad(), _quiet_tracing():
            torch.onnx.export(
                module,
                _to_torch(example, spec),
                str(path),
                input_names=spec.input_names,
                output_names=_computed(spec),
                dynamic_axes=dynamic_axes,
                opset_version=tolerance.opset,
                do_constant_folding=True,
                dynamo=False,
            )
        _add_copies(spec, path)
        onnx.checker.check_model(str(path))
    except (RuntimeError, onnx.checker.ValidationError) as error:
        raise ExportError(f"exporting {spec.name} to ONNX failed: {error}") from error


def validate_onnx_model(
    module: nn.Module,
    spec: ModelSpec,
    path: Path,
    *,
    batch: int = VALIDATION_BATCH,
    sequence: int = VALIDATION_SEQUENCE,
    frames: int = VALIDATION_FRAMES,
) -> ValidationReport:
    """Runs the ONNX file and ``module`` on the same fresh random inputs and compares them.

    Raises :class:`ExportMismatchError` when the file's signature differs from the spec,
    when an output's shape differs from PyTorch's, or when an output is outside the
    spec's tolerance (naming the output, the measured difference and the tolerance).
    """
    tolerance = onnx_spec(spec)
    check_signature(spec, path)
    inputs = sample_inputs(spec, batch=batch, sequence=sequence, frames=frames, vocab_size=_vocab_size(module))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actual = dict(zip(spec.output_names, session.run(spec.output_names, inputs), strict=True))
    expected = _run_torch(module, spec, inputs)
    comparisons = tuple(_compare(spec.name, name, expected[name], actual[name]) for name in spec.output_names)
    has_sequence = any(_FRAME_AXIS not in tensor.dim_names and -1 in tensor.dims for tensor in spec.inputs)
    report = ValidationReport(
        model=spec.name,
        path=path,
        batch_size=batch,
        sequence_length=sequence if has_sequence else None,
        tolerance=tolerance,
        outputs=comparisons,
    )
    _log(report)
    failures = [output for output in comparisons if not output.within(tolerance)]
    if failures:
        raise ExportMismatchError(_mismatch_message(spec.name, failures, tolerance))
    return report


def onnx_spec(spec: ModelSpec) -> OnnxExportSpec:
    if spec.onnx is None:
        raise ExportError(f"model '{spec.name}' is not exported from PyTorch (its spec has no onnx settings)")
    return spec.onnx


def check_signature(spec: ModelSpec, path: Path) -> None:
    """The file's inputs and outputs have the spec's names, dtypes and (dynamic) dims, in order."""
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {initializer.name for initializer in graph.initializer}
    declared_inputs = [value for value in graph.input if value.name not in initializers]
    for kind, declared, tensors in (("input", declared_inputs, spec.inputs), ("output", graph.output, spec.outputs)):
        names = [value.name for value in declared]
        expected_names = [tensor.name for tensor in tensors]
        if names != expected_names:
            raise ExportMismatchError(f"{spec.name}: ONNX {kind}s are {names}, expected {expected_names}")
        for value, tensor in zip(declared, tensors, strict=True):
            _check_tensor(spec.name, value, tensor)


def _check_tensor(model: str, value: onnx.ValueInfoProto, tensor: TensorSpec) -> None:
    tensor_type = value.type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
    if dtype != np.dtype(tensor.dtype.numpy):
        raise ExportMismatchError(f"{model}: ONNX tensor {tensor.name} is {dtype}, expected {tensor.dtype.numpy}")
    dynamic = tensor.dynamic_axes()
    expected = [dynamic.get(axis, size) for axis, size in enumerate((-1, *tensor.dims))]
    got = [dim.dim_param if dim.HasField("dim_param") else dim.dim_value for dim in tensor_type.shape.dim]
    if got != expected:
        raise ExportMismatchError(f"{model}: ONNX tensor {tensor.name} has dims {got}, expected {expected}")


def sample_inputs(
    spec: ModelSpec, *, batch: int, sequence: int, vocab_size: int, frames: int = 1, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random inputs for ``spec``, by name, as numpy arrays of the contract's dtypes.

    Token ids are drawn from the vocabulary; attention and frame masks pad each row but the
    first after a random length (at least one token or frame); modality masks cover every
    combination of present and missing modalities (row r has modality m when bit m of r is
    0); anything else is standard normal.
    """
    rng = np.random.default_rng(seed)
    return {tensor.name: _sample(tensor, batch, sequence, frames, vocab_size, rng) for tensor in spec.inputs}


def _sample(
    tensor: TensorSpec, batch: int, sequence: int, frames: int, vocab_size: int, rng: np.random.Generator
) -> np.ndarray:
    length = frames if _FRAME_AXIS in tensor.dim_names else sequence
    shape = (batch, *(length if size == -1 else size for size in tensor.dims))
    dtype = tensor.dtype.numpy
    if tensor.name == INPUT_IDS.name:
        return rng.integers(0, vocab_size, size=shape).astype(dtype)
    if tensor.name in (ATTENTION_MASK.name, FRAME_MASK.name):
        lengths = rng.integers(1, length + 1, size=batch)
        lengths[0] = length
        return (np.arange(length)[None, :] < lengths[:, None]).astype(dtype)
    modality_masks = {IMAGE_MASK.name: MODALITIES.index("image"), TEXT_MASK.name: MODALITIES.index("text")}
    if tensor.name in modality_masks:
        bit = modality_masks[tensor.name]
        return ((np.arange(batch) >> bit) & 1 == 0).astype(dtype).reshape(shape)
    return rng.standard_normal(shape).astype(dtype)


def _vocab_size(module: nn.Module) -> int:
    """Upper bound of the token ids to sample for ``module`` (1 for modules without text)."""
    return int(module.backbone.config.vocab_size) if isinstance(module, TextEncoder) else 1


def _to_torch(inputs: dict[str, np.ndarray], spec: ModelSpec) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(inputs[name]) for name in spec.input_names)


def _computed(spec: ModelSpec) -> list[str]:
    """The outputs the PyTorch module returns, in order: the spec's outputs that copy no other."""
    return [tensor.name for tensor in spec.outputs if tensor.copy_of is None]


def _run_torch(module: nn.Module, spec: ModelSpec, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of the spec, by name: what the module returns, and each copy of it."""
    with torch.inference_mode():
        outputs = module(*_to_torch(inputs, spec))
    if isinstance(outputs, torch.Tensor):
        outputs = (outputs,)
    computed = _computed(spec)
    if len(outputs) != len(computed):
        raise ExportMismatchError(
            f"{spec.name}: the PyTorch module returns {len(outputs)} outputs, the spec computes {computed}"
        )
    by_name = {name: output.numpy() for name, output in zip(computed, outputs, strict=True)}
    return {tensor.name: by_name[tensor.copy_of or tensor.name] for tensor in spec.outputs}


def _add_copies(spec: ModelSpec, path: Path) -> None:
    """Append the spec's copied outputs to the exported graph (one Identity node each), outputs in spec order."""
    copies = [tensor for tensor in spec.outputs if tensor.copy_of is not None]
    if not copies:
        return
    model = onnx.load(str(path))
    graph = model.graph
    declared = {value.name: value for value in graph.output}
    for tensor in copies:
        source = str(tensor.copy_of)
        graph.node.append(onnx.helper.make_node("Identity", [source], [tensor.name], name=f"copy_{tensor.name}"))
        value = onnx.ValueInfoProto()
        value.CopyFrom(declared[source])
        value.name = tensor.name
        declared[tensor.name] = value
    ordered = [declared[name] for name in spec.output_names]
    del graph.output[:]
    graph.output.extend(ordered)
    onnx.save(model, str(path))


def _compare(model: str, name: str, expected: np.ndarray, actual: np.ndarray) -> OutputComparison:
    if expected.shape != actual.shape:
        raise ExportMismatchError(
            f"{model}: output {name} has shape {actual.shape} in ONNX Runtime, PyTorch gives {expected.shape}"
        )
    difference = np.abs(expected.astype(np.float64) - actual.astype(np.float64))
    return OutputComparison(
        name=name,
        shape=tuple(actual.shape),
        max_abs_diff=float(difference.max()) if difference.size else 0.0,
        min_cosine=_min_row_cosine(expected, actual),
    )


def _min_row_cosine(expected: np.ndarray, actual: np.ndarray) -> float:
    cosines = row_cosines(expected, actual)
    return float(cosines.min()) if cosines.size else 1.0


def _mismatch_message(model: str, failures: list[OutputComparison], tolerance: OnnxExportSpec) -> str:
    details = "; ".join(
        f"output {output.name}: max abs difference {output.max_abs_diff:.3g} (tolerance {tolerance.atol:g}), "
        f"min cosine {output.min_cosine:.6f} (tolerance {tolerance.min_cosine:g})"
        for output in failures
    )
    return f"{model}: the ONNX export does not reproduce PyTorch: {details}"


def _log(report: ValidationReport) -> None:
    for output in report.outputs:
        logger.info(
            "%s: %s %s max abs diff %.3g (atol %g), min cosine %.6f (min %g): %s",
            report.model,
            output.name,
            output.shape,
            output.max_abs_diff,
            report.tolerance.atol,
            output.min_cosine,
            report.tolerance.min_cosine,
            "ok" if output.within(report.tolerance) else "MISMATCH",
        )


@contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Silences the tracer's expected warnings (constants, the legacy-exporter notice)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        yield
