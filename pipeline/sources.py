"""Read any supported corpus into one schema: id, image (bytes), image_path, prompt.

Inputs: Parquet files or folders (`id`; `image` bytes or `image_path`; optional `prompt`), folders of
image files (id = path below the folder), and WebDataset `.tar` shards (id = `__key__`, image = the
first image member, prompt = a `.prompt` member). Any filesystem pyarrow understands (local, s3://,
gs://, ...). Rows are never decoded here: a broken image is a per-row problem for the next stage.
"""

from __future__ import annotations

import posixpath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray

SCHEMA = pa.schema([
    ("id", pa.string()), ("image", pa.binary()), ("image_path", pa.string()), ("prompt", pa.string()),
    ("answer", pa.string()),  # optional reference answer: the output then says whether the model got it right
    ("source_error", pa.string()),  # a reason found while reading (e.g. an image column of the wrong type)
])
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
FORMATS = ("auto", "parquet", "images", "webdataset")


def read_corpus(paths: list[str], fmt: str = "auto") -> ray.data.Dataset:
    datasets = [_read_one(path, fmt) for path in paths]
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]


def detect_format(path: str) -> str:
    """parquet / webdataset / images, from the file's suffix or a folder's contents."""
    fs, root = pafs.FileSystem.from_uri(_uri(path))
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {path!r} does not exist")
    names = [root] if info.type == pafs.FileType.File else [
        f.path for f in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if f.type == pafs.FileType.File
    ]
    if any(n.endswith(".parquet") for n in names):
        return "parquet"
    if any(n.endswith(".tar") for n in names):
        return "webdataset"
    return "images"


def _uri(path: str) -> str:
    return path if "://" in path else posixpath.abspath(path)


def _read_one(path: str, fmt: str) -> ray.data.Dataset:
    fmt = detect_format(path) if fmt == "auto" else fmt
    uri = _uri(path)
    if fmt == "parquet":
        return ray.data.read_parquet(uri, file_extensions=["parquet"]).map_batches(_from_parquet, batch_format="pyarrow")
    if fmt == "webdataset":
        return ray.data.read_webdataset(uri, decoder=None, file_extensions=["tar"]).map_batches(
            _from_webdataset, batch_format="pyarrow")
    if fmt == "images":
        root = pafs.FileSystem.from_uri(uri)[1].rstrip("/")
        return ray.data.read_binary_files(uri, include_paths=True).map_batches(
            _from_files, batch_format="pyarrow", fn_kwargs={"root": root})
    raise ValueError(f"unknown input format {fmt!r}; choose one of {FORMATS}")


def _column(table: pa.Table, name: str, type_: pa.DataType) -> pa.Array:
    if name in table.column_names:
        return table.column(name).cast(type_)
    return pa.nulls(len(table), type_)


def _from_parquet(table: pa.Table) -> pa.Table:
    if "id" not in table.column_names:
        raise ValueError(f"input Parquet has no 'id' column (columns: {table.column_names})")
    rows = len(table)
    image = table.column("image") if "image" in table.column_names else pa.nulls(rows, pa.binary())
    paths, error = _column(table, "image_path", pa.string()), pa.nulls(rows, pa.string())
    if pa.types.is_string(image.type) or pa.types.is_large_string(image.type):
        paths, image = image.cast(pa.string()), pa.nulls(rows, pa.binary())  # a column of paths
    elif not (_is_binary(image.type) or pa.types.is_null(image.type)):
        error = pa.array([f"wrong_type: the image column holds {image.type}, not encoded bytes"] * rows, pa.string())
        image = pa.nulls(rows, pa.binary())
    columns = [_column(table, "id", pa.string()), image.cast(pa.binary()), paths, _column(table, "prompt", pa.string()),
               _column(table, "answer", pa.string()), error]
    return pa.table(columns, schema=SCHEMA)


def _is_binary(type_: pa.DataType) -> bool:
    return pa.types.is_binary(type_) or pa.types.is_large_binary(type_) or pa.types.is_fixed_size_binary(type_)


def _from_webdataset(table: pa.Table) -> pa.Table:
    image = pa.nulls(len(table), pa.binary())
    for suffix in IMAGE_SUFFIXES:  # the first image member present in each sample
        if suffix in table.column_names:
            image = pc.coalesce(image, table.column(suffix).cast(pa.binary()))
    prompt, answer = (_column(table, name, pa.binary()).cast(pa.string(), safe=False) for name in ("prompt", "answer"))
    empty = pa.nulls(len(table), pa.string())
    return pa.table([table.column("__key__").cast(pa.string()), image, empty, prompt, answer, empty], schema=SCHEMA)


def _from_files(table: pa.Table, root: str) -> pa.Table:
    ids = [posixpath.relpath(p, root) if p.startswith(root) else p for p in table.column("path").to_pylist()]
    empty = pa.nulls(len(table), pa.string())
    return pa.table([pa.array(ids, pa.string()), table.column("bytes").cast(pa.binary()), empty, empty, empty, empty],
                    schema=SCHEMA)
