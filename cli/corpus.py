"""``postsim sample-posts``: a synthetic corpus in the posts.jsonl format."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from postsim.cli.common import reports_errors, run_dir_option, stdout


@reports_errors
def sample_posts(
    out: Annotated[Path, run_dir_option("sample-posts", "Folder for posts.jsonl, images/ and videos/.")],
    n: Annotated[int, typer.Option("--n", min=1, help="How many posts.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed of the generator.")] = 0,
    videos: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="How many posts have a 3-second MP4 video instead of an image (posts 5, 15, 25 ...; by default a few).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Write N synthetic posts (drawn images and short videos, captions from a few topics) as a JSONL corpus."""
    from postsim.corpus.samples import SAMPLE_VIDEOS, write_sample_posts

    path = write_sample_posts(n, out, seed=seed, videos=SAMPLE_VIDEOS if videos is None else videos)
    stdout.print(f"wrote {n} posts to {path}")
