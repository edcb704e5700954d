"""The ``postsim`` command: the command groups put together, and logging set up for them.

Each command lives in the module of its group (:mod:`~postsim.cli.export`, :mod:`~postsim.cli.serve`,
:mod:`~postsim.cli.query`, :mod:`~postsim.cli.corpus`, :mod:`~postsim.cli.train`, :mod:`~postsim.cli.evaluate`,
:mod:`~postsim.cli.demo`, :mod:`~postsim.cli.index`, :mod:`~postsim.cli.bench`, :mod:`~postsim.cli.explain`) and only parses its options and calls the typed function that does the work,
importing it when the command runs: ``postsim --help`` stays instant and ``postsim serve`` works without
the export extra's torch.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer
from rich.logging import RichHandler

from postsim.cli import bench, corpus, demo, evaluate, explain, export, index, query, serve, train
from postsim.cli.common import stderr

logger = logging.getLogger("postsim")
app = typer.Typer(
    name="postsim",
    help="Similar social-media posts from their image and text, served by NVIDIA Triton.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(index.app, name="index")
app.add_typer(bench.app, name="bench")
app.command()(export.export)
app.command()(serve.serve)
app.command()(query.embed)
app.command()(query.similar)
app.command("sample-posts")(corpus.sample_posts)
app.command()(train.train)
app.command()(evaluate.evaluate)
app.command()(demo.demo)
app.command()(explain.explain)
app.command()(explain.ui)


@app.callback()
def _configure(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show debug logs.")] = False) -> None:
    handler = RichHandler(console=stderr, show_path=False, show_time=False, markup=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    # huggingface_hub gives its logger a stderr handler of its own at import and lets records
    # propagate to the root's as well: each of its messages would show twice.
    logging.getLogger("huggingface_hub").propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
