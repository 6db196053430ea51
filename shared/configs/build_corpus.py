from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from shared.config import JobConfig

Source = Literal["newsgroups", "wikipedia", "news", "reviews", "code", "math", "man"]


DEFAULT_STUDY_TARGETS = ("sci.space", "alt.atheism", "news", "wikipedia", "math")
"""The study targets when ``study_targets`` is unset (those the chosen sources give)."""


class BuildCorpusConfig(JobConfig):
    """Assemble a labelled mixed-domain text pool, seeds and held-out splits from real text on the machine.

    Sources are read where they are installed (gensim's test corpora, the Python standard library, SymPy's
    docstrings, man pages); nothing is copied into the repository. Writes pool/ (Parquet: id, doc_id, text, label),
    seeds.jsonl, heldout/ (target-domain documents kept out of the pool), heldout_general/ (other domains) and
    study_seeds/ (the retrieval study's seed reserve per study target, also kept out of the pool).
    """

    JOB: ClassVar[str] = "build-corpus"

    sources: list[Source] = ["newsgroups", "wikipedia", "news", "reviews", "code", "math", "man"]
    """Sources to read; each document is labelled with its domain (the newsgroups source gives two labels,
    sci.space and alt.atheism)."""
    target_label: str = "sci.space"
    """The domain to curate: seeds and held-out documents come from it."""
    chunk_words: int = Field(150, ge=20, le=2000)
    """Approximate words per chunk (chunks follow line breaks)."""
    min_chunk_words: int = Field(40, ge=1)
    """Shorter chunks (document tails) are dropped."""
    n_seeds: int = Field(10, ge=1, le=1000)
    """Seed examples: the first chunk of this many target documents, whose other chunks are kept out of the pool."""
    dedup_span: int | None = Field(10, ge=3, le=1000)
    """A chunk that shares a run of this many words with a chunk kept before it (seeds first, then held-out text, then
    the pool) is dropped and counted; null keeps near-duplicates."""
    heldout_target_docs: int = Field(20, ge=0)
    """Target documents held out (all chunks) for domain evaluation."""
    heldout_general_share: float = Field(0.1, ge=0.0, lt=1.0)
    """Share of every other label's documents held out as general evaluation text."""
    max_chunks: dict[str, int] = {"wikipedia": 250, "news": 300, "code": 250, "man": 250, "math": 200,
                                  "reviews": 100, "alt.atheism": 200}
    """Cap on pool chunks per label (labels not listed: all chunks)."""
    max_chunks_per_doc: dict[str, int] = {"wikipedia": 3, "code": 2, "man": 1, "math": 2}
    """Cap on chunks taken from one document, per label, so a long page or one program cannot swamp a label."""
    study_targets: list[str] | None = None
    """Labels that get a seed reserve for the retrieval study (written to study_seeds/): whole documents kept out of
    the pool, of which each study draw picks its seeds. A label named here that the sources do not give is an error.
    Unset: those of sci.space, alt.atheism, news, wikipedia and math that the chosen sources give. Empty: no
    reserve."""
    study_reserve_docs: int = Field(20, ge=1)
    """Documents in each study target's seed reserve (the target label's reserve starts with its seeds)."""
    seed: int = 0
    """Shuffling seed (which documents become seeds, held out, or capped away)."""
