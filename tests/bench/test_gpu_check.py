"""The GPU check's dry run: every path of the check on the CPU, so it works the day a GPU comes.

No figure is asserted (tiny models on a CPU say nothing about a GPU); the tests check that
each section measures what it says, that the results are written, and the exit statuses.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import onnxruntime
import pytest
import torch

from postsim.bench.gpu_check import (
    DRY_ENV,
    JSON_NAME,
    MARKDOWN_NAME,
    GpuCheckError,
    GpuCheckReport,
    GpuCheckSettings,
    Section,
    main,
    run_gpu_check,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dry_report() -> GpuCheckReport:
    return run_gpu_check(GpuCheckSettings.dry())


def test_the_dry_run_takes_every_path_of_the_check(dry_report: GpuCheckReport) -> None:
    settings = GpuCheckSettings.dry()
    assert dry_report.errors == []
    measured = {(p.section, p.model, p.runtime, p.dtype, p.batch) for p in dry_report.points}
    for dtype in settings.dtypes:
        for model in ("image_encoder", "text_encoder"):
            for runtime in ("PyTorch eager", "PyTorch CUDA graph"):
                for batch in settings.batch_sizes:
                    assert (Section.ENCODERS.value, model, runtime, dtype, batch) in measured
    searched = {(p.runtime, p.batch) for p in dry_report.points if p.section == Section.SEARCH.value}
    assert searched == {
        (runtime, batch) for runtime in ("PyTorch matmul + topk", "PyTorch CUDA graph") for batch in (1, 64)
    }
    assert {p.batch for p in dry_report.points if p.section == Section.FAISS.value} == {1, 64}
    onnx = {(p.model, p.batch) for p in dry_report.points if p.section == Section.ONNXRUNTIME.value}
    assert onnx == {
        (model, batch) for model in ("image_encoder", "text_encoder") for batch in settings.onnx_batch_sizes
    }
    assert all(p.calls >= settings.min_calls and p.p50_ms > 0 and p.per_s > 0 for p in dry_report.points)


def test_reduced_precision_is_checked_against_fp32(dry_report: GpuCheckReport) -> None:
    agreement = dry_report.agreement
    for dtype in ("fp16", "bf16"):
        for model in ("image_encoder", "text_encoder"):
            assert 0.99 < agreement[f"{model} {dtype} min cosine to fp32"] <= 1.0 + 1e-6
    assert agreement["fp16 exact search recall@10 against fp32"] >= 0.9


def test_the_environment_says_what_is_present(dry_report: GpuCheckReport) -> None:
    environment = dry_report.environment
    assert environment["torch"] == torch.__version__
    assert environment["onnxruntime"].startswith(onnxruntime.__version__)
    assert environment["faiss"] is not None  # faiss-cpu is a dependency of postsim


def test_a_spent_budget_skips_what_is_left_and_says_so() -> None:
    report = run_gpu_check(replace(GpuCheckSettings.dry(), budget_s=1e-9))
    assert report.points == [] and report.errors == []
    assert any(item.startswith("encoders:") and "time budget" in item for item in report.skipped)
    assert any(item.startswith("exact search:") for item in report.skipped)


def test_without_a_gpu_it_refuses_unless_dry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(DRY_ENV, raising=False)
    with pytest.raises(GpuCheckError, match="--dry-run"):
        run_gpu_check(GpuCheckSettings())
    assert main(["--out", str(tmp_path)]) == 2
    assert not (tmp_path / JSON_NAME).exists()


def test_settings_that_make_no_sense_are_refused() -> None:
    with pytest.raises(GpuCheckError, match="fp8"):
        GpuCheckSettings(dtypes=("fp16", "fp8"))
    with pytest.raises(GpuCheckError, match="batch sizes"):
        GpuCheckSettings(batch_sizes=(0, 4))


@pytest.mark.slow
def test_the_wrapper_runs_it_from_the_tree_and_writes_one_folder(tmp_path: Path) -> None:
    """bench/gpu_check.sh as on a GPU machine without postsim installed (dry through the environment)."""
    env = {**os.environ, "PYTHON": sys.executable, DRY_ENV: "1"}
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--out", str(tmp_path / "gpu")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(path.name for path in (tmp_path / "gpu").iterdir()) == [JSON_NAME, MARKDOWN_NAME]
    results = json.loads((tmp_path / "gpu" / JSON_NAME).read_text())
    assert results["settings"]["dry_run"] is True and results["errors"] == []
    assert all(math.isfinite(point["per_s"]) for point in results["points"])
    summary = (tmp_path / "gpu" / MARKDOWN_NAME).read_text()
    for section in ("## encoders", "## exact search", "## onnxruntime", "## faiss", "## Agreement"):
        assert section in summary
    assert "| image_encoder | PyTorch CUDA graph | fp16 |" in summary
    assert summary in done.stdout
    assert done.stderr.count("image_encoder PyTorch eager") == 4  # progress: a line per point (2 dtypes × 2 batches)
