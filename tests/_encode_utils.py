"""Test inputs for preprocessing and encoding: broken files, odd image modes, tar and parquet sources."""

from __future__ import annotations

import io
import os
import struct
import tarfile
import zlib

import numpy as np
from PIL import Image


def png_bytes(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgb_image(seed: int, size: tuple[int, int] = (20, 16)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header that declares width×height 8-bit gray pixels, with almost no data.

    Pillow refuses it from the header alone, as it must for a real bomb (a few KB that would
    decompress to 10 GB); building a real one would take seconds and hundreds of MB.
    """
    chunk = _png_chunk
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
        + chunk(b"IEND", b"")
    )


def broken_files() -> dict[str, bytes]:
    """name → bytes of inputs that must be quarantined, one per kind of damage."""
    good_png = png_bytes(rgb_image(1, (64, 64)))
    good_jpg = png_bytes(rgb_image(2, (64, 64)), "JPEG", quality=90)
    return {
        "zero.png": b"",
        "truncated.png": good_png[: len(good_png) // 2],
        "truncated.jpg": good_jpg[: len(good_jpg) // 2],
        "notes.png": b"this is not an image, just text\n" * 4,
        # A well-formed PNG header (IHDR) whose pixel data is not zlib: identified, then fails to decode.
        "undecodable.png": good_png[:33]
        + _png_chunk(b"IDAT", bytes(range(7, 256)))
        + _png_chunk(b"IEND", b""),
        "bomb.png": png_bomb(),
    }


def odd_mode_files() -> dict[str, bytes]:
    """name → bytes of valid images in modes other than RGB (all must decode)."""
    gray = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))  # 16×16 horizontal ramp
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    rgba[:8, :, 3] = 0  # top half transparent
    i16 = np.full((16, 16), 32768, dtype=np.uint16)
    return {
        "mode_L.png": png_bytes(Image.fromarray(gray, mode="L")),
        "mode_LA.png": png_bytes(Image.fromarray(np.stack([gray, gray], -1), mode="LA")),
        "mode_P.png": png_bytes(Image.fromarray(gray, mode="L").convert("P")),
        "mode_RGBA.png": png_bytes(Image.fromarray(rgba, mode="RGBA")),
        "mode_CMYK.jpg": png_bytes(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"),
        "mode_I16.png": png_bytes(Image.fromarray(i16)),
        "mode_1.png": png_bytes(Image.fromarray(gray > 127)),
        "small_4x3.gif": png_bytes(rgb_image(3, (4, 3)).convert("P"), "GIF"),
    }


def write_folder(root: str, files: dict[str, dict[str, bytes]]) -> None:
    """files: class name → {file name → bytes}."""
    for cls, members in files.items():
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for name, data in members.items():
            with open(os.path.join(root, cls, name), "wb") as f:
                f.write(data)


def write_tar(path: str, samples: list[tuple[str, bytes, int | None]], ext: str = "png") -> None:
    """A webdataset shard: per sample ``<key>.<ext>`` and ``<key>.cls``."""
    with tarfile.open(path, "w") as tar:
        for key, data, label in samples:
            members = [(f"{key}.{ext}", data)]
            if label is not None:
                members.append((f"{key}.cls", str(label).encode()))
            for name, payload in members:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def write_parquet(path: str, samples: list[tuple[str, bytes, int]], row_group_size: int = 4) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "key": [k for k, _, _ in samples],
            "img": pa.array([d for _, d, _ in samples], type=pa.binary()),
            "cls": pa.array([c for _, _, c in samples], type=pa.int64()),
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)
