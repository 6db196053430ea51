"""Ray glue shared by the passes of corpus-scale jobs over ``shared.pieces`` pieces."""

from __future__ import annotations

from typing import Any

import numpy as np
import ray.data

from shared.configs.curate import CurateConfig
from shared.curation.documents import Survey, document_columns, survey
from shared.pieces import Piece, read_piece


def items(pieces: list[Piece], blocks: int | None = None) -> ray.data.Dataset:
    """One row per piece (its index into the plan, which travels with the functions), in ``blocks`` blocks of
    consecutive pieces (default: one block per piece)."""
    return ray.data.from_items([{"piece": p.index} for p in pieces],
                               override_num_blocks=max(1, blocks or len(pieces)))


def read_corpus_piece(cfg: CurateConfig, item: Piece) -> dict[str, np.ndarray]:
    """A piece of the corpus as the columns curation reads (id, text, label)."""
    columns = [cfg.text_column, cfg.id_column, cfg.label_column]
    return document_columns(read_piece(item, cfg.storage, columns), cfg.text_column, cfg.id_column, cfg.label_column)


def survey_batch(batch: dict[str, np.ndarray], cfg: CurateConfig, pieces: list[Piece], fraction: float
                 ) -> dict[str, Any]:
    """The survey of each piece of a batch, as ``Survey.row`` columns beside ``piece`` (a Ray Data UDF; importing
    this module does not import torch)."""
    rows = [survey(read_corpus_piece(cfg, pieces[int(i)]), cfg.text_column, cfg.ngram.buckets, cfg.seed,
                   cfg.sae.train_docs, fraction, int(i), cfg.coordinates.reference_docs).row()
            for i in batch["piece"]]
    columns: dict[str, Any] = {"piece": batch["piece"]}
    for name in Survey.ROW_FIELDS:
        columns[name] = np.stack([r[name] for r in rows]) if name == "counts" else [r[name] for r in rows]
    return columns
