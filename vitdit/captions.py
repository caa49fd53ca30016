"""Captions → token ids for a text tower trained from the captions themselves (no torch here).

The tokenizer is built from the training captions: a word-level vocabulary with the ``tokenizers``
library, lower-cased, split on whitespace and punctuation, every caption framed as [BOS] … [EOS]
and padded with [PAD] to a fixed length. It is deterministic (words numbered by falling count, then
alphabetically) and serialises to a few KB of JSON, which the checkpoint carries. This module
imports no torch because Ray Data runs :class:`CaptionTokenizer` in its own worker processes.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Iterable

import numpy as np

from vitdit.errors import VitditError

INPUT_IDS = "input_ids"  # the column the trainer's tokenizer UDF adds: N×L int32 token ids
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")  # ids 0..3
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)
# What the pre-tokenizer splits on, for counting words the same way it does: word characters, or a
# run of punctuation ("forty-seven" → "forty", "-", "seven").
_WORDS = re.compile(r"\w+|[^\w\s]+")


def build_tokenizer_json(captions: Iterable[str], min_count: int = 1) -> str:
    """A word-level tokenizer (lower-cased, split on whitespace and punctuation, [BOS] … [EOS]) whose
    vocabulary is every word of ``captions`` seen ``min_count`` times; returned as its JSON.

    Deterministic: words are numbered by falling count, then alphabetically.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    counts = collections.Counter(w for c in captions for w in _WORDS.findall(str(c).lower()))
    words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", BOS_ID), ("[EOS]", EOS_ID)]
    )
    return tok.to_str()


class CaptionTokenizer:
    """Captions → token ids N×L (int64): [BOS] words [EOS], padded with [PAD] or cut to L.

    A cut caption keeps its [EOS] (the tower pools there). Uses ``tokenizers`` only (no torch
    import needed by callers that want numpy: ``ids_numpy``).
    """

    def __init__(self, tokenizer_json: str, max_length: int):
        from tokenizers import Tokenizer

        if max_length < 2:
            raise VitditError(f"text max length {max_length}: must be at least 2 ([BOS] and [EOS])")
        self.tokenizer_json, self.max_length = tokenizer_json, max_length
        self._tok = Tokenizer.from_str(tokenizer_json)
        self._tok.no_padding()
        self._tok.no_truncation()

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def ids_numpy(self, captions: list[str]):
        """(ids N×L int64 numpy, number of captions that were cut)."""
        out = np.full((len(captions), self.max_length), PAD_ID, dtype=np.int64)
        cut = 0
        for i, enc in enumerate(self._tok.encode_batch([str(c) for c in captions])):
            ids = enc.ids
            if len(ids) > self.max_length:
                cut += 1
                ids = [*ids[: self.max_length - 1], EOS_ID]
            out[i, : len(ids)] = ids
        return out, cut

    def __call__(self, captions: list[str]):
        """Token ids N×L as a torch int64 tensor."""
        import torch

        ids, _ = self.ids_numpy(captions)
        return torch.from_numpy(ids)
