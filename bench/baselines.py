"""The in-process baselines of the serving benchmark: the same computation with no server.

Both are the in-process pipeline (:mod:`postsim.models.pipeline`): the repository's own
preprocessing (its image limits and ``tokenizer.json``) on the same posts the sweep sends, then

- **ONNX Runtime**: the repository's exported ONNX files (so the same precision as the
  server), one session per model, run one after the other;
- **PyTorch eager**: :class:`~postsim.models.torch_runtime.TorchRuntime` in fp32, on the
  models the repository was exported from (rebuilt from its weights manifest).

Each uses every core of the machine: ONNX Runtime and torch get one intra-op thread per
core, which is what a single process serving alone would do. Batch 1 gives the latency,
batch 8 the throughput.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from postsim.bench.results import (
    ORT_IN_PROCESS,
    TORCH_EAGER,
    BenchPoint,
    ConfigurationKind,
    ConfigurationResult,
    LatencyStats,
    available_cores,
)
from postsim.bench.workload import BenchPost, post_at
from postsim.core.errors import BenchError, PostSimError
from postsim.model_repository import contract
from postsim.model_repository.manifest import WeightsManifest
from postsim.models.pipeline import OrtRuntime, PostPipeline, Preprocessor
from postsim.models.settings import RANDOM_BACKBONE, ModelSettings, ModelSize

if TYPE_CHECKING:
    from postsim.models.weights import PostSimModels

logger = logging.getLogger("postsim")


Embedder = Callable[[Sequence[BenchPost]], np.ndarray]
"""Posts in, fused embeddings ``[B, dim]`` out."""


class Baseline(enum.Enum):
    ORT = "ort"
    TORCH = "torch"


def ort_pipeline(repository: Path, *, threads: int) -> PostPipeline:
    """The repository's ONNX files in this process, after the server's preprocessing, as the server configures it."""
    return PostPipeline(
        Preprocessor.from_repository(repository), OrtRuntime.from_repository(repository, threads=threads)
    )


def torch_pipeline(repository: Path, models: PostSimModels, *, threads: int) -> PostPipeline:
    """The server's preprocessing, then the PyTorch modules in eager mode (fp32)."""
    from postsim.models.torch_runtime import TorchRuntime

    return PostPipeline(Preprocessor.from_repository(repository), TorchRuntime(models, threads=threads))


def embedder(pipeline: PostPipeline) -> Embedder:
    """The bench posts' fused embeddings through ``pipeline``; a post the server would refuse is an error."""

    def embed(posts: Sequence[BenchPost]) -> np.ndarray:
        images, texts = [post.image for post in posts], [post.text_bytes for post in posts]
        return pipeline.embed(images, texts, [post.id for post in posts]).embedding

    return embed


def model_settings_from_manifest(manifest: WeightsManifest) -> ModelSettings:
    """The settings that rebuild the PyTorch models a repository was exported from."""
    provenance = manifest.provenance
    image, text = (
        _model_of(str(provenance[model]["backbone"])) for model in (contract.IMAGE_ENCODER, contract.TEXT_ENCODER)
    )
    head_source = str(provenance[contract.FUSER]["weights"])
    head = Path(head_source.removeprefix("checkpoint:")) if head_source.startswith("checkpoint:") else None
    random = RANDOM_BACKBONE in (image, text)
    return ModelSettings(
        dim=manifest.dim,
        image_model=image,
        text_model=text,
        head=head,
        seed=int(provenance.get("seed", 0)) if random or head is None else None,
        size=ModelSize(provenance.get("size", "full")) if random else None,
    )


def _model_of(backbone: str) -> str:
    """What ``image_model`` / ``text_model`` rebuild a backbone from, given its provenance string."""
    for prefix in ("pretrained:", "dir:"):
        if backbone.startswith(prefix):
            return backbone.removeprefix(prefix)
    if backbone == "random" or backbone.startswith("bundled:"):
        return backbone
    raise BenchError(f"cannot rebuild the PyTorch model of this repository from its provenance ({backbone})")


def measure_in_process(
    embed: Embedder,
    posts: Sequence[BenchPost],
    *,
    batch_size: int,
    requests: int,
    warmup: int,
) -> tuple[BenchPoint, dict[str, np.ndarray]]:
    """Time ``requests`` calls of ``batch_size`` posts each, after ``warmup`` calls; and each post's embedding."""
    embeddings: dict[str, np.ndarray] = {}
    latencies: list[float] = []
    started = time.perf_counter()
    cpu_started = time.process_time()
    for call in range(-warmup, requests):
        batch = [post_at(posts, call * batch_size + offset) for offset in range(batch_size)]
        begin = time.perf_counter()
        if call == 0:
            started, cpu_started = begin, time.process_time()
        output = embed(batch)
        if call >= 0:
            latencies.append(time.perf_counter() - begin)
            for post, row in zip(batch, output, strict=True):
                embeddings.setdefault(post.id, row)
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    point = BenchPoint(
        concurrency=1,
        batch_size=batch_size,
        requests=requests,
        errors=0,
        seconds=seconds,
        latency=LatencyStats.of(latencies),
        cpu_ms_per_post=cpu_seconds * 1e3 / (requests * batch_size),
    )
    return point, embeddings


@dataclass(frozen=True, kw_only=True)
class BaselineSettings:
    baselines: tuple[Baseline, ...] = (Baseline.ORT, Baseline.TORCH)
    batch_sizes: tuple[int, ...] = (1, 8)
    posts: int = 48
    """Posts each batch size runs through (batch 8: posts / 8 calls)."""
    warmup_posts: int = 8
    threads: int = 0
    """Intra-op threads of ONNX Runtime and torch; 0 = one per available core."""


def _calls(batch_size: int, posts: int) -> int:
    """Calls of ``batch_size`` posts that cover ``posts`` posts (at least one)."""
    return max(1, -(-posts // batch_size))


@dataclass(frozen=True)
class BaselineResults:
    configurations: list[ConfigurationResult]
    reference: dict[str, np.ndarray]
    """Each post's embedding from in-process ONNX Runtime (what the other configurations are compared with)."""
    skipped: dict[str, str]
    torch_fp32: dict[str, np.ndarray] = field(default_factory=dict)
    """Each post's embedding from the PyTorch eager fp32 pipeline (empty when it did not run)."""


def run_baselines(
    repository: Path,
    posts: Sequence[BenchPost],
    settings: BaselineSettings,
    *,
    torch_models: PostSimModels | None = None,
) -> BaselineResults:
    """Measure each baseline at each batch size.

    When any baseline is asked for, the ONNX Runtime one runs too: it is the reference the
    other configurations' embeddings are compared with. None asked for: nothing runs.
    """
    threads = settings.threads or available_cores()
    configurations: list[ConfigurationResult] = []
    skipped: dict[str, str] = {}
    if not settings.baselines:
        return BaselineResults(configurations=configurations, reference={}, skipped=skipped)

    ort_points, reference = _sweep_batches(
        embedder(ort_pipeline(repository, threads=threads)), posts, settings, ORT_IN_PROCESS
    )
    if Baseline.ORT in settings.baselines:
        configurations.append(
            ConfigurationResult(
                name=ORT_IN_PROCESS,
                kind=ConfigurationKind.IN_PROCESS,
                description=f"repository's model.onnx files, ONNX Runtime CPU, {threads} intra-op threads",
                points=ort_points,
                max_abs_diff=0.0,
            )
        )

    if Baseline.TORCH in settings.baselines:
        try:
            torch = _torch_pipeline(repository, torch_models, threads)
        except PostSimError as error:
            logger.warning("PyTorch eager baseline skipped: %s", error)
            skipped[TORCH_EAGER] = str(error)
        else:
            torch_points, torch_embeddings = _sweep_batches(embedder(torch), posts, settings, TORCH_EAGER)
            configurations.append(
                ConfigurationResult(
                    name=TORCH_EAGER,
                    kind=ConfigurationKind.IN_PROCESS,
                    description=f"TorchPostPipeline fp32, {threads} torch threads",
                    points=torch_points,
                    max_abs_diff=max_abs_diff(torch_embeddings, reference),
                )
            )
            return BaselineResults(
                configurations=configurations, reference=reference, skipped=skipped, torch_fp32=torch_embeddings
            )
    return BaselineResults(configurations=configurations, reference=reference, skipped=skipped)


def _torch_pipeline(repository: Path, models: PostSimModels | None, threads: int) -> PostPipeline:
    from postsim.models.weights import build_models

    if models is None:
        settings = model_settings_from_manifest(WeightsManifest.read(repository))
        logger.info("rebuilding the PyTorch models of %s for the eager baseline", repository)
        models = build_models(settings)
    return torch_pipeline(repository, models, threads=threads)


def _sweep_batches(
    embed: Embedder, posts: Sequence[BenchPost], settings: BaselineSettings, name: str
) -> tuple[list[BenchPoint], dict[str, np.ndarray]]:
    points = []
    embeddings: dict[str, np.ndarray] = {}
    for batch_size in settings.batch_sizes:
        logger.info("%s: batch %d, %d posts", name, batch_size, settings.posts)
        point, seen = measure_in_process(
            embed,
            posts,
            batch_size=batch_size,
            requests=_calls(batch_size, settings.posts),
            warmup=_calls(batch_size, settings.warmup_posts) if settings.warmup_posts else 0,
        )
        logger.info("%s batch %d: p50 %.1f ms, %.2f posts/s", name, batch_size, point.latency.p50_ms, point.posts_per_s)
        points.append(point)
        for post_id, row in seen.items():
            embeddings.setdefault(post_id, row)
    return points, embeddings


def mean_cosine(embeddings: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float | None:
    """Mean cosine similarity over the posts both have; None when they share none."""
    shared = sorted(embeddings.keys() & reference.keys())
    if not shared:
        return None
    ours = np.stack([embeddings[key] for key in shared]).astype(np.float64)
    theirs = np.stack([reference[key] for key in shared]).astype(np.float64)
    norms = np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1)
    return float(np.mean(np.sum(ours * theirs, axis=1) / np.maximum(norms, 1e-12)))


def max_abs_diff(embeddings: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float | None:
    """Largest absolute difference over the posts both have; None when they share none."""
    shared = sorted(embeddings.keys() & reference.keys())
    if not shared:
        return None
    return float(max(np.max(np.abs(embeddings[key] - reference[key])) for key in shared))
