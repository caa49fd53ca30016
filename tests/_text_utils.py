"""Tiny text encoders built offline: a CLIP text tower and a T5 encoder with their tokenizers.

Nothing can be downloaded here, so the tokenizers are made from vocabularies written in the test:
CLIP's byte-level BPE gets every byte as a symbol (with and without the end-of-word mark ``</w>``)
and one merge; T5's Unigram model gets the lowercase letters and the word-boundary piece. Both are
the real transformers classes, saved with ``save_pretrained`` and loaded back through the same code
path as real weights.
"""

from __future__ import annotations

import os

CLIP_MAX_LENGTH = 16  # CLIP's learned positions: the tokens per caption (L)
CLIP_WIDTH, CLIP_PROJECTION = 32, 24


def clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a byte-level BPE with one merge: ("a", "b</w>")."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in [*symbols, *(s + "</w>" for s in symbols), "ab</w>", "<|startoftext|>", "<|endoftext|>"]:
        vocab[s] = len(vocab)
    return vocab, [("a", "b</w>")]


def make_tiny_clip(path, seed: int = 0, projection: bool = True, tokenizer_dir=None) -> str:
    """A random 2-layer, 32-wide CLIP text tower (with a 24-wide projection) and its tokenizer,
    saved to ``path`` (the tokenizer to ``tokenizer_dir`` when given: the diffusers layout)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab, merges = clip_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=CLIP_WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=CLIP_PROJECTION,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    torch.manual_seed(seed)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(tokenizer_dir or path))
    return str(path)


def make_tiny_t5(path, seed: int = 0, max_length: int = 12) -> str:
    """A random 2-layer, 32-wide T5 encoder and a Unigram tokenizer over a-z, saved to ``path``."""
    import torch
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)
    config = T5Config(
        vocab_size=len(pieces),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        is_encoder_decoder=False,
        use_cache=False,
    )
    torch.manual_seed(seed)
    T5EncoderModel(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


def without_tokenizer(src: str, dst) -> str:
    """A copy of the model directory ``src`` with only its config and weights."""
    import shutil

    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if name == "config.json" or name.endswith(".safetensors"):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    return str(dst)
