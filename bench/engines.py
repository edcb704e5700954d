"""``postsim bench engines``: the exported encoders in ONNX Runtime against OpenVINO, on this CPU.

The server runs each encoder in ONNX Runtime. OpenVINO reads the same ONNX files (its own
INT8 kernels, bf16 where the CPU has it) and is the second engine #15 asked to measure.
:func:`measure_engines` runs every engine present on the same prepared photo posts, at each
thread count and batch size, with the calls of all configurations interleaved so that a busy
machine slows each alike; a row is the median milliseconds per post and the mean cosine of the
engine's outputs to ONNX Runtime's at one thread (what the server computes).

OpenVINO is optional (``pip install 'postsim[openvino]'``); without it only ONNX Runtime is
measured and the report says how to add it.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from postsim.bench.photos import PhotoWorkload, draw_photo_post
from postsim.core.errors import BenchError
from postsim.export.quantize import row_cosines
from postsim.model_repository import contract
from postsim.model_repository.onnx_sessions import session_options
from postsim.models.pipeline import PreparedPosts, Preprocessor, served_onnx_file

ONNX_RUNTIME = "onnxruntime"
OPENVINO = "openvino"
ENCODERS = (contract.IMAGE_ENCODER, contract.TEXT_ENCODER)


class Engine(Protocol):
    def __call__(self, feed: Mapping[str, np.ndarray]) -> np.ndarray:
        """The model's first output for ``feed``."""
        ...


@dataclass(frozen=True, kw_only=True)
class EngineTiming:
    """One configuration: an encoder in an engine, at a thread count and a batch size."""

    model: str
    engine: str
    threads: int
    batch_size: int
    ms_per_post: float
    """Median milliseconds of a call, divided by the posts it carries."""
    cosine_to_onnxruntime: float
    """Mean cosine of this configuration's output rows to ONNX Runtime's at one thread."""


@dataclass(frozen=True, kw_only=True)
class EnginesReport:
    timings: list[EngineTiming]
    missing: dict[str, str]
    """Engines not measured, and why."""
    posts: int


def available_engines() -> tuple[list[str], dict[str, str]]:
    """The engines this environment can run, and those it cannot with what to install."""
    if importlib.util.find_spec("openvino") is None:
        return [ONNX_RUNTIME], {OPENVINO: "not installed: pip install 'postsim[openvino]'"}
    return [ONNX_RUNTIME, OPENVINO], {}


def onnxruntime_engine(path: Path, threads: int) -> Engine:
    """An ONNX Runtime session set up as the server's (idle pool threads sleep)."""
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(path), session_options(threads=threads, spinning=False, quiet=True), providers=["CPUExecutionProvider"]
    )

    def run(feed: Mapping[str, np.ndarray]) -> np.ndarray:
        output: np.ndarray = session.run(None, dict(feed))[0]
        return output

    return run


def openvino_engine(path: Path, threads: int) -> Engine:
    """The ONNX file compiled by OpenVINO for the CPU, tuned for latency, on ``threads`` threads."""
    import openvino

    compiled = openvino.Core().compile_model(
        str(path), "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    )
    request = compiled.create_infer_request()
    first_output = compiled.output(0)

    def run(feed: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.asarray(request.infer(dict(feed))[first_output]).copy()

    return run


_ENGINE_BUILDERS: dict[str, Callable[[Path, int], Engine]] = {
    ONNX_RUNTIME: onnxruntime_engine,
    OPENVINO: openvino_engine,
}


def prepared_photo_posts(repository: Path, count: int, seed: int = 0) -> PreparedPosts:
    """``count`` posts of the photo workload that carry an image and a caption, preprocessed as the server does."""
    images: list[bytes] = []
    texts: list[bytes] = []
    workload = PhotoWorkload(seed=seed)
    index = 0
    while len(images) < count:
        post = draw_photo_post(index, workload)
        index += 1
        if post.image and post.text:
            images.append(post.image)
            texts.append(post.text.encode())
    prepared = Preprocessor.from_repository(repository)(images, texts)
    error = prepared.first_error()
    if error is not None:
        raise BenchError(f"a bench photo post was refused: {error}")
    return prepared


def encoder_feed(model: str, posts: PreparedPosts, batch_size: int) -> dict[str, np.ndarray]:
    """The first ``batch_size`` posts as ``model``'s inputs."""
    if model == contract.IMAGE_ENCODER:
        return {
            contract.PIXEL_VALUES.name: posts.pixel_values[:batch_size],
            contract.FRAME_MASK.name: posts.frame_mask[:batch_size],
        }
    return {
        contract.INPUT_IDS.name: posts.input_ids[:batch_size],
        contract.ATTENTION_MASK.name: posts.attention_mask[:batch_size],
    }


def measure_engines(
    repository: Path,
    *,
    threads: Sequence[int] = (1, 2),
    batch_sizes: Sequence[int] = (1, 4),
    repeats: int = 10,
    progress: Callable[[str], None] | None = None,
) -> EnginesReport:
    """Median ms per post of each encoder in each available engine, configurations interleaved call by call."""
    if repeats < 1 or not threads or not batch_sizes or min(threads) < 1 or min(batch_sizes) < 1:
        raise BenchError("repeats, thread counts and batch sizes must each be at least 1")
    engines, missing = available_engines()
    posts = prepared_photo_posts(repository, max(batch_sizes))
    timings: list[EngineTiming] = []
    for model in ENCODERS:
        path = served_onnx_file(repository, model)
        runners = {(engine, count): _ENGINE_BUILDERS[engine](path, count) for engine in engines for count in threads}
        what_the_server_runs = runners.get((ONNX_RUNTIME, 1)) or onnxruntime_engine(path, 1)
        reference = what_the_server_runs(encoder_feed(model, posts, max(batch_sizes)))
        for batch_size in batch_sizes:
            feed = encoder_feed(model, posts, batch_size)
            outputs = {key: run(feed) for key, run in runners.items()}  # also the warm-up (OpenVINO compiles a shape)
            elapsed: dict[tuple[str, int], list[float]] = {key: [] for key in runners}
            for _ in range(repeats):
                for key, run in runners.items():
                    started = time.perf_counter()
                    run(feed)
                    elapsed[key].append((time.perf_counter() - started) * 1e3)
            for (engine, count), times in elapsed.items():
                timing = EngineTiming(
                    model=model,
                    engine=engine,
                    threads=count,
                    batch_size=batch_size,
                    ms_per_post=statistics.median(times) / batch_size,
                    cosine_to_onnxruntime=float(row_cosines(reference[:batch_size], outputs[engine, count]).mean()),
                )
                timings.append(timing)
                if progress is not None:
                    progress(f"{model} {engine} {count} thread(s) batch {batch_size}: {timing.ms_per_post:.1f} ms/post")
    return EnginesReport(timings=timings, missing=missing, posts=len(posts))


def format_engines(report: EnginesReport) -> str:
    """A markdown table; each OpenVINO row also gives its time relative to ONNX Runtime's in the same setting."""
    by_key: dict[tuple[str, int, int], dict[str, EngineTiming]] = {}
    for timing in report.timings:
        by_key.setdefault((timing.model, timing.threads, timing.batch_size), {})[timing.engine] = timing
    lines = [
        "| encoder | threads | batch | engine | ms/post | vs ONNX Runtime | cosine to ONNX Runtime (1 thread) |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for (model, threads, batch_size), timings in by_key.items():
        onnxruntime_ms = timings[ONNX_RUNTIME].ms_per_post
        for engine, timing in timings.items():
            relative = f"{timing.ms_per_post / onnxruntime_ms:.2f}×" if engine != ONNX_RUNTIME else ""
            lines.append(
                f"| {model} | {threads} | {batch_size} | {engine} | {timing.ms_per_post:.1f} | {relative} | "
                f"{timing.cosine_to_onnxruntime:.5f} |"
            )
    lines += [f"\n{engine}: {why}" for engine, why in report.missing.items()]
    return "\n".join(lines)


def engine_versions() -> dict[str, Any]:
    """The version of each engine measured (for the report's header)."""
    import onnxruntime

    versions: dict[str, Any] = {ONNX_RUNTIME: onnxruntime.__version__}
    if importlib.util.find_spec("openvino") is not None:
        import openvino

        versions[OPENVINO] = openvino.__version__
    return versions
