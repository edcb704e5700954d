"""``postsim evaluate``: retrieval quality of a running server on a labelled corpus's held-out posts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from postsim.cli.common import UrlOption, reports_errors, run_dir_option, stderr, stdout
from postsim.client.settings import DEFAULT_URL
from postsim.corpus.split import DEFAULT_HELD_OUT


@reports_errors
def evaluate(
    corpus: Annotated[Path, typer.Argument(help="Labelled JSONL corpus (its held-out posts are measured).")],
    out: Annotated[Path, run_dir_option("evaluate", "Folder for evaluation.json and evaluation.png.")],
    url: UrlOption = DEFAULT_URL,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Cut-off of P@k and R@k (nDCG is also at 10).")] = 10,
    held_out: Annotated[
        float, typer.Option(min=0, max=0.95, help="Share held out when the corpus has no 'split' (as in training).")
    ] = DEFAULT_HELD_OUT,
    per_label: Annotated[bool, typer.Option(help="Also print each slice's labels.")] = False,
    weights_by: Annotated[
        str | None,
        typer.Option(help="A key of the corpus lines to also group the fuser's weights by (sample posts: generic)."),
    ] = None,
) -> None:
    """Retrieval quality through the running server: the held-out posts of CORPUS embedded as posted, text only and
    image only, exact search among them, relevance = same label; sliced, per label, with the modality weights."""
    from postsim.cli.progress import ProgressReporter
    from postsim.evaluation.report import write_outputs
    from postsim.evaluation.result import format_table
    from postsim.evaluation.served import ServedEvaluationSettings, evaluate_served

    settings = ServedEvaluationSettings(corpus=corpus, url=url, k=k, held_out=held_out, weights_by=weights_by)
    with ProgressReporter("embedding", console=stderr, unit="posts") as progress:
        evaluation = evaluate_served(settings, progress=progress.update)
    stdout.print(format_table(evaluation.result, per_label=per_label), highlight=False, markup=False, soft_wrap=True)
    for item in evaluation.refused:
        stderr.print(f"left out of {item.view}: {item.id}: {item.reason}", highlight=False, markup=False)
    outputs = write_outputs(evaluation, out)
    stdout.print(f"weights {evaluation.served.fingerprint}; wrote {outputs.json} and {outputs.plot}", highlight=False)
