"""Bad input through Ray Data, as a user meets it from the CLI: one line naming the file (and the line or id where
known) and exit status 2, never a traceback, never an output that looks complete."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from ray_jobs.runtime import run_job
from shared.config import load_config
from shared.configs.curate import CurateConfig
from shared.configs.distill import DistillConfig
from shared.curation.features import tokenize
from shared.data import write_parquet
from shared.errors import UserError
from shared.models import load_tokenizer
from shared.storage import Storage
from shared.tokens import CHARS_PER_TOKEN, cap_text
from tests.conftest import run_cli

WORDS = "the orbit of the moon and the launch of a rocket into space with a crew of three and a dog".split()
SMALL = ["--set", "model=tiny-llama", "--set", "max_tokens=32", "--set", "coordinates.k=8", "--set",
         "coordinates.reference_docs=2", "--set", "sae.train_docs=8", "--set", "sae.steps=5", "--set",
         "sae.expansion=2", "--set", "sae.k=2", "--set", "baselines=[random]", "--set", "seeds=[the orbit of the moon]"]


def _texts(n: int) -> list[str]:
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(25)) for i in range(n)]


def _one_line(result, *expected: str) -> str:
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-3000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("scopeforge: error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert all(e in errors[0] for e in expected), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return errors[0]


@pytest.fixture()
def env(ray_session) -> dict[str, str]:
    return {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}


@pytest.mark.ray
def test_a_truncated_parquet_shard_names_the_file(tmp_path, env, tiny_llama_dir):
    store = Storage(str(tmp_path))
    write_parquet(pa.table({"id": ["a", "b"], "text": _texts(2)}), store, "corpus", "part-0.parquet")
    write_parquet(pa.table({"id": ["c", "d"], "text": _texts(2)}), store, "corpus", "part-1.parquet")
    good = (tmp_path / "corpus" / "part-1.parquet").read_bytes()
    (tmp_path / "corpus" / "part-1.parquet").write_bytes(good[: len(good) // 2])  # an upload cut short
    result = run_cli("run", "curate", *SMALL, "--set", f"corpus={tmp_path / 'corpus'}", "--set",
                     f"output_root={tmp_path / 'run'}", "--set", "retrieval.m=1", env=env)
    _one_line(result, f"dataset file {tmp_path / 'corpus' / 'part-1.parquet'}: cannot parse as parquet")
    assert not (tmp_path / "run" / "curate" / "_SUCCESS").exists()


@pytest.mark.ray
def test_jsonl_that_is_not_utf8_names_the_file_and_line_from_a_ray_task(tmp_path, env, tiny_llama_dir):
    lines = [json.dumps({"id": f"d{i}", "text": t}).encode() for i, t in enumerate(_texts(5))]
    lines[3] = '{"id": "d3", "text": "caf\u00e9 au lait"}'.encode("latin-1")
    (tmp_path / "corpus.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    result = run_cli("run", "curate", *SMALL, "--set", f"corpus={tmp_path / 'corpus.jsonl'}", "--set",
                     f"output_root={tmp_path / 'run'}", "--set", "retrieval.m=1", env=env)
    _one_line(result, f"dataset file {tmp_path / 'corpus.jsonl'}: line 4 is not UTF-8 text")


@pytest.mark.ray
def test_repeated_ids_and_an_empty_selection_are_one_line_errors(ray_session, tmp_path, tiny_llama_dir):
    texts = _texts(20)
    rows = [{"id": f"d{i}", "text": t} for i, t in enumerate(texts)] + [{"id": "d3", "text": texts[3]}]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [o for o in SMALL if o != "--set"] + [f"corpus={tmp_path / 'corpus.jsonl'}",
                                                      f"output_root={tmp_path / 'run'}", f"seeds=[{texts[3]}]"]
    # in this process (the CLI prints the same UserError as one line: tests above and tests/test_cli.py)
    with pytest.raises(UserError, match="id 'd3' is on 2 rows .* ids must be unique"):
        run_job(load_config(CurateConfig, None, [*overrides, "retrieval.m=4"]))
    with pytest.raises(UserError, match=r"retrieval.threshold=1.5 selects no document .* \(the highest sae score is"):
        run_job(load_config(CurateConfig, None, [*overrides, "retrieval.m=null", "retrieval.threshold=1.5"]))
    assert not (tmp_path / "run" / "curate" / "_SUCCESS").exists()

    # distill: two rows with one id would share one teacher rewrite; refused before the teacher loads
    curated = [{"id": "x", "text": texts[0]}, {"id": "y", "text": texts[1]}, {"id": "x", "text": texts[2]}]
    (tmp_path / "curated.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curated))
    with pytest.raises(UserError, match=f"data {tmp_path / 'curated.jsonl'}: id 'x' is on rows 0 and 2; ids must "
                                        "be unique"):
        run_job(load_config(DistillConfig, None, [f"data={tmp_path / 'curated.jsonl'}", "student=tiny-llama",
                                                  "teacher=tiny-llama", f"output_root={tmp_path / 'run'}"]))


def test_a_huge_document_reaches_the_tokenizer_cut_to_a_bound(tiny_llama_dir):
    """A fast tokenizer pre-tokenizes the whole string before it truncates: the text is cut first."""
    tokenizer = load_tokenizer("tiny-llama")
    seen: list[int] = []

    class Recording:  # the real tokenizer, recording how much text it was handed
        def __call__(self, texts, **kwargs):
            seen.extend(len(t) for t in texts)
            return tokenizer(texts, **kwargs)

    huge = "orbit " * 2_000_000  # 12 MB
    out = tokenize(Recording(), [huge, "a short one"], max_tokens=48)
    assert max(seen) == 48 * CHARS_PER_TOKEN
    assert out.truncated == [True, False]
    assert len(out.ids[0]) == 48
    assert cap_text("x" * 10, 1) == ("x" * 10, False)
    assert cap_text("ab" * 100, 2, keep="tail") == (("ab" * 100)[-2 * CHARS_PER_TOKEN:], True)
