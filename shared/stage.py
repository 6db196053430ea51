"""Stages: ``<root>/<name>/``, written by attempts and committed by a ``_SUCCESS`` marker that lists every file.

    <stage>/_LEASE                the attempt allowed to commit: the newest one to start
    <stage>/_SUCCESS              the commit: config hash, attempt, outputs, every file with its size and rows
    <stage>/attempts/<id>/        all that one attempt writes: config.yaml, its outputs, metrics.json, report.html
    <stage>/checkpoints/<hash>/   Ray Train state, shared by the attempts of one config (a rerun resumes from it)

The protocol, the same on local disk, S3 and memory://:

1. ``begin`` gives the attempt a new id and the lease (it writes ``_LEASE``), after removing a marker that another
   config (or ``--force``) left, so the stage stops looking complete before anything in it changes.
2. The job writes only under its attempt folder (``stage.store``). Ray Data shard writers register the files they
   wrote with their row counts (``add_files``): a task that Ray retried may leave a stray file, which is never listed.
3. ``commit`` writes ``metrics.json``, collects the file list, checks that the lease is still this attempt's, and
   creates the marker only if there is none (``If-None-Match: *`` on S3, a hard link on local disk). Of two attempts
   running at once at most one commits; the other fails with :class:`LeaseLost` and changes nothing. The winner then
   removes the other attempts' folders and the checkpoints of other configs.

Readers never list a stage: :func:`locate` maps ``<stage>`` and ``<stage>/<path>`` into the committed attempt and
returns the exact files the marker names, so leftovers of a crashed, stale or concurrent attempt stay invisible.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from shared import __version__
from shared.config import StorageConfig
from shared.errors import StorageError
from shared.storage import Storage, split_uri

MARKER = "_SUCCESS"
LEASE = "_LEASE"
ATTEMPTS = "attempts"
CHECKPOINTS = "checkpoints"
FORMAT = 2
"""Marker format: 2 is the attempt-scoped layout above (format 1 kept outputs at the stage's top level)."""
SEARCH_DEPTH = 3
"""How many folders above a URI ``locate`` looks for the stage it belongs to (``<stage>/images/<source>``)."""

log = logging.getLogger("scopeforge")
StageStatus = Literal["done", "stale", "incomplete", "absent"]


class LeaseLost(StorageError):
    """An attempt tried to commit a stage whose lease a newer attempt holds, or that another attempt committed."""


@dataclass(frozen=True)
class CommittedFile:
    """One file of a committed stage."""

    path: str
    """Relative to the attempt folder (``subset/part-....parquet``)."""
    bytes: int
    rows: int | None = None
    """Rows of a Parquet or JSON Lines file; None for other files."""

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "bytes": self.bytes, "rows": self.rows}


def new_attempt_id() -> str:
    """Sortable by start time, unique across machines: ``20261201T193301-5f1c2a``."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


# ---------------------------------------------------------------------------------------------------------------------
# Writing


@dataclass
class Stage:
    """One stage of a run, seen by the attempt that writes it.

    A job writes under ``store`` (the attempt folder) and names its main outputs in ``outputs`` (kind -> folder in
    the attempt, e.g. ``{"model": "model"}``); the marker records them, so a later stage handed this stage's URI
    finds its model or dataset.
    """

    root: Storage
    """The stage folder ``<output_root>/<name>``."""
    name: str
    job: str
    config_hash: str
    outputs: dict[str, str] = field(default_factory=dict)
    attempt: str | None = None
    """This attempt's id, set by ``begin``."""
    started_at: float = 0.0
    _files: dict[str, list[CommittedFile]] = field(default_factory=dict)

    @classmethod
    def open(cls, root: Storage, name: str, job: str, config_hash: str) -> Stage:
        if not name or "/" in name or name.startswith((".", "_")):
            raise StorageError(f"stage name {name!r}: use a plain folder name")
        return cls(root=root.child(name), name=name, job=job, config_hash=config_hash)

    @property
    def uri(self) -> str:
        """The stage's own URI (what later stages refer to); outputs live under ``store``."""
        return self.root.uri()

    @property
    def store(self) -> Storage:
        """The attempt folder: everything this attempt writes goes here."""
        if self.attempt is None:
            raise StorageError(f"stage {self.uri}: not begun (no attempt)")
        return self.root.child(ATTEMPTS, self.attempt)

    @property
    def checkpoints(self) -> Storage:
        """Ray Train state of this config: kept across attempts, so a rerun after a crash resumes."""
        return self.root.child(CHECKPOINTS, self.config_hash[:16])

    # --- state ------------------------------------------------------------------------------------------------------
    def marker(self) -> dict[str, Any] | None:
        """The committed marker; {} when one exists but cannot be read (it proves nothing); None when absent."""
        return _read_marker(self.root, strict=False)

    def status(self) -> StageStatus:
        marker = self.marker()
        if marker is not None:
            current = marker.get("format") == FORMAT and marker.get("config_hash") == self.config_hash
            return "done" if current else "stale"
        return "incomplete" if self.root.exists(LEASE) else "absent"

    def metrics(self) -> dict[str, Any]:
        """metrics.json of the committed attempt."""
        marker = self.marker() or {}
        return self.root.read_json(marker["folder"], "metrics.json")

    # --- an attempt -------------------------------------------------------------------------------------------------
    def begin(self, config_yaml: str, *, fresh: bool = False) -> str:
        """Start a new attempt: take the lease, stop looking complete, write the config. Returns the attempt id.

        ``fresh`` (``--force``) also drops this config's checkpoints, so training starts over instead of resuming.
        """
        self.attempt = new_attempt_id()
        self.started_at = time.time()
        self._files = {}
        previous = self._lease()
        if previous and previous.get("attempt") and self.root.exists(MARKER) is False:
            log.info("stage %s: attempt %s takes the lease over from attempt %s (started %s on %s), which never "
                     "committed", self.uri, self.attempt, previous.get("attempt"),
                     time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(previous.get("started_at", 0))),
                     previous.get("host", "?"))
        self.root.write_json({"attempt": self.attempt, "config_hash": self.config_hash, "job": self.job,
                              "started_at": self.started_at, "host": socket.gethostname(), "pid": os.getpid()},
                             LEASE)
        if self.root.exists(MARKER):
            self.root.rm(MARKER)
        if fresh:
            self.checkpoints.rm()
        self.store.write_text(config_yaml, "config.yaml")
        return self.attempt

    def _lease(self) -> dict[str, Any] | None:
        if not self.root.exists(LEASE):
            return None
        try:
            return self.root.read_json(LEASE)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}

    def holds_lease(self) -> bool:
        lease = self._lease()
        return bool(lease and lease.get("attempt") == self.attempt)

    def _check_lease(self) -> None:
        lease = self._lease()
        if not lease or lease.get("attempt") != self.attempt:
            raise LeaseLost(f"stage {self.uri}: attempt {self.attempt} lost its lease to attempt "
                            f"{(lease or {}).get('attempt', '?')} (started later); not committing")

    def add_files(self, folder: str, files: list[CommittedFile]) -> None:
        """Register the exact files a sharded writer put in ``folder`` (relative to the attempt). At commit these,
        and only these, are the folder's files: a stray file left there by a retried task is not listed."""
        self._files.setdefault(folder.strip("/"), []).extend(files)

    def commit(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Write metrics.json, then the marker, if this attempt still holds the lease and nobody committed meanwhile.

        Every declared output must exist first: a stage whose model or dataset went elsewhere is never marked done.
        """
        self._check_lease()
        try:
            marker = self._write_marker(metrics)
        except LeaseLost:
            raise
        except StorageError:
            # a newer attempt that committed meanwhile removes this attempt's folder: say so, not "file not found"
            winner = (_read_marker(self.root, strict=False) or {}).get("attempt")
            if (winner and winner != self.attempt) or not self.holds_lease():
                raise LeaseLost(f"stage {self.uri}: attempt {winner or '?'} took the stage over while attempt "
                                f"{self.attempt} was committing; not committed") from None
            raise
        try:
            self._clean_up()
        except StorageError as exc:  # best effort: the next commit tries again
            log.warning("stage %s: committed, but could not remove everything of earlier attempts (%s)",
                        self.uri, exc)
        return marker

    def _write_marker(self, metrics: dict[str, Any]) -> dict[str, Any]:
        store = self.store
        for name, rel in self.outputs.items():
            if rel.strip("/") not in self._files and not store.exists(rel):
                raise StorageError(f"stage {self.uri}: its '{name}' output {store.uri(rel)} was not written; "
                                   "the stage is left incomplete")
        store.write_json(metrics, "metrics.json")
        files = self._collect_files()
        marker = {
            "format": FORMAT,
            "config_hash": self.config_hash,
            "job": self.job,
            "attempt": self.attempt,
            "started_at": self.started_at,
            "completed_at": time.time(),
            "duration_s": round(time.time() - self.started_at, 3),
            "scopeforge_version": __version__,
            "folder": f"{ATTEMPTS}/{self.attempt}",
            "outputs": {kind: rel.strip("/") for kind, rel in self.outputs.items()},
            "files": [f.to_dict() for f in files],
        }
        self._check_lease()
        if not self.root.create_exclusive(json.dumps(marker, indent=1).encode() + b"\n", MARKER):
            winner = (_read_marker(self.root, strict=False) or {}).get("attempt", "?")
            raise LeaseLost(f"stage {self.uri}: attempt {winner} committed it first; attempt {self.attempt} is "
                            "not committed")
        return marker

    def _collect_files(self) -> list[CommittedFile]:
        """The attempt's files: registered shard sets as registered, every other file found in the attempt folder
        (only this attempt writes there) with its size and, for tables, its row count."""
        found = []
        registered = {f"{folder}/" for folder in self._files}
        base = self.store.path()
        for uri in self.store.find():
            rel = split_uri(uri)[1][len(base.rstrip("/")) + 1:]
            if any(rel.startswith(folder) for folder in registered):
                continue
            found.append(CommittedFile(rel, int(self.store.size(rel)), _rows(self.store, rel)))
        for folder, files in self._files.items():
            found.extend(CommittedFile(f"{folder}/{f.path}", f.bytes, f.rows) for f in files)
        return sorted(found, key=lambda f: f.path)

    def _clean_up(self) -> None:
        """After a commit: other attempts, other configs' checkpoints and a format-1 layout go."""
        keep = {ATTEMPTS, CHECKPOINTS, MARKER, LEASE}
        for name in self.root.list():
            if name not in keep:
                self.root.rm(name)
        for name in self.root.list(ATTEMPTS):
            if name != self.attempt:
                self.root.rm(ATTEMPTS, name)
        for name in self.root.list(CHECKPOINTS):
            if name != self.config_hash[:16]:
                self.root.rm(CHECKPOINTS, name)


def _rows(store: Storage, rel: str) -> int | None:
    if rel.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            return pq.read_metadata(io.BytesIO(store.read_bytes(rel))).num_rows
        except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for a damaged footer
            raise StorageError(f"{store.uri(rel)}: not a readable Parquet file ({exc}); the stage is not committed"
                               ) from None
    if rel.endswith(".jsonl"):
        return sum(1 for line in store.read_bytes(rel).splitlines() if line.strip())
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def _read_marker(store: Storage, *, strict: bool) -> dict[str, Any] | None:
    if not store.exists(MARKER):
        return None
    try:
        marker = store.read_json(MARKER)
    except (json.JSONDecodeError, UnicodeDecodeError):
        if strict:
            raise StorageError(f"{store.uri()}: its {MARKER} marker is not readable; rerun that stage") from None
        return {}
    if strict and marker.get("format") != FORMAT:
        raise StorageError(f"{store.uri()}: that stage was written by an older scopeforge (marker format "
                           f"{marker.get('format', 1)}); rerun it")
    return marker


def is_stage(uri: str, storage: StorageConfig | None = None) -> bool:
    """Whether ``uri`` is a stage folder (committed or not)."""
    if "://" not in uri and not os.path.isdir(os.path.expanduser(uri)):
        return False
    store = Storage(uri, storage)
    return store.exists(MARKER) or store.exists(LEASE)


def stage_marker(uri: str, storage: StorageConfig | None = None) -> dict[str, Any] | None:
    """The marker of a finished stage at ``uri``; None when ``uri`` is not a stage folder at all.

    A folder that a stage started but never committed is an error, never mistaken for plain data.
    """
    if "://" not in uri and not os.path.isdir(os.path.expanduser(uri)):
        return None  # a missing local path, a hub id or alias: not a stage
    store = Storage(uri, storage)
    marker = _read_marker(store, strict=True)
    if marker is None and store.exists(LEASE):
        raise StorageError(f"{uri}: that stage is not complete (it started but has no {MARKER} marker); rerun it")
    return marker


@dataclass(frozen=True)
class Location:
    """Where a URI's data physically is."""

    uri: str
    """The physical URI (inside the committed attempt when the URI points into a stage)."""
    stage: str | None = None
    """The stage the URI belongs to, if any."""
    marker: dict[str, Any] | None = None
    files: tuple[str, ...] | None = None
    """Full URIs of the committed files at or under ``uri`` (None outside a stage: list the folder yourself)."""
    rows: tuple[int | None, ...] | None = None
    """Row counts of those files, as committed."""


def _enclosing_stage(uri: str, storage: StorageConfig | None) -> tuple[str, str] | None:
    """(stage URI, path below it) when ``uri`` is a stage or lies up to SEARCH_DEPTH folders inside one."""
    protocol, path = split_uri(uri)
    parts = path.rstrip("/").split("/")
    for up in range(0, SEARCH_DEPTH + 1):
        if len(parts) - up < 2:
            break
        head = "/".join(parts[: len(parts) - up])
        candidate = head if protocol == "file" else f"{protocol}://{head.lstrip('/')}"
        if protocol == "file" and not os.path.isdir(head):
            continue
        store = Storage(candidate, storage)
        if store.exists(MARKER) or store.exists(LEASE):
            return candidate, "/".join(parts[len(parts) - up:])
    return None


def locate(uri: str, storage: StorageConfig | None = None, kind: str | None = None) -> Location:
    """Resolve ``uri`` through the stage it belongs to.

    - a stage folder with ``kind`` given: that output of the committed attempt (an error if it has none);
    - ``<stage>/<path>``: ``<path>`` inside the committed attempt (``${corpus}/heldout``);
    - ``<stage>/checkpoints/...``: as is (checkpoints belong to the stage, not to an attempt);
    - anything else (a plain folder or file, an alias, a hub id): unchanged, with no file list.

    An uncommitted stage, or a path into an attempt that was not committed, is an error naming it.
    """
    if not uri or ("://" not in uri and not os.path.exists(os.path.expanduser(uri))
                   and not _has_existing_parent(uri)):
        return Location(uri)
    found = _enclosing_stage(uri, storage)
    if found is None:
        return Location(uri)
    stage_uri, below = found
    store = Storage(stage_uri, storage)
    marker = stage_marker(stage_uri, storage)
    if marker is None:
        raise StorageError(f"{uri}: its stage {stage_uri} is not complete; rerun that stage")
    if below.split("/", 1)[0] == CHECKPOINTS:
        return Location(store.uri(below), stage_uri, marker)
    folder = marker["folder"]
    if below == "":
        if kind is None:
            return Location(stage_uri, stage_uri, marker)
        rel = (marker.get("outputs") or {}).get(kind)
        if rel is None:
            raise StorageError(f"{uri}: that {marker.get('job', '?')} stage has no '{kind}' output "
                               f"(it has: {', '.join(marker.get('outputs') or {}) or 'none'})")
    elif below.split("/", 1)[0] == ATTEMPTS:
        if not (below + "/").startswith(folder + "/"):
            raise StorageError(f"{uri}: that attempt of {stage_uri} was not committed (the committed one is "
                               f"{marker['attempt']})")
        rel = below[len(folder):].strip("/")
    else:
        rel = below
    entries = [f for f in marker.get("files") or [] if rel == "" or f["path"] == rel
               or f["path"].startswith(rel + "/")]
    return Location(store.uri(folder, rel), stage_uri, marker, tuple(store.uri(folder, f["path"]) for f in entries),
                    tuple(f.get("rows") for f in entries))


def _has_existing_parent(uri: str) -> bool:
    """A local path that does not exist itself but lies inside an existing folder (a stage's logical path)."""
    path = os.path.abspath(os.path.expanduser(uri))
    for _ in range(SEARCH_DEPTH):
        path = os.path.dirname(path)
        if os.path.isdir(path):
            return True
    return False


def committed_folder(uri: str, storage: StorageConfig | None = None) -> str:
    """The folder that holds what ``uri`` names: a stage's committed attempt folder, the physical folder of a path
    inside a stage, or ``uri`` itself outside stages."""
    found = locate(uri, storage)
    if found.stage is not None and found.uri == found.stage and found.marker is not None:
        return Storage(found.stage, storage).uri(found.marker["folder"])
    return found.uri


def resolve_output(uri: str, kind: str, storage: StorageConfig | None = None) -> str:
    """The physical URI behind ``uri``: a stage's ``kind`` output, a path inside a stage, or ``uri`` itself."""
    return locate(uri, storage, kind).uri


def stage_output(uri: str, kind: str, storage: StorageConfig | None = None) -> str | None:
    """``<uri>/<folder of kind>`` in the committed attempt when ``uri`` is a finished stage, else None."""
    marker = stage_marker(uri, storage)
    if marker is None:
        return None
    return locate(uri, storage, kind).uri


def stage_metrics(uri: str, storage: StorageConfig | None = None) -> dict[str, Any]:
    """metrics.json of the finished stage at ``uri``."""
    marker = stage_marker(uri, storage)
    if marker is None:
        raise StorageError(f"{uri}: not a finished stage (no {MARKER} marker)")
    return Storage(uri, storage).read_json(marker["folder"], "metrics.json")


def completed_stage(uri: str, storage: StorageConfig | None = None, what: str = "input stage"
                    ) -> tuple[Storage, dict[str, Any]]:
    """A finished upstream stage: (its Storage, its marker). Refuses a stage without ``_SUCCESS``."""
    store = Storage(uri, storage)
    marker = _read_marker(store, strict=True)
    if marker is None:
        if store.exists(LEASE):
            raise StorageError(f"{what} {uri}: not complete (it started but has no {MARKER} marker); rerun it")
        raise StorageError(f"{what} {uri}: not found (no {MARKER} marker); run that stage first")
    return store, marker
