"""``postsim embed`` and ``postsim similar``: one post through a running server."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from postsim.cli.common import ShrinkImagesOption, UrlOption, reports_errors, stdout
from postsim.client.posts import ScoreParts
from postsim.client.settings import DEFAULT_URL
from postsim.model_repository.contract import SCORE_PARTS


@reports_errors
def embed(
    image: Annotated[
        Path | None, typer.Option(help="Image or video file of the post (JPEG, PNG, WebP, GIF; MP4, MOV, WebM).")
    ] = None,
    text: Annotated[str | None, typer.Option(help="Text of the post (title, description, tags).")] = None,
    url: UrlOption = DEFAULT_URL,
    shrink_images: ShrinkImagesOption = False,
) -> None:
    """Embed one post through the server and print the result as JSON."""
    from postsim.client.api import PostSimClient
    from postsim.client.posts import Post

    post = Post(text=text, image=image)
    with PostSimClient(url, shrink_images=shrink_images) as client:
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
    post_id: Annotated[
        str | None, typer.Option("--id", help="An indexed post's id: posts like it (itself excluded), no content.")
    ] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="How many similar posts.")] = 10,
    exclude_id: Annotated[list[str] | None, typer.Option(help="Leave out this post id (repeatable).")] = None,
    exclude_author: Annotated[str | None, typer.Option(help="Leave out this author's posts.")] = None,
    created_after: Annotated[str | None, typer.Option(help="Only posts created at or after (ISO-8601).")] = None,
    created_before: Annotated[str | None, typer.Option(help="Only posts created before (ISO-8601).")] = None,
    label: Annotated[list[str] | None, typer.Option(help="Only posts with this label (repeatable: any of).")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="Only posts with this tag (repeatable: any of).")] = None,
    collapse_above: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="Fold results more similar than this into a better one.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    show_parts: Annotated[
        bool,
        typer.Option(
            "--parts",
            help="Add each score's four parts to the table: img·img, txt·txt, img·txt, txt·img (query·neighbour).",
        ),
    ] = False,
    url: UrlOption = DEFAULT_URL,
    shrink_images: ShrinkImagesOption = False,
) -> None:
    """Find the indexed posts most similar to a post (or to an indexed one, --id), optionally filtered."""
    from postsim.client.api import PostSimClient
    from postsim.client.posts import Post

    if post_id is not None and (image is not None or text is not None):
        raise typer.BadParameter("--id queries by an indexed post's stored vector: leave out --image and --text")
    if show_parts and as_json:
        raise typer.BadParameter("--json always has each neighbour's parts: leave out --parts")
    fields = {
        "exclude_ids": exclude_id or None,
        "exclude_author": exclude_author,
        "created_after": created_after,
        "created_before": created_before,
        "labels": label or None,
        "tags": tag or None,
    }
    where = {name: value for name, value in fields.items() if value is not None} or None
    with PostSimClient(url, shrink_images=shrink_images) as client:
        if post_id is not None:
            neighbors = client.similar_to_id(post_id, k=k, where=where, collapse_above=collapse_above)
        else:
            neighbors = client.similar(Post(text=text, image=image), k=k, where=where, collapse_above=collapse_above)
    if as_json:
        rows: list[dict[str, object]] = [
            {"id": n.id, "score": round(n.score, 6), "text": n.text, "parts": _parts_json(n.parts)} for n in neighbors
        ]
        if collapse_above is not None:  # the near-duplicates folded into each result
            for row, neighbor in zip(rows, neighbors, strict=True):
                row["duplicates"] = [duplicate.id for duplicate in neighbor.duplicates]
        json.dump(rows, sys.stdout)
        sys.stdout.write("\n")
        return
    print_neighbors(neighbors, show_parts=show_parts)


TABLE_TEXT_CHARS = 80
"""Characters of a neighbour's text shown in the table (``--json`` has all the index keeps)."""
PART_HEADERS = {"image_image": "img·img", "text_text": "txt·txt", "image_text": "img·txt", "text_image": "txt·img"}
"""Table headers of the score parts (``contract.SCORE_PARTS``: query modality · neighbour modality)."""


def _parts_json(parts: ScoreParts | None) -> dict[str, float] | None:
    return None if parts is None else {name: round(getattr(parts, name), 6) for name in SCORE_PARTS}


def print_neighbors(neighbors: list[Any], captions: dict[str, str] | None = None, *, show_parts: bool = False) -> None:
    """A table of the neighbours, with their text: ``captions`` by id when given, else what the index sent.

    ``show_parts``: a column per score part ("?" where the index cannot split that score).
    """
    from rich.table import Table
    from rich.text import Text

    texts = [(captions.get(n.id, "") if captions is not None else n.text) or "" for n in neighbors]
    part_columns = [PART_HEADERS[name] for name in SCORE_PARTS] if show_parts else []
    table = Table("rank", "id", "score", *part_columns, *(["text"] if any(texts) else []))
    for rank, (neighbor, text) in enumerate(zip(neighbors, texts, strict=True), start=1):
        row: list[str | Text] = [str(rank), Text(neighbor.id), f"{neighbor.score:.4f}"]  # Text: no markup from data
        if show_parts:
            parts = neighbor.parts
            row.extend(f"{getattr(parts, name):.4f}" if parts is not None else "?" for name in SCORE_PARTS)
        if any(texts):
            row.append(Text(" · ".join(text.splitlines())[:TABLE_TEXT_CHARS]))
        table.add_row(*row)
    stdout.print(table)
