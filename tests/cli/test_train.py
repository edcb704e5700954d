"""`postsim train` on bad input: one readable line and an exit code, never a traceback; tiny random backbones."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from postsim.cli.main import app
from postsim.corpus.samples import write_sample_posts

runner = CliRunner()


def postsim(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


TINY = ("--weights", "random", "--size", "tiny", "--seed", "0", "--dim", "32")


def write_corpus(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def test_a_single_label_is_refused_before_any_work(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "posts.jsonl", [{"id": f"p{i}", "text": "a", "label": "one"} for i in range(4)])
    code, output = postsim("train", str(corpus), "--out", str(tmp_path / "out"), *TINY)
    assert code == 1
    assert "has the label 'one': with a single label there is nothing to contrast" in output
    assert not (tmp_path / "out").exists()


def test_duplicate_ids_are_refused_naming_the_line(tmp_path: Path) -> None:
    records = [{"id": "a", "text": "x", "label": "u"}, {"id": "a", "text": "y", "label": "v"}]
    code, output = postsim("train", str(write_corpus(tmp_path / "posts.jsonl", records)), "--out", str(tmp_path), *TINY)
    assert code == 1
    assert "posts.jsonl:2: duplicate id 'a' (first on line 1)" in output


def test_without_labels_it_trains_the_alignment_only_says_so_and_lists_a_corrupt_image(tmp_path: Path) -> None:
    corpus = write_sample_posts(60, tmp_path / "corpus", seed=1)
    records = [json.loads(line) for line in corpus.read_text().splitlines()]
    for record in records:
        record.pop("label")
    write_corpus(corpus, records)
    corrupt = next(record for record in records if record["image"] and record["text"])
    (corpus.parent / str(corrupt["image"])).write_bytes(b"\x89PNG but not really")
    code, output = postsim(
        "train", str(corpus), "--out", str(tmp_path / "out"), "--epochs", "2", "--cache-dir", str(tmp_path / "c"), *TINY
    )
    assert code == 0, output
    assert "(alignment-only)" in output and "the corpus has no labels" in output
    assert f"1 input(s) skipped:\n  {corrupt['id']} (image): " in output
    assert (tmp_path / "out" / "head.pt").is_file()
    assert "serve it: postsim export --head" in output and "--weights random --size tiny --seed 0 --dim 32" in output


def test_a_device_torch_cannot_use_is_refused_before_any_work(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "posts.jsonl", [{"id": "a", "text": "x", "label": "u"}])
    code, output = postsim("train", str(corpus), "--out", str(tmp_path / "out"), "--device", "gpu", *TINY)
    assert code == 2 and "--device gpu: not a torch device; pass cpu, cuda or cuda:N" in output
