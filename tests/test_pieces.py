"""Corpus pieces: every row read exactly once for any piece size, stable keys, footers-only planning, and a survey
(n-gram counts and the SAE sample) that does not depend on how the corpus is cut."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shared.curation.documents import Survey, document_columns, survey
from shared.data import resolve_dataset
from shared.errors import DataError
from shared.pieces import plan_pieces, read_all, read_piece


def _rows(n):
    return [{"id": f"r{i:04d}", "text": f"document {i} " + "word " * (i % 17), "label": "a" if i % 3 else "b"}
            for i in range(n)]


@pytest.fixture
def corpus(tmp_path):
    rows = _rows(500)
    folder = tmp_path / "parquet"
    folder.mkdir()
    table = pa.Table.from_pylist(rows)
    pq.write_table(table.slice(0, 300), folder / "a.parquet", row_group_size=64)
    pq.write_table(table.slice(300), folder / "b.parquet", row_group_size=1000)
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "jsonl").mkdir()
    (tmp_path / "jsonl" / "a.jsonl").write_text(lines[: lines.index("r0250") - 8])  # cut at a line start
    (tmp_path / "jsonl" / "b.jsonl").write_text(lines[lines.index("r0250") - 8:])
    return rows, folder, tmp_path / "jsonl"


@pytest.mark.parametrize("target, max_rows, min_pieces", [(1 << 30, 10**6, 1), (2000, 10**6, 1), (1 << 30, 37, 1),
                                                           (1 << 30, 10**6, 9), (50, 1, 1)])
def test_every_row_is_read_exactly_once_for_any_piece_size(corpus, target, max_rows, min_pieces):
    rows, parquet, jsonl = corpus
    for folder in (parquet, jsonl):
        pieces = plan_pieces(resolve_dataset(str(folder)), None, target, max_rows, min_pieces)
        assert [p.index for p in pieces] == list(range(len(pieces)))
        assert read_all(pieces, columns=["id"]).column("id").to_pylist() == [r["id"] for r in rows]
        if folder == parquet:
            assert all(p.rows is not None and p.rows <= max_rows for p in pieces)
            assert len(pieces) >= min(min_pieces, 500)
        assert len({p.key for p in pieces}) == len(pieces)
        again = plan_pieces(resolve_dataset(str(folder)), None, target, max_rows, min_pieces)
        assert [p.key for p in again] == [p.key for p in pieces]  # the same plan every time


@pytest.mark.parametrize("max_rows", [64, 7])
def test_json_lines_pieces_hold_about_max_rows(corpus, max_rows):
    """JSON Lines row counts are unknown before reading: the cut estimates rows per byte from each file's head."""
    rows, _, jsonl = corpus
    pieces = plan_pieces(resolve_dataset(str(jsonl)), None, 1 << 30, max_rows)
    sizes = [read_piece(p).num_rows for p in pieces]
    assert sum(sizes) == len(rows)
    assert len(pieces) >= len(rows) / max_rows
    assert max(sizes) <= 2 * max_rows  # lines differ in length up to ~2x in this corpus


def test_a_json_array_file_is_one_piece_and_a_damaged_parquet_file_is_named(tmp_path):
    (tmp_path / "arr").mkdir()
    (tmp_path / "arr" / "x.json").write_text(json.dumps(_rows(20)))
    pieces = plan_pieces(resolve_dataset(str(tmp_path / "arr")), None, 10, 5, 4)
    assert len(pieces) == 1
    assert read_piece(pieces[0]).num_rows == 20
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"x.parquet: cannot parse as parquet"):
        plan_pieces(resolve_dataset(str(tmp_path / "bad")), None, 10, 5)


def test_the_survey_does_not_depend_on_the_cut(corpus):
    rows, parquet, _ = corpus
    results = []
    for max_rows in (500, 64, 7):
        found = Survey(40, 5)
        for piece in plan_pieces(resolve_dataset(str(parquet)), None, 1 << 30, max_rows):
            cols = document_columns(read_piece(piece), "text", "id", "label")
            found = found.add(survey(cols, "text", 64, seed=3, size=40, fraction=0.5, piece=piece.index,
                                     text_size=5))
        results.append(found)
    first = results[0]
    assert first.rows == 500
    assert len(first.ids) == 40
    assert len(first.texts) == 5
    texts = {r["id"]: r["text"] for r in rows}
    assert first.texts == [texts[i] for i in first.ids[:5]]
    for other in results[1:]:
        assert other.ids == first.ids
        assert other.texts == first.texts
        assert (other.counts == first.counts).all()
    other_seed = Survey(40, 0).add(survey(document_columns(read_all(plan_pieces(
        resolve_dataset(str(parquet)), None, 1 << 30, 500)), "text", "id", "label"), "text", 64, 4, 40, 0.5))
    assert other_seed.ids != first.ids
    heldout = first.heldout(0.1, seed=3)
    assert set(heldout) == set(first.ids)
    assert 1 <= sum(heldout.values()) < 40
    assert first.heldout(0.1, seed=3) == heldout


def test_a_survey_crosses_processes_as_arrow_columns_and_comes_back_whole(corpus):
    _, parquet, _ = corpus
    piece = plan_pieces(resolve_dataset(str(parquet)), None, 1 << 30, 500)[0]
    original = survey(document_columns(read_piece(piece), "text", "id", "label"), "text", 64, seed=3, size=40,
                      fraction=0.5, piece=2, text_size=5)
    empty = survey(document_columns(read_piece(piece).slice(0, 0), "text", "id", "label"), "text", 64, 3, 40, 0.5)
    table = pa.Table.from_pylist([original.row(), empty.row()])  # what Ray Data builds its blocks with
    back = [Survey.from_row(r, 40, 5) for r in table.to_pylist()]
    assert (back[0].rows, back[0].keys, back[0].ids, back[0].pieces, back[0].texts) == (
        original.rows, original.keys, original.ids, original.pieces, original.texts)
    assert (back[0].counts == original.counts).all()
    assert back[0].counts.dtype == np.int64
    assert back[1].rows == 0
    assert back[1].ids == []
    assert (back[1].counts == 0).all()
    assert all(not pa.types.is_binary(f.type) for f in table.schema)  # no pickled objects


def test_a_bad_line_in_a_later_byte_range_is_named_by_its_line_in_the_file(tmp_path):
    lines = [json.dumps(r).encode() for r in _rows(40)]
    lines[31] = b'{"id": "x", "text": "caf\xe9"}'  # latin-1, not UTF-8
    (tmp_path / "c.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    pieces = plan_pieces(resolve_dataset(str(tmp_path / "c.jsonl")), None, 1 << 30, 10**6, min_pieces=4)
    assert len(pieces) == 4
    with pytest.raises(DataError, match=r"c.jsonl: line 32 is not UTF-8 text"):
        read_all(pieces)


def test_task_groups_cover_every_piece_once_in_order():
    from ray_jobs.data import TASK_FILES, task_groups

    assert task_groups(0, 4) == []
    for n in (1, 5, 16, 17, 100, 1000):
        for slots in (1, 2, 8):
            groups = task_groups(n, slots)
            assert [i for g in groups for i in g] == list(range(n))
            assert max(len(g) for g in groups) <= TASK_FILES
            assert len(groups) >= min(n, 2 * slots)  # every CPU slot gets work
