"""What ``postsim demo`` runs: the whole flow on one machine, from models to a similar-posts answer.

export → serve → sample corpus → index built through the server → publish → one query.
Each step is an ordinary postsim function; :func:`run_demo` only chains them and keeps the
server running for the query (and afterwards, when asked). It lives here, not in client/,
because it drives the server, export and indexing, which all sit below the CLI.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from postsim.client.api import PostSimClient
from postsim.client.posts import Neighbor
from postsim.corpus.posts import CorpusPost, read_posts
from postsim.corpus.samples import write_sample_posts
from postsim.indexing.embed import CorpusIndexSettings, ProgressCallback, build_corpus_index
from postsim.indexing.publish import publish_index
from postsim.server.launcher import ServerSettings, TritonServer

logger = logging.getLogger("postsim")


@dataclass(frozen=True, kw_only=True)
class DemoSettings:
    repository: Path
    work_dir: Path
    weights: str = "pretrained"
    posts: int = 200
    k: int = 5
    server: ServerSettings | None = None
    """Ports and options of the server; defaults to the standard ports on ``repository``."""


@dataclass(frozen=True)
class DemoResult:
    query: CorpusPost
    neighbors: list[Neighbor]
    captions: dict[str, str]


def run_demo(
    settings: DemoSettings,
    *,
    while_serving: Callable[[TritonServer], None] | None = None,
    on_progress: ProgressCallback | None = None,
) -> DemoResult:
    """Run every step; ``while_serving`` is called with the live server before it stops, ``on_progress``
    with (posts embedded, posts in all) while the index is built."""
    from postsim.export.repository import ExportOptions, export_repository
    from postsim.models.settings import ModelSettings

    logger.info("step 1/5: export the models to %s", settings.repository)
    export_repository(ExportOptions(repository=settings.repository, models=ModelSettings(weights=settings.weights)))

    logger.info("step 2/5: write %d sample posts", settings.posts)
    # Topical posts only: generic captions and images are there to train a head, and the demo's head is seeded.
    corpus = write_sample_posts(settings.posts, settings.work_dir / "corpus", generic_captions=0, generic_images=0)
    posts = list(read_posts(corpus))

    server_settings = settings.server or ServerSettings(repository=settings.repository)
    logger.info("step 3/5: start tritonserver")
    with TritonServer(server_settings, log_path=settings.work_dir / "tritonserver.log") as server:
        url = server.endpoints.grpc
        logger.info("step 4/5: embed the corpus through %s and build the index", url)
        index_dir = settings.work_dir / "index"
        build_corpus_index(CorpusIndexSettings(corpus=corpus, out_dir=index_dir, url=url), on_progress=on_progress)
        with PostSimClient(url) as client:
            publish_index(index_dir, server.repository, client=client)
            query = next(post for post in posts if post.text and post.image_path)
            logger.info("step 5/5: ask for the posts most similar to %s", query.id)
            neighbors = client.similar(query.to_post(), k=settings.k)
        if while_serving is not None:
            while_serving(server)
    captions = {post.id: post.text or "(image only)" for post in posts}
    return DemoResult(query=query, neighbors=neighbors, captions=captions)
