"""What the serving benchmark shows: a terminal table, a JSON file, a markdown table and a plot.

Library code formats; the CLI prints. :func:`format_report` returns a rich renderable,
:func:`write_outputs` writes ``serving-bench.json`` and ``serving-bench.png`` (p50 latency
against throughput, one line per configuration). The issue's targets are computed by
:func:`target_checks` and shown, never asserted: they depend on the machine.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from postsim.bench.results import (
    ORT_IN_PROCESS,
    TORCH_EAGER,
    TRITON_POST_EMBEDDING,
    TRITON_VIDEO_POSTS,
    BenchPoint,
    ConfigurationResult,
    ServingBenchReport,
    TargetCheck,
    thread_policy_configuration,
)
from postsim.core.files import write_text_atomic
from postsim.evaluation.figures import save_figure

logger = logging.getLogger("postsim")

LATENCY_TARGET = 1.15
"""Triton post_embedding p50 at concurrency 1, at most this times the in-process ORT p50 at batch 1."""
THROUGHPUT_TARGET = 0.85
"""Peak Triton post_embedding throughput, at least this times in-process ORT throughput at batch 8."""
QUANTISED_SPEEDUP_TARGET = 4.0
"""A quantised repository: Triton post_embedding p50 at c=1 at least this many times below PyTorch eager fp32 at batch 1."""
QUANTISED_COSINE_TARGET = 0.99
"""A quantised repository: mean cosine of the served embeddings to PyTorch eager fp32's, at least this."""
JSON_NAME = "serving-bench.json"
PLOT_NAME = "serving-bench.png"


@dataclass(frozen=True)
class BenchOutputs:
    json: Path
    plot: Path


def post_embedding_configurations(report: ServingBenchReport) -> list[ConfigurationResult]:
    """``post_embedding``'s image-post configurations: the one server's, or one per thread policy compared."""
    single = report.configuration(TRITON_POST_EMBEDDING)
    if single is not None:
        return [single]
    names = [thread_policy_configuration(policy) for policy in report.thread_policies]
    return [c for c in (report.configuration(name) for name in names) if c is not None]


def target_checks(report: ServingBenchReport) -> list[TargetCheck]:
    """The issue's targets (latency, throughput; speed-up and agreement when quantised), as far as the report holds them.

    With thread policies compared, the latency, throughput and agreement targets are checked
    on the first policy's configuration, and the speed-up on every policy's.
    """
    served = post_embedding_configurations(report)
    ort = report.configuration(ORT_IN_PROCESS)
    if not served or ort is None:
        return []
    triton = served[0]
    checks = []
    triton_c1, ort_b1 = triton.point(concurrency=1), ort.point(batch_size=1)
    if triton_c1 is not None and ort_b1 is not None:
        checks.append(
            TargetCheck(
                name="latency: Triton post_embedding p50 at c=1 / ORT in-process p50 at batch 1",
                measured=_ratio(triton_c1.latency.p50_ms, ort_b1.latency.p50_ms),
                target=LATENCY_TARGET,
                higher_is_better=False,
                detail=f"{triton_c1.latency.p50_ms:.1f} ms / {ort_b1.latency.p50_ms:.1f} ms",
            )
        )
    triton_peak, ort_b8 = triton.peak, ort.point(batch_size=8)
    if triton_peak is not None and ort_b8 is not None:
        checks.append(
            TargetCheck(
                name="throughput: peak Triton post_embedding / ORT in-process at batch 8",
                measured=_ratio(triton_peak.posts_per_s, ort_b8.posts_per_s),
                target=THROUGHPUT_TARGET,
                higher_is_better=True,
                detail=f"{triton_peak.posts_per_s:.2f} posts/s ({triton.label(triton_peak)}) / {ort_b8.posts_per_s:.2f} posts/s",
            )
        )
    return checks + _quantised_checks(report, served)


def _quantised_checks(report: ServingBenchReport, served: list[ConfigurationResult]) -> list[TargetCheck]:
    """For an int8 or fp16 repository: the speed-up over PyTorch eager fp32 at c=1 (of each configuration in
    ``served``), and the agreement it costs (of the first)."""
    torch_eager = report.configuration(TORCH_EAGER)
    if report.precision == "fp32" or torch_eager is None:
        return []
    checks = []
    torch_b1 = torch_eager.point(batch_size=1)
    for configuration in served:
        triton_c1 = configuration.point(concurrency=1)
        if triton_c1 is None or torch_b1 is None:
            continue
        checks.append(
            TargetCheck(
                name=f"speed-up: PyTorch eager fp32 p50 at batch 1 / {configuration.name} ({report.precision}) p50 at c=1",
                measured=_ratio(torch_b1.latency.p50_ms, triton_c1.latency.p50_ms),
                target=QUANTISED_SPEEDUP_TARGET,
                higher_is_better=True,
                detail=f"{torch_b1.latency.p50_ms:.1f} ms / {triton_c1.latency.p50_ms:.1f} ms",
            )
        )
    triton = served[0]
    if triton.mean_cosine_to_torch_fp32 is not None:
        checks.append(
            TargetCheck(
                name=f"agreement: mean cosine of Triton post_embedding ({report.precision}) to PyTorch eager fp32",
                measured=triton.mean_cosine_to_torch_fp32,
                target=QUANTISED_COSINE_TARGET,
                higher_is_better=True,
                detail=f"{report.corpus_posts} posts",
                decimals=4,
            )
        )
    return checks


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def report_dict(report: ServingBenchReport) -> dict[str, Any]:
    """The report as JSON-ready data, with the target checks."""
    checks = [{**asdict(check), "met": check.met} for check in target_checks(report)]
    return {**report.to_dict(), "targets": checks}


def write_json(report: ServingBenchReport, path: Path) -> Path:
    write_text_atomic(path, json.dumps(report_dict(report), indent=2, allow_nan=True) + "\n")
    return path


def write_plot(report: ServingBenchReport, path: Path) -> Path:
    """p50 latency per call against throughput, one line per configuration, each point labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 5.5))
    for configuration in report.configurations:
        points = [p for p in configuration.points if p.latency.count > 0]
        if not points:
            continue
        xs = [p.posts_per_s for p in points]
        ys = [p.latency.p50_ms for p in points]
        (line,) = axes.plot(xs, ys, marker="o", label=configuration.name)
        for point, x, y in zip(points, xs, ys, strict=True):
            axes.annotate(
                configuration.label(point),
                (x, y),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
                color=line.get_color(),
            )
    axes.set_xlabel("throughput (posts/s)")
    axes.set_ylabel("p50 latency per call (ms)")
    axes.set_yscale("log")
    axes.grid(True, which="both", alpha=0.3)
    axes.set_title(f"postsim serving: {report.machine.describe()}, {report.precision}, {report.models}", fontsize=10)
    axes.legend()
    return save_figure(figure, path, dpi=120)


def write_outputs(report: ServingBenchReport, out_dir: Path) -> BenchOutputs:
    """``serving-bench.json`` and ``serving-bench.png`` in ``out_dir``."""
    outputs = BenchOutputs(json=write_json(report, out_dir / JSON_NAME), plot=write_plot(report, out_dir / PLOT_NAME))
    logger.info("wrote %s and %s", outputs.json, outputs.plot)
    return outputs


# --------------------------------------------------------------------------- tables

_COLUMNS = (
    "configuration",
    "point",
    "calls",
    "errors",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "posts/s",
    "CPU ms/post",
    "max Δ vs ORT",
)


def _row(configuration: ConfigurationResult, point: BenchPoint, first: bool) -> tuple[str, ...]:
    diff = configuration.max_abs_diff
    return (
        configuration.name if first else "",
        configuration.label(point),
        str(point.requests),
        str(point.errors),
        f"{point.latency.p50_ms:.1f}",
        f"{point.latency.p95_ms:.1f}",
        f"{point.latency.p99_ms:.1f}",
        f"{point.posts_per_s:.2f}",
        _cpu(point),
        ("-" if diff is None else f"{diff:.1e}") if first else "",
    )


def _cpu(point: BenchPoint) -> str:
    if point.cpu_ms_per_post is None:
        return "-"
    client = f" +{point.client_cpu_ms_per_post:.0f}" if point.client_cpu_ms_per_post is not None else ""
    return f"{point.cpu_ms_per_post:.0f}{client}"


def _rows(report: ServingBenchReport) -> list[tuple[str, ...]]:
    return [
        _row(configuration, point, index == 0)
        for configuration in report.configurations
        for index, point in enumerate(configuration.points)
    ]


def _title(report: ServingBenchReport) -> str:
    return (
        f"postsim serving benchmark: {report.machine.describe()}, {report.precision}, {report.models}, "
        f"{report.corpus_posts} posts" + (f" of the {report.workload}" if report.workload else "")
    )


def _notes(report: ServingBenchReport) -> list[str]:
    notes = [f"{name}: skipped ({why})" for name, why in report.skipped.items()]
    before, after = report.machine.load_average_before[0], report.machine.load_average_after[0]
    notes.append("CPU ms/post: the server's processes (+ the load generator's) or this process's, all threads")
    notes.append(f"load average (1 min) before {before:.2f}, after {after:.2f} on {report.machine.cores} cores")
    if before > 0.5 * report.machine.cores:
        notes.append("the CPUs were busy before the run started: other work may have slowed it")
    return notes + _speedup_bound_notes(report) + _video_notes(report)


def _speedup_bound_notes(report: ServingBenchReport) -> list[str]:
    """How far the cores let the c=1 speed-up over PyTorch eager go: a post cannot finish sooner than
    the server's CPU time for it spread over every core, however the threads are set."""
    torch_eager = report.configuration(TORCH_EAGER)
    torch_b1 = torch_eager.point(batch_size=1) if torch_eager is not None else None
    c1_points = [point for c in post_embedding_configurations(report) if (point := c.point(concurrency=1)) is not None]
    cpu = [point.cpu_ms_per_post for point in c1_points if point.cpu_ms_per_post]
    if torch_b1 is None or not cpu:
        return []
    floor_ms = min(cpu) / report.machine.cores
    return [
        f"c=1 bound: the server spends at least {min(cpu):.0f} ms of CPU on a post, so on {report.machine.cores} "
        f"cores one post takes at least {floor_ms:.0f} ms and the speed-up over PyTorch eager fp32 "
        f"({torch_b1.latency.p50_ms:.0f} ms) is at most {_ratio(torch_b1.latency.p50_ms, floor_ms):.2f}"
    ]


def _video_notes(report: ServingBenchReport) -> list[str]:
    """Video posts against image posts of the same run, at c=1: latency, and the server's CPU split."""
    videos, served = report.configuration(TRITON_VIDEO_POSTS), post_embedding_configurations(report)
    images = served[0] if served else None
    video_c1 = videos.point(concurrency=1) if videos is not None else None
    image_c1 = images.point(concurrency=1) if images is not None else None
    if video_c1 is None or image_c1 is None:
        return []
    by_model = video_c1.cpu_ms_per_post_by_model
    split = (
        f"; server CPU per video post: decoding {by_model.get('preprocess_image', 0.0):.0f} ms (preprocess_image), "
        f"encoding {by_model.get('image_encoder', 0.0):.0f} ms (image_encoder)"
        if by_model
        else ""
    )
    return [
        f"video posts at c=1: p50 {video_c1.latency.p50_ms:.0f} ms, {video_c1.posts_per_s:.2f} posts/s, against image "
        f"posts {image_c1.latency.p50_ms:.0f} ms, {image_c1.posts_per_s:.2f} posts/s ("
        f"{_ratio(video_c1.latency.p50_ms, image_c1.latency.p50_ms):.1f}× the latency){split}"
    ]


def _cpu_breakdown(report: ServingBenchReport) -> tuple[list[str], list[list[str]]]:
    """Server CPU ms per post by model, one row per Triton configuration and concurrency."""
    models = sorted(
        {m for c in report.configurations for p in c.points for m in p.cpu_ms_per_post_by_model},
        key=lambda m: (m == "tritonserver", m),
    )
    rows = [
        [c.name, c.label(p), *(f"{p.cpu_ms_per_post_by_model.get(m, 0.0):.1f}" for m in models)]
        for c in report.configurations
        for p in c.points
        if p.cpu_ms_per_post_by_model
    ]
    return ["configuration", "point", *models], rows


def _thread_policy_table(report: ServingBenchReport) -> tuple[list[str], list[list[str]]]:
    """With thread policies compared: one row per concurrency level, p50 / p99 ms and posts/s per policy."""
    served = [c for c in post_embedding_configurations(report) if c.name != TRITON_POST_EMBEDDING]
    if len(served) < 2:
        return [], []
    levels = sorted({p.concurrency for c in served for p in c.points})
    header = ["c", *(f"{policy}: p50 / p99 ms, posts/s" for policy in report.thread_policies)]
    rows = []
    for level in levels:
        row = [str(level)]
        for configuration in served:
            point = configuration.point(concurrency=level)
            row.append(
                "-"
                if point is None
                else f"{point.latency.p50_ms:.1f} / {point.latency.p99_ms:.1f}, {point.posts_per_s:.2f}"
            )
        rows.append(row)
    return header, rows


def format_report(report: ServingBenchReport) -> RenderableType:
    """The results table, the targets and the notes, for a rich console."""
    table = Table(title=_title(report), title_justify="left")
    for column in _COLUMNS:
        table.add_column(column, justify="left" if column in ("configuration", "point") else "right")
    for configuration in report.configurations:
        for index, point in enumerate(configuration.points):
            table.add_row(*_row(configuration, point, index == 0), end_section=index == len(configuration.points) - 1)
    parts: list[RenderableType] = [table]
    header, rows = _cpu_breakdown(report)
    if rows:
        breakdown = Table(title="server CPU ms per post, by model", title_justify="left")
        for column in header:
            breakdown.add_column(column, justify="left" if column in ("configuration", "point") else "right")
        for row in rows:
            breakdown.add_row(*row)
        parts.append(breakdown)
    header, rows = _thread_policy_table(report)
    if rows:
        policies = Table(title="post_embedding by thread policy (interleaved, same run)", title_justify="left")
        for column in header:
            policies.add_column(column, justify="right")
        for row in rows:
            policies.add_row(*row)
        parts.append(policies)
    checks = target_checks(report)
    if checks:
        targets = Table(title="targets (shown, not asserted)", title_justify="left")
        for column in ("target", "measured", "goal", ""):
            targets.add_column(column)
        for check in checks:
            verdict = Text("met", style="green") if check.met else Text("missed", style="red")
            targets.add_row(check.name, check.measured_text, check.goal_text, verdict)
        parts.append(targets)
    parts += [Text(note, style="dim") for note in _notes(report)]
    return Group(*parts)


def format_markdown(report: ServingBenchReport) -> str:
    """The results and targets as markdown tables (for reports and TUNING.md)."""
    lines = [f"**{_title(report)}**", "", "| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(report)]
    header, rows = _cpu_breakdown(report)
    if rows:
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    header, rows = _thread_policy_table(report)
    if rows:
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    checks = target_checks(report)
    if checks:
        lines += ["", "| target | measured | goal | |", "|---|---|---|---|"]
        for check in checks:
            verdict = "met" if check.met else "missed"
            lines.append(f"| {check.name} | {check.measured_text} | {check.goal_text} | {verdict} |")
    lines += ["", *(f"- {note}" for note in _notes(report))]
    return "\n".join(lines)
