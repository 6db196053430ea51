"""Tokens/s of the curate job's scoring pass (Ray Data over corpus pieces -> the scoring actor pool, one committed
score shard per piece) against a bare loop doing the same per piece in one process, measured in the same run.

    python benchmarks/curate_throughput.py                    # SmolLM2-135M, bf16, 256 real documents, CPU
    python benchmarks/curate_throughput.py --model tiny-llama --docs 128
    python benchmarks/curate_throughput.py --gpu              # 7B-shaped random LLaMA truncated at layer 24, bf16

Prints one JSON line per measurement, then a summary with ``ratio_1_actor`` (Ray tokens/s with one actor over the
bare loop's; goal >= 0.9) and ``speedup_2_actors`` (two actors over one). Both sides use the job's own code
(``read_piece``, ``DocumentTokenizer``, ``DocumentScorer``, a Parquet shard per piece), the same pieces and
micro-batch. The Ray side is timed from
the first read to the last scored row, actor start-up and model loading included (Ray itself is already running, as
on a cluster); the bare loop from loading the model to its last batch. The GPU variant needs CUDA and refuses to run
without it: it saves the truncated random model once (about 6.5 GB in bf16) and takes about 5 minutes on one GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def documents(n: int) -> list[dict[str, str]]:
    """Real text from the embedded corpus sources (news, newsgroups, Python source), chunked as the demo does."""
    import random

    from shared.curation.corpus import chunk_documents, news, newsgroups, python_source

    rng = random.Random(0)
    docs = list(newsgroups(rng, None)) + list(news(rng, None)) + list(python_source(rng, None))[:200]
    chunks = chunk_documents(docs, chunk_words=150, min_words=40, per_doc=2)
    random.Random(1).shuffle(chunks)
    return [{"id": c.id, "text": c.text, "label": c.label} for c in chunks[:n]]


def gpu_model(folder: Path) -> str:
    """A LLaMA-2-7B-shaped config with random weights, cut after layer 24 (what curation reads), saved in bf16."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from shared.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("tiny-llama"))
    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=25,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return str(folder)


def config(model: str, gpu: bool, actors: int, docs: int):
    from shared.config import validate_config
    from shared.configs.curate import CurateConfig

    runtime = {"num_actors": actors, "piece_docs": 64 if not gpu else 256, "micro_batch": 8 if not gpu else 64,
               "cpus_per_actor": max(1, (os.cpu_count() or 1) // actors)}  # the actors share the cores (threads)
    if gpu:
        runtime.update(gpus_per_actor=1.0 / actors, cpus_per_actor=1.0)
    return validate_config(CurateConfig, {
        "model": model, "dtype": "bfloat16", "corpus": "unused", "seeds": ["orbit and launch"],
        "layer": 24 if gpu else None, "max_tokens": 256, "runtime": runtime,
        "sae": {"train_docs": min(64, docs), "steps": 20}, "coordinates": {"selector": "magnitude", "k": 32},
    }, "benchmark")


def fit_model(cfg, texts: list[str]):
    """A CurationModel from a short fit in this process (its values do not change the throughput)."""
    import torch

    from shared.curation.fit import fit_curation, settings_from
    from shared.curation.model import CurationModel
    from shared.models import load_causal_lm

    device = "cuda" if cfg.runtime.gpus_per_actor else "cpu"
    model, tokenizer = load_causal_lm(cfg.model, dtype=cfg.dtype, device=device)
    fit = fit_curation(model, tokenizer, texts[: cfg.sae.train_docs], list(cfg.seeds), settings_from(cfg),
                       torch.Generator().manual_seed(0), log=lambda line: None)
    del model
    return CurationModel.from_fit(fit, cfg.model, settings_from(cfg), [f"seed-{i}" for i in range(len(cfg.seeds))])


def bare_loop(cfg, pieces, curation, weights, out: str) -> dict:
    """What each scoring actor does per piece, in a plain loop."""
    import torch

    from ray_jobs.pieces import read_corpus_piece
    from shared.curation.scoring import DocumentScorer, DocumentTokenizer, score_table
    from shared.data import write_parquet
    from shared.storage import Storage

    started = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    device = "cuda" if cfg.runtime.gpus_per_actor else "cpu"
    tokenize = DocumentTokenizer(cfg.model, cfg.text_column, cfg.max_tokens, cfg.seed, weights)
    score = DocumentScorer(curation, cfg.runtime.micro_batch, cfg.dtype, device)
    tokenize.setup()
    score.setup()
    tokens = docs = 0
    store = Storage(out)
    for piece in pieces:
        cols = score(tokenize(read_corpus_piece(cfg, piece)))
        cols.pop("text")
        write_parquet(score_table(cols), store, f"{piece.key}.parquet")
        tokens += int(cols["n_tokens"].sum())
        docs += len(cols["id"])
    seconds = time.perf_counter() - started
    return {"side": "bare_loop", "docs": docs, "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1)}


def ray_pass(cfg, pieces, curation, weights, out: str) -> dict:
    import pyarrow.parquet as pq

    from ray_jobs.curate import score_pieces

    started = time.perf_counter()
    docs = score_pieces(cfg, pieces, curation, weights, out)
    seconds = time.perf_counter() - started
    tokens = sum(int(pq.read_table(f"{out}/{p.key}.parquet", columns=["n_tokens"]).column(0).to_numpy().sum())
                 for p in pieces)
    return {"side": f"ray_{cfg.runtime.num_actors}_actor", "docs": docs, "tokens": tokens,
            "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}


def plan(cfg, rows: list[dict], folder: Path):
    """The rows as one Parquet file, cut into the job's pieces."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shared.data import resolve_dataset
    from shared.pieces import plan_pieces

    pq.write_table(pa.Table.from_pylist(rows), folder / "corpus.parquet")
    r = cfg.runtime
    return plan_pieces(resolve_dataset(str(folder / "corpus.parquet")), None, int(r.piece_mb * 2**20), r.piece_docs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--docs", type=int, default=256)
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args()

    import numpy as np
    import ray
    import torch

    from ray_jobs.runtime import init_ray

    if args.gpu and not torch.cuda.is_available():
        sys.exit("--gpu needs CUDA")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = documents(args.docs)
    with tempfile.TemporaryDirectory() as tmp:
        model = gpu_model(Path(tmp) / "llama-7b-shaped") if args.gpu else args.model
        init_ray()
        weights = np.zeros(16)  # the n-gram key is computed on both sides; its weights do not matter here
        cfg1 = config(model, args.gpu, 1, args.docs).model_copy(update={"ngram": {"buckets": 16, "alpha": 1.0}})
        fit = fit_model(cfg1, [r["text"] for r in rows])
        pieces = plan(cfg1, rows, Path(tmp))
        results = [bare_loop(cfg1, pieces, fit, weights, f"{tmp}/bare"),
                   ray_pass(cfg1, pieces, fit, weights, f"{tmp}/ray1")]
        cfg2 = config(model, args.gpu, 2, args.docs).model_copy(update={"ngram": {"buckets": 16, "alpha": 1.0}})
        results.append(ray_pass(cfg2, pieces, fit, weights, f"{tmp}/ray2"))
        ray.shutdown()
    for r in results:
        print(json.dumps({"benchmark": "curate_throughput", "model": args.model if not args.gpu else "llama-7b-shape",
                          "device": "cuda" if args.gpu else "cpu", **r}))
    bare, one, two = (r["tokens_per_s"] for r in results)
    print(json.dumps({"benchmark": "curate_throughput", "summary": True, "cpu_count": os.cpu_count(),
                      "ratio_1_actor": round(one / bare, 3), "speedup_2_actors": round(two / one, 3),
                      "goal_ratio_1_actor": 0.9}))


if __name__ == "__main__":
    main()
