"""The image dataset format shared by generation, curation, detector training and evaluation.

Parquet shards, one row per image, with the encoded bytes and their provenance. Real and fake images go through the
same geometry rule (:func:`fit_image`) and the same encoder (:func:`encode_image`), so a detector cannot tell them
apart by file format; each row records its native size and how it was fitted (``fit``), so a report can say which
sources were resampled.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
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
        pa.field("family", pa.string()),  # generator family ("real" for reals): the unit of leave-one-family-out
        pa.field("model_ref", pa.string()),  # model reference of the generator (null for reals)
        pa.field("scheduler", pa.string()),
        pa.field("steps", pa.int32()),
        pa.field("guidance", pa.float32()),
        pa.field("strength", pa.float32()),  # img2img noising strength
        pa.field("seed", pa.int64()),  # the per-image torch.Generator seed
        pa.field("prompt", pa.string()),
        pa.field("negative_prompt", pa.string()),  # text-conditioned generators: the negative prompt, if any
        pa.field("dtype", pa.string()),  # the generator's weights dtype (float32 | float16 | bfloat16; null for reals)
        pa.field("library_versions", pa.string()),  # JSON {library: version} of what generated it (null for reals)
        pa.field("source_image_id", pa.string()),  # img2img: id of the real image it started from
        pa.field("source_image_ids", pa.list_(pa.string())),  # every real image it uses (a morph: two); null: none
        pa.field("generator_training", pa.bool_()),  # reals: a generator trained on it (null for fakes)
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("native_width", pa.int32()),  # size before fit_image (the generator's or the file's own)
        pa.field("native_height", pa.int32()),
        pa.field("fit", pa.string()),  # how it became width x height: none | crop | area | bicubic (see fit_image)
        pa.field("quality", pa.int32()),  # JPEG quality (null for PNG)
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
    """Square bicubic resize (a no-op at ``size``); datasets use :func:`fit_image`, which crops when it can."""
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


Fit = Literal["none", "crop", "area", "bicubic"]
RESAMPLED: tuple[Fit, ...] = ("area", "bicubic")
"""The fits that resample pixels (and so change their spectrum); "none" and "crop" keep every pixel as it was."""


def crop_margin(size: int) -> int:
    """How many pixels a side may exceed ``size`` and still be centre-cropped instead of resampled: an eighth of
    the size, at least 1 (lfw's 25 px faces crop to 24)."""
    return max(1, size // 8)


@dataclass(frozen=True)
class Fitted:
    """Pixels ready to encode, and how they got there."""

    pixels: np.ndarray
    """size x size x 3 uint8."""
    native_height: int
    native_width: int
    fit: Fit

    @property
    def resampled(self) -> bool:
        return self.fit in RESAMPLED


def fit_image(image: Image.Image | np.ndarray, size: int, color: Color = "rgb") -> Fitted:
    """The one path from any source's pixels (real or generated) to the stored square ``size``.

    1. uint8 RGB: generated float images (in [0, 1]) are rounded, exactly as a decoded real image already is;
    2. luma (replicated to three channels) when ``color`` is gray, before any resampling;
    3. geometry, the same rule for every source: already ``size`` -> kept (fit "none"); every side at most
       :func:`crop_margin` pixels larger -> centre crop, no pixel changed (fit "crop"); otherwise resampled to
       size x size: area averaging (PIL's box filter) when both sides shrink (fit "area"), bicubic when a side
       grows (fit "bicubic"). Sources that must be resampled should be the exception, and rows record it.
    """
    pixels = to_rgb_array(image)
    if color == "gray":
        pixels = to_gray(pixels)
    height, width = int(pixels.shape[0]), int(pixels.shape[1])
    margin = crop_margin(size)
    fit: Fit
    if height == size and width == size:
        fit = "none"
    elif size <= height <= size + margin and size <= width <= size + margin:
        top, left = (height - size) // 2, (width - size) // 2
        pixels, fit = np.ascontiguousarray(pixels[top:top + size, left:left + size]), "crop"
    else:
        fit = "area" if height >= size and width >= size else "bicubic"
        method = Image.Resampling.BOX if fit == "area" else Image.Resampling.BICUBIC
        pixels = np.asarray(Image.fromarray(pixels).resize((size, size), method))
    return Fitted(pixels, height, width, fit)


def finish_image(image: Image.Image | np.ndarray, size: int, color: Color = "rgb") -> np.ndarray:
    """The pixels of :func:`fit_image` alone (for models that take them: training, img2img sources)."""
    return fit_image(image, size, color).pixels


def image_row(
    id: str,
    pixels: Fitted | np.ndarray,
    *,
    encoding: Encoding,
    quality: int,
    label: int,
    source: str,
    mode: str,
    family: str | None = None,
    model_ref: str | None = None,
    scheduler: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    strength: float | None = None,
    seed: int | None = None,
    prompt: str | None = None,
    negative_prompt: str | None = None,
    dtype: str | None = None,
    library_versions: str | None = None,
    source_image_id: str | None = None,
    source_image_ids: Sequence[str] | None = None,
    generator_training: bool | None = None,
) -> dict:
    """A row of IMAGE_SCHEMA for fitted pixels (see :func:`fit_image`; a bare array counts as kept as it was).

    ``family`` defaults to "real" for reals and to ``mode`` for fakes; ``source_image_ids`` (every real image the
    fake uses) to [source_image_id]; ``generator_training`` is for reals only (whether a generator trained on it).
    """
    if label not in (REAL, FAKE):
        raise DataError(f"image {id}: label must be 0 (real) or 1 (fake), got {label!r}")
    if label == FAKE and generator_training is not None:
        raise DataError(f"image {id}: generator_training is recorded for real images only (this one is fake)")
    if source_image_ids is not None and source_image_id is not None and source_image_ids[:1] != [source_image_id]:
        raise DataError(f"image {id}: source_image_id {source_image_id!r} is not the first of source_image_ids "
                        f"{list(source_image_ids)}")
    parents = list(source_image_ids) if source_image_ids else ([source_image_id] if source_image_id else None)
    fitted = pixels if isinstance(pixels, Fitted) else Fitted(pixels, pixels.shape[0], pixels.shape[1], "none")
    pixels = fitted.pixels
    return {
        "id": id,
        "image": encode_image(pixels, encoding, quality),
        "encoding": encoding,
        "quality": quality if encoding == "jpeg" else None,
        "label": label,
        "source": source,
        "mode": mode,
        "family": family or ("real" if label == REAL else mode),
        "model_ref": model_ref,
        "scheduler": scheduler,
        "steps": steps,
        "guidance": guidance,
        "strength": strength,
        "seed": seed,
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "dtype": dtype,
        "library_versions": library_versions,
        "source_image_id": parents[0] if parents else None,
        "source_image_ids": parents,
        "generator_training": generator_training,
        "width": int(pixels.shape[1]),
        "height": int(pixels.shape[0]),
        "native_width": int(fitted.native_width),
        "native_height": int(fitted.native_height),
        "fit": fitted.fit,
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
