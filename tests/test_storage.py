from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import SecretStr

from shared.config import StorageConfig
from shared.errors import StorageError
from shared.storage import Storage, split_uri


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
    bad = StorageConfig(access_key_id=SecretStr(s3_server.access_key_id),
                        secret_access_key=SecretStr("not-the-secret-42"))
    with pytest.raises(StorageError) as err:
        Storage(s3_root, bad).check_writable()
    message = str(err.value)
    assert message.startswith(f"{s3_root}: cannot write there")
    assert "\n" not in message
    assert "not-the-secret-42" not in message
    assert "denied" in message or "Signature" in message
    with pytest.raises(StorageError, match="no-such-bucket-xyz"):
        Storage("s3://no-such-bucket-xyz/run").check_writable()


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_create_exclusive_writes_once(tmp_path, kind):
    store = Storage(str(tmp_path / "r") if kind == "local" else f"memory://{tmp_path.name}/r")
    assert store.create_exclusive(b"first", "m", "_SUCCESS") is True
    assert store.create_exclusive(b"second", "m", "_SUCCESS") is False
    assert store.read_bytes("m", "_SUCCESS") == b"first"
    assert [n for n in store.list("m")] == ["_SUCCESS"]  # no temporary file left behind


@pytest.mark.s3
def test_create_exclusive_on_s3_uses_a_conditional_put(s3_root):
    store = Storage(s3_root)
    assert store.create_exclusive(b"first", "_SUCCESS") is True
    assert store.create_exclusive(b"second", "_SUCCESS") is False
    assert store.read_bytes("_SUCCESS") == b"first"


def test_files_another_process_writes_on_s3_are_seen_after_a_listing(s3_server, s3_root):
    """Stage folders are written by Ray workers and concurrent attempts: a folder listed here, then written to by
    another client, lists and reports the new file (no stale listing cache)."""
    import boto3

    store = Storage(s3_root)
    store.write_text("a", "run", "first.txt")
    assert store.list("run") == ["first.txt"]
    assert not store.exists("run", "_SUCCESS")
    bucket, _, prefix = s3_root.removeprefix("s3://").partition("/")
    other = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1",
                         aws_access_key_id=s3_server.access_key_id,
                         aws_secret_access_key=s3_server.secret_access_key)
    other.put_object(Bucket=bucket, Key=f"{prefix}/run/_SUCCESS", Body=b"{}")
    other.put_object(Bucket=bucket, Key=f"{prefix}/run/checkpoints/c1/state.pt", Body=b"x")
    assert store.exists("run", "_SUCCESS")
    assert store.list("run") == ["_SUCCESS", "checkpoints", "first.txt"]
    assert store.list("run", "checkpoints") == ["c1"]


def test_a_folder_marker_object_is_not_listed_as_its_own_child(s3_server, s3_root):
    """Object stores may hold a zero-byte '<folder>/' marker (pyarrow and some clients write them when a folder is
    created): listing the folder gives its children only (a marker listed as a child once made a train-detector
    test pick 'checkpoints' as its own config folder)."""
    import boto3

    store = Storage(s3_root)
    bucket, _, prefix = s3_root.removeprefix("s3://").partition("/")
    other = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1",
                         aws_access_key_id=s3_server.access_key_id,
                         aws_secret_access_key=s3_server.secret_access_key)
    other.put_object(Bucket=bucket, Key=f"{prefix}/stage/checkpoints/", Body=b"")
    other.put_object(Bucket=bucket, Key=f"{prefix}/stage/checkpoints/f2df/run/state.pt", Body=b"x")
    assert store.list("stage", "checkpoints") == ["f2df"]
    assert store.list("stage") == ["checkpoints"]
