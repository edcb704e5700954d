"""The live-index benchmark: recall after changes, before and after compaction, on a small corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from postsim.bench.live_index_bench import format_change_recall, run_change_recall
from postsim.core.errors import SearchIndexError
from postsim.model_repository.search_index import IndexType


def test_recall_holds_after_a_tenth_of_the_posts_changed_and_after_compaction(tmp_path: Path) -> None:
    result = run_change_recall(tmp_path, posts=6000, dim=32, queries=200, batch=50)
    assert (result.deleted, result.replaced, result.added) == (200, 200, 200)
    assert result.index_type is IndexType.IVFPQ
    assert result.recall_published >= 0.9 and result.recall_live >= 0.9 and result.recall_compacted >= 0.9
    assert result.recall_filtered == 1.0  # a 3% filter is searched exactly
    assert result.memory_bytes["upserted rows in the index"] > 400 * 32 * 4  # added and replaced posts, full vectors
    report = format_change_recall(result)
    assert "| live, 3% filter | 1.000 |" in report and "600 changes (200 deleted, 200 replaced, 200 added)" in report
    assert (tmp_path / "compacted" / "manifest.json").is_file() and (tmp_path / "compacted.journal").is_file()


def test_a_change_share_outside_0_and_1_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SearchIndexError, match="changed_share within 0 and 1"):
        run_change_recall(tmp_path, posts=100, changed_share=1.5)
