"""Ray glue shared by the passes of corpus-scale jobs over ``shared.pieces`` pieces."""

from __future__ import annotations

import numpy as np
import ray.data

from shared.configs.curate import CurateConfig
from shared.curation.scoring import document_columns
from shared.pieces import Piece, read_piece


def items(pieces: list[Piece]) -> ray.data.Dataset:
    """One row per piece (its index into the plan, which travels with the functions)."""
    return ray.data.from_items([{"piece": p.index} for p in pieces], override_num_blocks=max(1, len(pieces)))


def read_corpus_piece(cfg: CurateConfig, item: Piece) -> dict[str, np.ndarray]:
    """A piece of the corpus as the columns curation reads (id, text, label)."""
    columns = [cfg.text_column, cfg.id_column, cfg.label_column]
    return document_columns(read_piece(item, cfg.storage, columns), cfg.text_column, cfg.id_column, cfg.label_column)
