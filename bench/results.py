"""Typed results of the serving benchmark, shared by the sweep, the baselines and the report.

A :class:`BenchPoint` is one measured operating point (a concurrency level of a Triton
ensemble, or a batch size of an in-process pipeline); a :class:`ConfigurationResult` is
the line of points one configuration draws on the latency-vs-throughput plot. Latencies
are per call: one post per Triton request, ``batch_size`` posts per in-process call.
"""

from __future__ import annotations

import enum
import math
import os
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class ConfigurationKind(enum.Enum):
    TRITON = "triton"
    """Posts sent over gRPC to a Triton ensemble, one per request."""
    IN_PROCESS = "in-process"
    """The same computation called in this process, no server."""


TRITON_POST_EMBEDDING = "Triton post_embedding"
TRITON_SIMILAR_POSTS = "Triton similar_posts"
TRITON_VIDEO_POSTS = "Triton post_embedding, video posts"
ORT_IN_PROCESS = "ORT in-process"
TORCH_EAGER = "PyTorch eager"


def thread_policy_configuration(policy: str) -> str:
    """The name of ``post_embedding``'s configuration served with thread policy ``policy`` (``ThreadPolicy.value``)."""
    return f"{TRITON_POST_EMBEDDING}, threads {policy}"


@dataclass(frozen=True, kw_only=True)
class LatencyStats:
    """Percentiles of call latencies, in milliseconds."""

    count: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> LatencyStats:
        """Stats of latencies given in seconds; all NaN when there are none (every call failed)."""
        if not seconds:
            nan = math.nan
            return cls(count=0, p50_ms=nan, p95_ms=nan, p99_ms=nan, mean_ms=nan, max_ms=nan)
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        p50, p95, p99 = (float(value) for value in np.percentile(ms, [50, 95, 99]))
        return cls(count=len(ms), p50_ms=p50, p95_ms=p95, p99_ms=p99, mean_ms=float(ms.mean()), max_ms=float(ms.max()))


@dataclass(frozen=True, kw_only=True)
class BenchPoint:
    """One operating point: ``requests`` calls of ``batch_size`` posts, ``concurrency`` in flight."""

    concurrency: int
    batch_size: int
    requests: int
    """Measured calls (warm-up excluded), failed ones included."""
    errors: int
    seconds: float
    """The measured window: from the first measured call's start to the last one's end."""
    latency: LatencyStats
    """Of the calls that succeeded."""
    first_error: str | None = None
    cpu_ms_per_post: float | None = None
    """CPU time the work took per post, all threads and processes: the server's for Triton, this
    process's in process. Less disturbed than latency by other work on the machine; on a machine
    to itself, throughput can reach at most cores × 1000 / this."""
    cpu_ms_per_post_by_model: dict[str, float] = field(default_factory=dict)
    """The server's CPU per post split by model (``tritonserver``: the server process itself)."""
    client_cpu_ms_per_post: float | None = None
    """CPU time the load generator itself took per post (it shares the machine with the server)."""

    @property
    def posts(self) -> int:
        return (self.requests - self.errors) * self.batch_size

    @property
    def posts_per_s(self) -> float:
        return self.posts / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "posts": self.posts, "posts_per_s": self.posts_per_s}


@dataclass(frozen=True, kw_only=True)
class ConfigurationResult:
    name: str
    kind: ConfigurationKind
    description: str
    points: list[BenchPoint]
    max_abs_diff: float | None = None
    """Largest difference of its embeddings from the in-process ONNX Runtime ones, on the same posts."""
    mean_cosine_to_torch_fp32: float | None = None
    """Mean cosine of its embeddings to the PyTorch eager fp32 ones, on the same posts: how much a
    quantised repository agrees with the models it was exported from (None without that baseline)."""

    def label(self, point: BenchPoint) -> str:
        """``c=4`` for a concurrency level of a server, ``b=8`` for a batch size in process."""
        if self.kind is ConfigurationKind.IN_PROCESS:
            return f"b={point.batch_size}"
        return f"c={point.concurrency}"

    @property
    def peak(self) -> BenchPoint | None:
        """The point with the highest throughput."""
        return max(self.points, key=lambda point: point.posts_per_s, default=None)

    def point(self, *, concurrency: int = 1, batch_size: int = 1) -> BenchPoint | None:
        return next(
            (p for p in self.points if p.concurrency == concurrency and p.batch_size == batch_size),
            None,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind.value,
            "description": self.description,
            "max_abs_diff": self.max_abs_diff,
            "mean_cosine_to_torch_fp32": self.mean_cosine_to_torch_fp32,
            "points": [point.to_dict() for point in self.points],
        }


@dataclass(frozen=True, kw_only=True)
class MachineInfo:
    cpu_model: str
    cores: int
    """CPUs this process may run on."""
    platform: str
    python: str
    onnxruntime: str
    load_average_before: tuple[float, float, float]
    load_average_after: tuple[float, float, float] = (math.nan, math.nan, math.nan)
    """1/5/15-minute load averages: a load above ``cores`` before a run means other work shared the CPUs."""

    @classmethod
    def current(cls) -> MachineInfo:
        import onnxruntime

        return cls(
            cpu_model=cpu_model(),
            cores=available_cores(),
            platform=platform.platform(),
            python=platform.python_version(),
            onnxruntime=onnxruntime.__version__,
            load_average_before=os.getloadavg(),
        )

    def describe(self) -> str:
        return f"{self.cpu_model}, {self.cores} cores"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True, kw_only=True)
class TargetCheck:
    """One of the issue's targets, as measured (shown, never asserted)."""

    name: str
    measured: float
    target: float
    higher_is_better: bool
    detail: str
    decimals: int = 2
    """Decimals shown (a cosine of 0.9996 is not 1.00)."""

    @property
    def measured_text(self) -> str:
        return f"{self.measured:.{self.decimals}f} ({self.detail})"

    @property
    def goal_text(self) -> str:
        return f"{'≥' if self.higher_is_better else '≤'} {self.target:.2f}"

    @property
    def met(self) -> bool:
        if math.isnan(self.measured):
            return False
        return self.measured >= self.target if self.higher_is_better else self.measured <= self.target


@dataclass(frozen=True, kw_only=True)
class ServingBenchReport:
    machine: MachineInfo
    repository: str
    precision: str
    """What the exported models compute in (``fp32``, ``int8``), from the repository's weights manifest."""
    models: str
    """Which models: ``random full-size``, ``pretrained`` ..."""
    serving: dict[str, dict[str, Any]]
    """Each model's scheduling as configured (instances, batching, threads), by model name."""
    corpus_posts: int
    configurations: list[ConfigurationResult]
    workload: str = ""
    """Which posts were sent (``Workload.label``); empty in reports written before workloads were named."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Configurations not measured, and why."""
    thread_policies: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    """When thread policies were compared: each policy's server's scheduling (as ``serving``), by policy."""
    started: str = ""
    seconds: float = 0.0

    def configuration(self, name: str) -> ConfigurationResult | None:
        return next((c for c in self.configurations if c.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "machine": asdict(self.machine),
            "repository": self.repository,
            "precision": self.precision,
            "models": self.models,
            "serving": self.serving,
            "corpus_posts": self.corpus_posts,
            "workload": self.workload,
            "started": self.started,
            "seconds": self.seconds,
            "skipped": self.skipped,
            "thread_policies": self.thread_policies,
            "configurations": [c.to_dict() for c in self.configurations],
        }
