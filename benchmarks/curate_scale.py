"""The curate job at corpus scale: does the driver's memory stay flat and the rate steady as the corpus grows?

    python benchmarks/curate_scale.py                          # 10k, 50k and 200k documents, local disk and S3
    python benchmarks/curate_scale.py --sizes 2000 --storage local

Corpora are real text (the embedded news, newsgroup and Python sources, re-chunked at several window sizes and
offsets, every chunk with a fresh id), written as shards of 5,000 documents: Parquet on local disk, JSON Lines on moto's
S3 server (started here on 127.0.0.1; one dataset holds one format). Each (size, storage) runs the whole curate job on
tiny-llama in its own process, on its own local Ray instance, so peaks do not carry over. One JSON line each:

    docs, storage, wall_s, docs_per_s, tokens_per_s, driver_peak_rss_mb, object_store_peak_mb, output_files, pieces

``driver_peak_rss_mb`` is the job process's peak resident memory (getrusage); ``object_store_peak_mb`` the most
the object store held, sampled every 0.2 s from Ray's resource accounting. A summary line gives the goals: the
driver's peak RSS grows by less than 20% from the smallest to the largest corpus, and documents/s stays within 15%.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARD_DOCS = 5000


def corpus_rows(n: int) -> list[dict[str, str]]:
    """n documents of real text: the embedded sources chunked at several window sizes and offsets, fresh ids."""
    import random

    from shared.curation.corpus import chunk_documents, news, newsgroups, python_source

    rng = random.Random(0)
    docs = list(newsgroups(rng, None)) + list(news(rng, None)) + list(python_source(rng, None))
    rows: list[dict[str, str]] = []
    window = 0
    while len(rows) < n:
        words = (40, 55, 70, 85)[window % 4]
        chunks = chunk_documents(docs, chunk_words=words, min_words=20, per_doc=None)
        offset = window // 4
        rows += [{"id": f"w{window}-{i}", "text": c.text, "label": c.label}
                 for i, c in enumerate(chunks[offset:])][: n - len(rows)]
        window += 1
    return rows


def write_corpus(rows: list[dict[str, str]], uri: str, fmt: str) -> int:
    """Parquet or JSON Lines shards of SHARD_DOCS documents; returns the number of files."""
    import pyarrow as pa

    from shared.data import write_parquet
    from shared.storage import Storage

    store = Storage(uri)
    files = 0
    for i, start in enumerate(range(0, len(rows), SHARD_DOCS)):
        part = rows[start: start + SHARD_DOCS]
        if fmt == "parquet":
            write_parquet(pa.Table.from_pylist(part), store, f"part-{i:05d}.parquet")
        else:
            store.write_text("".join(json.dumps(r) + "\n" for r in part), f"part-{i:05d}.jsonl")
        files += 1
    return files


def config(corpus: str, output_root: str):
    from shared.config import validate_config
    from shared.configs.curate import CurateConfig

    return validate_config(CurateConfig, {
        "model": "tiny-llama", "corpus": corpus, "output_root": output_root, "max_tokens": 32,
        "target_label": "sci.space", "seeds": ["The shuttle launch put the satellite into a low orbit.",
                                               "NASA plans a probe to study the moons of Jupiter."],
        "coordinates": {"k": 16, "reference_docs": 4, "reference_tokens": 32},
        "sae": {"train_docs": 256, "steps": 100, "expansion": 4, "k": 4, "batch_size": 512},
        "retrieval": {"m": 1000},
        "runtime": {"num_actors": 2, "cpus_per_actor": 1.0, "piece_docs": 2048, "micro_batch": 16},
    }, "benchmark")


def one(corpus: str, output_root: str, docs: int, storage: str) -> dict:
    """The job in this process, with its peaks sampled (runs in a child process of main)."""
    import ray

    from ray_jobs.runtime import init_ray, run_job

    init_ray()
    total = ray.cluster_resources().get("object_store_memory", 0)
    peak = {"store": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            used = total - ray.available_resources().get("object_store_memory", total)
            peak["store"] = max(peak["store"], used)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    metrics = run_job(config(corpus, output_root))
    wall = time.perf_counter() - started
    stop.set()
    sampler.join()
    ray.shutdown()
    embed = metrics["timings"]["embed_s"]
    return {"benchmark": "curate_scale", "docs": docs, "storage": storage, "wall_s": round(wall, 1),
            "docs_per_s": round(docs / wall, 1), "tokens_per_s": round(metrics["corpus"]["tokens"] / wall, 1),
            "scoring_docs_per_s": round(docs / max(embed, 1e-9), 1),
            "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "object_store_peak_mb": round(peak["store"] / 2**20, 1),
            "output_files": metrics["scale"]["subset_files"], "pieces": metrics["scale"]["pieces"],
            "selection_passes": metrics["scale"]["selection_passes"], "timings": metrics["timings"]}


def s3_server(tmp: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    """moto's S3 server on 127.0.0.1 with a bucket (no authentication: a benchmark, not a test)."""
    import socket

    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1", aws_access_key_id="bench",
                 aws_secret_access_key="bench").create_bucket(Bucket="bench")
    return proc, env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,50000,200000")
    parser.add_argument("--storage", default="local,s3")
    parser.add_argument("--one", nargs=4, metavar=("CORPUS", "OUTPUT", "DOCS", "STORAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    if args.one:
        corpus, output, docs, storage = args.one
        print("RESULT " + json.dumps(one(corpus, output, int(docs), storage)), flush=True)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    storages = args.storage.split(",")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        server, env = s3_server(Path(tmp)) if "s3" in storages else (None, {})
        os.environ.update(env)
        try:
            for docs in sizes:
                rows = corpus_rows(docs)
                for storage in storages:
                    base = f"s3://bench/{docs}" if storage == "s3" else f"{tmp}/{docs}"
                    fmt = "jsonl" if storage == "s3" else "parquet"
                    files = write_corpus(rows, f"{base}/corpus", fmt)
                    out = subprocess.run([sys.executable, __file__, "--one", f"{base}/corpus", f"{base}/run",
                                          str(docs), storage], capture_output=True, text=True, env=os.environ)
                    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                    if line is None:
                        sys.exit(f"{docs} documents on {storage} failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
                    result = {**json.loads(line[len("RESULT "):]), "input_files": files, "format": fmt}
                    results.append(result)
                    print(json.dumps(result), flush=True)
        finally:
            if server is not None:
                server.terminate()
    for storage in storages:
        mine = [r for r in results if r["storage"] == storage]
        if len(mine) < 2:
            continue
        rss = [r["driver_peak_rss_mb"] for r in mine]
        rate = [r["docs_per_s"] for r in mine]
        print(json.dumps({"benchmark": "curate_scale", "summary": True, "storage": storage,
                          "rss_growth": round(rss[-1] / rss[0] - 1, 3), "goal_rss_growth": 0.2,
                          "docs_per_s_spread": round(max(rate) / min(rate) - 1, 3), "goal_docs_per_s_spread": 0.15}))


if __name__ == "__main__":
    main()
