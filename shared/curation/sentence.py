"""A sentence-embedding baseline in the style of Sentence-Transformers (FineScope's own comparison): a BERT-style
encoder loaded with transformers, mean pooling over the attention mask, L2-normalised; no sentence-transformers
package needed. The default is all-MiniLM-L6-v2 (alias ``minilm-l6``; 384 dimensions, 256-token context)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from shared.config import StorageConfig
from shared.curation.retrieval import mean_pool


@dataclass
class SentenceEncoder:
    model: Any
    tokenizer: Any
    max_tokens: int = 256

    @classmethod
    def load(cls, ref: str, device: str = "cpu", storage: StorageConfig | None = None,
             max_tokens: int = 256) -> SentenceEncoder:
        from transformers import AutoModel, AutoTokenizer

        from shared.models import resolve_model

        where = resolve_model(ref, storage)
        return cls(AutoModel.from_pretrained(where).to(device).eval(), AutoTokenizer.from_pretrained(where),
                   max_tokens)

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """[N, d] unit-length embeddings."""
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(texts[start: start + batch_size], padding=True, truncation=True,
                                   max_length=self.max_tokens, return_tensors="pt").to(device)
            hidden = self.model(**batch).last_hidden_state
            out.append(torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1).cpu())
        hidden_size = self.model.config.hidden_size
        return torch.cat(out).numpy() if out else np.zeros((0, hidden_size), dtype=np.float32)
