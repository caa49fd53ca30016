"""Text-to-image sampling from an MM-DiT checkpoint: prompts, the text encoder, rectified-flow Euler.

Used by ``vitdit sample`` when the checkpoint is an MM-DiT (``pipelines/sample.py`` dispatches).
Sample i gets prompt ``prompts[i % len(prompts)]`` and label = that prompt's index, so the samples
layout stays the one ``vitdit evaluate`` reads; ``prompts.jsonl`` beside it maps every sample index
to its prompt. Initial noise comes from the sample's own generator seeded by ``(seed, i)`` and the
Euler sampler draws no other noise, so sample i is identical whatever the number of actors.

Each actor loads the MM-DiT, the text encoder that encoded the training captions (recorded in the
checkpoint, or ``--text-encoder``) and the VAE once; classifier-free guidance uses the encoding of
the empty caption, as the trainer's caption dropout did.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np
import torch

from vitdit import samples as layout
from vitdit.errors import VitditError

log = logging.getLogger(__name__)

PROMPTS_NAME = "prompts.jsonl"


def mmdit_checkpoint_info(path: str, config: dict[str, Any]) -> dict[str, Any]:
    """The driver's view of an MM-DiT checkpoint (the same keys as a DiT's ``checkpoint_info``)."""
    return {
        "path": path,
        "kind": "mmdit",
        "model_config": config["model_config"],
        "class_names": config.get("class_names") or [],
        "vae": config.get("vae"),
        "diffusion": config.get("diffusion") or {},
        "text": config.get("text") or {},
        "step": config.get("step"),
        "mlflow": config.get("mlflow"),
    }


def read_prompts(prompts: tuple[str, ...], prompts_file: str | None) -> list[str]:
    """``--prompt`` values, then the lines of ``--prompts-file`` (plain text, or .jsonl with "prompt")."""
    out = [p for p in prompts]
    if prompts_file:
        if not os.path.isfile(prompts_file):
            raise VitditError(f"--prompts-file {prompts_file}: no such file")
        with open(prompts_file, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                if prompts_file.endswith(".jsonl"):
                    try:
                        out.append(str(json.loads(line)["prompt"]))
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise VitditError(
                            f"--prompts-file {prompts_file}: line {n} is not a JSON object with a "
                            f'"prompt" key ({e})'
                        ) from e
                else:
                    out.append(line)
    if not out:
        raise VitditError("an MM-DiT checkpoint samples from text: give --prompt TEXT or --prompts-file FILE")
    return out


def resolve_text_encoder(info: dict[str, Any], override: str | None) -> str | None:
    """The text encoder directory: ``--text-encoder``, else the one that encoded the training data;
    None for a model with its own text tower (its tokenizer is in the checkpoint)."""
    if (info.get("text") or {}).get("kind") == "own":
        if override:
            raise VitditError(
                f"--text-encoder {override}: the checkpoint {info['path']} trained its own text tower, "
                "which is in the checkpoint; leave --text-encoder out"
            )
        return None
    path = override or (info.get("text") or {}).get("path")
    if not path:
        raise VitditError(f"--checkpoint {info['path']}: records no text encoder; pass --text-encoder PATH")
    if not os.path.isdir(path):
        raise VitditError(
            f"text encoder {path}: not a directory (the checkpoint's encoder moved? pass --text-encoder PATH)"
        )
    return path


def warn_truncated(info: dict[str, Any], text_encoder: str | None, prompts: list[str]) -> int:
    """Log one warning when prompts are longer than the encoder's limit (they are truncated, as the
    training captions were); returns how many."""
    text = info.get("text") or {}
    max_length = text.get("max_length")
    if text_encoder is None:  # the checkpoint's own tokenizer
        from vitdit.captions import CaptionTokenizer

        _, cut = CaptionTokenizer(text["tokenizer"], int(max_length)).ids_numpy(prompts)
    else:
        from vitdit.text import count_truncated

        cut = count_truncated(text_encoder, prompts, max_length)
    if cut:
        log.warning(
            "%d of %d prompt(s) are longer than the text encoder's %s tokens and are truncated",
            cut, len(prompts), max_length or "maximum",
        )  # fmt: skip
    return cut


def write_prompts_file(output: str, prompts: list[str], num_samples: int) -> str:
    """``prompts.jsonl``: one line per sample, {"index", "label", "prompt"}, written atomically."""
    path = os.path.join(output, PROMPTS_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(num_samples):
            k = i % len(prompts)
            f.write(json.dumps({"index": i, "label": k, "prompt": prompts[k]}) + "\n")
    os.replace(tmp, path)
    return path


class PromptSampleGenerator:
    """Ray Data actor: chunk ids in, {"index", "label", "image" (uint8 N×H×W×3)} out, for an MM-DiT.

    Also usable without Ray (``generate(indices)``).
    """

    def __init__(
        self, config: dict[str, Any], vae_name: str, vae_factors: dict[str, Any], classes: list[int]
    ):
        import ray

        from pipelines.runtime import set_torch_threads
        from pipelines.sample import SampleConfig, _autocast_dtype
        from vitdit.checkpoint import load_model
        from vitdit.text import TextEncoder
        from vitdit.vae import load_vae

        if ray.is_initialized():  # inside an actor: the CPUs it was given
            set_torch_threads()
        self.cfg = SampleConfig(**config)
        self.device = torch.device("cuda" if self.cfg.use_gpu and torch.cuda.is_available() else "cpu")
        self.prompts = list(self.cfg.prompt)
        self.classes = list(classes)
        model, ckpt_config = load_model(self.cfg.checkpoint, use_ema=self.cfg.ema)
        self.model = model.to(self.device).eval()
        self.shift = (
            self.cfg.shift
            if self.cfg.shift is not None
            else (ckpt_config.get("diffusion") or {}).get("shift", 1.0)
        )
        self.vae = load_vae(vae_name, device=self.device)
        self.vae_factors = vae_factors
        text = ckpt_config.get("text") or {}
        # The caption length the training data was encoded at (an --text-max-length of encode).
        max_length = text.get("max_length")
        with torch.no_grad():
            # All prompts once (a sampling job has few distinct prompts), and the empty caption.
            if text.get("kind") == "own":  # the tower trained with the model, its tokenizer
                from vitdit.captions import CaptionTokenizer

                tok = CaptionTokenizer(text["tokenizer"], int(max_length))
                self.text, self.pooled = self.model.encode_text(tok(self.prompts).to(self.device))
                self.empty_text, self.empty_pooled = self.model.encode_text(tok([""]).to(self.device))
                self.model = self.model.mmdit  # the image model, fed the embeddings below
            else:
                encoder = TextEncoder(self.cfg.text_encoder, device=self.device, max_length=max_length)
                self.text, self.pooled = encoder.encode(self.prompts)  # P, L, D ; P, Dp
                self.empty_text, self.empty_pooled = encoder.encode([""])  # 1, L, D ; 1, Dp
                del encoder
        self.autocast = _autocast_dtype(self.cfg.precision, self.device)

    def _velocity(self, text: torch.Tensor, pooled: torch.Tensor):
        from vitdit.diffusion.flow import cfg_velocity

        model, scale = self.model, self.cfg.cfg_scale

        def plain(x, t, c):
            with torch.autocast(
                self.device.type, dtype=self.autocast or torch.float32, enabled=bool(self.autocast)
            ):
                return model(x, t, *c).float()

        if scale == 1.0:
            return lambda x, t: plain(x, t, (text, pooled))
        n = text.shape[0]
        uncond = (self.empty_text.expand(n, -1, -1), self.empty_pooled.expand(n, -1))
        return lambda x, t: cfg_velocity(plain, x, t, (text, pooled), uncond, scale)

    @torch.no_grad()
    def generate(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images N×H×W×3 and labels (prompt indices) of the given sample indices."""
        from pipelines.sample import sample_seed
        from vitdit.diffusion.flow import euler_sample
        from vitdit.vae import decode_latents

        mc = self.model.config
        indices = [int(i) for i in indices]
        labels = np.array([layout.label_for_index(i, self.classes) for i in indices], dtype=np.int64)
        gens = [torch.Generator().manual_seed(sample_seed(self.cfg.seed, i)) for i in indices]
        shape = (mc.in_channels, mc.input_size, mc.input_size)
        noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(self.device)  # N, C, h, w
        idx = torch.from_numpy(labels)
        text, pooled = self.text[idx].to(self.device), self.pooled[idx].to(self.device)  # N, L, D ; N, Dp
        z = euler_sample(self._velocity(text, pooled), noise, self.cfg.sampling_steps, shift=self.shift)
        images = decode_latents(self.vae, z, self.vae_factors)  # N, 3, H, W in [-1, 1]
        return layout.to_uint8(images), labels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipelines.sample import generate_chunks

        return generate_chunks(self, batch)
