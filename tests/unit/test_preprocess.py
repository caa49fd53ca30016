"""Preprocessing, the VAE wrapper and source listing: no Ray, real Pillow / diffusers at tiny sizes."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch
from _encode_utils import (
    broken_files,
    odd_mode_files,
    png_bytes,
    rgb_image,
    write_folder,
    write_parquet,
    write_tar,
)
from PIL import Image

from pipelines.images import Preprocess, read_image_source, resolve_splits, split_errors
from vitdit.errors import VitditError
from vitdit.latents import VAEIdentity
from vitdit.preprocess import (
    BadImageError,
    center_crop_arr,
    decode_image,
    from_unit_range,
    preprocess_bytes,
    to_unit_range,
)
from vitdit.vae import (
    decode_latents,
    encode_posterior,
    latent_shape,
    load_vae,
    scale_latents,
    unscale_latents,
    vae_identity,
)

# ------------------------------------------------------------------------------------------ decode


@pytest.mark.parametrize("name", sorted(broken_files()))
def test_broken_inputs_raise_bad_image_with_reason(name):
    with pytest.raises(BadImageError) as e:
        decode_image(broken_files()[name])
    expected = {
        "zero.png": "empty",
        "truncated.png": "truncated",
        "truncated.jpg": "truncated",
        "notes.png": "not an image",
        "undecodable.png": "undecodable",
        "bomb.png": "decompression bomb",
    }[name]
    assert expected in e.value.reason


def test_decompression_bomb_limit_is_a_parameter():
    data = png_bytes(rgb_image(0, (300, 300)))
    assert decode_image(data).size == (300, 300)
    with pytest.raises(BadImageError, match="decompression bomb: 300x300"):
        decode_image(data, max_pixels=10_000)


@pytest.mark.parametrize("name", sorted(odd_mode_files()))
def test_every_mode_decodes_to_rgb(name):
    im = decode_image(odd_mode_files()[name])
    assert im.mode == "RGB"
    arr = np.asarray(im)
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3


def test_mode_conversions_keep_the_meaning_of_pixels():
    files = odd_mode_files()
    # 16-bit mid-grey stays mid-grey (a plain convert("RGB") clips it to white).
    assert np.asarray(decode_image(files["mode_I16.png"])).mean() == pytest.approx(128, abs=1)
    # CMYK (0, 255, 255, 0) is red.
    r, g, b = np.asarray(decode_image(files["mode_CMYK.jpg"])).reshape(-1, 3).mean(0)
    assert r > 240 and g < 15 and b < 15
    # Transparent pixels become white, opaque ones keep their colour.
    rgba = np.asarray(decode_image(files["mode_RGBA.png"]))
    assert (rgba[:8] == 255).all()
    assert (rgba[8:, :, 0] == 200).all() and (rgba[8:, :, 1] == 0).all()
    # A grey ramp stays a ramp.
    gray = np.asarray(decode_image(files["mode_L.png"]))
    assert (gray[..., 0] == gray[..., 2]).all() and gray[0, 0, 0] == 0 and gray[0, -1, 0] == 240


# ------------------------------------------------------------------------------------------ crop


def test_center_crop_takes_the_middle_of_the_long_side():
    # 300×100: left third red, middle green, right third blue → the centre 64×64 crop is green.
    arr = np.zeros((100, 300, 3), dtype=np.uint8)
    arr[:, :100, 0] = 255
    arr[:, 100:200, 1] = 255
    arr[:, 200:, 2] = 255
    out = center_crop_arr(Image.fromarray(arr), 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert out[:, 4:-4, 1].min() > 240 and out[:, 4:-4, 0].max() < 15 and out[:, 4:-4, 2].max() < 15


def test_center_crop_upscales_small_images_and_halves_large_ones():
    assert center_crop_arr(rgb_image(0, (5, 7)), 16).shape == (16, 16, 3)
    # A uniform large image stays uniform through the box halvings and bicubic resize.
    big = Image.new("RGB", (1000, 800), (10, 20, 30))
    out = center_crop_arr(big, 32)
    assert out.shape == (32, 32, 3) and (out == np.array([10, 20, 30], dtype=np.uint8)).all()


def test_center_crop_matches_a_direct_resize_when_no_halving():
    # 48×32 → 32: no halving (32 < 64); bicubic to 48×32 is a no-op, then the centre columns 8..40.
    im = rgb_image(5, (48, 32))
    out = center_crop_arr(im, 32)
    np.testing.assert_array_equal(out, np.asarray(im)[:, 8:40])


def test_unit_range_round_trip_and_layout():
    imgs = np.stack([center_crop_arr(rgb_image(i), 8) for i in range(3)])  # 3, 8, 8, 3
    x = to_unit_range(imgs)
    assert x.shape == (3, 3, 8, 8) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x[1, 2, 3, 4] == pytest.approx(imgs[1, 3, 4, 2] / 127.5 - 1.0)
    np.testing.assert_array_equal(from_unit_range(x), imgs)
    assert to_unit_range(imgs[0]).shape == (3, 8, 8)
    with pytest.raises(VitditError, match="uint8"):
        to_unit_range(imgs.astype(np.float32))


# ------------------------------------------------------------------------------------------ UDF


def test_preprocess_udf_routes_bad_rows_and_flips():
    good = [png_bytes(rgb_image(i, (24, 20))) for i in range(3)]
    bad = broken_files()
    data = [good[0], bad["zero.png"], good[1], bad["bomb.png"], good[2]]
    batch = {
        "id": np.array([f"x{i}" for i in range(5)], dtype=object),
        "label": np.array([0, 1, 2, 3, 4], dtype=np.int64),
        "bytes": np.array(data, dtype=object),
        "chunk": np.zeros(5, dtype=np.int64),
    }
    out = Preprocess(16, flip=True)(batch)
    assert out["image"].shape == (5, 16, 16, 3) and out["image"].dtype == np.uint8
    assert out["label"].dtype == np.int32
    assert "bytes" not in out and list(out["chunk"]) == [0] * 5
    errors = list(out["error"])
    assert errors[0] == errors[2] == errors[4] == ""
    assert "empty" in errors[1] and "decompression bomb" in errors[3]
    np.testing.assert_array_equal(out["image"][2], preprocess_bytes(good[1], 16))
    np.testing.assert_array_equal(out["image_flip"][2], out["image"][2][:, ::-1])
    ok, ko = split_errors(out)
    assert list(ok["id"]) == ["x0", "x2", "x4"] and list(ko["id"]) == ["x1", "x3"]


def test_preprocess_udf_keeps_read_errors():
    batch = {
        "id": np.array(["a"], dtype=object),
        "label": np.array([0], dtype=np.int32),
        "bytes": np.array([b""], dtype=object),
        "error": np.array(["unreadable file: permission denied"], dtype=object),
    }
    out = Preprocess(8)(batch)
    assert out["error"][0] == "unreadable file: permission denied"


# ------------------------------------------------------------------------------------------ VAE


def test_load_vae_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(VitditError, match=str(missing)):
        load_vae(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(VitditError, match="not a diffusers VAE directory"):
        load_vae(str(tmp_path / "empty"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(VitditError, match="UNet2DModel, not an AutoencoderKL"):
        load_vae(str(other))


def test_vae_identity_from_config_and_weights(tiny_vae_dir, tmp_path):
    from _vae_utils import make_tiny_vae

    vae = load_vae(tiny_vae_dir)
    ident = vae_identity(vae, tiny_vae_dir)
    with open(os.path.join(tiny_vae_dir, "diffusion_pytorch_model.safetensors"), "rb") as f:
        expected = hashlib.sha256(b"diffusion_pytorch_model.safetensors" + f.read()).hexdigest()
    assert ident.sha256 == expected
    assert ident.scaling_factor == 0.5 and ident.shift_factor is None and ident.latent_channels == 4
    assert ident.name_or_path == os.path.abspath(tiny_vae_dir)
    assert latent_shape(vae, 16) == (4, 8, 8)
    with pytest.raises(VitditError, match="multiple of"):
        latent_shape(vae, 15)
    # Other weights, same architecture: another identity.
    other = vae_identity(load_vae(make_tiny_vae(tmp_path / "v2", seed=1)), str(tmp_path / "v2"))
    assert not other.same_as(ident)


def test_encode_posterior_and_decode_undo_the_scaling(tiny_vae_dir):
    vae = load_vae(tiny_vae_dir)
    x = torch.from_numpy(to_unit_range(np.stack([center_crop_arr(rgb_image(i), 16) for i in range(2)])))
    mean, std = encode_posterior(vae, x)
    assert mean.shape == std.shape == (2, 4, 8, 8) and (std > 0).all()
    dist = vae.encode(x).latent_dist
    torch.testing.assert_close(mean, dist.mean)
    torch.testing.assert_close(std, dist.std)
    ident = VAEIdentity("v", None, None, scaling_factor=0.5, shift_factor=0.25, latent_channels=4)
    z = scale_latents(mean, ident)
    torch.testing.assert_close(z, (mean - 0.25) * 0.5)
    torch.testing.assert_close(unscale_latents(z, ident), mean)
    out = decode_latents(vae, scale_latents(mean, vae), vae)  # factors from the VAE's own config
    with torch.no_grad():
        ref = vae.decode(mean).sample.clamp(-1, 1)
    torch.testing.assert_close(out, ref)
    assert out.shape == (2, 3, 16, 16)


# ------------------------------------------------------------------------------------------ sources


def test_folder_listing_ids_labels_chunks(tmp_path):
    root = tmp_path / "imgs"
    write_folder(
        str(root), {"cat": {f"{i}.png": b"x" for i in range(5)}, "dog": {"a.png": b"y", "b.png": b"z"}}
    )
    (root / "README.txt").write_text("not in a class")  # beside the class folders: skipped
    (root / "cat" / ".DS_Store").write_bytes(b"hidden")  # hidden: skipped
    src = read_image_source(str(root), part_size=3)
    assert src.format == "folder" and src.class_names == ["cat", "dog"] and src.num_images == 7
    assert [c.ids for c in src.chunks] == [
        ["cat/0.png", "cat/1.png", "cat/2.png"],
        ["cat/3.png", "cat/4.png", "dog/a.png"],
        ["dog/b.png"],
    ]
    assert [c.labels for c in src.chunks] == [[0, 0, 0], [0, 0, 1], [1]]
    # Same files → same fingerprint; a changed file → another.
    assert read_image_source(str(root), part_size=3).fingerprint == src.fingerprint
    (root / "dog" / "b.png").write_bytes(b"zz")
    assert read_image_source(str(root), part_size=3).fingerprint != src.fingerprint


def test_unlabelled_folder_and_splits(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        (flat / f"{i}.png").write_bytes(b"x")
    src = read_image_source(str(flat))
    assert src.class_names == [] and src.chunks[0].labels == [-1, -1, -1]
    assert resolve_splits(str(flat)) == (str(flat), None)
    (tmp_path / "ds" / "train").mkdir(parents=True)
    assert resolve_splits(str(tmp_path / "ds")) == (f"{tmp_path}/ds/train", None)
    (tmp_path / "ds" / "val").mkdir()
    assert resolve_splits(str(tmp_path / "ds")) == (f"{tmp_path}/ds/train", f"{tmp_path}/ds/val")


def test_missing_and_empty_sources_are_clear_errors(tmp_path):
    with pytest.raises(VitditError, match=f"{tmp_path}/missing: no such file or directory"):
        read_image_source(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(VitditError, match="no files found"):
        read_image_source(str(tmp_path / "empty"))
    with pytest.raises(VitditError, match="--format"):
        read_image_source(str(tmp_path), format="zip")


def test_webdataset_and_parquet_listing(tmp_path):
    img = png_bytes(rgb_image(0))
    tars = tmp_path / "tars"
    tars.mkdir()
    write_tar(str(tars / "shard-000.tar"), [("a", img, 3), ("b", img, 1)])
    write_tar(str(tars / "shard-001.tar"), [("c", img, None)], ext="jpg")
    src = read_image_source(str(tars))
    assert src.format == "webdataset"
    assert [c.ids for c in src.chunks] == [["shard-000/a", "shard-000/b"], ["shard-001/c"]]
    assert [c.labels for c in src.chunks] == [[3, 1], [-1]]
    assert src.class_names == [str(i) for i in range(4)]

    pq_dir = tmp_path / "pq"
    pq_dir.mkdir()
    write_parquet(str(pq_dir / "p0.parquet"), [(f"k{i}", img, i % 2) for i in range(6)], row_group_size=4)
    src = read_image_source(str(pq_dir), image_column="img", label_column="cls")
    assert src.format == "parquet" and [c.ids for c in src.chunks][1] == ["p0.parquet/4", "p0.parquet/5"]
    src = read_image_source(str(pq_dir), image_column="img", label_column="cls", id_column="key")
    assert src.chunks[0].ids == ["k0", "k1", "k2", "k3"] and src.chunks[0].labels == [0, 1, 0, 1]
    with pytest.raises(VitditError, match="no image column 'image'"):
        read_image_source(str(pq_dir))
    write_parquet(str(pq_dir / "p1.parquet"), [("k0", img, 0)])
    with pytest.raises(VitditError, match="duplicate image id 'k0'"):
        read_image_source(str(pq_dir), image_column="img", label_column="cls", id_column="key")
