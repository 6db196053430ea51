"""Real image collections: an embedded alias, a folder of image files, or a Parquet dataset with image bytes.

    table = read_real_table("lfw-faces")            # columns: id (string), image (encoded bytes)
    kind = real_kind("s3://bucket/photos/")         # "alias" | "files" | "dataset"

Small collections are read here in one process (training a DDPM, tests); the generate job streams folders and Parquet
datasets through Ray Data and only uses this module to classify the URI and list the files.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np
import pyarrow as pa
from PIL import Image

from shared.config import StorageConfig
from shared.configs.subsets import IdSubset
from shared.errors import DataError
from shared.stage import is_stage, locate
from shared.storage import Storage, split_uri

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REAL_COLUMNS = pa.schema([pa.field("id", pa.string(), nullable=False), pa.field("image", pa.binary())])


def lfw_faces() -> pa.Table:
    """The 100 faces of scikit-image's bundled ``lfw_subset`` (25x25 grayscale, ids 000-099), stored losslessly as
    PNG. The 100 non-face crops that follow them in that array are left out."""
    from skimage.data import lfw_subset

    data = lfw_subset()[:100]
    if data.dtype != np.uint8:  # scikit-image returns floats in [0, 1] although its docstring says uint8
        data = (np.clip(data, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    images = []
    for face in data:
        buffer = io.BytesIO()
        Image.fromarray(face, mode="L").save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return pa.table({"id": [f"{i:03d}" for i in range(len(images))], "image": images}, schema=REAL_COLUMNS)


REAL_ALIASES: dict[str, Callable[[], pa.Table]] = {"lfw-faces": lfw_faces}

Kind = Literal["alias", "files", "dataset"]


def real_kind(uri: str, storage: StorageConfig | None = None) -> Kind:
    """What a real-collection URI is: an embedded alias, a folder of image files, or a tabular dataset."""
    if uri in REAL_ALIASES:
        return "alias"
    if "://" not in uri and not Path(uri).expanduser().exists():
        raise DataError(f"real images {uri!r}: no such alias ({', '.join(REAL_ALIASES)}), folder or file")
    return "files" if image_files(uri, storage) else "dataset"


def image_files(uri: str, storage: StorageConfig | None = None) -> list[str]:
    """Image files (full URIs, sorted) under a folder; [] when ``uri`` is not a folder holding any (or is a stage
    folder, whose dataset output is read as a dataset)."""
    if locate(uri, storage).stage is not None or is_stage(uri, storage):
        return []
    store = Storage(uri, storage)
    if not store.isdir():
        return []
    return [f for f in store.find() if f.lower().endswith(IMAGE_SUFFIXES) and "/." not in f]


def file_id(root: str, file_uri: str) -> str:
    """The id of an image file in a folder: its path relative to the folder, without the suffix."""
    root_path = split_uri(root)[1].rstrip("/")
    path = split_uri(file_uri)[1]
    rel = path[len(root_path) + 1:] if path.startswith(root_path + "/") else PurePosixPath(path).name
    return str(PurePosixPath(rel).with_suffix(""))


def read_real_table(uri: str, storage: StorageConfig | None = None, limit: int | None = None) -> pa.Table:
    """A whole (small) real collection in memory: columns id and image (encoded bytes), ``limit`` rows at most."""
    kind = real_kind(uri, storage)
    if kind == "alias":
        table = REAL_ALIASES[uri]()
    elif kind == "files":
        files = image_files(uri, storage)[:limit]
        table = pa.table({"id": [file_id(uri, f) for f in files],
                          "image": [Storage(f, storage).read_bytes() for f in files]}, schema=REAL_COLUMNS)
    else:
        from shared.data import read_table

        table = read_table(uri, storage, required=("image",))
        if "label" in table.column_names:  # an image dataset: only its real rows are real images
            import pyarrow.compute as pc

            table = table.filter(pc.equal(table.column("label"), 0))
        ids = (table.column("id").cast(pa.string()) if "id" in table.column_names
               else pa.array([f"{i:06d}" for i in range(table.num_rows)]))
        table = pa.table({"id": ids, "image": table.column("image")}, schema=REAL_COLUMNS)
    if limit is not None:
        table = table.slice(0, limit)
    if table.num_rows == 0:
        raise DataError(f"real images {uri}: no images there")
    return table


def training_subset(table: pa.Table, subset: IdSubset, uri: str) -> pa.Table:
    """The rows (id, image) of a real collection whose ids are in ``subset``: what a generator may train on."""
    keep = subset.selects(table.column("id").to_pylist())
    if not any(keep):
        raise DataError(f"real images {uri}: none of the {table.num_rows} ids is in training_reals "
                        f"[{subset.start:g}, {subset.stop:g}) (seed {subset.seed}); widen the subset")
    return table.filter(pa.array(keep))
