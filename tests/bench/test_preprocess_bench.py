"""``postsim bench preprocess``: decoding at scale against decoding every pixel, and the client's shrinking."""

from __future__ import annotations

import re

from support import ExportedRepository
from typer.testing import CliRunner

from postsim.cli.main import app


def test_bench_preprocess_prints_times_and_the_fidelity_of_decoding_at_scale(
    exported_repository: ExportedRepository,
) -> None:
    result = CliRunner().invoke(
        app,
        ["bench", "preprocess", "--repeats", "1", "--photos", "2", "--repository", str(exported_repository.path)],
    )
    assert result.exit_code == 0, result.output
    for size in ("640×480 JPEG", "1080×1350 JPEG", "4032×3024 JPEG", "PNG screenshot"):
        assert re.search(rf"\| [^|]*{size}[^|]*\| [\d,]+ \| [\d.]+ \| [\d.]+ \| [\d.]+× \|", result.output), (
            result.output
        )
    # The bar: the image embeddings of decoding at scale and in full agree over the sample photos
    # (2 of each kind, through the exported image encoder, random weights).
    fidelity = re.search(r"8 sample photos: mean cosine ([\d.]+), min ([\d.]+)", result.output)
    assert fidelity is not None, result.output
    assert float(fidelity.group(1)) >= 0.999
    shrink = re.search(r"mean ([\d.]+) MB sent as ([\d.]+) KB.*3 photos: mean cosine ([\d.]+)", result.output)
    assert shrink is not None, result.output
    assert float(shrink.group(2)) * 1e3 < float(shrink.group(1)) * 1e6 / 20
    assert float(shrink.group(3)) >= 0.99
