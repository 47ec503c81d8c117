"""Corpora as work units: plan the units of a corpus, read one unit into normalised row tables.

A *unit* is what the job completes, records and resumes as a whole: one Parquet file, one
WebDataset tar, or a chunk of up to `IMAGES_PER_UNIT` files of an image folder. Planning lists
files, never rows, so the driver's memory grows with the number of shards (img2dataset writes
10,000 rows a shard: 10^5 units for 10^9 rows), not with the rows.

Reading a unit yields pyarrow tables in one schema (`source_schema`) whatever the shard looked
like: ids of any scalar type become strings, a missing optional column (`prompt`, `answer`, carried
columns) is null, extra columns are ignored unless carried. A shard that cannot be read (not
Parquet, no id or image column, a tar cut off mid-member) raises `ShardError` after everything
readable before the damage has been yielded.

    Parquet     id: `id`, else `key` (img2dataset); image: `image` (bytes, a path string, or a
                Hugging Face struct {bytes, path}), else `jpg` / `jpeg` / `png` / `webp`; or
                `image_path`; optional `prompt`, `answer`. source_row: the row's index in the file.
    WebDataset  id: `__key__`; image: the first image member; `.prompt` / `.answer` members.
                source_row: the sample's index in the tar.
    images      id: the path below the folder; source_file: the image file; source_row: its index in
                the unit's chunk of the sorted listing.
Any filesystem pyarrow understands (local, s3://, gs://, ...).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
FORMATS = ("auto", "parquet", "images", "webdataset")
IMAGES_PER_UNIT = 1000
ROWS_PER_READ = 256  # rows per table a reader yields (the caller re-blocks them)
ID_COLUMNS = ("id", "key")
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp")
# WebDataset names for what a Parquet shard of img2dataset calls `key` / `caption`
WDS_ALIASES = {"key": "__key__", "caption": "txt"}

_BASE_FIELDS = [
    ("source_file", pa.string()),
    ("source_row", pa.int64()),
    ("id", pa.string()),
    ("image", pa.binary()),
    ("image_path", pa.string()),
    ("prompt", pa.string()),
    ("answer", pa.string()),
    ("error_code", pa.string()),
    ("error_message", pa.string()),  # a reason found while reading
]


def carried_name(name: str) -> str:
    """Output column of a carried source column: `url` -> `source_url` (so `caption`, the
    alt-text in img2dataset, does not collide with the job's own caption)."""
    return f"source_{name}"


def source_schema(carry: tuple[str, ...] = ()) -> pa.Schema:
    return pa.schema(_BASE_FIELDS + [(carried_name(c), pa.string()) for c in carry])


class ShardError(Exception):
    """A unit that could not be read, at all or past some point; `code` is low-cardinality."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


@dataclass(frozen=True)
class Unit:
    key: str  # stable, readable, unique: "<file stem>-<hash of what the unit covers>"
    format: str  # parquet / webdataset / images
    path: str  # URI of the file, or of the folder for images
    files: tuple[str, ...] = ()  # images: the chunk's files (URIs)

    def to_item(self) -> dict:
        return asdict(self)

    @classmethod
    def from_item(cls, item: dict) -> Unit:
        return cls(item["key"], item["format"], item["path"], tuple(item.get("files") or ()))


def uri(path: str) -> str:
    return path if "://" in path else posixpath.abspath(path)


def unit_key(stem: str, covers: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)[:40] or "unit"
    return f"{readable}-{hashlib.sha1(covers.encode()).hexdigest()[:12]}"


# -- planning -------------------------------------------------------------------------------------------


def plan_units(paths: list[str], fmt: str = "auto") -> list[Unit]:
    """The units of every input, in a stable order (the same corpus always gives the same units)."""
    units: list[Unit] = []
    for path in paths:
        units += _plan_one(uri(path), fmt)
    return units


def _plan_one(location: str, fmt: str) -> list[Unit]:
    fs, root = pafs.FileSystem.from_uri(location)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {location!r} does not exist")
    if info.type == pafs.FileType.File:
        files = [root]
    else:
        listing = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        files = sorted(f.path for f in listing if f.type == pafs.FileType.File and not _hidden(f.path, root))
    to_uri = _uri_maker(location)
    formats = detect_formats(files) if fmt == "auto" else [fmt]
    units = []
    for kind in formats:
        if kind == "parquet":
            units += [Unit(unit_key(_stem(f), f), "parquet", to_uri(f)) for f in files if f.endswith(".parquet")]
        elif kind == "webdataset":
            units += [Unit(unit_key(_stem(f), f), "webdataset", to_uri(f)) for f in files if f.endswith(".tar")]
        elif kind == "images":
            folder = root if info.type == pafs.FileType.Directory else posixpath.dirname(root)
            units += [
                Unit(
                    unit_key(f"{_stem(folder)}-{start // IMAGES_PER_UNIT:06d}", f"{folder}|{chunk[0]}|{len(chunk)}"),
                    "images",
                    to_uri(folder),
                    tuple(to_uri(f) for f in chunk),
                )
                for start in range(0, len(files), IMAGES_PER_UNIT)
                for chunk in [files[start : start + IMAGES_PER_UNIT]]
            ]
        else:
            raise ValueError(f"unknown input format {kind!r}; choose one of {FORMATS}")
    return units


def _uri_maker(location: str):
    """Paths the filesystem lists -> URIs a worker can open: the input's scheme and its query
    (`?endpoint_override=...` for an S3-compatible server) put back on."""
    if "://" not in location or location.startswith("file://"):
        return lambda path: path
    scheme = location.split("://", 1)[0]
    query = "?" + location.split("?", 1)[1] if "?" in location else ""
    return lambda path: f"{scheme}://{path}{query}"


def _inner_path(location: str) -> str:
    """The path part of a URI made by `_uri_maker` (no filesystem is created for it)."""
    return location.split("://", 1)[1].split("?", 1)[0] if "://" in location else location


def detect_formats(files: list[str]) -> list[str]:
    """From the files' suffixes: Parquet and WebDataset shards (both, in a mixed folder), else a
    folder of images (where every file is an image to try, so a stray file gets an error row)."""
    shards = [
        kind
        for kind, suffix in (("parquet", ".parquet"), ("webdataset", ".tar"))
        if any(f.endswith(suffix) for f in files)
    ]
    return shards or ["images"]


def _hidden(path: str, root: str) -> bool:
    return any(part.startswith((".", "_")) for part in posixpath.relpath(path, root).split("/"))


def _stem(path: str) -> str:
    return posixpath.basename(path.rstrip("/")).split(".")[0]


# -- reading --------------------------------------------------------------------------------------------


def read_unit(unit: Unit, carry: tuple[str, ...] = ()) -> Iterator[pa.Table]:
    """The unit's rows as tables in `source_schema(carry)`; raises ShardError where reading fails."""
    readers = {"parquet": _read_parquet, "webdataset": _read_tar, "images": _read_images}
    yield from readers[unit.format](unit, carry)


def _open(path: str, random_access: bool):
    try:
        fs, inner = pafs.FileSystem.from_uri(path)
        return fs.open_input_file(inner) if random_access else fs.open_input_stream(inner)
    except Exception as err:  # gone since planning, permissions, network
        raise ShardError("unreadable_shard", f"{path}: {err}") from None


def _read_parquet(unit: Unit, carry) -> Iterator[pa.Table]:
    try:
        file = pq.ParquetFile(_open(unit.path, random_access=True))
    except ShardError:
        raise
    except Exception as err:  # not Parquet: a crashed download, a stray file
        raise ShardError("unreadable_shard", f"{unit.path}: {err}") from None
    names = file.schema_arrow.names
    id_column = next((c for c in ID_COLUMNS if c in names), None)
    image_column = next((c for c in IMAGE_COLUMNS if c in names), None)
    if id_column is None:
        raise ShardError("no_id_column", f"{unit.path} has none of the id columns {ID_COLUMNS} (columns: {names})")
    if image_column is None and "image_path" not in names:
        raise ShardError(
            "no_image_column", f"{unit.path} has no image column {IMAGE_COLUMNS} or image_path (columns: {names})"
        )
    wanted = {id_column, image_column, "image_path", "prompt", "answer", *carry} & set(names)
    first = 0
    try:
        for batch in file.iter_batches(batch_size=ROWS_PER_READ, columns=sorted(wanted)):
            table = pa.Table.from_batches([batch])
            yield _from_parquet(table, unit.path, first, id_column, image_column, carry)
            first += len(table)
    except Exception as err:  # a corrupt row group: what came before it stands
        raise ShardError("corrupt_shard", f"{unit.path} after row {first}: {err}") from None


def _from_parquet(table: pa.Table, path: str, first: int, id_column: str, image_column: str | None, carry) -> pa.Table:
    rows = len(table)
    image = table.column(image_column) if image_column else pa.chunked_array([pa.nulls(rows, pa.binary())])
    paths = _column(table, "image_path")
    code = message = pa.nulls(rows, pa.string())
    if pa.types.is_struct(image.type) and image.type.get_field_index("bytes") >= 0:  # Hugging Face Image()
        if image.type.get_field_index("path") >= 0:
            paths = pc.coalesce(paths, pc.struct_field(image, "path").cast(pa.string()))
        image = pc.struct_field(image, "bytes")
    if pa.types.is_string(image.type) or pa.types.is_large_string(image.type):
        paths, image = pc.coalesce(paths, image.cast(pa.string())), pa.nulls(rows, pa.binary())  # a column of paths
    elif not (_is_binary(image.type) or pa.types.is_null(image.type)):
        code = pa.array(["wrong_type"] * rows, pa.string())
        message = pa.array([f"the image column holds {image.type}, not encoded bytes"] * rows, pa.string())
        image = pa.nulls(rows, pa.binary())
    columns = {
        "source_file": pa.array([path] * rows, pa.string()),
        "source_row": pa.array(np.arange(first, first + rows, dtype=np.int64)),
        "id": _as_text(table.column(id_column)),
        "image": image.cast(pa.binary()),
        "image_path": paths,
        "prompt": _column(table, "prompt"),
        "answer": _column(table, "answer"),
        "error_code": code,
        "error_message": message,
    }
    columns.update({carried_name(c): _column(table, c) for c in carry})
    return pa.table(columns, schema=source_schema(carry))


def _column(table: pa.Table, name: str):
    if name in table.column_names:
        return _as_text(table.column(name))
    return pa.nulls(len(table), pa.string())


def _as_text(values) -> pa.Array:
    """Any column as strings: scalars cast (an int64 id becomes "17"), nested values as JSON."""
    kind = values.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind):
        return values.cast(pa.string())
    if pa.types.is_nested(kind) or _is_binary(kind):
        return pa.array([None if v is None else _json_text(v) for v in values.to_pylist()], pa.string())
    return values.cast(pa.string())


def _json_text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return json.dumps(value, default=str, ensure_ascii=False)


def _is_binary(type_: pa.DataType) -> bool:
    return pa.types.is_binary(type_) or pa.types.is_large_binary(type_) or pa.types.is_fixed_size_binary(type_)


def _read_tar(unit: Unit, carry) -> Iterator[pa.Table]:
    """Stream the tar once, member by member (samples are consecutive members sharing a key).
    A tar cut off mid-member keeps every sample completed before the damage."""
    samples: list[dict] = []
    index, current = 0, None
    try:
        with tarfile.open(fileobj=_open(unit.path, random_access=False), mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, suffix = _split_member(member.name)
                if current is not None and key != current["__key__"]:
                    samples.append(current)
                    current = None
                    if len(samples) == ROWS_PER_READ:
                        yield _from_samples(samples, unit.path, index, carry)
                        index, samples = index + len(samples), []
                current = current or {"__key__": key}
                current[suffix] = tar.extractfile(member).read()  # raises if the member is cut off
            if current is not None:
                samples.append(current)
    except (tarfile.TarError, EOFError, OSError) as err:
        # A sample whose member was cut off is dropped; whole samples before it are kept.
        if samples:
            yield _from_samples(samples, unit.path, index, carry)
        raise ShardError("truncated_shard", f"{unit.path} after sample {index + len(samples)}: {err}") from None
    if samples:
        yield _from_samples(samples, unit.path, index, carry)


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset naming: the key is the path up to the first dot of the file name."""
    folder, base = posixpath.split(name)
    stem, _, suffix = base.partition(".")
    return posixpath.join(folder, stem), suffix.lower()


def _from_samples(samples: list[dict], path: str, first: int, carry) -> pa.Table:
    def text(sample, suffix):
        value = sample.get(suffix)
        return None if value is None else value.decode("utf-8", errors="replace")

    columns = {
        "source_file": [path] * len(samples),
        "source_row": list(range(first, first + len(samples))),
        "id": [s["__key__"] for s in samples],
        "image": [next((s[x] for x in IMAGE_SUFFIXES if x in s), None) for s in samples],
        "image_path": [None] * len(samples),
        "prompt": [text(s, "prompt") for s in samples],
        "answer": [text(s, "answer") for s in samples],
        "error_code": [None] * len(samples),
        "error_message": [None] * len(samples),
    }
    columns.update({carried_name(c): [_sample_field(s, c) for s in samples] for c in carry})
    return pa.table(columns, schema=source_schema(carry))


def _sample_field(sample: dict, name: str) -> str | None:
    """A carried name in a WebDataset sample: a member with that suffix, `__key__` for `key`, the
    `.txt` member for `caption`, else a field of the `.json` member (img2dataset's `url`, ...)."""
    for candidate in (name, WDS_ALIASES.get(name)):
        if candidate == "__key__":
            return sample["__key__"]
        if candidate in sample:
            return sample[candidate].decode("utf-8", errors="replace")
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except ValueError:
        return None
    value = meta.get(name) if isinstance(meta, dict) else None
    return value if value is None or isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _read_images(unit: Unit, carry) -> Iterator[pa.Table]:
    """Paths only: the bytes are read by the prepare step, where a missing file is a row error."""
    root = _inner_path(unit.path).rstrip("/")
    for start in range(0, len(unit.files), ROWS_PER_READ):
        chunk = unit.files[start : start + ROWS_PER_READ]
        inner = [_inner_path(f) for f in chunk]
        columns = {
            "source_file": list(chunk),
            "source_row": list(range(start, start + len(chunk))),
            "id": [posixpath.relpath(p, root) for p in inner],
            "image": [None] * len(chunk),
            "image_path": list(chunk),
            "prompt": [None] * len(chunk),
            "answer": [None] * len(chunk),
            "error_code": [None] * len(chunk),
            "error_message": [None] * len(chunk),
        }
        columns.update({carried_name(c): [None] * len(chunk) for c in carry})
        yield pa.table(columns, schema=source_schema(carry))
