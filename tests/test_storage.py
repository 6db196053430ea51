from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import SecretStr

from shared.config import StorageConfig
from shared.errors import StorageError
from shared.storage import MARKER, Stage, Storage, completed_stage, split_uri


def test_split_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert split_uri("runs/x") == ("file", str(tmp_path / "runs/x"))
    assert split_uri("file:///a/b") == ("file", "/a/b")
    assert split_uri("s3://bucket/a/b/") == ("s3", "bucket/a/b")
    assert split_uri("memory://t/x") == ("memory", "/t/x")
    with pytest.raises(StorageError, match="unsupported storage scheme 'gs://'"):
        split_uri("gs://bucket/x")
    with pytest.raises(StorageError, match="needs a bucket"):
        split_uri("s3://")


@pytest.mark.parametrize("kind", ["local", "file", "memory"])
def test_round_trip_local_kinds(tmp_path, kind):
    root = {"local": str(tmp_path / "r"), "file": f"file://{tmp_path}/r", "memory": f"memory://{tmp_path.name}/r"}[kind]
    store = Storage(root)
    store.write_json({"a": 1}, "stage", "metrics.json")
    store.write_text("hello", "stage", "sub", "note.txt")
    assert store.read_json("stage", "metrics.json") == {"a": 1}
    assert store.list("stage") == ["metrics.json", "sub"]
    assert [u.rsplit("/", 1)[-1] for u in store.find("stage")] == ["metrics.json", "note.txt"]
    store.rm("stage", "sub")
    assert not store.exists("stage", "sub", "note.txt")
    store.rm("never", "there")  # removing what is absent is a no-op


def test_local_root_under_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StorageError, match="afile/root"):
        Storage(str(tmp_path / "afile" / "root")).check_writable()


@pytest.mark.s3
def test_s3_round_trip_through_s3fs_and_pyarrow(s3_root):
    store = Storage(s3_root)
    store.check_writable()
    table = pa.table({"id": [1, 2, 3], "text": ["a", "b", "c"]})
    fs, path = store.pyarrow_filesystem("data", "part-0.parquet")
    pq.write_table(table, path, filesystem=fs)
    # written by pyarrow's native S3 client, read back by s3fs, and the other way round
    import io

    assert pq.read_table(io.BytesIO(store.read_bytes("data", "part-0.parquet"))).equals(table)
    store.write_json({"ok": True}, "meta.json")
    with fs.open_input_stream(store.pyarrow_filesystem("meta.json")[1]) as f:
        assert b'"ok": true' in f.read()
    assert store.find("data") == [f"{s3_root}/data/part-0.parquet"]


@pytest.mark.s3
def test_s3_wrong_credentials_and_missing_bucket_are_one_line_errors(s3_server, s3_root):
    bad = StorageConfig(access_key_id=SecretStr(s3_server.access_key_id), secret_access_key=SecretStr("not-the-secret-42"))
    with pytest.raises(StorageError) as err:
        Storage(s3_root, bad).check_writable()
    message = str(err.value)
    assert message.startswith(f"{s3_root}: cannot write there") and "\n" not in message
    assert "not-the-secret-42" not in message
    assert "denied" in message or "Signature" in message
    with pytest.raises(StorageError, match="no-such-bucket-xyz"):
        Storage("s3://no-such-bucket-xyz/run").check_writable()


def _stage(root: Storage, config_hash: str) -> Stage:
    return Stage.open(root, "curate", "curate", config_hash)


def test_marker_semantics_skip_rerun_and_crash(tmp_path):
    root = Storage(str(tmp_path / "run"))
    stage = _stage(root, "h1")
    assert stage.status() == "absent"
    assert stage.begin("a: 1\n") is False
    stage.store.write_text("partial", "out.txt")
    # a crash here: no marker, so the stage is not done, and downstream refuses it
    assert stage.status() == "incomplete"
    with pytest.raises(StorageError, match="not complete"):
        completed_stage(stage.uri)
    # rerun with the same config keeps earlier work (checkpoints) ...
    assert _stage(root, "h1").begin("a: 1\n") is True
    assert stage.store.exists("out.txt")
    stage.commit({"loss": 0.5}, started_at=0.0)
    assert stage.status() == "done"
    store, h = completed_stage(stage.uri)
    assert h == "h1" and store.read_json("metrics.json") == {"loss": 0.5}
    # ... a different config sees a stale stage and starts from an empty folder
    other = _stage(root, "h2")
    assert other.status() == "stale"
    assert other.begin("a: 2\n") is False
    assert not other.store.exists("out.txt") and not other.store.exists(MARKER)
    assert other.store.read_text("config.yaml") == "a: 2\n"


def test_corrupt_marker_is_stale_not_done(tmp_path):
    root = Storage(str(tmp_path / "run"))
    stage = _stage(root, "h1")
    stage.begin("")
    stage.store.write_text("{not json", MARKER)
    assert stage.status() == "stale"


def test_stage_name_must_be_plain(tmp_path):
    with pytest.raises(StorageError, match="plain folder name"):
        Stage.open(Storage(str(tmp_path)), "a/b", "x", "h")


def test_a_declared_output_that_was_not_written_blocks_the_commit(tmp_path):
    stage = _stage(Storage(str(tmp_path / "run")), "h1")
    stage.begin("")
    stage.outputs["model"] = "model"
    with pytest.raises(StorageError, match="'model' output .* was not written"):
        stage.commit({}, started_at=0.0)
    assert stage.status() == "incomplete"
    stage.store.write_text("{}", "model", "config.json")
    stage.commit({}, started_at=0.0)
    assert stage.status() == "done"
