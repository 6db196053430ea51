"""Generation as plain per-batch steps, without Ray: requests -> images -> dataset rows (see shared/imageset.py).

    requests = count_requests(spec, base_seed, prompts, start=0, stop=8)       # id, seed, prompt, source columns
    stage = GeneratorStage(spec, output_format, prompts)                        # cheap; nothing loaded yet
    stage.setup()                                                               # loads the model (once per actor)
    result = stage(requests)                                                    # .table (IMAGE_SCHEMA), .drops
    real = encode_reals(table_of_id_and_image, "lfw", output_format)           # reals through the same path

The Ray job (ray_jobs/generate.py) runs ``GeneratorStage`` in one actor pool per generator. An image's seed is
derived from the generator's base seed and the image id, so it is fixed before any batching happens.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from shared.config import StorageConfig
from shared.configs.generate import (
    GanGenerator,
    GeneratorSpec,
    ImageFormat,
    Img2ImgGenerator,
    Text2ImgGenerator,
    VaeGenerator,
)
from shared.configs.subsets import IdSubset
from shared.errors import DataError, ModelError
from shared.imageset import (
    FAKE,
    REAL,
    Fitted,
    decode_image,
    degenerate_reason,
    finish_image,
    fit_image,
    image_row,
    rows_to_table,
)

REQUEST_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("prompt", pa.string()),
    pa.field("source_image_id", pa.string()),
    pa.field("source_image", pa.binary()),
])


def derive_seed(base: int, key: str) -> int:
    """A 63-bit seed from a base seed and a key (an image id, a generator name): stable across runs and machines."""
    digest = hashlib.sha256(f"{base}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def generator_seed(spec: GeneratorSpec, job_seed: int) -> int:
    return spec.seed if spec.seed is not None else derive_seed(job_seed, spec.name)


def library_versions(names: tuple[str, ...]) -> str:
    """JSON {library: installed version} (sorted keys) of the libraries that generate an image."""
    from importlib.metadata import version

    return json.dumps({name: version(name) for name in names}, sort_keys=True)


DIFFUSION_LIBRARIES = ("diffusers", "torch", "transformers")
GAN_LIBRARIES = ("torch",)
VAE_LIBRARIES = ("safetensors", "torch")


def real_id(collection: str, original_id: str) -> str:
    """Dataset id of a real image (what img2img rows name as source_image_id)."""
    return f"{collection}-{original_id}"


def count_requests(spec: GeneratorSpec, base_seed: int, prompts: list[str] | None, indices: np.ndarray) -> pa.Table:
    """Requests number ``indices`` of a generator that makes ``count`` images (unconditional, text2img, gan)."""
    ids = [f"{spec.name}-{int(i):07d}" for i in indices]
    text = isinstance(spec, Text2ImgGenerator)
    return pa.table({
        "id": ids,
        "seed": [derive_seed(base_seed, i) for i in ids],
        "prompt": [prompts[int(i) % len(prompts)] for i in indices] if text and prompts else [None] * len(ids),
        "source_image_id": [None] * len(ids),
        "source_image": [None] * len(ids),
    }, schema=REQUEST_SCHEMA)


def source_requests(spec: Img2ImgGenerator, base_seed: int, collection: str, sources: pa.Table,
                    prompts: list[str] | None) -> pa.Table:
    """``per_source`` img2img requests per source image (table of id, image) in the generator's ``source_subset``;
    the prompt, when the pipeline takes one, is chosen by a hash of the request id."""
    rows: dict[str, list[Any]] = {name: [] for name in REQUEST_SCHEMA.names}
    originals = [str(i) for i in sources.column("id").to_pylist()]
    chosen = spec.source_subset.selects(originals) if spec.source_subset else [True] * len(originals)
    for original, image, keep in zip(originals, sources.column("image").to_pylist(), chosen):
        if not keep:
            continue
        for k in range(spec.per_source):
            rid = f"{spec.name}-{original}-{k}"
            seed = derive_seed(base_seed, rid)
            rows["id"].append(rid)
            rows["seed"].append(seed)
            rows["prompt"].append(prompts[seed % len(prompts)] if prompts else None)
            rows["source_image_id"].append(real_id(collection, original))
            rows["source_image"].append(image)
    return pa.table(rows, schema=REQUEST_SCHEMA)


@dataclass
class BatchResult:
    table: pa.Table
    """Valid images, IMAGE_SCHEMA."""
    drops: list[dict[str, Any]] = field(default_factory=list)
    """One record per dropped request: id, source, reason (nan, blank, nsfw, corrupt_source), seed."""
    seconds: float = 0.0
    """Time spent in the model."""


class GeneratorStage:
    """One generator as a per-batch step: ``setup()`` once per worker, then ``stage(requests)`` per batch."""

    def __init__(self, spec: GeneratorSpec, output: ImageFormat, storage: StorageConfig | None = None,
                 device: str = "cpu"):
        self.spec, self.output, self.config, self.device = spec, output, storage, device
        self.model: Any = None
        self.scheduler: str | None = None
        self.generation_size: int | None = None
        self.versions: str | None = None

    def setup(self) -> None:
        from shared.diffusion import gan, pipelines, vae

        spec = self.spec
        if isinstance(spec, GanGenerator):
            self.model = gan.load_dcgan(spec.model, self.config, self.device)
            self.generation_size = 64
            self.versions = library_versions(GAN_LIBRARIES)
            return
        if isinstance(spec, VaeGenerator):
            self.model = vae.load_vae(spec.model, self.config, self.device)
            self.generation_size = self.model.arch.image_size
            self.versions = library_versions(VAE_LIBRARIES)
            return
        pipe = pipelines.load_pipeline(spec.model, self.config, spec.dtype, self.device, spec.safety_checker)
        if isinstance(spec, Text2ImgGenerator) or (isinstance(spec, Img2ImgGenerator)
                                                   and getattr(pipe, "text_encoder", None) is not None):
            self.model = pipelines.TextDiffusion(pipe, spec.scheduler, img2img=isinstance(spec, Img2ImgGenerator))
        else:
            self.model = pipelines.PixelDiffusion(pipe, spec.scheduler)
        self.scheduler = self.model.scheduler_name
        self.generation_size = spec.resolution or self.model.native_size
        if self.generation_size is None:
            raise ModelError(f"generator {spec.name}: pipeline {spec.model!r} does not say its native resolution; "
                             "set resolution")
        self.versions = library_versions(DIFFUSION_LIBRARIES)

    @property
    def text_conditioned(self) -> bool:
        from shared.diffusion.pipelines import TextDiffusion

        return isinstance(self.model, TextDiffusion)

    def __call__(self, requests: pa.Table) -> BatchResult:
        if self.model is None:
            self.setup()
        spec = self.spec
        items = requests.to_pylist()
        drops: list[dict[str, Any]] = []
        sources = None
        if isinstance(spec, Img2ImgGenerator):
            items, sources = self._decode_sources(items, drops)
        started = time.perf_counter()
        images, flagged = self._generate(items, sources) if items else (np.zeros((0, 1, 1, 3), np.float32),
                                                                        np.zeros(0, bool))
        seconds = time.perf_counter() - started
        rows = []
        for item, image, nsfw in zip(items, images, flagged):
            reason = "nsfw" if nsfw else degenerate_reason(image)  # the checker's own black images are not "blank"
            if reason is not None:
                drops.append({"id": item["id"], "source": spec.name, "reason": reason, "seed": item["seed"]})
                continue
            rows.append(self._row(item, fit_image(image, self.output.size, self.output.color)))
        return BatchResult(rows_to_table(rows), drops, seconds)

    def _decode_sources(self, items: list[dict], drops: list[dict]) -> tuple[list[dict], np.ndarray]:
        size = self.generation_size
        if size is None:
            raise RuntimeError(f"generator {self.spec.name}: setup() has not run (no generation size)")
        kept, pixels = [], []
        for item in items:
            if item["source_image"] is None:
                raise DataError(f"generator {self.spec.name}: request {item['id']} has no source image")
            try:
                decoded = decode_image(item["source_image"], f"source image {item['source_image_id']}")
            except DataError:
                drops.append({"id": item["id"], "source": self.spec.name, "reason": "corrupt_source",
                              "seed": item["seed"], "source_image_id": item["source_image_id"]})
                continue
            kept.append(item)
            pixels.append(finish_image(decoded, size, "rgb"))
        return kept, np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8)

    def _generate(self, items: list[dict], sources: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The images, and per image whether the safety checker flagged it (always false without a checker)."""
        spec = self.spec
        seeds = [int(item["seed"]) for item in items]
        unflagged = np.zeros(len(items), bool)
        if isinstance(spec, GanGenerator):
            from shared.diffusion.gan import sample_dcgan
            from shared.diffusion.pipelines import DTYPES

            return sample_dcgan(self.model, seeds, batch_invariant=spec.batch_invariant,
                                dtype=DTYPES[spec.dtype]), unflagged
        if isinstance(spec, VaeGenerator):
            from shared.diffusion.pipelines import DTYPES
            from shared.diffusion.vae import sample_vae

            return sample_vae(self.model, seeds, temperature=spec.temperature, batch_invariant=spec.batch_invariant,
                              dtype=DTYPES[spec.dtype]), unflagged
        common: dict[str, Any] = dict(steps=spec.steps, resolution=self.generation_size,
                                      batch_invariant=spec.batch_invariant)
        if isinstance(spec, Img2ImgGenerator):
            common.update(sources=sources, strength=spec.strength)
        if self.text_conditioned:
            prompts = [item["prompt"] or "" for item in items]
            text = self._text_spec()
            return self.model.generate(seeds, prompts=prompts, guidance=text.guidance,
                                       negative_prompt=text.negative_prompt, **common)
        return self.model.generate(seeds, **common), unflagged

    def _text_spec(self) -> Text2ImgGenerator | Img2ImgGenerator:
        """The spec of a text-conditioned pipeline (only text2img and img2img generators load one)."""
        spec = self.spec
        if not isinstance(spec, (Text2ImgGenerator, Img2ImgGenerator)):
            raise TypeError(f"generator {spec.name}: a {spec.mode} generator has no text-conditioned pipeline")
        return spec

    def _row(self, item: dict, pixels: Fitted) -> dict:
        spec = self.spec
        meta: dict[str, Any] = dict(model_ref=spec.model, seed=int(item["seed"]), dtype=spec.dtype,
                                    library_versions=self.versions)
        if not isinstance(spec, (GanGenerator, VaeGenerator)):  # diffusion: a sampler and its steps
            meta.update(scheduler=self.scheduler, steps=spec.steps)
            if self.text_conditioned:
                text = self._text_spec()
                meta.update(guidance=float(text.guidance), prompt=item["prompt"], negative_prompt=text.negative_prompt)
            if isinstance(spec, Img2ImgGenerator):
                meta.update(strength=float(spec.strength), source_image_id=item["source_image_id"])
        return image_row(item["id"], pixels, encoding=self.output.encoding, quality=self.output.quality, label=FAKE,
                         source=spec.name, mode=spec.mode, family=spec.family, **meta)


def encode_reals(table: pa.Table, collection: str, output: ImageFormat,
                 generator_training: IdSubset | None = None) -> BatchResult:
    """Real images (columns id, image) through the same fit and encoder as the fakes, each flagged with whether
    it is in ``generator_training`` (None: unknown, null); undecodable ones are dropped with reason
    corrupt_source."""
    rows, drops = [], []
    originals = [str(i) for i in table.column("id").to_pylist()]
    trained = generator_training.selects(originals) if generator_training else [None] * len(originals)
    for original, data, flag in zip(originals, table.column("image").to_pylist(), trained):
        rid = real_id(collection, original)
        try:
            pixels = decode_image(data if data is not None else b"", f"real image {rid}")
        except DataError:
            drops.append({"id": rid, "source": collection, "reason": "corrupt_source", "seed": None})
            continue
        rows.append(image_row(rid, fit_image(pixels, output.size, output.color), encoding=output.encoding,
                              quality=output.quality, label=REAL, source=collection, mode="real",
                              generator_training=flag))
    return BatchResult(rows_to_table(rows), drops)


def load_prompts(prompts: Any, storage: StorageConfig | None = None) -> list[str] | None:
    """The job's prompts (a PromptSource), or None."""
    from shared.diffusion.prompts import face_prompts, parse_prompt_file
    from shared.storage import Storage

    if prompts is None:
        return None
    if prompts.file:
        try:
            text = Storage(prompts.file, storage).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"prompt file {prompts.file}: not UTF-8 text") from None
        return parse_prompt_file(text, prompts.file)
    if prompts.inline:
        return list(prompts.inline)
    return face_prompts(prompts.faces.count, prompts.faces.seed)


def check_drops(summary: dict[str, Any], source: str, max_fraction: float) -> None:
    """A DataError when ``source`` dropped more than ``max_fraction`` of its images (``summary``: made per source and
    every drop with its reason), naming the reasons and the first drop."""
    drops = [d for d in summary["drops"] if d["source"] == source]
    total = summary["made"].get(source, 0) + len(drops)
    if drops and len(drops) > max_fraction * total:
        reasons = ", ".join(f"{n} {r}" for r, n in Counter(d["reason"] for d in drops).most_common())
        raise DataError(f"{source}: {len(drops)} of {total} images dropped ({reasons}), more than max_drop_fraction "
                        f"{max_fraction}; see the first: {json.dumps(drops[0], default=str)}")
