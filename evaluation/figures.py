"""Writing matplotlib figures: the plots of ``postsim train``, ``postsim evaluate`` and the benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from postsim.core.files import atomic_path


def save_figure(figure: Any, path: Path, *, dpi: int = 110) -> Path:
    """Lays out a matplotlib figure, writes it atomically as PNG at ``path`` and closes it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    try:
        with atomic_path(path) as temporary:
            figure.savefig(temporary, dpi=dpi)
    finally:
        plt.close(figure)
    return path
