"""``postsim bench front-end``: the latency postsim's front end adds to a request.

One client sends ``post_embedding`` requests one at a time (concurrency 1) alternately
through the front end (the public gRPC port) and straight to tritonserver (its private
unix socket, with its per-start key), so both see the same server and the same load on
the machine; the p50 difference is what the front end costs a request.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from postsim.bench.serving import loopback_settings, scratch_repository
from postsim.bench.workload import load_bench_posts, write_bench_corpus
from postsim.client.core import build_inputs
from postsim.core.errors import BenchError
from postsim.model_repository import contract
from postsim.model_repository.manifest import WeightsManifest
from postsim.model_repository.protocol import GRPC_INTERNAL_HEADER
from postsim.server.launcher import TritonServer


@dataclass(frozen=True, kw_only=True)
class FrontEndLatency:
    requests: int
    """Measured requests on each path."""
    through_front_end_ms: tuple[float, float]
    """p50 and p99."""
    direct_ms: tuple[float, float]
    models: str

    @property
    def added_p50_ms(self) -> float:
        return self.through_front_end_ms[0] - self.direct_ms[0]


def measure_front_end(repository: Path, *, requests: int = 300, warmup: int = 20, posts: int = 16) -> FrontEndLatency:
    """p50/p99 of ``post_embedding`` at concurrency 1, through the front end and straight to tritonserver."""
    if requests < 1 or warmup < 0 or posts < 1:
        raise BenchError(f"requests and posts must be at least 1, warmup at least 0; got {requests}, {warmup}, {posts}")
    with contextlib.ExitStack() as stack:
        work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="postsim-front-end-")))
        served = scratch_repository(repository.resolve(), work_dir / "repository")
        corpus = load_bench_posts(write_bench_corpus(posts, work_dir / "corpus"))
        server = stack.enter_context(TritonServer(loopback_settings(served), log_path=work_dir / "tritonserver.log"))
        upstream = server.internal.upstream()
        through = stack.enter_context(grpcclient.InferenceServerClient(server.endpoints.grpc))
        direct = stack.enter_context(grpcclient.InferenceServerClient(upstream.grpc))
        paths = {
            "front end": (through, None),
            "direct": (direct, {GRPC_INTERNAL_HEADER: upstream.key}),
        }
        timings: dict[str, list[float]] = {name: [] for name in paths}
        inputs = [build_inputs([post.to_post()]) for post in corpus]
        for index in range(warmup + requests):
            for name, (client, headers) in paths.items():
                started = time.perf_counter()
                client.infer(contract.POST_EMBEDDING, inputs[index % len(inputs)], headers=headers)
                if index >= warmup:
                    timings[name].append((time.perf_counter() - started) * 1000)
        manifest = WeightsManifest.read(served)
    return FrontEndLatency(
        requests=requests,
        through_front_end_ms=_p50_p99(timings["front end"]),
        direct_ms=_p50_p99(timings["direct"]),
        models=f"{manifest.provenance.get('size', 'full')} models, {manifest.precision}",
    )


def _p50_p99(values: list[float]) -> tuple[float, float]:
    p50, p99 = np.percentile(values, [50, 99])
    return float(p50), float(p99)


def format_front_end(result: FrontEndLatency) -> str:
    return "\n".join(
        [
            f"post_embedding at concurrency 1, {result.requests} requests on each path, alternating ({result.models}):",
            "",
            "| path | p50 ms | p99 ms |",
            "|---|---:|---:|",
            f"| through the front end | {result.through_front_end_ms[0]:.2f} | {result.through_front_end_ms[1]:.2f} |",
            f"| straight to tritonserver | {result.direct_ms[0]:.2f} | {result.direct_ms[1]:.2f} |",
            "",
            f"The front end adds {result.added_p50_ms:.2f} ms at p50.",
        ]
    )
