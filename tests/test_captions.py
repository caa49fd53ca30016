"""Captions in the image sources and text embeddings in the latent data set (`vitdit encode
--text-encoder`), with tiny CLIP and T5 text encoders built offline (tests/_text_utils.py)."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from _encode_utils import png_bytes, rgb_image, write_folder
from _text_utils import (
    CLIP_MAX_LENGTH,
    CLIP_PROJECTION,
    CLIP_WIDTH,
    make_tiny_clip,
    make_tiny_t5,
    without_tokenizer,
)
from _tolerance import TRANSFORMER_BLOCK_LAYERS, reassociation_tol, unit_roundoff

from jobs import encode_latents
from pipelines.encode import SETTINGS_NAME, EncodeConfig, _check_resumable, _diff, _Output, encode_dataset
from pipelines.images import CAPTION, ERROR, ID, _ChunkReader, read_image_source
from pipelines.latents import load_latents_numpy, read_empty_caption, read_latents, read_manifest
from vitdit import latents as L
from vitdit.errors import UnsafeCheckpointError, VitditError
from vitdit.text import TextEncoder, describe_text_encoder

# The tiny CLIP's longest reduction is its 64-wide MLP; 2 blocks plus the embedding and projection.
CLIP_N, CLIP_LAYERS = 64, 2 * TRANSFORMER_BLOCK_LAYERS + 2
LONG = "a very long caption that goes on and on"  # > 16 byte-level tokens: truncated


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "text_encoder", seed=0)


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory):
    return make_tiny_t5(tmp_path_factory.mktemp("t5") / "text_encoder_3", seed=0)


def _stored_tol(ref: torch.Tensor) -> dict[str, float]:
    """An embedding computed in a Ray actor (other batch, other threads) and stored as float16,
    against the same caption encoded here in fp32: the fp32 reassociation bound of the tiny CLIP
    plus float16's rounding (u = 2^-11 of each element; 2^-25 absolute for its subnormals)."""
    tol = reassociation_tol(ref, CLIP_N, CLIP_LAYERS)
    u16 = unit_roundoff(torch.float16)
    return {"rtol": tol["rtol"] + u16, "atol": tol["atol"] + 2.0**-25}


# ---------------------------------------------------------------------------------------------
# vitdit.text.TextEncoder


def test_clip_text_encoder_takes_sd3s_outputs(tiny_clip):
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    te = TextEncoder(tiny_clip)
    assert (te.kind, te.width, te.pooled_width, te.max_length) == ("clip", 32, 24, CLIP_MAX_LENGTH)
    captions = ["a red cat", "", "ab ab"]
    tokens, pooled = te.encode(captions)
    assert tokens.shape == (3, CLIP_MAX_LENGTH, CLIP_WIDTH) and pooled.shape == (3, CLIP_PROJECTION)
    assert tokens.dtype == pooled.dtype == torch.float32

    # The same model called directly, as diffusers' StableDiffusion3Pipeline calls it: padded ids,
    # no attention mask, the penultimate hidden states and the projected pooled output.
    tok = AutoTokenizer.from_pretrained(tiny_clip)
    model = CLIPTextModelWithProjection.from_pretrained(tiny_clip).eval()
    ids = tok(
        captions, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model(ids.input_ids, output_hidden_states=True)
    # Same kernels on the same shapes in one process: identical.
    torch.testing.assert_close(tokens, out.hidden_states[-2], rtol=0, atol=0)
    torch.testing.assert_close(pooled, out.text_embeds, rtol=0, atol=0)
    assert not torch.allclose(tokens, out.last_hidden_state, atol=1e-2)  # the layer choice matters

    # A caption's embedding does not depend on its batch (no mask, fixed length): batch = singles.
    one, one_pooled = te.encode(["a red cat"])
    torch.testing.assert_close(one[0], tokens[0], **reassociation_tol(tokens[0], CLIP_N, CLIP_LAYERS))
    torch.testing.assert_close(one_pooled[0], pooled[0], **reassociation_tol(pooled[0], CLIP_N, CLIP_LAYERS))

    ident = te.identity()
    assert ident == describe_text_encoder(tiny_clip)
    assert ident["kind"] == "clip" and ident["max_length"] == CLIP_MAX_LENGTH and len(ident["sha256"]) == 64
    assert (ident["width"], ident["pooled_width"], ident["padding"]) == (32, 24, "max_length")


def test_t5_text_encoder_pools_its_non_padding_tokens(tiny_t5):
    from transformers import AutoTokenizer, T5EncoderModel

    te = TextEncoder(tiny_t5)
    assert (te.kind, te.width, te.pooled_width, te.max_length) == ("t5", 32, 32, 12)
    assert TextEncoder(tiny_t5, max_length=8).max_length == 8
    captions = ["a cat", "", "zebra"]
    tokens, pooled = te.encode(captions)
    assert tokens.shape == (3, 12, 32) and pooled.shape == (3, 32)
    tok = AutoTokenizer.from_pretrained(tiny_t5)
    model = T5EncoderModel.from_pretrained(tiny_t5).eval()
    ids = tok(captions, padding="max_length", max_length=12, return_tensors="pt").input_ids
    with torch.no_grad():
        direct = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(tokens, direct, rtol=0, atol=0)  # same kernels, same shapes
    for i, c in enumerate(captions):
        k = len(tok(c).input_ids)  # the caption's tokens and </s>
        # A mean over k ≤ 12 terms: fp32 reassociation of a 12-long sum.
        expect = direct[i, :k].mean(0)
        torch.testing.assert_close(pooled[i], expect, **reassociation_tol(expect, 12))
    assert len(tok("").input_ids) == 1  # "" is </s> alone: its pooled vector is that token's state
    assert te.identity()["pooled"] == "mean over non-padding tokens"


def test_long_captions_are_truncated_with_one_warning(tiny_clip, caplog):
    te = TextEncoder(tiny_clip)
    ids, cut = te.tokenize([LONG, "a cat", LONG + " again"])
    assert ids.shape == (3, CLIP_MAX_LENGTH) and list(cut) == [True, False, True]
    with caplog.at_level(logging.WARNING, logger="vitdit.text"):
        tokens, _ = te.encode([LONG, "a cat", LONG + " again"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 of 3 caption(s) longer than 16 tokens" in warnings[0]
    # Both long captions share their first 16 tokens: cut there, they encode alike.
    torch.testing.assert_close(tokens[0], tokens[2], rtol=0, atol=0)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vitdit.text"):
        te.encode(["a cat"])
    assert not caplog.records


def test_paths_that_are_not_text_encoders_are_named(tiny_clip, tiny_vae_dir, tmp_path):
    cases = {
        "missing": (str(tmp_path / "nope"), "no such file or directory"),
        "vae": (tiny_vae_dir, "'AutoencoderKL', expected a CLIP text model"),
        "no config": (str(tmp_path), "no config.json"),
        "no tokenizer": (without_tokenizer(tiny_clip, tmp_path / "bare"), "no tokenizer files"),
    }
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    cases["a file"] = (str(afile), "not a directory")
    for name, (path, expected) in cases.items():
        for fn in (TextEncoder, describe_text_encoder):
            with pytest.raises(VitditError, match=expected) as e:
                fn(path)
            assert os.path.abspath(path) in str(e.value), name
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "t5"}))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(UnsafeCheckpointError, match="pickle-format"):
        describe_text_encoder(str(pickled))
    with pytest.raises(VitditError, match="more than the 16 positions"):
        describe_text_encoder(tiny_clip, max_length=77)


def test_diffusers_layout_and_a_clip_without_projection(tmp_path):
    # text_encoder/ beside tokenizer/, as in a diffusers pipeline directory.
    enc = make_tiny_clip(tmp_path / "text_encoder", projection=False, tokenizer_dir=tmp_path / "tokenizer")
    te = TextEncoder(enc)
    assert te.pooled_width == CLIP_WIDTH and te.identity()["pooled"] == "pooler_output"
    _, pooled = te.encode(["a cat"])
    assert pooled.shape == (1, CLIP_WIDTH)


# ---------------------------------------------------------------------------------------------
# Captions in the sources (listing and reading, no Ray)


def _rows(source, captions: bool = True) -> dict[str, dict]:
    reader = _ChunkReader(source.filesystem, captions=captions)
    return {r[ID]: r for c in source.chunks for r in reader({"chunk": dataclasses.asdict(c)})}


def _captioned_folder(root) -> dict[str, str]:
    """Images in a/ and b/, some with a <stem>.txt sidecar; returns id → caption ("" for none)."""
    images = {"a": {f"x{i}.png": png_bytes(rgb_image(i, (20, 16))) for i in range(4)}}
    images["b"] = {"y0.jpg": png_bytes(rgb_image(9, (18, 18)), "JPEG"), "y.1.png": png_bytes(rgb_image(8))}
    write_folder(str(root), images)
    sidecars = {
        "a/x0.txt": "a red cat\n",
        "a/x1.txt": f"  {LONG}  ",
        "b/y0.txt": "ab ab",
        "b/y.1.txt": "dots",
    }
    for rel, text in sidecars.items():
        (root / rel).write_text(text)
    (root / "a" / "orphan.txt").write_text("a caption without an image")
    return {
        "a/x0.png": "a red cat",
        "a/x1.png": LONG,
        "a/x2.png": "",
        "a/x3.png": "",
        "b/y0.jpg": "ab ab",
        "b/y.1.png": "dots",
    }


def test_folder_sidecars_leave_ids_and_labels_as_they_were(tmp_path):
    expected = _captioned_folder(tmp_path / "cap")
    plain = tmp_path / "plain"
    for d in ("a", "b"):
        (plain / d).mkdir(parents=True)
        for f in os.listdir(tmp_path / "cap" / d):
            if not f.endswith(".txt"):
                (plain / d / f).write_bytes((tmp_path / "cap" / d / f).read_bytes())
    src, before = read_image_source(str(tmp_path / "cap")), read_image_source(str(plain))
    assert [c.ids for c in src.chunks] == [c.ids for c in before.chunks]  # .txt files are not images
    assert [c.labels for c in src.chunks] == [c.labels for c in before.chunks]
    assert src.class_names == before.class_names == ["a", "b"]
    rows = _rows(src)
    assert {i: r[CAPTION] for i, r in rows.items()} == expected and not any(r[ERROR] for r in rows.values())
    assert CAPTION not in next(iter(_rows(src, captions=False).values()))
    # A caption that is not UTF-8 quarantines its image with the reason.
    (tmp_path / "cap" / "a" / "x2.txt").write_bytes(b"\xff\xfe caption")
    rows = _rows(read_image_source(str(tmp_path / "cap")))
    assert "not UTF-8" in rows["a/x2.png"][ERROR] and "x2.txt" in rows["a/x2.png"][ERROR]


def _write_captioned_tar(path) -> dict[str, str]:
    """A shard whose samples carry captions every way webdataset does; returns key → caption
    (None: quarantined for its caption)."""
    members = {
        "k0": {".png": png_bytes(rgb_image(0)), ".txt": b"a txt caption\n", ".cls": b"1"},
        "k1": {".png": png_bytes(rgb_image(1)), ".json": json.dumps({"caption": "a json caption"}).encode()},
        "k2": {".png": png_bytes(rgb_image(2)), ".json": json.dumps({"width": 20}).encode()},
        "k3": {".png": png_bytes(rgb_image(3))},
        "k4": {
            ".png": png_bytes(rgb_image(4)),
            ".txt": b"the txt wins",
            ".json": json.dumps({"caption": "not this"}).encode(),
        },
        "k5": {".png": png_bytes(rgb_image(5)), ".json": b"{not json"},
    }
    with tarfile.open(path, "w") as tar:
        for key, files in members.items():
            for ext, data in files.items():
                info = tarfile.TarInfo(key + ext)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return {
        "k0": "a txt caption",
        "k1": "a json caption",
        "k2": "",
        "k3": "",
        "k4": "the txt wins",
        "k5": None,
    }


def test_tar_and_parquet_captions(tmp_path):
    (tmp_path / "tars").mkdir()
    expected = _write_captioned_tar(tmp_path / "tars" / "s-000.tar")
    rows = _rows(read_image_source(str(tmp_path / "tars")))
    for key, caption in expected.items():
        r = rows[f"s-000/{key}"]
        if caption is None:
            assert "not valid JSON" in r[ERROR] and "k5.json" in r[ERROR]
        else:
            assert (r[CAPTION], r[ERROR]) == (caption, ""), key

    (tmp_path / "pq").mkdir()
    images = [png_bytes(rgb_image(i)) for i in range(4)]
    table = pa.table(
        {
            "image": pa.array(images, type=pa.binary()),
            "caption": [" one ", None, "three", ""],
            "alt": ["x", "y", "z", "w"],
            "num": [1, 2, 3, 4],
        }
    )
    pq.write_table(table, tmp_path / "pq" / "d.parquet", row_group_size=2)
    src = read_image_source(str(tmp_path / "pq"), label_column=None)
    assert [r[CAPTION] for r in _rows(src).values()] == ["one", "", "three", ""]
    alt = read_image_source(str(tmp_path / "pq"), label_column=None, caption_column="alt")
    assert [r[CAPTION] for r in _rows(alt).values()] == ["x", "y", "z", "w"]
    assert alt.fingerprint != src.fingerprint  # another caption column is another source
    none = read_image_source(str(tmp_path / "pq"), label_column=None, caption_column="")
    assert [r[CAPTION] for r in _rows(none).values()] == ["", "", "", ""]
    with pytest.raises(VitditError, match="no column 'text'"):
        read_image_source(str(tmp_path / "pq"), label_column=None, caption_column="text")
    with pytest.raises(VitditError, match="caption column 'num' holds int64, expected strings"):
        read_image_source(str(tmp_path / "pq"), label_column=None, caption_column="num")


# ---------------------------------------------------------------------------------------------
# Manifests and resume rules across formats (no Ray)


def test_format_1_manifests_still_read_and_unfinished_ones_are_not_resumed(tmp_path):
    m = L.Manifest(
        num_rows=3,
        latent_shape=(4, 8, 8),
        storage_dtype="float16",
        vae=L.VAEIdentity("v", None, "0" * 64, 0.5, None, 4),
        resolution=16,
        class_names=[],
        flips=False,
        source_uri="s",
        source_fingerprint="f",
        num_quarantined=0,
        parts=[],
        vitdit_version="0",
    )
    raw = json.loads(m.to_json())
    assert raw["format_version"] == L.FORMAT_VERSION == 2 and raw["text"] is None
    for k in ("text", "captioned", "uncaptioned"):
        raw.pop(k)
    raw["format_version"] = 1
    old = L.Manifest.from_json(json.dumps(raw))
    assert old.uncaptioned == 3 and old.captioned == 0 and old.text is None and not old.has_captions
    with pytest.raises(VitditError, match="format version 3"):
        L.Manifest.from_json(json.dumps({**raw, "format_version": 3}))

    # An unfinished output of format 1 (its _settings.json has no format_version) is not resumed.
    settings = {"vae": {"name_or_path": "v"}, "resolution": 16, "text_encoder": None, "caption_column": None}
    out = _Output(str(tmp_path))
    (tmp_path / SETTINGS_NAME).write_text(json.dumps({"vae": {"name_or_path": "v"}, "resolution": 16}))
    with pytest.raises(VitditError, match="unfinished latent data set of format 1.*--overwrite"):
        _check_resumable(out, {**settings, "format_version": 2}, overwrite=False)
    (tmp_path / L.MANIFEST_NAME).write_text(json.dumps(raw))  # finished: reported as complete
    _check_resumable(out, {**settings, "format_version": 2}, overwrite=False)

    # The same text encoder weights in another directory are the same settings; other weights are not.
    enc = {"path": "/a/clip", "kind": "clip", "sha256": "1" * 64, "max_length": 77}
    assert _diff({"text_encoder": enc}, {"text_encoder": {**enc, "path": "/b/clip"}}) == []
    assert _diff({"text_encoder": enc}, {"text_encoder": {**enc, "sha256": "2" * 64}})
    assert _diff({"text_encoder": enc}, {"text_encoder": None})


# ---------------------------------------------------------------------------------------------
# Through a real encode (Ray)


@pytest.mark.ray
def test_encode_with_a_text_encoder_round_trip_and_reruns(
    ray_session, tiny_vae_dir, tiny_clip, tmp_path, capsys
):
    expected = _captioned_folder(tmp_path / "src")
    out = str(tmp_path / "latents")
    cfg = EncodeConfig(
        input=str(tmp_path / "src"),
        output=out,
        vae=tiny_vae_dir,
        resolution=16,
        part_size=2,
        batch_size=4,
        text_encoder=tiny_clip,
        text_batch_size=3,
    )
    s = encode_dataset(cfg)
    assert (s["encoded"], s["captioned"], s["uncaptioned"], s["truncated"], s["parts"]) == (6, 4, 2, 1, 3)

    m = read_manifest(out)
    assert (m.format_version, m.captioned, m.uncaptioned, m.num_rows) == (2, 4, 2, 6)
    ident = describe_text_encoder(tiny_clip)
    assert {k: m.text[k] for k in ident} == ident
    assert m.text["empty_caption"] == L.EMPTY_CAPTION_NAME and m.text["num_truncated"] == 1
    assert m.text_shape == (CLIP_MAX_LENGTH, CLIP_WIDTH) and m.pooled_width == CLIP_PROJECTION

    arrays, _ = load_latents_numpy(out)
    ids = list(arrays[L.ID])
    assert sorted(ids) == sorted(expected)
    assert [arrays[L.CAPTION][i] for i in range(6)] == [expected[i] for i in ids]
    assert arrays[L.TEXT_EMB].dtype == np.float16 and arrays[L.TEXT_EMB].shape == (6, 16, 32)
    te = TextEncoder(tiny_clip)
    tokens, pooled = te.encode([expected[i] for i in ids])
    torch.testing.assert_close(torch.from_numpy(arrays[L.TEXT_EMB]).float(), tokens, **_stored_tol(tokens))
    torch.testing.assert_close(torch.from_numpy(arrays[L.POOLED_EMB]).float(), pooled, **_stored_tol(pooled))

    # The encoding of "" beside the manifest, float32, computed in a Ray task.
    empty_tokens, empty_pooled = read_empty_caption(out)
    assert empty_tokens.dtype == torch.float32 and empty_tokens.shape == (16, 32)
    ref_tokens, ref_pooled = te.encode([""])
    torch.testing.assert_close(
        empty_tokens, ref_tokens[0], **reassociation_tol(ref_tokens[0], CLIP_N, CLIP_LAYERS)
    )
    torch.testing.assert_close(
        empty_pooled, ref_pooled[0], **reassociation_tol(ref_pooled[0], CLIP_N, CLIP_LAYERS)
    )

    ds, _ = read_latents(out, columns=[L.TEXT_EMB, L.POOLED_EMB, L.MEAN])
    batch = next(iter(ds.iter_torch_batches(batch_size=4)))
    assert batch[L.TEXT_EMB].shape == (4, 16, 32) and batch[L.POOLED_EMB].shape == (4, 24)

    # The same command again: complete, nothing rewritten.
    part0 = os.path.join(out, "part-00000.parquet")
    mtime = os.stat(part0).st_mtime_ns
    again = encode_dataset(cfg)
    assert again["resumed_parts"] == 3 and again["captioned"] == 4 and os.stat(part0).st_mtime_ns == mtime

    # Killed after one part was lost (its marker too) and before the manifest: the re-run writes
    # that part alone, each id once.
    os.remove(os.path.join(out, L.MANIFEST_NAME))
    os.remove(os.path.join(out, "part-00001.parquet"))
    os.remove(os.path.join(out, "_progress", "chunk-00001.json"))
    resumed = encode_dataset(cfg)
    assert resumed["resumed_parts"] == 2 and resumed["encoded"] == 6 and resumed["truncated"] == 1
    again_ids = list(load_latents_numpy(out)[0][L.ID])
    assert len(again_ids) == len(set(again_ids)) == 6

    # Another text encoder, another length, or none: other settings, refused before any work.
    other = make_tiny_clip(tmp_path / "other_clip", seed=1)
    for change in ({"text_encoder": other}, {"text_max_length": 8}):
        with pytest.raises(VitditError, match="other settings .*text_encoder.*--overwrite"):
            encode_dataset(dataclasses.replace(cfg, **change))
    argv = [
        "--input",
        cfg.input,
        "--output",
        out,
        "--vae",
        tiny_vae_dir,
        "--resolution",
        "16",
        "--part-size",
        "2",
    ]
    assert encode_latents.main(argv) == 2
    err = capsys.readouterr().err
    assert "text_encoder" in err and "--overwrite" in err


@pytest.mark.ray
def test_encode_tar_and_parquet_captions_without_a_text_encoder(ray_session, tiny_vae_dir, tmp_path):
    (tmp_path / "tars").mkdir()
    expected = _write_captioned_tar(tmp_path / "tars" / "s-000.tar")
    out = str(tmp_path / "out_tar")
    s = encode_dataset(
        EncodeConfig(input=str(tmp_path / "tars"), output=out, vae=tiny_vae_dir, resolution=16)
    )
    kept = {f"s-000/{k}": c for k, c in expected.items() if c is not None}
    assert (s["encoded"], s["quarantined"], s["captioned"], s["uncaptioned"]) == (5, 1, 3, 2)
    arrays, m = load_latents_numpy(out)
    assert dict(zip(arrays[L.ID], arrays[L.CAPTION])) == kept
    assert m.text is None and (m.captioned, m.uncaptioned) == (3, 2) and L.TEXT_EMB not in arrays
    assert read_empty_caption(out) is None and not os.path.exists(os.path.join(out, L.EMPTY_CAPTION_NAME))
    with open(os.path.join(out, L.QUARANTINE_NAME)) as f:
        (bad,) = [json.loads(line) for line in f]
    assert bad["id"] == "s-000/k5" and "not valid JSON" in bad["reason"]

    (tmp_path / "pq").mkdir()
    images = [png_bytes(rgb_image(i, (24, 20))) for i in range(5)]
    table = pa.table(
        {
            "img": pa.array(images, type=pa.binary()),
            "text": ["one", None, "three", "", "five"],
            "cls": [0, 1, 0, 1, 0],
        }
    )
    pq.write_table(table, tmp_path / "pq" / "d.parquet", row_group_size=3)
    out = str(tmp_path / "out_pq")
    cfg = EncodeConfig(
        input=str(tmp_path / "pq"),
        output=out,
        vae=tiny_vae_dir,
        resolution=16,
        image_column="img",
        label_column="cls",
        caption_column="text",
    )
    s = encode_dataset(cfg)
    assert (s["encoded"], s["captioned"], s["uncaptioned"], s["parts"]) == (5, 3, 2, 2)
    arrays, _ = load_latents_numpy(out)
    assert list(arrays[L.CAPTION]) == ["one", "", "three", "", "five"]
    assert list(arrays[L.LABEL]) == [0, 1, 0, 1, 0]


def test_bad_text_encoder_path_exits_2_in_one_line(tiny_vae_dir, tmp_path, capsys):
    (tmp_path / "imgs" / "c").mkdir(parents=True)
    (tmp_path / "imgs" / "c" / "x.png").write_bytes(png_bytes(rgb_image(0)))
    argv = ["--input", str(tmp_path / "imgs"), "--output", str(tmp_path / "o"), "--vae", tiny_vae_dir]
    for path, expected in ((tiny_vae_dir, "AutoencoderKL"), (str(tmp_path / "none"), "no such file")):
        assert encode_latents.main([*argv, "--text-encoder", path]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --text-encoder {path}: ") and expected in err
        assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # refused before anything was written
