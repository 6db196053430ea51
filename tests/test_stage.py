"""The stage commit protocol (shared/stage.py): attempts, the lease, the marker's file list, readers that ignore
everything else. Local disk, memory:// and moto's S3 server behave the same."""

from __future__ import annotations

import threading

import pyarrow as pa
import pytest

from shared.data import read_table, resolve_dataset, write_parquet
from shared.errors import DataError, StorageError
from shared.stage import ATTEMPTS, MARKER, CommittedFile, LeaseLost, Stage, completed_stage, locate, stage_metrics
from shared.storage import Storage


def _root(kind: str, tmp_path, request) -> Storage:
    if kind == "local":
        return Storage(str(tmp_path / "run"))
    if kind == "memory":
        return Storage(f"memory://{tmp_path.name}/run")
    return Storage(request.getfixturevalue("s3_root"))


KINDS = ["local", "memory", pytest.param("s3", marks=pytest.mark.s3)]


def _stage(root: Storage, config_hash: str = "h1") -> Stage:
    return Stage.open(root, "curate", "curate", config_hash)


@pytest.mark.parametrize("kind", KINDS)
def test_an_attempt_writes_in_its_own_folder_and_the_marker_lists_its_files(kind, tmp_path, request):
    root = _root(kind, tmp_path, request)
    stage = _stage(root)
    assert stage.status() == "absent"
    attempt = stage.begin("a: 1\n")
    assert stage.status() == "incomplete"
    assert stage.store.uri() == root.uri("curate", ATTEMPTS, attempt)
    write_parquet(pa.table({"id": ["a", "b", "c"]}), stage.store, "subset", "part-0.parquet")
    stage.store.write_text('{"x": 1}\n{"x": 2}\n', "seeds.jsonl")
    stage.outputs.update(dataset="subset", seeds="seeds.jsonl")
    marker = stage.commit({"loss": 0.5})
    assert stage.status() == "done"
    assert marker["attempt"] == attempt
    files = {f["path"]: f["rows"] for f in marker["files"]}
    assert files == {"subset/part-0.parquet": 3, "seeds.jsonl": 2, "config.yaml": None, "metrics.json": None}
    assert marker["outputs"] == {"dataset": "subset", "seeds": "seeds.jsonl"}
    assert stage_metrics(stage.uri) == {"loss": 0.5}
    assert read_table(stage.uri).column("id").to_pylist() == ["a", "b", "c"]
    assert read_table(f"{stage.uri}/seeds.jsonl").num_rows == 2  # a path inside the stage resolves too
    _, found = completed_stage(stage.uri)
    assert found["config_hash"] == "h1"


@pytest.mark.parametrize("kind", KINDS)
def test_leftovers_of_a_crashed_attempt_are_never_read_and_go_at_the_next_commit(kind, tmp_path, request):
    root = _root(kind, tmp_path, request)
    crashed = _stage(root)
    crashed.begin("a: 1\n")
    write_parquet(pa.table({"id": ["a", "b"]}), crashed.store, "subset", "part-0.parquet")
    crashed.store.write_bytes(b"PAR1 truncated", "subset", "part-1.parquet")  # the write the crash cut short
    with pytest.raises(StorageError, match="not complete"):
        read_table(crashed.uri)

    rerun = _stage(root)
    assert rerun.status() == "incomplete"
    rerun.begin("a: 1\n")
    assert rerun.attempt != crashed.attempt
    write_parquet(pa.table({"id": ["a", "b"]}), rerun.store, "subset", "part-0.parquet")
    rerun.outputs["dataset"] = "subset"
    rerun.commit({})
    assert read_table(rerun.uri).column("id").to_pylist() == ["a", "b"]  # once each, the truncated file unseen
    assert root.list("curate", ATTEMPTS) == [rerun.attempt]


@pytest.mark.parametrize("kind", KINDS)
def test_of_two_concurrent_attempts_exactly_one_commits(kind, tmp_path, request):
    root = _root(kind, tmp_path, request)
    first, second = _stage(root), _stage(root)
    first.begin("a: 1\n")
    second.begin("a: 1\n")  # started later: it holds the lease now
    for stage, rows in ((first, ["x"]), (second, ["y", "z"])):
        write_parquet(pa.table({"id": rows}), stage.store, "subset", "part-0.parquet")
        stage.outputs["dataset"] = "subset"
    with pytest.raises(LeaseLost, match=f"attempt {first.attempt} lost its lease to attempt {second.attempt}"):
        first.commit({"who": "first"})
    assert first.status() == "incomplete"  # the stale attempt changed nothing
    second.commit({"who": "second"})
    assert stage_metrics(second.uri) == {"who": "second"}
    assert read_table(second.uri).column("id").to_pylist() == ["y", "z"]
    with pytest.raises(LeaseLost):
        first.commit({"who": "first"})  # still refused after the winner's commit
    assert stage_metrics(second.uri) == {"who": "second"}


@pytest.mark.parametrize("kind", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_racing_commits_of_one_lease_holder_create_one_marker(kind, tmp_path, request):
    """The marker is created only if absent: when two attempts pass the lease check together, one wins."""
    root = _root(kind, tmp_path, request)
    stages = [_stage(root) for _ in range(4)]
    for s in stages:
        s.begin("")
    barrier, results = threading.Barrier(len(stages)), []

    def commit(s: Stage) -> None:
        s._lease = lambda: {"attempt": s.attempt}  # every attempt believes it holds the lease: only the marker decides
        barrier.wait()
        try:
            results.append(s.commit({"who": s.attempt})["attempt"])
        except LeaseLost as exc:
            results.append(exc)

    threads = [threading.Thread(target=commit, args=(s,)) for s in stages]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if isinstance(r, str)]
    assert len(winners) == 1
    assert all(isinstance(r, LeaseLost) for r in results if r not in winners)
    assert stage_metrics(stages[0].uri) == {"who": winners[0]}


def test_a_changed_config_or_force_stops_the_stage_looking_complete(tmp_path):
    root = Storage(str(tmp_path / "run"))
    stage = _stage(root, "h1")
    stage.begin("")
    stage.checkpoints.write_text("state", "run", "checkpoint_000")
    stage.commit({"v": 1})
    other = _stage(root, "h2")
    assert other.status() == "stale"
    other.begin("")
    assert not root.exists("curate", MARKER)  # downstream now refuses the stage until h2 commits
    with pytest.raises(StorageError, match="not complete"):
        completed_stage(other.uri)
    other.commit({"v": 2})
    assert stage_metrics(other.uri) == {"v": 2}
    assert root.list("curate", "checkpoints") == []  # h1's checkpoints went with h1
    again = _stage(root, "h2")
    again.checkpoints.write_text("state", "run", "checkpoint_000")
    again.begin("", fresh=True)  # --force: train from scratch
    assert not again.checkpoints.exists("run", "checkpoint_000")


def test_a_declared_output_that_was_not_written_blocks_the_commit(tmp_path):
    stage = _stage(Storage(str(tmp_path / "run")))
    stage.begin("")
    stage.outputs["model"] = "model"
    with pytest.raises(StorageError, match="'model' output .* was not written"):
        stage.commit({})
    assert stage.status() == "incomplete"
    stage.store.write_text("{}", "model", "config.json")
    stage.commit({})
    assert stage.status() == "done"


def test_registered_shards_are_the_only_files_of_their_folder(tmp_path):
    """A Ray task that was retried can leave a stray shard: the writer's own list is what commits."""
    stage = _stage(Storage(str(tmp_path / "run")))
    stage.begin("")
    write_parquet(pa.table({"id": ["a", "b"]}), stage.store, "scores", "part-00000-aaaa.parquet")
    write_parquet(pa.table({"id": ["a", "b"]}), stage.store, "scores", "part-00000-bbbb.parquet")  # the stray
    stage.add_files("scores", [CommittedFile("part-00000-aaaa.parquet", 100, 2)])
    stage.outputs["dataset"] = "scores"
    stage.commit({})
    source = resolve_dataset(stage.uri)
    assert [f.rsplit("/", 1)[-1] for f in source.files] == ["part-00000-aaaa.parquet"]
    assert source.rows == (2,)
    assert read_table(stage.uri).num_rows == 2


def test_a_file_changed_after_the_commit_is_refused(tmp_path):
    stage = _stage(Storage(str(tmp_path / "run")))
    stage.begin("")
    write_parquet(pa.table({"id": ["a", "b"]}), stage.store, "subset", "part-0.parquet")
    stage.outputs["dataset"] = "subset"
    stage.commit({})
    write_parquet(pa.table({"id": ["a"]}), stage.store, "subset", "part-0.parquet")
    with pytest.raises(DataError, match="1 rows, but its stage committed 2"):
        read_table(stage.uri)


def test_locate_paths_inside_and_outside_stages(tmp_path):
    root = Storage(str(tmp_path / "run"))
    stage = _stage(root)
    stage.begin("")
    stage.store.write_text("x", "heldout", "part.jsonl")
    stage.checkpoints.write_text("s", "run", "checkpoint_0", "state.pt")
    stage.commit({})
    inside = locate(f"{stage.uri}/heldout")
    assert inside.uri == stage.store.uri("heldout")
    assert inside.files == (stage.store.uri("heldout", "part.jsonl"),)
    assert locate(f"{stage.uri}/checkpoints/{stage.config_hash[:16]}/run").uri == stage.checkpoints.uri("run")
    assert locate(str(tmp_path / "elsewhere")).stage is None
    assert locate("org/model-name").uri == "org/model-name"  # a hub id stays a hub id
    with pytest.raises(StorageError, match="was not committed"):
        locate(f"{stage.uri}/{ATTEMPTS}/20000101T000000-abcdef/heldout")


def test_an_unreadable_marker_is_stale_not_done(tmp_path):
    root = Storage(str(tmp_path / "run"))
    stage = _stage(root)
    stage.begin("")
    root.write_text("{not json", "curate", MARKER)
    assert stage.status() == "stale"


def test_stage_name_must_be_plain(tmp_path):
    with pytest.raises(StorageError, match="plain folder name"):
        Stage.open(Storage(str(tmp_path)), "a/b", "x", "h")
