"""TopK SAE training speed: scopeforge's trainer against EleutherAI's ``eai-sparsify`` on the same activations.

    python benchmarks/sae_train.py                     # SmolLM2-135M layer 22 activations of 96 real documents
    python benchmarks/sae_train.py --model tiny-llama

Both train a TopK SAE of the same shape (K_act=128 selected coordinates, 32x expansion, k=32) with Adam at the same
learning rate and batch size for the same number of steps, with AuxK on dead latents, on the same activation matrix
in the same process. scopeforge runs twice: on the in-memory matrix, and streaming from an activation cache on local
disk (the same rows written as ``shared.curation.cache`` shards of about 4,000 tokens, as the curate job trains).
Prints one JSON line per trainer (samples/s = activation vectors per second, final FVU on all the activations) and a
summary with the speed ratios. eai-sparsify is not a dependency of the project: when it is not
installed (``pip install eai-sparsify``) its line says so.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def activations(model_ref: str, docs: int, k_act: int):
    import torch

    from shared.curation.activations import (
        default_layer,
        select_coordinates,
        statistic_scores,
        token_mask,
        truncate_to_layer,
    )
    from shared.curation.corpus import chunk_documents, news, newsgroups
    from shared.curation.features import length_batches, pad_batch, tokenize
    from shared.models import load_causal_lm

    rng = random.Random(0)
    chunks = chunk_documents(list(newsgroups(rng, None)) + list(news(rng, None)), 150, 40, per_doc=1)
    random.Random(1).shuffle(chunks)
    model, tok = load_causal_lm(model_ref, dtype="bfloat16")
    base = truncate_to_layer(model, default_layer(model.config.num_hidden_layers))
    ids = tokenize(tok, [c.text for c in chunks[:docs]], 256).ids
    acts = []
    with torch.inference_mode():
        for group in length_batches([len(x) for x in ids], 8):
            input_ids, attention = pad_batch([ids[i] for i in group], tok.pad_token_id)
            hidden = base(input_ids=input_ids, attention_mask=attention).last_hidden_state.float()
            acts.append(hidden[token_mask(attention, True)])
    acts = torch.cat(acts)
    coords = select_coordinates(statistic_scores(acts, "variance"), min(k_act, acts.shape[1]))
    return acts[:, coords].contiguous()


def ours(x, steps: int, batch: int, lr: float):
    from shared.curation.sae import SAEShape, TrainSettings, train_sae

    d = x.shape[1]
    started = time.perf_counter()
    result = train_sae(x, SAEShape(d_in=d, n_latents=32 * d, k=32, aux_k=d // 2, dead_tokens=10_000),
                       TrainSettings(steps=steps, batch_size=batch, lr=lr, log_every=10**9))
    seconds = time.perf_counter() - started
    return {"trainer": "scopeforge", "seconds": round(seconds, 2), "samples_per_s": round(steps * batch / seconds, 1),
            "fvu": round(result.fvu, 4)}


def ours_from_cache(x, steps: int, batch: int, lr: float, folder: str):
    """The same training, streamed from cache shards on disk (what the curate job's SAE worker does)."""
    import numpy as np

    from shared.curation.cache import ActivationCache, CacheShard
    from shared.curation.sae import FVU, SAEShape, TrainSettings, train_sae
    from shared.storage import Storage

    store, uris, rows = Storage(folder), [], x.numpy()
    for i, start in enumerate(range(0, len(rows), 4096)):
        part = rows[start: start + 4096]
        shard = CacheShard(acts=part, doc=np.zeros(len(part), np.int32), pos=np.arange(len(part), dtype=np.int32),
                           doc_ids=np.array([f"d{i}"]), heldout=np.zeros(1, bool), tokens=np.zeros(0, np.int32),
                           offsets=np.zeros(2, np.int64))
        uris.append(shard.save(store, f"{i:05d}.npz"))
    d = x.shape[1]
    started = time.perf_counter()
    cache = ActivationCache(uris)
    result = train_sae(cache, SAEShape(d_in=d, n_latents=32 * d, k=32, aux_k=d // 2, dead_tokens=10_000),
                       TrainSettings(steps=steps, batch_size=batch, lr=lr, log_every=10**9))
    seconds = time.perf_counter() - started
    fvu = FVU()
    for part in cache.rows(heldout=False):
        fvu.add(result.sae, part)
    return {"trainer": "scopeforge_cache", "seconds": round(seconds, 2),
            "samples_per_s": round(steps * batch / seconds, 1), "fvu": round(fvu.value or 0.0, 4)}


def sparsify_run(x, steps: int, batch: int, lr: float):
    import torch

    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:
        return {"trainer": "eai-sparsify", "status": "not installed (pip install eai-sparsify)"}
    d = x.shape[1]
    torch.manual_seed(0)
    sae = SparseCoder(d, SparseCoderConfig(expansion_factor=32, k=32))
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    since_fired = torch.zeros(sae.num_latents, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for _ in range(steps):
        xb = x[torch.randint(0, x.shape[0], (batch,), generator=g)]
        out = sae(xb, dead_mask=since_fired > 10_000)
        loss = out.fvu + out.auxk_loss / 32
        optimizer.zero_grad()
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        sae.set_decoder_norm_to_unit_norm()
        since_fired += batch
        since_fired[out.latent_indices.flatten()] = 0
    seconds = time.perf_counter() - started
    with torch.no_grad():
        fvu = float(sae(x).fvu)
    return {"trainer": "eai-sparsify", "seconds": round(seconds, 2), "samples_per_s": round(steps * batch / seconds, 1),
            "fvu": round(fvu, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--docs", type=int, default=96)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=1024)
    args = parser.parse_args()
    import tempfile

    import torch

    x = activations(args.model, args.docs, 128)
    lr = 1e-3
    with tempfile.TemporaryDirectory() as tmp:
        results = [ours(x, args.steps, args.batch, lr), sparsify_run(x, args.steps, args.batch, lr),
                   ours_from_cache(x, args.steps, args.batch, lr, tmp)]
    for r in results:
        print(json.dumps({"benchmark": "sae_train", "model": args.model, "activations": list(x.shape),
                          "threads": torch.get_num_threads(), **r}))
    if "samples_per_s" in results[1]:
        print(json.dumps({"benchmark": "sae_train", "summary": True,
                          "speed_ratio_scopeforge_over_sparsify": round(results[0]["samples_per_s"]
                                                                        / results[1]["samples_per_s"], 3),
                          "speed_ratio_cache_over_sparsify": round(results[2]["samples_per_s"]
                                                                   / results[1]["samples_per_s"], 3),
                          "goal": ">= 1 at equal FVU"}))


if __name__ == "__main__":
    main()
