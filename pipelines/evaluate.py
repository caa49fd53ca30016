"""Evaluation of a samples directory against reference images, logged to MLflow.

Always available offline: features and logits of a trained vitdit ViT classifier of the same
domain give the Fréchet distance, KID, precision/recall (k=3), an Inception-Score-style score and
per-class accuracy (``vitdit.metrics``). The classifier checkpoint's sha256 is recorded with every
metric (run tag ``vitdit.eval.extractor_sha256`` and in the JSON report): numbers are only
comparable between evaluations with the same extractor. The same metrics on VAE reconstructions
of the reference images (encode → posterior mean → decode) are the floor a latent model can reach
(``eval/floor/...``). With ``--inception-weights`` the paper-comparable FID / IS are added
(``vitdit.fid``).

The reference is read with plain PIL from a local ImageFolder tree (``<root>/<class>/<file>``, or
``<root>/val`` when it exists), each image ADM-centre-cropped to the samples' resolution.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import posixpath
import time
from typing import Any

import numpy as np
import torch

from pipelines import storage
from vitdit import metrics
from vitdit import samples as layout
from vitdit.errors import VitditError

log = logging.getLogger(__name__)

_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclasses.dataclass
class EvalConfig:
    samples: str | None = dataclasses.field(
        default=None, metadata={"help": "samples directory (vitdit sample)"}
    )
    reference: str | None = dataclasses.field(default=None, metadata={"help": "reference ImageFolder root"})
    classifier: str | None = dataclasses.field(
        default=None, metadata={"help": "vitdit ViT classifier checkpoint"}
    )
    inception_weights: str | None = dataclasses.field(
        default=None, metadata={"help": "TF-Inception weights file for paper FID/IS (never downloaded)"}
    )
    vae: str | None = dataclasses.field(
        default=None, metadata={"help": "VAE for the floor (default: the samples')"}
    )
    floor: bool = dataclasses.field(default=True, metadata={"help": "metrics of VAE reconstructions"})
    max_reference: int = dataclasses.field(
        default=0, metadata={"help": "use at most N reference images (0: all)"}
    )
    batch_size: int = dataclasses.field(
        default=64, metadata={"help": "images per forward pass of the feature extractors and the VAE"}
    )
    kid_subsets: int = dataclasses.field(
        default=100, metadata={"help": "random subsets KID is averaged over"}
    )
    step: int | None = dataclasses.field(
        default=None, metadata={"help": "MLflow step (default: checkpoint's)"}
    )
    report: str | None = dataclasses.field(
        default=None, metadata={"help": "JSON report (default: SAMPLES/evaluation.json)"}
    )
    mlflow: bool = dataclasses.field(
        default=True, metadata={"help": "log the metrics, the report and the grid to MLflow"}
    )
    mlflow_run: str | None = dataclasses.field(
        default=None, metadata={"help": "log into this run (default: a new run)"}
    )
    tracking_uri: str | None = dataclasses.field(
        default=None, metadata={"help": "MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)"}
    )
    experiment: str = dataclasses.field(default="vitdit-eval", metadata={"help": "MLflow experiment"})
    numbers: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "samples of two-digit numbers (`vitdit data numbers`, prompts in words): the "
            "digits classifier reads each sample's tens and units, scored against its prompt, for seen "
            "and held-out numbers (held-out: the reference's ../numbers.json)"
        },
    )


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_reference(root: str, resolution: int, limit: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """uint8 N×R×R×3 images, labels and class names of a local ImageFolder tree (val/ if present)."""
    from PIL import Image

    from vitdit.preprocess import center_crop_arr

    if storage.is_uri(root) and not root.startswith("file://"):
        raise VitditError(f"--reference {root}: only local ImageFolder directories are read here")
    root = root.removeprefix("file://")
    if os.path.isdir(os.path.join(root, "val")):
        root = os.path.join(root, "val")
    if not os.path.isdir(root):
        raise VitditError(f"--reference {root}: no such directory")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    files = [
        (os.path.join(root, c, f), i)
        for i, c in enumerate(classes)
        for f in sorted(os.listdir(os.path.join(root, c)))
        if f.lower().endswith(_IMAGE_EXTS)
    ]
    if limit > 0 and len(files) > limit:
        # An even spread over the classes rather than the first classes only.
        files = [files[i] for i in np.linspace(0, len(files) - 1, limit).round().astype(int)]
    if not files:
        raise VitditError(f"--reference {root}: no images in <class>/<file> folders")
    images = []
    for path, _ in files:
        with Image.open(path) as im:
            images.append(center_crop_arr(im, resolution))
    return np.stack(images), np.array([y for _, y in files], dtype=np.int64), classes


class Extractor:
    """A vitdit ViT classifier as feature extractor: pre-logits features and logits."""

    def __init__(self, checkpoint: str, device: str = "cpu"):
        from vitdit.checkpoint import EMA_NAME, MODEL_NAME, load_model, resolve_checkpoint_dir

        path = resolve_checkpoint_dir(checkpoint)
        self.model, self.config = load_model(path, use_ema=True)
        if self.config.get("kind") != "vit":
            raise VitditError(
                f"--classifier {checkpoint}: a {self.config.get('kind')!r} checkpoint, not a ViT"
            )
        weights = os.path.join(path, EMA_NAME if os.path.isfile(os.path.join(path, EMA_NAME)) else MODEL_NAME)
        self.path, self.sha256 = path, file_sha256(weights)
        self.device = torch.device(device)
        self.model.to(self.device)
        self.class_names = self.config.get("class_names") or []
        self.image_size = self.model.config.image_size

    @torch.no_grad()
    def __call__(self, images: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        from vitdit.preprocess import to_unit_range

        feats, logits = [], []
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(to_unit_range(images[i : i + batch_size])).to(self.device)  # B, 3, H, W
            if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
                x = torch.nn.functional.interpolate(
                    x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True
                )
            tokens = self.model.forward_features(x)  # B, N+1, D
            feats.append(self.model.forward_head(tokens, pre_logits=True).double().cpu().numpy())
            logits.append(self.model.forward_head(tokens).double().cpu().numpy())
        return np.concatenate(feats), np.concatenate(logits)

    def map_labels(self, labels: np.ndarray, names: list[str] | None) -> np.ndarray:
        """Labels in another class list → this classifier's indices, by class name (−1: unknown)."""
        if not names or not self.class_names:
            return labels
        index = {n: i for i, n in enumerate(self.class_names)}
        return np.array(
            [index.get(names[y], -1) if 0 <= y < len(names) else -1 for y in labels], dtype=np.int64
        )


def metric_suite(
    extractor: Extractor, real: tuple[np.ndarray, np.ndarray], fake_images: np.ndarray, fake_labels: np.ndarray,
    kid_subsets: int = 100, batch_size: int = 64,
) -> dict[str, float]:  # fmt: skip
    """FD, KID, precision/recall, IS-style score and accuracy of ``fake_images`` against ``real`` features."""
    real_feats, _ = real
    feats, logits = extractor(fake_images, batch_size)
    out: dict[str, float] = {"fd": metrics.frechet_distance_features(real_feats, feats)}
    kid, kid_std = metrics.kernel_inception_distance(real_feats, feats, num_subsets=kid_subsets)
    out.update(kid=kid, kid_std=kid_std)
    if min(len(real_feats), len(feats)) > 3:
        out["precision"], out["recall"] = metrics.precision_recall(real_feats, feats, k=3)
    out["is"], out["is_std"] = metrics.inception_score(logits)
    known = fake_labels >= 0
    if known.any():
        acc, per_class = metrics.classification_accuracy(
            logits[known], fake_labels[known], extractor.class_names
        )
        out["accuracy"] = acc
        out.update({f"accuracy/{name}": v for name, v in per_class.items()})
    return out


def number_metrics(
    extractor: Extractor, images: np.ndarray, labels: np.ndarray, prompts: list[str], reference: str
) -> dict[str, float]:
    """Number accuracy of text-to-image samples of `vitdit data numbers`: the classifier (a digits
    ViT) reads the two glyphs of each sample; the target is the number its prompt names."""
    from vitdit import numbers

    if not prompts:
        raise VitditError("--numbers: the samples have no prompts (sample an MM-DiT with --prompt)")
    names = extractor.class_names
    if sorted(names) != [str(d) for d in range(10)]:
        raise VitditError(f"--numbers: the classifier's classes {names} are not the digits 0-9")
    order = [names.index(str(d)) for d in range(10)]  # logits column of digit d
    target = np.array([numbers.number_from_words(prompts[int(y)]) for y in labels], dtype=np.int64)
    manifest = os.path.join(os.path.dirname(os.path.abspath(reference.rstrip("/"))), numbers.MANIFEST)
    held_out = numbers.HELD_OUT
    recorded = storage.read_json(manifest)
    if recorded:
        held_out = tuple(recorded.get("held_out", held_out))
    predicted = numbers.read_numbers(
        lambda crops: extractor(crops)[1][:, order], images, extractor.image_size
    )
    scores = numbers.number_accuracy(predicted, target, held_out)
    return {k: float(v) for k, v in scores.items() if not (isinstance(v, float) and np.isnan(v))}


def run_evaluation(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate ``cfg.samples``; writes the JSON report, logs to MLflow; returns the report."""
    for flag in ("samples", "reference", "classifier"):
        if not getattr(cfg, flag):
            raise VitditError(f"--{flag} is required")
    t0 = time.time()
    # Inputs on object storage are read from a per-node download (storage.local_dir's cache); the
    # report names them by their URIs.
    remote = {f: getattr(cfg, f) for f in ("samples", "reference", "classifier") if _remote(getattr(cfg, f))}
    cfg = dataclasses.replace(cfg, **{f: storage.local_dir(uri) for f, uri in remote.items()})
    images, labels = layout.read_samples(cfg.samples)
    sampling = layout.read_config(cfg.samples)
    extractor = Extractor(cfg.classifier)
    ref_images, ref_labels, ref_classes = read_reference(cfg.reference, images.shape[1], cfg.max_reference)
    real = extractor(ref_images, cfg.batch_size)
    sample_labels = extractor.map_labels(labels, sampling.get("class_names"))
    results = {f"eval/{k}": v for k, v in metric_suite(extractor, real, images, sample_labels, cfg.kid_subsets, cfg.batch_size).items()}  # fmt: skip
    if cfg.numbers:
        scores = number_metrics(extractor, images, labels, sampling.get("prompts") or [], cfg.reference)
        results.update({f"eval/numbers/{k}": v for k, v in scores.items()})
    ref_mapped = extractor.map_labels(ref_labels, ref_classes)
    if (ref_mapped >= 0).any():  # a reference of other classes (numbers for a digits ViT) has none
        acc, _ = metrics.classification_accuracy(real[1][ref_mapped >= 0], ref_mapped[ref_mapped >= 0])
        results["eval/reference/accuracy"] = acc

    vae_name = cfg.vae or sampling.get("vae")
    if cfg.floor and vae_name:
        from vitdit.preprocess import to_unit_range
        from vitdit.vae import decode_latents, encode_posterior, load_vae, scale_latents

        vae = load_vae(storage.local_dir(vae_name) if _remote(vae_name) else vae_name)
        recon = []
        for i in range(0, len(ref_images), cfg.batch_size):
            x = torch.from_numpy(to_unit_range(ref_images[i : i + cfg.batch_size]))
            mean, _ = encode_posterior(vae, x)
            recon.append(layout.to_uint8(decode_latents(vae, scale_latents(mean, vae), vae)))
        floor = metric_suite(
            extractor, real, np.concatenate(recon), ref_mapped, cfg.kid_subsets, cfg.batch_size
        )
        results.update({f"eval/floor/{k}": v for k, v in floor.items()})
    elif cfg.floor:
        log.info("no VAE known for the samples (--vae): the reconstruction floor is not computed")

    if cfg.inception_weights:
        from vitdit.fid import fid_and_is

        paper = fid_and_is(cfg.inception_weights, images, ref_images, cfg.batch_size)
        results.update({"eval/fid": paper["fid"], "eval/inception_score": paper["is_mean"], "eval/inception_score_std": paper["is_std"]})  # fmt: skip

    step = cfg.step if cfg.step is not None else sampling.get("step")
    report = {
        "samples": remote.get("samples") or os.path.abspath(cfg.samples),
        "num_samples": int(len(images)),
        "reference": remote.get("reference") or cfg.reference,
        "num_reference": int(len(ref_images)),
        "checkpoint": sampling.get("checkpoint"),
        "step": step,
        "extractor": {"kind": "vitdit-vit", "checkpoint": extractor.path, "sha256": extractor.sha256},
        "inception_weights_sha256": file_sha256(cfg.inception_weights) if cfg.inception_weights else None,
        "vae": vae_name if cfg.floor else None,
        "metrics": results,
        "seconds": time.time() - t0,
    }
    report_path = cfg.report or storage.join(remote.get("samples") or cfg.samples, "evaluation.json")
    storage.write_json(report_path, report)  # atomic: a reader never sees half a report
    report["report_path"] = report_path
    if cfg.mlflow:
        report["mlflow_run_id"] = log_evaluation(cfg, report, sampling)
    return report


def _remote(path: str | None) -> bool:
    return bool(path) and storage.is_uri(path) and not path.startswith("file://")


def log_evaluation(cfg: EvalConfig, report: dict[str, Any], sampling: dict[str, Any]) -> str | None:
    """Metrics at the checkpoint's step, the report and the grid, in ``cfg.mlflow_run`` or a new run."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import bound_http_waits, resolve_tracking_uri

    bound_http_waits()
    training = sampling.get("training_run") or {}
    uri = resolve_tracking_uri(cfg.tracking_uri or training.get("tracking_uri"))
    try:
        client = MlflowClient(uri)
        run_id = cfg.mlflow_run
        if run_id is None:
            exp = client.get_experiment_by_name(cfg.experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(cfg.experiment)
            run_id = client.create_run(
                exp_id, run_name=f"eval-{os.path.basename(os.path.abspath(cfg.samples))}"
            ).info.run_id
        step = int(report["step"] or 0)
        now = int(time.time() * 1000)
        client.log_batch(
            run_id, metrics=[Metric(k, float(v), now, step) for k, v in report["metrics"].items()]
        )
        tags = {
            "vitdit.eval.extractor_sha256": report["extractor"]["sha256"],
            "vitdit.eval.extractor": report["extractor"]["checkpoint"],
            "vitdit.eval.reference": str(report["reference"]),
        }
        if training.get("run_id"):
            tags["vitdit.training_run_id"] = training["run_id"]
        if report["inception_weights_sha256"]:
            tags["vitdit.eval.inception_sha256"] = report["inception_weights_sha256"]
        for k, v in tags.items():
            client.set_tag(run_id, k, v)
        if _remote(report["report_path"]):  # a report on object storage: log its contents
            name = posixpath.basename(report["report_path"])
            client.log_dict(
                run_id, {k: v for k, v in report.items() if k != "report_path"}, f"evaluation/{name}"
            )
        else:
            client.log_artifact(run_id, report["report_path"], "evaluation")
        grid = os.path.join(cfg.samples, layout.GRID_NAME)
        if os.path.exists(grid):
            client.log_artifact(run_id, grid, "evaluation")
        if cfg.mlflow_run is None:
            client.set_terminated(run_id)
        return run_id
    except Exception as e:  # noqa: BLE001 - the report is on disk; tracking is best effort
        if cfg.mlflow_run:  # the caller (scheduled evaluation) relies on this run getting them
            raise VitditError(
                f"logging the evaluation into MLflow run {cfg.mlflow_run} at {uri} failed: {e}"
            ) from e
        log.warning("MLflow logging of the evaluation failed: %s", e)
        return None
