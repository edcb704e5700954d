"""The serving benchmark: the load generator on its own, and a tiny sweep against a real server.

No timing is asserted (the machine decides those); the tests check that the benchmark
measures what it says (warm-up excluded, concurrency held, errors counted), that the
configurations agree on the embeddings, and that the JSON and the plot are written.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from postsim.bench.baselines import Baseline, BaselineSettings
from postsim.bench.cpu import cpu_ms_per_post
from postsim.bench.report import JSON_NAME, PLOT_NAME, format_markdown, format_report, target_checks, write_outputs
from postsim.bench.results import (
    ORT_IN_PROCESS,
    TORCH_EAGER,
    TRITON_POST_EMBEDDING,
    TRITON_SIMILAR_POSTS,
    TRITON_VIDEO_POSTS,
    BenchPoint,
    ConfigurationKind,
    ConfigurationResult,
    LatencyStats,
    MachineInfo,
    ServingBenchReport,
    thread_policy_configuration,
)
from postsim.bench.serving import (
    ServingBenchSettings,
    SweepSettings,
    VideoWorkloadSettings,
    run_level,
    run_serving_benchmark,
    scratch_repository,
    serving_summary,
)
from postsim.bench.workload import BenchPost, Workload
from postsim.cli.main import app
from postsim.core.errors import BenchError, ServerError
from postsim.corpus.sample_videos import VideoSpec
from postsim.export.triton_config import DEFAULT_THREAD_POLICY, ServingSettings, ThreadPolicy, apply_serving_settings
from postsim.model_repository import contract

TINY_CLIP = VideoSpec(size=(64, 48), frame_rate=4, frames=16, keyframe_interval=4)
"""The video workload's clip in tests: 4 s, encoded in milliseconds."""

POSTS = [BenchPost(id=f"p{i}", image=b"", text=f"post {i}") for i in range(5)]


def test_latency_stats_are_percentiles_in_ms() -> None:
    stats = LatencyStats.of([i / 1000 for i in range(1, 101)])
    assert stats.count == 100
    assert stats.p50_ms == pytest.approx(50.5)
    assert stats.p50_ms <= stats.p95_ms <= stats.p99_ms <= stats.max_ms == pytest.approx(100)
    assert math.isnan(LatencyStats.of([]).p50_ms)


def test_run_level_holds_concurrency_and_skips_warmup() -> None:
    sent: list[str] = []
    in_flight = 0
    most_in_flight = 0

    async def send(post: BenchPost) -> np.ndarray:
        nonlocal in_flight, most_in_flight
        sent.append(post.id)
        in_flight += 1
        most_in_flight = max(most_in_flight, in_flight)
        await asyncio.sleep(0.001)
        in_flight -= 1
        return np.zeros(4, np.float32)

    point, embeddings = asyncio.run(run_level(send, POSTS, concurrency=3, requests=10, warmup=2))
    assert most_in_flight == 3
    assert point.requests == 10 and point.errors == 0 and point.latency.count == 10
    # warm-up is at least the concurrency (3 requests), then 10 measured, then the cool-down ones
    assert len(sent) >= 13
    assert sent[:13] == [POSTS[i % len(POSTS)].id for i in range(13)]
    assert set(embeddings) == {post.id for post in POSTS}
    assert point.posts_per_s > 0


def test_run_level_counts_errors() -> None:
    async def send(post: BenchPost) -> np.ndarray:
        if post.id == "p1":
            raise ServerError("refused")
        return np.zeros(4, np.float32)

    point, _ = asyncio.run(run_level(send, POSTS, concurrency=1, requests=5, warmup=0))
    assert point.errors == 1 and point.latency.count == 4 and point.first_error == "refused"
    assert point.posts == 4


def test_cpu_per_post_by_model_survives_processes_coming_and_going() -> None:
    before = {1: ("tritonserver", 1.0), 2: ("image_encoder", 5.0), 3: ("retrieval", 2.0)}
    after = {1: ("tritonserver", 1.5), 2: ("image_encoder", 9.0), 4: ("retrieval", 0.2)}  # retrieval reloaded
    assert cpu_ms_per_post(before, after, posts=10) == pytest.approx(
        {"image_encoder": 400.0, "retrieval": 20.0, "tritonserver": 50.0}
    )


def test_settings_refuse_what_cannot_run() -> None:
    with pytest.raises(BenchError, match="repository"):
        ServingBenchSettings()
    with pytest.raises(BenchError, match="concurrency"):
        SweepSettings(concurrency=(0,))
    with pytest.raises(BenchError, match="cannot benchmark"):
        ServingBenchSettings(url="localhost:1", ensembles=("fuser",))
    with pytest.raises(BenchError, match="leave out the URL"):
        ServingBenchSettings(url="localhost:1", thread_policies=(ThreadPolicy.ONE,))
    with pytest.raises(BenchError, match="repeat"):
        ServingBenchSettings(repository=Path("repo"), thread_policies=(ThreadPolicy.ONE, ThreadPolicy.ONE))


def test_thread_policies_are_serving_settings() -> None:
    assert ServingSettings().intra_op_threads == DEFAULT_THREAD_POLICY.intra_op_threads
    base = ServingSettings(instances={contract.IMAGE_ENCODER: 3}, intra_op_spinning=True)
    image_two = base.with_thread_policy(ThreadPolicy.IMAGE_TWO)
    assert image_two.instances == base.instances and not image_two.intra_op_spinning
    assert image_two.session_parameters(contract.IMAGE_ENCODER)["intra_op_threads"] == "2"
    assert image_two.session_parameters(contract.TEXT_ENCODER)["intra_op_threads"] == "1"
    both = base.with_thread_policy(ThreadPolicy.ENCODERS_TWO)
    assert both.session_parameters(contract.TEXT_ENCODER)["intra_op_threads"] == "2"
    assert both.session_parameters(contract.FUSER)["intra_op_threads"] == "1"


def _point(p50_ms: float, *, concurrency: int = 1, batch_size: int = 1) -> BenchPoint:
    latency = LatencyStats(count=10, p50_ms=p50_ms, p95_ms=p50_ms, p99_ms=p50_ms, mean_ms=p50_ms, max_ms=p50_ms)
    seconds = 10 * p50_ms / 1e3 / concurrency
    return BenchPoint(
        concurrency=concurrency, batch_size=batch_size, requests=10, errors=0, seconds=seconds, latency=latency
    )


def _report(precision: str, *, torch_ms: float, triton_ms: float, cosine: float) -> ServingBenchReport:
    def configuration(name: str, points: list[BenchPoint], **extra: Any) -> ConfigurationResult:
        kind = ConfigurationKind.TRITON if name.startswith("Triton") else ConfigurationKind.IN_PROCESS
        return ConfigurationResult(name=name, kind=kind, description="", points=points, **extra)

    return ServingBenchReport(
        machine=MachineInfo.current(),
        repository="repo",
        precision=precision,
        models="random",
        serving={},
        corpus_posts=10,
        configurations=[
            configuration(ORT_IN_PROCESS, [_point(50.0), _point(300.0, batch_size=8)]),
            configuration(TORCH_EAGER, [_point(torch_ms)]),
            configuration(
                TRITON_POST_EMBEDDING,
                [_point(triton_ms), _point(triton_ms, concurrency=4)],
                mean_cosine_to_torch_fp32=cosine,
            ),
        ],
    )


def test_speed_up_is_checked_for_every_thread_policy() -> None:
    single = _report("int8", torch_ms=135.0, triton_ms=30.0, cosine=0.995)
    ort, torch_eager, triton = single.configurations
    policies = {"one": 45.0, "image-two": 30.0}
    report = replace(
        single,
        configurations=[
            ort,
            torch_eager,
            *(
                replace(triton, name=thread_policy_configuration(name), points=[_point(ms)])
                for name, ms in policies.items()
            ),
        ],
        thread_policies={name: {} for name in policies},
    )
    speed_ups = [check for check in target_checks(report) if check.name.startswith("speed-up")]
    assert [check.measured for check in speed_ups] == pytest.approx([3.0, 4.5])
    assert "threads image-two" in speed_ups[1].name and speed_ups[1].met and not speed_ups[0].met
    latency = next(check for check in target_checks(report) if check.name.startswith("latency"))
    assert latency.measured == pytest.approx(45.0 / 50.0)  # the first policy's
    table = format_markdown(report)
    assert "| c | one: p50 / p99 ms, posts/s | image-two: p50 / p99 ms, posts/s |" in table
    assert "| 1 | 45.0 / 45.0, 22.22 | 30.0 / 30.0, 33.33 |" in table


def test_quantised_repository_is_checked_for_speed_up_and_agreement_with_torch_fp32() -> None:
    checks = {
        check.name.split(":")[0]: check
        for check in target_checks(_report("int8", torch_ms=135.0, triton_ms=30.0, cosine=0.995))
    }
    assert set(checks) == {"latency", "throughput", "speed-up", "agreement"}
    assert checks["speed-up"].measured == pytest.approx(4.5) and checks["speed-up"].met
    assert checks["agreement"].measured == 0.995 and checks["agreement"].met
    slow = {
        check.name.split(":")[0]: check
        for check in target_checks(_report("int8", torch_ms=135.0, triton_ms=40.0, cosine=0.98))
    }
    assert not slow["speed-up"].met and not slow["agreement"].met
    fp32 = target_checks(_report("fp32", torch_ms=135.0, triton_ms=30.0, cosine=1.0))
    assert {check.name.split(":")[0] for check in fp32} == {"latency", "throughput"}


def test_the_notes_bound_the_c1_speed_up_by_the_server_cpu_spread_over_every_core() -> None:
    report = _report("int8", torch_ms=300.0, triton_ms=130.0, cosine=0.999)
    ort, torch_eager, triton = report.configurations
    busy, lean = (replace(_point(130.0), cpu_ms_per_post=cpu) for cpu in (210.0, 190.0))
    report = replace(
        report,
        machine=replace(report.machine, cores=2),
        configurations=[
            ort,
            torch_eager,
            replace(triton, name=thread_policy_configuration("one"), points=[lean]),
            replace(triton, name=thread_policy_configuration("image-two"), points=[busy]),
        ],
        thread_policies={"one": {}, "image-two": {}},
    )
    bound = next(line for line in format_markdown(report).splitlines() if "c=1 bound" in line)
    # the leanest configuration's 190 ms of CPU over 2 cores: 95 ms, so at most 300 / 95
    assert "at least 190 ms of CPU" in bound and "at least 95 ms" in bound and "at most 3.16" in bound
    without_cpu = _report("int8", torch_ms=300.0, triton_ms=130.0, cosine=0.999)
    assert "c=1 bound" not in format_markdown(without_cpu)


def test_serving_settings_rewrite_only_the_scratch_copy(exported_repository: Any, tmp_path: Path) -> None:
    original = serving_summary(exported_repository.path)
    copy = scratch_repository(exported_repository.path, tmp_path / "copy")
    serving = ServingSettings(
        max_queue_delay_us=500,
        preferred_batch_sizes=(2, 32),
        instances={"image_encoder": 2},
        intra_op_threads={"text_encoder": 1},
        intra_op_spinning=True,
    )
    apply_serving_settings(copy, serving)
    summary = serving_summary(copy)
    assert summary["image_encoder"]["instances"] == 2
    assert summary["text_encoder"]["intra_op_threads"] == 1
    assert summary["text_encoder"]["intra_op_spinning"] is True
    assert original["text_encoder"]["intra_op_spinning"] is False
    assert summary["fuser"]["max_queue_delay_us"] == 500
    assert summary["fuser"]["preferred_batch_sizes"] == [2]  # 32 is above max_batch_size
    assert serving_summary(exported_repository.path) == original  # hard links were not written through


@pytest.mark.integration
def test_tiny_sweep_writes_json_and_plot(exported_repository: Any, tmp_path: Path) -> None:
    settings = ServingBenchSettings(
        repository=exported_repository.path,
        work_dir=tmp_path / "work",
        posts=8,
        sweep=SweepSettings(concurrency=(1, 2), requests=6, warmup=2),
        baselines=BaselineSettings(batch_sizes=(1, 8), posts=8, warmup_posts=1),
        video=VideoWorkloadSettings(clips=1, requests=2, concurrency=(1,), spec=TINY_CLIP),
    )
    report = run_serving_benchmark(settings, torch_models=exported_repository.models)

    names = [configuration.name for configuration in report.configurations]
    assert names == [ORT_IN_PROCESS, TORCH_EAGER, TRITON_POST_EMBEDDING, TRITON_SIMILAR_POSTS, TRITON_VIDEO_POSTS]
    *images, videos = report.configurations
    (video_point,) = videos.points
    assert video_point.errors == 0 and video_point.requests == 2, video_point.first_error
    assert videos.max_abs_diff is None  # no in-process baseline of video posts
    if sys.platform == "linux":
        video_cpu, image_cpu = (
            video_point.cpu_ms_per_post_by_model,
            report.configurations[2].points[0].cpu_ms_per_post_by_model,
        )
        assert video_cpu["image_encoder"] > image_cpu["image_encoder"]  # 8 frames against 1
        assert "preprocess_image" in video_cpu
    for configuration in images:
        assert configuration.max_abs_diff is not None and configuration.max_abs_diff < 1e-3, configuration.name
        if configuration.kind is ConfigurationKind.TRITON:
            assert configuration.mean_cosine_to_torch_fp32 is not None
            assert configuration.mean_cosine_to_torch_fp32 > 0.999, configuration.name
        for point in configuration.points:
            assert point.errors == 0, point.first_error
            assert 0 < point.latency.p50_ms <= point.latency.p95_ms <= point.latency.p99_ms
            assert point.posts_per_s > 0
    assert [p.concurrency for p in report.configurations[2].points] == [1, 2]
    if sys.platform == "linux":  # CPU time comes from /proc
        by_model = report.configurations[2].points[0].cpu_ms_per_post_by_model
        assert {"image_encoder", "text_encoder", "fuser", "tritonserver"} <= set(by_model)
        assert all(value >= 0 for value in by_model.values())
    assert report.precision == "fp32" and report.serving["image_encoder"]["instances"] >= 1

    outputs = write_outputs(report, tmp_path / "out")
    assert outputs.json.name == JSON_NAME and outputs.plot.name == PLOT_NAME
    data = json.loads(outputs.json.read_text())
    assert data["machine"]["cores"] >= 1
    assert {target["name"].split(":")[0] for target in data["targets"]} == {"latency", "throughput"}
    assert data["configurations"][2]["points"][0]["posts_per_s"] > 0
    assert outputs.plot.read_bytes().startswith(b"\x89PNG")

    console = Console(record=True, width=200)
    console.print(format_report(report))
    text = console.export_text()
    assert TRITON_SIMILAR_POSTS in text and "video posts at c=1: p50" in text
    assert report.workload == Workload.PHOTOS.label and data["workload"] == report.workload
    assert "posts of the photo workload" in text
    assert "| Triton post_embedding | c=1 |" in format_markdown(report)


@pytest.mark.integration
def test_thread_policies_each_get_a_server_configured_as_asked(exported_repository: Any, tmp_path: Path) -> None:
    policies = tuple(ThreadPolicy)
    settings = ServingBenchSettings(
        repository=exported_repository.path,
        work_dir=tmp_path / "work",
        posts=4,
        ensembles=(contract.POST_EMBEDDING,),
        sweep=SweepSettings(concurrency=(1, 2), requests=3, warmup=1),
        baselines=BaselineSettings(baselines=(Baseline.ORT,), batch_sizes=(1,), posts=4, warmup_posts=1),
        video=VideoWorkloadSettings(clips=0),
        thread_policies=policies,
    )
    report = run_serving_benchmark(settings)

    assert list(report.thread_policies) == [policy.value for policy in policies]
    for policy in policies:
        # what the server served is read back from its own copy's configs
        summary = report.thread_policies[policy.value]
        for model, threads in policy.intra_op_threads.items():
            assert summary[model]["intra_op_threads"] == threads, (policy, model)
            assert summary[model]["intra_op_spinning"] is False
            assert summary[model]["lone_post_threads"] == policy.lone_post_threads.get(model, 0), (policy, model)
        configuration = report.configuration(thread_policy_configuration(policy.value))
        assert configuration is not None
        assert [point.concurrency for point in configuration.points] == [1, 2]
        assert all(point.errors == 0 for point in configuration.points), configuration.points[0].first_error
        assert configuration.max_abs_diff is not None and configuration.max_abs_diff < 1e-3
        # at c=1 a post is the server's only call: under lone-post image_encoder runs it on its two-thread session
        log = (tmp_path / "work" / f"tritonserver-{policy.value}.log").read_text()
        widened = f"{contract.IMAGE_ENCODER}: the server's only call ran on the wider session" in log
        assert widened is (policy is ThreadPolicy.LONE_POST), policy
    assert report.configuration(TRITON_POST_EMBEDDING) is None
    assert report.serving == report.thread_policies[policies[0].value]
    console = Console(record=True, width=250)
    console.print(format_report(report))
    text = console.export_text()
    assert "post_embedding by thread policy" in text
    assert thread_policy_configuration(policies[-1].value) in text


@pytest.mark.parametrize("command", ["serve", "soak"])
def test_bench_serve_and_soak_refuse_an_unknown_workload(command: str) -> None:
    result = CliRunner().invoke(app, ["bench", command, "--workload", "cats", "--url", "localhost:1"])
    assert result.exit_code == 2
    assert "'cats' is not one of photos, legacy" in result.output


def test_bench_serve_refuses_an_unknown_thread_policy() -> None:
    result = CliRunner().invoke(app, ["bench", "serve", "--thread-policy", "many", "--url", "localhost:1"])
    assert result.exit_code == 2
    message = " ".join(result.output.replace("│", " ").split())  # rich wraps the error in a box
    assert "'many' is not one of one, image-two, encoders-two" in message
