"""How much of the pruning damage a recovery method undoes, in log-perplexity (mean token loss) units, with
bootstrap intervals over held-out documents.

With L the token-weighted mean loss of a model on a dataset, the recovered share is (L_pruned - L_recovered) /
(L_pruned - L_base): 1 closes the gap, 0 recovers nothing. Every bootstrap round resamples the same documents for
every model, so shares and differences are paired.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from shared.errors import DataError


def document_matrix(documents: Sequence[dict[str, Any]], dataset: str,
                    models: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """([models, D] NLL sums, [models, D] token counts) over the documents every model scored."""
    by = {(d["model"], int(d["row"])): (float(d["nll"]), int(d["tokens"])) for d in documents
          if d["dataset"] == dataset}
    rows = sorted(set.intersection(*({r for (m, r) in by if m == model} for model in models)))
    if not rows:
        raise DataError(f"dataset {dataset!r}: no document scored by every model ({', '.join(models)})")
    nll = np.array([[by[(m, r)][0] for r in rows] for m in models])
    tokens = np.array([[by[(m, r)][1] for r in rows] for m in models], dtype=np.float64)
    return nll, tokens


def _interval(samples: np.ndarray) -> list[float]:
    low, high = np.nanpercentile(samples, [2.5, 97.5])
    return [float(low), float(high)]


def recovery(documents: Sequence[dict[str, Any]], dataset: str, base: str, pruned: str, recovered: Sequence[str],
             compare: Sequence[tuple[str, str]] = (), rounds: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Loss and perplexity per model, each recovered model's share of the gap, and paired loss differences
    (``compare``: (a, b) pairs, a - b), each with a 95% percentile bootstrap interval over documents."""
    models = list(dict.fromkeys([base, pruned, *recovered, *(x for pair in compare for x in pair)]))
    nll, tokens = document_matrix(documents, dataset, models)
    index = {m: i for i, m in enumerate(models)}

    def figures(picked: np.ndarray) -> dict[str, float]:
        loss = nll[:, picked].sum(axis=1) / tokens[:, picked].sum(axis=1)
        gap = loss[index[pruned]] - loss[index[base]]
        out = {f"loss:{m}": float(loss[index[m]]) for m in models}
        for m in recovered:
            out[f"share:{m}"] = float((loss[index[pruned]] - loss[index[m]]) / gap) if gap > 0 else float("nan")
        for a, b in compare:
            out[f"diff:{a}|{b}"] = float(loss[index[a]] - loss[index[b]])
        return out

    n = nll.shape[1]
    point = figures(np.arange(n))
    rng = np.random.default_rng(seed)
    samples = [figures(np.asarray(rng.integers(0, n, n))) for _ in range(rounds)]
    ci = {k: _interval(np.array([s[k] for s in samples])) for k in point}
    return {
        "documents": n,
        "models": {m: {"loss": point[f"loss:{m}"], "loss_ci": ci[f"loss:{m}"],
                       "perplexity": float(np.exp(point[f"loss:{m}"])),
                       "perplexity_ci": [float(np.exp(x)) for x in ci[f"loss:{m}"]]} for m in models},
        "recovered_share_log": {m: {"mean": point[f"share:{m}"], "ci": ci[f"share:{m}"]} for m in recovered},
        "loss_differences": {f"{a} - {b}": {"mean": point[f"diff:{a}|{b}"], "ci": ci[f"diff:{a}|{b}"],
                                            "excludes_zero": bool(ci[f"diff:{a}|{b}"][0] > 0
                                                                  or ci[f"diff:{a}|{b}"][1] < 0)}
                             for a, b in compare},
    }
