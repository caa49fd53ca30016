"""The samples layout (DESIGN.md, "Samples"): what `vitdit sample` writes and `vitdit evaluate` reads.

::

    DIR/images/<index:06d>_<label>.png   one PNG per sample, written as batches finish
    DIR/samples.npz                      arr_0: uint8 N×H×W×3, arr_1: int64 labels (the ADM layout)
    DIR/grid.png                         one row per class, in label order
    DIR/sampling.json                    the resolved sampling config (checkpoint, VAE, seed, ...)

The PNGs are the resumable part: a re-run skips every chunk whose PNGs exist, then assembles the
npz from the PNGs (lossless, so the npz is the same whichever run wrote which image). The npz is
written with fixed zip timestamps so that equal samples give byte-identical files.
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile

import numpy as np
from PIL import Image

from vitdit.errors import VitditError

IMAGES_DIR = "images"
NPZ_NAME = "samples.npz"
GRID_NAME = "grid.png"
CONFIG_NAME = "sampling.json"
_IMAGE_RE = re.compile(r"^(\d{6,})_(-?\d+)\.png$")


def image_name(index: int, label: int) -> str:
    """``<index:06d>_<label>.png``."""
    return f"{index:06d}_{int(label)}.png"


def label_for_index(index: int, classes: list[int] | tuple[int, ...]) -> int:
    """Sample ``index`` gets ``classes[index % len(classes)]`` (DESIGN.md)."""
    return int(classes[index % len(classes)])


def to_uint8(images) -> np.ndarray:
    """Images in [-1, 1], N×3×H×W (torch or numpy) → uint8 N×H×W×3 as DiT's sample script rounds."""
    import torch

    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    x = torch.clamp(127.5 * x.float() + 128.0, 0, 255)  # floor(127.5 x + 128) = round(127.5 (x + 1))
    return x.permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()  # N, H, W, 3


def write_images(output: str, indices, images: np.ndarray, labels) -> list[str]:
    """Write uint8 N×H×W×3 ``images`` as ``DIR/images/<index>_<label>.png``, each atomically.

    A PNG is written under a temporary name and renamed, so a killed job never leaves a truncated
    image that a re-run would take as finished.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise VitditError(f"write_images: expected uint8 N×H×W×3, got {images.dtype} {images.shape}")
    folder = os.path.join(output, IMAGES_DIR)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, img, y in zip(indices, images, labels):
        path = os.path.join(folder, image_name(int(i), int(y)))
        tmp = f"{path}.tmp-{os.getpid()}"
        Image.fromarray(img).save(tmp, format="PNG")
        os.replace(tmp, path)
        paths.append(path)
    return paths


def existing_indices(output: str) -> dict[int, str]:
    """{index: file name} of the finished PNGs under ``DIR/images``."""
    folder = os.path.join(output, IMAGES_DIR)
    found = {}
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            m = _IMAGE_RE.match(name)
            if m:
                found[int(m.group(1))] = name
    return found


def read_images(output: str, num_samples: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All PNGs under ``DIR/images`` in index order: (uint8 N×H×W×3, int64 labels).

    With ``num_samples``, indices 0..N-1 must all be present (a missing one names the gap).
    """
    found = existing_indices(output)
    if not found:
        raise VitditError(f"{output}: no sample images under {IMAGES_DIR}/")
    indices = sorted(found) if num_samples is None else list(range(num_samples))
    missing = [i for i in indices if i not in found]
    if missing:
        raise VitditError(f"{output}: {len(missing)} sample images missing, e.g. index {missing[0]}")
    images, labels = [], []
    for i in indices:
        name = found[i]
        with Image.open(os.path.join(output, IMAGES_DIR, name)) as im:
            images.append(np.asarray(im.convert("RGB")))
        labels.append(int(_IMAGE_RE.match(name).group(2)))
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def _write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    # np.savez stamps each member with the current time; a fixed date_time makes equal arrays give
    # equal bytes (the 1-vs-N-actor test compares files).
    tmp = f"{path}.tmp-{os.getpid()}"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            zf.writestr(info, buf.getvalue())
    os.replace(tmp, path)


def write_npz(output: str, images: np.ndarray, labels: np.ndarray) -> str:
    """``DIR/samples.npz`` with ``arr_0`` uint8 N×H×W×3 and ``arr_1`` labels (what ADM's evaluator reads)."""
    path = os.path.join(output, NPZ_NAME)
    _write_npz(path, {"arr_0": np.asarray(images, np.uint8), "arr_1": np.asarray(labels, np.int64)})
    return path


def read_samples(output: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N×H×W×3, labels) of a samples directory, from the npz, else from the PNGs."""
    path = os.path.join(output, NPZ_NAME)
    if os.path.exists(path):
        with np.load(path, allow_pickle=False) as z:
            images = z["arr_0"]
            labels = z["arr_1"] if "arr_1" in z.files else np.full(len(images), -1, np.int64)
        return images, labels
    if not os.path.isdir(output):
        raise VitditError(f"samples directory {output!r} does not exist")
    return read_images(output)


def make_grid(images: np.ndarray, labels: np.ndarray, max_per_class: int = 10, pad: int = 2) -> Image.Image:
    """One row per class (sorted labels), up to ``max_per_class`` samples each, in index order."""
    images = np.asarray(images)
    labels = np.asarray(labels)
    if len(images) == 0:
        raise VitditError("make_grid: no images")
    classes = sorted(np.unique(labels).tolist())
    rows = [np.flatnonzero(labels == c)[:max_per_class] for c in classes]
    cols = max(len(r) for r in rows)
    h, w = images.shape[1:3]
    grid = np.zeros((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3), dtype=np.uint8)
    for r, idx in enumerate(rows):
        for c, i in enumerate(idx):
            y0, x0 = pad + r * (h + pad), pad + c * (w + pad)
            grid[y0 : y0 + h, x0 : x0 + w] = images[i]
    return Image.fromarray(grid)


def finalize(output: str, num_samples: int, config: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Assemble ``samples.npz`` and ``grid.png`` from the PNGs (and write ``sampling.json``)."""
    images, labels = read_images(output, num_samples)
    write_npz(output, images, labels)
    make_grid(images, labels).save(os.path.join(output, GRID_NAME))
    if config is not None:
        with open(os.path.join(output, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True, default=str)
    return images, labels


def read_config(output: str) -> dict:
    """``DIR/sampling.json`` ({} when absent, e.g. for samples made by another tool)."""
    path = os.path.join(output, CONFIG_NAME)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)
