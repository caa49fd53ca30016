"""The bundled real data set: scikit-learn's 1,797 handwritten 8×8 digits as an ImageFolder tree.

Every stage has real input offline with it. The split is stratified and seeded, so it is the same
on every machine: ``<out>/train/<digit>/<index:04d>.png`` and ``<out>/val/<digit>/<index:04d>.png``.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

CLASS_NAMES = [str(d) for d in range(10)]


def digits_arrays(resolution: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 N×R×R×3 (white strokes on black) and their int labels.

    The 0..16 intensities are scaled to 0..255 and the 8×8 image upscaled bicubically to R.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = (d.images / 16.0 * 255.0).clip(0, 255).astype(np.uint8)  # N, 8, 8
    out = np.empty((len(imgs), resolution, resolution, 3), dtype=np.uint8)
    for i, im in enumerate(imgs):
        big = Image.fromarray(im, mode="L").resize((resolution, resolution), Image.BICUBIC)
        out[i] = np.asarray(big.convert("RGB"))
    return out, d.target.astype(np.int64)


def split_indices(
    labels: np.ndarray, val_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A stratified, seeded train/val split of indices (the same on every machine)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        val.extend(idx[:n_val].tolist())
        train.extend(idx[n_val:].tolist())
    return np.sort(np.array(train)), np.sort(np.array(val))


def export_digits(output: str, resolution: int = 16, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Write the digits as PNGs under ``output``; returns counts per split.

    Existing files with the same name are rewritten with identical bytes, so a re-run is harmless.
    """
    if resolution < 8:
        raise ValueError(f"resolution {resolution}: the digits are 8×8, use 8 or more")
    images, labels = digits_arrays(resolution)
    train, val = split_indices(labels, val_fraction, seed)
    counts = {}
    for split, idx in (("train", train), ("val", val)):
        for i in idx:
            d = os.path.join(output, split, CLASS_NAMES[labels[i]])
            os.makedirs(d, exist_ok=True)
            path = os.path.join(d, f"{i:04d}.png")
            tmp = path + ".tmp"
            Image.fromarray(images[i]).save(tmp, format="PNG")
            os.replace(tmp, path)
        counts[split] = len(idx)
    return counts
