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


# ---------------------------------------------------------------------------------------------------------------------
# One path from pixels to a dataset row, for real and generated images alike

Color = Literal["rgb", "gray"]


def to_gray(image: np.ndarray) -> np.ndarray:
    """Luma (ITU-R 601, PIL's integer formula) replicated to three channels; a gray image maps to itself exactly."""
    luma = np.asarray(Image.fromarray(image).convert("L"))
    return np.ascontiguousarray(np.repeat(luma[..., None], 3, axis=-1))


def finish_image(image: Image.Image | np.ndarray, size: int, color: Color = "rgb") -> np.ndarray:
    """The pixels that get encoded: uint8 RGB, square ``size`` (bicubic), luma when ``color`` is gray.

    Generated float images (in [0, 1]) are rounded to uint8 first, exactly as a decoded real image already is, so
    both kinds take the same resize from there.
    """
    pixels = resize(to_rgb_array(image), size)
    return to_gray(pixels) if color == "gray" else pixels


def image_row(
    id: str,
    pixels: np.ndarray,
    *,
    encoding: Encoding,
    quality: int,
    label: int,
    source: str,
    mode: str,
    model_ref: str | None = None,
    scheduler: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    strength: float | None = None,
    seed: int | None = None,
    prompt: str | None = None,
    source_image_id: str | None = None,
) -> dict:
    """A row of IMAGE_SCHEMA for finished pixels (see :func:`finish_image`)."""
    if label not in (REAL, FAKE):
        raise DataError(f"image {id}: label must be 0 (real) or 1 (fake), got {label!r}")
    return {
        "id": id,
        "image": encode_image(pixels, encoding, quality),
        "encoding": encoding,
        "label": label,
        "source": source,
        "mode": mode,
        "model_ref": model_ref,
        "scheduler": scheduler,
        "steps": steps,
        "guidance": guidance,
        "strength": strength,
        "seed": seed,
        "prompt": prompt,
        "source_image_id": source_image_id,
        "width": int(pixels.shape[1]),
        "height": int(pixels.shape[0]),
        "content_hash": content_hash(pixels),
    }


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Rows (see :func:`image_row`) as an Arrow table with exactly IMAGE_SCHEMA (also when there are none)."""
    return pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA)


def check_image_table(table: pa.Table, where: str) -> None:
    """A DataError naming the dataset when a table lacks an IMAGE_SCHEMA column or has it with another type."""
    for field in IMAGE_SCHEMA:
        if field.name not in table.column_names:
            raise DataError(f"{where}: no '{field.name}' column; not an image dataset "
                            f"(columns: {', '.join(table.column_names)})")
        got = table.schema.field(field.name).type
        if got != field.type:
            raise DataError(f"{where}: column '{field.name}' is {got}, expected {field.type}")


# ---------------------------------------------------------------------------------------------------------------------
# Outputs that must never be written as samples

BLANK_STD = 1.0 / 255.0
"""A generated image whose pixels vary less than one 8-bit level (standard deviation) is blank: black, white or any
flat colour, e.g. what a safety checker or a collapsed model returns."""


def degenerate_reason(image: np.ndarray) -> str | None:
    """``"nan"`` when a generated float image has a NaN or infinite value, ``"blank"`` when it is flat, else None."""
    arr = np.asarray(image, dtype=np.float64)
    if not np.isfinite(arr).all():
        return "nan"
    scale = 255.0 if np.asarray(image).dtype == np.uint8 else 1.0
    if float(arr.std()) / scale < BLANK_STD:
        return "blank"
    return None
