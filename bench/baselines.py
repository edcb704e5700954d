"""The in-process baselines of the serving benchmark: the same computation with no server.

Both run the server's own preprocessing (:func:`~postsim.model_repository.preprocessing.preprocess_images`
and the repository's ``tokenizer.json``) on the same posts the sweep sends, then

- **ONNX Runtime**: the repository's exported ``model.onnx`` files (so the same precision
  as the server), one session per model, run one after the other;
- **PyTorch eager**: :class:`~postsim.export.torch_pipeline.TorchPostPipeline` in fp32, on
  the models the repository was exported from (rebuilt from its weights manifest).

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
from typing import TYPE_CHECKING, Any

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
from postsim.core.errors import BenchError, InvalidPostError, PostSimError, RepositoryError
from postsim.model_repository import contract
from postsim.model_repository.configs import read_config
from postsim.model_repository.layout import version_dirs
from postsim.model_repository.manifest import WeightsManifest
from postsim.model_repository.preprocessing import preprocess_images
from postsim.model_repository.tokenization import TextTokenizer

if TYPE_CHECKING:
    from postsim.export.weights import ModelSettings, PostSimModels

logger = logging.getLogger("postsim")


Embedder = Callable[[Sequence[BenchPost]], np.ndarray]
"""Posts in, fused embeddings ``[B, dim]`` out."""


class Baseline(enum.Enum):
    ORT = "ort"
    TORCH = "torch"


@dataclass(frozen=True)
class Preprocessed:
    """The contract's tensors for a batch of posts, as the server's preprocessing makes them."""

    pixel_values: np.ndarray
    image_mask: np.ndarray
    input_ids: np.ndarray
    attention_mask: np.ndarray
    text_mask: np.ndarray


class Preprocessor:
    """Image preprocessing and tokenization exactly as ``preprocess_image`` and ``tokenize`` run them."""

    def __init__(self, repository: Path) -> None:
        self.tokenizer = TextTokenizer.from_file(_newest_version(repository, contract.TOKENIZE) / "tokenizer.json")

    def __call__(self, posts: Sequence[BenchPost]) -> Preprocessed:
        pixels, image_mask, image_errors = preprocess_images([post.image for post in posts])
        ids, attention, text_mask, text_errors = self.tokenizer.encode([post.text_bytes for post in posts])
        for post, image_error, text_error in zip(posts, image_errors, text_errors, strict=True):
            if image_error is not None or text_error is not None:
                raise InvalidPostError(f"bench post {post.id}: {image_error or text_error}")
        return Preprocessed(pixels, image_mask, ids, attention, text_mask)


def ort_session(path: Path, *, threads: int) -> Any:
    """An ONNX Runtime CPU session set up like the server's (all graph optimisations, one inter-op thread)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _newest_version(repository: Path, model: str) -> Path:
    versions = version_dirs(repository / model)
    if not versions:
        raise RepositoryError(f"{repository / model} has no version folder: run `postsim export` first")
    return versions[-1]


def served_onnx_file(repository: Path, model: str) -> Path:
    """The ONNX file the server runs for ``model``: its config's ``onnx_file`` parameter, as the server reads it."""
    parameters = contract.config_parameters(read_config(repository, model))
    path = _newest_version(repository, model) / contract.ONNX_FILE_PARAMETER.read(parameters)
    if not path.is_file():
        raise RepositoryError(f"{path} does not exist: run `postsim export` again")
    return path


class OrtPostPipeline:
    """The repository's three ONNX models run in this process, after the server's preprocessing."""

    def __init__(self, repository: Path, *, threads: int) -> None:
        self.preprocess = Preprocessor(repository)
        self.sessions = {
            name: ort_session(served_onnx_file(repository, name), threads=threads) for name in contract.ONNX_MODELS
        }

    def _run(self, model: str, feed: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
        """The ``outputs`` of ``model`` (all of them when None), in order."""
        results: list[np.ndarray] = self.sessions[model].run(outputs, feed)
        return results

    def embed(self, posts: Sequence[BenchPost]) -> np.ndarray:
        tensors = self.preprocess(posts)
        (image,) = self._run(contract.IMAGE_ENCODER, {contract.PIXEL_VALUES.name: tensors.pixel_values})
        (text,) = self._run(
            contract.TEXT_ENCODER,
            {contract.INPUT_IDS.name: tensors.input_ids, contract.ATTENTION_MASK.name: tensors.attention_mask},
        )
        (embedding,) = self._run(
            contract.FUSER,
            {
                contract.IMAGE_EMBEDDING.name: image,
                contract.TEXT_EMBEDDING.name: text,
                contract.IMAGE_MASK.name: tensors.image_mask,
                contract.TEXT_MASK.name: tensors.text_mask,
            },
            [contract.EMBEDDING.name],
        )
        return embedding


class TorchBaselinePipeline:
    """The server's preprocessing, then the PyTorch modules in eager mode (fp32)."""

    def __init__(self, repository: Path, models: PostSimModels, *, threads: int) -> None:
        import torch

        from postsim.export.torch_pipeline import TorchPostPipeline

        torch.set_num_threads(threads)
        self.preprocess = Preprocessor(repository)
        self.pipeline = TorchPostPipeline(models)

    def embed(self, posts: Sequence[BenchPost]) -> np.ndarray:
        t = self.preprocess(posts)
        embedding, _weights = self.pipeline.embed(
            t.pixel_values, t.input_ids, t.attention_mask, t.image_mask, t.text_mask
        )
        return embedding


def model_settings_from_manifest(manifest: WeightsManifest) -> ModelSettings:
    """The settings that rebuild the PyTorch models a repository was exported from."""
    from postsim.export.models import ModelSize
    from postsim.export.weights import RANDOM_BACKBONE, ModelSettings

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

    ort_pipeline = OrtPostPipeline(repository, threads=threads)
    ort_points, reference = _sweep_batches(ort_pipeline.embed, posts, settings, ORT_IN_PROCESS)
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
    del ort_pipeline

    if Baseline.TORCH in settings.baselines:
        try:
            torch_pipeline = _torch_pipeline(repository, torch_models, threads)
        except PostSimError as error:
            logger.warning("PyTorch eager baseline skipped: %s", error)
            skipped[TORCH_EAGER] = str(error)
        else:
            torch_points, torch_embeddings = _sweep_batches(torch_pipeline.embed, posts, settings, TORCH_EAGER)
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


def _torch_pipeline(repository: Path, models: PostSimModels | None, threads: int) -> TorchBaselinePipeline:
    from postsim.export.weights import build_models

    if models is None:
        settings = model_settings_from_manifest(WeightsManifest.read(repository))
        logger.info("rebuilding the PyTorch models of %s for the eager baseline", repository)
        models = build_models(settings)
    return TorchBaselinePipeline(repository, models, threads=threads)


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
