"""The logs a stage's attempts leave in storage, so they outlive the Ray cluster that ran them.

    <stage>/logs/<attempt>/job.json                    who ran it: job, Ray job ID, submission ID, outcome, error
    <stage>/logs/<attempt>/driver.log                  the driver's output (jobs submitted through the Jobs API)
    <stage>/logs/<attempt>/error.txt                   the traceback, when the attempt failed
    <stage>/logs/<attempt>/nodes/<node>/worker-*.out   stdout / stderr of each Ray worker process of the job
                                           .../*.err

``logs/`` sits beside ``attempts/``, so committing a later attempt (which removes the other attempt folders) keeps
the logs of the failed ones. This module only selects and moves files; ray_jobs/stage_logs.py runs it on each node.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shared.errors import DataError
from shared.storage import Storage, split_uri

LOGS = "logs"
RECORD = "job.json"
DRIVER = "driver.log"
ERROR = "error.txt"
NODES = "nodes"
NIL_JOB = "ffffffff"
"""Job ID in the file names of workers Ray started before they were given a job (prestarted workers)."""
DRIVER_LOG = "job-driver-{submission_id}.log"
"""The Jobs API's driver log in the Ray log folder of the node where the driver runs."""


def job_files(logs_dir: str | Path, job_id: str, submission_id: str | None, since: float = 0.0) -> dict[str, Path]:
    """This job's files in one node's Ray log folder, last written at ``since`` or later: destination name -> file.

    ``since`` (the attempt's start) leaves out the workers of earlier stages when one driver runs several
    (``scopeforge pipeline``, where every stage is the same Ray job).

    Worker files are ``worker-<worker id>-<job id>-<pid>.out|.err``; a prestarted worker's name has the nil job ID,
    and its first line says which job it then served (``:job_id:<id>``, the marker Ray writes for its log monitor).
    """
    folder = Path(logs_dir)
    found: dict[str, Path] = {}
    if submission_id:
        driver = folder / DRIVER_LOG.format(submission_id=submission_id)
        if driver.is_file():
            found[DRIVER] = driver
    for path in sorted(folder.glob("worker-*")):
        if path.suffix not in (".out", ".err") or not path.is_file() or path.stat().st_mtime < since:
            continue
        parts = path.stem.split("-")
        if len(parts) < 4:
            continue
        owner = parts[-2]
        if owner == job_id or (owner == NIL_JOB and _first_line(path) == f":job_id:{job_id}"):
            found[path.name] = path
    return found


def _first_line(path: Path) -> str:
    with path.open("rb") as f:
        return f.readline(200).decode("utf-8", "replace").strip()


def node_folder(node_ip: str, node_id: str) -> str:
    """``<ip>-<first 8 of the node ID>``: readable, and distinct for two nodes on one address."""
    return f"{re.sub(r'[^0-9A-Za-z.]', '_', node_ip)}-{node_id[:8]}"


def save_files(files: dict[str, Path], dest: Storage, node: str) -> list[str]:
    """Upload one node's files: the driver log to ``driver.log``, worker files under ``nodes/<node>/``."""
    written = []
    for name, path in files.items():
        parts = (DRIVER,) if name == DRIVER else (NODES, node, name)
        dest.upload(path, *parts)
        written.append("/".join(parts))
    return written


def attempts(stage: Storage) -> list[str]:
    """The attempts that left logs, oldest first (attempt IDs sort by start time)."""
    if not stage.isdir(LOGS):
        return []
    return sorted(a for a in stage.list(LOGS) if stage.exists(LOGS, a, RECORD))


def find_attempt(stage: Storage, submission_id: str | None = None, attempt: str | None = None) -> str:
    """The attempt named, else the one a submission ran, else the latest; DataError when there is none."""
    found = attempts(stage)
    if not found:
        raise DataError(f"stage {stage.uri()}: no logs (none saved under {stage.uri(LOGS)})")
    if attempt is not None:
        if attempt not in found:
            raise DataError(f"stage {stage.uri()}: no logs of attempt {attempt!r} (attempts with logs: "
                            f"{', '.join(found)})")
        return attempt
    if submission_id is not None:
        for a in reversed(found):
            if record(stage, a).get("submission_id") == submission_id:
                return a
        raise DataError(f"stage {stage.uri()}: no saved logs of job {submission_id!r} (attempts with logs: "
                        f"{', '.join(found)})")
    return found[-1]


def record(stage: Storage, attempt: str) -> dict[str, Any]:
    data = stage.read_json(LOGS, attempt, RECORD)
    if not isinstance(data, dict):
        raise DataError(f"{stage.uri(LOGS, attempt, RECORD)}: not a JSON object")
    return data


def read(stage: Storage, attempt: str, *, workers: bool = False) -> Iterator[tuple[str, str]]:
    """(title, text) of an attempt's logs: the driver log and the error's traceback (the driver log was saved
    before the driver printed it), or the record when there is neither; then, with ``workers``, each worker file."""
    folder = stage.child(LOGS, attempt)
    info = record(stage, attempt)
    present = [name for name in (DRIVER, ERROR) if folder.exists(name)]
    for name in present:
        yield name, _text(folder, name)
    if not present:
        yield RECORD, json.dumps(info, indent=1) + "\n"
    if workers:
        base = folder.path().rstrip("/") + "/"
        for uri in folder.find(NODES):
            rel = split_uri(uri)[1][len(base):]
            yield rel, _text(folder, rel)


def _text(folder: Storage, rel: str) -> str:
    return folder.read_bytes(rel).decode("utf-8", "replace")
