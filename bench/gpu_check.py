"""The GPU check: what a GPU machine offers postsim, measured in one short run.

postsim has not been measured on a GPU yet, and a GPU machine may have PyTorch with CUDA but
neither onnxruntime-gpu, FAISS's GPU build nor tritonserver. This check finds out what is
there and measures what it finds, in this order, within a time budget (7 minutes by
default; what the budget leaves out is listed as skipped):

1. the encoders in PyTorch, fp16 then bf16 (ResNet-101 and DistilBERT at full size with random
   weights, from :mod:`postsim.models`; the hub is never asked), eagerly and replayed
   from a CUDA graph, at batch 1, 2, 4 … 256: throughput, and the p50 of each call;
2. exact search as a matrix product on the GPU: 1M × 256 fp16 unit vectors, top 10, one query
   and 1000 at once, and its recall against the same search in fp32;
3. the encoders exported as postsim exports them, in ONNX Runtime's TensorRT and CUDA
   providers, when onnxruntime-gpu is installed;
4. the flat index of FAISS's GPU build, when there is one;
5. ``torch.compile(mode="reduce-overhead")`` at batch 1, when time is left.

It writes ``gpu-check.json`` and ``gpu-check.md`` (the tables) into one folder. A dry run
(``--dry-run`` or ``POSTSIM_GPU_CHECK_DRY=1``) takes the same paths on the CPU with tiny
models and sizes in seconds, so that CI keeps the check working until a GPU comes; on the
CPU a CUDA graph replay is the eager call itself, and ``torch.compile`` is left out.

The check runs where postsim is not installed, from a copy of the working tree; it needs
torch and numpy, and transformers for the encoders (onnx and onnxruntime for section 3)::

    bash bench/gpu_check.sh --out DIR        # PYTHONPATH=.ci/typecheck python3 -m postsim.bench.gpu_check

A section that fails (a capture PyTorch refuses, a provider that does not load) is recorded
with its error and the check goes on; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import copy
import enum
import functools
import importlib.metadata
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from postsim.core.errors import OptionalDependencyError, PostSimError
from postsim.core.files import write_text_atomic
from postsim.core.paths import default_run_dir
from postsim.model_repository.contract import DEFAULT_DIM, IMAGE_ENCODER, IMAGE_SIZE, TEXT_ENCODER, model_specs
from postsim.models.settings import ModelSettings, ModelSize

try:
    import torch
    from torch import nn
except ImportError as error:
    raise OptionalDependencyError("torch", "export", "The GPU check") from error

logger = logging.getLogger("postsim")

DRY_ENV = "POSTSIM_GPU_CHECK_DRY"
JSON_NAME = "gpu-check.json"
MARKDOWN_NAME = "gpu-check.md"
VOCAB_SIZE = 30522
"""distilbert-base-uncased's vocabulary, which token ids are drawn from."""


class Section(enum.Enum):
    """The parts of the check, in the order they run."""

    ENCODERS = "encoders"
    SEARCH = "exact search"
    ONNXRUNTIME = "onnxruntime"
    FAISS = "faiss"
    COMPILE = "torch.compile"


class GpuCheckError(PostSimError):
    """The GPU check cannot run as asked (no GPU outside a dry run)."""


@dataclass(frozen=True, kw_only=True)
class GpuCheckSettings:
    """What the check measures; :meth:`dry` gives the seconds-long CPU run."""

    dry_run: bool = False
    budget_s: float = 420.0
    """Wall time for the measurements; points left when it is spent are listed as skipped. The
    default leaves a minute of an 8-minute slot for starting Python and writing results."""
    model_size: str = "full"
    """``full`` (ResNet-101, DistilBERT) or ``tiny``: :class:`postsim.models.settings.ModelSize`'s values."""
    dtypes: tuple[str, ...] = ("fp16", "bf16")
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    sequence_length: int = 64
    """Tokens per text: a 20–60-word caption with its title and tags."""
    corpus_size: int = 1_000_000
    dim: int = DEFAULT_DIM
    top_k: int = 10
    query_batches: tuple[int, ...] = (1, 1000)
    recall_queries: int = 100
    onnx_batch_sizes: tuple[int, ...] = (1, 16, 64)
    min_calls: int = 5
    min_point_s: float = 0.25
    """Each point is called at least ``min_calls`` times and for at least this long (after warm-up)."""
    max_calls: int = 200
    warmup_calls: int = 3
    compile_min_left_s: float = 120.0
    """``torch.compile`` starts only with this much of the budget left (a compile takes a minute or more)."""
    tensorrt_min_left_s: float = 150.0
    """Likewise for building TensorRT engines."""

    def __post_init__(self) -> None:
        unknown = [dtype for dtype in self.dtypes if dtype not in _DTYPES]
        if unknown:
            raise GpuCheckError(f"dtypes {unknown} are not among {sorted(_DTYPES)}")
        if self.budget_s <= 0 or not self.batch_sizes or min(self.batch_sizes) < 1:
            raise GpuCheckError("the GPU check needs a positive budget and batch sizes of at least 1")

    @classmethod
    def dry(cls) -> GpuCheckSettings:
        """Tiny models and sizes on the CPU: every path of the check in seconds."""
        return cls(
            dry_run=True,
            budget_s=120.0,
            model_size="tiny",
            batch_sizes=(1, 2),
            sequence_length=16,
            corpus_size=4096,
            query_batches=(1, 64),
            recall_queries=16,
            onnx_batch_sizes=(1, 2),
            min_calls=2,
            min_point_s=0.0,
            warmup_calls=1,
            tensorrt_min_left_s=0.0,
        )


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True, kw_only=True)
class GpuPoint:
    """One measured point: ``calls`` calls of ``batch`` items each."""

    section: str
    model: str
    runtime: str
    dtype: str
    batch: int
    calls: int
    p50_ms: float
    """Median wall time of a call, the device synchronised after each."""
    per_s: float
    """Items (images, texts, queries) per second at the median call."""


@dataclass(frozen=True, kw_only=True)
class GpuCheckReport:
    settings: dict[str, Any]
    environment: dict[str, Any]
    points: list[GpuPoint] = field(default_factory=list)
    agreement: dict[str, float] = field(default_factory=dict)
    """Cosine of each encoder's output to fp32 (min over a batch), recall@k of fp16 search against fp32."""
    skipped: list[str] = field(default_factory=list)
    """What was not measured, and why (absent, or the budget ran out)."""
    errors: list[str] = field(default_factory=list)
    """Sections that failed, with their error."""
    seconds: float = 0.0


def run_gpu_check(settings: GpuCheckSettings) -> GpuCheckReport:
    """Detect what the machine has and measure it; raises GpuCheckError when there is no GPU outside a dry run."""
    if not settings.dry_run and not torch.cuda.is_available():
        raise GpuCheckError(
            "PyTorch sees no CUDA device here (torch.cuda.is_available() is False): run the check on a GPU "
            f"machine, or with --dry-run ({DRY_ENV}=1) to try it on the CPU"
        )
    device = torch.device("cpu" if settings.dry_run else "cuda")
    torch.backends.cudnn.benchmark = True  # each batch size gets its fastest convolutions (found during warm-up)
    run = _Run(settings, device, time.monotonic() + settings.budget_s)
    started = time.monotonic()
    report = GpuCheckReport(settings=asdict(settings), environment=environment())
    encoders = run.section(report, Section.ENCODERS, lambda: _Encoders.build(settings, device))
    for index, dtype in enumerate(settings.dtypes):
        if encoders is not None:
            run.section(report, Section.ENCODERS, functools.partial(_measure_encoders, run, report, encoders, dtype))
        if index == 0:
            run.section(report, Section.SEARCH, lambda: _measure_search(run, report))
    if encoders is not None:
        run.section(report, Section.ONNXRUNTIME, lambda: _measure_onnxruntime(run, report, encoders))
    run.section(report, Section.FAISS, lambda: _measure_faiss(run, report))
    if encoders is not None and not settings.dry_run:
        run.section(report, Section.COMPILE, lambda: _measure_compile(run, report, encoders))
    return replace(report, seconds=time.monotonic() - started)


def environment() -> dict[str, Any]:
    """Versions, the device, and which optional runtimes are present (each a string, or None when absent)."""
    found: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": None,
        "transformers": _version("transformers"),
        "onnxruntime": None,
        "faiss": None,
        "tritonserver": shutil.which("tritonserver"),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        found["device"] = (
            f"{properties.name}, compute capability {properties.major}.{properties.minor}, "
            f"{properties.total_memory / 2**30:.0f} GiB, {properties.multi_processor_count} multiprocessors"
        )
    try:
        import onnxruntime as ort

        found["onnxruntime"] = f"{ort.__version__}: {', '.join(ort.get_available_providers())}"
    except ImportError:
        pass
    try:
        import faiss

        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        found["faiss"] = f"{faiss.__version__}, {gpus} GPU(s)"
    except ImportError:
        pass
    return found


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


# --- Running and timing ------------------------------------------------------------------------


class _BudgetSpent(Exception):
    """The time budget ran out before a point."""


class _Run:
    """The device, the deadline, and the timing of calls."""

    def __init__(self, settings: GpuCheckSettings, device: torch.device, deadline: float) -> None:
        self.settings = settings
        self.device = device
        self.deadline = deadline

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def section(self, report: GpuCheckReport, section: Section, work: Callable[[], Any]) -> Any:
        """Run one part of the check; its failure is recorded in ``report`` and the check goes on."""
        try:
            return work()
        except _BudgetSpent as spent:
            report.skipped.append(f"{section.value}: {spent} and what follows it (time budget spent)")
        except Exception as error:  # the check reports what fails on this machine instead of stopping
            logger.exception("GPU check: %s failed", section.value)
            report.errors.append(f"{section.value}: {type(error).__name__}: {_first_line(error)}")
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # the section's tensors are gone with its frame: hand their memory back
        return None

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def measure(
        self,
        report: GpuCheckReport,
        call: Callable[[], Any],
        *,
        section: Section,
        model: str,
        runtime: str,
        dtype: str,
        batch: int,
    ) -> GpuPoint:
        """Warm ``call`` up, then time it (synchronised after each call); record and return the point."""
        label = f"{model} {runtime} {dtype} batch {batch}"
        if self.left_s() <= 0:
            raise _BudgetSpent(label)
        settings = self.settings
        for _ in range(settings.warmup_calls):
            call()
        self.synchronize()
        seconds: list[float] = []
        started = time.perf_counter()
        while len(seconds) < settings.max_calls and (
            len(seconds) < settings.min_calls or time.perf_counter() - started < settings.min_point_s
        ):
            before = time.perf_counter()
            call()
            self.synchronize()
            seconds.append(time.perf_counter() - before)
        p50 = statistics.median(seconds)
        point = GpuPoint(
            section=section.value,
            model=model,
            runtime=runtime,
            dtype=dtype,
            batch=batch,
            calls=len(seconds),
            p50_ms=p50 * 1e3,
            per_s=batch / p50,
        )
        report.points.append(point)
        logger.info("%s: p50 %.2f ms, %.0f/s", label, point.p50_ms, point.per_s)
        return point

    def graphed(self, call: Callable[[], Any]) -> Callable[[], Any]:
        """``call`` captured in a CUDA graph, its replay returned; on the CPU, ``call`` itself.

        ``call`` must read and write only tensors that outlive the graph (static inputs). It is
        warmed up on a side stream first, as PyTorch's graph capture requires.
        """
        if self.device.type != "cuda":
            return call
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(max(1, self.settings.warmup_calls)):
                call()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
        return graph.replay


# --- Encoders ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Encoders:
    """The fp32 image and text encoders, on the CPU (the masters each dtype is copied from)."""

    image: nn.Module
    text: nn.Module

    @classmethod
    def build(cls, settings: GpuCheckSettings, device: torch.device) -> _Encoders:
        try:
            from postsim.models.weights import build_models
        except ImportError as error:
            raise OptionalDependencyError("transformers", "export", "The GPU check's encoders") from error
        size = ModelSize(settings.model_size)
        # Random backbones as export builds them (batch norm calibrated to a trained network's
        # activation scale, so fp16 does not overflow), seeded, with the seeded head.
        models = build_models(ModelSettings(weights="random", size=size, dim=settings.dim, seed=0))
        image = models.image_encoder.requires_grad_(False)
        text = models.text_encoder.requires_grad_(False)
        logger.info("GPU check: %s encoders built on %s", size.value, device)
        return cls(image=image, text=text)

    def inputs(
        self, model: str, batch: int, settings: GpuCheckSettings, device: torch.device
    ) -> tuple[torch.Tensor, ...]:
        """Fresh random float32 pixels of one frame a post and its mask, or token ids and a mask in which every
        row is a different length."""
        generator = torch.Generator().manual_seed(batch)
        if model == IMAGE_ENCODER:
            pixels = torch.randn(batch, 1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
            return pixels.to(device), torch.ones(batch, 1).to(device)
        length = settings.sequence_length
        ids = torch.randint(1000, VOCAB_SIZE, (batch, length), generator=generator)
        lengths = torch.randint(length // 2, length + 1, (batch,), generator=generator)
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        return ids.to(device), mask.to(device)

    def modules(self) -> dict[str, nn.Module]:
        return {IMAGE_ENCODER: self.image, TEXT_ENCODER: self.text}


def _cast(inputs: tuple[torch.Tensor, ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Floating inputs (pixels) in ``dtype``; token ids and masks stay integers."""
    return tuple(tensor.to(dtype) if tensor.is_floating_point() else tensor for tensor in inputs)


def _measure_encoders(run: _Run, report: GpuCheckReport, encoders: _Encoders, dtype_name: str) -> None:
    """Each encoder in ``dtype_name``: its agreement with fp32, then eager and graph-replayed calls per batch size."""
    settings, device = run.settings, run.device
    dtype = _DTYPES[dtype_name]
    for model, master in encoders.modules().items():
        module = _copy_to(master, device, dtype)
        probe = encoders.inputs(model, 2, settings, device)
        with torch.inference_mode():
            reference = _copy_to(master, device, torch.float32)(*probe).float()
            candidate = module(*_cast(probe, dtype)).float()
        report.agreement[f"{model} {dtype_name} min cosine to fp32"] = _min_cosine(reference, candidate)
        graphs_work = True
        for batch in settings.batch_sizes:
            inputs = _cast(encoders.inputs(model, batch, settings, device), dtype)

            def call(module: nn.Module = module, inputs: tuple[torch.Tensor, ...] = inputs) -> torch.Tensor:
                with torch.inference_mode():
                    return module(*inputs)

            common: dict[str, Any] = {"section": Section.ENCODERS, "model": model, "dtype": dtype_name, "batch": batch}
            run.measure(report, call, runtime="PyTorch eager", **common)
            if not graphs_work:
                continue
            try:
                replay = run.graphed(call)
            except RuntimeError as error:  # a capture PyTorch refuses (the model syncs with the host): eager goes on
                report.errors.append(f"{model} {dtype_name} CUDA graph capture: {_first_line(error)}")
                graphs_work = False
                continue
            run.measure(report, replay, runtime="PyTorch CUDA graph", **common)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


def _copy_to(master: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    return copy.deepcopy(master).to(device=device, dtype=dtype)


def _min_cosine(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    if not torch.isfinite(candidate).all():
        return math.nan  # an overflow: reported as NaN, never as agreement
    return float(torch.nn.functional.cosine_similarity(reference, candidate, dim=1).min())


def _measure_compile(run: _Run, report: GpuCheckReport, encoders: _Encoders) -> None:
    """Each encoder in the first dtype through ``torch.compile(mode="reduce-overhead")`` at batch 1."""
    settings = run.settings
    dtype_name = settings.dtypes[0]
    for model, master in encoders.modules().items():
        if run.left_s() < settings.compile_min_left_s:
            raise _BudgetSpent(f"{model} compiled")
        compiled = torch.compile(_copy_to(master, run.device, _DTYPES[dtype_name]), mode="reduce-overhead")
        inputs = _cast(encoders.inputs(model, 1, settings, run.device), _DTYPES[dtype_name])

        def call(compiled: Callable[..., Any] = compiled, inputs: tuple[torch.Tensor, ...] = inputs) -> Any:
            with torch.inference_mode():
                return compiled(*inputs)

        started = time.monotonic()
        call()  # compiles
        report.agreement[f"{model} torch.compile seconds"] = time.monotonic() - started
        run.measure(
            report,
            call,
            section=Section.COMPILE,
            model=model,
            runtime="torch.compile reduce-overhead",
            dtype=dtype_name,
            batch=1,
        )


# --- Exact search ------------------------------------------------------------------------------


def _unit_vectors(count: int, dim: int, seed: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    vectors = torch.randn(count, dim, generator=generator).to(device)
    return torch.nn.functional.normalize(vectors, dim=1)


def _measure_search(run: _Run, report: GpuCheckReport) -> None:
    """Top-k by inner product over the corpus in fp16, as one matrix product and a top-k."""
    settings, device = run.settings, run.device
    corpus32 = _unit_vectors(settings.corpus_size, settings.dim, 1, device)
    corpus = corpus32.half()
    queries32 = _unit_vectors(settings.recall_queries, settings.dim, 2, device)
    exact = torch.topk(queries32 @ corpus32.T, settings.top_k, dim=1).indices
    found = torch.topk(queries32.half() @ corpus.T, settings.top_k, dim=1).indices
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(exact, found, strict=True))
    report.agreement[f"fp16 exact search recall@{settings.top_k} against fp32"] = hits / exact.numel()
    del corpus32
    for batch in settings.query_batches:
        queries = _unit_vectors(batch, settings.dim, 3, device).half()

        def search(queries: torch.Tensor = queries, corpus: torch.Tensor = corpus) -> Any:
            return torch.topk(queries @ corpus.T, settings.top_k, dim=1)

        model = f"{settings.corpus_size:,} × {settings.dim}, k={settings.top_k}"
        common: dict[str, Any] = {"section": Section.SEARCH, "model": model, "dtype": "fp16", "batch": batch}
        run.measure(report, search, runtime="PyTorch matmul + topk", **common)
        run.measure(report, run.graphed(search), runtime="PyTorch CUDA graph", **common)


def _measure_faiss(run: _Run, report: GpuCheckReport) -> None:
    """FAISS's flat inner-product index: on the GPU with FAISS's GPU build; on the CPU in a dry run."""
    try:
        import faiss
    except ImportError:
        report.skipped.append("faiss: not installed (the gpu extra installs faiss-gpu)")
        return
    settings = run.settings
    on_gpu = run.device.type == "cuda" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if not on_gpu and not settings.dry_run:
        report.skipped.append("faiss: the CPU build only (the gpu extra installs faiss-gpu)")
        return
    corpus = _unit_vectors(settings.corpus_size, settings.dim, 1, torch.device("cpu")).numpy()
    index: Any
    if on_gpu:
        resources = faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatIP(resources, settings.dim)
        runtime = "FAISS GpuIndexFlatIP"
    else:
        index = faiss.IndexFlatIP(settings.dim)
        runtime = "FAISS IndexFlatIP (CPU)"
    index.add(corpus)
    for batch in settings.query_batches:
        queries = _unit_vectors(batch, settings.dim, 3, torch.device("cpu")).numpy()
        model = f"{settings.corpus_size:,} × {settings.dim}, k={settings.top_k}"
        run.measure(
            report,
            functools.partial(index.search, queries, settings.top_k),
            section=Section.FAISS,
            model=model,
            runtime=runtime,
            dtype="fp32",
            batch=batch,
        )


# --- ONNX Runtime ------------------------------------------------------------------------------

_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def _measure_onnxruntime(run: _Run, report: GpuCheckReport, encoders: _Encoders) -> None:
    """The encoders as postsim exports them (fp32 ONNX), on each GPU provider ONNX Runtime has."""
    try:
        import onnxruntime as ort

        from postsim.export.onnx_export import export_onnx_model
    except ImportError as error:
        report.skipped.append(f"onnxruntime: {error.name} is not installed")
        return
    settings = run.settings
    providers = [name for name in _GPU_PROVIDERS if name in ort.get_available_providers()]
    if run.device.type != "cuda":
        providers = ["CPUExecutionProvider"]  # the dry run takes the same path on the CPU
    if not providers:
        report.skipped.append("onnxruntime: no GPU provider (the gpu extra installs onnxruntime-gpu)")
        return
    specs = model_specs(settings.dim)
    with _scratch() as folder:
        paths = {model: folder / f"{model}.onnx" for model in encoders.modules()}
        for model, module in encoders.modules().items():
            if run.left_s() <= 0:
                raise _BudgetSpent(f"exporting {model}")
            export_onnx_model(module, specs[model], paths[model])
        for provider in providers:
            if provider == "TensorrtExecutionProvider" and run.left_s() < settings.tensorrt_min_left_s:
                report.skipped.append("onnxruntime TensorRT: too little of the time budget left to build engines")
                continue
            for model, path in paths.items():
                names = specs[model].input_names
                options = ort.SessionOptions()
                chosen = [_provider(provider, names, settings, folder)]
                if provider != "CPUExecutionProvider":
                    chosen.append("CPUExecutionProvider")  # what a GPU provider cannot run falls back to the CPU
                session = ort.InferenceSession(str(path), options, providers=chosen)
                if session.get_providers()[0] != provider:  # ONNX Runtime falls back to the CPU with only a warning
                    report.errors.append(
                        f"onnxruntime: {provider} did not load for {model}; ONNX Runtime's log says why"
                    )
                    continue
                for batch in settings.onnx_batch_sizes:
                    arrays = [
                        tensor.cpu().numpy() for tensor in encoders.inputs(model, batch, settings, torch.device("cpu"))
                    ]
                    feed = dict(zip(names, arrays, strict=True))
                    runtime = f"ONNX Runtime {provider.removesuffix('ExecutionProvider')}"
                    dtype = "fp16" if provider == "TensorrtExecutionProvider" else "fp32"
                    run.measure(
                        report,
                        functools.partial(session.run, None, feed),
                        section=Section.ONNXRUNTIME,
                        model=model,
                        runtime=runtime,
                        dtype=dtype,
                        batch=batch,
                    )


def _provider(name: str, inputs: Sequence[str], settings: GpuCheckSettings, folder: Path) -> Any:
    """A provider with its options: TensorRT in fp16, one engine for every batch size measured, cached in ``folder``."""
    if name != "TensorrtExecutionProvider":
        return name
    largest, shapes = max(settings.onnx_batch_sizes), {}
    for bound, batch in (("min", 1), ("opt", largest), ("max", largest)):
        dims = (
            [f"{batch}x3x{IMAGE_SIZE}x{IMAGE_SIZE}"]
            if len(inputs) == 1
            else [f"{batch}x{settings.sequence_length}"] * 2
        )
        shapes[f"trt_profile_{bound}_shapes"] = ",".join(
            f"{tensor}:{dim}" for tensor, dim in zip(inputs, dims, strict=True)
        )
    return (
        name,
        {"trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(folder), **shapes},
    )


@contextmanager
def _scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="postsim-gpu-check-") as folder:
        yield Path(folder)


# --- Results -----------------------------------------------------------------------------------


def write_gpu_check(report: GpuCheckReport, out: Path) -> tuple[Path, Path]:
    """``gpu-check.json`` (everything) and ``gpu-check.md`` (the tables) in ``out``."""
    json_path, markdown_path = out / JSON_NAME, out / MARKDOWN_NAME
    write_text_atomic(json_path, json.dumps(asdict(report), indent=2, default=str) + "\n")
    write_text_atomic(markdown_path, format_gpu_check(report))
    return json_path, markdown_path


def format_gpu_check(report: GpuCheckReport) -> str:
    """The report as markdown: the machine, one table per section, agreement, what was skipped or failed."""
    mode = "dry run on the CPU (tiny sizes: the paths, not the figures)" if report.settings["dry_run"] else "GPU"
    lines = [f"# postsim GPU check ({mode}, {report.seconds:.0f} s)", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in report.environment.items()]
    for section in Section:
        points = [point for point in report.points if point.section == section.value]
        if points:
            lines += ["", f"## {section.value}", "", *_section_table(points)]
    if report.agreement:
        lines += ["", "## Agreement", "", "| | |", "|---|---:|"]
        lines += [f"| {name} | {value:.6g} |" for name, value in report.agreement.items()]
    for title, items in (("Skipped", report.skipped), ("Errors", report.errors)):
        if items:
            lines += ["", f"## {title}", "", *(f"- {item}" for item in items)]
    return "\n".join(lines) + "\n"


def _section_table(points: list[GpuPoint]) -> list[str]:
    """One row per (model, runtime, dtype): items/s at each batch size, and the p50 at the smallest batch."""
    batches = sorted({point.batch for point in points})
    rows: dict[tuple[str, str, str], dict[int, GpuPoint]] = {}
    for point in points:
        rows.setdefault((point.model, point.runtime, point.dtype), {})[point.batch] = point
    header = ["model", "runtime", "dtype", f"p50 ms (batch {batches[0]})", *(f"/s at {batch}" for batch in batches)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * (len(header) - 3)]
    for (model, runtime, dtype), by_batch in rows.items():
        first = by_batch.get(batches[0])
        cells = [model, runtime, dtype, f"{first.p50_ms:.2f}" if first else ""]
        cells += [f"{by_batch[batch].per_s:,.0f}" if batch in by_batch else "" for batch in batches]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """``python3 -m postsim.bench.gpu_check``: a standalone entry point for machines without postsim installed.

    argparse rather than the typer app: this runs from a copy of the working tree with only
    torch and numpy present. The exit status is 2 when the check cannot start, 1 when a
    section failed, 0 otherwise.
    """
    parser = argparse.ArgumentParser(prog="python3 -m postsim.bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="folder for the results (default $POSTSIM_HOME/runs/gpu-check)"
    )
    parser.add_argument("--dry-run", action="store_true", help=f"tiny sizes on the CPU, in seconds (also {DRY_ENV}=1)")
    parser.add_argument("--budget-s", type=float, default=None, help="time for the measurements (default 420 s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", stream=sys.stderr)
    logger.setLevel(logging.INFO)
    dry = args.dry_run or os.environ.get(DRY_ENV, "") not in ("", "0")
    settings = GpuCheckSettings.dry() if dry else GpuCheckSettings()
    if args.budget_s is not None:
        settings = replace(settings, budget_s=args.budget_s)
    out = args.out or default_run_dir("gpu-check")
    try:
        report = run_gpu_check(settings)
    except PostSimError as error:
        logger.error("%s", error)
        return 2
    json_path, markdown_path = write_gpu_check(report, out)
    sys.stdout.write(format_gpu_check(report))
    logger.info("wrote %s and %s", json_path, markdown_path)
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
