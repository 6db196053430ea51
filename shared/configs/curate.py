from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from shared.config import ActorPoolConfig, JobConfig, StrictModel


class CoordinateConfig(StrictModel):
    """Which hidden coordinates of the chosen layer feed the SAE."""

    selector: Literal["jvp", "magnitude", "variance", "all"] = "jvp"
    """jvp: sensitivity ||d a_j / d e(x)|| to the input embeddings (Jacobian-vector products with Rademacher
    probes); magnitude: mean |a_j|; variance: variance of a_j; all: every coordinate (k is ignored)."""
    k: int = Field(128, ge=1)
    """Coordinates kept (K_act)."""
    probes: Literal[1, 2, 4] = 2
    """Rademacher probes per document for the jvp selector (R)."""
    reference_docs: int = Field(16, ge=1)
    """Documents of the reference sample used to score coordinates with jvp."""
    reference_tokens: int = Field(128, ge=8)
    """Tokens per reference document for jvp (forward-mode AD costs a few forward passes per probe)."""


class SAEConfig(StrictModel):
    """The TopK sparse autoencoder trained on the selected coordinates."""

    k: int = Field(32, ge=1)
    """Active latents per token."""
    expansion: int = Field(32, ge=1)
    """Dictionary size as a multiple of the number of selected coordinates (width = expansion x K_act)."""
    aux_alpha: float = Field(1 / 32, ge=0)
    """Weight of the AuxK loss (reconstructing the residual with dead latents)."""
    aux_k: int | None = None
    """Dead latents used by AuxK. Unset: half the dictionary, at most 512."""
    l1: float = Field(0.0, ge=0)
    """Optional L1 penalty on the codes (lambda)."""
    dead_tokens: int = Field(10_000, ge=1)
    """A latent that has not fired in this many tokens counts as dead."""
    train_docs: int = Field(256, ge=2)
    """Corpus documents in the SAE's sample (uniform: the smallest hashes of id and seed). Their activations go to
    the activation cache and training streams from it, so this can reach millions of tokens."""
    heldout_fraction: float = Field(0.1, ge=0, lt=1)
    """Share of the sample's documents held out of training; the reported FVU is measured on them."""
    steps: int = Field(600, ge=1)
    """Optimiser steps."""
    batch_size: int = Field(1024, ge=8)
    """Tokens per step."""
    lr: float = Field(1e-3, gt=0)
    """Adam learning rate."""


class RetrievalConfig(StrictModel):
    """How documents are selected from their scores (the same rule for every method)."""

    scoring: Literal["sae", "sae_idf", "sae_max", "sae_tfidf"] = "sae"
    """Which score makes the subset, each a max cosine to the seeds of SAE codes pooled over a document's tokens:
    sae, mean-pooled (FineScope's method); sae_idf, mean-pooled with every latent weighted by its document-frequency
    idf over the corpus sample (sqrt of the activation times log N/df); sae_max, max-pooled; sae_tfidf, the share of
    tokens on which each latent fires, weighted by an idf from per-token firing rates, so latents that fire on
    nearly every token weigh less. All are always measured and reported."""
    m: int | None = Field(100, ge=1)
    """Documents to select (M). Unset: everything at or above the threshold."""
    mode: Literal["global", "per_seed"] = "global"
    """global: the M highest scores (score = max cosine over seeds); per_seed: each seed's M nearest documents,
    united (FineScope's own selection; the random and ngram baselines then take as many documents as that union)."""
    threshold: float | None = None
    """Keep only documents whose score is at least this (before taking the top M)."""

    @model_validator(mode="after")
    def _m_or_threshold(self) -> RetrievalConfig:
        if self.m is None and self.threshold is None:
            raise ValueError("set m, threshold, or both")
        return self


class NgramConfig(StrictModel):
    """The DSIR-style hashed n-gram importance-resampling baseline."""

    buckets: int = Field(10_000, ge=16)
    """Hash buckets for unigrams and bigrams."""
    alpha: float = Field(1.0, gt=0)
    """Add-alpha smoothing of the bucket distributions."""


class CurateRuntime(ActorPoolConfig):
    """Resources of the fit task and the embedding pass (both use gpus_per_actor); none change the results."""

    piece_mb: float = Field(64.0, gt=0)
    """Corpus megabytes (uncompressed) per piece: the unit of work an actor takes, of the score shards it commits,
    and of resume (a rerun after a crash re-scores only the pieces with no committed shard)."""
    piece_docs: int = Field(4096, ge=1)
    """At most this many documents per piece; a small corpus is cut into at least 4 pieces per actor."""
    subset_shard_mb: float = Field(256.0, gt=0)
    """Target size of each Parquet file of the subset."""
    micro_batch: int = Field(8, ge=1)
    """Documents per forward pass (sorted by length within a batch, so padding stays small)."""


class CurateConfig(JobConfig):
    """SAE-guided domain curation: select the corpus documents closest to a few seed examples in SAE code space.

    Coordinates of one layer are chosen by their sensitivity to the input embeddings, a TopK SAE is trained on them
    over a corpus sample, and every document is scored by the cosine between its mean-pooled SAE code and the
    nearest seed's. Random, dense (mean-pooled hidden state) and DSIR-style n-gram baselines select from the same
    pool with the same M (an idf-weighted variant of the SAE score is reported too). Outputs: subset/ (Parquet: id,
    text, score, matched_seed, label; in corpus order), sae/, coordinates.json, metrics.json
    (retrieval.<method>.purity/recall when labels are known), report.html; the per-piece score shards (ids and
    scores, no text) stay under the stage's checkpoints/ folder, where a rerun of the same config resumes from them.
    """

    JOB: ClassVar[str] = "curate"

    model: str = "smollm2-135m"
    """Base causal LM (alias, directory, s3:// prefix, hub id, or a stage that produced a model)."""
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    """Activation dtype (bf16 is about 2.4x faster on CPU, with the same pooled vectors)."""
    corpus: str
    """Corpus URI: Parquet or JSONL shards (local or s3://), a saved Hugging Face dataset, a hub dataset name, or a
    build-corpus stage. Needs a text column; id and label columns are optional."""
    seeds: str | list[str]
    """Seed examples: a JSONL/Parquet URI with a text column, or an inline list of texts."""
    text_column: str = "text"
    """Column holding the document text."""
    id_column: str = "id"
    """Column holding document ids (row numbers are used when it is absent)."""
    label_column: str = "label"
    """Column holding domain labels, used only to measure purity and recall (optional)."""
    target_label: str | None = None
    """The label of the target domain; with a label column, metrics report purity and recall per method."""
    layer: int | None = None
    """Layer whose output is read (0-based). Unset: about three quarters of the depth (22 of 30 for SmolLM2)."""
    max_tokens: int = Field(256, ge=8)
    """Documents are truncated to this many tokens (and counted)."""
    skip_first_token: bool = True
    """Leave the first token out of SAE training and pooling (its activations are outsized and uninformative)."""
    coordinates: CoordinateConfig = CoordinateConfig()
    """Coordinate selection."""
    sae: SAEConfig = SAEConfig()
    """Sparse autoencoder."""
    retrieval: RetrievalConfig = RetrievalConfig()
    """Selection rule."""
    baselines: list[Literal["random", "dense", "ngram"]] = ["random", "dense", "ngram"]
    """Baselines selecting from the same pool with the same M."""
    ngram: NgramConfig = NgramConfig()
    """The n-gram baseline."""
    seed: int = 0
    """Seed for sampling, probes, SAE initialisation and the random baselines."""
    runtime: CurateRuntime = CurateRuntime()
    """Resources (not part of the config hash)."""

    def input_uris(self) -> list[str]:
        return [self.model, self.corpus] + ([self.seeds] if isinstance(self.seeds, str) else [])

    def gpus_per_worker(self) -> float:
        return self.runtime.gpus_per_actor

    @model_validator(mode="after")
    def _checks(self) -> CurateConfig:
        if isinstance(self.seeds, list) and not any(s.strip() for s in self.seeds):
            raise ValueError("seeds: give at least one non-empty seed text")
        return self
