"""MM-DiT (Stable Diffusion 3's transformer) training on a captioned latent data set, rectified flow.

Each step samples ``z = mean + std·ε`` from the stored VAE posterior (a random flip when the data set
has flips), scales it with the manifest's VAE factors, draws t from the flow's t-sampling (SD3:
logit-normal) and regresses the velocity ``ε − x₀`` of ``x_t = (1 − t)·x₀ + t·ε`` (``vitdit.diffusion.flow``).
The text condition comes one of two ways:

- a data set encoded with ``--text-encoder``: the pre-computed ``text_emb`` (tokens × width) and
  ``pooled_emb``; the empty caption's pair is ``empty_caption.safetensors`` of the data set;
- a data set with captions only: a text tower of its own (``vitdit.models.text_tower``: a small CLIP
  text transformer, randomly initialised) trained with the MM-DiT, on token ids of a word-level
  tokenizer built here from the training captions and saved in every checkpoint's config.json.

With probability ``--caption-dropout-prob`` a sample's condition is replaced by the empty caption's:
what classifier-free guidance later subtracts (SD3's negative prompt is the encoding of "", not zeros).

Validation: the flow loss on held-out latents at fixed noise and t, and a fixed-seed Euler sample
grid of the EMA model for fixed prompts (the first distinct captions of the data set; with stored
embeddings those are used, so the trainer never loads the text encoder), decoded with the VAE.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from pipelines.train.latent_grid import LatentGridMixin
from pipelines.train.loop import TrainTask
from vitdit.errors import VitditError
from vitdit.latents import CAPTION, FLIP_COLUMNS, ID, MEAN, POOLED_EMB, STD, TEXT_EMB

log = logging.getLogger(__name__)

_T_SAMPLINGS = ["logit_normal", "uniform", "mode"]
_WEIGHTINGS = ["none", "sigma_sqrt", "cosmap"]


@dataclasses.dataclass
class MMDiTTrainConfig:
    """Flags of ``vitdit train mmdit`` beyond the shared training flags."""

    latents: str = dataclasses.field(
        metadata={
            "help": "captioned latent data set; with `vitdit encode --text-encoder PATH` the model uses "
            "its embeddings, else it trains a text tower of its own on the captions"
        }
    )
    model: str = dataclasses.field(
        default="MMDiT-digits", metadata={"help": "MM-DiT preset, e.g. SD3-Medium (`vitdit models`)"}
    )
    val_latents: str | None = dataclasses.field(
        default=None,
        metadata={"help": "held-out latent data set (default: a --val-fraction slice of --latents)"},
    )
    val_fraction: float = dataclasses.field(
        default=0.05, metadata={"help": "share of rows held out (by id hash) when --val-latents is not given"}
    )
    caption_dropout_prob: float = dataclasses.field(
        default=0.1, metadata={"help": "chance a sample trains on the empty caption (for guidance)"}
    )
    t_sampling: str = dataclasses.field(
        default="logit_normal", metadata={"choices": _T_SAMPLINGS, "help": "how flow times t are drawn"}
    )
    logit_mean: float = dataclasses.field(default=0.0, metadata={"help": "logit-normal location m"})
    logit_std: float = dataclasses.field(default=1.0, metadata={"help": "logit-normal scale s"})
    shift: float = dataclasses.field(
        default=1.0, metadata={"help": "time shift α: t ← αt / (1 + (α − 1)t), for training and the grid"}
    )
    weighting: str = dataclasses.field(
        default="none", metadata={"choices": _WEIGHTINGS, "help": "loss weighting over t"}
    )
    text_max_length: int = dataclasses.field(
        default=16, metadata={"help": "own text tower: tokens per caption, [BOS] and [EOS] included"}
    )
    text_width: int = dataclasses.field(default=64, metadata={"help": "own text tower: width"})
    text_layers: int = dataclasses.field(default=2, metadata={"help": "own text tower: transformer layers"})
    text_heads: int = dataclasses.field(default=4, metadata={"help": "own text tower: attention heads"})
    vae: str | None = dataclasses.field(
        default=None, metadata={"help": "VAE to decode the sample grid (default: the manifest's)"}
    )
    grid_samples: int = dataclasses.field(
        default=8, metadata={"help": "samples in the logged grid (one per fixed prompt); 0 turns it off"}
    )
    grid_steps: int = dataclasses.field(default=20, metadata={"help": "Euler steps of the sample grid"})
    grid_cfg_scale: float = dataclasses.field(default=4.0, metadata={"help": "guidance scale of the grid"})


def _read_prompt_rows(latents: str, manifest, n: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The first ``n`` distinct non-empty captions of a data set with their stored embeddings."""
    import pyarrow.parquet as pq

    from pipelines.latents import _tensor_column_to_numpy, part_paths
    from vitdit.latents import CAPTION

    fs, paths = part_paths(latents, manifest)
    tokens, width = manifest.text_shape
    pooled = manifest.pooled_width
    captions: list[str] = []
    text, pool = [], []
    for path in paths:
        table = pq.read_table(path, filesystem=fs, columns=[CAPTION, TEXT_EMB, POOLED_EMB])
        caps = table.column(CAPTION).to_pylist()
        emb = _tensor_column_to_numpy(table.column(TEXT_EMB).combine_chunks(), (tokens, width))
        pe = _tensor_column_to_numpy(table.column(POOLED_EMB).combine_chunks(), (pooled,))
        for i, c in enumerate(caps):
            if c and c not in captions:
                captions.append(c)
                text.append(emb[i].astype(np.float32))
                pool.append(pe[i].astype(np.float32))
                if len(captions) == n:
                    return captions, np.stack(text), np.stack(pool)
    if not captions:
        return [], np.zeros((0, tokens, width), np.float32), np.zeros((0, pooled), np.float32)
    return captions, np.stack(text), np.stack(pool)


def _velocity(model: nn.Module, cond: tuple[torch.Tensor, ...]):
    """The model as a velocity function of (x_t, t) under one text condition: (text, pooled)
    embeddings, or (input_ids,) for a model with its own text tower."""
    return lambda x, t: model(x, t, *cond)


def _first_captions(captions: list[str], n: int) -> list[str]:
    return list(dict.fromkeys(c for c in captions if c))[:n]


class MMDiTTask(LatentGridMixin, TrainTask):
    """An MM-DiT on the latents and text embeddings of one data set (see the module docstring)."""

    kind = "mmdit"

    def __init__(self, args: MMDiTTrainConfig):
        from pipelines.latents import read_empty_caption, read_manifest
        from vitdit.models import get_preset, list_models

        if args.model not in list_models("mmdit"):
            raise VitditError(
                f"--model {args.model!r}: not an MM-DiT preset; choose one of {list_models('mmdit')}"
            )
        if not 0.0 <= args.val_fraction < 1.0:
            raise VitditError(f"--val-fraction {args.val_fraction}: must be in [0, 1)")
        if not 0.0 <= args.caption_dropout_prob < 1.0:
            raise VitditError(f"--caption-dropout-prob {args.caption_dropout_prob}: must be in [0, 1)")
        self.args = args
        self.manifest = read_manifest(args.latents)
        m = self.manifest
        self.own_tower = not m.text
        if self.own_tower and not m.captioned:
            raise VitditError(
                f"--latents {args.latents}: has no captions and no text embeddings; put a caption beside "
                "each image (<name>.txt) and encode again, optionally with `--text-encoder PATH`"
            )
        self.num_train_rows: int | None = m.num_rows
        self.val_manifest = read_manifest(args.val_latents) if args.val_latents else None
        if self.val_manifest is not None:
            self.val_manifest.check_compatible(
                vae=m.vae, latent_shape=tuple(m.latent_shape), where=args.val_latents
            )
            if (self.val_manifest.text or {}).get("sha256") != (m.text or {}).get("sha256"):
                raise VitditError(f"--val-latents {args.val_latents}: made with another text encoder")
        c, h, w = m.latent_shape
        if h != w:
            raise VitditError(f"--latents {args.latents}: latents {h}×{w} are not square")
        if self.own_tower:
            self._init_own_tower(args)
            tokens, width, pooled_width = args.text_max_length, args.text_width, args.text_width
        else:
            empty = read_empty_caption(args.latents)
            if empty is None:
                raise VitditError(f"--latents {args.latents}: the empty caption's embedding file is missing")
            self.empty_cond = tuple(e.float() for e in empty)  # (L×D, P)
            (tokens, width), pooled_width = m.text_shape, m.pooled_width
        # The data decides the sizes the text enters with: the preset's text widths are defaults
        # for `vitdit models`, the encoder that made the data set is what the model must accept.
        self.model_cfg = get_preset(
            args.model,
            input_size=h,
            in_channels=c,
            out_channels=c,
            context_dim=width,
            pooled_dim=pooled_width,
            context_len=tokens,
        )
        self.flow_settings = {
            "objective": "flow",
            "t_sampling": args.t_sampling,
            "logit_mean": args.logit_mean,
            "logit_std": args.logit_std,
            "shift": args.shift,
            "weighting": args.weighting,
        }
        self.grid_prompts: list[str] = []
        self.grid_cond: tuple[torch.Tensor, ...] | None = None
        if args.grid_samples > 0 and self.own_tower:
            self.grid_prompts = _first_captions(self._captions, args.grid_samples)
            self.grid_cond = (self._tokenizer()(self.grid_prompts),) if self.grid_prompts else None
        elif args.grid_samples > 0:
            prompts, text, pooled = _read_prompt_rows(args.latents, m, args.grid_samples)
            self.grid_prompts = prompts
            self.grid_cond = (torch.from_numpy(text), torch.from_numpy(pooled)) if prompts else None
        self._captions = None  # only needed to build the tokenizer: not shipped to the workers
        self._flow = None

    def _init_own_tower(self, args: MMDiTTrainConfig) -> None:
        """The tokenizer (from every caption of the training data) and the tower's config."""
        from pipelines.latents import read_captions
        from vitdit.captions import build_tokenizer_json
        from vitdit.models.text_tower import TextTowerConfig

        for flag, value in (("--text-max-length", args.text_max_length), ("--text-width", args.text_width)):
            if value < 2:
                raise VitditError(f"{flag} {value}: must be at least 2")
        if args.text_width % args.text_heads:
            raise VitditError(
                f"--text-width {args.text_width}: not divisible by --text-heads {args.text_heads}"
            )
        self._captions = read_captions(args.latents, self.manifest)
        self.tokenizer_json = build_tokenizer_json(self._captions)
        tok = self._tokenizer()
        self.tower_cfg = TextTowerConfig(
            vocab_size=tok.vocab_size,
            max_length=args.text_max_length,
            hidden_size=args.text_width,
            num_layers=args.text_layers,
            num_heads=args.text_heads,
        )
        ids, cut = tok.ids_numpy(self._captions)
        if cut:
            log.warning(
                "%d of %d caption(s) are longer than --text-max-length %d tokens and are truncated",
                cut, len(self._captions), args.text_max_length,
            )  # fmt: skip
        self.num_truncated = int(cut)
        self.empty_cond = (tok([""]),)  # (1×L ids,)

    def _tokenizer(self):
        from vitdit.captions import CaptionTokenizer

        return CaptionTokenizer(self.tokenizer_json, self.args.text_max_length)

    # driver side ------------------------------------------------------------------------------

    def _text_columns(self) -> list[str]:
        return [CAPTION] if self.own_tower else [TEXT_EMB, POOLED_EMB]

    def datasets(self) -> dict[str, Any]:
        from pipelines.latents import SplitById, TokenizeCaptions, read_latents

        cols = [MEAN, STD, *self._text_columns(), *(FLIP_COLUMNS if self.manifest.flips else ())]
        val_cols = [MEAN, STD, *self._text_columns()]
        if self.args.val_latents:
            train, _ = read_latents(self.args.latents, columns=cols)
            val, _ = read_latents(self.args.val_latents, columns=val_cols)
            out = {"train": train.randomize_block_order(seed=0), "val": val}
        elif self.args.val_fraction <= 0:
            train, _ = read_latents(self.args.latents, columns=cols)
            out = {"train": train.randomize_block_order(seed=0)}
        else:
            full, _ = read_latents(self.args.latents, columns=[ID, *cols])
            train = full.randomize_block_order(seed=0).map_batches(
                SplitById(self.args.val_fraction, want_val=False)
            )
            val = full.map_batches(SplitById(self.args.val_fraction, want_val=True)).select_columns(val_cols)
            out = {"train": train, "val": val}
        if self.own_tower:  # captions → token ids in the Ray Data stream (strings never reach torch)
            tokenize = TokenizeCaptions(self.tokenizer_json, self.args.text_max_length)
            out = {k: ds.map_batches(tokenize) for k, ds in out.items()}
        return out

    def model_config(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "model_name": self.args.model,
            "model_config": dataclasses.asdict(self.model_cfg),
            "class_names": list(m.class_names),
            "diffusion": dict(self.flow_settings),
            "text": self._text_record(),
            "caption_dropout_prob": self.args.caption_dropout_prob,
            "grid_prompts": list(self.grid_prompts),
            "dataset": self.dataset_record(),
            "vae": dataclasses.asdict(m.vae),
        }

    def _text_record(self) -> dict[str, Any]:
        """config.json "text": the data set's encoder, or the own tower with its tokenizer."""
        if not self.own_tower:
            return dict(self.manifest.text)
        from vitdit.models.text_tower import TOWER_KIND

        return {
            "kind": TOWER_KIND,
            "tokenizer": self.tokenizer_json,
            "max_length": self.args.text_max_length,
            "tower": dataclasses.asdict(self.tower_cfg),
            "num_truncated": self.num_truncated,
        }

    # worker side ------------------------------------------------------------------------------

    @property
    def flow(self):
        if self._flow is None:
            from vitdit.diffusion.flow import RectifiedFlow

            s = self.flow_settings
            self._flow = RectifiedFlow(
                t_sampling=s["t_sampling"],
                logit_mean=s["logit_mean"],
                logit_std=s["logit_std"],
                shift=s["shift"],
                weighting=s["weighting"],
            )
        return self._flow

    def build_model(self) -> nn.Module:
        if self.own_tower:
            from vitdit.models.text_tower import TextConditionedMMDiT

            return TextConditionedMMDiT(self.model_cfg, self.tower_cfg)
        from vitdit.models import model_from_config

        return model_from_config(self.model_cfg)

    def _inputs(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator, dropout: float
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """x0 = (mean + std·ε − shift)·scale (random flip when stored), and the text condition with
        each sample's caption replaced by the empty one with probability ``dropout``."""

        x0 = self.sample_x0(batch, generator)
        device = x0.device
        if self.own_tower:
            from vitdit.captions import INPUT_IDS

            cond: tuple[torch.Tensor, ...] = (batch[INPUT_IDS].long(),)  # B, L
        else:
            cond = (batch[TEXT_EMB].float(), batch[POOLED_EMB].float())  # B, L, D ; B, P
        if dropout > 0:
            drop = torch.rand(x0.shape[0], generator=generator, device=device) < dropout
            cond = tuple(
                torch.where(drop.view(-1, *([1] * (c.dim() - 1))), e.to(device).reshape(c.shape[1:]), c)
                for c, e in zip(cond, self.empty_cond)
            )
        return x0, cond

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        x0, cond = self._inputs(batch, generator, self.args.caption_dropout_prob)
        terms = self.flow.training_losses(_velocity(model, cond), x0, generator=generator)
        return terms["loss"].mean(), {"mse": float(terms["mse"].mean().detach())}

    @torch.no_grad()
    def validate(self, model: nn.Module, ema_model: nn.Module, batches: Iterable[dict]) -> dict[str, float]:
        """Flow loss of the model and of its EMA on held-out latents at fixed noise and t."""
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(1234)
        totals = {"val/loss": 0.0, "val/mse": 0.0, "val/loss_ema": 0.0}
        n = 0
        for batch in batches:
            x0, cond = self._inputs(batch, generator, 0.0)
            t = self.flow.sample_t(x0.shape[0], device=device, generator=generator)
            noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
            terms = self.flow.training_losses(_velocity(model, cond), x0, noise=noise, t=t)
            ema = self.flow.training_losses(_velocity(ema_model, cond), x0, noise=noise, t=t)
            totals["val/loss"] += float(terms["loss"].float().sum())
            totals["val/mse"] += float(terms["mse"].float().sum())
            totals["val/loss_ema"] += float(ema["loss"].float().sum())
            n += x0.shape[0]
        return {k: v / n for k, v in totals.items()} if n else {}

    def visualize(self, ema_model: nn.Module, step: int):
        """A fixed-seed Euler grid of the EMA model, one sample per fixed prompt, VAE-decoded."""
        if self.grid_cond is None:
            return None
        vae = self._load_vae()
        if vae is None:
            return None
        from vitdit.diffusion.flow import cfg_velocity, euler_sample
        from vitdit.vae import decode_latents

        device = next(ema_model.parameters()).device
        cfg = self.model_cfg
        n = len(self.grid_prompts)
        generator = torch.Generator(device=device).manual_seed(0)
        noise = torch.randn(
            (n, cfg.in_channels, cfg.input_size, cfg.input_size), generator=generator, device=device
        )
        cond = tuple(c.to(device) for c in self.grid_cond)
        uncond = tuple(
            e.to(device).reshape(1, *c.shape[1:]).expand_as(c) for c, e in zip(cond, self.empty_cond)
        )

        def velocity(x, t):
            return cfg_velocity(
                lambda xx, tt, c: ema_model(xx, tt, *c), x, t, cond, uncond, self.args.grid_cfg_scale
            )

        with torch.autocast(device_type=device.type, enabled=False):
            z = euler_sample(velocity, noise.float(), self.args.grid_steps, shift=self.args.shift)
            images = decode_latents(vae, z, self.manifest.vae)
        from vitdit.samples import labeled_grid

        return labeled_grid(images, self.grid_prompts[:n])  # a row per prompt, the prompt beside it

    def batch_columns(self) -> list[str] | None:
        return None  # datasets() already selected the tensor columns
