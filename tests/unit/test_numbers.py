"""The numbers set (two digits captioned in words) and its reader, on real scikit-learn digits."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from jobs import cli
from vitdit.digits import digits_arrays, split_indices
from vitdit.errors import VitditError
from vitdit.numbers import (
    HELD_OUT,
    MANIFEST,
    NUMBERS,
    TEMPLATES,
    caption_for,
    compose,
    export_numbers,
    glyph_crops,
    number_accuracy,
    number_from_words,
    number_words,
    read_numbers,
)

# Small counts keep an export at a fraction of a second; the defaults only scale it.
SMALL = {"per_number_train": 2, "per_number_val": 1}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("numbers"))
    counts = export_numbers(out, **SMALL)
    with open(os.path.join(out, MANIFEST), encoding="utf-8") as f:
        return out, {"counts": counts, **json.load(f)}


def _read_png(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_number_words():
    spot = {10: "ten", 11: "eleven", 15: "fifteen", 19: "nineteen", 20: "twenty", 21: "twenty-one"}
    spot |= {47: "forty-seven", 58: "fifty-eight", 80: "eighty", 90: "ninety", 99: "ninety-nine"}
    assert {n: number_words(n) for n in spot} == spot
    words = [number_words(n) for n in NUMBERS]
    assert len(set(words)) == 90 and all(re.fullmatch(r"[a-z]+(-[a-z]+)?", w) for w in words)
    for bad in (9, 100, 4.5, "47", True):
        with pytest.raises(VitditError, match="expected an integer from 10 to 99"):
            number_words(bad)


def test_every_caption_names_its_number_and_only_it():
    for n in NUMBERS:
        for t in TEMPLATES:
            caption = caption_for(n, t)
            assert not re.search(r"\d", caption), caption
            assert number_from_words(caption) == n, caption
    with pytest.raises(VitditError, match="names no number"):
        number_from_words("a handwritten digit")
    with pytest.raises(VitditError, match="several numbers"):
        number_from_words("forty-seven and twelve")


def test_held_out_numbers_are_compositions_of_words_seen_in_training():
    train = [n for n in NUMBERS if n not in HELD_OUT]
    assert 8 <= len(HELD_OUT) <= 12 and len(set(HELD_OUT)) == len(HELD_OUT)
    # A training caption's tens word and units word ("forty", "seven" of "forty-seven").
    seen_tens = {number_words(n).split("-")[0] for n in train if n >= 20}
    seen_units = {number_words(n).split("-")[1] for n in train if n >= 20 and n % 10}
    for h in HELD_OUT:
        assert 21 <= h <= 99 and h % 10, f"{h}: a teen or a round ten has a word no other number has"
        tens_word, units_word = number_words(h).split("-")
        assert tens_word in seen_tens and units_word in seen_units, h
    # Every tens word and units word is held out somewhere, so the held-out score covers them all.
    assert {h // 10 for h in HELD_OUT} == set(range(2, 10))
    assert {h % 10 for h in HELD_OUT} == set(range(1, 10))


def test_export_layout_captions_and_split(small_set):
    out, manifest = small_set
    assert manifest["counts"] == {"train": 2 * (90 - len(HELD_OUT)), "val": 90}
    assert manifest["held_out"] == list(HELD_OUT) and manifest["templates"] == list(TEMPLATES)
    assert sorted(os.listdir(os.path.join(out, "val"))) == [str(n) for n in NUMBERS]
    assert sorted(os.listdir(os.path.join(out, "train"))) == [str(n) for n in NUMBERS if n not in HELD_OUT]
    records = manifest["images"]
    assert len(records) == sum(manifest["counts"].values())
    _, labels = digits_arrays(8)
    train_glyphs, val_glyphs = (set(s.tolist()) for s in split_indices(labels))
    used = {"train": set(), "val": set()}
    for r in records:
        split, folder, name = r["path"].split("/")
        assert int(folder) == r["number"] and (split == "val" or r["number"] not in HELD_OUT)
        # Each glyph shows its digit of the number and comes from its own split of the digits.
        assert (labels[r["tens_index"]], labels[r["units_index"]]) == divmod(r["number"], 10)
        used[split] |= {r["tens_index"], r["units_index"]}
        with open(os.path.join(out, split, folder, name[:-4] + ".txt"), encoding="utf-8") as f:
            caption = f.read().strip()
        assert caption == r["caption"] and number_words(r["number"]).split("-")[0] in caption
        assert not re.search(r"\d", caption) and number_from_words(caption) == r["number"]
    assert used["train"] <= train_glyphs and used["val"] <= val_glyphs
    assert not used["train"] & used["val"]
    # A seeded choice of templates uses more than one of them even in this small set.
    assert len({r["caption"] for r in records if r["number"] == 47}) > 1


def test_composites_hold_the_source_glyphs(small_set):
    out, manifest = small_set
    glyphs, _ = digits_arrays(8)
    for r in manifest["images"][::37]:
        image = _read_png(os.path.join(out, r["path"]))
        assert image.shape == (16, 16, 3)
        np.testing.assert_array_equal(image, compose(glyphs[r["tens_index"]], glyphs[r["units_index"]]))
        # Black outside the two glyphs' rows 4..12.
        assert not image[:4].any() and not image[12:].any()


def test_export_is_deterministic_and_rerun_safe(small_set, tmp_path):
    out, _ = small_set

    def tree(root: str) -> dict[str, bytes]:
        files = {}
        for d, _, names in os.walk(root):
            for n in names:
                with open(os.path.join(d, n), "rb") as f:
                    files[os.path.relpath(os.path.join(d, n), root)] = f.read()
        return files

    before = tree(out)
    export_numbers(str(tmp_path / "again"), **SMALL)
    assert tree(str(tmp_path / "again")) == before
    export_numbers(out, **SMALL)  # the same command again: identical bytes, nothing added
    assert tree(out) == before
    export_numbers(str(tmp_path / "seed1"), seed=1, **SMALL)
    assert tree(str(tmp_path / "seed1")) != before
    with pytest.raises(VitditError, match=r"other settings \(seed\)"):
        export_numbers(out, seed=1, **SMALL)


@pytest.mark.parametrize("resolution", [16, 32])
def test_glyph_crops_give_back_the_digits_renders(resolution):
    glyphs, _ = digits_arrays(resolution // 2)
    pairs = [(0, 1), (5, 1796), (100, 7)]
    images = np.stack([compose(glyphs[t], glyphs[u]) for t, u in pairs])
    # At the glyph's own side the crop is the glyph itself.
    tens, units = glyph_crops(images, classifier_resolution=resolution // 2)
    np.testing.assert_array_equal(tens, glyphs[[t for t, _ in pairs]])
    np.testing.assert_array_equal(units, glyphs[[u for _, u in pairs]])
    # Resized to the classifier's side, a clean glyph is the digit that classifier trained on: at
    # R = 16 exactly (both are one bicubic resize of the 8×8 digit).
    for side in (16, 24):
        tens, units = glyph_crops(images, classifier_resolution=side)
        expected = np.stack(
            [np.asarray(Image.fromarray(g).resize((side, side), Image.BICUBIC)) for g in glyphs]
        )
        np.testing.assert_array_equal(tens, expected[[t for t, _ in pairs]])
        np.testing.assert_array_equal(units, expected[[u for _, u in pairs]])
        if resolution == 16:
            np.testing.assert_array_equal(tens, digits_arrays(side)[0][[t for t, _ in pairs]])


def _nearest_template_logits(side: int):
    """A stand-in for the digits ViT: minus the distance to the nearest digit render of each class."""
    templates, labels = digits_arrays(side)
    flat = templates.reshape(len(templates), -1).astype(np.float64)

    def logits_fn(x: np.ndarray) -> np.ndarray:
        assert x.dtype == np.uint8 and x.shape[1:] == (side, side, 3)
        xf = x.reshape(len(x), -1).astype(np.float64)
        # Squared distances; integers below 2**53, so exact in float64.
        d = (xf**2).sum(1)[:, None] - 2 * xf @ flat.T + (flat**2).sum(1)[None]  # M, 1797
        return np.stack([-d[:, labels == c].min(axis=1) for c in range(10)], axis=1)  # M, 10

    return logits_fn


def test_read_numbers_reads_clean_composites(small_set):
    out, manifest = small_set
    records = manifest["images"]
    images = np.stack([_read_png(os.path.join(out, r["path"])) for r in records])
    target = np.array([r["number"] for r in records])
    predicted = read_numbers(_nearest_template_logits(16), images, classifier_resolution=16)
    assert predicted.dtype == np.int64
    np.testing.assert_array_equal(predicted, target)
    acc = number_accuracy(predicted, target, held_out=HELD_OUT)
    assert acc["number"] == acc["number_held_out"] == acc["number_seen"] == 1.0
    assert acc["count_held_out"] == len(HELD_OUT) == int(np.isin(target, HELD_OUT).sum())  # val/ only
    with pytest.raises(VitditError, match="logits of shape"):
        read_numbers(lambda x: np.zeros((len(x), 9)), images[:2])


def test_number_accuracy_scores_each_digit_and_each_group():
    target = [27, 27, 45, 45]  # 27 held out
    predicted = [27, 21, 46, 35]  # right; tens only; tens only; units only
    acc = number_accuracy(predicted, target, held_out=HELD_OUT)
    assert (acc["number"], acc["tens"], acc["units"], acc["count"]) == (0.25, 0.75, 0.5, 4)
    assert (acc["number_held_out"], acc["tens_held_out"], acc["units_held_out"]) == (0.5, 1.0, 0.5)
    assert (acc["number_seen"], acc["tens_seen"], acc["units_seen"]) == (0.0, 0.5, 0.5)
    assert "number_seen" not in number_accuracy(predicted, target)
    assert np.isnan(number_accuracy([45], [45], held_out=HELD_OUT)["number_held_out"])
    with pytest.raises(VitditError, match="expected 10..99"):
        number_accuracy([5], [5])
    with pytest.raises(VitditError, match="equal-length"):
        number_accuracy([45, 46], [45])


def test_sidecars_are_the_captions_the_encoder_reads(small_set):
    # The image source of `vitdit encode` lists the set as it lists any captioned folder.
    from pipelines.images import CAPTION, ID, _ChunkReader, read_image_source

    out, manifest = small_set
    source = read_image_source(os.path.join(out, "val"))
    assert source.class_names == [str(n) for n in NUMBERS]
    reader = _ChunkReader(source.filesystem, captions=True)
    rows = {r[ID]: r for c in source.chunks for r in reader({"chunk": c.__dict__})}
    expected = {
        r["path"][len("val/") :]: r["caption"] for r in manifest["images"] if r["path"].startswith("val/")
    }
    assert {i: r[CAPTION] for i, r in rows.items()} == expected


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def test_cli_writes_the_set_and_refuses_bad_input(tmp_path):
    code, out, _ = _cli(["data", "numbers", "--output", str(tmp_path / "n"), "--per-number-train", "1"])
    assert code == 0 and '{"train": 80, "val": 720}' in out
    (tmp_path / "file").write_text("x")
    bad = {
        ("--resolution", "15"): "--resolution 15: must be even",
        ("--resolution", "8"): "--resolution 8: must be even and at least 16",
        ("--per-number-train", "0"): "--per-number-train 0: must be at least 1",
        ("--per-number-val", "-1"): "--per-number-val -1: must be at least 1",
        ("--output", str(tmp_path / "file")): f"--output {tmp_path / 'file'}: is a file",
    }
    for flags, message in bad.items():
        argv = ["data", "numbers", "--output", str(tmp_path / "m"), *flags]
        code, _, err = _cli(argv)
        assert code == 2 and err.startswith("error: " + message) and len(err.strip().splitlines()) == 1, err


def test_evaluate_scores_numbers_against_their_prompts(small_set):
    """`vitdit evaluate --numbers`: the target of each sample is the number its prompt names; the
    classifier's logits are reordered by class name; held-out numbers come from numbers.json."""
    from pipelines.evaluate import number_metrics

    out, manifest = small_set
    records = [r for r in manifest["images"] if r["path"].startswith("val/")][:12]
    images = np.stack([_read_png(os.path.join(out, r["path"])) for r in records])
    logits = _nearest_template_logits(16)
    names = [str(d) for d in (3, 1, 4, 0, 5, 9, 2, 6, 8, 7)]  # a class order other than 0..9

    class Extractor:  # what pipelines.evaluate.Extractor gives: (features, logits) in its class order
        class_names, image_size = names, 16

        def __call__(self, x):
            return None, logits(x)[:, [int(n) for n in names]]

    prompts = [r["caption"] for r in records]
    labels = np.arange(len(records))
    scores = number_metrics(Extractor(), images, labels, prompts, os.path.join(out, "val"))
    assert scores["number"] == 1.0 and scores["count"] == len(records)
    # Prompts naming other numbers: every read is then wrong.
    wrong = [f"the number {number_words(99 if r['number'] != 99 else 98)}" for r in records]
    assert number_metrics(Extractor(), images, labels, wrong, os.path.join(out, "val"))["number"] == 0.0
    with pytest.raises(VitditError, match="no prompts"):
        number_metrics(Extractor(), images, labels, [], os.path.join(out, "val"))


def test_the_set_lists_every_number_as_a_prompt(small_set):
    from vitdit.numbers import PROMPTS

    out, _ = small_set
    with open(os.path.join(out, PROMPTS), encoding="utf-8") as f:
        prompts = f.read().splitlines()
    assert prompts == [number_words(n) for n in NUMBERS]
    assert [number_from_words(p) for p in prompts] == list(NUMBERS)
