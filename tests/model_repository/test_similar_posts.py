"""similar_posts through a real tritonserver: index built through the server, published, swapped, refused."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from support import ExportedRepository, output_subsets, serve_a_copy
from typer.testing import CliRunner

from postsim.cli.main import app
from postsim.client.api import PostSimClient, build_inputs
from postsim.client.posts import Post
from postsim.core.errors import PostSimError, SearchIndexError, ServerError
from postsim.corpus.posts import CorpusPost, read_posts
from postsim.corpus.samples import write_sample_posts
from postsim.indexing.build import post_caption
from postsim.indexing.embed import CorpusIndexSettings, build_corpus_index
from postsim.indexing.publish import install_version, publish_index, rollback_index
from postsim.model_repository import contract
from postsim.model_repository.search_index import IndexType, read_manifest
from postsim.server.launcher import TritonServer

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class PublishedCorpus:
    posts: list[CorpusPost]
    index_dir: Path


@pytest.fixture(scope="module")
def server(
    server: TritonServer,
    backend: str,
    request: pytest.FixtureRequest,
    exported_repository: ExportedRepository,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TritonServer]:
    """The session's server for FAISS; for Milvus, a server of its own whose retrieval searches Milvus Lite."""
    if backend == "faiss":
        yield server
    else:
        milvus_uri = request.getfixturevalue("milvus_uri")
        yield from serve_a_copy(exported_repository, tmp_path_factory, "served-milvus", milvus_uri=milvus_uri)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("corpus")
    write_sample_posts(40, directory, seed=7)
    return directory


@pytest.fixture(scope="module")
def published(server: TritonServer, corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> PublishedCorpus:
    index_dir = tmp_path_factory.mktemp("indexes") / "first"
    settings = CorpusIndexSettings(corpus=corpus_dir / "posts.jsonl", out_dir=index_dir, url=server.endpoints.grpc)
    report = build_corpus_index(settings)
    assert report.indexed == 40 and report.failures == []
    with PostSimClient(server.endpoints.grpc) as client:
        publish_index(index_dir, server.repository, client=client)
    return PublishedCorpus(posts=list(read_posts(corpus_dir / "posts.jsonl")), index_dir=index_dir)


def _server_ready(server: TritonServer) -> bool:
    """The server's readiness, as a load balancer asks it: over HTTP and over gRPC, which must agree."""
    try:
        with urllib.request.urlopen(f"{server.endpoints.http}/v2/health/ready", timeout=10) as response:
            over_http = response.status == 200
    except urllib.error.HTTPError:
        over_http = False
    with grpcclient.InferenceServerClient(server.endpoints.grpc) as client:
        over_grpc = bool(client.is_server_ready())
    assert over_http == over_grpc
    return over_http


def test_before_any_publish_similar_posts_says_to_publish_an_index(server: TritonServer) -> None:
    """Runs before the module's `published` fixture: retrieval is not loaded yet."""
    with PostSimClient(server.endpoints.grpc) as client:
        assert not client.is_model_ready("similar_posts")  # not ready without an index to answer from
        assert _server_ready(server)  # post_embedding answers
        with pytest.raises(ServerError, match="postsim index publish"):
            client.similar(Post(text="sunset over the sea"), k=3)
        with pytest.raises(SearchIndexError, match="nothing to roll back"):
            rollback_index(server.repository, client=client)


def test_an_indexed_post_finds_itself_first(server: TritonServer, published: PublishedCorpus) -> None:
    with PostSimClient(server.endpoints.grpc) as client:
        for post in published.posts[:6]:
            neighbors = client.similar(post.to_post(), k=5)
            assert neighbors[0].id == post.id
            assert neighbors[0].score >= 0.99
            scores = [n.score for n in neighbors]
            assert scores == sorted(scores, reverse=True)


@pytest.mark.slow_on_remote_engine
@pytest.mark.parametrize("outputs", output_subsets(contract.SIMILAR_POSTS), ids="+".join)
def test_every_subset_of_outputs_can_be_requested(
    server: TritonServer, published: PublishedCorpus, outputs: tuple[str, ...]
) -> None:
    """The KServe ``outputs`` field with any non-empty subset of outputs: exactly those come back."""
    post = published.posts[0]
    inputs = build_inputs([post.to_post()], k=3)
    requested = [grpcclient.InferRequestedOutput(name) for name in outputs]
    with grpcclient.InferenceServerClient(server.endpoints.grpc) as client:
        result = client.infer(contract.SIMILAR_POSTS, inputs, outputs=requested)
    assert {output.name for output in result.get_response().outputs} == set(outputs)
    for name in outputs:
        array = result.as_numpy(name)
        assert array is not None and array.shape[0] == 1
    if contract.IDS.name in outputs:
        assert result.as_numpy(contract.IDS.name)[0, 0].decode() == post.id


def test_each_neighbour_comes_with_the_start_of_its_text(server: TritonServer, published: PublishedCorpus) -> None:
    image_only = next(post for post in published.posts if post.text is None)
    multi_line = next(post for post in published.posts if post.text and "\n" in post.text)  # captions are one line
    with PostSimClient(server.endpoints.grpc) as client:
        for post in [*published.posts[:4], multi_line, image_only]:
            first = client.similar(post.to_post(), k=3)[0]
            assert first.id == post.id
            assert first.text == (post_caption(post.text) or None)
    assert first.text is None


def test_the_cli_shows_the_neighbours_text(server: TritonServer, published: PublishedCorpus) -> None:
    post = published.posts[0]
    assert post.text is not None and post.image_path is not None
    query = ["similar", "--text", post.text, "--image", str(post.image_path), "-k", "2"]
    url = ["--url", server.endpoints.grpc]
    as_json = CliRunner().invoke(app, [*query, "--json", *url])
    assert as_json.exit_code == 0, as_json.output
    first = json.loads(as_json.output)[0]
    parts = first.pop("parts")
    assert first == {"id": post.id, "score": pytest.approx(1.0, abs=1e-3), "text": post_caption(post.text)}
    assert set(parts) == set(contract.SCORE_PARTS) and sum(parts.values()) == pytest.approx(first["score"], abs=1e-3)
    table = CliRunner().invoke(app, [*query, *url], terminal_width=200)
    assert table.exit_code == 0, table.output
    assert "text" in table.output and post_caption(post.text)[:40] in table.output
    assert "img·img" not in table.output  # the parts make the table too wide for the text in 80 columns
    with_parts = CliRunner().invoke(app, [*query, "--parts", *url], env={"COLUMNS": "160"})
    assert with_parts.exit_code == 0, with_parts.output
    assert "img·img" in with_parts.output and f"{parts['text_text']:.4f}" in with_parts.output


def test_an_unloaded_index_is_not_called_unpublished(server: TritonServer, published: PublishedCorpus) -> None:
    """An admin unloads retrieval: similar_posts says the published index is not loaded, not that none is published."""
    query = published.posts[0].to_post()
    with PostSimClient(server.endpoints.grpc) as client:
        with grpcclient.InferenceServerClient(server.endpoints.grpc) as admin:
            admin.unload_model(contract.RETRIEVAL)
            try:
                with pytest.raises(ServerError) as raised:
                    client.similar(query, k=1)
                # Asked for the query's embedding alone, similar_posts runs no search, so it still answers.
                embedding_only = [grpcclient.InferRequestedOutput(contract.EMBEDDING.name)]
                result = admin.infer(contract.SIMILAR_POSTS, build_inputs([query], k=1), outputs=embedding_only)
                assert result.as_numpy(contract.EMBEDDING.name) is not None
            finally:
                client.load_model(contract.RETRIEVAL)
        assert client.similar(query, k=1)[0].id == published.posts[0].id
    message = str(raised.value)
    assert raised.value.status == "UNAVAILABLE"
    assert "the published index is not loaded: retrieval version" in message and "load model 'retrieval'" in message
    assert "no index is published yet" not in message


def test_k_above_the_index_size_returns_every_post_once(server: TritonServer, published: PublishedCorpus) -> None:
    with PostSimClient(server.endpoints.grpc) as client:
        neighbors = client.similar(Post(text="sunset over the sea"), k=500)
    ids = [n.id for n in neighbors]
    assert sorted(ids) == sorted(post.id for post in published.posts)
    assert all(ids) and "-1" not in ids


def test_a_batch_of_queries_matches_single_queries(server: TritonServer, published: PublishedCorpus) -> None:
    queries = [post.to_post() for post in published.posts[:3]]
    with PostSimClient(server.endpoints.grpc) as client:
        together = client.similar_many(queries, k=4)
        alone = [client.similar(query, k=4) for query in queries]
    assert [[n.id for n in result.neighbors] for result in together] == [[n.id for n in result] for result in alone]


@pytest.mark.in_process_only
def test_bad_posts_are_reported_and_the_rest_indexed(server: TritonServer, corpus_dir: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "posts.jsonl"
    good = [json.loads(line) for line in (corpus_dir / "posts.jsonl").read_text().splitlines()[:5]]
    for entry in good:
        if entry.get("image"):
            entry["image"] = str(corpus_dir / entry["image"])
    (tmp_path / "garbage.jpg").write_bytes(b"this is not a jpeg")
    bad = [
        {"id": "missing-image", "text": "caption", "image": str(tmp_path / "nowhere.jpg")},
        {"id": "garbage-image", "image": str(tmp_path / "garbage.jpg")},
    ]
    corpus.write_text("\n".join(json.dumps(entry) for entry in [*good[:2], *bad, *good[2:]]) + "\n")
    report = build_corpus_index(
        CorpusIndexSettings(corpus=corpus, out_dir=tmp_path / "index", url=server.endpoints.grpc, batch_size=4)
    )
    assert report.indexed == 5
    assert {failure.id for failure in report.failures} == {"missing-image", "garbage-image"}
    assert read_manifest(tmp_path / "index").count == 5


@pytest.mark.in_process_only
def test_an_interrupted_build_leaves_the_output_as_it_was(
    server: TritonServer, published: PublishedCorpus, corpus_dir: Path, tmp_path: Path
) -> None:
    out_dir = tmp_path / "index"
    shutil.copytree(published.index_dir, out_dir)
    before = {path.name: path.read_bytes() for path in out_dir.iterdir()}

    pressed = []

    def interrupt(done: int, total: int) -> None:
        if done and not pressed:  # Ctrl-C once, as a user would press it mid-build (not at the 0 done report)
            pressed.append(done)
            os.kill(os.getpid(), signal.SIGINT)

    settings = CorpusIndexSettings(corpus=corpus_dir / "posts.jsonl", out_dir=out_dir, url=server.endpoints.grpc)
    with pytest.raises(KeyboardInterrupt):
        build_corpus_index(settings, on_progress=interrupt)
    assert {path.name: path.read_bytes() for path in out_dir.iterdir()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["index"]
    # The requests in flight were let finish, not cancelled: the server still answers.
    with PostSimClient(server.endpoints.grpc) as client:
        assert client.embed([Post(text="still up")])[0].text_weight == 1.0


@pytest.fixture
def second_index(server: TritonServer, corpus_dir: Path, tmp_path: Path) -> Path:
    """An index of other posts (other ids), built through the same server."""
    other = tmp_path / "other"
    write_sample_posts(12, other, seed=99)
    lines = (other / "posts.jsonl").read_text().splitlines()
    renamed = []
    for line in lines:
        entry = json.loads(line)
        entry["id"] = f"new-{entry['id']}"
        renamed.append(json.dumps(entry))
    (other / "posts.jsonl").write_text("\n".join(renamed) + "\n")
    index_dir = tmp_path / "second"
    build_corpus_index(
        CorpusIndexSettings(
            corpus=other / "posts.jsonl", out_dir=index_dir, url=server.endpoints.grpc, index_type=IndexType.HNSW
        )
    )
    return index_dir


@pytest.fixture
def queries_in_a_loop(server: TritonServer, published: PublishedCorpus) -> Iterator[dict[str, list]]:
    """A client querying similar_posts without pause while the test runs; records answers and failures."""
    record: dict[str, list] = {"ids": [], "failures": []}
    stop = threading.Event()
    query = published.posts[0].to_post()

    def loop() -> None:
        with PostSimClient(server.endpoints.grpc) as client:
            while not stop.is_set():
                try:
                    record["ids"].append(client.similar(query, k=3)[0].id)
                except PostSimError as error:
                    record["failures"].append(str(error))

    thread = threading.Thread(target=loop)
    thread.start()
    yield record
    stop.set()
    thread.join(timeout=60)


def test_publishing_swaps_the_index_without_a_failed_query(
    server: TritonServer, published: PublishedCorpus, second_index: Path, queries_in_a_loop: dict[str, list]
) -> None:
    with PostSimClient(server.endpoints.grpc) as client:
        client.similar(published.posts[0].to_post(), k=1)
        report = publish_index(second_index, server.repository, client=client)
        after_publish = client.similar(published.posts[0].to_post(), k=3)
        assert after_publish[0].id.startswith("new-")
        previous = rollback_index(server.repository, client=client)
        assert previous == report.version - 1
        assert client.similar(published.posts[0].to_post(), k=1)[0].id == published.posts[0].id
    assert queries_in_a_loop["failures"] == []
    ids = queries_in_a_loop["ids"]
    assert ids[0] == published.posts[0].id
    assert any(post_id.startswith("new-") for post_id in ids), "answers never switched to the new index"


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.in_process_only
def test_a_corrupt_index_is_refused_and_the_previous_one_keeps_serving(
    server: TritonServer, published: PublishedCorpus, tmp_path: Path
) -> None:
    corrupt = tmp_path / "corrupt"
    shutil.copytree(published.index_dir, corrupt)
    _flip_a_byte(corrupt / "index.faiss")
    with pytest.raises(SearchIndexError, match=r"sha256|checksum"):
        publish_index(corrupt, server.repository)
    # Past the client's check (as if the file broke on the server's disk): the server refuses it too.
    version_dir = install_version(published.index_dir, server.repository)
    _flip_a_byte(version_dir / "index" / "index.faiss")
    with PostSimClient(server.endpoints.grpc) as client:
        with pytest.raises(PostSimError):
            client.load_model("retrieval")
        assert client.similar(published.posts[0].to_post(), k=1)[0].id == published.posts[0].id
    assert f"retrieval version {version_dir.name} refused" in server.log_text()
    shutil.rmtree(version_dir)


@pytest.mark.in_process_only
def test_the_server_stays_ready_while_a_refused_index_version_sits_beside_the_serving_one(
    server: TritonServer, published: PublishedCorpus
) -> None:
    """A load balancer must not take a server out of service that answers every query."""
    with PostSimClient(server.endpoints.grpc) as client:
        assert client.is_model_ready(contract.SIMILAR_POSTS)
        assert _server_ready(server)
        version_dir = install_version(published.index_dir, server.repository)
        _flip_a_byte(version_dir / "index" / "index.faiss")
        with pytest.raises(PostSimError):
            client.load_model(contract.RETRIEVAL)
        for _ in range(5):  # Triton alone stayed not-ready for minutes
            assert client.similar(published.posts[0].to_post(), k=1)[0].id == published.posts[0].id
            assert _server_ready(server)
            time.sleep(0.5)
    shutil.rmtree(version_dir)


@pytest.mark.in_process_only
def test_an_index_of_other_weights_is_refused(server: TritonServer, published: PublishedCorpus, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    shutil.copytree(published.index_dir, foreign)
    manifest = json.loads((foreign / "manifest.json").read_text())
    manifest["weights_fingerprint"] = "0000000000000000"
    (foreign / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SearchIndexError, match="fingerprint"):
        publish_index(foreign, server.repository)
    version_dir = install_version(published.index_dir, server.repository)
    shutil.rmtree(version_dir / "index")
    shutil.copytree(foreign, version_dir / "index")
    with PostSimClient(server.endpoints.grpc) as client:
        with pytest.raises(PostSimError):
            client.load_model("retrieval")
        assert client.similar(published.posts[0].to_post(), k=1)[0].id == published.posts[0].id
    assert "fingerprint" in server.log_text()
    shutil.rmtree(version_dir)
