"""Issue 12 through a real tritonserver: upserts and deletes while serving, filters, queries by id, collapse.

One server on a private copy of the exported repository serves an index of random unit
vectors whose posts carry metadata (3% of them the label ``rare``); each test changes posts of
its own (ids with the test's prefix), so the tests share the server without depending on
each other's changes.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from support import ExportedRepository, serve_a_copy

from postsim.client.api import PostSimClient
from postsim.client.posts import Post
from postsim.core.errors import InvalidPostError, PostSimError
from postsim.indexing.build import build_index_dir
from postsim.indexing.publish import publish_index
from postsim.model_repository.live_index.metadata import MetadataColumns, PostMetadata
from postsim.model_repository.manifest import WeightsManifest
from postsim.model_repository.score_parts import UnimodalVectors
from postsim.server.launcher import TritonServer

pytestmark = pytest.mark.integration

COUNT = 300
RARE_EVERY = 33
"""Every 33rd post has the label ``rare``: 10 of 300 posts, about 3%."""


@dataclass(frozen=True)
class LiveServer:
    server: TritonServer
    repository: Path
    ids: list[str]
    vectors: np.ndarray

    @property
    def url(self) -> str:
        return self.server.endpoints.grpc


def publish_index_with_metadata(repository: Path, url: str) -> tuple[list[str], np.ndarray]:
    manifest = WeightsManifest.read(repository)
    rng = np.random.default_rng(12)
    image, text = (_unit(rng.standard_normal((COUNT, manifest.dim))) for _ in range(2))
    image_weight = rng.uniform(0.2, 0.8, (COUNT, 1)).astype(np.float32)
    weights = np.concatenate([image_weight, 1 - image_weight], axis=1)
    vectors = _unit(weights[:, :1] * image + weights[:, 1:] * text)  # fused as the fuser fuses, so its scores split
    ids = [f"base-{row}" for row in range(COUNT)]
    metadata = MetadataColumns.of(
        PostMetadata(
            author=f"author-{row % 7}",
            created_at=1_700_000_000 + row * 3600,
            label="rare" if row % RARE_EVERY == 0 else "common",
        )
        for row in range(COUNT)
    )
    index_dir = repository.parent / "index"
    unimodal = UnimodalVectors.from_float32(image, text, weights)
    build_index_dir(
        index_dir, ids, vectors, weights_fingerprint=manifest.fingerprint, metadata=metadata, unimodal=unimodal
    )
    with PostSimClient(url) as client:
        publish_index(index_dir, repository, client=client)
    return ids, vectors


def _unit(vectors: np.ndarray) -> np.ndarray:
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def live(
    backend: str,
    request: pytest.FixtureRequest,
    exported_repository: ExportedRepository,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    milvus_uri = request.getfixturevalue("milvus_uri") if backend == "milvus" else None
    for server in serve_a_copy(exported_repository, tmp_path_factory, f"live-{backend}", milvus_uri=milvus_uri):
        repository = server.settings.repository
        ids, vectors = publish_index_with_metadata(repository, server.endpoints.grpc)
        yield LiveServer(server=server, repository=repository, ids=ids, vectors=vectors)


def _post(post_id: str, seed: int) -> Post:
    words = np.random.default_rng(seed).choice(["cat", "meme", "sunset", "bay", "dog", "pizza", "train", "rain"], 6)
    return Post(id=post_id, text=f"{post_id} " + " ".join(words))


def test_an_upserted_post_is_found_by_its_content_as_soon_as_the_call_returns(live: LiveServer) -> None:
    post = _post("upsert-1", 1)
    with PostSimClient(live.url) as client:
        report = client.upsert([post], metadata=[{"author": "someone", "tags": ["fresh"]}])
        (top, *_) = client.similar(post, k=3)
        assert report.added == ("upsert-1",) and report.sequence > 0
        assert top.id == "upsert-1" and top.score >= 0.99
        assert top.text is not None and top.text.startswith("upsert-1")
        # A filter reaches the upserted post's metadata; a replacement replaces it too.
        (filtered,) = client.similar(post, k=1, where={"tags": ["fresh"]})
        assert filtered.id == "upsert-1"
        again = client.upsert([post], metadata=[{"tags": ["stale"]}])
        assert again.replaced == ("upsert-1",) and again.sequence > report.sequence
        assert client.similar(post, k=1, where={"tags": ["fresh"]}) == []


def test_a_deleted_post_is_in_no_result_of_a_query_sent_after_the_delete_returned(live: LiveServer) -> None:
    posts = [_post(f"delete-{n}", 100 + n) for n in range(3)]
    results: list[tuple[float, list[str]]] = []
    failures: list[Exception] = []
    stop = threading.Event()

    def query_loop() -> None:
        with PostSimClient(live.url) as client:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    results.append((sent, [n.id for post in posts for n in client.similar(post, k=5)]))
                except PostSimError as error:
                    failures.append(error)

    with PostSimClient(live.url) as client:
        client.upsert(posts)
        loop = threading.Thread(target=query_loop)
        loop.start()
        try:
            time.sleep(0.5)
            report = client.delete([post.id for post in posts])
            returned = time.monotonic()
            time.sleep(1.0)
        finally:
            stop.set()
            loop.join()
    assert report.deleted == tuple(post.id for post in posts) and not report.unknown
    assert not failures
    after = [ids for sent, ids in results if sent >= returned]
    before = [ids for sent, ids in results if sent < returned]
    assert after, "no query was sent after the delete returned"
    assert any("delete-0" in ids for ids in before), "the posts were never found before their delete"
    assert not any(post.id in ids for ids in after for post in posts)


def test_a_delete_of_an_unknown_id_is_reported(live: LiveServer) -> None:
    with PostSimClient(live.url) as client:
        client.upsert([_post("known-1", 5)])
        report = client.delete(["known-1", "never-indexed-1"])
    assert report.deleted == ("known-1",) and report.unknown == ("never-indexed-1",)


def _mixed_changes(live: LiveServer, changes: int, prefix: str) -> None:
    """``changes`` upserts, replacements and deletes in calls of a few, under a concurrent query loop."""
    rng = np.random.default_rng(7)
    failures: list[Exception] = []
    answered = 0
    stop = threading.Event()

    def query_loop() -> None:
        nonlocal answered
        with PostSimClient(live.url) as client:
            while not stop.is_set():
                try:
                    client.similar(Post(text="a steady query"), k=10)
                    client.similar_to_id(live.ids[answered % COUNT], k=10, where={"labels": ["common"]})
                    answered += 2
                except PostSimError as error:
                    failures.append(error)

    loop = threading.Thread(target=query_loop)
    loop.start()
    done = 0
    live_ids: list[str] = []
    try:
        with PostSimClient(live.url) as client:
            while done < changes:
                if live_ids and rng.random() < 0.4:
                    victims = list(dict.fromkeys(rng.choice(live_ids, min(3, len(live_ids)))))
                    client.delete(victims)
                    live_ids = [post_id for post_id in live_ids if post_id not in victims]
                    done += len(victims)
                else:
                    fresh = [f"{prefix}-{done + n}" for n in range(4)]
                    client.upsert([_post(post_id, done + n) for n, post_id in enumerate(fresh)])
                    live_ids += fresh
                    done += len(fresh)
    finally:
        stop.set()
        loop.join()
    assert not failures, failures[:3]
    assert answered > 0


@pytest.mark.slow_on_remote_engine
def test_no_query_fails_during_a_thousand_mixed_changes(live: LiveServer) -> None:
    _mixed_changes(live, 1000, "mixed")  # about 8 s with the tiny test encoders


def test_a_filter_keeping_3_percent_returns_k_with_exact_scores(live: LiveServer) -> None:
    rare = [row for row in range(COUNT) if row % RARE_EVERY == 0]
    query_row = 1
    exact = live.vectors[rare] @ live.vectors[query_row]
    with PostSimClient(live.url) as client:
        for k in (3, len(rare)):
            found = client.similar_to_id(live.ids[query_row], k=k, where={"labels": ["rare"]})
            best = np.argsort(-exact)[:k]
            assert [n.id for n in found] == [live.ids[rare[i]] for i in best]
            assert np.allclose([n.score for n in found], exact[best], atol=1e-5)
        window = client.similar_to_id(
            live.ids[query_row],
            k=5,
            where={"created_after": "2023-11-14T22:13:20Z", "created_before": "2023-11-15T03:13:20Z"},
        )
        assert sorted(n.id for n in window) == [f"base-{row}" for row in range(5) if row != query_row]


def test_a_query_by_id_excludes_the_post_and_an_unknown_id_is_invalid_argument(live: LiveServer) -> None:
    with PostSimClient(live.url) as client:
        found = client.similar_to_id(live.ids[0], k=5)
        assert len(found) == 5 and live.ids[0] not in [n.id for n in found]
        best = np.argsort(-(live.vectors @ live.vectors[0]))[1:6]
        assert [n.id for n in found] == [live.ids[row] for row in best]
        with pytest.raises(InvalidPostError, match=r"'no-such-post'.*no indexed post has this id"):
            client.similar_to_id("no-such-post", k=5)


def test_filtered_results_split_the_scores_of_published_and_upserted_posts(live: LiveServer) -> None:
    post = _post("parts-1", 3)
    with PostSimClient(live.url) as client:
        client.upsert([post])
        # Only the published posts carry a label: the upserts of other tests are left out.
        by_id = client.similar_to_id(live.ids[0], k=5, where={"labels": ["common"]})
        by_content = client.similar(post, k=20, where={"labels": ["common", "rare"]})
        (upserted, *_) = client.similar(post, k=3, where={"exclude_author": "nobody"})
        by_upserted_id = client.similar_to_id("parts-1", k=3)
    assert len(by_id) == 5 and len(by_content) == 20
    for neighbor in by_id + by_content:  # the stored parts of base-0, or the parts post_embedding gave the query
        assert neighbor.id.startswith("base-") and neighbor.parts is not None, neighbor
        assert abs(neighbor.parts.total - neighbor.score) < 1e-3, neighbor
    assert upserted.id == "parts-1" and upserted.score >= 0.99
    assert upserted.parts is not None, "an upserted post keeps the parts post_embedding gave it"
    assert abs(upserted.parts.total - upserted.score) < 1e-3, upserted
    assert by_upserted_id, "an upserted query post splits with its journalled parts"
    for neighbor in by_upserted_id:
        assert neighbor.parts is not None and abs(neighbor.parts.total - neighbor.score) < 1e-3, neighbor


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ({"created_after": "yesterday"}, "created_after"),
        ({"colour": "red"}, "unknown field 'colour'"),
    ],
)
def test_a_bad_filter_is_invalid_argument_naming_the_field(
    live: LiveServer, where: dict[str, object], message: str
) -> None:
    with PostSimClient(live.url) as client, pytest.raises(InvalidPostError, match=message):
        client.similar_to_id(live.ids[0], k=5, where=where)


def test_a_post_the_encoders_refuse_inside_an_upsert_is_invalid_argument_and_changes_nothing(
    live: LiveServer,
) -> None:
    """Triton 2.51 turns the code of post_embedding's refusal into INTERNAL on its way back through post_changes
    (a BLS call); the client must still be told the post is invalid, which post, and why."""
    good, bad = _post("upsert-good", 7), Post(id="upsert-bad", text="a broken picture", image=b"not an image at all")
    with PostSimClient(live.url) as client:
        with pytest.raises(InvalidPostError, match=r"post 1 of the request: IMAGE: not a decodable image"):
            client.upsert([good, bad])
        with pytest.raises(InvalidPostError, match="upsert-good"):
            client.similar_to_id("upsert-good", k=1)  # the call was one change: nothing of it was applied
        # similar_posts_filtered reaches post_embedding the same way (a BLS call)
        with pytest.raises(InvalidPostError, match=r"IMAGE: not a decodable image"):
            client.similar(bad, k=3, where={"labels": ["rare"]})


def test_near_duplicates_collapse_into_the_better_result(live: LiveServer) -> None:
    original = _post("meme-1", 42)
    with PostSimClient(live.url) as client:
        client.upsert([original, Post(id="meme-1-repost", text=original.text)])
        found = client.similar(original, k=3, collapse_above=0.98)
    assert found[0].id in {"meme-1", "meme-1-repost"}
    assert [dup.id for dup in found[0].duplicates] == list({"meme-1", "meme-1-repost"} - {found[0].id})
    assert not {"meme-1", "meme-1-repost"} & {n.id for n in found[1:]}


@pytest.mark.in_process_only
def test_sigkill_of_the_retrieval_stub_after_n_changes_serves_exactly_them(live: LiveServer) -> None:
    with PostSimClient(live.url, timeout_s=30) as client:
        client.upsert([_post(f"kept-{n}", 300 + n) for n in range(5)])
        client.delete(["kept-0", live.ids[-1]])
        (stub,) = [stub for stub in live.server.stubs() if stub.model == "retrieval"]
        import os
        import signal

        os.kill(stub.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            try:
                found = client.similar_to_id("kept-1", k=COUNT)
                break
            except PostSimError:
                assert time.monotonic() < deadline, "retrieval did not come back within 60 s"
                time.sleep(0.2)
        ids = {n.id for n in found}
        assert {"kept-2", "kept-3", "kept-4"} <= ids
        assert not {"kept-0", live.ids[-1]} & ids
        with pytest.raises(InvalidPostError, match="kept-0"):
            client.similar_to_id("kept-0", k=1)


def _journal(repository: Path) -> Path:
    (journal,) = (repository / "retrieval").glob("*/changes.journal")
    return journal


@pytest.mark.in_process_only
def test_sigkill_of_the_server_serves_exactly_the_acknowledged_changes_and_a_torn_last_record_is_dropped(
    exported_repository: ExportedRepository, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import os
    import signal

    for server in serve_a_copy(exported_repository, tmp_path_factory, "live-kill", restart_backoff_s=0.5):
        repository = server.settings.repository
        ids, _ = publish_index_with_metadata(repository, server.endpoints.grpc)
        with PostSimClient(server.endpoints.grpc, timeout_s=30) as client:
            client.upsert([_post(f"acked-{n}", n) for n in range(4)])
            client.delete([ids[0]])
            size_before_last = _journal(repository).stat().st_size
            client.upsert([_post("last", 99)])
            assert server.process is not None
            os.kill(server.process.pid, signal.SIGKILL)
            deadline = time.monotonic() + 120
            while True:
                try:
                    found = {n.id for n in client.similar_to_id("acked-0", k=COUNT + 10)}
                    break
                except PostSimError:
                    assert time.monotonic() < deadline, "the server did not come back within 120 s"
                    time.sleep(0.3)
            assert {"acked-1", "acked-2", "acked-3", "last"} <= found and ids[0] not in found
        server.stop()
        journal = _journal(repository)
        with journal.open("r+b") as file:  # a crash in the middle of writing the last record
            file.truncate(size_before_last + (journal.stat().st_size - size_before_last) // 2)
        shutil.copy(journal, journal.with_suffix(".torn"))
        server.start()
        with PostSimClient(server.endpoints.grpc, timeout_s=30) as client:
            client.wait_until_ready(120)
            found = {n.id for n in client.similar_to_id("acked-0", k=COUNT + 10)}
            assert {"acked-1", "acked-2", "acked-3"} <= found and "last" not in found and ids[0] not in found
        assert "dropped a torn last record" in server.log_path.read_text()


# --------------------------------------------------------------------------- the commands, on the same server


def _postsim(*args: str) -> tuple[int, str]:
    from typer.testing import CliRunner

    from postsim.cli.main import app

    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_the_index_upsert_delete_and_similar_id_commands(live: LiveServer, tmp_path: Path) -> None:
    corpus = tmp_path / "posts.jsonl"
    lines = [
        {"id": "cli-1", "text": "a cat on a train", "author": "ann", "tags": ["cats"]},
        {"id": "cli-2", "text": "rain over the bay", "created_at": "2024-05-01T12:00:00Z", "label": "weather"},
    ]
    corpus.write_text("".join(json.dumps(line) + "\n" for line in lines))
    code, output = _postsim("index", "upsert", str(corpus), "--url", live.url)
    assert code == 0, output
    assert "upserted 2 posts (2 new, 0 replaced)" in output
    code, output = _postsim("similar", "--id", "cli-1", "-k", "3", "--label", "weather", "--json", "--url", live.url)
    assert code == 0, output
    assert [row["id"] for row in json.loads(output)] == ["cli-2"]
    code, output = _postsim("index", "delete", "cli-1", "cli-404", "--url", live.url)
    assert code == 1
    assert "deleted 1 posts" in output and "1 id(s) not in the index" in output and "cli-404" in output
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("cli-2\n\n")
    code, output = _postsim("index", "delete", "--ids-file", str(ids_file), "--url", live.url)
    assert code == 0 and "deleted 1 posts" in output


def test_an_upsert_over_several_servers_is_refused_unless_they_share_one_index(
    live: LiveServer, backend: str, grpc_url: str, tmp_path: Path
) -> None:
    """The session's FAISS server beside the live one: each would keep only the posts sent to it."""
    from postsim.indexing.spread import SHARED_INDEX_NEEDED

    corpus = tmp_path / "posts.jsonl"
    corpus.write_text(json.dumps({"id": "spread-1", "text": "a cat on a train"}) + "\n")
    code, output = _postsim("index", "upsert", str(corpus), "--url", live.url, "--url", grpc_url)
    assert code == 1, output
    assert SHARED_INDEX_NEEDED in " ".join(output.split())
    if backend == "faiss":
        assert f"the server at {live.url} keeps its own FAISS index" in " ".join(output.split())
    with PostSimClient(live.url) as client, pytest.raises(PostSimError, match="spread-1"):
        client.similar_to_id("spread-1", k=1)


@pytest.mark.in_process_only
def test_compaction_folds_the_changes_into_a_new_version_and_rollback_still_works(live: LiveServer) -> None:
    from postsim.indexing.compact import compact_index
    from postsim.indexing.publish import rollback_index
    from postsim.model_repository.layout import JOURNAL_NAME, version_dirs

    with PostSimClient(live.url, timeout_s=60) as client:
        client.upsert([_post("compact-1", 500), _post("compact-2", 501)])
        client.delete(["compact-2", live.ids[5]])
        before = [(n.id, round(n.score, 5)) for n in client.similar_to_id("compact-1", k=20)]
        old = version_dirs(live.repository / "retrieval")[-1]
        report = compact_index(live.repository, client)
        new = version_dirs(live.repository / "retrieval")[-1]
        assert int(new.name) == report.version == int(old.name) + 1
        assert [(n.id, round(n.score, 5)) for n in client.similar_to_id("compact-1", k=20)] == before
        journal_sizes = [(version / JOURNAL_NAME).stat().st_size for version in (new, old)]
        assert report.carried == 0 and journal_sizes[0] < journal_sizes[1], "the journal starts again"
        later = client.upsert([_post("compact-3", 502)])
        assert later.sequence == report.folded + 1
        assert rollback_index(live.repository, client=client) == int(old.name)
        assert [(n.id, round(n.score, 5)) for n in client.similar_to_id("compact-1", k=20)] == before
        with pytest.raises(InvalidPostError, match="compact-3"):
            client.similar_to_id("compact-3", k=1)


@pytest.mark.in_process_only
def test_automatic_compaction_runs_once_the_journal_passes_its_threshold(live: LiveServer) -> None:
    from postsim.indexing.compact import AutoCompactor
    from postsim.model_repository.layout import version_dirs

    with PostSimClient(live.url) as client:
        client.upsert([_post("auto-1", 600)])
    size = AutoCompactor(live.repository, live.url, threshold_bytes=1).journal_bytes()
    assert AutoCompactor(live.repository, live.url, threshold_bytes=size).check_once() is None
    newest = int(version_dirs(live.repository / "retrieval")[-1].name)
    report = AutoCompactor(live.repository, live.url, threshold_bytes=size - 1).check_once()
    assert report is not None and report.version == newest + 1
    with PostSimClient(live.url) as client:
        assert client.similar_to_id("auto-1", k=1)


@pytest.mark.slow_on_remote_engine
def test_the_live_bench_measures_changes_under_query_load(live: LiveServer) -> None:
    from postsim.bench.live_serving import format_live_serving, run_live_serving

    result = run_live_serving(live.url, duration_s=1.0, concurrency=1, batch=4)
    assert result.without_writes.failed == 0 and result.with_writes.failed == 0
    assert result.upserted == result.deleted > 0 and result.upserts_per_s > 0 and result.deletes_per_s > 0
    assert "| with writes |" in format_live_serving(result)
    with PostSimClient(live.url) as client, pytest.raises(InvalidPostError, match="bench-live-0"):
        client.similar_to_id("bench-live-0", k=1)  # the bench deleted what it upserted


@pytest.mark.slow_on_remote_engine
def test_the_asyncio_client_has_the_same_change_and_query_methods(live: LiveServer) -> None:
    import asyncio

    from postsim.client.api import AsyncPostSimClient

    async def run() -> None:
        async with AsyncPostSimClient(live.url) as client:
            posts = [_post(f"async-{n}", 700 + n) for n in range(20)]  # two calls of at most 16
            report = await client.upsert(posts)
            assert sorted(report.added) == sorted(post.id for post in posts)
            (top,) = await client.similar(posts[0], k=1, where={"exclude_ids": ["nothing-1"]})
            assert top.id == "async-0" and top.score >= 0.99
            assert "async-0" not in [n.id for n in await client.similar_to_id("async-0", k=5)]
            deleted = await client.delete([post.id for post in posts] + ["async-404"])
            assert len(deleted.deleted) == 20 and deleted.unknown == ("async-404",)

    asyncio.run(run())


def _send_changes(url: str, request: bytes) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from postsim.client.api import map_server_error
    from postsim.model_repository import contract

    tensor = grpcclient.InferInput(contract.CHANGES.name, [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[request]], dtype=np.object_))
    with grpcclient.InferenceServerClient(url) as raw:
        try:
            raw.infer(contract.RETRIEVAL, [tensor])
        except InferenceServerException as error:  # as the client maps it
            raise map_server_error(error, url=url, model=contract.RETRIEVAL) from None


def test_a_change_embedded_by_other_encoders_is_refused(live: LiveServer) -> None:
    from postsim.model_repository.live_index.protocol import PostUpsert
    from postsim.model_repository.live_index.wire import ChangeRequest

    post = PostUpsert(id="foreign-1", vector=live.vectors[0])
    request = ChangeRequest(weights_fingerprint="other-encoders", upserts=(post,)).to_json()
    with pytest.raises(InvalidPostError, match="weights fingerprint 'other-encoders'"):
        _send_changes(live.url, request)


@pytest.mark.in_process_only
def test_a_change_while_the_index_is_sealed_for_compaction_is_unavailable_and_queries_go_on(live: LiveServer) -> None:
    from postsim.core.errors import ServerUnavailableError
    from postsim.model_repository.live_index.wire import Control

    with PostSimClient(live.url) as client:
        client.control_changes(Control.SEAL)
        try:
            with pytest.raises(ServerUnavailableError, match=r"being compacted into a new version.*retry"):
                client.upsert([_post("sealed-1", 800)])
            assert client.similar_to_id(live.ids[1], k=3)
        finally:
            client.control_changes(Control.UNSEAL)
        assert client.upsert([_post("sealed-1", 800)]).added == ("sealed-1",)
