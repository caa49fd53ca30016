"""A tiny training task for the trainer's own tests: a 2-layer MLP regressing a synthetic target.

Cheap enough that a Ray Train fit costs its start-up and little else, yet it has everything the loop
touches: a Ray data set with train and val, a per-step random input perturbation drawn from the
task's generator, dropout drawn from torch's global RNG, and ``blocks`` for grad checkpointing.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn as nn

from pipelines.train.loop import TrainTask

DIM = 8

# Ray workers cannot import tests/ modules (not on their path): ship this module by value.
import ray.cloudpickle  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class TinyNet(nn.Module):
    def __init__(self, dim: int = DIM, hidden: int = 16):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(0.1))])
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x).squeeze(-1)

    def forward_macs(self) -> int:
        return DIM * 16 + 16


def tiny_arrays(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    w = rng.standard_normal(DIM).astype(np.float32)
    y = (np.sin(x @ w) + 0.1 * x[:, 0]).astype(np.float32)
    return x, y


class TinyTask(TrainTask):
    """Regression on synthetic rows; ``val/loss`` on a held-out set."""

    kind = "tiny"

    def __init__(self, n_train: int = 256, n_val: int = 32, seed: int = 0, start_log: str | None = None):
        self.n_train, self.n_val, self.seed = n_train, n_val, seed
        self.start_log = start_log  # build_model appends a line here: counts worker (re)starts

    def datasets(self):
        import ray.data

        x, y = tiny_arrays(self.n_train + self.n_val, self.seed)
        train = ray.data.from_items(
            [{"x": x[i], "y": y[i]} for i in range(self.n_train)], override_num_blocks=4
        )
        val = ray.data.from_items(
            [{"x": x[i], "y": y[i]} for i in range(self.n_train, self.n_train + self.n_val)]
        )
        return {"train": train, "val": val}

    def build_model(self) -> nn.Module:
        if self.start_log:
            with open(self.start_log, "a") as f:
                f.write("start\n")
        return TinyNet()

    def model_config(self) -> dict:
        return {"model_name": "tiny", "model_config": {"dim": DIM, "hidden": 16}}

    def loss(self, model, batch, generator):
        x = batch["x"].float()
        x = x + 0.01 * torch.randn(x.shape, generator=generator, device=x.device)
        pred = model(x)
        return torch.nn.functional.mse_loss(pred.float(), batch["y"].float()), {}

    def validate(self, model, ema_model, batches):
        losses = [
            torch.nn.functional.mse_loss(ema_model(b["x"].float()).float(), b["y"].float()).item()
            for b in batches
        ]
        return {"val/loss": float(np.mean(losses))} if losses else {}

    def finalize(self, model, ema_model, output_dir):
        return {"params": sum(p.numel() for p in model.parameters())}


def read_train_log(output: str) -> dict[int, float]:
    """{step: train/loss} from a run's train_log.jsonl; fails if a step was logged twice."""
    import json
    import os

    losses: dict[int, float] = {}
    with open(os.path.join(output, "train_log.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "train/loss" in row:
                assert row["step"] not in losses, f"step {row['step']} logged twice"
                losses[row["step"]] = row["train/loss"]
    return losses


def write_digit_latents(
    out_dir: str,
    vae_dir: str,
    n: int = 512,
    flips: bool = False,
    resolution: int = 16,
    part_rows: int | None = None,
) -> str:
    """A latent data set of the real digits (16 px unless told) encoded by a saved diffusers VAE.

    Written in-process with pyarrow in the layout of ``vitdit.latents`` (what ``vitdit encode``
    writes), so DiT tests need no encode job. More rows than the 1,797 digits repeat them under new
    ids (larger-than-memory checks); ``part_rows`` splits the rows into parts of that size (default:
    two halves).
    """
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data.extensions import ArrowTensorArray

    import vitdit
    from vitdit import latents as L
    from vitdit.digits import CLASS_NAMES, digits_arrays
    from vitdit.vae import encode_posterior, load_vae, vae_identity

    images, labels = digits_arrays(resolution)
    images, labels = images[:n], labels[:n]
    vae = load_vae(vae_dir)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # N, 3, R, R in [-1, 1]
    mean, std = encode_posterior(vae, x)
    if n > len(labels):  # the digits again, under new ids
        reps = -(-n // len(labels))
        x = x.repeat(reps, 1, 1, 1)[:n] if flips else x  # only the mirrored latents need it
        labels = np.tile(labels, reps)[:n]
        mean, std = mean.repeat(reps, 1, 1, 1)[:n], std.repeat(reps, 1, 1, 1)[:n]
    width = max(5, len(str(n - 1)))
    columns = {
        L.ID: pa.array([f"digit/{i:0{width}d}.png" for i in range(len(labels))]),
        L.LABEL: pa.array(labels.astype(np.int32)),
        L.MEAN: ArrowTensorArray.from_numpy(mean.numpy().astype(np.float16)),
        L.STD: ArrowTensorArray.from_numpy(std.numpy().astype(np.float16)),
    }
    if flips:
        mean_f, std_f = encode_posterior(vae, x.flip(-1))
        columns[L.MEAN_FLIP] = ArrowTensorArray.from_numpy(mean_f.numpy().astype(np.float16))
        columns[L.STD_FLIP] = ArrowTensorArray.from_numpy(std_f.numpy().astype(np.float16))
    os.makedirs(out_dir, exist_ok=True)
    parts = []
    n = len(labels)
    bounds = [0, n // 2, n] if part_rows is None else [*range(0, n, part_rows), n]
    for p, sl in enumerate(slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])):
        name = f"{L.PART_PREFIX}{p:05d}.parquet"
        pq.write_table(pa.table({k: v[sl] for k, v in columns.items()}), os.path.join(out_dir, name))
        parts.append({"path": name, "num_rows": sl.stop - sl.start})
    manifest = L.Manifest(
        num_rows=n,
        latent_shape=tuple(mean.shape[1:]),
        storage_dtype="float16",
        vae=vae_identity(vae, vae_dir),
        resolution=resolution,
        class_names=list(CLASS_NAMES),
        flips=flips,
        source_uri="sklearn:digits",
        source_fingerprint="digits-test",
        num_quarantined=0,
        parts=parts,
        vitdit_version=vitdit.__version__,
    )
    with open(os.path.join(out_dir, L.MANIFEST_NAME), "w") as f:
        f.write(manifest.to_json())
    return out_dir


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_TEMPLATES = ("{}", "a {}", "digit {}")  # short: the tiny CLIP of the tests has 16 tokens


def write_caption_latents(out_dir: str, vae_dir: str, text_encoder_dir: str | None, n: int = 512) -> str:
    """The digit latents of :func:`write_digit_latents` with captions ("a seven", "digit seven", ...) and,
    given a saved transformers text encoder, their text embeddings: what ``vitdit encode
    [--text-encoder]`` writes (columns, manifest ``text``, ``empty_caption.safetensors``)."""
    import json
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data.extensions import ArrowTensorArray
    from safetensors.torch import save_file

    from vitdit import latents as L
    from vitdit.text import TextEncoder

    write_digit_latents(out_dir, vae_dir, n=n)
    encoder = TextEncoder(text_encoder_dir) if text_encoder_dir else None
    with open(os.path.join(out_dir, L.MANIFEST_NAME)) as f:
        manifest = json.load(f)
    for part in manifest["parts"]:
        path = os.path.join(out_dir, part["path"])
        table = pq.read_table(path)
        labels = table.column(L.LABEL).to_pylist()
        ids = table.column(L.ID).to_pylist()
        captions = [
            CAPTION_TEMPLATES[int(i.split("/")[-1][:5]) % len(CAPTION_TEMPLATES)].format(DIGIT_WORDS[y])
            for i, y in zip(ids, labels)
        ]
        table = table.append_column(L.CAPTION, pa.array(captions))
        if encoder is not None:
            text, pooled = encoder.encode(captions)
            table = table.append_column(
                L.TEXT_EMB, ArrowTensorArray.from_numpy(text.numpy().astype(np.float16))
            )
            table = table.append_column(
                L.POOLED_EMB, ArrowTensorArray.from_numpy(pooled.numpy().astype(np.float16))
            )
        pq.write_table(table, path)
    text_record = None
    if encoder is not None:
        empty_text, empty_pooled = encoder.encode([""])
        save_file(
            {L.TEXT_EMB: empty_text[0].contiguous(), L.POOLED_EMB: empty_pooled[0].contiguous()},
            os.path.join(out_dir, L.EMPTY_CAPTION_NAME),
        )
        text_record = {**encoder.identity(), "empty_caption": L.EMPTY_CAPTION_NAME, "num_truncated": 0}
    manifest.update(format_version=L.FORMAT_VERSION, text=text_record, captioned=n, uncaptioned=0)
    with open(os.path.join(out_dir, L.MANIFEST_NAME), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    return out_dir
