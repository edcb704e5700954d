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
    generic_captions: Annotated[
        float | None,
        typer.Option(min=0, max=1, help="Share of the posts with both modalities whose caption fits any topic."),
    ] = None,
    generic_images: Annotated[
        float | None,
        typer.Option(min=0, max=1, help="Share of them whose image fits any topic (plain or noise)."),
    ] = None,
) -> None:
    """Write N synthetic posts (procedurally drawn images, captions from a few topics, each post's topic as its
    label) as a JSONL corpus; some captions and some images are generic, so only both modalities tell the topic."""
    from postsim.corpus import samples

    path = samples.write_sample_posts(
        n,
        out,
        seed=seed,
        generic_captions=samples.DEFAULT_GENERIC_CAPTIONS if generic_captions is None else generic_captions,
        generic_images=samples.DEFAULT_GENERIC_IMAGES if generic_images is None else generic_images,
    )
    stdout.print(f"wrote {n} posts to {path}")
