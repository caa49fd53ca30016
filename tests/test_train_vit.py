"""ViT training: augmentation, bf16 vs fp32 agreement, and a real Ray Train run on the digits."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from _tolerance import MARGIN, U_FP32

from pipelines.train.loop import TrainConfig
from pipelines.train.vit import ViTTask, ViTTaskConfig, random_resized_crop, to_model_input
from vitdit.digits import CLASS_NAMES, digits_arrays, split_indices
from vitdit.errors import VitditError
from vitdit.precision import LOSS_RTOL


def _images(n: int = 8, r: int = 16, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (n, r, r, 3), dtype=np.uint8))


def test_to_model_input_range_and_layout():
    x = to_model_input(_images())
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    with pytest.raises(VitditError, match="uint8"):
        to_model_input(torch.zeros(2, 16, 16, 3))


def test_random_resized_crop_is_seeded_and_full_scale_is_identity():
    x = to_model_input(_images())
    a = random_resized_crop(x, torch.Generator().manual_seed(1))
    b = random_resized_crop(x, torch.Generator().manual_seed(1))
    c = random_resized_crop(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b), "the same generator seed must give the same crops (exact resume)"
    assert not torch.allclose(a, c)
    # Bilinear sampling in fp32 of values in [-1, 1]: a convex combination, off by a few roundings.
    assert a.shape == x.shape and a.min() >= -1.0 - 4 * U_FP32 and a.max() <= 1.0 + 4 * U_FP32
    # Scale 1 and aspect 1 is the whole image: no crop, and without --hflip no mirroring.
    same = random_resized_crop(x, torch.Generator().manual_seed(3), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    # Sampling coordinates up to 16 px carry ~4u·16 px of fp32 error, times neighbouring pixels'
    # difference (at most 2), with the tests' margin of 8 (tests/_tolerance.py).
    crop_atol = MARGIN * 4 * 16 * 2 * U_FP32
    torch.testing.assert_close(same, x, atol=crop_atol, rtol=0)
    flipped = random_resized_crop(
        x, torch.Generator().manual_seed(3), scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=True
    )
    mirrored = [torch.allclose(flipped[i], x[i].flip(-1), atol=crop_atol) for i in range(len(x))]
    kept = [torch.allclose(flipped[i], x[i], atol=crop_atol) for i in range(len(x))]
    assert any(mirrored) and any(kept) and all(m or k for m, k in zip(mirrored, kept))


def test_task_rejects_bad_flags(tmp_path):
    train_cfg = TrainConfig(output=str(tmp_path))
    with pytest.raises(VitditError, match="patch size"):
        ViTTask(ViTTaskConfig(images="x", model="ViT-test/4", resolution=18), train_cfg)
    with pytest.raises(VitditError, match="--model"):
        ViTTask(ViTTaskConfig(images="x", model="ViT-nope"), train_cfg)
    with pytest.raises(VitditError, match="not a ViT"):
        ViTTask(ViTTaskConfig(images="x", model="DiT-test/2"), train_cfg)


def _digits_task(tmp_path) -> tuple[ViTTask, torch.Tensor, torch.Tensor]:
    task = ViTTask(ViTTaskConfig(images="unused", model="ViT-test/4"), TrainConfig(output=str(tmp_path)))
    task.class_names = list(CLASS_NAMES)
    images, labels = digits_arrays(16)
    train, _ = split_indices(labels)
    return task, torch.from_numpy(images[train]), torch.from_numpy(labels[train])


def _train_losses(task: ViTTask, images, labels, precision: str, steps: int, batch: int = 32) -> list[float]:
    """The loop's step (seeded init, autocast for bf16 with the CPU's math attention path), in-process."""
    from vitdit.models.layers import set_attn_impl

    torch.manual_seed(0)
    model = task.build_model()
    if precision == "bf16":
        set_attn_impl(model, "math")  # what the loop does for bf16 on a CPU
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        idx = torch.arange(step * batch, (step + 1) * batch) % len(images)
        gen = torch.Generator().manual_seed(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss, _ = task.loss(model, {"image": images[idx], "label": labels[idx]}, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_bf16_and_fp32_losses_agree(tmp_path):
    """The default precision on a CPU with bf16 matrix units is bf16: it must train like fp32."""
    task, images, labels = _digits_task(tmp_path)
    fp32 = np.array(_train_losses(task, images, labels, "fp32", steps=30))
    bf16 = np.array(_train_losses(task, images, labels, "bf16", steps=30))
    print("fp32", fp32.round(4).tolist(), "\nbf16", bf16.round(4).tolist())
    # Same data, same init: the curves track each other step by step (bf16 rounding only). Behaviour
    # bounds over 30 steps, not rounding bounds: the 5% the precision probe allows (LOSS_RTOL) of a
    # loss near 1 per step, less on the mean of the last five.
    assert np.abs(fp32 - bf16).max() < LOSS_RTOL, np.abs(fp32 - bf16)
    assert abs(fp32[-5:].mean() - bf16[-5:].mean()) < 0.02
    assert fp32[-5:].mean() < fp32[:5].mean() - 0.01, "fp32 did not learn"
    assert bf16[-5:].mean() < bf16[:5].mean() - 0.01, "bf16 did not learn"


@pytest.mark.ray
def test_train_vit_on_digits_learns_and_records_classes(ray_session, digits_root, tmp_path):
    from mlflow.tracking import MlflowClient

    from jobs._common import dataclass_from_args
    from jobs.train_vit import build_parser, train_vit
    from vitdit.checkpoint import load_model, read_config

    out = tmp_path / "run"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = build_parser().parse_args(
        ["--images", digits_root, "--model", "ViT-digits/4", "--output", str(out), "--steps", "92",
         "--global-batch-size", "64", "--lr", "1e-3", "--warmup-steps", "40", "--lr-schedule", "constant",
         "--checkpoint-every", "92", "--log-every", "10", "--tracking-uri", tracking]
    )  # fmt: skip
    assert args.eval_every is None and args.ema_decay == 0.0 and args.label_smoothing == 0.1
    assert args.hflip is False
    result = train_vit(dataclass_from_args(ViTTaskConfig, args), dataclass_from_args(TrainConfig, args))
    assert result.final_step == 92

    # Validation every epoch (1,437 training digits / 64 = 23 steps) and at the end.
    rows = [json.loads(line) for line in open(out / "train_log.jsonl")]
    val = [r for r in rows if "val/accuracy" in r]
    assert [r["step"] for r in val] == [23, 46, 69, 92]
    # Chance is 0.10 (±0.016 on 360 images). With a 10-step warmup at lr 1e-3 the ViT collapsed to
    # the uniform prediction (loss ln 10) in one run; a 40-step warmup reached 0.35 by step 92.
    assert val[-1]["val/accuracy"] > 0.15, val
    assert val[-1]["val/loss"] < val[0]["val/loss"] - 0.1, val
    train = [r["train/loss"] for r in rows if "train/loss" in r]
    assert train[-1] < train[0] - 0.1

    client = MlflowClient(tracking)
    history = client.get_metric_history(result.run_id, "val/accuracy")
    assert sorted(m.step for m in history) == [23, 46, 69, 92]
    assert client.get_metric_history(result.run_id, "val/loss")

    ckpt = os.path.join(out, "checkpoint_00000092")
    config = read_config(ckpt)
    assert config["kind"] == "vit" and config["class_names"] == CLASS_NAMES
    assert config["model_config"]["num_classes"] == 10 and config["model_name"] == "ViT-digits/4"
    assert config["dataset"]["uri"].rstrip("/").endswith("train")
    model, _ = load_model(ckpt, use_ema=False)
    images, labels = digits_arrays(16)
    _, val_idx = split_indices(labels)
    with torch.no_grad():
        pred = model.eval()(to_model_input(torch.from_numpy(images[val_idx]))).argmax(-1).numpy()
    # The reloaded checkpoint scores what the run logged (bf16 in training vs fp32 here: ±2%).
    assert abs((pred == labels[val_idx]).mean() - val[-1]["val/accuracy"]) < 0.02


def test_shuffled_chunks_mix_classes_and_keep_every_file(digits_root):
    """A class-sorted folder listing is permuted, so the trainer's local shuffle sees mixed batches."""
    from pipelines.images import read_image_source
    from pipelines.train.vit import shuffled_chunks

    source = read_image_source(os.path.join(digits_root, "train"))
    chunks = shuffled_chunks(source.chunks, seed=0, files_per_chunk=256)
    triplets = lambda cs: sorted(t for c in cs for t in zip(c.ids, c.labels, c.members))
    assert triplets(chunks) == triplets(source.chunks)
    assert [c.index for c in chunks] == list(range(len(chunks))) and len(chunks[0].ids) == 256
    first_batch = chunks[0].labels[:64]
    assert len(set(source.chunks[0].labels[:64])) == 1  # the sorted listing: one class per batch
    assert len(set(first_batch)) >= 8
    assert triplets(shuffled_chunks(source.chunks, seed=0)) == triplets(chunks)
    assert chunks[0].ids == shuffled_chunks(source.chunks, seed=0)[0].ids  # seeded: exact resume
    assert chunks[0].ids != shuffled_chunks(source.chunks, seed=1)[0].ids


class _CountingShard:
    """A stand-in for a Ray Data shard (unit test of the cache only): counts executions."""

    def __init__(self, rows: int):
        self.rows, self.executions = rows, 0

    def iter_torch_batches(self, batch_size: int):
        self.executions += 1
        for start in range(0, self.rows, batch_size):
            n = min(batch_size, self.rows - start)
            yield {"label": torch.arange(start, start + n)}


def test_small_validation_set_is_read_once_and_large_one_streams():
    from pipelines.train.loop import _ValidationBatches

    small = _CountingShard(rows=10)
    val = _ValidationBatches(small, micro=4, cache_rows=10)
    first = [b["label"].tolist() for b in val]
    second = [b["label"].tolist() for b in val]
    assert first == second == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert small.executions == 1

    big = _CountingShard(rows=11)
    val = _ValidationBatches(big, micro=4, cache_rows=10)
    assert [len(b["label"]) for b in val] == [4, 4, 3]
    assert [len(b["label"]) for b in val] == [4, 4, 3]
    # Too big to keep: the first read gives up at cache_rows, then every validation streams.
    assert big.executions == 3
