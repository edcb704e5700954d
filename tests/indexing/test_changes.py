"""Reading the ids of a delete: every id checked before anything is sent."""

from __future__ import annotations

from pathlib import Path

import pytest

from postsim.core.errors import InvalidPostError
from postsim.indexing.changes import read_ids_file


def test_an_ids_file_skips_blank_lines_and_names_the_line_of_a_bad_id(tmp_path: Path) -> None:
    path = tmp_path / "ids.txt"
    path.write_text("post-1\n\n  post-2  \n")
    assert read_ids_file(path) == ["post-1", "post-2"]
    path.write_text("post-1\npost 2\n")
    with pytest.raises(InvalidPostError, match=r"ids\.txt:2: post id 'post 2' has the character ' '"):
        read_ids_file(path)
