"""`postsim train` and `postsim evaluate` on bad input: one readable line and an exit code, never a traceback.

Tiny random backbones keep each run to seconds; the served path is tested in
tests/evaluation/test_served.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from postsim.client.cli import app
from postsim.corpus.samples import write_sample_posts
from postsim.server.ports import free_ports

runner = CliRunner()
TINY = ("--weights", "random", "--size", "tiny", "--seed", "0", "--dim", "32")


def postsim(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


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


@pytest.mark.parametrize(
    ("head", "warned"),
    [({"seeded": 0}, True), (None, True), ({"checkpoint": "/h/head.pt", "sha256": "ab" * 32}, False)],
    ids=["seeded", "manifest-before-head-entries", "trained"],
)
def test_serve_warns_loudly_of_an_untrained_head_and_says_how_to_train_one(
    head: dict[str, object] | None, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    from postsim.model_repository.manifest import WeightsManifest, log_weights

    provenance: dict[str, object] = {"fuser": {"weights": "checkpoint:/h/head.pt" if not warned else "seeded:0"}}
    if head is not None:
        provenance["head"] = head
    manifest = WeightsManifest(target="embedded", dim=8, precision="fp32", random_weights=False, provenance=provenance)
    with caplog.at_level("WARNING", logger="postsim"):
        log_weights(manifest)
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert bool(warnings) is warned
    if warned:
        assert "SERVING AN UNTRAINED HEAD" in warnings[0] and "postsim train CORPUS --out DIR" in warnings[0]
        assert "--head DIR/head.pt" in warnings[0]


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


def test_a_device_torch_cannot_use_is_refused_before_any_work(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "posts.jsonl", [{"id": "a", "text": "x", "label": "u"}])
    code, output = postsim("train", str(corpus), "--out", str(tmp_path / "out"), "--device", "gpu", *TINY)
    assert code == 2 and "--device gpu: not a torch device; pass cpu, cuda or cuda:N" in output
