"""``postsim bench engines``: the exported encoders in ONNX Runtime and OpenVINO, on the same photo posts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from support import ExportedRepository
from typer.testing import CliRunner

from postsim.bench.engines import ONNX_RUNTIME, OPENVINO, EnginesReport, EngineTiming, format_engines
from postsim.cli.main import app
from postsim.model_repository import contract


def test_bench_engines_times_both_encoders_in_each_engine_and_they_agree(
    exported_repository: ExportedRepository,
) -> None:
    """Run as the command runs, in a process of its own: a test process that has loaded OpenVINO (its thread
    pools stay) crashed with SIGSEGV when a later test sent it SIGINT mid index build."""
    pytest.importorskip("openvino", reason="postsim[openvino] (in the dev extra) runs the second engine")
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("postsim")),
            "bench", "engines", "--repository", str(exported_repository.path), "--repeats", "2",
            "--threads", "1", "--threads", "2", "--batch-size", "1", "--batch-size", "3",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )  # fmt: skip
    output = result.stdout
    assert result.returncode == 0, output + result.stderr
    assert "3 photo posts" in output
    rows = re.findall(r"^\| (\w+) \| (\d) \| (\d) \| (\w+) \| ([\d.]+) \| ([\d.]*)×? \| ([\d.]+) \|$", output, re.M)
    seen = {(model, int(threads), int(batch), engine) for model, threads, batch, engine, *_ in rows}
    assert seen == {
        (model, threads, batch, engine)
        for model in (contract.IMAGE_ENCODER, contract.TEXT_ENCODER)
        for threads in (1, 2)
        for batch in (1, 3)
        for engine in (ONNX_RUNTIME, OPENVINO)
    }, output
    for model, _, _, engine, ms, _, cosine in rows:
        assert float(ms) > 0
        # the same fp32 file: any engine, thread count or batch computes the same vectors
        assert float(cosine) >= 0.999, (model, engine, cosine)


def test_an_engine_that_is_not_installed_is_named_with_what_to_install() -> None:
    timing = EngineTiming(
        model=contract.IMAGE_ENCODER,
        engine=ONNX_RUNTIME,
        threads=1,
        batch_size=1,
        ms_per_post=100.0,
        cosine_to_onnxruntime=1.0,
    )
    text = format_engines(
        EnginesReport(timings=[timing], missing={OPENVINO: "not installed: pip install 'postsim[openvino]'"}, posts=1)
    )
    assert "| image_encoder | 1 | 1 | onnxruntime | 100.0 |  | 1.00000 |" in text
    assert "openvino: not installed: pip install 'postsim[openvino]'" in text


def test_bench_engines_refuses_a_thread_count_of_zero(exported_repository: ExportedRepository) -> None:
    result = CliRunner().invoke(
        app, ["bench", "engines", "--repository", str(exported_repository.path), "--threads", "0"]
    )
    assert result.exit_code == 2
    assert "--threads" in result.output
