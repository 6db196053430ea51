"""Config of the ``curate-images`` job: a subset of an existing collection of generated images, re-encoded."""

from __future__ import annotations

import re
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from shared.config import JobConfig, StrictModel, TasksConfig
from shared.configs.generate import ImageFormat, Name


class ManifestColumns(StrictModel):
    """Which manifest columns hold what. Unset optional columns leave that field null in the output."""

    id: str | None = "id"
    """Unique id of each row. Unset (null): the path column's value is the id."""
    prompt: str = "prompt"
    """The prompt the image was generated from."""
    image: str | None = None
    """Encoded image bytes. Exactly one of image and path; when neither is set, a column named `image`."""
    path: str | None = None
    """Image file paths, relative to the manifest's folder, absolute, or s3:// URIs."""
    model_ref: str | None = None
    """Generator or model name (e.g. DiffusionDB has none; other collections have a `model` column)."""
    scheduler: str | None = None
    """Sampler name (DiffusionDB: sampler)."""
    steps: str | None = None
    """Sampling steps (DiffusionDB: step)."""
    guidance: str | None = None
    """Guidance scale (DiffusionDB: cfg)."""
    seed: str | None = None
    """Generation seed (DiffusionDB: seed)."""

    @model_validator(mode="after")
    def _one_image_source(self) -> ManifestColumns:
        if self.image is not None and self.path is not None:
            raise ValueError("set columns.image or columns.path, not both")
        if self.image is None and self.path is None:
            self.image = "image"
        if self.id is None and self.path is None:
            raise ValueError("columns.id is needed unless columns.path is set (then the path is the id)")
        return self


class PromptClassifier(StrictModel):
    """A naive Bayes text classifier over word unigrams and bigrams, trained on the example prompts given here
    (deterministic, no model download). Class priors are equal, whatever the numbers of examples."""

    positive: list[str] = Field(min_length=1)
    """Example prompts about the subject."""
    negative: list[str] = Field(min_length=1)
    """Example prompts not about the subject."""
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    """A prompt matches when its probability of being about the subject is at least this."""


class SubjectFilter(StrictModel):
    """Which prompts are about the subject. A prompt is kept when it matches a keyword, the regex (both
    case-insensitive) or the classifier, and contains no excluded word. None of the three set: every prompt
    matches."""

    keywords: list[str] = []
    """Whole words or phrases, e.g. [face, portrait, headshot]; plural -s/-es forms match too."""
    regex: str | None = None
    """A Python regular expression searched in the prompt."""
    exclude: list[str] = []
    """Whole words or phrases that reject a prompt even when it matches, e.g. [cartoon, anime]."""
    classifier: PromptClassifier | None = None
    """A text classifier trained on example prompts (positive / negative lists)."""

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"regex {value!r} does not compile: {exc}") from None
        return value

    @field_validator("keywords", "exclude")
    @classmethod
    def _not_blank(cls, words: list[str]) -> list[str]:
        if any(not w.strip() for w in words):
            raise ValueError("keywords must not be empty strings")
        return words


class CurateImagesRuntime(TasksConfig):
    """Resources of the scan and re-encode passes."""

    batch_size: int = Field(64, ge=1)
    """Rows per Ray Data batch."""


class CurateImagesConfig(JobConfig):
    """Curate an existing collection of generated images: subject filter, near-duplicate removal, size bounds.

    Reads a Parquet/JSONL manifest of images with their prompts (the shape of public collections such as
    DiffusionDB), keeps the rows whose prompt matches the subject filter and whose image is within the size bounds,
    drops near duplicates by perceptual-hash distance (keeping the first by id), re-encodes the rest exactly like the
    generate job, and writes the same Parquet format (<stage>/images/<name>/, the stage's `dataset` output). Every
    dropped row is counted by reason (drops.jsonl, report.html).
    """

    JOB: ClassVar[str] = "curate-images"

    manifest: str
    """The collection's manifest: a Parquet or JSONL file or folder (local or s3://), or a finished stage."""
    name: Name = "collected"
    """The `source` value of the curated rows, and their folder under images/."""
    label: Literal["fake", "real"] = "fake"
    """What the collection is (generated images are fake)."""
    columns: ManifestColumns = Field(default_factory=ManifestColumns)
    """Manifest columns: id, prompt, image or path, and optional metadata."""
    subject: SubjectFilter = Field(default_factory=SubjectFilter)
    """Keyword / regex / example-trained classifier filter on prompts."""
    dedup_distance: int | None = Field(6, ge=0, le=63)
    """Near duplicates: images whose 64-bit perceptual hashes differ in at most this many bits (null: no
    deduplication). 0 removes only images that hash identically."""
    min_side: int = Field(64, ge=1)
    """Drop images whose shorter side is below this (pixels, before resizing)."""
    max_side: int | None = Field(None, ge=1)
    """Drop images whose longer side is above this. Unset: no limit."""
    max_aspect: float | None = Field(None, ge=1.0)
    """Drop images whose longer/shorter side ratio is above this (the output is square). Unset: no limit."""
    output: ImageFormat = Field(default_factory=ImageFormat)
    """Image size, encoding and colour of the rows written (use the generated set's, for a mixed dataset)."""
    runtime: CurateImagesRuntime = Field(default_factory=lambda: CurateImagesRuntime())
    """Resources of the decoding tasks (cpus_per_task, batch_size). Not part of the config hash."""
    samples: int = Field(16, ge=1, le=128)
    """Images on the report's contact sheet (kept and near-duplicate examples)."""

    @model_validator(mode="after")
    def _bounds(self) -> CurateImagesConfig:
        if self.max_side is not None and self.max_side < self.min_side:
            raise ValueError(f"max_side {self.max_side} is below min_side {self.min_side}")
        return self

    def input_uris(self) -> list[str]:
        return [self.manifest]
