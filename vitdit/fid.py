"""Paper-comparable FID and Inception Score from a user-supplied TF-Inception weights file.

The standard protocol (Heusel et al.'s TF implementation, used by ADM and DiT) is reproduced by
torch-fidelity's ``FeatureExtractorInceptionV3``: the TF-Inception graph ported to PyTorch, the
TF-1.x bilinear resize to 299×299 *without* antialiasing (as the reference does; torchmetrics ≥ 1.8
defaults to ``antialias=True``, which drifts from the published numbers), pool3 (2048-d) features
for FID and the 1008-way logits for IS. Nothing is downloaded: the weights file must be given.

Getting the weights file (on a machine with network access, once)::

    # torch-fidelity's converted TF-Inception weights (Apache-2.0, from tensorflow/models):
    curl -LO https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth
    vitdit evaluate ... --inception-weights weights-inception-2015-12-05-6726825d.pth

The 50K-sample protocol of ADM / DiT (FID-50K against the ImageNet reference batch) uses openai's
ADM evaluator (``guided-diffusion/evaluations/evaluator.py``, TensorFlow), which reads exactly the
``samples.npz`` that ``vitdit sample`` writes::

    vitdit sample --checkpoint DiT-XL-2-256.pt --vae stabilityai/sd-vae-ft-ema \\
        --num-samples 50000 --cfg-scale 1.5 --sampler ddpm --sampling-steps 250 --output samples50k
    # samples50k/samples.npz: arr_0 uint8 50000×256×256×3, arr_1 labels
    python evaluator.py VIRTUAL_imagenet256_labeled.npz samples50k/samples.npz

(``VIRTUAL_imagenet256_labeled.npz`` is the reference batch published with ADM.) Numbers from this
module and from the ADM evaluator agree closely but not to every digit (TF vs PyTorch kernels);
report which one produced a number.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from vitdit.errors import UnsafeCheckpointError, VitditError

FID_FEATURE = "2048"  # pool3
IS_FEATURE = "logits_unbiased"  # the 1008-way logits without the fc bias, as the TF IS code uses


def load_inception(weights_path: str, device: str | torch.device = "cpu"):
    """torch-fidelity's TF-compatible InceptionV3 loaded from a local weights file (never downloaded).

    torch-fidelity unpickles the file with ``weights_only=False``; the file is first checked to load
    as plain tensors, so a crafted pickle is refused before it runs.
    """
    if not weights_path or not os.path.isfile(weights_path):
        raise VitditError(f"--inception-weights {weights_path!r}: no such file (it is never downloaded)")
    try:
        torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means we must not unpickle it
        raise UnsafeCheckpointError(f"{weights_path}: not a plain tensor state dict ({e})") from e
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:
        net = FeatureExtractorInceptionV3(
            "inception-v3-compat", [FID_FEATURE, IS_FEATURE], feature_extractor_weights_path=weights_path
        )
    except RuntimeError as e:  # missing/unexpected keys or wrong shapes
        raise VitditError(f"{weights_path}: not TF-Inception weights for torch-fidelity ({e})") from e
    return net.to(device).eval()


@torch.no_grad()
def inception_features(
    net, images: np.ndarray, batch_size: int = 64, device: str | torch.device = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N×H×W×3 images → (pool3 features N×2048, logits N×1008), float64."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise VitditError(f"inception_features: expected uint8 N×H×W×3, got {images.dtype} {images.shape}")
    feats, logits = [], []
    for i in range(0, len(images), batch_size):
        x = (
            torch.from_numpy(images[i : i + batch_size]).permute(0, 3, 1, 2).contiguous().to(device)
        )  # B,3,H,W
        f, z = net(x)  # the extractor resizes to 299 itself, the TF way
        feats.append(f.double().cpu().numpy())
        logits.append(z.double().cpu().numpy())
    return np.concatenate(feats), np.concatenate(logits)


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID with torch-fidelity's statistics and Fréchet distance (the library's own numbers)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    s1 = fid_features_to_statistics(torch.from_numpy(np.asarray(features1)))
    s2 = fid_features_to_statistics(torch.from_numpy(np.asarray(features2)))
    return float(fid_statistics_to_metric(s1, s2, verbose=False)["frechet_inception_distance"])


def is_from_logits(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception Score (mean, std over ``splits``) with torch-fidelity's implementation."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    out = isc_features_to_metric(torch.from_numpy(np.asarray(logits)), splits=min(splits, len(logits)))
    return float(out["inception_score_mean"]), float(out["inception_score_std"])


def fid_and_is(
    weights_path: str,
    samples: np.ndarray,
    reference: np.ndarray,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """{"fid", "is_mean", "is_std"} of uint8 N×H×W×3 ``samples`` against ``reference``."""
    net = load_inception(weights_path, device)
    f_s, z_s = inception_features(net, samples, batch_size, device)
    f_r, _ = inception_features(net, reference, batch_size, device)
    is_mean, is_std = is_from_logits(z_s)
    return {"fid": fid_from_features(f_s, f_r), "is_mean": is_mean, "is_std": is_std}
