"""The curate job end to end on tiny-llama with a Parquet corpus on the S3 endpoint, and its bad-input checks."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_jobs.runtime import run_job
from shared.config import validate_config
from shared.configs.curate import CurateConfig
from shared.curation.corpus import chunk_documents, news, newsgroups
from shared.data import write_parquet
from shared.errors import ConfigError, UserError
from shared.storage import Storage
from tests.conftest import committed, committed_path, marker

pytestmark = [pytest.mark.ray]

SMALL = {"model": "tiny-llama", "max_tokens": 48, "target_label": "sci.space",
         "coordinates": {"k": 16, "reference_docs": 4, "reference_tokens": 24},
         "sae": {"train_docs": 24, "steps": 40, "expansion": 4, "k": 4, "batch_size": 256},
         "retrieval": {"m": 12}, "runtime": {"piece_docs": 16}}


@pytest.fixture(scope="module")
def labelled_chunks():
    """Real text: sci.space and alt.atheism posts (headers stripped) and news articles, chunked."""
    rng = random.Random(0)
    docs = [d for d in newsgroups(rng, None)] + list(news(rng, None))[:40]
    chunks = chunk_documents(docs, chunk_words=60, min_words=20, per_doc=1)
    by_label = {}
    for c in chunks:
        by_label.setdefault(c.label, []).append(c)
    seeds = by_label["sci.space"][:3]
    pool = by_label["sci.space"][3:33] + by_label["alt.atheism"][:30] + by_label["news"][:30]
    return pool, seeds


def _corpus_table(pool, extra_rows=()):
    rows = [{"id": c.id, "text": c.text, "label": c.label} for c in pool] + list(extra_rows)
    return pa.Table.from_pylist(rows)


@pytest.mark.s3
def test_curate_end_to_end_on_s3(ray_session, s3_root, labelled_chunks):
    pool, seeds = labelled_chunks
    store = Storage(s3_root)
    extra = [{"id": "empty-1", "text": "", "label": "news"}, {"id": "blank-2", "text": "   \n", "label": "news"},
             {"id": "long-3", "text": "orbit " * 500, "label": "news"}]
    table = _corpus_table(pool, extra)
    for i in range(3):  # three shards
        write_parquet(table.slice(i * 31, 31), store, "corpus", f"part-{i}.parquet")
    store.write_text("".join(json.dumps({"id": s.id, "text": s.text}) + "\n" for s in seeds), "seeds.jsonl")
    cfg = validate_config(CurateConfig, {**SMALL, "corpus": f"{s3_root}/corpus", "seeds": f"{s3_root}/seeds.jsonl",
                                         "output_root": f"{s3_root}/run"}, "test")
    metrics = run_job(cfg)

    placement = metrics["placement"]
    assert placement["coordinate task"]["devices"] == {"cpu": 1}
    assert placement["embed actor"]["devices"] == {"cpu": 1}
    assert placement["sae task"]["devices"] == {"cpu": 1}
    corpus = metrics["corpus"]
    assert corpus["rows"] == corpus["scored"] == len(pool) + 3
    assert corpus["usable"] == len(pool) + 1
    assert corpus["skipped_empty"] == 2
    assert corpus["truncated"] >= 1
    assert corpus["target_documents"] == 30
    for method in ("sae", "sae_idf", "dense", "random", "ngram"):
        entry = metrics["retrieval"][method]
        assert entry["selected"] == 12
        assert entry["recall"] == pytest.approx(entry["hits"] / 30)
    assert metrics["sae"]["n_latents"] == 64
    assert metrics["sae"]["dead_fraction"] < 1.0
    assert metrics["throughput"]["tokens_per_s"] > 0

    stage = committed(f"{s3_root}/run/curate")
    subset = pq.read_table(io.BytesIO(stage.read_bytes("subset", "part-00000.parquet")))
    assert subset.column_names == ["id", "text", "score", "matched_seed", "label"]
    assert subset.num_rows == 12
    order = {row["id"]: i for i, row in enumerate(table.to_pylist())}
    positions = [order[i] for i in subset.column("id").to_pylist()]
    assert positions == sorted(positions)  # corpus order
    assert min(subset.column("score").to_pylist()) == pytest.approx(metrics["retrieval"]["sae"]["lowest_score"])
    assert metrics["scale"]["pieces"] >= 4
    assert metrics["scale"]["resumed_pieces"] == 0
    assert metrics["scale"]["rescored_documents"] == len(pool) + 3
    assert set(subset.column("matched_seed").to_pylist()) <= {s.id for s in seeds}
    assert stage.exists("sae", "sae.safetensors")
    assert "n_latents: 64" in stage.read_text("sae", "config.yaml")
    assert stage.exists("sae", "latent_idf.safetensors")
    # the saved curation model scores a selected document again to its stored score
    from shared.curation.model import CurationModel
    from shared.curation.scoring import DocumentScorer, DocumentTokenizer

    scorer = DocumentScorer(CurationModel.load(stage), micro_batch=cfg.runtime.micro_batch, dtype=cfg.dtype)
    scorer.setup()
    first = subset.sort_by([("score", "descending")]).slice(0, 2).to_pydict()
    tokenized = DocumentTokenizer("tiny-llama", "text", SMALL["max_tokens"], 0, np.zeros(16))(
        {"id": np.array(first["id"], dtype=object), "text": np.array(first["text"], dtype=object)})
    assert scorer(tokenized)["sae_score"] == pytest.approx(first["score"], abs=2e-3)  # bf16, other padding
    coordinates = stage.read_json("coordinates.json")
    assert len(coordinates["indices"]) == 16
    assert coordinates["layer"] == 4
    assert "SAE score histogram" in stage.read_text("report.html")
    assert Storage(metrics["scale"]["scores"]).find(suffix=".parquet")
    assert marker(f"{s3_root}/run/curate")["outputs"]["dataset"] == "subset"
    assert run_job(cfg) == json.loads(json.dumps(metrics))  # rerun: skipped


def test_bad_inputs_fail_before_model_work(ray_session, tmp_path, labelled_chunks):
    pool, seeds = labelled_chunks
    store = Storage(str(tmp_path))
    write_parquet(_corpus_table(pool[:5]), store, "small", "part-0.parquet")
    write_parquet(pa.table({"body": ["x"]}), store, "notext", "part-0.parquet")
    write_parquet(pa.table({"text": pa.array([], pa.string())}), store, "empty", "part-0.parquet")
    (tmp_path / "blank-seeds.jsonl").write_text('{"text": "  "}\n')
    base = {**SMALL, "output_root": str(tmp_path / "run"), "seeds": [seeds[0].text]}

    def fails(message, **changes):
        cfg = validate_config(CurateConfig, {**base, **changes}, "test")
        with pytest.raises(UserError, match=message):
            run_job(cfg)

    fails(r"corpus .*empty: no documents", corpus=str(tmp_path / "empty"))
    fails(r"no 'text' column \(columns: body\)", corpus=str(tmp_path / "notext"))
    fails(r"retrieval.m=12 is larger than the corpus \(5 documents\)", corpus=str(tmp_path / "small"))
    fails(r"layer=9 is out of range: tiny-llama has layers 0..5", corpus=str(tmp_path / "small"), layer=9,
          retrieval={"m": 2})
    fails(r"no non-empty 'text' values", corpus=str(tmp_path / "small"), seeds=str(tmp_path / "blank-seeds.jsonl"),
          retrieval={"m": 2})
    fails(r"dataset .*absent: not found", corpus=str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="at least one non-empty seed"):
        validate_config(CurateConfig, {**base, "corpus": "x", "seeds": [" "]}, "test")
    with pytest.raises(ConfigError, match="set m, threshold, or both"):
        validate_config(CurateConfig, {**base, "corpus": "x", "retrieval": {"m": None}}, "test")
    assert not (tmp_path / "run" / "curate" / "_SUCCESS").exists()


TOPICS = {
    "space": "orbit rocket launch satellite shuttle astronaut lunar mars telescope payload booster capsule".split(),
    "kitchen": "recipe butter flour oven simmer garlic onion pepper sauce baking dough skillet".split(),
    "football": "goal striker midfield referee penalty keeper league match corner tackle stadium coach".split(),
}


def _topic_docs(topic: str, n: int, rng: random.Random) -> list[str]:
    words = TOPICS[topic]
    return [" ".join(rng.choice(words) for _ in range(30)) for _ in range(n)]


@pytest.mark.slow
def test_curate_per_seed_threshold_on_jsonl_without_ids_selects_the_seeds_topic(ray_session, tmp_path):
    """A separable pool (three topics with disjoint vocabularies): even tiny-llama's random weights keep the token
    identities apart, so selection in SAE code space must beat random selection by far."""
    rng = random.Random(0)
    pool = [(t, topic) for topic in TOPICS for t in _topic_docs(topic, 30, rng)]
    rng.shuffle(pool)
    lines = [json.dumps({"text": text, "label": topic}) for text, topic in pool]
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    cfg = validate_config(CurateConfig, {**SMALL, "corpus": str(tmp_path / "corpus.jsonl"), "target_label": "space",
                                         "seeds": _topic_docs("space", 3, rng), "output_root": str(tmp_path / "run"),
                                         "retrieval": {"m": 4, "mode": "per_seed", "threshold": 0.0,
                                                       "scoring": "sae_idf"},
                                         "baselines": ["random", "ngram", "dense"]}, "test")
    metrics = run_job(cfg)
    retrieval = metrics["retrieval"]
    union = retrieval["sae_idf"]["selected"]
    assert 4 <= union <= 12  # three seeds x 4, united
    assert retrieval["random"]["selected"] == union == retrieval["ngram"]["selected"]
    purity = {method: entry["purity"] for method, entry in retrieval.items()}
    # measured: ngram 1.00, dense 0.75, sae_idf 0.67, random 0.25 (the topics share no word, which n-grams see best)
    assert purity["sae_idf"] > purity["random"] + 0.25, purity
    assert purity["dense"] > purity["random"] + 0.25, purity
    assert purity["ngram"] >= 0.9, purity
    subset = pq.read_table(committed_path(tmp_path / "run" / "curate") / "subset" / "part-00000.parquet")
    assert all(i.startswith("doc-") for i in subset.column("id").to_pylist())
