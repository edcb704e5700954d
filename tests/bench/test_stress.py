"""``postsim bench stress`` on a real server: what took Triton 2.51 down, all at once, on a busy CPU.

Index builds, publish/rollback cycles and 10 ms-deadline storms run together against a
server while processes spin on every core; tritonserver must neither crash nor stay not
ready. ``POSTSIM_STRESS_S`` sets how long (README reports a 5-minute run:
``postsim bench stress --duration 300``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from postsim.bench.stress import StressSettings, format_stress, run_stress
from postsim.core.errors import BenchError


@pytest.mark.integration
@pytest.mark.slow
def test_builds_publishes_rollbacks_and_deadline_storms_on_a_busy_cpu(exported_repository: Any, tmp_path: Path) -> None:
    duration_s = float(os.environ.get("POSTSIM_STRESS_S", "60"))
    settings = StressSettings(repository=exported_repository.path, duration_s=duration_s, work_dir=tmp_path)
    report = run_stress(settings)
    summary = format_stress(report)
    assert report.ok, summary
    assert report.builds >= 1 and report.publishes >= 2 and report.rollbacks >= 1, summary
    assert report.storm["DEADLINE_EXCEEDED"] > 0, summary  # the storm ran
    assert "no crash, no stuck readiness" in summary


def test_stress_settings_refuse_what_cannot_run(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="positive duration"):
        StressSettings(repository=tmp_path, duration_s=0)
    with pytest.raises(BenchError, match="storm rate"):
        StressSettings(repository=tmp_path, storm_rate=0)
