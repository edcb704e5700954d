"""``postsim explain`` and ``postsim ui``: why a post is similar, on the terminal and on a local page."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from postsim.cli.common import UrlOption, reports_errors, run_dir_option, stdout
from postsim.client.settings import DEFAULT_URL
from postsim.core.errors import SettingsError

if TYPE_CHECKING:
    from postsim.explanation.pair import ExplainedPair


@reports_errors
def explain(
    index: Annotated[Path, run_dir_option("index", "Index folder of --id (what `postsim index build` wrote).")],
    image: Annotated[Path | None, typer.Option(help="Image file of the query post.")] = None,
    text: Annotated[str | None, typer.Option(help="Text of the query post.")] = None,
    post_id: Annotated[
        str | None, typer.Option("--id", help="Compare with this indexed post (as the index stores it).")
    ] = None,
    other_image: Annotated[Path | None, typer.Option(help="Compare with a second post: its image file.")] = None,
    other_text: Annotated[str | None, typer.Option(help="Compare with a second post: its text.")] = None,
    grid: Annotated[int, typer.Option(min=1, max=16, help="Occlusion grid: cells a side.")] = 7,
    png: Annotated[
        Path | None, typer.Option(help="Also draw the explanation into this PNG (needs the train extra).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Which words and image regions of a post drive its similarity to an indexed post (--id) or a second post."""
    from postsim.client.posts import Post
    from postsim.explanation.pair import PairSettings, explain_pair
    from postsim.explanation.render import explanation_json, write_png

    other = Post(text=other_text, image=other_image) if other_image or other_text else None
    if post_id is not None and other is not None:
        raise SettingsError(
            "--id compares with an indexed post, --other-image/--other-text with a second post: pick one"
        )
    query = Post(text=text, image=image)
    settings = PairSettings(query=query, post_id=post_id, index_dir=index, other=other, url=url, grid=grid)
    pair = explain_pair(settings)
    explanation = pair.explanation
    if png is not None:
        title = f"why the post is similar to {pair.target}: {explanation.score:.3f}"
        write_png(png, explanation, query.image_bytes() if query.has_image else None, title=title)
    if as_json:
        json.dump({"target": pair.target, **explanation_json(explanation)}, sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
        return
    _print_explanation(pair)
    if png is not None:
        stdout.print(f"wrote {png}")


def _print_explanation(pair: ExplainedPair) -> None:
    from rich.table import Table
    from rich.text import Text

    from postsim.explanation.render import PART_LABELS

    explanation = pair.explanation
    stdout.print(f"similarity to {pair.target}: {explanation.score:.4f}", highlight=False)
    parts = Table("part", "contribution")
    for name, label in PART_LABELS.items():
        parts.add_row(label, f"{getattr(explanation.parts, name):+.4f}")
    stdout.print(parts)
    if explanation.words:
        words = Table("word", "effect")
        for word in explanation.strongest_words(len(explanation.words)):
            words.add_row(Text(word.word), f"{word.effect:+.4f}")
        stdout.print(words)
    strongest = explanation.strongest_region()
    if strongest is not None:
        title = "image regions: similarity lost when greyed out, in thousandths"
        heat = Table(*(str(column) for column in range(explanation.grid)), title=title)
        for row in explanation.heatmap():
            heat.add_row(*(f"{value * 1000:+.2f}" for value in row))
        stdout.print(heat)
        stdout.print(f"strongest region: row {strongest.row}, column {strongest.column}, pixels {strongest.box}")
    stdout.print(
        f"{explanation.posts_embedded} variants in {explanation.requests} post_embedding requests, "
        f"{explanation.seconds:.2f} s",
        highlight=False,
    )


@reports_errors
def ui(
    corpus: Annotated[Path, typer.Argument(help="The corpus the index was built from (posts.jsonl).")],
    index: Annotated[
        Path, run_dir_option("index", "Index folder the server serves (what `postsim index build` wrote).")
    ],
    host: Annotated[str, typer.Option(help="Address to serve the page on; it has no authentication.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port of the page.")] = 8765,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """A local web page over the running server: similar posts by upload or by click, and why they are similar."""
    from postsim.ui.app import UiSettings, run_ui

    run_ui(UiSettings(corpus=corpus, index_dir=index, url=url, host=host, port=port))
