"""curate on real multi-node Ray clusters on this machine (one raylet per node, everything on loopback), reading
many shards from moto's S3 server:

- ``ray.cluster_utils.Cluster``, a head with no CPUs and two nodes: the scoring actors run on both nodes, and the
  output equals a run of the same config on this session's one-node instance;
- ``AutoscalingCluster`` (Ray's fake multi-node provider) with no worker node at the start: the autoscaler adds
  nodes for the job's tasks and actor pools, and removes them after the idle timeout.

Each cluster runs in a child process (``tests/multinode.py``): it needs its own driver, and this session's driver is
connected to the session's local instance.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from shared.curation.corpus import chunk_documents, news, newsgroups
from shared.data import read_table, write_parquet
from shared.stage import stage_metrics
from shared.storage import Storage
from tests.conftest import ROOT

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.slow]

SETTINGS = {"model": "tiny-llama", "max_tokens": 48, "target_label": "sci.space", "dtype": "float32",
            "coordinates": {"k": 16, "reference_docs": 4, "reference_tokens": 24},
            "sae": {"train_docs": 32, "steps": 30, "expansion": 4, "k": 4, "batch_size": 256},
            "retrieval": {"m": 10}, "baselines": ["random", "ngram"]}


@pytest.fixture(scope="module")
def rows():
    rng = random.Random(3)
    chunks = chunk_documents(list(newsgroups(rng, None)) + list(news(rng, None))[:40], 60, 20, per_doc=1)
    by_label: dict[str, list] = {}
    for c in chunks:
        by_label.setdefault(c.label, []).append(c)
    picked = by_label["sci.space"][:25] + by_label["alt.atheism"][:25] + by_label["news"][:30]
    return [{"id": c.id, "text": c.text, "label": c.label} for c in picked]


def _child(scenario: str, tmp_path, config: dict, timeout: float = 600) -> dict:
    (tmp_path / "config.json").write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-m", "tests.multinode", scenario, str(tmp_path),
                          str(tmp_path / "config.json")], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                         env=env)
    (tmp_path / f"{scenario}.log").write_text(out.stdout + out.stderr)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert out.returncode == 0, f"{scenario} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    assert line, f"{scenario} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return json.loads(line[len("RESULT "):])


def test_two_nodes_score_in_parallel_and_match_one_node(ray_session, s3_root, tmp_path, rows):
    import pyarrow as pa

    from ray_jobs.runtime import run_job
    from shared.config import validate_config
    from shared.configs.curate import CurateConfig

    store = Storage(s3_root)
    for i in range(0, len(rows), 10):  # eight Parquet shards
        write_parquet(pa.Table.from_pylist(rows[i: i + 10]), store, "corpus", f"part-{i // 10:03d}.parquet")
    config = {**SETTINGS, "corpus": f"{s3_root}/corpus", "seeds": [rows[0]["text"], rows[1]["text"]],
              "runtime": {"num_actors": 2, "cpus_per_actor": 1.5, "threads": 1, "piece_docs": 10}}
    result = _child("two-node", tmp_path, config)
    two = result["metrics"]
    assert len(two["placement"]["embed actor"]["nodes"]) == 2  # one scoring actor per node
    assert result["worker_nodes"] == 2
    assert result["non_loopback"] == []
    # the same config on this session's one-node instance
    one = run_job(validate_config(CurateConfig, {**config, "output_root": str(tmp_path / "one")}, "test"))
    assert len(one["placement"]["embed actor"]["nodes"]) == 1
    assert two["scale"]["pieces"] == one["scale"]["pieces"] == 8
    assert two["retrieval"] == one["retrieval"]
    assert two["sae"]["fvu"] == one["sae"]["fvu"]
    assert read_table(str(tmp_path / "two" / "curate")).equals(read_table(str(tmp_path / "one" / "curate")))


def test_an_autoscaling_cluster_grows_for_curation_and_shrinks_after(s3_root, tmp_path, rows):
    store = Storage(s3_root)
    for i in range(0, len(rows), 8):  # ten JSON Lines shards
        store.write_text("".join(json.dumps(r) + "\n" for r in rows[i: i + 8]), "corpus", f"part-{i // 8:03d}.jsonl")
    config = {**SETTINGS, "corpus": f"{s3_root}/corpus", "seeds": [rows[0]["text"]],
              "runtime": {"num_actors": 1, "max_actors": 2, "cpus_per_actor": 1.5, "piece_docs": 10}}
    result = _child("autoscale", tmp_path, config)
    counts = [n for _, n in result["trajectory"]]
    assert result["at_start"] == 0
    assert counts[0] == 0
    assert max(counts) >= 1  # the autoscaler added worker nodes for the job
    assert counts[-1] == 0  # and removed them after the idle timeout
    assert max(counts) <= 2
    metrics = stage_metrics(str(tmp_path / "run" / "curate"))
    assert metrics["corpus"]["rows"] == len(rows)
    assert metrics["retrieval"]["sae"]["selected"] == 10
    assert read_table(str(tmp_path / "run" / "curate")).num_rows == 10
    assert result["non_loopback"] == []
