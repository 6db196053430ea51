"""A stand-in real/fake face dataset, offline, in IMAGE_SCHEMA: scikit-image's ``lfw_subset`` faces as reals, and
fakes made by simple, honest image processes applied to those faces.

These are NOT diffusion or GAN images; they stand in for them so that detectors can be trained and evaluated end to
end without the generation job. Each process is one 'source' (generator name):

- ``standin-pca`` (mode unconditional): new faces sampled from an eigenface model (mean + 16 principal components,
  Gaussian coefficients with the components' variances) fitted on the real faces;
- ``standin-blur`` (img2img): a real face re-synthesised with lost detail (Gaussian blur, sigma 0.6-1.2 px);
- ``standin-noise`` (img2img): a real face with added Gaussian sensor noise (sigma 3-6 % of the range);
- ``standin-morph`` (img2img): the pixel average of two real faces (weight 0.4-0.6);
- ``standin-swap`` (img2img): a real face with the eye band (rows 6-12 of 25) of another face pasted in.

Reals and fakes are made at lfw's 25 x 25 and then go through the same bicubic resize and the same encoder
(``shared.imageset``), so size and file format carry no label.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageFilter

from shared.imageset import FAKE, IMAGE_SCHEMA, REAL, content_hash, encode_image, resize, to_rgb_array

REAL_SOURCE = "lfw"
PREFIX = "standin-"
MODES = {"pca": "unconditional", "blur": "img2img", "noise": "img2img", "morph": "img2img", "swap": "img2img"}


def lfw_faces() -> np.ndarray:
    """The 100 real faces of scikit-image's lfw_subset: (100, 25, 25) float in [0, 1]."""
    from skimage.data import lfw_subset

    return np.asarray(lfw_subset()[:100], dtype=np.float64)


def _blur(face: np.ndarray, sigma: float) -> np.ndarray:
    pil = Image.fromarray((face * 255).round().astype(np.uint8))
    return np.asarray(pil.filter(ImageFilter.GaussianBlur(radius=sigma)), dtype=np.float64) / 255.0


class _Eigenfaces:
    def __init__(self, faces: np.ndarray, k: int = 16):
        flat = faces.reshape(len(faces), -1)
        self.mean = flat.mean(axis=0)
        _, s, vt = np.linalg.svd(flat - self.mean, full_matrices=False)
        self.components = vt[:k]
        self.scale = s[:k] / np.sqrt(len(faces))
        self.shape = faces.shape[1:]

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        coeffs = rng.standard_normal(len(self.scale)) * self.scale
        return np.clip(self.mean + coeffs @ self.components, 0.0, 1.0).reshape(self.shape)


def make_fake(kind: str, faces: np.ndarray, parent: int, rng: np.random.Generator, eigen: _Eigenfaces | None
              ) -> tuple[np.ndarray, dict[str, Any]]:
    """One 25 x 25 fake and its provenance (strength, second parent)."""
    face = faces[parent]
    other = int(rng.choice([i for i in range(len(faces)) if i != parent]))
    if kind == "pca":
        assert eigen is not None
        return eigen.sample(rng), {}
    if kind == "blur":
        sigma = float(rng.uniform(0.6, 1.2))
        return _blur(face, sigma), {"strength": sigma}
    if kind == "noise":
        sigma = float(rng.uniform(0.03, 0.06))
        return np.clip(face + rng.standard_normal(face.shape) * sigma, 0.0, 1.0), {"strength": sigma}
    if kind == "morph":
        a = float(rng.uniform(0.4, 0.6))
        return a * face + (1 - a) * faces[other], {"strength": a}
    if kind == "swap":
        out = face.copy()
        out[6:13] = faces[other][6:13]
        return out, {}
    raise ValueError(f"unknown stand-in generator {kind!r}")


def standin_rows(cfg: Any) -> Iterator[dict[str, Any]]:
    """Rows (IMAGE_SCHEMA dicts) for a StandinFacesConfig: the reals first, then each generator's fakes."""
    faces = lfw_faces()[: cfg.reals]
    eigen = _Eigenfaces(faces) if "pca" in cfg.generators else None

    def row(pixels: np.ndarray, **meta: Any) -> dict[str, Any]:
        rgb = resize(to_rgb_array(pixels), cfg.size)
        return {"image": encode_image(rgb, cfg.encoding, cfg.jpeg_quality), "encoding": cfg.encoding,
                "width": cfg.size, "height": cfg.size, "content_hash": content_hash(rgb), "model_ref": None,
                "scheduler": None, "steps": None, "guidance": None, "strength": None, "seed": None, "prompt": None,
                "source_image_id": None, **meta}

    real_ids = [f"{REAL_SOURCE}-{i:03d}" for i in range(len(faces))]
    for i, face in enumerate(faces):
        yield row(face, id=real_ids[i], label=REAL, source=REAL_SOURCE, mode="real")
    for g, kind in enumerate(cfg.generators):
        order = np.random.default_rng([cfg.seed, g]).permutation(len(faces))
        for k in range(cfg.fakes_per_generator):
            seed = int(cfg.seed) * 1_000_003 + g * 100_003 + k
            rng = np.random.default_rng(seed)
            parent = int(order[k % len(faces)])
            pixels, extra = make_fake(kind, faces, parent, rng, eigen)
            yield row(pixels, id=f"{PREFIX}{kind}-{k:05d}", label=FAKE, source=PREFIX + kind, mode=MODES[kind],
                      model_ref=f"standin:{kind}", seed=seed, strength=extra.get("strength"),
                      source_image_id=None if kind == "pca" else real_ids[parent])


def standin_table(cfg: Any) -> pa.Table:
    return pa.Table.from_pylist(list(standin_rows(cfg)), schema=IMAGE_SCHEMA)
