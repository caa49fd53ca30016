"""Handwritten two-digit numbers drawn from their English names: a text-to-image set that can be judged.

Each image shows a number from 10 to 99 as two scikit-learn digits side by side: an R×R canvas
(R even, at least 16) holds the tens glyph in its left half and the units glyph in its right half,
each rendered at R/2 exactly as :func:`vitdit.digits.digits_arrays` renders it (at R = 16 that is
the digits' native 8×8), vertically centred, black elsewhere. Square images keep the rest of the
pipeline (centre crop, the 16-px VAE of the quickstart) unchanged.

The caption is the number in words ("forty-seven", "the number forty-seven", "forty seven", ...),
never in digits, so a model has to read words. Train composites use glyphs of the digits' train
split only and val composites glyphs of its val split only (:func:`vitdit.digits.split_indices`,
the split of ``vitdit data digits``), so no glyph crosses the split. The numbers of
:data:`HELD_OUT` are never written to train/: a text-to-image model that draws them composes a
tens word and a units word it has only seen in other numbers.

Layout under ``<out>``: ``train/<NN>/<k:04d>.png`` with its caption in ``<k:04d>.txt`` beside it
(the folder convention's sidecar), the same under ``val/`` for every number, and ``numbers.json``
recording the settings, the held-out numbers, the templates and each image's two source digits.
The class folder is the number itself; train/ lacks the held-out folders, so a class *index*
differs between train/ and val/: read the number from the folder name.

The reader scores generated numbers with a digits classifier: :func:`glyph_crops` cuts the two
glyph regions and resizes them to the classifier's input, :func:`read_numbers` turns the
classifier's logits into numbers, :func:`number_accuracy` compares them with the prompted ones.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from vitdit.digits import digits_arrays, split_indices
from vitdit.errors import VitditError

NUMBERS = tuple(range(10, 100))

# Never written to train/. Each has a tens word of 20..90 and a units word of 1..9 that both occur
# in other training numbers ("twenty-seven" is held out, "twenty-one" and "thirty-seven" are not):
# no teens (their words occur nowhere else) and no round tens ("forty" alone is the only number whose
# caption is its tens word without a units word). Every tens word 2..9 and every units word 1..9
# occurs at least once, so the held-out score covers all of them.
HELD_OUT: tuple[int, ...] = (27, 34, 39, 42, 49, 58, 61, 73, 86, 95)

# Caption templates: {words} is the canonical spelling ("forty-seven"), {spaced} the same without
# the hyphen ("forty seven"). None of them contains a digit.
TEMPLATES: tuple[str, ...] = (
    "{words}",
    "the number {words}",
    "{spaced}",
    "a handwritten {words}",
    "{spaced}, written by hand",
)

# The digits' train/val split used for the glyphs: the one of ``vitdit data digits`` (its defaults),
# independent of this set's own seed, so a digits classifier's val split never sees a train glyph.
DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0

MANIFEST = "numbers.json"
PROMPTS = "prompts.txt"  # one prompt per number 10..99 in order (its canonical words): what to sample
MIN_RESOLUTION = 16  # two glyphs of at least the digits' native 8 px side by side

_UNITS = ("", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_TEENS = (
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
)
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_SPLIT_CODES = {"train": 0, "val": 1}  # part of each (split, number) RNG stream's seed


def number_words(n: int) -> str:
    """The canonical English words of ``n`` in 10..99: "ten", "eleven", "twenty", "forty-seven"."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 10 <= n <= 99:
        raise VitditError(f"number {n!r}: expected an integer from 10 to 99")
    n = int(n)
    if n < 20:
        return _TEENS[n - 10]
    tens, units = divmod(n, 10)
    return _TENS[tens] + ("-" + _UNITS[units] if units else "")


def caption_for(n: int, template: str) -> str:
    """``template`` (one of :data:`TEMPLATES`) filled with the words of ``n``."""
    words = number_words(n)
    return template.format(words=words, spaced=words.replace("-", " "))


# Every spelling a caption can use, longest first, so "forty seven" wins over "forty".
_SPELLINGS = sorted(
    ((s, n) for n in NUMBERS for s in {number_words(n), number_words(n).replace("-", " ")}),
    key=lambda p: -len(p[0]),
)
_SPELLING_RE = re.compile(r"\b(" + "|".join(re.escape(s) for s, _ in _SPELLINGS) + r")\b")
_SPELLING_TO_NUMBER = dict(_SPELLINGS)


def number_from_words(text: str) -> int:
    """The number a caption or prompt names in words ("the number forty seven" → 47).

    Raises VitditError when ``text`` names no number from 10 to 99, or more than one.
    """
    found = {_SPELLING_TO_NUMBER[m] for m in _SPELLING_RE.findall(text.lower())}
    if len(found) != 1:
        what = "no number" if not found else f"several numbers {sorted(found)}"
        raise VitditError(f"caption {text!r}: names {what} from ten to ninety-nine in words")
    return found.pop()


def _check_resolution(resolution: int) -> None:
    if resolution < MIN_RESOLUTION or resolution % 2:
        raise VitditError(
            f"resolution {resolution}: must be even and at least {MIN_RESOLUTION} "
            "(two glyphs of at least the digits' native 8 px side by side)"
        )


def _glyph_box(resolution: int) -> tuple[int, int]:
    """(top row, side) of both glyphs in an R×R composite."""
    side = resolution // 2
    return (resolution - side) // 2, side


def compose(tens_glyph: np.ndarray, units_glyph: np.ndarray) -> np.ndarray:
    """One R×R×3 uint8 composite of two (R/2)×(R/2)×3 glyphs: tens left, units right, centred rows."""
    side = tens_glyph.shape[0]
    if tens_glyph.shape != units_glyph.shape or tens_glyph.shape != (side, side, 3):
        raise VitditError(
            f"glyphs of shapes {tens_glyph.shape} and {units_glyph.shape}: expected two equal S×S×3"
        )
    resolution = 2 * side
    top, _ = _glyph_box(resolution)
    out = np.zeros((resolution, resolution, 3), dtype=np.uint8)
    out[top : top + side, :side] = tens_glyph
    out[top : top + side, side:] = units_glyph
    return out


def _choose_glyphs(
    pool_by_digit: dict[int, np.ndarray], n: int, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` (tens, units) digit indices for ``n``: distinct within the number while the pool lasts."""
    tens_pool, units_pool = pool_by_digit[n // 10], pool_by_digit[n % 10]
    tens = rng.choice(tens_pool, size=count, replace=count > len(tens_pool))
    units = rng.choice(units_pool, size=count, replace=count > len(units_pool))
    return tens, units


def _write_atomic(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def export_numbers(
    output: str,
    resolution: int = 16,
    per_number_train: int = 40,
    per_number_val: int = 8,
    seed: int = 0,
) -> dict:
    """Write the numbers set under ``output``; returns the image counts per split.

    The glyphs and captions of each (split, number) come from their own stream of ``seed``, so the
    output is the same on every machine and a re-run rewrites identical bytes. Raises VitditError
    for a bad resolution or count, for ``output`` being a file, or for an existing set written with
    other settings (the two would mix: choose another directory).
    """
    _check_resolution(resolution)
    for name, value in (("per_number_train", per_number_train), ("per_number_val", per_number_val)):
        if value < 1:
            raise VitditError(f"{name} {value}: must be at least 1")
    if os.path.exists(output) and not os.path.isdir(output):
        raise VitditError(f"output {output}: is a file, expected a directory")
    settings = {
        "resolution": resolution,
        "per_number_train": per_number_train,
        "per_number_val": per_number_val,
        "seed": seed,
        "held_out": list(HELD_OUT),
        "templates": list(TEMPLATES),
        "digits_split": {"val_fraction": DIGITS_VAL_FRACTION, "seed": DIGITS_SPLIT_SEED},
    }
    manifest_path = os.path.join(output, MANIFEST)
    if os.path.exists(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            old = {k: v for k, v in json.load(f).items() if k in settings}
        if old != settings:
            changed = sorted(k for k in settings if old.get(k) != settings[k])
            raise VitditError(
                f"output {output}: holds a numbers set written with other settings ({', '.join(changed)}); "
                "write to a new directory"
            )

    glyphs, labels = digits_arrays(resolution // 2)
    splits = dict(zip(("train", "val"), split_indices(labels, DIGITS_VAL_FRACTION, DIGITS_SPLIT_SEED)))
    counts = {"train": per_number_train, "val": per_number_val}
    records, written = [], {}
    for split, pool in splits.items():
        by_digit = {d: pool[labels[pool] == d] for d in range(10)}
        written[split] = 0
        for n in NUMBERS:
            if split == "train" and n in HELD_OUT:
                continue
            rng = np.random.default_rng([seed, _SPLIT_CODES[split], n])
            tens, units = _choose_glyphs(by_digit, n, counts[split], rng)
            templates = rng.integers(len(TEMPLATES), size=counts[split])
            folder = os.path.join(output, split, f"{n:02d}")
            os.makedirs(folder, exist_ok=True)
            for k, (t, u, ti) in enumerate(zip(tens, units, templates)):
                stem = os.path.join(folder, f"{k:04d}")
                caption = caption_for(n, TEMPLATES[ti])
                _write_atomic(stem + ".png", _png_bytes(compose(glyphs[t], glyphs[u])))
                _write_atomic(stem + ".txt", (caption + "\n").encode("utf-8"))
                records.append(
                    {
                        "path": f"{split}/{n:02d}/{k:04d}.png",
                        "number": n,
                        "tens_index": int(t),
                        "units_index": int(u),
                        "caption": caption,
                    }
                )
            written[split] += counts[split]
    prompts = "".join(number_words(n) + "\n" for n in NUMBERS)
    _write_atomic(os.path.join(output, PROMPTS), prompts.encode("utf-8"))
    manifest = {**settings, "counts": written, "images": records}
    _write_atomic(manifest_path, (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))
    return written


# --- the reader -----------------------------------------------------------------------------------


def _resize(images: np.ndarray, side: int) -> np.ndarray:
    if images.shape[1] == side:
        return images.copy()
    out = np.empty((len(images), side, side, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        # Bicubic, as digits_arrays upscales the 8×8 digits: a clean glyph reaches the classifier
        # exactly as the digits it was trained on.
        out[i] = np.asarray(Image.fromarray(im).resize((side, side), Image.BICUBIC))
    return out


def glyph_crops(images: np.ndarray, classifier_resolution: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """The tens and units glyph regions of N×R×R×3 uint8 composites, each resized (bicubic) to
    the classifier's input side: two N×r×r×3 uint8 arrays."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[3] != 3:
        raise VitditError(f"images of shape {images.shape}: expected N×R×R×3 composites")
    if images.dtype != np.uint8:
        raise VitditError(f"images of dtype {images.dtype}: expected uint8")
    _check_resolution(images.shape[1])
    if classifier_resolution < 1:
        raise VitditError(f"classifier_resolution {classifier_resolution}: must be at least 1")
    top, side = _glyph_box(images.shape[1])
    rows = images[:, top : top + side]
    tens, units = rows[:, :, :side], rows[:, :, side : 2 * side]
    return _resize(tens, classifier_resolution), _resize(units, classifier_resolution)


def read_numbers(
    logits_fn: Callable[[np.ndarray], np.ndarray], images: np.ndarray, classifier_resolution: int = 16
) -> np.ndarray:
    """The numbers (tens·10 + units, int64) a digits classifier reads in N×R×R×3 uint8 composites.

    ``logits_fn`` maps uint8 M×r×r×3 images to M×10 logits; it is called once, on the N tens crops
    followed by the N units crops. A tens glyph read as 0 gives a number below 10 (a wrong read).
    """
    tens, units = glyph_crops(images, classifier_resolution)
    logits = np.asarray(logits_fn(np.concatenate([tens, units])))
    if logits.shape != (2 * len(tens), 10):
        raise VitditError(f"logits of shape {logits.shape}: expected {(2 * len(tens), 10)} from logits_fn")
    digits = logits.argmax(axis=1).astype(np.int64)
    return digits[: len(tens)] * 10 + digits[len(tens) :]


def _scores(predicted: np.ndarray, target: np.ndarray) -> dict[str, float]:
    if len(target) == 0:
        nan = float("nan")
        return {"number": nan, "tens": nan, "units": nan, "count": 0}
    return {
        "number": float(np.mean(predicted == target)),
        "tens": float(np.mean(predicted // 10 == target // 10)),
        "units": float(np.mean(predicted % 10 == target % 10)),
        "count": len(target),
    }


def number_accuracy(
    predicted: Sequence[int] | np.ndarray,
    target: Sequence[int] | np.ndarray,
    held_out: Sequence[int] | None = None,
) -> dict[str, float]:
    """Fractions read right: ``number`` (both digits), ``tens``, ``units``, and ``count``.

    With ``held_out`` (e.g. :data:`HELD_OUT`), the same four again for the targets outside it
    (``*_seen``) and inside it (``*_held_out``); a group without targets scores NaN.
    """
    p, t = np.asarray(predicted, dtype=np.int64), np.asarray(target, dtype=np.int64)
    if p.shape != t.shape or p.ndim != 1:
        raise VitditError(f"predicted {p.shape} and target {t.shape}: expected two equal-length 1-D arrays")
    if t.size and (t.min() < 10 or t.max() > 99):
        raise VitditError(f"target: numbers from {t.min()} to {t.max()}, expected 10..99")
    out = _scores(p, t)
    if held_out is not None:
        mask = np.isin(t, np.asarray(list(held_out), dtype=np.int64))
        for suffix, m in (("seen", ~mask), ("held_out", mask)):
            out.update({f"{k}_{suffix}": v for k, v in _scores(p[m], t[m]).items()})
    return out
