from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from shared.config import JobConfig, StrictModel


class StudyRuntime(StrictModel):
    """Resources of the embedding tasks (not part of the config hash)."""

    cpus_per_task: float = Field(2.0, gt=0)
    """Logical CPUs per embedding task; it runs that many torch threads unless ``threads`` says otherwise."""
    gpus_per_task: float = Field(0.0, ge=0)
    """GPUs per embedding task (> 0 computes on CUDA; the task fails if it sees none)."""
    threads: int | None = Field(None, ge=1)
    """torch threads per task. Unset: the CPUs reserved."""
    block_docs: int = Field(512, ge=1)
    """Documents per embedding task (each task loads the models once)."""
    micro_batch: int = Field(8, ge=1)
    """Documents per forward pass."""


class RetrievalStudyConfig(JobConfig):
    """Every selection method on several target domains and independent seed draws, with bootstrap intervals.

    Reads a build-corpus stage's labelled pool and its seed reserve (study_seeds/: whole documents per target, kept
    out of the pool), and a curate stage's curation model (layer, coordinates, SAE). Each (target, draw) picks
    ``seeds_per_draw`` reserve documents and every method takes its top M of the pool: the SAE kinds of curate
    (sae, sae_idf, sae_max, sae_tfidf), sae_lift (firing shares weighted by their lift on the seeds against the
    pool), dense hidden states, TF-IDF max-cosine, a sentence-embedding model, DSIR n-grams and random, and the
    hybrid (the chosen SAE kind fused with TF-IDF by reciprocal rank). The SAE kind is chosen on
    ``development_target`` alone; the headline figures are the other targets. Outputs: metrics.json (per method and
    target: purity@M, recall@M, R-precision as mean with a 95% bootstrap interval over draws; paired differences of
    the chosen SAE kind against each baseline), runs.jsonl (one line per method, target and draw), study.md and
    study.png.
    """

    JOB: ClassVar[str] = "retrieval-study"

    corpus: str
    """The labelled pool: a build-corpus stage (or any dataset with text, id and label columns)."""
    reserve: str
    """The seed reserve: ``<corpus stage>/study_seeds`` (text, id and label columns; no document of it is in the
    pool)."""
    curation: str
    """A curate stage: its curation model (base model, layer, coordinates, SAE) embeds pool and reserve."""
    variants: dict[str, str] = {}
    """More curate stages to compare, by name (another layer, every coordinate, another SAE width or k): each one's
    SAE kinds and dense vector are reported as ``<name>:<kind>``, and its SAE kinds are candidates for the choice on
    the development target."""
    targets: list[str] | None = None
    """Target labels to study. Unset: every label of the reserve."""
    development_target: str = "alt.atheism"
    """The target on which the SAE kind is chosen; it is reported on its own and left out of the headline figures.
    Chosen before any figure was seen: the sister newsgroup of the demo's target."""
    draws: int = Field(5, ge=1)
    """Independent seed draws per target."""
    seeds_per_draw: int = Field(10, ge=1)
    """Seeds in one draw."""
    m: int = Field(100, ge=1)
    """Documents each method selects (purity@M and recall@M)."""
    max_tokens: int = Field(192, ge=8)
    """Documents are truncated to this many tokens for the SAE and dense vectors."""
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    """Activation dtype of the base model."""
    sentence_model: str | None = "minilm-l6"
    """The sentence-embedding baseline (a BERT-style encoder with mean pooling: an alias, directory or s3:// prefix).
    null leaves it out."""
    compare_with: list[str] = ["tfidf", "dense", "minilm", "ngram", "random"]
    """Methods the chosen SAE kind is compared with (paired bootstrap of the purity difference), plus the hybrid."""
    bootstrap_rounds: int = Field(2000, ge=100)
    """Bootstrap resamples per interval."""
    max_documents: int = Field(50_000, ge=1)
    """The study holds every vector in memory: a larger pool is refused (curate streams; the study does not)."""
    seed: int = 0
    """Seeds the draws, the bootstrap and the random and DSIR baselines."""
    runtime: StudyRuntime = StudyRuntime()
    """Resources (not part of the config hash)."""

    def input_uris(self) -> list[str]:
        return [self.corpus, self.reserve, self.curation, *self.variants.values()]

    def gpus_per_worker(self) -> float:
        return self.runtime.gpus_per_task

    @model_validator(mode="after")
    def _checks(self) -> RetrievalStudyConfig:
        if self.targets is not None and self.development_target not in self.targets:
            raise ValueError(f"development_target {self.development_target!r} is not one of targets")
        bad = [name for name in self.variants if not name or ":" in name]
        if bad:
            raise ValueError(f"variant name {bad[0]!r}: must be non-empty and without ':'")
        return self
