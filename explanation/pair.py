"""Explaining one pair, as ``postsim explain`` does: the query against an indexed post or a second post."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from postsim.client.api import PostSimClient
from postsim.client.explain import DEFAULT_GRID, Explanation
from postsim.client.posts import Post
from postsim.client.settings import DEFAULT_URL
from postsim.core.errors import SearchIndexError, SettingsError
from postsim.explanation.targets import ExplainableIndex


@dataclass(frozen=True, kw_only=True)
class PairSettings:
    """What to explain: ``query`` against ``post_id`` of the index at ``index_dir``, or against ``other``."""

    query: Post
    post_id: str | None = None
    index_dir: Path | None = None
    other: Post | None = None
    url: str = DEFAULT_URL
    grid: int = DEFAULT_GRID

    def __post_init__(self) -> None:
        if (self.post_id is None) == (self.other is None):
            raise SettingsError("explain against one indexed post id or one second post, not both and not neither")
        if self.post_id is not None and self.index_dir is None:
            raise SettingsError("an indexed post id needs the index folder it is in")


@dataclass(frozen=True, kw_only=True)
class ExplainedPair:
    explanation: Explanation
    target: str
    """Who the query was compared with: the post id, or "the second post"."""
    target_text: str | None


def explain_pair(settings: PairSettings) -> ExplainedPair:
    """Explain the pair through the server at ``settings.url``; an indexed post is compared as the index stores it."""
    with PostSimClient(settings.url) as client:
        if settings.other is not None:
            explanation = client.explain(settings.query, settings.other, settings.grid)
            return ExplainedPair(explanation=explanation, target="the second post", target_text=settings.other.text)
        return _against_indexed_post(client, settings)


def _against_indexed_post(client: PostSimClient, settings: PairSettings) -> ExplainedPair:
    index_dir, post_id = settings.index_dir, settings.post_id
    if index_dir is None or post_id is None:  # PairSettings refuses this already; here for the types
        raise SettingsError("an indexed post id needs the index folder it is in")
    index = ExplainableIndex.open(index_dir)
    post = index.post(post_id)
    served = client.served_repository().fingerprint
    if served and served != index.fingerprint:
        raise SearchIndexError(
            f"the index at {index_dir} was built from other weights ({index.fingerprint}) than the server "
            f"at {settings.url} serves ({served}): its vectors cannot be compared with this server's"
        )
    explanation = client.explain(settings.query, post.embedding, settings.grid)
    return ExplainedPair(explanation=explanation, target=post.id, target_text=post.caption)
