"""The image dataset format shared by generation, curation, detector training and evaluation.

Parquet shards, one row per image, with the encoded bytes and their provenance. Real and fake images go through the
same resize and the same encoder (:func:`encode_image`), so a detector cannot tell them apart by file format.
"""

from __future__ import annotations

import hashlib
import io
from typing import Literal

import numpy as np
import pyarrow as pa
from PIL import Image

from shared.errors import DataError

REAL, FAKE = 0, 1
Encoding = Literal["png", "jpeg"]

IMAGE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # unique within a dataset
        pa.field("image", pa.binary(), nullable=False),  # encoded bytes (PNG or JPEG)
        pa.field("encoding", pa.string(), nullable=False),  # "png" | "jpeg"
        pa.field("label", pa.int8(), nullable=False),  # 0 real, 1 fake
        pa.field("source", pa.string(), nullable=False),  # generator name for fakes, real collection name for reals
        pa.field("mode", pa.string(), nullable=False),  # real | unconditional | text2img | img2img | gan | collected
        pa.field("model_ref", pa.string()),  # model reference of the generator (null for reals)
        pa.field("scheduler", pa.string()),
        pa.field("steps", pa.int32()),
        pa.field("guidance", pa.float32()),
        pa.field("strength", pa.float32()),  # img2img noising strength
        pa.field("seed", pa.int64()),  # the per-image torch.Generator seed
        pa.field("prompt", pa.string()),
        pa.field("source_image_id", pa.string()),  # img2img: id of the real image it started from
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("content_hash", pa.string(), nullable=False),  # sha256 of the decoded RGB pixels
    ]
)


def to_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB from a PIL image or an array (float arrays in [0, 1], or uint8)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        if not np.isfinite(arr).all():
            raise DataError("image has NaN or infinite pixels")
        arr = (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise DataError(f"image array has shape {arr.shape}; expected HxWxC")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3])


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Square resize (bicubic); the same function for real and generated images."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


def encode_image(image: np.ndarray, encoding: Encoding = "png", quality: int = 95) -> bytes:
    """Encode HxWx3 uint8 pixels; deterministic for the same pixels and settings."""
    buffer = io.BytesIO()
    pil = Image.fromarray(image)
    if encoding == "png":
        pil.save(buffer, format="PNG", optimize=False)
    elif encoding == "jpeg":
        pil.save(buffer, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    else:
        raise DataError(f"image encoding {encoding!r}: use png or jpeg")
    return buffer.getvalue()


def decode_image(data: bytes, what: str = "image") -> np.ndarray:
    """Decode bytes to HxWx3 uint8 RGB; a DataError (never a substitute image) when they are not an image."""
    try:
        with Image.open(io.BytesIO(data)) as pil:
            return np.asarray(pil.convert("RGB"))
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError
        raise DataError(f"{what}: cannot decode ({type(exc).__name__})") from None


def content_hash(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()
