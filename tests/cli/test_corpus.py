"""`postsim sample-posts` passes its options to the generator and refuses shares outside 0..1."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from postsim.cli.main import app

runner = CliRunner()


def postsim(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def test_sample_posts_takes_the_generic_shares(tmp_path: Path) -> None:
    code, output = postsim(
        "sample-posts", "--n", "30", "--out", str(tmp_path), "--generic-captions", "0", "--generic-images", "1"
    )
    assert code == 0, output
    records = [json.loads(line) for line in (tmp_path / "posts.jsonl").read_text().splitlines()]
    both = [record for record in records if record["text"] and record["image"]]
    assert both and all(record["generic"] == "image" for record in both)
    code, output = postsim("sample-posts", "--n", "3", "--out", str(tmp_path), "--generic-images", "1.5")
    assert code == 2 and "--generic-images" in output
