"""Curation's per-batch steps and its saved model, called directly (no Ray): what the job maps over the corpus."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.config import load_config
from shared.configs.curate import CurateConfig
from shared.curation.documents import content_ids
from shared.curation.features import KINDS
from shared.curation.fit import fit_curation, settings_from
from shared.curation.model import CurationModel
from shared.curation.scoring import DocumentScorer, DocumentTokenizer
from shared.curation.seeds import load_seeds
from shared.errors import DataError
from shared.models import load_causal_lm
from shared.storage import Storage

SPACE = ["the rocket engine burns fuel to lift the launch vehicle into orbit",
         "astronauts on the space station watch the moon rise over the earth",
         "the orbit of a satellite decays as it meets the thin upper atmosphere"]
COOKING = ["whisk the eggs with sugar and fold in the flour for a light sponge cake",
           "simmer the tomato sauce with garlic and basil before adding the pasta",
           "knead the bread dough until it is smooth and leave it to rise overnight"]


@pytest.fixture(scope="module")
def fitted(tiny_llama_dir):
    cfg = load_config(CurateConfig, None, ["model=tiny-llama", "corpus=unused", "max_tokens=32", "coordinates.k=8",
                                           "coordinates.reference_docs=2", "sae.train_docs=6", "sae.steps=20",
                                           "sae.expansion=2", "sae.k=4", "dtype=float32", f"seeds=[{SPACE[0]}]"])
    model, tokenizer = load_causal_lm("tiny-llama")
    settings = settings_from(cfg)
    fit = fit_curation(model, tokenizer, (SPACE + COOKING) * 2, [SPACE[0], COOKING[0]], settings,
                       torch.Generator().manual_seed(0), log=lambda line: None)
    return cfg, CurationModel.from_fit(fit, "tiny-llama", settings, ["space", "cooking"])


def _batch(texts: list) -> dict[str, np.ndarray]:
    return {"id": np.array([f"d{i}" for i in range(len(texts))], dtype=object), "text": np.array(texts, dtype=object)}


def test_the_tokenizer_step_marks_unusable_rows_and_keys_do_not_depend_on_the_batch(fitted):
    cfg, _ = fitted
    step = DocumentTokenizer("tiny-llama", "text", max_tokens=8, seed=3, ngram_weights=np.linspace(-1, 1, 16))
    step.setup()
    texts = [SPACE[0], "  ", b"caf\xe9", 7, "caf\u00e9".encode(), COOKING[1]]
    out = step(_batch(texts))
    assert out["status"].tolist() == ["ok", "empty", "not_text", "not_text", "ok", "ok"]
    assert out["n_tokens"].tolist()[:4] == [8, 0, 0, 0]
    assert out["truncated"].tolist() == [True, False, False, False, False, True]
    assert np.frombuffer(out["input_ids"][0], dtype=np.int32).shape == (8,)
    assert out["text"][4] == "caf\u00e9"
    # the same documents in another batch get the same random and DSIR keys
    again = step({"id": np.array(["d5", "d0"], dtype=object), "text": np.array([COOKING[1], SPACE[0]], dtype=object)})
    assert again["random_key"].tolist() == [out["random_key"][5], out["random_key"][0]]
    assert again["ngram_key"].tolist() == [out["ngram_key"][5], out["ngram_key"][0]]
    ids = content_ids({"text": np.array([SPACE[0], SPACE[0], COOKING[0]], dtype=object)}, "text")["id"]
    assert ids[0] == ids[1] != ids[2]


def test_the_scorer_matches_each_seed_to_its_domain_and_a_saved_model_scores_the_same(fitted, tmp_path):
    cfg, curation = fitted
    tokenize = DocumentTokenizer("tiny-llama", "text", max_tokens=32, seed=0, ngram_weights=np.zeros(16))
    batch = tokenize(_batch([SPACE[0], COOKING[0], "", *SPACE[1:], *COOKING[1:]]))
    scorer = DocumentScorer(curation, micro_batch=2)
    scorer.setup()
    scored = scorer(batch)
    assert "input_ids" not in scored
    for kind in KINDS:
        # a seed text is its own nearest seed, at cosine 1
        assert scored[f"{kind}_seed"][:2].tolist() == [0, 1]
        assert scored[f"{kind}_score"][:2] == pytest.approx([1.0, 1.0], abs=1e-4)
        assert np.isnan(scored[f"{kind}_score"][2])
        assert scored[f"{kind}_seed"][2] == -1
        assert scored[f"{kind}_seed_scores"].shape == (7, 2)

    curation.save(Storage(str(tmp_path)))
    loaded = CurationModel.load(Storage(str(tmp_path)))
    assert (loaded.layer, loaded.seed_ids, loaded.coords.tolist()) == (curation.layer, ["space", "cooking"],
                                                                       curation.coords.tolist())
    again = DocumentScorer(loaded, micro_batch=3)  # another micro-batching: the same vectors
    again.setup()
    rescored = again(batch)
    for kind in KINDS:
        np.testing.assert_allclose(rescored[f"{kind}_seed_scores"], scored[f"{kind}_seed_scores"], atol=1e-5)


def test_a_folder_without_a_curation_model_is_a_one_line_error(tmp_path):
    with pytest.raises(DataError, match=r"curation model .*: sae/config.yaml, .* missing"):
        CurationModel.load(Storage(str(tmp_path)))


def test_seeds_from_a_dataset_keep_their_ids_and_skip_empty_texts(tmp_path):
    (tmp_path / "seeds.jsonl").write_text('{"id": "a", "text": "orbit"}\n{"id": "b", "text": " "}\n'
                                          '{"id": "c", "text": "launch"}\n')
    assert load_seeds(str(tmp_path / "seeds.jsonl"), "text", "id") == (["orbit", "launch"], ["a", "c"])
    assert load_seeds(["orbit", "", "moon"], "text", "id") == (["orbit", "moon"], ["seed-0", "seed-1"])
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(DataError, match="no non-empty 'text' values"):
        load_seeds(str(tmp_path / "empty.jsonl"), "text", "id")
