"""Artifacts under a root URI (local path, file://, s3://, memory://).

    store = Storage("s3://bucket/runs/demo")          # endpoint + credentials: AWS_* variables or StorageConfig
    store.write_json({...}, "notes", "summary.json")
    pa_fs, path = store.pyarrow_filesystem("images")  # hand to Ray Data / Ray Train

Whole-file writes are atomic (a rename on local disk, a single PUT on S3), and ``create_exclusive`` writes a file
only if it does not exist yet: the primitive the stage commit (``shared/stage.py``) is built on.
``memory://`` lives in one process only: fine for unit tests, invisible to Ray workers.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import fsspec

from shared.config import StorageConfig
from shared.errors import StorageError, first_line

Protocol = Literal["file", "s3", "memory"]


def split_uri(uri: str) -> tuple[Protocol, str]:
    """``"s3://b/k"`` -> ("s3", "b/k"); a plain or file:// path -> ("file", absolute path)."""
    if not uri:
        raise StorageError("empty storage URI")
    if "://" not in uri:
        return "file", str(Path(uri).expanduser().resolve())
    scheme, rest = uri.split("://", 1)
    if scheme == "file":
        return "file", str(Path(rest).expanduser().resolve())
    if scheme in ("s3", "s3a"):
        if not rest.strip("/"):
            raise StorageError(f"{uri}: an s3:// URI needs a bucket")
        return "s3", rest.strip("/")
    if scheme == "memory":
        return "memory", "/" + rest.strip("/")
    raise StorageError(f"{uri}: unsupported storage scheme '{scheme}://' (use a local path, file://, s3:// or memory://)")


def is_remote(uri: str) -> bool:
    return split_uri(uri)[0] != "file"


@dataclass(frozen=True)
class S3Settings:
    """Endpoint and credentials resolved from the config first, then the standard AWS variables."""

    endpoint_url: str | None
    region: str
    key: str | None
    secret: str | None
    anon: bool

    @classmethod
    def resolve(cls, storage: StorageConfig | None) -> S3Settings:
        o = storage or StorageConfig()
        env = os.environ
        return cls(
            endpoint_url=o.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            region=o.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            key=o.access_key_id.get_secret_value() if o.access_key_id else None,
            secret=o.secret_access_key.get_secret_value() if o.secret_access_key else None,
            anon=o.anon,
        )

    def __repr__(self) -> str:  # never print credentials
        return f"S3Settings(endpoint_url={self.endpoint_url!r}, region={self.region!r}, anon={self.anon})"


def filesystem(protocol: Protocol, storage: StorageConfig | None = None) -> fsspec.AbstractFileSystem:
    if protocol == "file":
        return fsspec.filesystem("file", auto_mkdir=True)
    if protocol == "memory":
        return fsspec.filesystem("memory")
    s3 = S3Settings.resolve(storage)
    # No listings cache: stage folders are written by other processes (Ray workers, a concurrent attempt), and a
    # cached listing would hide their files from exists() and list() in this one.
    return fsspec.filesystem(
        "s3",
        use_listings_cache=False,
        anon=s3.anon,
        key=s3.key,
        secret=s3.secret,
        endpoint_url=s3.endpoint_url,
        client_kwargs={"region_name": s3.region},
    )


@contextlib.contextmanager
def storage_errors(uri: str) -> Iterator[None]:
    """Turn filesystem and S3 client exceptions into one-line StorageErrors naming the URI."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError:
        raise StorageError(f"{uri}: not found") from None
    except PermissionError as exc:
        reason = first_line(exc, "") or "check credentials and permissions"
        raise StorageError(f"{uri}: access denied ({reason})") from None
    except IsADirectoryError:
        raise StorageError(f"{uri}: is a directory") from None
    except NotADirectoryError:
        raise StorageError(f"{uri}: a parent is not a directory") from None
    except OSError as exc:
        raise StorageError(f"{uri}: {first_line(exc)}") from None
    except Exception as exc:  # botocore / aiohttp errors have no common base we can import cheaply
        module = type(exc).__module__.split(".")[0]
        if module in ("botocore", "aiobotocore", "aiohttp", "s3fs"):
            raise StorageError(f"{uri}: {type(exc).__name__}: {first_line(exc, '')}") from None
        raise


def _precondition_failed(exc: BaseException) -> bool:
    """An S3 conditional write refused: 412 PreconditionFailed, or 409 ConditionalRequestConflict while another
    conditional PUT of the same key is in flight (s3fs turns both into an OSError; the ClientError is its cause)."""
    for error in (exc, exc.__cause__, exc.__context__):
        code = str(((getattr(error, "response", None) or {}).get("Error") or {}).get("Code", ""))
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
            return True
    return "pre-conditions you specified did not hold" in str(exc)


class Storage:
    """A root URI and the filesystem that reaches it; every path argument is relative to the root."""

    def __init__(self, root: str, storage: StorageConfig | None = None):
        self.config = storage or StorageConfig()
        self.protocol, self.root_path = split_uri(root)
        self.fs = filesystem(self.protocol, self.config)

    # --- addressing -------------------------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        rel = "/".join(p.strip("/") for p in parts if p and p.strip("/"))
        return f"{self.root_path.rstrip('/')}/{rel}" if rel else self.root_path

    def uri(self, *parts: str) -> str:
        p = self.path(*parts)
        return p if self.protocol == "file" else f"{self.protocol}://{p.lstrip('/')}"

    def child(self, *parts: str) -> Storage:
        sub = Storage.__new__(Storage)
        sub.config, sub.protocol, sub.fs = self.config, self.protocol, self.fs
        sub.root_path = self.path(*parts)
        return sub

    def __repr__(self) -> str:
        return f"Storage({self.uri()!r})"

    # --- reading ----------------------------------------------------------------------------------------------------
    def exists(self, *parts: str) -> bool:
        with storage_errors(self.uri(*parts)):
            return self.fs.exists(self.path(*parts))

    def isdir(self, *parts: str) -> bool:
        with storage_errors(self.uri(*parts)):
            return self.fs.isdir(self.path(*parts))

    def read_bytes(self, *parts: str) -> bytes:
        with storage_errors(self.uri(*parts)):
            return self.fs.cat_file(self.path(*parts))

    def read_text(self, *parts: str) -> str:
        return self.read_bytes(*parts).decode("utf-8")

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_text(*parts))

    def list(self, *parts: str) -> list[str]:
        """Names (not paths) directly under a folder, sorted; [] when it does not exist."""
        with storage_errors(self.uri(*parts)):
            folder = self.path(*parts)
            if not self.fs.exists(folder):
                return []
            # an object store may list a folder's own marker object ("<folder>/") among its entries: not a child
            own = folder.rstrip("/").lstrip("/")
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False)
                          if p.rstrip("/").lstrip("/") != own)

    def find(self, *parts: str, suffix: str = "") -> builtins.list[str]:
        """Every file below a folder (recursively), as full URIs, sorted."""
        with storage_errors(self.uri(*parts)):
            base = self.path(*parts)
            if not self.fs.exists(base):
                return []
            found = sorted(self.fs.find(base))
        prefix = "" if self.protocol == "file" else f"{self.protocol}://"
        return [prefix + p.lstrip("/") if prefix else p for p in found if p.endswith(suffix)]

    # --- writing ----------------------------------------------------------------------------------------------------
    def write_bytes(self, data: bytes, *parts: str) -> str:
        """Write a whole file; on local disk through a temporary name and a rename, so readers never see half."""
        target = self.path(*parts)
        with storage_errors(self.uri(*parts)):
            if self.protocol == "file":
                Path(target).parent.mkdir(parents=True, exist_ok=True)
                tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
                Path(tmp).write_bytes(data)
                os.replace(tmp, target)
            else:
                self.fs.pipe_file(target, data)  # a single PUT: atomic on S3
        return self.uri(*parts)

    def write_text(self, text: str, *parts: str) -> str:
        return self.write_bytes(text.encode("utf-8"), *parts)

    def write_json(self, obj: Any, *parts: str) -> str:
        return self.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n", *parts)

    def create_exclusive(self, data: bytes, *parts: str) -> bool:
        """Write a whole file only if nothing is there yet; False (and nothing written) when something is.

        Local disk: the bytes go to a temporary name, then a hard link to the target, which fails if the target
        exists (atomic, and readers never see half a file). S3: a PUT with ``If-None-Match: *``. memory://: one
        process, so a check then a write.
        """
        target = self.path(*parts)
        with storage_errors(self.uri(*parts)):
            if self.protocol == "file":
                Path(target).parent.mkdir(parents=True, exist_ok=True)
                tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
                Path(tmp).write_bytes(data)
                try:
                    os.link(tmp, target)
                except FileExistsError:
                    return False
                finally:
                    os.unlink(tmp)
                return True
            if self.protocol == "memory":
                if self.fs.exists(target):
                    return False
                self.fs.pipe_file(target, data)
                return True
            try:
                self.fs.pipe_file(target, data, mode="create")
            except Exception as exc:
                if _precondition_failed(exc):
                    return False
                raise
            return True

    def size(self, *parts: str) -> int:
        with storage_errors(self.uri(*parts)):
            return int(self.fs.size(self.path(*parts)))

    def makedirs(self, *parts: str) -> None:
        with storage_errors(self.uri(*parts)):
            self.fs.makedirs(self.path(*parts), exist_ok=True)

    def rm(self, *parts: str) -> None:
        """Remove a file or a folder tree; nothing happens when it does not exist."""
        with storage_errors(self.uri(*parts)):
            if self.fs.exists(self.path(*parts)):
                self.fs.rm(self.path(*parts), recursive=True)

    def upload(self, local_path: str | Path, *parts: str) -> str:
        """Copy a local file or folder to ``parts`` under the root."""
        src = Path(local_path)
        with storage_errors(self.uri(*parts)):
            if src.is_dir():
                for f in sorted(src.rglob("*")):
                    if f.is_file():
                        self.write_bytes(f.read_bytes(), *parts, f.relative_to(src).as_posix())
            else:
                self.write_bytes(src.read_bytes(), *parts)
        return self.uri(*parts)

    def download(self, local_path: str | Path, *parts: str, files: tuple[str, ...] | builtins.list[str] | None = None
                 ) -> Path:
        """Copy a file or folder under the root to a local path; ``files`` (full URIs under it) copies exactly those
        instead of what a listing finds."""
        dst = Path(local_path)
        base = self.path(*parts)
        with storage_errors(self.uri(*parts)):
            if files is not None or self.fs.isdir(base):
                remotes = [split_uri(f)[1] for f in files] if files is not None else self.fs.find(base)
                for remote in remotes:
                    rel = remote[len(base.rstrip("/")) + 1 :] if remote.startswith(base) else remote.rsplit("/", 1)[-1]
                    out = dst / rel
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(self.fs.cat_file(remote))
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(self.fs.cat_file(base))
        return dst

    def check_writable(self) -> None:
        """Fail early, with one line, when the root cannot be written (bad bucket, bad credentials, read-only dir)."""
        probe = f".scopeforge-probe-{uuid.uuid4().hex[:8]}"
        try:
            self.write_bytes(b"ok", probe)
            with storage_errors(self.uri(probe)):
                self.fs.rm(self.path(probe))
        except StorageError as exc:
            reason = str(exc).split(": ", 1)[-1]
            raise StorageError(f"{self.uri()}: cannot write there ({reason})") from None

    # --- Ray Data / Ray Train ---------------------------------------------------------------------------------------
    def pyarrow_filesystem(self, *parts: str):
        """(pyarrow filesystem, path) for Ray Data's ``filesystem=`` / Ray Train's ``storage_filesystem=``."""
        import pyarrow.fs as pafs

        if self.protocol == "file":
            return pafs.LocalFileSystem(), self.path(*parts)
        if self.protocol == "s3":
            s3 = S3Settings.resolve(self.config)
            kwargs: dict[str, Any] = {"region": s3.region, "anonymous": s3.anon}
            if s3.key and s3.secret:
                kwargs.update(access_key=s3.key, secret_key=s3.secret)
            if s3.endpoint_url:
                url = urlparse(s3.endpoint_url)
                kwargs.update(endpoint_override=url.netloc or url.path, scheme=url.scheme or "https")
            return pafs.S3FileSystem(**kwargs), self.path(*parts)
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs)), self.path(*parts)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
