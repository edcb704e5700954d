"""The held-out split (postsim.corpus.split)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from postsim.corpus.split import Split, split_of


def test_about_the_held_out_share_of_ids_is_held_out() -> None:
    sides = [split_of(f"post-{index}", held_out=0.2) for index in range(5000)]
    assert 0.18 < sides.count(Split.TEST) / len(sides) < 0.22


def test_the_split_is_the_same_in_every_process_whatever_the_hash_seed() -> None:
    code = (
        "from postsim.corpus.split import split_of; print(''.join(split_of(f'post-{i}').value[1] for i in range(300)))"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code], env={"PYTHONHASHSEED": seed}, capture_output=True, text=True, check=True
        ).stdout
        for seed in ("1", "2")
    }
    assert outputs == {"".join(split_of(f"post-{index}").value[1] for index in range(300)) + "\n"}


def test_a_post_s_own_split_field_wins() -> None:
    held_out_by_hash = next(f"p{index}" for index in range(1000) if split_of(f"p{index}") is Split.TEST)
    assert split_of(held_out_by_hash, Split.TRAIN) is Split.TRAIN
    assert split_of("any", Split.TEST, held_out=0.0) is Split.TEST
    assert split_of("any", held_out=0.0) is Split.TRAIN


def test_the_held_out_share_is_checked() -> None:
    with pytest.raises(ValueError, match="below 1"):
        split_of("x", held_out=1.0)
