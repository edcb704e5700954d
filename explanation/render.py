"""An explanation for people and machines: JSON, and a PNG (heatmap over the image, shaded words, score parts).

The PNG needs matplotlib (the ``train`` extra); without it :func:`write_png` says which
extra to install. The JSON form (:func:`explanation_json`) is what ``postsim explain --json``
prints and what ``postsim ui`` sends to the page.
"""

from __future__ import annotations

import io
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from postsim.client.explain import Explanation
from postsim.core.errors import OptionalDependencyError
from postsim.core.files import write_bytes_atomic
from postsim.model_repository.contract import SCORE_PARTS
from postsim.model_repository.preprocessing import decode_image

PART_LABELS = {
    "image_image": "image ↔ image",
    "text_text": "text ↔ text",
    "image_text": "query image ↔ its text",
    "text_image": "query text ↔ its image",
}
"""How each of ``contract.SCORE_PARTS`` is named for people."""
PART_COLOURS = {"image_image": "#1f77b4", "text_text": "#ff7f0e", "image_text": "#9ecae1", "text_image": "#fdae6b"}


def explanation_json(explanation: Explanation) -> dict[str, Any]:
    """The explanation as JSON-ready data (effects rounded to 6 decimals)."""
    return {
        "score": round(explanation.score, 6),
        "parts": {name: round(getattr(explanation.parts, name), 6) for name in SCORE_PARTS},
        "query_weights": {"image": explanation.query_weights[0], "text": explanation.query_weights[1]},
        "target_weights": {"image": explanation.target_weights[0], "text": explanation.target_weights[1]},
        "words": [{"word": word.word, "effect": round(word.effect, 6)} for word in explanation.words],
        "regions": [{**asdict(region), "effect": round(region.effect, 6)} for region in explanation.regions],
        "grid": explanation.grid,
        "image_size": list(explanation.image_size) if explanation.image_size else None,
        "posts_embedded": explanation.posts_embedded,
        "requests": explanation.requests,
        "seconds": round(explanation.seconds, 3),
    }


def png_bytes(explanation: Explanation, query_image: bytes | None, *, title: str = "") -> bytes:
    """The explanation as one PNG: the query image with its occlusion heatmap, its words shaded, the score split."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise OptionalDependencyError("matplotlib", "train", "Drawing an explanation") from None

    # The object API, not pyplot: no global state, so pages can draw in worker threads.
    figure = Figure(figsize=(10, 5.6), dpi=100)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(2, 2, width_ratios=(1.1, 1), height_ratios=(3, 1))
    picture = figure.add_subplot(grid[:, 0])
    words = figure.add_subplot(grid[0, 1])
    parts = figure.add_subplot(grid[1, 1])
    _draw_heatmap(picture, explanation, query_image)
    _draw_words(words, explanation)
    _draw_parts(parts, explanation)
    figure.suptitle(title or f"similarity {explanation.score:.3f}", fontsize=12)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def write_png(path: Path, explanation: Explanation, query_image: bytes | None, *, title: str = "") -> Path:
    write_bytes_atomic(path, png_bytes(explanation, query_image, title=title))
    return path


def _limit(values: np.ndarray) -> float:
    largest = float(np.abs(values).max()) if values.size else 0.0
    return largest if largest > 0 else 1.0


def _draw_heatmap(axes: Any, explanation: Explanation, query_image: bytes | None) -> None:
    axes.set_axis_off()
    if query_image is None or explanation.image_size is None:
        axes.text(0.5, 0.5, "no image", ha="center", va="center")
        return
    image = decode_image(query_image)
    heat = explanation.heatmap()
    width, height = explanation.image_size
    axes.imshow(image)
    limit = _limit(heat)
    shown = axes.imshow(heat, cmap="RdBu_r", vmin=-limit, vmax=limit, alpha=0.55, extent=(0, width, height, 0))
    axes.figure.colorbar(shown, ax=axes, fraction=0.046, pad=0.02, label="similarity lost when greyed out")
    axes.set_title(f"image regions ({explanation.grid}×{explanation.grid} occlusion)", fontsize=10)


def _draw_words(axes: Any, explanation: Explanation) -> None:
    from matplotlib import colormaps

    axes.set_axis_off()
    axes.set_title("words (similarity lost without each)", fontsize=10)
    if not explanation.words:
        axes.text(0.0, 0.9, "no text", fontsize=10)
        return
    effects = np.array([word.effect for word in explanation.words])
    limit = _limit(effects)
    colours = colormaps["RdBu_r"]
    x, y = 0.0, 0.95
    renderer = axes.figure.canvas.get_renderer()
    for word in explanation.words:
        label = axes.text(
            x,
            y,
            word.word,
            fontsize=10,
            va="top",
            bbox={"facecolor": colours(0.5 + 0.5 * word.effect / limit), "edgecolor": "none", "pad": 1.5},
        )
        extent = label.get_window_extent(renderer=renderer).transformed(axes.transAxes.inverted())
        if extent.x1 > 1.0 and x > 0:
            label.set_position((0.0, y - 0.09))
            y -= 0.09
            extent = label.get_window_extent(renderer=renderer).transformed(axes.transAxes.inverted())
        x = extent.x1 + 0.015


def _draw_parts(axes: Any, explanation: Explanation) -> None:
    left = 0.0
    for name in SCORE_PARTS:
        value = getattr(explanation.parts, name)
        axes.barh(0, value, left=left if value >= 0 else 0, color=PART_COLOURS[name], label=PART_LABELS[name])
        if value >= 0:
            left += value
    axes.set_yticks([])
    axes.set_xlim(min(0.0, *(getattr(explanation.parts, name) for name in SCORE_PARTS)) - 0.02, 1.0)
    axes.set_title(f"score {explanation.score:.3f} = the four parts", fontsize=10)
    axes.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.25), frameon=False)
