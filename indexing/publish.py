"""``postsim index publish`` and ``rollback``: index versions of the ``retrieval`` model.

Publishing copies a verified index directory into the next numbered version folder of
``retrieval`` (staged under a hidden name, then renamed, so Triton never sees half a
version) and asks the running server to load it. Triton loads the new version while the
old one keeps serving and then retires the old one, so queries never fail during the
swap. A version the server refuses is moved aside, and the server keeps the one it had.
Old versions stay on disk; rollback moves the newest aside and reloads.

``similar_posts`` reaches ``retrieval`` through ``retrieval_gateway``, so no ensemble
names it and a publish loads ``retrieval`` alone.

Before anything is installed or retired, the running server must serve the repository
being written to: its configs carry the repository id and weights fingerprint of the export
it was started on, and both must be the repository's own. (A copy of a repository keeps
its id: publish into the copy the server was started on.)

Replicas that share the repository (one volume, as on Kubernetes) are switched together: given
several servers, each is checked first, the version is installed once, then each server in
turn loads it and is checked to serve it. When one cannot (it refuses the version, or has gone
away), the version is retired again and the servers that had loaded it go back to the one
before, so no two replicas serve different versions; the error names the server. Rollback
is all or nothing the same way. With the milvus backend the posts are in Milvus behind one
alias, switched once; each server then loads the version folder that names it (a small load:
no index is read) and is checked, so every replica reports the version its searches use.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from postsim.client.api import PostSimClient
from postsim.client.posts import ServedRepository
from postsim.core.errors import PostSimError, RepositoryError, SearchIndexError, ServerUnavailableError
from postsim.indexing.spread import check_distinct_urls
from postsim.model_repository import contract
from postsim.model_repository.configs import retrieval_settings
from postsim.model_repository.layout import CONFIG_NAME, model_py_source, version_dirs
from postsim.model_repository.manifest import WeightsManifest
from postsim.model_repository.search_index import load_index_dir, version_index_dir

logger = logging.getLogger("postsim")


@dataclass(frozen=True)
class PublishReport:
    version: int
    version_dir: Path
    servers: tuple[str, ...] = ()
    """The servers (their urls) that were asked to load it and serve it now; none: installed only."""

    @property
    def loaded(self) -> bool:
        """Whether running servers were asked to load it and did."""
        return bool(self.servers)


Servers = PostSimClient | Sequence[PostSimClient] | None
"""The running servers a publish or rollback switches: one, several (replicas serving the repository), or none."""

ServedCallback = Callable[[str, int], None]
"""Called with (url, version) as each server is checked to serve the version it was asked to load."""


def _retrieval_dir(repository: Path) -> Path:
    model_dir = repository / contract.RETRIEVAL
    if not (model_dir / CONFIG_NAME).is_file():
        raise RepositoryError(
            f"{repository} has no retrieval model config: run `postsim export --repository {repository}` first"
        )
    return model_dir


def set_aside(version_dir: Path, why: str) -> Path:
    """Move a version folder out of Triton's sight (non-numeric names are not versions), keeping it on disk."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    target = version_dir.with_name(f".{why}-{version_dir.name}-{stamp}")
    version_dir.rename(target)
    return target


def install_version(index_dir: Path, repository: Path, *, prepare: Callable[[Path], None] | None = None) -> Path:
    """Verify the index against the repository's weights and install it as the next retrieval version.

    ``prepare`` gets the staged version folder before it is renamed into place (compaction
    writes the new version's journal there), so a version is never seen without its files.
    """
    weights = WeightsManifest.read(repository)
    # Full verification (checksums before FAISS reads the file, dimension, fingerprint) before it goes live.
    load_index_dir(index_dir, expected_fingerprint=weights.fingerprint, use_gpu=False)

    def fill(staging: Path) -> None:
        shutil.copytree(index_dir, version_index_dir(staging))
        if prepare is not None:
            prepare(staging)

    version_dir = install_retrieval_version(repository, fill)
    logger.info("installed %s as retrieval version %s", index_dir, version_dir.name)
    return version_dir


def install_retrieval_version(repository: Path, fill: Callable[[Path], None]) -> Path:
    """The next retrieval version folder, with its ``model.py`` and what ``fill`` writes into it, staged then renamed."""
    model_dir = _retrieval_dir(repository)
    existing = version_dirs(model_dir)
    version = int(existing[-1].name) + 1 if existing else 1
    staging = model_dir / f".staging-{version}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        fill(staging)
        (staging / "model.py").write_text(model_py_source(contract.RETRIEVAL))
        staging.rename(model_dir / str(version))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return model_dir / str(version)


def check_served(repository: Path, served: ServedRepository, url: str) -> None:
    """Raise RepositoryError unless ``served`` (what the server at ``url`` says it serves) is ``repository``."""
    manifest = WeightsManifest.read(repository)
    server = f"repository id {served.repository_id or 'none'}, weights fingerprint {served.fingerprint or 'none'}"
    own = f"repository id {manifest.repository_id or 'none'}, weights fingerprint {manifest.fingerprint}"
    if not served.repository_id or not manifest.repository_id:
        older = "the server's repository" if not served.repository_id else str(repository)
        raise RepositoryError(
            f"cannot tell whether the server at {url} serves {repository} ({server}; {repository}: {own}): {older} "
            "was exported by an older postsim, without a repository id; export it again and restart the server"
        )
    if served.repository_id != manifest.repository_id:
        raise RepositoryError(
            f"the server at {url} serves another model repository than {repository} (server: {server}; "
            f"{repository}: {own}), so an index version installed there would never reach it: pass the folder that "
            "server was started on (its `postsim serve --repository`) as `--repository DIR`, or POSTSIM_REPOSITORY"
        )
    if served.fingerprint != manifest.fingerprint:
        raise RepositoryError(
            f"{repository} was exported again after the server at {url} started on it ({server}; now: {own}): "
            "restart `postsim serve` so it serves the new models, then build the index against it and publish"
        )


def _as_clients(servers: Servers) -> tuple[PostSimClient, ...]:
    if servers is None:
        return ()
    if isinstance(servers, PostSimClient):
        return (servers,)
    return tuple(servers)


def _require_served(repository: Path, clients: Sequence[PostSimClient]) -> None:
    """Every server is named once and serves ``repository``; checked before anything is installed or retired."""
    check_distinct_urls([client.url for client in clients], "one per replica")
    for client in clients:
        try:
            served = client.served_repository()
        except ServerUnavailableError as error:
            raise ServerUnavailableError(
                f"cannot ask {client.url} which repository it serves, so nothing was installed or retired ({error}); "
                "a replica that is still starting answers once it is ready: run the command again then",
                status=error.status,
            ) from None
        check_served(repository, served, client.url)


def load_and_check(client: PostSimClient, version: int) -> None:
    """Reload retrieval; raise unless ``version`` is what serves."""
    client.load_model(contract.RETRIEVAL)
    if not client.is_model_ready(contract.RETRIEVAL, str(version)):
        raise SearchIndexError(f"the server did not bring retrieval version {version} up")


def _switch(
    clients: Sequence[PostSimClient], version: int, on_served: ServedCallback | None
) -> tuple[list[PostSimClient], PostSimClient | None, PostSimError | None]:
    """Each server in turn loads ``version``, until one cannot: (those switched, the one that failed, why)."""
    switched: list[PostSimClient] = []
    for client in clients:
        try:
            load_and_check(client, version)
        except PostSimError as error:
            logger.warning("server %s did not bring retrieval version %d up: %s", client.url, version, error)
            return switched, client, error
        logger.info("server at %s now serves retrieval version %d", client.url, version)
        switched.append(client)
        if on_served is not None:
            on_served(client.url, version)
    return switched, None, None


def _switch_back(clients: Sequence[PostSimClient], version: int | None) -> str:
    """Servers that had switched load ``version`` again (the newest on disk); what became of them, for a message."""
    if not clients:
        return ""
    urls = ", ".join(client.url for client in clients)
    if version is None:
        return (
            f"; {urls} loaded it and there is no earlier version to go back to: they serve it until restarted "
            "(a server restarted before an index is published has none)"
        )
    back: list[str] = []
    stuck: list[str] = []
    for client in clients:
        try:
            load_and_check(client, version)
            back.append(client.url)
        except PostSimError as error:
            stuck.append(f"{client.url} ({error})")
    text = f"; {', '.join(back)} serve(s) version {version} again" if back else ""
    if stuck:
        text += (
            f"; could not bring version {version} back on {'; '.join(stuck)}: restart those servers "
            f"(a server starts on the newest version on disk, {version})"
        )
    return text


def _failed_on(client: PostSimClient, error: PostSimError, count: int) -> str:
    return f"{client.url} ({error})" if count > 1 else f"the server ({error})"


def publish_index(
    index_dir: Path, repository: Path, *, client: Servers = None, on_served: ServedCallback | None = None
) -> PublishReport:
    """Install the index as the next retrieval version and, given servers, make every one of them serve it.

    ``client``: one server or several (replicas serving ``repository``); nothing is installed
    unless each serves ``repository`` (:func:`check_served`). The version is installed once,
    then each server loads it in turn (``on_served`` hears of each). If one cannot, the version
    is retired (kept on disk, hidden), those that had loaded it go back to the previous one,
    and SearchIndexError names the server.
    """
    clients = _as_clients(client)
    _require_served(repository, clients)
    milvus = retrieval_settings(repository).backend is contract.RetrievalBackend.MILVUS
    if milvus:
        from postsim.indexing.milvus import install_milvus_version

        version_dir = install_milvus_version(index_dir, repository)
    else:
        version_dir = install_version(index_dir, repository)
    version = int(version_dir.name)
    if not clients:
        return PublishReport(version=version, version_dir=version_dir)
    switched, failed, error = _switch(clients, version, on_served)
    if failed is not None and error is not None:
        aside = set_aside(version_dir, "refused")
        if milvus:
            _unpublish_milvus(repository)
        remaining = version_dirs(version_dir.parent)
        previous = int(remaining[-1].name) if remaining else None
        back = _switch_back(switched, previous)
        if len(clients) == 1:
            raise SearchIndexError(
                f"the server refused retrieval version {version} and keeps serving the previous one ({error}); "
                f"the refused version is kept in {aside}, the server log says why"
            ) from None
        not_asked = [client.url for client in clients[clients.index(failed) + 1 :]]
        untouched = f"; {', '.join(not_asked)} were not asked and keep the version they had" if not_asked else ""
        raise SearchIndexError(
            f"{failed.url} did not bring retrieval version {version} up ({error}), so the version is retired "
            f"(kept in {aside}){back}{untouched}. Fix {failed.url} (this message or its log says why) or leave it "
            "out, and publish again"
        ) from None
    return PublishReport(version=version, version_dir=version_dir, servers=tuple(client.url for client in clients))


def _unpublish_milvus(repository: Path) -> None:
    """After the server refused a Milvus version: the alias back to the version before it, when there is one."""
    from postsim.indexing.milvus import rollback_milvus

    try:
        logger.info("Milvus alias back to version %d", rollback_milvus(repository))
    except SearchIndexError as error:  # the first version: nothing to go back to, and nothing served before
        logger.warning("the refused Milvus version stays behind the alias: %s", error)


def rollback_index(repository: Path, *, client: Servers = None, on_served: ServedCallback | None = None) -> int:
    """Retire the newest retrieval version (kept on disk, hidden) and make every server serve the one before.

    ``client``: one server or several, each checked first as for :func:`publish_index`. If one
    cannot load the previous version, a FAISS repository gets its newest version back, the
    servers that had gone back load it again, and SearchIndexError names the server. (With
    the milvus backend the alias has moved for every replica already: the error says so.)
    """
    clients = _as_clients(client)
    _require_served(repository, clients)
    model_dir = _retrieval_dir(repository)
    versions = version_dirs(model_dir)
    if len(versions) < 2:
        raise SearchIndexError(f"{model_dir} holds {len(versions)} published index version(s): nothing to roll back to")
    newest, previous = versions[-1], versions[-2]
    milvus = retrieval_settings(repository).backend is contract.RetrievalBackend.MILVUS
    if milvus:
        from postsim.indexing.milvus import rollback_milvus

        rollback_milvus(repository)
    aside = set_aside(newest, "rolled-back")
    logger.info("retired retrieval version %s (kept in %s)", newest.name, aside)
    switched, failed, error = _switch(clients, int(previous.name), on_served)
    if failed is not None and error is not None:
        what = f"{_failed_on(failed, error, len(clients))} did not bring retrieval version {previous.name} up"
        if milvus:
            raise SearchIndexError(
                f"{what}: the Milvus alias serves version {previous.name}'s posts to every replica already, and "
                f"{failed.url} reports the retired one until it loads retrieval again: restart it (a server starts "
                f"on the newest version on disk, {previous.name})"
            ) from None
        aside.rename(newest)
        back = _switch_back(switched, int(newest.name))
        raise SearchIndexError(
            f"{what}, so version {newest.name} is current again{back}. Fix {failed.url} (this message or its log "
            "says why) or leave it out, and roll back again"
        ) from None
    return int(previous.name)
