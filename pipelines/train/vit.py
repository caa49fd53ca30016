"""ViT classification on images: the ``TrainTask`` behind ``vitdit train vit``.

Images go through the pipeline's CPU preprocessing stage (Ray Data: decode → RGB → ADM centre crop
→ resize, uint8 N×R×R×3); the train-time augmentation (random resized crop, optional flip) runs in
the training worker on each batch, seeded by the loop's generator, so a resumed run repeats it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.train.loop import TrainConfig, TrainTask
from vitdit.errors import VitditError


@dataclasses.dataclass
class ViTTaskConfig:
    """Flags of ``vitdit train vit`` beyond the shared training flags."""

    images: str = dataclasses.field(
        metadata={"help": "image source (folder, .tar shards, parquet; local path or URI); "
                  "its train/ split when it has train/ and val/"}
    )  # fmt: skip
    model: str = dataclasses.field(default="ViT-S/16", metadata={"help": "ViT preset name"})
    val_images: str | None = dataclasses.field(
        default=None,
        metadata={"help": "validation images (default: <images>/val when it has train/ and val/)"},
    )
    resolution: int | None = dataclasses.field(
        default=None, metadata={"help": "image side in pixels (default: the preset's image_size)"}
    )
    hflip: bool = dataclasses.field(
        default=False,
        metadata={"help": "random horizontal flips; only where the domain allows (not digits or text)"},
    )
    crop_scale_min: float = dataclasses.field(
        default=0.5,
        metadata={"help": "smallest area fraction of the random resized crop (conservative: small "
                  "objects such as digits must stay recognisable)"},
    )  # fmt: skip
    label_smoothing: float = dataclasses.field(
        default=0.1, metadata={"help": "cross-entropy label smoothing"}
    )


# Aspect-ratio range of the random resized crop, as in torchvision/timm (3/4 .. 4/3).
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) → float32 (B, 3, H, W) in [-1, 1], the range the models take."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise VitditError(
            f"expected uint8 images of shape (B, H, W, 3), got {images.dtype} {tuple(images.shape)}"
        )
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # B, 3, H, W


def random_resized_crop(
    x: torch.Tensor,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = CROP_RATIO,
    hflip: bool = False,
) -> torch.Tensor:
    """A random crop of each image (area fraction in ``scale``, aspect in ``ratio``), resized back.

    Batched with one affine ``grid_sample`` instead of a per-image loop; ``hflip`` mirrors half the
    images. The randomness comes only from ``generator`` (on the CPU), so it is reproducible.
    """
    B = x.shape[0]
    dev = generator.device  # draws happen where the generator lives (CPU, or the worker's GPU)
    area = torch.empty(B, device=dev).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(B, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    r = log_r.exp()
    # Width and height of the crop as fractions of the image; clamp keeps the crop inside it.
    w = (area * r).sqrt().clamp(max=1.0)
    h = (area / r).sqrt().clamp(max=1.0)
    # Centre in normalised [-1, 1] coordinates, anywhere the crop still fits.
    cx = (torch.rand(B, generator=generator, device=dev) * 2 - 1) * (1 - w)
    cy = (torch.rand(B, generator=generator, device=dev) * 2 - 1) * (1 - h)
    sx = w
    if hflip:
        flip = torch.rand(B, generator=generator, device=dev) < 0.5
        sx = torch.where(flip, -w, w)
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2] = sx, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # B, H, W, 2
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


@dataclasses.dataclass
class ImageSplits:
    """Preprocessed image datasets for training, with what a checkpoint records about them."""

    datasets: dict[str, Any]  # "train" (+ "val"): ray.data.Dataset of image uint8 R×R×3, label, id
    class_names: list[str]
    train_uri: str
    val_uri: str | None
    fingerprint: str | None
    num_train_rows: int | None


def preprocessed_splits(
    images: str, val_images: str | None, resolution: int, *, require_labels: bool, seed: int = 0
) -> ImageSplits:
    """Read ``images`` (its train/ split when it has train/ and val/) through the CPU stage.

    Shared by the ViT and VAE tasks. Rows that fail to decode are dropped here (the pipeline's
    ``Preprocess`` names them in its ``error`` column; ``vitdit encode`` is where they are
    quarantined); the validation set is ``val_images`` or the source's val/ split.
    """
    from pipelines.images import read_image_source, resolve_splits

    train_uri, default_val = resolve_splits(images)
    val_uri = val_images or default_val
    source = read_image_source(train_uri)
    if require_labels:
        if not source.class_names:
            raise VitditError(f"{train_uri}: no class labels found; a classifier needs labelled images")
        unlabelled = sum(1 for c in source.chunks for label in c.labels if label < 0)
        if unlabelled:
            raise VitditError(
                f"{train_uri}: {unlabelled} images have no label; a classifier needs labelled images"
            )
    # Listings are sorted (by class for a folder): shuffle them so that no batch holds one class.
    train = source.dataset_for(shuffled_chunks(source.chunks, seed)).randomize_block_order(seed=seed)
    datasets = {"train": _preprocessed(train, resolution)}
    if val_uri:
        val_source = read_image_source(val_uri)
        # A classifier's val classes must be its training classes; an autoencoder ignores labels (the
        # numbers set's val/ holds numbers that train/ holds out).
        differ = (
            source.class_names and val_source.class_names and val_source.class_names != source.class_names
        )
        if require_labels and differ:
            raise VitditError(
                f"{val_uri}: classes {val_source.class_names} differ from the training classes {source.class_names}"
            )
        datasets["val"] = _preprocessed(val_source.dataset, resolution)
    return ImageSplits(
        datasets=datasets,
        class_names=list(source.class_names),
        train_uri=train_uri,
        val_uri=val_uri,
        fingerprint=source.fingerprint,
        num_train_rows=source.num_images,
    )


def shuffled_chunks(chunks: list, seed: int, files_per_chunk: int = 256) -> list:
    """The training listing in a seeded random order.

    The trainer streams blocks in order with a local shuffle buffer of a few batches (exact resume),
    so a class-sorted folder listing would give batches of one class: the files of a folder source
    are permuted and re-chunked here. Tar shards and parquet row groups cannot be split: their
    order is randomised by ``randomize_block_order`` (webdataset's assumption: shards are mixed).
    """
    if not chunks or any(c.kind != "files" for c in chunks):
        return chunks
    ids = [i for c in chunks for i in c.ids]
    labels = [label for c in chunks for label in c.labels]
    members = [m for c in chunks for m in c.members]
    order = np.random.default_rng(seed).permutation(len(ids))
    out = []
    for k, start in enumerate(range(0, len(order), files_per_chunk)):
        idx = order[start : start + files_per_chunk]
        out.append(
            dataclasses.replace(
                chunks[0],
                index=k,
                ids=[ids[i] for i in idx],
                labels=[labels[i] for i in idx],
                members=[members[i] for i in idx],
            )
        )
    return out


def _preprocessed(ds, resolution: int):
    # The UDF lives in pipelines.images, which does not import torch (fresh Ray Data worker
    # processes would spend seconds importing it for nothing).
    from pipelines.images import preprocess_good_rows

    return ds.map_batches(preprocess_good_rows, fn_kwargs={"resolution": resolution}, batch_size=64)


class ViTTask(TrainTask):
    """Supervised ViT training with label-smoothed cross-entropy and top-1 validation accuracy."""

    kind = "vit"

    def __init__(self, cfg: ViTTaskConfig, train_cfg: TrainConfig):
        from vitdit.models import get_preset

        self.cfg = cfg
        self.train_cfg = train_cfg
        try:
            preset = get_preset(cfg.model)
        except ValueError as e:
            raise VitditError(f"--model: {e}") from e
        if not hasattr(preset, "image_size"):
            raise VitditError(f"--model {cfg.model!r} is not a ViT preset")
        self.resolution = cfg.resolution or preset.image_size
        if self.resolution % preset.patch_size:
            raise VitditError(
                f"--resolution {self.resolution} is not a multiple of {cfg.model}'s patch size {preset.patch_size}"
            )
        if not 0.0 < cfg.crop_scale_min <= 1.0:
            raise VitditError(f"--crop-scale-min {cfg.crop_scale_min}: expected a fraction in (0, 1]")
        if not 0.0 <= cfg.label_smoothing < 1.0:
            raise VitditError(f"--label-smoothing {cfg.label_smoothing}: expected a value in [0, 1)")
        self.class_names: list[str] | None = None
        self.source: dict[str, Any] = {}
        self.num_train_rows: int | None = None
        self._datasets: dict | None = None

    def __getstate__(self) -> dict:
        # The task is pickled to every worker: ship configs and names, not Ray Dataset plans.
        return {**self.__dict__, "_datasets": None}

    # driver side ---------------------------------------------------------------------------------
    def datasets(self) -> dict:
        """Preprocessed (decoded, centre-cropped, resized) train and val image datasets.

        The source is listed once (listing a bucket of a million images is not free) and cached.
        """
        if self._datasets is None:
            splits = preprocessed_splits(
                self.cfg.images,
                self.cfg.val_images,
                self.resolution,
                require_labels=True,
                seed=self.train_cfg.seed,
            )
            self.class_names = splits.class_names
            self.source = {
                "uri": splits.train_uri,
                "fingerprint": splits.fingerprint,
                "val_uri": splits.val_uri,
            }
            self.num_train_rows = splits.num_train_rows
            self._datasets = splits.datasets
        return self._datasets

    def model_config(self) -> dict:
        cfg = self._model_cfg()
        return {
            "kind": "vit",
            "model_name": self.cfg.model,
            "model_config": dataclasses.asdict(cfg),
            "class_names": self.class_names,
            "dataset": self.source,
            "resolution": self.resolution,
            "task": dataclasses.asdict(self.cfg),
        }

    def batch_columns(self) -> list[str] | None:
        return ["image", "label"]

    # worker side ---------------------------------------------------------------------------------
    def _model_cfg(self):
        from vitdit.models import get_preset

        if not self.class_names:
            raise VitditError(f"{self.cfg.images}: no class names; a ViT classifier needs labelled images")
        return get_preset(self.cfg.model, num_classes=len(self.class_names), image_size=self.resolution)

    def build_model(self) -> torch.nn.Module:
        from vitdit.models import model_from_config

        return model_from_config(self._model_cfg())

    def augment(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 (B, R, R, 3) batch → augmented float (B, 3, R, R) in [-1, 1]."""
        x = to_model_input(images)
        return random_resized_crop(x, generator, scale=(self.cfg.crop_scale_min, 1.0), hflip=self.cfg.hflip)

    def loss(self, model, batch: dict[str, torch.Tensor], generator: torch.Generator):
        x = self.augment(batch["image"], generator)
        y = batch["label"].long().to(x.device)
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.label_smoothing)
        acc = (logits.argmax(-1) == y).float().mean().item()
        return loss, {"accuracy": acc}

    @torch.no_grad()
    def validate(self, model, ema_model, batches: Iterable[dict]) -> dict[str, float]:
        """Top-1 accuracy and (unsmoothed) cross-entropy on the validation images, no augmentation.

        With EMA on, the EMA model is scored too (``val/ema_accuracy``).
        """
        models = {"val": model}
        if ema_model is not None and self.train_cfg.ema_decay > 0:
            models["val/ema"] = ema_model
        totals = {name: [0.0, 0, 0] for name in models}  # loss sum, correct, count
        for batch in batches:
            x = to_model_input(batch["image"])
            y = batch["label"].long()
            for name, m in models.items():
                p = next(m.parameters())
                logits = m(x.to(p.device)).float()
                yy = y.to(logits.device)
                totals[name][0] += F.cross_entropy(logits, yy, reduction="sum").item()
                totals[name][1] += int((logits.argmax(-1) == yy).sum())
                totals[name][2] += len(yy)
        out = {}
        for name, (loss_sum, correct, count) in totals.items():
            if count:
                prefix = "val/" if name == "val" else "val/ema_"
                out[prefix + "loss"] = loss_sum / count
                out[prefix + "accuracy"] = correct / count
        return out

    def visualize(self, ema_model, step: int):
        return None

    def finalize(self, model, ema_model, output_dir: str) -> dict:
        return {"class_names": self.class_names}
