"""evaluate: perplexity, multiple-choice accuracy and exact match of several models on held-out datasets (Ray Data).

    scopeforge run evaluate --config my-eval.yaml    # models: {base: smollm2-135m, pruned: runs/x/prune}

For each model, the rows of every dataset stream through an actor pool that loads the model once per actor; the
driver sums token NLLs and counts into one table row per model (results.md, metrics.json), and keeps every
document's NLL and token count (documents.parquet: model, dataset, row, nll, tokens) for intervals over documents.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data

from ray_jobs.data import actor_pool
from ray_jobs.metrics import Throughput
from ray_jobs.placement import claim
from shared.configs.evaluate import EvaluateConfig
from shared.data import read_table, write_parquet
from shared.errors import DataError
from shared.stage import Stage


def dataset_rows(cfg: EvaluateConfig) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Rows of every dataset with their kind (text / answer / mc / qa), sampled to max_examples; plus per-dataset
    facts. A dataset with none of the recognised columns is an error naming it."""
    rows, info = [], {}
    for name, uri in cfg.datasets.items():
        table = read_table(uri, cfg.storage)
        cols = set(table.column_names)
        if table.num_rows == 0:
            raise DataError(f"dataset '{name}' ({uri}): no rows")
        if {"question", "choices", "answer_index"} <= cols:
            kind = "mc"
        elif {"question", "answer"} <= cols:
            kind = "qa"
        elif {"prompt", "answer"} <= cols:
            kind = "answer"
        elif "text" in cols:
            kind = "text"
        else:
            raise DataError(f"dataset '{name}' ({uri}): needs a text column, prompt+answer, question+answer or "
                            f"question+choices+answer_index (columns: {', '.join(sorted(cols))})")
        picked: Sequence[int] = range(table.num_rows)
        if table.num_rows > cfg.max_examples:
            picked = sorted(random.Random(f"{cfg.seed}:{name}").sample(range(table.num_rows), cfg.max_examples))
        data = table.take(list(picked)).to_pylist()
        info[name] = {"uri": uri, "kind": kind, "rows": len(data), "available": table.num_rows}
        for i, row in enumerate(data):
            rows.append({"dataset": name, "kind": kind, "row": i, "text": row.get("text"),
                         "prompt": row.get("prompt") or row.get("question"), "answer": _str(row.get("answer")),
                         "choices": [str(c) for c in row.get("choices") or []],
                         "answer_index": int(row.get("answer_index", -1) if row.get("answer_index") is not None
                                             else -1)})
    return rows, info


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


class EvalActor:
    """One model, loaded once: NLL sums for perplexity, the picked choice for MC rows, the generated answer for QA."""

    def __init__(self, cfg: EvaluateConfig, ref: str, stage_name: str):
        from shared.models import count_parameters, load_causal_lm

        device = claim(stage_name, "evaluation actor", cfg.runtime.gpus_per_actor, cfg.runtime.threads).device
        self.cfg = cfg
        self.model, self.tokenizer = load_causal_lm(ref, dtype=cfg.dtype, device=device, storage=cfg.storage)
        self.parameters = count_parameters(self.model)
        self.throughput = Throughput("evaluate", stage_name, ("documents", "tokens"))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from shared.evaluation import exact_match, example_nll, pick_choice
        from shared.generation import chat_prompt, generate_text
        from shared.lm_data import encode_pairs, encode_texts

        n = len(batch["kind"])
        nll = np.full(n, np.nan)
        tokens = np.zeros(n, dtype=np.int64)
        correct = np.full(n, -1, dtype=np.int8)
        cfg, tok = self.cfg, self.tokenizer
        encoded: dict[int, Any] = {}
        for i in range(n):
            kind = batch["kind"][i]
            if kind == "text":
                found, _ = encode_texts(tok, [batch["text"][i]], cfg.max_length)
            elif kind in ("answer", "qa"):
                found, _ = encode_pairs(tok, [batch["prompt"][i]], [batch["answer"][i]], cfg.max_length)
            else:
                found = []
            if found:
                encoded[i] = found[0]
        if encoded:  # one padded forward pass for the batch's perplexity rows
            scores = example_nll(self.model, list(encoded.values()), tok.pad_token_id)
            for i, (total, count) in zip(encoded, scores):
                nll[i], tokens[i] = total, count
        for i in range(n):
            kind = batch["kind"][i]
            if kind == "mc":
                picked = pick_choice(self.model, tok, str(batch["prompt"][i]), list(batch["choices"][i]),
                                     cfg.max_length)
                correct[i] = int(picked == int(batch["answer_index"][i]))
            elif kind == "qa":
                answer = generate_text(self.model, tok, [chat_prompt(tok, str(batch["prompt"][i]))],
                                       max_new_tokens=cfg.max_new_tokens)[0]
                correct[i] = int(exact_match(answer, str(batch["answer"][i])))
        self.throughput.add(documents=n, tokens=int(tokens.sum()))
        return {"dataset": batch["dataset"], "row": batch["row"], "nll": nll, "tokens": tokens, "correct": correct,
                "parameters": np.full(n, self.parameters, dtype=np.int64)}


def evaluate_model(cfg: EvaluateConfig, ref: str, rows: list[dict[str, Any]], stage: Stage) -> list[dict]:
    ds = ray.data.from_items(rows).repartition(max(cfg.runtime.most_actors * 2, -(-len(rows) // cfg.batch_size)))
    scored = ds.map_batches(EvalActor, fn_constructor_kwargs={"cfg": cfg, "ref": ref,
                                                              "stage_name": stage.name},
                            compute=actor_pool(cfg.runtime),
                            batch_size=cfg.batch_size, num_cpus=cfg.runtime.cpus_per_actor,
                            num_gpus=cfg.runtime.gpus_per_actor or None)
    return list(scored.iter_rows())


def summarise(results: list[dict[str, Any]], info: dict[str, dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {"parameters": int(results[0]["parameters"]) if results else None}
    for name, facts in info.items():
        mine = [r for r in results if r["dataset"] == name]
        nll = sum(r["nll"] for r in mine if not math.isnan(r["nll"]))
        count = sum(int(r["tokens"]) for r in mine if not math.isnan(r["nll"]))
        entry: dict[str, Any] = {"tokens": count, "loss": nll / count if count else None,
                                 "perplexity": math.exp(nll / count) if count else None,
                                 "skipped": sum(1 for r in mine if math.isnan(r["nll"]) and facts["kind"] != "mc")}
        judged = [int(r["correct"]) for r in mine if int(r["correct"]) >= 0]
        if facts["kind"] == "mc":
            entry["accuracy"] = sum(judged) / len(judged) if judged else None
        if facts["kind"] == "qa":
            entry["exact_match"] = sum(judged) / len(judged) if judged else None
        row[name] = entry
    return row


def markdown_table(table: dict[str, dict[str, Any]], info: dict[str, dict[str, Any]]) -> str:
    header = ["model", "parameters"]
    for name, facts in info.items():
        header.append(f"{name} ppl")
        if facts["kind"] == "mc":
            header.append(f"{name} acc")
        if facts["kind"] == "qa":
            header.append(f"{name} EM")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, row in table.items():
        cells = [model, f"{row['parameters'] / 1e6:.1f} M" if row["parameters"] else "?"]
        for name, facts in info.items():
            entry = row[name]
            cells.append(f"{entry['perplexity']:.2f}" if entry["perplexity"] is not None else "n/a")
            if facts["kind"] == "mc":
                cells.append(f"{entry['accuracy']:.3f}" if entry["accuracy"] is not None else "n/a")
            if facts["kind"] == "qa":
                cells.append(f"{entry['exact_match']:.3f}" if entry["exact_match"] is not None else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(cfg: EvaluateConfig, stage: Stage) -> dict[str, Any]:
    t0 = time.time()
    rows, info = dataset_rows(cfg)
    print("datasets: " + ", ".join(f"{n} ({f['rows']} rows, {f['kind']})" for n, f in info.items()), flush=True)
    table, seconds, documents = {}, {}, []
    for name, ref in cfg.models.items():
        started = time.time()
        results = evaluate_model(cfg, ref, rows, stage)
        table[name] = summarise(results, info)
        documents += [{"model": name, "dataset": str(r["dataset"]), "row": int(r["row"]), "nll": float(r["nll"]),
                       "tokens": int(r["tokens"])} for r in results if not math.isnan(r["nll"])]
        seconds[name] = round(time.time() - started, 1)
        cells = ", ".join(f"{d} ppl {table[name][d]['perplexity']:.2f}" for d in info
                          if table[name][d]["perplexity"] is not None)
        print(f"{name}: {cells} ({seconds[name]} s)", flush=True)
    markdown = markdown_table(table, info)
    stage.store.write_text(markdown, "results.md")
    documents.sort(key=lambda d: (d["model"], d["dataset"], d["row"]))
    write_parquet(pa.Table.from_pylist(documents), stage.store, "documents.parquet")  # per-document NLL
    print(markdown, flush=True)
    return {"models": {name: {"ref": cfg.models[name], **row} for name, row in table.items()}, "datasets": info,
            "seconds": seconds, "total_s": round(time.time() - t0, 1)}
