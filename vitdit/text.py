"""Frozen text encoders for text-to-image conditioning: CLIP text towers and T5 encoders.

``TextEncoder(path)`` loads a transformers text encoder and its tokenizer from a local directory
and turns captions into a fixed-shape token sequence (N×L×width) and a pooled vector
(N×pooled_width), computed the way Stable Diffusion 3 computes its prompt embeddings, so that a
model trained on stored embeddings sees the same inputs when it samples:

- every caption is padded (or truncated) to ``max_length`` tokens and the encoder runs on the token
  ids alone, without an attention mask, as diffusers' ``StableDiffusion3Pipeline`` does: a row's
  embedding depends on its caption only, not on the batch it was encoded in;
- CLIP (``CLIPTextModelWithProjection``): tokens are the *penultimate* layer's hidden states
  (SD3, like SDXL, conditions on ``hidden_states[-2]``, before the final layer norm); pooled is the
  projected end-of-text embedding ``text_embeds``. A plain ``CLIPTextModel`` (no projection) pools
  its ``pooler_output`` instead;
- T5 (``T5EncoderModel``): tokens are ``last_hidden_state``; SD3 takes no pooled vector from T5, so
  pooled here is the mean of ``last_hidden_state`` over the non-padding tokens (the caption's tokens
  and its end-of-sequence token).

The empty caption ``""`` is encoded like any other: SD3's negative prompt for classifier-free
guidance is the encoding of "", not zeros.

A text encoder directory holds ``config.json``, safetensors weights and the tokenizer files; the
layout of a diffusers pipeline (``text_encoder_3/`` beside ``tokenizer_3/``) is accepted too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import numpy as np
import torch

from vitdit.errors import UnsafeCheckpointError, VitditError

log = logging.getLogger(__name__)

KINDS = ("clip", "t5")
# config.json "model_type" → kind. A full CLIP (image + text) directory is refused: pass its text tower.
_MODEL_TYPES = {"clip_text_model": "clip", "t5": "t5"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model")
_PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# Tokenizers without a limit report this sentinel (int(1e30)) as their model_max_length.
_NO_LIMIT = 10**6


def _transformers_at_least(major: int, minor: int) -> bool:
    import transformers

    parts = transformers.__version__.split(".")
    return (int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)) >= (major, minor)


def _read_config(path: str) -> dict[str, Any]:
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        raise VitditError(
            f"--text-encoder {path}: no config.json (expected a transformers CLIP text model or T5 encoder "
            "directory, as save_pretrained writes it)"
        )
    try:
        with open(cfg) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise VitditError(f"--text-encoder {path}: unreadable config.json ({e})") from e


def _weight_files(path: str) -> list[str]:
    names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not names:
        if any(os.path.isfile(os.path.join(path, n)) for n in _PICKLED_WEIGHTS):
            raise UnsafeCheckpointError(
                f"--text-encoder {path}: only pickle-format weights (.bin), which can run code when loaded; "
                "convert them to safetensors (save_pretrained(safe_serialization=True))"
            )
        raise VitditError(f"--text-encoder {path}: config.json but no .safetensors weights")
    return names


def _tokenizer_dir(path: str) -> str:
    """``path`` when it holds tokenizer files, else the diffusers sibling (text_encoder_3 → tokenizer_3)."""
    if any(os.path.isfile(os.path.join(path, n)) for n in _TOKENIZER_FILES):
        return path
    head, base = os.path.split(os.path.normpath(path))
    if base.startswith("text_encoder"):
        sibling = os.path.join(head, "tokenizer" + base[len("text_encoder") :])
        if any(os.path.isfile(os.path.join(sibling, n)) for n in _TOKENIZER_FILES):
            return sibling
    raise VitditError(
        f"--text-encoder {path}: no tokenizer files ({', '.join(_TOKENIZER_FILES[:2])}) in it "
        "(or in a sibling tokenizer*/ directory); save the tokenizer beside the model with save_pretrained"
    )


def _resolve(path: str) -> tuple[str, str, dict[str, Any], list[str], str]:
    """(absolute path, kind, config, weight file names, tokenizer directory); VitditError when ``path``
    is not a text encoder directory."""
    path = os.path.abspath(os.path.expanduser(path.removeprefix("file://")))
    if not os.path.exists(path):
        raise VitditError(f"--text-encoder {path}: no such file or directory")
    if not os.path.isdir(path):
        raise VitditError(f"--text-encoder {path}: not a directory (expected a transformers text encoder)")
    config = _read_config(path)
    model_type = config.get("model_type")
    kind = _MODEL_TYPES.get(model_type)
    if kind is None:
        what = config.get("_class_name") or model_type or "no model_type"
        raise VitditError(
            f"--text-encoder {path}: config.json describes {what!r}, expected a CLIP text model "
            "(model_type 'clip_text_model') or a T5 encoder (model_type 't5')"
        )
    return path, kind, config, _weight_files(path), _tokenizer_dir(path)


def _weights_sha256(path: str, names: list[str]) -> str:
    """sha256 over the safetensors files (names and bytes): about 5 s per 10 GB, once per job."""
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode())
        with open(os.path.join(path, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _load_tokenizer(path: str, where: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise VitditError(f"--text-encoder {path}: cannot load its tokenizer from {where} ({e})") from e


def _resolve_max_length(path: str, tokenizer, config: dict[str, Any], max_length: int | None) -> int:
    limit = config.get("max_position_embeddings")  # CLIP's learned positions; T5's are relative (none)
    if max_length is None:
        max_length = int(tokenizer.model_max_length)
        if max_length >= _NO_LIMIT:
            if limit is None:
                raise VitditError(
                    f"--text-encoder {path}: its tokenizer sets no length limit; pass --text-max-length "
                    "(Stable Diffusion 3 uses 256 for T5)"
                )
            max_length = int(limit)
    if max_length < 1:
        raise VitditError(f"--text-max-length {max_length}: must be at least 1")
    if limit is not None and max_length > int(limit):
        raise VitditError(
            f"--text-max-length {max_length}: more than the {limit} positions of the text encoder at {path}"
        )
    return max_length


def _widths(kind: str, config: dict[str, Any]) -> tuple[int, int, bool]:
    """(token width, pooled width, projected pooled?) from config.json alone."""
    if kind == "t5":
        return int(config["d_model"]), int(config["d_model"]), False
    projected = "CLIPTextModelWithProjection" in (config.get("architectures") or [])
    hidden = int(config["hidden_size"])
    return hidden, int(config.get("projection_dim", hidden)) if projected else hidden, projected


def describe_text_encoder(path: str, max_length: int | None = None) -> dict[str, Any]:
    """What a latent data set's manifest records about a text encoder, without loading its weights.

    Keys: ``path`` (absolute), ``kind`` ("clip" | "t5"), ``sha256`` (of the safetensors files),
    ``max_length`` (tokens L), ``padding`` ("max_length"), ``width``, ``pooled_width``, ``tokens``
    and ``pooled`` (which outputs were taken). Raises VitditError when ``path`` is not one.
    """
    path, kind, config, weights, tok_dir = _resolve(path)
    tokenizer = _load_tokenizer(path, tok_dir)
    max_length = _resolve_max_length(path, tokenizer, config, max_length)
    return _identity(path, kind, config, _weights_sha256(path, weights), max_length)


def count_truncated(path: str, captions: list[str], max_length: int | None = None) -> int:
    """How many of ``captions`` the tokenizer of the text encoder at ``path`` would cut to its
    ``max_length`` tokens; loads the tokenizer only (a driver checks prompts without the weights)."""
    path, _, config, _, tok_dir = _resolve(path)
    tokenizer = _load_tokenizer(path, tok_dir)
    limit = _resolve_max_length(path, tokenizer, config, max_length)
    ids = tokenizer([str(c) for c in captions], padding=False, truncation=False, verbose=False)["input_ids"]
    return sum(len(i) > limit for i in ids)


def _identity(path: str, kind: str, config: dict[str, Any], sha256: str, max_length: int) -> dict[str, Any]:
    width, pooled_width, projected = _widths(kind, config)
    if kind == "clip":
        tokens, pooled = "hidden_states[-2]", ("text_embeds" if projected else "pooler_output")
    else:
        tokens, pooled = "last_hidden_state", "mean over non-padding tokens"
    return {
        "path": path,
        "kind": kind,
        "sha256": sha256,
        "max_length": max_length,
        "padding": "max_length",
        "width": width,
        "pooled_width": pooled_width,
        "tokens": tokens,
        "pooled": pooled,
    }


class TextEncoder:
    """A frozen CLIP text tower or T5 encoder and its tokenizer, loaded from a local directory.

    ``encode(captions)`` returns ``(tokens N×L×width, pooled N×pooled_width)`` in float32 on
    ``device``; ``L = max_length`` for every caption (padded, or truncated with a warning).
    """

    def __init__(
        self,
        path: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_length: int | None = None,
    ):
        self.path, self._kind, self._config, self._weights, tok_dir = _resolve(path)
        self.tokenizer = _load_tokenizer(self.path, tok_dir)
        self._max_length = _resolve_max_length(self.path, self.tokenizer, self._config, max_length)
        self._width, self._pooled_width, self._projected = _widths(self._kind, self._config)
        self.device = torch.device(device)
        self.model = self._load_model(dtype)
        if self.tokenizer.pad_token_id is None:
            raise VitditError(f"--text-encoder {self.path}: its tokenizer has no padding token")
        self._sha256: str | None = None

    def _load_model(self, dtype: torch.dtype):
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

        if self._kind == "t5":
            cls = T5EncoderModel
        else:
            cls = CLIPTextModelWithProjection if self._projected else CLIPTextModel
        # transformers renamed torch_dtype to dtype in 4.56; older releases ignore an unknown dtype=.
        key = "dtype" if _transformers_at_least(4, 56) else "torch_dtype"
        try:
            model, info = cls.from_pretrained(
                self.path, use_safetensors=True, output_loading_info=True, **{key: dtype}
            )
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise VitditError(f"--text-encoder {self.path}: cannot load a {cls.__name__} ({e})") from e
        # from_pretrained initialises missing weights at random and only warns: a frozen encoder
        # with random layers would silently poison a whole data set.
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            raise VitditError(
                f"--text-encoder {self.path}: its weights lack {len(missing)} tensor(s) a {cls.__name__} "
                f"needs, e.g. {missing[0]!r}"
            )
        return model.to(self.device).eval().requires_grad_(False)

    @property
    def kind(self) -> str:
        """ "clip" or "t5"."""
        return self._kind

    @property
    def width(self) -> int:
        """Width of each token embedding."""
        return self._width

    @property
    def pooled_width(self) -> int:
        """Width of the pooled embedding."""
        return self._pooled_width

    @property
    def max_length(self) -> int:
        """Tokens per caption (L): every caption is padded or truncated to it."""
        return self._max_length

    def identity(self) -> dict[str, Any]:
        """What the manifest records (the same dict as :func:`describe_text_encoder`)."""
        if self._sha256 is None:
            self._sha256 = _weights_sha256(self.path, self._weights)
        return _identity(self.path, self._kind, self._config, self._sha256, self._max_length)

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, np.ndarray]:
        """(token ids N×L, bool N: whether each caption was longer than L tokens and cut)."""
        if isinstance(captions, str):
            raise VitditError("TextEncoder.tokenize: pass a list of captions, not one string")
        captions = [str(c) for c in captions]
        enc = self.tokenizer(
            captions,
            padding="max_length",
            max_length=self._max_length,
            truncation=True,
        )
        # The untruncated lengths: a cut caption is one whose full tokenization does not fit.
        full = self.tokenizer(captions, padding=False, truncation=False, verbose=False)["input_ids"]
        truncated = np.array([len(ids) > self._max_length for ids in full], dtype=bool)
        return torch.tensor(enc["input_ids"], dtype=torch.long), truncated

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens N×L×width, pooled N×pooled_width) float32 of token ids from :meth:`tokenize`."""
        ids = ids.to(self.device)
        if self._kind == "t5":
            tokens = self.model(input_ids=ids).last_hidden_state.float()  # N, L, D
            keep = (ids != self.tokenizer.pad_token_id).unsqueeze(-1).float()  # N, L, 1
            pooled = (tokens * keep).sum(1) / keep.sum(1).clamp(min=1.0)  # N, D
            return tokens, pooled
        out = self.model(input_ids=ids, output_hidden_states=True)
        tokens = out.hidden_states[-2].float()  # N, L, D: the penultimate layer, as SD3
        pooled = (out.text_embeds if self._projected else out.pooler_output).float()  # N, P
        return tokens, pooled

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens N×L×width, pooled N×pooled_width) float32; warns once when captions were cut."""
        ids, truncated = self.tokenize(captions)
        if truncated.any():
            log.warning(
                "%d of %d caption(s) longer than %d tokens were truncated by the %s tokenizer of %s",
                int(truncated.sum()), len(truncated), self._max_length, self._kind, self.path,
            )  # fmt: skip
        return self.encode_ids(ids)
