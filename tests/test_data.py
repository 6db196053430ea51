from __future__ import annotations

import json

import pyarrow as pa
import pytest

from shared.data import read_table, resolve_dataset, write_parquet
from shared.errors import DataError, StorageError
from shared.models import resolve_model
from shared.stage import Stage
from shared.storage import Storage


def test_parquet_folder_jsonl_file_and_json_array(tmp_path):
    store = Storage(str(tmp_path))
    write_parquet(pa.table({"text": ["a", "b"], "label": ["x", "y"]}), store, "pq", "part-0.parquet")
    write_parquet(pa.table({"text": ["c"], "label": ["z"]}), store, "pq", "part-1.parquet")
    assert read_table(str(tmp_path / "pq"), required=("text",)).column("text").to_pylist() == ["a", "b", "c"]
    (tmp_path / "seeds.jsonl").write_text('{"text": "s1"}\n{"text": "s2"}\n')
    assert read_table(str(tmp_path / "seeds.jsonl")).num_rows == 2
    (tmp_path / "arr.json").write_text(json.dumps([{"text": "a"}, {"text": "b"}, {"text": "c"}]))
    assert read_table(str(tmp_path / "arr.json")).num_rows == 3


def test_dataset_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        resolve_dataset(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .parquet, .jsonl or .json files"):
        resolve_dataset(str(tmp_path / "empty"))
    (tmp_path / "d.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match="no 'text' column \\(columns: body\\)"):
        read_table(str(tmp_path / "d.jsonl"), required=("text",))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match="bad.jsonl: line 2 is not a JSON object"):
        read_table(str(tmp_path / "bad.jsonl"))
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "ok"}\n{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="latin1.jsonl: line 2 is not UTF-8"):
        read_table(str(tmp_path / "latin1.jsonl"))
    good = pa.table({"text": ["a"] * 50})
    write_parquet(good, Storage(str(tmp_path)), "cut.parquet")
    (tmp_path / "cut.parquet").write_bytes((tmp_path / "cut.parquet").read_bytes()[:-20])  # a truncated footer
    with pytest.raises(DataError, match="cut.parquet: cannot parse as parquet") as err:
        read_table(str(tmp_path / "cut.parquet"))
    assert "\n" not in str(err.value)


def test_hf_save_to_disk(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["x", "y"], "id": [1, 2]}).save_to_disk(str(tmp_path / "hf"))
    assert resolve_dataset(str(tmp_path / "hf")).format == "hf_disk"
    assert read_table(str(tmp_path / "hf")).column("text").to_pylist() == ["x", "y"]


def test_stage_outputs_hand_over_dataset_and_model(tmp_path, tiny_llama_dir):
    root = Storage(str(tmp_path))
    stage = Stage.open(root, "curate", "curate", "h")
    stage.begin("")
    write_parquet(pa.table({"text": ["t"]}), stage.store, "subset", "part-0.parquet")
    stage.store.upload(tiny_llama_dir, "model")
    # before the marker the stage is refused, never read as plain data
    with pytest.raises(StorageError, match="not complete"):
        read_table(stage.uri)
    stage.outputs.update(dataset="subset", model="model")
    stage.commit({})
    assert read_table(stage.uri).column("text").to_pylist() == ["t"]
    assert resolve_model(stage.uri) == stage.store.path("model")
    assert resolve_model(f"{stage.uri}/model") == stage.store.path("model")  # a path inside the stage works too
    other = Stage.open(root, "other", "inspect-model", "h")
    other.begin("")
    other.commit({})
    with pytest.raises(StorageError, match="has no 'dataset' output"):
        read_table(other.uri)
