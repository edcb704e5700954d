"""``postsim embed`` and ``postsim similar``: one post through a running server."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from postsim.cli.common import UrlOption, reports_errors, stdout
from postsim.client.settings import DEFAULT_URL


@reports_errors
def embed(
    image: Annotated[
        Path | None, typer.Option(help="Image or video file of the post (JPEG, PNG, WebP, GIF; MP4, MOV, WebM).")
    ] = None,
    text: Annotated[str | None, typer.Option(help="Text of the post (title, description, tags).")] = None,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Embed one post through the server and print the result as JSON."""
    from postsim.client.api import PostSimClient
    from postsim.client.posts import Post

    post = Post(text=text, image=image)
    with PostSimClient(url) as client:
        (result,) = client.embed([post])
    json.dump(
        {
            "embedding": [round(float(x), 6) for x in result.embedding],
            "modality_weights": {"image": result.image_weight, "text": result.text_weight},
            "frames": result.frames,
        },
        sys.stdout,
    )
    sys.stdout.write("\n")


@reports_errors
def similar(
    image: Annotated[Path | None, typer.Option(help="Image or video file of the query post.")] = None,
    text: Annotated[str | None, typer.Option(help="Text of the query post.")] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="How many similar posts.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Find the indexed posts most similar to a post, with the start of each one's text when the index keeps it."""
    from postsim.client.api import PostSimClient
    from postsim.client.posts import Post

    with PostSimClient(url) as client:
        neighbors = client.similar(Post(text=text, image=image), k=k)
    if as_json:
        json.dump([{"id": n.id, "score": round(n.score, 6), "text": n.text} for n in neighbors], sys.stdout)
        sys.stdout.write("\n")
        return
    print_neighbors(neighbors)


TABLE_TEXT_CHARS = 80
"""Characters of a neighbour's text shown in the table (``--json`` has all the index keeps)."""


def print_neighbors(neighbors: list[Any], captions: dict[str, str] | None = None) -> None:
    """A table of the neighbours, with their text: ``captions`` by id when given, else what the index sent."""
    from rich.table import Table
    from rich.text import Text

    texts = [(captions.get(n.id, "") if captions is not None else n.text) or "" for n in neighbors]
    table = Table("rank", "id", "score", *(["text"] if any(texts) else []))
    for rank, (neighbor, text) in enumerate(zip(neighbors, texts, strict=True), start=1):
        row: list[str | Text] = [str(rank), Text(neighbor.id), f"{neighbor.score:.4f}"]  # Text: no markup from data
        if any(texts):
            row.append(Text(" · ".join(text.splitlines())[:TABLE_TEXT_CHARS]))
        table.add_row(*row)
    stdout.print(table)
