"""A stand-in real/fake face dataset, offline, in IMAGE_SCHEMA: scikit-image's ``lfw_subset`` faces as reals, and
fakes made by simple, honest image processes applied to those faces.

These are NOT diffusion or GAN images; they stand in for them so that detectors can be trained and evaluated end to
end without the generation job. Each process is one 'source' (generator name):

- ``standin-pca`` (mode unconditional): new faces sampled from an eigenface model (mean + 16 principal components,
  Gaussian coefficients with the components' variances) fitted on the ``training_reals`` faces only (those reals
  are flagged generator_training, so the detector split keeps them in train);
- ``standin-blur`` (img2img): a real face re-synthesised with lost detail (Gaussian blur, sigma 0.6-1.2 px);
- ``standin-noise`` (img2img): a real face with added Gaussian sensor noise (sigma 3-6 % of the range);
- ``standin-morph`` (img2img): the pixel average of two real faces (weight 0.4-0.6);
- ``standin-swap`` (img2img): a real face with the eye band (rows 6-12 of 25) of another face pasted in.

Morphs and swaps take the second face from a fixed, seeded pairing of the reals (within the generator-training
reals, and within the others), and record both faces
(source_image_ids), so a split that keeps every image with the reals it uses groups two reals at a time (random
second faces would chain most reals into one group). Reals and fakes are made at lfw's 25 x 25 and then take the
same fit and encoder (``shared.imageset.fit_image``: 24 px is a centre crop), so size and format carry no label.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageFilter

from shared.errors import DataError
from shared.imageset import FAKE, IMAGE_SCHEMA, REAL, fit_image, image_row

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


def partners(strata: np.ndarray, seed: int) -> np.ndarray:
    """The second face of each face for morphs and swaps: a seeded pairing within each stratum (faces a generator
    trained on pair among themselves, so a pair is in the train split only when its own faces must be). With an odd
    count the face left over joins the stratum's first pair, a group of three; a stratum of one face pairs with
    itself."""
    rng = np.random.default_rng([seed, 7])
    partner = np.arange(len(strata))
    for value in np.unique(strata):
        order = rng.permutation(np.flatnonzero(strata == value))
        half = len(order) // 2
        partner[order[0:2 * half:2]] = order[1:2 * half:2]
        partner[order[1:2 * half:2]] = order[0:2 * half:2]
        if len(order) % 2 and len(order) > 1:
            partner[order[-1]] = order[0]
    return partner


def make_fake(kind: str, faces: np.ndarray, parent: int, other: int, rng: np.random.Generator,
              eigen: _Eigenfaces | None) -> tuple[np.ndarray, dict[str, Any]]:
    """One 25 x 25 fake and its provenance (strength; two_faces when it used ``other`` too)."""
    face = faces[parent]
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
        return a * face + (1 - a) * faces[other], {"strength": a, "two_faces": True}
    if kind == "swap":
        out = face.copy()
        out[6:13] = faces[other][6:13]
        return out, {"two_faces": True}
    raise ValueError(f"unknown stand-in generator {kind!r}")


def standin_rows(cfg: Any) -> Iterator[dict[str, Any]]:
    """Rows (IMAGE_SCHEMA dicts) for a StandinFacesConfig: the reals first, then each generator's fakes."""
    faces = lfw_faces()[: cfg.reals]
    originals = [f"{i:03d}" for i in range(len(faces))]  # lfw-faces ids, as train-ddpm's training_reals sees them
    trained = np.asarray(cfg.training_reals.selects(originals)) & ("pca" in cfg.generators)
    if "pca" in cfg.generators and not trained.any():
        raise DataError(f"standin-faces: training_reals selects none of the {len(faces)} reals; widen it")
    eigen = _Eigenfaces(faces[trained]) if "pca" in cfg.generators else None
    partner = partners(trained, cfg.seed)

    def row(pixels: np.ndarray, image_id: str, **meta: Any) -> dict[str, Any]:
        return image_row(image_id, fit_image(pixels, cfg.size), encoding=cfg.encoding, quality=cfg.jpeg_quality,
                         **meta)

    real_ids = [f"{REAL_SOURCE}-{i}" for i in originals]
    for i, face in enumerate(faces):
        yield row(face, real_ids[i], label=REAL, source=REAL_SOURCE, mode="real",
                  generator_training=bool(trained[i]))
    for g, kind in enumerate(cfg.generators):
        order = np.random.default_rng([cfg.seed, g]).permutation(len(faces))
        for k in range(cfg.fakes_per_generator):
            seed = int(cfg.seed) * 1_000_003 + g * 100_003 + k
            parent = int(order[k % len(faces)])
            other = int(partner[parent])
            pixels, extra = make_fake(kind, faces, parent, other, np.random.default_rng(seed), eigen)
            used = None if kind == "pca" else [real_ids[parent], *([real_ids[other]] if extra.get("two_faces") else [])]
            yield row(pixels, f"{PREFIX}{kind}-{k:05d}", label=FAKE, source=PREFIX + kind, mode=MODES[kind],
                      family=PREFIX + kind, model_ref=f"standin:{kind}", seed=seed, strength=extra.get("strength"),
                      source_image_ids=used)


def standin_table(cfg: Any) -> pa.Table:
    return pa.Table.from_pylist(list(standin_rows(cfg)), schema=IMAGE_SCHEMA)
