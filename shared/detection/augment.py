"""Image augmentations and perturbations on HxWx3 uint8 arrays (numpy + Pillow; no torchvision).

Training: random resized crop, horizontal flip, Gaussian blur, JPEG re-compression at a random quality, each drawn
per image from a ``numpy.random.Generator`` (CNNDetection-style blur + JPEG, which is what makes detectors survive
re-shared images). Evaluation: the same perturbations at fixed strengths (robustness columns), and a plain resize.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """Re-compress as JPEG at ``quality`` and decode again."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as pil:
        return np.asarray(pil.convert("RGB"))


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with standard deviation ``sigma`` pixels."""
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=float(sigma))))


def resize_to(image: np.ndarray, size: int) -> np.ndarray:
    """Square bilinear resize (no-op at the right size)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


def random_resized_crop(image: np.ndarray, size: int, scale_min: float, rng: np.random.Generator) -> np.ndarray:
    """A crop of area fraction in [scale_min, 1] and aspect ratio in [3/4, 4/3], resized to size x size."""
    h, w = image.shape[:2]
    if scale_min >= 1.0:
        return resize_to(image, size)
    for _ in range(10):
        area = h * w * rng.uniform(scale_min, 1.0)
        ratio = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        cw = int(round(np.sqrt(area * ratio)))
        ch = int(round(np.sqrt(area / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            crop = image[top: top + ch, left: left + cw]
            return np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size),
                                                                                 Image.Resampling.BILINEAR))
    return resize_to(image, size)


def augment_image(image: np.ndarray, size: int, settings: Any, rng: np.random.Generator) -> np.ndarray:
    """One training view of an image; ``settings`` is an AugmentConfig."""
    out = random_resized_crop(image, size, settings.crop_scale_min, rng)
    if rng.random() < settings.hflip:
        out = out[:, ::-1]
    if rng.random() < settings.blur_prob:
        out = blur(np.ascontiguousarray(out), rng.uniform(0.1, settings.blur_sigma_max))
    if rng.random() < settings.jpeg_prob:
        low, high = settings.jpeg_quality
        out = jpeg(np.ascontiguousarray(out), int(rng.integers(low, high + 1)))
    return np.ascontiguousarray(out)


def augment_batch(images: np.ndarray, size: int, settings: Any, rng: np.random.Generator) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, size, size, 3) uint8 training views."""
    return np.stack([augment_image(im, size, settings, rng) for im in images])


def downscale(image: np.ndarray, factor: float) -> np.ndarray:
    """Down to ``factor`` of the size with area averaging (Pillow's BOX filter), back up bilinearly: the detail a
    re-shared thumbnail loses."""
    h, w = image.shape[:2]
    small = Image.fromarray(image).resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.Resampling.BOX)
    return np.asarray(small.resize((w, h), Image.Resampling.BILINEAR))


def perturb_batch(images: np.ndarray, kind: str, strength: float) -> np.ndarray:
    """Deterministic perturbation of every image: ``clean``, ``jpeg`` (quality), ``blur`` (sigma) or ``downscale``
    (factor)."""
    if kind == "clean":
        return images
    if kind == "jpeg":
        return np.stack([jpeg(im, int(strength)) for im in images])
    if kind == "blur":
        return np.stack([blur(im, strength) for im in images])
    if kind == "downscale":
        return np.stack([downscale(im, strength) for im in images])
    raise ValueError(f"perturbation {kind!r}: use clean, jpeg, blur or downscale")


def resize_batch(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1] == size and images.shape[2] == size:
        return images
    return np.stack([resize_to(im, size) for im in images])


def to_tensor(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> normalised (B, 3, H, W) float32."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s
