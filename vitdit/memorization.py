"""Does a generative model copy its training images? Nearest-training-image distances in pixel space.

For every generated sample, the L2 distance to its nearest training image; for every real held-out
(validation) image, the same. Real held-out images are new digits written by the same hands, so
their distances are what "not a copy" looks like. Samples that sit much closer to a training image
than held-out images ever do are copies (Carlini et al. 2023, "Extracting Training Data from
Diffusion Models", use the same nearest-neighbour test in pixel space).

Images are compared as grayscale in [0, 1], area-averaged to ``size`` × ``size`` first (the digits
are 8×8 originals: comparing at 8 px removes the upscaling's interpolation detail). Distances are
therefore in units of "one fully lit pixel at ``size`` px"; the maximum is ``size``.

    report = memorization_report(samples, train_images, val_images, size=8)
    report["samples"]["median"], report["val"]["median"], report["ratio_median"]
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from vitdit.errors import VitditError


def to_vectors(images: np.ndarray, size: int | None = None, name: str = "images") -> np.ndarray:
    """uint8 N×H×W×C (or N×H×W) images → float64 N×(size²) grayscale vectors in [0, 1]."""
    arr = np.asarray(images)
    if arr.ndim == 4:
        gray = arr.astype(np.float64).mean(axis=-1)  # N, H, W
    elif arr.ndim == 3:
        gray = arr.astype(np.float64)
    else:
        raise VitditError(f"{name}: expected N×H×W×C or N×H×W images, got shape {arr.shape}")
    if len(gray) == 0:
        raise VitditError(f"{name}: no images")
    if arr.dtype == np.uint8:
        gray = gray / 255.0
    if size is not None and gray.shape[1:] != (size, size):
        # Area averaging matches what a person sees at that size and keeps the [0, 1] range.
        t = torch.from_numpy(gray).unsqueeze(1)  # N, 1, H, W
        gray = torch.nn.functional.adaptive_avg_pool2d(t, size).squeeze(1).numpy()  # N, size, size
    return gray.reshape(len(gray), -1)  # N, size*size


def nearest_distances(
    queries: np.ndarray, reference: np.ndarray, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``queries`` (N×D), the L2 distance to its nearest row of ``reference`` (M×D) and that row's index."""
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float64))
    r = torch.from_numpy(np.ascontiguousarray(reference, dtype=np.float64))
    if q.ndim != 2 or r.ndim != 2 or q.shape[1] != r.shape[1]:
        raise VitditError(f"queries {tuple(q.shape)} and reference {tuple(r.shape)}: expected N×D and M×D")
    dists, index = [], []
    for i in range(0, len(q), chunk):
        # chunk, M. Direct differences, not the |a|²+|b|²-2ab expansion: an exact copy gives 0.
        d = torch.cdist(q[i : i + chunk], r, compute_mode="donot_use_mm_for_euclid_dist")
        best, idx = d.min(dim=1)
        dists.append(best)
        index.append(idx)
    return torch.cat(dists).numpy(), torch.cat(index).numpy()


def _stats(d: np.ndarray) -> dict[str, float]:
    return {
        "mean": float(d.mean()),
        "median": float(np.median(d)),
        "p05": float(np.percentile(d, 5)),
        "min": float(d.min()),
        "count": int(len(d)),
    }


def memorization_report(
    samples: np.ndarray,
    train: np.ndarray,
    val: np.ndarray,
    size: int | None = 8,
    sample_labels: np.ndarray | None = None,
    closest: int = 5,
) -> dict[str, Any]:
    """Nearest-training-image distances of generated ``samples`` and of real ``val`` images.

    Returns summary statistics of both, the ratio of their medians (>= 1: samples are no closer to
    the training set than new real images; well below 1: copying), ``copy_fraction`` = the share of
    samples closer to a training image than the closest validation image ever is, and the
    ``closest`` samples with their nearest training index (to look at by eye).
    """
    s = to_vectors(samples, size, "samples")
    t = to_vectors(train, size, "training images")
    v = to_vectors(val, size, "validation images")
    if not (s.shape[1] == t.shape[1] == v.shape[1]):
        raise VitditError(
            f"samples {np.shape(samples)}, training {np.shape(train)} and validation {np.shape(val)} images "
            "differ in size: pass size= to compare them at one resolution"
        )
    d_s, i_s = nearest_distances(s, t)
    d_v, _ = nearest_distances(v, t)
    order = np.argsort(d_s)[:closest]
    report: dict[str, Any] = {
        "space": f"grayscale [0,1] at {size}x{size} px" if size else "grayscale [0,1] at native size",
        "samples": _stats(d_s),
        "val": _stats(d_v),
        "ratio_median": float(np.median(d_s) / max(np.median(d_v), 1e-12)),
        "copy_threshold": float(d_v.min()),
        "copy_fraction": float((d_s < d_v.min()).mean()),
        "closest_samples": [
            {
                "sample": int(i),
                "train_index": int(i_s[i]),
                "distance": float(d_s[i]),
                **({"label": int(sample_labels[i])} if sample_labels is not None else {}),
            }
            for i in order
        ],
    }
    return report
