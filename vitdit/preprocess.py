"""Image preprocessing shared by every stage: decode → RGB → ADM centre crop → [-1, 1].

Pure Pillow + numpy, no Ray: the Ray Data UDFs in ``pipelines.images`` call these per row, and
tests call them directly. Anything that cannot become an RGB image raises :class:`BadImageError`
with a short reason; the pipelines quarantine the row instead of failing the job.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from vitdit.errors import VitditError

# Pillow's own default limit (~89.5 Mpx, a 9459×9459 image). Images above it are treated as
# decompression bombs: a tiny file that would expand to gigabytes in memory.
DEFAULT_MAX_PIXELS = 89_478_485

# Modes whose pixels are wider than 8 bits: Pillow's convert("RGB") clips them at 255 instead of
# rescaling, which turns most 16-bit images white.
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class BadImageError(VitditError):
    """An input that cannot be used as an image; ``reason`` is short enough for quarantine.jsonl."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _wide_to_l(im: Image.Image) -> Image.Image:
    """16/32-bit grayscale → 8-bit L, scaling the value range instead of clipping it."""
    arr = np.asarray(im).astype(np.float64)
    if im.mode.startswith("I;16"):
        top = 65535.0
    elif im.mode == "F":
        # float images usually hold [0, 1]; anything larger is taken as 8- or 16-bit values.
        hi = float(arr.max()) if arr.size else 0.0
        top = 1.0 if hi <= 1.0 else (255.0 if hi <= 255.0 else 65535.0)
    else:  # "I": 32-bit ints, in practice 8- or 16-bit data (e.g. 16-bit PNGs on older Pillow)
        hi = float(arr.max()) if arr.size else 0.0
        top = 255.0 if hi <= 255.0 else 65535.0
    out = np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode → RGB. Transparent pixels are composited onto white.

    Why white: the colour under alpha = 0 is arbitrary (often black or leftover data), and white is
    what a viewer shows; a plain ``convert("RGB")`` would leak that arbitrary colour into training.
    """
    if im.mode == "RGB":
        return im
    if im.mode in _WIDE_MODES:
        return _wide_to_l(im).convert("RGB")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        im.mode == "P" and "transparency" in im.info
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as e:  # e.g. LAB or HSV without a conversion path
        raise BadImageError(f"cannot convert mode {im.mode} to RGB ({e})") from e


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes into a fully loaded RGB Pillow image.

    Raises BadImageError for empty, truncated, non-image and undecodable data and for images of
    more than ``max_pixels`` pixels (decompression bombs), checked from the header before decoding.
    """
    if not data:
        raise BadImageError("empty file (0 bytes)")
    with warnings.catch_warnings():
        # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; make both an error.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise BadImageError(f"decompression bomb: {w}x{h} pixels, limit {max_pixels}")
            if w == 0 or h == 0:
                raise BadImageError(f"image has no pixels ({w}x{h})")
            im.load()
            return to_rgb(im)
        except BadImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadImageError(f"decompression bomb: {e}") from e
        except UnidentifiedImageError:
            raise BadImageError("not an image (format not recognised)") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
            # Pillow reports truncated or corrupt data with any of these.
            msg = str(e) or type(e).__name__
            raise BadImageError(f"undecodable image: {msg}"[:300]) from e
        except MemoryError as e:
            raise BadImageError("undecodable image: out of memory while decoding") from e


def center_crop_arr(pil_image: Image.Image, resolution: int) -> np.ndarray:
    """ADM's centre crop (as in DiT's ``center_crop_arr``): uint8 array R×R×3.

    Halve with a box filter while the short side is at least twice the target (fast and alias-free),
    then resize bicubically so the short side equals ``resolution`` (this also upscales small
    images), then cut the centre square.
    """
    if resolution <= 0:
        raise VitditError(f"resolution {resolution}: must be positive")
    im = to_rgb(pil_image)
    while min(*im.size) >= 2 * resolution:
        im = im.resize(tuple(s // 2 for s in im.size), resample=Image.BOX)
    scale = resolution / min(*im.size)
    im = im.resize(tuple(round(s * scale) for s in im.size), resample=Image.BICUBIC)
    arr = np.asarray(im)  # H, W, 3
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    return np.ascontiguousarray(arr[top : top + resolution, left : left + resolution])


def to_unit_range(images: np.ndarray) -> np.ndarray:
    """uint8 N×H×W×3 (or H×W×3) → float32 N×3×H×W (or 3×H×W) in [-1, 1]."""
    if images.dtype != np.uint8:
        raise VitditError(f"to_unit_range: expected uint8 images, got {images.dtype}")
    if images.ndim == 3:
        chw = images.transpose(2, 0, 1)  # H, W, C -> C, H, W
    elif images.ndim == 4:
        chw = images.transpose(0, 3, 1, 2)  # N, H, W, C -> N, C, H, W
    else:
        raise VitditError(f"to_unit_range: expected HxWx3 or NxHxWx3, got shape {images.shape}")
    return np.ascontiguousarray(chw, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)


def from_unit_range(images: np.ndarray) -> np.ndarray:
    """float N×3×H×W in [-1, 1] → uint8 N×H×W×3 (rounded, clipped): the inverse of to_unit_range."""
    x = np.asarray(images, dtype=np.float32)
    x = np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return x.transpose(0, 2, 3, 1) if x.ndim == 4 else x.transpose(1, 2, 0)  # -> N, H, W, C


def preprocess_bytes(data: bytes, resolution: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """decode_image + center_crop_arr: encoded bytes → uint8 R×R×3, or BadImageError."""
    return center_crop_arr(decode_image(data, max_pixels=max_pixels), resolution)
