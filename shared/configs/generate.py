"""Config of the ``generate`` job: fakes from several generators plus their real counterparts, as one image dataset.

    scopeforge run generate --config my-generate.yaml
    scopeforge pipeline --config ray_jobs/configs/deepfake-data.yaml     # train-ddpm -> generate, offline

Torch-free (pydantic only): the CLI, the operator and the CRD generator import it cheaply.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from shared.config import ActorPoolConfig, JobConfig, StrictModel
from shared.configs.subsets import IdSubset

Name = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
"""A source name: lowercase letters, digits, '_' and '-' (it names a folder and the `source` column)."""

SchedulerName = Literal["default", "ddpm", "ddim", "pndm", "dpm-solver", "euler", "euler-ancestral", "heun", "lms",
                        "unipc"]
Dtype = Literal["float32", "float16", "bfloat16"]


class ImageFormat(StrictModel):
    """How every image of a dataset is stored. Real and generated images go through the same geometry rule and
    encoder (shared.imageset.fit_image, encode_image), so a detector cannot tell them apart by size, colour handling
    or file format."""

    size: int = Field(64, ge=8, le=4096)
    """Side of the square images written, in pixels. Every image, real or generated, takes the same rule: kept at
    that size, centre-cropped when each side is at most size/8 px larger (lfw's 25 px faces -> 24), else resampled
    (area averaging down, bicubic up; recorded per image in the `fit` column). Generate at this size, so that only
    the sources that cannot be (a GAN's fixed 64 px) are resampled."""
    encoding: Literal["png", "jpeg"] = "png"
    """File format of the image bytes."""
    quality: int = Field(95, ge=1, le=100)
    """JPEG quality (ignored for png)."""
    color: Literal["rgb", "gray"] = "rgb"
    """gray: every image is converted to luma and stored as three equal channels. Use it when the real images are
    grayscale (lfw-faces is), or colour alone would give the fakes away."""


class RealSource(StrictModel):
    """A collection of real images: written to the dataset (label 0) and usable as img2img sources."""

    name: Name
    """Collection name: the `source` column of its rows, the folder they are written to, and what img2img generators
    name in `sources`."""
    uri: str = "lfw-faces"
    """Where the images are: an embedded alias (lfw-faces: the 100 faces of scikit-image's lfw_subset, 25x25
    grayscale), a folder of image files (png, jpg, webp, bmp; local or s3://), or a Parquet dataset (file, folder or
    a finished stage) with an `image` column of encoded bytes and optionally an `id` column."""
    limit: int | None = Field(None, ge=1)
    """Use only the first N images (in id order for aliases and folders, file order for Parquet). Unset: all."""
    write: bool = True
    """Write these images to the dataset (label 0, mode real), fitted and encoded exactly like the fakes."""
    generator_training: IdSubset | None = None
    """The subset of this collection that the generators of this dataset trained on: the `training_reals` of its
    train-ddpm / train-vae stages (the same start, stop and seed). Recorded per image (column generator_training);
    the detector split keeps those images and every fake made from them in its train split. Unset: null (unknown)."""


class FacePrompts(StrictModel):
    """Face prompts composed from attribute lists (age, person, expression, lighting, setting, style), seeded."""

    count: int = Field(64, ge=1, le=100_000)
    """How many distinct prompts to compose."""
    seed: int = 0
    """Seed of the composition (the same seed gives the same prompts)."""


class PromptSource(StrictModel):
    """Prompts for text-conditioned generators (text2img, and img2img on a text-conditioned pipeline). Exactly one
    of file, inline, faces. Request i of a generator uses prompt i modulo their number."""

    file: str | None = None
    """URI of a UTF-8 text file with one prompt per line (local or s3://). An empty line is an error."""
    inline: list[str] = []
    """Prompts given in the config."""
    faces: FacePrompts | None = None
    """Compose face prompts from attribute lists (see shared/diffusion/prompts.py)."""

    @model_validator(mode="after")
    def _exactly_one(self) -> PromptSource:
        given = [k for k, v in (("file", self.file), ("inline", self.inline), ("faces", self.faces)) if v]
        if len(given) != 1:
            raise ValueError(f"set exactly one of file, inline, faces (got {', '.join(given) or 'none'})")
        if any(not p.strip() for p in self.inline):
            raise ValueError("inline prompts must not be empty")
        return self


class _Generator(StrictModel):
    """Settings every generator has."""

    name: Name
    """Generator name: the `source` column of its images and the folder they are written to."""
    family: Name | None = None
    """Generator family (the `family` column): generators of one model or method share one (e.g. ddpm for a DDPM's
    samplers and img2img strengths), the unit of leave-one-family-out studies. Unset: the mode."""
    seed: int | None = Field(None, ge=0)
    """Base seed. Each image gets its own torch.Generator, seeded from this and the image id, so an image is the same
    whatever batch or actor made it. Unset: derived from the job seed and the name."""
    batch_size: int = Field(8, ge=1, le=4096)
    """Requests per actor call."""
    runtime: ActorPoolConfig = ActorPoolConfig()
    """This generator's actor pool (num_actors, cpus_per_actor, gpus_per_actor > 0 runs the model on CUDA, threads).
    Not part of the config hash."""
    dtype: Dtype = "float32"
    """Model weights dtype (half precision is for GPUs)."""
    batch_invariant: bool = True
    """Run the model one image at a time inside a batch, so an image's bytes depend only on its seed and settings,
    never on the batch it shared (matrix kernels round differently for different batch shapes, on CPUs and GPUs).
    false: batched model calls, faster (on GPUs most of all), same seeds, pixels may differ by rounding between
    batch sizes."""

    @model_validator(mode="after")
    def _family(self) -> _Generator:
        if self.family is None:
            self.family = str(getattr(self, "mode"))  # noqa: B009  (every generator kind declares its mode)
        return self


class _Diffusion(_Generator):
    """Settings of diffusers pipelines."""

    model: str
    """Pipeline reference: a diffusers save_pretrained folder (local or s3://), a finished train-ddpm stage (its
    `model` output), or a hub id where a hub is reachable."""
    scheduler: SchedulerName = "default"
    """Sampler: default keeps the pipeline's own; the others are built from its scheduler config."""
    steps: int = Field(25, ge=1, le=1000)
    """Inference steps (img2img runs the last strength x steps of them)."""
    resolution: int | None = Field(None, ge=8, le=4096)
    """Generation resolution in pixels (square). Unset: the model's own. The output is then resized to output.size."""
    safety_checker: bool = False
    """Run the pipeline's safety checker. false: a pipeline saved with one is loaded without it. true: the images it
    flags (and blacks out) are dropped with reason nsfw, counted like NaN or blank ones; a pipeline without a checker
    (pixel-space ones, SD3, Flux, PixArt, or one saved without it) is an error."""


class UnconditionalGenerator(_Diffusion):
    """A pixel-space diffusion model (UNet2DModel, e.g. DDPMPipeline) sampled from noise."""

    mode: Literal["unconditional"]
    """unconditional."""
    count: int = Field(ge=1, le=10_000_000)
    """Images to generate."""


class Text2ImgGenerator(_Diffusion):
    """A text-conditioned pipeline (e.g. StableDiffusionPipeline) run on the job's prompts."""

    mode: Literal["text2img"]
    """text2img."""
    count: int = Field(ge=1, le=10_000_000)
    """Images to generate; request i uses prompt i modulo the number of prompts."""
    guidance: float = Field(7.5, ge=0.0)
    """Classifier-free guidance scale."""
    negative_prompt: str | None = None
    """Negative prompt for every image."""


class Img2ImgGenerator(_Diffusion):
    """Real images partially noised then denoised (SDEdit): a pixel-space UNet2DModel pipeline, or a
    text-conditioned one (its img2img variant, with the job's prompts)."""

    mode: Literal["img2img"]
    """img2img."""
    sources: Name | None = None
    """The real collection (a name under `reals`) whose images are the starting points. Required."""
    strength: float = Field(0.5, gt=0.0, le=1.0)
    """How far each source is noised: 0 keeps it, 1 starts from pure noise."""
    source_subset: IdSubset | None = None
    """Start only from the source images in this seeded subset of their ids (e.g. start 0, stop 0.5 and start 0.5,
    stop 1 give two generators disjoint halves). Unset: every source image."""
    per_source: int = Field(1, ge=1, le=1000)
    """Images made from each source image (with different seeds)."""
    guidance: float = Field(7.5, ge=0.0)
    """Classifier-free guidance scale (text-conditioned pipelines only)."""
    negative_prompt: str | None = None
    """Negative prompt (text-conditioned pipelines only)."""


class GanGenerator(_Generator):
    """A non-diffusion manipulation type: a DCGAN generator (nz 100, 64x64 RGB) sampled from Gaussian latents."""

    mode: Literal["gan"]
    """gan."""
    model: str = "gan-face-generate"
    """gan-face-generate (the DCGAN face generator shipped in the PyPI package of that name), or a torch.save file
    holding a `netG_state_dict` of the same architecture (local or s3://)."""
    count: int = Field(ge=1, le=10_000_000)
    """Images to generate."""


class VaeGenerator(_Generator):
    """A non-diffusion manipulation type: a VAE trained by the train-vae job, decoding Gaussian latents."""

    mode: Literal["vae"]
    """vae."""
    model: str
    """The VAE: a finished train-vae stage (its `model` output), or a folder with vae.json and model.safetensors
    (local or s3://)."""
    count: int = Field(ge=1, le=10_000_000)
    """Images to generate."""
    temperature: float = Field(1.0, gt=0.0, le=4.0)
    """Scale of the latent draw, z ~ N(0, temperature^2 I); the image is the decoded mean, never a noisy draw. 1
    samples the prior as trained; below 1 gives more typical, smoother and less varied images."""


GeneratorSpec = Annotated[
    UnconditionalGenerator | Text2ImgGenerator | Img2ImgGenerator | GanGenerator | VaeGenerator,
    Field(discriminator="mode")]


def _default_reals() -> list[Any]:
    return [{"name": "lfw", "uri": "lfw-faces"}]  # plain data (validated into models): --help prints it as JSON


def _default_generators() -> list[Any]:  # plain data too, validated into GeneratorSpec
    return [{"name": "gan", "mode": "gan", "model": "gan-face-generate", "count": 100}]


class GenerateConfig(JobConfig):
    """Generate fake images with several generators, pass real ones through the same encoding, write Parquet.

    One Ray Data actor pool per generator (model loaded once per actor), one torch.Generator seeded per image,
    images streamed to <stage>/images/<source>/ in the image dataset format (shared/imageset.py). NaN or blank
    outputs and undecodable sources are counted and reported, never written.
    """

    JOB: ClassVar[str] = "generate"

    reals: list[RealSource] = Field(default_factory=_default_reals)
    """Real image collections (see RealSource keys: name, uri, limit, write)."""
    generators: list[GeneratorSpec] = Field(default_factory=_default_generators)
    """Generators, each with a `mode`: unconditional (model, scheduler, steps, count), text2img (model, scheduler,
    steps, guidance, count; uses `prompts`), img2img (model, scheduler, steps, strength, sources, per_source), gan
    (model, count), vae (model, count, temperature). Common keys: name, seed, batch_size, runtime (the actor pool),
    dtype, batch_invariant, resolution and safety_checker (diffusion)."""
    prompts: PromptSource | None = None
    """Prompts for text-conditioned generators: file, inline or faces (composed face prompts)."""
    output: ImageFormat = Field(default_factory=ImageFormat)
    """Image size, encoding and colour of every image written."""
    seed: int = Field(0, ge=0)
    """Job seed, from which generators without their own seed derive theirs."""
    max_drop_fraction: float = Field(0.05, ge=0.0, le=1.0)
    """A generator (or real collection) that drops more than this fraction of its images (NaN or blank outputs,
    safety-checker flags, undecodable sources) fails the job; below it, drops are counted and reported."""
    samples_per_source: int = Field(8, ge=1, le=64)
    """Images per source on the report's contact sheet (the first ones by id, not picked)."""

    @model_validator(mode="after")
    def _check(self) -> GenerateConfig:
        names: set[str] = set()
        for spec in [*self.reals, *self.generators]:
            if spec.name in names:
                raise ValueError(f"source name '{spec.name}' is used twice (reals and generators share one namespace)")
            names.add(spec.name)
        real_names = [r.name for r in self.reals]
        for gen in self.generators:
            if isinstance(gen, Img2ImgGenerator):
                if gen.sources is None:
                    raise ValueError(f"generator '{gen.name}' (img2img) needs `sources`: the name of a real collection "
                                     f"under `reals` (have: {', '.join(real_names) or 'none'})")
                if gen.sources not in real_names:
                    raise ValueError(f"generator '{gen.name}': sources '{gen.sources}' is not a real collection "
                                     f"(have: {', '.join(real_names) or 'none'})")
            if isinstance(gen, Text2ImgGenerator) and self.prompts is None:
                raise ValueError(f"generator '{gen.name}' (text2img) needs prompts: set prompts.file, prompts.inline "
                                 "or prompts.faces")
            if gen.runtime.gpus_per_actor == 0 and gen.dtype == "float16":
                raise ValueError(f"generator '{gen.name}': dtype float16 needs a GPU (runtime.gpus_per_actor > 0); "
                                 "use float32 or bfloat16 on CPUs")
        if not self.generators and not any(r.write for r in self.reals):
            raise ValueError("nothing to write: no generators and no real collection with write: true")
        return self

    def input_uris(self) -> list[str]:
        uris = [r.uri for r in self.reals] + [g.model for g in self.generators]
        if self.prompts is not None and self.prompts.file:
            uris.append(self.prompts.file)
        return uris

    def gpus_per_worker(self) -> float:
        return max((g.runtime.gpus_per_actor for g in self.generators), default=0.0)
