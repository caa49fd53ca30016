"""Sample grids (vitdit.samples.labeled_grid): upscaled tiles, a label strip per row."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vitdit import samples as layout
from vitdit.errors import VitditError


def _images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _tile(grid: np.ndarray, row: int, col: int, tile: int, cols: int, pad: int = 2) -> np.ndarray:
    strip = grid.shape[1] - (cols * (tile + pad) + pad)  # the label strip is what is left of the tiles
    y0, x0 = pad + row * (tile + pad), strip + pad + col * (tile + pad)
    return grid[y0 : y0 + tile, x0 : x0 + tile]


def test_tiles_are_the_nearest_upscaled_samples_one_row_per_class():
    images = _images(20)
    labels = np.arange(20) % 10  # classes cycled, as `vitdit sample` labels them
    grid = np.asarray(layout.labeled_grid(images, labels, [f"digit {i}" for i in range(10)]))
    tile = 64  # 16 px × 4: the smallest integer factor reaching MIN_TILE
    assert grid.shape[0] == 10 * (tile + 2) + 2 and grid.shape[2] == 3  # a row per class
    assert grid.shape[1] > 2 * (tile + 2) + 2  # two columns and a label strip
    for row in range(10):
        for col, index in enumerate(np.flatnonzero(labels == row)):
            want = images[index].repeat(4, axis=0).repeat(4, axis=1)
            np.testing.assert_array_equal(_tile(grid, row, col, tile, cols=2), want)


def test_the_label_strip_shows_the_label():
    images = np.zeros((2, 16, 16, 3), np.uint8)  # equal tiles: only the labels differ
    grid = np.asarray(layout.labeled_grid(images, [0, 1], ["zero", "seven"]))
    strip = grid.shape[1] - (1 * (64 + 2) + 2)
    row0, row1 = grid[2 : 2 + 64, :strip], grid[2 + 66 : 2 + 66 + 64, :strip]
    assert row0.max() == 255 and row1.max() == 255  # text drawn in white
    assert not np.array_equal(row0, row1)
    same = np.asarray(layout.labeled_grid(images, [0, 1], ["zero", "zero"]))
    np.testing.assert_array_equal(same[2 : 2 + 64, :strip], same[2 + 66 : 2 + 66 + 64, :strip])


def test_tensor_input_and_prompt_labels():
    x = torch.rand(3, 3, 8, 8) * 2 - 1  # a decoder's output in [-1, 1]
    prompts = ["a red square", "a blue circle on a long long long long line", "a red square"]
    grid = np.asarray(layout.labeled_grid(x, prompts))
    assert grid.shape[0] == 2 * (64 + 2) + 2  # two distinct prompts, in order of appearance
    want = layout.to_uint8(x)[2].repeat(8, axis=0).repeat(8, axis=1)  # 8 px × 8 = 64
    np.testing.assert_array_equal(_tile(grid, 0, 1, 64, cols=2), want)
    big = np.asarray(layout.labeled_grid(_images(2, size=100), [0, 1], min_tile=64))
    assert big.shape[0] == 2 * (100 + 2) + 2  # tiles already large enough are not scaled


def test_bad_grid_input_is_named():
    with pytest.raises(VitditError, match="no images"):
        layout.labeled_grid(np.zeros((0, 8, 8, 3), np.uint8), [])
    with pytest.raises(VitditError, match="2 images but 1 labels"):
        layout.labeled_grid(_images(2), [0])
    with pytest.raises(VitditError, match="expected uint8"):
        layout.labeled_grid(np.zeros((2, 8, 8, 5), np.uint8), [0, 1])


def test_finalize_writes_a_labelled_grid_from_the_class_names(tmp_path):
    images = _images(4, size=8)
    layout.write_images(str(tmp_path), range(4), images, [0, 1, 0, 1])
    layout.finalize(str(tmp_path), 4, {"class_names": ["cat", "dog"]})
    grid = np.asarray(Image.open(tmp_path / layout.GRID_NAME).convert("RGB"))
    assert grid.shape[0] == 2 * (64 + 2) + 2
    np.testing.assert_array_equal(_tile(grid, 1, 1, 64, cols=2), images[3].repeat(8, 0).repeat(8, 1))
