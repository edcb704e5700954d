"""postsim bench training on tiny backbones: both stages are measured and the settings are checked."""

from __future__ import annotations

import pytest

from postsim.bench.training_bench import TrainingBenchSettings, format_training_bench, run_training_benchmark
from postsim.core.errors import BenchError
from postsim.models.settings import ModelSize


def test_extraction_and_epochs_are_measured() -> None:
    settings = TrainingBenchSettings(posts=3, epoch_posts=300, epochs=2, threads=1, size=ModelSize.TINY)
    report = run_training_benchmark(settings)
    assert report.extraction.posts == 3 and report.extraction.computed["image"] == 3  # nothing from a cache
    assert len(report.epoch_seconds) == 2 and min(report.epoch_seconds) > 0
    text = format_training_bench(report)
    assert "3 posts in" in text and "300 posts, 2048+768 wide, 1 threads" in text


def test_nonsense_settings_are_refused() -> None:
    with pytest.raises(BenchError, match="at least 1"):
        TrainingBenchSettings(threads=0)
