"""Why a post is similar, through a real tritonserver: the four-part score split, attributions, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from support import EXPLAINED_POSTS, ExplainedCorpus, publish_sample_index
from typer.testing import CliRunner

from postsim.cli.main import app
from postsim.client.api import PostSimClient
from postsim.client.explain import MAX_WORDS, OCCLUSION_GREY
from postsim.client.posts import Post
from postsim.corpus.posts import CorpusPost
from postsim.explanation.targets import indexed_post
from postsim.model_repository import contract
from postsim.server.launcher import TritonServer

pytestmark = pytest.mark.integration


# --------------------------------------------------------------------------- the four-part split


def _check_parts_sum_to_scores(url: str, corpus: ExplainedCorpus) -> int:
    checked = 0
    with PostSimClient(url) as client:
        results = client.similar_many([post.to_post() for post in corpus.posts[:16]], k=10)
    for result in results:
        for neighbor in result.neighbors:
            assert neighbor.parts is not None
            assert neighbor.parts.total == pytest.approx(neighbor.score, abs=1e-3)
            checked += 1
    return checked


def test_the_four_parts_sum_to_each_neighbours_score_for_flat_and_ivfpq(
    explained_server: TritonServer, explained_corpus: ExplainedCorpus
) -> None:
    url = explained_server.endpoints.grpc
    assert _check_parts_sum_to_scores(url, explained_corpus) == 160
    publish_sample_index(explained_server, explained_corpus.ivfpq)  # scores from the exact rerank of PQ candidates
    try:
        assert _check_parts_sum_to_scores(url, explained_corpus) == 160
    finally:
        publish_sample_index(explained_server, explained_corpus.flat)


def test_a_text_only_query_gets_exactly_nothing_from_the_query_image(
    explained_server: TritonServer, explained_corpus: ExplainedCorpus
) -> None:
    with PostSimClient(explained_server.endpoints.grpc) as client:
        neighbors = client.similar(Post(text="the sun sank slowly into the ocean"), k=10)
    assert len(neighbors) == 10
    for neighbor in neighbors:
        assert neighbor.parts is not None
        assert neighbor.parts.image_image == 0.0 and neighbor.parts.image_text == 0.0
        assert neighbor.parts.text_text + neighbor.parts.text_image == pytest.approx(neighbor.score, abs=1e-3)


def test_an_indexed_image_with_another_text_is_similar_by_its_image(
    explained_server: TritonServer, explained_corpus: ExplainedCorpus
) -> None:
    for post in explained_corpus.with_image_and_text()[:4]:
        query = Post(image=post.image_path, text="completely unrelated words about taxes and paperwork")
        with PostSimClient(explained_server.endpoints.grpc) as client:
            neighbors = client.similar(query, k=EXPLAINED_POSTS)
        (found,) = [neighbor for neighbor in neighbors if neighbor.id == post.id]
        parts = found.parts
        assert parts is not None
        assert parts.image_image == max(parts.image_image, parts.text_text, parts.image_text, parts.text_image)


def test_post_embedding_returns_the_unit_vectors_its_embedding_is_made_of(
    explained_server: TritonServer, explained_corpus: ExplainedCorpus
) -> None:
    text_only = next(post for post in explained_corpus.posts if not post.image_path)
    with PostSimClient(explained_server.endpoints.grpc) as client:
        both, only_text = client.embed([explained_corpus.with_image_and_text()[0].to_post(), text_only.to_post()])
    for result in (both, only_text):
        fused = result.image_weight * result.image_embedding + result.text_weight * result.text_embedding
        np.testing.assert_allclose(fused / np.linalg.norm(fused), result.embedding, atol=1e-5)
    assert np.linalg.norm(both.image_embedding) == pytest.approx(1.0, abs=1e-5)
    assert not only_text.image_embedding.any()


def test_an_index_without_unimodal_vectors_answers_no_split(
    explained_server: TritonServer, explained_corpus: ExplainedCorpus
) -> None:
    publish_sample_index(explained_server, explained_corpus.no_unimodal)
    try:
        with PostSimClient(explained_server.endpoints.grpc) as client:
            neighbors = client.similar(explained_corpus.posts[0].to_post(), k=3)
        assert [neighbor.parts for neighbor in neighbors] == [None, None, None]
    finally:
        publish_sample_index(explained_server, explained_corpus.flat)


# --------------------------------------------------------------------------- attributions


def _post_embedding_requests(url: str) -> int:
    """Requests the ensemble's first step has answered (the ensemble's own count is updated after its response)."""
    with grpcclient.InferenceServerClient(url) as client:
        (stats,) = client.get_inference_statistics(contract.PREPROCESS_IMAGE).model_stats
    return int(stats.inference_stats.success.count)


def _object_alone(corpus: ExplainedCorpus, post: CorpusPost, out: Path) -> Path:
    """The post's picture with everything but its drawn object greyed out, as occlusion greys a cell."""
    assert post.image_path is not None
    with Image.open(post.image_path) as opened:
        picture = opened.convert("RGB")
    alone = Image.new("RGB", picture.size, OCCLUSION_GREY)
    box = corpus.boxes[post.id]
    alone.paste(picture.crop(box), box[:2])
    alone.save(out)
    return out


def test_explain_finds_the_drawn_object_in_as_few_requests_as_the_batch_limit_allows(
    explained_server: TritonServer, explained_corpus: ExplainedCorpus, tmp_path: Path
) -> None:
    """Occlusion coordinates end to end: only the object's cells can change the embedding, and one must win.

    The query is a sample post's object (where the generator drew it) on a grey canvas,
    compared with the indexed post: greying a cell outside the object changes nothing. A
    map with rows and columns swapped, cells mis-scaled or variants out of order puts the
    strongest cell elsewhere (the objects are small: a sun, a ball, a moon cover few cells).
    """
    url = explained_server.endpoints.grpc
    for post in explained_corpus.with_image_and_text()[:6]:
        assert post.text is not None
        query = Post(image=_object_alone(explained_corpus, post, tmp_path / f"{post.id}.png"), text=post.text)
        before = _post_embedding_requests(url)
        with PostSimClient(url) as client:
            explanation = client.explain(query, indexed_post(explained_corpus.flat, post.id).embedding)
        sent = _post_embedding_requests(url) - before
        assert explanation.posts_embedded == 1 + min(len(post.text.split()), MAX_WORDS) + 49
        assert sent == explanation.requests == math.ceil(explanation.posts_embedded / contract.MAX_BATCH_SIZE)
        assert explanation.parts.total == pytest.approx(explanation.score, abs=1e-3)
        strongest = explanation.strongest_region()
        assert strongest is not None and strongest.effect > 0
        left, top, right, bottom = box = explained_corpus.boxes[post.id]
        cell_left, cell_top, cell_right, cell_bottom = strongest.box
        inside = cell_left < right and left < cell_right and cell_top < bottom and top < cell_bottom
        assert inside, f"{post.id}: strongest cell {strongest.box} is outside the object at {box}"


def test_explain_finds_the_words_the_two_posts_share(explained_server: TritonServer) -> None:
    text = "sunset tax invoice ocean paperwork form"
    with PostSimClient(explained_server.endpoints.grpc) as client:
        explanation = client.explain(Post(text=text), Post(text="sunset ocean"))
    assert [word.word for word in explanation.words] == text.split()
    assert {word.word for word in explanation.strongest_words(2)} == {"sunset", "ocean"}
    assert explanation.regions == [] and explanation.parts.image_image == 0.0


def test_the_cli_prints_the_tables_and_the_time_and_draws_the_png(
    explained_server: TritonServer, explained_corpus: ExplainedCorpus, tmp_path: Path
) -> None:
    post = explained_corpus.with_image_and_text()[2]
    assert post.text is not None and post.image_path is not None
    png = tmp_path / "why.png"
    query = ["explain", "--image", str(post.image_path), "--text", post.text, "--id", post.id]
    where = ["--index", str(explained_corpus.flat), "--url", explained_server.endpoints.grpc]
    result = CliRunner().invoke(app, [*query, *where, "--png", str(png)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "image ↔ image" in result.output and "strongest region" in result.output
    assert "post_embedding requests" in result.output
    assert png.read_bytes().startswith(b"\x89PNG")
    as_json = CliRunner().invoke(app, [*query, *where, "--json", "--grid", "3"])
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.stdout)
    assert data["target"] == post.id and len(data["regions"]) == 9 and data["seconds"] > 0
    assert sum(data["parts"].values()) == pytest.approx(data["score"], abs=1e-3)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (["--id", "post-99999"], "post id 'post-99999' is not in the index at "),
        (["--id", "post-00001", "--index", "NO_UNIMODAL"], "was built without unimodal vectors"),
        (["--other-image", "UNDECODABLE"], "IMAGE: not a decodable image"),
    ],
    ids=["unknown-id", "no-unimodal-vectors", "undecodable-image"],
)
def test_bad_input_gets_a_message_naming_the_problem(
    explained_server: TritonServer,
    explained_corpus: ExplainedCorpus,
    tmp_path: Path,
    target: list[str],
    message: str,
) -> None:
    undecodable = tmp_path / "broken.jpg"
    undecodable.write_bytes(b"this is not a picture at all")
    named = {"NO_UNIMODAL": str(explained_corpus.no_unimodal), "UNDECODABLE": str(undecodable)}
    args = [named.get(arg, arg) for arg in target]
    index = [] if "--index" in args else ["--index", str(explained_corpus.flat)]
    command = ["explain", "--text", "sunset over the sea", *args, *index, "--url", explained_server.endpoints.grpc]
    result = CliRunner().invoke(app, command, terminal_width=400)
    assert result.exit_code == 1, result.output
    assert message in result.output
