"""The samples layout (docs/design.md, "Samples"): what `vitdit sample` writes and `vitdit evaluate` reads.

::

    DIR/images/<index:06d>_<label>.png   one PNG per sample, written as batches finish
    DIR/samples.npz                      arr_0: uint8 N×H×W×3, arr_1: int64 labels (the ADM layout)
    DIR/grid.png                         one row per class, in label order, upscaled and labelled
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
    """Sample ``index`` gets ``classes[index % len(classes)]`` (docs/design.md)."""
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


# Tiles are upscaled (nearest neighbour, an integer factor) to at least this many pixels: 16 px
# samples side by side at 1:1 are too small to judge in an image viewer or MLflow's artifact view.
MIN_TILE = 64
# A row label longer than this is cut with "..." (prompts): the strip stays narrower than a few tiles.
MAX_LABEL_CHARS = 32


def _to_uint8_nhwc(images) -> np.ndarray:
    """uint8 N×H×W×3 as given, or a float tensor/array N×3×H×W in [-1, 1] (a decoder's output)."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        x = images
    elif type(images).__module__.startswith("torch") or (
        isinstance(images, np.ndarray) and np.issubdtype(images.dtype, np.floating)
    ):
        x = to_uint8(images)
    else:
        x = np.asarray(images)
    if x.ndim == 3:  # one channel
        x = x[..., None]
    if x.ndim != 4 or x.dtype != np.uint8 or x.shape[-1] not in (1, 3):
        raise VitditError(
            f"grid: expected uint8 N×H×W×3 or float N×3×H×W in [-1, 1], got {x.dtype} {tuple(x.shape)}"
        )
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def _label_text(label, label_names) -> str:
    if label_names is not None and isinstance(label, int | np.integer) and 0 <= int(label) < len(label_names):
        text = str(label_names[int(label)])
    else:
        text = str(label)
    text = text if len(text) <= MAX_LABEL_CHARS else text[: MAX_LABEL_CHARS - 3] + "..."
    # The bitmap font covers Latin-1 only: other characters show as "?".
    return text.encode("latin-1", errors="replace").decode("latin-1")


def labeled_grid(
    images,
    labels,
    label_names=None,
    *,
    max_per_row: int = 10,
    min_tile: int = MIN_TILE,
    pad: int = 2,
) -> Image.Image:
    """One row per label, the label's name written left of the row, tiles upscaled to ``min_tile`` px.

    ``images``: uint8 N×H×W×3, or a float tensor N×3×H×W in [-1, 1] (what a VAE decodes).
    ``labels``: one per image, ints (rows in sorted order; ``label_names[i]`` names label i, e.g.
    class names) or strings such as prompts (rows in order of first appearance). Each row holds up to
    ``max_per_row`` images in index order. Tiles are enlarged by the integer factor
    ``ceil(min_tile / H)`` with nearest-neighbour (pixels are repeated, not interpolated, so the
    grid shows exactly what was sampled). Labels use PIL's built-in bitmap font (nothing to download).
    """
    from PIL import ImageDraw, ImageFont

    x = _to_uint8_nhwc(images)
    labels = [lab.item() if isinstance(lab, np.generic) else lab for lab in np.asarray(labels).tolist()]
    if len(x) == 0:
        raise VitditError("grid: no images")
    if len(labels) != len(x):
        raise VitditError(f"grid: {len(x)} images but {len(labels)} labels")
    if all(isinstance(lab, int) for lab in labels):
        keys = sorted(set(labels))
    else:
        keys = list(dict.fromkeys(labels))
    rows = [[i for i, lab in enumerate(labels) if lab == key][:max_per_row] for key in keys]
    h, w = x.shape[1:3]
    scale = max(1, -(-min_tile // h))  # ceil: at least min_tile px
    th, tw = h * scale, w * scale
    font = ImageFont.load_default_imagefont()  # the bitmap font compiled into Pillow
    texts = [_label_text(key, label_names) for key in keys]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(measure.textbbox((0, 0), t, font=font)[2] for t in texts)
    strip = text_w + 2 * 4  # 4 px each side of the text
    cols = max(len(r) for r in rows)
    canvas = np.zeros((len(rows) * (th + pad) + pad, strip + cols * (tw + pad) + pad, 3), dtype=np.uint8)
    for r, idx in enumerate(rows):
        for c, i in enumerate(idx):
            y0, x0 = pad + r * (th + pad), strip + pad + c * (tw + pad)
            canvas[y0 : y0 + th, x0 : x0 + tw] = x[i].repeat(scale, axis=0).repeat(scale, axis=1)
    grid = Image.fromarray(canvas)
    draw = ImageDraw.Draw(grid)
    for r, text in enumerate(texts):
        top, bottom = measure.textbbox((0, 0), text, font=font)[1::2]
        y = pad + r * (th + pad) + (th - (bottom - top)) // 2 - top
        draw.text((4, y), text, fill=(255, 255, 255), font=font)
    return grid


def make_grid(
    images: np.ndarray, labels: np.ndarray, max_per_class: int = 10, pad: int = 2, label_names=None
) -> Image.Image:
    """One row per class (sorted labels), up to ``max_per_class`` samples each, in index order,
    upscaled and labelled (``labeled_grid``)."""
    return labeled_grid(images, labels, label_names, max_per_row=max_per_class, pad=pad)


def finalize(output: str, num_samples: int, config: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Assemble ``samples.npz`` and ``grid.png`` from the PNGs (and write ``sampling.json``).

    The grid's rows are named by ``config["class_names"]`` (or ``config["prompts"]``) when given.
    """
    images, labels = read_images(output, num_samples)
    write_npz(output, images, labels)
    names = (config or {}).get("prompts") or (config or {}).get("class_names") or None
    make_grid(images, labels, label_names=names).save(os.path.join(output, GRID_NAME))
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
