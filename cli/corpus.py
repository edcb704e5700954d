"""``postsim sample-posts``: a synthetic corpus in the posts.jsonl format."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from postsim.cli.common import reports_errors, run_dir_option, stdout


@reports_errors
def sample_posts(
    out: Annotated[Path, run_dir_option("sample-posts", "Folder for posts.jsonl and images/.")],
    n: Annotated[int, typer.Option("--n", min=1, help="How many posts.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed of the generator.")] = 0,
) -> None:
    """Write N synthetic posts (procedurally drawn images, captions from a few topics) as a JSONL corpus."""
    from postsim.corpus.samples import write_sample_posts

    path = write_sample_posts(n, out, seed=seed)
    stdout.print(f"wrote {n} posts to {path}")
