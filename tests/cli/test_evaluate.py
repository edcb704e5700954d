"""`postsim evaluate` refuses a corpus it cannot measure, before calling the server (served runs: tests/evaluation)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from postsim.cli.main import app
from postsim.server.ports import free_ports

runner = CliRunner()


def postsim(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def write_corpus(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        ([{"id": "a", "text": "x"}, {"id": "b", "text": "y"}], "has no labels: evaluate measures"),
        ([{"id": "a", "text": "x", "label": "u"}], "has only the label 'u'"),
        (
            [
                {"id": "a", "text": "x", "label": "u", "split": "train"},
                {"id": "b", "text": "y", "label": "v", "split": "train"},
            ],
            "has no labelled held-out post",
        ),
    ],
    ids=["no-labels", "one-label", "nothing-held-out"],
)
def test_evaluate_refuses_a_corpus_it_cannot_measure_before_calling_the_server(
    tmp_path: Path, records: list[dict[str, object]], expected: str
) -> None:
    (port,) = free_ports(1)  # nothing listens there: the corpus is refused first
    corpus = write_corpus(tmp_path / "posts.jsonl", records)
    code, output = postsim("evaluate", str(corpus), "--url", f"127.0.0.1:{port}", "--out", str(tmp_path / "out"))
    assert code == 1
    assert expected in " ".join(output.split())
